//! The KVM state of vCPUs and of the VM (clock, PIT, PIC/IOAPIC), saved
//! and restored in the order KVM needs. This is the one state path for
//! snapshots and (later) migration.
//!
//! Save order per vCPU: MP state, regs, sregs, XSAVE, XCRs, debug regs,
//! LAPIC, MSRs, vCPU events (events last: reading the others must not
//! change pending exceptions). Restore order: CPUID first (MSR and XSAVE
//! checks depend on it), MP state, regs, sregs, XSAVE, XCRs, debug regs,
//! LAPIC, MSRs with IA32_TSC before IA32_TSC_DEADLINE (the deadline is
//! relative to the TSC), vCPU events last. KVMCLOCK_CTRL is sent when the
//! vCPU resumes (see `vcpu.rs`).
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CAP_EXCEPTION_PAYLOAD, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_PAYLOAD, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Asks KVM to keep a pending exception apart from an injected one, with
/// its payload (a #PF's CR2, a #DB's DR6) not yet delivered, in what
/// KVM_GET/SET_VCPU_EVENTS carry (`KVM_CAP_EXCEPTION_PAYLOAD`). Without it
/// KVM reports a pending exception as injected and delivers its payload
/// early, so a vCPU saved between an exception being queued and being
/// delivered (or with an exception being delivered and another pending)
/// comes back with other state than it had; QEMU enables it for the same
/// reason. Returns whether KVM took it (older kernels: no, and the vCPU
/// events go the old way).
pub fn enable_exception_payload(vm: &VmFd) -> bool {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_EXCEPTION_PAYLOAD,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    match vm.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("KVM_CAP_EXCEPTION_PAYLOAD not available: {e}");
            false
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs per KVM_GET/SET_MSRS call.
const MSR_CHUNK: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: cannot {what}: {source}")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM refused MSR {index:#x} on restore")]
    MsrRefused { vcpu: u8, index: u32 },
    #[error("VM: cannot {what}: {source}")]
    Vm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Table(String),
}

#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The MSRs to save, from KVM_GET_MSR_INDEX_LIST: IA32_TSC first and
/// IA32_TSC_DEADLINE last.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = index_list
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC && i != MSR_IA32_TSC_DEADLINE)
        .collect();
    if index_list.contains(&MSR_IA32_TSC) {
        v.insert(0, MSR_IA32_TSC);
    }
    if index_list.contains(&MSR_IA32_TSC_DEADLINE) {
        v.push(MSR_IA32_TSC_DEADLINE);
    }
    v
}

fn msr_table(entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    Msrs::from_entries(entries).map_err(|e| Error::Table(format!("MSR table: {e:?}")))
}

/// Reads the MSRs in `indices`, skipping the ones this host's KVM will not
/// read (KVM_GET_MSRS stops at the first failure and says where).
fn read_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MSR_CHUNK)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_table(&chunk)?;
        let n = fd.get_msrs(&mut msrs).map_err(|source| Error::Kvm {
            vcpu: id,
            what: "get MSRs",
            source,
        })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n (if any) could not be read: drop it and go on after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        if n < chunk.len() {
            tracing::debug!(
                "vCPU {id}: MSR {:#x} not readable, not saved",
                chunk[n].index
            );
        }
        rest.drain(..consumed);
    }
    Ok(out)
}

pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuSnapshot, Error> {
    let k = |what: &'static str| {
        move |source| Error::Kvm {
            vcpu: id,
            what,
            source,
        }
    };
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(k("get CPUID"))?
        .as_slice()
        .to_vec();
    let mp_state = fd.get_mp_state().map_err(k("get MP state"))?;
    let regs = fd.get_regs().map_err(k("get registers"))?;
    let sregs = fd.get_sregs().map_err(k("get special registers"))?;
    let xsave = fd.get_xsave().map_err(k("get XSAVE state"))?;
    let xcrs = fd.get_xcrs().map_err(k("get XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(k("get debug registers"))?;
    let lapic = fd.get_lapic().map_err(k("get LAPIC"))?;
    let msrs = read_msrs(fd, id, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(k("get vCPU events"))?;
    Ok(VcpuSnapshot {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), Error> {
    let id = s.id;
    let k = |what: &'static str| {
        move |source| Error::Kvm {
            vcpu: id,
            what,
            source,
        }
    };
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| Error::Table(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(k("set CPUID"))?;
    fd.set_mp_state(s.mp_state).map_err(k("set MP state"))?;
    fd.set_regs(&s.regs).map_err(k("set registers"))?;
    fd.set_sregs(&s.sregs).map_err(k("set special registers"))?;
    // SAFETY: the buffer is a kvm_xsave read from KVM (legacy 4 KiB
    // layout, which is what KVM_SET_XSAVE reads).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(k("set XSAVE state"))?;
    fd.set_xcrs(&s.xcrs).map_err(k("set XCRs"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(k("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(k("set LAPIC"))?;
    if s.id == 0 {
        if let Some(tsc) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC) {
            fd.set_msrs(&msr_table(&[tsc_away_from(tsc.data)])?)
                .map_err(k("set the TSC"))?;
        }
    }
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let n = fd.set_msrs(&msr_table(chunk)?).map_err(k("set MSRs"))?;
        if n < chunk.len() {
            return Err(Error::MsrRefused {
                vcpu: id,
                index: chunk[n].index,
            });
        }
    }
    // KVM_GET_VCPU_EVENTS reports a pending NMI and the SIPI vector but
    // does not flag them valid, and KVM_SET_VCPU_EVENTS ignores what is not
    // flagged: without these flags an NMI pending at the save would be lost
    // (a guest waiting on an NMI IPI, such as a backtrace, would wait
    // forever) and an AP waiting for its SIPI would get vector 0.
    let mut events = s.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    if let Err(e) = fd.set_vcpu_events(&events) {
        // Saved with the exception payload (see `enable_exception_payload`)
        // and restored where KVM does not take it: the old form, as KVM
        // itself would have reported it.
        if events.flags & KVM_VCPUEVENT_VALID_PAYLOAD == 0 {
            return Err(k("set vCPU events")(e));
        }
        fd.set_vcpu_events(&without_payload(events))
            .map_err(k("set vCPU events"))?;
    }
    Ok(())
}

/// A TSC write that no earlier one explains, made just before the first
/// vCPU's saved TSC is written: KVM (Linux before 6.7) takes a host write of
/// IA32_TSC that lies within a second of "the last write plus the time
/// since" for an attempt to line vCPUs up, and keeps its own value instead
/// (plus the time since, where it finds the host's TSC unstable). The
/// vCPU's last write was KVM's own 0 at its creation, so a VMM started for
/// an incoming migration about as long before it as the VM had been running
/// gave the guest a TSC that was off: the MPI job test in the lab saw one
/// 68 s ahead. After this write (2^40 cycles, minutes at any clock rate,
/// past the saved value) the saved value is no such match and lands as it
/// is; the other vCPUs' TSCs, written within a second of it, are lined up
/// with it, which is what that rule is for.
fn tsc_away_from(saved: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: saved.wrapping_add(1 << 40),
        ..Default::default()
    }
}

/// `events` in the form KVM uses without the exception payload: a pending
/// exception counts as injected (its payload is dropped: KVM delivered it
/// when it was queued).
fn without_payload(mut events: kvm_vcpu_events) -> kvm_vcpu_events {
    events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
    events.exception.injected |= events.exception.pending;
    events.exception.pending = 0;
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    events
}

/// LAPIC register offsets that move on their own while a vCPU is stopped:
/// the timer's current count.
const LAPIC_TIMER_CCR: usize = 0x390;
/// The processor priority register: KVM computes it again from the TPR
/// and the in-service vectors when the state is set (both compared), and
/// the saved copy can be older than those (seen once in the lab: saved
/// 0xe0, recomputed 0x10, the TPR and ISR the same).
const LAPIC_PPR: usize = 0xa0;
/// MSRs that are clocks, not state: KVM derives them from the time that
/// passes (Hyper-V's VP runtime and reference time counter).
const CLOCK_MSRS: [u32; 2] = [0x4000_0010, 0x4000_0020];
/// IA32_SYSENTER_ESP and _EIP: 32 bits on AMD, where SYSENTER does not
/// exist in long mode, and KVM on SVM keeps only those for a guest whose
/// CPUID says AMD (a Linux guest writes a 64-bit stack address there).
const SYSENTER_ESP_EIP: [u32; 2] = [0x175, 0x176];
/// How far past the saved value a restored TSC may be when it is read back
/// (the restore itself takes time; seconds under nested emulation).
const TSC_SLACK_S: u64 = 30;

/// What KVM holds for a just-restored vCPU (not yet run) compared with the
/// state it was given: one line per difference. KVM accepts some values
/// silently and keeps others (an MSR it ignores, an event it drops), and a
/// guest that continues on different state fails later, far from the
/// cause; this names it at the restore. Clocks are not compared for
/// equality (the LAPIC timer's current count, Hyper-V's time counters);
/// IA32_TSC must read back at or after the saved value, by at most
/// `TSC_SLACK_S` seconds at `tsc_khz`.
pub fn differences(
    fd: &VcpuFd,
    s: &VcpuSnapshot,
    msr_indices: &[u32],
    tsc_khz: u32,
) -> Result<Vec<String>, Error> {
    let now = save_vcpu(fd, s.id, msr_indices)?;
    let amd = s
        .cpuid
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| [e.ebx, e.edx, e.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]);
    // A difference, named with both values.
    fn note(d: &mut Vec<String>, what: &str, same: bool, had: String, got: String) {
        if !same {
            d.push(format!("{what}: given {had}, KVM has {got}"));
        }
    }
    fn same<T: PartialEq + std::fmt::Debug>(d: &mut Vec<String>, what: &str, had: T, got: T) {
        note(
            d,
            what,
            had == got,
            format!("{had:x?}"),
            format!("{got:x?}"),
        );
    }
    let mut d = Vec::new();
    same(
        &mut d,
        "MP state",
        s.mp_state.mp_state,
        now.mp_state.mp_state,
    );
    same(&mut d, "registers", s.regs, now.regs);
    let (a, b) = (&s.sregs, &now.sregs);
    for (name, x, y) in [
        ("CR0", a.cr0, b.cr0),
        ("CR2", a.cr2, b.cr2),
        ("CR3", a.cr3, b.cr3),
        ("CR4", a.cr4, b.cr4),
        ("CR8", a.cr8, b.cr8),
        ("EFER", a.efer, b.efer),
        ("APIC base", a.apic_base, b.apic_base),
    ] {
        same(&mut d, name, x, y);
    }
    for (name, x, y) in [
        ("CS", a.cs, b.cs),
        ("DS", a.ds, b.ds),
        ("ES", a.es, b.es),
        ("FS", a.fs, b.fs),
        ("GS", a.gs, b.gs),
        ("SS", a.ss, b.ss),
        ("TR", a.tr, b.tr),
        ("LDT", a.ldt, b.ldt),
    ] {
        same(&mut d, name, x, y);
    }
    same(
        &mut d,
        "GDT/IDT",
        (a.gdt.base, a.gdt.limit, a.idt.base, a.idt.limit),
        (b.gdt.base, b.gdt.limit, b.idt.base, b.idt.limit),
    );
    same(
        &mut d,
        "pending interrupt bitmap",
        a.interrupt_bitmap,
        b.interrupt_bitmap,
    );
    same(
        &mut d,
        "XCR0",
        &s.xcrs.xcrs[..s.xcrs.nr_xcrs as usize],
        &now.xcrs.xcrs[..now.xcrs.nr_xcrs as usize],
    );
    let (x, y) = (&s.debug_regs, &now.debug_regs);
    same(
        &mut d,
        "debug registers",
        (x.db, x.dr6, x.dr7),
        (y.db, y.dr6, y.dr7),
    );
    let lapic_differs: Vec<String> = s
        .lapic
        .regs
        .chunks_exact(16)
        .zip(now.lapic.regs.chunks_exact(16))
        .enumerate()
        .filter(|&(i, (x, y))| {
            ![LAPIC_TIMER_CCR, LAPIC_PPR].contains(&(i * 16)) && x[..4] != y[..4]
        })
        .map(|(i, (x, y))| format!("{:#x}: {:x?} -> {:x?}", i * 16, &x[..4], &y[..4]))
        .collect();
    note(
        &mut d,
        "LAPIC registers",
        lapic_differs.is_empty(),
        "the saved ones".into(),
        lapic_differs.join(", "),
    );
    for m in &s.msrs {
        if CLOCK_MSRS.contains(&m.index) {
            continue;
        }
        let got = now.msrs.iter().find(|n| n.index == m.index).map(|n| n.data);
        let (what, ok) = if amd && SYSENTER_ESP_EIP.contains(&m.index) {
            (
                format!("MSR {:#x} (low 32 bits, AMD)", m.index),
                got.map(|v| v as u32) == Some(m.data as u32),
            )
        } else if m.index == MSR_IA32_TSC {
            let slack = u64::from(tsc_khz) * 1000 * TSC_SLACK_S;
            let moved_on = got.is_some_and(|t| t >= m.data && t - m.data <= slack);
            ("TSC".to_string(), moved_on)
        } else {
            (format!("MSR {:#x}", m.index), got == Some(m.data))
        };
        note(
            &mut d,
            &what,
            ok,
            format!("{:#x}", m.data),
            got.map_or("nothing (not readable)".into(), |v| format!("{v:#x}")),
        );
    }
    let (e, f) = (&s.events, &now.events);
    same(
        &mut d,
        "pending/injected exception",
        e.exception,
        f.exception,
    );
    same(
        &mut d,
        "injected interrupt",
        (e.interrupt.injected, e.interrupt.nr, e.interrupt.soft),
        (f.interrupt.injected, f.interrupt.nr, f.interrupt.soft),
    );
    same(
        &mut d,
        "interrupt shadow",
        e.interrupt.shadow,
        f.interrupt.shadow,
    );
    same(
        &mut d,
        "NMI",
        (e.nmi.injected, e.nmi.pending, e.nmi.masked),
        (f.nmi.injected, f.nmi.pending, f.nmi.masked),
    );
    same(&mut d, "SIPI vector", e.sipi_vector, f.sipi_vector);
    Ok(d)
}

/// VM-wide KVM state: the clock, the PIT and the three irqchips.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub clock: kvm_clock_data,
    pub pit: kvm_pit_state2,
    pub irqchips: Vec<kvm_irqchip>,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

pub fn save_vm(vm: &VmFd) -> Result<VmSnapshot, Error> {
    let k = |what: &'static str| move |source| Error::Vm { what, source };
    let clock = vm.get_clock().map_err(k("get the KVM clock"))?;
    let pit = vm.get_pit2().map_err(k("get the PIT"))?;
    let mut irqchips = Vec::new();
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(k("get the irqchip"))?;
        irqchips.push(chip);
    }
    Ok(VmSnapshot {
        clock,
        pit,
        irqchips,
    })
}

pub fn restore_vm(vm: &VmFd, s: &VmSnapshot) -> Result<(), Error> {
    let k = |what: &'static str| move |source| Error::Vm { what, source };
    vm.set_pit2(&s.pit).map_err(k("set the PIT"))?;
    // The guest's clock continues from the saved value (no flags: neither
    // realtime nor host TSC adjustments are requested).
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(k("set the KVM clock"))?;
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(k("set the irqchip"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_state_goes_back_the_old_way_where_kvm_lacks_it() {
        let mut e = kvm_vcpu_events {
            flags: KVM_VCPUEVENT_VALID_PAYLOAD,
            ..Default::default()
        };
        e.exception.pending = 1;
        e.exception.nr = 14;
        e.exception_has_payload = 1;
        e.exception_payload = 0x1000;
        let old = without_payload(e);
        assert_eq!(old.flags & KVM_VCPUEVENT_VALID_PAYLOAD, 0);
        assert_eq!((old.exception.injected, old.exception.pending), (1, 0));
        assert_eq!((old.exception_has_payload, old.exception_payload), (0, 0));
    }

    /// On this host's KVM: with the capability, the vCPU events say so
    /// and go back in as they came out.
    #[test]
    fn kvm_keeps_the_exception_payload_when_asked() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().expect("a VM");
        if !enable_exception_payload(&vm) {
            eprintln!("KVM_CAP_EXCEPTION_PAYLOAD not offered: skipped");
            return;
        }
        vm.create_irq_chip().expect("irqchip");
        let vcpu = vm.create_vcpu(0).expect("a vCPU");
        let events = vcpu.get_vcpu_events().expect("events");
        assert_ne!(events.flags & KVM_VCPUEVENT_VALID_PAYLOAD, 0, "{events:?}");
        vcpu.set_vcpu_events(&events).expect("set back");
    }

    #[test]
    fn tsc_is_saved_first_and_the_deadline_last() {
        let v = msrs_to_save(&[0x6e0, 0x174, 0x10, 0xc000_0080]);
        assert_eq!(v, vec![0x10, 0x174, 0xc000_0080, 0x6e0]);
        assert_eq!(msrs_to_save(&[0x174]), vec![0x174]);
    }
}
