//! A PCI Express root port with a hot-plug slot (PCIe native hot-plug), so
//! that a guest's own hot-plug driver (Linux: pciehp) notices a function
//! arriving or asked to leave, with no agent in the guest.
//!
//! The port is a type 1 function on bus 0 whose secondary bus holds at most
//! one function (device 0). The VMM acts as its firmware: it programs the
//! bus numbers and gives the port its own memory windows, carved out of the
//! root bus's, in which it places the BARs of what it plugs.
//!
//! Slot protocol, as the PCIe base specification has it (section 6.7):
//! - plug: the function appears (Presence Detect State and Data Link Layer
//!   Link Active set), the port raises Presence Detect Changed and Data
//!   Link Layer State Changed; the guest powers the slot on and scans it;
//! - orderly unplug: the VMM presses the Attention Button; the guest
//!   unbinds the function's driver and powers the slot off (Linux waits 5 s
//!   in case the button is pressed again); the VMM sees Power Controller
//!   Control go to "off" and takes the function away;
//! - surprise unplug (forced): the function goes and the port raises the
//!   change events.
//!
//! Events reach the guest as the port's single MSI vector when it enabled
//! them (Hot-Plug Interrupt Enable and the event's own enable bit).
use super::config::*;
use super::{PciDevice, PciIds, SharedPciDevice};
use crate::interrupt::{MsiMessage, MsiVectors};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

/// IDs of the root port: class 06.04.00 (PCI-to-PCI bridge), next to the
/// host bridge's 8086:0d57.
pub const ROOT_PORT_IDS: PciIds = PciIds {
    vendor: 0x8086,
    device: 0x0d58,
    class: (0x06, 0x04, 0x00),
    revision: 0,
    subsystem_vendor: 0,
    subsystem: 0,
};

/// After the guest powers a slot off, its hot-plug driver ignores presence
/// and link changes for a while (Linux's pciehp: 1 s, "caused by power
/// off"): a function plugged in that window would go unnoticed.
pub const POWER_OFF_SETTLE: Duration = Duration::from_millis(1500);

/// Bridge windows have 1 MiB granularity.
pub const WINDOW_ALIGN: u64 = 1 << 20;

// PCI Express capability, offsets from its start.
const PCIE_CAP_ID: u8 = 0x10;
const PCIE_CAP_LEN: usize = 0x3c;
const EXP_FLAGS: usize = 0x02;
const EXP_LNKCAP: usize = 0x0c;
const EXP_LNKSTA: usize = 0x12;
const EXP_SLTCAP: usize = 0x14;
const EXP_SLTCTL: usize = 0x18;
const EXP_SLTSTA: usize = 0x1a;
const EXP_LNKCAP2: usize = 0x2c;

/// Version 2, root port, slot implemented.
const FLAGS: u16 = 0x2 | (0x4 << 4) | (1 << 8);
/// 2.5 GT/s, x1, Data Link Layer Link Active reporting.
const LNKCAP: u32 = 0x1 | (1 << 4) | (1 << 20);
const LNKSTA_SPEED_WIDTH: u16 = 0x1 | (1 << 4);
const LNKSTA_DLLLA: u16 = 1 << 13;

// Slot Capabilities: attention button, power controller, attention and
// power indicators, hot-plug capable, no command-completed events (writes
// to Slot Control take effect at once); the physical slot number above.
const SLTCAP: u32 = 0x1 | 0x2 | 0x8 | 0x10 | 0x40 | (1 << 18);
const SLTCAP_PSN_SHIFT: u32 = 19;

// Slot Control.
const SLTCTL_HPIE: u16 = 1 << 5;
const SLTCTL_PIC_OFF: u16 = 0x3 << 8;
const SLTCTL_AIC_OFF: u16 = 0x3 << 6;
const SLTCTL_PCC: u16 = 1 << 10; // power controller: 1 = off
const SLTCTL_WRITABLE: u16 = 0x1fff;

// Slot Status.
pub const SLTSTA_ABP: u16 = 1 << 0;
pub const SLTSTA_PDC: u16 = 1 << 3;
const SLTSTA_PDS: u16 = 1 << 6;
pub const SLTSTA_DLLSC: u16 = 1 << 8;
/// Write-1-to-clear event bits.
const SLTSTA_EVENTS: u16 = 0x1f | SLTSTA_DLLSC;

