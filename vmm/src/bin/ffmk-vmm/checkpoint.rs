//! `ffmk-vmm checkpoint ...`: the checkpoint levels (local, partner, XOR,
//! burst buffer) of the `checkpoint-levels` crate, driven from here.
use crate::failure::{runtime, usage, Failure};
use checkpoint_levels::service;
use checkpoint_levels::wire::Peers;
use vmm::cli::{CheckpointAction, PlaneArgs, RestoreArgs};
use vmm_api::model::{SnapshotKind, SnapshotRequest};
use vmm_api::Client;

/// Asks the VMM behind `sock` for a snapshot (the local level's write).
fn snapshot_call(
    sock: &std::path::Path,
    call: service::SnapshotCall,
    detach_devices: bool,
) -> Result<service::SnapshotReply, service::CallError> {
    let req = SnapshotRequest {
        dest: call.dest.to_path_buf(),
        kind: if call.incremental {
            SnapshotKind::Incremental
        } else {
            SnapshotKind::Full
        },
        force: false,
        live: call.live,
        detach_devices,
        cut: None,
    };
    Client::new(sock).snapshot(&req).map_err(|e| {
        if e.is_connect() {
            service::CallError::Gone(e.to_string())
        } else {
            service::CallError::Failed(e.message())
        }
    })
}

