//! Passthrough functions (`--device vfio=...` and `--device
//! vfio-user=SOCKET`, crate `vfio-ib`) on the VM's PCI bus.
//!
//! For the first one, the VM gets a VFIO container (one IOMMU domain) with
//! all of guest RAM mapped at IOVA = guest-physical address, and KVM's VFIO
//! pseudo-device. Each function's MSI/MSI-X vectors are KVM routes with
//! irqfds (`irq.rs`), so the host kernel signals the guest directly; its
//! mappable BAR areas become KVM memory slots ([`KvmMapper`]).
use crate::config::DeviceEntry;
use crate::irq::IrqRouting;
use crate::memory::{self, GuestMemoryMmap};
use devices::interrupt::MsiVectors;
use devices::pci::{BarKind, Location, PciDevice, PciRoot};
use devices::virtio::{Endpoint, Handlers, QueueWorker};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use snapshot::PageBitmap;
use std::sync::{Arc, Mutex};
use vfio_ib::kernel::Iommu;
use vfio_ib::vfio_user::{GuestDma, NotRam, VfioUser};
use vfio_ib::{GuestMapper, Passthrough};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_api::model::{Attachment, DeviceState};
use vmm_sys_util::eventfd::EventFd;

/// How long a vfio-user server may take to answer one request.
const VFIO_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Guest RAM for a vfio-user server's DMA: bounds-checked by vm-memory,
/// so nothing outside guest RAM is reached.
struct MemoryDma(GuestMemoryMmap);

impl GuestDma for MemoryDma {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        use vm_memory::Bytes;
        let len = buf.len();
        self.0
            .read_slice(buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| NotRam { gpa, len })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        use vm_memory::Bytes;
        self.0
            .write_slice(data, vm_memory::GuestAddress(gpa))
            .map_err(|_| NotRam {
                gpa,
                len: data.len(),
            })
    }
}

/// KVM memory slots for BARs start here (guest RAM has the ones below).
const FIRST_BAR_SLOT: u32 = 32;

#[derive(Debug, thiserror::Error)]
#[error("--device {spec}: {msg}")]
pub struct Error {
    pub spec: String,
    pub msg: String,
    /// Something the operator fixes on the host (binding, IOMMU, limits).
    pub user: bool,
}

/// Puts BAR areas into the guest as KVM memory slots.
pub struct KvmMapper {
    vm_fd: Arc<VmFd>,
    free: Mutex<Vec<u32>>,
    next: Mutex<u32>,
}

