//! `ffmk-node`: the per-host balancing daemon and its simulators.
use balance::diffusion::Params;
use balance::gossip::Window;
use balance_sim::evaluate::{self, EvalConfig};
use balance_sim::gossip_sim::{self, SimConfig};
use balance_sim::workload::Kind;
use clap::{Parser, Subcommand};
use ffmk_node::config::Config;
use ffmk_node::control;
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
    #[command(flatten)]
    plane: PlaneFlags,
}

/// How this process talks to other hosts (overrides the config file).
#[derive(clap::Args, Clone, Default)]
struct PlaneFlags {
    /// The cluster key file: the control port, gossip, the broadcast and
    /// the VMMs a daemon starts are authenticated with it [default: the
    /// config's cluster_key, else $FFMK_CLUSTER_KEY, else
    /// /etc/ffmk/cluster.key].
    #[arg(long, global = true, value_name = "PATH")]
    cluster_key: Option<std::path::PathBuf>,
    /// No authentication on the cluster plane (a trusted network only; a
    /// warning is printed).
    #[arg(long, global = true, conflicts_with = "cluster_key")]
    insecure: bool,
}

static PLANE_FLAGS: std::sync::OnceLock<PlaneFlags> = std::sync::OnceLock::new();

/// The command line's flags laid over the config file's settings.
fn plane_of(c: Option<&Config>) -> Result<ffmk_node::config::Plane, String> {
    let f = PLANE_FLAGS.get().cloned().unwrap_or_default();
    let key = f
        .cluster_key
        .clone()
        .or_else(|| c.and_then(|c| c.cluster_key.clone()));
    let insecure = f.insecure || (f.cluster_key.is_none() && c.is_some_and(|c| c.insecure));
    ffmk_node::config::plane(key.as_deref(), insecure).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate a gossiping colony and print the average age of the
    /// information at steady state and the traffic per node and step.
    GossipSim(GossipSimArgs),
    /// Compare diffusion repartitioning with METIS from scratch on a
    /// synthetic workload over many time steps: imbalance, migration,
    /// edge-cut and run time per method.
    BalanceSim(BalanceSimArgs),
    /// Run the node daemon: learn the local VMs from their VMM APIs,
    /// gossip with the other hosts over UDP, and move VMs by live
    /// migration when this host is overloaded.
    Run(RunArgs),
    /// Show the bulletin board, VMs and migrations a daemon holds now.
    Status(StatusArgs),
    /// Run a command on every live host of a group, through the local
    /// daemon: a fault-tolerant broadcast (corrected tree over UDP) that
    /// reaches every live daemon even when some are dead. Commands: echo
    /// TEXT, pause VM-GLOB, resume VM-GLOB, drain HOST-GLOB, undrain
    /// HOST-GLOB (docs/balance.md).
    Broadcast(BroadcastArgs),
    /// Write a job's checkpoint to the shared burst buffer in its turn:
    /// ask the checkpoint coordinator for a grant (waiting while another
    /// job writes, at most its delay bound), run COMMAND, release the
    /// grant. Exits with COMMAND's status; prints one JSON line (waited,
    /// held, shared).
    Checkpoint(CheckpointArgs),
    /// A job of VMs (those named JOB-... on the cluster's hosts) as a
    /// whole: checkpoint it as a consistent cut (pre-copy while it runs,
    /// pause it through the control broadcast, capture, resume), list its
    /// checkpoints, restore it on the same or other hosts (docs/jobs.md).
    #[command(subcommand)]
    Job(JobCmd),
    /// Simulate jobs checkpointing to one burst buffer, coordinated
    /// (exclusive, with a delay bound) and not: node-hours lost to
    /// checkpoint writes and the delays (docs/balance.md).
    CkptSim(CkptSimArgs),
    /// Run this node's VM of a Slurm job step (one task per node: `srun
    /// --ntasks-per-node=1 ffmk-node slurm-vm ...`): named
    /// job<JOBID>-rank<RANK> in the node daemon's VM directory, its rank
    /// layout on the guest command line; it is the task, so it ends with
    /// the step (docs/balance.md).
    SlurmVm(SlurmVmArgs),
    #[command(flatten)]
    Docs(cli_docs::Docs),
}

