//! Thin wrappers over the instructions the probe uses from ring 3, and the
//! `syscall` interface to the ring-0 helpers in `entry.S`.
use core::arch::asm;

/// Port of the test exit device (`ffmk-vmm --test-exit-port`, QEMU `isa-debug-exit`).
pub const EXIT_PORT: u16 = 0xf4;

#[allow(dead_code)]
const SYS_WRMSR: u64 = 0;
const SYS_RDMSR: u64 = 1;
const SYS_WRITE32: u64 = 2;
const SYS_READ32: u64 = 3;
const SYS_SET_IF: u64 = 6;

fn syscall(op: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: `syscall_entry` implements exactly these operations and preserves
    // every register except rax, rcx, rdx and r11, which are declared clobbered.
    unsafe {
        asm!("syscall", inlateout("rax") op => ret, in("rdi") a, in("rsi") b,
             out("rcx") _, out("rdx") _, out("r11") _);
    }
    ret
}

#[allow(dead_code)]
pub fn wrmsr(msr: u32, value: u64) {
    syscall(SYS_WRMSR, msr as u64, value);
}

#[allow(dead_code)]
pub fn rdmsr(msr: u32) -> u64 {
    syscall(SYS_RDMSR, msr as u64, 0)
}

/// 32-bit store done from ring 0 (used for local APIC registers).
pub fn write32_ring0(addr: u64, value: u32) {
    syscall(SYS_WRITE32, addr, value as u64);
}

pub fn read32_ring0(addr: u64) -> u32 {
    syscall(SYS_READ32, addr, 0) as u32
}

/// Lets this CPU take interrupts in ring 3 (sets IF on the way back from
/// the syscall; ring 3 cannot `sti` with IOPL 0).
pub fn set_interrupts(on: bool) {
    syscall(SYS_SET_IF, u64::from(on), 0);
}

/// Waits for the VMM to stop the VM (spinning in ring 3: a ring-0 `hlt`
/// would be emulated on PVM hosts).
pub fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Clears every IDT gate (the IDT is user-writable) and raises #UD: the
/// not-present gates escalate to a double fault and then a triple fault.
pub fn triple_fault() -> ! {
    // SAFETY: the probe owns the IDT; nothing else runs on this CPU.
    unsafe {
        core::ptr::write_bytes(&raw mut symbols::idt as *mut u8, 0, 256 * 16);
        asm!("ud2", options(noreturn));
    }
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; from ring 3 it exits to the VMM.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) }
    v
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) }
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) }
    v
}

/// A 32-bit MMIO read from ring 3 (the identity map is user-accessible).
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register in the identity-mapped guest
    // physical space; a volatile read has no other effect on probe memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: lfence orders the read after earlier instructions; rdtsc is allowed
    // in ring 3 (CR4.TSD is clear).
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    ((hi as u64) << 32) | lo as u64
}

pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Ends the VM: test exit port first, then an i8042 reset, then park.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    // No test exit device: fall back to an i8042 reset after a grace period.
    crate::time::delay_us(100_000);
    outb(0x64, 0xfe);
    park()
}

mod symbols {
    extern "C" {
        pub static fault_record: [u64; 6];
        pub static mut idt: [u8; 4096];
    }
}

/// vector, error code, rip, cs, rsp, cr2 of the first exception taken.
pub fn fault_record() -> [u64; 6] {
    // SAFETY: written once by `isr_common` before it enters the reporter.
    unsafe { core::ptr::read_volatile(&raw const symbols::fault_record) }
}