impl KvmMapper {
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        KvmMapper {
            vm_fd,
            free: Mutex::new(Vec::new()),
            next: Mutex::new(FIRST_BAR_SLOT),
        }
    }

    fn take_slot(&self) -> std::io::Result<u32> {
        let poisoned = || std::io::Error::other("slot lock poisoned");
        if let Some(s) = self.free.lock().map_err(|_| poisoned())?.pop() {
            return Ok(s);
        }
        let mut next = self.next.lock().map_err(|_| poisoned())?;
        let s = *next;
        *next += 1;
        Ok(s)
    }

    fn set(&self, slot: u32, gpa: u64, host: u64, len: u64) -> std::io::Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: `host..host+len` is a shared mapping of a device region
        // that the passthrough function keeps until it unmaps this slot
        // (size 0 removes it) - see `vfio_ib::Passthrough::quiesce`.
        unsafe { self.vm_fd.set_user_memory_region(r) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl GuestMapper for KvmMapper {
    fn map(&self, gpa: u64, host: u64, len: u64) -> std::io::Result<u32> {
        let slot = self.take_slot()?;
        match self.set(slot, gpa, host, len) {
            Ok(()) => Ok(slot),
            Err(e) => {
                if let Ok(mut f) = self.free.lock() {
                    f.push(slot);
                }
                Err(e)
            }
        }
    }

    fn unmap(&self, slot: u32) {
        if let Err(e) = self.set(slot, 0, 0, 0) {
            tracing::warn!("cannot remove BAR memory slot {slot}: {e}");
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            f.push(slot);
        }
    }
}

/// One passthrough function on the bus.
pub struct Attached {
    pub spec: DeviceEntry,
    /// On bus 0, or in a hot-plug slot (bus N, device 0).
    pub at: Location,
    pub device: Arc<Mutex<Passthrough>>,
    /// Its INTx line, for a function that has one.
    intx: Option<IntxLine>,
}

/// A function's INTx: an irqfd on the pin's IOAPIC GSI (level-triggered,
/// with a resample eventfd the guest's EOI signals), and where the device
/// cannot be handed the resample eventfd itself, a handler on the I/O
/// thread that unmasks it after each EOI.
struct IntxLine {
    vm_fd: Arc<VmFd>,
    trigger: EventFd,
    gsi: u32,
    unmasker: Option<Handlers>,
}

impl IntxLine {
    fn connect(
        cx: &Context,
        device: &Arc<Mutex<Passthrough>>,
        slot: u8,
        pin: u8,
    ) -> Result<IntxLine, String> {
        let gsi = devices::pci::intx_gsi(slot, pin);
        let fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("INTx eventfd: {e}"));
        let (trigger, resample) = (fd()?, fd()?);
        cx.vm_fd
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|e| format!("INTx irqfd on GSI {gsi}: {e}"))?;
        let mut line = IntxLine {
            vm_fd: cx.vm_fd.clone(),
            trigger,
            gsi,
            unmasker: None,
        };
        let mut d = device.lock().map_err(|_| "lock poisoned".to_string())?;
        let in_kernel = d
            .connect_intx(&line.trigger, &resample)
            .map_err(|e| format!("INTx: {e}"))?;
        if !in_kernel {
            let mut handlers = Handlers::new(cx.io.clone());
            handlers
                .start(Box::new(IntxUnmask {
                    resample,
                    device: d.backend().clone(),
                }))
                .map_err(|e| format!("INTx unmask handler: {e}"))?;
            line.unmasker = Some(handlers);
        }
        tracing::info!(
            "INT{} is GSI {gsi}{}",
            (b'A' + pin - 1) as char,
            if in_kernel {
                ""
            } else {
                " (unmasked by the VMM after each EOI)"
            }
        );
        Ok(line)
    }
}

impl IntxLine {
    /// Before the function leaves a running VM: its unmask handler stops
    /// too (at the VM's end the I/O thread is gone first, and takes it).
    fn disconnect(mut self) {
        if let Some(mut h) = self.unmasker.take() {
            h.stop_all();
        }
    }
}

impl Drop for IntxLine {
    fn drop(&mut self) {
        if let Err(e) = self.vm_fd.unregister_irqfd(&self.trigger, self.gsi) {
            tracing::warn!("INTx irqfd on GSI {}: {e}", self.gsi);
        }
    }
}

/// Runs on the I/O thread: the guest's EOI lowered the INTx line, so the
/// device may raise the next interrupt.
struct IntxUnmask {
    resample: EventFd,
    device: Arc<dyn vfio_ib::Backend>,
}

impl MutEventSubscriber for IntxUnmask {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            tracing::error!("INTx unmask handler: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.resample.read().is_ok() {
            self.device.unmask_intx();
        }
    }
}

impl QueueWorker for IntxUnmask {
    fn each_queue(&self, _f: &mut dyn FnMut(&devices::virtio::ActiveQueue)) {}
}

/// The VM's passthrough functions and the IOMMU domain they share.
#[derive(Default)]
pub struct Passthroughs {
    pub attached: Vec<Attached>,
    iommu: Option<Iommu>,
    mapper: Option<Arc<dyn GuestMapper>>,
    /// How device DMA into guest RAM is found while a migration or a live
    /// snapshot copies it (None: no copy under way).
    dma: Option<DmaTracking>,
}

