//! Virtio 1.x devices on the modern PCI transport.
//!
//! - [`pci`]: the transport: a PCI function whose BAR 0 holds the common,
//!   notify, ISR and device-specific configuration structures and the MSI-X
//!   table; it negotiates features, sets queues up and activates the device;
//! - [`block`]: virtio-blk over a raw image file;
//! - [`net`]: virtio-net over a TAP interface;
//! - [`rng`]: virtio-rng from the host's getrandom;
//! - [`console`]: virtio-console, guest output appended to a host file;
//! - [`vsock`]: virtio-vsock with the host side on Unix sockets;
//! - [`IoThread`]: the thread that runs activated devices' queue handlers
//!   (never a vCPU thread), driven by the queues' notification eventfds.
//!
//! A device sees its queues only after the driver set DRIVER_OK; it then
//! registers a handler on the I/O thread and raises interrupts through
//! [`VirtioInterrupt`].
//!
//! Snapshots and migration: after every event a handler served, the I/O
//! thread publishes where each of its queues stands ([`QueueProgress`]);
//! [`IoThread::freeze`] parks the thread between events, so the transport
//! can save queue positions that match guest memory exactly.
pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;
pub mod vsock;

use crate::pci::Msix;
use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// The next available descriptor chain. When the ring looks empty, first
/// re-arms the driver's notification and looks once more: with
/// VIRTIO_F_RING_EVENT_IDX the driver kicks only for a buffer at or past the
/// `avail_event` the device published, so a device that never moves it gets
/// one kick and then silence (Linux's virtio-net sent its first frame, an
/// ARP request, and no other). Without EVENT_IDX re-arming is a no-op. The
/// second look closes the race with a buffer added in between.
pub fn pop_or_rearm<'a>(
    q: &mut Queue,
    mem: &'a GuestMemory,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemory>> {
    if let Some(c) = q.pop_descriptor_chain(mem) {
        return Some(c);
    }
    match q.enable_notification(mem) {
        Ok(true) => q.pop_descriptor_chain(mem),
        _ => None,
    }
}

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (for drivers that read the ISR instead of using MSI-X).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Why a device could not start serving its queues, or the I/O thread
/// could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not enable the queues the device needs.
    #[error("the driver did not enable {0}")]
    Queues(&'static str),
    /// A host resource the device holds is taken by an earlier activation
    /// (the TAP, the vsock listener) or missing.
    #[error("{0}")]
    Busy(&'static str),
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
    /// A queue the driver set up cannot be used.
    #[error("queue {index} cannot be used: {why}")]
    Queue { index: usize, why: String },
    #[error("cannot start an I/O handler: {0}")]
    Handler(String),
}

/// The I/O thread did not stop for a snapshot or migration.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot reach the I/O thread")]
    Unreachable,
    #[error("the I/O thread did not stop within {0} ms")]
    Timeout(u128),
}

/// A device's side of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net, ...).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue (the queue count is the length).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered (transport features included).
    fn features(&self) -> u64;
    fn config_read(&self, offset: u64, data: &mut [u8]);
    fn config_write(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues (the driver set DRIVER_OK).
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving (the driver reset the device) and forgets the queues.
    fn reset(&mut self);
    /// Short description for logs and `GET /vm`.
    fn describe(&self) -> String;

    /// Activity counters for `GET /vm` (name, value). Default: none.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// What a device gets when the driver is ready.
pub struct Activation {
    pub mem: GuestMemory,
    pub features: u64,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<VirtioInterrupt>,
    /// The device continues in a new VMM from a snapshot or a migration:
    /// host-side state it kept outside guest memory (vsock connections) is
    /// gone, and the device tells the driver so.
    pub restored: bool,
}

pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub notify: EventFd,
    /// MSI-X vector for used-buffer notifications (or [`NO_VECTOR`]).
    pub vector: u16,
    /// Where the queue stands, shared with the transport.
    pub progress: Arc<QueueProgress>,
}

impl ActiveQueue {
    /// Publishes the queue's position for the transport.
    fn publish(&self) {
        self.progress
            .next_avail
            .store(self.queue.next_avail(), Ordering::Release);
        self.progress
            .next_used
            .store(self.queue.next_used(), Ordering::Release);
    }
}

/// A queue's position as of the last event its handler served: the next
/// available-ring entry the device reads and the next used-ring entry it
/// writes. Together with the ring addresses in the transport and guest
/// memory, this is all of a queue's state.
#[derive(Debug, Default)]
pub struct QueueProgress {
    pub next_avail: AtomicU16,
    pub next_used: AtomicU16,
}

impl QueueProgress {
    pub fn new(next_avail: u16, next_used: u16) -> Arc<QueueProgress> {
        Arc::new(QueueProgress {
            next_avail: AtomicU16::new(next_avail),
            next_used: AtomicU16::new(next_used),
        })
    }

    pub fn get(&self) -> (u16, u16) {
        (
            self.next_avail.load(Ordering::Acquire),
            self.next_used.load(Ordering::Acquire),
        )
    }
}

