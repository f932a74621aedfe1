//! A small virtio 1.x PCI driver that runs in ring 3: finds the device's
//! configuration structures through its PCI capabilities, negotiates
//! VERSION_1 only, sets up split virtqueues in probe memory and polls the
//! used ring (no interrupts). MMIO from ring 3 exits to the VMM exactly like
//! MMIO from ring 0.
use crate::pci::{scan, Function};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const VENDOR: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;
const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: `addr` is a device register (or ring memory) in the identity
    // map; a volatile read has no effect on Rust-visible memory.
    unsafe { read_volatile(addr as *const T) }
}

fn wr<T: Copy>(addr: u64, v: T) {
    // SAFETY: as for `rd`; the probe owns the rings and the device's BAR.
    unsafe { write_volatile(addr as *mut T, v) }
}

/// A virtio PCI function, initialised up to (not including) DRIVER_OK.
pub struct Device {
    common: u64,
    notify: u64,
    notify_mult: u32,
    isr: u64,
    pub device_cfg: u64,
}

#[derive(Debug)]
pub enum Error {
    NoCapabilities,
    FeaturesRefused,
    QueueMissing,
}

/// The `index`-th function with virtio device type `kind` (2 = block).
pub fn find(ecam: Option<u64>, kind: u16, index: usize) -> Option<Function> {
    scan(ecam)
        .filter(|f| f.ids() == Some((VENDOR, 0x1040 + kind)))
        .nth(index)
}

fn bar_address(f: Function, bar: u8) -> u64 {
    f.bar_address(bar)
}

impl Device {
    /// Resets the device, acknowledges it, negotiates VERSION_1 (plus
    /// `extra` device features the device offers) and enables memory
    /// decoding and bus mastering.
    pub fn open(f: Function, extra_features: u64) -> Result<Device, Error> {
        // Memory space + bus master.
        let cmd = f.read32(4);
        f.write32(4, cmd | 0x6);
        let (mut common, mut notify, mut notify_mult, mut isr, mut device_cfg) = (0, 0, 0, 0, 0);
        let mut cap = (f.read32(0x34) & 0xfc) as u16;
        let mut guard = 0;
        while cap != 0 && guard < 48 {
            let head = f.read32(cap);
            if head as u8 == CAP_VENDOR {
                let cfg_type = (head >> 24) as u8;
                let bar = f.read32(cap + 4) as u8;
                let addr = bar_address(f, bar) + u64::from(f.read32(cap + 8));
                match cfg_type {
                    1 => common = addr,
                    2 => {
                        notify = addr;
                        notify_mult = f.read32(cap + 16);
                    }
                    3 => isr = addr,
                    4 => device_cfg = addr,
                    _ => {}
                }
            }
            cap = ((head >> 8) & 0xfc) as u16;
            guard += 1;
        }
        if common == 0 || notify == 0 {
            return Err(Error::NoCapabilities);
        }
        let d = Device {
            common,
            notify,
            notify_mult,
            isr,
            device_cfg,
        };
        d.set_status(0);
        while d.status() != 0 {}
        d.set_status(STATUS_ACK | STATUS_DRIVER);
        wr::<u32>(common, 1); // device_feature_select = 1
        let offered_hi = rd::<u32>(common + 4);
        wr::<u32>(common, 0);
        let offered_lo = rd::<u32>(common + 4);
        let offered = (u64::from(offered_hi) << 32) | u64::from(offered_lo);
        let want = (1u64 << 32) | (extra_features & offered);
        wr::<u32>(common + 8, 0);
        wr::<u32>(common + 12, want as u32);
        wr::<u32>(common + 8, 1);
        wr::<u32>(common + 12, (want >> 32) as u32);
        d.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if d.status() & STATUS_FEATURES_OK == 0 {
            return Err(Error::FeaturesRefused);
        }
        Ok(d)
    }

    pub fn status(&self) -> u8 {
        rd::<u8>(self.common + 0x14)
    }

    /// The device's configuration generation (changes with its configuration).
    pub fn config_generation(&self) -> u8 {
        rd::<u8>(self.common + 0x15)
    }

    /// Reads (and thereby clears) the ISR status: bit 0 queue, bit 1 config change.
    pub fn take_isr(&self) -> u8 {
        if self.isr == 0 {
            return 0;
        }
        rd::<u8>(self.isr)
    }

    fn set_status(&self, s: u8) {
        wr::<u8>(self.common + 0x14, s);
    }

    /// Sets queue `index` up with `size` entries in the memory at `mem`
    /// (needs [`Queue::bytes`] bytes, 4 KiB aligned); polled, no interrupt.
    pub fn setup_queue(&self, index: u16, size: u16, mem: u64) -> Result<Queue, Error> {
        self.setup_queue_msix(index, size, mem, 0xffff)
    }

