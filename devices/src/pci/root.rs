//! The PCI root bus and the bus devices that reach it.
//!
//! ```text
//! vCPU port I/O 0xCF8..0xCFF ─▶ PciConfigIo ─┐
//! vCPU MMIO in the ECAM area  ─▶ PciEcam     ─┼─▶ PciRoot ─▶ slot DD ─▶ PciDevice
//! vCPU MMIO in a PCI window   ─▶ PciWindow   ─┤   (config space / BAR access)
//! vCPU port I/O in the I/O window ─▶ PciWindow::io ─┘
//!                                                  slot PP ─▶ RootPort ─▶ bus N, device 0
//! ```
use super::config::{BarKind, PciIds};
use super::port::{PortError, RootPort, WINDOW_ALIGN};
use super::{ConfigSpace, PciDevice};
use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

pub const SLOTS: u8 = 32;
/// ECAM bytes per bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

pub use super::SharedPciDevice;

/// Where a function is: bus and device number (function 0 always). Bus 0
/// is the root bus; bus N > 0 is the secondary bus of a hot-plug root port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub bus: u8,
    pub slot: u8,
}

impl Location {
    pub fn root(slot: u8) -> Location {
        Location { bus: 0, slot }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.0", self.bus, self.slot)
    }
}

impl std::str::FromStr for Location {
    type Err = String;

    /// `BB:DD.0` or `0000:BB:DD.0` (segment 0, function 0: the only ones
    /// ffmk-vmm has).
    fn from_str(s: &str) -> Result<Location, String> {
        let bad = || format!("{s}: not a PCI address of this VM (want BB:DD.0)");
        let rest = s.strip_prefix("0000:").unwrap_or(s);
        let (bus, dev) = rest
            .strip_suffix(".0")
            .and_then(|r| r.split_once(':'))
            .ok_or_else(bad)?;
        let hex = |x: &str| {
            (x.len() == 2)
                .then(|| u8::from_str_radix(x, 16).ok())
                .flatten()
        };
        match (hex(bus), hex(dev)) {
            (Some(bus), Some(slot)) if slot < SLOTS => Ok(Location { bus, slot }),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("the PCI bus is full ({SLOTS} slots)")]
    NoSlot,
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} is empty")]
    EmptySlot(u8),
    #[error("no room in the {window} PCI window for a BAR of {size:#x} bytes")]
    NoBarSpace { window: &'static str, size: u64 },
    #[error("bad PCI window {base:#x}+{size:#x}")]
    BadWindow { base: u64, size: u64 },
    #[error("saved PCI functions do not match this VM's: {0}")]
    Mismatch(String),
    #[error("no free hot-plug slot (the VM has {0})")]
    NoHotplugSlot(usize),
    #[error("no function at {0}")]
    NoFunction(Location),
    #[error(transparent)]
    Port(#[from] PortError),
}

/// One function's configuration space in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FunctionState {
    pub slot: u8,
    pub name: String,
    pub config: Vec<u8>,
}

/// The host bridge at 00:00.0: identifies the root complex, has no BARs.
struct HostBridge {
    config: ConfigSpace,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn name(&self) -> String {
        "host-bridge".into()
    }
}

/// IDs of the host bridge: Intel, a PCIe root complex ID used by several
/// VMMs; class 06.00 (host bridge).
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x8086,
    device: 0x0d57,
    class: (0x06, 0x00, 0x00),
    revision: 0,
    subsystem_vendor: 0,
    subsystem: 0,
};

/// Where BARs go: a 32-bit window below 4 GiB, a 64-bit one above RAM and
/// an I/O port window.
struct Windows {
    low: AddressAllocator,
    high: AddressAllocator,
    io: AddressAllocator,
    /// Where each slot's BARs were placed: (window, range).
    placed: BTreeMap<u8, Vec<(Window, RangeInclusive)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Low,
    High,
    Io,
}

impl Window {
    fn of(kind: BarKind) -> Window {
        match kind {
            BarKind::Mem32 => Window::Low,
            BarKind::Mem64 { .. } => Window::High,
            BarKind::Io => Window::Io,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Window::Low => "32-bit",
            Window::High => "64-bit",
            Window::Io => "I/O",
        }
    }
}

