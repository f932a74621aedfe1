//! The client commands: each is one or a few calls through the typed API
//! client (`vmm-api`) to a running VMM's socket. Each prints a summary, or
//! with `--json` the API's answer (docs/api.yaml); none waits longer than
//! its `--timeout`.
use crate::failure::{one_line, refused, runtime, usage, Failure};
use anyhow::Context;
use std::time::Duration;
use vmm::cli::{ClientArgs, DeviceAction, SnapshotAction, SnapshotArgs};
use vmm_api::model::{
    DeviceState, MigrateRequest, MigrationStatus, Phase, Plugged, Resized, SnapshotKind,
    SnapshotRequest, StateReply,
};

/// How long a quick request may take.
const QUICK: Duration = Duration::from_secs(10);
/// Hot-plug and unplug wait for the guest (agent, hot-plug slot).
const DEVICE: Duration = Duration::from_secs(60);
/// A snapshot of a big VM to a slow store.
const SNAPSHOT: Duration = Duration::from_secs(3600);

/// How a failed call maps to an exit code: nothing listening or a request
/// the VMM calls malformed is bad usage (2); a request it refuses as
/// things stand is [`refused`] (4); no answer in time and failures are 1.
pub(crate) fn failed(e: vmm_api::Error) -> Failure {
    match e.status() {
        Some(400 | 404 | 405 | 413 | 422) => usage(anyhow::anyhow!(e.message())),
        Some(s) if s < 500 || s == 503 => refused(anyhow::anyhow!(e.message())),
        Some(_) => runtime(anyhow::anyhow!(e.message())),
        None if e.is_connect() => usage(e),
        None => runtime(e),
    }
}

/// The answer as JSON (`--json`) or as the summary `human` makes of it.
fn print<T: serde::Serialize>(
    answer: Result<T, vmm_api::Error>,
    json: bool,
    human: impl FnOnce(&T) -> String,
) -> Result<u8, Failure> {
    let v = answer.map_err(failed)?;
    if json {
        let text = serde_json::to_string_pretty(&v).map_err(runtime)?;
        println!("{text}");
    } else {
        println!("{}", human(&v));
    }
    Ok(0)
}

fn state_line(r: &StateReply) -> String {
    format!("VM {}", r.state.to_string().replace('_', " "))
}

/// `info`, `pause`, `resume`, `shutdown`.
pub fn info(c: ClientArgs) -> Result<u8, Failure> {
    print(c.client(QUICK).vm(), c.json, crate::summary::vm)
}

pub fn pause(c: ClientArgs) -> Result<u8, Failure> {
    print(c.client(QUICK).pause(), c.json, state_line)
}

pub fn resume(c: ClientArgs) -> Result<u8, Failure> {
    print(c.client(QUICK).resume(), c.json, state_line)
}

pub fn shutdown(c: ClientArgs) -> Result<u8, Failure> {
    print(c.client(QUICK).shutdown(), c.json, state_line)
}

/// `announce`: the VM's network devices announce it again.
pub fn announce(c: ClientArgs) -> Result<u8, Failure> {
    print(c.client(QUICK).announce(), c.json, |a| {
        format!(
            "announcing {} ({} rounds over 0.8 s)",
            a.macs.join(", "),
            a.rounds
        )
    })
}