// MSI capability (64-bit, one vector, no masking).
const MSI_CAP_ID: u8 = 0x05;
const MSI_CAP_LEN: usize = 14;
const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;

/// One hot-plug slot behind a root port.
pub struct RootPort {
    config: ConfigSpace,
    pcie: usize,
    msi: usize,
    vectors: Arc<dyn MsiVectors>,
    child: Option<SharedPciDevice>,
    /// The port's windows: 32-bit (non-prefetchable) and 64-bit
    /// prefetchable, and what the child's BARs took of them.
    mem: AddressAllocator,
    pref: AddressAllocator,
    placed: Vec<(bool, RangeInclusive)>,
    bus: u8,
    number: u8,
    /// When the guest last powered the slot off.
    powered_off_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("hot-plug slot {0} is occupied")]
    Occupied(u8),
    #[error("hot-plug slot {slot}: no room in its {window} window for a BAR of {size:#x} bytes")]
    NoBarSpace {
        slot: u8,
        window: &'static str,
        size: u64,
    },
    #[error("hot-plug slot {0}: bad window {1:#x}+{2:#x}")]
    BadWindow(u8, u64, u64),
    #[error("hot-plug slot {0}: {1}")]
    Config(u8, ConfigError),
    #[error("hot-plug slot {0}: lock poisoned")]
    Poisoned(u8),
    #[error("hot-plug slot {0}: the function has an I/O BAR and a root port forwards no port I/O (it goes on bus 0)")]
    IoBar(u8),
}

impl RootPort {
    /// Port with physical slot `number` (1-based, as the guest names the
    /// slot) whose secondary bus is `bus`, with memory window `mem` below
    /// 4 GiB and prefetchable window `pref` (both (base, size), 1 MiB
    /// aligned), raising its events through `vectors` (one vector).
    pub fn new(
        number: u8,
        bus: u8,
        mem: (u64, u64),
        pref: (u64, u64),
        vectors: Arc<dyn MsiVectors>,
    ) -> Result<RootPort, PortError> {
        let cfg = |e| PortError::Config(number, e);
        let mut config = ConfigSpace::bridge(ROOT_PORT_IDS);
        config
            .raw_mut(PRIMARY_BUS, 3)
            .copy_from_slice(&[0, bus, bus]);
        for (base, size) in [mem, pref] {
            if base % WINDOW_ALIGN != 0 || size < WINDOW_ALIGN || size % WINDOW_ALIGN != 0 {
                return Err(PortError::BadWindow(number, base, size));
            }
        }
        window_registers(&mut config, mem, pref);

        let mut body = vec![0u8; PCIE_CAP_LEN];
        let mut writable = vec![0u8; PCIE_CAP_LEN];
        body[0] = PCIE_CAP_ID;
        put16(&mut body, EXP_FLAGS, FLAGS);
        put32(&mut body, EXP_LNKCAP, LNKCAP | (u32::from(number) << 24));
        put16(&mut body, EXP_LNKSTA, LNKSTA_SPEED_WIDTH);
        put32(
            &mut body,
            EXP_SLTCAP,
            SLTCAP | (u32::from(number) << SLTCAP_PSN_SHIFT),
        );
        // An empty slot starts powered off, indicators off.
        put16(
            &mut body,
            EXP_SLTCTL,
            SLTCTL_PCC | SLTCTL_PIC_OFF | SLTCTL_AIC_OFF,
        );
        put32(&mut body, EXP_LNKCAP2, 0x2); // supported speeds: 2.5 GT/s
                                            // Device, link, slot and root control, and the events' RW1C bits
                                            // (handled in config_write; writable here so that a saved state
                                            // with events pending is taken back).
        put16(&mut writable, 0x08, 0xffff);
        put16(&mut writable, 0x10, 0x0fff);
        put16(&mut writable, EXP_SLTCTL, SLTCTL_WRITABLE);
        put16(&mut writable, EXP_SLTSTA, SLTSTA_EVENTS);
        put16(&mut writable, 0x1c, 0x001f);
        put16(&mut writable, 0x28, 0xffff);
        put16(&mut writable, 0x30, 0xffff);
        let pcie = config.add_capability(&body, &writable).map_err(cfg)?;

        let mut body = vec![0u8; MSI_CAP_LEN];
        let mut writable = vec![0u8; MSI_CAP_LEN];
        body[0] = MSI_CAP_ID;
        put16(&mut body, 2, MSI_64BIT);
        put16(&mut writable, 2, MSI_ENABLE | (0x7 << 4));
        put32(&mut writable, 4, 0xffff_fffc);
        put32(&mut writable, 8, 0xffff_ffff);
        put16(&mut writable, 12, 0xffff);
        let msi = config.add_capability(&body, &writable).map_err(cfg)?;

        let alloc = |(base, size): (u64, u64)| {
            AddressAllocator::new(base, size).map_err(|_| PortError::BadWindow(number, base, size))
        };
        Ok(RootPort {
            config,
            pcie,
            msi,
            vectors,
            child: None,
            mem: alloc(mem)?,
            pref: alloc(pref)?,
            placed: Vec::new(),
            bus,
            number,
            powered_off_at: None,
        })
    }