impl Windows {
    fn alloc(&mut self, w: Window) -> &mut AddressAllocator {
        match w {
            Window::Low => &mut self.low,
            Window::High => &mut self.high,
            Window::Io => &mut self.io,
        }
    }

    fn free(&mut self, ranges: Vec<(Window, RangeInclusive)>) {
        for (w, range) in ranges {
            let _ = self.alloc(w).free(&range);
        }
    }
}

/// Port I/O BARs of functions on the root bus are placed here: above the
/// legacy ports, inside the I/O range the host bridge's `_CRS` gives PCI.
pub const PCI_IO_WINDOW: (u64, u64) = (0xc000, 0x4000);

pub struct PciRoot {
    slots: RwLock<BTreeMap<u8, SharedPciDevice>>,
    windows: Mutex<Windows>,
    /// Hot-plug root ports (also in `slots`), by slot on bus 0.
    ports: RwLock<Vec<(u8, Arc<Mutex<RootPort>>)>>,
}

/// Each hot-plug port's share of the root windows: enough for a
/// ConnectX VF's BARs (or an emulated device's) with room to spare.
pub const PORT_MEM_WINDOW: u64 = 16 << 20;
pub const PORT_PREF_WINDOW: u64 = 512 << 20;

impl PciRoot {
    /// A root bus with its host bridge; BARs are allocated in
    /// `low` = (base, size) below 4 GiB and `high` above RAM.
    pub fn new(low: (u64, u64), high: (u64, u64)) -> Result<Self, PciError> {
        let window = |(base, size): (u64, u64)| {
            AddressAllocator::new(base, size).map_err(|_| PciError::BadWindow { base, size })
        };
        let root = PciRoot {
            ports: RwLock::new(Vec::new()),
            slots: RwLock::new(BTreeMap::new()),
            windows: Mutex::new(Windows {
                low: window(low)?,
                high: window(high)?,
                io: window(PCI_IO_WINDOW)?,
                placed: BTreeMap::new(),
            }),
        };
        let bridge = HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_IDS),
        };
        root.insert(0, Arc::new(Mutex::new(bridge)))?;
        Ok(root)
    }

    fn insert(&self, slot: u8, dev: SharedPciDevice) -> Result<(), PciError> {
        let mut slots = self.slots.write().map_err(|_| PciError::NoSlot)?;
        if slots.contains_key(&slot) {
            return Err(PciError::SlotTaken(slot));
        }
        slots.insert(slot, dev);
        Ok(())
    }

    /// Adds a device at the first free slot, places its BARs (32-bit BARs in
    /// the low window, 64-bit ones in the high window) and returns the slot.
    pub fn add(&self, dev: SharedPciDevice) -> Result<u8, PciError> {
        let slot = {
            let slots = self.slots.read().map_err(|_| PciError::NoSlot)?;
            (0..SLOTS)
                .find(|s| !slots.contains_key(s))
                .ok_or(PciError::NoSlot)?
        };
        self.add_at(slot, dev)
    }

    /// Adds a device at `slot` (where a saved VM had it), placing its BARs
    /// as [`PciRoot::add`] does (a restored configuration space moves them
    /// where the guest had them).
    pub fn add_at(&self, slot: u8, dev: SharedPciDevice) -> Result<u8, PciError> {
        if slot >= SLOTS {
            return Err(PciError::NoSlot);
        }
        let placed = self.place_bars(&dev)?;
        if let Err(e) = self.insert(slot, dev) {
            if let Ok(mut w) = self.windows.lock() {
                w.free(placed);
            }
            return Err(e);
        }
        if let Ok(mut w) = self.windows.lock() {
            w.placed.insert(slot, placed);
        }
        Ok(slot)
    }

    fn place_bars(&self, dev: &SharedPciDevice) -> Result<Vec<(Window, RangeInclusive)>, PciError> {
        let mut d = dev.lock().map_err(|_| PciError::NoSlot)?;
        let mut windows = self.windows.lock().map_err(|_| PciError::NoSlot)?;
        let bars: Vec<_> = d.config().bars().collect();
        let mut placed = vec![];
        for (i, bar) in bars {
            let w = Window::of(bar.kind);
            match windows
                .alloc(w)
                .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
            {
                Ok(range) => {
                    d.config_mut().set_bar_address(i, range.start());
                    placed.push((w, range));
                }
                Err(_) => {
                    // Leave nothing behind: give back what this device got.
                    windows.free(placed);
                    return Err(PciError::NoBarSpace {
                        window: w.name(),
                        size: bar.size,
                    });
                }
            }
        }
        Ok(placed)
    }

    /// Adds hot-plug root port number `number` (1-based) at the highest free
    /// slot of bus 0, with secondary bus `number` and windows of its own
    /// taken from the root's; `vectors` carries its one MSI vector.
    /// Returns its slot.
    pub fn add_root_port(
        &self,
        number: u8,
        vectors: Arc<dyn crate::interrupt::MsiVectors>,
    ) -> Result<u8, PciError> {
        let slot = {
            let slots = self.slots.read().map_err(|_| PciError::NoSlot)?;
            (1..SLOTS)
                .rev()
                .find(|s| !slots.contains_key(s))
                .ok_or(PciError::NoSlot)?
        };
        let (mem, pref) = {
            let mut w = self.windows.lock().map_err(|_| PciError::NoSlot)?;
            let mem = w
                .low
                .allocate(PORT_MEM_WINDOW, WINDOW_ALIGN, AllocPolicy::LastMatch)
                .map_err(|_| PciError::NoBarSpace {
                    window: "32-bit",
                    size: PORT_MEM_WINDOW,
                })?;
            match w
                .high
                .allocate(PORT_PREF_WINDOW, WINDOW_ALIGN, AllocPolicy::LastMatch)
            {
                Ok(pref) => (mem, pref),
                Err(_) => {
                    let _ = w.low.free(&mem);
                    return Err(PciError::NoBarSpace {
                        window: "64-bit",
                        size: PORT_PREF_WINDOW,
                    });
                }
            }
        };
        let give_back = |e: PciError| {
            if let Ok(mut w) = self.windows.lock() {
                w.free(vec![(Window::Low, mem), (Window::High, pref)]);
            }
            e
        };
        let port = RootPort::new(
            number,
            number,
            (mem.start(), mem.len()),
            (pref.start(), pref.len()),
            vectors,
        )
        .map_err(|e| give_back(e.into()))?;
        let port = Arc::new(Mutex::new(port));
        self.insert(slot, port.clone()).map_err(give_back)?;
        if let Ok(mut w) = self.windows.lock() {
            w.placed
                .insert(slot, vec![(Window::Low, mem), (Window::High, pref)]);
        }
        self.ports
            .write()
            .map_err(|_| PciError::NoSlot)?
            .push((slot, port));
        Ok(slot)
    }

    /// The hot-plug root ports: (slot on bus 0, port).
    pub fn ports(&self) -> Vec<(u8, Arc<Mutex<RootPort>>)> {
        self.ports.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Puts `dev` into an empty hot-plug slot and tells the guest; returns
    /// where it is. A slot the guest is still letting go of (powered, or
    /// powered off moments ago: see [`super::port::POWER_OFF_SETTLE`]) is
    /// waited for, up to `patience`, so that the guest notices the plug;
    /// then the first empty slot is taken anyway.
    pub fn hotplug(
        &self,
        dev: SharedPciDevice,
        patience: std::time::Duration,
    ) -> Result<Location, PciError> {
        let ports = self.ports();
        let deadline = std::time::Instant::now() + patience;
        loop {
            // The empty slot that is ready soonest (None: busy for now).
            let mut best: Option<(Option<std::time::Duration>, &Arc<Mutex<RootPort>>)> = None;
            for (_, port) in &ports {
                let p = port.lock().map_err(|_| PciError::NoSlot)?;
                if p.occupied() {
                    continue;
                }
                let wait = p.ready_in();
                let better = match (&best, wait) {
                    (None, _) => true,
                    (Some((None, _)), Some(_)) => true,
                    (Some((Some(b), _)), Some(w)) => w < *b,
                    _ => false,
                };
                if better {
                    best = Some((wait, port));
                }
            }
            let Some((wait, port)) = best else {
                return Err(PciError::NoHotplugSlot(ports.len()));
            };
            let now = std::time::Instant::now();
            let ready = wait == Some(std::time::Duration::ZERO);
            if ready || now >= deadline {
                let mut p = port.lock().map_err(|_| PciError::NoSlot)?;
                p.plug(dev)?;
                return Ok(Location {
                    bus: p.bus(),
                    slot: 0,
                });
            }
            let step = wait.unwrap_or(std::time::Duration::from_millis(50));
            std::thread::sleep(
                step.min(deadline - now)
                    .max(std::time::Duration::from_millis(1)),
            );
        }
    }

    /// The port whose slot holds (or would hold) `at`.
    pub fn port_at(&self, at: Location) -> Option<Arc<Mutex<RootPort>>> {
        if at.bus == 0 || at.slot != 0 {
            return None;
        }
        self.ports()
            .into_iter()
            .map(|(_, p)| p)
            .find(|p| p.lock().map(|p| p.bus() == at.bus).unwrap_or(false))
    }

    /// Takes the function at `at` away: off bus 0 ([`PciRoot::remove`]) or
    /// out of its hot-plug slot (the guest is told: a surprise removal
    /// unless it powered the slot off first).
    pub fn unplug(&self, at: Location) -> Result<SharedPciDevice, PciError> {
        if at.bus == 0 {
            return self.remove(at.slot);
        }
        let port = self.port_at(at).ok_or(PciError::NoFunction(at))?;
        let mut p = port.lock().map_err(|_| PciError::NoSlot)?;
        p.unplug().ok_or(PciError::NoFunction(at))
    }

    /// Takes the function in `slot` off the bus (hot-unplug) and gives the
    /// address space its BARs were placed in back. The host bridge stays.
    pub fn remove(&self, slot: u8) -> Result<SharedPciDevice, PciError> {
        let is_port = self.ports().iter().any(|(s, _)| *s == slot);
        if slot == 0 || is_port {
            return Err(PciError::SlotTaken(slot));
        }
        let dev = self
            .slots
            .write()
            .map_err(|_| PciError::NoSlot)?
            .remove(&slot)
            .ok_or(PciError::EmptySlot(slot))?;
        let mut windows = self.windows.lock().map_err(|_| PciError::NoSlot)?;
        if let Some(placed) = windows.placed.remove(&slot) {
            windows.free(placed);
        }
        Ok(dev)
    }

    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots.read().ok()?.get(&slot).cloned()
    }

    /// (location, name) of every function, for `GET /vm`.
    pub fn list(&self) -> Vec<(Location, String)> {
        self.describe()
            .into_iter()
            .map(|(s, n, _)| (s, n))
            .collect()
    }

    /// (location, name, counters) of every function, for `GET /vm`: those
    /// on bus 0, then those in hot-plug slots.
    pub fn describe(&self) -> Vec<(Location, String, super::Counters)> {
        let Ok(slots) = self.slots.read() else {
            return vec![];
        };
        let mut out: Vec<_> = slots
            .iter()
            .filter_map(|(s, d)| {
                d.lock()
                    .ok()
                    .map(|d| (Location::root(*s), d.name(), d.counters()))
            })
            .collect();
        drop(slots);
        for (at, child) in self.children() {
            if let Ok(d) = child.lock() {
                out.push((at, d.name(), d.counters()));
            }
        }
        out
    }

    /// The functions in hot-plug slots, where the VMM put them.
    fn children(&self) -> Vec<(Location, SharedPciDevice)> {
        self.ports()
            .iter()
            .filter_map(|(_, p)| {
                let p = p.lock().ok()?;
                let child = p.child()?.clone();
                Some((
                    Location {
                        bus: p.bus(),
                        slot: 0,
                    },
                    child,
                ))
            })
            .collect()
    }

    /// Every function's configuration space (BARs, command register,
    /// capability state such as the MSI-X enable bit), for a snapshot.
    pub fn save(&self) -> Result<Vec<FunctionState>, PciError> {
        let slots = self.slots.read().map_err(|_| PciError::NoSlot)?;
        slots
            .iter()
            .map(|(slot, d)| {
                let d = d
                    .lock()
                    .map_err(|_| PciError::Mismatch(format!("slot {slot}: lock poisoned")))?;
                Ok(FunctionState {
                    slot: *slot,
                    name: d.name(),
                    config: d.config().save(),
                })
            })
            .collect()
    }

    /// Takes back saved configuration spaces: the same slots must hold
    /// functions of the same kind. Checked for every function before any
    /// changes. Device state kept outside configuration space (MSI-X
    /// tables, virtio queues) is restored by the devices afterwards.
    pub fn restore(&self, saved: &[FunctionState]) -> Result<(), PciError> {
        let slots = self.slots.read().map_err(|_| PciError::NoSlot)?;
        let here: Vec<u8> = slots.keys().copied().collect();
        let there: Vec<u8> = saved.iter().map(|f| f.slot).collect();
        if here != there {
            return Err(PciError::Mismatch(format!(
                "the snapshot has functions in slots {there:?}, this VM in {here:?}"
            )));
        }
        let mismatch = |f: &FunctionState, e: String| {
            PciError::Mismatch(format!("slot {} ({}): {e}", f.slot, f.name))
        };
        let mut locked = Vec::new();
        for f in saved {
            let dev = slots.get(&f.slot).ok_or(PciError::NoSlot)?;
            let d = dev
                .lock()
                .map_err(|_| mismatch(f, "lock poisoned".into()))?;
            locked.push((f, d));
        }
        // Check every function first: all or nothing.
        for (f, d) in &locked {
            d.config()
                .check(&f.config)
                .map_err(|e| mismatch(f, e.to_string()))?;
        }
        for (f, d) in &mut locked {
            d.config_mut()
                .restore(&f.config)
                .map_err(|e| mismatch(f, e.to_string()))?;
        }
        drop(locked);
        drop(slots);
        // The ports' interrupt follows their restored MSI capability.
        for (_, port) in self.ports() {
            if let Ok(mut p) = port.lock() {
                p.restored();
            }
        }
        Ok(())
    }

    /// Configuration read of bus/device/function at `offset`. Function 0 of
    /// bus 0, and device 0 on a hot-plug port's secondary bus, exist;
    /// everything else reads as all ones ("no device").
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(d) => match d.lock() {
                Ok(d) => d.config_read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.function(bus, dev, func) {
            if let Ok(mut d) = d.lock() {
                d.config_write(offset, data);
            }
        }
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<SharedPciDevice> {
        if func != 0 {
            return None;
        }
        if bus == 0 {
            return self.device(dev);
        }
        if dev != 0 {
            return None;
        }
        // Behind a port: the bus number the guest programmed now.
        let ports = self.ports.read().ok()?;
        ports.iter().find_map(|(_, p)| {
            let p = p.lock().ok()?;
            (p.secondary_bus() == bus)
                .then(|| p.child().cloned())
                .flatten()
        })
    }

    /// A port access: routed to the function on the root bus whose
    /// enabled I/O BAR decodes `port` (root ports forward no I/O: their
    /// I/O window registers read as zero). Returns false when none does.
    fn io_access(&self, port: u64, access: impl FnOnce(&mut dyn PciDevice, usize, u64)) -> bool {
        self.route(port, false, ConfigSpace::io_bar_containing, access)
    }

    /// A memory access at guest-physical `addr`: routed to the function
    /// whose enabled BAR decodes it. Returns false when none does.
    fn bar_access(&self, addr: u64, access: impl FnOnce(&mut dyn PciDevice, usize, u64)) -> bool {
        self.route(addr, true, ConfigSpace::bar_containing, access)
    }

    /// The function whose BAR `decode` finds `addr` in (on bus 0, then
    /// behind the hot-plug ports when `ports`) gets the access.
    fn route(
        &self,
        addr: u64,
        ports: bool,
        decode: fn(&ConfigSpace, u64) -> Option<(usize, u64)>,
        access: impl FnOnce(&mut dyn PciDevice, usize, u64),
    ) -> bool {
        let mut access = Some(access);
        let mut hit = |dev: &SharedPciDevice| {
            let Ok(mut d) = dev.lock() else { return false };
            let Some((bar, off)) = decode(d.config(), addr) else {
                return false;
            };
            if let Some(f) = access.take() {
                f(&mut *d, bar, off);
            }
            true
        };
        let Ok(slots) = self.slots.read() else {
            return false;
        };
        if slots.values().any(&mut hit) {
            return true;
        }
        drop(slots);
        if !ports || self.ports.read().map(|p| p.is_empty()).unwrap_or(true) {
            return false;
        }
        self.children().iter().any(|(_, d)| hit(d))
    }
}

