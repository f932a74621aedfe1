//! Building a VM: memory, the KVM VM (irqchip, PIT, memory slots), the
//! guest image, legacy devices and the vCPUs with their threads.
pub mod build;
mod device_manager;
mod ram;
mod vcpus;

pub use device_manager::{Devices, DiskSlot, ResizeFailure};
pub use ram::Ram;
pub use vcpus::{StopSlot, VcpuError, VcpuHandle, Vcpus};

use crate::arch::{cpuid, layout, msr, state};
use crate::boot::{self, BootInfo};
use crate::config::{Console, RunConfig};
use crate::decouple::Decoupling;
use crate::host::{CpuProfile, HostKind};
use crate::irq::IrqRouting;
use crate::machine::{virtio_ids, VirtioFunction};
use crate::memory::{self, GuestMemoryMmap};
use crate::passthrough::Passthroughs;
use crate::vcpu::{self, Buses, Request, Vcpu, VcpuShared};
use build::Builder;
use devices::bus::{MmioBus, PioBus};
use devices::legacy::{self, AcpiSleep, SerialArgs, TestExitPort, I8042};
use devices::pci::{PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindow, PCI_IO_WINDOW};
use devices::rtc::RTC_BASE;
use devices::virtio::block::Block;
use devices::virtio::console::Console as VirtioConsole;
use devices::virtio::net::{AnnounceHandle, MacHandle, Net};
use devices::virtio::pci::VirtioPci;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{IoThread, VirtioDevice};
use devices::EventSink;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vcpu_decouple::kvmstats::VcpuStats;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot open console file {path}: {source}")]
    ConsoleFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::DiskError),
    #[error(transparent)]
    Tap(#[from] devices::tap::TapError),
    #[error(transparent)]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Decouple(#[from] crate::decouple::DecoupleError),
    /// A thread could not install its seccomp filter.
    #[error(transparent)]
    Confine(#[from] sandbox::seccomp::Error),
    #[error(transparent)]
    Passthrough(#[from] crate::passthrough::Error),
    #[error(transparent)]
    Dirty(#[from] memory::dirty::Error),
    /// A device could not be built or wired (interrupts, bus, BARs).
    #[error("{device}: {detail}")]
    Device { device: String, detail: String },
    /// A host resource the VM needs (an eventfd, a thread, a signal).
    #[error("cannot {what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what} table: {detail}")]
    Table { what: &'static str, detail: String },
    #[error("boot registers: {0}")]
    BootRegisters(#[from] crate::arch::regs::Error),
    /// A saved device state that is missing, unreadable or does not fit.
    #[error(transparent)]
    DeviceState(crate::machine::DeviceStateError),
    #[error(transparent)]
    VcpuState(#[from] crate::machine::VcpuRestoreError),
    #[error("VM state: {0}")]
    VmState(String),
    #[error(transparent)]
    Restore(Box<crate::machine::Error>),
    /// A vCPU thread ended before it ran (its placement was refused).
    #[error("a vCPU thread ended before it started")]
    VcpuThread,
}

impl Error {
    pub fn is_user_error(&self) -> bool {
        match self {
            // A prefault that fails is the host's trouble, not the input's.
            // So is a host node that cannot be read or bound to.
            Error::Memory(m) => !matches!(
                m,
                memory::Error::Prefault { .. }
                    | memory::Error::Numa(
                        numa::host::Error::Bind { .. } | numa::host::Error::Read { .. }
                    )
            ),
            Error::ConsoleFile { .. }
            | Error::Disk(_)
            | Error::Tap(_)
            | Error::Vsock(_)
            | Error::Decouple(_) => true,
            Error::Boot(b) => b.is_user_error(),
            Error::Passthrough(p) => p.user,
            _ => false,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// A running VM, made of its parts: guest memory ([`Ram`]), the vCPUs
/// ([`Vcpus`]), the devices ([`Devices`]) and the KVM VM they share; the
/// platform it runs on ([`Platform`]) and its settings.
pub struct Vm {
    pub(crate) vm_fd: Arc<VmFd>,
    pub ram: Ram,
    pub vcpus: Vcpus,
    pub devices: Devices,
    pub platform: Platform,
    pub exit_evt: Arc<EventFd>,
    pub started: Instant,
    pub config: RunConfig,
}

/// What the guest was started on and with: its entry, the host, its CPU
/// profile and clock.
pub struct Platform {
    pub boot: BootInfo,
    pub host_kind: HostKind,
    pub profile: CpuProfile,
    pub tsc_khz: u32,
    /// Features the CPU profile hides that KVM shows the guest anyway.
    pub kvm_forced_features: Vec<&'static str>,
}

/// Ends vCPU threads that never ran guest code (a failed start).
fn stop_threads(vcpus: &[VcpuHandle]) {
    for v in vcpus {
        v.shared.request(Request::Exit);
        if let Ok(mut t) = v.thread.lock() {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
        }
    }
}

fn console_writer(console: &Console) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match console {
        Console::Stdio => Box::new(std::io::stdout()),
        Console::None => Box::new(std::io::sink()),
        Console::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::ConsoleFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// KVM may add back features the profile hides: on PVM hosts, features that
/// guest ring 3 can use natively (XSAVE, AVX, ...) are always reported.
/// Reads the vCPU's table back and returns (and logs) what KVM kept.
fn forced_features(fd: &kvm_ioctls::VcpuFd, profile: CpuProfile) -> Vec<&'static str> {
    let Ok(back) = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES) else {
        return vec![];
    };
    let forced = cpuid::still_visible(back.as_slice(), profile);
    if forced.contains(&"xsave") {
        tracing::info!(
            "KVM keeps CPU features the {profile:?} profile hides: {}; a Linux guest \
             needs `noxsave` on its command line (docs/pvm-hosts.md)",
            forced.join(" ")
        );
    }
    forced
}

/// The PCI root bus: config mechanism #1 on the port bus, ECAM and the two
/// BAR windows on the MMIO bus.
fn attach_pci(
    pio: &mut PioBus,
    mmio: &mut MmioBus,
    mem_bytes: u64,
) -> Result<Arc<PciRoot>, String> {
    let high = layout::pci_high_window(mem_bytes);
    let root = Arc::new(PciRoot::new(layout::PCI_LOW_WINDOW, high).map_err(|e| e.to_string())?);
    let err = |what: &str, e: devices::bus::BusError| format!("{what}: {e}");
    pio.insert(
        u64::from(PciConfigIo::BASE),
        8,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
    )
    .map_err(|e| err("PCI config ports", e))?;
    pio.insert(
        PCI_IO_WINDOW.0,
        PCI_IO_WINDOW.1,
        Arc::new(Mutex::new(PciWindow::io(root.clone()))),
    )
    .map_err(|e| err("PCI I/O window", e))?;
    mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
    )
    .map_err(|e| err("PCI ECAM", e))?;
    for (base, size) in [layout::PCI_LOW_WINDOW, high] {
        mmio.insert(
            base,
            size,
            Arc::new(Mutex::new(PciWindow::new(root.clone(), base))),
        )
        .map_err(|e| err("PCI window", e))?;
    }
    Ok(root)
}

/// Puts a virtio device on the PCI bus: MSI-X vectors (one per queue and
/// one for configuration changes), BAR placement, and a KVM ioeventfd on each
/// queue's notify address so notifications skip the exit to user space.
fn add_virtio(
    vm_fd: &VmFd,
    routing: &Arc<IrqRouting>,
    pci: &PciRoot,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    queues: u16,
) -> Result<Arc<Mutex<VirtioPci>>, Error> {
    let name = device.describe();
    let failed = |detail: String| Error::Device {
        device: name.clone(),
        detail,
    };
    let vectors = routing
        .msi_vectors(queues + 1)
        .map_err(|e| failed(format!("interrupts: {e}")))?;
    let transport =
        VirtioPci::new(device, vectors, mem.clone()).map_err(|e| failed(e.to_string()))?;
    let transport = Arc::new(Mutex::new(transport));
    pci.add(transport.clone())
        .map_err(|e| failed(e.to_string()))?;
    let t = transport
        .lock()
        .map_err(|_| failed("lock poisoned".into()))?;
    let bar0 = t.config().bar_address(0).unwrap_or(0);
    for (offset, fd) in t.notifiers() {
        let addr = IoEventAddress::Mmio(bar0 + offset);
        vm_fd
            .register_ioevent(fd, &addr, NoDatamatch)
            .map_err(kvm_err("register queue notification"))?;
    }
    drop(t);
    Ok(transport)
}

/// A VM built up to the point where it needs its guest: the KVM VM with
/// irqchip, PIT and memory slots, the devices, the I/O thread and the vCPU
/// fds. [`Prepared::start`] loads a kernel or a saved state into it and
/// runs the vCPUs. An incoming migration prepares the VM while the pages
/// arrive, so that the pause covers only the state load.
pub struct Prepared {
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    host_kind: HostKind,
    profile: CpuProfile,
    console: Box<dyn Write + Send>,
    serial_irq: EventFd,
    pio: PioBus,
    mmio: MmioBus,
    pci: Arc<PciRoot>,
    disks: Vec<DiskSlot>,
    virtio: Vec<VirtioFunction>,
    io_thread: IoThread,
    device_events: EventSink,
    exit_evt: Arc<EventFd>,
    fds: Vec<kvm_ioctls::VcpuFd>,
    host_tsc_khz: u32,
    boot_msrs: Vec<kvm_bindings::kvm_msr_entry>,
    msr_indices: Arc<Vec<u32>>,
    base_cpuid: kvm_bindings::CpuId,
    log_dirty: bool,
    config: RunConfig,
    decoupling: Arc<Decoupling>,
    routing: Arc<IrqRouting>,
    passthrough: Passthroughs,
    /// Each network device's MAC address and announcement trigger, in
    /// `config.nets`' order.
    net_macs: Vec<MacHandle>,
    net_announce: Vec<AnnounceHandle>,
}

impl Vm {
    /// Builds the VM and starts its vCPUs: booting `config.kernel`, or
    /// continuing from a snapshot when `restore` is given.
    pub fn create(
        kvm: &Kvm,
        config: RunConfig,
        restore: Option<&crate::machine::Restoring>,
    ) -> Result<Vm, Error> {
        let mem = match restore {
            None => {
                let mem =
                    memory::create(config.memory_bytes, config.hugepages, config.numa.as_ref())?;
                if config.prefault {
                    let t = std::time::Instant::now();
                    let threads = memory::prefault(&mem, config.hugepages, config.numa.as_ref())?;
                    tracing::info!(
                        "guest memory faulted in: {} MiB in {} ms ({threads} threads)",
                        config.memory_bytes >> 20,
                        t.elapsed().as_millis()
                    );
                }
                mem
            }
            Some(r) => {
                // Host nodes first (a boot's `memory::create` checks them
                // itself): one the restoring host cannot give is the
                // user's to fix (exit 2), not a failed restore.
                if let Some(l) = &config.numa {
                    memory::check_nodes(l, config.hugepages)?;
                }
                r.memory(&config).map_err(|e| Error::Restore(Box::new(e)))?
            }
        };
        // A restored VM follows its snapshot chain: track dirty pages from
        // the start so the next incremental snapshot can extend it.
        let follows_chain = restore.is_some_and(|r| r.chain().is_some());
        // A snapshot that carries passthrough functions' device state: this
        // host's functions go where the saved VM had its own.
        let slots = restore.map(|r| r.passthrough_slots()).unwrap_or_default();
        if slots.is_empty() {
            return Vm::prepare(kvm, config, mem, follows_chain)?.start(restore);
        }
        let mut config = config;
        let devices = std::mem::take(&mut config.devices);
        let mut prepared = Vm::prepare(kvm, config, mem, follows_chain)?;
        prepared.attach_for_state(&devices, &slots)?;
        prepared.start(restore)
    }

    /// Builds everything that does not depend on the guest's image or
    /// state, on `mem` (registered with dirty logging if `log_dirty`).
    pub fn prepare(
        kvm: &Kvm,
        config: RunConfig,
        mem: GuestMemoryMmap,
        log_dirty: bool,
    ) -> Result<Prepared, Error> {
        let host_kind = HostKind::detect();
        let profile = config.cpu_profile.unwrap_or(host_kind.default_profile());
        let console = console_writer(&config.console)?;
        let decoupling = Arc::new(Decoupling::plan(kvm, &config).map_err(Error::Decouple)?);

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        // Pending exceptions kept apart from injected ones in saved vCPU
        // state (snapshots, migration).
        crate::arch::state::enable_exception_payload(&vm_fd);
        decoupling
            .configure_vm(kvm, &vm_fd)
            .map_err(Error::Decouple)?;
        vm_fd
            .set_tss_address(crate::arch::layout::KVM_TSS_ADDRESS)
            .map_err(kvm_err("set TSS address"))?;
        vm_fd
            .set_identity_map_address(crate::arch::layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set identity map address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_err("create in-kernel PIT"))?;
        memory::dirty::register(&vm_fd, &mem, log_dirty)?;

        // Devices (the serial port comes with the guest's state in `start`).
        let exit_evt =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(host("create an eventfd"))?);
        let device_events = EventSink::new(exit_evt.clone());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("create an eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, legacy::COM1_IRQ)
            .map_err(kvm_err("register serial irqfd"))?;
        let mut pio = PioBus::new();
        let bus_err = |detail: String| Error::Device {
            device: "legacy devices".into(),
            detail,
        };
        pio.insert(
            u64::from(legacy::I8042_DATA),
            5,
            Arc::new(Mutex::new(I8042::new(device_events.clone()))),
        )
        .map_err(|e| bus_err(e.to_string()))?;
        pio.insert(
            u64::from(legacy::ACPI_SLEEP_BASE),
            2,
            Arc::new(Mutex::new(AcpiSleep::new(device_events.clone()))),
        )
        .map_err(|e| bus_err(e.to_string()))?;
        let mut mmio = MmioBus::new();
        let pci = attach_pci(&mut pio, &mut mmio, config.memory_bytes).map_err(bus_err)?;
        let routing = Arc::new(IrqRouting::new(vm_fd.clone(), config.topology));
        let io_thread = decoupling
            .spawn_io_thread()
            .map_err(host("start the I/O thread"))?;
        // Every virtio device, in bus order (see `virtio_ids`).
        let mut disks = Vec::new();
        let mut built: Vec<(Box<dyn VirtioDevice>, u16)> = Vec::new();
        for disk in &config.disks {
            let block = Block::new(disk.clone(), io_thread.endpoint())?;
            disks.push(block.disk());
            built.push((Box::new(block), disk.queues));
        }
        let (mut net_macs, mut net_announce) = (Vec::new(), Vec::new());
        for net in &config.nets {
            let device = Net::new(net.clone(), io_thread.endpoint())?;
            net_macs.push(device.mac_handle());
            net_announce.push(device.announce_handle());
            // Two vectors for receive and transmit: the control queue
            // needs none (its driver polls it).
            built.push((Box::new(device), 2));
        }
        if let Some(path) = &config.virtio_console {
            let dev = VirtioConsole::new(path, io_thread.endpoint()).map_err(|source| {
                Error::ConsoleFile {
                    path: path.clone(),
                    source,
                }
            })?;
            built.push((Box::new(dev), 2));
        }
        if let Some(v) = &config.vsock {
            built.push((Box::new(Vsock::new(v.clone(), io_thread.endpoint())?), 3));
        }
        if config.rng {
            built.push((Box::new(Rng::new(io_thread.endpoint())), 1));
        }
        let ids = virtio_ids(
            config.disks.len(),
            config.nets.len(),
            config.virtio_console.is_some(),
            config.vsock.is_some(),
            config.rng,
        );
        let mut virtio = Vec::new();
        for (id, (device, queues)) in ids.into_iter().zip(built) {
            let transport = add_virtio(&vm_fd, &routing, &pci, &mem, device, queues)?;
            virtio.push(VirtioFunction { id, transport });
        }
        let disks = disks
            .into_iter()
            .zip(&virtio)
            .map(|(disk, f)| DiskSlot {
                disk,
                transport: f.transport.clone(),
            })
            .collect();
        // Hot-plug root ports, at the top of bus 0 (after the devices, so
        // that theirs keep their numbers), one MSI vector each.
        for number in 1..=config.hotplug_slots {
            let slot = |detail: String| Error::Device {
                device: format!("hot-plug slot {number}"),
                detail,
            };
            let vectors = routing
                .msi_vectors(1)
                .map_err(|e| slot(format!("interrupts: {e}")))?;
            pci.add_root_port(number, vectors)
                .map_err(|e| slot(e.to_string()))?;
        }
        let passthrough = crate::passthrough::attach_all(
            &crate::passthrough::Context {
                vm_fd: &vm_fd,
                routing: &routing,
                pci: &pci,
                mem: &mem,
                io: &io_thread.endpoint(),
            },
            &config.devices,
        )?;

        // vCPU fds (their registers are set in `start`).
        let supported_msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("get MSR index list"))?;
        let boot_msrs = msr::boot_msrs(supported_msrs.as_slice());
        let msr_indices = Arc::new(state::msrs_to_save(supported_msrs.as_slice()));
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut fds = Vec::new();
        // KVM's vCPU id is the APIC ID (the topology's, with gaps where
        // its counts are not powers of two); everything else in the VMM
        // counts vCPUs 0, 1, 2, ... as the guest numbers its CPUs.
        for apic in config.apic_ids() {
            fds.push(
                vm_fd
                    .create_vcpu(u64::from(apic))
                    .map_err(kvm_err("create vCPU"))?,
            );
        }
        let host_tsc_khz = fds
            .first()
            .and_then(|fd| fd.get_tsc_khz().ok())
            .unwrap_or(0);
        Ok(Prepared {
            vm_fd,
            mem,
            host_kind,
            profile,
            console,
            serial_irq,
            pio,
            mmio,
            pci,
            disks,
            virtio,
            io_thread,
            device_events,
            exit_evt,
            fds,
            host_tsc_khz,
            boot_msrs,
            msr_indices,
            base_cpuid,
            log_dirty,
            config,
            decoupling,
            routing,
            passthrough,
            net_macs,
            net_announce,
        })
    }
}

impl Prepared {
    /// Puts `devices` (this host's passthrough functions, in order) where
    /// the VM whose state is coming had the functions whose device state
    /// comes with it: `slots` (slot on bus 0, vendor:device). Returns the
    /// devices left over (plugged once the VM runs, as without state).
    pub fn attach_for_state<'a>(
        &mut self,
        devices: &'a [crate::config::DeviceEntry],
        slots: &[(u8, String)],
    ) -> Result<&'a [crate::config::DeviceEntry], Error> {
        if devices.len() < slots.len() {
            let list: Vec<String> = slots
                .iter()
                .map(|(s, ids)| format!("00:{s:02x}.0 ({ids})"))
                .collect();
            return Err(Error::Device {
                device: "passthrough".into(),
                detail: format!(
                    "the VM brings the device state of {} passthrough function(s), {}; give this                      host's with --device ({} given)",
                    slots.len(),
                    list.join(", "),
                    devices.len()
                ),
            });
        }
        let cx = crate::passthrough::Context {
            vm_fd: &self.vm_fd,
            routing: &self.routing,
            pci: &self.pci,
            mem: &self.mem,
            io: &self.io_thread.endpoint(),
        };
        for (spec, (slot, ids)) in devices.iter().zip(slots) {
            let a = self.passthrough.attach_to(&cx, spec, false, Some(*slot))?;
            let here = a.device.lock().map(|d| d.ids()).unwrap_or_default();
            if &here != ids {
                return Err(Error::Device {
                    device: spec.to_string(),
                    detail: format!(
                        "it is {here}; the function whose state arrives at 00:{slot:02x}.0 was {ids}"
                    ),
                });
            }
        }
        Ok(&devices[slots.len()..])
    }

    /// Part of a passthrough function's device state, arriving during a
    /// migration (its PRE_COPY data).
    pub fn load_device_part(&self, slot: u8, data: &[u8]) -> Result<(), String> {
        self.passthrough.load_part(slot, data)
    }

    /// Guest memory, to fill before `start`.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Loads the guest - `config.kernel`, or the saved state when `restore`
    /// is given (whose kernel, command line and test exit port the VM takes
    /// on) - and starts the vCPUs.
    pub fn start(self, restore: Option<&crate::machine::Restoring>) -> Result<Vm, Error> {
        match restore {
            None => self.build(&build::ForBoot),
            Some(r) => self.build(&build::FromState(r)),
        }
    }

    /// Gives the machine its state as `b` says, then runs the vCPUs.
    fn build(mut self, b: &dyn Builder) -> Result<Vm, Error> {
        b.configure(&mut self.config);
        // (Before any device state is restored: a migrated VM's MAC.)
        for (handle, net) in self.net_macs.iter().zip(&self.config.nets) {
            handle.set(net.mac);
        }
        let Prepared {
            vm_fd,
            mem,
            host_kind,
            profile,
            console,
            serial_irq,
            mut pio,
            mmio,
            pci,
            disks,
            virtio,
            io_thread,
            device_events,
            exit_evt,
            fds,
            host_tsc_khz,
            boot_msrs,
            msr_indices,
            base_cpuid,
            log_dirty,
            config,
            decoupling,
            routing,
            passthrough,
            net_macs: _,
            net_announce,
        } = self;
        let boot = b.boot(&mem, &config)?;
        let bus_err = |device: &str, e: devices::bus::BusError| Error::Device {
            device: device.into(),
            detail: e.to_string(),
        };
        let serial = Arc::new(Mutex::new(b.serial(SerialArgs {
            irq: serial_irq,
            out: console,
        })?));
        pio.insert(u64::from(legacy::COM1_BASE), 8, serial.clone())
            .map_err(|e| bus_err("serial port", e))?;
        let rtc = Arc::new(Mutex::new(b.rtc()?));
        pio.insert(u64::from(RTC_BASE), 2, rtc.clone())
            .map_err(|e| bus_err("CMOS clock", e))?;
        if let Some(port) = config.test_exit_port {
            pio.insert(
                u64::from(port),
                1,
                Arc::new(Mutex::new(TestExitPort::new(device_events.clone()))),
            )
            .map_err(|e| bus_err(&format!("test exit port {port:#x}"), e))?;
        }
        let buses = Arc::new(Buses { pio, mmio });

        let setup = build::VcpuSetup {
            profile,
            host_tsc_khz,
            msr_indices: &msr_indices,
            base_cpuid: &base_cpuid,
            boot_msrs: &boot_msrs,
            mem: &mem,
            shape: config.shape,
            numa: config.numa.as_ref(),
        };
        let mut tsc_khz = host_tsc_khz;
        let mut kvm_forced = vec![];
        for (id, fd) in fds.iter().enumerate() {
            let id = id as u8;
            tsc_khz = b.vcpu(fd, id, &boot, &setup)?;
            if id == 0 {
                kvm_forced = forced_features(fd, profile);
            }
        }
        b.machine(&vm_fd, &pci, &virtio, &passthrough)?;
        vcpu::register_kick_handler()
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            .map_err(host("install the vCPU kick signal handler"))?;
        let vcpu_stop: StopSlot = Arc::new(Mutex::new(None));
        let mut vcpus: Vec<VcpuHandle> = Vec::new();
        // Every vCPU thread first takes its place on the host (pinning,
        // SCHED_FIFO) and only then runs guest code; if one cannot, none runs.
        let (placed_tx, placed_rx) = std::sync::mpsc::channel();
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            let stats = VcpuStats::open(fd.as_raw_fd())
                .map_err(|e| tracing::debug!("vCPU {id}: no KVM statistics: {e}"))
                .ok();
            let shared = Arc::new(VcpuShared::new(id, config.topology.role(id), stats));
            shared.request(Request::Pause);
            let stop = vcpu_stop.clone();
            let evt = exit_evt.clone();
            let vcpu = Vcpu {
                fd,
                shared: shared.clone(),
                buses: buses.clone(),
                mem: mem.clone(),
                pvm_assist_enabled: host_kind == HostKind::Pvm,
                on_stop: Box::new(move |id, reason| {
                    if let Ok(mut s) = stop.lock() {
                        s.get_or_insert((id, reason));
                    }
                    let _ = evt.write(1);
                }),
            };
            let placed = placed_tx.clone();
            let plan = decoupling.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // Placed, then confined, before any guest code runs.
                    let r = plan
                        .enter_vcpu_thread(id)
                        .map_err(Error::from)
                        .and_then(|()| {
                            sandbox::seccomp::confine(
                                sandbox::ThreadKind::Vcpu,
                                &format!("vcpu{id}"),
                            )
                            .map_err(Error::from)
                        });
                    vcpu.shared.set_tid(vcpu_decouple::affinity::current_tid());
                    let ok = r.is_ok();
                    let _ = placed.send(r);
                    if ok {
                        vcpu.run();
                    }
                })
                .map_err(host("start a vCPU thread"));
            let thread = match thread {
                Ok(t) => t,
                Err(e) => {
                    stop_threads(&vcpus);
                    return Err(e);
                }
            };
            vcpus.push(VcpuHandle {
                shared,
                thread: Mutex::new(Some(thread)),
            });
        }
        drop(placed_tx);
        for _ in 0..vcpus.len() {
            let placed = placed_rx
                .recv()
                .map_err(|_| Error::VcpuThread)
                .and_then(|r| r);
            if let Err(e) = placed {
                stop_threads(&vcpus);
                return Err(e);
            }
        }
        if !b.paused() {
            for v in &vcpus {
                v.shared.request(Request::Run);
            }
        }
        decoupling.watch_kvm_workers();

        let vm = Vm {
            ram: Ram::new(mem.clone(), vm_fd.clone(), log_dirty, b.chain()),
            vcpus: Vcpus::new(vcpus, vcpu_stop, decoupling, msr_indices),
            devices: Devices {
                serial,
                rtc,
                pci,
                disks,
                virtio,
                io_thread,
                routing,
                passthrough: Mutex::new(passthrough),
                events: device_events,
                vm_fd: vm_fd.clone(),
                mem,
                net_announce,
                announce_pending: b.moved().into(),
            },
            platform: Platform {
                boot,
                host_kind,
                profile,
                tsc_khz,
                kvm_forced_features: kvm_forced,
            },
            vm_fd,
            exit_evt,
            started: Instant::now(),
            config,
        };
        if !b.paused() {
            vm.devices.announce_if_pending();
        }
        Ok(vm)
    }
}

impl Vm {
    /// Pauses every vCPU and waits until each acknowledged.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.vcpus.pause()
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.vcpus.resume()?;
        self.devices.announce_if_pending();
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        self.vcpus.stop()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
