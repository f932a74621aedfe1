//! Checkpoint intervals from checkpoint cost δ and mean time to interrupt M.
//!
//! Young (1974): T = √(2δM). Daly (2006), better when δ is not small
//! against M: T = √(2δM)·[1 + ⅓·√(δ/(2M)) + δ/(18M)] − δ for δ < 2M, else
//! T = M. Both are the compute time between the end of one checkpoint and
//! the start of the next.

/// Young's first-order optimum.
pub fn young(cost_s: f64, mtti_s: f64) -> f64 {
    (2.0 * cost_s * mtti_s).sqrt()
}

/// Daly's higher-order optimum.
pub fn daly(cost_s: f64, mtti_s: f64) -> f64 {
    if cost_s >= 2.0 * mtti_s {
        return mtti_s;
    }
    let r = cost_s / (2.0 * mtti_s);
    young(cost_s, mtti_s) * (1.0 + r.sqrt() / 3.0 + cost_s / (18.0 * mtti_s)) - cost_s
}

/// Expected fraction of time lost to checkpoints and re-computation with
/// interval `t` (first-order model): δ/T + (T+δ)/(2M).
pub fn waste(t: f64, cost_s: f64, mtti_s: f64) -> f64 {
    cost_s / t + (t + cost_s) / (2.0 * mtti_s)
}

/// Seconds as a short human string (`45 s`, `12.5 min`, `3.2 h`).
pub fn human(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // δ = 60 s, M = 24 h: Young √(2·60·86400) ≈ 3220 s.
        let y = young(60.0, 86400.0);
        assert!((y - 3220.0).abs() < 1.0, "{y}");
        let d = daly(60.0, 86400.0);
        assert!(d < y && d > y - 60.0, "{d}");
        assert_eq!(daly(100.0, 40.0), 40.0);
        // Young's interval is (near) the minimum of the waste.
        let w = waste(y, 60.0, 86400.0);
        assert!(w <= waste(y * 0.5, 60.0, 86400.0) && w <= waste(y * 2.0, 60.0, 86400.0));
    }
}
