//! A vfio-user client: a PCI function served by another process over a
//! Unix socket, as a [`Backend`] for [`crate::Passthrough`].
//!
//! Requests (region reads and writes from vCPUs, interrupt set-up) wait
//! for their reply with a timeout; a reader thread takes every message
//! the server sends: replies go to whoever waits for them, and the
//! server's own requests - DMA reads and writes of guest memory - are
//! served against [`GuestDma`], which refuses anything outside guest RAM.
//! The server never gets a descriptor of guest memory. A server that
//! breaks the protocol (a bad size, a short reply, no reply) makes the
//! device read as all ones from then on, with one log line; the VM runs on.
use super::wire::{self, Header, Message, Reader, WireError, Writer};
use crate::backend::{Backend, Mapping, RegionInfo, CONFIG_REGION};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// Largest BAR a server may declare (the 64-bit PCI window is 64 GiB).
const MAX_BAR: u64 = 1 << 36;
/// Interrupt indices a PCI function has (INTx, MSI, MSI-X, error, request).
const IRQ_INDICES: u32 = 5;
const EFAULT: u32 = 14;
const ENOTSUP: u32 = 95;

/// Guest memory as a device served elsewhere may reach it.
pub trait GuestDma: Send + Sync {
    /// Copies guest RAM at `gpa` into `buf`; Err if any of it is not RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam>;
}

/// A DMA that reaches outside guest RAM (refused, nothing copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not guest RAM ({len} bytes at {gpa:#x})")]
pub struct NotRam {
    pub gpa: u64,
    pub len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the vfio-user server at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vfio-user server {path}: {msg}")]
    Protocol { path: PathBuf, msg: String },
}

struct Shared {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u16, mpsc::Sender<Message>>>,
    next_id: AtomicU16,
    broken: Mutex<Option<String>>,
    /// Set when we close the connection ourselves (no error then).
    closing: std::sync::atomic::AtomicBool,
    /// On the guest's bus: failures are logged (before, they are returned).
    live: std::sync::atomic::AtomicBool,
    timeout: Duration,
    dma_refused: AtomicU64,
    dma_bytes: AtomicU64,
}

impl Shared {
    fn break_with(&self, why: String) {
        let Ok(mut b) = self.broken.lock() else {
            return;
        };
        if b.is_none() {
            if self.live.load(Ordering::Acquire) && !self.closing.load(Ordering::Acquire) {
                tracing::error!(
                    "vfio-user server {}: {why}; the device reads as all ones from now on",
                    self.path.display()
                );
            }
            *b = Some(why);
        }
        // Whoever waits gets a disconnected channel.
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }

    fn reply(&self, to: &Header, payload: &[u8], error: Option<u32>) {
        let h = Header {
            id: to.id,
            command: to.command,
            flags: wire::FLAG_REPLY | error.map_or(0, |_| wire::FLAG_ERROR),
            error: error.unwrap_or(0),
            size: 0,
        };
        let r = match self.writer.lock() {
            Ok(w) => wire::send(&w, h, payload, &[]),
            Err(_) => return,
        };
        if let Err(e) = r {
            self.break_with(format!("cannot reply: {e}"));
        }
    }
}

/// A function served over vfio-user.
pub struct VfioUser {
    shared: Arc<Shared>,
    regions: Vec<Option<RegionInfo>>,
    irqs: Vec<u32>,
    resettable: bool,
    reader: Option<JoinHandle<()>>,
}

fn command_name(c: u16) -> &'static str {
    match c {
        wire::VERSION => "VERSION",
        wire::DEVICE_GET_INFO => "DEVICE_GET_INFO",
        wire::DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        wire::DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        wire::DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        wire::REGION_READ => "REGION_READ",
        wire::REGION_WRITE => "REGION_WRITE",
        wire::DEVICE_RESET => "DEVICE_RESET",
        wire::DMA_MAP => "DMA_MAP",
        wire::DMA_UNMAP => "DMA_UNMAP",
        _ => "a command",
    }
}

