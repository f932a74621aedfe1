//! virtio-vsock (virtio spec 5.10) with the host side on Unix sockets, no
//! `/dev/vhost-vsock` needed:
//!
//! - host → guest: connect to the socket at `path` and write
//!   `CONNECT <port>\n`; once the guest accepts, `OK <host port>\n` comes
//!   back and the stream carries the connection;
//! - guest → host port P: ffmk-vmm connects to the Unix socket `<path>_P`
//!   (which the host application listens on) and accepts the guest's request
//!   if that works, else resets it.
//!
//! Stream connections only. Flow control follows the spec's credit scheme:
//! we advertise [`BUF_ALLOC`] bytes of receive space per connection and never
//! send the guest more than it advertised.
use super::ActivateError;
use super::{
    pop_or_rearm, Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker,
    VirtioDevice, VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
/// Receive space we advertise per connection (bytes in flight from the guest).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload we put in one packet to the guest.
const MAX_PAYLOAD: usize = 64 << 10;
/// The event-queue event telling the driver its connections are gone.
const EVENT_TRANSPORT_RESET: u32 = 0;
const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more / send no more.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TAG_RX: u32 = 0;
const TAG_TX: u32 = 1;
const TAG_EVQ: u32 = 2;
const TAG_LISTENER: u32 = 3;
/// Connection streams use tags from here (TAG_CONN + key index).
const TAG_CONN: u32 = 16;

/// `--vsock cid=N,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// A packet header (little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// (local port, guest port): a connection's identity.
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    tag: u32,
    /// Guest data not yet written to the stream (stream was full).
    to_host: Vec<u8>,
    /// Bytes the guest sent that we consumed (reported as fwd_cnt).
    fwd_cnt: u32,
    /// fwd_cnt when we last told the guest.
    fwd_cnt_told: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// What epoll watches on the stream now (see `VsockHandler::watch`).
    watched: EventSet,
    /// The host closed its end (SHUTDOWN sent to the guest).
    host_eof: bool,
    /// The guest will send no more: shut the stream's write side once
    /// `to_host` is flushed.
    guest_eof: bool,
    credit_requested: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, tag: u32) -> Conn {
        Conn {
            stream,
            state,
            tag,
            to_host: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            watched: EventSet::IN,
            host_eof: false,
            guest_eof: false,
            credit_requested: false,
        }
    }

    /// How much more the guest can take from us now.
    fn peer_credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

pub struct Vsock {
    config: VsockConfig,
    listener: Option<UnixListener>,
    handlers: Handlers,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is reserved (use 3 or more)")]
    Cid(u64),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock socket {0} is in use by a running process")]
    InUse(PathBuf),
}

impl Vsock {
    pub fn new(config: VsockConfig, endpoint: Endpoint) -> Result<Vsock, VsockError> {
        if config.cid < 3 || config.cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(config.cid));
        }
        let listener = bind(&config.socket)?;
        Ok(Vsock {
            config,
            listener: Some(listener),
            handlers: Handlers::new(endpoint),
        })
    }
}

fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    if UnixStream::connect(path).is_ok() {
        return Err(VsockError::InUse(path.into()));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| VsockError::Listen {
        path: path.into(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| VsockError::Listen {
            path: path.into(),
            source,
        })?;
    Ok(l)
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.socket);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        19
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![128, 128, 16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let c = self.config.cid.to_le_bytes();
        super::read_config(&c, offset, data);
    }
    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let listener = self.listener.take().ok_or(ActivateError::Busy(
            "the socket is in use by an earlier activation",
        ))?;
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            self.listener = Some(listener);
            return Err(ActivateError::Queues("the rx and tx queues"));
        };
        let handler = VsockHandler {
            cid: self.config.cid,
            socket: self.config.socket.clone(),
            listener,
            mem: a.mem,
            rx,
            tx,
            evq: queues.next(),
            interrupt: a.interrupt,
            conns: BTreeMap::new(),
            pending_accept: Vec::new(),
            to_guest: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            next_tag: TAG_CONN,
            announce_reset: a.restored,
        };
        self.handlers.start(Box::new(handler))?;
        Ok(())
    }

    fn reset(&mut self) {
        if self.handlers.stop_all() {
            // The handler (and its listener) are gone: listen again.
            match bind(&self.config.socket) {
                Ok(l) => self.listener = Some(l),
                Err(e) => tracing::warn!("virtio-vsock: {e}"),
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "virtio-vsock cid={} socket={}",
            self.config.cid,
            self.config.socket.display()
        )
    }
}

