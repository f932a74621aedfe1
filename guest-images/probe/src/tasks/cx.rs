//! `task=cx`: drives the ConnectX-shaped vfio-user test device
//! (`ffmk-vfio-user-cx`, 15b3:101c) passed through with `--device
//! vfio-user=SOCKET`: reads its firmware version through BAR 0, points
//! MSI-X vector 0 at this CPU, gives the device a completion queue in
//! guest RAM and rings the doorbell `rings=N` times (default 8); each
//! ring must come back as a completion the device DMA-wrote into the
//! queue and as an interrupt. Prints `cx_*=` lines. `wait=S` scans the bus
//! for up to S seconds for a device plugged in later; `unplug=1` then
//! waits for it to be taken away (`cx_unplug_ready=1`, then `cx_gone=1`).
//! `apic=N` aims the interrupt at APIC ID N instead of this CPU.
use crate::boot::BootInfo;
use crate::pci::scan;
use crate::virtio::Msix;
use crate::{arch, irq, println, time, STATUS_PROBE_ERROR};

const FW: u64 = 0x000;
const DOORBELL: u64 = 0x800;
const CQ_LO: u64 = 0x808;
const CQ_HI: u64 = 0x80c;
const COMPLETIONS: u64 = 0x810;
const CQE_MAGIC: u32 = 0xc0ff_ee01;
const VECTOR: u8 = irq::DEVICE_VECTOR;

fn fail(msg: &str) -> u8 {
    println!("probe: error: cx: {msg}");
    STATUS_PROBE_ERROR
}

fn read_cqe(cq: u64, slot: u64) -> (u32, u32, u64) {
    let at = cq + 16 * (slot % 16);
    // SAFETY: the completion queue is task memory the probe owns; the
    // device writes it by DMA, hence volatile reads.
    unsafe {
        (
            core::ptr::read_volatile(at as *const u32),
            core::ptr::read_volatile((at + 4) as *const u32),
            core::ptr::read_volatile((at + 8) as *const u64),
        )
    }
}

pub fn run(info: &mut BootInfo, args: &crate::boot::Args) -> u8 {
    let rings = args.num("rings", 8).clamp(1, 1000);
    // wait=S: keep scanning the bus for up to S seconds (hot-plug).
    let wait_us = args.num("wait", 0) * 1_000_000;
    let ecam = info.ecam_base();
    let find = || scan(ecam).find(|f| f.ids() == Some((0x15b3, 0x101c)));
    let start = time::now_us();
    let mut found = find();
    while found.is_none() && time::now_us() - start < wait_us {
        time::delay_us(10_000);
        found = find();
    }
    let Some(f) = found else {
        return fail("no ConnectX VF (15b3:101c) on the bus; pass one with --device vfio-user=...");
    };
    if wait_us > 0 {
        println!("cx_found_after_ms={}", (time::now_us() - start) / 1000);
    }
    println!("cx_bdf=00:{:02x}.0 class={:06x}", f.dev, f.read32(8) >> 8);
    let bar = f.bar_address(0);
    f.write32(4, f.read32(4) | 0x6);
    let fw = arch::mmio_read32(bar + FW);
    println!("cx_fw={}.{}.{}", fw >> 16, fw & 0xffff, arch::mmio_read32(bar + 4));
    let Some(msix) = Msix::enable(f) else {
        return fail("no MSI-X capability");
    };
    irq::enable_this_cpu(0);
    // apic=N aims vector 0 at another CPU (a decoupled VM must steer it
    // back to a service vCPU; this CPU is vCPU 0, a service vCPU).
    let target = args.num("apic", u64::from(irq::apic_id())) as u32;
    msix.route(0, target, VECTOR);
    let Some(cq) = info.take(4096) else {
        return fail("no memory for the completion queue");
    };
    for i in 0..4096u64 {
        // SAFETY: task memory the probe owns.
        unsafe { core::ptr::write_volatile((cq + i) as *mut u8, 0) };
    }
    arch::mmio_write32(bar + CQ_LO, cq as u32);
    arch::mmio_write32(bar + CQ_HI, (cq >> 32) as u32);
    let mut ok = 0u64;
    let mut irqs_ok = 0u64;
    let mut lat = [0u64; 64];
    for n in 0..rings {
        let value = 0x1000 + n as u32;
        let before = irq::count(0, VECTOR);
        let t0 = time::now_us();
        arch::mmio_write32(bar + DOORBELL, value);
        let deadline = t0 + 2_000_000;
        let mut seen = false;
        while time::now_us() < deadline {
            let (magic, v, seq) = read_cqe(cq, n);
            if magic == CQE_MAGIC && v == value && seq == n {
                seen = true;
                break;
            }
            core::hint::spin_loop();
        }
        if let Some(l) = lat.get_mut(n as usize) {
            *l = time::now_us() - t0;
        }
        // Taken (counted), or pending in this CPU's local APIC where the
        // host cannot interrupt the guest (PVM: see irq::arrived_here).
        let arrived = || irq::count(0, VECTOR) != before || irq::arrived_here(VECTOR);
        while time::now_us() < deadline && !arrived() {
            core::hint::spin_loop();
        }
        ok += u64::from(seen);
        irqs_ok += u64::from(arrived());
    }
    let n = (rings as usize).min(lat.len());
    lat[..n].sort_unstable();
    println!("cx_completions={ok}/{rings}");
    println!("cx_interrupts={irqs_ok}/{rings}");
    println!("cx_interrupts_taken={}", irq::count(0, VECTOR));
    println!("cx_device_count={}", arch::mmio_read32(bar + COMPLETIONS));
    println!("cx_doorbell_to_completion_us={}", lat[n / 2]);
    irq::disable_this_cpu();
    if ok != rings || irqs_ok != rings {
        return fail("a doorbell did not come back as completion and interrupt");
    }
    // unplug=1: let the host take the device away, and see it go.
    if args.num("unplug", 0) != 0 {
        println!("cx_unplug_ready=1");
        let start = time::now_us();
        while f.ids().is_some() {
            if time::now_us() - start > 60_000_000 {
                return fail("the device was not unplugged within 60 s");
            }
            time::delay_us(10_000);
        }
        println!("cx_gone=1 bar_reads={:#x}", arch::mmio_read32(bar + FW));
    }
    0
}