    /// As [`Device::setup_queue`], signalling used buffers on MSI-X table
    /// entry `vector` (0xffff: none).
    pub fn setup_queue_msix(
        &self,
        index: u16,
        size: u16,
        mem: u64,
        vector: u16,
    ) -> Result<Queue, Error> {
        wr::<u16>(self.common + 0x16, index);
        let max = rd::<u16>(self.common + 0x18);
        if max == 0 {
            return Err(Error::QueueMissing);
        }
        let size = size.min(max);
        let q = Queue::at(mem, size);
        wr::<u16>(self.common + 0x18, size);
        wr::<u16>(self.common + 0x1a, vector);
        for (off, addr) in [(0x20, q.desc), (0x28, q.avail), (0x30, q.used)] {
            wr::<u32>(self.common + off, addr as u32);
            wr::<u32>(self.common + off + 4, (addr >> 32) as u32);
        }
        let notify_off = rd::<u16>(self.common + 0x1e);
        wr::<u16>(self.common + 0x1c, 1);
        Ok(Queue {
            notify: self.notify + u64::from(notify_off) * u64::from(self.notify_mult),
            index,
            ..q
        })
    }

    pub fn driver_ok(&self) {
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }
}

/// A split virtqueue the probe drives one request at a time.
pub struct Queue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    notify: u64,
    index: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Queue {
    pub fn bytes(size: u16) -> u64 {
        0x3000 + u64::from(size) * 16
    }

    fn at(mem: u64, size: u16) -> Queue {
        let desc = mem;
        let avail = (desc + u64::from(size) * 16 + 0xfff) & !0xfff;
        let used = avail + 0x1000;
        for a in [avail, used] {
            wr::<u32>(a, 0);
        }
        Queue {
            desc,
            avail,
            used,
            size,
            notify: 0,
            index: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Posts a one-buffer chain in descriptor `slot` (for receive rings,
    /// where many buffers wait at once). Call [`Queue::kick`] afterwards.
    pub fn post(&mut self, slot: u16, addr: u64, len: u32, writable: bool) {
        let d = self.desc + 16 * u64::from(slot);
        wr::<u64>(d, addr);
        wr::<u32>(d + 8, len);
        wr::<u16>(d + 12, if writable { DESC_WRITE } else { 0 });
        wr::<u16>(d + 14, 0);
        let at = u64::from(self.avail_idx % self.size);
        wr::<u16>(self.avail + 4 + 2 * at, slot);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr::<u16>(self.avail + 2, self.avail_idx);
    }

    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        wr::<u16>(self.notify, self.index);
    }

    /// The next used (descriptor id, length), if the device returned one.
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        if rd::<u16>(self.used + 2) == self.used_seen {
            return None;
        }
        let at = u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = rd::<u32>(self.used + 4 + 8 * at) as u16;
        Some((id, rd::<u32>(self.used + 4 + 8 * at + 4)))
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Submits one chain of (address, length, device-writable) buffers,
    /// notifies the device and polls until it is used. Returns the length
    /// the device reports, or None after `timeout_us`.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)], timeout_us: u64) -> Option<u32> {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.desc + 16 * i as u64;
            let mut flags = if write { DESC_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
            }
            wr::<u64>(d, addr);
            wr::<u32>(d + 8, len);
            wr::<u16>(d + 12, flags);
            wr::<u16>(d + 14, (i + 1) as u16);
        }
        let slot = u64::from(self.avail_idx % self.size);
        wr::<u16>(self.avail + 4 + 2 * slot, 0); // head: descriptor 0
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        wr::<u16>(self.notify, self.index);
        let deadline = crate::time::now_us() + timeout_us;
        while crate::time::now_us() < deadline {
            if let Some((_, len)) = self.poll_used() {
                return Some(len);
            }
            core::hint::spin_loop();
        }
        None
    }
}

/// A function's MSI-X table, enabled.
pub struct Msix {
    table: u64,
    entries: u16,
}

impl Msix {
    /// Finds the MSI-X capability, enables MSI-X (function unmasked) and
    /// returns the table (None: the function has no MSI-X).
    pub fn enable(f: Function) -> Option<Msix> {
        let mut cap = (f.read32(0x34) & 0xfc) as u16;
        let mut guard = 0;
        while cap != 0 && guard < 48 {
            let head = f.read32(cap);
            if head as u8 == 0x11 {
                let table_reg = f.read32(cap + 4);
                let table = bar_address(f, (table_reg & 7) as u8) + u64::from(table_reg & !7);
                let entries = ((head >> 16) & 0x7ff) as u16 + 1;
                // Message control (upper half): enable, function mask off.
                f.write32(cap, (head & !(1 << 30)) | (1 << 31));
                return Some(Msix { table, entries });
            }
            cap = ((head >> 8) & 0xfc) as u16;
            guard += 1;
        }
        None
    }

    /// Points table entry `entry` at the CPU with APIC ID `apic` (physical
    /// destination, fixed delivery) on `vector`, unmasked.
    pub fn route(&self, entry: u16, apic: u32, vector: u8) {
        if entry >= self.entries {
            return;
        }
        let e = self.table + 16 * u64::from(entry);
        wr::<u32>(e + 12, 1); // mask while changing
        wr::<u32>(e, 0xfee0_0000 | ((apic & 0xff) << 12));
        wr::<u32>(e + 4, 0);
        wr::<u32>(e + 8, u32::from(vector));
        wr::<u32>(e + 12, 0);
    }
}