/// The packet a transmit chain carries: its header and at most `len`
/// (and at most [`MAX_PAYLOAD`]) payload bytes; None for a chain without a
/// whole header.
pub fn tx_packet<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
) -> Option<(Header, Vec<u8>)>
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let mut r = chain.reader(mem).ok()?;
    let mut hdr = [0u8; HDR_LEN];
    r.read_exact(&mut hdr).ok()?;
    let h = Header::parse(&hdr)?;
    let len = (h.len as usize).min(MAX_PAYLOAD).min(r.available_bytes());
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

/// Writes what one receive chain holds of a packet for the guest: the
/// header, its `len` set to the part of `payload` that fits, then that
/// part. Returns (bytes written into the chain, payload bytes taken):
/// (0, 0) for a chain that cannot be written, that has no room for a
/// header, or (for a packet with payload) no room for any of it.
pub fn rx_packet<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
    h: &Header,
    payload: &[u8],
) -> (usize, usize)
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let Ok(mut w) = chain.writer(mem) else {
        return (0, 0);
    };
    let room = w.available_bytes().saturating_sub(HDR_LEN);
    if w.available_bytes() < HDR_LEN || (room == 0 && !payload.is_empty()) {
        return (0, 0);
    }
    let n = room.min(payload.len());
    let mut part = *h;
    part.len = n as u32;
    if w.write_all(&part.bytes()).is_ok() && w.write_all(&payload[..n]).is_ok() {
        (HDR_LEN + n, n)
    } else {
        (0, 0)
    }
}

/// A host connection that sent nothing yet (we wait for `CONNECT <port>`).
struct Accepting {
    stream: UnixStream,
    line: Vec<u8>,
    tag: u32,
}

struct VsockHandler {
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    mem: GuestMemory,
    rx: ActiveQueue,
    tx: ActiveQueue,
    evq: Option<ActiveQueue>,
    interrupt: Arc<VirtioInterrupt>,
    conns: BTreeMap<Key, Conn>,
    pending_accept: Vec<Accepting>,
    /// Packets waiting for receive buffers: header and payload.
    to_guest: VecDeque<(Header, Vec<u8>)>,
    next_port: u32,
    next_tag: u32,
    /// Restored from a snapshot: the guest's connections have no host side
    /// any more; tell the driver (transport reset event) once it posted an
    /// event buffer.
    announce_reset: bool,
}

