//! `task=fwq [samples=N] [work=W] [raw=1]`: Fixed Work Quantum. Every CPU
//! times `samples` runs of the same W-iteration loop with the TSC; the boot
//! CPU prints per-CPU statistics (cycles) and, with raw=1, every sample.
use crate::boot::{Args, BootInfo};
use crate::{arch::rdtsc, println, smp};
use core::sync::atomic::{AtomicU64, Ordering};

static AREA: AtomicU64 = AtomicU64::new(0);
static SAMPLES: AtomicU64 = AtomicU64::new(0);
static WORK: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn quantum(work: u64) {
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "dec {0}", "jnz 2b", inout(reg) work.max(1) => _, options(nomem, nostack))
    };
}

fn sample_all(idx: usize, _n: usize, _arg: u64) {
    let samples = SAMPLES.load(Ordering::Acquire);
    let work = WORK.load(Ordering::Acquire);
    let out = (AREA.load(Ordering::Acquire) + idx as u64 * samples * 8) as *mut u64;
    quantum(work); // warm up
    for s in 0..samples {
        let t0 = rdtsc();
        quantum(work);
        let dt = rdtsc() - t0;
        // SAFETY: each CPU owns `samples` slots of the carved area.
        unsafe { core::ptr::write_volatile(out.add(s as usize), dt) };
    }
}

pub fn run(info: &mut BootInfo, args: &Args, ncpus: usize) -> u8 {
    let samples = args.num("samples", 10_000).max(1);
    let work = args.num("work", 1 << 14);
    let raw = args.num("raw", 0) != 0;
    let area = super::buffer(info, "fwq samples", 2 * ncpus as u64 * samples * 8);
    AREA.store(area, Ordering::Release);
    SAMPLES.store(samples, Ordering::Release);
    WORK.store(work, Ordering::Release);
    smp::run_on_all(sample_all, 0);
    println!("fwq_cpus={ncpus} samples={samples} work={work}");
    for cpu in 0..ncpus {
        let base = area as *mut u64;
        // SAFETY: slots [cpu*samples, (cpu+1)*samples) were filled above; the
        // second half of the area is scratch for sorting.
        let (data, sorted) = unsafe {
            let d = core::slice::from_raw_parts(base.add(cpu * samples as usize), samples as usize);
            let s = core::slice::from_raw_parts_mut(
                base.add((ncpus + cpu) * samples as usize),
                samples as usize,
            );
            (d, s)
        };
        if raw {
            for (i, v) in data.iter().enumerate() {
                println!("fwq_sample cpu={cpu} i={i} cycles={v}");
            }
        }
        sorted.copy_from_slice(data);
        sorted.sort_unstable();
        let min = sorted[0];
        let pct = |p: usize| sorted[(sorted.len() - 1) * p / 100];
        let mean = sorted.iter().sum::<u64>() / samples;
        let max = sorted[sorted.len() - 1];
        // noise = (sample - min) / min, in units of 0.01 %
        let noise = |v: u64| (v - min) * 10_000 / min.max(1);
        println!(
            "fwq cpu={cpu} min={min} median={} p99={} max={max} mean={mean} noise_median_bp={} noise_p99_bp={} noise_max_bp={}",
            pct(50), pct(99), noise(pct(50)), noise(pct(99)), noise(max)
        );
    }
    0
}
