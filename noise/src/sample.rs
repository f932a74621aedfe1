//! The samplers: the same loop the probe guest runs, timed with the TSC.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// `work` iterations of a register-only countdown loop.
#[inline(never)]
pub fn quantum(work: u64) {
    // SAFETY: a register-only countdown loop, no memory access.
    unsafe {
        std::arch::asm!("2:", "dec {0}", "jnz 2b", inout(reg) work.max(1) => _, options(nomem, nostack))
    };
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: lfence and rdtsc have no memory effects; rdtsc is allowed in
    // user mode on Linux.
    unsafe {
        std::arch::x86_64::_mm_lfence();
        std::arch::x86_64::_rdtsc()
    }
}

/// Barrier synchronisation across the sampling threads (MPI-FWQ style).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sync {
    None,
    /// Once, before the first sample.
    Start,
    /// After every sample.
    Step,
}

/// A spinning, sense-reversing barrier (a futex would add wake-up noise).
pub struct SpinBarrier {
    n: usize,
    count: AtomicUsize,
    sense: AtomicBool,
}

impl SpinBarrier {
    pub fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            count: AtomicUsize::new(0),
            sense: AtomicBool::new(false),
        }
    }

    pub fn wait(&self, local: &mut bool) {
        *local = !*local;
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Release);
            self.sense.store(*local, Ordering::Release);
        } else {
            while self.sense.load(Ordering::Acquire) != *local {
                std::hint::spin_loop();
            }
        }
    }
}

/// What one sampling thread does.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    /// Time `work` loop iterations per sample.
    Fwq { work: u64 },
    /// Count 256-iteration quanta per `cycles` TSC interval.
    Ftq { cycles: u64 },
}

/// Takes `samples` samples on the calling thread; `barrier` is shared by
/// all threads of a synchronised run.
pub fn run(method: Method, samples: usize, sync: Sync, barrier: Option<&SpinBarrier>) -> Vec<u64> {
    let mut out = Vec::with_capacity(samples);
    let mut sense = false;
    if let Method::Fwq { work } = method {
        quantum(work);
    }
    if let (Sync::Start | Sync::Step, Some(b)) = (sync, barrier) {
        b.wait(&mut sense);
    }
    for _ in 0..samples {
        let v = match method {
            Method::Fwq { work } => {
                let t0 = rdtsc();
                quantum(work);
                rdtsc() - t0
            }
            Method::Ftq { cycles } => {
                let end = rdtsc() + cycles;
                let mut n = 0;
                while rdtsc() < end {
                    quantum(256);
                    n += 1;
                }
                n
            }
        };
        out.push(v);
        if let (Sync::Step, Some(b)) = (sync, barrier) {
            b.wait(&mut sense);
        }
    }
    out
}

/// Runs one sampling thread per CPU in `cpus` (each pinned to its CPU by
/// `pin`), all synchronised by `sync`; returns the samples per CPU.
pub fn run_on_cpus(
    cpus: &[u32],
    method: Method,
    samples: usize,
    sync: Sync,
    pin: impl Fn(u32) -> std::io::Result<()> + Send + std::marker::Sync + Copy + 'static,
) -> std::io::Result<Vec<(u32, Vec<u64>)>> {
    let barrier = Arc::new(SpinBarrier::new(cpus.len()));
    let handles: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let b = barrier.clone();
            std::thread::spawn(move || -> std::io::Result<(u32, Vec<u64>)> {
                pin(cpu)?;
                Ok((cpu, run(method, samples, sync, Some(&b))))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| std::io::Error::other("sampling thread panicked"))?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwq_and_ftq_produce_plausible_samples() {
        let v = run(Method::Fwq { work: 1000 }, 50, Sync::None, None);
        assert_eq!(v.len(), 50);
        assert!(v.iter().all(|c| *c > 0));
        let w = run(Method::Ftq { cycles: 100_000 }, 20, Sync::None, None);
        assert!(w.iter().any(|n| *n > 0));
    }

    #[test]
    fn step_sync_runs_threads_in_lockstep() {
        let r = run_on_cpus(&[0, 0], Method::Fwq { work: 100 }, 200, Sync::Step, |_| {
            Ok(())
        })
        .unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(_, v)| v.len() == 200));
    }
}
