//! `ffmk-fwq`: FWQ/FTQ noise measurement on the host or inside a Linux
//! guest (the same loop the probe guest runs), and reports (tables, JSON,
//! PNG) over sample sets from either.
use clap::{Parser, Subcommand};
use noise::input;
use noise::sample::{self, Method};
use noise::stats::{Kind, Stats};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vcpu_decouple::CpuList;

#[derive(Parser)]
#[command(
    name = "ffmk-fwq",
    version,
    about = "FWQ/FTQ OS-noise measurement and reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Common {
    /// CPUs to measure on, one pinned thread each (e.g. 1 or 2-5).
    #[arg(long, default_value = "0")]
    cpus: CpuList,
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Barrier across the threads: none, start (StartSync) or step (StepSync).
    #[arg(long, default_value = "start", value_parser = parse_sync)]
    sync: sample::Sync,
    /// Write the samples here (one per line; `FILE.cpuN` for several CPUs).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed Work Quantum: time the same loop over and over.
    Fwq {
        #[command(flatten)]
        common: Common,
        /// Loop iterations per sample.
        #[arg(long, default_value_t = 16384)]
        work: u64,
    },
    /// Fixed Time Quantum: count work done per fixed interval.
    Ftq {
        #[command(flatten)]
        common: Common,
        /// Interval length in TSC cycles.
        #[arg(long, default_value_t = 25_000)]
        interval_cycles: u64,
    },
    /// Statistics of sample sets (files from `--out` or probe logs with
    /// raw=1), side by side with ratios against the first, and a PNG.
    Report {
        /// LABEL=FILE or LABEL=FILE#CPU (a probe log's CPU).
        #[arg(required = true)]
        sets: Vec<String>,
        #[arg(long)]
        json: bool,
        /// Draw every set into this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
        #[arg(long, default_value = "FWQ samples")]
        title: String,
    },
}

fn parse_sync(s: &str) -> Result<sample::Sync, String> {
    match s {
        "none" => Ok(sample::Sync::None),
        "start" => Ok(sample::Sync::Start),
        "step" => Ok(sample::Sync::Step),
        _ => Err(format!("'{s}': use none, start or step")),
    }
}

fn print_stats(label: &str, s: &Stats, json: bool) {
    if json {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("label".into(), label.into());
        }
        println!("{v}");
    } else {
        println!(
            "{label:<24} n={:<6} min={:<8} median={:<8} p99={:<8} max={:<9} noise: median {:>6.2}% p99 {:>7.2}% max {:>8.1}% total {:>6.2}%",
            s.n,
            s.min,
            s.median,
            s.p99,
            if s.kind == Kind::Fwq { s.max } else { s.min },
            s.noise_median * 100.0,
            s.noise_p99 * 100.0,
            s.noise_max * 100.0,
            s.noise_total * 100.0
        );
    }
}