fn device_line(d: &DeviceState) -> String {
    format!(
        "{} at {}{}: {}",
        d.device,
        d.bdf,
        if d.hotplug_slot {
            " (hot-plug slot)"
        } else {
            ""
        },
        serde_json::to_value(d.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    )
}

/// `device add|remove`.
pub fn device(action: DeviceAction) -> Result<u8, Failure> {
    match action {
        DeviceAction::Add { client, device } => print(
            client.client(DEVICE).add_device(&device),
            client.json,
            |p: &Plugged| match &p.guest {
                Some(g) => format!("{}\nguest agent: {g}", device_line(&p.device)),
                None => device_line(&p.device),
            },
        ),
        DeviceAction::Remove { client, bdf, force } => print(
            client.client(DEVICE).remove_device(&bdf, force),
            client.json,
            device_line,
        ),
    }
}

/// `resize-disk`.
pub fn resize_disk(c: ClientArgs, disk: usize, size: &str) -> Result<u8, Failure> {
    let bytes = vmm::config::parse_size(size).map_err(|e| usage(anyhow::anyhow!("--size: {e}")))?;
    print(
        c.client(QUICK).resize_disk(disk, bytes),
        c.json,
        |r: &Resized| {
            format!(
                "disk {} is now {}",
                r.disk,
                crate::summary::bytes(r.size_bytes)
            )
        },
    )
}

/// `snapshot` (through the API), `snapshot inspect|compact DIR` (files).
pub fn snapshot(a: SnapshotArgs) -> Result<u8, Failure> {
    match a.action {
        Some(SnapshotAction::Inspect { dir, verify, json }) => {
            crate::admin::inspect(&dir, verify, json)
        }
        Some(SnapshotAction::Compact { dir, json }) => crate::admin::compact(&dir, json),
        None => {
            let (Some(sock), Some(dest)) = (a.api_socket, a.dest) else {
                return Err(usage(anyhow::anyhow!(
                    "snapshot needs --api-socket and --dest (or: snapshot inspect|compact DIR)"
                )));
            };
            let dest = std::path::absolute(&dest)
                .with_context(|| format!("bad --dest {}", dest.display()))
                .map_err(usage)?;
            let client = vmm::cli::with_timeout(vmm_api::Client::new(&sock), a.timeout, SNAPSHOT);
            let req = SnapshotRequest {
                dest: dest.clone(),
                kind: if a.incremental {
                    SnapshotKind::Incremental
                } else {
                    SnapshotKind::Full
                },
                force: a.force,
                live: a.live,
                detach_devices: a.detach_devices,
                cut: None,
            };
            // Who writes, and how much at most: the bar's scale.
            let vm = vmm::cli::with_timeout(vmm_api::Client::new(&sock), a.timeout, QUICK)
                .vm()
                .map_err(failed)?;
            // Progress: a bar on a terminal, JSON lines with --json;
            // a script without --json gets the summary line only.
            use std::io::IsTerminal;
            let answer = if a.json || std::io::stdout().is_terminal() {
                let reporter = checkpoint_levels::progress::Reporter::new(a.json);
                with_progress(&reporter, &dest, vm.pid, vm.memory.bytes, || {
                    client.snapshot(&req)
                })
            } else {
                client.snapshot(&req)
            };
            let reply = answer.map_err(failed)?;
            if a.json {
                // The answer is the last line (after any progress lines).
                println!("{}", serde_json::to_string(&reply).map_err(runtime)?);
            } else {
                println!("{}", crate::summary::snapshot(&reply));
            }
            Ok(0)
        }
    }
}

/// Runs `call` (a snapshot into `dest` by VMM `pid`) while showing how
/// much of it is on disk: a bar on a terminal, JSON lines otherwise (at
/// most four a second; none for a snapshot done within a second).
fn with_progress<T: Send>(
    reporter: &checkpoint_levels::progress::Reporter,
    dest: &std::path::Path,
    pid: u32,
    memory_bytes: u64,
    call: impl FnOnce() -> T + Send,
) -> T {
    let started = std::time::SystemTime::now();
    let task = reporter.task("snapshot");
    let out = std::thread::scope(|s| {
        let h = s.spawn(call);
        let t0 = std::time::Instant::now();
        while !h.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if t0.elapsed() >= std::time::Duration::from_secs(1) {
                task.progress(written(dest, pid, started).min(memory_bytes), memory_bytes);
            }
        }
        h.join()
    });
    task.finish("done");
    match out {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Bytes of memory layers written since `since` for a snapshot into
/// `dest`: in `dest` itself (an incremental layer, a prepared empty
/// directory) or in the VMM's work directory beside it.
fn written(dest: &std::path::Path, pid: u32, since: std::time::SystemTime) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let work = dest.with_file_name(format!(".{name}.partial-{pid}"));
    [dest.to_path_buf(), work]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("mem-"))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.modified().is_ok_and(|t| t >= since))
        .map(|m| m.blocks() * 512)
        .sum()
}

