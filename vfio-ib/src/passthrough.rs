//! A host PCI function on the guest's PCI bus.
//!
//! What the guest sees of configuration space is composed here:
//!
//! | registers | from |
//! |---|---|
//! | IDs, command, BARs, interrupt line | the shadow [`ConfigSpace`] (BARs are the guest's addresses, sized like the device's regions) |
//! | status, class, subsystem, other capability bytes | the device |
//! | ROM BAR, cardbus, interrupt pin, extended space | zero: no option ROM, no INTx, no extended capabilities |
//! | capability list | the device's MSI, MSI-X, power management, PCI Express and vendor-specific capabilities, re-linked; others hidden |
//! | MSI | emulated ([`crate::msi`]) |
//! | MSI-X enable/mask | emulated (`devices::pci::Msix`, table trapped in its BAR) |
//!
//! BAR areas the backend lets us map (minus the MSI-X table and PBA
//! pages) become KVM memory slots at the guest's BAR address while memory
//! decoding is on, so the guest's loads and stores reach the device with
//! no exit; everything else in a BAR is trapped and forwarded.
use crate::backend::{Backend, Mapping, CONFIG_REGION, IRQ_INTX, IRQ_MSI, IRQ_MSIX};
use crate::msi::{self, Msi};
use devices::interrupt::MsiVectors;
use devices::pci::config::{BAR0, COMMAND, COMMAND_MEMORY, NUM_BARS};
use devices::pci::{Bar, BarKind, ConfigSpace, Counters, Msix, PciDevice, PciIds};
use std::io;
use std::sync::Arc;

const PAGE: u64 = 4096;
/// Capabilities the guest sees: PM, MSI, vendor-specific, PCIe, MSI-X.
const KEPT_CAPS: [u8; 5] = [0x01, msi::CAP_ID, 0x09, 0x10, devices::pci::msix::CAP_ID];

/// Maps host memory into the guest (KVM memory slots).
pub trait GuestMapper: Send + Sync {
    /// Maps `len` bytes at host address `host` at guest-physical `gpa`;
    /// returns a handle for [`GuestMapper::unmap`].
    fn map(&self, gpa: u64, host: u64, len: u64) -> io::Result<u32>;
    fn unmap(&self, handle: u32);
}

/// Makes `n` MSI vectors (KVM routes with irqfds, in ffmk-vmm).
pub type VectorSource<'a> = &'a dyn Fn(u16) -> io::Result<Arc<dyn MsiVectors>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: cannot read its configuration space")]
    NoConfig(String),
    #[error("{0}")]
    Failed(String),
    #[error("{name}: BAR {bar}: {msg}")]
    Bar {
        name: String,
        bar: usize,
        msg: String,
    },
    #[error("{name}: {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// A capability the guest sees: where it is in the device's space.
#[derive(Debug, Clone, Copy)]
struct Cap {
    offset: usize,
    id: u8,
    len: usize,
    /// The next kept capability (0 ends the list).
    next: u8,
}

struct MappedArea {
    offset: u64,
    mapping: Mapping,
}

#[derive(Default)]
struct BarState {
    region_size: u64,
    areas: Vec<MappedArea>,
    mapped_at: Option<u64>,
    handles: Vec<u32>,
}

struct MsixPass {
    msix: Msix,
    /// Offset of the capability Msix added to the shadow space.
    shadow_cap: usize,
    bar: usize,
    table: (u64, u64),
    pba: (u64, u64),
    backend_on: bool,
}