    /// The physical slot number (1-based).
    pub fn number(&self) -> u8 {
        self.number
    }

    /// The bus the VMM gave the slot (the guest may renumber; see
    /// [`RootPort::secondary_bus`]).
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// The secondary bus as programmed now.
    pub fn secondary_bus(&self) -> u8 {
        self.config.raw(SECONDARY_BUS, 1)[0]
    }

    pub fn child(&self) -> Option<&SharedPciDevice> {
        self.child.as_ref()
    }

    pub fn occupied(&self) -> bool {
        self.child.is_some()
    }

    /// How long until a function plugged here will be noticed: zero for an
    /// empty slot that is off and settled; the rest of the settle time
    /// after the guest powered it off; `None` while it is occupied, or
    /// empty but still powered (the guest has not finished with what was
    /// there).
    pub fn ready_in(&self) -> Option<Duration> {
        if self.child.is_some() || self.powered() && self.powered_off_at.is_some() {
            return None;
        }
        Some(match self.powered_off_at {
            Some(t) => POWER_OFF_SETTLE.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        })
    }

    /// Whether the guest has the slot powered on.
    pub fn powered(&self) -> bool {
        self.slot_control() & SLTCTL_PCC == 0
    }

    fn slot_control(&self) -> u16 {
        self.config.u16_at(self.pcie + EXP_SLTCTL)
    }

    fn slot_status(&self) -> u16 {
        self.config.u16_at(self.pcie + EXP_SLTSTA)
    }

    /// Puts `dev` in the slot: its BARs are placed in the port's windows,
    /// then the guest is told (presence and link change). On error the
    /// slot stays empty.
    pub fn plug(&mut self, dev: SharedPciDevice) -> Result<(), PortError> {
        if self.child.is_some() {
            return Err(PortError::Occupied(self.number));
        }
        self.placed = self.place_bars(&dev)?;
        self.child = Some(dev);
        self.raise(SLTSTA_PDC | SLTSTA_DLLSC);
        Ok(())
    }

    /// Asks the guest to let go of the function (the Attention Button).
    pub fn press_button(&mut self) {
        self.raise(SLTSTA_ABP);
    }

    /// Takes the function out of the slot and tells the guest (presence
    /// and link change). None if the slot was empty.
    pub fn unplug(&mut self) -> Option<SharedPciDevice> {
        let dev = self.child.take()?;
        for (wide, range) in std::mem::take(&mut self.placed) {
            let alloc = if wide { &mut self.pref } else { &mut self.mem };
            let _ = alloc.free(&range);
        }
        self.raise(SLTSTA_PDC | SLTSTA_DLLSC);
        Some(dev)
    }

