//! virtio-net over a TAP interface (virtio spec 5.1): one receive and one
//! transmit queue, mergeable receive buffers, checksum and TSO offloads
//! passed through to the TAP (which speaks the same 12-byte header).
//!
//! Receive: when the TAP has a frame and the guest has posted buffers, the
//! frame is copied into as many receive chains as it needs (`num_buffers`).
//! Without buffers the frame waits and the TAP is not watched until the
//! guest posts more, so a guest that stops receiving costs nothing.
//! Transmit: each chain (header + frame) is written to the TAP as one frame.
use super::ActivateError;
use super::{
    pop_or_rearm, Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker,
    VirtioDevice, VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const STATUS_LINK_UP: u16 = 1;

pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: 64 KiB of TSO payload plus headers.
const MAX_FRAME: usize = 65_562;

const RX: u32 = 0;
const TX: u32 = 1;
const TAP: u32 = 2;

/// `--net tap=NAME[,mac=52:54:00:12:34:56]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// A Linux bridge the TAP joins (and is brought up on) when opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// A locally administered MAC derived from the TAP name (stable across runs).
pub fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    [0x52, 0x54, 0x00, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

#[derive(Default, Debug)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub dropped: AtomicU64,
}

pub struct Net {
    config: NetConfig,
    /// Opened once, when the VM is built, and kept for the device's life:
    /// each activation's handler gets a duplicate. A guest that resets the
    /// device (a driver reload, kexec, a reboot) keeps its TAP, although
    /// the VMM's threads may no longer open /dev/net/tun by then, and the
    /// interface (with its addresses and bridge port) never goes away.
    tap: Tap,
    /// A handler runs (between activation and reset).
    active: bool,
    handlers: Handlers,
    pub stats: Arc<NetStats>,
}

impl Net {
    pub fn new(config: NetConfig, endpoint: Endpoint) -> Result<Net, crate::tap::TapError> {
        let tap = Tap::open(&config.tap)?;
        if let Some(b) = &config.bridge {
            tap.join_bridge(b)?;
        }
        Ok(Net {
            config,
            tap,
            active: false,
            handlers: Handlers::new(endpoint),
            stats: Arc::new(NetStats::default()),
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_F_RING_EVENT_IDX
            | F_MAC
            | F_STATUS
            | F_MRG_RXBUF
            | F_CSUM
            | F_GUEST_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_GUEST_TSO4
            | F_GUEST_TSO6
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        super::read_config(&c, offset, data);
    }

    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::Busy(
                "the TAP is in use by an earlier activation",
            ));
        }
        let tap = self.tap.try_clone().map_err(|source| ActivateError::Host {
            what: "a duplicate of the TAP descriptor",
            source,
        })?;
        let mut offload = 0;
        if a.features & F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if a.features & F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if a.features & F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        if let Err(e) = tap.set_offload(offload) {
            return Err(ActivateError::Host {
                what: "TAP offloads",
                source: std::io::Error::other(e.to_string()),
            });
        }
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::Queues("both queues"));
        };
        let handler = NetHandler {
            tap,
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
            mergeable: a.features & F_MRG_RXBUF != 0,
            pending: None,
            watching_tap: false,
            frame: vec![0u8; MAX_FRAME],
            stats: self.stats.clone(),
        };
        self.handlers.start(Box::new(handler))?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        // The handler's duplicate goes with it; the device keeps the TAP.
        self.handlers.stop_all();
        self.active = false;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("rx_frames", s.rx_frames.load(Ordering::Relaxed)),
            ("rx_bytes", s.rx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", s.tx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", s.tx_bytes.load(Ordering::Relaxed)),
            ("dropped", s.dropped.load(Ordering::Relaxed)),
        ]
    }

    fn describe(&self) -> String {
        let m = self.config.mac;
        format!(
            "virtio-net tap={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.config.tap, m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The frame (virtio-net header first) a transmit chain carries, or None
/// for a chain that is unreadable or too short to hold a frame. At most
/// [`MAX_FRAME`] bytes are taken.
pub fn tx_frame<M>(mem: &GuestMemory, chain: virtio_queue::DescriptorChain<M>) -> Option<Vec<u8>>
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let mut r = chain.reader(mem).ok()?;
    let len = r.available_bytes().min(MAX_FRAME);
    if len <= VNET_HDR_LEN {
        return None;
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// What happened to a frame offered to the receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Copied into one chain, or several with mergeable buffers.
    Delivered,
    /// The driver's buffer cannot hold it (a contract breach without
    /// mergeable buffers): the buffer goes back empty, the frame is lost.
    Dropped,
    /// Not enough buffers posted: nothing was consumed, try again later.
    NoBuffers,
}

/// Copies `frame` (virtio-net header first) into receive chains of `q`,
/// setting the header's `num_buffers`. Chains the guest made unwritable
/// complete with length 0; nothing here trusts the guest's lengths.
pub fn write_rx_frame(
    mem: &GuestMemory,
    q: &mut virtio_queue::Queue,
    frame: &mut [u8],
    mergeable: bool,
) -> RxOutcome {
    let len = frame.len();
    // First find enough chains; give them back if there are not.
    let mut chains = Vec::new();
    let mut room = 0usize;
    while room < len {
        let Some(chain) = pop_or_rearm(q, mem) else {
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            return RxOutcome::NoBuffers;
        };
        room += chain
            .clone()
            .writable()
            .map(|d| d.len() as usize)
            .sum::<usize>();
        chains.push(chain);
        if !mergeable {
            break;
        }
    }
    if room < len {
        for chain in chains {
            let _ = q.add_used(mem, chain.head_index(), 0);
        }
        return RxOutcome::Dropped;
    }
    if len >= VNET_HDR_LEN {
        frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    }
    let mut at = 0;
    for chain in chains {
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => {
                let n = w.available_bytes().min(len - at);
                match w.write_all(&frame[at..at + n]) {
                    Ok(()) => n,
                    Err(_) => 0,
                }
            }
            Err(_) => 0,
        };
        at += written;
        let _ = q.add_used(mem, head, written as u32);
    }
    RxOutcome::Delivered
}

struct NetHandler {
    tap: Tap,
    mem: GuestMemory,
    rx: ActiveQueue,
    tx: ActiveQueue,
    interrupt: Arc<VirtioInterrupt>,
    mergeable: bool,
    /// A frame read from the TAP that found no receive buffers yet.
    pending: Option<usize>,
    watching_tap: bool,
    frame: Vec<u8>,
    stats: Arc<NetStats>,
}

impl NetHandler {
    /// Offers the frame (`len` bytes of `self.frame`) to the receive queue.
    /// false: not enough buffers posted (nothing consumed, the frame waits).
    fn deliver(&mut self, len: usize) -> bool {
        let frame = &mut self.frame[..len];
        match write_rx_frame(&self.mem, &mut self.rx.queue, frame, self.mergeable) {
            RxOutcome::NoBuffers => return false,
            RxOutcome::Dropped => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            RxOutcome::Delivered => {
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                let payload = (len - VNET_HDR_LEN.min(len)) as u64;
                self.stats.rx_bytes.fetch_add(payload, Ordering::Relaxed);
            }
        }
        true
    }

    /// Moves frames from the TAP into the guest until one of them runs dry.
    fn receive(&mut self) {
        let mut delivered = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None => match self.tap.read_frame(&mut self.frame) {
                    Ok(n) => n,
                    Err(_) => break, // WouldBlock (or an error): nothing more
                },
            };
            if !self.deliver(len) {
                self.pending = Some(len);
                break;
            }
            delivered = true;
        }
        if delivered && self.rx.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.rx.vector);
        }
    }

    fn transmit(&mut self) {
        let mem = &self.mem;
        let mut sent = false;
        while let Some(chain) = pop_or_rearm(&mut self.tx.queue, mem) {
            let head = chain.head_index();
            let sent_ok = tx_frame(mem, chain).is_some_and(|buf| {
                let ok = self.tap.write_frame(&buf).is_ok();
                if ok {
                    self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    let bytes = (buf.len() - VNET_HDR_LEN) as u64;
                    self.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                ok
            });
            if !sent_ok {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.tx.queue.add_used(mem, head, 0);
            sent = true;
        }
        if sent && self.tx.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.tx.vector);
        }
    }

    /// Watch the TAP only while there is somewhere to put its frames.
    fn update_tap_watch(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_none();
        if want == self.watching_tap {
            return;
        }
        let ev = Events::with_data(&self.tap, TAP, EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_tap = want,
            Err(e) => tracing::warn!("virtio-net: cannot change the TAP watch: {e:?}"),
        }
    }
}

impl QueueWorker for NetHandler {
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue)) {
        f(&self.rx);
        f(&self.tx);
    }
}

impl MutEventSubscriber for NetHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            RX => {
                let _ = self.rx.notify.read();
                self.receive();
            }
            TX => {
                let _ = self.tx.notify.read();
                self.transmit();
            }
            TAP => self.receive(),
            _ => {}
        }
        self.update_tap_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, tag) in [(&self.rx.notify, RX), (&self.tx.notify, TX)] {
            if let Err(e) = ops.add(Events::with_data(fd, tag, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch queue {tag}: {e:?}");
            }
        }
        self.transmit();
        self.receive();
        self.update_tap_watch(ops);
    }
}
