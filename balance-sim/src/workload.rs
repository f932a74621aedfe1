//! Synthetic FFMK-like workloads on a 3-D grid of tasks whose load changes
//! over time steps:
//!
//! - [`Kind::Shock`]: a planar front (slanted to the grid axes) of 4x load
//!   that sweeps through the domain, as in a shock-capturing code;
//! - [`Kind::Cloud`]: a cloud-like field of drifting Gaussian hot spots that
//!   grow and fade, as in an atmosphere or cloud model.
//!
//! Both are seeded, so every method sees the same loads at every step.
use balance::diffusion::TaskGraph;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Shock,
    Cloud,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shock" => Ok(Kind::Shock),
            "cloud" => Ok(Kind::Cloud),
            _ => Err(format!("unknown workload {s:?} (shock, cloud)")),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Shock => "shock",
            Kind::Cloud => "cloud",
        })
    }
}

/// Grid dimensions close to a cube with about `tasks` cells, x the longest.
pub fn dims_for(tasks: usize) -> (usize, usize, usize) {
    let side = (tasks as f64 / 2.0).cbrt().round().max(1.0) as usize;
    let x = (tasks as f64 / (side * side) as f64).round().max(1.0) as usize;
    (x, side, side)
}

struct Spot {
    centre: [f64; 3],
    velocity: [f64; 3],
    radius: f64,
    amplitude: f64,
    phase: f64,
    period: f64,
}

/// A load field over an x*y*z grid (task id = (k*y + j)*x + i, as
/// [`TaskGraph::grid3d`] numbers them).
pub struct Field {
    kind: Kind,
    dims: (usize, usize, usize),
    spots: Vec<Spot>,
}

/// Load of the shock front relative to the rest.
pub const SHOCK_LOAD: f64 = 4.0;

impl Field {
    pub fn new(kind: Kind, dims: (usize, usize, usize), seed: u64) -> Field {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (x, y, z) = dims;
        let n = x * y * z;
        let spots = match kind {
            Kind::Shock => Vec::new(),
            Kind::Cloud => (0..(n / 2048).clamp(4, 256))
                .map(|_| {
                    let r = (x.min(y).min(z) as f64 / 6.0).max(1.5);
                    Spot {
                        centre: [
                            rng.gen_range(0.0..x as f64),
                            rng.gen_range(0.0..y as f64),
                            rng.gen_range(0.0..z as f64),
                        ],
                        velocity: [
                            rng.gen_range(-1.0..1.0),
                            rng.gen_range(-0.5..0.5),
                            rng.gen_range(-0.5..0.5),
                        ],
                        radius: rng.gen_range(0.5 * r..1.5 * r),
                        amplitude: rng.gen_range(1.0..3.0),
                        phase: rng.gen_range(0.0..std::f64::consts::TAU),
                        period: rng.gen_range(10.0..40.0),
                    }
                })
                .collect(),
        };
        Field { kind, dims, spots }
    }

    pub fn graph(&self) -> TaskGraph {
        TaskGraph::grid3d(self.dims.0, self.dims.1, self.dims.2)
    }

    /// Loads at time step `t` into `out` (one per task).
    pub fn loads(&self, t: usize, out: &mut [f64]) {
        let (x, y, z) = self.dims;
        match self.kind {
            Kind::Shock => {
                // The front is the band pos <= i + j/2 + k/4 < pos + width,
                // moving one cell per step and wrapping around.
                let span = x + y / 2 + z / 4;
                let width = (x / 8).max(2);
                let pos = t % span;
                for k in 0..z {
                    for j in 0..y {
                        for i in 0..x {
                            let s = i + j / 2 + k / 4;
                            let d = (s + span - pos) % span;
                            out[(k * y + j) * x + i] = if d < width { SHOCK_LOAD } else { 1.0 };
                        }
                    }
                }
            }
            Kind::Cloud => {
                out.iter_mut().for_each(|l| *l = 1.0);
                let wrap = |v: f64, m: usize| v.rem_euclid(m as f64);
                let dim = [x, y, z];
                for s in &self.spots {
                    let c: Vec<f64> = (0..3)
                        .map(|a| wrap(s.centre[a] + s.velocity[a] * t as f64, dim[a]))
                        .collect();
                    let tf = t as f64;
                    let amp = s.amplitude
                        * (0.5 + 0.5 * (s.phase + std::f64::consts::TAU * tf / s.period).sin());
                    let reach = (3.0 * s.radius).ceil() as isize;
                    // Only the cells within 3 radii (periodic distance).
                    for dk in -reach..=reach {
                        let k = (c[2] as isize + dk).rem_euclid(z as isize) as usize;
                        for dj in -reach..=reach {
                            let j = (c[1] as isize + dj).rem_euclid(y as isize) as usize;
                            for di in -reach..=reach {
                                let i = (c[0] as isize + di).rem_euclid(x as isize) as usize;
                                let d2 = ((c[0] as isize + di) as f64 - c[0]).powi(2)
                                    + ((c[1] as isize + dj) as f64 - c[1]).powi(2)
                                    + ((c[2] as isize + dk) as f64 - c[2]).powi(2);
                                out[(k * y + j) * x + i] +=
                                    amp * (-d2 / (s.radius * s.radius)).exp();
                            }
                        }
                    }
                    // Small grids: a reach larger than the grid wraps onto
                    // the same cell more than once, which only adds load.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shock_front_moves_and_has_the_right_load() {
        let f = Field::new(Kind::Shock, (32, 8, 8), 1);
        let mut a = vec![0.0; 32 * 64];
        let mut b = vec![0.0; 32 * 64];
        f.loads(0, &mut a);
        f.loads(3, &mut b);
        assert!(a.iter().all(|&l| l == 1.0 || l == SHOCK_LOAD));
        let hot = a.iter().filter(|&&l| l == SHOCK_LOAD).count();
        assert!(hot > 0 && hot < a.len() / 2, "{hot}");
        assert_ne!(a, b, "the front moves");
    }

    #[test]
    fn cloud_is_seeded_and_changes_over_time() {
        let dims = dims_for(4096);
        let n = dims.0 * dims.1 * dims.2;
        let (mut a, mut b, mut c) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        Field::new(Kind::Cloud, dims, 7).loads(5, &mut a);
        Field::new(Kind::Cloud, dims, 7).loads(5, &mut b);
        Field::new(Kind::Cloud, dims, 7).loads(6, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&l| l >= 1.0));
        let max = a.iter().copied().fold(0.0, f64::max);
        assert!(max > 1.5, "hot spots exist: {max}");
    }
}