#[derive(clap::Args)]
struct SlurmVmArgs {
    /// The ffmk-vmm binary.
    #[arg(long, default_value = "ffmk-vmm")]
    vmm: std::path::PathBuf,
    /// The node daemon's settings (`%n`: this node's name): the task then
    /// stays its VM's proxy when the daemons move the VM to another host
    /// of the job's allocation (signals go there, the task ends with the
    /// VM: docs/jobs.md). Without it the task ends when its VM leaves.
    #[arg(long)]
    config: Option<String>,
    /// Where the VM's API socket and console go (`%n`: this node's name)
    /// [default: the daemon's vm_dir, from --config].
    #[arg(long)]
    vm_dir: Option<String>,
    /// Guest kernel (and initramfs).
    #[arg(long)]
    kernel: std::path::PathBuf,
    #[arg(long)]
    initrd: Option<std::path::PathBuf>,
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Compute vCPUs of the rank (beside one service vCPU) [default:
    /// SLURM_CPUS_PER_TASK minus one, or none].
    #[arg(long)]
    compute: Option<u32>,
    /// Guest command line; the rank layout (ffmk.job= ffmk.rank=
    /// ffmk.ranks= ffmk.node= ffmk.nodes=) is appended.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// More flags for ffmk-vmm run (after --).
    #[arg(last = true)]
    run_args: Vec<String>,
}

#[derive(clap::Args)]
struct CheckpointArgs {
    /// The daemon settings (the coordinator's address).
    #[arg(long)]
    config: std::path::PathBuf,
    /// The job's name (one per job, the same on all its hosts).
    #[arg(long)]
    job: String,
    /// What it will write (bytes; for the coordinator's log).
    #[arg(long, default_value_t = 0)]
    bytes: u64,
    /// The checkpoint command, e.g. ffmk-vmm checkpoint take ...
    #[arg(required = true, num_args = 1.., last = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum JobCmd {
    /// Checkpoint every VM of JOB together: a live pre-copy of each, then
    /// the whole job paused at once (the control broadcast) for the last
    /// pages and the device state, then resumed; in its turn at the
    /// checkpoint coordinator. Exit 0: the checkpoint is complete; 1: it
    /// failed as a whole (every VM resumed, nothing kept).
    Checkpoint(JobArgs),
    /// Restart JOB from its newest complete checkpoint (or --epoch): every
    /// VM is checked on its host, all start paused, then the job resumes
    /// at once. Nothing starts unless every VM can.
    Restore(JobRestoreArgs),
    /// The complete checkpoints of JOB the hosts can read, newest first.
    List(JobArgs),
}

#[derive(clap::Args)]
struct JobArgs {
    /// The daemon settings (the cluster's hosts and ports).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Only these hosts (a host list within the cluster's, e.g. the
    /// job's Slurm allocation) [default: all].
    #[arg(long)]
    hosts: Option<String>,
    /// One JSON object instead of lines of text.
    #[arg(long)]
    json: bool,
    /// The job: its VMs are named JOB-... (slurm-vm: job<ID>-rank<R>).
    job: String,
}

#[derive(clap::Args)]
struct JobRestoreArgs {
    #[command(flatten)]
    job: JobArgs,
    /// The checkpoint to restore (ckpt-...) [default: the newest complete].
    #[arg(long)]
    epoch: Option<String>,
    /// Restore VM on HOST instead of the host it was checkpointed on
    /// (repeatable).
    #[arg(long, value_name = "VM=HOST")]
    on: Vec<String>,
}

#[derive(clap::Args)]
struct CkptSimArgs {
    /// Node counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    nodes: Vec<u32>,
    /// Jobs per 1,000 nodes.
    #[arg(long, default_value_t = 20)]
    jobs_per_1000: u32,
    /// Checkpoint data per node (GB).
    #[arg(long, default_value_t = 32.0)]
    node_gb: f64,
    /// Burst-buffer bandwidth per 1,000 nodes (GB/s).
    #[arg(long, default_value_t = 10.0)]
    bb_gbps_per_1000: f64,
    /// Node MTBF (hours).
    #[arg(long, default_value_t = 43800.0)]
    node_mtbf_h: f64,
    /// Simulated time (hours).
    #[arg(long, default_value_t = 168.0)]
    hours: f64,
    /// The coordinator's delay bounds (s), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "300,1800")]
    max_delay_s: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BroadcastArgs {
    /// The daemon's settings (its broadcast address).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Hosts the command goes to: a host list within the cluster's
    /// (node[03-07]), or all.
    #[arg(long, default_value = "all")]
    group: String,
    /// Seconds to wait for the hosts of the group to report the command
    /// run (asked over their control ports); 0: report only that it was
    /// sent.
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS", value_parser = seconds)]
    wait: f64,
    /// One JSON object: id, command, group, hosts, delivered (host and
    /// result each), missing.
    #[arg(long)]
    json: bool,
    /// The command and its argument, e.g. pause 'job7-*'.
    #[arg(required = true, num_args = 1..)]
    command: Vec<String>,
}

/// A number of seconds: finite, not negative.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML settings (hosts, me, vm_dir, ports, thresholds; see docs/balance.md).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Slurm-style host list, overriding the file (node[01-16]).
    #[arg(long)]
    hosts: Option<String>,
    /// This host's name in the list, overriding the file.
    #[arg(long)]
    me: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Ask the daemon configured by this file (its own control address).
    #[arg(long, conflicts_with = "connect")]
    config: Option<std::path::PathBuf>,
    /// Or ask the daemon at HOST:PORT.
    #[arg(long)]
    connect: Option<String>,
    #[arg(long)]
    json: bool,
}

fn load_config(
    path: &std::path::Path,
    hosts: Option<String>,
    me: Option<String>,
) -> Result<ffmk_node::config::Resolved, String> {
    let mut c = Config::load(path).map_err(|e| e.to_string())?;
    if let Some(h) = hosts {
        c.hosts = h;
    }
    if let Some(m) = me {
        c.me = m;
    }
    c.resolve().map_err(|e| e.to_string())
}

fn run_daemon(a: RunArgs) -> Result<(), String> {
    let r = load_config(&a.config, a.hosts, a.me)?;
    let plane = plane_of(Some(&r.config))?;
    ffmk_node::run(r, plane).map_err(|e| e.to_string())
}

fn show_status(a: StatusArgs) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let mut config = None;
    let addr = match (&a.config, &a.connect) {
        (Some(p), _) => {
            let r = load_config(p, None, None)?;
            let addr = r.control[r.slot];
            config = Some(r.config);
            addr
        }
        (None, Some(c)) => c
            .to_socket_addrs()
            .map_err(|e| format!("--connect {c}: {e}"))?
            .next()
            .ok_or_else(|| format!("--connect {c}: no address"))?,
        (None, None) => return Err("say which daemon: --config FILE or --connect HOST:PORT".into()),
    };
    let plane = plane_of(config.as_ref())?;
    let reply = control::call(
        addr,
        &plane.trust,
        &control::Request::Status {},
        std::time::Duration::from_secs(5),
    )
    .map_err(|e| e.to_string())?;
    let st = match (reply.ok, reply.status) {
        (true, Some(s)) => s,
        _ => {
            return Err(reply
                .error
                .unwrap_or_else(|| "no status in the reply".into()))
        }
    };
    if a.json {
        println!("{st}");
        return Ok(());
    }
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(x) => x.clone(),
        x => x.to_string(),
    };
    println!(
        "host {} (slot {}), incarnation {}, up {:.0} s, health {}, window {}, period {} ms",
        s(&st["host"]),
        st["slot"],
        st["incarnation"],
        st["uptime_s"].as_f64().unwrap_or(0.0),
        s(&st["health"]),
        s(&st["window"]),
        st["period_ms"]
    );
    println!(
        "{:>4} {:<20} {:>8} {:>7} {:>6} {:>5} {:>9} {:>4} {:<9}",
        "slot", "host", "age", "state", "load", "cores", "free MiB", "VMs", "health"
    );
    for e in st["board"].as_array().into_iter().flatten() {
        let info = &e["info"];
        let age = e["age"].as_f64().map_or("-".into(), |a| format!("{a:.1}"));
        let state = if info.is_null() {
            "unknown"
        } else if e["alive"] == true {
            "alive"
        } else {
            "dead"
        };
        println!(
            "{:>4} {:<20} {:>8} {:>7} {:>6} {:>5} {:>9} {:>4} {:<9}",
            s(&e["slot"]),
            s(&e["host"]),
            age,
            state,
            info["load"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.2}")),
            s(&info["cores"]),
            s(&info["free_mib"]),
            s(&info["vms"]),
            s(&info["health"])
        );
    }
    for v in st["vms"].as_array().into_iter().flatten() {
        println!(
            "vm {:<16} load {:.2} cpus {} memory {} MiB {}{}",
            s(&v["name"]),
            v["load"].as_f64().unwrap_or(0.0),
            s(&v["cpus"]),
            v["memory_mib"],
            s(&v["state"]),
            v["unmovable"]
                .as_str()
                .map(|u| format!(" (stays: {u})"))
                .unwrap_or_default()
        );
    }
    for (k, label) in [
        ("incoming", "incoming"),
        ("backoff", "backing off"),
        ("unreachable_vms", "unreachable"),
    ] {
        for x in st[k].as_array().into_iter().flatten() {
            println!("{label}: {x}");
        }
    }
    if !st["outgoing"].is_null() {
        println!("outgoing: {}", st["outgoing"]);
    }
    Ok(())
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