/// Where the pages that travelling devices write by DMA come from, for
/// the devices that do not log their DMA themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DmaTracking {
    /// Every such device logs its own DMA (or there is none).
    Devices,
    /// The IOMMU container's dirty tracking, read each round (precise for
    /// mediated devices: their DMA goes through the kernel).
    Container,
    /// Nothing tells: every page mapped for DMA is copied again once the
    /// devices have stopped.
    AllAtStop,
}

impl Passthroughs {
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    /// Guest RAM mapped for device DMA, in bytes.
    pub fn dma_mapped_bytes(&self) -> u64 {
        self.iommu.as_ref().map_or(0, |i| i.mapped_bytes())
    }

    /// `GET /vm`'s view.
    pub fn describe(&self) -> Vec<DeviceState> {
        self.attached
            .iter()
            .map(|a| DeviceState {
                travels: travels(a),
                ..device_state(&a.spec, a.at, true)
            })
            .collect()
    }
}

/// Whether `a`'s state travels with the VM (see `travelling_functions`).
fn travels(a: &Attached) -> bool {
    a.at.bus == 0 && a.device.lock().is_ok_and(|d| d.state_travels().is_ok())
}

/// A function at `at` as the API shows it (`travels` false: the caller
/// knows better where it does).
pub fn device_state(spec: &DeviceEntry, at: Location, attached: bool) -> DeviceState {
    DeviceState {
        device: spec.to_string(),
        bdf: at.to_string(),
        hotplug_slot: at.bus != 0,
        state: if attached {
            Attachment::Attached
        } else {
            Attachment::Detached
        },
        travels: false,
    }
}

impl Drop for Passthroughs {
    fn drop(&mut self) {
        // Devices stop (interrupts off, BARs unmapped, reset) before the
        // IOMMU mappings of guest RAM go.
        for a in &self.attached {
            if let Ok(mut d) = a.device.lock() {
                d.quiesce();
                d.backend().reset();
            }
        }
        if let Some(iommu) = &self.iommu {
            iommu.unmap_all();
        }
    }
}

/// KVM's VFIO pseudo-device (tells KVM about non-coherent DMA); None
/// where KVM has none.
fn kvm_vfio_device(vm_fd: &VmFd) -> Option<vfio_ioctls::VfioDeviceFd> {
    let mut d = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    match vm_fd.create_device(&mut d) {
        Ok(fd) => Some(vfio_ioctls::VfioDeviceFd::new_from_kvm(fd)),
        Err(e) => {
            tracing::warn!("KVM has no VFIO device ({e}); continuing without it");
            None
        }
    }
}

/// How long a hot-plug waits for a slot the guest is still letting go of
/// (its hot-plug driver ignores a plug for a moment after powering a slot
/// off).
const SLOT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// What attaching a function needs of the VM.
pub struct Context<'a> {
    pub vm_fd: &'a Arc<VmFd>,
    pub routing: &'a Arc<IrqRouting>,
    pub pci: &'a PciRoot,
    pub mem: &'a GuestMemoryMmap,
    /// The I/O thread, for INTx unmask handlers.
    pub io: &'a Endpoint,
}

impl Passthroughs {
    /// Opens the function `spec` names and puts it on the bus, at start or
    /// while the guest runs (`hotplug`). A hot-plugged function goes into
    /// a free hot-plug slot where the VM has one (the guest's PCIe hot-plug
    /// driver is told), else on bus 0 (the guest finds it when it scans the
    /// bus again). On error nothing stays attached (what was opened is
    /// closed and reset on the way out).
    pub fn attach(
        &mut self,
        cx: &Context,
        spec: &DeviceEntry,
        hotplug: bool,
    ) -> Result<&Attached, Error> {
        self.attach_to(cx, spec, hotplug, None)
    }