pub fn checkpoint(action: CheckpointAction, plane: PlaneArgs) -> Result<u8, Failure> {
    use checkpoint_levels::{config::Config, progress::Reporter};
    // Clients: a key is needed once a level is on another host.
    let peers = if matches!(action, CheckpointAction::Serve { .. }) {
        Peers::none()
    } else {
        Peers::new(crate::source_trust(&plane)?)
    };
    let load = |p: &std::path::Path| {
        Config::load(p)
            .map(|c| c.with_peers(peers.clone()))
            .map_err(usage)
    };
    match action {
        CheckpointAction::Serve {
            listen,
            dir,
            keep,
            max_connections,
            request_timeout,
            quota_gib,
            max_jobs,
        } => {
            let addr = checkpoint_levels::config::parse_addr(&listen)
                .map_err(|e| usage(anyhow::anyhow!("--listen: {e}")))?;
            if keep == 0 {
                return Err(usage(anyhow::anyhow!("--keep must be at least 1")));
            }
            if max_connections == 0 || request_timeout == 0 || quota_gib == 0 || max_jobs == 0 {
                return Err(usage(anyhow::anyhow!(
                    "--max-connections, --request-timeout, --quota-gib and --max-jobs must be \
                     at least 1"
                )));
            }
            let trust = plane.trust().map_err(usage)?;
            if let cluster_auth::Trust::Key(k) = &trust {
                // The endpoint derives every job's key: it needs the
                // cluster's.
                k.cluster().map_err(usage)?;
            }
            let limits = checkpoint_levels::server::Limits {
                connections: max_connections,
                request: std::time::Duration::from_secs(request_timeout),
                job_bytes: quota_gib.saturating_mul(1 << 30),
                jobs: max_jobs,
                ..Default::default()
            };
            let l = checkpoint_levels::server::bind(addr).map_err(usage)?;
            let local = l.local_addr().map_err(runtime)?;
            say!(
                "checkpoint endpoint on {local}, storing in {}",
                dir.display()
            );
            checkpoint_levels::server::serve(l, dir, keep, trust, limits).map_err(runtime)?;
            Ok(0)
        }
        CheckpointAction::Take {
            config,
            api_socket,
            full,
            levels,
            epoch,
            json,
            detach_devices,
        } => {
            let cfg = load(&config)?;
            let rep = Reporter::new(json);
            let opts = service::TakeOptions {
                only: levels,
                full,
                epoch,
            };
            let out = service::take(
                &cfg,
                &mut |call| snapshot_call(&api_socket, call, detach_devices),
                &opts,
                &rep,
            )
            .map_err(|e| match e {
                checkpoint_levels::Error::Refused(_)
                | checkpoint_levels::Error::Config { .. }
                | checkpoint_levels::Error::VmGone(_) => usage(e),
                e => runtime(e),
            })?;
            let failed: Vec<_> = out.levels.iter().filter(|l| !l.ok).collect();
            if rep.is_json() {
                rep.event(serde_json::json!({ "event": "done", "checkpoint": out }));
            } else {
                println!(
                    "checkpoint {} of job {}: {} of {} level(s) written",
                    out.name,
                    cfg.job,
                    1 + out.levels.len() - failed.len(),
                    1 + out.levels.len()
                );
            }
            if failed.is_empty() {
                Ok(0)
            } else {
                Err(runtime(anyhow::anyhow!(
                    "checkpoint {} is only partly placed: {}",
                    out.name,
                    failed
                        .iter()
                        .map(|l| format!("{} failed ({})", l.level, l.detail))
                        .collect::<Vec<_>>()
                        .join("; ")
                )))
            }
        }
        CheckpointAction::Restore {
            config,
            api_socket,
            console,
            paused,
            dry_run,
            host,
            confine,
        } => {
            let cfg = load(&config)?;
            let rep = Reporter::new(false);
            let p = service::pick(&cfg, &rep).map_err(usage)?;
            for s in &p.skipped {
                say!("skipped {s}");
            }
            for n in p.notes.iter().filter(|n| n.contains("in the future")) {
                say!("note: {n}");
            }
            say!(
                "checkpoint restore: using level {}: {} generation {} (taken {} ms ago{}){}",
                p.level,
                p.info.name,
                p.info.generation,
                snapshot::manifest::now_unix_ms().saturating_sub(p.info.taken_unix_ms),
                if p.rebuilt {
                    ", rebuilt from XOR parity"
                } else {
                    ""
                },
                if p.level == cfg.levels[0].name {
                    String::new()
                } else {
                    format!(", placed in {}", p.dir.display())
                }
            );
            if dry_run {
                println!("{}", serde_json::to_string_pretty(&p).map_err(runtime)?);
                return Ok(0);
            }
            crate::restore(RestoreArgs {
                from: p.dir,
                api_socket,
                console,
                paused,
                pin: None,
                host: *host,
                plane,
                confine,
            })
        }
        CheckpointAction::Run {
            config,
            api_socket,
            every,
            count,
            json,
            detach_devices,
        } => {
            let cfg = load(&config)?;
            if every.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
                return Err(usage(anyhow::anyhow!(
                    "--every must be a positive number of seconds"
                )));
            }
            let rep = Reporter::new(json);
            let sched = service::Schedule {
                every_s: every,
                count,
            };
            let n = service::run(
                &cfg,
                &mut |call| snapshot_call(&api_socket, call, detach_devices),
                &sched,
                &rep,
            )
            .map_err(usage)?;
            if !rep.is_json() {
                println!("{n} checkpoint(s) of job {} taken", cfg.job);
            }
            Ok(0)
        }
        CheckpointAction::List { config, json } => {
            let cfg = load(&config)?;
            let (cands, notes) = service::candidates(&cfg);
            if json {
                let v = serde_json::json!({ "copies": cands, "notes": notes });
                println!("{}", serde_json::to_string_pretty(&v).map_err(runtime)?);
                return Ok(0);
            }
            println!("job {}: {} copies", cfg.job, cands.len());
            println!("  level          copy                    gen  taken (s ago)  stored MiB");
            let now = snapshot::manifest::now_unix_ms();
            for c in &cands {
                println!(
                    "  {:<14} {:<22} {:>4} {:>14.1} {:>11.1}{}",
                    c.level,
                    c.info.name,
                    c.info.generation,
                    now.saturating_sub(c.info.taken_unix_ms) as f64 / 1e3,
                    c.info.stored_bytes as f64 / f64::from(1 << 20),
                    match (c.epoch, c.rebuild) {
                        (Some(e), true) => format!("  epoch {e}, needs rebuild"),
                        (Some(e), false) => format!("  epoch {e}"),
                        _ => String::new(),
                    }
                );
            }
            for n in &notes {
                println!("  note: {n}");
            }
            Ok(0)
        }
        CheckpointAction::Plan { config, json } => {
            let cfg = load(&config)?;
            let rows = service::plan(&cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows).map_err(runtime)?);
                return Ok(0);
            }
            use checkpoint_levels::interval::human;
            println!("job {}: checkpoint interval per level", cfg.job);
            println!(
                "  level          cost (from)            MTTI        Young       Daly        waste"
            );
            let opt = |v: Option<f64>| v.map(human).unwrap_or_else(|| "-".into());
            for r in rows {
                println!(
                    "  {:<14} {:<22} {:<11} {:<11} {:<11} {}",
                    r.level,
                    format!("{} ({})", opt(r.cost_s), r.cost_from),
                    opt(r.mtti_s),
                    opt(r.young_s),
                    opt(r.daly_s),
                    r.waste
                        .map(|w| format!("{:.2}%", w * 100.0))
                        .unwrap_or_else(|| "-".into())
                );
            }
            println!("  (Young: sqrt(2*cost*MTTI); Daly: higher-order; waste: expected time lost at Daly's interval)");
            Ok(0)
        }
    }
}
