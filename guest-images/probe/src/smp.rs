//! AP start-up through the local APIC (INIT/SIPI),
//! and a tiny "run this on every CPU" dispatcher.
use crate::irq::LAPIC;
use crate::{arch, boot::BootInfo, time};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub const MAX_CPUS: usize = 64;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

static ONLINE: AtomicUsize = AtomicUsize::new(1);
static NCPUS: AtomicUsize = AtomicUsize::new(1);
static JOB_GEN: AtomicU64 = AtomicU64::new(0);
static JOB_FN: AtomicUsize = AtomicUsize::new(0);
static JOB_ARG: AtomicU64 = AtomicU64::new(0);
static JOB_DONE: AtomicUsize = AtomicUsize::new(0);

/// A function run on every CPU: (cpu index, number of CPUs, argument).
pub type Job = fn(usize, usize, u64);

/// Application processors wait here for jobs.
pub fn ap_main(idx: usize) -> ! {
    ONLINE.fetch_add(1, Ordering::AcqRel);
    let mut seen = 0;
    loop {
        let gen = JOB_GEN.load(Ordering::Acquire);
        if gen == seen {
            core::hint::spin_loop();
            continue;
        }
        seen = gen;
        let f = JOB_FN.load(Ordering::Acquire);
        // SAFETY: JOB_FN only ever holds a `Job` stored by `run_on_all`.
        let f: Job = unsafe { core::mem::transmute::<usize, Job>(f) };
        f(
            idx,
            NCPUS.load(Ordering::Acquire),
            JOB_ARG.load(Ordering::Acquire),
        );
        JOB_DONE.fetch_add(1, Ordering::AcqRel);
    }
}

/// How many CPUs are online.
pub fn online() -> usize {
    NCPUS.load(Ordering::Acquire)
}

/// Runs `f` on every online CPU (CPU 0 included) and waits for all of them.
pub fn run_on_all(f: Job, arg: u64) {
    let n = NCPUS.load(Ordering::Acquire);
    JOB_DONE.store(0, Ordering::Release);
    JOB_FN.store(f as usize, Ordering::Release);
    JOB_ARG.store(arg, Ordering::Release);
    JOB_GEN.fetch_add(1, Ordering::AcqRel);
    f(0, n, arg);
    while JOB_DONE.load(Ordering::Acquire) < n - 1 {
        core::hint::spin_loop();
    }
}

fn lapic_write(reg: u64, value: u32) {
    arch::write32_ring0(LAPIC + reg, value);
}

/// Picks a free page below 1 MiB for the trampoline (the SIPI vector).
fn trampoline_page(info: &BootInfo) -> u64 {
    let avoid = [
        info.start_info_page(),
        info.cmdline.as_ptr() as u64 & !0xfff,
    ];
    [0x8000u64, 0x9000, 0x7000, 0x3000, 0x4000]
        .into_iter()
        .find(|p| !avoid.contains(p))
        .unwrap_or(0x8000)
}

/// Starts the other CPUs with INIT-SIPI-SIPI and returns how many are online.
pub fn start_aps(info: &BootInfo) -> usize {
    let expected = info.madt_cpus();
    if expected == Some(1) {
        return 1;
    }
    let page = trampoline_page(info);
    // SAFETY: the trampoline is position-independent code between two labels;
    // `page` is free RAM below 1 MiB, identity-mapped and user-writable.
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = &raw const ap_tramp_end as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
    }
    lapic_write(0xf0, 0x1ff); // spurious vector register: APIC software-enabled
    lapic_write(0x310, 0);
    lapic_write(0x300, 0x000c_4500); // INIT, all excluding self
    time::delay_us(1000);
    for _ in 0..2 {
        lapic_write(0x310, 0);
        lapic_write(0x300, 0x000c_4600 | (page >> 12) as u32); // SIPI
        time::delay_us(200);
    }
    let _ = arch::read32_ring0(LAPIC + 0x300);
    // Wait for the expected count (or a quiet period when the MADT is unknown).
    let deadline = time::now_us()
        + if expected.is_some() {
            2_000_000
        } else {
            100_000
        };
    let want = expected.unwrap_or(MAX_CPUS).min(MAX_CPUS);
    while time::now_us() < deadline && ONLINE.load(Ordering::Acquire) < want {
        core::hint::spin_loop();
    }
    let n = ONLINE.load(Ordering::Acquire);
    NCPUS.store(n, Ordering::Release);
    n
}
