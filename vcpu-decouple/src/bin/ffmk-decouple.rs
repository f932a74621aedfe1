//! `ffmk-decouple`: runs inside a guest of ffmk-vmm and puts processes on
//! the guest's compute CPUs (the ones ffmk-vmm isolated with `isolcpus=`,
//! `nohz_full=`, `rcu_nocbs=`). Built as a static binary for guest images.
use clap::{Parser, Subcommand};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use vcpu_decouple::guest::{local_rank, GuestCpus, CPU_VAR};
use vcpu_decouple::{affinity, CpuList};

#[derive(Parser)]
#[command(
    name = "ffmk-decouple",
    version,
    about = "Put processes on the compute CPUs of an ffmk-vmm guest"
)]
struct Cli {
    /// Read the CPU view (/sys, /proc/cmdline) below this directory instead of / (for tests).
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Target {
    /// This compute CPU.
    #[arg(long, conflicts_with = "rank")]
    cpu: Option<u32>,
    /// The compute CPU of this local rank (ranks wrap around the compute CPUs).
    /// Without --cpu and --rank: $FFMK_COMPUTE_CPU, else the local rank from the
    /// MPI launcher's environment (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID,
    /// MV2_COMM_WORLD_LOCAL_RANK, PMI_LOCAL_RANK, PALS_LOCAL_RANKID, SLURM_LOCALID),
    /// else the first compute CPU.
    #[arg(long)]
    rank: Option<u32>,
    /// Also run with SCHED_FIFO at this priority (1-99).
    #[arg(long, value_name = "PRIO", value_parser = clap::value_parser!(i32).range(1..=99))]
    fifo: Option<i32>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the compute and service CPUs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Move running threads onto a compute CPU (a PID moves all its threads).
    Pin {
        #[command(flatten)]
        target: Target,
        /// Process or thread ids.
        #[arg(required = true)]
        ids: Vec<i32>,
        /// Only the given thread ids, not every thread of each process.
        #[arg(long)]
        threads_only: bool,
    },
    /// Run a program on a compute CPU: `ffmk-decouple run [--] ./rank args`
    /// (under mpirun each rank picks its CPU from its local rank). The `--`
    /// is needed only when the program's name starts with `-`.
    Run {
        #[command(flatten)]
        target: Target,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

fn choose(cpus: &GuestCpus, t: &Target) -> Result<(u32, String), String> {
    if cpus.compute.is_empty() {
        return Err(format!(
            "this guest has no compute CPUs ({}); start the VM with `ffmk-vmm run --cpus service=S,compute=C`",
            cpus.source
        ));
    }
    let pick = |cpu: u32, why: String| {
        if cpus.compute.contains(cpu) {
            Ok((cpu, why))
        } else {
            Err(format!(
                "CPU {cpu} ({why}) is not a compute CPU (compute CPUs: {})",
                cpus.compute
            ))
        }
    };
    if let Some(c) = t.cpu {
        return pick(c, "--cpu".into());
    }
    if let Some(r) = t.rank {
        return pick(cpus.for_rank(r).unwrap_or(0), format!("local rank {r}"));
    }
    if let Some(v) = std::env::var(CPU_VAR).ok().filter(|v| !v.is_empty()) {
        let c = v
            .trim()
            .parse()
            .map_err(|_| format!("${CPU_VAR}='{v}' is not a CPU number"))?;
        return pick(c, format!("${CPU_VAR}"));
    }
    if let Some((var, r)) = local_rank(|k| std::env::var(k).ok()) {
        return pick(
            cpus.for_rank(r).unwrap_or(0),
            format!("local rank {r} from ${var}"),
        );
    }
    pick(
        cpus.for_rank(0).unwrap_or(0),
        "the first compute CPU".into(),
    )
}

/// Puts thread `tid` (0: this one) on `cpu`, with SCHED_FIFO `fifo` if given.
fn place(tid: i32, cpu: u32, fifo: Option<i32>) -> Result<(), String> {
    let what = if tid == 0 {
        "this process".to_string()
    } else {
        format!("thread {tid}")
    };
    affinity::pin_thread(tid, &CpuList::new(vec![cpu]), &what).map_err(|e| e.to_string())?;
    if let Some(p) = fifo {
        affinity::make_thread_realtime(tid, p, &what).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let cpus = GuestCpus::read(&cli.root).map_err(|e| e.to_string())?;
    match cli.cmd {
        Cmd::List { json } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&cpus).map_err(|e| e.to_string())?
                );
            } else {
                if cpus.compute.is_empty() {
                    println!("compute CPUs: none ({})", cpus.source);
                } else {
                    println!("compute CPUs: {} (from {})", cpus.compute, cpus.source);
                }
                println!("service CPUs: {}", cpus.service);
            }
            Ok(())
        }
        Cmd::Pin {
            target,
            ids,
            threads_only,
        } => {
            let (cpu, why) = choose(&cpus, &target)?;
            for id in ids {
                let tids: Vec<i32> = if threads_only {
                    vec![id]
                } else {
                    let t: Vec<i32> = affinity::threads(std::path::Path::new("/proc"), id as u32)
                        .into_iter()
                        .map(|t| t.tid)
                        .collect();
                    if t.is_empty() {
                        return Err(format!("no process {id}"));
                    }
                    t
                };
                for tid in tids {
                    place(tid, cpu, target.fifo)?;
                }
                println!("{id} -> CPU {cpu} ({why})");
            }
            Ok(())
        }
        Cmd::Run { target, command } => {
            let (cpu, _why) = choose(&cpus, &target)?;
            place(0, cpu, target.fifo)?;
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .env(CPU_VAR, cpu.to_string())
                .exec();
            Err(format!("cannot run {}: {err}", command[0]))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ffmk-decouple: {e}");
            ExitCode::FAILURE
        }
    }
}
