//! `task=counter` and `task=dirty`: a counter printed at a fixed rate (for
//! pause/resume, snapshot and migration tests), optionally while dirtying
//! memory at a set rate and verifying it at the end.
use super::mix;
use crate::boot::{Args, BootInfo};
use crate::{arch::rdtsc, println, time};

/// Paces a loop at `hz` ticks per second without bursts after a pause.
pub struct Ticker {
    next: u64,
    period: u64,
}

impl Ticker {
    pub fn new(hz: u64) -> Ticker {
        let period = time::us_to_cycles(1_000_000 / hz.clamp(1, 1_000_000));
        Ticker {
            next: rdtsc() + period,
            period,
        }
    }

    pub fn wait(&mut self) {
        while rdtsc() < self.next {
            core::hint::spin_loop();
        }
        let now = rdtsc();
        self.next += self.period;
        if now > self.next {
            // We were stopped (paused VM, migration): resume the pace from now.
            self.next = now + self.period;
        }
    }
}

/// `task=counter [hz=10] [max=0]` (max=0: forever).
pub fn counter(args: &Args) -> u8 {
    let hz = args.num("hz", 10);
    let max = args.num("max", 0);
    let mut t = Ticker::new(hz);
    let mut n = 0u64;
    loop {
        n += 1;
        println!("counter={n}");
        if n == max {
            return 0;
        }
        t.wait();
    }
}

fn page_value(page: u64, gen: u64, word: u64) -> u64 {
    mix((page << 32) ^ (gen << 12) ^ word)
}

/// `task=dirty mib=N rate=R [hz=10] [max=0]`: rewrites pages of an N MiB
/// buffer round-robin at R MiB/s, printing `counter=` every tick; at `max`
/// ticks it checks every page against its recorded generation.
pub fn dirty(info: &mut BootInfo, args: &Args) -> u8 {
    let mib = args.num("mib", 64).max(1);
    let rate = args.num("rate", 16);
    let hz = args.num("hz", 10).max(1);
    let max = args.num("max", 0);
    let pages = mib << 8;
    let buf = super::buffer(info, "dirty", mib << 20) as *mut u64;
    let gens = super::buffer(info, "dirty generations", pages * 8) as *mut u64;
    for p in 0..pages {
        // SAFETY: both buffers were carved from free RAM for this task.
        unsafe {
            core::ptr::write_volatile(gens.add(p as usize), 0);
            for w in 0..512 {
                core::ptr::write_volatile(buf.add((p * 512 + w) as usize), page_value(p, 0, w));
            }
        }
    }
    let per_tick = ((rate << 8) / hz).max(if rate > 0 { 1 } else { 0 });
    println!("dirty_pages={pages} pages_per_tick={per_tick}");
    let mut t = Ticker::new(hz);
    let (mut n, mut cursor) = (0u64, 0u64);
    loop {
        for _ in 0..per_tick {
            let p = cursor % pages;
            cursor += 1;
            // SAFETY: p < pages; both buffers belong to this task.
            unsafe {
                let g = core::ptr::read_volatile(gens.add(p as usize)) + 1;
                for w in 0..512 {
                    core::ptr::write_volatile(buf.add((p * 512 + w) as usize), page_value(p, g, w));
                }
                core::ptr::write_volatile(gens.add(p as usize), g);
            }
        }
        n += 1;
        println!("counter={n}");
        if n == max {
            break;
        }
        t.wait();
    }
    let mut sum = 0u64;
    for p in 0..pages {
        // SAFETY: as above.
        let g = unsafe { core::ptr::read_volatile(gens.add(p as usize)) };
        for w in 0..512 {
            let v = unsafe { core::ptr::read_volatile(buf.add((p * 512 + w) as usize)) };
            if v != page_value(p, g, w) {
                println!("dirty_verify=FAIL page={p} word={w} gen={g}");
                return 1;
            }
            sum = sum.wrapping_add(mix(v));
        }
    }
    println!("dirty_verify=ok pages={pages} writes={cursor}");
    println!("checksum={sum:016x}");
    0
}
