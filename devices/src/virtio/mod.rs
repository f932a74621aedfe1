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
pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;
pub mod vsock;

use crate::pci::Msix;
use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (for drivers that read the ISR instead of using MSI-X).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

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
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
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
}

pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub notify: EventFd,
    /// MSI-X vector for used-buffer notifications (or [`NO_VECTOR`]).
    pub vector: u16,
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

/// A subscriber the I/O thread runs.
pub type Handler = Box<dyn MutEventSubscriber + Send>;

/// The handlers a device runs on the I/O thread: started when the driver
/// activates the device, stopped when it resets it.
pub struct Handlers {
    endpoint: RemoteEndpoint<Handler>,
    running: Vec<SubscriberId>,
}

impl Handlers {
    pub fn new(endpoint: RemoteEndpoint<Handler>) -> Handlers {
        Handlers {
            endpoint,
            running: Vec::new(),
        }
    }

    pub fn start(&mut self, handler: Handler) -> Result<(), String> {
        let id = self
            .endpoint
            .call_blocking(move |ops| -> Result<SubscriberId, event_manager::Error> {
                Ok(ops.add_subscriber(handler))
            })
            .map_err(|e| format!("cannot start an I/O handler: {e:?}"))?;
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
    endpoint: RemoteEndpoint<Handler>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    pub fn spawn(name: &str) -> std::io::Result<IoThread> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut manager = match EventManager::<Handler>::new() {
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
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> RemoteEndpoint<Handler> {
        self.endpoint.clone()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