/// The root bus is restored as built for boot (the same functions in the
/// same slots): configuration spaces come back, checked all first.
impl Persist for Arc<PciRoot> {
    type State = Vec<FunctionState>;
    type ConstructorArgs = Arc<PciRoot>;
    type Error = StateError;

    fn save(&self) -> Result<Vec<FunctionState>, StateError> {
        PciRoot::save(self).map_err(|e| StateError::Mismatch(e.to_string()))
    }

    fn restore(built: Self, state: &Vec<FunctionState>) -> Result<Self, StateError> {
        PciRoot::restore(&built, state).map_err(|e| StateError::Mismatch(e.to_string()))?;
        Ok(built)
    }
}

/// Configuration mechanism #1: address register at 0xCF8, data at 0xCFC-0xCFF.
/// Insert on the port bus at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub const BASE: u16 = 0xcf8;

    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, device, function, register offset) when the enable bit is set.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        if a & (1 << 31) == 0 {
            return None;
        }
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize + data_offset as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                let o = offset as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(o + i).copied().unwrap_or(0xff);
                }
            }
            4..=7 => match self.target(offset - 4) {
                Some((bus, dev, func, reg)) if reg + data.len() <= 256 => {
                    self.root.config_read(bus, dev, func, reg, data)
                }
                _ => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            4..=7 => {
                if let Some((bus, dev, func, reg)) = self.target(offset - 4) {
                    if reg + data.len() <= 256 {
                        self.root.config_write(bus, dev, func, reg, data);
                    }
                }
            }
            _ => {}
        }
    }
}

