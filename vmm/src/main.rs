//! `ffmk-vmm`: parse the command line, run the subcommand, map the outcome
//! to an exit code (0 clean stop, N guest test-exit status, 1 VMM failure,
//! 2 bad usage or input, 3 guest crash).
use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use vmm::cli::{Cli, ClientArgs, Command, RunArgs};
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::HostInfo { json, cpu_profile } => host_info(json, cpu_profile),
        Command::Info(c) => client(c, "GET", "/vm", ""),
        Command::Pause(c) => client(c, "PUT", "/vm/pause", ""),
        Command::Resume(c) => client(c, "PUT", "/vm/resume", ""),
        Command::Shutdown(c) => client(c, "PUT", "/vm/shutdown", ""),
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
    let config = RunConfig::from_file_config(file.merged(args.as_file_config())).map_err(usage)?;
    vmm::boot::probe_kernel(&config.kernel).map_err(usage)?;
    if let Some(initrd) = &config.initrd {
        std::fs::File::open(initrd)
            .with_context(|| format!("cannot open initramfs {}", initrd.display()))
            .map_err(usage)?;
    }
    // Block SIGINT/SIGTERM before any thread starts, so only the control loop sees them.
    let signals = vmm::control::signal_fd()
        .context("cannot set up signal handling")
        .map_err(runtime)?;
    let kvm = open_kvm()?;
    let listener = match &config.api_socket {
        Some(p) => Some((vmm::api::bind(p).map_err(usage)?, p.clone())),
        None => None,
    };
    // From here on the socket file exists: remove it on every way out.
    let _socket_guard = SocketGuard(listener.as_ref().map(|(_, p)| p.clone()));

    let vm = vmm::vm::Vm::create(&kvm, config).map_err(|e| {
        if e.is_user_error() {
            usage(e)
        } else {
            runtime(e)
        }
    })?;
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
    let reason = vmm::control::run(vm, signals, api)
        .context("control loop failed")
        .map_err(runtime)?;
    eprintln!(
        "ffmk-vmm: VM stopped: {} (exit code {})",
        reason.describe(),
        reason.exit_code()
    );
    Ok(reason.exit_code() as u8)
}

struct SocketGuard(Option<std::path::PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn host_info(json: bool, profile: Option<vmm::host::CpuProfile>) -> Result<u8, Failure> {
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
