//! A discrete-event simulator of a gossiping colony, running the same
//! [`Board`] code as the daemon.
//!
//! Each node gets a random phase in [0, 1) and gossips at k + phase for
//! every time unit k; messages take `transit` time units and are lost with
//! probability `loss`. The colony starts with everyone knowing everyone's
//! entry as of time 0, warms up until the time is at least five times the
//! average age (and at least 20 units), then measures for `steps` units,
//! sampling the average age at the end of each. The average age is the
//! mean over live nodes of the mean age of their entries for live origins,
//! own entry included.
//!
//! Large colonies: each node's vector has N entries, so N x N is too much
//! memory beyond a few thousand nodes. The simulator can track a uniform
//! sample of K origins (`track`): every entry spreads independently of the
//! others given who talks to whom, so the sample's mean age is an unbiased
//! estimate of the whole vector's, and bytes per message are scaled by N/K.
use balance::gossip::{wire, Board, Sent, Time, Window};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, serde::Serialize)]
pub struct SimConfig {
    pub nodes: usize,
    pub window: Window,
    /// Time units measured after the warm-up.
    pub steps: u64,
    pub seed: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Time units a message is on its way.
    pub transit: f64,
    /// Origins tracked (N: all of them).
    pub track: usize,
    /// Fraction of nodes that fail when the measurement starts.
    pub failures: f64,
    /// Upper bound of the warm-up in time units.
    pub max_warmup: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SimResult {
    pub nodes: usize,
    pub window: String,
    pub tracked: usize,
    pub seed: u64,
    pub loss: f64,
    pub transit: f64,
    pub warmup_steps: u64,
    pub steps: u64,
    /// Mean of the per-unit samples.
    pub avg_age: f64,
    pub avg_age_min: f64,
    pub avg_age_max: f64,
    pub msgs_per_node_step: f64,
    pub entries_per_msg: f64,
    pub bytes_per_node_step: f64,
    pub failed_nodes: usize,
    /// Mean age, at the end, of the failed nodes' entries on live nodes.
    pub failed_entry_age: Option<f64>,
    /// Simulation speed (gossip events per wall-clock second).
    pub node_steps_per_sec: f64,
    /// The warm-up hit `max_warmup` before the age settled.
    pub warmup_capped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--nodes must be at least 2 (got {0})")]
    Nodes(usize),
    #[error("--track must be between 1 and the number of nodes")]
    Track,
    #[error("--loss and --failures are fractions in [0, 1)")]
    Fraction,
    #[error("--transit must be between 0 and 1 time unit")]
    Transit,
}

/// A message on its way.
struct InFlight {
    at: Time,
    to: usize,
    entries: Vec<Sent<()>>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at)
    }
}

struct Colony {
    boards: Vec<Board<()>>,
    alive: Vec<bool>,
    /// Per tracked slot: sum of `produced` over live nodes (for the mean age).
    slot_sum: Vec<f64>,
    /// The tracked slot of each node, if any.
    slot_of: Vec<Option<usize>>,
    origin_alive: Vec<bool>,
    live_nodes: usize,
}

impl Colony {
    fn avg_age(&self, now: Time) -> f64 {
        let (mut sum, mut n) = (0.0, 0usize);
        for (s, total) in self.slot_sum.iter().enumerate() {
            if self.origin_alive[s] {
                sum += total;
                n += 1;
            }
        }
        if n == 0 || self.live_nodes == 0 {
            return 0.0;
        }
        now - sum / (n * self.live_nodes) as f64
    }

    fn deliver(&mut self, at: Time, to: usize, transit: Time, entries: &[Sent<()>]) {
        if !self.alive[to] {
            return;
        }
        let sums = &mut self.slot_sum;
        self.boards[to].merge(at, transit, entries, |slot, old, new| {
            sums[slot] += new - old;
        });
    }

    fn fail(&mut self, node: usize) {
        if !self.alive[node] {
            return;
        }
        self.alive[node] = false;
        self.live_nodes -= 1;
        for (s, e) in self.boards[node].entries().iter().enumerate() {
            self.slot_sum[s] -= e.produced;
        }
        if let Some(s) = self.slot_of[node] {
            self.origin_alive[s] = false;
        }
    }
}