    /// [`Passthroughs::attach`], at `slot` of bus 0 when it is given (where
    /// the VM whose state arrives had its function).
    pub fn attach_to(
        &mut self,
        cx: &Context,
        spec: &DeviceEntry,
        hotplug: bool,
        slot: Option<u8>,
    ) -> Result<&Attached, Error> {
        let err = |msg: String, user: bool| Error {
            spec: spec.to_string(),
            msg,
            user,
        };
        if self.attached.iter().any(|a| a.spec.key() == spec.key()) {
            return Err(err("already attached to this VM".into(), true));
        }
        let mapper = self
            .mapper
            .get_or_insert_with(|| Arc::new(KvmMapper::new(cx.vm_fd.clone())))
            .clone();
        let routing = cx.routing;
        let vectors = |n: u16| -> std::io::Result<Arc<dyn MsiVectors>> {
            Ok(routing.msi_vectors(n)? as Arc<dyn MsiVectors>)
        };
        let dev = match spec {
            DeviceEntry::VfioUser { socket } => {
                let dma = Arc::new(MemoryDma(cx.mem.clone()));
                let dev = VfioUser::connect(socket, dma, VFIO_USER_TIMEOUT)
                    .map_err(|e| err(e.to_string(), true))?;
                Passthrough::new(Arc::new(dev), &vectors, mapper, false)
                    .map_err(|e| err(e.to_string(), true))?
            }
            DeviceEntry::Vfio { address, mmap } => {
                // Before the container: a device that cannot work says why first.
                vfio_ib::kernel::preflight_device(std::path::Path::new("/"), address)
                    .map_err(|e| err(e.to_string(), true))?;
                if self.iommu.is_none() {
                    let map = cx
                        .mem
                        .iter()
                        .map(|r| (r.start_addr().0, memory::host_addr(r), r.len()))
                        .collect();
                    self.iommu = Some(
                        Iommu::open(kvm_vfio_device(cx.vm_fd), map)
                            .map_err(|e| err(e.to_string(), e.is_user_error()))?,
                    );
                }
                let Some(iommu) = &self.iommu else {
                    return Err(err("no VFIO container".into(), false));
                };
                let backend = iommu
                    .attach(address)
                    .map_err(|e| err(e.to_string(), e.is_user_error()))?;
                tracing::info!(
                    "{spec}: {} MiB of guest RAM mapped for its DMA",
                    iommu.mapped_bytes() >> 20
                );
                Passthrough::new(Arc::new(backend), &vectors, mapper, *mmap)
                    .map_err(|e| err(e.to_string(), false))?
            }
        };
        let device = Arc::new(Mutex::new(dev));
        let free_slot = cx
            .pci
            .ports()
            .iter()
            .any(|(_, p)| p.lock().map(|p| !p.occupied()).unwrap_or(false));
        // A root port forwards no port I/O, and only bus 0 has INTx lines:
        // a function with an I/O BAR or that needs INTx (a serial port,
        // say) goes on bus 0.
        let bus0_only = device
            .lock()
            .map(|d| {
                d.intx_pin().is_some() || d.config().bars().any(|(_, b)| b.kind == BarKind::Io)
            })
            .unwrap_or(false);
        let placed = if let Some(slot) = slot {
            cx.pci.add_at(slot, device.clone()).map(Location::root)
        } else if hotplug && free_slot && !bus0_only {
            cx.pci.hotplug(device.clone(), SLOT_PATIENCE)
        } else {
            cx.pci.add(device.clone()).map(Location::root)
        };
        let at = placed.map_err(|e| err(e.to_string(), false))?;
        let pin = device.lock().ok().and_then(|d| d.intx_pin());
        let intx = match pin {
            Some(pin) if at.bus == 0 => match IntxLine::connect(cx, &device, at.slot, pin) {
                Ok(line) => Some(line),
                Err(e) => {
                    let _ = cx.pci.unplug(at);
                    return Err(err(e, false));
                }
            },
            Some(_) => {
                if let Ok(mut d) = device.lock() {
                    d.drop_intx();
                }
                None
            }
            None => None,
        };
        tracing::info!("{spec} is {at} in the guest");
        self.attached.push(Attached {
            spec: spec.clone(),
            at,
            device,
            intx,
        });
        Ok(&self.attached[self.attached.len() - 1])
    }