    fn place_bars(
        &mut self,
        dev: &SharedPciDevice,
    ) -> Result<Vec<(bool, RangeInclusive)>, PortError> {
        let number = self.number;
        let mut d = dev.lock().map_err(|_| PortError::Poisoned(number))?;
        let bars: Vec<_> = d.config().bars().collect();
        if bars.iter().any(|(_, b)| b.kind == BarKind::Io) {
            return Err(PortError::IoBar(number));
        }
        let mut placed: Vec<(bool, RangeInclusive)> = Vec::new();
        for (i, bar) in bars {
            // Only prefetchable 64-bit BARs may live in the prefetchable
            // window; every other BAR needs the 32-bit one.
            let wide = matches!(bar.kind, BarKind::Mem64 { prefetchable: true });
            let alloc = if wide { &mut self.pref } else { &mut self.mem };
            match alloc.allocate(bar.size, bar.size, AllocPolicy::FirstMatch) {
                Ok(range) => {
                    d.config_mut().set_bar_address(i, range.start());
                    placed.push((wide, range));
                }
                Err(_) => {
                    for (wide, range) in placed {
                        let alloc = if wide { &mut self.pref } else { &mut self.mem };
                        let _ = alloc.free(&range);
                    }
                    return Err(PortError::NoBarSpace {
                        slot: number,
                        window: if wide { "prefetchable" } else { "32-bit" },
                        size: bar.size,
                    });
                }
            }
        }
        Ok(placed)
    }

    /// Sets event bits in Slot Status and sends the port's MSI if the guest
    /// enabled any of the new ones.
    fn raise(&mut self, events: u16) {
        let status = self.slot_status();
        let new = events & !status;
        let at = self.pcie + EXP_SLTSTA;
        self.config.set_u16(at, status | events);
        let control = self.slot_control();
        if control & SLTCTL_HPIE == 0 || new & enabled_events(control) == 0 {
            return;
        }
        let msi_control = self.config.u16_at(self.msi + 2);
        if msi_control & MSI_ENABLE != 0 {
            if let Err(e) = self.vectors.trigger(0) {
                tracing::warn!("hot-plug slot {}: interrupt: {e}", self.number);
            }
        }
    }

    /// After the configuration space was restored (snapshot, migration):
    /// the MSI route follows it, and a slot that is off counts as just
    /// powered off (the guest may have done so moments before the
    /// switch-over: its driver may still be ignoring the slot).
    pub fn restored(&mut self) {
        self.route_msi();
        if !self.powered() {
            self.powered_off_at = Some(Instant::now());
        }
    }

    /// Routes the MSI vector as the guest programmed it.
    fn route_msi(&self) {
        let control = self.config.u16_at(self.msi + 2);
        let msg = (control & MSI_ENABLE != 0).then(|| MsiMessage {
            addr: u64::from(self.config.u32_at(self.msi + 4))
                | (u64::from(self.config.u32_at(self.msi + 8)) << 32),
            data: u32::from(self.config.u16_at(self.msi + 12)),
        });
        if let Err(e) = self.vectors.route(0, msg) {
            tracing::warn!("hot-plug slot {}: MSI route: {e}", self.number);
        }
    }
}

/// Slot Status events the guest enabled in Slot Control (bit positions
/// match for the first five; Data Link Layer State Changed is enabled by
/// bit 12).
fn enabled_events(control: u16) -> u16 {
    (control & 0x1f)
        | if control & (1 << 12) != 0 {
            SLTSTA_DLLSC
        } else {
            0
        }
}