pub struct Passthrough {
    /// Before `backend`: fields drop in order, and the BAR mappings hold
    /// the device file open (a group cannot leave its container while
    /// its device is open).
    bars: Vec<BarState>,
    backend: Arc<dyn Backend>,
    shadow: ConfigSpace,
    caps: Vec<Cap>,
    msi: Option<Msi>,
    msix: Option<MsixPass>,
    /// The INTx pin (1 = INTA) the guest sees: only for a function with
    /// neither MSI nor MSI-X (a legacy device such as a 16550 UART), whose
    /// driver has nothing else.
    intx_pin: Option<u8>,
    intx_on: bool,
    /// INTx is unmasked by the VMM, not by the kernel on the guest's EOI
    /// (the device takes no unmask eventfd): it is also unmasked after
    /// every access of the guest to the device's BARs. See
    /// [`Passthrough::connect_intx`].
    unmask_on_access: bool,
    /// A save of the device's state in progress: the PRE_COPY data read
    /// so far (with STOP_COPY's once `stopped`).
    saving: Option<Vec<u8>>,
    /// The device is in STOP_COPY and its whole state is in `saving`.
    stopped: bool,
    /// The device's own DMA dirty logging is on (its granule).
    dma_log: Option<u64>,
    /// What the log's first read (when it started) reported, for the
    /// next read: the first range's bitmap words.
    dma_first: Option<Vec<u64>>,
    mapper: Arc<dyn GuestMapper>,
    trapped_accesses: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Length of a capability the guest sees (what a driver reads of it).
fn cap_len(id: u8, body: &[u8]) -> usize {
    match id {
        0x01 => 8,
        0x10 => 0x3c,
        0x11 => 12,
        0x09 => usize::from(body.get(2).copied().unwrap_or(4)).max(4),
        _ => 4,
    }
}

impl Passthrough {
    pub fn new(
        backend: Arc<dyn Backend>,
        vectors: VectorSource<'_>,
        mapper: Arc<dyn GuestMapper>,
        map_bars: bool,
    ) -> Result<Passthrough, Error> {
        let name = backend.describe();
        let no_config = |b: &dyn Backend| {
            Error::NoConfig(match b.failure() {
                Some(why) => format!("{name}: {why}"),
                None => name.clone(),
            })
        };
        // A type 0 header at least (a mediated device may have less than
        // the 256 bytes of standard space: mtty's has 255).
        let Some(config_size) = backend
            .region(CONFIG_REGION)
            .map(|r| r.size)
            .filter(|&s| s >= 64)
        else {
            return Err(no_config(&*backend));
        };
        let mut phys = vec![0u8; 256];
        let have = (config_size.min(256) as usize) & !3;
        backend.read(CONFIG_REGION, 0, &mut phys[..have]);
        if u16_at(&phys, 0) == 0xffff {
            return Err(no_config(&*backend));
        }
        let ids = PciIds {
            vendor: u16_at(&phys, 0),
            device: u16_at(&phys, 2),
            class: (phys[0x0b], phys[0x0a], phys[0x09]),
            revision: phys[0x08],
            subsystem_vendor: u16_at(&phys, 0x2c),
            subsystem: u16_at(&phys, 0x2e),
        };
        let mut shadow = ConfigSpace::new(ids);
        let mut bars: Vec<BarState> = (0..NUM_BARS).map(|_| BarState::default()).collect();
        let mut i = 0;
        while i < NUM_BARS {
            let reg = u32_at(&phys, BAR0 + 4 * i);
            let io = reg & 1 != 0;
            let wide = !io && reg & 0b110 == 0b100;
            if let Some(r) = backend.region(i as u32).filter(|r| r.size > 0) {
                // Port I/O BARs are always trapped and forwarded (nothing
                // to map); memory BARs are at least a page, to be mapped.
                let (kind, min) = if io {
                    (BarKind::Io, 4)
                } else if wide {
                    let prefetchable = reg & 0b1000 != 0;
                    (BarKind::Mem64 { prefetchable }, PAGE)
                } else {
                    (BarKind::Mem32, PAGE)
                };
                let size = r.size.max(min).next_power_of_two();
                shadow
                    .add_bar(i, Bar { kind, size })
                    .map_err(|e| Error::Bar {
                        name: name.clone(),
                        bar: i,
                        msg: e.to_string(),
                    })?;
                bars[i].region_size = r.size;
            }
            i += if wide { 2 } else { 1 };
        }

        // The capability list, walked defensively (a device's own list
        // could loop or point outside the standard space).
        let mut caps = Vec::new();
        let mut found = Vec::new();
        let mut at = usize::from(phys[0x34] & 0xfc);
        if u16_at(&phys, 0x06) & (1 << 4) != 0 {
            while (0x40..256).contains(&at) && found.len() < 48 {
                found.push((at, phys[at]));
                at = usize::from(phys[at + 1] & 0xfc);
            }
        }
        let mut msi = None;
        let mut msix = None;
        for &(offset, id) in &found {
            if !KEPT_CAPS.contains(&id) {
                continue;
            }
            let mut len = cap_len(id, &phys[offset..]);
            match id {
                msi::CAP_ID => {
                    let n = backend.irq_count(IRQ_MSI).min(32) as u16;
                    if n == 0 {
                        continue;
                    }
                    let v = vectors(n).map_err(|source| Error::Io {
                        name: name.clone(),
                        what: "MSI vectors",
                        source,
                    })?;
                    let m = Msi::new(u16_at(&phys, offset + 2), v);
                    len = m.len();
                    msi = Some(m);
                }
                0x11 => {
                    let control = u16_at(&phys, offset + 2);
                    let n = (control & 0x7ff) + 1;
                    let table = u32_at(&phys, offset + 4);
                    let pba = u32_at(&phys, offset + 8);
                    let bar = (table & 7) as usize;
                    if backend.irq_count(IRQ_MSIX) == 0
                        || bar >= NUM_BARS
                        || bars[bar].region_size == 0
                    {
                        tracing::warn!("{name}: MSI-X capability unusable; hidden");
                        continue;
                    }
                    let v = vectors(n).map_err(|source| Error::Io {
                        name: name.clone(),
                        what: "MSI-X vectors",
                        source,
                    })?;
                    let m = Msix::new(&mut shadow, v, bar as u8, table & !7, pba & !7).map_err(
                        |e| Error::Bar {
                            name: name.clone(),
                            bar,
                            msg: e.to_string(),
                        },
                    )?;
                    let shadow_cap = m.cap_offset();
                    msix = Some(MsixPass {
                        msix: m,
                        shadow_cap,
                        bar,
                        table: (u64::from(table & !7), Msix::table_size(n)),
                        pba: (u64::from(pba & !7), Msix::pba_size(n)),
                        backend_on: false,
                    });
                    if (pba & 7) as usize != bar {
                        tracing::warn!("{name}: MSI-X PBA in another BAR than the table; reads of it are forwarded");
                    }
                }
                _ => {}
            }
            caps.push(Cap {
                offset,
                id,
                len: len.min(256 - offset),
                next: 0,
            });
        }
        for k in 1..caps.len() {
            caps[k - 1].next = caps[k].offset as u8;
        }

        let pin = phys[0x3d];
        let intx_pin = ((1..=4).contains(&pin)
            && msi.is_none()
            && msix.is_none()
            && backend.irq_count(IRQ_INTX) > 0)
            .then_some(pin);
        if let Some(pin) = intx_pin {
            shadow.interrupt_pin(pin);
        }

        // Mappable BAR areas (unless `map_bars` is off), minus the pages the
        // MSI-X table and PBA live in.
        let mut dev = Passthrough {
            bars,
            backend,
            shadow,
            caps,
            msi,
            msix,
            intx_pin,
            intx_on: false,
            unmask_on_access: false,
            saving: None,
            stopped: false,
            dma_log: None,
            dma_first: None,
            mapper,
            trapped_accesses: 0,
        };
        for i in 0..NUM_BARS {
            if dev.bars[i].region_size == 0 || !map_bars {
                continue;
            }
            let Some(info) = dev.backend.region(i as u32) else {
                continue;
            };
            let holes = dev.msix_holes(i);
            for (off, len) in info.mappable {
                for (start, len) in subtract(off, len, &holes) {
                    let mapping =
                        dev.backend
                            .map(i as u32, start, len)
                            .map_err(|source| Error::Io {
                                name: name.clone(),
                                what: "mmap of a BAR",
                                source,
                            })?;
                    dev.bars[i].areas.push(MappedArea {
                        offset: start,
                        mapping,
                    });
                }
            }
        }
        if let Some(why) = dev.backend.failure() {
            return Err(Error::Failed(format!("{name}: {why}")));
        }
        dev.backend.attached();
        Ok(dev)
    }

