//! `task=irqroute`: where device interrupts land. For every CPU t, points
//! virtio-rng's MSI-X entry at APIC ID t with its own vector (0x60 + t),
//! makes the device raise it, and asks every CPU whether that vector
//! reached its local APIC (taken and counted, or pending in the IRR where
//! the host cannot deliver it). Prints `irqroute target=T vector=V
//! arrived=LIST`; in a VM with compute vCPUs, ffmk-vmm must steer every
//! target to a service vCPU.
use crate::boot::BootInfo;
use crate::virtio::{self, Device, Msix, Queue};
use crate::{irq, println, smp, time, STATUS_PROBE_ERROR};
use core::sync::atomic::{AtomicU64, Ordering};

const FIRST_VECTOR: u8 = 0x60;
/// Bit n: CPU with APIC ID n saw the vector under test.
static ARRIVED: AtomicU64 = AtomicU64::new(0);

fn enable(idx: usize, _n: usize, _arg: u64) {
    irq::enable_this_cpu(idx);
}

fn check(idx: usize, _n: usize, vector: u64) {
    let v = vector as u8;
    if irq::count(idx, v) > 0 || irq::arrived_here(v) {
        ARRIVED.fetch_or(1 << (irq::apic_id() & 63), Ordering::AcqRel);
    }
}

fn fail(msg: &str) -> u8 {
    println!("probe: error: irqroute: {msg}");
    STATUS_PROBE_ERROR
}

pub fn run(info: &mut BootInfo, ncpus: usize) -> u8 {
    let Some(f) = virtio::find(info.ecam_base(), 4, 0) else {
        return fail("needs a virtio-rng device (--rng)");
    };
    let Ok(dev) = Device::open(f, 0) else {
        return fail("virtio-rng did not accept the driver");
    };
    let Some(msix) = Msix::enable(f) else {
        return fail("virtio-rng has no MSI-X");
    };
    let Some(mem) = info.take(Queue::bytes(16) + 0x1000) else {
        return fail("no memory for the queue");
    };
    let Ok(mut q) = dev.setup_queue_msix(0, 16, mem, 0) else {
        return fail("queue setup failed");
    };
    dev.driver_ok();
    smp::run_on_all(enable, 0);
    let buf = mem + Queue::bytes(16);
    let targets = ncpus.min(usize::from(0xff - FIRST_VECTOR));
    for t in 0..targets {
        let apic = irq::apic_of(t);
        let vector = FIRST_VECTOR + t as u8;
        msix.route(0, apic, vector);
        if q.submit(&[(buf, 16, true)], 1_000_000).is_none() {
            return fail("virtio-rng did not answer");
        }
        ARRIVED.store(0, Ordering::Release);
        // The interrupt follows the used buffer; give it time to land.
        let deadline = time::now_us() + 200_000;
        while time::now_us() < deadline && ARRIVED.load(Ordering::Acquire) == 0 {
            smp::run_on_all(check, u64::from(vector));
        }
        let arrived = ARRIVED.load(Ordering::Acquire);
        crate::print!("irqroute target={apic} vector={vector:#x} arrived=");
        let mut first = true;
        for c in 0..64 {
            if arrived & (1 << c) != 0 {
                crate::print!("{}{c}", if first { "" } else { "," });
                first = false;
            }
        }
        println!("{}", if first { "none" } else { "" });
    }
    smp::run_on_all(|_, _, _| irq::disable_this_cpu(), 0);
    0
}
