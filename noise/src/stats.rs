//! Statistics of a noise sample set.
//!
//! FWQ samples are times (cycles) for the same work: the minimum is the
//! undisturbed time and noise is `(t - min) / min`. FTQ samples are work
//! done in a fixed time: the maximum is the undisturbed amount and the lost
//! share is `(max - w) / max`. Either way "noise" below is a fraction of
//! the undisturbed value, 0 for a perfectly quiet sample.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Fixed work, time measured: larger is worse.
    Fwq,
    /// Fixed time, work measured: smaller is worse.
    Ftq,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    pub kind: Kind,
    pub n: usize,
    pub min: u64,
    pub median: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
    /// Noise of the median, the 99th-percentile and the worst sample.
    pub noise_median: f64,
    pub noise_p99: f64,
    pub noise_max: f64,
    /// Total disturbance: time (or work) lost over all samples, as a fraction
    /// of the undisturbed total.
    pub noise_total: f64,
    /// Samples more than 10 % off the undisturbed value.
    pub disturbed: usize,
    /// Histogram of per-sample noise: counts in [0,1%), [1,2%), [2,5%),
    /// [5,10%), [10,50%), [50,100%), >=100%.
    pub histogram: [usize; 7],
}

/// Upper bounds of the histogram classes.
pub const HISTOGRAM_BOUNDS: [f64; 6] = [0.01, 0.02, 0.05, 0.10, 0.50, 1.0];

/// The value at quantile `q` (nearest rank on the sorted samples).
fn quantile(sorted: &[u64], q: f64) -> u64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Stats {
    /// None for an empty sample set.
    pub fn new(kind: Kind, samples: &[u64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        let (min, max) = (s[0], s[s.len() - 1]);
        let best = match kind {
            Kind::Fwq => min,
            Kind::Ftq => max,
        };
        let noise = |v: u64| -> f64 {
            if best == 0 {
                return 0.0;
            }
            match kind {
                Kind::Fwq => (v - best) as f64 / best as f64,
                Kind::Ftq => (best - v) as f64 / best as f64,
            }
        };
        // "p99" is the 99th percentile of badness: high times, low counts.
        let (p99, worst) = match kind {
            Kind::Fwq => (quantile(&s, 0.99), max),
            Kind::Ftq => (quantile(&s, 0.01), min),
        };
        let sum: u128 = s.iter().map(|v| u128::from(*v)).sum();
        let mut histogram = [0usize; 7];
        let mut lost = 0f64;
        let mut disturbed = 0;
        for v in &s {
            let n = noise(*v);
            lost += n;
            if n > 0.10 {
                disturbed += 1;
            }
            let class = HISTOGRAM_BOUNDS
                .iter()
                .position(|b| n < *b)
                .unwrap_or(HISTOGRAM_BOUNDS.len());
            histogram[class] += 1;
        }
        let median = quantile(&s, 0.5);
        Some(Stats {
            kind,
            n: s.len(),
            min,
            median,
            p99,
            max,
            mean: sum as f64 / s.len() as f64,
            noise_median: noise(median),
            noise_p99: noise(p99),
            noise_max: noise(worst),
            noise_total: lost / s.len() as f64,
            disturbed,
            histogram,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_core_has_no_noise() {
        let s = Stats::new(Kind::Fwq, &[1000; 500]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1000, 1000, 1000));
        assert_eq!((s.noise_max, s.noise_total, s.disturbed), (0.0, 0.0, 0));
        assert_eq!(s.histogram[0], 500);
    }

    #[test]
    fn fwq_noise_is_relative_to_the_fastest_sample() {
        // 100 samples: 97 at 1000, one each at 1050, 2000, 11000.
        let mut v = vec![1000u64; 97];
        v.extend([1050, 2000, 11000]);
        let s = Stats::new(Kind::Fwq, &v).unwrap();
        assert_eq!((s.min, s.median, s.max), (1000, 1000, 11000));
        assert_eq!(s.p99, 2000); // nearest rank 98 of 0..99
        assert!((s.noise_p99 - 1.0).abs() < 1e-9);
        assert!((s.noise_max - 10.0).abs() < 1e-9);
        // (50 + 1000 + 10000) / 1000 / 100 samples
        assert!((s.noise_total - 0.1105).abs() < 1e-9);
        assert_eq!(s.disturbed, 2);
        assert_eq!(s.histogram, [97, 0, 0, 1, 0, 0, 2]);
        assert!((s.mean - 1110.5).abs() < 1e-9);
    }

    #[test]
    fn ftq_noise_is_lost_work() {
        let mut v = vec![400u64; 98];
        v.extend([300, 0]);
        let s = Stats::new(Kind::Ftq, &v).unwrap();
        assert_eq!((s.max, s.min), (400, 0));
        assert!((s.noise_max - 1.0).abs() < 1e-9);
        assert_eq!(s.p99, 300);
        assert!((s.noise_p99 - 0.25).abs() < 1e-9);
        assert_eq!(s.histogram[6], 1);
    }

    #[test]
    fn empty_and_single_sets() {
        assert!(Stats::new(Kind::Fwq, &[]).is_none());
        let s = Stats::new(Kind::Fwq, &[7]).unwrap();
        assert_eq!((s.median, s.p99, s.noise_max), (7, 7, 0.0));
    }
}
