//! `ffmk-vmm`: parse the command line, run the subcommand, map the outcome
//! to an exit code (0 clean stop, N guest test-exit status, 1 VMM failure,
//! 2 bad usage or input, 3 guest crash).
use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use vmm::cli::{
    CheckpointAction, Cli, ClientArgs, Command, KeyAction, PlaneArgs, RestoreArgs, RunArgs,
    SnapshotAction, SnapshotArgs,
};
use vmm::config::{FileConfig, RunConfig};

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    err: anyhow::Error,
}

fn usage(err: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        err: err.into(),
    }
}

fn runtime(err: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        err: err.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line, without its own "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("ffmk-vmm: error: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // vfio-ioctls warns about interrupt indices a device does not have
    // (error reporting, device request); we only use INTx, MSI and MSI-X.
    let directives = format!("{},vfio_ioctls=error", cli.log_level);
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::HostInfo { json, cpu_profile } => host_info(json, cpu_profile),
        Command::HostCheck {
            compute,
            json,
            root,
        } => host_check(compute, json, &root),
        Command::Info(c) => client(c, "GET", "/vm", ""),
        Command::Pause(c) => client(c, "PUT", "/vm/pause", ""),
        Command::Resume(c) => client(c, "PUT", "/vm/resume", ""),
        Command::Shutdown(c) => client(c, "PUT", "/vm/shutdown", ""),
        Command::Snapshot(a) => snapshot(a),
        Command::Restore(a) => restore(a),
        Command::Checkpoint { action, plane } => checkpoint(action, plane),
        Command::Migrate(a) => migrate(a),
        Command::Key { action } => key(action),
        Command::Device { action } => match action {
            vmm::cli::DeviceAction::Add { client: c, device } => client(
                c,
                "PUT",
                "/vm/devices",
                &serde_json::json!({ "device": device }).to_string(),
            ),
            vmm::cli::DeviceAction::Remove {
                client: c,
                bdf,
                force,
            } => {
                let q = if force { "?force=1" } else { "" };
                client(c, "DELETE", &format!("/vm/devices/{bdf}{q}"), "")
            }
        },
        Command::Vfio { action } => vfio(action),
        Command::Ib { action } => ib(action),
        Command::ResizeDisk {
            client: c,
            disk,
            size,
        } => match vmm::config::parse_size(&size) {
            Ok(bytes) => client(
                c,
                "PUT",
                &format!("/vm/disks/{disk}/resize"),
                &serde_json::json!({ "size_bytes": bytes }).to_string(),
            ),
            Err(e) => Err(usage(anyhow::anyhow!("--size: {e}"))),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("ffmk-vmm: error: {}", one_line(&f.err));
            ExitCode::from(f.code)
        }
    }
}

/// The error and its causes on one line, without repeating a cause that an
/// outer message already quotes (typed errors often embed their source).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn open_kvm() -> Result<kvm_ioctls::Kvm, Failure> {
    kvm_ioctls::Kvm::new()
        .context("cannot open /dev/kvm (is KVM available and accessible?)")
        .map_err(runtime)
}

fn run(args: RunArgs) -> Result<u8, Failure> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p).map_err(usage)?,
        None => FileConfig::default(),
    };
    let mut file = file.merged(args.as_file_config());
    if let Some(addr) = &args.incoming {
        let addr = vmm::migration::parse_tcp(addr)
            .map_err(|e| usage(anyhow::anyhow!("--incoming: {e}")))?;
        // The kernel comes with the migrating VM.
        file.kernel.get_or_insert_with(|| "(incoming)".into());
        let config = RunConfig::from_file_config(file).map_err(usage)?;
        // A destination must know whom it takes a VM from: no key, no start.
        let trust = args
            .plane
            .trust()
            .map_err(|e| usage(anyhow::anyhow!("--incoming: {e}")))?;
        let deadline = std::time::Duration::from_secs(args.incoming_timeout.max(1));
        return incoming(&addr, config, &trust, deadline);
    }
    let trust = source_trust(&args.plane)?;
    let config = RunConfig::from_file_config(file).map_err(usage)?;
    vmm::boot::probe_kernel(&config.kernel).map_err(usage)?;
    if let Some(initrd) = &config.initrd {
        std::fs::File::open(initrd)
            .with_context(|| format!("cannot open initramfs {}", initrd.display()))
            .map_err(usage)?;
    }
    let (signals, kvm, listener, _socket_guard) = prepare(&config, None)?;

    let vm = vmm::vm::Vm::create(&kvm, config, None).map_err(|e| {
        if e.is_user_error() {
            usage(e)
        } else {
            runtime(e)
        }
    })?;
    serve(vm, signals, listener, trust)
}

