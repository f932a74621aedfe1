//! Jobs of VMs: checkpointed as a consistent cut, restored as a whole.
//!
//! A job is the VMs named `JOB-...` on the cluster's hosts (`ffmk-node
//! slurm-vm` names them `job<ID>-rank<R>`). `ffmk-node job checkpoint JOB`
//! runs on any host and drives every host's daemon over the control port:
//!
//! 1. **pre-copy** (`job-precopy`): each daemon starts a live snapshot of
//!    each of its VMs of the job into `job_checkpoint_dir/JOB/EPOCH/VM/`,
//!    all hosts and VMs at once, while the job runs, as a *cut*
//!    (`SnapshotRequest::cut`): once converged, the copy goes on until the
//!    job pauses; the step ends when every copy converged;
//! 2. **the cut**: `pause JOB-*` through the control broadcast; each
//!    daemon hands it to its VMs' snapshots (a file beside each: the VMMs'
//!    APIs are busy with the snapshots), which pause their VMs and write
//!    the last pages and the vCPU and device state;
//! 3. **capture** (`job-capture`): each daemon answers once its VMs are
//!    captured;
//! 4. `resume JOB-*` through the broadcast: each snapshot resumes its VM,
//!    then commits. The job's common pause is steps 2-4;
//! 5. **commit** (`job-commit`): each daemon collects its VMs' snapshots
//!    and writes `job.json` beside them, which marks the epoch complete
//!    (and older epochs beyond `job_checkpoint_keep` go).
//!
//! No VM resumes before every VM of the job has paused, so no VM's saved
//! state holds data a peer sent after the peer's own state was saved: TCP
//! connections between them survive a restore (segments in flight at the
//! cut are lost, and resent, as in any short outage). Any failure before
//! step 5 (a VM that refuses, a host that does not answer) discards the
//! epoch on every host (`job-discard`) and resumes every VM; an epoch
//! without `job.json` is never restored.
//!
//! `ffmk-node job restore JOB` picks the newest complete epoch (or one
//! named), checks on every target host that each VM can start there
//! (`job-check`: its copy, its disks and bridges, the memory, no VM of the
//! name) before anything starts, starts them all paused (`job-start`), then
//! resumes the job through the broadcast. A VM goes back to the host it was
//! checkpointed on unless told otherwise (`--on VM=HOST`).
use super::{arriving, lock, vms, Daemon};
use crate::config::{Plane, Resolved};
use crate::control::{self, Reply, Request};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm_api::model::{
    Cut as CutRequest, CutFiles, SnapshotKind, SnapshotReply, SnapshotRequest, State, VmConfig,
};

/// The job's manifest in an epoch directory: present only when complete.
pub const MANIFEST: &str = "job.json";

/// How long one VM's snapshot may take (a live snapshot of a big VM over a
/// slow burst buffer), and one VM's restore.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a host waits for the broadcast to pause (capture) or resume
/// (commit) its VMs of the job.
const PAUSED_WITHIN: Duration = Duration::from_secs(10);

/// How long a converged copy goes on waiting for its job's pause (and a
/// captured VM for its job's resume) before its VMM gives up.
const CUT_WAIT: Duration = Duration::from_secs(600);

/// A job operation that never finished (its driver died) stops holding
/// its VMs after this long.
const HOLD_MAX: Duration = Duration::from_secs(3600);

/// Is `vm` one of `job`'s VMs (`JOB-` and at least one more character)?
pub fn member(job: &str, vm: &str) -> bool {
    vm.strip_prefix(job)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|r| !r.is_empty())
}