    /// Page-aligned ranges of BAR `bar` that must stay trapped.
    fn msix_holes(&self, bar: usize) -> Vec<(u64, u64)> {
        let Some(m) = &self.msix else { return vec![] };
        let mut v = Vec::new();
        if m.bar == bar {
            for (off, len) in [m.table, m.pba] {
                let start = off & !(PAGE - 1);
                let end = (off + len).div_ceil(PAGE) * PAGE;
                v.push((start, end - start));
            }
        }
        v
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Bytes of BARs mapped into the guest right now.
    pub fn mapped_bytes(&self) -> u64 {
        self.bars
            .iter()
            .filter(|b| b.mapped_at.is_some())
            .flat_map(|b| b.areas.iter().map(|a| a.mapping.len()))
            .sum()
    }

    fn physical_dword(&self, reg: usize) -> u32 {
        let mut b = [0xffu8; 4];
        self.backend.read(CONFIG_REGION, reg as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn cap_at(&self, offset: usize) -> Option<Cap> {
        self.caps
            .iter()
            .copied()
            .find(|c| (c.offset..c.offset + c.len).contains(&offset))
    }

    /// The guest's view of the configuration dword at `reg` (aligned).
    fn dword(&self, reg: usize) -> u32 {
        let shadow = |r: usize| self.shadow.u32_at(r);
        match reg {
            0x00 => shadow(0),
            0x04 => {
                let status = (self.physical_dword(4) >> 16) as u16 & !(1 << 4) & !(1 << 3);
                let status = status | if self.caps.is_empty() { 0 } else { 1 << 4 };
                u32::from(self.shadow.command()) | u32::from(status) << 16
            }
            0x08 | 0x2c => self.physical_dword(reg),
            // Cache line size and latency timer; header type 0, no BIST.
            0x0c => self.physical_dword(reg) & 0xffff,
            0x10..=0x24 => shadow(reg),
            0x34 => self.caps.first().map_or(0, |c| c.offset as u32),
            // Interrupt line (the guest's) and pin (ours: 0 unless INTx).
            0x3c => {
                u32::from(self.shadow.raw(0x3c, 1)[0]) | u32::from(self.shadow.raw(0x3d, 1)[0]) << 8
            }
            0x40..=0xfc if (reg..reg + 4).any(|o| self.cap_at(o).is_some()) => {
                // One read of the device for the whole dword.
                let phys = self.physical_dword(reg).to_le_bytes();
                (0..4).fold(0u32, |acc, i| {
                    acc | u32::from(self.cap_byte(reg + i, phys[i])) << (8 * i)
                })
            }
            _ => 0,
        }
    }

    /// The guest's view of capability byte `offset`; `phys` is the
    /// device's byte there.
    fn cap_byte(&self, offset: usize, phys: u8) -> u8 {
        let Some(cap) = self.cap_at(offset) else {
            return 0;
        };
        let rel = offset - cap.offset;
        if rel == 0 {
            return cap.id;
        }
        if rel == 1 {
            return cap.next;
        }
        match cap.id {
            msi::CAP_ID => self.msi.as_ref().map_or(0, |m| m.read_byte(rel)),
            0x11 if rel == 3 => match &self.msix {
                Some(m) => (phys & 0x07) | (self.shadow.raw(m.shadow_cap + 3, 1)[0] & 0xc0),
                None => 0,
            },
            _ => phys,
        }
    }

    /// Maps or unmaps BARs after the guest changed an address or the
    /// memory-decode bit.
    fn remap(&mut self) {
        let decode = self.shadow.command() & COMMAND_MEMORY != 0;
        for i in 0..NUM_BARS {
            if self.bars[i].areas.is_empty() {
                continue;
            }
            let want = self
                .shadow
                .bar_address(i)
                .filter(|&a| decode && a != 0 && a % PAGE == 0);
            if want == self.bars[i].mapped_at {
                continue;
            }
            for h in self.bars[i].handles.drain(..) {
                self.mapper.unmap(h);
            }
            self.bars[i].mapped_at = None;
            let Some(base) = want else { continue };
            let mut handles = Vec::new();
            let mut ok = true;
            for a in &self.bars[i].areas {
                match self
                    .mapper
                    .map(base + a.offset, a.mapping.host_addr(), a.mapping.len())
                {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        tracing::warn!(
                            "{}: BAR {i} at {base:#x} stays trapped: {e}",
                            self.backend.describe()
                        );
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                self.bars[i].handles = handles;
                self.bars[i].mapped_at = Some(base);
            } else {
                for h in handles {
                    self.mapper.unmap(h);
                }
            }
        }
    }

    fn msix_control_written(&mut self) {
        let Some(m) = &mut self.msix else { return };
        m.msix.config_written(&self.shadow);
        let on = m.msix.enabled();
        if on == m.backend_on {
            return;
        }
        let r = if on {
            let n = m.msix.vector_count();
            let fds: Option<Vec<_>> = (0..n).map(|v| m.msix_eventfd(v)).collect();
            match fds {
                Some(f) => self.backend.enable_irqs(IRQ_MSIX, &f),
                None => Err(io::Error::other("MSI-X vectors have no eventfds")),
            }
        } else {
            self.backend.disable_irqs(IRQ_MSIX)
        };
        match r {
            Ok(()) => m.backend_on = on,
            Err(e) => tracing::warn!("{}: MSI-X: {e}", self.backend.describe()),
        }
    }

    /// Vendor and device ID, `vvvv:dddd`.
    pub fn ids(&self) -> String {
        format!(
            "{:04x}:{:04x}",
            self.shadow.u16_at(0),
            self.shadow.u16_at(2)
        )
    }

    /// Whether the function's state can travel with the VM (snapshot,
    /// migration): its device supports VFIO migration (STOP_COPY), and the
    /// VMM's side of it is all in configuration space (no MSI or MSI-X,
    /// whose emulated state is not saved yet).
    pub fn state_travels(&self) -> Result<(), String> {
        if self.msi.is_some() || self.msix.is_some() {
            return Err(format!(
                "{}: a function with MSI or MSI-X keeps its state in the hardware for now",
                self.backend.describe()
            ));
        }
        match self.backend.migration() {
            Some(_) => Ok(()),
            None => Err(format!(
                "{}: its driver offers no VFIO migration",
                self.backend.describe()
            )),
        }
    }

    fn migratable(&self) -> Result<crate::migration::Migratable<'_>, crate::migration::Error> {
        self.backend
            .migration()
            .ok_or_else(|| crate::migration::Error::Unsupported {
                name: self.backend.describe(),
            })
    }

    /// Starts saving the device's state while it runs: PRE_COPY where it
    /// has it, its initial data read now.
    pub fn begin_save(&mut self) -> Result<(), crate::migration::Error> {
        if self.saving.is_some() {
            return Ok(()); // begun already (tracking restarted)
        }
        let m = self.migratable()?;
        m.begin()?;
        let first = m.read_precopy()?;
        self.saving = Some(first);
        Ok(())
    }

    /// The PRE_COPY data the device has given so far and not yet handed
    /// over, for the destination to have during the rounds (the save goes
    /// on: what comes later is in [`Self::finish_save`]).
    pub fn take_precopy(&mut self) -> Result<Vec<u8>, crate::migration::Error> {
        if self.stopped {
            return Ok(Vec::new()); // all of it goes with the machine state
        }
        let Some(mut out) = self.saving.replace(Vec::new()) else {
            return Ok(Vec::new()); // no save under way
        };
        out.extend(self.migratable()?.read_precopy()?);
        Ok(out)
    }

    /// Part of a saved state, as it arrives during a migration: the device
    /// goes to RESUMING (its vCPUs have not run here) and takes the bytes;
    /// [`Self::load_state`] gives it the rest.
    pub fn load_part(&mut self, data: &[u8]) -> Result<(), crate::migration::Error> {
        self.migratable()?.load_part(data)
    }

    /// Bytes of device state still to come: what PRE_COPY announces, plus
    /// what was read and not yet handed over.
    pub fn pending_save_bytes(&self) -> u64 {
        let held = self.saving.as_ref().map_or(0, |b| b.len() as u64);
        let more = self
            .backend
            .migration()
            .and_then(|m| m.precopy_pending().ok())
            .unwrap_or(0);
        held + more
    }

    /// Stops the device's peer-to-peer DMA before any device of the VM
    /// stops for good (see [`crate::migration::Migratable::quiesce_p2p`]).
    /// Nothing to do once it is stopped.
    pub fn quiesce_p2p(&self) -> Result<(), crate::migration::Error> {
        if self.stopped {
            return Ok(());
        }
        self.migratable()?.quiesce_p2p()
    }

    /// Stops the device (STOP_COPY: no more DMA) and reads the rest of its
    /// state: from here guest memory is the vCPUs' and the VMM's alone, so
    /// a last look at the dirty pages sees all the device wrote. The data
    /// waits for [`Self::finish_save`]; the device stays stopped until
    /// [`Self::end_save`] (or until it is closed, once the VM has moved).
    pub fn stop_for_save(&mut self) -> Result<(), crate::migration::Error> {
        if self.stopped {
            return Ok(());
        }
        let mut data = self.saving.take().unwrap_or_default();
        let m = self.migratable()?;
        data.extend(m.read_precopy()?);
        data.extend(m.stop_and_copy()?);
        drop(m);
        self.saving = Some(data);
        self.stopped = true;
        Ok(())
    }

    /// The whole saved state (vCPUs stopped): the PRE_COPY data, then
    /// STOP_COPY's (the device is stopped first where
    /// [`Self::stop_for_save`] has not done it yet).
    pub fn finish_save(&mut self) -> Result<Vec<u8>, crate::migration::Error> {
        self.stop_for_save()?;
        Ok(self.saving.clone().unwrap_or_default())
    }

    /// The save is over and the VM runs on here: the device runs again
    /// with its own state, its DMA logging off.
    pub fn end_save(&mut self) {
        self.saving = None;
        self.stopped = false;
        self.stop_dma_log();
        if let Some(m) = self.backend.migration() {
            if let Err(e) = m.resume() {
                tracing::error!("{e}");
                m.recover();
            }
        }
    }

    /// Starts the device's own DMA dirty logging over `ranges` (guest RAM
    /// as (guest-physical address, length); IOVA = guest-physical). False:
    /// the device has none, and what it writes by DMA must be found some
    /// other way (the IOMMU's tracking, or every mapped page at the end).
    pub fn start_dma_log(
        &mut self,
        ranges: &[(u64, u64)],
    ) -> Result<bool, crate::migration::Error> {
        if self.dma_log.is_some() {
            return Ok(true);
        }
        let m = self.migratable()?;
        let Some(granule) = m.start_dirty_logging(crate::kernel::DIRTY_PAGE, ranges)? else {
            return Ok(false);
        };
        // A log that cannot be read is no log (mtty starts one and then
        // answers EOPNOTSUPP to every report): tried once now, what it
        // reports is kept for the first real read.
        let first = match ranges.first() {
            Some(&first) => match m.dirty_pages(first, crate::kernel::DIRTY_PAGE) {
                Ok(words) => Some(words),
                Err(e) => {
                    tracing::debug!("{}: DMA logging unusable: {e}", self.backend.describe());
                    if let Err(e) = m.stop_dirty_logging() {
                        tracing::warn!("{e}");
                    }
                    return Ok(false);
                }
            },
            None => None,
        };
        drop(m);
        self.dma_first = first;
        self.dma_log = Some(granule);
        Ok(true)
    }

    /// What the device wrote by DMA in `ranges` since the last call, where
    /// it logs that itself (None where it does not): per range, bitmap
    /// words with one bit per [`crate::kernel::DIRTY_PAGE`].
    pub fn dma_dirty(
        &mut self,
        ranges: &[(u64, u64)],
    ) -> Result<Option<Vec<Vec<u64>>>, crate::migration::Error> {
        if self.dma_log.is_none() {
            return Ok(None);
        }
        let m = self.migratable()?;
        let mut out = ranges
            .iter()
            .map(|&r| m.dirty_pages(r, crate::kernel::DIRTY_PAGE))
            .collect::<Result<Vec<_>, _>>()?;
        drop(m);
        if let (Some(first), Some(words)) = (self.dma_first.take(), out.first_mut()) {
            for (w, f) in words.iter_mut().zip(first) {
                *w |= f;
            }
        }
        Ok(Some(out))
    }

    fn stop_dma_log(&mut self) {
        self.dma_first = None;
        if self.dma_log.take().is_some() {
            if let Some(Err(e)) = self.backend.migration().map(|m| m.stop_dirty_logging()) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Loads a saved state into the device (after configuration space was
    /// restored) and lets it run.
    pub fn load_state(&mut self, data: &[u8]) -> Result<(), crate::migration::Error> {
        let m = self.migratable()?;
        m.load(data)?;
        m.resume()?;
        drop(m);
        // BARs where the restored configuration space has them.
        self.remap();
        // (The VMM raises INTx again once the VM runs: its line's level
        // is not in the device's state.)
        Ok(())
    }

    /// The INTx pin the guest sees (1 = INTA), if it has one.
    pub fn intx_pin(&self) -> Option<u8> {
        self.intx_pin
    }

    /// The function gets no INTx after all (it was put where no INTx line
    /// reaches: behind a hot-plug port).
    pub fn drop_intx(&mut self) {
        self.intx_pin = None;
        self.shadow.interrupt_pin(0);
    }

    /// Wires the device's INTx to `trigger` (an irqfd of the pin's GSI,
    /// level-triggered, with `resample` signalled when the guest's EOI
    /// lowers the line). Returns true when the device re-arms itself on
    /// `resample` (the kernel's unmask eventfd); false when the caller
    /// must call [`Passthrough::unmask_intx`] on each `resample` event
    /// (drivers without an unmask eventfd, such as mtty).
    ///
    /// Such a device is also unmasked after every BAR access of the guest
    /// (as QEMU does on its slow INTx path). A device masks its INTx when
    /// it fires, and one that signals edges (mtty: an event when the
    /// guest's access makes it so, nothing held while masked) drops what
    /// it would raise until it is unmasked. The unmask that follows the
    /// guest's EOI comes from the VMM's I/O thread some time later; a
    /// driver that starts a transfer in that window (8250: IER's THRI set
    /// from process context) waits for an interrupt that never comes, and
    /// its port stalls for good. Unmasked after each access, the device is
    /// armed again before the guest's handler returns: what it raises
    /// during the handler is seen by the handler's own polling, and what
    /// the guest starts after it fires.
    pub fn connect_intx(
        &mut self,
        trigger: &vmm_sys_util::eventfd::EventFd,
        resample: &vmm_sys_util::eventfd::EventFd,
    ) -> io::Result<bool> {
        self.backend.enable_irqs(IRQ_INTX, &[trigger])?;
        self.intx_on = true;
        match self.backend.set_intx_unmask_fd(resample) {
            Ok(()) => {
                self.unmask_on_access = false;
                Ok(true)
            }
            Err(e) => {
                tracing::debug!(
                    "{}: no INTx unmask eventfd ({e}); the VMM unmasks it",
                    self.backend.describe()
                );
                self.unmask_on_access = true;
                Ok(false)
            }
        }
    }

    /// The guest acknowledged the INTx interrupt: the device may raise the
    /// next one (VFIO masks INTx when it fires).
    pub fn unmask_intx(&self) {
        self.backend.unmask_intx();
    }

    /// After a trapped BAR access: see [`Passthrough::connect_intx`].
    fn unmask_after_access(&self) {
        if self.intx_on && self.unmask_on_access {
            self.backend.unmask_intx();
        }
    }

    /// Stops the device's interrupts and unmaps its BARs from the guest
    /// (before a hot-unplug; the backend resets the device when dropped).
    pub fn quiesce(&mut self) {
        if self.intx_on {
            let _ = self.backend.disable_irqs(IRQ_INTX);
            self.intx_on = false;
        }
        if let Some(m) = &mut self.msi {
            m.disable(&*self.backend);
        }
        if let Some(m) = &mut self.msix {
            if m.backend_on {
                let _ = self.backend.disable_irqs(IRQ_MSIX);
                m.backend_on = false;
            }
        }
        for b in &mut self.bars {
            for h in b.handles.drain(..) {
                self.mapper.unmap(h);
            }
            b.mapped_at = None;
        }
    }
}

impl MsixPass {
    fn msix_eventfd(&self, v: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.msix.vectors().eventfd(v)
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.quiesce();
    }
}

/// `(off, len)` minus the `holes`, as page-aligned pieces.
fn subtract(off: u64, len: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![(off, off + len)];
    for &(h, hl) in holes {
        let mut next = Vec::new();
        for (s, e) in pieces {
            if h + hl <= s || h >= e {
                next.push((s, e));
                continue;
            }
            if s < h {
                next.push((s, h));
            }
            if h + hl < e {
                next.push((h + hl, e));
            }
        }
        pieces = next;
    }
    pieces
        .into_iter()
        .filter(|(s, e)| e > s && s % PAGE == 0 && (e - s) % PAGE == 0)
        .map(|(s, e)| (s, e - s))
        .collect()
}

impl PciDevice for Passthrough {
    fn config(&self) -> &ConfigSpace {
        &self.shadow
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.shadow
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i;
            *b = (self.dword(o & !3) >> (8 * (o & 3))) as u8;
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        let touches = |lo: usize, hi: usize| offset < hi && end > lo;
        if touches(COMMAND, COMMAND + 2) || touches(BAR0, BAR0 + 24) || touches(0x3c, 0x3d) {
            self.shadow.write(offset, data);
            if touches(COMMAND, COMMAND + 2) {
                // Memory decode and bus mastering must reach the device
                // (vfio-pci filters what is unsafe).
                let cmd = self.shadow.command().to_le_bytes();
                self.backend.write(CONFIG_REGION, COMMAND as u64, &cmd);
            }
            self.remap();
            return;
        }
        let Some(cap) = self.cap_at(offset) else {
            return;
        };
        match cap.id {
            msi::CAP_ID => {
                if let Some(m) = &mut self.msi {
                    for (i, &v) in data.iter().enumerate() {
                        let rel = offset + i - cap.offset;
                        if rel >= 2 {
                            m.write_byte(rel, v);
                        }
                    }
                    m.apply(&*self.backend);
                }
            }
            0x11 => {
                let Some(shadow_cap) = self.msix.as_ref().map(|m| m.shadow_cap) else {
                    return;
                };
                for (i, &v) in data.iter().enumerate() {
                    if offset + i - cap.offset == 3 {
                        self.shadow.write(shadow_cap + 3, &[v & 0xc0]);
                    }
                }
                self.msix_control_written();
            }
            // Other capabilities the guest sees are the device's own
            // (vfio-pci virtualizes what a guest must not change).
            _ => {
                if offset - cap.offset >= 2 {
                    self.backend.write(CONFIG_REGION, offset as u64, data);
                }
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.trapped_accesses += 1;
        if let Some(m) = &self.msix {
            if m.bar == bar && (m.table.0..m.table.0 + m.table.1).contains(&offset) {
                return m.msix.table_read(offset - m.table.0, data);
            }
            if m.bar == bar && (m.pba.0..m.pba.0 + m.pba.1).contains(&offset) {
                return m.msix.pba_read(offset - m.pba.0, data);
            }
        }
        if offset + data.len() as u64 > self.bars[bar].region_size {
            data.fill(0xff);
            return;
        }
        self.backend.read(bar as u32, offset, data);
        self.unmask_after_access();
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.trapped_accesses += 1;
        if let Some(m) = &mut self.msix {
            if m.bar == bar && (m.table.0..m.table.0 + m.table.1).contains(&offset) {
                return m.msix.table_write(offset - m.table.0, data);
            }
            if m.bar == bar && (m.pba.0..m.pba.0 + m.pba.1).contains(&offset) {
                return;
            }
        }
        if offset + data.len() as u64 > self.bars[bar].region_size {
            return;
        }
        self.backend.write(bar as u32, offset, data);
        self.unmask_after_access();
    }

    fn name(&self) -> String {
        self.backend.describe()
    }

    fn counters(&self) -> Counters {
        vec![
            ("trapped_bar_accesses", self.trapped_accesses),
            ("mapped_bar_bytes", self.mapped_bytes()),
            (
                "msi_vectors",
                u64::from(self.msi.as_ref().map_or(0, |m| m.enabled_vectors())),
            ),
            (
                "msix_enabled",
                u64::from(self.msix.as_ref().is_some_and(|m| m.backend_on)),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_pages_are_cut_out_of_mappable_areas() {
        assert_eq!(subtract(0, 0x4000, &[]), vec![(0, 0x4000)]);
        assert_eq!(
            subtract(0, 0x4000, &[(0x1000, 0x1000)]),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
        assert_eq!(subtract(0, 0x2000, &[(0, 0x2000)]), vec![]);
        assert_eq!(
            subtract(0, 0x10000, &[(0x2000, 0x1000), (0x3000, 0x1000)]),
            vec![(0, 0x2000), (0x4000, 0xc000)]
        );
    }
}