/// `ffmk-vmm key ...`: create, derive and check key files.
fn key(action: KeyAction) -> Result<u8, Failure> {
    use cluster_auth::key::{self, Key};
    match action {
        KeyAction::Generate { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))
                    .map_err(usage)?;
            }
            let k = Key::Cluster(key::generate().map_err(runtime)?);
            key::write(&path, &k).map_err(usage)?;
            let fp = k.cluster().map_err(runtime)?.fingerprint();
            eprintln!(
                "ffmk-vmm: wrote cluster key {fp} to {} (mode 0600): copy it to every node of \
                 the cluster, to the same path, as the user that runs ffmk-vmm and ffmk-node",
                path.display()
            );
            Ok(0)
        }
        KeyAction::Job { job, out, plane } => {
            let (k, _) = Key::find(plane.cluster_key.as_deref()).map_err(usage)?;
            let jk = k.job_key(&job).map_err(usage)?;
            let fp = jk.fingerprint();
            key::write(
                &out,
                &Key::Job {
                    job: job.clone(),
                    key: jk,
                },
            )
            .map_err(usage)?;
            eprintln!(
                "ffmk-vmm: wrote job {job:?}'s key {fp} to {}: it opens that job's checkpoint \
                 copies and nothing else",
                out.display()
            );
            Ok(0)
        }
        KeyAction::Show { path } => {
            let (k, path) = Key::find(path.as_deref()).map_err(usage)?;
            match &k {
                Key::Cluster(s) => println!("{}: cluster key {}", path.display(), s.fingerprint()),
                Key::Job { job, key } => {
                    println!(
                        "{}: job {job:?}'s key {}",
                        path.display(),
                        key.fingerprint()
                    )
                }
            }
            Ok(0)
        }
    }
}

/// The trust a VM's later migrations use. A key named (flag, environment)
/// but unusable is an error now; no key at all only keeps this VM from
/// migrating (the request is refused with the reason).
fn source_trust(plane: &PlaneArgs) -> Result<Result<cluster_auth::Trust, String>, Failure> {
    match plane.trust() {
        Ok(t) => Ok(Ok(t)),
        Err(e @ cluster_auth::Error::NoKey(_)) => Ok(Err(e.to_string())),
        Err(e) => Err(usage(e)),
    }
}

