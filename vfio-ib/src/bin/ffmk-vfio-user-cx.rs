//! `ffmk-vfio-user-cx SOCKET [--hostile MODE]`: a vfio-user server shaped
//! like a ConnectX-6 virtual function, for tests and demos of ffmk-vmm's
//! vfio-user passthrough (`--device vfio-user=SOCKET`).
//!
//! The function: 15b3:101c, class 0207 (InfiniBand), BAR 0 64-bit
//! prefetchable 1 MiB, a PCI Express capability and MSI-X with 4 vectors
//! (table at BAR 0 + 0x2000, PBA at + 0x3000, as mlx5 lays them out).
//! BAR 0 registers: 0x000 firmware version (20.31.1014), 0x800 doorbell,
//! 0x808/0x80c completion queue address (low/high), 0x810 completions
//! written. A doorbell write of V makes the device DMA a 16-byte
//! completion {0xc0ffee01, V, sequence} into the next of 16 slots of the
//! queue (through the client: vfio-user DMA_WRITE) and then raise MSI-X
//! vector 0.
//!
//! Hostile modes, for the VMM's error paths: `bad-config-size` (a 16-byte
//! configuration space), `huge-bar` (a 1 TiB BAR), `short-read` (region
//! reads answered with too few bytes), `dma-outside` (completions aimed
//! at 1 TiB, outside any guest's RAM), `silent` (no reply after the
//! version), `bad-size` (a reply whose size field is 3), `hangup` (the
//! connection closed at the first BAR access).
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use vfio_ib::vfio_user::wire::{self, Header, Message, Reader, Writer};

const CONFIG_SIZE: usize = 256;
const BAR0_SIZE: u64 = 1 << 20;
const VECTORS: u32 = 4;
const DOORBELL: u64 = 0x800;
const CQ_LO: u64 = 0x808;
const CQ_HI: u64 = 0x80c;
const COMPLETIONS: u64 = 0x810;
const FW_VERSION: u32 = (20 << 16) | 31;
const CQE_MAGIC: u32 = 0xc0ff_ee01;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hostile {
    None,
    BadConfigSize,
    HugeBar,
    ShortRead,
    DmaOutside,
    Silent,
    BadSize,
    Hangup,
}

struct Device {
    config: [u8; CONFIG_SIZE],
    cq: u64,
    seq: u64,
    completions: u32,
    msix: Vec<File>,
    hostile: Hostile,
    next_id: u16,
    /// DMA writes sent, by message id: their sequence number.
    dma_pending: HashMap<u16, u64>,
}

fn config_space() -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |o: usize, b: &[u8]| c[o..o + b.len()].copy_from_slice(b);
    put(0x00, &0x15b3u16.to_le_bytes());
    put(0x02, &0x101cu16.to_le_bytes());
    put(0x06, &(1u16 << 4).to_le_bytes()); // capability list
    put(0x09, &[0x00, 0x07, 0x02]); // InfiniBand controller
    put(0x10, &0x0000_000cu32.to_le_bytes()); // 64-bit prefetchable
    put(0x2c, &0x15b3u16.to_le_bytes());
    put(0x2e, &0x0066u16.to_le_bytes());
    put(0x34, &[0x60]);
    // PCI Express: endpoint, version 2, FLR capable.
    put(0x60, &[0x10, 0x9c, 0x02, 0x00]);
    put(0x64, &(1u32 << 28).to_le_bytes());
    // MSI-X: 4 vectors, table BAR 0 + 0x2000, PBA BAR 0 + 0x3000.
    put(0x9c, &[0x11, 0x00]);
    put(0x9e, &((VECTORS - 1) as u16).to_le_bytes());
    put(0xa0, &0x2000u32.to_le_bytes());
    put(0xa4, &0x3000u32.to_le_bytes());
    c
}