/// Bridge window registers for `mem` (32-bit) and `pref` (64-bit).
fn window_registers(c: &mut ConfigSpace, mem: (u64, u64), pref: (u64, u64)) {
    let reg = |addr: u64| ((addr >> 16) as u16) & 0xfff0;
    c.set_u16(MEMORY_BASE, reg(mem.0));
    c.set_u16(MEMORY_LIMIT, reg(mem.0 + mem.1 - 1));
    c.set_u16(PREF_MEMORY_BASE, reg(pref.0) | 1);
    c.set_u16(PREF_MEMORY_LIMIT, reg(pref.0 + pref.1 - 1) | 1);
    c.set_u32(PREF_BASE_UPPER, (pref.0 >> 32) as u32);
    c.set_u32(PREF_LIMIT_UPPER, ((pref.0 + pref.1 - 1) >> 32) as u32);
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

impl PciDevice for RootPort {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    /// Presence and link state come from the slot, not from stored bytes.
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        let present = self.child.is_some();
        let live = [
            (self.pcie + EXP_SLTSTA, SLTSTA_PDS, present),
            (self.pcie + EXP_LNKSTA, LNKSTA_DLLLA, present),
        ];
        for (reg, bit, on) in live {
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset + i;
                if at == reg || at == reg + 1 {
                    let mask = bit.to_le_bytes()[at - reg];
                    *b = if on { *b | mask } else { *b & !mask };
                }
            }
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let status = self.pcie + EXP_SLTSTA;
        let was_powered = self.powered();
        // Slot Status events are write-1-to-clear.
        let mut rest = data.to_vec();
        for (i, b) in rest.iter_mut().enumerate() {
            let at = offset + i;
            if at == status || at == status + 1 {
                let events = SLTSTA_EVENTS.to_le_bytes()[at - status];
                self.config.raw_mut(at, 1)[0] &= !(*b & events);
                *b = self.config.raw(at, 1)[0];
            }
        }
        self.config.write(offset, &rest);
        if offset < self.msi + MSI_CAP_LEN && offset + data.len() > self.msi {
            self.route_msi();
        }
        if was_powered && !self.powered() {
            self.powered_off_at = Some(Instant::now());
        }
        if was_powered != self.powered() {
            tracing::info!(
                "hot-plug slot {}: the guest powered it {}",
                self.number,
                if self.powered() { "on" } else { "off" }
            );
        }
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    fn name(&self) -> String {
        format!("pcie-root-port (hot-plug slot {})", self.number)
    }

    fn counters(&self) -> super::Counters {
        vec![
            ("occupied", u64::from(self.occupied())),
            ("powered", u64::from(self.powered())),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::pci::root::{Location, PciEcam, PciRoot, PciWindow, PORT_MEM_WINDOW};
    use std::sync::Mutex;

    /// MSI vectors that count triggers and remember the route.
    #[derive(Default)]
    struct Recorder {
        triggers: Mutex<u32>,
        route: Mutex<Option<MsiMessage>>,
    }

    impl MsiVectors for Recorder {
        fn len(&self) -> u16 {
            1
        }
        fn route(&self, _v: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
            *self.route.lock().unwrap() = msg;
            Ok(())
        }
        fn trigger(&self, _v: u16) -> std::io::Result<()> {
            *self.triggers.lock().unwrap() += 1;
            Ok(())
        }
    }

    struct Endpoint {
        config: ConfigSpace,
    }

    impl Endpoint {
        fn new() -> Self {
            let mut config = ConfigSpace::new(PciIds {
                vendor: 0x15b3,
                device: 0x101c,
                class: (0x02, 0x07, 0x00),
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            config
                .add_bar(
                    0,
                    Bar {
                        kind: BarKind::Mem64 { prefetchable: true },
                        size: 32 << 20,
                    },
                )
                .unwrap();
            config
                .add_bar(
                    2,
                    Bar {
                        kind: BarKind::Mem32,
                        size: 0x1000,
                    },
                )
                .unwrap();
            Endpoint { config }
        }
    }

    impl PciDevice for Endpoint {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(0x40 | bar as u8);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn name(&self) -> String {
            "endpoint".into()
        }
    }

    const LOW: (u64, u64) = (0xc000_0000, 0x2000_0000);
    const HIGH: (u64, u64) = (0x40_0000_0000, 0x40_0000_0000);

    fn ecam_at(bus: u8, dev: u8, reg: usize) -> u64 {
        (u64::from(bus) << 20) | (u64::from(dev) << 15) | reg as u64
    }

    fn rd(e: &mut PciEcam, bus: u8, dev: u8, reg: usize, n: usize) -> u32 {
        let mut b = [0u8; 4];
        e.read(ecam_at(bus, dev, reg), &mut b[..n]);
        u32::from_le_bytes(b)
    }

    fn wr(e: &mut PciEcam, bus: u8, dev: u8, reg: usize, v: u32, n: usize) {
        e.write(ecam_at(bus, dev, reg), &v.to_le_bytes()[..n]);
    }

    /// Offset of capability `id` of the function at bus 0, `dev`.
    fn cap(e: &mut PciEcam, dev: u8, id: u8) -> usize {
        let mut p = rd(e, 0, dev, CAPABILITIES_POINTER, 1) as usize;
        while p != 0 {
            if rd(e, 0, dev, p, 1) as u8 == id {
                return p;
            }
            p = rd(e, 0, dev, p + 1, 1) as usize;
        }
        panic!("no capability {id:#x}");
    }

    /// What the guest's driver does first: MSI at `addr`/`data`, enabled.
    fn guest_enables_msi(e: &mut PciEcam, slot: u8, addr: u32, data: u32) {
        let msi = cap(e, slot, MSI_CAP_ID);
        wr(e, 0, slot, msi + 4, addr, 4);
        wr(e, 0, slot, msi + 12, data, 2);
        wr(e, 0, slot, msi + 2, 1, 2);
    }

    fn setup() -> (Arc<PciRoot>, PciEcam, Arc<Recorder>, u8, usize) {
        let root = Arc::new(PciRoot::new(LOW, HIGH).unwrap());
        let rec = Arc::new(Recorder::default());
        let slot = root.add_root_port(1, rec.clone()).unwrap();
        let mut e = PciEcam::new(root.clone());
        let pcie = cap(&mut e, slot, PCIE_CAP_ID);
        (root, e, rec, slot, pcie)
    }

    #[test]
    fn a_root_port_looks_like_a_hot_plug_capable_pcie_bridge() {
        let (root, mut e, _, slot, pcie) = setup();
        assert_eq!(slot, 31, "ports take the highest slots");
        assert_eq!(rd(&mut e, 0, slot, 0, 4), 0x0d58_8086);
        assert_eq!(rd(&mut e, 0, slot, HEADER_TYPE, 1), 1);
        assert_eq!(rd(&mut e, 0, slot, CLASS_PROG_IF, 4) >> 8, 0x0604);
        assert_eq!(rd(&mut e, 0, slot, PRIMARY_BUS, 4) & 0xff_ffff, 0x01_0100);
        // Port type 4 (root port), slot implemented.
        assert_eq!(rd(&mut e, 0, slot, pcie + EXP_FLAGS, 2), 0x0142);
        let sltcap = rd(&mut e, 0, slot, pcie + EXP_SLTCAP, 4);
        assert_eq!(sltcap & 0x40, 0x40, "hot-plug capable");
        assert_eq!(sltcap >> 19, 1, "physical slot number");
        // Windows inside the root's: 32-bit below 4 GiB, 64-bit above.
        let base = u64::from(rd(&mut e, 0, slot, MEMORY_BASE, 2) & 0xfff0) << 16;
        let limit = (u64::from(rd(&mut e, 0, slot, MEMORY_LIMIT, 2) & 0xfff0) << 16) | 0xf_ffff;
        assert_eq!(limit + 1 - base, PORT_MEM_WINDOW);
        assert!(base >= LOW.0 && limit < LOW.0 + LOW.1);
        assert_eq!(rd(&mut e, 0, slot, PREF_MEMORY_BASE, 2) & 0xf, 1, "64-bit");
        assert!(u64::from(rd(&mut e, 0, slot, PREF_BASE_UPPER, 4)) << 32 >= HIGH.0);
        // No I/O window: its registers stay zero.
        wr(&mut e, 0, slot, 0x1c, 0xe0f0, 2);
        assert_eq!(rd(&mut e, 0, slot, 0x1c, 2), 0);
        // Empty: nothing on bus 1, slot powered off.
        assert_eq!(rd(&mut e, 1, 0, 0, 4), 0xffff_ffff);
        assert_eq!(
            rd(&mut e, 0, slot, pcie + EXP_SLTSTA, 2) & SLTSTA_PDS as u32,
            0
        );
        assert_eq!(root.list().len(), 2);
        assert!(root.remove(slot).is_err(), "a port is not unplugged");
    }

    #[test]
    fn plug_button_power_off_and_unplug_follow_the_slot_protocol() {
        let (root, mut e, rec, slot, pcie) = setup();
        // The guest's driver: MSI on, hot-plug events enabled.
        guest_enables_msi(&mut e, slot, 0xfee0_0000, 0x41);
        assert_eq!(rec.route.lock().unwrap().map(|m| m.data), Some(0x41));
        let enables = 0x1 | 0x8 | SLTCTL_HPIE as u32 | (1 << 12);
        let ctl = rd(&mut e, 0, slot, pcie + EXP_SLTCTL, 2);
        wr(&mut e, 0, slot, pcie + EXP_SLTCTL, ctl | enables, 2);

        let at = root
            .hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .unwrap();
        assert_eq!(at, Location { bus: 1, slot: 0 });
        assert_eq!(at.to_string(), "01:00.0");
        assert_eq!(*rec.triggers.lock().unwrap(), 1);
        assert_eq!(
            rd(&mut e, 1, 0, 0, 4),
            0x101c_15b3,
            "reachable behind the port"
        );
        let sta = rd(&mut e, 0, slot, pcie + EXP_SLTSTA, 2) as u16;
        assert_eq!(
            sta & (SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC
        );
        let lnk = rd(&mut e, 0, slot, pcie + EXP_LNKSTA, 2) as u16;
        assert_eq!(
            lnk & (LNKSTA_DLLLA | 0x3f0),
            LNKSTA_DLLLA | 0x10,
            "link up, x1"
        );
        // Write-1-to-clear: PDC goes, DLLSC and presence stay.
        wr(&mut e, 0, slot, pcie + EXP_SLTSTA, u32::from(SLTSTA_PDC), 2);
        let sta = rd(&mut e, 0, slot, pcie + EXP_SLTSTA, 2) as u16;
        assert_eq!(
            sta & (SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC),
            SLTSTA_PDS | SLTSTA_DLLSC
        );
        // A second function does not fit.
        assert!(root
            .hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .is_err());

        // BARs: in the port's windows, and reached through the root windows.
        let dev = root
            .port_at(at)
            .unwrap()
            .lock()
            .unwrap()
            .child()
            .unwrap()
            .clone();
        let (b0, b2) = {
            let d = dev.lock().unwrap();
            (
                d.config().bar_address(0).unwrap(),
                d.config().bar_address(2).unwrap(),
            )
        };
        let pref = u64::from(rd(&mut e, 0, slot, PREF_BASE_UPPER, 4)) << 32
            | u64::from(rd(&mut e, 0, slot, PREF_MEMORY_BASE, 2) & 0xfff0) << 16;
        assert_eq!(
            b0, pref,
            "prefetchable 64-bit BAR in the prefetchable window"
        );
        assert!(b2 < 1 << 32);
        wr(&mut e, 1, 0, COMMAND, u32::from(COMMAND_MEMORY), 2);
        let mut high = PciWindow::new(root.clone(), HIGH.0);
        let mut b = [0u8; 4];
        high.read(b0 - HIGH.0, &mut b);
        assert_eq!(b, [0x40; 4]);

        // The guest renumbers the bus: config access follows.
        wr(&mut e, 0, slot, SECONDARY_BUS, 0x05, 1);
        assert_eq!(rd(&mut e, 1, 0, 0, 4), 0xffff_ffff);
        assert_eq!(rd(&mut e, 5, 0, 0, 4), 0x101c_15b3);
        wr(&mut e, 0, slot, SECONDARY_BUS, 0x01, 1);

        // Orderly removal: the button, then the guest powers off.
        let port = root.port_at(at).unwrap();
        port.lock().unwrap().press_button();
        assert_eq!(*rec.triggers.lock().unwrap(), 2);
        let ctl = rd(&mut e, 0, slot, pcie + EXP_SLTCTL, 2);
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl & !u32::from(SLTCTL_PCC),
            2,
        );
        assert!(port.lock().unwrap().powered());
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl | u32::from(SLTCTL_PCC),
            2,
        );
        assert!(!port.lock().unwrap().powered());
        // Events already pending (DLLSC) raise no second interrupt.
        root.unplug(at).unwrap();
        assert_eq!(*rec.triggers.lock().unwrap(), 3, "PDC is new");
        assert_eq!(rd(&mut e, 1, 0, 0, 4), 0xffff_ffff);
        assert_eq!(
            rd(&mut e, 0, slot, pcie + EXP_SLTSTA, 2) as u16 & SLTSTA_PDS,
            0
        );
        assert!(matches!(
            root.unplug(at),
            Err(crate::pci::root::PciError::NoFunction(_))
        ));
        // The windows were given back: it plugs again.
        root.hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .unwrap();
    }

    #[test]
    fn a_plug_waits_until_the_guest_has_let_go_of_the_slot() {
        let (root, mut e, _, slot, pcie) = setup();
        let at = root
            .hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .unwrap();
        // The guest powers the slot on, then a surprise removal: the slot
        // is empty but powered until the guest has dealt with it.
        let ctl = rd(&mut e, 0, slot, pcie + EXP_SLTCTL, 2);
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl & !u32::from(SLTCTL_PCC),
            2,
        );
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl | u32::from(SLTCTL_PCC),
            2,
        );
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl & !u32::from(SLTCTL_PCC),
            2,
        );
        root.unplug(at).unwrap();
        let port = root.port_at(at).unwrap();
        assert_eq!(port.lock().unwrap().ready_in(), None, "still powered");
        // Not ready within the patience given: plugged anyway.
        let t = Instant::now();
        root.hotplug(
            Arc::new(Mutex::new(Endpoint::new())),
            Duration::from_millis(100),
        )
        .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        root.unplug(at).unwrap();
        // The guest powers it off: ready after the settle time.
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl | u32::from(SLTCTL_PCC),
            2,
        );
        let wait = port.lock().unwrap().ready_in().unwrap();
        assert!(
            wait > POWER_OFF_SETTLE - Duration::from_millis(200),
            "{wait:?}"
        );
        let t = Instant::now();
        root.hotplug(
            Arc::new(Mutex::new(Endpoint::new())),
            Duration::from_secs(10),
        )
        .unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= wait - Duration::from_millis(50) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[test]
    fn no_interrupt_unless_the_guest_enabled_it() {
        let (root, mut e, rec, slot, pcie) = setup();
        root.hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .unwrap();
        assert_eq!(*rec.triggers.lock().unwrap(), 0, "nothing enabled");
        let ctl = rd(&mut e, 0, slot, pcie + EXP_SLTCTL, 2);
        wr(
            &mut e,
            0,
            slot,
            pcie + EXP_SLTCTL,
            ctl | 0x8 | u32::from(SLTCTL_HPIE),
            2,
        );
        root.unplug(Location { bus: 1, slot: 0 }).unwrap();
        assert_eq!(
            *rec.triggers.lock().unwrap(),
            0,
            "PDC was already set; MSI is off anyway"
        );
    }

    #[test]
    fn a_port_with_events_pending_is_saved_and_restored() {
        let (root, mut e, rec, slot, pcie) = setup();
        guest_enables_msi(&mut e, slot, 0xfee0_1000, 0);
        root.hotplug(Arc::new(Mutex::new(Endpoint::new())), Duration::ZERO)
            .unwrap();
        root.unplug(Location { bus: 1, slot: 0 }).unwrap();
        let saved = root.save().unwrap();
        let (fresh, mut e2, rec2, _, _) = setup();
        fresh.restore(&saved).unwrap();
        assert_eq!(
            rd(&mut e2, 0, slot, pcie + EXP_SLTSTA, 2) as u16 & SLTSTA_PDC,
            SLTSTA_PDC
        );
        assert_eq!(
            rec2.route.lock().unwrap().map(|m| m.addr),
            Some(0xfee0_1000),
            "the restored MSI is routed again"
        );
        drop(rec);
    }

    #[test]
    fn locations_parse_and_print() {
        for s in ["01:00.0", "0000:01:00.0"] {
            assert_eq!(s.parse::<Location>(), Ok(Location { bus: 1, slot: 0 }));
        }
        assert_eq!("00:1f.0".parse::<Location>().unwrap().slot, 0x1f);
        for bad in [
            "",
            "00:20.0",
            "00:1.0",
            "00:01.1",
            "0001:00:01.0",
            "zz:00.0",
        ] {
            assert!(bad.parse::<Location>().is_err(), "{bad}");
        }
    }
}