/// `run --incoming`: waits for a migration that fits `config`, then runs
/// the VM that arrived.
fn incoming(
    addr: &str,
    config: RunConfig,
    trust: &cluster_auth::Trust,
    deadline: std::time::Duration,
) -> Result<u8, Failure> {
    let (signals, kvm, listener, _socket_guard) = prepare(&config, None)?;
    // Passthrough functions join once the VM has arrived: the VM that
    // arrives has none (its source unplugged them), and its bus must
    // match the source's while its state is loaded.
    let mut config = config;
    let devices = std::mem::take(&mut config.devices);
    let tcp = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))
        .map_err(usage)?;
    eprintln!("ffmk-vmm: waiting for a migration on {addr}");
    let arrived = vmm::migration::receive(&kvm, &tcp, &config, trust, deadline, &mut |m| {
        eprintln!("ffmk-vmm: {m}")
    })
    .with_context(|| format!("listening on {addr}"))
    .map_err(runtime)?;
    drop(tcp);
    let received = &arrived.received;
    eprintln!(
        "ffmk-vmm: migrated in from {}: {} pages in {:.0} ms{}; running",
        received.from,
        received.pages,
        received.total_ms,
        match received.verified_pages {
            Some(n) => format!(", all {n} pages verified against the source's"),
            None => String::new(),
        }
    );
    if let Some(pc) = arrived.postcopy {
        let from = received.from.clone();
        eprintln!(
            "ffmk-vmm: post-copy: {} pages follow from {from}",
            pc.left()
        );
        let arriving = arrived.vm.memory_arriving.clone();
        arriving.store(true, std::sync::atomic::Ordering::Release);
        let socket = config.api_socket.clone();
        let watched = pc.finish(move |end, left| match end {
            Ok(s) => {
                arriving.store(false, std::sync::atomic::Ordering::Release);
                eprintln!(
                    "ffmk-vmm: post-copy from {from} complete: {} pages in {:.0} ms; {} faults \
                     on missing pages, {} pages asked for (mean wait {:.2} ms, max {:.2} ms), \
                     {} untouched pages zero-filled, {} present",
                    s.missing_pages,
                    s.total_ms,
                    s.faults,
                    s.requested,
                    s.mean_fault_ms,
                    s.max_fault_ms,
                    s.zero_filled,
                    s.already_present
                );
            }
            Err(e) => {
                // A fault on a missing page can never be served now: the
                // VM cannot go on. Stop here, before it runs on holes.
                eprintln!(
                    "ffmk-vmm: post-copy from {from} failed: {e}; {left} pages of the VM's \
                     memory never arrived, so it cannot continue: stopping (exit 1)"
                );
                if let Some(p) = socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(1);
            }
        });
        if let Err(e) = watched {
            eprintln!(
                "ffmk-vmm: cannot follow the post-copy from {}: {e}; the VM cannot continue \
                 without its missing pages: stopping (exit 1)",
                received.from
            );
            return Ok(1);
        }
    }
    plug_arrived(&arrived.vm, &devices);
    serve(arrived.vm, signals, listener, Ok(trust.clone()))
}

/// `run --incoming --device ...`: plugs the functions into the VM that
/// arrived and has its guest agent rescan. A function that cannot be
/// plugged is reported; the VM runs on without it.
fn plug_arrived(vm: &vmm::vm::Vm, devices: &[vmm::config::DeviceEntry]) {
    if devices.is_empty() {
        return;
    }
    for d in devices {
        match vm.plug(d) {
            Ok(at) => eprintln!("ffmk-vmm: {d} plugged in at {at}"),
            Err(e) => eprintln!("ffmk-vmm: {e}; the VM runs without it"),
        }
    }
    if let Some(v) = &vm.config.vsock {
        match vmm::agent::ask(&v.socket, "rescan", vmm::agent::TIMEOUT) {
            Ok(a) => eprintln!("ffmk-vmm: guest agent: {a}"),
            Err(e) => eprintln!("ffmk-vmm: {e}"),
        }
    }
}