pub fn run(c: &SimConfig) -> Result<SimResult, Error> {
    if c.nodes < 2 {
        return Err(Error::Nodes(c.nodes));
    }
    if c.track == 0 || c.track > c.nodes {
        return Err(Error::Track);
    }
    if !(0.0..1.0).contains(&c.loss) || !(0.0..1.0).contains(&c.failures) {
        return Err(Error::Fraction);
    }
    if !(0.0..=1.0).contains(&c.transit) {
        return Err(Error::Transit);
    }
    let started = std::time::Instant::now();
    let n = c.nodes;
    let k = c.track;
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    // Tracked origins: all, or a uniform sample.
    let tracked: Vec<usize> = if k == n {
        (0..n).collect()
    } else {
        let mut v = sample(&mut rng, n, k).into_vec();
        v.sort_unstable();
        v
    };
    let mut slot_of = vec![None; n];
    for (s, &node) in tracked.iter().enumerate() {
        slot_of[node] = Some(s);
    }
    let mut colony = Colony {
        boards: (0..n)
            .map(|node| {
                let mut b = Board::new(k, slot_of[node], c.window);
                b.know_all(0.0);
                b
            })
            .collect(),
        alive: vec![true; n],
        slot_sum: vec![0.0; k],
        slot_of,
        origin_alive: vec![true; k],
        live_nodes: n,
    };
    // Phases, and the order in which nodes fire within a unit.
    let phase: Vec<f64> = (0..n).map(|_| rng.gen::<f64>()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| phase[*a].total_cmp(&phase[*b]));

    let scale = n as f64 / k as f64;
    let mut in_flight: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut buf: Vec<Sent<()>> = Vec::new();
    let (mut msgs, mut entries_sent, mut bytes) = (0u64, 0f64, 0f64);
    let mut samples: Vec<f64> = Vec::new();
    let mut warmup = None;
    let mut capped = false;
    let mut events = 0u64;
    let mut unit = 0u64;
    loop {
        let measuring = warmup.is_some();
        for &node in &order {
            let t = unit as f64 + phase[node];
            while in_flight.peek().is_some_and(|m| m.at <= t) {
                if let Some(m) = in_flight.pop() {
                    colony.deliver(m.at, m.to, c.transit, &m.entries);
                }
            }
            if !colony.alive[node] {
                continue;
            }
            events += 1;
            let board = &mut colony.boards[node];
            if let Some((slot, old)) = board.refresh(t, 0, ()) {
                colony.slot_sum[slot] += t - old;
            }
            board.select(t, &mut buf);
            let mut to = rng.gen_range(0..n - 1);
            if to >= node {
                to += 1;
            }
            if measuring {
                msgs += 1;
                entries_sent += buf.len() as f64 * scale;
                bytes +=
                    wire::HEADER_BYTES as f64 + buf.len() as f64 * scale * wire::ENTRY_BYTES as f64;
            }
            if c.loss > 0.0 && rng.gen::<f64>() < c.loss {
                continue;
            }
            if c.transit > 0.0 {
                in_flight.push(InFlight {
                    at: t + c.transit,
                    to,
                    entries: buf.clone(),
                });
            } else {
                colony.deliver(t, to, 0.0, &buf);
            }
        }
        unit += 1;
        let now = unit as f64;
        let age = colony.avg_age(now);
        match warmup {
            Some(w) => {
                samples.push(age);
                if unit - w >= c.steps {
                    break;
                }
            }
            None => {
                let settled = now >= 20.0 && now >= 5.0 * age;
                capped = unit >= c.max_warmup;
                if settled || capped {
                    warmup = Some(unit);
                    let fail = (c.failures * n as f64).round() as usize;
                    for node in sample(&mut rng, n, fail).into_iter() {
                        colony.fail(node);
                    }
                }
            }
        }
    }
    let now = unit as f64;
    let failed: Vec<usize> = (0..n).filter(|i| !colony.alive[*i]).collect();
    let failed_entry_age = (!failed.is_empty()).then(|| {
        let (mut sum, mut cnt) = (0.0, 0usize);
        for (node, b) in colony.boards.iter().enumerate() {
            if !colony.alive[node] {
                continue;
            }
            for &f in &failed {
                if let Some(s) = colony.slot_of[f] {
                    sum += now - b.entries()[s].produced;
                    cnt += 1;
                }
            }
        }
        if cnt == 0 {
            f64::NAN
        } else {
            sum / cnt as f64
        }
    });
    let measured = samples.len().max(1) as f64;
    let node_steps = (colony.live_nodes as f64 * measured).max(1.0);
    Ok(SimResult {
        nodes: n,
        window: c.window.to_string(),
        tracked: k,
        seed: c.seed,
        loss: c.loss,
        transit: c.transit,
        warmup_steps: warmup.unwrap_or(unit),
        steps: samples.len() as u64,
        avg_age: samples.iter().sum::<f64>() / measured,
        avg_age_min: samples.iter().copied().fold(f64::INFINITY, f64::min),
        avg_age_max: samples.iter().copied().fold(0.0, f64::max),
        msgs_per_node_step: msgs as f64 / node_steps,
        entries_per_msg: entries_sent / (msgs.max(1) as f64),
        bytes_per_node_step: bytes / node_steps,
        failed_nodes: failed.len(),
        failed_entry_age,
        node_steps_per_sec: events as f64 / started.elapsed().as_secs_f64().max(1e-9),
        warmup_capped: capped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: usize, window: Window) -> SimConfig {
        SimConfig {
            nodes,
            window,
            steps: 50,
            seed: 7,
            loss: 0.0,
            transit: 0.0,
            track: nodes,
            failures: 0.0,
            max_warmup: 100_000,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_result() {
        let a = run(&cfg(64, Window::Age(3.0))).unwrap();
        let b = run(&cfg(64, Window::Age(3.0))).unwrap();
        assert_eq!(
            (a.avg_age, a.bytes_per_node_step),
            (b.avg_age, b.bytes_per_node_step)
        );
        let mut other = cfg(64, Window::Age(3.0));
        other.seed = 8;
        assert_ne!(run(&other).unwrap().avg_age, a.avg_age);
    }

    #[test]
    fn a_small_colony_converges_and_the_whole_vector_is_freshest() {
        let whole = run(&cfg(128, Window::Whole)).unwrap();
        // Push gossip of the whole vector: ages near log2(N) + a few units.
        assert!(whole.avg_age > 2.0 && whole.avg_age < 15.0, "{whole:?}");
        assert!(!whole.warmup_capped);
        assert!((whole.msgs_per_node_step - 1.0).abs() < 1e-9);
        // Every message carries the whole vector.
        assert!((whole.entries_per_msg - 128.0).abs() < 1e-9);
        let small = run(&cfg(128, Window::Age(2.0))).unwrap();
        assert!(small.avg_age > whole.avg_age, "{small:?} vs {whole:?}");
        assert!(small.bytes_per_node_step < whole.bytes_per_node_step / 4.0);
    }

    #[test]
    fn a_small_window_lets_the_age_grow_with_the_colony() {
        let a = run(&cfg(128, Window::Age(2.0))).unwrap();
        let b = run(&cfg(512, Window::Age(2.0))).unwrap();
        assert!(b.avg_age > 2.5 * a.avg_age, "{a:?} {b:?}");
    }

    #[test]
    fn sampling_origins_estimates_the_whole() {
        let full = run(&cfg(512, Window::Age(4.0))).unwrap();
        let mut s = cfg(512, Window::Age(4.0));
        s.track = 64;
        let sampled = run(&s).unwrap();
        let rel = (sampled.avg_age - full.avg_age).abs() / full.avg_age;
        assert!(rel < 0.25, "{full:?} {sampled:?}");
        let relb = (sampled.bytes_per_node_step - full.bytes_per_node_step).abs()
            / full.bytes_per_node_step;
        assert!(relb < 0.25, "{full:?} {sampled:?}");
    }

    #[test]
    fn loss_transit_and_failures() {
        let base = run(&cfg(256, Window::Age(4.0))).unwrap();
        let mut lossy = cfg(256, Window::Age(4.0));
        lossy.loss = 0.3;
        let l = run(&lossy).unwrap();
        assert!(l.avg_age > base.avg_age, "{base:?} {l:?}");
        let mut slow = cfg(256, Window::Age(4.0));
        slow.transit = 0.5;
        let t = run(&slow).unwrap();
        assert!(t.avg_age > base.avg_age, "{base:?} {t:?}");
        let mut failing = cfg(256, Window::Whole);
        failing.failures = 0.1;
        failing.steps = 100;
        let f = run(&failing).unwrap();
        assert_eq!(f.failed_nodes, 26);
        // The live colony stays fresh; the dead nodes' entries age out.
        assert!(f.avg_age < 15.0, "{f:?}");
        assert!(f.failed_entry_age.unwrap() > 80.0, "{f:?}");
        for bad in [
            SimConfig {
                nodes: 1,
                ..cfg(2, Window::Whole)
            },
            SimConfig {
                loss: 1.0,
                ..cfg(8, Window::Whole)
            },
            SimConfig {
                track: 0,
                ..cfg(8, Window::Whole)
            },
        ] {
            assert!(run(&bad).is_err());
        }
    }
}
