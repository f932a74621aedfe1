//! `task=fwq`: the noise experiment. The FWQ CPUs (compute CPUs) time the
//! same W-iteration loop `samples` times with the TSC while the other CPUs
//! (service CPUs) make the chosen noise. Arguments:
//!
//! - `samples=N` (10000), `work=W` (16384 loop iterations per quantum);
//! - `fwq_cpus=LIST`: APIC IDs that measure [default: the guest's compute
//!   CPUs from `nohz_full=`, else every CPU but the boot CPU];
//! - `tick=HZ` (1000; 0 = none): a periodic timer on every CPU that is not
//!   `nohz_full`, like a Linux kernel's scheduler tick;
//! - `noise=none|timer|pio|mem|io` on the service CPUs: a local APIC timer
//!   at `noise_hz` (20000), port-I/O exits, memory streaming over
//!   `noise_mib` (64), or virtio-rng requests whose MSI-X interrupts go to
//!   the service CPUs (decoupled guest) or round-robin to every CPU;
//! - `sync=none|start|step` (start): barrier across the FWQ CPUs once before
//!   the first sample or after every sample (MPI-FWQ StartSync/StepSync);
//! - `mode=ftq interval_us=U`: count quanta of 256 iterations per fixed
//!   interval instead (Fixed Time Quantum);
//! - `raw=1`: print every sample (`fwq_raw cpu=A` lines of 64 values).
//!
//! Prints per FWQ CPU: min/median/p99/max (cycles; counts for FTQ), noise
//! in basis points, and the interrupts every CPU took during the run. On a
//! PVM host a guest outside PVM mode is never interrupted (KVM keeps the
//! interrupt pending), so timers and device interrupts cost it only the
//! VM exits they cause there; on VT-x/AMD-V hosts they are taken and counted.
use crate::boot::{Args, BootInfo};
use crate::virtio::{self, Device, Msix, Queue};
use crate::{arch, irq, println, smp, STATUS_PROBE_ERROR};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

static AREA: AtomicU64 = AtomicU64::new(0);
static SAMPLES: AtomicU64 = AtomicU64::new(0);
static WORK: AtomicU64 = AtomicU64::new(0);
static FTQ_CYCLES: AtomicU64 = AtomicU64::new(0);
/// Bit n: APIC ID n measures.
static FWQ_MASK: AtomicU64 = AtomicU64::new(0);
/// Bit n: APIC ID n is nohz_full (no tick).
static NOHZ_MASK: AtomicU64 = AtomicU64::new(0);
static TICK_HZ: AtomicU64 = AtomicU64::new(0);
static NOISE: AtomicU32 = AtomicU32::new(0);
static NOISE_HZ: AtomicU64 = AtomicU64::new(0);
static NOISE_BUF: AtomicU64 = AtomicU64::new(0);
static NOISE_WORDS: AtomicU64 = AtomicU64::new(0);
static SYNC: AtomicU32 = AtomicU32::new(0);
static STARTED: AtomicUsize = AtomicUsize::new(0);
static FINISHED: AtomicUsize = AtomicUsize::new(0);
static NFWQ: AtomicUsize = AtomicUsize::new(0);
static BARRIER_COUNT: AtomicUsize = AtomicUsize::new(0);
static BARRIER_SENSE: AtomicBool = AtomicBool::new(false);
static NOISE_OPS: AtomicU64 = AtomicU64::new(0);
/// Interrupt totals per CPU index at the start and end of the run.
static IRQ_BEFORE: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];
static IRQ_AFTER: [AtomicU64; smp::MAX_CPUS] = [const { AtomicU64::new(0) }; smp::MAX_CPUS];

const NOISES: [&str; 5] = ["none", "timer", "pio", "mem", "io"];
const SYNCS: [&str; 3] = ["none", "start", "step"];

/// The device used by `noise=io` (only the boot CPU touches it).
struct IoNoise {
    queue: Queue,
    msix: Msix,
    buf: u64,
}
struct IoCell(core::cell::UnsafeCell<Option<IoNoise>>);
// SAFETY: written once by the boot CPU before the other CPUs start the job,
// then used only by the boot CPU (see `make_noise`).
unsafe impl Sync for IoCell {}
static IO_NOISE: IoCell = IoCell(core::cell::UnsafeCell::new(None));

