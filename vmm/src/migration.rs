//! Live migration, the VMM's side (the protocol and the pre-copy engine are
//! in the `migrate` crate).
//!
//! Source: `PUT /vm/migrate` starts [`Migration::start`] on its own thread
//! with the VM shared; the engine reads guest memory, fetches dirty pages
//! through the same dirty log snapshots use (pages it fetched go back to
//! the snapshot chain if the migration fails), pauses the vCPUs and freezes
//! device I/O for the last pages, and takes the machine state through the
//! one state path ([`checkpoint::machine_state`]). After the destination
//! confirmed it runs the VM, device I/O here stays frozen for good and the
//! control loop ends with [`ExitReason::Migrated`](crate::control::ExitReason).
//!
//! Destination: `ffmk-vmm run --incoming tcp://ADDR:PORT` calls
//! [`receive`]: one connection at a time, hello checked against its own
//! configuration, pages written into fresh guest memory, the VM built
//! paused from the state exactly like a snapshot restore
//! ([`checkpoint::Restoring::migrated`]), started on GO. A connection that
//! fails before that leaves nothing behind and the destination listens
//! again.
use crate::checkpoint::{self, Restoring, STATE_VERSION};
use crate::config::RunConfig;
use crate::host::{CpuProfile, HostKind};
use crate::memory::{self, GuestMemoryMmap};
use crate::vm::Vm;
use devices::virtio::Frozen;
use migrate::source::{Options, Outcome, Progress, Source};
use migrate::Hello;
use serde::{Deserialize, Serialize};
use snapshot::PageBitmap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a source whose VM moved waits for a client to read the outcome
/// before it exits.
const REPORT_GRACE: Duration = Duration::from_secs(2);

/// The hello describing a VM configured as `config`.
pub fn hello(config: &RunConfig, profile: CpuProfile) -> Hello {
    let mut devices = Vec::new();
    for d in &config.disks {
        devices.push(format!(
            "virtio-blk queues={}{}",
            d.queues.max(1),
            if d.readonly { " read-only" } else { "" }
        ));
    }
    devices.extend(config.nets.iter().map(|_| "virtio-net".to_string()));
    if config.virtio_console.is_some() {
        devices.push("virtio-console".into());
    }
    if config.vsock.is_some() {
        devices.push("virtio-vsock".into());
    }
    if config.rng {
        devices.push("virtio-rng".into());
    }
    Hello {
        state_version: STATE_VERSION,
        memory_bytes: config.memory_bytes,
        regions: crate::arch::layout::ram_regions(config.memory_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect(),
        cpus: config.cpus,
        cpu_vendor: checkpoint::host_vendor(),
        cpu_profile: format!("{profile:?}").to_lowercase(),
        devices,
    }
}

/// Body of `PUT /vm/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp://HOST:PORT` (or `HOST:PORT`).
    pub to: String,
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Throttle the vCPUs when the guest dirties faster than the link.
    #[serde(default = "yes")]
    pub throttle: bool,
}

fn default_downtime() -> u64 {
    50
}
fn default_rounds() -> u32 {
    30
}
fn yes() -> bool {
    true
}

impl MigrateRequest {
    /// The `HOST:PORT` part of `to`.
    pub fn address(&self) -> Result<String, String> {
        parse_tcp(&self.to)
    }
}

/// `tcp://HOST:PORT` or `HOST:PORT` to `HOST:PORT`.
pub fn parse_tcp(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("tcp://").unwrap_or(s);
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(format!("'{s}' is not tcp://HOST:PORT")),
    }
}

/// What `GET /vm/migration` shows.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Status {
    #[default]
    None,
    Running {
        to: String,
        progress: Option<Progress>,
    },
    Completed(Outcome),
    Failed {
        to: String,
        error: String,
        /// Whether the VM runs on here (false only when the switch-over
        /// could not be confirmed: the VM stays paused).
        vm_running_here: bool,
    },
}

/// The VM as the engine sees it.
struct VmSource<'a> {
    vm: &'a Vm,
    /// The user had paused the VM: pause/resume leave the vCPUs alone.
    user_paused: bool,
    frozen: Mutex<Option<Frozen>>,
    tracking: Mutex<Option<std::sync::MutexGuard<'a, checkpoint::Tracking>>>,
}

