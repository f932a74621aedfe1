//! The probe guest: a tiny bare-metal x86_64 guest for ffmk-vmm's tests.
//!
//! Ring 0 (`entry.S`) only switches to long mode and drops to ring 3; all of
//! this crate runs in ring 3, where a PVM-backed KVM runs guest code at native
//! speed. It reads its task from the PVH command line (`task=NAME key=value`),
//! prints results as `key=value` lines on COM1 and ends with a status written
//! to the test exit port.
#![no_std]
#![no_main]

mod arch;
mod boot;
mod irq;
mod mem;
mod pci;
mod serial;
mod smp;
mod tasks;
mod time;
mod virtio;

use core::panic::PanicInfo;

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

/// Exit status used when the probe itself fails (bad arguments, panics).
pub const STATUS_PROBE_ERROR: u8 = 100;
/// Exit status used after an unexpected CPU exception.
pub const STATUS_FAULT: u8 = 101;

/// First ring-3 code of every CPU (`idx` 0 is the boot CPU).
#[no_mangle]
pub extern "C" fn probe_cpu_main(idx: u64) -> ! {
    let idx = idx as usize;
    if idx != 0 {
        smp::ap_main(idx);
    }
    // The first thing the boot CPU does in ring 3; ci/bench-boot times it.
    println!("probe=ring3");
    let mut info = boot::BootInfo::read();
    time::init();
    let args = info.args();
    let ncpus = smp::start_aps(&info);
    let status = tasks::run(&mut info, &args, ncpus);
    arch::exit(status)
}

/// Ring 3 continues here after an unexpected exception (see `isr_common`).
#[no_mangle]
pub extern "C" fn probe_fault_report() -> ! {
    let f = arch::fault_record();
    serial::print_fatal(format_args!(
        "\nprobe: fault vector={} error={:#x} rip={:#x} cs={:#x} rsp={:#x} cr2={:#x}\n",
        f[0], f[1], f[2], f[3], f[4], f[5]
    ));
    arch::exit(STATUS_FAULT)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    serial::print_fatal(format_args!("\nprobe: panic: {}\n", info));
    arch::exit(STATUS_PROBE_ERROR)
}
