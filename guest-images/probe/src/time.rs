//! Time from the TSC: frequency from the hypervisor timing leaf (0x40000010),
//! CPUID 0x15/0x16, or a PIT calibration as the last resort.
use crate::arch::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

pub fn init() -> u64 {
    TSC_BASE.store(rdtsc(), Ordering::Relaxed);
    let khz = from_cpuid().unwrap_or_else(calibrate_pit);
    TSC_KHZ.store(khz.max(1), Ordering::Relaxed);
    khz
}

pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

fn from_cpuid() -> Option<u64> {
    let hypervisor = cpuid(1, 0)[2] & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000, 0)[0] >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0)[0] as u64;
        if khz != 0 {
            return Some(khz);
        }
    }
    let max = cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, hz, _] = cpuid(0x15, 0);
        if den != 0 && num != 0 && hz != 0 {
            return Some(hz as u64 * num as u64 / den as u64 / 1000);
        }
    }
    None
}

/// Counts TSC ticks over ~50 ms of PIT channel 0 (1.193182 MHz).
fn calibrate_pit() -> u64 {
    outb(0x43, 0x34); // channel 0, lo/hi byte, mode 2
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let read = || {
        outb(0x43, 0x00);
        let lo = inb(0x40) as u64;
        let hi = inb(0x40) as u64;
        (hi << 8) | lo
    };
    let mut last = read();
    let t0 = rdtsc();
    let mut ticks = 0u64;
    while ticks < 59_659 {
        let now = read();
        ticks += (last.wrapping_sub(now)) & 0xffff;
        last = now;
    }
    let cycles = rdtsc() - t0;
    cycles * 1_193_182 / ticks / 1000
}

pub fn cycles_to_us(c: u64) -> u64 {
    c * 1000 / tsc_khz()
}

pub fn us_to_cycles(us: u64) -> u64 {
    us * tsc_khz() / 1000
}

pub fn now_us() -> u64 {
    cycles_to_us(rdtsc() - TSC_BASE.load(Ordering::Relaxed))
}

pub fn delay_us(us: u64) {
    let end = rdtsc() + us_to_cycles(us);
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
