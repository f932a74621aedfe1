//! `run --incoming`: wait for a VM to migrate in, then run it. While it
//! waits the VMM answers its API (`GET /vm` says `incoming`; shutdown stops
//! the wait; everything else is refused until the VM is here) and ends on
//! SIGINT/SIGTERM, removing its API socket.
use crate::failure::{runtime, usage, Failure};
use crate::{prepare, serve_with, start_api, Api};
use anyhow::Context;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::api::{ApiRequest, ApiResponse};
use vmm::config::RunConfig;
use vmm_sys_util::eventfd::EventFd;

/// Waits for a migration that fits `config` on `addr`, then runs the VM
/// that arrived.
pub fn incoming(
    addr: &str,
    config: RunConfig,
    trust: &cluster_auth::Trust,
    deadline: Duration,
) -> Result<u8, Failure> {
    let (signals, kvm, listener, _socket_guard) = prepare(&config, None)?;
    // Passthrough functions join once the VM has arrived (its source
    // unplugged its own: the bus must match the source's while the state
    // loads), except those that take the device state of the source's
    // functions (VFIO migration): they go in where those were, first.
    let mut config = config;
    let devices = std::mem::take(&mut config.devices);
    let tcp = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))
        .map_err(usage)?;
    let api = start_api(listener)?;
    let waiting = Waiting::start(config.clone(), addr.to_string(), signals, api)?;
    say!("waiting for a migration on {addr}");
    let arrived =
        vmm::migration::receive(&kvm, &tcp, &config, &devices, trust, deadline, &mut |m| {
            say!("{m}")
        })
        .with_context(|| format!("listening on {addr}"));
    // From here the control loop answers the API and the signals.
    let (signals, api) = waiting.stop()?;
    let arrived = arrived.map_err(runtime)?;
    drop(tcp);
    let received = &arrived.received;
    say!(
        "migrated in from {}: {} pages in {:.0} ms{}; running",
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
        say!("post-copy: {} pages follow from {from}", pc.left());
        let arriving = arrived.vm.ram.arriving().clone();
        arriving.store(true, std::sync::atomic::Ordering::Release);
        let socket = config.api_socket.clone();
        let watched = pc.finish(move |end, left| match end {
            Ok(s) => {
                arriving.store(false, std::sync::atomic::Ordering::Release);
                say!(
                    "post-copy from {from} complete: {} pages in {:.0} ms; {} faults \
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
                say!(
                    "post-copy from {from} failed: {e}; {left} pages of the VM's \
                     memory never arrived, so it cannot continue: stopping (exit 1)"
                );
                if let Some(p) = socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(1);
            }
        });
        if let Err(e) = watched {
            say!(
                "cannot follow the post-copy from {}: {e}; the VM cannot continue \
                 without its missing pages: stopping (exit 1)",
                received.from
            );
            return Ok(1);
        }
    }
    if arrived.devices_used > 0 {
        say!(
            "{} passthrough function(s) took the device state of the source's",
            arrived.devices_used
        );
    }
    plug_arrived(
        &arrived.vm,
        &devices[arrived.devices_used.min(devices.len())..],
    );
    serve_with(arrived.vm, signals, api, Ok(trust.clone()))
}

/// `run --incoming --device ...`: plugs the functions into the VM that
/// arrived and has its guest agent rescan. A function that cannot be
/// plugged is reported; the VM runs on without it.
fn plug_arrived(vm: &vmm::vm::Vm, devices: &[vmm::config::DeviceEntry]) {
    if devices.is_empty() {
        return;
    }
    for d in devices {
        match vm.devices.plug(d) {
            Ok(at) => say!("{d} plugged in at {at}"),
            Err(e) => say!("{e}; the VM runs without it"),
        }
    }
    if let Some(v) = &vm.config.vsock {
        match vmm::agent::ask(&v.socket, "rescan", vmm::agent::TIMEOUT) {
            Ok(a) => say!("guest agent: {a}"),
            Err(e) => say!("{e}"),
        }
    }
}

/// The thread that stands in for the control loop while no VM is here.
struct Waiting {
    stop: Arc<EventFd>,
    thread: std::thread::JoinHandle<(OwnedFd, Api)>,
}

