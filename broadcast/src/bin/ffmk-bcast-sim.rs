//! Simulates corrected-tree broadcasts (crate `broadcast`, module `sim`):
//! every combination of the node counts, failure shares and trees given,
//! each with several seeds; prints the median of each figure per
//! combination (a table, or JSON lines with --json).
use broadcast::sim::{run, Outcome, Params};
use broadcast::Tree;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ffmk-bcast-sim",
    about = "Simulate corrected-tree broadcasts (LogP model; see docs/broadcast.md)"
)]
struct Args {
    /// Node counts, comma-separated (1 to 10,000,000).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    nodes: Vec<u32>,
    /// Shares of dead nodes, comma-separated (0 to 0.5).
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.05")]
    failures: Vec<f64>,
    /// Trees: interleaved, contiguous.
    #[arg(long, value_delimiter = ',', default_value = "interleaved,contiguous")]
    tree: Vec<Tree>,
    /// Network latency L and send overhead o (same unit; results are in L).
    #[arg(long, default_value_t = 1.0)]
    latency: f64,
    #[arg(long, default_value_t = 0.2)]
    overhead: f64,
    /// Seeds per combination (different dead nodes).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() {
    let a = Args::parse();
    if a.seeds == 0 {
        eprintln!("ffmk-bcast-sim: --seeds must be at least 1");
        std::process::exit(2);
    }
    if let Some(n) = a.nodes.iter().find(|&&n| n == 0 || n > 10_000_000) {
        eprintln!("ffmk-bcast-sim: --nodes {n}: want 1 to 10,000,000");
        std::process::exit(2);
    }
    if !a.json {
        println!(
            "{:>9} {:>6} {:>12} {:>6} {:>9} {:>9} {:>10} {:>10} {:>9}",
            "nodes",
            "dead%",
            "tree",
            "all",
            "latency",
            "tree_end",
            "msgs/node",
            "corr/node",
            "by_corr"
        );
    }
    for &n in &a.nodes {
        for &f in &a.failures {
            for &tree in &a.tree {
                let mut outs: Vec<Outcome> = Vec::new();
                for seed in 0..a.seeds {
                    let p = Params {
                        n,
                        failures: f,
                        tree,
                        latency: a.latency,
                        overhead: a.overhead,
                        seed,
                    };
                    match run(&p) {
                        Ok(o) => outs.push(o),
                        Err(e) => {
                            eprintln!("ffmk-bcast-sim: {e}");
                            std::process::exit(2);
                        }
                    }
                }
                let all = outs.iter().all(|o| o.reached_all);
                let live = |o: &Outcome| f64::from((o.n - o.dead).max(1));
                let lat = median(outs.iter().map(|o| o.latency).collect());
                let mpn = median(outs.iter().map(|o| o.messages_per_node).collect());
                let cpn = median(
                    outs.iter()
                        .map(|o| o.correction_messages as f64 / live(o))
                        .collect(),
                );
                let byc = median(
                    outs.iter()
                        .map(|o| f64::from(o.reached_by_correction))
                        .collect(),
                );
                let tree_end = tree.completion(n, a.latency, a.overhead) / a.latency;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "nodes": n, "failures": f, "tree": tree, "seeds": a.seeds,
                            "latency_l": a.latency, "overhead_o": a.overhead,
                            "reached_all": all, "latency": lat, "tree_end": tree_end,
                            "messages_per_node": mpn, "corrections_per_node": cpn,
                            "reached_by_correction": byc,
                        })
                    );
                } else {
                    println!(
                        "{n:>9} {:>6.2} {:>12} {:>6} {lat:>9.1} {tree_end:>9.1} {mpn:>10.2} {cpn:>10.2} {byc:>9.0}",
                        f * 100.0,
                        format!("{tree:?}").to_lowercase(),
                        if all { "yes" } else { "NO" },
                    );
                }
                if !all {
                    eprintln!(
                        "ffmk-bcast-sim: a live node was missed (n={n}, failures={f}, {tree:?})"
                    );
                    std::process::exit(1);
                }
            }
        }
    }
}
