//! The checkpoint service: take a checkpoint into the local level and fill
//! the slower levels from it, list what every level holds, pick the newest
//! valid copy for a restore, and plan per-level intervals.
use crate::client::{self, Group};
use crate::config::{Config, Level, LevelKind, Target};
use crate::dirlevel::{copy_into, CopyInfo, DirLevel, Listed};
use crate::files::Frozen;
use crate::interval;
use crate::progress::Reporter;
use crate::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Measured costs, kept in the local level (`DIR/JOB/ckpt-stats.json`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds the last checkpoint took per level (local: the VMM's write).
    pub seconds: BTreeMap<String, f64>,
    pub bytes: BTreeMap<String, u64>,
    /// The last XOR epoch used.
    pub epoch: u64,
}

const STATS: &str = "ckpt-stats.json";

impl Stats {
    pub fn load(cfg: &Config) -> Stats {
        std::fs::read(cfg.local_root().join(STATS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, cfg: &Config) -> Result<()> {
        let root = cfg.local_root();
        let path = root.join(STATS);
        let tmp = root.join(".ckpt-stats.json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Refused(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))
    }
}

fn local(cfg: &Config) -> DirLevel {
    DirLevel {
        root: cfg.local_root(),
    }
}

/// What the VMM is asked to do: write a snapshot into `dest`, full or as a
/// layer on the chain there. Returns the VMM's answer, or its refusal.
/// The VMM's answer to a snapshot call.
pub use vmm_api::model::SnapshotReply;

pub struct SnapshotCall<'a> {
    pub dest: &'a Path,
    pub incremental: bool,
    pub live: bool,
}

/// Why the VMM did not take a snapshot.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The VMM cannot be reached (its API socket is gone): the VM ended.
    Gone(String),
    /// The VMM refused or failed the request.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Gone(m) | CallError::Failed(m) => f.write_str(m),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TakeOptions {
    /// Fill only these slower levels (default: all).
    pub only: Option<Vec<String>>,
    /// Start a new chain even if the local one could be extended.
    pub full: bool,
    /// XOR epoch (default: the last one + 1; members of a group that
    /// checkpoint together in step get the same numbers).
    pub epoch: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LevelOutcome {
    pub level: String,
    pub ok: bool,
    pub seconds: f64,
    pub bytes: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TakeOutcome {
    pub name: String,
    pub local: SnapshotReply,
    pub levels: Vec<LevelOutcome>,
}

/// The newest valid local copy, if it can take another layer.
fn extendable(cfg: &Config) -> Option<String> {
    local(cfg).list().ok()?.into_iter().find_map(|l| match l {
        Listed::Ok(info, _) if info.generation < cfg.full_every => Some(info.name),
        _ => None,
    })
}

/// Takes a checkpoint: the VMM writes it to the local level (`snap`), the
/// guest resumes, then every other (selected) level is filled from a frozen
/// view of it, concurrently, with progress on `rep`.
pub fn take(
    cfg: &Config,
    snap: &mut dyn FnMut(SnapshotCall) -> std::result::Result<SnapshotReply, CallError>,
    opts: &TakeOptions,
    rep: &Reporter,
) -> Result<TakeOutcome> {
    if let Some(only) = &opts.only {
        for n in only {
            if !cfg.levels.iter().any(|l| &l.name == n) {
                return Err(Error::Refused(format!(
                    "no level named '{n}' (levels: {})",
                    names(cfg)
                )));
            }
        }
    }
    let root = cfg.local_root();
    std::fs::create_dir_all(&root).map_err(io("create", &root))?;
    let mut stats = Stats::load(cfg);
    let t0 = Instant::now();
    let mut done = None;
    if let Some(name) = extendable(cfg).filter(|_| !opts.full) {
        let dest = root.join(&name);
        match snap(SnapshotCall {
            dest: &dest,
            incremental: true,
            live: cfg.live,
        }) {
            Ok(v) => done = Some((name, v)),
            Err(CallError::Gone(m)) => return Err(Error::VmGone(m)),
            Err(e) => rep.event(serde_json::json!({
                "event": "note",
                "message": format!("local: cannot extend {name} ({e}); starting a new chain"),
            })),
        }
    }
    let (name, answer) = match done {
        Some(d) => d,
        None => {
            let name = format!("ckpt-{}", snapshot::manifest::now_unix_ms());
            let dest = root.join(&name);
            let v = snap(SnapshotCall {
                dest: &dest,
                incremental: false,
                live: cfg.live,
            })
            .map_err(|e| match e {
                CallError::Gone(m) => Error::VmGone(m),
                CallError::Failed(m) => Error::Refused(format!("local level: {m}")),
            })?;
            (name, v)
        }
    };
    let local_s = t0.elapsed().as_secs_f64();
    rep.event(serde_json::json!({
        "event": "level_done", "level": cfg.levels[0].name, "name": name,
        "seconds": local_s, "pause_ms": answer.pause_ms,
        "message": format!(
            "{:>13}: {name} generation {} written in {:.0} ms (guest paused {:.1} ms)",
            cfg.levels[0].name,
            answer.generation,
            local_s * 1e3,
            answer.pause_ms
        ),
    }));
    stats.seconds.insert(cfg.levels[0].name.clone(), local_s);
    let frozen = Frozen::of(&root.join(&name))?;
    let epoch = opts.epoch.unwrap_or(stats.epoch + 1);
    let slower: Vec<&Level> = cfg.levels[1..]
        .iter()
        .filter(|l| opts.only.as_ref().is_none_or(|o| o.contains(&l.name)))
        .collect();
    let outcomes: Vec<LevelOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = slower
            .iter()
            .map(|&l| {
                let frozen = &frozen;
                let name = &name;
                let root = &root;
                s.spawn(move || fill(cfg, l, name, frozen, epoch, root, rep))
            })
            .collect();
        handles
            .into_iter()
            .zip(&slower)
            .map(|(h, l)| {
                h.join().unwrap_or_else(|_| LevelOutcome {
                    level: l.name.clone(),
                    ok: false,
                    seconds: 0.0,
                    bytes: 0,
                    detail: "the copy thread panicked".into(),
                })
            })
            .collect()
    });
    drop(frozen);
    for o in outcomes.iter().filter(|o| o.ok) {
        stats.seconds.insert(o.level.clone(), o.seconds);
        stats.bytes.insert(o.level.clone(), o.bytes);
    }
    if slower.iter().any(|l| l.kind == LevelKind::Xor) {
        stats.epoch = stats.epoch.max(epoch);
    }
    stats.save(cfg)?;
    let _ = local(cfg).prune(cfg.levels[0].keep, &name);
    Ok(TakeOutcome {
        name,
        local: answer,
        levels: outcomes,
    })
}

fn names(cfg: &Config) -> String {
    cfg.levels
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Copies the frozen local copy to level `l`.
fn fill(
    cfg: &Config,
    l: &Level,
    name: &str,
    frozen: &Frozen,
    epoch: u64,
    scratch: &Path,
    rep: &Reporter,
) -> LevelOutcome {
    let task = rep.task(&l.name);
    let t0 = Instant::now();
    let src = &frozen.snapshot;
    let r: Result<(u64, String)> = match &l.target {
        Target::Dir(d) => {
            let level = DirLevel::new(d, &cfg.job);
            let total = crate::files::data_bytes(src);
            copy_into(&level, name, src, &mut |n| task.progress(n, total)).map(|(files, bytes)| {
                let _ = level.prune(l.keep, name);
                (
                    bytes,
                    format!("{files} file(s) to {}", level.root.join(name).display()),
                )
            })
        }
        Target::Partner(addr) => {
            client::partner_put(*addr, &cfg.peers, &cfg.job, name, src, &mut |n, t| {
                task.progress(n, t)
            })
            .map(|(files, bytes)| (bytes, format!("{files} file(s) to {addr}")))
        }
        Target::Xor { members, .. } => {
            let g =
                Group::of(&l.target, &cfg.peers).ok_or(Error::Refused("not an xor level".into()));
            g.and_then(|g| {
                client::xor_put(&g, epoch, &cfg.job, name, src, scratch, &mut |n, t| {
                    task.progress(n, t)
                })
                .map(|bytes| {
                    (
                        bytes,
                        format!(
                            "epoch {epoch}: archive + parity chunks to {} members",
                            members.len()
                        ),
                    )
                })
            })
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let outcome = match r {
        Ok((bytes, detail)) => LevelOutcome {
            level: l.name.clone(),
            ok: true,
            seconds,
            bytes,
            detail,
        },
        Err(e) => LevelOutcome {
            level: l.name.clone(),
            ok: false,
            seconds,
            bytes: 0,
            detail: e.to_string(),
        },
    };
    task.finish(if outcome.ok { "done" } else { "FAILED" });
    rep.event(serde_json::json!({
        "event": if outcome.ok { "level_done" } else { "level_failed" },
        "level": outcome.level, "seconds": seconds, "bytes": outcome.bytes,
        "detail": outcome.detail,
        "message": format!(
            "{:>13}: {} in {:.2} s ({})",
            outcome.level,
            if outcome.ok { "copied" } else { "FAILED" },
            seconds,
            outcome.detail
        ),
    }));
    outcome
}

/// A copy some level offers for restore.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub level: String,
    pub order: usize,
    pub info: CopyInfo,
    /// For XOR: the epoch and whether the copy has to be rebuilt.
    pub epoch: Option<u64>,
    pub rebuild: bool,
    #[serde(skip)]
    source: Source,
}

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    None,
    Dir(PathBuf),
    Partner(std::net::SocketAddr),
    Xor(u64, bool, crate::xor::XorMeta),
}

/// Every copy of the job every level offers, newest first (equal age: the
/// faster level first), and a note for each level or copy that is unusable.
pub fn candidates(cfg: &Config) -> (Vec<Candidate>, Vec<String>) {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (order, l) in cfg.levels.iter().enumerate() {
        let push = |info: CopyInfo, source: Source, epoch, rebuild, out: &mut Vec<Candidate>| {
            out.push(Candidate {
                level: l.name.clone(),
                order,
                info,
                epoch,
                rebuild,
                source,
            })
        };
        match &l.target {
            Target::Dir(d) => match DirLevel::new(d, &cfg.job).list() {
                Ok(list) => {
                    for c in list {
                        match c {
                            Listed::Ok(info, s) => {
                                push(info, Source::Dir(s.dir), None, false, &mut out)
                            }
                            Listed::Broken { name, why } => {
                                notes.push(format!("{}: {name} unusable: {why}", l.name))
                            }
                        }
                    }
                }
                Err(e) => notes.push(format!("{}: {e}", l.name)),
            },
            Target::Partner(addr) => match client::partner_list(*addr, &cfg.peers, &cfg.job) {
                Ok((copies, broken)) => {
                    for info in copies {
                        push(info, Source::Partner(*addr), None, false, &mut out);
                    }
                    for (name, why) in broken {
                        notes.push(format!("{}: {name} unusable: {why}", l.name));
                    }
                }
                Err(e) => notes.push(format!("{}: {e}", l.name)),
            },
            Target::Xor { .. } => {
                let Some(g) = Group::of(&l.target, &cfg.peers) else {
                    continue;
                };
                let mut skipped = Vec::new();
                for c in client::xor_candidates(&g, &mut skipped) {
                    if !c.own_data && !c.rebuildable {
                        notes.push(format!(
                            "{}: epoch {} lost (its own copy and another member are gone)",
                            l.name, c.epoch
                        ));
                        continue;
                    }
                    let rebuild = !c.own_data;
                    push(
                        c.meta.copy.clone(),
                        Source::Xor(c.epoch, c.rebuildable, c.meta),
                        Some(c.epoch),
                        rebuild,
                        &mut out,
                    );
                }
                notes.extend(skipped.into_iter().map(|s| format!("{}: {s}", l.name)));
            }
        }
    }
    // A copy dated in the future would always look newest: it is not
    // chosen, whatever level offers it (clocks may differ by minutes).
    let now = snapshot::manifest::now_unix_ms();
    out.retain(|c| {
        let future = c.info.taken_unix_ms > now + FUTURE_SKEW_MS;
        if future {
            notes.push(format!(
                "{}: {} ignored: dated {} s in the future",
                c.level,
                c.info.name,
                (c.info.taken_unix_ms - now) / 1000
            ));
        }
        !future
    });
    out.sort_by(|a, b| {
        (b.info.taken_unix_ms, b.info.generation)
            .cmp(&(a.info.taken_unix_ms, a.info.generation))
            .then(a.order.cmp(&b.order))
    });
    (out, notes)
}

/// How far a copy may be dated in the future before restore ignores it.
const FUTURE_SKEW_MS: u64 = 5 * 60 * 1000;

/// The copy chosen for a restore, now valid in the local level.
#[derive(Debug, Clone, Serialize)]
pub struct Picked {
    pub level: String,
    pub info: CopyInfo,
    pub dir: PathBuf,
    pub rebuilt: bool,
    /// Newer copies that were skipped, and why.
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

/// Picks the newest copy that is complete and checksum-valid, fetching or
/// rebuilding remote ones into the local level (where the VM then restores
/// from and later checkpoints continue).
pub fn pick(cfg: &Config, rep: &Reporter) -> Result<Picked> {
    let (cands, notes) = candidates(cfg);
    let into = local(cfg);
    std::fs::create_dir_all(&into.root).map_err(io("create", &into.root))?;
    let mut skipped = Vec::new();
    for c in cands {
        let what = format!(
            "{} {} generation {}",
            c.level, c.info.name, c.info.generation
        );
        if c.order != 0 {
            if let Err(e) = into.discard_if_invalid(&c.info.name) {
                skipped.push(format!("{what}: {e}"));
                continue;
            }
        }
        let got: Result<(PathBuf, bool)> = match &c.source {
            Source::Dir(dir) => snapshot::Snapshot::open(dir)
                .and_then(|s| s.verify().map(|()| s))
                .map_err(Error::from)
                .and_then(|s| {
                    if c.order == 0 {
                        Ok((s.dir, false))
                    } else {
                        let task = rep.task(&c.level);
                        let total = crate::files::data_bytes(&s);
                        copy_into(&into, &c.info.name, &s, &mut |n| task.progress(n, total))?;
                        task.finish("fetched");
                        Ok((into.root.join(&c.info.name), false))
                    }
                }),
            Source::Partner(addr) => {
                let task = rep.task(&c.level);
                let r = client::partner_fetch(
                    *addr,
                    &cfg.peers,
                    &cfg.job,
                    &c.info.name,
                    &into,
                    &mut |n, t| task.progress(n, t),
                );
                task.finish(if r.is_ok() { "fetched" } else { "FAILED" });
                r.map(|_| (into.root.join(&c.info.name), false))
            }
            Source::Xor(epoch, rebuildable, meta) => {
                let Some(g) = Group::of(&cfg.levels[c.order].target, &cfg.peers) else {
                    continue;
                };
                let cand = client::XorCandidate {
                    epoch: *epoch,
                    meta: meta.clone(),
                    own_data: !c.rebuild,
                    rebuildable: *rebuildable,
                };
                client::xor_restore(&g, &cand, &into, &into.root)
                    .map(|(_, rebuilt)| (into.root.join(&c.info.name), rebuilt))
            }
            Source::None => continue,
        };
        match got {
            Ok((dir, rebuilt)) => {
                return Ok(Picked {
                    level: c.level,
                    info: c.info,
                    dir,
                    rebuilt,
                    skipped,
                    notes,
                })
            }
            Err(e) => skipped.push(format!("{what}: {e}")),
        }
    }
    let mut why = skipped;
    why.extend(notes);
    Err(Error::Refused(format!(
        "no valid checkpoint of job {} at any level{}",
        cfg.job,
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join("; "))
        }
    )))
}

/// One row of the interval plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub level: String,
    pub cost_s: Option<f64>,
    /// "measured" (last checkpoint), "configured" or "unknown".
    pub cost_from: &'static str,
    pub mtti_s: Option<f64>,
    pub young_s: Option<f64>,
    pub daly_s: Option<f64>,
    pub waste: Option<f64>,
}

/// Per-level intervals (Young and Daly) from the measured or configured
/// cost of a checkpoint at that level and its MTTI. A slower level's cost
/// includes the local write it starts from.
pub fn plan(cfg: &Config) -> Vec<PlanRow> {
    let stats = Stats::load(cfg);
    let local_cost = stats.seconds.get(&cfg.levels[0].name).copied();
    cfg.levels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (cost, from) = match stats.seconds.get(&l.name) {
                Some(&s) if i == 0 => (Some(s), "measured"),
                Some(&s) => (Some(s + local_cost.unwrap_or(0.0)), "measured"),
                None => match l.cost_s {
                    Some(c) => (Some(c), "configured"),
                    None => (None, "unknown"),
                },
            };
            let both = cost.zip(l.mtti_s);
            let daly = both.map(|(c, m)| interval::daly(c.max(1e-3), m));
            PlanRow {
                level: l.name.clone(),
                cost_s: cost,
                cost_from: from,
                mtti_s: l.mtti_s,
                young_s: both.map(|(c, m)| interval::young(c.max(1e-3), m)),
                daly_s: daly,
                waste: both.zip(daly).map(|((c, m), t)| interval::waste(t, c, m)),
            }
        })
        .collect()
}