#[inline(never)]
fn quantum(work: u64) {
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "dec {0}", "jnz 2b", inout(reg) work.max(1) => _, options(nomem, nostack))
    };
}

/// `0-3,8` as a bit mask of APIC IDs below 64 (None if it does not parse).
pub fn parse_mask(s: &str) -> Option<u64> {
    let mut m = 0u64;
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => (part.parse().ok()?, part.parse().ok()?),
        };
        if hi < lo || hi >= 64 {
            return None;
        }
        for c in lo..=hi {
            m |= 1 << c;
        }
    }
    Some(m)
}

/// Sense-reversing barrier across the FWQ CPUs.
fn barrier(local_sense: &mut bool) {
    *local_sense = !*local_sense;
    if BARRIER_COUNT.fetch_add(1, Ordering::AcqRel) + 1 == NFWQ.load(Ordering::Acquire) {
        BARRIER_COUNT.store(0, Ordering::Release);
        BARRIER_SENSE.store(*local_sense, Ordering::Release);
    } else {
        while BARRIER_SENSE.load(Ordering::Acquire) != *local_sense {
            core::hint::spin_loop();
        }
    }
}

fn measure(idx: usize) {
    let samples = SAMPLES.load(Ordering::Acquire);
    let work = WORK.load(Ordering::Acquire);
    let ftq = FTQ_CYCLES.load(Ordering::Acquire);
    let sync = SYNC.load(Ordering::Acquire);
    let out = (AREA.load(Ordering::Acquire) + idx as u64 * samples * 8) as *mut u64;
    let mut sense = false;
    quantum(work); // warm up
    STARTED.fetch_add(1, Ordering::AcqRel);
    if sync >= 1 {
        barrier(&mut sense);
    }
    for s in 0..samples {
        let v = if ftq == 0 {
            let t0 = arch::rdtsc();
            quantum(work);
            arch::rdtsc() - t0
        } else {
            let end = arch::rdtsc() + ftq;
            let mut n = 0;
            while arch::rdtsc() < end {
                quantum(256);
                n += 1;
            }
            n
        };
        // SAFETY: each CPU owns `samples` slots of the carved area.
        unsafe { core::ptr::write_volatile(out.add(s as usize), v) };
        if sync == 2 {
            barrier(&mut sense);
        }
    }
}

fn make_noise(idx: usize) {
    let busy = || FINISHED.load(Ordering::Acquire) < NFWQ.load(Ordering::Acquire);
    let mut ops = 0u64;
    match NOISES[NOISE.load(Ordering::Acquire) as usize] {
        "timer" => {
            irq::timer_start(irq::TIMER_VECTOR, NOISE_HZ.load(Ordering::Acquire));
            while busy() {
                core::hint::spin_loop();
            }
        }
        "pio" => {
            while busy() {
                let _ = arch::inb(0x80);
                ops += 1;
            }
        }
        "mem" => {
            let base = NOISE_BUF.load(Ordering::Acquire) as *mut u64;
            let words = NOISE_WORDS.load(Ordering::Acquire) as usize;
            while busy() {
                for i in (0..words).step_by(8) {
                    // SAFETY: the noise buffer was carved for this task.
                    unsafe { core::ptr::write_volatile(base.add(i), ops ^ i as u64) };
                }
                ops += 1;
            }
        }
        "io" if idx == 0 => {
            // SAFETY: only the boot CPU (idx 0) ever touches IO_NOISE, and
            // `run` finished setting it up before the CPUs started.
            let io = unsafe { (*IO_NOISE.0.get()).as_mut() };
            if let Some(io) = io {
                let decoupled = NOHZ_MASK.load(Ordering::Acquire) != 0;
                let ncpus = smp::online();
                let mut target = 0usize;
                while busy() {
                    if ops.is_multiple_of(16) {
                        // Service CPUs only in a decoupled guest (irqaffinity),
                        // every CPU otherwise (irqbalance-style spreading).
                        loop {
                            target = (target + 1) % ncpus;
                            let apic = irq::apic_of(target);
                            if !decoupled
                                || NOHZ_MASK.load(Ordering::Acquire) & (1u64 << (apic & 63)) == 0
                            {
                                io.msix.route(0, apic, irq::DEVICE_VECTOR);
                                break;
                            }
                        }
                    }
                    if io.queue.submit(&[(io.buf, 64, true)], 100_000).is_none() {
                        break;
                    }
                    ops += 1;
                }
            }
        }
        _ => {
            while busy() {
                core::hint::spin_loop();
            }
        }
    }
    irq::timer_stop();
    NOISE_OPS.fetch_add(ops, Ordering::AcqRel);
}