impl VfioUser {
    /// Connects, negotiates the version and reads the device's regions
    /// and interrupts. `dma` serves the server's DMA; `timeout` bounds
    /// every wait for a reply.
    pub fn connect(
        path: &Path,
        dma: Arc<dyn GuestDma>,
        timeout: Duration,
    ) -> Result<VfioUser, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.into(),
            source,
        })?;
        Self::from_stream(stream, path, dma, timeout)
    }

    /// As [`VfioUser::connect`], on a connected stream (`path` names the
    /// server in messages).
    pub fn from_stream(
        stream: UnixStream,
        path: &Path,
        dma: Arc<dyn GuestDma>,
        timeout: Duration,
    ) -> Result<VfioUser, Error> {
        let proto = |msg: String| Error::Protocol {
            path: path.into(),
            msg,
        };
        let reader_stream = stream
            .try_clone()
            .map_err(|e| proto(format!("cannot clone the socket: {e}")))?;
        let shared = Arc::new(Shared {
            path: path.into(),
            writer: Mutex::new(stream),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU16::new(0),
            broken: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            live: std::sync::atomic::AtomicBool::new(false),
            timeout,
            dma_refused: AtomicU64::new(0),
            dma_bytes: AtomicU64::new(0),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("vfio-user".into())
            .spawn(move || read_loop(&s, &reader_stream, &*dma))
            .map_err(|e| proto(format!("cannot start its reader thread: {e}")))?;
        let mut dev = VfioUser {
            shared,
            regions: Vec::new(),
            irqs: Vec::new(),
            resettable: false,
            reader: Some(reader),
        };
        dev.negotiate().map_err(proto)?;
        Ok(dev)
    }

    fn request(&self, command: u16, payload: &[u8], fds: &[RawFd]) -> Result<Message, String> {
        if let Some(why) = self.shared.broken() {
            return Err(why);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.shared
            .pending
            .lock()
            .map_err(|_| "lock poisoned".to_string())?
            .insert(id, tx);
        let h = Header {
            id,
            command,
            ..Default::default()
        };
        let sent = match self.shared.writer.lock() {
            Ok(w) => wire::send(&w, h, payload, fds),
            Err(_) => return Err("lock poisoned".into()),
        };
        if let Err(e) = sent {
            let why = format!("cannot send {}: {e}", command_name(command));
            self.shared.break_with(why.clone());
            return Err(why);
        }
        let name = command_name(command);
        let m = match rx.recv_timeout(self.shared.timeout) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = format!(
                    "no reply to {name} within {} ms",
                    self.shared.timeout.as_millis()
                );
                self.shared.break_with(why.clone());
                return Err(why);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(self
                    .shared
                    .broken()
                    .unwrap_or_else(|| "disconnected".into()))
            }
        };
        if m.header.command != command {
            let why = format!(
                "reply to {name} carries command {} instead",
                m.header.command
            );
            self.shared.break_with(why.clone());
            return Err(why);
        }
        if m.header.flags & wire::FLAG_ERROR != 0 {
            return Err(format!(
                "{name} failed on the server (errno {})",
                m.header.error
            ));
        }
        Ok(m)
    }

    fn negotiate(&mut self) -> Result<(), String> {
        let caps = b"{\"capabilities\":{\"max_msg_fds\":2048,\"max_data_xfer_size\":1048576}}\0";
        let v = Writer::default().u16(0).u16(1).bytes(caps).0;
        let m = self.request(wire::VERSION, &v, &[])?;
        let mut r = Reader::new("VERSION reply", &m.payload);
        let (major, minor) = (r.u16().map_err(s)?, r.u16().map_err(s)?);
        if major != 0 {
            return Err(format!(
                "speaks vfio-user {major}.{minor}; this client speaks 0.1"
            ));
        }
        let info = Writer::default().u32(16).u32(0).u32(0).u32(0).0;
        let m = self.request(wire::DEVICE_GET_INFO, &info, &[])?;
        let mut r = Reader::new("DEVICE_GET_INFO reply", &m.payload);
        let [_argsz, flags, nregions, nirqs] = r.u32s().map_err(s)?;
        if flags & wire::DEVICE_FLAGS_PCI == 0 {
            return Err("the device is not a PCI device".into());
        }
        if !(CONFIG_REGION + 1..=64).contains(&nregions) {
            return Err(format!(
                "{nregions} regions (a PCI device has {} to 64)",
                CONFIG_REGION + 1
            ));
        }
        self.resettable = flags & wire::DEVICE_FLAGS_RESET != 0;
        for index in 0..=CONFIG_REGION {
            let q = Writer::default()
                .u32(32)
                .u32(0)
                .u32(index)
                .u32(0)
                .u64(0)
                .u64(0)
                .0;
            let m = self.request(wire::DEVICE_GET_REGION_INFO, &q, &[])?;
            let mut r = Reader::new("DEVICE_GET_REGION_INFO reply", &m.payload);
            let [_argsz, rflags, rindex, _cap] = r.u32s().map_err(s)?;
            let size = r.u64().map_err(s)?;
            if rindex != index {
                return Err(format!("asked for region {index}, got region {rindex}"));
            }
            let bad = |why: &str| Err(format!("region {index} has size {size:#x}: {why}"));
            if index == CONFIG_REGION && !(256..=4096).contains(&size) {
                return bad("configuration space is 256 to 4096 bytes");
            }
            if index < CONFIG_REGION && size > MAX_BAR {
                return bad("larger than the 64 GiB the guest's PCI window has");
            }
            // Descriptors for mmap are not used: every access is forwarded.
            self.regions.push((size > 0).then_some(RegionInfo {
                size,
                readable: rflags & wire::REGION_READ_FLAG != 0,
                writable: rflags & wire::REGION_WRITE_FLAG != 0,
                mappable: Vec::new(),
            }));
        }
        for index in 0..nirqs.min(IRQ_INDICES) {
            let q = Writer::default().u32(16).u32(0).u32(index).u32(0).0;
            let m = self.request(wire::DEVICE_GET_IRQ_INFO, &q, &[])?;
            let mut r = Reader::new("DEVICE_GET_IRQ_INFO reply", &m.payload);
            let [_argsz, _flags, rindex, count] = r.u32s().map_err(s)?;
            if rindex != index || count > 2048 {
                return Err(format!(
                    "interrupt index {index}: index {rindex}, {count} vectors"
                ));
            }
            self.irqs.push(count);
        }
        Ok(())
    }

    /// DMA the server asked for and got (bytes), and requests refused
    /// because they reached outside guest RAM.
    pub fn dma_counters(&self) -> (u64, u64) {
        (
            self.shared.dma_bytes.load(Ordering::Relaxed),
            self.shared.dma_refused.load(Ordering::Relaxed),
        )
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

fn s(e: WireError) -> String {
    e.to_string()
}

impl Drop for VfioUser {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Ok(w) = self.shared.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// The reader thread: replies to whoever waits, DMA served, anything else
/// refused; ends when the connection does.
fn read_loop(shared: &Shared, stream: &UnixStream, dma: &dyn GuestDma) {
    // The server's input is handled under the I/O threads' filter.
    if let Err(e) = sandbox::seccomp::confine(sandbox::ThreadKind::Io, "vfio-user") {
        shared.break_with(format!("cannot confine the reader thread: {e}"));
        return;
    }
    loop {
        let m = match wire::recv(stream) {
            Ok(m) => m,
            Err(WireError::Closed) => {
                shared.break_with("the server closed the connection".into());
                return;
            }
            Err(e) => {
                shared.break_with(e.to_string());
                return;
            }
        };
        if m.header.is_reply() {
            let waiter = shared
                .pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&m.header.id));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(m);
                }
                None => tracing::warn!(
                    "vfio-user server {}: a reply nobody asked for (id {}); ignored",
                    shared.path.display(),
                    m.header.id
                ),
            }
            continue;
        }
        serve(shared, &m, dma);
    }
}

