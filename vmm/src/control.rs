//! The control thread: one event-manager loop that waits for the VM to stop
//! (device or vCPU events), for SIGINT/SIGTERM, for API requests and for
//! console input, and turns all of them into one [`ExitReason`].
use crate::api::{ApiMessage, ApiRequest, ApiResponse};
use crate::vm::Vm;
use devices::pci::Location;
use devices::VmEvent;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use vmm_api::model::{self, State, StateReply};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// `{"state": s}`.
fn state(s: State) -> StateReply {
    StateReply { state: s }
}

use crate::vcpu::VcpuStop;

/// How a VM ended, and what `ffmk-vmm` exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    TestExit(u8),
    ApiShutdown,
    Signal(i32),
    TripleFault {
        vcpu: u8,
    },
    GuestCrash {
        vcpu: u8,
        detail: String,
    },
    /// The VM moved to another host and runs there.
    Migrated {
        to: String,
        downtime_us: u64,
    },
}

/// Exit code for a guest crash (triple fault, KVM internal error).
pub const EXIT_GUEST_CRASH: i32 = 3;

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::TestExit(s) => i32::from(*s),
            ExitReason::TripleFault { .. } | ExitReason::GuestCrash { .. } => EXIT_GUEST_CRASH,
            _ => 0,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::Reset => "guest requested a reset".into(),
            ExitReason::TestExit(s) => format!("guest wrote exit status {s} to the test exit port"),
            ExitReason::ApiShutdown => "shutdown requested through the API".into(),
            ExitReason::Signal(s) => format!("received {}", signal_name(*s)),
            ExitReason::TripleFault { vcpu } => {
                format!("guest triple fault on vCPU {vcpu} (KVM_EXIT_SHUTDOWN)")
            }
            ExitReason::GuestCrash { vcpu, detail } => format!("vCPU {vcpu} stopped: {detail}"),
            ExitReason::Migrated { to, downtime_us } => format!(
                "migrated to {to} (downtime {:.1} ms)",
                *downtime_us as f64 / 1e3
            ),
        }
    }
}

/// `SIGINT` or `SIGTERM` (the signals [`signal_fd`] receives).
pub fn signal_name(signo: i32) -> &'static str {
    if signo == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

