//! virtio-net over a TAP interface (virtio spec 5.1): one receive and one
//! transmit queue, mergeable receive buffers, checksum and TSO offloads
//! passed through to the TAP (which speaks the same 12-byte header), and a
//! control queue for the guest's side of announcing a moved VM
//! ([`announce`], [`ctrl`]).
//!
//! Receive: when the TAP has a frame and the guest has posted buffers, the
//! frame is copied into as many receive chains as it needs (`num_buffers`).
//! Without buffers the frame waits and the TAP is not watched until the
//! guest posts more, so a guest that stops receiving costs nothing.
//! Transmit: each chain (header + frame) is written to the TAP as one frame.
pub mod announce;
pub mod ctrl;

pub use announce::{rarp_frame, ETH_P_RARP};

use super::ActivateError;
use super::{
    pop_or_rearm, Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker,
    VirtioDevice, VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const STATUS_LINK_UP: u16 = 1;
/// Set in the configuration's status to ask the driver to announce the VM
/// (cleared by its `VIRTIO_NET_CTRL_ANNOUNCE_ACK`).
const STATUS_ANNOUNCE: u16 = 2;

pub const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Largest frame with its header: 64 KiB of TSO payload plus headers.
const MAX_FRAME: usize = 65_562;

const RX: u32 = 0;
const TX: u32 = 1;
const TAP: u32 = 2;
const CTRL: u32 = 3;
/// The announcement timer fired.
const ANNOUNCE: u32 = 4;
/// The VMM asks for an announcement ([`AnnounceHandle`]).
const ANNOUNCE_REQUEST: u32 = 5;

/// `--net tap=NAME[,mac=52:54:00:12:34:56][,bridge=BR][,announce=off]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// A Linux bridge the TAP joins (and is brought up on) when opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Announce the VM on the TAP after it moved here ([`announce`]); off
    /// for a fabric whose MAC tables are set by other means.
    #[serde(
        default = "announce_default",
        skip_serializing_if = "is_announce_default"
    )]
    pub announce: bool,
}

fn announce_default() -> bool {
    true
}

fn is_announce_default(on: &bool) -> bool {
    *on
}

/// `52:54:00:12:34:56`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A locally administered MAC derived from the TAP name (stable across runs).
pub fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    [0x52, 0x54, 0x00, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// The device's MAC address, which a VM keeps when it moves: the VMM that
/// receives a migrated VM built its device before it knew the VM, and sets
/// the address the guest has through this handle before the device's
/// state is restored.
#[derive(Clone, Debug)]
pub struct MacHandle(Arc<std::sync::Mutex<[u8; 6]>>);

impl MacHandle {
    pub fn get(&self) -> [u8; 6] {
        match self.0.lock() {
            Ok(m) => *m,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn set(&self, mac: [u8; 6]) {
        match self.0.lock() {
            Ok(mut m) => *m = mac,
            Err(p) => *p.into_inner() = mac,
        }
    }
}

/// Asks a device to announce its VM ([`announce`]): the VMM does when a VM
/// that was restored or migrated runs for the first time on this host.
#[derive(Clone)]
pub struct AnnounceHandle(Arc<vmm_sys_util::eventfd::EventFd>);

impl AnnounceHandle {
    /// Starts the rounds (again, if some are still to go). A device whose
    /// driver is not running announces once it is.
    pub fn request(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!("virtio-net: cannot ask for an announcement: {e}");
        }
    }
}

#[derive(Default, Debug)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub dropped: AtomicU64,
    /// RARP frames sent on the TAP to announce the VM after it moved.
    pub announced: AtomicU64,
    /// Announcements the guest's driver made and acknowledged.
    pub guest_announced: AtomicU64,
}

pub struct Net {
    config: NetConfig,
    /// Opened once, when the VM is built, and kept for the device's life:
    /// each activation's handler gets a duplicate. A guest that resets the
    /// device (a driver reload, kexec, a reboot) keeps its TAP, although
    /// the VMM's threads may no longer open /dev/net/tun by then, and the
    /// interface (with its addresses and bridge port) never goes away.
    tap: Tap,
    /// The MAC address (the configuration's may be replaced, see
    /// [`MacHandle`]).
    mac: MacHandle,
    /// The configuration's status (link up, announce), shared with the
    /// handler, which asks for and takes back announcements.
    status: Arc<AtomicU16>,
    /// Written by [`AnnounceHandle::request`], watched by the handler
    /// (not at all with `announce=off`).
    announce: Arc<vmm_sys_util::eventfd::EventFd>,
    /// A handler runs (between activation and reset).
    active: bool,
    handlers: Handlers,
    pub stats: Arc<NetStats>,
}

impl Net {
    pub fn new(config: NetConfig, endpoint: Endpoint) -> Result<Net, crate::tap::TapError> {
        let tap = Tap::open(&config.tap)?;
        let announce =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                crate::tap::TapError::Configure {
                    name: config.tap.clone(),
                    what: "an eventfd for announcements",
                    source,
                }
            })?;
        if let Some(b) = &config.bridge {
            tap.join_bridge(b)?;
        }
        Ok(Net {
            mac: MacHandle(Arc::new(std::sync::Mutex::new(config.mac))),
            config,
            tap,
            status: Arc::new(AtomicU16::new(STATUS_LINK_UP)),
            announce: Arc::new(announce),
            active: false,
            handlers: Handlers::new(endpoint),
            stats: Arc::new(NetStats::default()),
        })
    }
}