/// A request from the server: DMA_READ or DMA_WRITE of guest memory.
fn serve(shared: &Shared, m: &Message, dma: &dyn GuestDma) {
    let mut r = Reader::new("DMA request", &m.payload);
    let (addr, count) = match (r.u64(), r.u64()) {
        (Ok(a), Ok(c)) => (a, c),
        _ => return shared.reply(&m.header, &[], Some(EFAULT)),
    };
    let refuse = |why: String| {
        let n = shared.dma_refused.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            tracing::warn!("vfio-user server {}: {why}; refused", shared.path.display());
        }
        shared.reply(&m.header, &[], Some(EFAULT));
    };
    let max = (wire::MAX_PAYLOAD - 16) as u64;
    match m.header.command {
        wire::DMA_READ if count <= max => {
            let mut data = vec![0u8; count as usize];
            match dma.read(addr, &mut data) {
                Ok(()) => {
                    shared.dma_bytes.fetch_add(count, Ordering::Relaxed);
                    let p = Writer::default().u64(addr).u64(count).bytes(&data).0;
                    shared.reply(&m.header, &p, None);
                }
                Err(e) => refuse(format!("DMA read of {count} bytes at {addr:#x}: {e}")),
            }
        }
        wire::DMA_WRITE if count <= max => {
            let data = r.rest();
            if data.len() as u64 != count {
                return refuse(format!(
                    "DMA write announces {count} bytes, carries {}",
                    data.len()
                ));
            }
            match dma.write(addr, data) {
                Ok(()) => {
                    shared.dma_bytes.fetch_add(count, Ordering::Relaxed);
                    let p = Writer::default().u64(addr).u64(count).0;
                    shared.reply(&m.header, &p, None);
                }
                Err(e) => refuse(format!("DMA write of {count} bytes at {addr:#x}: {e}")),
            }
        }
        wire::DMA_READ | wire::DMA_WRITE => refuse(format!("DMA of {count} bytes (at most {max})")),
        other => {
            tracing::warn!(
                "vfio-user server {}: sent command {other}, which a server may not send",
                shared.path.display()
            );
            shared.reply(&m.header, &[], Some(ENOTSUP));
        }
    }
}

