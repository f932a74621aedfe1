//! A discrete-event simulator of one broadcast over `n` nodes, in the
//! LogP style, driving the same [`Node`] state machine as the real
//! runtime.
//!
//! Model (what the figures assume):
//! - a node sends one message at a time: each send keeps it busy for the
//!   overhead `o`; the message arrives `L` after the send ends;
//! - receiving is free and a node reacts at once (a real node's receive
//!   overhead would add to `o`);
//! - no message is lost; nodes fail by stopping, before the broadcast
//!   starts (`failures` of them, chosen at random, never the origin), and
//!   never answer: messages to them are counted and dropped;
//! - time is counted in units of `L` (1.0 = one network latency);
//! - a node informed by the tree starts correcting when the tree would be
//!   done without failures ([`Tree::completion`]; clocks are exact here);
//!   one informed by a correction starts at once.
//!
//! Results: whether every live node got the message, when the last one
//! did (and when the tree alone would have been done without failures:
//! `log2(n)` rounds), how many messages were sent (per live node), how
//! many went to dead nodes, and how many live nodes only the correction
//! reached.
use crate::node::Dir;
use crate::{Kind, Node, Tree};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Params {
    pub n: u32,
    /// Share of nodes that are dead (0.0-0.5).
    pub failures: f64,
    pub tree: Tree,
    /// Network latency L and send overhead o, in the same unit.
    pub latency: f64,
    pub overhead: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub n: u32,
    pub dead: u32,
    pub tree: Tree,
    pub failures: f64,
    pub seed: u64,
    /// Every live node got it.
    pub reached_all: bool,
    pub live_missed: u32,
    /// When the last live node got it, in units of L.
    pub latency: f64,
    /// Messages sent, all and per live node; of them, to dead nodes.
    pub messages: u64,
    pub messages_per_node: f64,
    pub correction_messages: u64,
    pub to_dead: u64,
    /// Live nodes the tree missed (informed by a correction message).
    pub reached_by_correction: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("a broadcast needs at least one node")]
    Empty,
    #[error("failures = {0}: want a share between 0 and 0.5")]
    Failures(f64),
    #[error("latency and overhead must be positive")]
    Timing,
}

/// Simulated time in integer ticks (1/1000 of the unit) so that events
/// order exactly.
const TICKS: f64 = 1000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Node `0` may send its next message.
    Wake(u32),
    /// A message arrives at `to` from `from` (kind 0 tree, 1 correction
    /// going up, 2 correction going down).
    Arrive { to: u32, from: u32, kind: u8 },
}

