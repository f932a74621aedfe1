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
use numa::CpuShape;

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

/// CPUID leaves 0xB/0x1F and 0x8000_001D are read per subleaf.
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Whether the CPUID table is an AMD (or Hygon) one: leaf 0's vendor.
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().find(|e| e.function == 0).is_some_and(|e| {
        matches!(
            (e.ebx, e.edx, e.ecx),
            (0x6874_7541, 0x6974_6e65, 0x444d_4163) | (0x6f67_7948, 0x6e65_476e, 0x656e_6975)
        )
    })
}

/// Sets EAX[25:14] of a cache descriptor (leaf 4 or 0x8000_001D): how many
/// logical processors share the cache - 1. L1 and L2 belong to a core
/// (its threads), L3 to a socket, so the guest's cache domains are the
/// topology's and match where its vCPUs are pinned (one socket per node
/// and host node, by default).
fn set_cache_sharing(e: &mut kvm_cpuid_entry2, shape: &CpuShape) {
    if e.eax & 0x1f == 0 {
        return; // no cache at this subleaf
    }
    let level = (e.eax >> 5) & 7;
    let sharing = if level <= 2 {
        1u32 << shape.thread_bits()
    } else {
        1u32 << shape.socket_shift()
    };
    e.eax = (e.eax & !(0xfff << 14)) | (((sharing - 1) & 0xfff) << 14);
}

/// CPUID 0x8000_0001 ECX bit 22: the topology extensions (leaves
/// 0x8000_001D and 0x8000_001E) exist.
const TOPOEXT: u32 = 1 << 22;

/// An AMD table without the topology extensions (KVM under an emulator
/// that lacks them, as TCG: the lab's L1) gets them: without them Linux
/// on AMD finds no SMT siblings and no shared caches whatever leaf 0xB
/// says. The cache descriptors of 0x8000_001D are made from the sizes
/// 0x8000_0005/6 give (L1d, L1i, L2, L3); [`set_vcpu_topology`] fills in
/// the sharing and 0x8000_001E.
fn add_amd_topology_leaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    let has = |entries: &[kvm_cpuid_entry2], f: u32| entries.iter().any(|e| e.function == f);
    let topoext = entries
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.ecx & TOPOEXT != 0);
    if topoext && has(entries, 0x8000_001e) {
        return;
    }
    let reg = |f: u32, r: fn(&kvm_cpuid_entry2) -> u32| {
        entries.iter().find(|e| e.function == f).map_or(0, r)
    };
    let (l1d, l1i) = (reg(0x8000_0005, |e| e.ecx), reg(0x8000_0005, |e| e.edx));
    let (l2, l3) = (reg(0x8000_0006, |e| e.ecx), reg(0x8000_0006, |e| e.edx));
    // Ways from the L2/L3 associativity code (AMD's table; 0xF: fully).
    let ways = |code: u32| match code {
        1 | 2 | 4 => code,
        5 => 6,
        6 => 8,
        8 => 16,
        0xa => 32,
        0xb => 48,
        0xc => 64,
        0xd => 96,
        0xe => 128,
        _ => 0,
    };
    // (type, level, size in bytes, ways (0: fully associative), line)
    let caches = [
        (
            1,
            1,
            u64::from(l1d >> 24) << 10,
            (l1d >> 16) & 0xff,
            l1d & 0xff,
        ),
        (
            2,
            1,
            u64::from(l1i >> 24) << 10,
            (l1i >> 16) & 0xff,
            l1i & 0xff,
        ),
        (
            3,
            2,
            u64::from(l2 >> 16) << 10,
            ways((l2 >> 12) & 0xf),
            l2 & 0xff,
        ),
        (
            3,
            3,
            u64::from(l3 >> 18) << 19,
            ways((l3 >> 12) & 0xf),
            l3 & 0xff,
        ),
    ];
    entries.retain(|e| e.function != 0x8000_001d && e.function != 0x8000_001e);
    let mut index = 0;
    for (kind, level, size, w, line) in caches {
        if size == 0 || line == 0 {
            continue;
        }
        let full = w == 0 || w == 0xff;
        let w = if full {
            (size / u64::from(line)) as u32
        } else {
            w
        };
        let sets = (size / (u64::from(line) * u64::from(w.max(1)))).max(1) as u32;
        entries.push(kvm_cpuid_entry2 {
            function: 0x8000_001d,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: kind | (level << 5) | (1 << 8) | (u32::from(full) << 9),
            ebx: (line - 1) | ((w - 1) << 22),
            ecx: sets - 1,
            edx: 0,
            ..Default::default()
        });
        index += 1;
    }
    // The end of the list: a descriptor of type 0.
    entries.push(kvm_cpuid_entry2 {
        function: 0x8000_001d,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    });
    entries.push(kvm_cpuid_entry2 {
        function: 0x8000_001e,
        ..Default::default()
    });
    for e in entries.iter_mut() {
        match e.function {
            0x8000_0000 => e.eax = e.eax.max(0x8000_001e),
            0x8000_0001 => e.ecx |= TOPOEXT,
            _ => {}
        }
    }
}