/// An epoch name: `ckpt-` and the milliseconds since 1970 it began.
pub fn valid_epoch(epoch: &str) -> bool {
    epoch
        .strip_prefix("ckpt-")
        .is_some_and(|d| (1..=20).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// What the daemon holds for job operations.
#[derive(Default)]
pub(crate) struct Jobs {
    /// VM -> (job, epoch, since): being checkpointed; the balancer leaves it
    /// where it is.
    held: HashMap<String, (String, String, Instant)>,
    /// VM -> (job, epoch, pid): started paused by `job-start`.
    started: HashMap<String, (String, String, u32)>,
    /// VM -> when the broadcast paused it, and for how long (once it
    /// resumed it): each VM's share of a job's common pause, on this
    /// host's clock.
    paused: HashMap<String, (Instant, Option<Duration>)>,
    /// VM -> its cut: the files its live snapshot watches and the thread
    /// whose snapshot request lasts until the job resumed.
    cuts: HashMap<String, VmCut>,
}

/// One VM's part in a job checkpoint's cut.
pub(crate) struct VmCut {
    gates: CutFiles,
    request: std::thread::JoinHandle<Result<SnapshotReply, String>>,
}

impl Jobs {
    /// The broadcast's pause or resume for the VMs in a cut whose names
    /// `pattern` matches: their snapshots pause or resume them. Returns
    /// their names (the broadcast asks the other VMMs itself).
    pub(crate) fn cut_signals(
        &mut self,
        pattern: &str,
        pause: bool,
        matches: &dyn Fn(&str, &str) -> bool,
    ) -> Vec<String> {
        let mut done = Vec::new();
        let names: Vec<String> = self
            .cuts
            .keys()
            .filter(|n| matches(pattern, n))
            .cloned()
            .collect();
        for name in names {
            let c = &self.cuts[&name];
            let gate = if pause {
                &c.gates.pause
            } else {
                &c.gates.resume
            };
            if std::fs::File::create(gate).is_ok() {
                if pause {
                    self.note_paused(&name);
                } else {
                    self.note_resumed(&name);
                }
                done.push(name);
            }
        }
        done.sort();
        done
    }

    /// The control broadcast paused `vm`.
    pub(crate) fn note_paused(&mut self, vm: &str) {
        self.paused.insert(vm.to_string(), (Instant::now(), None));
    }

    /// The control broadcast resumed `vm`.
    pub(crate) fn note_resumed(&mut self, vm: &str) {
        if let Some((at, took)) = self.paused.get_mut(vm) {
            took.get_or_insert(at.elapsed());
        }
    }

    /// Why the balancer must leave `vm` alone now, if it must.
    pub(crate) fn holds(&self, vm: &str) -> Option<String> {
        self.held
            .get(vm)
            .filter(|(_, _, since)| since.elapsed() < HOLD_MAX)
            .map(|(job, epoch, _)| format!("is in checkpoint {epoch} of job {job}"))
    }
}

/// One `job-start` at a time on a host: each names its new TAPs after the
/// interfaces present, which the previous one may just have added.
static STARTING: Mutex<()> = Mutex::new(());

// ----- the daemon's side -----

/// Serves a `job-*` control request.
pub(crate) fn serve(d: &Daemon, req: Request) -> Reply {
    let (op, r) = match req {
        Request::JobPrecopy { job, epoch } => ("job-precopy", precopy(d, &job, &epoch)),
        Request::JobCapture { job, epoch } => ("job-capture", capture(d, &job, &epoch)),
        Request::JobCommit {
            job,
            epoch,
            manifest,
        } => ("job-commit", commit(d, &job, &epoch, &manifest)),
        Request::JobDiscard { job, epoch } => ("job-discard", discard(d, &job, &epoch)),
        Request::JobList { job } => ("job-list", list(d, &job)),
        Request::JobMembers { job } => ("job-members", list_members(d, &job)),
        Request::JobCheck { job, epoch, vm } => (
            "job-check",
            restorable(d, &job, &epoch, &vm).map(|_| json!({"vm": vm})),
        ),
        Request::JobStart { job, epoch, vm } => ("job-start", start(d, &job, &epoch, &vm)),
        Request::JobStop { job, epoch, vm } => ("job-stop", stop(d, &job, &epoch, &vm)),
        _ => return Reply::refuse("not a job request"),
    };
    if !matches!(op, "job-list" | "job-check" | "job-members") {
        d.log.event(
            op,
            json!({"ok": r.is_ok(), "done": r.as_ref().ok(), "error": r.as_ref().err()}),
        );
    }
    match r {
        Ok(v) => Reply {
            job: Some(v),
            ..Reply::ok()
        },
        Err(e) => Reply::refuse(e),
    }
}

/// `job_checkpoint_dir/JOB`, the names checked.
fn job_dir(d: &Daemon, job: &str) -> Result<PathBuf, String> {
    if !balance::ckpt::valid_job(job) {
        return Err(format!(
            "{job:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)"
        ));
    }
    let dir = d.r.config.job_checkpoint_dir.as_ref().ok_or_else(|| {
        format!(
            "host {} keeps no job checkpoints (no job_checkpoint_dir in its settings)",
            d.me()
        )
    })?;
    Ok(dir.join(job))
}

/// `job_checkpoint_dir/JOB/EPOCH`, the names checked.
fn epoch_dir(d: &Daemon, job: &str, epoch: &str) -> Result<PathBuf, String> {
    if !valid_epoch(epoch) {
        return Err(format!(
            "{epoch:?} is not an epoch name (ckpt-MILLISECONDS)"
        ));
    }
    Ok(job_dir(d, job)?.join(epoch))
}

/// Runs `f` on every item at once; results in the items' order.
fn each<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = items.iter().map(|i| s.spawn(move || f(i))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// A VMM's refusal, as one line.
fn api_error(e: vmm_api::Error) -> String {
    match e.status() {
        Some(st) => format!("{st} {}", e.message()),
        None => e.to_string(),
    }
}

/// This host's VMs of `job`, asked now; a VM that does not answer fails.
fn members(d: &Daemon, job: &str) -> Result<Vec<vms::LocalVm>, String> {
    let (found, errors) =
        vms::discover_matching(&d.r.config.vm_dir, &d.incoming_names(), &|n| member(job, n));
    if errors.is_empty() {
        Ok(found)
    } else {
        let e: Vec<String> = errors
            .into_iter()
            .map(|(n, e)| format!("{n} does not answer: {e}"))
            .collect();
        Err(e.join("; "))
    }
}

fn list_members(d: &Daemon, job: &str) -> Result<Value, String> {
    if !balance::ckpt::valid_job(job) {
        return Err(format!(
            "{job:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)"
        ));
    }
    let vms: Vec<Value> = members(d, job)?
        .iter()
        .map(|v| json!({"name": v.name, "state": v.state, "memory_mib": v.memory_mib}))
        .collect();
    Ok(json!({ "vms": vms }))
}

/// Why VM `v` cannot be part of a job checkpoint, if it cannot.
fn not_checkpointable(v: &vms::LocalVm) -> Option<String> {
    if v.state != State::Running {
        return Some(format!(
            "is {} (a checkpoint needs the job running)",
            v.state
        ));
    }
    if v.migrating {
        return Some("is migrating".into());
    }
    if let Some(disk) = v.disks.iter().find(|d| !d.readonly) {
        return Some(format!(
            "has a read-write disk ({}), which no checkpoint holds",
            disk.path.display()
        ));
    }
    if let Some(n) = v.nets.iter().find(|n| n.bridge.is_none()) {
        return Some(format!(
            "has TAP {} without a bridge, which a restore could not join again",
            n.tap
        ));
    }
    None
}

fn precopy(d: &Daemon, job: &str, epoch: &str) -> Result<Value, String> {
    let root = epoch_dir(d, job, epoch)?;
    let mine = members(d, job)?;
    if mine.is_empty() {
        return Ok(json!({"vms": []}));
    }
    let refused: Vec<String> = mine
        .iter()
        .filter_map(|v| not_checkpointable(v).map(|why| format!("{} {why}", v.name)))
        .collect();
    if !refused.is_empty() {
        return Err(refused.join("; "));
    }
    {
        let mut j = lock(&d.jobs);
        if let Some((vm, why)) = mine
            .iter()
            .find_map(|v| j.holds(&v.name).map(|why| (&v.name, why)))
        {
            return Err(format!("{vm} {why} already"));
        }
        for v in &mine {
            j.paused.remove(&v.name);
            j.held.insert(
                v.name.clone(),
                (job.to_string(), epoch.to_string(), Instant::now()),
            );
        }
    }
    if let Err(e) = std::fs::create_dir_all(&root) {
        let _ = discard(d, job, epoch);
        return Err(format!("cannot create {}: {e}", root.display()));
    }
    // Each VM's live snapshot runs on its own thread until the job has
    // paused, been captured and resumed (`commit` collects it); this step
    // ends once every copy converged.
    let t0 = Instant::now();
    for v in &mine {
        let dest = root.join(&v.name);
        let gates = CutFiles::beside(&dest);
        gates.clear();
        let req = SnapshotRequest {
            kind: SnapshotKind::Full,
            live: true,
            cut: Some(CutRequest {
                max_wait_ms: CUT_WAIT.as_millis() as u64,
            }),
            ..SnapshotRequest::full(dest)
        };
        let (sock, name) = (v.sock.clone(), v.name.clone());
        let request = std::thread::Builder::new()
            .name("job-cut".into())
            .spawn(move || {
                vms::api(&sock, SNAPSHOT_TIMEOUT)
                    .snapshot(&req)
                    .map_err(|e| format!("{name}: {}", api_error(e)))
            });
        match request {
            Ok(request) => {
                lock(&d.jobs)
                    .cuts
                    .insert(v.name.clone(), VmCut { gates, request });
            }
            Err(e) => {
                let _ = discard(d, job, epoch);
                return Err(format!("cannot start a thread: {e}"));
            }
        }
    }
    let mut ready: Vec<Value> = Vec::new();
    while ready.len() < mine.len() {
        let mut failed = Vec::new();
        ready.clear();
        {
            let j = lock(&d.jobs);
            for v in &mine {
                let Some(c) = j.cuts.get(&v.name) else {
                    continue;
                };
                if c.gates.ready.exists() {
                    ready.push(json!({"vm": v.name, "memory_bytes": v.memory_mib << 20}));
                } else if c.request.is_finished() {
                    failed.push(v.name.clone());
                }
            }
        }
        if !failed.is_empty() || t0.elapsed() > SNAPSHOT_TIMEOUT {
            // A cut's request ends before the pause only with an error.
            let why = discard_reasons(d, job, epoch);
            return Err(if why.is_empty() {
                format!("no converged copy of {} in time", failed.join(", "))
            } else {
                why
            });
        }
        if ready.len() < mine.len() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(json!({ "vms": ready, "converged_ms": t0.elapsed().as_secs_f64() * 1e3 }))
}

/// One VM's snapshot figures, as a job step reports them.
fn figures(vm: &str, a: &vmm_api::model::SnapshotReply) -> Value {
    json!({
        "vm": vm, "pause_ms": a.pause_ms, "total_ms": a.total_ms, "rounds": a.rounds,
        "data_bytes": a.data_bytes, "memory_bytes": a.memory_bytes,
    })
}

/// The VMs this host holds for `job`'s epoch `epoch`.
fn held_for(d: &Daemon, job: &str, epoch: &str) -> Vec<String> {
    let mut v: Vec<String> = lock(&d.jobs)
        .held
        .iter()
        .filter(|(_, (j, e, _))| j == job && e == epoch)
        .map(|(n, _)| n.clone())
        .collect();
    v.sort();
    v
}

fn capture(d: &Daemon, job: &str, epoch: &str) -> Result<Value, String> {
    epoch_dir(d, job, epoch)?;
    let names = held_for(d, job, epoch);
    if names.is_empty() {
        return Err(format!("no VM of job {job} is in checkpoint {epoch} here"));
    }
    // Each VM's snapshot pauses it when the broadcast's pause reaches this
    // host, writes the rest and says so.
    let deadline = Instant::now() + PAUSED_WITHIN;
    loop {
        let mut waiting = Vec::new();
        {
            let j = lock(&d.jobs);
            for n in &names {
                match j.cuts.get(n) {
                    Some(c) if c.gates.captured.exists() => {}
                    Some(c) if !c.request.is_finished() => waiting.push(n.clone()),
                    _ => {
                        drop(j);
                        return Err(format!(
                            "{n}: its snapshot ended before its capture: {}",
                            discard_reasons(d, job, epoch)
                        ));
                    }
                }
            }
        }
        if waiting.is_empty() {
            return Ok(json!({"vms": names.iter().map(|n| json!({"vm": n})).collect::<Vec<_>>()}));
        }
        if Instant::now() > deadline {
            // What this host made of the pause, if it came at all.
            let command = format!("pause {job}-*");
            let heard = lock(&d.broadcasts)
                .iter()
                .rev()
                .find(|b| b["command"] == command.as_str())
                .map(|b| b["result"].as_str().unwrap_or("").to_string());
            return Err(format!(
                "{} not captured {} s after the job's pause ({}): its state would not belong to the cut",
                waiting.join(", "),
                PAUSED_WITHIN.as_secs(),
                match heard {
                    Some(r) => format!("this host's last `{command}`: {r}"),
                    None => format!("no `{command}` reached this host"),
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ends the cuts of `job`'s epoch here (their VMMs told to abandon them)
/// and returns their snapshots' outcomes.
fn end_cuts(
    d: &Daemon,
    job: &str,
    epoch: &str,
    abandon: bool,
) -> Vec<(String, Result<SnapshotReply, String>)> {
    let names = held_for(d, job, epoch);
    let cuts: Vec<(String, VmCut)> = {
        let mut j = lock(&d.jobs);
        names
            .iter()
            .filter_map(|n| j.cuts.remove(n).map(|c| (n.clone(), c)))
            .collect()
    };
    if abandon {
        for (_, c) in &cuts {
            let _ = std::fs::File::create(&c.gates.abort);
        }
    }
    cuts.into_iter()
        .map(|(n, c)| {
            let r = c
                .request
                .join()
                .unwrap_or_else(|_| Err(format!("{n}: the snapshot's thread panicked")));
            c.gates.clear();
            (n, r)
        })
        .collect()
}

/// Abandons the cuts of `job`'s epoch and discards it here; returns why
/// the snapshots that failed did.
fn discard_reasons(d: &Daemon, job: &str, epoch: &str) -> String {
    let why: Vec<String> = end_cuts(d, job, epoch, true)
        .into_iter()
        .filter_map(|(_, r)| r.err())
        .filter(|e| !e.contains("abandoned"))
        .collect();
    let _ = discard(d, job, epoch);
    why.join("; ")
}

/// Writes `bytes` to `path` through a temporary file renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
}

fn commit(d: &Daemon, job: &str, epoch: &str, manifest: &Value) -> Result<Value, String> {
    let root = epoch_dir(d, job, epoch)?;
    if manifest["job"] != job || manifest["epoch"] != epoch || !manifest["vms"].is_array() {
        return Err("the manifest is not this job's and epoch's".into());
    }
    if !root.is_dir() {
        return Err(format!("{} does not exist here", root.display()));
    }
    // The broadcast's resume may reach this host after this request (it
    // takes another path): wait for it, and how long each VM was paused.
    let names = held_for(d, job, epoch);
    let deadline = Instant::now() + PAUSED_WITHIN;
    let (paused, not_resumed) = loop {
        let (mut paused, mut not_resumed) = (Vec::new(), Vec::new());
        {
            let j = lock(&d.jobs);
            for n in &names {
                match j.paused.get(n).and_then(|(_, took)| *took) {
                    Some(t) => paused.push(json!({"vm": n, "paused_ms": t.as_secs_f64() * 1e3})),
                    None => not_resumed.push(n.clone()),
                }
            }
        }
        if not_resumed.is_empty() || Instant::now() > deadline {
            break (paused, not_resumed);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // A VM the broadcast did not resume is resumed here (its snapshot ends
    // only then), and reported.
    {
        let j = lock(&d.jobs);
        for n in &not_resumed {
            if let Some(c) = j.cuts.get(n) {
                let _ = std::fs::File::create(&c.gates.resume);
            }
        }
    }
    // Every VM's snapshot committed (after the job resumed).
    let outcomes = end_cuts(d, job, epoch, false);
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    let snapshots: Vec<Value> = outcomes
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|a| figures(n, a)))
        .collect();
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| e.to_string())?;
    write_atomically(&root.join(MANIFEST), &text)?;
    let jd = job_dir(d, job)?;
    write_atomically(&jd.join("latest"), epoch.as_bytes())?;
    let removed = prune(&jd, epoch, d.r.config.job_checkpoint_keep);
    lock(&d.jobs)
        .held
        .retain(|_, (j, e, _)| !(j == job && e == epoch));
    Ok(json!({
        "epoch": epoch, "removed": removed, "vms": paused, "not_resumed": not_resumed,
        "snapshots": snapshots,
    }))
}

/// Removes complete epochs beyond the newest `keep`, and incomplete ones
/// older than the newest complete one (`newest` is never removed).
fn prune(jd: &Path, newest: &str, keep: usize) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(jd) else {
        return Vec::new();
    };
    let mut epochs: Vec<(u64, String, bool)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ms = name.strip_prefix("ckpt-")?.parse::<u64>().ok()?;
            Some((ms, name.clone(), e.path().join(MANIFEST).is_file()))
        })
        .collect();
    epochs.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut complete = 0;
    let mut seen_complete = false;
    let mut removed = Vec::new();
    for (_, name, done) in epochs {
        let go = if done {
            complete += 1;
            seen_complete = true;
            complete > keep
        } else {
            seen_complete
        };
        if go && name != newest && std::fs::remove_dir_all(jd.join(&name)).is_ok() {
            removed.push(name);
        }
    }
    removed
}

fn discard(d: &Daemon, job: &str, epoch: &str) -> Result<Value, String> {
    let root = epoch_dir(d, job, epoch)?;
    let _ = end_cuts(d, job, epoch, true);
    let names = held_for(d, job, epoch);
    // The manifest first: from here on the epoch is never restored.
    let _ = std::fs::remove_file(root.join(MANIFEST));
    for n in &names {
        let _ = std::fs::remove_dir_all(root.join(n));
    }
    let _ = std::fs::remove_dir(&root);
    lock(&d.jobs)
        .held
        .retain(|_, (j, e, _)| !(j == job && e == epoch));
    Ok(json!({"removed": names}))
}

fn list(d: &Daemon, job: &str) -> Result<Value, String> {
    let jd = job_dir(d, job)?;
    let mut found: Vec<Value> = std::fs::read_dir(&jd)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(valid_epoch))
                .filter_map(|e| {
                    let text = std::fs::read(e.path().join(MANIFEST)).ok()?;
                    serde_json::from_slice::<Value>(&text).ok()
                })
                .filter(|m| m["job"] == job)
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|m| std::cmp::Reverse(m["created_unix_ms"].as_u64().unwrap_or(0)));
    Ok(json!({ "copies": found }))
}

/// What starting VM `vm` of the epoch here takes: its snapshot directory,
/// the flags for its disks and network devices, and its memory.
fn restorable(
    d: &Daemon,
    job: &str,
    epoch: &str,
    vm: &str,
) -> Result<(PathBuf, Vec<String>), String> {
    let root = epoch_dir(d, job, epoch)?;
    if !member(job, vm) || !super::safe_name(vm) {
        return Err(format!("{vm:?} is not a VM name of job {job}"));
    }
    let manifest: Value = std::fs::read(root.join(MANIFEST))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .ok_or_else(|| {
            format!(
                "{epoch} of job {job} is not a complete checkpoint on {}",
                d.me()
            )
        })?;
    let listed = manifest["vms"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["name"] == vm));
    if !listed {
        return Err(format!("{vm} is not in checkpoint {epoch} of job {job}"));
    }
    let snap = root.join(vm);
    let opened = snapshot::Snapshot::open(&snap)
        .map_err(|e| format!("{vm}: its copy is not usable on {}: {e}", d.me()))?;
    let sock = d.r.config.vm_dir.join(format!("{vm}.sock"));
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        return Err(format!("a VM named {vm} runs on {}", d.me()));
    }
    let config: VmConfig = serde_json::from_value(opened.manifest.vm_config.clone())
        .map_err(|e| format!("{vm}: its copy's configuration is unreadable: {e}"))?;
    let c = &d.r.config;
    let mut flags = Vec::new();
    let on = |e: String| format!("{vm} {e}");
    for disk in arriving::disk_flags(&config.disks, &c.shared_disk_dirs).map_err(on)? {
        flags.extend(["--disk".to_string(), disk]);
    }
    for net in
        arriving::net_flags(&config.nets, &c.vm_bridges, Path::new("/sys/class/net")).map_err(on)?
    {
        flags.extend(["--net".to_string(), net]);
    }
    let need = opened.manifest.memory_bytes >> 20;
    let free = vms::free_mib().unwrap_or(0);
    if free < need + c.reserve_mib {
        return Err(format!(
            "{vm} needs {need} MiB + {} MiB reserve; {} has {free} MiB free",
            c.reserve_mib,
            d.me()
        ));
    }
    Ok((snap, flags))
}

fn start(d: &Daemon, job: &str, epoch: &str, vm: &str) -> Result<Value, String> {
    let _one = lock(&STARTING);
    let t0 = Instant::now();
    let (snap, flags) = restorable(d, job, epoch, vm)?;
    let c = &d.r.config;
    let dir = &c.vm_dir;
    let sock = dir.join(format!("{vm}.sock"));
    let log_path = dir.join(format!("{vm}.vmm.log"));
    let mut cmd = Command::new(&c.vmm);
    cmd.args(["restore", "--paused", "--from"])
        .arg(&snap)
        .args(&d.plane.vmm_args)
        .arg("--api-socket")
        .arg(&sock)
        .arg("--console")
        .arg(format!(
            "file={}",
            dir.join(format!("{vm}.console")).display()
        ))
        .args(&flags);
    let mut child = super::spawn_vmm(cmd, &log_path, &c.vmm)?;
    let pid = child.id();
    // Ready once its API shows it paused.
    let paused = |_: &str| {
        vms::api(&sock, Duration::from_secs(2))
            .vm()
            .is_ok_and(|info| info.state == State::Paused)
    };
    super::wait_ready(&mut child, &log_path, RESTORE_TIMEOUT, &paused)
        .map_err(|e| format!("{vm}: the restoring VMM {e}"))?;
    // Reaped by the daemon when it ends (its status kept for `vm-watch`).
    lock(&d.local).children.push((vm.to_string(), child));
    lock(&d.jobs)
        .started
        .insert(vm.to_string(), (job.to_string(), epoch.to_string(), pid));
    Ok(json!({"vm": vm, "pid": pid, "restore_ms": t0.elapsed().as_secs_f64() * 1e3}))
}

fn stop(d: &Daemon, job: &str, epoch: &str, vm: &str) -> Result<Value, String> {
    let entry = lock(&d.jobs).started.get(vm).cloned();
    let Some((_, _, pid)) = entry.filter(|(j, e, _)| j == job && e == epoch) else {
        return Err(format!(
            "{vm} was not started here by a restore of {epoch} of job {job}"
        ));
    };
    let sock = d.r.config.vm_dir.join(format!("{vm}.sock"));
    if let Ok(info) = vms::api(&sock, Duration::from_secs(2)).vm() {
        if info.state != State::Paused {
            return Err(format!("{vm} runs: stop it through its API"));
        }
    }
    lock(&d.local).stop(Some(pid));
    lock(&d.jobs).started.remove(vm);
    Ok(json!({"vm": vm, "stopped": pid}))
}

// ----- the driver's side: `ffmk-node job ...` -----

/// A job command's view of the cluster: its hosts' control ports and the
/// local daemon's broadcast endpoint.
pub struct Driver<'a> {
    pub r: &'a Resolved,
    pub plane: &'a Plane,
    /// Told what happens, step by step.
    pub say: &'a (dyn Fn(&str) + Sync),
}

