//! The two ways a prepared VM gets its machine state: built for a first
//! boot, or built from a saved state (a snapshot or an arriving
//! migration). `vm::Prepared::start` asks a [`Builder`] at each step and
//! never asks which one it has.
use super::Error;
use crate::arch::{cpuid, regs};
use crate::boot::{self, BootInfo, BootSpec};
use crate::config::RunConfig;
use crate::host::CpuProfile;
use crate::machine::{ChainRef, Origin, Restoring, VirtioFunction, RTC, SERIAL};
use crate::memory::GuestMemoryMmap;
use devices::legacy::{SerialArgs, SerialPort};
use devices::pci::PciRoot;
use devices::rtc::CmosRtc;
use kvm_bindings::Msrs;
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::Arc;

/// What setting up a vCPU for boot needs from the prepared VM.
pub struct VcpuSetup<'a> {
    pub profile: CpuProfile,
    pub host_tsc_khz: u32,
    pub msr_indices: &'a [u32],
    pub base_cpuid: &'a kvm_bindings::CpuId,
    pub boot_msrs: &'a [kvm_bindings::kvm_msr_entry],
    pub mem: &'a GuestMemoryMmap,
    pub shape: numa::CpuShape,
    pub numa: Option<&'a numa::Layout>,
}

/// One way to give a prepared VM its machine state.
pub trait Builder {
    /// Settings the machine brings with it (a saved machine keeps its
    /// kernel, command line and test exit port).
    fn configure(&self, _config: &mut RunConfig) {}
    /// The guest's entry: a kernel loaded now, or where the saved one was.
    fn boot(&self, mem: &GuestMemoryMmap, config: &RunConfig) -> Result<BootInfo, Error>;
    fn serial(&self, args: SerialArgs) -> Result<SerialPort, Error>;
    fn rtc(&self) -> Result<CmosRtc, Error>;
    /// Sets vCPU `id` up; returns the TSC frequency it runs at (kHz).
    fn vcpu(&self, fd: &VcpuFd, id: u8, boot: &BootInfo, s: &VcpuSetup) -> Result<u32, Error>;
    /// The VM-wide state (clocks, irqchips) and the devices' state, once
    /// every vCPU is set up.
    fn machine(
        &self,
        vm_fd: &VmFd,
        pci: &Arc<PciRoot>,
        virtio: &[VirtioFunction],
        passthrough: &crate::passthrough::Passthroughs,
    ) -> Result<(), Error>;
    /// Start with the vCPUs paused.
    fn paused(&self) -> bool;
    /// The VM continues from a saved state (a restore or an incoming
    /// migration): its network devices announce it when it first runs.
    fn moved(&self) -> bool {
        false
    }
    /// The snapshot chain the VM's memory follows.
    fn chain(&self) -> Option<ChainRef>;
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// A first boot of `config.kernel`.
pub struct ForBoot;

impl Builder for ForBoot {
    fn boot(&self, mem: &GuestMemoryMmap, config: &RunConfig) -> Result<BootInfo, Error> {
        Ok(boot::load(
            mem,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                mem_bytes: config.memory_bytes,
                apic_ids: &config.apic_ids(),
                numa: config.numa.as_ref(),
            },
        )?)
    }

    fn serial(&self, args: SerialArgs) -> Result<SerialPort, Error> {
        Ok(SerialPort::new(args.irq, args.out))
    }

    fn rtc(&self) -> Result<CmosRtc, Error> {
        Ok(CmosRtc::new())
    }