#[derive(clap::Args)]
struct BalanceSimArgs {
    /// shock (a moving front of 4x load), cloud (drifting hot spots), or both.
    #[arg(long, default_value = "both")]
    workload: String,
    /// Partitions (nodes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "96,512,2048,8192")]
    parts: Vec<usize>,
    /// Tasks per partition (the grid has about parts x this many tasks).
    #[arg(long, default_value_t = 64)]
    tasks_per_part: usize,
    /// Time steps after the initial partition.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Imbalance tolerance of the refinement and of METIS (0.03 = 3%).
    #[arg(long, default_value_t = 0.03)]
    tolerance: f64,
    /// One JSON object per (workload, parts) with every step.
    #[arg(long)]
    json: bool,
    /// Draw the four metrics over the partitions into this PNG.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Also write the JSON objects (every step) to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

fn balance_sim(a: BalanceSimArgs) -> Result<(), String> {
    let kinds: Vec<Kind> = match a.workload.as_str() {
        "both" => vec![Kind::Shock, Kind::Cloud],
        w => vec![w.parse()?],
    };
    if !(0.0..1.0).contains(&a.tolerance) {
        return Err(format!("--tolerance {} is not in [0, 1)", a.tolerance));
    }
    let params = Params {
        tolerance: a.tolerance,
        ..Params::default()
    };
    if !a.json {
        println!(
            "{:<6} {:>6} {:>8} {:<10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11} {:>6}",
            "load",
            "parts",
            "tasks",
            "method",
            "imb.mean",
            "imb.max",
            "migr.",
            "edge-cut",
            "time[s]",
            "time/node",
            "iters"
        );
    }
    let mut all = Vec::new();
    let mut json_out = match &a.json_out {
        Some(p) => Some(
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?,
        ),
        None => None,
    };
    for kind in kinds {
        for &parts in &a.parts {
            let cfg = EvalConfig {
                workload: kind,
                parts,
                tasks_per_part: a.tasks_per_part,
                steps: a.steps,
                seed: a.seed,
                params,
            };
            let r = evaluate::run(&cfg).map_err(|e| e.to_string())?;
            if let Some(f) = json_out.as_mut() {
                use std::io::Write;
                let line = serde_json::to_string(&r).map_err(|e| e.to_string())?;
                writeln!(f, "{line}").map_err(|e| format!("cannot write the JSON: {e}"))?;
            }
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                for m in &r.methods {
                    let iters = if m.method == "diffusion" {
                        format!("{:.0}", r.diffusion_iterations_mean)
                    } else {
                        "-".into()
                    };
                    println!(
                        "{:<6} {:>6} {:>8} {:<10} {:>9.4} {:>9.4} {:>9.3} {:>10.0} {:>10.4} {:>11.2e} {:>6}",
                        kind, parts, r.tasks, m.method, m.imbalance_mean, m.imbalance_max,
                        m.migration_mean, m.edge_cut_mean, m.seconds_median, m.seconds_per_node, iters
                    );
                }
            }
            all.push(r);
        }
    }
    if let Some(path) = &a.plot {
        balance_sim::plot::draw(path, &all).map_err(|e| e.to_string())?;
        if !a.json {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
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
    let r = gossip_sim::run(&cfg).map_err(|e| e.to_string())?;
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

fn send_broadcast(a: BroadcastArgs) -> Result<(), String> {
    use ffmk_node::bcast;
    let r = load_config(&a.config, None, None)?;
    let command = a.command.join(" ");
    // Checked here first, so that a typo is not sent to every host.
    command
        .parse::<bcast::Command>()
        .map_err(|e| format!("broadcast: {e}"))?;
    let addrs: Vec<std::net::SocketAddr> = r
        .gossip
        .iter()
        .map(|g| std::net::SocketAddr::new(g.ip(), r.config.broadcast_port))
        .collect();
    let group = bcast::resolver(r.names.clone(), addrs.clone())(&a.group)
        .and_then(|g| {
            if g.is_empty() {
                Err(format!("group {} has no host", a.group))
            } else {
                Ok(g)
            }
        })
        .map_err(|e| format!("broadcast to {}: {e}", a.group))?;
    let plane = plane_of(Some(&r.config))?;
    let key = match &plane.trust {
        cluster_auth::Trust::Key(k) => Some(k.cluster().map_err(|e| e.to_string())?),
        cluster_auth::Trust::Insecure => None,
    };
    let answer = broadcast::udp::request(
        addrs[r.slot],
        &a.group,
        &command,
        std::time::Duration::from_secs(5),
        key,
    )
    .map_err(|e| {
        format!(
            "broadcast: the local daemon ({}) did not answer: {e}",
            addrs[r.slot]
        )
    })?;
    let Some(id) = answer.strip_prefix("ok ") else {
        return Err(format!(
            "broadcast: {}",
            answer.strip_prefix("error ").unwrap_or(&answer)
        ));
    };
    let slots: Vec<usize> = group
        .iter()
        .filter_map(|g| addrs.iter().position(|a| a == g))
        .collect();
    if a.wait == 0.0 {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"id": id, "command": command, "group": a.group, "hosts": slots.len()})
            );
        } else {
            println!(
                "broadcast {id}: {command} -> {} ({} hosts)",
                a.group,
                slots.len()
            );
        }
        return Ok(());
    }
    let heard = delivered_on(
        &r,
        &plane,
        &slots,
        id,
        std::time::Duration::from_secs_f64(a.wait),
    );
    let missing: Vec<&str> = slots
        .iter()
        .filter(|s| !heard.iter().any(|(h, _)| h == *s))
        .map(|s| r.names[*s].as_str())
        .collect();
    if a.json {
        let delivered: Vec<serde_json::Value> = heard
            .iter()
            .map(|(s, result)| serde_json::json!({"host": r.names[*s], "result": result}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "id": id, "command": command, "group": a.group, "hosts": slots.len(),
                "delivered": delivered, "missing": missing,
            })
        );
        return Ok(());
    }
    println!(
        "broadcast {id}: {command} -> {}: run on {} of {} hosts{}",
        a.group,
        heard.len(),
        slots.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                "; no answer within {} s from {}",
                a.wait,
                missing.join(", ")
            )
        }
    );
    Ok(())
}

