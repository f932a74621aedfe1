//! PNG plots of sample sets: one panel per configuration, samples over
//! time on a log scale (so both the quiet floor and the worst delays show).
use crate::stats::{Kind, Stats};
use plotters::prelude::*;
use std::path::Path;

pub use plotting::Error;

/// One panel: a label and its samples.
pub struct Panel<'a> {
    pub label: &'a str,
    pub kind: Kind,
    pub samples: &'a [u64],
}

pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), Error> {
    if panels.is_empty() {
        return Err(Error::Empty);
    }
    plotting::register_font()?;
    let err = |e: &dyn std::fmt::Display| Error::Draw {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let height = 60 + 220 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    // Same y range for every panel so they compare at a glance.
    let lo = panels
        .iter()
        .flat_map(|p| p.samples.iter().copied().min())
        .min()
        .unwrap_or(1)
        .max(1) as f64;
    let hi = panels
        .iter()
        .flat_map(|p| p.samples.iter().copied().max())
        .max()
        .unwrap_or(2) as f64;
    for (area, p) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let caption = match Stats::new(p.kind, p.samples) {
            Some(s) => format!(
                "{}: median {} p99 {} max {} (noise p99 {:.1}%, max {:.0}%)",
                p.label,
                s.median,
                s.p99,
                if p.kind == Kind::Fwq { s.max } else { s.min },
                s.noise_p99 * 100.0,
                s.noise_max * 100.0
            ),
            None => p.label.to_string(),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0..p.samples.len().max(1), (lo * 0.95..hi * 1.2).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("sample")
            .y_desc(if p.kind == Kind::Fwq {
                "cycles"
            } else {
                "quanta"
            })
            .label_style(("sans-serif", 12))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                p.samples
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Pixel::new((i, *v as f64), BLUE.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
