//! The probe's workloads, selected with `task=NAME` on the command line.
use crate::boot::BootInfo;
use crate::{arch, println, time, STATUS_PROBE_ERROR};

mod blk;
mod counter;
mod cx;
mod edu;
mod fwq;
mod irqroute;
mod memtouch;
mod net;
mod pci;
mod rng;
mod topo;
mod vcon;
mod vsock;

pub fn run(info: &mut BootInfo, args: &crate::boot::Args, ncpus: usize) -> u8 {
    let task = args.get("task").unwrap_or("hello");
    match task {
        "hello" => hello(info, ncpus),
        "memtouch" => memtouch::run(info, args, ncpus),
        "counter" => counter::counter(args),
        "dirty" => counter::dirty(info, args),
        "fwq" => fwq::run(info, args, ncpus),
        "irqroute" => irqroute::run(info, ncpus),
        "pci" => pci::run(info),
        "edu" => edu::run(info, args),
        "cx" => cx::run(info, args),
        "blk" => blk::run(info, args),
        "net" => net::run(info, args),
        "rng" => rng::run(info),
        "topo" => topo::run(info, ncpus),
        "vcon" => vcon::run(info, args),
        "vsock" => vsock::run(info, args),
        "exit" => args.num("status", 0) as u8,
        "fault" => {
            // SAFETY: deliberately raises #UD to exercise the exception path.
            unsafe { core::arch::asm!("ud2") };
            STATUS_PROBE_ERROR
        }
        "triplefault" => arch::triple_fault(),
        "reset" => {
            arch::outb(0x64, 0xfe);
            arch::park()
        }
        other => {
            println!("probe: error: unknown task '{other}' (hello, memtouch, counter, dirty, fwq, irqroute, pci, edu, cx, blk, net, rng, topo, vcon, vsock, exit, fault, triplefault, reset)");
            STATUS_PROBE_ERROR
        }
    }
}

fn hello(info: &BootInfo, ncpus: usize) -> u8 {
    println!("hello=ffmk-probe");
    println!("cpus={ncpus}");
    println!("mem_mib={}", info.mem_bytes >> 20);
    println!("tsc_khz={}", time::tsc_khz());
    // What CPUID shows the guest (ring 3): the VMM's CPU profile decides.
    let ecx1 = arch::cpuid(1, 0)[2];
    println!("cpu_cx16={}", (ecx1 >> 13) & 1);
    println!("cpu_xsave={}", (ecx1 >> 26) & 1);
    println!("cpu_xsave_leaf_eax={:#x}", arch::cpuid(0xd, 0)[0]);
    println!("cmdline={}", info.cmdline);
    0
}

/// Deterministic 64-bit mix (splitmix64 finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Carves a task buffer or ends the probe with a clear message.
pub fn buffer(info: &mut BootInfo, what: &str, bytes: u64) -> u64 {
    match info.take(bytes) {
        Some(a) => a,
        None => {
            println!(
                "probe: error: {what} needs {} MiB but only {} MiB of guest RAM is free",
                bytes >> 20,
                info.free_bytes() >> 20
            );
            arch::exit(STATUS_PROBE_ERROR)
        }
    }
}