/// The number of the next signal waiting on a [`signal_fd`], if any.
pub fn read_signal(signals: &OwnedFd) -> Option<i32> {
    let mut info = [0u8; 128]; // struct signalfd_siginfo
                               // SAFETY: reads at most 128 bytes into a 128-byte buffer from our signalfd.
    let n = unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    (n == 128).then(|| i32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
}

/// Blocks SIGINT/SIGTERM in this thread (and every thread started after) and
/// returns a signalfd that receives them.
pub fn signal_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset/sigaddset
    // before use; pthread_sigmask and signalfd only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// How long a guest has to power a hot-plug slot off after its attention
/// button (Linux's pciehp takes 5 s, then unbinds the driver).
const EJECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

const EV_EXIT: u32 = 1;
const EV_SIGNAL: u32 = 2;
const EV_API: u32 = 3;
const EV_STDIN: u32 = 4;

struct Control {
    migration: crate::migration::Migration,
    vm: Arc<Vm>,
    signals: OwnedFd,
    api: Option<(Receiver<ApiMessage>, Arc<EventFd>)>,
    stdin: bool,
    done: Arc<Mutex<Option<ExitReason>>>,
    /// Passthrough functions unplugged for the running migration: plugged
    /// back if it does not complete.
    unplugged_for_migration: Vec<crate::config::DeviceEntry>,
    /// For `GET /metrics`.
    snapshots: crate::metrics::Snapshots,
}

impl Control {
    fn finish(&self, r: ExitReason) {
        if let Ok(mut d) = self.done.lock() {
            d.get_or_insert(r);
        }
    }

    fn on_exit_event(&mut self) {
        let _ = self.vm.exit_evt.read();
        if let Some(o) = self.migration.completed() {
            self.finish(ExitReason::Migrated {
                to: o.to,
                downtime_us: (o.downtime_ms * 1e3) as u64,
            });
            return;
        }
        if !self.migration.running() && !self.unplugged_for_migration.is_empty() {
            // The migration ended here: the VM keeps its devices.
            let specs = std::mem::take(&mut self.unplugged_for_migration);
            self.replug(&specs);
        }
        if let Some(e) = self.vm.devices.events().take() {
            self.finish(match e {
                VmEvent::Reset => ExitReason::Reset,
                VmEvent::PowerOff => ExitReason::PowerOff,
                VmEvent::TestExit(s) => ExitReason::TestExit(s),
            });
        }
        let stop = self
            .vm
            .vcpus
            .stop_slot()
            .lock()
            .ok()
            .and_then(|mut s| s.take());
        if let Some((vcpu, reason)) = stop {
            self.finish(match reason {
                VcpuStop::TripleFault => ExitReason::TripleFault { vcpu },
                VcpuStop::SystemEvent(kind) if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    ExitReason::Reset
                }
                VcpuStop::SystemEvent(_) => ExitReason::PowerOff,
                VcpuStop::Failure(detail) => ExitReason::GuestCrash { vcpu, detail },
            });
        }
    }

    fn on_signal(&mut self) {
        if let Some(signo) = read_signal(&self.signals) {
            self.finish(ExitReason::Signal(signo));
        }
    }

    fn on_api(&mut self) {
        let Some((rx, evt)) = &self.api else { return };
        let _ = evt.read();
        let msgs: Vec<ApiMessage> = rx.try_iter().collect();
        for (req, reply) in msgs {
            let resp = self.handle(req);
            let _ = reply.send(resp);
        }
    }

    fn resume(&self) -> Result<(), String> {
        // After a switch-over that was not confirmed or a failed post-copy,
        // the operator decided the VM runs here: device I/O thaws too.
        self.migration.release_hold();
        self.vm.resume().map_err(|e| e.to_string())
    }

    /// Before an unplug (unless `force`), the guest lets go of the
    /// function: a VM with a vsock device asks its guest agent; a function
    /// in a hot-plug slot of a VM without one (or whose agent does not
    /// answer) is ejected through the slot (the guest's PCIe hot-plug
    /// driver powers it off). An agent's refusal stands. A refusal or no answer
    /// keeps the function where it is. A function on bus 0 of a VM without
    /// vsock has no one to ask: its guest must cope with it going (the
    /// probe polls).
    fn release(&self, at: Location, force: bool) -> Result<(), ApiResponse> {
        let attached = self
            .vm
            .devices
            .passthrough()
            .is_some_and(|p| p.attached.iter().any(|a| a.at == at));
        if force || !attached {
            return Ok(());
        }
        let refused = |e: String| {
            ApiResponse::error(
                409,
                format!("{at} stays attached: {e} (DELETE with ?force=1 removes it anyway)"),
            )
        };
        let in_slot = at.bus != 0;
        let agent = self.vm.config.vsock.as_ref().map(|v| {
            crate::agent::ask(
                &v.socket,
                &format!("detach 0000:{at}"),
                crate::agent::TIMEOUT,
            )
        });
        match agent {
            Some(Ok(_)) => Ok(()),
            Some(Err(e @ crate::agent::Error::NoAgent(_))) if in_slot => self
                .vm
                .devices
                .eject(at, EJECT_TIMEOUT)
                .map_err(|x| refused(format!("{e}; {x}"))),
            Some(Err(e)) => Err(refused(e.to_string())),
            None if in_slot => self
                .vm
                .devices
                .eject(at, EJECT_TIMEOUT)
                .map_err(|e| refused(e.to_string())),
            None => Ok(()),
        }
    }

    /// Plugs `specs` back (after a migration that did not happen) and has
    /// the guest agent rescan; failures are logged, the VM runs on.
    fn replug(&self, specs: &[crate::config::DeviceEntry]) {
        if specs.is_empty() {
            return;
        }
        for spec in specs {
            match self.vm.devices.plug(spec) {
                Ok(at) => tracing::warn!("{spec} plugged back at {at}"),
                Err(e) => tracing::error!("{e}; the VM runs without it"),
            }
        }
        if let Some(v) = &self.vm.config.vsock {
            if let Err(e) = crate::agent::ask(&v.socket, "rescan", crate::agent::TIMEOUT) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Before a migration (or a snapshot that asked for it): every
    /// passthrough function leaves, each after the guest let go of it
    /// ([`Control::release`]: the agent, or the hot-plug slot's eject). A
    /// function on bus 0 of a VM without vsock cannot be asked for; if the
    /// guest refuses one, those already unplugged come back and the
    /// migration is refused.
    ///
    /// Functions whose device state travels with the VM (VFIO migration)
    /// stay, unless `all` (a snapshot that asked for `detach_devices`).
    fn unplug_for_migration(
        &self,
        all: bool,
    ) -> Result<Vec<crate::config::DeviceEntry>, ApiResponse> {
        let slots: Vec<Location> = self
            .vm
            .devices
            .passthrough()
            .map(|p| {
                let travelling: Vec<u8> = if all {
                    Vec::new()
                } else {
                    p.travelling().into_iter().map(|(slot, _)| slot).collect()
                };
                p.attached
                    .iter()
                    .map(|a| a.at)
                    .filter(|at| !(at.bus == 0 && travelling.contains(&at.slot)))
                    .collect()
            })
            .unwrap_or_default();
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        if self.vm.config.vsock.is_none() && slots.iter().any(|at| at.bus == 0) {
            return Err(ApiResponse::error(
                409,
                format!(
                    "the VM has passthrough devices ({}) whose state lives in the hardware, \
                     on bus 0 (no hot-plug slot) and no vsock device to ask its guest to let go \
                     of them; detach them first (DELETE /vm/devices/BDF); the VM keeps running",
                    self.vm.devices.passthrough_specs().join(", ")
                ),
            ));
        }
        let mut done = Vec::new();
        for slot in slots {
            let released = self.release(slot, false);
            match released.map(|()| self.vm.devices.unplug(slot)) {
                Ok(Some(spec)) => done.push(spec),
                Ok(None) => {}
                Err(r) => {
                    self.replug(&done);
                    return Err(r);
                }
            }
        }
        Ok(done)
    }

    /// Why the passthrough functions' state cannot be saved with the VM
    /// (None: there are none, or all support VFIO migration).
    fn passthrough_state_stays(&self) -> Option<String> {
        self.vm.devices.passthrough()?.why_state_stays()
    }

    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        // While migrating, and once the VM has moved (the source lingers a
        // moment), nothing may pause, resume or change it here.
        let migrating = self.migration.running() || self.migration.completed().is_some();
        match req {
            ApiRequest::MigrationStatus => {
                ApiResponse::json(200, &self.migration.report())
            }
            ApiRequest::MigrationCancel => match self.migration.cancel() {
                Ok(()) => ApiResponse::json(200, &state(State::Cancelling)),
                Err(why) => ApiResponse::error(409, why),
            },
            ApiRequest::Migrate(_) | ApiRequest::Snapshot(_)
                if self.vm.ram.arriving().load(std::sync::atomic::Ordering::Acquire) =>
            {
                ApiResponse::error(
                    409,
                    "part of the VM's memory is still arriving (post-copy); try again when it is all here",
                )
            }
            ApiRequest::Snapshot(ref r)
                if !r.detach_devices && self.passthrough_state_stays().is_some() =>
            {
                ApiResponse::error(
                    409,
                    format!(
                        "the VM has passthrough devices ({}) whose state lives in the hardware \
                         and cannot be saved ({}); detach them first (DELETE /vm/devices/BDF), or \
                         ask for detach_devices; the VM keeps running",
                        self.vm.devices.passthrough_specs().join(", "),
                        self.passthrough_state_stays().unwrap_or_default()
                    ),
                )
            }
            ApiRequest::Migrate(r) => {
                let to = crate::migration::parse_tcp(&r.to)
                    .map_err(|e| e.to_string())
                    .and_then(|to| {
                    self.vm
                        .config
                        .access
                        .check_migration_target(&to)
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = to {
                    return ApiResponse::error(403, e);
                }
                if self.migration.running() {
                    return ApiResponse::error(409, "a migration of this VM is already running");
                }
                // Without a cluster key nothing leaves (nor do its devices).
                if let Err(e) = self.migration.trust() {
                    return ApiResponse::error(409, e);
                }
                // Passthrough functions whose state cannot come along leave
                // first (with the guest's consent) and come back if the
                // migration does not complete; those with VFIO migration
                // stay and their device state travels.
                let unplugged = match self.unplug_for_migration(false) {
                    Ok(u) => u,
                    Err(r) => return r,
                };
                match self
                    .migration
                    .start(self.vm.clone(), &r, self.vm.exit_evt.clone())
                {
                    Ok(()) => {
                        self.unplugged_for_migration = unplugged.clone();
                        ApiResponse::json(
                            202,
                            &model::MigrateStarted {
                                state: "running".into(),
                                to: r.to,
                                unplugged: unplugged.iter().map(|d| d.to_string()).collect(),
                            },
                        )
                    }
                    Err(e) => {
                        self.replug(&unplugged);
                        ApiResponse::error(409, e)
                    }
                }
            }
            ApiRequest::Pause
            | ApiRequest::Resume
            | ApiRequest::Announce
            | ApiRequest::ResizeDisk { .. }
            | ApiRequest::Snapshot(_)
            | ApiRequest::AddDevice(_)
            | ApiRequest::RemoveDevice { .. }
                if migrating =>
            {
                ApiResponse::error(409, "a migration of this VM is in progress or done")
            }
            ApiRequest::Metrics => ApiResponse::text(
                crate::metrics::page(&self.vm, &self.migration.status(), &self.snapshots),
                vmm_api::metrics::CONTENT_TYPE,
            ),
            ApiRequest::GetVm => match crate::info::vm_info(&self.vm) {
                Ok(info) => ApiResponse::json(200, &info),
                Err(e) => ApiResponse::error(500, format!("cannot describe the VM: {e}")),
            },
            ApiRequest::AddDevice(spec)
                if !self.vm.config.hotplug_allow.is_empty()
                    && !self.vm.config.hotplug_allow.iter().any(|a| a.key() == spec.key()) =>
            {
                ApiResponse::error(
                    403,
                    format!(
                        "{spec} is refused: this VMM may hot-plug only {}",
                        self.vm
                            .config
                            .hotplug_allow
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
            ApiRequest::AddDevice(spec) => match self.vm.devices.plug(&spec) {
                Ok(at) => {
                    // A guest agent, where there is one, looks for it now.
                    let guest = self.vm.config.vsock.as_ref().map(|v| {
                        match crate::agent::ask(&v.socket, "rescan", crate::agent::TIMEOUT) {
                            Ok(a) => a,
                            Err(e) => e.to_string(),
                        }
                    });
                    ApiResponse::json(
                        200,
                        &model::Plugged {
                            device: crate::passthrough::device_state(&spec, at, true),
                            guest,
                        },
                    )
                }
                // The request was well-formed; the host's state (no such
                // device, wrong driver, a server that fails) refused it.
                Err(e) => ApiResponse::error(if e.user { 409 } else { 500 }, e.to_string()),
            },
            ApiRequest::RemoveDevice { at, force } => match self.release(at, force) {
                Err(r) => r,
                Ok(()) => match self.vm.devices.unplug(at) {
                    Some(spec) => ApiResponse::json(
                        200,
                        &crate::passthrough::device_state(&spec, at, false),
                    ),
                    None => ApiResponse::error(404, format!("no passthrough device at {at}")),
                },
            },
            ApiRequest::Vcpus => match crate::info::vcpus_info(&self.vm) {
                Ok(info) => ApiResponse::json(200, &info),
                Err(e) => ApiResponse::error(500, format!("cannot describe the vCPUs: {e}")),
            },
            ApiRequest::Interrupts => ApiResponse::json(200, &self.vm.devices.routing().describe()),
            ApiRequest::Announce => {
                let macs: Vec<String> = self
                    .vm
                    .config
                    .nets
                    .iter()
                    .filter(|n| n.announce)
                    .map(|n| devices::virtio::net::format_mac(&n.mac))
                    .collect();
                if macs.is_empty() {
                    let why = if self.vm.config.nets.is_empty() {
                        "the VM has no network device"
                    } else {
                        "every network device of the VM has announce=off"
                    };
                    return ApiResponse::error(409, format!("nothing to announce: {why}"));
                }
                self.vm.devices.announce();
                ApiResponse::json(
                    200,
                    &model::Announced {
                        macs,
                        rounds: devices::virtio::net::announce::ROUNDS.len() as u32,
                    },
                )
            }
            ApiRequest::Pause if self.vm.is_paused() => {
                ApiResponse::error(409, "the VM is already paused")
            }
            ApiRequest::Pause => match self.vm.pause() {
                Ok(()) => ApiResponse::json(200, &state(State::Paused)),
                Err(e) => ApiResponse::error(500, e.to_string()),
            },
            ApiRequest::Resume if !self.vm.is_paused() => {
                ApiResponse::error(409, "the VM is not paused")
            }
            ApiRequest::Resume => match self.resume() {
                Ok(()) => ApiResponse::json(200, &state(State::Running)),
                Err(e) => ApiResponse::error(500, e),
            },
            ApiRequest::ResizeDisk { index, bytes } => match self.vm.devices.resize_disk(index, bytes) {
                Ok(()) => ApiResponse::json(
                    200,
                    &model::Resized {
                        disk: index,
                        size_bytes: bytes,
                    },
                ),
                Err(e @ crate::vm::ResizeFailure::NoSuchDisk(..)) => {
                    ApiResponse::error(404, e.to_string())
                }
                Err(e) => ApiResponse::error(409, format!("disk {index}: {e}")),
            },
            ApiRequest::Snapshot(r) => {
                if let Err(e) = self.vm.config.access.check_snapshot_dest(&r.dest) {
                    return ApiResponse::error(403, e.to_string());
                }
                // Passthrough functions (with detach_devices) leave for the
                // snapshot and come back after it, whatever its outcome.
                let unplugged = match self.unplug_for_migration(r.detach_devices) {
                    Ok(u) => u,
                    Err(resp) => return resp,
                };
                let taken = crate::capture::take(&self.vm, &r);
                // Functions whose device state was saved run again.
                self.vm.devices.end_passthrough_saves();
                self.replug(&unplugged);
                match taken {
                    Ok(mut summary) => {
                        summary.unplugged = unplugged.iter().map(|d| d.to_string()).collect();
                        self.snapshots.taken += 1;
                        self.snapshots.last = Some(summary.clone());
                        ApiResponse::json(200, &summary)
                    }
                    Err(e) => {
                        self.snapshots.failed += 1;
                        ApiResponse::error(e.http_status(), e.to_string())
                    }
                }
            }
            ApiRequest::Shutdown => {
                self.finish(ExitReason::ApiShutdown);
                ApiResponse::json(200, &state(State::ShuttingDown))
            }
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a local buffer of the given length from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let _ = ops.remove(Events::with_data_raw(0, EV_STDIN, EventSet::IN));
            self.stdin = false;
            return;
        }
        if let Ok(mut s) = self.vm.devices.serial().lock() {
            s.enqueue_input(&buf[..n as usize]);
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: RawFd, data: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.vm.exit_evt.as_raw_fd(), EV_EXIT);
        add(self.signals.as_raw_fd(), EV_SIGNAL);
        if let Some((_, evt)) = &self.api {
            add(evt.as_raw_fd(), EV_API);
        }
        if self.stdin {
            add(0, EV_STDIN);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_EXIT => self.on_exit_event(),
            EV_SIGNAL => self.on_signal(),
            EV_API => self.on_api(),
            EV_STDIN => self.on_stdin(ops),
            _ => {}
        }
    }
}

/// Runs the control loop until the VM ends, then stops the vCPUs.
pub fn run(
    vm: Arc<Vm>,
    signals: OwnedFd,
    api: Option<(Receiver<ApiMessage>, Arc<EventFd>)>,
    trust: Result<cluster_auth::Trust, String>,
) -> Result<ExitReason, event_manager::Error> {
    let stdin = vm.config.console == crate::config::Console::Stdio && stdin_is_readable();
    let done = Arc::new(Mutex::new(None));
    let control = Arc::new(Mutex::new(Control {
        migration: crate::migration::Migration::new(trust),
        vm,
        signals,
        api,
        stdin,
        done: done.clone(),
        unplugged_for_migration: Vec::new(),
        snapshots: Default::default(),
    }));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
    em.add_subscriber(control.clone());
    loop {
        em.run()?;
        if let Some(r) = done.lock().ok().and_then(|d| d.clone()) {
            if let Ok(mut c) = control.lock() {
                // A migration still running ends first (the VM stays here).
                // One in post-copy cannot be cancelled: it is waited for,
                // the destination needs the pages still here.
                let _ = c.migration.cancel();
                c.migration.wait();
                c.vm.stop();
            }
            return Ok(r);
        }
    }
}

/// Console input is read only from a terminal or a pipe, never from /dev/null.
fn stdin_is_readable() -> bool {
    // SAFETY: fstat on fd 0 into a zeroed stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(0, &mut st) == 0
            && (st.st_mode & libc::S_IFMT == libc::S_IFIFO || libc::isatty(0) == 1)
    }
}
