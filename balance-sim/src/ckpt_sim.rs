//! Simulates jobs checkpointing to one shared burst buffer, with and
//! without the coordinator, to choose its policy at scale.
//!
//! Model (what the figures assume):
//! - `nodes` nodes run `jobs` jobs whose sizes are drawn log-uniformly
//!   between `min_job` and `max_job` nodes (the last job takes what is
//!   left, so they add up to `nodes`);
//! - each node writes `node_gb` per checkpoint; the burst buffer takes
//!   `bb_gbps` in total, split evenly between the jobs writing at the same
//!   time (processor sharing); nothing else uses it;
//! - a job stops computing while it writes (its nodes lose the write's
//!   duration: node-hours lost to checkpointing); it computes while it
//!   waits for a grant (its checkpoint is only late);
//! - node failures are independent with mean time between failures
//!   `node_mtbf_h`; a job of n nodes fails every `node_mtbf_h / n` hours on
//!   average, and checkpoints after Daly's interval for its own cost alone;
//!   failures themselves are not simulated (they would cost both policies
//!   the same rework, plus the rework of late checkpoints, which the
//!   delays bound);
//! - the jobs start at random phases of their intervals; after each
//!   checkpoint the next is due one interval later.
use balance::ckpt::{Answer, Coordinator, Policy};
use rand::{Rng, SeedableRng};
use std::time::Duration;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Params {
    pub nodes: u32,
    pub jobs: u32,
    pub min_job: u32,
    pub max_job: u32,
    pub node_gb: f64,
    pub bb_gbps: f64,
    pub node_mtbf_h: f64,
    pub hours: f64,
    pub policy: Policy,
    pub max_delay_s: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub policy: Policy,
    pub nodes: u32,
    pub jobs: u32,
    pub checkpoints: u64,
    /// Node-hours lost writing checkpoints, and as a share of all.
    pub lost_node_hours: f64,
    pub lost_share: f64,
    /// Due to start of write, seconds: mean and worst.
    pub mean_delay_s: f64,
    pub worst_delay_s: f64,
    /// Writes that shared the buffer with another.
    pub shared_writes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Bad(String),
}

/// Daly's interval for checkpoint cost `delta` and mean time to interrupt
/// `m` (same unit).
pub fn daly(delta: f64, m: f64) -> f64 {
    if delta >= 2.0 * m {
        return m;
    }
    let x = delta / (2.0 * m);
    (2.0 * delta * m).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - delta
}

struct Job {
    nodes: u32,
    gb: f64,
    interval_s: f64,
    next_due: f64,
    /// Writing: GB left; waiting since.
    left: Option<f64>,
    waiting: Option<f64>,
}

pub fn job_sizes(p: &Params, rng: &mut impl Rng) -> Vec<u32> {
    let mut sizes = Vec::new();
    let mut left = p.nodes;
    let (lo, hi) = (
        f64::from(p.min_job.max(1)).ln(),
        f64::from(p.max_job.max(p.min_job).max(1)).ln(),
    );
    for j in 0..p.jobs {
        if left == 0 {
            break;
        }
        let n = if j + 1 == p.jobs {
            left
        } else {
            (rng.gen_range(lo..=hi).exp().round() as u32).clamp(1, left)
        };
        sizes.push(n);
        left -= n;
    }
    sizes
}