impl Waiting {
    fn start(
        config: RunConfig,
        listen: String,
        signals: OwnedFd,
        api: Api,
    ) -> Result<Self, Failure> {
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .context("eventfd")
                .map_err(runtime)?,
        );
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("incoming-wait".into())
                .spawn(move || {
                    // Client requests are input: confined before the first.
                    if let Err(e) = sandbox::seccomp::confine(sandbox::ThreadKind::Control, "wait")
                    {
                        say!("{e}: stopping");
                        leave(&config, 1);
                    }
                    wait(&config, &listen, &signals, api.as_ref(), &stop);
                    (signals, api)
                })
                .context("cannot start the waiting thread")
                .map_err(runtime)?
        };
        Ok(Waiting { stop, thread })
    }

    /// Ends the wait; gives back the signals and the API for the VM's
    /// control loop.
    fn stop(self) -> Result<(OwnedFd, Api), Failure> {
        self.stop
            .write(1)
            .context("cannot stop the waiting thread")
            .map_err(runtime)?;
        self.thread
            .join()
            .map_err(|_| runtime(anyhow::anyhow!("the waiting thread panicked")))
    }
}

/// Answers the API and watches the signals until `stop` is written (or
/// the process ends here).
fn wait(config: &RunConfig, listen: &str, signals: &OwnedFd, api: Api_<'_>, stop: &EventFd) {
    let since = Instant::now();
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some((_, wake)) = api {
            fds.push(libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            if let Some(signo) = vmm::control::read_signal(signals) {
                say!(
                    "received {} while waiting for a migration on {listen}: stopping",
                    vmm::control::signal_name(signo)
                );
                leave(config, 0);
            }
        }
        if let Some((rx, wake)) = api {
            let _ = wake.read();
            while let Ok((request, reply)) = rx.try_recv() {
                let (answer, then_leave) = answer(config, listen, since, &request);
                let _ = reply.send(answer);
                if then_leave {
                    say!(
                        "shutdown requested through the API while waiting for a \
                         migration on {listen}: stopping"
                    );
                    // Give the API thread a moment to write the answer.
                    std::thread::sleep(Duration::from_millis(50));
                    leave(config, 0);
                }
            }
        }
    }
}

type Api_<'a> = Option<&'a (
    std::sync::mpsc::Receiver<vmm::api::ApiMessage>,
    Arc<EventFd>,
)>;

/// What the API answers while no VM is here, and whether to stop waiting.
fn answer(
    config: &RunConfig,
    listen: &str,
    since: Instant,
    request: &ApiRequest,
) -> (ApiResponse, bool) {
    use vmm_api::model::{State, StateReply};
    match request {
        ApiRequest::GetVm => (
            match vmm::info::incoming_info(config, listen, since) {
                Ok(info) => ApiResponse::json(200, &info),
                Err(e) => ApiResponse::error(500, e.to_string()),
            },
            false,
        ),
        ApiRequest::Metrics => {
            use vmm_api::metrics::{Kind, Page, CONTENT_TYPE};
            let mut p = Page::new();
            p.one("ffmk_up", Kind::Gauge, "1: the VMM answers", 1.0);
            p.family("ffmk_vm_state", Kind::Gauge, "1 for the VM's state")
                .sample("ffmk_vm_state", &[("state", "incoming")], 1.0);
            p.one(
                "ffmk_incoming_waiting_seconds",
                Kind::Gauge,
                "How long this VMM has waited for a migration",
                since.elapsed().as_secs_f64(),
            );
            (ApiResponse::text(p.finish(), CONTENT_TYPE), false)
        }
        ApiRequest::Shutdown => (
            ApiResponse::json(
                200,
                &StateReply {
                    state: State::ShuttingDown,
                },
            ),
            true,
        ),
        _ => (
            ApiResponse::error(
                409,
                format!(
                    "no VM here yet: this VMM waits for a migration on {listen} (state \
                     incoming); only GET /vm and shutdown are served until it arrives"
                ),
            ),
            false,
        ),
    }
}

/// Ends the process before any VM ran: the API socket goes with it.
fn leave(config: &RunConfig, code: i32) -> ! {
    if let Some(p) = &config.api_socket {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code)
}
