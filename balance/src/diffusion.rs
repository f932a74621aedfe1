//! Diffusion load balancing (design brief, "Diffusion load balancing"):
//! partitions (nodes) exchange load only with neighbours in the task graph.
//!
//! 1. **Neighbours**: two partitions are neighbours when a task-graph edge
//!    joins them ([`Quotient`]).
//! 2. **Flows**: second-order diffusion (SOS). Every partition i repeats,
//!    with only its neighbours' current loads, `d_ij = (beta - 1) d_ij' +
//!    beta * alpha * (w_i - w_j)` per neighbour j and `w_i -= sum_j d_ij`;
//!    the flow y_ij accumulates the d_ij. A pair stops once its |d_ij| falls
//!    below the threshold ([`flows`]).
//! 3. **Task selection**: each positive flow i -> j is realised by moving
//!    border tasks of i (tasks with an edge into j), highest edge-cut gain
//!    first, until the moved load reaches the flow ([`select`]).
//! 4. **Refinement**: KL/FM-style single moves between neighbouring
//!    partitions that lower the edge-cut and keep both within the
//!    imbalance tolerance ([`refine`]); never increases the edge-cut.
//!
//! Metrics ([`Metrics`]): imbalance = max load / mean load - 1; migration =
//! max tasks moved (in + out) of one partition / mean tasks per partition;
//! edge-cut = weight of edges between partitions.
use std::collections::{BTreeMap, BinaryHeap};

/// A weighted task graph in CSR form (as METIS takes it).
#[derive(Debug, Clone)]
pub struct TaskGraph {
    pub load: Vec<f64>,
    pub xadj: Vec<usize>,
    pub adjncy: Vec<u32>,
    pub adjwgt: Vec<f64>,
}

impl TaskGraph {
    pub fn tasks(&self) -> usize {
        self.load.len()
    }

    /// Neighbours of task `t` with edge weights.
    pub fn edges(&self, t: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        (self.xadj[t]..self.xadj[t + 1]).map(|e| (self.adjncy[e] as usize, self.adjwgt[e]))
    }

    /// A 3-D grid x*y*z of tasks, 6-neighbour stencil, unit edge weights.
    pub fn grid3d(x: usize, y: usize, z: usize) -> TaskGraph {
        let id = |i: usize, j: usize, k: usize| (k * y + j) * x + i;
        let mut xadj = vec![0];
        let mut adjncy = Vec::new();
        for k in 0..z {
            for j in 0..y {
                for i in 0..x {
                    let mut push = |n: usize| adjncy.push(n as u32);
                    if i > 0 {
                        push(id(i - 1, j, k));
                    }
                    if i + 1 < x {
                        push(id(i + 1, j, k));
                    }
                    if j > 0 {
                        push(id(i, j - 1, k));
                    }
                    if j + 1 < y {
                        push(id(i, j + 1, k));
                    }
                    if k > 0 {
                        push(id(i, j, k - 1));
                    }
                    if k + 1 < z {
                        push(id(i, j, k + 1));
                    }
                    xadj.push(adjncy.len());
                }
            }
        }
        let n = x * y * z;
        TaskGraph {
            load: vec![1.0; n],
            adjwgt: vec![1.0; adjncy.len()],
            xadj,
            adjncy,
        }
    }
}

/// Quality of an assignment of tasks to partitions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub imbalance: f64,
    pub migration: f64,
    pub edge_cut: f64,
}

pub fn loads(g: &TaskGraph, part: &[u32], nparts: usize) -> Vec<f64> {
    let mut l = vec![0.0; nparts];
    for (t, p) in part.iter().enumerate() {
        l[*p as usize] += g.load[t];
    }
    l
}

pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean - 1.0
    } else {
        0.0
    }
}

pub fn edge_cut(g: &TaskGraph, part: &[u32]) -> f64 {
    let mut cut = 0.0;
    for t in 0..g.tasks() {
        for (u, w) in g.edges(t) {
            if u > t && part[u] != part[t] {
                cut += w;
            }
        }
    }
    cut
}

/// Max over partitions of tasks moved in or out, over mean tasks per partition.
pub fn migration(before: &[u32], after: &[u32], nparts: usize) -> f64 {
    let mut moved = vec![0usize; nparts];
    for (a, b) in before.iter().zip(after) {
        if a != b {
            moved[*a as usize] += 1;
            moved[*b as usize] += 1;
        }
    }
    let mean = before.len() as f64 / nparts as f64;
    moved.iter().copied().max().unwrap_or(0) as f64 / mean
}

pub fn metrics(g: &TaskGraph, before: &[u32], after: &[u32], nparts: usize) -> Metrics {
    Metrics {
        imbalance: imbalance(&loads(g, after, nparts)),
        migration: migration(before, after, nparts),
        edge_cut: edge_cut(g, after),
    }
}

