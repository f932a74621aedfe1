//! The client commands: each is one or a few calls through the typed API
//! client (`vmm-api`) to a running VMM's socket.
use crate::failure::{one_line, runtime, usage, Failure};
use anyhow::Context;
use vmm::cli::{ClientArgs, DeviceAction, SnapshotAction, SnapshotArgs};
use vmm_api::model::{MigrateRequest, MigrationStatus, Phase, SnapshotKind, SnapshotRequest};
use vmm_api::Client;

/// The outcome of one call: the answer printed as JSON (exit 0), or one
/// line saying why not (no VMM there: exit 2; a refusal or failure: 1).
fn print<T: serde::Serialize>(answer: Result<T, vmm_api::Error>) -> Result<u8, Failure> {
    match answer {
        Ok(v) => {
            let text = serde_json::to_string_pretty(&v).map_err(runtime)?;
            println!("{text}");
            Ok(0)
        }
        Err(e) if e.is_connect() => Err(usage(e)),
        Err(e) => Err(runtime(e)),
    }
}

/// `info`, `pause`, `resume`, `shutdown`.
pub fn info(c: ClientArgs) -> Result<u8, Failure> {
    print(Client::new(c.api_socket).vm())
}

pub fn pause(c: ClientArgs) -> Result<u8, Failure> {
    print(Client::new(c.api_socket).pause())
}

pub fn resume(c: ClientArgs) -> Result<u8, Failure> {
    print(Client::new(c.api_socket).resume())
}

pub fn shutdown(c: ClientArgs) -> Result<u8, Failure> {
    print(Client::new(c.api_socket).shutdown())
}

/// `device add|remove`.
pub fn device(action: DeviceAction) -> Result<u8, Failure> {
    match action {
        DeviceAction::Add { client, device } => {
            print(Client::new(client.api_socket).add_device(&device))
        }
        DeviceAction::Remove { client, bdf, force } => {
            print(Client::new(client.api_socket).remove_device(&bdf, force))
        }
    }
}

/// `resize-disk`.
pub fn resize_disk(c: ClientArgs, disk: usize, size: &str) -> Result<u8, Failure> {
    let bytes = vmm::config::parse_size(size).map_err(|e| usage(anyhow::anyhow!("--size: {e}")))?;
    print(Client::new(c.api_socket).resize_disk(disk, bytes))
}

/// `snapshot` (through the API), `snapshot inspect|compact DIR` (files).
pub fn snapshot(a: SnapshotArgs) -> Result<u8, Failure> {
    match a.action {
        Some(SnapshotAction::Inspect { dir, verify, json }) => {
            crate::admin::inspect(&dir, verify, json)
        }
        Some(SnapshotAction::Compact { dir }) => crate::admin::compact(&dir),
        None => {
            let (Some(sock), Some(dest)) = (a.api_socket, a.dest) else {
                return Err(usage(anyhow::anyhow!(
                    "snapshot needs --api-socket and --dest (or: snapshot inspect|compact DIR)"
                )));
            };
            let dest = std::path::absolute(&dest)
                .with_context(|| format!("bad --dest {}", dest.display()))
                .map_err(usage)?;
            print(Client::new(sock).snapshot(&SnapshotRequest {
                dest,
                kind: if a.incremental {
                    SnapshotKind::Incremental
                } else {
                    SnapshotKind::Full
                },
                force: a.force,
                live: a.live,
                detach_devices: a.detach_devices,
            }))
        }
    }
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
    let api = Client::new(&a.api_socket);
    let req = MigrateRequest {
        to: a.to.clone(),
        max_downtime_ms: a.max_downtime_ms,
        max_rounds: a.max_rounds,
        throttle: !a.no_throttle,
        postcopy: a.postcopy,
        verify: a.verify,
    };
    match api.migrate(&req) {
        Ok(_) => {}
        Err(e) if e.status().is_some_and(|s| s < 500) => {
            return Err(usage(anyhow::anyhow!(e.message())))
        }
        Err(e) if e.status().is_some() => return Err(runtime(anyhow::anyhow!(e.message()))),
        Err(e) => return Err(runtime(e)),
    }
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
            MigrationStatus::Completed(_) => {
                task.finish("done");
                println!("{}", serde_json::to_string(&status).map_err(runtime)?);
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