/// `ffmk-vmm migrate`: starts the migration through the API and follows it.
fn migrate(a: vmm::cli::MigrateArgs) -> Result<u8, Failure> {
    use checkpoint_levels::progress::Reporter;
    let call =
        |method: &str, path: &str, body: &str| -> Result<(u16, serde_json::Value), Failure> {
            let mut s = std::os::unix::net::UnixStream::connect(&a.api_socket)
                .with_context(|| format!("cannot connect to API socket {}", a.api_socket.display()))
                .map_err(runtime)?;
            let (status, text) = vmm::api::http::call(&mut s, method, path, body)
                .context("API call failed")
                .map_err(runtime)?;
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            ))
        };
    let body = serde_json::json!({
        "to": a.to,
        "max_downtime_ms": a.max_downtime_ms,
        "max_rounds": a.max_rounds,
        "throttle": !a.no_throttle,
        "postcopy": a.postcopy,
        "verify": a.verify,
    });
    let (status, v) = call("PUT", "/vm/migrate", &body.to_string())?;
    if !(200..300).contains(&status) {
        let e = v["error"].as_str().unwrap_or("refused").to_string();
        return Err(if status < 500 {
            usage(anyhow::anyhow!(e))
        } else {
            runtime(anyhow::anyhow!(e))
        });
    }
    interrupt::install();
    let reporter = Reporter::new(a.json);
    let task = reporter.task("migrate");
    let mut cancelled = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if interrupt::seen() && !cancelled {
            cancelled = true;
            let _ = call("DELETE", "/vm/migration", "");
        }
        // An error here: the source VMM ended before we saw the outcome.
        let (_, s) = call("GET", "/vm/migration", "").map_err(|f| {
            runtime(anyhow::anyhow!(
                "the source VMM ended before reporting the outcome (check the destination): {}",
                one_line(&f.err)
            ))
        })?;
        match s["state"].as_str() {
            Some("running") => {
                let p = &s["progress"];
                if p.is_null() {
                    continue;
                }
                if reporter.is_json() {
                    reporter.event(serde_json::json!({ "event": "progress", "progress": p }));
                } else {
                    let mem = p["memory_bytes"].as_u64();
                    task.progress(
                        p["sent_bytes"].as_u64().unwrap_or(0),
                        mem.unwrap_or(0).max(p["sent_bytes"].as_u64().unwrap_or(0)),
                    );
                    if p["phase"] == "postcopy" {
                        task.message(&format!(
                            "post-copy: the VM runs on the destination, {} pages to send",
                            p["remaining_pages"]
                        ));
                        continue;
                    }
                    task.message(&format!(
                        "{} round {}, dirty {:.0} MiB/s, link {:.0} MiB/s, predicted downtime {:.1} ms{}",
                        p["phase"].as_str().unwrap_or(""),
                        p["round"],
                        p["dirty_mib_s"].as_f64().unwrap_or(0.0),
                        p["link_mib_s"].as_f64().unwrap_or(0.0),
                        p["predicted_downtime_ms"].as_f64().unwrap_or(0.0),
                        match p["throttle_pct"].as_u64() {
                            Some(t) if t > 0 => format!(", vCPUs throttled {t}%"),
                            _ => String::new(),
                        }
                    ));
                }
            }
            Some("completed") => {
                task.finish("done");
                println!("{s}");
                return Ok(0);
            }
            Some("failed") => {
                task.finish("failed");
                let e = s["error"].as_str().unwrap_or("failed").to_string();
                return Err(runtime(anyhow::anyhow!(
                    "{e}{}",
                    if s["vm_running_here"] == true {
                        " (the VM runs on here)"
                    } else {
                        ""
                    }
                )));
            }
            _ => return Err(runtime(anyhow::anyhow!("unexpected migration state: {s}"))),
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

type Listener = Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>;

/// What every VM start needs before the VM exists: SIGINT/SIGTERM blocked
/// before any thread starts (only the control loop sees them), /dev/kvm, and
/// the API socket bound (removed again on every way out by the guard).
fn prepare(
    config: &vmm::config::RunConfig,
    restore_from: Option<&std::path::Path>,
) -> Result<(std::os::fd::OwnedFd, kvm_ioctls::Kvm, Listener, SocketGuard), Failure> {
    let signals = vmm::control::signal_fd()
        .context("cannot set up signal handling")
        .map_err(runtime)?;
    // Every thread started from here on confines itself (docs/security.md).
    sandbox::seccomp::set_mode(config.seccomp);
    let kvm = open_kvm()?;
    let listener = match &config.api_socket {
        Some(p) => Some((
            vmm::api::bind(p, config.api_group.as_deref()).map_err(usage)?,
            p.clone(),
        )),
        None => None,
    };
    let guard = SocketGuard(listener.as_ref().map(|(_, p)| p.clone()));
    // Still no other thread: the rules cover every thread started later.
    if config.landlock.applies(config) {
        let paths = vmm::reach::paths(config, restore_from)
            .context("cannot prepare the Landlock rules")
            .map_err(usage)?;
        match sandbox::landlock::restrict(&paths)
            .context("cannot restrict the file system (--landlock)")
            .map_err(runtime)?
        {
            sandbox::landlock::Enforced::Fully => tracing::info!("landlock: fully enforced"),
            sandbox::landlock::Enforced::Partly => {
                tracing::warn!("landlock: partly enforced (an older kernel)")
            }
            sandbox::landlock::Enforced::Not => {
                tracing::warn!("landlock: this kernel has none; the file system is not restricted")
            }
        }
    }
    Ok((signals, kvm, listener, guard))
}

/// Runs the control loop (and the API server, if any) until the VM ends.
fn serve(
    vm: vmm::vm::Vm,
    signals: std::os::fd::OwnedFd,
    listener: Listener,
    trust: Result<cluster_auth::Trust, String>,
) -> Result<u8, Failure> {
    let api = match listener {
        Some((l, _)) => {
            let wake = std::sync::Arc::new(
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                    .context("eventfd")
                    .map_err(runtime)?,
            );
            let rx = vmm::api::start_server(l, wake.clone())
                .context("cannot start the API thread")
                .map_err(runtime)?;
            Some((rx, wake))
        }
        None => None,
    };
    // The control thread last: the API thread above has its own filter,
    // the migration threads it starts later fit inside this one.
    sandbox::seccomp::confine(sandbox::ThreadKind::Control, "control")
        .context("cannot confine the control thread")
        .map_err(runtime)?;
    let reason = vmm::control::run(std::sync::Arc::new(vm), signals, api, trust)
        .context("control loop failed")
        .map_err(runtime)?;
    eprintln!(
        "ffmk-vmm: VM stopped: {} (exit code {})",
        reason.describe(),
        reason.exit_code()
    );
    Ok(reason.exit_code() as u8)
}

fn restore(args: RestoreArgs) -> Result<u8, Failure> {
    let t0 = std::time::Instant::now();
    let console: vmm::config::Console = args
        .console
        .as_deref()
        .unwrap_or("stdio")
        .parse()
        .map_err(usage)?;
    let trust = source_trust(&args.plane)?;
    let restoring = vmm::checkpoint::Restoring::open(&args.from, args.paused).map_err(usage)?;
    let config = restoring
        .run_config(
            console,
            args.api_socket.clone(),
            args.pin.clone(),
            &args.host,
            &args.confine,
        )
        .map_err(usage)?;
    let from = match &restoring.origin {
        vmm::checkpoint::Origin::Snapshot(s) => Some(s.dir.as_path()),
        vmm::checkpoint::Origin::Migration { .. } => None,
    };
    let (signals, kvm, listener, _socket_guard) = prepare(&config, from)?;
    let summary = match &restoring.origin {
        vmm::checkpoint::Origin::Snapshot(s) => format!(
            "generation {}, {} layer(s), {:.1} MiB stored",
            s.manifest.generation,
            s.manifest.layers.len(),
            s.manifest.stored_bytes() as f64 / f64::from(1 << 20)
        ),
        vmm::checkpoint::Origin::Migration { .. } => String::new(),
    };
    let vm = vmm::vm::Vm::create(&kvm, config, Some(&restoring)).map_err(runtime)?;
    eprintln!(
        "ffmk-vmm: restored {} ({summary}) in {:.1} ms{}",
        args.from.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        if args.paused { ", paused" } else { "" }
    );
    drop(restoring);
    serve(vm, signals, listener, trust)
}

fn snapshot(a: SnapshotArgs) -> Result<u8, Failure> {
    match a.action {
        Some(SnapshotAction::Inspect { dir, verify, json }) => inspect(&dir, verify, json),
        Some(SnapshotAction::Compact { dir }) => {
            let m = snapshot::store::compact(&dir).map_err(usage)?;
            println!(
                "compacted {} into one full layer: {} pages, {:.1} MiB",
                dir.display(),
                m.layers[0].pages_defined,
                m.layers[0].data_bytes as f64 / f64::from(1 << 20)
            );
            Ok(0)
        }
        None => {
            let (Some(sock), Some(dest)) = (a.api_socket, a.dest) else {
                return Err(usage(anyhow::anyhow!(
                    "snapshot needs --api-socket and --dest (or: snapshot inspect|compact DIR)"
                )));
            };
            let dest = std::path::absolute(&dest)
                .with_context(|| format!("bad --dest {}", dest.display()))
                .map_err(usage)?;
            let body = serde_json::json!({
                "dest": dest,
                "kind": if a.incremental { "incremental" } else { "full" },
                "force": a.force,
                "live": a.live,
                "detach_devices": a.detach_devices,
            });
            client(
                ClientArgs { api_socket: sock },
                "PUT",
                "/vm/snapshot",
                &body.to_string(),
            )
        }
    }
}

fn inspect(dir: &std::path::Path, verify: bool, json: bool) -> Result<u8, Failure> {
    let s = snapshot::Snapshot::open(dir).map_err(usage)?;
    if verify {
        s.verify().map_err(usage)?;
    }
    let m = &s.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m).map_err(runtime)?);
        return Ok(0);
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("snapshot     {}", dir.display());
    println!("format       {} v{}", m.format, m.version);
    println!("chain        {} generation {}", m.chain_id, m.generation);
    println!(
        "taken on     {} CPU, {} host, profile {}, TSC {} kHz",
        m.host.cpu_vendor, m.host.host_kind, m.host.cpu_profile, m.host.tsc_khz
    );
    println!("memory       {:.0} MiB", mib(m.memory_bytes));
    println!("stored       {:.1} MiB", mib(m.stored_bytes()));
    println!("state        {} ({} bytes)", m.state.name, m.state.bytes);
    println!("layers       kind         pages   data MiB  pause ms  file");
    for l in &m.layers {
        println!(
            "             {:<11} {:>7} {:>10.1} {:>9.2}  {}{}",
            format!("{:?}", l.kind).to_lowercase(),
            l.pages_defined,
            mib(l.data_bytes),
            l.pause_ms,
            l.memory.name,
            if l.live { " (live)" } else { "" }
        );
    }
    if verify {
        println!("checksums    ok");
    }
    Ok(0)
}