fn job(idx: usize, _n: usize, _arg: u64) {
    let apic = irq::apic_id();
    irq::enable_this_cpu(idx);
    let bit = 1u64 << (apic & 63);
    let tick = TICK_HZ.load(Ordering::Acquire);
    if tick > 0 && NOHZ_MASK.load(Ordering::Acquire) & bit == 0 {
        irq::timer_start(irq::TIMER_VECTOR, tick);
    }
    IRQ_BEFORE[idx].store(irq::total(idx), Ordering::Release);
    if FWQ_MASK.load(Ordering::Acquire) & bit != 0 {
        measure(idx);
        irq::timer_stop();
        FINISHED.fetch_add(1, Ordering::AcqRel);
    } else {
        // Noise starts once every measuring CPU is ready.
        while STARTED.load(Ordering::Acquire) < NFWQ.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        make_noise(idx);
    }
    IRQ_AFTER[idx].store(irq::total(idx), Ordering::Release);
    irq::disable_this_cpu();
}

fn setup_io_noise(info: &mut BootInfo) -> Result<(), &'static str> {
    let f =
        virtio::find(info.ecam_base(), 4, 0).ok_or("noise=io needs a virtio-rng device (--rng)")?;
    let dev = Device::open(f, 0).map_err(|_| "virtio-rng did not accept the driver")?;
    let msix = Msix::enable(f).ok_or("virtio-rng has no MSI-X")?;
    let mem = info
        .take(Queue::bytes(16) + 0x1000)
        .ok_or("no memory for the queue")?;
    let queue = dev
        .setup_queue_msix(0, 16, mem, 0)
        .map_err(|_| "virtio-rng queue setup failed")?;
    msix.route(0, 0, irq::DEVICE_VECTOR);
    dev.driver_ok();
    // SAFETY: set before any other CPU runs the job; see `make_noise`.
    unsafe {
        *IO_NOISE.0.get() = Some(IoNoise {
            queue,
            msix,
            buf: mem + Queue::bytes(16),
        })
    };
    Ok(())
}

fn fail(msg: &str) -> u8 {
    println!("probe: error: fwq: {msg}");
    STATUS_PROBE_ERROR
}

