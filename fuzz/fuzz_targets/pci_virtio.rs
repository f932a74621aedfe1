//! The PCI path a guest driver takes to a virtio device, through the same
//! buses the vCPU exits go to: configuration mechanism #1 (0xCF8/0xCFC),
//! ECAM, and BAR 0 of a virtio-pci function (common configuration, ISR,
//! device configuration, notifications, MSI-X table and PBA), with a real
//! device behind it (rng, block, console or vsock, picked by the first
//! byte) on a real I/O thread. The rest of the input is a list of guest
//! operations; one of them is a whole driver bring-up with fuzzed values
//! (features, queue sizes and addresses, vectors), so the device gets
//! activated and serves queues that the other operations then change
//! under it. What must hold: no panic; MSI-X vectors routed and raised are
//! always inside the table, and only routed vectors are raised.
#![no_main]
use devices::bus::Bus;
use devices::interrupt::{MsiMessage, MsiVectors};
use devices::pci::{PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindow};
use devices::virtio::block::{Block, DiskConfig};
use devices::virtio::console::Console;
use devices::virtio::pci::{VirtioPci, BAR_SIZE, MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{IoThread, VirtioDevice};
use ffmk_fuzz::{memory, Input};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_LOW_WINDOW};

const RAM: u64 = 0x10000;
const HIGH: (u64, u64) = (1 << 36, 1 << 32);

/// MSI-X vectors that check how the transport uses them.
struct Vectors {
    routes: Mutex<Vec<Option<MsiMessage>>>,
}

impl MsiVectors for Vectors {
    fn len(&self) -> u16 {
        self.routes.lock().map(|r| r.len() as u16).unwrap_or(0)
    }

    fn route(&self, v: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
        let mut r = self
            .routes
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let n = r.len();
        let slot = r
            .get_mut(usize::from(v))
            .unwrap_or_else(|| panic!("vector {v} routed, the table has {n}"));
        *slot = msg;
        Ok(())
    }

    fn trigger(&self, v: u16) -> std::io::Result<()> {
        let r = self
            .routes
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        match r.get(usize::from(v)) {
            Some(Some(_)) => Ok(()),
            Some(None) => panic!("vector {v} raised without a route"),
            None => panic!("vector {v} raised, the table has {}", r.len()),
        }
    }
}

fn scratch(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("ffmk-fuzz-{}-{what}-{n}", std::process::id()))
}

fn disk_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = scratch("disk");
        std::fs::write(&p, vec![0u8; 64 << 10]).expect("fuzz disk image");
        p
    })
}

fn device(kind: u8, io: &IoThread) -> Option<(Box<dyn VirtioDevice>, Option<PathBuf>)> {
    Some(match kind % 4 {
        0 => (Box::new(Rng::new(io.endpoint())), None),
        1 => {
            let config = DiskConfig {
                path: disk_path().clone(),
                readonly: kind & 0x10 != 0,
                direct: false,
                serial: Some("fuzz".into()),
                queues: 1 + u16::from(kind >> 6),
                bandwidth: None,
                iops: None,
            };
            (Box::new(Block::new(config, io.endpoint()).ok()?), None)
        }
        2 => (
            Box::new(Console::new("/dev/null".as_ref(), io.endpoint()).ok()?),
            None,
        ),
        _ => {
            let socket = scratch("vsock");
            let v = Vsock::new(
                VsockConfig {
                    cid: 3,
                    socket: socket.clone(),
                },
                io.endpoint(),
            )
            .ok()?;
            (Box::new(v), Some(socket))
        }
    })
}

struct Machine {
    pio: Bus,
    mmio: Bus,
    dev: Arc<Mutex<VirtioPci>>,
    mem: devices::virtio::GuestMemory,
}

impl Machine {
    fn bar0(&self) -> u64 {
        self.dev
            .lock()
            .ok()
            .and_then(|d| d.config().bar_address(0))
            .unwrap_or(0)
    }

    fn cfg_write(&self, dev: u8, reg: u8, data: &[u8]) {
        let addr = 0x8000_0000u32 | (u32::from(dev & 0x1f) << 11) | u32::from(reg & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes());
        self.pio.write(0xcfc + u64::from(reg & 3), data);
    }

