//! Pre-copy: copying guest memory while the guest runs.
//!
//! Every live copy of a VM's memory works the same way: copy a first set
//! of pages (all with content, or those dirty since an earlier copy), then
//! round after round the pages the guest dirtied meanwhile, until what is
//! left is small enough to copy with the guest paused. What differs is
//! where pages go (a snapshot layer, a migration stream) and when to stop
//! (a live snapshot stops once the dirty set stops shrinking; a migration
//! once the predicted downtime meets its target, or it switches to
//! post-copy). [`run`] is the loop; the caller brings the [`Tracker`]
//! (the VM's dirty log), the copy and the policy ([`Converge`] or its
//! own).
//!
//! The caller pauses the guest after [`run`] returns and copies
//! [`Ending::last`] together with one more fetch from the tracker.
use snapshot::PageBitmap;
use std::time::{Duration, Instant};

/// Where dirty pages come from: a VM's dirty tracker, already started.
pub trait Tracker {
    type Error: std::fmt::Debug + std::fmt::Display;
    /// Pages dirtied since the previous fetch.
    fn fetch(&mut self) -> Result<PageBitmap, Self::Error>;
}

/// A round just copied, and the dirty set it left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// Rounds copied so far (1 after the first).
    pub number: u32,
    /// How long the last copy took.
    pub elapsed: Duration,
    /// Bytes it moved (as the copy counts them).
    pub bytes: u64,
    /// Pages dirty now, to be copied next.
    pub dirty_pages: u64,
}

/// What to do with the dirty set a round left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Copy it while the guest runs: another round.
    Again,
    /// Pause the guest and copy it (with what it dirties until the pause).
    Pause,
    /// Pause the guest and let the rest follow after it runs elsewhere.
    Postcopy,
}

/// How the rounds ended.
#[derive(Debug)]
pub struct Ending {
    /// `Pause` or `Postcopy`.
    pub verdict: Verdict,
    /// The dirty set of the last round, not copied yet.
    pub last: PageBitmap,
    /// Rounds copied.
    pub rounds: u32,
}

/// Why the rounds stopped early: the tracker failed (`T`), or the copy or
/// the policy did (`E`).
#[derive(Debug)]
pub enum Error<T, E> {
    Tracker(T),
    Stopped(E),
}

/// Copies `first`, then dirty rounds until `decide` says pause. `copy`
/// gets the pages and the round's number, and returns the bytes it moved.
pub fn run<T: Tracker + ?Sized, E>(
    tracker: &mut T,
    first: PageBitmap,
    copy: &mut dyn FnMut(&PageBitmap, u32) -> Result<u64, E>,
    decide: &mut dyn FnMut(&Round) -> Result<Verdict, E>,
) -> Result<Ending, Error<T::Error, E>> {
    let mut pages = first;
    let mut number = 1;
    loop {
        let started = Instant::now();
        let bytes = copy(&pages, number).map_err(Error::Stopped)?;
        let elapsed = started.elapsed();
        let dirty = tracker.fetch().map_err(Error::Tracker)?;
        let round = Round {
            number,
            elapsed,
            bytes,
            dirty_pages: dirty.count(),
        };
        match decide(&round).map_err(Error::Stopped)? {
            Verdict::Again => {
                number += 1;
                pages = dirty;
            }
            verdict => {
                return Ok(Ending {
                    verdict,
                    last: dirty,
                    rounds: number,
                })
            }
        }
    }
}

/// The policy of a live snapshot: pause once the dirty set is small
/// (`final_pages`) or stops shrinking, or after `max_rounds` rounds.
#[derive(Debug, Clone)]
pub struct Converge {
    pub max_rounds: u32,
    pub final_pages: u64,
    previous: u64,
}

impl Converge {
    pub fn new(max_rounds: u32, final_pages: u64) -> Converge {
        Converge {
            max_rounds,
            final_pages,
            previous: u64::MAX,
        }
    }

    pub fn decide(&mut self, r: &Round) -> Verdict {
        let n = r.dirty_pages;
        let stop = n <= self.final_pages || n >= self.previous || r.number >= self.max_rounds;
        self.previous = n;
        if stop {
            Verdict::Pause
        } else {
            Verdict::Again
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that dirties the given number of pages between fetches.
    struct Scripted(Vec<u64>);

    #[derive(Debug, PartialEq)]
    struct NoMoreRounds;

    impl std::fmt::Display for NoMoreRounds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("no more rounds")
        }
    }

    impl std::error::Error for NoMoreRounds {}

    impl Tracker for Scripted {
        type Error = NoMoreRounds;

        fn fetch(&mut self) -> Result<PageBitmap, NoMoreRounds> {
            if self.0.is_empty() {
                return Err(NoMoreRounds);
            }
            let n = self.0.remove(0);
            let mut b = PageBitmap::new(1024);
            for p in 0..n {
                b.set(p);
            }
            Ok(b)
        }
    }

    fn rounds(script: &[u64], policy: &mut Converge) -> (Ending, Vec<u64>) {
        let mut copied = Vec::new();
        let mut t = Scripted(script.to_vec());
        let mut all = PageBitmap::new(1024);
        for p in 0..1024 {
            all.set(p);
        }
        let end = run::<_, ()>(
            &mut t,
            all,
            &mut |pages, _| {
                copied.push(pages.count());
                Ok(pages.count() * 4096)
            },
            &mut |r| Ok(policy.decide(r)),
        )
        .expect("rounds");
        (end, copied)
    }

    #[test]
    fn a_shrinking_dirty_set_is_copied_until_it_is_small() {
        let (end, copied) = rounds(&[400, 100, 30, 500], &mut Converge::new(10, 32));
        assert_eq!(copied, [1024, 400, 100]);
        assert_eq!(
            (end.verdict, end.rounds, end.last.count()),
            (Verdict::Pause, 3, 30)
        );
    }

    #[test]
    fn a_set_that_stops_shrinking_or_too_many_rounds_pause_the_guest() {
        let (end, copied) = rounds(&[400, 450], &mut Converge::new(10, 32));
        assert_eq!(copied, [1024, 400]);
        assert_eq!(end.last.count(), 450);
        let (end, copied) = rounds(&[900, 800, 700, 600], &mut Converge::new(3, 32));
        assert_eq!(copied, [1024, 900, 800]);
        assert_eq!((end.rounds, end.last.count()), (3, 700));
    }

    #[test]
    fn failures_stop_the_rounds() {
        let mut t = Scripted(vec![]);
        let e = run::<_, ()>(&mut t, PageBitmap::new(8), &mut |_, _| Ok(0), &mut |_| {
            Ok(Verdict::Again)
        });
        assert!(matches!(e, Err(Error::Tracker(_))));
        let mut t = Scripted(vec![5, 5]);
        let e = run(
            &mut t,
            PageBitmap::new(8),
            &mut |_, n| if n < 2 { Ok(0) } else { Err("link down") },
            &mut |_| Ok(Verdict::Again),
        );
        assert!(matches!(e, Err(Error::Stopped("link down"))));
    }
}
