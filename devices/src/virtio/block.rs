//! virtio-blk over a raw image file (virtio spec 5.2).
//!
//! Requests: read, write, flush, get ID, discard, write zeroes. Every
//! request is checked before it touches the file: the chain must have a
//! 16-byte header and a status byte, data lengths must be whole sectors and
//! at most [`MAX_REQUEST_BYTES`], the range must lie inside the disk, and a
//! read-only disk refuses every write. A malformed chain is completed with
//! no bytes written (the driver sees a missing status); the device and the
//! VM go on.
use super::ActivateError;
use super::{
    Activation, ActiveQueue, Endpoint, GuestMemory, Handlers, QueueWorker, VirtioDevice,
    VirtioInterrupt,
};
use super::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
use crate::rate_limiter::RateLimiter;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of one request (bounds the bounce buffer).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
pub const QUEUE_SIZE: u16 = 256;
const ID_BYTES: usize = 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain old data with no padding or invalid bit patterns.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: as for RequestHeader.
unsafe impl ByteValued for DiscardSegment {}

/// `--disk path=FILE[,readonly][,direct][,serial=ID][,queues=N][,bw=RATE][,iops=N]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub serial: Option<String>,
    pub queues: u16,
    /// Bandwidth limit in bytes/s (token bucket, one second of burst).
    pub bandwidth: Option<u64>,
    /// Operations limit in requests/s.
    pub iops: Option<u64>,
}

/// Why a disk could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("{0} bytes is not a positive whole number of 512-byte sectors")]
    NotSectors(u64),
    #[error(
        "shrinking is refused ({bytes} < current {current} bytes): the guest may have data there"
    )]
    Shrink { current: u64, bytes: u64 },
    #[error("cannot grow the image file: {0}")]
    Io(std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    NotSectors { path: PathBuf, size: u64 },
}