/// How a device interrupts its driver: MSI-X when enabled, else the ISR
/// bit alone (no INTx line is wired).
pub struct VirtioInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    config_vector: u16,
}

impl VirtioInterrupt {
    pub fn signal_queue(&self, vector: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        self.raise(vector);
    }

    pub fn signal_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.raise(self.config_vector);
    }

    fn raise(&self, vector: u16) {
        if vector == NO_VECTOR {
            return;
        }
        if let Ok(mut m) = self.msix.lock() {
            if m.enabled() {
                m.trigger(vector);
            }
        }
    }
}

/// A device's queue handler: an event subscriber that can show the
/// queues it serves.
pub trait QueueWorker: MutEventSubscriber + Send {
    /// Calls `f` with every queue this handler serves.
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue));
}

/// What devices hand to the I/O thread.
pub type Handler = Box<dyn QueueWorker>;

/// A handler as the I/O thread runs it: after every event (and after
/// `init`), the positions of its queues are published.
pub struct Worker(Handler);

impl Worker {
    fn publish(&self) {
        self.0.each_queue(&mut |q| q.publish());
    }
}

impl MutEventSubscriber for Worker {
    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        self.0.process(events, ops);
        self.publish();
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        self.0.init(ops);
        self.publish();
    }
}

/// How devices reach the I/O thread.
pub type Endpoint = RemoteEndpoint<Worker>;

/// The handlers a device runs on the I/O thread: started when the driver
/// activates the device, stopped when it resets it.
pub struct Handlers {
    endpoint: Endpoint,
    running: Vec<SubscriberId>,
}

impl Handlers {
    pub fn new(endpoint: Endpoint) -> Handlers {
        Handlers {
            endpoint,
            running: Vec::new(),
        }
    }

    pub fn start(&mut self, handler: Handler) -> Result<(), ActivateError> {
        let id = self
            .endpoint
            .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
                Ok(ops.add_subscriber(Worker(handler)))
            })
            .map_err(|e| ActivateError::Handler(format!("{e:?}")))?;
        self.running.push(id);
        Ok(())
    }

    /// Stops every handler; returns whether any was running.
    pub fn stop_all(&mut self) -> bool {
        let any = !self.running.is_empty();
        for id in self.running.drain(..) {
            let r = self
                .endpoint
                .call_blocking(move |ops| ops.remove_subscriber(id).map(|_| ()));
            if let Err(e) = r {
                tracing::warn!("cannot stop an I/O handler: {e:?}");
            }
        }
        any
    }
}

/// Copies the device-configuration bytes at `offset` into `data` (zero past
/// the end), for `VirtioDevice::config_read`.
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// The I/O thread: an event loop over the queue eventfds of every active
/// device. Devices add and remove their handlers through [`IoThread::endpoint`].
pub struct IoThread {
    endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    /// Parked for good ([`Frozen::keep`]): never joined.
    kept: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts the I/O thread. `enter` runs on it before it handles the
    /// first device event: its owner confines it there (seccomp), and an
    /// error from `enter` ends the thread and is returned.
    pub fn spawn(
        name: &str,
        enter: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<IoThread> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = enter() {
                    let _ = tx.send(Err(e));
                    return;
                }
                let mut manager = match EventManager::<Worker>::new() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                };
                let _ = tx.send(Ok(manager.remote_endpoint()));
                while !stop_seen.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("I/O thread event loop: {e:?}");
                        break;
                    }
                }
            })?;
        let endpoint = rx
            .recv()
            .map_err(|_| std::io::Error::other("I/O thread died at start"))?
            .map_err(std::io::Error::other)?;
        Ok(IoThread {
            endpoint,
            stop,
            kept: Arc::new(AtomicBool::new(false)),
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// Parks the thread between two events until the returned guard is
    /// dropped: no handler runs, so no device touches guest memory or its
    /// queues, and every queue's published position is final. Fails if
    /// the thread does not stop within `within`.
    pub fn freeze(&self, within: std::time::Duration) -> Result<Frozen, FreezeError> {
        let (parked_tx, parked_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        self.endpoint
            .fire(move |_ops| {
                let _ = parked_tx.send(());
                // Returns when the guard is dropped (the sender goes away).
                let _ = release_rx.recv();
            })
            .map_err(|_| FreezeError::Unreachable)?;
        match parked_rx.recv_timeout(within) {
            Ok(()) => Ok(Frozen {
                release: release_tx,
                kept: self.kept.clone(),
            }),
            // The guard is dropped here, so the thread goes on once it
            // gets to the request.
            Err(_) => Err(FreezeError::Timeout(within.as_millis())),
        }
    }
}

/// The I/O thread stays parked while this lives.
pub struct Frozen {
    release: std::sync::mpsc::Sender<()>,
    kept: Arc<AtomicBool>,
}

impl Frozen {
    /// Keeps the I/O thread parked until the process ends (the VM moved to
    /// another host: no device here may touch a disk or a network again).
    pub fn keep(self) {
        self.kept.store(true, Ordering::Release);
        std::mem::forget(self.release);
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if self.kept.load(Ordering::Acquire) {
            return; // parked for good; it ends with the process
        }
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