/// ECAM: 4 KiB of configuration space per function, memory-mapped.
/// Insert on the MMIO bus at the ECAM base with length `buses * 1 MiB`.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }

    fn target(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = Self::target(offset);
        if reg + data.len() > 4096 {
            data.fill(0xff);
            return;
        }
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = Self::target(offset);
        if reg + data.len() <= 4096 {
            self.root.config_write(bus, dev, func, reg, data);
        }
    }
}

/// A PCI memory window: accesses go to whichever function's BAR decodes the
/// address, wherever the guest moved it within the window. Insert on the
/// MMIO bus at `base` ([`PciWindow::io`]: the same for port I/O).
pub struct PciWindow {
    root: Arc<PciRoot>,
    base: u64,
    io: bool,
}

impl PciWindow {
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciWindow {
            root,
            base,
            io: false,
        }
    }

    /// The PCI I/O port window: port accesses go to whichever root-bus
    /// function's I/O BAR decodes the port. Insert on the port bus at
    /// [`PCI_IO_WINDOW`].
    pub fn io(root: Arc<PciRoot>) -> Self {
        PciWindow {
            root,
            base: PCI_IO_WINDOW.0,
            io: true,
        }
    }

    fn access(&self, addr: u64, f: impl FnOnce(&mut dyn PciDevice, usize, u64)) -> bool {
        if self.io {
            self.root.io_access(addr, f)
        } else {
            self.root.bar_access(addr, f)
        }
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        let mut out = vec![0xff; data.len()];
        let hit = self.access(addr, |d, bar, off| d.bar_read(bar, off, &mut out));
        if hit {
            data.copy_from_slice(&out);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        self.access(addr, |d, bar, off| d.bar_write(bar, off, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{Bar, COMMAND, COMMAND_MEMORY};

    /// A device with one 32-bit and one 64-bit BAR that records BAR writes.
    struct Dummy {
        config: ConfigSpace,
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl Dummy {
        fn new() -> Self {
            let mut config = ConfigSpace::new(PciIds {
                vendor: 0x1af4,
                device: 0x1041,
                class: (0x02, 0x00, 0x00),
                revision: 1,
                subsystem_vendor: 0x1af4,
                subsystem: 1,
            });
            config
                .add_bar(
                    0,
                    Bar {
                        kind: BarKind::Mem32,
                        size: 0x1000,
                    },
                )
                .unwrap();
            config
                .add_bar(
                    2,
                    Bar {
                        kind: BarKind::Mem64 {
                            prefetchable: false,
                        },
                        size: 0x4000,
                    },
                )
                .unwrap();
            Dummy {
                config,
                writes: vec![],
            }
        }
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
        fn name(&self) -> String {
            "dummy".into()
        }
    }

    #[test]
    fn io_bars_are_placed_in_the_io_window_and_reached_through_it() {
        let root = Arc::new(PciRoot::new(LOW, HIGH).unwrap());
        let mut d = Dummy::new();
        let io = Bar {
            kind: BarKind::Io,
            size: 8,
        };
        d.config.add_bar(4, io).unwrap();
        d.config.add_bar(5, io).unwrap();
        let dev = Arc::new(Mutex::new(d));
        root.add(dev.clone()).unwrap();
        let (a, b) = {
            let d = dev.lock().unwrap();
            (d.config.bar_address(4), d.config.bar_address(5))
        };
        assert_eq!(a, Some(PCI_IO_WINDOW.0));
        assert_eq!(b, Some(PCI_IO_WINDOW.0 + 8));
        let mut window = PciWindow::io(root.clone());
        let mut byte = [0u8];
        window.read(8 + 3, &mut byte);
        assert_eq!(byte, [0xff], "no I/O decoding yet");
        dev.lock()
            .unwrap()
            .config
            .write(COMMAND, &crate::pci::config::COMMAND_IO.to_le_bytes());
        window.read(8 + 3, &mut byte);
        assert_eq!(byte, [0x53], "BAR 5, offset 3");
        window.write(2, &[7]);
        assert_eq!(dev.lock().unwrap().writes, vec![(4, 2, vec![7])]);
        window.read(16, &mut byte);
        assert_eq!(byte, [0xff], "past the BARs");
        // The window gives its space back with the function.
        let slot = root
            .list()
            .iter()
            .find(|(_, n)| n == "dummy")
            .map(|(l, _)| l.slot)
            .unwrap();
        root.remove(slot).unwrap();
        let again = Arc::new(Mutex::new(Dummy::new()));
        again.lock().unwrap().config.add_bar(4, io).unwrap();
        root.add(again.clone()).unwrap();
        assert_eq!(
            again.lock().unwrap().config.bar_address(4),
            Some(PCI_IO_WINDOW.0)
        );
    }

    const LOW: (u64, u64) = (0xc000_0000, 0x2000_0000);
    const HIGH: (u64, u64) = (0x40_0000_0000, 0x40_0000_0000);

    fn cf8(io: &mut PciConfigIo, dev: u8, reg: u32) {
        let a = (1u32 << 31) | (u32::from(dev) << 11) | reg;
        io.write(0, &a.to_le_bytes());
    }

    fn io_read32(io: &mut PciConfigIo, dev: u8, reg: u32) -> u32 {
        cf8(io, dev, reg);
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_mechanism_1_and_ecam_see_the_same_functions() {
        let root = Arc::new(PciRoot::new(LOW, HIGH).unwrap());
        let slot = root.add(Arc::new(Mutex::new(Dummy::new()))).unwrap();
        assert_eq!(slot, 1, "slot 0 is the host bridge");
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciEcam::new(root.clone());
        assert_eq!(io_read32(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(io_read32(&mut io, 1, 0), 0x1041_1af4);
        assert_eq!(io_read32(&mut io, 2, 0), 0xffff_ffff, "empty slot");
        let mut b = [0u8; 4];
        ecam.read(1 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1041_1af4);
        ecam.read((1 << 15) | (1 << 12), &mut b);
        assert_eq!(b, [0xff; 4], "function 1 does not exist");
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 does not exist");
        // Byte access through 0xCFC + 2 reads the device ID.
        cf8(&mut io, 1, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        // Enable bit clear: no access.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(
            root.list(),
            vec![
                (Location::root(0), "host-bridge".into()),
                (Location::root(1), "dummy".into())
            ]
        );
    }

    #[test]
    fn bars_are_placed_in_their_windows_and_routed_when_enabled() {
        let root = Arc::new(PciRoot::new(LOW, HIGH).unwrap());
        let dev = Arc::new(Mutex::new(Dummy::new()));
        root.add(dev.clone()).unwrap();
        let (b0, b2) = {
            let d = dev.lock().unwrap();
            (
                d.config.bar_address(0).unwrap(),
                d.config.bar_address(2).unwrap(),
            )
        };
        assert!((LOW.0..LOW.0 + LOW.1).contains(&b0));
        assert!((HIGH.0..HIGH.0 + HIGH.1).contains(&b2));
        assert_eq!(b2 % 0x4000, 0, "naturally aligned");
        let mut low = PciWindow::new(root.clone(), LOW.0);
        let mut high = PciWindow::new(root.clone(), HIGH.0);
        let mut b = [0u8; 4];
        low.read(b0 - LOW.0 + 4, &mut b);
        assert_eq!(b, [0xff; 4], "memory decoding is off");
        let mut ecam = PciEcam::new(root.clone());
        ecam.write((1 << 15) | COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        low.read(b0 - LOW.0 + 4, &mut b);
        assert_eq!(b, [0x04; 4]);
        high.write(b2 - HIGH.0 + 8, &[1, 2]);
        assert_eq!(dev.lock().unwrap().writes, vec![(2, 8, vec![1, 2])]);
        // The guest moves BAR 0: accesses follow it.
        ecam.write((1 << 15) | 0x10, &0xd000_0000u32.to_le_bytes());
        low.read(0xd000_0000 - LOW.0, &mut b);
        assert_eq!(b, [0x00; 4]);
        low.read(b0 - LOW.0 + 4, &mut b);
        assert_eq!(b, [0xff; 4], "old address no longer decodes");
    }

    #[test]
    fn a_removed_function_gives_its_slot_and_bar_space_back() {
        let root = PciRoot::new((0xc000_0000, 0x1000), HIGH).unwrap();
        let slot = root.add(Arc::new(Mutex::new(Dummy::new()))).unwrap();
        assert!(matches!(
            root.add(Arc::new(Mutex::new(Dummy::new()))),
            Err(PciError::NoBarSpace { .. })
        ));
        root.remove(slot).unwrap();
        assert_eq!(root.list().len(), 1);
        assert!(matches!(root.remove(slot), Err(PciError::EmptySlot(_))));
        assert!(matches!(root.remove(0), Err(PciError::SlotTaken(0))));
        assert_eq!(root.add(Arc::new(Mutex::new(Dummy::new()))).unwrap(), slot);
    }

    #[test]
    fn windows_run_out_with_an_error() {
        let root = PciRoot::new((0xc000_0000, 0x2000), HIGH).unwrap();
        root.add(Arc::new(Mutex::new(Dummy::new()))).unwrap();
        root.add(Arc::new(Mutex::new(Dummy::new()))).unwrap();
        assert!(matches!(
            root.add(Arc::new(Mutex::new(Dummy::new()))),
            Err(PciError::NoBarSpace { .. })
        ));
        assert_eq!(root.list().len(), 3, "the refused device was not added");
        // The high window still has room: the refused device's 64-bit BAR
        // was not allocated, or was given back.
        let mut big = Dummy::new();
        big.config = ConfigSpace::new(HOST_BRIDGE_IDS);
        root.add(Arc::new(Mutex::new(big))).unwrap();
    }
}