    /// CPUID for the profile and topology, boot MSRs, FPU, LAPIC LINT
    /// pins; the boot vCPU also gets the entry registers.
    fn vcpu(&self, fd: &VcpuFd, id: u8, boot: &BootInfo, s: &VcpuSetup) -> Result<u32, Error> {
        let mut entries = s.base_cpuid.as_slice().to_vec();
        cpuid::filter(&mut entries, s.profile, s.host_tsc_khz);
        let node = s
            .numa
            .and_then(|l| l.node_of_cpu(u32::from(id)))
            .map_or(0, |n| n.id);
        cpuid::set_vcpu_topology(&mut entries, u32::from(id), &s.shape, node);
        let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|e| Error::Table {
            what: "CPUID",
            detail: format!("{e:?}"),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        let msrs = Msrs::from_entries(s.boot_msrs).map_err(|e| Error::Table {
            what: "MSR",
            detail: format!("{e:?}"),
        })?;
        fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(kvm("set FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm("get LAPIC"))?;
        regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm("set LAPIC"))?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm("get sregs"))?;
            let sregs = regs::boot_sregs(s.mem, boot.mode, sregs).map_err(Error::BootRegisters)?;
            fd.set_sregs(&sregs).map_err(kvm("set sregs"))?;
            fd.set_regs(&regs::boot_regs(
                boot.mode,
                vm_memory::GuestAddress(boot.entry),
            ))
            .map_err(kvm("set regs"))?;
        }
        Ok(s.host_tsc_khz)
    }

    fn machine(
        &self,
        _: &VmFd,
        _: &Arc<PciRoot>,
        _: &[VirtioFunction],
        _: &crate::passthrough::Passthroughs,
    ) -> Result<(), Error> {
        Ok(())
    }

    fn paused(&self) -> bool {
        false
    }

    fn chain(&self) -> Option<ChainRef> {
        None
    }
}

/// A machine continuing from a saved state.
pub struct FromState<'a>(pub &'a Restoring);

impl Builder for FromState<'_> {
    fn configure(&self, config: &mut RunConfig) {
        let m = &self.0.saved;
        config.kernel = m.kernel.clone();
        config.cmdline = m.cmdline.clone();
        config.test_exit_port = m.test_exit_port;
        // A migrated VM keeps its MAC addresses (its guest has them; this
        // host's VM was built before it knew them). A restore's were
        // settled with its --net already (machine::host_devices).
        if matches!(self.0.origin, Origin::Migration { .. }) {
            for (net, was) in config.nets.iter_mut().zip(&m.nets) {
                net.mac = was.mac;
            }
        }
    }

    fn boot(&self, _: &GuestMemoryMmap, _: &RunConfig) -> Result<BootInfo, Error> {
        Ok(self.0.machine.boot.clone())
    }

    fn serial(&self, args: SerialArgs) -> Result<SerialPort, Error> {
        self.0
            .machine
            .devices
            .restore(SERIAL, args)
            .map_err(Error::DeviceState)
    }

    /// A state from before the CMOS clock existed gets a fresh one.
    fn rtc(&self) -> Result<CmosRtc, Error> {
        let devices = &self.0.machine.devices;
        match devices.get::<CmosRtc>(RTC).map_err(Error::DeviceState)? {
            None => Ok(CmosRtc::new()),
            Some(_) => devices.restore(RTC, ()).map_err(Error::DeviceState),
        }
    }

    fn vcpu(&self, fd: &VcpuFd, id: u8, _: &BootInfo, s: &VcpuSetup) -> Result<u32, Error> {
        self.0
            .restore_vcpu(fd, id, s.host_tsc_khz, s.msr_indices)
            .map_err(Error::VcpuState)
    }

    fn machine(
        &self,
        vm_fd: &VmFd,
        pci: &Arc<PciRoot>,
        virtio: &[VirtioFunction],
        passthrough: &crate::passthrough::Passthroughs,
    ) -> Result<(), Error> {
        crate::arch::state::restore_vm(vm_fd, &self.0.machine.vm)
            .map_err(|e| Error::VmState(e.to_string()))?;
        self.0
            .restore_devices(pci, virtio, passthrough)
            .map_err(|e| Error::Restore(Box::new(e)))
    }

    fn moved(&self) -> bool {
        true
    }

    fn paused(&self) -> bool {
        self.0.paused
    }

    fn chain(&self) -> Option<ChainRef> {
        self.0.chain()
    }
}