impl Device {
    fn send(&mut self, s: &UnixStream, command: u16, payload: &[u8]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            id,
            command,
            ..Default::default()
        };
        let _ = wire::send(s, h, payload, &[]);
        id
    }

    fn reply(&self, s: &UnixStream, to: &Header, payload: &[u8]) {
        let h = Header {
            flags: wire::FLAG_REPLY,
            ..*to
        };
        if self.hostile == Hostile::BadSize && to.command != wire::VERSION {
            let mut bad = h;
            bad.size = 3;
            let _ = (&*s).write_all(&bad.encode());
            return;
        }
        let _ = wire::send(s, h, payload, &[]);
    }

    fn error(&self, s: &UnixStream, to: &Header, errno: u32) {
        let h = Header {
            flags: wire::FLAG_REPLY | wire::FLAG_ERROR,
            error: errno,
            ..*to
        };
        let _ = wire::send(s, h, &[], &[]);
    }

    fn bar0_read(&self, off: u64) -> u32 {
        match off {
            0x000 => FW_VERSION,
            0x004 => 1014,
            CQ_LO => self.cq as u32,
            CQ_HI => (self.cq >> 32) as u32,
            COMPLETIONS => self.completions,
            _ => 0,
        }
    }

    fn doorbell(&mut self, s: &UnixStream, value: u32) {
        let slot = self.seq % 16;
        let addr = if self.hostile == Hostile::DmaOutside {
            1 << 40
        } else {
            self.cq + slot * 16
        };
        let cqe = Writer::default().u32(CQE_MAGIC).u32(value).u64(self.seq).0;
        let p = Writer::default().u64(addr).u64(16).bytes(&cqe).0;
        let id = self.send(s, wire::DMA_WRITE, &p);
        self.dma_pending.insert(id, self.seq);
        self.seq += 1;
    }

    /// The client's answer to one of our DMA writes: on success the
    /// completion is in guest memory, so raise the interrupt.
    fn dma_done(&mut self, m: &Message) {
        if self.dma_pending.remove(&m.header.id).is_none() {
            return;
        }
        if m.header.flags & wire::FLAG_ERROR != 0 {
            eprintln!("cx: DMA refused by the client (errno {})", m.header.error);
            return;
        }
        self.completions += 1;
        if let Some(f) = self.msix.first_mut() {
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
    }

    fn handle(&mut self, s: &UnixStream, m: Message) -> bool {
        if m.header.is_reply() {
            self.dma_done(&m);
            return true;
        }
        if self.hostile == Hostile::Silent && m.header.command != wire::VERSION {
            return true;
        }
        let mut r = Reader::new("request", &m.payload);
        match m.header.command {
            wire::VERSION => {
                let caps = b"{\"capabilities\":{\"max_msg_fds\":16}}\0";
                let p = Writer::default().u16(0).u16(1).bytes(caps).0;
                self.reply(s, &m.header, &p);
            }
            wire::DEVICE_GET_INFO => {
                let flags = wire::DEVICE_FLAGS_PCI | wire::DEVICE_FLAGS_RESET;
                let p = Writer::default().u32(16).u32(flags).u32(9).u32(5).0;
                self.reply(s, &m.header, &p);
            }
            wire::DEVICE_GET_REGION_INFO => {
                let _ = (r.u32(), r.u32());
                let index = r.u32().unwrap_or(u32::MAX);
                let size = match index {
                    0 if self.hostile == Hostile::HugeBar => 1 << 40,
                    0 => BAR0_SIZE,
                    7 if self.hostile == Hostile::BadConfigSize => 16,
                    7 => CONFIG_SIZE as u64,
                    _ => 0,
                };
                let flags = if size > 0 {
                    wire::REGION_READ_FLAG | wire::REGION_WRITE_FLAG
                } else {
                    0
                };
                let p = Writer::default()
                    .u32(32)
                    .u32(flags)
                    .u32(index)
                    .u32(0)
                    .u64(size)
                    .u64(0)
                    .0;
                self.reply(s, &m.header, &p);
            }
            wire::DEVICE_GET_IRQ_INFO => {
                let _ = (r.u32(), r.u32());
                let index = r.u32().unwrap_or(u32::MAX);
                let count = if index == 2 { VECTORS } else { 0 };
                let p = Writer::default().u32(16).u32(1).u32(index).u32(count).0;
                self.reply(s, &m.header, &p);
            }
            wire::DEVICE_SET_IRQS => {
                let (_argsz, flags, index) = (r.u32(), r.u32(), r.u32());
                if index.ok() == Some(2) {
                    self.msix = if flags.unwrap_or(0) & wire::IRQ_DATA_EVENTFD != 0 {
                        m.fds
                    } else {
                        Vec::new()
                    };
                }
                self.reply(s, &m.header, &[]);
            }
            wire::REGION_READ | wire::REGION_WRITE => {
                let (off, region, count) = (
                    r.u64().unwrap_or(0),
                    r.u32().unwrap_or(u32::MAX),
                    r.u32().unwrap_or(0) as usize,
                );
                if region == 0 && self.hostile == Hostile::Hangup {
                    return false;
                }
                let write = m.header.command == wire::REGION_WRITE;
                let data = r.rest().to_vec();
                let mut out = vec![0u8; count.min(4096)];
                match (region, write) {
                    (7, false) => {
                        for (i, b) in out.iter_mut().enumerate() {
                            *b = self.config.get(off as usize + i).copied().unwrap_or(0xff);
                        }
                    }
                    (7, true) => {
                        // Only the command register is writable.
                        for (i, &b) in data.iter().enumerate() {
                            if (4..6).contains(&(off as usize + i)) {
                                self.config[off as usize + i] = b;
                            }
                        }
                    }
                    (0, false) => {
                        let v = self.bar0_read(off & !3).to_le_bytes();
                        for (i, b) in out.iter_mut().enumerate() {
                            *b = v.get((off as usize & 3) + i).copied().unwrap_or(0);
                        }
                    }
                    (0, true) => {
                        let mut v = [0u8; 4];
                        for (d, s) in v.iter_mut().zip(&data) {
                            *d = *s;
                        }
                        let v = u32::from_le_bytes(v);
                        match off {
                            CQ_LO => self.cq = (self.cq & !0xffff_ffff) | u64::from(v),
                            CQ_HI => self.cq = (self.cq & 0xffff_ffff) | (u64::from(v) << 32),
                            DOORBELL => {
                                // Answer the write first: the completion comes later.
                                let p = Writer::default().u64(off).u32(region).u32(count as u32).0;
                                self.reply(s, &m.header, &p);
                                self.doorbell(s, v);
                                return true;
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
                let mut p = Writer::default().u64(off).u32(region).u32(count as u32);
                if !write {
                    if self.hostile == Hostile::ShortRead {
                        out.truncate(count / 2);
                    }
                    p = p.bytes(&out);
                }
                self.reply(s, &m.header, &p.0);
            }
            wire::DEVICE_RESET => {
                self.cq = 0;
                self.completions = 0;
                self.config = config_space();
                self.reply(s, &m.header, &[]);
            }
            wire::DMA_MAP | wire::DMA_UNMAP => self.reply(s, &m.header, &[]),
            _ => self.error(s, &m.header, 95),
        }
        true
    }
}

fn serve(s: UnixStream, hostile: Hostile) {
    let mut dev = Device {
        config: config_space(),
        cq: 0,
        seq: 0,
        completions: 0,
        msix: Vec::new(),
        hostile,
        next_id: 0x8000,
        dma_pending: HashMap::new(),
    };
    while let Ok(m) = wire::recv(&s) {
        if !dev.handle(&s, m) {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ffmk-vfio-user-cx SOCKET [--hostile bad-config-size|huge-bar|short-read|dma-outside|silent|bad-size|hangup]";
    let (path, hostile) = match args.as_slice() {
        [p] => (p, Hostile::None),
        [p, flag, mode] if flag == "--hostile" => (
            p,
            match mode.as_str() {
                "bad-config-size" => Hostile::BadConfigSize,
                "huge-bar" => Hostile::HugeBar,
                "short-read" => Hostile::ShortRead,
                "dma-outside" => Hostile::DmaOutside,
                "silent" => Hostile::Silent,
                "bad-size" => Hostile::BadSize,
                "hangup" => Hostile::Hangup,
                _ => {
                    eprintln!("ffmk-vfio-user-cx: unknown mode {mode}; {usage}");
                    std::process::exit(2);
                }
            },
        ),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ffmk-vfio-user-cx: cannot listen on {path}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {path}");
    let _ = std::io::stdout().flush();
    // One client at a time, as a device has one driver.
    for conn in listener.incoming().flatten() {
        serve(conn, hostile);
    }
}