/// Asks the VMM behind `sock` for a snapshot (the local level's write).
fn snapshot_call(
    sock: &std::path::Path,
    call: checkpoint_levels::service::SnapshotCall,
    detach_devices: bool,
) -> Result<serde_json::Value, checkpoint_levels::service::CallError> {
    use checkpoint_levels::service::CallError;
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| {
        CallError::Gone(format!(
            "cannot connect to API socket {}: {e}",
            sock.display()
        ))
    })?;
    let body = serde_json::json!({
        "dest": call.dest,
        "kind": if call.incremental { "incremental" } else { "full" },
        "live": call.live,
        "detach_devices": detach_devices,
    });
    let (status, text) = vmm::api::http::call(&mut s, "PUT", "/vm/snapshot", &body.to_string())
        .map_err(|e| CallError::Failed(format!("API call failed: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(CallError::Failed(
            v.get("error")
                .and_then(|e| e.as_str())
                .map(String::from)
                .unwrap_or(text),
        ))
    }
}

fn checkpoint(action: CheckpointAction, plane: PlaneArgs) -> Result<u8, Failure> {
    use checkpoint_levels::{config::Config, progress::Reporter, service};
    let load = |p: &std::path::Path| Config::load(p).map_err(usage);
    if !matches!(action, CheckpointAction::Serve { .. }) {
        // Clients: a key is needed once a level is on another host.
        checkpoint_levels::wire::use_trust(source_trust(&plane)?);
    }
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
            eprintln!(
                "ffmk-vmm: checkpoint endpoint on {local}, storing in {}",
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
                eprintln!("ffmk-vmm: skipped {s}");
            }
            for n in p.notes.iter().filter(|n| n.contains("in the future")) {
                eprintln!("ffmk-vmm: note: {n}");
            }
            eprintln!(
                "ffmk-vmm: checkpoint restore: using level {}: {} generation {} (taken {} ms ago{}){}",
                p.level,
                p.info.name,
                p.info.generation,
                snapshot::manifest::now_unix_ms().saturating_sub(p.info.taken_unix_ms),
                if p.rebuilt { ", rebuilt from XOR parity" } else { "" },
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
            restore(RestoreArgs {
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

struct SocketGuard(Option<std::path::PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Report commands end quietly when their reader goes away (`| head`).
fn quiet_on_closed_stdout() {
    // SAFETY: restores the default action for SIGPIPE; only called by
    // commands that write a report and no sockets.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn print_json(v: &impl serde::Serialize) -> Result<u8, Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(runtime)?);
    Ok(0)
}

fn pci_address(s: &str) -> Result<vfio_ib::PciAddress, Failure> {
    s.parse().map_err(|e: String| usage(anyhow::anyhow!(e)))
}

fn vfio(action: vmm::cli::VfioAction) -> Result<u8, Failure> {
    use vfio_ib::sysfs;
    use vmm::cli::VfioAction;
    quiet_on_closed_stdout();
    match action {
        VfioAction::List { json, root } => {
            let v = sysfs::functions(&root);
            let rows: Vec<_> = v
                .iter()
                .map(|a| {
                    let (vendor, device) = sysfs::ids(&root, a).unwrap_or((0xffff, 0xffff));
                    serde_json::json!({
                        "address": a.to_string(),
                        "id": format!("{vendor:04x}:{device:04x}"),
                        "driver": sysfs::driver(&root, a),
                        "iommu_group": sysfs::iommu_group(&root, a),
                    })
                })
                .collect();
            if json {
                return print_json(&rows);
            }
            if !sysfs::has_iommu(&root) {
                println!("# no IOMMU groups: this host cannot pass devices through");
            }
            for r in rows {
                println!(
                    "{}  {}  driver={}  iommu_group={}",
                    r["address"].as_str().unwrap_or(""),
                    r["id"].as_str().unwrap_or(""),
                    r["driver"].as_str().unwrap_or("-"),
                    r["iommu_group"]
                        .as_u64()
                        .map_or("-".into(), |g| g.to_string()),
                );
            }
            Ok(0)
        }
        VfioAction::Bind { address, root } => {
            let a = pci_address(&address)?;
            sysfs::bind_vfio(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            let group =
                vfio_ib::kernel::preflight(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            println!(
                "{a} is bound to vfio-pci (IOMMU group {group}); pass it with --device vfio={a}"
            );
            Ok(0)
        }
        VfioAction::Unbind { address, root } => {
            let a = pci_address(&address)?;
            sysfs::unbind_vfio(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            println!(
                "{a} is back with the host (driver: {})",
                sysfs::driver(&root, &a).as_deref().unwrap_or("none")
            );
            Ok(0)
        }
    }
}

fn ib(action: vmm::cli::IbAction) -> Result<u8, Failure> {
    use vfio_ib::ib;
    use vmm::cli::IbAction;
    quiet_on_closed_stdout();
    let fail = |e: String| usage(anyhow::anyhow!(e));
    match action {
        IbAction::List { json, root } => {
            let hcas = ib::list(&root);
            if json {
                return print_json(&hcas);
            }
            if hcas.is_empty() {
                println!("no InfiniBand HCAs on this host");
            }
            for h in hcas {
                let addr = h.address.as_ref().map_or("-".into(), |a| a.to_string());
                let vfs = h.sriov.as_ref().map_or("no SR-IOV".into(), |s| {
                    format!("{}/{} VFs", s.num_vfs, s.total_vfs)
                });
                println!(
                    "{} {addr} driver={} fw={} node_guid={} {vfs}",
                    h.name,
                    h.driver.as_deref().unwrap_or("-"),
                    h.fw_ver,
                    h.node_guid
                );
                for p in &h.ports {
                    println!(
                        "  port {} {} ({}) lid={:#x} sm_lid={:#x} {} {} pkeys={}",
                        p.number,
                        p.state,
                        p.phys_state,
                        p.lid,
                        p.sm_lid,
                        p.link_layer,
                        p.rate,
                        p.pkeys.join(",")
                    );
                }
                for v in &h.vfs {
                    println!(
                        "  vf {} {} driver={} node={} port={} policy={}",
                        v.index,
                        v.address,
                        v.driver.as_deref().unwrap_or("-"),
                        v.node_guid.as_deref().unwrap_or("-"),
                        v.port_guid.as_deref().unwrap_or("-"),
                        v.policy.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        IbAction::CreateVfs { hca, count, root } => {
            let vfs = ib::create_vfs(&root, &hca, count).map_err(fail)?;
            println!("{hca}: {} VFs", vfs.len());
            for v in vfs {
                println!("  {v}");
            }
            Ok(0)
        }
        IbAction::SetGuid {
            hca,
            vf,
            node,
            port,
            root,
        } => {
            ib::set_guids(&root, &hca, vf, &node, &port).map_err(fail)?;
            println!("{hca} VF {vf}: node GUID {node}, port GUID {port}");
            Ok(0)
        }
        IbAction::SetPolicy {
            hca,
            vf,
            policy,
            root,
        } => {
            ib::set_policy(&root, &hca, vf, &policy).map_err(fail)?;
            println!("{hca} VF {vf}: policy {policy}");
            Ok(0)
        }
        IbAction::Bind { hca, vf, root } => {
            let h =
                ib::hca(&root, &hca).ok_or_else(|| fail(format!("no InfiniBand HCA '{hca}'")))?;
            let v = h.vfs.get(vf as usize).ok_or_else(|| {
                fail(format!(
                    "{hca} has {} VFs; there is no VF {vf}",
                    h.vfs.len()
                ))
            })?;
            vfio_ib::sysfs::bind_vfio(&root, &v.address).map_err(fail)?;
            println!("{}", v.address);
            Ok(0)
        }
        IbAction::Check { hca, root } => {
            let problems = ib::problems(&root, &hca).map_err(fail)?;
            if problems.is_empty() {
                println!("{hca}: ready to give VMs VFs");
                return Ok(0);
            }
            for p in &problems {
                println!("{p}");
            }
            Ok(1)
        }
    }
}

fn host_check(
    compute: Option<vcpu_decouple::CpuList>,
    json: bool,
    root: &std::path::Path,
) -> Result<u8, Failure> {
    quiet_on_closed_stdout();
    let report = vcpu_decouple::hostcheck::check(root, compute.as_ref()).map_err(runtime)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(runtime)?
        );
        return Ok(0);
    }
    println!(
        "compute cores: {} ({})",
        report.compute, report.compute_from
    );
    for f in &report.findings {
        let v = match f.verdict {
            vcpu_decouple::hostcheck::Verdict::Ok => "ok",
            vcpu_decouple::hostcheck::Verdict::Info => "info",
            vcpu_decouple::hostcheck::Verdict::Warn => "WARN",
        };
        println!("{v:>4}  {:<13} {}", f.item, f.detail);
        if let Some(s) = &f.suggestion {
            println!("      {:<13} -> {s}", "");
        }
    }
    println!(
        "{} warning(s): {}",
        report.warnings(),
        if report.warnings() == 0 {
            "the compute cores look quiet"
        } else {
            "expect host noise on the compute cores until they are fixed"
        }
    );
    Ok(0)
}

fn host_info(json: bool, profile: Option<vmm::host::CpuProfile>) -> Result<u8, Failure> {
    quiet_on_closed_stdout();
    let kvm = open_kvm()?;
    let info = vmm::host::HostInfo::gather(&kvm, profile)
        .context("cannot query KVM")
        .map_err(runtime)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info).map_err(runtime)?);
    } else {
        info.print_text();
    }
    Ok(0)
}

fn client(args: ClientArgs, method: &str, path: &str, body: &str) -> Result<u8, Failure> {
    let mut s = std::os::unix::net::UnixStream::connect(&args.api_socket)
        .with_context(|| format!("cannot connect to API socket {}", args.api_socket.display()))
        .map_err(usage)?;
    let (status, body) = vmm::api::http::call(&mut s, method, path, body).map_err(runtime)?;
    if (200..300).contains(&status) {
        match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(body)),
            Err(_) => println!("{body}"),
        }
        Ok(0)
    } else {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        Err(runtime(anyhow::anyhow!(
            "{method} {path} failed ({status}): {msg}"
        )))
    }
}