impl Net {
    pub fn mac_handle(&self) -> MacHandle {
        self.mac.clone()
    }

    pub fn announce_handle(&self) -> AnnounceHandle {
        AnnounceHandle(self.announce.clone())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }

    /// Receive, transmit, control (its requests are polled by the driver,
    /// so it needs no interrupt vector of its own).
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
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
            | F_CTRL_VQ
            | F_GUEST_ANNOUNCE
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac.get());
        let status = self.status.load(Ordering::Acquire);
        c[6..8].copy_from_slice(&status.to_le_bytes());
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
        if a.restored {
            // Frames the TAP queued before the VM arrived were meant for
            // its copy on the source, which took them or never will: a
            // switch floods a frame to both hosts' ports while it does not
            // know the VM's MAC, and the guest would get it twice; the
            // rest is broadcasts from before. Dropped, counted.
            let mut frame = vec![0u8; MAX_FRAME];
            while tap.read_frame(&mut frame).is_ok() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (mut rx, mut tx, mut ctrl) = (None, None, None);
        for q in a.queues {
            match q.index {
                0 => rx = Some(q),
                1 => tx = Some(q),
                2 if a.features & F_CTRL_VQ != 0 => ctrl = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::Queues("both queues"));
        };
        self.status.fetch_and(!STATUS_ANNOUNCE, Ordering::AcqRel);
        let handler = NetHandler {
            tap,
            mem: a.mem,
            rx,
            tx,
            ctrl,
            interrupt: a.interrupt,
            mergeable: a.features & F_MRG_RXBUF != 0,
            guest_announce: a.features & (F_CTRL_VQ | F_GUEST_ANNOUNCE)
                == F_CTRL_VQ | F_GUEST_ANNOUNCE,
            mac: self.mac.get(),
            status: self.status.clone(),
            announce_requests: self.announce.clone(),
            announcing: self.config.announce,
            announcer: None,
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
        self.status.store(STATUS_LINK_UP, Ordering::Release);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("rx_frames", s.rx_frames.load(Ordering::Relaxed)),
            ("rx_bytes", s.rx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", s.tx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", s.tx_bytes.load(Ordering::Relaxed)),
            ("dropped", s.dropped.load(Ordering::Relaxed)),
            ("announced", s.announced.load(Ordering::Relaxed)),
            ("guest_announced", s.guest_announced.load(Ordering::Relaxed)),
        ]
    }

    fn describe(&self) -> String {
        format!(
            "virtio-net tap={} mac={}",
            self.config.tap,
            format_mac(&self.mac.get())
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

/// The rounds of announcing still to go ([`announce::ROUNDS`]).
struct Announcer {
    timer: TimerFd,
    /// The next round's index.
    round: usize,
}

struct NetHandler {
    tap: Tap,
    mem: GuestMemory,
    rx: ActiveQueue,
    tx: ActiveQueue,
    /// The control queue, when the driver took it.
    ctrl: Option<ActiveQueue>,
    interrupt: Arc<VirtioInterrupt>,
    mergeable: bool,
    /// The driver accepted GUEST_ANNOUNCE (with the control queue).
    guest_announce: bool,
    mac: [u8; 6],
    status: Arc<AtomicU16>,
    announce_requests: Arc<vmm_sys_util::eventfd::EventFd>,
    /// `announce=on` (the default).
    announcing: bool,
    /// The rounds under way (the timer is made for the first request).
    announcer: Option<Announcer>,
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

    /// Answers the driver's control requests: an announcement's
    /// acknowledgement takes the request back; anything else is refused.
    fn control(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        let mem = &self.mem;
        let (status, stats) = (&self.status, &self.stats);
        let mut served = false;
        while let Some(chain) = pop_or_rearm(&mut ctrl.queue, mem) {
            let (head, len, _) = ctrl::serve(mem, chain, |c| match c {
                ctrl::Command::AnnounceAck => {
                    status.fetch_and(!STATUS_ANNOUNCE, Ordering::AcqRel);
                    stats.guest_announced.fetch_add(1, Ordering::Relaxed);
                    ctrl::OK
                }
                ctrl::Command::Other { .. } => ctrl::ERR,
            });
            let _ = ctrl.queue.add_used(mem, head, len);
            served = true;
        }
        if served && ctrl.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(ctrl.vector);
        }
    }

    /// One round of announcing the VM: a RARP broadcast on the TAP and, with
    /// GUEST_ANNOUNCE, a request to the guest unless one is still open.
    /// Then arms the timer for the next round, or stops watching it.
    /// `expired`: the timer fired (its expiration is read, which does not
    /// block then; the first round comes from a request, with no timer
    /// armed).
    fn announce(&mut self, ops: &mut EventOps, expired: bool) {
        let Some(a) = self.announcer.as_mut() else {
            return;
        };
        if expired {
            let _ = a.timer.wait();
        }
        if self
            .tap
            .write_frame(&announce::rarp_frame(self.mac))
            .is_ok()
        {
            self.stats.announced.fetch_add(1, Ordering::Relaxed);
        }
        if self.guest_announce
            && self.status.fetch_or(STATUS_ANNOUNCE, Ordering::AcqRel) & STATUS_ANNOUNCE == 0
        {
            self.interrupt.signal_config();
        }
        a.round += 1;
        if let Some(&wait) = announce::ROUNDS.get(a.round) {
            if let Err(e) = a.timer.reset(wait, None) {
                tracing::warn!("virtio-net: announcement timer: {e}");
                self.stop_announcing(ops);
            }
        } else {
            self.stop_announcing(ops);
        }
    }

    /// Starts the rounds (from the first, when some are still to go).
    fn start_announcing(&mut self, ops: &mut EventOps) {
        let _ = self.announce_requests.read();
        if self.announcer.is_none() {
            let timer = match TimerFd::new() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("virtio-net: no announcement timer: {e}");
                    return;
                }
            };
            if let Err(e) = ops.add(Events::with_data(&timer, ANNOUNCE, EventSet::IN)) {
                tracing::warn!("virtio-net: cannot watch the announcement timer: {e:?}");
                return;
            }
            self.announcer = Some(Announcer { timer, round: 0 });
        }
        if let Some(a) = self.announcer.as_mut() {
            a.round = 0;
        }
        // The first round at once (a zero timer would be disarmed).
        self.announce(ops, false);
    }

    fn stop_announcing(&mut self, ops: &mut EventOps) {
        if let Some(a) = self.announcer.take() {
            let _ = ops.remove(Events::with_data(&a.timer, ANNOUNCE, EventSet::IN));
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
        if let Some(c) = &self.ctrl {
            f(c);
        }
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
            CTRL => {
                if let Some(c) = &self.ctrl {
                    let _ = c.notify.read();
                }
                self.control();
            }
            ANNOUNCE => self.announce(ops, true),
            ANNOUNCE_REQUEST => self.start_announcing(ops),
            _ => {}
        }
        self.update_tap_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let ctrl = self.ctrl.as_ref().map(|c| (&c.notify, CTRL));
        for (fd, tag) in [(&self.rx.notify, RX), (&self.tx.notify, TX)]
            .into_iter()
            .chain(ctrl)
        {
            if let Err(e) = ops.add(Events::with_data(fd, tag, EventSet::IN)) {
                tracing::error!("virtio-net: cannot watch queue {tag}: {e:?}");
            }
        }
        self.transmit();
        self.receive();
        self.control();
        self.update_tap_watch(ops);
        if self.announcing {
            let requests =
                Events::with_data(&*self.announce_requests, ANNOUNCE_REQUEST, EventSet::IN);
            if let Err(e) = ops.add(requests) {
                tracing::warn!("virtio-net: cannot watch announcement requests: {e:?}");
            }
        }
    }
}
