//! `task=blk op=read|copy|bench [disk=N]`: drives a virtio-blk disk from
//! ring 3.
//! - read: reads the whole disk, prints `bytes=N crc32=XXXXXXXX` (zlib's CRC-32);
//! - copy: copies the first half of the disk over the second half;
//! - bench: reads the disk `passes=P` times, prints `read_mib_s=` and
//!   `requests=`, then writes it once, prints `write_mib_s=`;
//! - watch: waits (up to `timeout_ms=`, default 30000) for a
//!   configuration-change interrupt (ISR bit 1) that grows the disk, prints
//!   `resized_sectors=N isr=I generation=G`, then reads the new last sector.
//!
//! - stress: `ops=N [hz=50] [blocks=64]`: op i writes 4 KiB of data
//!   derived from i to block mix(i) % blocks, reads it back and compares,
//!   then prints `counter=i` (one op per tick); at the end every block is
//!   read once more and must hold its last write (`blk_verified=K`). For
//!   snapshot and migration tests: queue state that does not survive
//!   shows up as a timeout, a mismatch or a gap in the counter.
//!
//! A request the device fails ends the task with status 102.
use crate::boot::{Args, BootInfo};
use crate::virtio::{self, Device, Queue};
use crate::{println, time, STATUS_PROBE_ERROR};

pub const STATUS_IO_ERROR: u8 = 102;
const SECTOR: u64 = 512;
const CHUNK: u64 = 256 << 10;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// How long one request may take before the task gives up.
const TIMEOUT_US: u64 = 5_000_000;

struct Blk {
    dev: Device,
    queue: Queue,
    header: u64,
    status: u64,
    buf: u64,
    sectors: u64,
}

impl Blk {
    fn request(&mut self, kind: u32, sector: u64, len: u64) -> bool {
        // SAFETY: `header` and `status` point into memory the task took.
        unsafe {
            core::ptr::write_volatile(self.header as *mut u32, kind);
            core::ptr::write_volatile((self.header + 4) as *mut u32, 0);
            core::ptr::write_volatile((self.header + 8) as *mut u64, sector);
            core::ptr::write_volatile(self.status as *mut u8, 0xff);
        }
        let used = self.queue.submit(
            &[
                (self.header, 16, false),
                (self.buf, len as u32, kind == T_IN),
                (self.status, 1, true),
            ],
            TIMEOUT_US,
        );
        // SAFETY: as above.
        let status = unsafe { core::ptr::read_volatile(self.status as *const u8) };
        if used.is_none() || status != 0 {
            println!("blk_error=status {status} sector={sector} kind={kind}");
            return false;
        }
        true
    }

    fn buf(&self, len: u64) -> &[u8] {
        // SAFETY: `buf` is CHUNK bytes of memory the task took.
        unsafe { core::slice::from_raw_parts(self.buf as *const u8, len as usize) }
    }
}

fn open(info: &mut BootInfo, args: &Args) -> Result<Blk, u8> {
    let index = args.num("disk", 0) as usize;
    let ecam = info.ecam_base();
    let Some(f) = virtio::find(ecam, 2, index) else {
        println!("probe: error: no virtio-blk disk {index}");
        return Err(STATUS_PROBE_ERROR);
    };
    let dev = Device::open(f, 0).map_err(|e| {
        println!("probe: error: virtio-blk: {e:?}");
        STATUS_PROBE_ERROR
    })?;
    let Some(mem) = info.take(CHUNK + Queue::bytes(16) + 0x2000) else {
        println!("probe: error: no memory for the disk buffers");
        return Err(STATUS_PROBE_ERROR);
    };
    let queue = dev.setup_queue(0, 16, mem).map_err(|e| {
        println!("probe: error: virtio-blk queue: {e:?}");
        STATUS_PROBE_ERROR
    })?;
    dev.driver_ok();
    // SAFETY: the device configuration starts with the capacity (u64 sectors).
    let sectors = unsafe { core::ptr::read_volatile(dev.device_cfg as *const u64) };
    let header = mem + Queue::bytes(16);
    Ok(Blk {
        dev,
        queue,
        header,
        status: header + 64,
        buf: header + 0x1000,
        sectors,
    })
}

pub fn run(info: &mut BootInfo, args: &Args) -> u8 {
    let mut blk = match open(info, args) {
        Ok(b) => b,
        Err(s) => return s,
    };
    let bytes = blk.sectors * SECTOR;
    println!("blk_sectors={}", blk.sectors);
    match args.get("op").unwrap_or("read") {
        "read" => {
            let mut crc = Crc32::new();
            let mut at = 0;
            while at < bytes {
                let len = CHUNK.min(bytes - at);
                if !blk.request(T_IN, at / SECTOR, len) {
                    return STATUS_IO_ERROR;
                }
                crc.update(blk.buf(len));
                at += len;
            }
            println!("bytes={bytes}");
            println!("crc32={:08x}", crc.finish());
            0
        }
        "copy" => {
            let half = bytes / 2 / SECTOR * SECTOR;
            let mut at = 0;
            while at < half {
                let len = CHUNK.min(half - at);
                if !blk.request(T_IN, at / SECTOR, len)
                    || !blk.request(T_OUT, (half + at) / SECTOR, len)
                {
                    return STATUS_IO_ERROR;
                }
                at += len;
            }
            println!("copied={half}");
            0
        }
        "bench" => {
            let passes = args.num("passes", 4);
            let t0 = time::now_us();
            let mut requests = 0u64;
            for _ in 0..passes {
                let mut at = 0;
                while at < bytes {
                    let len = CHUNK.min(bytes - at);
                    if !blk.request(T_IN, at / SECTOR, len) {
                        return STATUS_IO_ERROR;
                    }
                    requests += 1;
                    at += len;
                }
            }
            let us = time::now_us().saturating_sub(t0).max(1);
            println!("requests={requests}");
            println!("read_mib_s={}", (passes * bytes * 1_000_000 / us) >> 20);
            let t1 = time::now_us();
            let mut at = 0;
            while at < bytes {
                let len = CHUNK.min(bytes - at);
                if !blk.request(T_OUT, at / SECTOR, len) {
                    return STATUS_IO_ERROR;
                }
                at += len;
            }
            let us = time::now_us().saturating_sub(t1).max(1);
            println!("write_mib_s={}", (bytes * 1_000_000 / us) >> 20);
            0
        }
        "watch" => watch(&mut blk, args.num("timeout_ms", 30_000)),
        "stress" => stress(&mut blk, info, args),
        other => {
            println!("probe: error: unknown blk op '{other}' (read, copy, bench, watch, stress)");
            STATUS_PROBE_ERROR
        }
    }
}