    fn cfg_read(&self, dev: u8, reg: u8, len: usize) -> u32 {
        let addr = 0x8000_0000u32 | (u32::from(dev & 0x1f) << 11) | u32::from(reg & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        self.pio.read(0xcfc + u64::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn bar_write(&self, offset: u64, data: &[u8]) {
        self.mmio.write(self.bar0() + offset, data);
    }

    fn bar_read(&self, offset: u64, len: usize) {
        let mut b = [0u8; 8];
        self.mmio.read(self.bar0() + offset, &mut b[..len]);
    }

    /// A driver bringing the device up, as Linux's virtio-pci does, with
    /// values from the input: memory decoding and MSI-X on, features,
    /// every queue set up, DRIVER_OK.
    fn bring_up(&self, input: &mut Input) {
        self.cfg_write(1, 0x04, &6u16.to_le_bytes());
        // Walk the capability list to MSI-X (id 0x11) and enable it.
        let mut cap = self.cfg_read(1, 0x34, 1) as u8;
        for _ in 0..16 {
            if cap < 0x40 {
                break;
            }
            if self.cfg_read(1, cap, 1) == 0x11 {
                self.cfg_write(1, cap + 2, &0x8000u16.to_le_bytes());
                break;
            }
            cap = self.cfg_read(1, cap + 1, 1) as u8;
        }
        for v in 0..4u64 {
            let e = MSIX_TABLE_OFFSET + 16 * v;
            self.bar_write(e, &0xfee0_0000u32.to_le_bytes());
            self.bar_write(e + 8, &(0x30 + v as u32).to_le_bytes());
            self.bar_write(e + 12, &u32::from(input.u8() & 1).to_le_bytes());
        }
        self.bar_write(0x14, &[0]);
        self.bar_write(0x14, &[1 | 2]);
        for sel in 0..2u32 {
            self.bar_write(0x08, &sel.to_le_bytes());
            self.bar_write(0x0c, &input.u32().to_le_bytes());
        }
        self.bar_write(0x14, &[1 | 2 | 8]);
        self.bar_write(0x10, &u16::from(input.u8() & 3).to_le_bytes());
        let queues = 1 + input.u8() % 4;
        for q in 0..u16::from(queues) {
            self.bar_write(0x16, &q.to_le_bytes());
            self.bar_write(0x18, &(input.u16() % 257).to_le_bytes());
            self.bar_write(0x1a, &u16::from(input.u8() & 3).to_le_bytes());
            let base = u64::from(input.u16() & 0xf000);
            self.bar_write(0x20, &base.to_le_bytes());
            self.bar_write(0x28, &(base + 0x800).to_le_bytes());
            self.bar_write(0x30, &(base + 0xc00).to_le_bytes());
            self.bar_write(0x1c, &1u16.to_le_bytes());
        }
        self.bar_write(0x14, &[1 | 2 | 8 | 4]);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(io) = IoThread::spawn("fuzz-io", || {
        sandbox::seccomp::confine(sandbox::ThreadKind::Io, "io").map_err(|e| e.to_string())
    }) else {
        return;
    };
    let Some((dev, socket)) = device(input.u8(), &io) else {
        return;
    };
    let mem = memory(&[(0, RAM as usize)]);
    let queues = dev.queue_max_sizes().len();
    let vectors = Arc::new(Vectors {
        routes: Mutex::new(vec![None; queues + 1]),
    });
    let transport = VirtioPci::new(dev, vectors, mem.clone()).expect("virtio-pci transport");
    let dev = Arc::new(Mutex::new(transport));
    let root = Arc::new(PciRoot::new(PCI_LOW_WINDOW, HIGH).expect("PCI root"));
    root.add(dev.clone()).expect("PCI slot");
    let mut pio = Bus::new();
    pio.insert(
        0xcf8,
        8,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
    )
    .expect("config ports");
    let mut mmio = Bus::new();
    mmio.insert(
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
    )
    .expect("ECAM");
    for (base, size) in [PCI_LOW_WINDOW, HIGH] {
        mmio.insert(
            base,
            size,
            Arc::new(Mutex::new(PciWindow::new(root.clone(), base))),
        )
        .expect("PCI window");
    }
    let m = Machine {
        pio,
        mmio,
        dev,
        mem,
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        let op = input.u8();
        let len = [1usize, 2, 4, 8][usize::from(op >> 4) & 3];
        match op & 0x0f {
            0 => {
                let (dev, reg) = (input.u8() % 3, input.u8());
                let v = input.u32().to_le_bytes();
                m.cfg_write(dev, reg, &v[..len.min(4)]);
            }
            1 => {
                let (dev, reg) = (input.u8() % 3, input.u8());
                let _ = m.cfg_read(dev, reg, len.min(4));
            }
            2 => {
                let off = u64::from(input.u16()) % BAR_SIZE;
                let v = input.u64().to_le_bytes();
                m.bar_write(off, &v[..len]);
            }
            3 => m.bar_read(u64::from(input.u16()) % BAR_SIZE, len),
            4 => {
                let at = u64::from(input.u16()) % (RAM - 8);
                let _ = m.mem.write_slice(input.bytes(8), GuestAddress(at));
            }
            5 => {
                let off = u64::from(input.u32()) % PCI_ECAM_SIZE;
                let v = input.u32().to_le_bytes();
                m.mmio.write(PCI_ECAM_START + off, &v[..len.min(4)]);
            }
            6 => {
                let off = u64::from(input.u32()) % PCI_ECAM_SIZE;
                let mut b = [0u8; 4];
                m.mmio.read(PCI_ECAM_START + off, &mut b[..len.min(4)]);
            }
            7 => m.bring_up(&mut input),
            8 => m.bar_write(
                NOTIFY_OFFSET + 4 * u64::from(input.u8() % 8),
                &0u16.to_le_bytes(),
            ),
            9 => {
                // A raw access anywhere in the low window (other BARs, holes).
                let at = PCI_LOW_WINDOW.0 + u64::from(input.u32()) % PCI_LOW_WINDOW.1;
                let v = input.u64().to_le_bytes();
                m.mmio.write(at, &v[..len]);
            }
            _ => {
                // Configuration changed on the host side (disk resize,
                // vsock events): the config interrupt path.
                if let Ok(mut d) = m.dev.lock() {
                    d.config_changed();
                }
            }
        }
    }
    // Stops the I/O thread: every handler the device started is gone
    // before the next input.
    drop(m);
    drop(io);
    if let Some(s) = socket {
        let _ = std::fs::remove_file(s);
    }
});