/// The partition graph: which partitions share task-graph edges.
pub struct Quotient {
    pub neighbours: Vec<Vec<usize>>,
}

impl Quotient {
    pub fn new(g: &TaskGraph, part: &[u32], nparts: usize) -> Quotient {
        let mut sets: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); nparts];
        for t in 0..g.tasks() {
            let p = part[t] as usize;
            for (u, _) in g.edges(t) {
                let q = part[u] as usize;
                if q != p {
                    sets[p].insert(q);
                }
            }
        }
        Quotient {
            neighbours: sets.into_iter().map(|s| s.into_iter().collect()).collect(),
        }
    }
}

/// Parameters of the balancer.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Params {
    /// SOS over-relaxation (1 = first-order diffusion).
    pub beta: f64,
    /// A pair stops when its flow change falls below this share of the mean load.
    pub threshold: f64,
    pub max_iterations: usize,
    /// Refinement keeps every partition within (1 + tolerance) x mean load.
    pub tolerance: f64,
    pub refine_passes: usize,
    /// Flow + selection rounds per step (a round only runs while the
    /// imbalance is above the tolerance): a later round realises what the
    /// border of an earlier one could not.
    pub rounds: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            beta: 1.6,
            threshold: 1e-4,
            max_iterations: 2000,
            tolerance: 0.03,
            refine_passes: 4,
            rounds: 3,
        }
    }
}

/// Net flows between neighbouring partitions: `flow[(i, j)]` with i < j,
/// positive from i to j. Computed by the SOS iteration, every partition
/// using only its own and its neighbours' loads. Also returns the number of
/// iterations.
pub fn flows(q: &Quotient, loads: &[f64], p: &Params) -> (BTreeMap<(usize, usize), f64>, usize) {
    let n = loads.len();
    let mean = loads.iter().sum::<f64>() / n.max(1) as f64;
    let eps = p.threshold * mean.max(f64::MIN_POSITIVE);
    let max_deg = q.neighbours.iter().map(Vec::len).max().unwrap_or(0);
    let alpha = 1.0 / (max_deg as f64 + 1.0);
    let mut w = loads.to_vec();
    // Per directed edge (i, j) with i < j: last delta, total flow, stopped.
    let mut state: BTreeMap<(usize, usize), (f64, f64, bool)> = BTreeMap::new();
    for (i, ns) in q.neighbours.iter().enumerate() {
        for &j in ns {
            if i < j {
                state.insert((i, j), (0.0, 0.0, false));
            }
        }
    }
    let mut iterations = 0;
    for it in 0..p.max_iterations {
        iterations = it + 1;
        let beta = if it == 0 { 1.0 } else { p.beta };
        let mut change = vec![0.0; n];
        let mut active = false;
        for ((i, j), (last, total, stopped)) in state.iter_mut() {
            if *stopped {
                // A stopped pair wakes up when load reaches it again
                // (on a chain the wave arrives some iterations later).
                if (alpha * (w[*i] - w[*j])).abs() < eps {
                    continue;
                }
                *stopped = false;
                *last = 0.0;
            }
            let d = (beta - 1.0) * *last + beta * alpha * (w[*i] - w[*j]);
            *last = d;
            *total += d;
            change[*i] -= d;
            change[*j] += d;
            if d.abs() < eps {
                *stopped = true;
            } else {
                active = true;
            }
        }
        for (x, c) in w.iter_mut().zip(&change) {
            *x += c;
        }
        if !active {
            break;
        }
    }
    (
        state
            .into_iter()
            .map(|(k, (_, total, _))| (k, total))
            .collect(),
        iterations,
    )
}

/// Gain of moving task `t` to partition `to`: edge weight into `to` minus
/// edge weight staying home.
fn gain(g: &TaskGraph, part: &[u32], t: usize, to: u32) -> f64 {
    let home = part[t];
    g.edges(t)
        .map(|(u, w)| {
            if part[u] == to {
                w
            } else if part[u] == home {
                -w
            } else {
                0.0
            }
        })
        .sum()
}

#[derive(PartialEq)]
struct Cand(f64, usize);
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// A pair's view of the two partitions' current loads, so that a move
/// never leaves the receiver heavier than the sender unless the receiver
/// stays within the limit.
struct PairLoads<'a> {
    loads: &'a mut [f64],
    limit: f64,
}

/// Whether moving a task between two loaded partitions (or hosts) is
/// allowed: the receiver (load `to`, gaining `into`) must end within
/// `limit` or no heavier than the sender (load `from`, losing `out`).
/// Pass `limit = f64::NEG_INFINITY` for "never heavier than the sender".
pub fn admits(from: f64, to: f64, out: f64, into: f64, limit: f64) -> bool {
    to + into <= limit.max(from - out)
}

