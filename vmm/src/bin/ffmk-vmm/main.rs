//! `ffmk-vmm`: parse the command line, run the subcommand, map the outcome
//! to an exit code (0 clean stop, N guest test-exit status, 1 VMM failure,
//! 2 bad usage or input, 3 guest crash).
use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use vmm::cli::{Cli, Command, PlaneArgs, RestoreArgs, RunArgs};
use vmm::config::VmSpec;

#[macro_use]
mod log;
mod admin;
mod checkpoint;
mod client;
mod failure;
mod incoming;
mod summary;

use failure::{one_line, runtime, usage, Failure};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return failure::command_line(e),
    };
    let format = if cli.log_format == "json" {
        log::Format::Json
    } else {
        log::Format::Text
    };
    if let Err(e) = log::init(cli.log_level.as_deref(), format) {
        eprintln!("ffmk-vmm: error: {e}");
        return ExitCode::from(2);
    }

    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::HostInfo { json, cpu_profile } => admin::host_info(json, cpu_profile),
        Command::HostCheck {
            compute,
            json,
            root,
        } => admin::host_check(compute, json, &root),
        Command::Info(c) => client::info(c),
        Command::Pause(c) => client::pause(c),
        Command::Resume(c) => client::resume(c),
        Command::Shutdown(c) => client::shutdown(c),
        Command::Announce(c) => client::announce(c),
        Command::Snapshot(a) => client::snapshot(a),
        Command::Restore(a) => restore(*a),
        Command::Checkpoint { action, plane } => checkpoint::checkpoint(action, plane),
        Command::Migrate(a) => client::migrate(a),
        Command::Key { action } => admin::key(action),
        Command::Device { action } => client::device(action),
        Command::Vfio { action } => admin::vfio(action),
        Command::Ib { action } => admin::ib(action),
        Command::Docs(d) => {
            use clap::CommandFactory;
            d.run(Cli::command())
                .map(|()| 0)
                .map_err(|e| runtime(anyhow::anyhow!(e)))
        }
        Command::ResizeDisk {
            client: c,
            disk,
            size,
        } => client::resize_disk(c, disk, &size),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            tracing::error!(target: log::SAY, "{}", one_line(&f.err));
            ExitCode::from(f.code)
        }
    }
}

pub(crate) fn open_kvm() -> Result<kvm_ioctls::Kvm, Failure> {
    kvm_ioctls::Kvm::new()
        .context("cannot open /dev/kvm (is KVM available and accessible?)")
        .map_err(runtime)
}

fn run(args: RunArgs) -> Result<u8, Failure> {
    let file = match &args.config {
        Some(p) => VmSpec::load(p).map_err(usage)?,
        None => VmSpec::default(),
    };
    let mut file = file.merged(args.spec());
    if let Some(addr) = &args.incoming {
        let addr = vmm::migration::parse_tcp(addr)
            .map_err(|e| usage(anyhow::anyhow!("--incoming: {e}")))?;
        // The kernel comes with the migrating VM.
        file.kernel.get_or_insert_with(|| "(incoming)".into());
        let config = file.validate().map_err(usage)?;
        // A destination must know whom it takes a VM from: no key, no start.
        let trust = args
            .plane
            .trust()
            .map_err(|e| usage(anyhow::anyhow!("--incoming: {e}")))?;
        let deadline = std::time::Duration::from_secs(args.incoming_timeout.max(1));
        return incoming::incoming(&addr, config, &trust, deadline);
    }
    let trust = source_trust(&args.plane)?;
    let config = file.validate().map_err(usage)?;
    vmm::boot::probe_kernel(&config.kernel).map_err(usage)?;
    if let Some(initrd) = &config.initrd {
        std::fs::File::open(initrd)
            .with_context(|| format!("cannot open initramfs {}", initrd.display()))
            .map_err(usage)?;
    }
    let (signals, kvm, listener, _socket_guard) = prepare(&config, None)?;

    let vm = vmm::vm::Vm::create(&kvm, config, None).map_err(vm_failure)?;
    serve(vm, signals, listener, trust)
}

/// A VM that could not be built: bad input (memory the host cannot give,
/// a disk or TAP that cannot be opened) is 2, for `run` and `restore`
/// alike; anything else is a VMM failure (1).
fn vm_failure(e: vmm::vm::Error) -> Failure {
    if e.is_user_error() {
        usage(e)
    } else {
        runtime(e)
    }
}