/// What a disk did, for `GET /vm`.
#[derive(Default, Debug)]
pub struct BlockStats {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// The backing file and what the guest is told about it.
pub struct Disk {
    file: File,
    /// Capacity in sectors; grows when the operator resizes the disk.
    sectors: AtomicU64,
    readonly: bool,
    id: [u8; ID_BYTES],
    pub stats: BlockStats,
}

impl Disk {
    pub fn open(c: &DiskConfig) -> Result<Disk, DiskError> {
        let err = |source| DiskError::Open {
            path: c.path.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(!c.readonly);
        if c.direct {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&c.path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if size == 0 {
            return Err(DiskError::Empty(c.path.clone()));
        }
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::NotSectors {
                path: c.path.clone(),
                size,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let serial = c.serial.clone().unwrap_or_else(|| default_serial(&c.path));
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Disk {
            file,
            sectors: AtomicU64::new(size / SECTOR_SIZE),
            readonly: c.readonly,
            id,
            stats: BlockStats::default(),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Acquire)
    }

    /// Grows the image file to `bytes` and the capacity the guest sees with
    /// it. Read-only disks, sizes that are not whole sectors and shrinking
    /// (the guest may have data there) are refused; nothing changes then.
    pub fn grow(&self, bytes: u64) -> Result<(), ResizeError> {
        if self.readonly {
            return Err(ResizeError::ReadOnly);
        }
        if bytes == 0 || bytes % SECTOR_SIZE != 0 {
            return Err(ResizeError::NotSectors(bytes));
        }
        let current = self.sectors() * SECTOR_SIZE;
        if bytes < current {
            return Err(ResizeError::Shrink { current, bytes });
        }
        self.file.set_len(bytes).map_err(ResizeError::Io)?;
        self.sectors.store(bytes / SECTOR_SIZE, Ordering::Release);
        Ok(())
    }

    /// Byte offset of `len` bytes at `sector`, if the range is inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let end = sector.checked_mul(SECTOR_SIZE)?.checked_add(len)?;
        (end <= self.sectors() * SECTOR_SIZE).then_some(sector * SECTOR_SIZE)
    }

    fn punch(&self, offset: u64, len: u64, zero: bool) -> std::io::Result<()> {
        let mode = if zero {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on our own file descriptor with checked bounds.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !zero {
            return Err(e);
        }
        // No ZERO_RANGE on this filesystem: write zeroes.
        let chunk = Bounce::new((len as usize).min(1 << 20));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len as u64) as usize;
            self.file
                .write_all_at(&chunk.as_ref()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A zeroed buffer of `len` bytes whose start is 4 KiB aligned, as
/// `O_DIRECT` needs (the same buffer works for buffered I/O).
struct Bounce {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Bounce {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> Bounce {
        let storage = vec![0u8; len + Self::ALIGN];
        let offset = storage.as_ptr().align_offset(Self::ALIGN);
        Bounce {
            storage,
            offset,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
}

/// The image's file name, cut to the 20 bytes of a virtio-blk ID.
fn default_serial(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().chars().take(ID_BYTES).collect())
        .unwrap_or_default()
}

/// Serves one request chain; returns how many bytes were written into the
/// guest's buffers (data and status), or None for a malformed chain.
pub fn serve_request<M>(disk: &Disk, mem: &GuestMemory, chain: DescriptorChain<M>) -> Option<u32>
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let mut reader = chain.clone().reader(mem).ok()?;
    let mut writer = chain.writer(mem).ok()?;
    let header: RequestHeader = reader.read_obj().ok()?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return None;
    }
    let mut status_writer = writer.split_at(writable - 1).ok()?;
    let (status, data_written) = execute(disk, header, &mut reader, &mut writer);
    let s = &disk.stats;
    s.requests.fetch_add(1, Ordering::Relaxed);
    match (status, header.kind) {
        (S_OK, T_IN) => s
            .read_bytes
            .fetch_add(data_written as u64, Ordering::Relaxed),
        (S_OK, T_OUT) => s
            .write_bytes
            .fetch_add(reader.bytes_read() as u64 - 16, Ordering::Relaxed),
        (S_OK, _) => 0,
        _ => s.errors.fetch_add(1, Ordering::Relaxed),
    };
    status_writer.write_all(&[status]).ok()?;
    Some(data_written as u32 + 1)
}

fn execute(
    disk: &Disk,
    h: RequestHeader,
    reader: &mut virtio_queue::Reader<
        '_,
        vm_memory::bitmap::BS<'_, vm_memory::bitmap::AtomicBitmap>,
    >,
    writer: &mut virtio_queue::Writer<
        '_,
        vm_memory::bitmap::BS<'_, vm_memory::bitmap::AtomicBitmap>,
    >,
) -> (u8, usize) {
    let readable = |r: &mut dyn Read| -> Vec<u8> {
        let mut v = Vec::new();
        let _ = r.take(MAX_REQUEST_BYTES as u64 + 1).read_to_end(&mut v);
        v
    };
    match h.kind {
        T_IN => {
            let len = writer.available_bytes();
            if len > MAX_REQUEST_BYTES || len as u64 % SECTOR_SIZE != 0 {
                return (S_IOERR, 0);
            }
            let Some(offset) = disk.range(h.sector, len as u64) else {
                return (S_IOERR, 0);
            };
            let mut buf = Bounce::new(len);
            if disk.file.read_exact_at(buf.as_mut(), offset).is_err() {
                return (S_IOERR, 0);
            }
            match writer.write_all(buf.as_ref()) {
                Ok(()) => (S_OK, len),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_OUT => {
            let len = reader.available_bytes();
            if disk.readonly || len > MAX_REQUEST_BYTES || len as u64 % SECTOR_SIZE != 0 {
                return (S_IOERR, 0);
            }
            let Some(offset) = disk.range(h.sector, len as u64) else {
                return (S_IOERR, 0);
            };
            let mut buf = Bounce::new(len);
            if reader.read_exact(buf.as_mut()).is_err() {
                return (S_IOERR, 0);
            }
            match disk.file.write_all_at(buf.as_ref(), offset) {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_FLUSH => match disk.file.sync_data() {
            Ok(()) => (S_OK, 0),
            Err(_) => (S_IOERR, 0),
        },
        T_GET_ID => {
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&disk.id[..n]) {
                Ok(()) => (S_OK, n),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.readonly {
                return (S_IOERR, 0);
            }
            let data = readable(reader);
            let seg = std::mem::size_of::<DiscardSegment>();
            if data.is_empty() || data.len() % seg != 0 {
                return (S_IOERR, 0);
            }
            for chunk in data.chunks_exact(seg) {
                let mut s = DiscardSegment::default();
                s.as_mut_slice().copy_from_slice(chunk);
                let len = u64::from(s.num_sectors) * SECTOR_SIZE;
                let Some(offset) = disk.range(s.sector, len) else {
                    return (S_IOERR, 0);
                };
                if disk.punch(offset, len, h.kind == T_WRITE_ZEROES).is_err() {
                    return (S_IOERR, 0);
                }
            }
            (S_OK, 0)
        }
        _ => (S_UNSUPP, 0),
    }
}

pub struct Block {
    disk: Arc<Disk>,
    config: DiskConfig,
    handlers: Handlers,
}

impl Block {
    pub fn new(config: DiskConfig, endpoint: Endpoint) -> Result<Block, DiskError> {
        Ok(Block {
            disk: Arc::new(Disk::open(&config)?),
            config,
            handlers: Handlers::new(endpoint),
        })
    }

    /// The disk, shared with the VMM (resize, statistics).
    pub fn disk(&self) -> Arc<Disk> {
        self.disk.clone()
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.config.queues.to_le_bytes());
        let max_sectors = (MAX_REQUEST_BYTES as u64 / SECTOR_SIZE) as u32;
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        2
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.config.queues.max(1))]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_F_RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_DISCARD
            | F_WRITE_ZEROES;
        if self.config.queues > 1 {
            f |= F_MQ;
        }
        if self.disk.readonly {
            f |= F_RO;
        }
        f
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        super::read_config(&c, offset, data);
    }

    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let limiter = RateLimiter::new(self.config.bandwidth, self.config.iops);
        let limiter = (!limiter.is_unlimited()).then(|| Arc::new(Mutex::new(limiter)));
        for q in a.queues {
            let timer = match &limiter {
                Some(_) => Some(TimerFd::new().map_err(|e| ActivateError::Host {
                    what: "rate-limit timer",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?),
                None => None,
            };
            let handler = QueueHandler {
                disk: self.disk.clone(),
                mem: a.mem.clone(),
                queue: q,
                interrupt: a.interrupt.clone(),
                limiter: limiter.clone(),
                timer,
                throttled: false,
            };
            self.handlers.start(Box::new(handler))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.handlers.stop_all();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.disk.stats;
        vec![
            ("requests", s.requests.load(Ordering::Relaxed)),
            ("read_bytes", s.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", s.write_bytes.load(Ordering::Relaxed)),
            ("errors", s.errors.load(Ordering::Relaxed)),
        ]
    }

    fn describe(&self) -> String {
        format!(
            "virtio-blk {}{}",
            self.config.path.display(),
            if self.disk.readonly {
                " (read-only)"
            } else {
                ""
            }
        )
    }
}

/// Serves one queue on the I/O thread.
struct QueueHandler {
    disk: Arc<Disk>,
    mem: GuestMemory,
    queue: ActiveQueue,
    interrupt: Arc<VirtioInterrupt>,
    /// Shared by the device's queues; `None` when the disk is unlimited.
    limiter: Option<Arc<Mutex<RateLimiter>>>,
    /// Armed while the limiter holds requests back.
    timer: Option<TimerFd>,
    throttled: bool,
}

const TAG_NOTIFY: u32 = 0;
const TAG_TIMER: u32 = 1;

impl QueueHandler {
    /// Asks the rate limiter for `bytes`; on "wait", arms the timer.
    fn admit(&mut self, bytes: u64) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let wait = match limiter.lock() {
            Ok(mut l) => l.consume(bytes),
            Err(_) => Ok(()),
        };
        match wait {
            Ok(()) => true,
            Err(d) => {
                if let Some(t) = self.timer.as_mut() {
                    if t.reset(d.max(Duration::from_micros(50)), None).is_ok() {
                        self.throttled = true;
                        return false;
                    }
                }
                true // no timer: do not stall the guest forever
            }
        }
    }

    /// Serves every request the ring holds. Notifications stay off while
    /// it works; [`super::pop_or_rearm`] turns them back on when the ring
    /// looks empty, and gives up on a ring it cannot read (an available
    /// index more than a queue's length ahead): such a ring waits for the
    /// driver's next notification instead of keeping the I/O thread busy.
    fn drain(&mut self) {
        if self.throttled {
            return;
        }
        let mem = self.mem.clone();
        if self.queue.queue.disable_notification(&mem).is_err() {
            return;
        }
        while let Some(chain) = super::pop_or_rearm(&mut self.queue.queue, &mem) {
            let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
            if !self.admit(bytes) {
                // Put the request back; the timer brings us here again.
                self.queue.queue.go_to_previous_position();
                return;
            }
            let q = &mut self.queue.queue;
            let head = chain.head_index();
            let len = serve_request(&self.disk, &mem, chain).unwrap_or_else(|| {
                tracing::warn!("virtio-blk: malformed request chain (head {head})");
                0
            });
            if q.add_used(&mem, head, len).is_err() {
                tracing::warn!("virtio-blk: cannot complete request {head}");
            }
            if q.needs_notification(&mem).unwrap_or(true) {
                self.interrupt.signal_queue(self.queue.vector);
            }
        }
    }
}

impl QueueWorker for QueueHandler {
    fn each_queue(&self, f: &mut dyn FnMut(&ActiveQueue)) {
        f(&self.queue);
    }
}

impl MutEventSubscriber for QueueHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TAG_TIMER => {
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.wait();
                }
                self.throttled = false;
            }
            _ => {
                let _ = self.queue.notify.read();
            }
        }
        self.drain();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let notify = Events::with_data(&self.queue.notify, TAG_NOTIFY, EventSet::IN);
        if let Err(e) = ops.add(notify) {
            tracing::error!("virtio-blk: cannot watch queue {}: {e:?}", self.queue.index);
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(t, TAG_TIMER, EventSet::IN)) {
                tracing::error!("virtio-blk: cannot watch the rate-limit timer: {e:?}");
                self.timer = None;
            }
        }
        // Requests queued before activation (or a notification we missed).
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A real split virtqueue in guest memory holding one chain made of
    /// `descs` = (addr, len, flags, next), head at descriptor 0.
    fn queue(mem: &GuestMemory, descs: &[(u64, u32, u16, u16)]) -> Queue {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = DESC + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap(); // ring[0] = head 0
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
        mem.write_obj(
            RequestHeader {
                kind,
                reserved: 0,
                sector,
            },
            GuestAddress(at),
        )
        .unwrap();
    }

    fn image(name: &str, sectors: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ffmk-blk-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn disk(path: &Path, readonly: bool) -> Disk {
        Disk::open(&DiskConfig {
            path: path.into(),
            readonly,
            direct: false,
            serial: Some("ffmk-serial".into()),
            queues: 1,
            bandwidth: None,
            iops: None,
        })
        .unwrap()
    }

    fn serve(mem: &GuestMemory, d: &Disk, descs: &[(u64, u32, u16, u16)]) -> Option<u32> {
        let mut q = queue(mem, descs);
        let chain = q.pop_descriptor_chain(mem).expect("one chain");
        serve_request(d, mem, chain)
    }

    fn status(mem: &GuestMemory, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn reads_land_in_guest_memory_with_status_ok() {
        let p = image("read", 8);
        let (d, m) = (disk(&p, false), mem());
        header(&m, 0x8000, T_IN, 1);
        m.write_obj(0xeeu8, GuestAddress(0x9800)).unwrap();
        let used = serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 1024, WRITE | NEXT, 2),
                (0x9800, 1, WRITE, 0),
            ],
        );
        assert_eq!(used, Some(1025));
        assert_eq!(status(&m, 0x9800), S_OK);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        let want = std::fs::read(&p).unwrap()[512..1536].to_vec();
        assert_eq!(got, want);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn writes_reach_the_file_unless_read_only() {
        let p = image("write", 8);
        let m = mem();
        header(&m, 0x8000, T_OUT, 2);
        m.write_slice(&[0x5a; 512], GuestAddress(0x9000)).unwrap();
        let chain = [
            (0x8000, 16, NEXT, 1),
            (0x9000, 512, NEXT, 2),
            (0x9800, 1, WRITE, 0),
        ];
        let before = std::fs::read(&p).unwrap();
        assert_eq!(serve(&m, &disk(&p, true), &chain), Some(1));
        assert_eq!(status(&m, 0x9800), S_IOERR);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "read-only image unchanged"
        );
        assert_eq!(serve(&m, &disk(&p, false), &chain), Some(1));
        assert_eq!(status(&m, 0x9800), S_OK);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(&after[1024..1536], &[0x5a; 512]);
        assert_eq!(&after[..1024], &before[..1024]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bad_requests_get_an_error_status_and_touch_nothing() {
        let p = image("bad", 4);
        let (d, m) = (disk(&p, false), mem());
        let before = std::fs::read(&p).unwrap();
        // Beyond the end of the disk (read and write).
        for kind in [T_IN, T_OUT] {
            header(&m, 0x8000, kind, 3);
            let data_flags = if kind == T_IN { WRITE | NEXT } else { NEXT };
            let used = serve(
                &m,
                &d,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x9000, 1024, data_flags, 2),
                    (0x9800, 1, WRITE, 0),
                ],
            );
            assert_eq!(used, Some(1));
            assert_eq!(status(&m, 0x9800), S_IOERR, "kind {kind}");
        }
        // Not a whole sector; sector number that overflows.
        header(&m, 0x8000, T_IN, 0);
        serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 100, WRITE | NEXT, 2),
                (0x9800, 1, WRITE, 0),
            ],
        );
        assert_eq!(status(&m, 0x9800), S_IOERR);
        header(&m, 0x8000, T_IN, u64::MAX / 2);
        serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 512, WRITE | NEXT, 2),
                (0x9800, 1, WRITE, 0),
            ],
        );
        assert_eq!(status(&m, 0x9800), S_IOERR);
        // Unknown request type.
        header(&m, 0x8000, 99, 0);
        serve(&m, &d, &[(0x8000, 16, NEXT, 1), (0x9800, 1, WRITE, 0)]);
        assert_eq!(status(&m, 0x9800), S_UNSUPP);
        assert_eq!(std::fs::read(&p).unwrap(), before);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn malformed_chains_are_refused_without_panicking() {
        let p = image("malformed", 4);
        let (d, m) = (disk(&p, false), mem());
        header(&m, 0x8000, T_IN, 0);
        // No status byte (nothing writable).
        assert_eq!(serve(&m, &d, &[(0x8000, 16, 0, 0)]), None);
        // Header shorter than 16 bytes.
        assert_eq!(
            serve(&m, &d, &[(0x8000, 8, NEXT, 1), (0x9800, 1, WRITE, 0)]),
            None
        );
        // Data buffer outside guest memory.
        assert_eq!(
            serve(
                &m,
                &d,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0xff_f000, 0x10_0000, WRITE | NEXT, 2),
                    (0x9800, 1, WRITE, 0)
                ]
            ),
            None
        );
        // A loop: descriptor 1 points at itself. The chain ends after the
        // queue size (15 x 512 writable bytes): the data part is then not
        // whole sectors, so the request fails with IOERR in the last byte.
        let r = serve(
            &m,
            &d,
            &[(0x8000, 16, NEXT, 1), (0x9000, 512, WRITE | NEXT, 1)],
        );
        assert_eq!(r, Some(1));
        assert_eq!(status(&m, 0x91ff), S_IOERR);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let p = image("misc", 16);
        let (d, m) = (disk(&p, false), mem());
        header(&m, 0x8000, T_GET_ID, 0);
        serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 20, WRITE | NEXT, 2),
                (0x9800, 1, WRITE, 0),
            ],
        );
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
        assert_eq!(&id[..11], b"ffmk-serial");
        for (kind, sector) in [(T_WRITE_ZEROES, 2u64), (T_DISCARD, 8)] {
            header(&m, 0x8000, kind, 0);
            m.write_obj(
                DiscardSegment {
                    sector,
                    num_sectors: 2,
                    flags: 0,
                },
                GuestAddress(0x9000),
            )
            .unwrap();
            serve(
                &m,
                &d,
                &[
                    (0x8000, 16, NEXT, 1),
                    (0x9000, 16, NEXT, 2),
                    (0x9800, 1, WRITE, 0),
                ],
            );
            assert_eq!(status(&m, 0x9800), S_OK, "kind {kind}");
            let after = std::fs::read(&p).unwrap();
            let at = (sector * SECTOR_SIZE) as usize;
            assert!(after[at..at + 1024].iter().all(|b| *b == 0), "kind {kind}");
            assert_ne!(after[at + 1024], 0, "next sector untouched");
        }
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            16 * SECTOR_SIZE,
            "size kept"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn direct_io_reads_and_writes_through_aligned_buffers() {
        // O_DIRECT needs a filesystem that supports it; /var/tmp usually does.
        let dir = std::path::Path::new("/var/tmp");
        let p = dir.join(format!("ffmk-blk-{}-direct", std::process::id()));
        let data: Vec<u8> = (0..8 * SECTOR_SIZE).map(|i| (i % 241) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let cfg = DiskConfig {
            path: p.clone(),
            readonly: false,
            direct: true,
            serial: None,
            queues: 1,
            bandwidth: None,
            iops: None,
        };
        let d = match Disk::open(&cfg) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: O_DIRECT not available here: {e}");
                let _ = std::fs::remove_file(&p);
                return;
            }
        };
        let m = mem();
        header(&m, 0x8000, T_IN, 0);
        serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0x9000, 4096, WRITE | NEXT, 2),
                (0xb000, 1, WRITE, 0),
            ],
        );
        assert_eq!(status(&m, 0xb000), S_OK);
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(&got[..], &data[..4096]);
        header(&m, 0x8000, T_OUT, 1);
        m.write_slice(&[0x77; 512], GuestAddress(0xa000)).unwrap();
        serve(
            &m,
            &d,
            &[
                (0x8000, 16, NEXT, 1),
                (0xa000, 512, NEXT, 2),
                (0xb000, 1, WRITE, 0),
            ],
        );
        assert_eq!(status(&m, 0xb000), S_OK);
        assert_eq!(&std::fs::read(&p).unwrap()[512..1024], &[0x77; 512]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn disks_grow_but_never_shrink_and_read_only_ones_stay() {
        let p = image("grow", 8);
        let d = disk(&p, false);
        for (bytes, refused) in [(2048, true), (4097, true), (0, true), (8192, false)] {
            let r = d.grow(bytes);
            assert_eq!(r.is_err(), refused, "{bytes}: {r:?}");
        }
        assert_eq!(d.sectors(), 16);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        assert_eq!(
            d.range(15, 512),
            Some(15 * 512),
            "the new end is addressable"
        );
        let ro = disk(&p, true);
        assert!(matches!(ro.grow(1 << 20), Err(ResizeError::ReadOnly)));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn images_that_are_not_disks_are_refused() {
        let dir = std::env::temp_dir();
        let cfg = |p: PathBuf| DiskConfig {
            path: p,
            readonly: false,
            direct: false,
            serial: None,
            queues: 1,
            bandwidth: None,
            iops: None,
        };
        let empty = dir.join(format!("ffmk-blk-{}-empty", std::process::id()));
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Disk::open(&cfg(empty.clone())),
            Err(DiskError::Empty(_))
        ));
        let odd = dir.join(format!("ffmk-blk-{}-odd", std::process::id()));
        std::fs::write(&odd, [0u8; 700]).unwrap();
        assert!(matches!(
            Disk::open(&cfg(odd.clone())),
            Err(DiskError::NotSectors { .. })
        ));
        assert!(matches!(
            Disk::open(&cfg(dir.join("ffmk-no-such-image"))),
            Err(DiskError::Open { .. })
        ));
        let d = Disk::open(&cfg(image("serial", 1))).unwrap();
        assert!(d.id.starts_with(b"ffmk-blk-"));
        std::fs::remove_file(empty).unwrap();
        std::fs::remove_file(odd).unwrap();
    }
}
