//! Interrupts: the local APIC of each CPU, its timer, and the counters that
//! `irq_common` (entry.S) keeps per (CPU index, vector).
use crate::arch::{read32_ring0, set_interrupts, write32_ring0};
use core::sync::atomic::{AtomicU32, Ordering};

/// The local APIC's registers (xAPIC MMIO; each CPU sees its own).
pub const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const SVR: u64 = 0xf0;
const TPR: u64 = 0x80;
const LVT_TIMER: u64 = 0x320;
const TIMER_INIT: u64 = 0x380;
const TIMER_DIV: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// KVM's local APIC timer counts at 1 GHz (one tick per ns).
const APIC_TIMER_HZ: u64 = 1_000_000_000;

/// The vector of the periodic timer tick and of noise timers.
pub const TIMER_VECTOR: u8 = 0x40;
/// The vector device MSIs are programmed with.
pub const DEVICE_VECTOR: u8 = 0x50;

extern "C" {
    static irq_counts: [u32; crate::smp::MAX_CPUS * 256];
}

/// APIC ID of each CPU index (filled by [`enable_this_cpu`]).
static APIC_IDS: [AtomicU32; crate::smp::MAX_CPUS] =
    [const { AtomicU32::new(u32::MAX) }; crate::smp::MAX_CPUS];

/// This CPU's APIC ID, from the local APIC's ID register (bits 31:24; KVM
/// emulates the LAPIC, ffmk-vmm makes the ID the vCPU id). Not from
/// CPUID.1:EBX: on a PVM host whose CPU has no CPUID faulting (AMD hosts
/// here), CPUID in guest ring 3 runs natively and returns the APIC ID of
/// whichever host core the vCPU thread is on.
pub fn apic_id() -> u32 {
    crate::arch::read32_ring0(LAPIC + LAPIC_ID) >> 24
}

/// Software-enables this CPU's local APIC, accepts every priority and
/// lets ring 3 be interrupted.
pub fn enable_this_cpu(idx: usize) {
    if idx == 0 {
        // Firmware (SeaBIOS under QEMU) leaves the 8259 PICs programmed
        // with the timer unmasked at vector 8; the probe uses the local
        // APIC only, so mask both (ffmk-vmm's are masked already).
        crate::arch::outb(0x21, 0xff);
        crate::arch::outb(0xa1, 0xff);
    }
    APIC_IDS[idx].store(apic_id(), Ordering::Release);
    write32_ring0(LAPIC + SVR, 0x1ff);
    write32_ring0(LAPIC + TPR, 0);
    set_interrupts(true);
}

pub fn disable_this_cpu() {
    set_interrupts(false);
}

pub fn apic_of(idx: usize) -> u32 {
    APIC_IDS[idx].load(Ordering::Acquire)
}

/// Interrupts CPU `idx` has taken on `vector`.
pub fn count(idx: usize, vector: u8) -> u32 {
    // SAFETY: a u32 in the counter array, written only with `lock inc`.
    unsafe { core::ptr::read_volatile(&raw const irq_counts[idx * 256 + vector as usize]) }
}

/// All interrupts CPU `idx` has taken.
pub fn total(idx: usize) -> u64 {
    (32..=255u8).map(|v| u64::from(count(idx, v))).sum()
}

/// Starts this CPU's local APIC timer: periodic at `hz` on `vector`.
pub fn timer_start(vector: u8, hz: u64) {
    let period = (APIC_TIMER_HZ / hz.max(1)).clamp(1, u64::from(u32::MAX)) as u32;
    write32_ring0(LAPIC + TIMER_DIV, 0xb); // divide by 1
    write32_ring0(LAPIC + LVT_TIMER, LVT_PERIODIC | u32::from(vector));
    write32_ring0(LAPIC + TIMER_INIT, period);
}

/// Whether `vector` is pending (IRR) or in service (ISR) on this CPU's
/// local APIC: proof that an interrupt reached this CPU even where it
/// cannot be taken (on a PVM host, a guest outside PVM mode is never
/// interrupted: KVM keeps the interrupt pending in the IRR).
pub fn arrived_here(vector: u8) -> bool {
    let reg = u64::from(vector / 32) * 0x10;
    let bit = 1u32 << (vector % 32);
    read32_ring0(LAPIC + 0x200 + reg) & bit != 0 || read32_ring0(LAPIC + 0x100 + reg) & bit != 0
}

pub fn timer_stop() {
    write32_ring0(LAPIC + LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write32_ring0(LAPIC + TIMER_INIT, 0);
    let _ = read32_ring0(LAPIC + TIMER_INIT);
}
