//! The VM's devices as one: the platform devices (serial port, CMOS
//! clock), the PCI root bus with its virtio transports and hot-plug slots,
//! the disks, the I/O thread that serves the virtio queues, interrupt
//! routing, and the functions passed through from the host.
use crate::irq::IrqRouting;
use crate::machine::{DeviceStateError, DeviceStates, VirtioFunction, PCI, RTC, SERIAL};
use crate::memory::GuestMemoryMmap;
use crate::passthrough::Passthroughs;
use devices::legacy::SerialPort;
use devices::pci::{Location, PciRoot};
use devices::persist::StateError;
use devices::rtc::CmosRtc;
use devices::virtio::net::AnnounceHandle;
use devices::virtio::pci::VirtioPci;
use devices::virtio::{FreezeError, Frozen, IoThread};
use devices::EventSink;
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ResizeFailure {
    #[error("no disk {0} (the VM has {1})")]
    NoSuchDisk(usize, usize),
    #[error(transparent)]
    Refused(devices::virtio::block::ResizeError),
}

/// The guest did not let go of a function in a hot-plug slot.
#[derive(Debug, thiserror::Error)]
pub enum EjectError {
    #[error("{0} is not in a hot-plug slot")]
    NoSlot(Location),
    #[error(
        "the guest did not power hot-plug slot {at} off within {secs} s after its attention \
         button (no PCIe hot-plug driver, or the function is busy)"
    )]
    NotReleased { at: Location, secs: u64 },
}

/// A virtio-blk disk as the VMM sees it: the image and its PCI function.
pub struct DiskSlot {
    pub disk: Arc<devices::virtio::block::Disk>,
    pub(super) transport: Arc<Mutex<VirtioPci>>,
}

/// Every device of the VM.
pub struct Devices {
    pub(super) serial: Arc<Mutex<SerialPort>>,
    pub(super) rtc: Arc<Mutex<CmosRtc>>,
    pub(super) pci: Arc<PciRoot>,
    pub(super) disks: Vec<DiskSlot>,
    /// Every virtio device's transport, by device id.
    pub(super) virtio: Vec<VirtioFunction>,
    /// Runs the virtio queue handlers; dropped after the vCPUs stopped.
    pub(super) io_thread: IoThread,
    /// MSI routes as the guest asked for them and as committed (`GET /vm/interrupts`).
    pub(super) routing: Arc<IrqRouting>,
    /// Host functions passed through (`--device`, `PUT /vm/devices`);
    /// dropped after the vCPUs stopped, before guest memory.
    pub(super) passthrough: Mutex<Passthroughs>,
    /// Where devices report resets, power-off and test exits.
    pub(super) events: EventSink,
    /// What hot-plugging needs: the KVM VM and guest memory.
    pub(super) vm_fd: Arc<VmFd>,
    pub(super) mem: GuestMemoryMmap,
    /// Each network device's announcement trigger (`config.nets`' order).
    pub(super) net_announce: Vec<AnnounceHandle>,
    /// A restored or migrated VM that has not run here yet: its network
    /// devices announce it when it first does ([`Devices::announce`]).
    pub(super) announce_pending: std::sync::atomic::AtomicBool,
}

impl Devices {
    /// Every network device announces the VM on its TAP (RARP, and the
    /// guest's own gratuitous ARPs where its driver can): done when a VM
    /// that moved here first runs, so the network sends its traffic here.
    pub fn announce(&self) {
        for a in &self.net_announce {
            a.request();
        }
    }

    /// Announces the VM if it moved here and has not run since.
    pub(super) fn announce_if_pending(&self) {
        if self
            .announce_pending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.announce();
            if let Ok(p) = self.passthrough.lock() {
                p.kick_intx();
            }
        }
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialPort>> {
        &self.serial
    }

    pub fn pci(&self) -> &Arc<PciRoot> {
        &self.pci
    }

    pub fn disks(&self) -> &[DiskSlot] {
        &self.disks
    }

    pub fn virtio(&self) -> &[VirtioFunction] {
        &self.virtio
    }

    pub fn routing(&self) -> &Arc<IrqRouting> {
        &self.routing
    }

    pub fn events(&self) -> &EventSink {
        &self.events
    }