/// Per-vCPU leaves for vCPU `vcpu` of a VM shaped `shape` in guest node
/// `node`: its APIC ID (leaf 1, the x2APIC ID of 0xB/0x1F, AMD's
/// 0x8000_001E), the SMT and core levels of 0xB/0x1F, the cache sharing
/// of leaves 4 and 0x8000_001D, and AMD's core count in 0x8000_0008.
pub fn set_vcpu_topology(
    entries: &mut Vec<kvm_cpuid_entry2>,
    vcpu: u32,
    shape: &CpuShape,
    node: u32,
) {
    let apic = shape.apic_id(vcpu);
    let per_socket = shape.threads * shape.cores;
    let core_bits = shape.socket_shift() - shape.thread_bits();
    let amd = is_amd(entries);
    if amd {
        add_amd_topology_leaves(entries);
    }
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC ID, and the IDs a package spans.
                let span = (1u32 << shape.socket_shift()).min(255);
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (span << 16);
                e.edx |= 1 << 28; // HTT: the count in EBX is valid
            }
            4 => {
                set_cache_sharing(e, shape);
                // Core IDs a package spans - 1, in EAX[31:26].
                e.eax = (e.eax & 0x03ff_ffff) | ((((1u32 << core_bits) - 1) & 0x3f) << 26);
            }
            0x8000_001d => set_cache_sharing(e, shape),
            0x8000_001e => {
                e.eax = apic;
                e.ebx = ((shape.threads - 1) << 8) | ((apic >> shape.thread_bits()) & 0xff);
                // One node per socket (a node holds whole sockets).
                e.ecx = node & 0xff;
                e.edx = 0;
            }
            0x8000_0008 if amd => {
                // NC: threads per package - 1; ApicIdCoreIdSize: its ID bits.
                e.ecx =
                    (e.ecx & !0xf0ff) | ((per_socket - 1) & 0xff) | (shape.socket_shift() << 12);
            }
            _ => {}
        }
    }
    // The extended topology leaves, rebuilt: SMT, core, end.
    for leaf in [0xb, 0x1f] {
        let Some(flags) = entries.iter().find(|e| e.function == leaf).map(|e| e.flags) else {
            continue;
        };
        entries.retain(|e| e.function != leaf);
        let level = |index: u32, eax: u32, ebx: u32, kind: u32| kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (kind << 8) | index,
            edx: apic,
            ..Default::default()
        };
        entries.push(level(0, shape.thread_bits(), shape.threads, 1));
        entries.push(level(1, shape.socket_shift(), per_socket, 2));
        entries.push(level(2, 0, 0, 0));
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
    fn an_amd_table_without_topology_extensions_gets_them() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                function: 0,
                ebx: 0x6874_7541,
                edx: 0x6974_6e65,
                ecx: 0x444d_4163,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0000,
                eax: 0x8000_0008,
                ..Default::default()
            },
            entry(0x8000_0001, 0, 0, 0),
            // L1d/L1i 32 KiB 8-way 64 B; L2 512 KiB 8-way; L3 16 MiB 16-way.
            kvm_cpuid_entry2 {
                function: 0x8000_0005,
                ecx: (32 << 24) | (8 << 16) | 64,
                edx: (32 << 24) | (8 << 16) | 64,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0006,
                ecx: (512 << 16) | (6 << 12) | 64,
                edx: (32 << 18) | (8 << 12) | 64,
                ..Default::default()
            },
        ];
        let shape: CpuShape = "sockets=1,cores=2,threads=2".parse().unwrap();
        set_vcpu_topology(&mut e, 1, &shape, 0);
        let find = |f: u32, i: u32| *e.iter().find(|x| x.function == f && x.index == i).unwrap();
        assert_ne!(find(0x8000_0001, 0).ecx & TOPOEXT, 0);
        assert_eq!(find(0x8000_0000, 0).eax, 0x8000_001e);
        let l3 = find(0x8000_001d, 3);
        assert_eq!((l3.eax & 0x1f, (l3.eax >> 5) & 7), (3, 3));
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3: the socket's 4 threads");
        assert_eq!(l3.ebx >> 22, 15, "16 ways");
        assert_eq!(l3.ecx + 1, (16 << 20) / (16 * 64), "sets");
        assert_eq!(
            (find(0x8000_001d, 0).eax >> 14) & 0xfff,
            1,
            "L1d: the core's 2 threads"
        );
        assert_eq!(find(0x8000_001d, 4).eax & 0x1f, 0, "end of the list");
        let ext = find(0x8000_001e, 0);
        assert_eq!((ext.eax, (ext.ebx >> 8) & 0xff, ext.ebx & 0xff), (1, 1, 0));
    }

    #[test]
    fn topology_sets_apic_ids_levels_and_cache_sharing() {
        let amd = kvm_cpuid_entry2 {
            function: 0,
            ebx: 0x6874_7541,
            edx: 0x6974_6e65,
            ecx: 0x444d_4163,
            ..Default::default()
        };
        let cache = |function, index, level: u32| kvm_cpuid_entry2 {
            function,
            index,
            eax: (level << 5) | 1,
            ..Default::default()
        };
        let mut e = vec![
            amd,
            entry(0x8000_0001, 0, TOPOEXT, 0),
            entry(1, 0, 0, 0x0000_0800),
            entry(0xb, 0, 0, 0),
            cache(4, 0, 1),
            cache(4, 3, 3),
            cache(0x8000_001d, 3, 3),
            entry(0x8000_001e, 0, 0, 0),
            entry(0x8000_0008, 0, 0x0001_0000, 0),
        ];
        let shape: CpuShape = "sockets=2,cores=3,threads=2".parse().unwrap();
        set_vcpu_topology(&mut e, 7, &shape, 1);
        let find = |f: u32, i: u32| *e.iter().find(|x| x.function == f && x.index == i).unwrap();
        let apic = 9; // socket 1 (bit 3), core 0, thread 1
        assert_eq!(find(1, 0).ebx >> 24, apic);
        assert_eq!((find(1, 0).ebx >> 16) & 0xff, 8, "IDs per package");
        assert_eq!(find(1, 0).ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        let (smt, core) = (find(0xb, 0), find(0xb, 1));
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, apic));
        assert_eq!(
            (core.eax, core.ebx, core.ecx, core.edx),
            (3, 6, 0x201, apic)
        );
        assert_eq!(find(0xb, 2).ecx, 2, "end of levels");
        assert_eq!(
            (find(4, 0).eax >> 14) & 0xfff,
            1,
            "L1: the core's 2 threads"
        );
        assert_eq!((find(4, 3).eax >> 14) & 0xfff, 7, "L3: the socket's 8 IDs");
        assert_eq!(find(4, 3).eax >> 26, 3, "4 core IDs per package");
        assert_eq!((find(0x8000_001d, 3).eax >> 14) & 0xfff, 7);
        let ext = find(0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (apic, 0x100 | 4, 1));
        assert_eq!(
            find(0x8000_0008, 0).ecx,
            0x0001_3005,
            "NC 5, ID size 3, rest kept"
        );
        // A flat VM: APIC IDs are vCPU numbers.
        let mut flat = vec![entry(1, 0, 0, 0), entry(0xb, 0, 0, 0)];
        set_vcpu_topology(&mut flat, 3, &CpuShape::flat(4), 0);
        assert_eq!(flat[0].ebx >> 24, 3);
        assert_eq!(
            flat.iter()
                .find(|x| x.function == 0xb && x.index == 1)
                .unwrap()
                .eax,
            2
        );
    }
}