/// One host's answer to a control request.
type Answer = Result<Value, String>;

/// What the cut of a job checkpoint did.
struct Cut {
    /// Each host's pre-copy answer.
    pre: Vec<(usize, Answer)>,
    /// From sending the pause until every host captured, and until the
    /// resume was sent.
    all_captured: Duration,
    resume_sent: Duration,
    /// Whether the resume could be sent.
    resumed: Result<String, String>,
}

impl Driver<'_> {
    fn name(&self, slot: usize) -> &str {
        &self.r.names[slot]
    }

    /// Sends `req(slot)` to each host of `slots` at once.
    fn ask_all(
        &self,
        slots: &[usize],
        timeout: Duration,
        req: impl Fn(usize) -> Request + Sync,
    ) -> Vec<(usize, Answer)> {
        let answers = each(slots, |&s| {
            let r = control::call(self.r.control[s], &self.plane.trust, &req(s), timeout);
            match r {
                Ok(rep) if rep.ok => Ok(rep.job.or(rep.status).unwrap_or(Value::Null)),
                Ok(rep) => Err(rep.error.unwrap_or_else(|| "refused".into())),
                Err(e) => Err(e.to_string()),
            }
        });
        slots.iter().copied().zip(answers).collect()
    }

    /// The failures among `answers`, one line.
    fn failures(&self, answers: &[(usize, Answer)]) -> Option<String> {
        let f: Vec<String> = answers
            .iter()
            .filter_map(|(s, a)| a.as_ref().err().map(|e| format!("{}: {e}", self.name(*s))))
            .collect();
        (!f.is_empty()).then(|| f.join("; "))
    }

    /// The VMs of `job` on each host of `slots` (those with none left
    /// out), from their daemons; every host must answer.
    pub fn job_vms(
        &self,
        job: &str,
        slots: &[usize],
    ) -> Result<BTreeMap<usize, Vec<Value>>, String> {
        let answers = self.ask_all(slots, Duration::from_secs(30), |_| Request::JobMembers {
            job: job.into(),
        });
        if let Some(f) = self.failures(&answers) {
            return Err(format!(
                "not every host answered, and a job's VMs may be on any of them: {f}"
            ));
        }
        let mut out = BTreeMap::new();
        for (s, a) in answers {
            let vms: Vec<Value> = a
                .ok()
                .and_then(|st| st["vms"].as_array().cloned())
                .unwrap_or_default();
            if !vms.is_empty() {
                out.insert(s, vms);
            }
        }
        Ok(out)
    }

    /// Sends `verb JOB-*` through the control broadcast to the hosts of
    /// `slots` (and this one, its origin); returns the broadcast's id.
    fn send(&self, verb: &str, job: &str, slots: &[usize]) -> Result<String, String> {
        let mut group: Vec<usize> = slots.to_vec();
        if !group.contains(&self.r.slot) {
            group.push(self.r.slot);
        }
        let group_names: Vec<&str> = group.iter().map(|s| self.name(*s)).collect();
        let endpoint = std::net::SocketAddr::new(
            self.r.gossip[self.r.slot].ip(),
            self.r.config.broadcast_port,
        );
        let key = match &self.plane.trust {
            cluster_auth::Trust::Key(k) => Some(k.cluster().map_err(|e| e.to_string())?),
            cluster_auth::Trust::Insecure => None,
        };
        let answer = broadcast::udp::request(
            endpoint,
            &group_names.join(","),
            &format!("{verb} {job}-*"),
            Duration::from_secs(5),
            key,
        )
        .map_err(|e| format!("the local daemon's broadcast endpoint did not answer: {e}"))?;
        answer
            .strip_prefix("ok ")
            .map(String::from)
            .ok_or_else(|| format!("broadcast refused: {answer}"))
    }

    /// Runs `verb JOB-*` through the control broadcast and waits until
    /// each host reports every VM of `expect` done (`within`).
    fn broadcast(
        &self,
        verb: &str,
        job: &str,
        expect: &BTreeMap<usize, Vec<String>>,
        within: Duration,
    ) -> Result<(), String> {
        let slots: Vec<usize> = expect.keys().copied().collect();
        let id = self.send(verb, job, &slots)?;
        let command = format!("{verb} {job}-*");
        let done = if verb == "pause" {
            "paused ["
        } else {
            "resumed ["
        };
        let deadline = Instant::now() + within;
        let mut pending: Vec<usize> = expect.keys().copied().collect();
        let mut failed = Vec::new();
        while !pending.is_empty() {
            let answers = self.ask_all(&pending, Duration::from_secs(2), |_| Request::Status {});
            for (s, a) in answers {
                let Some(result) = a.ok().and_then(|st| {
                    st["broadcasts"].as_array()?.iter().find_map(|b| {
                        (b["id"] == id.as_str())
                            .then(|| b["result"].as_str().unwrap_or("").to_string())
                    })
                }) else {
                    continue;
                };
                pending.retain(|p| *p != s);
                let listed: Vec<&str> = result
                    .strip_prefix(done)
                    .and_then(|r| r.split(']').next())
                    .map(|l| l.split(',').collect())
                    .unwrap_or_default();
                let missed: Vec<&String> = expect[&s]
                    .iter()
                    .filter(|v| !listed.contains(&v.as_str()))
                    .collect();
                if !missed.is_empty() {
                    failed.push(format!("{}: {result}", self.name(s)));
                }
            }
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = pending.iter().map(|s| self.name(*s)).collect();
                failed.push(format!(
                    "no report of `{command}` within {} s from {}",
                    within.as_secs(),
                    names.join(", ")
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// The checkpoint coordinator's grant for `job` (waiting its turn);
    /// returns the token that releases it.
    fn grant(&self, job: &str, bytes: u64) -> Result<String, String> {
        let coord = self.r.control[self.r.ckpt_coordinator()];
        loop {
            let rep = control::call(
                coord,
                &self.plane.trust,
                &Request::CkptAcquire {
                    job: job.into(),
                    bytes,
                },
                Duration::from_secs(10),
            )
            .map_err(|e| format!("checkpoint coordinator: {e}"))?;
            let c = match (rep.ok, rep.ckpt) {
                (true, Some(c)) => c,
                _ => {
                    return Err(format!(
                        "checkpoint coordinator {coord}: {}",
                        rep.error.unwrap_or_else(|| "no answer".into())
                    ))
                }
            };
            if c["answer"] == "granted" {
                return Ok(c["token"].as_str().unwrap_or_default().to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn release(&self, job: &str, token: String) {
        let coord = self.r.control[self.r.ckpt_coordinator()];
        let _ = control::call(
            coord,
            &self.plane.trust,
            &Request::CkptRelease {
                job: job.into(),
                token,
            },
            Duration::from_secs(10),
        );
    }

    /// `ffmk-node job checkpoint`: returns the job's manifest with the
    /// figures of the checkpoint.
    pub fn checkpoint(&self, job: &str, hosts: &[usize]) -> Result<Value, String> {
        if !balance::ckpt::valid_job(job) {
            return Err(format!(
                "{job:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        let t0 = Instant::now();
        let found = self.job_vms(job, hosts)?;
        if found.is_empty() {
            return Err(format!(
                "no VM of job {job} runs on any host (its VMs are named {job}-...)"
            ));
        }
        let names: BTreeMap<usize, Vec<String>> = found
            .iter()
            .map(|(s, v)| {
                let n = v
                    .iter()
                    .filter_map(|v| v["name"].as_str().map(String::from));
                (*s, n.collect())
            })
            .collect();
        let slots: Vec<usize> = found.keys().copied().collect();
        let bytes: u64 = found
            .values()
            .flatten()
            .map(|v| v["memory_mib"].as_u64().unwrap_or(0) << 20)
            .sum();
        let total: usize = names.values().map(Vec::len).sum();
        (self.say)(&format!(
            "job {job}: {total} VM(s) on {} host(s); asking the checkpoint coordinator for a turn",
            slots.len()
        ));
        let token = self.grant(job, bytes)?;
        let waited = t0.elapsed();
        let epoch = format!("ckpt-{}", snapshot::manifest::now_unix_ms());
        let r = self.cut(job, &epoch, &slots, &names);
        self.release(job, token);
        let Cut {
            pre,
            all_captured,
            resume_sent,
            resumed,
        } = r?;
        let per_vm = |answers: &[(usize, Answer)]| -> Vec<Value> {
            answers
                .iter()
                .flat_map(|(s, a)| {
                    let host = self.name(*s).to_string();
                    a.as_ref()
                        .ok()
                        .and_then(|v| v["vms"].as_array().cloned())
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |mut v| {
                            v["host"] = json!(host);
                            v
                        })
                })
                .collect()
        };
        let converged_ms = pre
            .iter()
            .filter_map(|(_, a)| a.as_ref().ok()?["converged_ms"].as_f64())
            .fold(0.0, f64::max);
        let vms: Vec<Value> = per_vm(&pre)
            .iter()
            .map(|p| json!({"name": p["vm"], "host": p["host"], "memory_bytes": p["memory_bytes"]}))
            .collect();
        let mut manifest = json!({
            "job": job,
            "epoch": epoch,
            "created_unix_ms": epoch.strip_prefix("ckpt-").and_then(|m| m.parse::<u64>().ok()),
            "vms": vms,
            "converged_ms": converged_ms,
            "all_captured_after_ms": all_captured.as_secs_f64() * 1e3,
            "resume_sent_after_ms": resume_sent.as_secs_f64() * 1e3,
            "waited_s": waited.as_secs_f64(),
        });
        let committed = self.ask_all(&slots, Duration::from_secs(60), |_| Request::JobCommit {
            job: job.into(),
            epoch: epoch.clone(),
            manifest: manifest.clone(),
        });
        if let Some(f) = self.failures(&committed) {
            self.discard(job, &epoch, &slots);
            return Err(format!(
                "job {job}: the checkpoint could not be committed ({f}); it was discarded, the job runs on"
            ));
        }
        manifest["total_s"] = json!(t0.elapsed().as_secs_f64());
        // Each VM's pause as its host measured it (from the broadcast's
        // pause to its resume): the job's common pause is the longest.
        let mut pause_ms: f64 = 0.0;
        let mut not_resumed = Vec::new();
        for (_, a) in &committed {
            let Ok(a) = a else { continue };
            for v in a["vms"].as_array().into_iter().flatten() {
                let ms = v["paused_ms"].as_f64().unwrap_or(0.0);
                pause_ms = pause_ms.max(ms);
                if let Some(m) = manifest["vms"]
                    .as_array_mut()
                    .and_then(|vms| vms.iter_mut().find(|m| m["name"] == v["vm"]))
                {
                    m["paused_ms"] = json!(ms);
                }
            }
            // Each VM's snapshot as its VMM reported it (`pause_ms`: from
            // its pause to its resume).
            for v in a["snapshots"].as_array().into_iter().flatten() {
                if let Some(m) = manifest["vms"]
                    .as_array_mut()
                    .and_then(|vms| vms.iter_mut().find(|m| m["name"] == v["vm"]))
                {
                    m["snapshot"] = v.clone();
                }
            }
            for n in a["not_resumed"].as_array().into_iter().flatten() {
                not_resumed.push(n.as_str().unwrap_or("?").to_string());
            }
        }
        manifest["pause_ms"] = json!(pause_ms);
        if let Err(e) = resumed {
            not_resumed.push(e);
        }
        if !not_resumed.is_empty() {
            return Err(format!(
                "job {job}: checkpoint {epoch} is complete, but not every VM resumed: {}",
                not_resumed.join("; ")
            ));
        }
        Ok(manifest)
    }

    /// Steps 1-4 (pre-copy, pause, capture, resume); discards the epoch on
    /// failure.
    fn cut(
        &self,
        job: &str,
        epoch: &str,
        slots: &[usize],
        names: &BTreeMap<usize, Vec<String>>,
    ) -> Result<Cut, String> {
        let fail = |what: &str, e: String| {
            self.discard(job, epoch, slots);
            Err(format!(
                "job {job}: the checkpoint failed at {what}: {e}; every VM runs on, nothing was kept"
            ))
        };
        (self.say)(&format!(
            "job {job}: {epoch}: copying memory while the job runs"
        ));
        let pre = self.ask_all(slots, SNAPSHOT_TIMEOUT, |_| Request::JobPrecopy {
            job: job.into(),
            epoch: epoch.into(),
        });
        if let Some(f) = self.failures(&pre) {
            return fail("the pre-copy", f);
        }
        // Hosts whose VMs ended or moved meanwhile answer with fewer.
        for (s, a) in &pre {
            let got = a
                .as_ref()
                .ok()
                .and_then(|v| v["vms"].as_array())
                .map_or(0, Vec::len);
            if got != names[s].len() {
                return fail(
                    "the pre-copy",
                    format!(
                        "the VMs of job {job} on {} changed meanwhile",
                        self.name(*s)
                    ),
                );
            }
        }
        // The cut: the broadcast pauses the job; each host captures its
        // VMs once they are paused; the broadcast resumes the job; each
        // host then reports how long its VMs were paused (`commit`).
        (self.say)(&format!("job {job}: {epoch}: pausing the job"));
        let paused_at = Instant::now();
        if let Err(e) = self.send("pause", job, slots) {
            return fail("the pause", e);
        }
        let captured = self.ask_all(slots, SNAPSHOT_TIMEOUT, |_| Request::JobCapture {
            job: job.into(),
            epoch: epoch.into(),
        });
        let all_captured = paused_at.elapsed();
        if let Some(f) = self.failures(&captured) {
            let _ = self.broadcast("resume", job, names, Duration::from_secs(10));
            return fail("the capture", f);
        }
        let resumed = self.send("resume", job, slots);
        let resume_sent = paused_at.elapsed();
        (self.say)(&format!(
            "job {job}: {epoch}: captured after {:.1} ms; resuming",
            all_captured.as_secs_f64() * 1e3
        ));
        Ok(Cut {
            pre,
            all_captured,
            resume_sent,
            resumed,
        })
    }

    fn discard(&self, job: &str, epoch: &str, slots: &[usize]) {
        let _ = self.ask_all(slots, Duration::from_secs(60), |_| Request::JobDiscard {
            job: job.into(),
            epoch: epoch.into(),
        });
    }

    /// The complete checkpoints of `job` any host can read, newest first
    /// (each with the hosts that can read it).
    pub fn copies(&self, job: &str, slots: &[usize]) -> Result<Vec<(Value, Vec<usize>)>, String> {
        if !balance::ckpt::valid_job(job) {
            return Err(format!(
                "{job:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        let answers = self.ask_all(slots, Duration::from_secs(10), |_| Request::JobList {
            job: job.into(),
        });
        let mut out: Vec<(Value, Vec<usize>)> = Vec::new();
        for (s, a) in answers {
            let copies = a
                .ok()
                .and_then(|v| v["copies"].as_array().cloned())
                .unwrap_or_default();
            for m in copies {
                match out.iter_mut().find(|(o, _)| o["epoch"] == m["epoch"]) {
                    Some((_, hosts)) => hosts.push(s),
                    None => out.push((m, vec![s])),
                }
            }
        }
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m["created_unix_ms"].as_u64().unwrap_or(0)));
        Ok(out)
    }

    /// `ffmk-node job restore`: `epoch` (default the newest complete),
    /// each VM on its host of the checkpoint unless `on` places it.
    pub fn restore(
        &self,
        job: &str,
        epoch: Option<&str>,
        on: &[(String, usize)],
        slots: &[usize],
    ) -> Result<Value, String> {
        let t0 = Instant::now();
        let copies = self.copies(job, slots)?;
        let (manifest, _) = match epoch {
            Some(e) => copies
                .into_iter()
                .find(|(m, _)| m["epoch"] == e)
                .ok_or_else(|| format!("job {job} has no complete checkpoint {e} on any host"))?,
            None => copies
                .into_iter()
                .next()
                .ok_or_else(|| format!("job {job} has no complete checkpoint on any host"))?,
        };
        let epoch = manifest["epoch"].as_str().unwrap_or_default().to_string();
        let running = self.job_vms(job, slots)?;
        if !running.is_empty() {
            let names: Vec<String> = running
                .iter()
                .flat_map(|(s, v)| {
                    v.iter().map(move |v| {
                        format!("{} on {}", v["name"].as_str().unwrap_or("?"), self.name(*s))
                    })
                })
                .collect();
            return Err(format!(
                "job {job} still runs ({}): stop its VMs first",
                names.join(", ")
            ));
        }
        // Where each VM goes.
        let mut placed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let vms = manifest["vms"].as_array().cloned().unwrap_or_default();
        for (vm, _) in on {
            if !vms.iter().any(|v| v["name"] == vm.as_str()) {
                return Err(format!(
                    "--on {vm}: no such VM in checkpoint {epoch} of job {job}"
                ));
            }
        }
        for v in &vms {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let slot = match on.iter().find(|(n, _)| *n == name) {
                Some((_, s)) => *s,
                None => {
                    let host = v["host"].as_str().unwrap_or_default();
                    self.r.names.iter().position(|n| n == host).ok_or_else(|| {
                        format!("{name} was on {host}, which is not in the cluster's host list: place it with --on {name}=HOST")
                    })?
                }
            };
            placed.entry(slot).or_default().push(name);
        }
        let pairs: Vec<(usize, String)> = placed
            .iter()
            .flat_map(|(s, v)| v.iter().map(move |n| (*s, n.clone())))
            .collect();
        (self.say)(&format!(
            "job {job}: restoring {epoch} ({} VM(s) on {} host(s))",
            pairs.len(),
            placed.len()
        ));
        // Every VM must be able to start before any does.
        let checks = each(&pairs, |(s, vm)| {
            self.ask_one(
                *s,
                Request::JobCheck {
                    job: job.into(),
                    epoch: epoch.clone(),
                    vm: vm.clone(),
                },
            )
        });
        let refused: Vec<String> = checks
            .iter()
            .zip(&pairs)
            .filter_map(|(c, (s, _))| c.as_ref().err().map(|e| format!("{}: {e}", self.name(*s))))
            .collect();
        if !refused.is_empty() {
            return Err(format!(
                "job {job}: cannot restore {epoch}, nothing was started: {}",
                refused.join("; ")
            ));
        }
        let started = each(&pairs, |(s, vm)| {
            self.ask_one(
                *s,
                Request::JobStart {
                    job: job.into(),
                    epoch: epoch.clone(),
                    vm: vm.clone(),
                },
            )
        });
        let failed: Vec<String> = started
            .iter()
            .zip(&pairs)
            .filter_map(|(c, (s, _))| c.as_ref().err().map(|e| format!("{}: {e}", self.name(*s))))
            .collect();
        let stop_all = || {
            for ((s, vm), r) in pairs.iter().zip(&started) {
                if r.is_ok() {
                    let _ = self.ask_one(
                        *s,
                        Request::JobStop {
                            job: job.into(),
                            epoch: epoch.clone(),
                            vm: vm.clone(),
                        },
                    );
                }
            }
        };
        if !failed.is_empty() {
            stop_all();
            return Err(format!(
                "job {job}: restoring {epoch} failed, the VMs started were stopped: {}",
                failed.join("; ")
            ));
        }
        let restored_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = self.broadcast("resume", job, &placed, Duration::from_secs(20)) {
            stop_all();
            return Err(format!(
                "job {job}: the restored VMs of {epoch} did not all resume, they were stopped: {e}"
            ));
        }
        let vms: Vec<Value> = pairs
            .iter()
            .zip(started)
            .map(|((s, vm), r)| {
                json!({"name": vm, "host": self.name(*s), "restore_ms": r.ok().map(|v| v["restore_ms"].clone())})
            })
            .collect();
        Ok(json!({
            "job": job, "epoch": epoch, "vms": vms,
            "restored_ms": restored_ms,
            "total_s": t0.elapsed().as_secs_f64(),
        }))
    }

    fn ask_one(&self, slot: usize, req: Request) -> Answer {
        let timeout = RESTORE_TIMEOUT + Duration::from_secs(30);
        match control::call(self.r.control[slot], &self.plane.trust, &req, timeout) {
            Ok(rep) if rep.ok => Ok(rep.job.unwrap_or(Value::Null)),
            Ok(rep) => Err(rep.error.unwrap_or_else(|| "refused".into())),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_s_vms_are_named_after_it() {
        assert!(member("job7", "job7-rank0"));
        assert!(member("job7", "job7-a-b"));
        assert!(!member("job7", "job70-rank0"));
        assert!(!member("job7", "job7-"));
        assert!(!member("job7", "job7"));
        assert!(!member("job7", "xjob7-a"));
    }

    #[test]
    fn epochs_are_ckpt_and_milliseconds() {
        assert!(valid_epoch("ckpt-1765000000000"));
        assert!(!valid_epoch("ckpt-"));
        assert!(!valid_epoch("ckpt-12a"));
        assert!(!valid_epoch("../ckpt-1"));
        assert!(!valid_epoch("ckpt-1/.."));
        assert!(!valid_epoch("ckpt-123456789012345678901"));
    }

    #[test]
    fn pruning_keeps_the_newest_complete_epochs_and_later_partial_ones() {
        let dir = std::env::temp_dir().join(format!("ffmk-job-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (ms, complete) in [(1, true), (2, false), (3, true), (4, true), (5, false)] {
            let e = dir.join(format!("ckpt-{ms}"));
            std::fs::create_dir_all(&e).unwrap();
            if complete {
                std::fs::write(e.join(MANIFEST), "{}").unwrap();
            }
        }
        std::fs::write(dir.join("latest"), "ckpt-4").unwrap();
        let mut removed = prune(&dir, "ckpt-4", 2);
        removed.sort();
        // ckpt-5 is newer than the newest complete one: it may be being
        // written now.
        assert_eq!(removed, ["ckpt-1", "ckpt-2"]);
        assert!(dir.join("ckpt-5").is_dir() && dir.join("latest").is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