impl VsockHandler {
    fn header(&self, key: Key, op: u16, len: u32, conn: Option<&Conn>) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.map(|c| c.fwd_cnt).unwrap_or(0),
        }
    }

    fn send(&mut self, key: Key, op: u16, flags: u32, payload: Vec<u8>) {
        let mut h = self.header(key, op, payload.len() as u32, self.conns.get(&key));
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_told = c.fwd_cnt;
            if op == OP_RW {
                c.tx_cnt = c.tx_cnt.wrapping_add(payload.len() as u32);
            }
        }
        self.to_guest.push_back((h, payload));
    }

    fn reset_to_guest(&mut self, h: &Header) {
        let reply = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        };
        self.to_guest.push_back((reply, Vec::new()));
    }

    fn close(&mut self, key: Key, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = ops.remove(Events::with_data(&c.stream, c.tag, EventSet::IN));
        }
    }

    /// One packet from the guest's transmit queue.
    fn handle_guest_packet(&mut self, h: Header, payload: &[u8], ops: &mut EventOps) {
        if h.kind != TYPE_STREAM || h.src_cid != self.cid || h.dst_cid != HOST_CID {
            if h.op != OP_RST {
                self.reset_to_guest(&h);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            if c.peer_credit() > 0 {
                c.credit_requested = false;
            }
        }
        self.handle_guest_op(key, &h, payload, ops);
        self.watch(key, ops);
    }

    fn handle_guest_op(&mut self, key: Key, h: &Header, payload: &[u8], ops: &mut EventOps) {
        match h.op {
            OP_REQUEST => self.guest_connects(key, h, ops),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reset_to_guest(h);
                    return;
                };
                if c.state == State::Connecting {
                    c.state = State::Established;
                    let _ = c.stream.write_all(format!("OK {}\n", key.0).as_bytes());
                }
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reset_to_guest(h);
                    return;
                };
                // More than the credit we gave: the guest broke the protocol.
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    self.send(key, OP_RST, 0, Vec::new());
                    self.close(key, ops);
                    return;
                }
                c.to_host.extend_from_slice(payload);
                self.flush_to_host(key, ops);
            }
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send(key, OP_CREDIT_UPDATE, 0, Vec::new());
                }
            }
            OP_CREDIT_UPDATE => {} // peer credit recorded above
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    self.send(key, OP_RST, 0, Vec::new());
                    self.close(key, ops);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    let both_done = match self.conns.get_mut(&key) {
                        Some(c) => {
                            c.guest_eof = true;
                            c.host_eof
                        }
                        None => false,
                    };
                    if both_done {
                        // Neither side sends any more: flush, then reset.
                        self.flush_to_host(key, ops);
                        self.send(key, OP_RST, 0, Vec::new());
                        self.close(key, ops);
                    } else {
                        self.flush_to_host(key, ops);
                    }
                }
            }
            OP_RST => self.close(key, ops),
            _ => {
                self.send(key, OP_RST, 0, Vec::new());
                self.close(key, ops);
            }
        }
    }

    /// The guest connects to host port `key.0`: connect to `<socket>_<port>`.
    fn guest_connects(&mut self, key: Key, h: &Header, ops: &mut EventOps) {
        if self.conns.contains_key(&key) {
            self.reset_to_guest(h);
            return;
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{}", key.0));
        match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => {
                let tag = self.next_tag;
                self.next_tag += 1;
                let mut c = Conn::new(stream, State::Established, tag);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                if ops
                    .add(Events::with_data(&c.stream, tag, EventSet::IN))
                    .is_err()
                {
                    self.reset_to_guest(h);
                    return;
                }
                self.conns.insert(key, c);
                self.send(key, OP_RESPONSE, 0, Vec::new());
            }
            _ => self.reset_to_guest(h),
        }
    }

    /// Writes buffered guest data to the host stream; watches for room if
    /// the stream is full, and tells the guest about freed credit.
    fn flush_to_host(&mut self, key: Key, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut broken = false;
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if c.guest_eof && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        let owe_update = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 4;
        if broken {
            self.send(key, OP_RST, 0, Vec::new());
            self.close(key, ops);
        } else if owe_update {
            self.send(key, OP_CREDIT_UPDATE, 0, Vec::new());
        }
        self.watch(key, ops);
    }

    /// Watches a connection's stream for what can make progress: IN while
    /// established with guest credit left and the host end open, OUT while
    /// guest data waits for room. (Level-triggered epoll would spin otherwise.)
    fn watch(&mut self, key: Key, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if c.state == State::Established && !c.host_eof && c.peer_credit() > 0 {
            want |= EventSet::IN;
        }
        if !c.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if want != c.watched
            && ops
                .modify(Events::with_data(&c.stream, c.tag, want))
                .is_ok()
        {
            c.watched = want;
        }
    }

    /// Host data on a connection's stream, within the guest's credit.
    fn read_from_host(&mut self, key: Key, ops: &mut EventOps) {
        loop {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            if c.state != State::Established || c.host_eof {
                return;
            }
            let room = c.peer_credit().min(MAX_PAYLOAD);
            if room == 0 {
                // Out of credit: ask once, and stop reading until it comes.
                if !c.credit_requested {
                    c.credit_requested = true;
                    self.send(key, OP_CREDIT_REQUEST, 0, Vec::new());
                }
                self.watch(key, ops);
                return;
            }
            let mut buf = vec![0u8; room];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    // The host closed its end: stop watching, tell the guest.
                    c.host_eof = true;
                    // Half close: the host sends no more, but may still
                    // read what the guest sends back.
                    self.send(key, OP_SHUTDOWN, SHUTDOWN_SEND, Vec::new());
                    self.watch(key, ops);
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.send(key, OP_RW, 0, buf);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.send(key, OP_RST, 0, Vec::new());
                    self.close(key, ops);
                    return;
                }
            }
        }
    }

    /// A new host connection: wait for its `CONNECT <port>` line.
    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let tag = self.next_tag;
            self.next_tag += 1;
            if ops
                .add(Events::with_data(&stream, tag, EventSet::IN))
                .is_ok()
            {
                self.pending_accept.push(Accepting {
                    stream,
                    line: Vec::new(),
                    tag,
                });
            }
        }
    }

    fn connect_line(&mut self, idx: usize, ops: &mut EventOps) {
        let a = &mut self.pending_accept[idx];
        let mut byte = [0u8; 1];
        let mut done = None;
        loop {
            match a.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    done = Some(true);
                    break;
                }
                Ok(1) if a.line.len() < 64 => a.line.push(byte[0]),
                Ok(_) => {
                    done = Some(false);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    done = Some(false);
                    break;
                }
            }
        }
        let Some(ok) = done else {
            return;
        };
        let a = self.pending_accept.swap_remove(idx);
        let port = std::str::from_utf8(&a.line)
            .ok()
            .and_then(|l| l.trim().strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (true, Some(port)) = (ok, port) else {
            let mut s = a.stream;
            let _ = s.write_all(b"ERROR expected CONNECT <port>\n");
            let _ = ops.remove(Events::with_data(&s, a.tag, EventSet::IN));
            return;
        };
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local, port);
        self.conns
            .insert(key, Conn::new(a.stream, State::Connecting, a.tag));
        self.send(key, OP_REQUEST, 0, Vec::new());
        self.watch(key, ops);
    }

    /// Moves queued packets into the guest's receive buffers. A data packet
    /// larger than the buffer at hand is split (drivers post small buffers:
    /// Linux uses 4 KiB); a buffer too small even for a header is returned
    /// empty.
    /// Posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, if one
    /// is due and the driver gave us a buffer for it: the driver then drops
    /// its connections and re-reads the guest CID.
    fn announce(&mut self) {
        let Some(evq) = self.evq.as_mut().filter(|_| self.announce_reset) else {
            return;
        };
        let mem = &self.mem;
        let Some(chain) = pop_or_rearm(&mut evq.queue, mem) else {
            return;
        };
        let head = chain.head_index();
        let mut written = 0;
        if let Ok(mut w) = chain.writer(mem) {
            if w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok() {
                written = 4;
            }
        }
        let _ = evq.queue.add_used(mem, head, written);
        self.announce_reset = false;
        if evq.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(evq.vector);
        }
    }

    fn fill_rx(&mut self) {
        let mem = &self.mem;
        let mut any = false;
        while let Some((h, payload)) = self.to_guest.front_mut() {
            let Some(chain) = pop_or_rearm(&mut self.rx.queue, mem) else {
                break;
            };
            let head = chain.head_index();
            let (written, taken) = rx_packet(mem, chain, h, payload);
            payload.drain(..taken);
            let _ = self.rx.queue.add_used(mem, head, written as u32);
            any = true;
            if written > 0 && payload.is_empty() {
                self.to_guest.pop_front();
            }
        }
        if any && self.rx.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.rx.vector);
        }
    }

    fn drain_tx(&mut self, ops: &mut EventOps) {
        let mut packets = Vec::new();
        let mem = self.mem.clone();
        let mut any = false;
        while let Some(chain) = pop_or_rearm(&mut self.tx.queue, &mem) {
            let head = chain.head_index();
            if let Some(p) = tx_packet(&mem, chain) {
                packets.push(p);
            }
            let _ = self.tx.queue.add_used(&mem, head, 0);
            any = true;
        }
        if any && self.tx.queue.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_queue(self.tx.vector);
        }
        for (h, p) in packets {
            self.handle_guest_packet(h, &p, ops);
        }
    }

    fn key_of_tag(&self, tag: u32) -> Option<Key> {
        self.conns
            .iter()
            .find(|(_, c)| c.tag == tag)
            .map(|(k, _)| *k)
    }
}

