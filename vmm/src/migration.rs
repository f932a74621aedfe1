//! Live migration, the VMM's side (the protocol and the pre-copy engine are
//! in the `migrate` crate).
//!
//! Source: `PUT /vm/migrate` starts [`Migration::start`] on its own thread
//! with the VM shared; the engine reads guest memory, fetches dirty pages
//! through the same dirty log snapshots use (pages it fetched go back to
//! the snapshot chain if the migration fails), pauses the vCPUs and freezes
//! device I/O for the last pages, and takes the machine state through the
//! one state path ([`capture::machine_state`]). After the destination
//! confirmed it runs the VM, device I/O here stays frozen for good and the
//! control loop ends with [`ExitReason::Migrated`](crate::control::ExitReason).
//!
//! Destination: `ffmk-vmm run --incoming tcp://ADDR:PORT` calls
//! [`receive`]: one connection at a time, hello checked against its own
//! configuration, pages written into fresh guest memory, the VM built
//! paused from the state exactly like a snapshot restore
//! ([`machine::Restoring::migrated`]), started on GO. A connection that
//! fails before that leaves nothing behind and the destination listens
//! again.
use crate::capture;
use crate::config::RunConfig;
use crate::host::{CpuProfile, HostKind};
use crate::machine::{self, Restoring, STATE_VERSION};
use crate::memory::{self, GuestMemoryMmap};
use crate::vm::Vm;
use devices::virtio::Frozen;
use migrate::dest::Arrival;
use migrate::postcopy::Postcopy;
use migrate::source::{Options, Outcome, Progress, Source};
use migrate::Hello;
use migrate::VmError;

use snapshot::PageBitmap;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a source whose VM moved waits for a client to read the outcome
/// before it exits (a client that follows the migration reads it within
/// its poll interval, 100-200 ms, and the source exits then; 2 s was too
/// short for `ffmk-vmm migrate` on a host whose cores a nested lab kept
/// busy: "the source VMM ended before reporting the outcome").
const REPORT_GRACE: Duration = Duration::from_secs(10);

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
    // Hot-plug root ports are part of the bus the state is loaded into.
    devices.extend((1..=config.hotplug_slots).map(|n| format!("pcie-root-port slot={n}")));
    Hello {
        state_version: STATE_VERSION,
        memory_bytes: config.memory_bytes,
        regions: crate::arch::layout::ram_regions(config.memory_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect(),
        cpus: config.cpus,
        cpu_vendor: crate::host::host_vendor(),
        cpu_profile: format!("{profile:?}").to_lowercase(),
        devices,
        postcopy: false,
        verify: false,
        layout: guest_layout(config),
        streams: 1,
        passthrough: Vec::new(),
    }
}

/// What the guest sees of its topology and NUMA nodes, for the hello
/// (empty when it has neither, as from a VMM without them).
fn guest_layout(config: &RunConfig) -> String {
    let flat = numa::CpuShape::flat(u32::from(config.cpus));
    let mut parts = Vec::new();
    if config.shape != flat {
        parts.push(format!("--topology {}", config.shape));
    }
    if let Some(l) = &config.numa {
        parts.push(format!("numa {}", l.guest_view()));
    }
    parts.join(" ")
}

pub use vmm_api::model::{parse_tcp, MigrateRequest};

/// What `GET /vm/migration` shows.
pub use vmm_api::migration::MigrationStatus as Status;

/// The VM as the engine sees it.
struct VmSource<'a> {
    vm: &'a Vm,
    /// The user had paused the VM: pause/resume leave the vCPUs alone.
    user_paused: bool,
    frozen: Mutex<Option<Frozen>>,
    /// The VM's dirty tracker, held for the whole migration.
    dirty: Mutex<memory::dirty::Session<'a>>,
    /// Paused for the switch-over, passthrough devices stopped: the next
    /// dirty-page fetch is the last.
    stopped: std::sync::atomic::AtomicBool,
}

impl<'a> VmSource<'a> {
    fn tracker(&self) -> Result<std::sync::MutexGuard<'_, memory::dirty::Session<'a>>, VmError> {
        self.dirty
            .lock()
            .map_err(|_| memory::dirty::Error::Poisoned.into())
    }
}