impl Backend for VfioUser {
    fn describe(&self) -> String {
        format!("vfio-user {}", self.shared.path.display())
    }

    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).cloned().flatten()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let q = Writer::default()
            .u64(offset)
            .u32(index)
            .u32(data.len() as u32)
            .0;
        let Ok(m) = self.request(wire::REGION_READ, &q, &[]) else {
            return;
        };
        let mut r = Reader::new("REGION_READ reply", &m.payload);
        let ok = r.u64().ok() == Some(offset)
            && r.u32().ok() == Some(index)
            && r.u32().ok() == Some(data.len() as u32);
        match r.bytes(data.len()) {
            Ok(b) if ok => data.copy_from_slice(b),
            _ => self.shared.break_with(format!(
                "a short or mismatched REGION_READ reply ({} bytes for {} asked at {offset:#x} of region {index})",
                m.payload.len(),
                data.len()
            )),
        }
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        let q = Writer::default()
            .u64(offset)
            .u32(index)
            .u32(data.len() as u32)
            .bytes(data)
            .0;
        let _ = self.request(wire::REGION_WRITE, &q, &[]);
    }

    fn map(&self, _index: u32, _offset: u64, _len: u64) -> io::Result<Mapping> {
        Err(io::Error::other("vfio-user regions are not mapped"))
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.irqs.get(index as usize).copied().unwrap_or(0)
    }

    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let q = Writer::default()
            .u32(20)
            .u32(wire::IRQ_DATA_EVENTFD | wire::IRQ_ACTION_TRIGGER)
            .u32(index)
            .u32(0)
            .u32(raw.len() as u32)
            .0;
        self.request(wire::DEVICE_SET_IRQS, &q, &raw)
            .map(|_| ())
            .map_err(io::Error::other)
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        let q = Writer::default()
            .u32(20)
            .u32(wire::IRQ_DATA_NONE | wire::IRQ_ACTION_TRIGGER)
            .u32(index)
            .u32(0)
            .u32(0)
            .0;
        self.request(wire::DEVICE_SET_IRQS, &q, &[])
            .map(|_| ())
            .map_err(io::Error::other)
    }

    fn reset(&self) {
        if self.resettable {
            let _ = self.request(wire::DEVICE_RESET, &[], &[]);
        }
    }

    fn failure(&self) -> Option<String> {
        self.shared.broken()
    }

    fn attached(&self) {
        self.shared.live.store(true, Ordering::Release);
    }
}