    /// Takes the passthrough function at `at` off the bus (hot-unplug):
    /// its interrupts stop, its BARs leave the guest, it is reset and
    /// closed. The guest's accesses to it read as "no device" from then
    /// on (in a hot-plug slot, the guest is told). Returns what it was.
    pub fn detach(&mut self, pci: &PciRoot, at: Location) -> Option<DeviceEntry> {
        let i = self.attached.iter().position(|a| a.at == at)?;
        let a = self.attached.remove(i);
        if let Err(e) = pci.unplug(at) {
            tracing::warn!("{}: {e}", a.spec);
        }
        if let Ok(mut d) = a.device.lock() {
            d.quiesce();
            d.backend().reset();
        }
        if let Some(line) = a.intx {
            line.disconnect();
        }
        tracing::info!("{} ({at}) detached", a.spec);
        Some(a.spec)
    }
}

/// A passthrough function's state in a snapshot or migration stream: where
/// it was, what it was, and its device's VFIO migration data.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedFunction {
    /// Its slot on bus 0.
    pub slot: u8,
    /// Vendor and device ID (`vvvv:dddd`): the function that takes the
    /// state must be the same kind.
    pub ids: String,
    /// The device's migration data (PRE_COPY then STOP_COPY), hex.
    pub data: String,
}

/// The device-state id of the passthrough function in `slot`.
pub fn state_id(slot: u8) -> String {
    format!("passthrough-{slot:02x}")
}

/// Is this a passthrough function's device-state id?
pub fn is_state_id(id: &str) -> bool {
    id.starts_with("passthrough-")
}