pub fn run(p: &Params) -> Result<Outcome, SimError> {
    let bad = |m: &str| Err(SimError::Bad(m.into()));
    if p.nodes == 0 || p.jobs == 0 {
        return bad("nodes and jobs must be at least 1");
    }
    if !(p.node_gb > 0.0 && p.bb_gbps > 0.0 && p.node_mtbf_h > 0.0 && p.hours > 0.0) {
        return bad("node_gb, bb_gbps, node_mtbf_h and hours must be positive");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
    let mut jobs: Vec<Job> = job_sizes(p, &mut rng)
        .into_iter()
        .map(|n| {
            let gb = f64::from(n) * p.node_gb;
            let delta = gb / p.bb_gbps;
            let m = p.node_mtbf_h * 3600.0 / f64::from(n);
            let interval_s = daly(delta, m).max(60.0);
            Job {
                nodes: n,
                gb,
                interval_s,
                next_due: 0.0,
                left: None,
                waiting: None,
            }
        })
        .collect();
    for j in &mut jobs {
        j.next_due = rng.gen_range(0.0..j.interval_s);
    }
    let mut k = Coordinator::new(
        p.policy,
        Duration::from_secs_f64(p.max_delay_s),
        Duration::from_secs(365 * 24 * 3600),
    );
    let end = p.hours * 3600.0;
    let (mut t, mut lost, mut count, mut shared) = (0.0f64, 0.0f64, 0u64, 0u64);
    let (mut delay_sum, mut worst) = (0.0f64, 0.0f64);
    let name = |i: usize| format!("j{i}");
    while t < end {
        // Next event: a due time, the first write to end, or a waiter's
        // delay bound running out.
        let writers = jobs.iter().filter(|j| j.left.is_some()).count();
        let rate = if writers > 0 {
            p.bb_gbps / writers as f64
        } else {
            0.0
        };
        let mut next = end;
        let mut first_end = f64::INFINITY;
        for j in &jobs {
            match (j.left, j.waiting) {
                (Some(gb), _) => first_end = first_end.min(gb / rate),
                (None, Some(since)) => next = next.min(since + p.max_delay_s),
                (None, None) => next = next.min(j.next_due),
            }
        }
        next = next.min(t + first_end).max(t);
        let dt = next - t;
        // Progress of the writers over dt (those with the least left end
        // now, exactly); lost time for their nodes.
        let ending = (t + first_end) <= next;
        for j in &mut jobs {
            if let Some(gb) = j.left.as_mut() {
                let done = ending && *gb / rate <= first_end;
                *gb = if done {
                    0.0
                } else {
                    (*gb - rate * dt).max(1e-12)
                };
                lost += f64::from(j.nodes) * dt;
            }
        }
        t = next;
        // Writes that ended.
        for (i, j) in jobs.iter_mut().enumerate() {
            if j.left == Some(0.0) {
                j.left = None;
                j.next_due = t + j.interval_s;
                let token = k
                    .writing
                    .iter()
                    .find(|g| g.job == name(i))
                    .map(|g| g.token.clone())
                    .unwrap_or_default();
                let _ = k.release(&name(i), &token, t);
            }
        }
        // Who asks now: jobs that are due, the first waiter when nobody
        // writes, and waiters whose delay bound ran out (nothing else
        // can change a waiter's answer: asking again only costs time).
        let front = k.waiting.first().map(|w| w.0.clone());
        let idle = k.writing.is_empty();
        let mut askers: Vec<usize> = (0..jobs.len())
            .filter(|&i| {
                let j = &jobs[i];
                j.left.is_none()
                    && match j.waiting {
                        None => j.next_due <= t,
                        Some(since) => {
                            t - since >= p.max_delay_s - 1e-6
                                || (idle && front.as_deref() == Some(name(i).as_str()))
                        }
                    }
            })
            .collect();
        askers.sort_by(|&a, &b| {
            let since = |i: usize| jobs[i].waiting.unwrap_or(jobs[i].next_due);
            since(a).total_cmp(&since(b))
        });
        for i in askers {
            let j = &mut jobs[i];
            let since = *j.waiting.get_or_insert(j.next_due);
            let Ok(a) = k.acquire(&name(i), (j.gb * 1e9) as u64, t) else {
                continue;
            };
            if let Answer::Granted { shared: s, .. } = a {
                let d = t - since;
                delay_sum += d;
                worst = worst.max(d);
                count += 1;
                shared += u64::from(s);
                j.waiting = None;
                j.left = Some(j.gb);
            }
        }
    }
    let total = f64::from(p.nodes) * end;
    Ok(Outcome {
        policy: p.policy,
        nodes: p.nodes,
        jobs: jobs.len() as u32,
        checkpoints: count,
        lost_node_hours: lost / 3600.0,
        lost_share: lost / total,
        mean_delay_s: if count > 0 {
            delay_sum / count as f64
        } else {
            0.0
        },
        worst_delay_s: worst,
        shared_writes: shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(policy: Policy) -> Params {
        Params {
            nodes: 1000,
            jobs: 20,
            min_job: 8,
            max_job: 256,
            node_gb: 32.0,
            bb_gbps: 10.0,
            node_mtbf_h: 5.0 * 8760.0,
            hours: 168.0,
            policy,
            max_delay_s: 600.0,
            seed: 1,
        }
    }

    #[test]
    fn daly_is_young_for_small_costs_and_capped_by_the_mtti() {
        let y = (2.0f64 * 60.0 * 86400.0).sqrt();
        assert!((daly(60.0, 86400.0) - y).abs() / y < 0.02);
        assert_eq!(daly(10.0, 4.0), 4.0);
    }

    #[test]
    fn job_sizes_add_up_to_the_nodes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let s = job_sizes(&p(Policy::None), &mut rng);
        assert_eq!(s.iter().sum::<u32>(), 1000);
        assert!(s.len() <= 20);
    }

    #[test]
    fn coordination_loses_less_and_bounds_the_delay() {
        let none = run(&p(Policy::None)).unwrap();
        let excl = run(&p(Policy::Exclusive)).unwrap();
        assert!(
            none.checkpoints > 20 && excl.checkpoints > 20,
            "{none:?} {excl:?}"
        );
        assert_eq!(none.worst_delay_s, 0.0);
        assert!(
            excl.lost_node_hours < none.lost_node_hours,
            "{none:?} {excl:?}"
        );
        assert!(excl.worst_delay_s <= 600.0 + 1e-6, "{excl:?}");
        assert!(excl.shared_writes < none.shared_writes);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut q = p(Policy::None);
        q.nodes = 0;
        assert!(run(&q).is_err());
        let mut q = p(Policy::None);
        q.bb_gbps = 0.0;
        assert!(run(&q).is_err());
    }
}