/// A phase as the API names it (`stop-and-copy`).
fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// `ffmk-vmm migrate`: starts the migration through the API and follows it.
pub fn migrate(a: vmm::cli::MigrateArgs) -> Result<u8, Failure> {
    use checkpoint_levels::progress::Reporter;
    let api = vmm::cli::with_timeout(vmm_api::Client::new(&a.api_socket), a.timeout, QUICK);
    let req = MigrateRequest {
        to: a.to.clone(),
        max_downtime_ms: a.max_downtime_ms,
        max_rounds: a.max_rounds,
        throttle: !a.no_throttle,
        postcopy: a.postcopy,
        verify: a.verify,
        streams: a.streams,
    };
    api.migrate(&req).map_err(failed)?;
    interrupt::install();
    let reporter = Reporter::new(a.json);
    let task = reporter.task("migrate");
    let mut cancelled = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if interrupt::seen() && !cancelled {
            cancelled = true;
            let _ = api.cancel_migration();
        }
        // An error here: the source VMM ended before we saw the outcome.
        let status = api.migration().map_err(|e| {
            runtime(anyhow::anyhow!(
                "the source VMM ended before reporting the outcome (check the destination): {}",
                one_line(&e.into())
            ))
        })?;
        match &status {
            MigrationStatus::Running { progress: None, .. } => {}
            MigrationStatus::Running {
                progress: Some(p), ..
            } => {
                if reporter.is_json() {
                    reporter.event(serde_json::json!({ "event": "progress", "progress": p }));
                    continue;
                }
                task.progress(p.sent_bytes, p.memory_bytes.max(p.sent_bytes));
                if p.phase == Phase::Postcopy {
                    task.message(&format!(
                        "post-copy: the VM runs on the destination, {} pages to send",
                        p.remaining_pages
                    ));
                    continue;
                }
                task.message(&format!(
                    "{} round {}, dirty {:.0} MiB/s, link {:.0} MiB/s, predicted downtime {:.1} ms{}",
                    phase_name(p.phase),
                    p.round,
                    p.dirty_mib_s,
                    p.link_mib_s,
                    p.predicted_downtime_ms,
                    if p.throttle_pct > 0 {
                        format!(", vCPUs throttled {}%", p.throttle_pct)
                    } else {
                        String::new()
                    }
                ));
            }
            MigrationStatus::Completed(outcome) => {
                task.finish("done");
                if reporter.is_json() {
                    println!("{}", serde_json::to_string(&status).map_err(runtime)?);
                } else {
                    println!("{}", crate::summary::migrated(outcome));
                }
                if let Some(why) = outcome.missed_target() {
                    tracing::warn!("{why}");
                }
                return Ok(0);
            }
            MigrationStatus::Failed {
                error,
                vm_running_here,
                ..
            } => {
                task.finish("failed");
                return Err(runtime(anyhow::anyhow!(
                    "{error}{}",
                    if *vm_running_here {
                        " (the VM runs on here)"
                    } else {
                        ""
                    }
                )));
            }
            MigrationStatus::None => {
                return Err(runtime(anyhow::anyhow!(
                    "unexpected migration state: {}",
                    serde_json::to_string(&status).unwrap_or_default()
                )))
            }
        }
    }
}

/// Ctrl-C during `ffmk-vmm migrate`: noted, then the migration is cancelled.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static SEEN: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        SEEN.store(true, Ordering::SeqCst);
    }

    pub fn install() {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
    }

    pub fn seen() -> bool {
        SEEN.load(Ordering::SeqCst)
    }
}
