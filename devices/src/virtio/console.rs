//! virtio-console (virtio spec 5.3), one port, output only: a channel for
//! bulk guest output (job logs) next to the 8250, which stays the kernel
//! console. What the guest transmits is appended to a host file (or
//! discarded); the receive queue is offered but never filled.
use super::ActivateError;
use super::{
    pop_or_rearm, Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker,
    VirtioDevice, VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

/// Largest chunk taken from one transmit chain.
const MAX_CHUNK: u64 = 64 << 10;

pub struct Console {
    path: PathBuf,
    output: Option<File>,
    handlers: Handlers,
    pub bytes_out: Arc<AtomicU64>,
}

impl Console {
    /// A console whose output is appended to `path` (created if missing).
    pub fn new(path: &Path, endpoint: Endpoint) -> std::io::Result<Console> {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Console {
            path: path.into(),
            output: Some(output),
            handlers: Handlers::new(endpoint),
            bytes_out: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        3
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64, 64]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports (1), emerg_wr: all zero but the port count.
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        super::read_config(&c, offset, data);
    }
    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let output = self
            .output
            .as_ref()
            .ok_or(ActivateError::Busy("no output file"))?
            .try_clone()
            .map_err(|source| ActivateError::Host {
                what: "output file",
                source,
            })?;
        let tx = a
            .queues
            .into_iter()
            .find(|q| q.index == 1)
            .ok_or(ActivateError::Queues("the transmit queue"))?;
        let handler = ConsoleHandler {
            mem: a.mem,
            tx,
            interrupt: a.interrupt,
            output,
            bytes_out: self.bytes_out.clone(),
        };
        self.handlers.start(Box::new(handler))?;
        Ok(())
    }

    fn reset(&mut self) {
        self.handlers.stop_all();
    }

    fn describe(&self) -> String {
        format!("virtio-console > {}", self.path.display())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes_out", self.bytes_out.load(Ordering::Relaxed))]
    }
}

/// What a transmit chain carries (at most [`MAX_CHUNK`] bytes), or None for
/// a chain that cannot be read.
pub fn chain_output<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
) -> Option<Vec<u8>>
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let r = chain.reader(mem).ok()?;
    let mut buf = Vec::new();
    r.take(MAX_CHUNK).read_to_end(&mut buf).ok()?;
    Some(buf)
}

struct ConsoleHandler {
    mem: GuestMemory,
    tx: ActiveQueue,
    interrupt: Arc<VirtioInterrupt>,
    output: File,
    bytes_out: Arc<AtomicU64>,
}

impl ConsoleHandler {
    fn drain(&mut self) {
        let mem = &self.mem;
        let mut any = false;
        while let Some(chain) = pop_or_rearm(&mut self.tx.queue, mem) {
            let head = chain.head_index();
            if let Some(buf) = chain_output(mem, chain) {
                if self.output.write_all(&buf).is_ok() {
                    self.bytes_out
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
            }
            let _ = self.tx.queue.add_used(mem, head, 0);
            any = true;
        }
        if any && self.tx.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.tx.vector);
        }
    }
}

impl QueueWorker for ConsoleHandler {
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue)) {
        f(&self.tx);
    }
}

impl MutEventSubscriber for ConsoleHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.tx.notify.read();
        self.drain();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.tx.notify, EventSet::IN)) {
            tracing::error!("virtio-console: cannot watch the transmit queue: {e:?}");
        }
        self.drain();
    }
}
