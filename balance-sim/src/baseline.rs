//! The baseline diffusion is compared against: METIS k-way partitioning
//! from scratch (the `metis` crate, METIS 5 built from its vendored
//! source), optionally followed by a relabelling that maps every new part
//! to the old part it overlaps most ("scratch-remap"), so that tasks that
//! could stay where they are do.
use balance::diffusion::{Params, TaskGraph};
use metis::Idx;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the task graph is too large for METIS' 32-bit indices")]
    TooLarge,
    #[error("METIS cannot take this graph: {0}")]
    Graph(String),
    #[error("METIS failed: {0}")]
    Metis(String),
}

static METIS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Load is given to METIS as integers: this many units per unit of load.
pub const LOAD_SCALE: f64 = 10.0;

/// Partitions `g` into `nparts` from scratch with METIS k-way, allowing
/// the same imbalance as the diffusion's refinement tolerance.
pub fn partition(g: &TaskGraph, nparts: usize, p: &Params, seed: u64) -> Result<Vec<u32>, Error> {
    let idx = |v: usize| Idx::try_from(v).map_err(|_| Error::TooLarge);
    let xadj: Vec<Idx> = g.xadj.iter().map(|&v| idx(v)).collect::<Result<_, _>>()?;
    let adjncy: Vec<Idx> = g
        .adjncy
        .iter()
        .map(|&v| idx(v as usize))
        .collect::<Result<_, _>>()?;
    let vwgt: Vec<Idx> = g
        .load
        .iter()
        .map(|&l| (l * LOAD_SCALE).round().max(1.0) as Idx)
        .collect();
    let adjwgt: Vec<Idx> = g
        .adjwgt
        .iter()
        .map(|&w| w.round().max(1.0) as Idx)
        .collect();
    let mut part: Vec<Idx> = vec![0; g.tasks()];
    if nparts <= 1 {
        return Ok(vec![0; g.tasks()]);
    }
    // METIS' ufactor is the allowed imbalance in thousandths.
    let ufactor = (p.tolerance * 1000.0).round().max(1.0) as Idx;
    // METIS keeps its random generator in globals (GKlib's Mersenne
    // twister): two concurrent calls would draw from each other's stream
    // and lose the determinism the seed promises. One call at a time.
    let _one = METIS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    metis::Graph::new(1, idx(nparts)?, &xadj, &adjncy)
        .map_err(|e| Error::Graph(e.to_string()))?
        .set_vwgt(&vwgt)
        .set_adjwgt(&adjwgt)
        .set_option(metis::option::UFactor(ufactor))
        .set_option(metis::option::Seed((seed & 0x7fff_ffff) as Idx))
        .part_kway(&mut part)
        .map_err(|e| Error::Metis(format!("{e:?}")))?;
    Ok(part.into_iter().map(|p| p as u32).collect())
}

/// Relabels `fresh` so that each of its parts takes the label of the old
/// part it shares the most tasks with (greedy, largest overlaps first).
pub fn remap(old: &[u32], fresh: &[u32], nparts: usize) -> Vec<u32> {
    let mut overlap: HashMap<(u32, u32), usize> = HashMap::new();
    for (o, n) in old.iter().zip(fresh) {
        *overlap.entry((*n, *o)).or_default() += 1;
    }
    let mut pairs: Vec<((u32, u32), usize)> = overlap.into_iter().collect();
    // Largest overlap first; ties by labels so the result is deterministic.
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut label: Vec<Option<u32>> = vec![None; nparts];
    let mut taken = vec![false; nparts];
    for ((n, o), _) in pairs {
        if label[n as usize].is_none() && !taken[o as usize] {
            label[n as usize] = Some(o);
            taken[o as usize] = true;
        }
    }
    let mut free = (0..nparts as u32).filter(|&o| !taken[o as usize]);
    for l in label.iter_mut() {
        if l.is_none() {
            *l = free.next();
        }
    }
    fresh
        .iter()
        .map(|&n| label[n as usize].unwrap_or(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use balance::diffusion::{edge_cut, imbalance, loads};

    #[test]
    fn metis_partitions_a_grid_within_its_tolerance() {
        let g = TaskGraph::grid3d(16, 16, 8);
        let p = Params::default();
        let part = partition(&g, 8, &p, 1).expect("metis");
        assert_eq!(part.len(), g.tasks());
        assert!(part.iter().all(|&q| q < 8));
        assert!(imbalance(&loads(&g, &part, 8)) <= 0.05);
        // Far better than a random assignment (about 7/8 of 5376 edges).
        assert!(edge_cut(&g, &part) < 1500.0, "{}", edge_cut(&g, &part));
    }

    #[test]
    fn remap_restores_permuted_labels() {
        let old: Vec<u32> = (0..40).map(|t| t / 10).collect();
        let fresh: Vec<u32> = old.iter().map(|&p| (p + 1) % 4).collect();
        assert_eq!(remap(&old, &fresh, 4), old);
        // One task changed hands: it stays changed, the rest keep labels.
        let mut moved = fresh.clone();
        moved[0] = 3;
        let r = remap(&old, &moved, 4);
        assert_eq!(r.iter().zip(&old).filter(|(a, b)| a != b).count(), 1);
    }
}
