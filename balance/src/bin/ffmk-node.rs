//! `ffmk-node`: the per-host balancing daemon and its simulators.
use balance::gossip::Window;
use balance::sim::{self, SimConfig};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ffmk-node",
    version,
    about = "ffmk-vmm cluster load balancing: gossip, diffusion, node daemon"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate a gossiping colony and print the average age of the
    /// information at steady state and the traffic per node and step.
    GossipSim(GossipSimArgs),
}

#[derive(clap::Args)]
struct GossipSimArgs {
    #[arg(long)]
    nodes: usize,
    /// Entries of age <= T are sent (time units), or `whole`.
    #[arg(long)]
    window: Window,
    /// Time units measured after the warm-up.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Time units a message is on its way (0-1).
    #[arg(long, default_value_t = 0.0)]
    transit: f64,
    /// Origins tracked [default: all up to 2048, else a sample of 2048;
    /// use 64-256 beyond 100,000 nodes].
    #[arg(long)]
    track: Option<usize>,
    /// Fraction of nodes that fail when the measurement starts.
    #[arg(long, default_value_t = 0.0)]
    failures: f64,
    #[arg(long, default_value_t = 200_000)]
    max_warmup: u64,
    #[arg(long)]
    json: bool,
}

fn gossip_sim(a: GossipSimArgs) -> Result<(), String> {
    let cfg = SimConfig {
        nodes: a.nodes,
        window: a.window,
        steps: a.steps,
        seed: a.seed,
        loss: a.loss,
        transit: a.transit,
        track: a.track.unwrap_or(a.nodes.min(2048)),
        failures: a.failures,
        max_warmup: a.max_warmup,
    };
    let r = sim::run(&cfg).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "nodes={} window={} avg_age={:.2} (min {:.2}, max {:.2} over {} steps after a warm-up of {}{}) msgs/node/step={:.3} entries/msg={:.1} bytes/node/step={:.0} tracked={} speed={:.2e} node-steps/s",
        r.nodes, r.window, r.avg_age, r.avg_age_min, r.avg_age_max, r.steps, r.warmup_steps,
        if r.warmup_capped { " (capped: not settled)" } else { "" },
        r.msgs_per_node_step, r.entries_per_msg, r.bytes_per_node_step, r.tracked, r.node_steps_per_sec
    );
    if let Some(age) = r.failed_entry_age {
        println!(
            "failed_nodes={} their entries' mean age on live nodes={age:.1}",
            r.failed_nodes
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::GossipSim(a) => gossip_sim(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ffmk-node: {e}");
            ExitCode::from(2)
        }
    }
}
