//! `task=memtouch mib=N`: every CPU writes a deterministic pattern over its
//! share of N MiB, then reads it back; prints an order-independent checksum
//! that depends only on N.
use super::mix;
use crate::boot::{Args, BootInfo};
use crate::{println, smp, time};
use core::sync::atomic::{AtomicU64, Ordering};

static BASE: AtomicU64 = AtomicU64::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);

fn touch(idx: usize, ncpus: usize, words: u64) {
    let per = words.div_ceil(ncpus as u64);
    let (lo, hi) = (idx as u64 * per, ((idx as u64 + 1) * per).min(words));
    let base = BASE.load(Ordering::Acquire) as *mut u64;
    for i in lo..hi {
        // SAFETY: [base, base + words) is free RAM carved for this task.
        unsafe { core::ptr::write_volatile(base.add(i as usize), mix(i)) };
    }
    let mut sum = 0u64;
    for i in lo..hi {
        // SAFETY: as above.
        let v = unsafe { core::ptr::read_volatile(base.add(i as usize)) };
        sum = sum.wrapping_add(mix(v ^ i));
    }
    SUM.fetch_add(sum, Ordering::AcqRel);
}

pub fn run(info: &mut BootInfo, args: &Args, ncpus: usize) -> u8 {
    let mib = args.num("mib", 16);
    let base = super::buffer(info, "memtouch", mib << 20);
    BASE.store(base, Ordering::Release);
    let t0 = time::now_us();
    smp::run_on_all(touch, (mib << 20) / 8);
    let us = time::now_us() - t0;
    println!("mib={mib}");
    println!("cpus_used={ncpus}");
    println!("touch_us={us}");
    println!("checksum={:016x}", SUM.load(Ordering::Acquire));
    0
}