/// The trust a VM's later migrations use. A key named (flag, environment)
/// but unusable is an error now; no key at all only keeps this VM from
/// migrating (the request is refused with the reason).
pub(crate) fn source_trust(
    plane: &PlaneArgs,
) -> Result<Result<cluster_auth::Trust, String>, Failure> {
    match plane.trust() {
        Ok(t) => Ok(Ok(t)),
        Err(e @ cluster_auth::Error::NoKey(_)) => Ok(Err(e.to_string())),
        Err(e) => Err(usage(e)),
    }
}

pub(crate) type Listener = Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>;

/// What every VM start needs before the VM exists: SIGINT/SIGTERM blocked
/// before any thread starts (only the control loop sees them), /dev/kvm, and
/// the API socket bound (removed again on every way out by the guard).
pub(crate) fn prepare(
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
    if vmm::reach::applies(config) {
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

/// The API server's control side: requests, and the eventfd that wakes
/// whoever answers them.
pub(crate) type Api = Option<(
    std::sync::mpsc::Receiver<vmm::api::ApiMessage>,
    std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
)>;

/// Starts the API server thread on the bound socket, if there is one.
pub(crate) fn start_api(listener: Listener) -> Result<Api, Failure> {
    let Some((l, _)) = listener else {
        return Ok(None);
    };
    let wake = std::sync::Arc::new(
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .context("eventfd")
            .map_err(runtime)?,
    );
    let rx = vmm::api::start_server(l, wake.clone())
        .context("cannot start the API thread")
        .map_err(runtime)?;
    Ok(Some((rx, wake)))
}

/// Runs the control loop (and the API server, if any) until the VM ends.
fn serve(
    vm: vmm::vm::Vm,
    signals: std::os::fd::OwnedFd,
    listener: Listener,
    trust: Result<cluster_auth::Trust, String>,
) -> Result<u8, Failure> {
    let api = start_api(listener)?;
    serve_with(vm, signals, api, trust)
}

/// [`serve`] with the API server already started.
pub(crate) fn serve_with(
    vm: vmm::vm::Vm,
    signals: std::os::fd::OwnedFd,
    api: Api,
    trust: Result<cluster_auth::Trust, String>,
) -> Result<u8, Failure> {
    // The control thread last: the API thread above has its own filter,
    // the migration threads it starts later fit inside this one.
    sandbox::seccomp::confine(sandbox::ThreadKind::Control, "control")
        .context("cannot confine the control thread")
        .map_err(runtime)?;
    let reason = vmm::control::run(std::sync::Arc::new(vm), signals, api, trust)
        .context("control loop failed")
        .map_err(runtime)?;
    say!(
        "VM stopped: {} (exit code {})",
        reason.describe(),
        reason.exit_code()
    );
    Ok(reason.exit_code() as u8)
}

pub(crate) fn restore(args: RestoreArgs) -> Result<u8, Failure> {
    let t0 = std::time::Instant::now();
    let trust = source_trust(&args.plane)?;
    let restoring = vmm::machine::Restoring::open(&args.from, args.paused).map_err(usage)?;
    let config = restoring
        .run_config(args.spec(), &(&args.host).into())
        .map_err(usage)?;
    let from = match &restoring.origin {
        vmm::machine::Origin::Snapshot(s) => Some(s.dir.as_path()),
        vmm::machine::Origin::Migration { .. } => None,
    };
    let (signals, kvm, listener, _socket_guard) = prepare(&config, from)?;
    let summary = match &restoring.origin {
        vmm::machine::Origin::Snapshot(s) => format!(
            "generation {}, {} layer(s), {:.1} MiB stored",
            s.manifest.generation,
            s.manifest.layers.len(),
            s.manifest.stored_bytes() as f64 / f64::from(1 << 20)
        ),
        vmm::machine::Origin::Migration { .. } => String::new(),
    };
    let vm = vmm::vm::Vm::create(&kvm, config, Some(&restoring)).map_err(vm_failure)?;
    say!(
        "restored {} ({summary}) in {:.1} ms{}",
        args.from.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        if args.paused { ", paused" } else { "" }
    );
    drop(restoring);
    serve(vm, signals, listener, trust)
}

pub(crate) struct SocketGuard(Option<std::path::PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