impl PairLoads<'_> {
    fn admits(&self, from: u32, to: u32, load: f64) -> bool {
        let (f, t) = (self.loads[from as usize], self.loads[to as usize]);
        admits(f, t, load, load, self.limit)
    }

    fn shift(&mut self, from: u32, to: u32, load: f64) {
        self.loads[from as usize] -= load;
        self.loads[to as usize] += load;
    }
}

/// Moves border tasks from `from` to `to` until `amount` load has moved
/// (or no border task is left), best gain first. Returns the load moved.
fn move_border(
    g: &TaskGraph,
    part: &mut [u32],
    members: &[usize],
    (from, to): (u32, u32),
    amount: f64,
    pl: &mut PairLoads,
) -> f64 {
    let mut heap = BinaryHeap::new();
    for &t in members {
        if part[t] == from && g.edges(t).any(|(u, _)| part[u] == to) {
            heap.push(Cand(gain(g, part, t, to), t));
        }
    }
    let mut moved = 0.0;
    while let Some(Cand(gn, t)) = heap.pop() {
        if moved >= amount || part[t] != from {
            continue;
        }
        let now = gain(g, part, t, to);
        if (now - gn).abs() > 1e-12 {
            heap.push(Cand(now, t)); // stale: re-queue with the current gain
            continue;
        }
        // Do not overshoot by more than half of this task, nor overload
        // the receiver.
        if moved + g.load[t] > amount + g.load[t] / 2.0 || !pl.admits(from, to, g.load[t]) {
            continue;
        }
        part[t] = to;
        moved += g.load[t];
        pl.shift(from, to, g.load[t]);
        for (u, _) in g.edges(t) {
            if part[u] == from {
                heap.push(Cand(gain(g, part, u, to), u));
            }
        }
    }
    moved
}

/// Realises `flows` by moving border tasks. Every partition handles its own
/// outflows, largest first, touching only its tasks and the border with
/// the receiving neighbour. What one pair could not realise (flows smaller
/// than a task) carries over to the next pair of the same partition, so
/// many small outflows still add up to whole tasks.
pub fn select(
    g: &TaskGraph,
    part: &mut [u32],
    nparts: usize,
    flows: &BTreeMap<(usize, usize), f64>,
    p: &Params,
) {
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); nparts];
    for (t, p) in part.iter().enumerate() {
        members[*p as usize].push(t);
    }
    let mut l = loads(g, part, nparts);
    let limit = (1.0 + p.tolerance) * l.iter().sum::<f64>() / nparts as f64;
    let mut pl = PairLoads {
        loads: &mut l,
        limit,
    };
    let mut out: Vec<Vec<(usize, f64)>> = vec![Vec::new(); nparts];
    for (&(i, j), &f) in flows {
        if f > 0.0 {
            out[i].push((j, f));
        } else if f < 0.0 {
            out[j].push((i, -f));
        }
    }
    for (from, mut targets) in out.into_iter().enumerate() {
        targets.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut wanted, mut moved) = (0.0, 0.0);
        for (to, amount) in targets {
            wanted += amount;
            if wanted - moved <= 0.0 {
                continue;
            }
            moved += move_border(
                g,
                part,
                &members[from],
                (from as u32, to as u32),
                wanted - moved,
                &mut pl,
            );
        }
    }
}