fn measure(common: Common, method: Method, kind: Kind) -> Result<(), String> {
    let cpus: Vec<u32> = common.cpus.iter().collect();
    let results = sample::run_on_cpus(&cpus, method, common.samples, common.sync, |cpu| {
        vcpu_decouple::affinity::pin_current_thread(&CpuList::new(vec![cpu]), "sampling thread")
            .map_err(std::io::Error::other)
    })
    .map_err(|e| e.to_string())?;
    let name = if kind == Kind::Fwq { "fwq" } else { "ftq" };
    for (cpu, samples) in &results {
        if let Some(out) = &common.out {
            let path = if results.len() == 1 {
                out.clone()
            } else {
                PathBuf::from(format!("{}.cpu{cpu}", out.display()))
            };
            let mut text = format!("# ffmk-fwq {name} cpu={cpu}\n");
            for v in samples {
                text.push_str(&format!("{v}\n"));
            }
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        if let Some(s) = Stats::new(kind, samples) {
            print_stats(&format!("{name} cpu={cpu}"), &s, common.json);
        }
    }
    Ok(())
}

/// Medians over runs of one configuration's statistics (FTQ: the worst
/// value is the smallest count).
#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    runs: usize,
    median: f64,
    p99: f64,
    max: f64,
    noise_median: f64,
    noise_p99: f64,
    noise_max: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Summary {
    fn of(runs: &[Stats]) -> Option<Summary> {
        if runs.is_empty() {
            return None;
        }
        let m = |f: &dyn Fn(&Stats) -> f64| median(runs.iter().map(f).collect());
        Some(Summary {
            runs: runs.len(),
            median: m(&|s| s.median as f64),
            p99: m(&|s| s.p99 as f64),
            max: m(&|s| {
                if s.kind == Kind::Fwq {
                    s.max as f64
                } else {
                    s.min as f64
                }
            }),
            noise_median: m(&|s| s.noise_median),
            noise_p99: m(&|s| s.noise_p99),
            noise_max: m(&|s| s.noise_max),
        })
    }
}

fn report(
    sets: Vec<String>,
    json: bool,
    png: Option<PathBuf>,
    title: String,
) -> Result<(), String> {
    let mut loaded = Vec::new();
    for set in &sets {
        let (label, spec) = set
            .split_once('=')
            .ok_or_else(|| format!("'{set}': use LABEL=FILE or LABEL=FILE#CPU"))?;
        let (file, cpu) = match spec.rsplit_once('#') {
            Some((f, c)) => (
                f,
                Some(
                    c.parse::<u32>()
                        .map_err(|_| format!("'{set}': '{c}' is not a CPU"))?,
                ),
            ),
            None => (spec, None),
        };
        let series = input::load(std::path::Path::new(file)).map_err(|e| e.to_string())?;
        let s = match cpu {
            Some(c) => series
                .into_iter()
                .find(|s| s.cpu == Some(c))
                .ok_or_else(|| format!("{file} has no samples of CPU {c}"))?,
            None => series
                .into_iter()
                .next()
                .ok_or_else(|| format!("{file}: no samples"))?,
        };
        loaded.push((label.to_string(), s));
    }
    // A label given several times (one file per run) is summarised by the
    // median of its runs' statistics; ratios compare those medians.
    let mut labels: Vec<String> = Vec::new();
    for (l, _) in &loaded {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    let summaries: Vec<(String, Summary)> = labels
        .iter()
        .filter_map(|l| {
            let runs: Vec<Stats> = loaded
                .iter()
                .filter(|(m, _)| m == l)
                .filter_map(|(_, s)| Stats::new(s.kind, &s.samples))
                .collect();
            Some((l.clone(), Summary::of(&runs)?))
        })
        .collect();
    let base = summaries.first().map(|(_, s)| s.clone());
    for (label, s) in &summaries {
        if json {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            if let (Some(m), Some(b)) = (v.as_object_mut(), &base) {
                m.insert("label".into(), label.as_str().into());
                m.insert("ratio_p99".into(), (s.p99 / b.p99.max(1.0)).into());
                m.insert("ratio_max".into(), (s.max / b.max.max(1.0)).into());
            }
            println!("{v}");
            continue;
        }
        println!(
            "{label:<22} runs={} median={:<8.0} p99={:<8.0} max={:<9.0} noise: median {:>6.2}% p99 {:>7.2}% max {:>8.1}%",
            s.runs,
            s.median,
            s.p99,
            s.max,
            s.noise_median * 100.0,
            s.noise_p99 * 100.0,
            s.noise_max * 100.0
        );
        if let Some(b) = &base {
            println!(
                "{:<22} vs {}: median x{:.3}  p99 x{:.3}  max x{:.3}",
                "",
                summaries[0].0,
                s.median / b.median.max(1.0),
                s.p99 / b.p99.max(1.0),
                s.max / b.max.max(1.0)
            );
        }
    }
    let _ = std::io::stdout().flush();
    #[cfg(feature = "plot")]
    if let Some(png) = png {
        // One panel per label: its runs one after another.
        let joined: Vec<(String, Kind, Vec<u64>)> = labels
            .iter()
            .map(|l| {
                let sets: Vec<&input::Series> = loaded
                    .iter()
                    .filter(|(m, _)| m == l)
                    .map(|(_, s)| s)
                    .collect();
                let kind = sets.first().map(|s| s.kind).unwrap_or(Kind::Fwq);
                (
                    l.clone(),
                    kind,
                    sets.iter()
                        .flat_map(|s| s.samples.iter().copied())
                        .collect(),
                )
            })
            .collect();
        let panels: Vec<noise::plot::Panel> = joined
            .iter()
            .map(|(l, k, v)| noise::plot::Panel {
                label: l,
                kind: *k,
                samples: v,
            })
            .collect();
        noise::plot::draw(&png, &title, &panels).map_err(|e| e.to_string())?;
        eprintln!("ffmk-fwq: wrote {}", png.display());
    }
    #[cfg(not(feature = "plot"))]
    if png.is_some() {
        let _ = title;
        return Err("this ffmk-fwq was built without plots (feature `plot`)".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: restores the default SIGPIPE action so `| head` ends quietly.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let r = match Cli::parse().cmd {
        Cmd::Fwq { common, work } => measure(common, Method::Fwq { work }, Kind::Fwq),
        Cmd::Ftq {
            common,
            interval_cycles,
        } => measure(
            common,
            Method::Ftq {
                cycles: interval_cycles,
            },
            Kind::Ftq,
        ),
        Cmd::Report {
            sets,
            json,
            png,
            title,
        } => report(sets, json, png, title),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ffmk-fwq: {e}");
            ExitCode::FAILURE
        }
    }
}
