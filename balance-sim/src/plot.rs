//! PNG plot of `balance-sim` results: four panels (imbalance, migration,
//! edge-cut, run time per node) over the number of partitions, one line
//! per workload and method.
use crate::evaluate::{EvalResult, MethodResult};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use std::path::Path;

pub use plotting::Error;

type Metric = (&'static str, fn(&MethodResult) -> f64, bool);

const METRICS: [Metric; 4] = [
    ("imbalance (mean max/avg - 1)", |m| m.imbalance_mean, false),
    (
        "migration (mean max moved / tasks per part)",
        |m| m.migration_mean,
        false,
    ),
    ("edge-cut (mean)", |m| m.edge_cut_mean, true),
    (
        "run time per node [s] (median)",
        |m| m.seconds_per_node,
        true,
    ),
];

pub fn draw(path: &Path, results: &[EvalResult]) -> Result<(), Error> {
    if results.is_empty() {
        return Err(Error::Empty);
    }
    plotting::register_font()?;
    let err = |e: &dyn std::fmt::Display| Error::Draw {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    // Lines: (workload, method) -> points (parts, method result).
    let mut lines: Vec<(String, Vec<(usize, &MethodResult)>)> = Vec::new();
    for r in results {
        for m in &r.methods {
            let name = format!("{} {}", r.workload, m.method);
            match lines.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((r.parts, m)),
                None => lines.push((name, vec![(r.parts, m)])),
            }
        }
    }
    for (_, pts) in lines.iter_mut() {
        pts.sort_by_key(|(p, _)| *p);
    }
    let pmin = results.iter().map(|r| r.parts).min().unwrap_or(2) as f64;
    let pmax = results.iter().map(|r| r.parts).max().unwrap_or(2) as f64;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "diffusion vs METIS from scratch (balance-sim)",
            ("sans-serif", 22),
        )
        .map_err(|e| err(&e))?;
    for (area, (title, get, log)) in root.split_evenly((2, 2)).iter().zip(METRICS) {
        let values: Vec<f64> = lines
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|(_, m)| get(m)))
            .collect();
        let hi = values.iter().copied().fold(0.0, f64::max).max(1e-9);
        let lo = values
            .iter()
            .copied()
            .filter(|v| *v > 0.0)
            .fold(f64::INFINITY, f64::min)
            .min(hi);
        let x = (pmin * 0.9..pmax * 1.1).log_scale();
        if log {
            let y = (lo * 0.8..hi * 1.25).log_scale();
            panel(area, (title, |v| format!("{v:.0e}")), x, y, &lines, get, lo)
        } else {
            let y = 0.0..hi * 1.15;
            panel(area, (title, |v| format!("{v:.3}")), x, y, &lines, get, 0.0)
        }
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

type Lines<'a> = [(String, Vec<(usize, &'a MethodResult)>)];

/// One panel: every line's metric over the partitions (values below
/// `floor` are drawn at the floor, for log scales).
fn panel<X, Y>(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    (title, y_fmt): (&str, fn(&f64) -> String),
    x: X,
    y: Y,
    lines: &Lines,
    get: fn(&MethodResult) -> f64,
    floor: f64,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("partitions")
        .label_style(("sans-serif", 12))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_fmt)
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(p, m)| (*p as f64, get(m).max(floor))),
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))
}