/// FM-style refinement between neighbouring partitions, in passes. First
/// a partition above the tolerance hands border tasks to its lightest
/// neighbour (best gain first) while that neighbour stays within the
/// tolerance or lighter than the sender; then single border tasks move
/// where that lowers the edge-cut and both sides stay within the
/// tolerance. The second kind of move never raises the edge-cut.
pub fn refine(g: &TaskGraph, part: &mut [u32], nparts: usize, p: &Params) {
    let mut l = loads(g, part, nparts);
    let mean = l.iter().sum::<f64>() / nparts as f64;
    let limit = (1.0 + p.tolerance) * mean;
    for _ in 0..p.refine_passes {
        let mut moved = false;
        // Balance: overloaded partitions shed border tasks.
        for t in 0..g.tasks() {
            let home = part[t];
            if l[home as usize] <= limit {
                continue;
            }
            let mut best: Option<(f64, f64, u32)> = None; // (load, -gain, to)
            for (u, _) in g.edges(t) {
                let to = part[u];
                if to == home {
                    continue;
                }
                let key = (l[to as usize], -gain(g, part, t, to), to);
                if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                    best = Some(key);
                }
            }
            if let Some((lt, _, to)) = best {
                let lf = l[home as usize];
                if lt + g.load[t] <= limit.max(lf - g.load[t]) {
                    part[t] = to;
                    l[home as usize] -= g.load[t];
                    l[to as usize] += g.load[t];
                    moved = true;
                }
            }
        }
        // Cut: single moves with positive gain within the tolerance.
        for t in 0..g.tasks() {
            let home = part[t];
            // The best neighbouring partition for t.
            let mut best: Option<(f64, u32)> = None;
            for (u, _) in g.edges(t) {
                let to = part[u];
                if to == home {
                    continue;
                }
                let gn = gain(g, part, t, to);
                if gn > 1e-12 && best.is_none_or(|(b, _)| gn > b) {
                    best = Some((gn, to));
                }
            }
            if let Some((_, to)) = best {
                if l[to as usize] + g.load[t] <= limit {
                    part[t] = to;
                    l[home as usize] -= g.load[t];
                    l[to as usize] += g.load[t];
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
}

/// One balancing step: neighbours, flows, task selection, refinement.
/// Returns the new assignment and the diffusion iterations used.
pub fn balance(g: &TaskGraph, part: &[u32], nparts: usize, p: &Params) -> (Vec<u32>, usize) {
    let mut next = part.to_vec();
    let mut iterations = 0;
    for _ in 0..p.rounds.max(1) {
        let l = loads(g, &next, nparts);
        if imbalance(&l) <= p.tolerance {
            break;
        }
        let q = Quotient::new(g, &next, nparts);
        let (f, its) = flows(&q, &l, p);
        iterations += its;
        select(g, &mut next, nparts, &f, p);
    }
    refine(g, &mut next, nparts, p);
    (next, iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1-D chain of `parts` partitions of `per` tasks each.
    fn chain(parts: usize, per: usize) -> (TaskGraph, Vec<u32>) {
        let g = TaskGraph::grid3d(parts * per, 1, 1);
        let part = (0..parts * per).map(|t| (t / per) as u32).collect();
        (g, part)
    }

    #[test]
    fn flows_conserve_load_and_balance_a_known_imbalance() {
        // Three partitions in a row with loads 30, 0, 0 (mean 10).
        let q = Quotient {
            neighbours: vec![vec![1], vec![0, 2], vec![1]],
        };
        let (f, _) = flows(&q, &[30.0, 0.0, 0.0], &Params::default());
        let f01 = f[&(0, 1)];
        let f12 = f[&(1, 2)];
        // 20 leaves partition 0, 10 of it goes on to partition 2.
        assert!((f01 - 20.0).abs() < 0.1, "{f:?}");
        assert!((f12 - 10.0).abs() < 0.1, "{f:?}");
        // Conservation: what leaves equals what arrives.
        let after = [30.0 - f01, f01 - f12, f12];
        assert!((after.iter().sum::<f64>() - 30.0).abs() < 1e-9);
    }

    #[test]
    fn balancing_moves_border_tasks_and_conserves_tasks() {
        let (mut g, part) = chain(4, 50);
        // Partition 0's tasks are 3x heavier.
        for t in 0..50 {
            g.load[t] = 3.0;
        }
        let before = imbalance(&loads(&g, &part, 4));
        let (next, _) = balance(&g, &part, 4, &Params::default());
        let after = imbalance(&loads(&g, &next, 4));
        assert!(before > 0.9 && after < 0.1, "{before} -> {after}");
        assert_eq!(next.len(), part.len());
        assert!(
            (loads(&g, &next, 4).iter().sum::<f64>() - loads(&g, &part, 4).iter().sum::<f64>())
                .abs()
                < 1e-9
        );
        // A chain stays a chain: every partition is contiguous (edge-cut 3).
        assert_eq!(edge_cut(&g, &next), 3.0);
    }

    #[test]
    fn refinement_respects_the_tolerance_and_never_raises_the_cut() {
        let g = TaskGraph::grid3d(8, 8, 1);
        // A checkerboard-ish bad partition into 2 parts.
        let mut part: Vec<u32> = (0..64)
            .map(|t| ((t % 8) / 4 + (t / 32)) as u32 % 2)
            .collect();
        part[9] = 1 - part[9];
        let cut = edge_cut(&g, &part);
        let p = Params {
            tolerance: 0.05,
            ..Params::default()
        };
        let l0 = loads(&g, &part, 2);
        refine(&g, &mut part, 2, &p);
        assert!(edge_cut(&g, &part) <= cut);
        let mean = 32.0;
        for l in loads(&g, &part, 2) {
            assert!(
                l <= (1.0 + p.tolerance) * mean || l <= l0.iter().copied().fold(0.0, f64::max),
                "{l}"
            );
        }
    }

    #[test]
    fn metrics_of_a_known_assignment() {
        let (g, part) = chain(2, 4);
        let mut moved = part.clone();
        moved[3] = 1;
        let m = metrics(&g, &part, &moved, 2);
        assert!((m.imbalance - 0.25).abs() < 1e-9);
        assert!((m.migration - 0.25).abs() < 1e-9); // 1 task each side over 4 per part
        assert_eq!(m.edge_cut, 1.0);
    }
}