const BLOCK: u64 = 4096;

fn stress_word(op: u64, word: u64) -> u64 {
    super::mix((op << 16) ^ word)
}

/// Writes `op`'s data to `buf` (BLOCK bytes).
fn fill_block(buf: u64, op: u64) {
    for w in 0..BLOCK / 8 {
        // SAFETY: `buf` is BLOCK bytes of the task's disk buffer.
        unsafe { core::ptr::write_volatile((buf + w * 8) as *mut u64, stress_word(op, w)) };
    }
}

/// Whether `buf` holds `op`'s data.
fn block_holds(buf: u64, op: u64) -> bool {
    // SAFETY: as in `fill_block`.
    (0..BLOCK / 8).all(
        |w| unsafe { core::ptr::read_volatile((buf + w * 8) as *const u64) } == stress_word(op, w),
    )
}

fn stress(blk: &mut Blk, info: &mut BootInfo, args: &Args) -> u8 {
    let ops = args.num("ops", 100);
    let hz = args.num("hz", 50);
    let blocks = args
        .num("blocks", 64)
        .clamp(1, blk.sectors * SECTOR / BLOCK);
    let last = super::buffer(info, "stress block table", blocks * 8) as *mut u64;
    for b in 0..blocks {
        // SAFETY: `last` holds `blocks` u64s carved for this task.
        unsafe { core::ptr::write_volatile(last.add(b as usize), 0) };
    }
    let per_block = BLOCK / SECTOR;
    let mut tick = super::counter::Ticker::new(hz);
    for op in 1..=ops {
        let b = super::mix(op) % blocks;
        fill_block(blk.buf, op);
        if !blk.request(T_OUT, b * per_block, BLOCK) {
            return STATUS_IO_ERROR;
        }
        // Read into the second page of the buffer, then compare.
        let saved = blk.buf;
        blk.buf += BLOCK;
        let ok = blk.request(T_IN, b * per_block, BLOCK);
        blk.buf = saved;
        if !ok {
            return STATUS_IO_ERROR;
        }
        if !block_holds(blk.buf + BLOCK, op) {
            println!("blk_mismatch=op {op} block {b}");
            return STATUS_IO_ERROR;
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(last.add(b as usize), op) };
        println!("counter={op}");
        tick.wait();
    }
    let mut verified = 0;
    for b in 0..blocks {
        // SAFETY: as above.
        let op = unsafe { core::ptr::read_volatile(last.add(b as usize)) };
        if op == 0 {
            continue;
        }
        if !blk.request(T_IN, b * per_block, BLOCK) {
            return STATUS_IO_ERROR;
        }
        if !block_holds(blk.buf, op) {
            println!("blk_mismatch=final block {b} (last op {op})");
            return STATUS_IO_ERROR;
        }
        verified += 1;
    }
    println!("blk_verified={verified}");
    0
}

/// Polls the ISR for a configuration change, then re-reads the capacity and
/// proves the new end is readable.
fn watch(blk: &mut Blk, timeout_ms: u64) -> u8 {
    let generation = blk.dev.config_generation();
    println!("watching generation={generation}");
    let deadline = time::now_us() + timeout_ms * 1000;
    loop {
        let isr = blk.dev.take_isr();
        if isr & 2 != 0 {
            // Re-read until the generation is stable (virtio 1.x 4.1.4.3.1).
            let (sectors, generation) = loop {
                let g = blk.dev.config_generation();
                // SAFETY: the device configuration starts with the capacity.
                let s = unsafe { core::ptr::read_volatile(blk.dev.device_cfg as *const u64) };
                if g == blk.dev.config_generation() {
                    break (s, g);
                }
            };
            println!("resized_sectors={sectors} isr={isr} generation={generation}");
            if sectors <= blk.sectors {
                println!("probe: error: the capacity did not grow");
                return STATUS_PROBE_ERROR;
            }
            blk.sectors = sectors;
            if !blk.request(T_IN, sectors - 1, SECTOR) {
                return STATUS_IO_ERROR;
            }
            println!("read_new_end=ok");
            return 0;
        }
        if time::now_us() > deadline {
            println!("probe: error: no configuration change within {timeout_ms} ms");
            return STATUS_PROBE_ERROR;
        }
        time::delay_us(200);
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's crc32()).
struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Crc32 {
    fn new() -> Self {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *t = c;
        }
        Crc32 {
            table,
            value: 0xffff_ffff,
        }
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.value =
                self.table[((self.value ^ u32::from(b)) & 0xff) as usize] ^ (self.value >> 8);
        }
    }

    fn finish(&self) -> u32 {
        !self.value
    }
}
