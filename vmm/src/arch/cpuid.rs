//! CPUID policy: start from `KVM_GET_SUPPORTED_CPUID`, hide what the host
//! profile cannot run, then give each vCPU its topology and APIC ID.

/// What the guest's CPUID shows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum CpuProfile {
    /// Hide what the PVM emulator cannot run.
    Pvm,
    /// Expose everything KVM supports.
    Host,
}
use kvm_bindings::kvm_cpuid_entry2;

/// Features hidden on PVM hosts, as (leaf, subleaf, register, bit, name).
/// XSAVE goes, so does every feature whose state XSAVE manages.
pub const PVM_HIDDEN: &[(u32, u32, Reg, u32, &str)] = &[
    (1, 0, Reg::Ecx, 13, "cx16"),
    (1, 0, Reg::Ecx, 26, "xsave"),
    (1, 0, Reg::Ecx, 27, "osxsave"),
    (1, 0, Reg::Ecx, 28, "avx"),
    (1, 0, Reg::Ecx, 12, "fma"),
    (1, 0, Reg::Ecx, 29, "f16c"),
    (7, 0, Reg::Ebx, 5, "avx2"),
    (7, 0, Reg::Ebx, 14, "mpx"),
    (7, 0, Reg::Ebx, 16, "avx512f"),
    (7, 0, Reg::Ebx, 20, "smap"),
    (7, 0, Reg::Ebx, 17, "avx512dq"),
    (7, 0, Reg::Ebx, 21, "avx512ifma"),
    (7, 0, Reg::Ebx, 26, "avx512pf"),
    (7, 0, Reg::Ebx, 27, "avx512er"),
    (7, 0, Reg::Ebx, 28, "avx512cd"),
    (7, 0, Reg::Ebx, 30, "avx512bw"),
    (7, 0, Reg::Ebx, 31, "avx512vl"),
    (7, 0, Reg::Ecx, 1, "avx512vbmi"),
    (7, 0, Reg::Ecx, 3, "pku"),
    (7, 0, Reg::Ecx, 4, "ospke"),
    (7, 0, Reg::Ecx, 6, "avx512vbmi2"),
    (7, 0, Reg::Ecx, 11, "avx512vnni"),
    (7, 0, Reg::Ecx, 12, "avx512bitalg"),
    (7, 0, Reg::Ecx, 14, "avx512vpopcntdq"),
    (7, 0, Reg::Edx, 29, "arch_capabilities"),
    (7, 1, Reg::Eax, 4, "avxvnni"),
    (7, 1, Reg::Eax, 5, "avx512bf16"),
];

/// Leaf 0xD (XSAVE state enumeration) is dropped with XSAVE.
const XSAVE_LEAF: u32 = 0xd;
const HYPERVISOR_BASE: u32 = 0x4000_0000;
/// Timing leaf: EAX = TSC frequency in kHz (read by the probe guest).
pub const TSC_FREQ_LEAF: u32 = 0x4000_0010;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

fn reg(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Names of the features `profile` hides.
pub fn hidden_features(profile: CpuProfile) -> Vec<&'static str> {
    match profile {
        CpuProfile::Pvm => PVM_HIDDEN.iter().map(|h| h.4).collect(),
        CpuProfile::Host => vec![],
    }
}

/// The features `profile` hides that are still set in `entries` (a vCPU's
/// table read back from KVM).
pub fn still_visible(entries: &[kvm_cpuid_entry2], profile: CpuProfile) -> Vec<&'static str> {
    if profile != CpuProfile::Pvm {
        return vec![];
    }
    PVM_HIDDEN
        .iter()
        .filter(|&&(leaf, sub, r, bit, _)| {
            entries
                .iter()
                .filter(|e| e.function == leaf && e.index == sub)
                .any(|e| {
                    let mut e = *e;
                    *reg(&mut e, r) & (1 << bit) != 0
                })
        })
        .map(|h| h.4)
        .collect()
}

/// CPUID.1:ECX bit 31: "running under a hypervisor". KVM's supported table
/// leaves it clear; without it a guest never looks at the hypervisor leaves,
/// so Linux finds no KVM signature, no kvm-clock and no PV features ("Booting
/// paravirtualized kernel on bare hardware"), and has to calibrate its TSC
/// against the PIT, which fails under nested virtualization.
const HYPERVISOR_BIT: u32 = 1 << 31;

