//! `task=topo`: the CPU topology and NUMA layout the guest is shown. Every
//! CPU reads its own CPUID (leaf 1's APIC ID, leaf 0xB's levels, the L3
//! descriptor of leaf 4 or 0x8000001D, AMD's 0x8000001E) and CPU 0 prints
//! one `topo cpu=...` line per CPU, then what SRAT and SLIT say
//! (`srat cpu=`, `srat mem=`, `slit`).
use crate::boot::{read, BootInfo};
use crate::{arch, println, smp};
use core::sync::atomic::{AtomicU32, Ordering};

/// Per CPU: APIC ID (leaf 1), x2APIC ID (0xB), SMT shift, core shift,
/// logical CPUs at the core level, L3 sharing, 0x8000001E node.
const FIELDS: usize = 7;
static SEEN: [AtomicU32; smp::MAX_CPUS * FIELDS] =
    [const { AtomicU32::new(u32::MAX) }; smp::MAX_CPUS * FIELDS];

/// Logical CPUs sharing the level-3 cache, from a cache leaf (4 or
/// 0x8000001D) that has one.
fn l3_sharing(leaf: u32) -> Option<u32> {
    (0..8).map(|i| arch::cpuid(leaf, i)[0]).find_map(|eax| {
        (eax & 0x1f != 0 && (eax >> 5) & 7 == 3).then_some(((eax >> 14) & 0xfff) + 1)
    })
}

fn look(idx: usize, _n: usize, _arg: u64) {
    let max_ext = arch::cpuid(0x8000_0000, 0)[0];
    let smt = arch::cpuid(0xb, 0);
    let core = arch::cpuid(0xb, 1);
    let l3 = l3_sharing(4)
        .or_else(|| (max_ext >= 0x8000_001d).then(|| l3_sharing(0x8000_001d)).flatten())
        .unwrap_or(0);
    let node = if max_ext >= 0x8000_001e {
        arch::cpuid(0x8000_001e, 0)[2] & 0xff
    } else {
        u32::MAX
    };
    let values = [
        arch::cpuid(1, 0)[1] >> 24,
        smt[3],
        smt[0] & 0x1f,
        core[0] & 0x1f,
        core[1] & 0xffff,
        l3,
        node,
    ];
    for (i, v) in values.into_iter().enumerate() {
        SEEN[idx * FIELDS + i].store(v, Ordering::Release);
    }
}

pub fn run(info: &BootInfo, ncpus: usize) -> u8 {
    smp::run_on_all(look, 0);
    let max_ext = arch::cpuid(0x8000_0000, 0)[0];
    println!(
        "topo max_ext={max_ext:#x} topoext={} amd_l3_sharing={}",
        (arch::cpuid(0x8000_0001, 0)[2] >> 22) & 1,
        if max_ext >= 0x8000_001d { l3_sharing(0x8000_001d).unwrap_or(0) } else { 0 }
    );
    for cpu in 0..ncpus.min(smp::MAX_CPUS) {
        let v = |i: usize| SEEN[cpu * FIELDS + i].load(Ordering::Acquire);
        println!(
            "topo cpu={cpu} apic={} x2apic={} smt_shift={} core_shift={} core_level_cpus={} l3_sharing={} ext_node={}",
            v(0),
            v(1),
            v(2),
            v(3),
            v(4),
            v(5),
            v(6) as i32
        );
    }
    match info.acpi_table(b"SRAT") {
        None => println!("srat=none"),
        Some(t) => {
            let len: u32 = read(t + 4);
            let mut p = t + 48;
            while p + 2 <= t + u64::from(len) {
                let (kind, elen): (u8, u8) = (read(p), read(p + 1));
                if elen < 2 {
                    break;
                }
                match kind {
                    0 => {
                        let d = u32::from(read::<u8>(p + 2))
                            | (u32::from(read::<u8>(p + 9)) << 8)
                            | (u32::from(read::<u8>(p + 10)) << 16)
                            | (u32::from(read::<u8>(p + 11)) << 24);
                        println!("srat cpu apic={} node={d}", read::<u8>(p + 3));
                    }
                    1 => println!(
                        "srat mem base={:#x} len={:#x} node={}",
                        read::<u64>(p + 8),
                        read::<u64>(p + 16),
                        read::<u32>(p + 2)
                    ),
                    _ => {}
                }
                p += u64::from(elen);
            }
        }
    }
    match info.acpi_table(b"SLIT") {
        None => println!("slit=none"),
        Some(t) => {
            let n: u64 = read(t + 36);
            for i in 0..n.min(16) {
                let mut row = [0u8; 16];
                for (j, r) in row.iter_mut().enumerate().take(n.min(16) as usize) {
                    *r = read(t + 44 + i * n + j as u64);
                }
                println!("slit row={i} {:?}", &row[..n.min(16) as usize]);
            }
        }
    }
    0
}