impl Source for VmSource<'_> {
    fn memory(&self) -> &migrate::GuestMemory {
        self.vm.ram.guest()
    }

    fn start_tracking(&self) -> Result<(), VmError> {
        self.tracker()?.start()?;
        // Passthrough devices whose state travels start saving it now
        // (PRE_COPY, while the guest runs), and what they write by DMA is
        // tracked from here.
        if let Some(mut p) = self.vm.devices.passthrough() {
            p.begin_saves()?;
            p.start_dma_tracking(self.vm.ram.guest())?;
        }
        Ok(())
    }

    fn dirty(&self) -> Result<PageBitmap, VmError> {
        let mut pages = self.tracker()?.fetch()?;
        if let Some(mut p) = self.vm.devices.passthrough() {
            let stopped = self.stopped.load(std::sync::atomic::Ordering::Acquire);
            p.add_dma_dirty(self.vm.ram.guest(), &mut pages, stopped)?;
        }
        Ok(pages)
    }

    /// All or nothing: if device I/O cannot be frozen, or a passthrough
    /// device cannot stop, the vCPUs and devices run again.
    fn pause(&self) -> Result<(), VmError> {
        if !self.user_paused {
            self.vm.pause()?;
        }
        let undo = |e: VmError| {
            self.vm.devices.end_passthrough_saves();
            if !self.user_paused {
                if let Err(r) = self.vm.resume() {
                    tracing::error!("migration: cannot resume after a failed pause: {r}");
                }
            }
            Err(e)
        };
        let f = match capture::freeze_devices(self.vm) {
            Ok(f) => f,
            Err(e) => return undo(e.into()),
        };
        // Passthrough devices stop (STOP_COPY) before the last look at the
        // dirty pages, so that it sees everything they wrote.
        if let Some(p) = self.vm.devices.passthrough() {
            if let Err(e) = p.stop_saves() {
                drop(p);
                drop(f);
                return undo(e.into());
            }
        }
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut slot) = self.frozen.lock() {
            *slot = f;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        // The VM runs on here: so do its passthrough devices.
        self.stopped
            .store(false, std::sync::atomic::Ordering::Release);
        self.vm.devices.end_passthrough_saves();
        if let Ok(mut slot) = self.frozen.lock() {
            slot.take();
        }
        if !self.user_paused {
            self.vm.resume()?;
        }
        Ok(())
    }

    /// The throttle stops the vCPUs only: devices go on (and passthrough
    /// devices stay in PRE_COPY).
    fn throttle_pause(&self) -> Result<(), VmError> {
        if !self.user_paused {
            self.vm.pause()?;
        }
        Ok(())
    }

    fn throttle_resume(&self) -> Result<(), VmError> {
        if !self.user_paused {
            self.vm.resume()?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, VmError> {
        let m = capture::machine_state(self.vm)?;
        Ok(serde_json::to_vec(&m)?)
    }

    fn device_data(&self) -> Result<Vec<(u8, Vec<u8>)>, VmError> {
        match self.vm.devices.passthrough() {
            Some(p) => Ok(p.take_precopy()?),
            None => Ok(Vec::new()),
        }
    }

    fn device_bytes(&self) -> u64 {
        self.vm
            .devices
            .passthrough()
            .map_or(0, |p| p.pending_save_bytes())
    }
}

/// The hello's `passthrough` entries: `SLOT=vvvv:dddd` (slot in hex).
fn passthrough_hello(travelling: &[(u8, String)]) -> Vec<String> {
    travelling
        .iter()
        .map(|(slot, ids)| format!("{slot:02x}={ids}"))
        .collect()
}

/// The source's `passthrough` entries back: (slot, vendor:device).
fn passthrough_slots(entries: &[String]) -> Result<Vec<(u8, String)>, String> {
    entries
        .iter()
        .map(|e| {
            e.split_once('=')
                .and_then(|(s, ids)| Some((u8::from_str_radix(s, 16).ok()?, ids.to_string())))
                .filter(|(s, _)| *s < devices::pci::root::SLOTS)
                .ok_or_else(|| format!("a bad passthrough entry in the hello: '{e}'"))
        })
        .collect()
}

/// A migration of this VM (at most one at a time).
#[derive(Default)]
pub struct Migration {
    status: Arc<Mutex<Status>>,
    cancel: Arc<AtomicBool>,
    /// A client read the final status (the source may exit now).
    reported: Arc<AtomicBool>,
    /// Device I/O stays frozen while the VM may run elsewhere (switch-over
    /// unconfirmed, post-copy failed); resuming here through the API
    /// thaws it.
    held: Arc<Mutex<Option<Frozen>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How this VMM authenticates to destinations (or why it cannot: no
    /// cluster key was found when it started).
    trust: Option<Result<cluster_auth::Trust, String>>,
}

impl Migration {
    /// Migrations of this VM authenticate with `trust`; an `Err` is why
    /// they cannot (given back to every migration request).
    pub fn new(trust: Result<cluster_auth::Trust, String>) -> Migration {
        Migration {
            trust: Some(trust),
            ..Migration::default()
        }
    }

    /// How a migration of this VM would authenticate, or why it cannot.
    pub fn trust(&self) -> Result<cluster_auth::Trust, String> {
        match &self.trust {
            Some(Ok(t)) => Ok(t.clone()),
            Some(Err(e)) => Err(format!("cannot migrate: {e}")),
            None => Err("cannot migrate: no cluster key was configured".into()),
        }
    }

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
        let to = req.address().map_err(|e| e.to_string())?;
        let trust = self.trust()?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let opts = Options {
            max_downtime: Duration::from_millis(req.max_downtime_ms),
            max_rounds: req.max_rounds.max(1),
            throttle: req.throttle,
            postcopy: req.postcopy,
            verify: req.verify,
            streams: req.streams,
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
        let held = self.held.clone();
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                if let Err(e) = sandbox::seccomp::confine(sandbox::ThreadKind::Migration, "migrate")
                {
                    if let Ok(mut s) = status.lock() {
                        *s = Status::Failed {
                            to: to.to_string(),
                            error: e.to_string(),
                            vm_running_here: true,
                        };
                    }
                    return;
                }
                let end = run(&vm, &to, &trust, &opts, &cancel, &status, &held);
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

    /// Before resuming a VM whose migration ended unconfirmed or failed in
    /// post-copy (the operator decided it runs here): thaws device I/O.
    pub fn release_hold(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.take();
        }
    }

    /// Asks a running migration to stop; the VM keeps running here. A
    /// migration in post-copy cannot stop: the VM runs on the destination.
    pub fn cancel(&self) -> Result<(), &'static str> {
        match self.status() {
            Status::Running {
                progress: Some(p), ..
            } if p.phase == migrate::source::Phase::Postcopy => {
                Err("the migration is in post-copy: the VM runs on the destination and its memory follows; it cannot be cancelled")
            }
            Status::Running { .. } => {
                self.cancel.store(true, Ordering::Release);
                Ok(())
            }
            _ => Err("no migration is running"),
        }
    }
}

fn run(
    vm: &Vm,
    to: &str,
    trust: &cluster_auth::Trust,
    opts: &Options,
    cancel: &AtomicBool,
    status: &Mutex<Status>,
    held: &Mutex<Option<Frozen>>,
) -> Status {
    let failed = |error: String, vm_running_here: bool| Status::Failed {
        to: to.to_string(),
        error,
        vm_running_here,
    };
    // Pages fetched by a migration that does not complete go back to the
    // tracker (the session is dropped uncommitted) for later snapshots.
    let dirty = match vm.ram.dirty_session() {
        Ok(d) => d,
        Err(e) => return failed(e.to_string(), true),
    };
    let source = VmSource {
        vm,
        user_paused: vm.is_paused(),
        frozen: Mutex::new(None),
        dirty: Mutex::new(dirty),
        stopped: std::sync::atomic::AtomicBool::new(false),
    };
    let mut hello = hello(&vm.config, vm.platform.profile);
    hello.postcopy = opts.postcopy;
    hello.passthrough = vm
        .devices
        .passthrough()
        .map(|p| passthrough_hello(&p.travelling()))
        .unwrap_or_default();
    let mut report = |p: &Progress| {
        if let Ok(mut s) = status.lock() {
            *s = Status::Running {
                to: to.to_string(),
                progress: Some(p.clone()),
            };
        }
    };
    let result = migrate::source::migrate(&source, to, trust, &hello, opts, cancel, &mut report);
    if let Err(e) = &result {
        // Whether or not the VM was paused: passthrough devices whose save
        // began run on here, and a later attempt starts their save anew -
        // unless the VM may be running on the destination already.
        if !matches!(
            e,
            migrate::Error::Unconfirmed(_) | migrate::Error::Postcopy { .. }
        ) {
            vm.devices.end_passthrough_saves();
        }
    }
    match result {
        Ok(outcome) => {
            // The VM runs there now: nothing here may touch its disks or
            // network again.
            if let Ok(mut f) = source.frozen.lock() {
                if let Some(f) = f.take() {
                    f.keep();
                }
            }
            if let Ok(d) = source.dirty.into_inner() {
                d.commit();
            }
            tracing::info!("migrated to {to}: {outcome:?}");
            if let Some(why) = outcome.missed_target() {
                tracing::warn!("migration to {to}: {why}");
            }
            Status::Completed(outcome)
        }
        Err(e @ (migrate::Error::Unconfirmed(_) | migrate::Error::Postcopy { .. })) => {
            let frozen = source.frozen.lock().ok().and_then(|mut f| f.take());
            if let Ok(mut h) = held.lock() {
                *h = frozen;
            }
            tracing::error!("migration to {to}: {e}");
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
    Restore(#[from] machine::Error),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
}

/// A VM that arrived: running, with its post-copy still going if the
/// source switched to post-copy.
pub struct Arrived {
    pub vm: Vm,
    pub received: migrate::dest::Received,
    pub postcopy: Option<Postcopy>,
    /// How many of the passthrough functions given to [`receive`] took
    /// the state of the source's (the first ones); the rest are this
    /// host's to plug.
    pub devices_used: usize,
}

/// Waits on `listener` for a migration that fits `config`, builds the VM
/// from it and starts it. Failed or refused attempts are reported through
/// `log` and the next connection is awaited.
pub fn receive(
    kvm: &kvm_ioctls::Kvm,
    listener: &TcpListener,
    config: &RunConfig,
    devices: &[crate::config::DeviceEntry],
    trust: &cluster_auth::Trust,
    deadline: Duration,
    log: &mut dyn FnMut(String),
) -> Result<Arrived, std::io::Error> {
    let profile = config
        .cpu_profile
        .unwrap_or(HostKind::detect().default_profile());
    let mine = hello(config, profile);
    // Handshakes run on threads of their own (at most MAX_HANDSHAKES at
    // once), so a peer that connects and says nothing delays nobody; only
    // a peer holding the cluster key gets a word out of this host.
    let (tx, mut rx) = std::sync::mpsc::channel::<Accepted>();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let listener = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let (trust, stop) = (trust.clone(), stop.clone());
        std::thread::Builder::new()
            .name("incoming-accept".into())
            .spawn(move || accept_loop(&listener, &trust, &stop, &tx))?
    };
    // The VM is built before any source connects (as QEMU's -incoming
    // does), so a migration's time does not include it; one that a failed
    // attempt used (its memory may hold pages) is built again at once.
    let build = || -> Result<crate::vm::Prepared, String> {
        let mem: GuestMemoryMmap =
            memory::create(config.memory_bytes, config.hugepages, config.numa.as_ref())
                .map_err(|e| format!("the destination cannot allocate guest memory: {e}"))?;
        Vm::prepare(kvm, config.clone(), mem, false)
            .map_err(|e| format!("the destination cannot build the VM: {e}"))
    };
    let prebuild = |ready: &mut Option<crate::vm::Prepared>| {
        if ready.is_none() {
            // A failure is told to the source that comes (REFUSE).
            *ready = build()
                .inspect_err(|e| tracing::warn!("{e}; trying again when a source connects"))
                .ok();
        }
    };
    let mut ready = None;
    prebuild(&mut ready);
    let result = loop {
        let (stream, peer) = match rx.recv() {
            Ok(Accepted::Peer(stream, peer)) => {
                // (ffmk-node reads this line: its reservation is in use.)
                log(format!("migration from {peer}: authenticated, receiving"));
                (stream, peer)
            }
            Ok(Accepted::Refused(why)) => {
                log(format!("refused a connection: {why}; waiting for another"));
                continue;
            }
            Ok(Accepted::Failed(e)) => break Err(e),
            Err(_) => break Err(std::io::Error::other("the accepting thread ended")),
        };
        // A stalled source cannot hold the port: past the deadline its
        // socket is shut and whatever the receiving side waits for fails.
        let watchdog = cluster_auth::Deadline::arm(stream.tcp(), deadline);
        // Further page streams of this migration come through the same
        // accepting thread.
        // (Through a unique borrow: a Receiver may move between threads
        // but not be shared.)
        let rx = &mut rx;
        let mut joins = move |wait: Duration| match rx.recv_timeout(wait) {
            Ok(Accepted::Peer(s, _)) => Some(s),
            Ok(Accepted::Refused(why)) => {
                tracing::warn!("refused a connection: {why}");
                None
            }
            _ => None,
        };
        let result = receive_one(
            stream,
            config,
            devices,
            &mine,
            &mut || match ready.take() {
                Some(p) => Ok(p),
                None => build(),
            },
            &mut joins,
        );
        let expired = watchdog.disarm();
        if result.is_err() {
            prebuild(&mut ready);
        }
        match result {
            Ok(r) => break Ok(r),
            Err(e) if expired => log(format!(
                "migration from {peer} did not switch over within {} s ({e}); waiting for \
                 another",
                deadline.as_secs()
            )),
            Err(e) => log(format!(
                "migration from {peer} failed: {e}; waiting for another"
            )),
        }
    };
    stop.store(true, Ordering::Release);
    let _ = acceptor.join();
    result
}

enum Accepted {
    Peer(cluster_auth::PlaneStream, std::net::SocketAddr),
    Refused(String),
    Failed(std::io::Error),
}

/// Handshakes in flight at once on an incoming port; connections beyond
/// are closed at once.
const MAX_HANDSHAKES: usize = 16;

fn accept_loop(
    listener: &TcpListener,
    trust: &cluster_auth::Trust,
    stop: &AtomicBool,
    tx: &std::sync::mpsc::Sender<Accepted>,
) {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener, Duration::from_millis(50));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Accepted::Failed(e));
                return;
            }
        };
        if busy.load(Ordering::Acquire) >= MAX_HANDSHAKES {
            let _ = tx.send(Accepted::Refused(format!(
                "{peer}: {MAX_HANDSHAKES} handshakes already in flight"
            )));
            continue;
        }
        let _ = stream.set_nonblocking(false);
        busy.fetch_add(1, Ordering::AcqRel);
        let (mine, tx, trust) = (busy.clone(), tx.clone(), trust.clone());
        let spawned = std::thread::Builder::new()
            .name("incoming-handshake".into())
            .spawn(move || {
                let r = cluster_auth::accept(
                    stream,
                    &trust,
                    &[migrate::source::CHANNEL],
                    HANDSHAKE_TIMEOUT,
                );
                mine.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(match r {
                    Ok((s, _)) => Accepted::Peer(s, peer),
                    Err(e) => Accepted::Refused(e.to_string()),
                });
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Waits until `listener` has a connection to take, at most `wait` (so
/// the loop sees `stop`); a connection is taken the moment it arrives
/// (a page stream's JOIN waits for no timer).
fn wait_readable(listener: &TcpListener, wait: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives on this stack frame for the call; the
    // listener's descriptor stays open while it is borrowed.
    let r = unsafe { libc::poll(&mut fd, 1, wait.as_millis() as libc::c_int) };
    if r < 0 {
        // EINTR or the like: the caller loops anyway; do not spin.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long a peer has for the cluster-plane handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this destination can take a VM whose source asks for `theirs`.
fn can_receive(config: &RunConfig, theirs: &Hello) -> Result<(), String> {
    if theirs.postcopy {
        if config.hugepages.is_on() {
            return Err("post-copy needs 4 KiB guest pages; this VM uses --hugepages".into());
        }
        drop(migrate::postcopy::open_uffd().map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// One attempt on an authenticated connection; `prepared` gives the VM
/// built for it (everything that does not need the state is built before
/// the first page: the source's pause then covers only loading the state).
fn receive_one(
    stream: cluster_auth::PlaneStream,
    config: &RunConfig,
    devices: &[crate::config::DeviceEntry],
    mine: &Hello,
    prepared: &mut dyn FnMut() -> Result<crate::vm::Prepared, String>,
    joins: &mut migrate::dest::Joins,
) -> Result<Arrived, IncomingError> {
    let mut inc = migrate::dest::Incoming::new(stream, Duration::from_secs(30))?;
    let t = std::time::Instant::now();
    let mut devices_used = 0;
    let prepared = inc.hello(mine, |theirs| {
        can_receive(config, theirs)?;
        // Passthrough functions whose device state comes with the VM: this
        // host's go where the source had them, before the state loads.
        let slots = passthrough_slots(&theirs.passthrough)?;
        let mut p = prepared()?;
        if !slots.is_empty() {
            p.attach_for_state(devices, &slots)
                .map_err(|e| e.to_string())?;
            devices_used = slots.len();
        }
        Ok(p)
    })?;
    tracing::debug!(
        "migration: hello checked and the VM ready in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let from = inc.peer.to_string();
    // Passthrough devices' PRE_COPY data goes into this host's functions
    // as it comes (they wait in RESUMING for the rest, in the state).
    let mut sink = |slot: u8, data: &[u8]| prepared.load_device_part(slot, data);
    let arrival = inc.memory_and_devices(prepared.memory(), joins, &mut sink)?;
    let (state, missing) = match arrival {
        Arrival::State(state) => (state, None),
        Arrival::Postcopy { state, missing } => (state, Some(missing)),
    };
    let loading = std::time::Instant::now();
    let Some(missing) = missing else {
        let vm = load(&from, &state, prepared, config, &mut |why| inc.abort(why))?;
        log_loaded(&from, loading);
        let received = inc.switch_over(|| vm.resume().map_err(migrate::VmError::from))?;
        return Ok(Arrived {
            vm,
            received,
            postcopy: None,
            devices_used,
        });
    };
    // Post-copy: missing pages are trapped before anything (the state
    // load itself) can touch them; faults are served from here on.
    let (pc, received) = inc.postcopy(prepared.memory(), missing)?;
    let mut abort = |why: &str| {
        let _ = pc.send(migrate::protocol::Kind::Abort, why.as_bytes());
    };
    let vm = load(&from, &state, prepared, config, &mut abort)?;
    log_loaded(&from, loading);
    pc.send(migrate::protocol::Kind::Ready, &[])?;
    pc.wait_go(Duration::from_secs(30))?;
    if let Err(e) = vm.resume() {
        pc.abort(&format!("the destination could not start the VM: {e}"));
        return Err(migrate::Error::Vm(Box::new(e)).into());
    }
    pc.send(migrate::protocol::Kind::Running, &[])?;
    Ok(Arrived {
        vm,
        received,
        postcopy: Some(pc),
        devices_used,
    })
}

/// Loads the received state into the prepared VM (paused); on failure
/// `abort` tells the source why.
fn load(
    from: &str,
    state: &[u8],
    prepared: crate::vm::Prepared,
    config: &RunConfig,
    abort: &mut dyn FnMut(&str),
) -> Result<Vm, IncomingError> {
    let restoring = Restoring::migrated(from, state, config).inspect_err(|e| {
        abort(&e.to_string());
    })?;
    // The machine's kernel, command line and test port come with it;
    // devices, console and API socket are this host's.
    prepared.start(Some(&restoring)).map_err(|e| {
        abort(&format!("the destination cannot load the VM's state: {e}"));
        e.into()
    })
}

fn log_loaded(from: &str, since: std::time::Instant) {
    tracing::debug!(
        "migration from {from}: state loaded in {:.2} ms",
        since.elapsed().as_secs_f64() * 1e3
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hello_names_travelling_functions_by_slot() {
        let entries = passthrough_hello(&[(1, "4348:3253".into()), (0x1e, "15b3:101e".into())]);
        assert_eq!(entries, ["01=4348:3253", "1e=15b3:101e"]);
        assert_eq!(
            passthrough_slots(&entries).unwrap(),
            [
                (1, "4348:3253".to_string()),
                (0x1e, "15b3:101e".to_string())
            ]
        );
        for bad in ["1", "zz=4348:3253", "20=4348:3253"] {
            let e = passthrough_slots(&[bad.to_string()]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