/// Applies the host profile and the VM-wide leaves (hypervisor bit, TSC
/// frequency).
pub fn filter(entries: &mut Vec<kvm_cpuid_entry2>, profile: CpuProfile, tsc_khz: u32) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= HYPERVISOR_BIT;
    }
    if profile == CpuProfile::Pvm {
        for &(leaf, sub, r, bit, _) in PVM_HIDDEN {
            for e in entries
                .iter_mut()
                .filter(|e| e.function == leaf && e.index == sub)
            {
                *reg(e, r) &= !(1 << bit);
            }
        }
        entries.retain(|e| e.function != XSAVE_LEAF);
    }
    // Advertise the timing leaf through the hypervisor range.
    if let Some(base) = entries.iter_mut().find(|e| e.function == HYPERVISOR_BASE) {
        base.eax = base.eax.max(TSC_FREQ_LEAF);
    }
    if tsc_khz != 0 {
        entries.retain(|e| e.function != TSC_FREQ_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: TSC_FREQ_LEAF,
            eax: tsc_khz,
            ..Default::default()
        });
    }
}

/// Per-vCPU leaves: APIC IDs and a flat topology of `nvcpus` single-thread cores.
pub fn set_vcpu_topology(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, nvcpus: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(nvcpus) << 16);
                e.edx |= 1 << 28; // HTT: the logical-processor count in EBX is valid
            }
            4 => {
                // cores per package - 1 in EAX[31:26]; one thread per cache
                e.eax = (e.eax & 0x03ff_c3ff) | ((u32::from(nvcpus) - 1) << 26);
            }
            0xb | 0x1f => {
                // level 0: SMT (1 thread), level 1: core (nvcpus)
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = 32 - (u32::from(nvcpus).max(1) - 1).leading_zeros();
                        e.ebx = u32::from(nvcpus);
                        e.ecx = 0x201;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = u32::from(vcpu_id);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(
                1,
                0,
                (1 << 13) | (1 << 26) | (1 << 28) | (1 << 0),
                0x0010_0800,
            ),
            entry(7, 0, 0, (1 << 5) | (1 << 16) | (1 << 3)),
            entry(0xd, 0, 0x340, 0),
            entry(0xd, 1, 0, 0),
            kvm_cpuid_entry2 {
                function: HYPERVISOR_BASE,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn pvm_profile_hides_cx16_xsave_and_avx_but_keeps_the_rest() {
        let mut e = sample();
        filter(&mut e, CpuProfile::Pvm, 2_500_000);
        let l1 = e.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & (1 << 13), 0, "cx16 hidden");
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave hidden");
        assert_eq!(l1.ecx & (1 << 28), 0, "avx hidden");
        assert_eq!(l1.ecx & 1, 1, "sse3 kept");
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0, "hypervisor bit set");
        let l7 = e.iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.ebx, 1 << 3, "avx2/avx512f hidden, bmi1 kept");
        assert!(!e.iter().any(|e| e.function == 0xd), "xsave leaf dropped");
        assert_eq!(
            e.iter().find(|e| e.function == TSC_FREQ_LEAF).unwrap().eax,
            2_500_000
        );
        assert_eq!(
            e.iter()
                .find(|e| e.function == HYPERVISOR_BASE)
                .unwrap()
                .eax,
            TSC_FREQ_LEAF
        );
    }

    #[test]
    fn reports_hidden_features_that_kvm_set_again() {
        let mut e = sample();
        filter(&mut e, CpuProfile::Pvm, 0);
        assert!(still_visible(&e, CpuProfile::Pvm).is_empty());
        e[0].ecx |= 1 << 26;
        assert_eq!(still_visible(&e, CpuProfile::Pvm), vec!["xsave"]);
        assert!(still_visible(&e, CpuProfile::Host).is_empty());
    }

    #[test]
    fn host_profile_exposes_everything() {
        let mut e = sample();
        filter(&mut e, CpuProfile::Host, 0);
        assert_eq!(
            e.iter().find(|e| e.function == 1).unwrap().ecx,
            sample()[0].ecx | HYPERVISOR_BIT,
            "only the hypervisor bit added"
        );
        assert_eq!(e.iter().filter(|e| e.function == 0xd).count(), 2);
        assert!(
            !e.iter().any(|e| e.function == TSC_FREQ_LEAF),
            "no frequency, no leaf"
        );
        assert!(hidden_features(CpuProfile::Host).is_empty());
        assert!(hidden_features(CpuProfile::Pvm).contains(&"cx16"));
    }

    #[test]
    fn topology_sets_apic_ids() {
        let mut e = vec![
            entry(1, 0, 0, 0x0000_0800),
            entry(0xb, 0, 0, 0),
            entry(0xb, 1, 0, 0),
        ];
        set_vcpu_topology(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2, "4 cores need 2 APIC-ID bits");
    }
}