/// The hosts (of `slots`) whose daemon reports broadcast `id` run, with
/// its result, asked over their control ports until all have or `wait`
/// is over (32 hosts asked at once).
fn delivered_on(
    r: &ffmk_node::config::Resolved,
    plane: &ffmk_node::config::Plane,
    slots: &[usize],
    id: &str,
    wait: std::time::Duration,
) -> Vec<(usize, String)> {
    use ffmk_node::control;
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + wait;
    let mut heard: Vec<(usize, String)> = Vec::new();
    loop {
        let pending: Vec<usize> = slots
            .iter()
            .copied()
            .filter(|s| !heard.iter().any(|(h, _)| h == s))
            .collect();
        if pending.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let per_call = left.clamp(Duration::from_millis(200), Duration::from_secs(2));
        for chunk in pending.chunks(32) {
            let found: Vec<(usize, String)> = std::thread::scope(|sc| {
                let asks: Vec<_> = chunk
                    .iter()
                    .map(|&slot| {
                        sc.spawn(move || {
                            let reply = control::call(
                                r.control[slot],
                                &plane.trust,
                                &control::Request::Status {},
                                per_call,
                            )
                            .ok()?;
                            let st = reply.status?;
                            st["broadcasts"].as_array()?.iter().find_map(|b| {
                                (b["id"] == id)
                                    .then(|| (slot, b["result"].as_str().unwrap_or("").to_string()))
                            })
                        })
                    })
                    .collect();
                asks.into_iter()
                    .filter_map(|h| h.join().ok().flatten())
                    .collect()
            });
            heard.extend(found);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    heard.sort_by_key(|(s, _)| *s);
    heard
}

fn checkpoint_in_turn(a: CheckpointArgs) -> Result<u8, String> {
    use std::time::{Duration, Instant};
    if !balance::ckpt::valid_job(&a.job) {
        return Err(format!("--job {:?}: 1-64 of A-Z a-z 0-9 . _ -", a.job));
    }
    let r = load_config(&a.config, None, None)?;
    let plane = plane_of(Some(&r.config))?;
    let coord = r.control[r.ckpt_coordinator()];
    let ask = |req: &control::Request| -> Result<serde_json::Value, String> {
        let reply = control::call(coord, &plane.trust, req, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        match (reply.ok, reply.ckpt) {
            (true, Some(c)) => Ok(c),
            _ => Err(format!(
                "checkpoint coordinator {coord}: {}",
                reply.error.unwrap_or_else(|| "no answer".into())
            )),
        }
    };
    let asked = Instant::now();
    let granted = loop {
        let a2 = ask(&control::Request::CkptAcquire {
            job: a.job.clone(),
            bytes: a.bytes,
        })?;
        if a2["answer"] == "granted" {
            break a2;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = asked.elapsed().as_secs_f64();
    let started = Instant::now();
    let status = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .status();
    let wrote = started.elapsed().as_secs_f64();
    // Released whatever the command did (a dead holder's grant would
    // otherwise block the others until its lease ends).
    let released = ask(&control::Request::CkptRelease {
        job: a.job.clone(),
        token: granted["token"].as_str().unwrap_or_default().to_string(),
    });
    let code = match &status {
        Ok(s) => s.code().unwrap_or(1) as u8,
        Err(_) => 127,
    };
    println!(
        "{}",
        serde_json::json!({
            "job": a.job, "waited_s": waited, "wrote_s": wrote,
            "shared": granted["shared"], "exit": code,
            "released": released.is_ok(),
        })
    );
    if let Err(e) = status {
        return Err(format!("cannot run {}: {e}", a.command[0]));
    }
    released?;
    Ok(code)
}

/// The hosts (slots) a job command talks to: `--hosts` or all.
fn job_hosts(r: &ffmk_node::config::Resolved, hosts: Option<&str>) -> Result<Vec<usize>, String> {
    let Some(list) = hosts else {
        return Ok((0..r.names.len()).collect());
    };
    let names = balance::hostlist::expand(list).map_err(|e| format!("--hosts {list}: {e}"))?;
    if names.is_empty() {
        return Err(format!("--hosts {list}: no host"));
    }
    names
        .iter()
        .map(|n| {
            r.names
                .iter()
                .position(|h| h == n)
                .ok_or_else(|| format!("--hosts: {n} is not in the cluster's host list"))
        })
        .collect()
}

/// `ffmk-node job ...`: exit 1 when the operation failed, 2 for bad input.
fn job(cmd: JobCmd) -> Result<u8, String> {
    use ffmk_node::job::Driver;
    let a = match &cmd {
        JobCmd::Checkpoint(a) | JobCmd::List(a) => a,
        JobCmd::Restore(r) => &r.job,
    };
    if !balance::ckpt::valid_job(&a.job) {
        return Err(format!(
            "{:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)",
            a.job
        ));
    }
    let r = load_config(&a.config, None, None)?;
    let plane = plane_of(Some(&r.config))?;
    let slots = job_hosts(&r, a.hosts.as_deref())?;
    let json = a.json;
    let say = move |line: &str| {
        if !json {
            eprintln!("{line}");
        }
    };
    let d = Driver {
        r: &r,
        plane: &plane,
        say: &say,
    };
    let done = match &cmd {
        JobCmd::Checkpoint(a) => d.checkpoint(&a.job, &slots).map(|m| {
            if !json {
                println!(
                    "job {}: checkpoint {} complete: {} VM(s), the job paused {:.1} ms (copies converged after {:.2} s), {:.2} s in all",
                    a.job,
                    m["epoch"].as_str().unwrap_or(""),
                    m["vms"].as_array().map_or(0, Vec::len),
                    m["pause_ms"].as_f64().unwrap_or(0.0),
                    m["converged_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    m["total_s"].as_f64().unwrap_or(0.0),
                );
            }
            m
        }),
        JobCmd::List(a) => d.copies(&a.job, &slots).map(|copies| {
            if !json {
                if copies.is_empty() {
                    println!("job {}: no complete checkpoint", a.job);
                }
                for (m, hosts) in &copies {
                    let vms: Vec<String> = m["vms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|v| format!("{}@{}", v["name"].as_str().unwrap_or("?"), v["host"].as_str().unwrap_or("?")))
                        .collect();
                    println!(
                        "{}  {}  paused {:.1} ms  readable on {}",
                        m["epoch"].as_str().unwrap_or(""),
                        vms.join(" "),
                        m["pause_ms"].as_f64().unwrap_or(0.0),
                        hosts.iter().map(|s| r.names[*s].as_str()).collect::<Vec<_>>().join(",")
                    );
                }
            }
            serde_json::json!({"job": a.job, "copies": copies.iter().map(|(m, _)| m).collect::<Vec<_>>()})
        }),
        JobCmd::Restore(ra) => {
            let mut on = Vec::new();
            for o in &ra.on {
                let (vm, host) = o
                    .split_once('=')
                    .ok_or_else(|| format!("--on {o}: VM=HOST"))?;
                let slot = r
                    .names
                    .iter()
                    .position(|h| h == host)
                    .ok_or_else(|| format!("--on {o}: {host} is not in the cluster's host list"))?;
                on.push((vm.to_string(), slot));
            }
            if let Some(e) = &ra.epoch {
                if !ffmk_node::job::valid_epoch(e) {
                    return Err(format!("--epoch {e}: not a checkpoint name (ckpt-MILLISECONDS)"));
                }
            }
            d.restore(&ra.job.job, ra.epoch.as_deref(), &on, &slots).map(|m| {
                if !json {
                    println!(
                        "job {}: restored {} ({} VM(s)) and resumed in {:.2} s",
                        ra.job.job,
                        m["epoch"].as_str().unwrap_or(""),
                        m["vms"].as_array().map_or(0, Vec::len),
                        m["total_s"].as_f64().unwrap_or(0.0)
                    );
                }
                m
            })
        }
    };
    match done {
        Ok(v) => {
            if json {
                println!("{v}");
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("ffmk-node: {e}");
            Ok(1)
        }
    }
}

fn ckpt_sim(a: CkptSimArgs) -> Result<(), String> {
    use balance::ckpt::Policy;
    use balance_sim::ckpt_sim as sim;
    if a.seeds == 0 || a.nodes.contains(&0) {
        return Err("--seeds and every --nodes must be at least 1".into());
    }
    if !a.json {
        println!(
            "{:>7} {:>5} {:>10} {:>9} {:>8} {:>12} {:>10} {:>10} {:>7}",
            "nodes",
            "jobs",
            "policy",
            "bound_s",
            "ckpts",
            "lost_node_h",
            "lost_%",
            "worst_s",
            "shared"
        );
    }
    for &n in &a.nodes {
        let jobs = (u64::from(n) * u64::from(a.jobs_per_1000) / 1000).max(1) as u32;
        let mut runs: Vec<(Policy, f64)> = vec![(Policy::None, 0.0)];
        runs.extend(a.max_delay_s.iter().map(|&d| (Policy::Exclusive, d)));
        for (policy, bound) in runs {
            let mut outs = Vec::new();
            for seed in 0..a.seeds {
                let p = sim::Params {
                    nodes: n,
                    jobs,
                    min_job: 8,
                    max_job: (n / 4).max(8),
                    node_gb: a.node_gb,
                    bb_gbps: a.bb_gbps_per_1000 * f64::from(n) / 1000.0,
                    node_mtbf_h: a.node_mtbf_h,
                    hours: a.hours,
                    policy,
                    max_delay_s: bound,
                    seed,
                };
                outs.push(sim::run(&p).map_err(|e| e.to_string())?);
            }
            let med = |f: &dyn Fn(&sim::Outcome) -> f64| {
                let mut v: Vec<f64> = outs.iter().map(f).collect();
                v.sort_by(|x, y| x.total_cmp(y));
                v[v.len() / 2]
            };
            let row = serde_json::json!({
                "nodes": n, "jobs": jobs, "policy": policy, "max_delay_s": bound,
                "checkpoints": med(&|o| o.checkpoints as f64),
                "lost_node_hours": med(&|o| o.lost_node_hours),
                "lost_share": med(&|o| o.lost_share),
                "worst_delay_s": med(&|o| o.worst_delay_s),
                "mean_delay_s": med(&|o| o.mean_delay_s),
                "shared_writes": med(&|o| o.shared_writes as f64),
            });
            if a.json {
                println!("{row}");
            } else {
                println!(
                    "{n:>7} {jobs:>5} {:>10} {:>9} {:>8.0} {:>12.0} {:>10.3} {:>10.0} {:>7.0}",
                    format!("{policy:?}").to_lowercase(),
                    if policy == Policy::None {
                        "-".to_string()
                    } else {
                        format!("{bound:.0}")
                    },
                    med(&|o| o.checkpoints as f64),
                    med(&|o| o.lost_node_hours),
                    med(&|o| o.lost_share) * 100.0,
                    med(&|o| o.worst_delay_s),
                    med(&|o| o.shared_writes as f64),
                );
            }
        }
    }
    Ok(())
}

/// The Slurm step's environment, checked: job id, rank, ranks, this node
/// and the allocation's nodes.
fn slurm_step() -> Result<(String, u32, u32, String, String), String> {
    const NEEDED: [&str; 5] = [
        "SLURM_JOB_ID",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURMD_NODENAME",
        "SLURM_JOB_NODELIST",
    ];
    // Every missing variable at once, not one per try.
    let missing: Vec<&str> = NEEDED
        .iter()
        .copied()
        .filter(|k| std::env::var(k).map_or(true, |v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} {} not set: run me as a Slurm task (srun)",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        ));
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let job = var("SLURM_JOB_ID");
    if !job.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("SLURM_JOB_ID {job:?} is not a job id"));
    }
    let num = |k: &str| -> Result<u32, String> {
        let v = var(k);
        v.parse().map_err(|_| format!("{k} {v:?} is not a number"))
    };
    let (rank, ranks) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?);
    let node = var("SLURMD_NODENAME");
    let nodes = var("SLURM_JOB_NODELIST");
    let list = balance::hostlist::expand(&nodes)
        .map_err(|e| format!("SLURM_JOB_NODELIST {nodes}: {e}"))?;
    if !list.contains(&node) {
        return Err(format!("node {node} is not in the allocation {nodes}"));
    }
    if rank >= ranks {
        return Err(format!("rank {rank} of {ranks} ranks"));
    }
    Ok((job, rank, ranks, node, nodes))
}

fn slurm_vm(a: SlurmVmArgs) -> Result<u8, String> {
    // First, before any thread: the signals Slurm sends the task are
    // taken by it and forwarded to the VM.
    let signals = ffmk_node::follow::block_signals();
    let (job, rank, ranks, node, nodes) = slurm_step()?;
    let on_node = |p: &str| std::path::PathBuf::from(p.replace("%n", &node));
    let cluster = match &a.config {
        Some(c) => {
            let r = load_config(&on_node(c), None, None)?;
            let plane = plane_of(Some(&r.config))?;
            Some(ffmk_node::follow::Cluster { r, plane })
        }
        None => None,
    };
    let vm_dir = match (&a.vm_dir, &cluster) {
        (Some(d), _) => on_node(d),
        (None, Some(c)) => c.r.config.vm_dir.clone(),
        (None, None) => return Err("--vm-dir or --config (the daemon's vm_dir) is needed".into()),
    };
    let compute = match a.compute {
        Some(c) => c,
        None => std::env::var("SLURM_CPUS_PER_TASK")
            .ok()
            .and_then(|c| c.parse::<u32>().ok())
            .map_or(0, |c| c.saturating_sub(1)),
    };
    let cpus = if compute > 0 {
        format!("service=1,compute={compute}")
    } else {
        "1".into()
    };
    let name = format!("job{job}-rank{rank}");
    std::fs::create_dir_all(&vm_dir)
        .map_err(|e| format!("cannot create {}: {e}", vm_dir.display()))?;
    let layout = format!(
        "ffmk.job={job} ffmk.rank={rank} ffmk.ranks={ranks} ffmk.node={node} ffmk.nodes={nodes}"
    );
    let cmdline = if a.cmdline.is_empty() {
        layout
    } else {
        format!("{} {layout}", a.cmdline)
    };
    let mut cmd = std::process::Command::new(&a.vmm);
    cmd.arg("run").arg("--kernel").arg(&a.kernel);
    if let Some(i) = &a.initrd {
        cmd.arg("--initrd").arg(i);
    }
    cmd.args([
        "--memory",
        &a.memory,
        "--cpus",
        &cpus,
        "--cmdline",
        &cmdline,
    ])
    .arg("--api-socket")
    .arg(vm_dir.join(format!("{name}.sock")))
    .arg("--console")
    .arg(format!(
        "file={}",
        vm_dir.join(format!("{name}.console")).display()
    ))
    .args(&a.run_args);
    // The cluster key this command was given goes on to the VMM (it
    // migrates with it); otherwise the VMM looks where ffmk-vmm looks.
    let flags = PLANE_FLAGS.get().cloned().unwrap_or_default();
    if let Some(k) = &flags.cluster_key {
        cmd.arg("--cluster-key").arg(k);
    } else if flags.insecure {
        cmd.arg("--insecure");
    }
    eprintln!("ffmk-node: {name} on {node}: {cpus} vCPUs, {}", a.memory);
    // The VMM is this task's child: Slurm's signals are forwarded to it
    // (wherever it runs), its status is the task's.
    ffmk_node::follow::run(
        &mut cmd,
        &name,
        &vm_dir.join(format!("{name}.sock")),
        cluster.as_ref(),
        &signals,
    )
    .map_err(|e| {
        if e.contains("cannot start") {
            format!("cannot run {}: {e}", a.vmm.display())
        } else {
            e
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = PLANE_FLAGS.set(cli.plane.clone());
    let r = match cli.cmd {
        Cmd::GossipSim(a) => gossip_sim(a),
        Cmd::BalanceSim(a) => balance_sim(a),
        Cmd::Run(a) => run_daemon(a),
        Cmd::Status(a) => show_status(a),
        Cmd::Broadcast(a) => send_broadcast(a),
        Cmd::Checkpoint(a) => match checkpoint_in_turn(a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::Job(c) => match job(c) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::CkptSim(a) => ckpt_sim(a),
        Cmd::SlurmVm(a) => match slurm_vm(a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::Docs(d) => {
            use clap::CommandFactory;
            d.run(Cli::command())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ffmk-node: {e}");
            ExitCode::from(2)
        }
    }
}