pub fn run(info: &mut BootInfo, args: &Args, ncpus: usize) -> u8 {
    let samples = args.num("samples", 10_000).max(1);
    let work = args.num("work", 1 << 14);
    let raw = args.num("raw", 0) != 0;
    let nohz = match args.get("nohz_full").map(parse_mask) {
        Some(None) => return fail("cannot read nohz_full="),
        Some(Some(m)) => m,
        None => 0,
    };
    let fwq = match args.get("fwq_cpus").map(parse_mask) {
        Some(None) => return fail("cannot read fwq_cpus="),
        Some(Some(m)) => m,
        None if nohz != 0 => nohz,
        None => !1u64,
    };
    let noise = args.get("noise").unwrap_or("none");
    let Some(noise_id) = NOISES.iter().position(|n| *n == noise) else {
        return fail("noise= must be none, timer, pio, mem or io");
    };
    let sync = args.get("sync").unwrap_or("start");
    let Some(sync_id) = SYNCS.iter().position(|n| *n == sync) else {
        return fail("sync= must be none, start or step");
    };
    let mode = args.get("mode").unwrap_or("fwq");
    let ftq_cycles = match mode {
        "fwq" => 0,
        "ftq" => crate::time::us_to_cycles(args.num("interval_us", 10)).max(1),
        _ => return fail("mode= must be fwq or ftq"),
    };
    // ffmk-vmm numbers APIC IDs 0..ncpus like the vCPUs.
    let online = if ncpus >= 64 { !0 } else { (1u64 << ncpus) - 1 };
    let fwq = fwq & online;
    let nfwq = fwq.count_ones() as usize;
    if nfwq == 0 {
        return fail("no CPU to measure on (fwq_cpus= / nohz_full= name no online CPU)");
    }
    if nfwq == ncpus && noise != "none" {
        return fail("every CPU measures: none is left to make noise");
    }
    if noise == "io" {
        if fwq & 1 != 0 {
            return fail("noise=io runs on the boot CPU, which must not measure");
        }
        if let Err(e) = setup_io_noise(info) {
            return fail(e);
        }
    }
    if noise == "mem" {
        let bytes = args.num("noise_mib", 64) << 20;
        NOISE_BUF.store(
            super::buffer(info, "noise buffer", bytes),
            Ordering::Release,
        );
        NOISE_WORDS.store(bytes / 8, Ordering::Release);
    }
    let area = super::buffer(info, "fwq samples", 2 * ncpus as u64 * samples * 8);
    AREA.store(area, Ordering::Release);
    SAMPLES.store(samples, Ordering::Release);
    WORK.store(work, Ordering::Release);
    FTQ_CYCLES.store(ftq_cycles, Ordering::Release);
    FWQ_MASK.store(fwq, Ordering::Release);
    NOHZ_MASK.store(nohz, Ordering::Release);
    TICK_HZ.store(args.num("tick", 1000), Ordering::Release);
    NOISE.store(noise_id as u32, Ordering::Release);
    NOISE_HZ.store(args.num("noise_hz", 20_000), Ordering::Release);
    SYNC.store(sync_id as u32, Ordering::Release);
    NFWQ.store(nfwq, Ordering::Release);
    let t0 = crate::time::now_us();
    smp::run_on_all(job, 0);
    let run_us = crate::time::now_us() - t0;
    println!(
        "fwq_cpus={nfwq} samples={samples} work={work} mode={mode} noise={noise} sync={sync} tick={} tsc_khz={} run_us={run_us} noise_ops={}",
        TICK_HZ.load(Ordering::Acquire),
        crate::time::tsc_khz(),
        NOISE_OPS.load(Ordering::Acquire)
    );
    for cpu in 0..ncpus {
        let apic = irq::apic_of(cpu);
        let irqs = IRQ_AFTER[cpu].load(Ordering::Acquire) - IRQ_BEFORE[cpu].load(Ordering::Acquire);
        let role = if fwq & (1u64 << (apic & 63)) != 0 {
            "fwq"
        } else {
            "noise"
        };
        println!(
            "fwq_irqs cpu={apic} role={role} total={irqs} timer={} device={}",
            irq::count(cpu, irq::TIMER_VECTOR),
            irq::count(cpu, irq::DEVICE_VECTOR)
        );
        if role != "fwq" {
            continue;
        }
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
            for chunk in data.chunks(64) {
                crate::print!("fwq_raw cpu={apic}");
                for v in chunk {
                    crate::print!(" {v}");
                }
                println!("");
            }
        }
        sorted.copy_from_slice(data);
        sorted.sort_unstable();
        let min = sorted[0];
        let max = sorted[sorted.len() - 1];
        let pct = |p: usize| sorted[(sorted.len() - 1) * p / 100];
        let mean = sorted.iter().sum::<u64>() / samples;
        // FWQ: noise = (sample - min) / min; FTQ: lost work = (max - sample) / max.
        let noise = |v: u64| {
            if ftq_cycles == 0 {
                (v - min) * 10_000 / min.max(1)
            } else {
                (max - v) * 10_000 / max.max(1)
            }
        };
        let worst = if ftq_cycles == 0 { max } else { min };
        println!(
            "fwq cpu={apic} min={min} median={} p99={} max={max} mean={mean} noise_median_bp={} noise_p99_bp={} noise_max_bp={}",
            pct(50),
            if ftq_cycles == 0 { pct(99) } else { pct(1) },
            noise(pct(50)),
            noise(if ftq_cycles == 0 { pct(99) } else { pct(1) }),
            noise(worst),
        );
    }
    0
}