impl QueueWorker for VsockHandler {
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue)) {
        f(&self.rx);
        f(&self.tx);
        if let Some(q) = &self.evq {
            f(q);
        }
    }
}

impl MutEventSubscriber for VsockHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_RX => {
                let _ = self.rx.notify.read();
            }
            TAG_TX => {
                let _ = self.tx.notify.read();
                self.drain_tx(ops);
            }
            TAG_EVQ => {
                if let Some(q) = &self.evq {
                    let _ = q.notify.read();
                }
                self.announce();
            }
            TAG_LISTENER => self.accept(ops),
            tag => {
                if let Some(i) = self.pending_accept.iter().position(|a| a.tag == tag) {
                    self.connect_line(i, ops);
                } else if let Some(key) = self.key_of_tag(tag) {
                    if events.event_set().contains(EventSet::OUT) {
                        self.flush_to_host(key, ops);
                    }
                    if events.event_set().contains(EventSet::IN) {
                        self.read_from_host(key, ops);
                    }
                    if events.event_set().contains(EventSet::HANG_UP)
                        && !events.event_set().contains(EventSet::IN)
                    {
                        self.send(key, OP_RST, 0, Vec::new());
                        self.close(key, ops);
                    }
                }
            }
        }
        self.fill_rx();
    }

    fn init(&mut self, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let mut fds = vec![
            (self.rx.notify.as_raw_fd(), TAG_RX),
            (self.tx.notify.as_raw_fd(), TAG_TX),
            (self.listener.as_raw_fd(), TAG_LISTENER),
        ];
        if let Some(q) = &self.evq {
            fds.push((q.notify.as_raw_fd(), TAG_EVQ));
        }
        for (fd, tag) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                tracing::error!("virtio-vsock: cannot watch fd (tag {tag}): {e:?}");
            }
        }
        self.announce();
        self.drain_tx(ops);
        self.fill_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_short_ones_are_refused() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 7,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 99,
        };
        assert_eq!(Header::parse(&h.bytes()), Some(h));
        assert_eq!(Header::parse(&h.bytes()[..43]), None);
    }

    #[test]
    fn credit_is_what_the_peer_has_left() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Established, 16);
        assert_eq!(c.peer_credit(), 0, "nothing advertised yet");
        c.peer_buf_alloc = 1000;
        c.tx_cnt = 600;
        c.peer_fwd_cnt = 100;
        assert_eq!(c.peer_credit(), 500);
        c.tx_cnt = 5; // wrapped counters
        c.peer_fwd_cnt = u32::MAX - 10;
        assert_eq!(c.peer_credit(), 1000 - 16);
        c.peer_fwd_cnt = 0;
        c.tx_cnt = 2000; // peer over-committed: no credit, never negative
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn reserved_cids_and_busy_sockets_are_refused() {
        let dir = std::env::temp_dir().join(format!("ffmk-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let io = crate::virtio::IoThread::spawn("test-io", || {
            sandbox::seccomp::confine(sandbox::ThreadKind::Io, "io").map_err(|e| e.to_string())
        })
        .unwrap();
        let cfg = |cid| VsockConfig {
            cid,
            socket: dir.join("v.sock"),
        };
        assert!(matches!(
            Vsock::new(cfg(2), io.endpoint()),
            Err(VsockError::Cid(2))
        ));
        let v = Vsock::new(cfg(3), io.endpoint()).unwrap();
        assert!(matches!(
            Vsock::new(cfg(4), io.endpoint()),
            Err(VsockError::InUse(_))
        ));
        drop(v);
        assert!(
            !dir.join("v.sock").exists(),
            "socket removed with the device"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