fn to_hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Passthroughs {
    /// Whether every attached function's state can travel with the VM
    /// (VFIO migration), or why not (the first one that cannot).
    pub fn why_state_stays(&self) -> Option<String> {
        self.attached.iter().find_map(|a| {
            if a.at.bus != 0 {
                return Some(format!("{} is in a hot-plug slot", a.spec));
            }
            a.device.lock().ok()?.state_travels().err()
        })
    }

    /// The functions whose state travels: `slot=ids` each, for the
    /// migration hello.
    pub fn travelling(&self) -> Vec<(u8, String)> {
        self.attached
            .iter()
            .filter_map(|a| {
                let d = a.device.lock().ok()?;
                (a.at.bus == 0 && d.state_travels().is_ok()).then(|| (a.at.slot, d.ids()))
            })
            .collect()
    }

    /// Starts saving every travelling function's device state (PRE_COPY
    /// while the guest runs).
    pub fn begin_saves(&self) -> Result<(), String> {
        for a in &self.attached {
            let Ok(mut d) = a.device.lock() else { continue };
            if d.state_travels().is_ok() {
                d.begin_save().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// The PRE_COPY data travelling functions have now, by slot (empty
    /// ones left out), to send during the rounds.
    pub fn take_precopy(&self) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let mut out = Vec::new();
        for a in &self.attached {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            if a.at.bus != 0 || d.state_travels().is_err() {
                continue;
            }
            let data = d.take_precopy().map_err(|e| e.to_string())?;
            if !data.is_empty() {
                out.push((a.at.slot, data));
            }
        }
        Ok(out)
    }

    /// Part of the device state of the function in `slot`, as it arrives
    /// during a migration.
    pub fn load_part(&self, slot: u8, data: &[u8]) -> Result<(), String> {
        let a = self
            .attached
            .iter()
            .find(|a| a.at == Location::root(slot))
            .ok_or_else(|| {
                format!("device data for 00:{slot:02x}.0, where this VM has no function")
            })?;
        let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
        d.load_part(data).map_err(|e| e.to_string())
    }

    /// A VM that moved here runs for the first time: each function with
    /// INTx is unmasked and its line raised again a moment later, four
    /// times (20 ms, 0.5, 2 and 5 s). An interrupt of the source's device
    /// that was signalled but not yet in the guest at the pause is lost
    /// with the source, and one raised while the guest's handler still
    /// runs is lost at its EOI (the line is lowered then; a device that
    /// re-asserts on unmask, as vfio-pci's do, raises it again, mtty does
    /// not): the guest's driver would wait for it for ever. The line is
    /// raised through KVM (the irqfd), not through the device, which
    /// ignores a trigger while it is masked (mtty masks itself when it
    /// fires and waits for the unmask that follows the guest's EOI). A
    /// spurious interrupt costs the guest's handler one look.
    pub fn kick_intx(&self) {
        let mut lines = Vec::new();
        for a in &self.attached {
            let Some(line) = &a.intx else { continue };
            let Ok(trigger) = line.trigger.try_clone() else {
                continue;
            };
            if let Ok(d) = a.device.lock() {
                lines.push((d.backend().clone(), trigger));
            }
        }
        if lines.is_empty() {
            return;
        }
        let kick = move || {
            for wait in [20, 480, 1500, 3000] {
                std::thread::sleep(std::time::Duration::from_millis(wait));
                for (device, trigger) in &lines {
                    device.unmask_intx();
                    if let Err(e) = trigger.write(1) {
                        tracing::warn!("INTx kick: {e}");
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("intx-kick".into())
            .spawn(kick)
        {
            tracing::warn!("cannot start the INTx kick: {e}");
        }
    }

    /// Bytes of device state still to come (for the downtime prediction).
    pub fn pending_save_bytes(&self) -> u64 {
        self.attached
            .iter()
            .filter_map(|a| a.device.lock().ok().map(|d| d.pending_save_bytes()))
            .sum()
    }

    /// Every travelling function's state (vCPUs paused), by device-state id.
    pub fn finish_saves(&self) -> Result<Vec<(String, SavedFunction)>, String> {
        // Stopped already where the caller needed that before its last look
        // at guest RAM; otherwise here.
        self.stop_saves()?;
        let mut out = Vec::new();
        for a in self.travelling_functions() {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            let data = d.finish_save().map_err(|e| e.to_string())?;
            out.push((
                state_id(a.at.slot),
                SavedFunction {
                    slot: a.at.slot,
                    ids: d.ids(),
                    data: to_hex(&data),
                },
            ));
        }
        Ok(out)
    }

    /// After a snapshot, or a migration that did not complete: every
    /// device runs again here, and DMA tracking ends.
    pub fn end_saves(&mut self) {
        for a in &self.attached {
            if let Ok(mut d) = a.device.lock() {
                if d.state_travels().is_ok() {
                    d.end_save();
                }
            }
        }
        if let (Some(DmaTracking::Container), Some(iommu)) = (self.dma.take(), &self.iommu) {
            iommu.stop_dirty_tracking();
        }
    }

    /// Stops every travelling function's device for the save (vCPUs
    /// paused): first all leave peer-to-peer DMA, then each goes to
    /// STOP_COPY and its remaining state is read. From here no device
    /// writes guest RAM, so the last dirty-page fetch sees all they wrote.
    pub fn stop_saves(&self) -> Result<(), String> {
        for a in self.travelling_functions() {
            let d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            d.quiesce_p2p().map_err(|e| e.to_string())?;
        }
        for a in self.travelling_functions() {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            d.stop_for_save().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn travelling_functions(&self) -> impl Iterator<Item = &Attached> {
        self.attached.iter().filter(|a| travels(a))
    }

    /// Starts finding what travelling devices write to guest RAM by DMA
    /// (a migration or a live snapshot begins copying it): each device's
    /// own DMA logging where it has one; for the others the IOMMU
    /// container's dirty tracking; where neither works, every mapped page
    /// is copied again at the end (said in the log).
    pub fn start_dma_tracking(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        if self.dma.is_some() {
            return Ok(());
        }
        let ranges = ram_ranges(mem);
        let mut unlogged = Vec::new();
        for a in self.travelling_functions() {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            if d.start_dma_log(&ranges).map_err(|e| e.to_string())? {
                tracing::info!("{}: DMA dirty pages from the device's own log", a.spec);
            } else {
                unlogged.push(a.spec.to_string());
            }
        }
        let mode = match (unlogged.is_empty(), &self.iommu) {
            (true, _) => DmaTracking::Devices,
            (false, Some(iommu)) => match iommu.start_dirty_tracking() {
                Ok(()) => DmaTracking::Container,
                Err(e) => {
                    tracing::warn!("{e}");
                    DmaTracking::AllAtStop
                }
            },
            (false, None) => DmaTracking::AllAtStop,
        };
        match mode {
            DmaTracking::Container => tracing::info!(
                "{}: no DMA logging of its own; DMA dirty pages from the IOMMU container",
                unlogged.join(", ")
            ),
            DmaTracking::AllAtStop => tracing::warn!(
                "{}: no DMA dirty tracking: every page mapped for DMA ({} MiB) is copied \
                 again once the devices stop (downtime)",
                unlogged.join(", "),
                self.dma_mapped_bytes() >> 20
            ),
            DmaTracking::Devices => {}
        }
        self.dma = Some(mode);
        Ok(())
    }

    /// Adds to `pages` (guest RAM's pages back to back, as KVM's dirty log)
    /// what travelling devices wrote by DMA since the last call. `stopped`:
    /// the devices are stopped ([`Self::stop_saves`]), this is the last
    /// look. A container that reports every mapped page (a function behind
    /// a real IOMMU without DMA logging is in it) is not read again until
    /// then, when all its pages count: the rounds would never converge.
    pub fn add_dma_dirty(
        &mut self,
        mem: &GuestMemoryMmap,
        pages: &mut PageBitmap,
        stopped: bool,
    ) -> Result<(), String> {
        let Some(mode) = self.dma else {
            return Ok(());
        };
        let ranges = ram_ranges(mem);
        for a in self.travelling_functions() {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            if let Some(bitmaps) = d.dma_dirty(&ranges).map_err(|e| e.to_string())? {
                for (&(gpa, _), words) in ranges.iter().zip(&bitmaps) {
                    or_at(mem, pages, gpa, words);
                }
            }
        }
        match (mode, &self.iommu) {
            (DmaTracking::Container, Some(iommu)) => {
                let dirty = iommu.dirty_pages().map_err(|e| e.to_string())?;
                let everything = !dirty.is_empty()
                    && dirty.iter().all(|(_, len, words)| {
                        words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>()
                            == len / vfio_ib::kernel::DIRTY_PAGE
                    });
                if everything && !stopped {
                    tracing::warn!(
                        "the IOMMU container reports every page mapped for DMA as dirty (a \
                         function behind a real IOMMU without DMA logging): they are copied \
                         again once the devices stop"
                    );
                    self.dma = Some(DmaTracking::AllAtStop);
                    return Ok(());
                }
                for (gpa, _, words) in &dirty {
                    or_at(mem, pages, *gpa, words);
                }
            }
            (DmaTracking::AllAtStop, _) if stopped => {
                for &(gpa, len) in &ranges {
                    let words = vec![u64::MAX; (len / PAGE_BYTES).div_ceil(64) as usize];
                    or_at(mem, pages, gpa, &words);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Loads saved function states into the functions attached at their
    /// slots (checked all first: every saved one has a function of the
    /// same kind here). Functions here without a saved state are refused.
    pub fn load_states(&self, saved: &[SavedFunction]) -> Result<(), String> {
        let mut todo = Vec::new();
        for s in saved {
            let a = self
                .attached
                .iter()
                .find(|a| a.at == Location::root(s.slot))
                .ok_or_else(|| {
                    format!(
                        "the saved VM has a passthrough function ({}) at 00:{:02x}.0 and this                          one none: give it one with --device",
                        s.ids, s.slot
                    )
                })?;
            let d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            if d.ids() != s.ids {
                return Err(format!(
                    "00:{:02x}.0: the saved function is {}, {} here is {}",
                    s.slot,
                    s.ids,
                    a.spec,
                    d.ids()
                ));
            }
            let data = from_hex(&s.data)
                .ok_or_else(|| format!("00:{:02x}.0: its saved device state is not hex", s.slot))?;
            drop(d);
            todo.push((a, data));
        }
        if let Some(extra) = self
            .attached
            .iter()
            .find(|a| !saved.iter().any(|s| Location::root(s.slot) == a.at))
        {
            return Err(format!(
                "{} at {} has no saved state to continue from",
                extra.spec, extra.at
            ));
        }
        for (a, data) in todo {
            let mut d = a.device.lock().map_err(|_| "lock poisoned".to_string())?;
            d.load_state(&data).map_err(|e| e.to_string())?;
            tracing::info!(
                "{} at {}: device state loaded ({} bytes)",
                a.spec,
                a.at,
                data.len()
            );
        }
        Ok(())
    }
}

/// Bytes per bit of the DMA dirty bitmaps (the guest's page size).
const PAGE_BYTES: u64 = vfio_ib::kernel::DIRTY_PAGE;

/// Guest RAM as (guest-physical address, length) per region: the IOVA
/// ranges mapped for DMA.
fn ram_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// ORs `words` (one bit per page from guest-physical `gpa`) into `pages`,
/// whose bits are guest RAM's pages with the regions back to back.
fn or_at(mem: &GuestMemoryMmap, pages: &mut PageBitmap, gpa: u64, words: &[u64]) {
    let mut first = 0;
    for r in mem.iter() {
        let start = r.start_addr().0;
        if (start..start + r.len()).contains(&gpa) {
            // Bits past the region's end (a bitmap's last word) are dropped.
            let pages_left = (start + r.len() - gpa) / PAGE_BYTES;
            let at = first + (gpa - start) / PAGE_BYTES;
            for (w, &bits) in words.iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let b = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    if b < pages_left {
                        pages.set(at + b);
                    }
                    bits &= bits - 1;
                }
            }
            return;
        }
        first += r.len() / PAGE_BYTES;
    }
}

/// Opens every `--device` and puts it on the bus.
pub fn attach_all(cx: &Context, specs: &[DeviceEntry]) -> Result<Passthroughs, Error> {
    let mut out = Passthroughs::default();
    for spec in specs {
        out.attach(cx, spec, false)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_round_trips_through_hex() {
        let data: Vec<u8> = (0..=255).collect();
        let hex = to_hex(&data);
        assert_eq!(hex.len(), 512);
        assert_eq!(&hex[..6], "000102");
        assert_eq!(from_hex(&hex), Some(data));
        assert_eq!(from_hex("abc"), None, "odd length");
        assert_eq!(from_hex("zz"), None, "not hex");
        assert_eq!(from_hex(""), Some(vec![]));
    }

    #[test]
    fn dma_dirty_bitmaps_land_on_the_pages_of_their_region() {
        // Two regions with a hole between: pages 0-15, then 16-31.
        let mem = GuestMemoryMmap::from_ranges(&[
            (vm_memory::GuestAddress(0), 0x10000),
            (vm_memory::GuestAddress(0x100000), 0x10000),
        ])
        .unwrap();
        assert_eq!(ram_ranges(&mem), vec![(0, 0x10000), (0x100000, 0x10000)]);
        let mut pages = PageBitmap::new(32);
        // The second region's pages 1 and 3, and bits past its end.
        or_at(
            &mem,
            &mut pages,
            0x100000,
            &[0b1010 | (1 << 16) | (1 << 63)],
        );
        assert_eq!(pages.runs(), vec![(17, 1), (19, 1)]);
        // From inside the first region: its page 2 onwards.
        or_at(&mem, &mut pages, 0x2000, &[0b1]);
        assert!(pages.get(2));
        // An address in no region changes nothing.
        or_at(&mem, &mut pages, 0x80000, &[u64::MAX]);
        assert_eq!(pages.count(), 3);
    }

    #[test]
    fn passthrough_state_ids_name_their_slot() {
        assert_eq!(state_id(1), "passthrough-01");
        assert_eq!(state_id(0x1f), "passthrough-1f");
        assert!(is_state_id(&state_id(3)));
        assert!(!is_state_id("pci"));
        assert!(!is_state_id("virtio-net-0"));
    }
}
