//! Diffusion against the METIS baseline on a synthetic workload over many
//! time steps (`ffmk-node balance-sim`).
//!
//! Both methods start from the same METIS partition of the loads at step
//! 0. At every later step the loads change ([`crate::workload`]); diffusion
//! rebalances the partition it has, METIS partitions from scratch (and the
//! result is relabelled to keep as many tasks in place as it can). Per step
//! and method we record imbalance, migration (against that method's
//! previous partition), edge-cut and run time.
use crate::baseline;
use crate::workload::{self, Field, Kind};
use balance::diffusion::{self, Params, TaskGraph};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub workload: Kind,
    pub parts: usize,
    pub tasks_per_part: usize,
    pub steps: usize,
    pub seed: u64,
    pub params: Params,
}

/// One method at one step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepMetrics {
    /// Imbalance of the method's partition under the new loads, before it
    /// rebalanced.
    pub imbalance_before: f64,
    pub imbalance: f64,
    pub migration: f64,
    pub edge_cut: f64,
    pub seconds: f64,
}

/// A method's results over all steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodResult {
    pub method: &'static str,
    pub imbalance_mean: f64,
    pub imbalance_max: f64,
    pub migration_mean: f64,
    pub edge_cut_mean: f64,
    pub seconds_median: f64,
    /// Median run time divided by the number of partitions: what one node
    /// computes when the method runs distributed (diffusion) or the share
    /// of a central run (METIS).
    pub seconds_per_node: f64,
    pub steps: Vec<StepMetrics>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalResult {
    pub workload: Kind,
    pub parts: usize,
    pub tasks: usize,
    pub grid: (usize, usize, usize),
    pub steps: usize,
    pub seed: u64,
    pub params: Params,
    /// METIS from scratch without the relabelling: its mean migration.
    pub metis_unmapped_migration_mean: f64,
    /// Mean diffusion (SOS) iterations per step: rounds of neighbour
    /// exchange a distributed run needs.
    pub diffusion_iterations_mean: f64,
    pub methods: Vec<MethodResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--parts must be at least 2, --tasks-per-part at least 1 and --steps at least 1")]
    Size,
    #[error(transparent)]
    Metis(#[from] baseline::Error),
}

fn summarise(method: &'static str, parts: usize, steps: Vec<StepMetrics>) -> MethodResult {
    let n = steps.len().max(1) as f64;
    let mean = |f: fn(&StepMetrics) -> f64| steps.iter().map(f).sum::<f64>() / n;
    let mut secs: Vec<f64> = steps.iter().map(|s| s.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().unwrap_or(0.0);
    MethodResult {
        method,
        imbalance_mean: mean(|s| s.imbalance),
        imbalance_max: steps.iter().map(|s| s.imbalance).fold(0.0, f64::max),
        migration_mean: mean(|s| s.migration),
        edge_cut_mean: mean(|s| s.edge_cut),
        seconds_median: median,
        seconds_per_node: median / parts as f64,
        steps,
    }
}

/// Runs one method's step `f` on partition `old` (loads already updated):
/// its metrics, its new partition and what else it returned.
fn measure<X>(
    g: &TaskGraph,
    parts: usize,
    old: &[u32],
    f: impl FnOnce() -> Result<(Vec<u32>, X), Error>,
) -> Result<(StepMetrics, Vec<u32>, X), Error> {
    let before = diffusion::imbalance(&diffusion::loads(g, old, parts));
    let clock = Instant::now();
    let (next, extra) = f()?;
    let seconds = clock.elapsed().as_secs_f64();
    let m = diffusion::metrics(g, old, &next, parts);
    let step = StepMetrics {
        imbalance_before: before,
        imbalance: m.imbalance,
        migration: m.migration,
        edge_cut: m.edge_cut,
        seconds,
    };
    Ok((step, next, extra))
}

pub fn run(cfg: &EvalConfig) -> Result<EvalResult, Error> {
    if cfg.parts < 2 || cfg.tasks_per_part == 0 || cfg.steps == 0 {
        return Err(Error::Size);
    }
    let dims = workload::dims_for(cfg.parts * cfg.tasks_per_part);
    let field = Field::new(cfg.workload, dims, cfg.seed);
    let mut g: TaskGraph = field.graph();
    field.loads(0, &mut g.load);
    let start = baseline::partition(&g, cfg.parts, &cfg.params, cfg.seed)?;
    let (mut diff_part, mut metis_part) = (start.clone(), start);
    let (mut diff_steps, mut metis_steps) = (Vec::new(), Vec::new());
    let (mut unmapped, mut iterations) = (0.0, 0.0);
    for t in 1..=cfg.steps {
        field.loads(t, &mut g.load);

        let (m, next, its) = measure(&g, cfg.parts, &diff_part, || {
            Ok(diffusion::balance(&g, &diff_part, cfg.parts, &cfg.params))
        })?;
        diff_steps.push(m);
        iterations += its as f64;
        diff_part = next;

        let (m, next, fresh) = measure(&g, cfg.parts, &metis_part, || {
            let fresh = baseline::partition(&g, cfg.parts, &cfg.params, cfg.seed + t as u64)?;
            Ok((baseline::remap(&metis_part, &fresh, cfg.parts), fresh))
        })?;
        unmapped += diffusion::migration(&metis_part, &fresh, cfg.parts);
        metis_steps.push(m);
        metis_part = next;
    }
    let n = cfg.steps as f64;
    Ok(EvalResult {
        workload: cfg.workload,
        parts: cfg.parts,
        tasks: g.tasks(),
        grid: dims,
        steps: cfg.steps,
        seed: cfg.seed,
        params: cfg.params,
        metis_unmapped_migration_mean: unmapped / n,
        diffusion_iterations_mean: iterations / n,
        methods: vec![
            summarise("diffusion", cfg.parts, diff_steps),
            summarise("metis", cfg.parts, metis_steps),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workload: Kind) -> EvalConfig {
        EvalConfig {
            workload,
            parts: 16,
            tasks_per_part: 64,
            steps: 6,
            seed: 3,
            params: Params::default(),
        }
    }

    #[test]
    fn diffusion_keeps_the_shock_balanced_and_moves_less_than_metis() {
        let r = run(&cfg(Kind::Shock)).expect("run");
        let d = &r.methods[0];
        let m = &r.methods[1];
        assert_eq!(d.steps.len(), 6);
        // The moving front unbalances the old partition...
        assert!(d.steps.iter().any(|s| s.imbalance_before > 0.2), "{d:?}");
        // ...and diffusion brings it back near the tolerance.
        assert!(d.imbalance_mean < 0.15, "{d:?}");
        assert!(m.imbalance_mean < 0.1, "{m:?}");
        // Diffusion moves fewer tasks than METIS from scratch.
        assert!(d.migration_mean < m.migration_mean, "{d:?} {m:?}");
        assert!(r.metis_unmapped_migration_mean >= m.migration_mean - 1e-9);
    }

    #[test]
    fn cloud_run_is_reproducible() {
        let a = run(&cfg(Kind::Cloud)).expect("run");
        let b = run(&cfg(Kind::Cloud)).expect("run");
        for (x, y) in a.methods.iter().zip(&b.methods) {
            assert_eq!(x.imbalance_mean, y.imbalance_mean);
            assert_eq!(x.edge_cut_mean, y.edge_cut_mean);
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut c = cfg(Kind::Shock);
        c.parts = 1;
        assert!(matches!(run(&c), Err(Error::Size)));
    }
}