pub fn run(p: &Params) -> Result<Outcome, SimError> {
    if p.n == 0 {
        return Err(SimError::Empty);
    }
    if !(0.0..=0.5).contains(&p.failures) {
        return Err(SimError::Failures(p.failures));
    }
    if !(p.latency > 0.0 && p.overhead > 0.0) {
        return Err(SimError::Timing);
    }
    let n = p.n;
    let root = 0u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
    let mut dead = vec![false; n as usize];
    let kill = ((f64::from(n) - 1.0) * p.failures).round() as usize;
    let mut others: Vec<u32> = (1..n).collect();
    others.shuffle(&mut rng);
    for &d in &others[..kill] {
        dead[d as usize] = true;
    }
    let o = (p.overhead * TICKS).round().max(1.0) as u64;
    let l = (p.latency * TICKS).round().max(1.0) as u64;

    let tree_end = (p.tree.completion(n, p.latency, p.overhead) * TICKS).round() as u64;
    let mut nodes: Vec<Node> = (0..n).map(|r| Node::new(r, n, p.tree)).collect();
    let mut informed_at = vec![u64::MAX; n as usize];
    // A node has at most one Wake queued; `busy` is when its last send ends.
    let mut scheduled = vec![false; n as usize];
    let mut busy = vec![0u64; n as usize];
    let mut by_correction = 0u32;
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |q: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, t: u64, e: Event| {
        seq += 1;
        q.push(Reverse((t, seq, e)));
    };
    nodes[root as usize].originate();
    informed_at[root as usize] = 0;
    push(&mut queue, 0, Event::Wake(root));
    scheduled[root as usize] = true;
    let (mut messages, mut corrections, mut to_dead) = (0u64, 0u64, 0u64);
    while let Some(Reverse((t, _, e))) = queue.pop() {
        match e {
            Event::Wake(r) => {
                scheduled[r as usize] = false;
                let node = &mut nodes[r as usize];
                let from = if node.by_tree() { tree_end } else { 0 };
                let correcting = t >= from;
                let Some(s) = node.next_send(correcting) else {
                    if !correcting && node.has_work() {
                        scheduled[r as usize] = true;
                        push(&mut queue, from, Event::Wake(r));
                    }
                    continue;
                };
                messages += 1;
                if s.kind == Kind::Correction {
                    corrections += 1;
                }
                if dead[s.to as usize] {
                    to_dead += 1;
                } else {
                    let kind = match s.dir {
                        None => 0,
                        Some(Dir::Up) => 1,
                        Some(Dir::Down) => 2,
                    };
                    let arrive = Event::Arrive {
                        to: s.to,
                        from: r,
                        kind,
                    };
                    push(&mut queue, t + o + l, arrive);
                }
                busy[r as usize] = t + o;
                scheduled[r as usize] = true;
                push(&mut queue, t + o, Event::Wake(r));
            }
            Event::Arrive { to, from, kind } => {
                let (kind, dir) = match kind {
                    0 => (Kind::Tree, None),
                    1 => (Kind::Correction, Some(Dir::Up)),
                    _ => (Kind::Correction, Some(Dir::Down)),
                };
                let i = to as usize;
                if nodes[i].receive(from, root, kind, dir) {
                    informed_at[i] = t;
                    if kind == Kind::Correction {
                        by_correction += 1;
                    }
                }
                // Informed now, or owing an answer: wake it if it is idle.
                if !scheduled[i] && nodes[i].has_work() {
                    scheduled[i] = true;
                    push(&mut queue, t.max(busy[i]), Event::Wake(to));
                }
            }
        }
    }
    let live = (0..n as usize).filter(|&i| !dead[i]);
    let missed = live.clone().filter(|&i| informed_at[i] == u64::MAX).count() as u32;
    let last = live
        .filter(|&i| informed_at[i] != u64::MAX)
        .map(|i| informed_at[i])
        .max()
        .unwrap_or(0);
    let live_n = n - kill as u32;
    Ok(Outcome {
        n,
        dead: kill as u32,
        tree: p.tree,
        failures: p.failures,
        seed: p.seed,
        reached_all: missed == 0,
        live_missed: missed,
        latency: last as f64 / TICKS / p.latency,
        messages,
        messages_per_node: messages as f64 / f64::from(live_n.max(1)),
        correction_messages: corrections,
        to_dead,
        reached_by_correction: by_correction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32, failures: f64, tree: Tree, seed: u64) -> Params {
        Params {
            n,
            failures,
            tree,
            latency: 1.0,
            overhead: 0.2,
            seed,
        }
    }

    #[test]
    fn without_failures_the_tree_reaches_everyone_in_log_rounds() {
        let r = run(&p(1024, 0.0, Tree::Interleaved, 1)).unwrap();
        assert!(r.reached_all);
        // Some leaves hear a neighbour's correction before their tree
        // message: it only makes them earlier.
        // 10 tree levels of (o + L), plus the sends queued before them.
        assert!(r.latency <= 10.0 * 1.2 + 2.0, "{r:?}");
        // The tree's n - 1 messages and the corrections a node sends
        // while its neighbours' first ones are on the way: about 2 + 2L/o
        // each (the sends go on, one per o, until the answer is there).
        assert!(r.messages >= 1023);
        assert!(r.messages_per_node < 2.0 + 2.0 / 0.2 + 1.0, "{r:?}");
        // With a send gap as long as the latency, a handful.
        let slow = run(&Params {
            overhead: 1.0,
            ..p(1024, 0.0, Tree::Interleaved, 1)
        })
        .unwrap();
        assert!(slow.reached_all && slow.messages_per_node < 6.0, "{slow:?}");
    }

    #[test]
    fn every_live_node_is_reached_despite_failures() {
        for tree in [Tree::Interleaved, Tree::Contiguous] {
            for seed in 0..5 {
                for f in [0.01, 0.1, 0.3, 0.5] {
                    let r = run(&p(500, f, tree, seed)).unwrap();
                    assert!(r.reached_all, "{r:?}");
                    assert!(r.dead > 0);
                }
            }
        }
        // Tiny rings: one node, two, everyone else dead.
        assert!(run(&p(1, 0.0, Tree::Interleaved, 0)).unwrap().reached_all);
        assert!(run(&p(2, 0.5, Tree::Interleaved, 0)).unwrap().reached_all);
    }

    #[test]
    fn interleaved_subtrees_heal_faster_than_contiguous_ones() {
        let mean = |tree| {
            (0..5)
                .map(|s| run(&p(4096, 0.02, tree, s)).unwrap().latency)
                .sum::<f64>()
                / 5.0
        };
        let (i, c) = (mean(Tree::Interleaved), mean(Tree::Contiguous));
        assert!(i < c, "interleaved {i:.1} vs contiguous {c:.1}");
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(matches!(
            run(&p(0, 0.0, Tree::Interleaved, 0)),
            Err(SimError::Empty)
        ));
        assert!(matches!(
            run(&p(10, 0.9, Tree::Interleaved, 0)),
            Err(SimError::Failures(_))
        ));
        let mut q = p(10, 0.0, Tree::Interleaved, 0);
        q.latency = 0.0;
        assert!(matches!(run(&q), Err(SimError::Timing)));
    }
}
