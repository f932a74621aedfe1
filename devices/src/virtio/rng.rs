//! virtio-rng (virtio spec 5.4): fills the guest's buffers from the host's
//! `getrandom(2)`, at most [`MAX_BYTES_PER_REQUEST`] per request.
use super::ActivateError;
use super::{
    pop_or_rearm, Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker,
    VirtioDevice, VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::Write;
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

pub struct Rng {
    handlers: Handlers,
}

impl Rng {
    pub fn new(endpoint: Endpoint) -> Rng {
        Rng {
            handlers: Handlers::new(endpoint),
        }
    }
}

/// Fills `buf` from the host's entropy pool.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Fills the writable part of a request chain (at most
/// [`MAX_BYTES_PER_REQUEST`] bytes) with random bytes; returns how many it
/// wrote (0 for a chain it cannot write).
pub fn fill_chain<M>(mem: &GuestMemory, chain: virtio_queue::DescriptorChain<M>) -> usize
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let Ok(mut w) = chain.writer(mem) else {
        return 0;
    };
    let mut buf = vec![0u8; w.available_bytes().min(MAX_BYTES_PER_REQUEST)];
    if fill_random(&mut buf).is_ok() && w.write_all(&buf).is_ok() {
        buf.len()
    } else {
        0
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }
    fn config_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let queue = a
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::Queues("its queue"))?;
        let handler = RngHandler {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        };
        self.handlers.start(Box::new(handler))?;
        Ok(())
    }

    fn reset(&mut self) {
        self.handlers.stop_all();
    }

    fn describe(&self) -> String {
        "virtio-rng (getrandom)".into()
    }
}

struct RngHandler {
    mem: GuestMemory,
    queue: ActiveQueue,
    interrupt: Arc<VirtioInterrupt>,
}

impl RngHandler {
    fn serve(&mut self) {
        let mem = &self.mem;
        let mut used_any = false;
        while let Some(chain) = pop_or_rearm(&mut self.queue.queue, mem) {
            let head = chain.head_index();
            let written = fill_chain(mem, chain);
            let _ = self.queue.queue.add_used(mem, head, written as u32);
            used_any = true;
        }
        if used_any && self.queue.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.queue.vector);
        }
    }
}

impl QueueWorker for RngHandler {
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue)) {
        f(&self.queue);
    }
}

impl MutEventSubscriber for RngHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue.notify.read();
        self.serve();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue.notify, EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch the queue: {e:?}");
        }
        self.serve();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_come_from_the_host() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|x| *x != 0));
    }
}