/// How `run` paces itself.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// Seconds between local checkpoints (default: Daly's interval for the
    /// local level).
    pub every_s: Option<f64>,
    /// Stop after this many checkpoints.
    pub count: Option<u64>,
}

/// Checkpoints periodically: a local checkpoint every local interval, and
/// each slower level filled when its own interval (Daly's, never shorter
/// than the local one) has passed since its last fill. Intervals are
/// recomputed after every checkpoint from the costs just measured. Ends
/// when `count` checkpoints were taken or the VM is gone; returns how many
/// were taken.
pub fn run(
    cfg: &Config,
    snap: &mut dyn FnMut(SnapshotCall) -> std::result::Result<SnapshotReply, CallError>,
    sched: &Schedule,
    rep: &Reporter,
) -> Result<u64> {
    let local_interval = |rows: &[PlanRow]| sched.every_s.or(rows[0].daly_s);
    if local_interval(&plan(cfg)).is_none() && cfg.levels[0].cost_s.is_none() {
        // The first checkpoint measures the cost; without an MTTI there is
        // still no interval to follow.
        if cfg.levels[0].mtti_s.is_none() {
            return Err(Error::Refused(
                "no interval: set mtti_s in the configuration (Young/Daly) or give --every".into(),
            ));
        }
    }
    let mut last_fill: BTreeMap<String, Instant> = BTreeMap::new();
    let mut taken = 0u64;
    loop {
        let rows = plan(cfg);
        let local_iv = local_interval(&rows).unwrap_or(0.0);
        let due: Vec<String> = cfg.levels[1..]
            .iter()
            .zip(&rows[1..])
            .filter(|(l, r)| {
                let iv = r.daly_s.unwrap_or(local_iv).max(local_iv);
                last_fill
                    .get(&l.name)
                    .is_none_or(|t| t.elapsed().as_secs_f64() + 1e-3 >= iv)
            })
            .map(|(l, _)| l.name.clone())
            .collect();
        let opts = TakeOptions {
            only: Some(due),
            ..TakeOptions::default()
        };
        match take(cfg, snap, &opts, rep) {
            Ok(out) => {
                taken += 1;
                for l in out.levels.iter().filter(|l| l.ok) {
                    last_fill.insert(l.level.clone(), Instant::now());
                }
            }
            Err(e @ Error::VmGone(_)) => {
                rep.event(serde_json::json!({
                    "event": "stopped", "checkpoints": taken,
                    "message": format!("the VM is gone ({e}); {taken} checkpoint(s) taken"),
                }));
                return Ok(taken);
            }
            Err(e) => rep.event(serde_json::json!({
                "event": "take_failed", "detail": e.to_string(),
                "message": format!("checkpoint failed: {e}; next try in one interval"),
            })),
        }
        if sched.count.is_some_and(|c| taken >= c) {
            return Ok(taken);
        }
        let rows = plan(cfg);
        let wait = local_interval(&rows).unwrap_or(60.0);
        rep.event(serde_json::json!({
            "event": "next", "in_s": wait,
            "message": format!("next checkpoint in {}", interval::human(wait)),
        }));
        std::thread::sleep(std::time::Duration::from_secs_f64(wait));
    }
}