impl Source for VmSource<'_> {
    fn memory(&self) -> &migrate::GuestMemory {
        &self.vm.mem
    }

    fn start_tracking(&self) -> Result<(), String> {
        let mut t = self.tracking.lock().map_err(|_| "tracking lock poisoned")?;
        match t.as_mut() {
            Some(t) => t.ensure_logging(self.vm).map_err(|e| e.to_string()),
            None => Err("dirty tracking is not available".into()),
        }
    }

    fn dirty(&self) -> Result<PageBitmap, String> {
        checkpoint::fetch_dirty(self.vm).map_err(|e| e.to_string())
    }

    /// All or nothing: if device I/O cannot be frozen, the vCPUs run again.
    fn pause(&self) -> Result<(), String> {
        if !self.user_paused {
            self.vm.pause()?;
        }
        let f = match checkpoint::freeze_devices(self.vm) {
            Ok(f) => f,
            Err(e) => {
                if !self.user_paused {
                    if let Err(r) = self.vm.resume() {
                        tracing::error!("migration: cannot resume after a failed pause: {r}");
                    }
                }
                return Err(e.to_string());
            }
        };
        if let Ok(mut slot) = self.frozen.lock() {
            *slot = f;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), String> {
        if let Ok(mut slot) = self.frozen.lock() {
            slot.take();
        }
        if !self.user_paused {
            self.vm.resume()?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, String> {
        let m = checkpoint::machine_state(self.vm).map_err(|e| e.to_string())?;
        serde_json::to_vec(&m).map_err(|e| e.to_string())
    }

    fn give_back(&self, fetched: PageBitmap) {
        if let Ok(mut t) = self.tracking.lock() {
            if let Some(t) = t.as_mut() {
                t.carry_back(&fetched);
            }
        }
    }
}

/// A migration of this VM (at most one at a time).
#[derive(Default)]
pub struct Migration {
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    /// A client read the final status (the source may exit now).
    reported: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Migration {
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or(Status::None)
    }

    /// The status for `GET /vm/migration` (noting that a client saw how it
    /// ended).
    pub fn report(&self) -> Status {
        let s = self.status();
        if !matches!(s, Status::Running { .. }) {
            self.reported.store(true, Ordering::Release);
        }
        s
    }

    pub fn running(&self) -> bool {
        matches!(self.status(), Status::Running { .. })
    }

    /// The outcome once the VM has moved.
    pub fn completed(&self) -> Option<Outcome> {
        match self.status() {
            Status::Completed(o) => Some(o),
            _ => None,
        }
    }

    /// Starts migrating `vm` on a thread; `done` is signalled when it
    /// ends (the control loop then looks at [`Migration::completed`]).
    pub fn start(
        &mut self,
        vm: Arc<Vm>,
        req: &MigrateRequest,
        done: Arc<vmm_sys_util::eventfd::EventFd>,
    ) -> Result<(), String> {
        match self.status() {
            Status::Running { .. } => {
                return Err("a migration of this VM is already running".into())
            }
            Status::Completed(o) => return Err(format!("the VM has moved to {}", o.to)),
            _ => {}
        }
        let to = req.address()?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let opts = Options {
            max_downtime: Duration::from_millis(req.max_downtime_ms),
            max_rounds: req.max_rounds.max(1),
            throttle: req.throttle,
            ..Options::default()
        };
        self.cancel.store(false, Ordering::Release);
        self.reported.store(false, Ordering::Release);
        if let Ok(mut s) = self.status.lock() {
            *s = Status::Running {
                to: to.clone(),
                progress: None,
            };
        }
        let status = self.status.clone();
        let cancel = self.cancel.clone();
        let reported = self.reported.clone();
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let end = run(&vm, &to, &opts, &cancel, &status);
                let moved = matches!(end, Status::Completed(_));
                if let Ok(mut s) = status.lock() {
                    *s = end;
                }
                if moved {
                    // The source VMM exits next: give a client following
                    // the migration (`ffmk-vmm migrate`) time to read the
                    // outcome first.
                    let deadline = std::time::Instant::now() + REPORT_GRACE;
                    while !reported.load(Ordering::Acquire) && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let _ = done.write(1);
            })
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Waits for the migration thread to end.
    pub fn wait(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Asks a running migration to stop; the VM keeps running here.
    pub fn cancel(&self) -> bool {
        if !self.running() {
            return false;
        }
        self.cancel.store(true, Ordering::Release);
        true
    }
}

fn run(vm: &Vm, to: &str, opts: &Options, cancel: &AtomicBool, status: &Mutex<Status>) -> Status {
    let failed = |error: String, vm_running_here: bool| Status::Failed {
        to: to.to_string(),
        error,
        vm_running_here,
    };
    let tracking = match vm.tracking.lock() {
        Ok(t) => t,
        Err(_) => return failed("dirty tracking state poisoned".into(), true),
    };
    let source = VmSource {
        vm,
        user_paused: vm.is_paused(),
        frozen: Mutex::new(None),
        tracking: Mutex::new(Some(tracking)),
    };
    let hello = hello(&vm.config, vm.profile);
    let mut report = |p: &Progress| {
        if let Ok(mut s) = status.lock() {
            *s = Status::Running {
                to: to.to_string(),
                progress: Some(p.clone()),
            };
        }
    };
    let result = migrate::source::migrate(&source, to, &hello, opts, cancel, &mut report);
    match result {
        Ok(outcome) => {
            // The VM runs there now: nothing here may touch its disks or
            // network again.
            if let Ok(mut f) = source.frozen.lock() {
                if let Some(f) = f.take() {
                    f.keep();
                }
            }
            tracing::info!("migrated to {to}: {outcome:?}");
            Status::Completed(outcome)
        }
        Err(e @ migrate::Error::Unconfirmed(_)) => {
            if let Ok(mut f) = source.frozen.lock() {
                if let Some(f) = f.take() {
                    f.keep();
                }
            }
            failed(e.to_string(), false)
        }
        Err(e) => failed(e.to_string(), true),
    }
}

/// Failure of one incoming migration (the destination listens again).
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error(transparent)]
    Protocol(#[from] migrate::Error),
    #[error(transparent)]
    Restore(#[from] checkpoint::Error),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
}

/// Waits on `listener` for a migration that fits `config`, builds the VM
/// from it and starts it. Failed or refused attempts are reported through
/// `log` and the next connection is awaited.
pub fn receive(
    kvm: &kvm_ioctls::Kvm,
    listener: &TcpListener,
    config: &RunConfig,
    log: &mut dyn FnMut(String),
) -> Result<(Vm, migrate::dest::Received), std::io::Error> {
    let profile = config
        .cpu_profile
        .unwrap_or(HostKind::detect().default_profile());
    let mine = hello(config, profile);
    loop {
        let (stream, peer) = listener.accept()?;
        match receive_one(kvm, stream, config, &mine) {
            Ok(r) => return Ok(r),
            Err(e) => log(format!(
                "migration from {peer} failed: {e}; waiting for another"
            )),
        }
    }
}

fn receive_one(
    kvm: &kvm_ioctls::Kvm,
    stream: std::net::TcpStream,
    config: &RunConfig,
    mine: &Hello,
) -> Result<(Vm, migrate::dest::Received), IncomingError> {
    let mut inc = migrate::dest::Incoming::new(stream, Duration::from_secs(30))?;
    inc.hello(mine)?;
    let mem: GuestMemoryMmap = memory::create(config.memory_bytes, config.hugepages)
        .map_err(|e| IncomingError::Memory(e.to_string()))?;
    let state = inc.memory(&mem)?;
    let from = inc.peer.to_string();
    let restoring = match Restoring::migrated(&from, &state, mem, config) {
        Ok(r) => r,
        Err(e) => {
            inc.abort(&e.to_string());
            return Err(e.into());
        }
    };
    // The machine's own settings come with it; devices, console and API
    // socket are this host's.
    let mut config = config.clone();
    let m = &restoring.machine.config;
    config.kernel = m.kernel.clone();
    config.cmdline = m.cmdline.clone();
    config.test_exit_port = m.test_exit_port;
    let vm = match Vm::create(kvm, config, Some(&restoring)) {
        Ok(vm) => vm,
        Err(e) => {
            inc.abort(&format!("the destination cannot build the VM: {e}"));
            return Err(e.into());
        }
    };
    drop(restoring);
    let received = inc.switch_over(|| vm.resume())?;
    Ok((vm, received))
}