    /// The passthrough functions, locked.
    pub fn passthrough(&self) -> Option<MutexGuard<'_, Passthroughs>> {
        self.passthrough.lock().ok()
    }

    /// Freezes the I/O thread when the VM has virtio devices: from here
    /// until the guard drops, no device writes guest memory or moves a
    /// queue.
    pub fn freeze(&self, timeout: Duration) -> Result<Option<Frozen>, FreezeError> {
        if self.virtio.is_empty() {
            return Ok(None);
        }
        self.io_thread.freeze(timeout).map(Some)
    }

    /// Every device's state by id: the platform devices, the PCI root bus
    /// and each virtio transport (call with the devices frozen).
    pub fn save(&self) -> Result<DeviceStates, DeviceStateError> {
        let poisoned = |what: &'static str| DeviceStateError::Device {
            id: what.into(),
            source: StateError::Poisoned(what),
        };
        let mut d = DeviceStates::default();
        d.put(SERIAL, &*self.serial.lock().map_err(|_| poisoned(SERIAL))?)?;
        d.put(RTC, &*self.rtc.lock().map_err(|_| poisoned(RTC))?)?;
        d.put(PCI, &self.pci)?;
        for f in &self.virtio {
            d.put(&f.id, &f.transport)?;
        }
        // Passthrough functions whose device state travels (VFIO
        // migration): stopped and read out here, running again after
        // `end_passthrough_saves`.
        let p = self
            .passthrough
            .lock()
            .map_err(|_| poisoned("passthrough"))?;
        let saved = p.finish_saves().map_err(|why| DeviceStateError::Device {
            id: "passthrough".into(),
            source: StateError::Mismatch(why),
        })?;
        for (id, f) in saved {
            d.put_state(&id, &f)?;
        }
        Ok(d)
    }

    /// After a snapshot, or a migration that did not complete: passthrough
    /// devices whose state was saved run again here.
    pub fn end_passthrough_saves(&self) {
        if let Ok(mut p) = self.passthrough.lock() {
            p.end_saves();
        }
    }

    /// Grows disk `index` to `bytes` and tells the guest's driver through a
    /// configuration-change interrupt.
    pub fn resize_disk(&self, index: usize, bytes: u64) -> Result<(), ResizeFailure> {
        let slot = self
            .disks
            .get(index)
            .ok_or(ResizeFailure::NoSuchDisk(index, self.disks.len()))?;
        slot.disk.grow(bytes).map_err(ResizeFailure::Refused)?;
        if let Ok(mut t) = slot.transport.lock() {
            t.config_changed();
        }
        Ok(())
    }

    /// Hot-plugs the function `spec` names (into a free hot-plug slot if
    /// the VM has one, else on bus 0); returns where it is.
    pub fn plug(
        &self,
        spec: &crate::config::DeviceEntry,
    ) -> Result<Location, crate::passthrough::Error> {
        let mut p = self
            .passthrough
            .lock()
            .map_err(|_| crate::passthrough::Error {
                spec: spec.to_string(),
                msg: "lock poisoned".into(),
                user: false,
            })?;
        let cx = crate::passthrough::Context {
            vm_fd: &self.vm_fd,
            routing: &self.routing,
            pci: &self.pci,
            mem: &self.mem,
            io: &self.io_thread.endpoint(),
        };
        p.attach(&cx, spec, true).map(|a| a.at)
    }

    /// Hot-unplugs the passthrough function at `at`; None if there is none.
    pub fn unplug(&self, at: Location) -> Option<crate::config::DeviceEntry> {
        self.passthrough.lock().ok()?.detach(&self.pci, at)
    }

    /// Asks the guest to let go of the function in hot-plug slot `at` (the
    /// slot's Attention Button) and waits up to `timeout` for it to power
    /// the slot off, which is how the guest's PCIe hot-plug driver says
    /// "done" (Linux's pciehp waits 5 s after the button, in case it is
    /// pressed again). A slot the guest already powered off is released.
    pub fn eject(&self, at: Location, timeout: Duration) -> Result<(), EjectError> {
        let port = self.pci.port_at(at).ok_or(EjectError::NoSlot(at))?;
        let powered = || port.lock().map(|p| p.powered()).unwrap_or(false);
        if !powered() {
            return Ok(());
        }
        if let Ok(mut p) = port.lock() {
            p.press_button();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            if !powered() {
                return Ok(());
            }
        }
        Err(EjectError::NotReleased {
            at,
            secs: timeout.as_secs(),
        })
    }

    /// The passthrough functions attached now.
    pub fn passthrough_specs(&self) -> Vec<String> {
        self.passthrough
            .lock()
            .map(|p| p.attached.iter().map(|a| a.spec.to_string()).collect())
            .unwrap_or_default()
    }
}
