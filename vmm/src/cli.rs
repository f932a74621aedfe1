//! Command line of `ffmk-vmm`.
use crate::config::{DiskEntry, NetEntry, VmSpec, VsockEntry};
use crate::host::CpuProfile;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vcpu_decouple::exits::ExitsRequest;
use vcpu_decouple::{CpuList, PinSpec, Topology};

#[derive(Parser, Debug)]
#[command(
    name = "ffmk-vmm",
    version,
    about = "KVM virtual machine monitor for HPC compute nodes",
    after_help = "Exit codes: 0 ok, 1 failure or no answer in time, 2 bad usage or input, 3 guest \
                  crash, 4 refused, N the guest's test-exit status. The configuration file's \
                  keys: docs/config.md; exit codes, timeouts, logs, metrics: docs/operations.md \
                  (/usr/share/doc/ffmk/ when installed)."
)]
pub struct Cli {
    /// Which logs show: a level (error, warn, info, debug, trace, off) or
    /// RUST_LOG-style directives (`info,vmm::migration=debug`)
    /// [default: RUST_LOG, else warn].
    #[arg(long, global = true, value_name = "FILTER", value_parser = check_log_filter)]
    pub log_level: Option<String>,
    /// `text`: `ffmk-vmm: ...` lines, colour only on a terminal; `json`:
    /// one JSON object per line (timestamp, level, target, fields).
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-level`: levels or `TARGET=LEVEL` directives; a word that is not
/// a level (`verbose`) is refused rather than read as a target.
pub fn check_log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty filter (want a level: error, warn, info, debug, trace, off)".into());
    }
    for d in s.split(',') {
        let d = d.trim();
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{d:?} is not a level or TARGET=LEVEL (levels: {})",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(s.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest (ELF vmlinux with or without PVH note, bzImage, or the probe guest).
    Run(Box<RunArgs>),
    /// Print the host kind, KVM capabilities and the CPU profile that would be used.
    HostInfo {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Show this profile instead of the host's default.
        #[arg(long, value_enum)]
        cpu_profile: Option<CpuProfile>,
    },
    /// Audit this host for what would disturb compute cores: isolcpus,
    /// nohz_full, rcu_nocbs, IRQ affinities, cpufreq governor, THP, huge
    /// pages, SMT siblings, tasks allowed on those cores, NMI watchdog,
    /// workqueues. A verdict (ok, info, warn) and a suggestion per item.
    HostCheck {
        /// Host cores meant for compute vCPUs [default: the isolated cores,
        /// else the last online core].
        #[arg(long, value_name = "LIST")]
        compute: Option<CpuList>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Read /proc and /sys below this directory (a captured tree).
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Print the state of a running VM (GET /vm).
    Info(ClientArgs),
    /// Pause all vCPUs of a running VM.
    Pause(ClientArgs),
    /// Resume a paused VM.
    Resume(ClientArgs),
    /// Stop a running VM.
    Shutdown(ClientArgs),
    /// Announce a VM on the network again: each network device sends RARP
    /// frames with its MAC on its TAP and asks the guest for gratuitous ARPs
    /// (5 rounds over 0.8 s; done by itself when a VM moved here). For an
    /// operator after a change of the fabric (a switch replaced, a bond
    /// failed over) that left MAC tables pointing elsewhere.
    Announce(ClientArgs),
    /// Snapshot a running VM (full or incremental), or inspect/compact a snapshot.
    Snapshot(SnapshotArgs),
    /// Start a VM from a snapshot directory (the chain's newest state).
    Restore(Box<RestoreArgs>),
    /// Multi-level checkpoints: take one (local first, slower levels filled
    /// while the guest runs), restore the newest valid copy, list, plan
    /// intervals, or serve as a host's endpoint for partner/XOR levels.
    Checkpoint {
        #[command(subcommand)]
        action: CheckpointAction,
        #[command(flatten)]
        plane: PlaneArgs,
    },
    /// Live-migrate a running VM to a destination started with
    /// `ffmk-vmm run --incoming tcp://ADDR:PORT` (same memory, vCPUs, CPU
    /// profile and devices; passthrough functions leave first, with the
    /// guest agent's consent, and come back if the migration fails). Shows
    /// rounds, bytes, dirty rate and predicted downtime (a bar on a
    /// terminal, JSON lines otherwise); Ctrl-C cancels and the VM keeps
    /// running here.
    Migrate(MigrateArgs),
    /// The cluster key: every cluster-plane channel (live migration, the
    /// checkpoint service, ffmk-node's control port, gossip and broadcast)
    /// is authenticated with it (and encrypted). Create
    /// one per cluster, copy it to every node (mode 0600, like munge's
    /// key), and derive job keys for checkpoint clients that should open
    /// one job's copies only (docs/security.md).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Hot-plug or hot-unplug a passthrough function of a running VM
    /// (`PUT /vm/devices`, `DELETE /vm/devices/BDF`). With `--hotplug-slots`
    /// the function goes into a PCIe hot-plug slot and the guest's own
    /// hot-plug driver finds it and lets go of it; otherwise it goes on
    /// bus 0 and the guest agent rescans. A function leaves once the guest
    /// has let go of it (docs/vfio.md).
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Host PCI functions for passthrough: list them with their driver and
    /// IOMMU group, bind one to vfio-pci (for `run --device vfio=...`) or
    /// give it back to its host driver.
    Vfio {
        #[command(subcommand)]
        action: VfioAction,
    },
    /// InfiniBand HCAs and their virtual functions: list HCAs, ports and
    /// VFs, create VFs, set a VF's GUIDs and link policy (mlx5), check what
    /// keeps an HCA from serving VMs, bind a VF to vfio-pci.
    Ib {
        #[command(subcommand)]
        action: IbAction,
    },
    #[command(flatten)]
    Docs(cli_docs::Docs),
    /// Grow a running VM's disk; the guest gets a configuration-change interrupt.
    ResizeDisk {
        #[command(flatten)]
        client: ClientArgs,
        /// Index of the disk (order of --disk flags, from 0).
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// New size, e.g. 2G, 1536M (plain numbers are MiB); never smaller than now.
        #[arg(long)]
        size: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceAction {
    /// Attach vfio=DDDD:BB:DD.F or vfio-user=SOCKET; prints its guest BDF.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        device: String,
    },
    /// Detach the passthrough function at guest BDF BB:SS.0 (as `info`
    /// lists it). First the guest lets go: a VM with vsock asks its guest
    /// agent; a function in a hot-plug slot is ejected through the slot
    /// (attention button; the guest powers the slot off).
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        bdf: String,
        /// Do not ask the guest: remove it even if the guest uses it (a
        /// surprise removal for a function in a hot-plug slot).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VfioAction {
    /// PCI functions with vendor:device, driver and IOMMU group.
    List {
        #[arg(long)]
        json: bool,
        /// Read /sys below this directory (a captured tree).
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Bind a function to vfio-pci (unbinding it from its driver).
    Bind {
        address: String,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Give a function back to its host driver.
    Unbind {
        address: String,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum IbAction {
    /// HCAs with ports (state, LID, rate, pkeys) and VFs (driver, GUIDs, policy).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Set the number of VFs of an HCA (0 removes them).
    CreateVfs {
        hca: String,
        count: u32,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Set a VF's node and port GUID (mlx5), e.g. 02:00:00:00:00:00:00:01.
    SetGuid {
        hca: String,
        vf: u32,
        #[arg(long)]
        node: String,
        #[arg(long)]
        port: String,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Set a VF's link policy: up, down or follow (the PF's port).
    SetPolicy {
        hca: String,
        vf: u32,
        policy: String,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Bind VF N of an HCA to vfio-pci; prints its PCI address.
    Bind {
        hca: String,
        vf: u32,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// What keeps an HCA from giving VMs VFs: one line each; exit 1 if any.
    Check {
        hca: String,
        /// One JSON object on stdout instead of the sentence.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: Option<SnapshotAction>,
    /// The running VM's API socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Snapshot directory: created for a full snapshot; for --incremental,
    /// the chain this VM last wrote (or was restored from).
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// Add a layer with the pages dirtied since the previous snapshot.
    #[arg(long)]
    pub incremental: bool,
    /// Replace an existing snapshot at --dest (full snapshots only).
    #[arg(long)]
    pub force: bool,
    /// Copy memory while the guest runs; pause only for the last dirty pages.
    #[arg(long)]
    pub live: bool,
    /// Passthrough functions leave for the snapshot (the guest agent lets
    /// go of them first) and come back after it.
    #[arg(long)]
    pub detach_devices: bool,
    /// Give up when the VMM has not answered within this many seconds (0:
    /// wait as long as it takes) [default: 3600, a big VM to a slow store].
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
    /// Print the API's answer as JSON (SnapshotReply in docs/api.yaml).
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotAction {
    /// Print a snapshot's manifest summary (layers, sizes, pause times).
    Inspect {
        dir: PathBuf,
        /// Also check every checksum.
        #[arg(long)]
        verify: bool,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fold an incremental chain into one full layer, in place.
    Compact {
        dir: PathBuf,
        /// Print the new manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CheckpointAction {
    /// Checkpoint a running VM into the local level, then fill the slower
    /// levels from it while the guest runs (progress bars on a terminal,
    /// JSON lines otherwise). Extends the local chain with an incremental
    /// layer when it can, else starts a new chain.
    Take {
        /// Level configuration (TOML; see docs/checkpoints.md).
        #[arg(long)]
        config: PathBuf,
        /// The running VM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        /// Start a new chain (full snapshot) even if the local one could be extended.
        #[arg(long)]
        full: bool,
        /// Fill only these slower levels (names, comma-separated).
        #[arg(long, value_delimiter = ',')]
        levels: Option<Vec<String>>,
        /// XOR epoch (default: the last one + 1).
        #[arg(long)]
        epoch: Option<u64>,
        /// JSON lines on stdout even on a terminal.
        #[arg(long)]
        json: bool,
        /// Let passthrough functions leave for each local snapshot (the
        /// guest lets go of them: agent or hot-plug slot) and come back
        /// after it; without it a VM with one is refused.
        #[arg(long)]
        detach_devices: bool,
    },
    /// Start the VM from the newest complete, checksum-valid copy found at
    /// any level (remote copies are fetched or rebuilt into the local level
    /// first) and say which one was used.
    Restore {
        #[arg(long)]
        config: PathBuf,
        /// Serve the REST API on this Unix socket.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Serial console: stdio, none or file=PATH [default: stdio].
        #[arg(long)]
        console: Option<String>,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Only say which copy would be used (it is still fetched and verified).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        host: Box<HostArgs>,
        #[command(flatten)]
        confine: ConfineArgs,
    },
    /// Checkpoint periodically: locally every local interval (Daly's from
    /// the measured cost and mtti_s, or --every), each slower level when
    /// its own interval has passed. Ends when the VM does (or after --count).
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        api_socket: PathBuf,
        /// Seconds between local checkpoints (overrides the computed interval).
        #[arg(long)]
        every: Option<f64>,
        /// Stop after this many checkpoints.
        #[arg(long)]
        count: Option<u64>,
        /// JSON lines on stdout even on a terminal.
        #[arg(long)]
        json: bool,
        /// Let passthrough functions leave for each local snapshot (the
        /// guest lets go of them: agent or hot-plug slot) and come back
        /// after it; without it a VM with one is refused.
        #[arg(long)]
        detach_devices: bool,
    },
    /// List the copies every level holds, newest first.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print per-level checkpoint intervals (Young and Daly) from the
    /// measured (or configured) cost and the configured MTTI.
    Plan {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Serve as this host's checkpoint endpoint: keep partner copies and XOR
    /// parts for other hosts and hand them back for restores and rebuilds.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:7070 (tcp:// optional).
        #[arg(long)]
        listen: String,
        /// Directory for what other hosts store here.
        #[arg(long)]
        dir: PathBuf,
        /// Copies (partner) and complete epochs (XOR) kept per job/group.
        #[arg(long, default_value_t = 2)]
        keep: usize,
        /// Connections served at once (more are closed at once).
        #[arg(long, default_value_t = 64)]
        max_connections: usize,
        /// Seconds a whole request (handshake to last byte) may take.
        #[arg(long, default_value_t = 900)]
        request_timeout: u64,
        /// GiB stored per job (partner copies and XOR parts together).
        #[arg(long, default_value_t = 256)]
        quota_gib: u64,
        /// Jobs that may store something here.
        #[arg(long, default_value_t = 1024)]
        max_jobs: usize,
    },
}

/// What a restored VM uses of this host. A restore never opens a host
/// file or TAP device because a snapshot names it (a copy someone else
/// wrote could name any): its devices get this host's resources from these
/// flags, in the snapshot's order, or the snapshot's own paths where they
/// lie below an allowed directory.
#[derive(Args, Debug, Default, Clone)]
pub struct HostArgs {
    /// The snapshot's disks on this host, in its order, as for `run --disk`
    /// (read-only must be as saved; repeat for more).
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<DiskEntry>,
    /// The snapshot's network devices on this host, in its order, as for
    /// `run --net` (the saved MAC is kept unless mac= is given).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetEntry>,
    /// The file the restored virtio-console appends to.
    #[arg(long, value_name = "PATH")]
    pub virtio_console: Option<PathBuf>,
    /// The restored vsock device's socket: cid=N,socket=PATH (the cid must
    /// be the saved one).
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockEntry>,
    /// Take the snapshot's own paths (disks, virtio-console file, vsock
    /// socket) where they lie below DIR (repeat for more). TAP devices are
    /// always named with --net.
    #[arg(long = "allow-snapshot-paths", value_name = "DIR")]
    pub allow: Vec<PathBuf>,
    /// Bind a saved guest NUMA node to a host node of this host:
    /// node=N,host-node=H (repeat per node; the guest keeps its nodes,
    /// only where they live changes) [default: the saved host nodes].
    #[arg(long = "numa", value_name = "SPEC", value_parser = parse_numa)]
    pub numa: Vec<numa::NodeSpec>,
    /// This host's passthrough functions, as for `run --device`, for those
    /// whose device state the snapshot carries (VFIO migration; in the
    /// order of their slots): each takes the saved function's place and
    /// state. Others are plugged with `ffmk-vmm device add` once it runs.
    #[arg(long = "device", value_name = "SPEC", value_parser = parse_device)]
    pub devices: Vec<crate::config::DeviceEntry>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory to restore from.
    #[arg(long)]
    pub from: PathBuf,
    /// Serve the REST API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Serial console: stdio, none or file=PATH [default: stdio].
    #[arg(long)]
    pub console: Option<String>,
    /// Start with the vCPUs paused (resume through the API).
    #[arg(long)]
    pub paused: bool,
    /// Host cores for the restored VM's threads, as for `run --pin`
    /// (its service/compute split comes with the snapshot).
    #[arg(long, value_name = "SPEC")]
    pub pin: Option<PinSpec>,
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub plane: PlaneArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The running VM's API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// The destination: tcp://HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Pause the guest only once the rest is predicted to take this long.
    #[arg(long, default_value_t = 50)]
    pub max_downtime_ms: u64,
    /// Give up (the VM runs on here) after this many copy rounds.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Do not throttle the vCPUs when the guest dirties memory faster than the link.
    #[arg(long)]
    pub no_throttle: bool,
    /// When a copy round does not meet the downtime target, switch over at
    /// once and send the rest after the VM runs on the destination (pages
    /// it touches first). Short pause whatever the dirty rate, but until
    /// the last page arrives a failure of either host or the link loses
    /// the VM (docs/migration.md).
    #[arg(long)]
    pub postcopy: bool,
    /// Verification mode: at the pause, the destination compares a digest
    /// of every guest page with the source's before it loads the state; a
    /// page that differs fails the migration, named (the VM runs on here).
    /// Adds one pass over guest memory to the downtime. Not with --postcopy.
    #[arg(long, conflicts_with = "postcopy")]
    pub verify: bool,
    /// Page streams: TCP connections, each with a thread on both hosts,
    /// that share the pages of every round (the destination may take
    /// fewer). More streams use more cores to read, seal and write pages.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub streams: u8,
    /// JSON lines on stdout even on a terminal.
    #[arg(long)]
    pub json: bool,
    /// Give up when the VMM has not answered one request within this many
    /// seconds (0: wait as long as it takes) [default: 10].
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
}

/// How a VMM that runs a VM is confined (docs/security.md).
#[derive(Args, Debug, Default, Clone)]
pub struct ConfineArgs {
    /// System-call filters on every VMM thread: on (a call outside a
    /// thread's list stops the VMM with a report, exit 159), log (the
    /// kernel logs such calls and lets them through) or off [default: on].
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<sandbox::Mode>,
    /// Snapshots and checkpoints asked for through the API may only be
    /// written inside this directory (repeatable) [default: anywhere].
    #[arg(long = "snapshot-dir", value_name = "DIR")]
    pub snapshot_dirs: Vec<PathBuf>,
    /// The VM may only be migrated to this host or HOST:PORT (repeatable)
    /// [default: any].
    #[arg(long, value_name = "HOST")]
    pub migrate_to: Vec<String>,
    /// Only this device may be hot-plugged through the API: vfio=ADDR or
    /// vfio-user=SOCKET (repeatable) [default: any]. With Landlock on, the
    /// VFIO groups of these devices stay reachable for it.
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    pub hotplug_allow: Vec<crate::config::DeviceEntry>,
    /// The API socket is made mode 0660 with this group (name or number),
    /// instead of 0600 (its owner only).
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Landlock: the VMM may reach only the paths its configuration names
    /// (kernel, initramfs, disks, console files, socket directories, the
    /// --snapshot-dir trees; /proc and /sys read-only). auto: when
    /// --snapshot-dir is given [default: auto].
    #[arg(long, value_name = "auto|on|off")]
    pub landlock: Option<sandbox::landlock::Mode>,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The VM's API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Give up when the VMM has not answered within this many seconds
    /// (0: wait as long as it takes) [default: 10; device add/remove: 60].
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
    /// Print the API's answer as JSON (the schemas of docs/api.yaml)
    /// instead of a summary.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// A client of the socket that waits `--timeout`, else `default`.
    pub fn client(&self, default: std::time::Duration) -> vmm_api::Client {
        with_timeout(
            vmm_api::Client::new(&self.api_socket),
            self.timeout,
            default,
        )
    }
}

/// `client` with `timeout` (else `default`); a zero timeout waits forever.
pub fn with_timeout(
    client: vmm_api::Client,
    timeout: Option<std::time::Duration>,
    default: std::time::Duration,
) -> vmm_api::Client {
    match timeout.unwrap_or(default) {
        t if t.is_zero() => client,
        t => client.with_timeout(t),
    }
}

/// `--timeout`: seconds, fractions allowed.
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a number of seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Subcommand, Debug)]
pub enum KeyAction {
    /// Create a new random cluster key file (mode 0600; never overwrites).
    Generate {
        /// Where to write it.
        #[arg(default_value = cluster_auth::key::DEFAULT_PATH)]
        path: PathBuf,
        /// One JSON object on stdout (path, kind, fingerprint).
        #[arg(long)]
        json: bool,
    },
    /// Derive job JOB's key from the cluster key into a file of its own: it
    /// opens that job's checkpoint copies and nothing else.
    Job {
        job: String,
        /// Where to write the job key.
        #[arg(long)]
        out: PathBuf,
        /// One JSON object on stdout (path, kind, job, fingerprint).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plane: PlaneArgs,
    },
    /// Check a key file and print its fingerprint (a hash that tells keys
    /// apart, safe to show).
    Show {
        /// The key file [default: --cluster-key's default].
        path: Option<PathBuf>,
        /// One JSON object (path, kind, job, fingerprint).
        #[arg(long)]
        json: bool,
    },
}

/// How this process talks to other hosts.
#[derive(Args, Debug, Default, Clone)]
pub struct PlaneArgs {
    /// The cluster key file that authenticates and encrypts this process's
    /// cluster-plane connections [default: $FFMK_CLUSTER_KEY, else
    /// /etc/ffmk/cluster.key]. A checkpoint client may hold a job key
    /// (`ffmk-vmm key job`) instead.
    #[arg(long, value_name = "PATH", global = true)]
    pub cluster_key: Option<PathBuf>,
    /// Talk to other hosts without authentication or encryption: anyone who
    /// reaches the port can send or fetch VMs. Only on a network nobody
    /// else can reach; a warning is logged.
    #[arg(long, conflicts_with = "cluster_key", global = true)]
    pub insecure: bool,
}

impl PlaneArgs {
    pub fn trust(&self) -> Result<cluster_auth::Trust, cluster_auth::Error> {
        cluster_auth::Trust::from_args(self.cluster_key.as_deref(), self.insecure)
    }
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH entry used when present) or bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// vCPUs: N (1-254), or service=S,compute=C for S service vCPUs (the
    /// guest OS, its interrupts and daemons) and C compute vCPUs, each alone
    /// on a host core, kept free of guest ticks, RCU and device interrupts
    /// (isolcpus=/nohz_full=/rcu_nocbs=/irqaffinity= are added to the guest
    /// command line) [default: 1].
    #[arg(long, value_name = "N|service=S,compute=C")]
    pub cpus: Option<Topology>,
    /// Host cores: service=LIST,compute=LIST[,io=LIST] (lists like 0-3,8).
    /// Compute vCPU k runs alone on the k-th compute core; service vCPUs and
    /// the control thread share the service cores; device I/O threads run on
    /// the io cores [default io: the service cores]. Without it, compute
    /// vCPUs get the last online cores and the rest are service cores.
    #[arg(long, value_name = "SPEC")]
    pub pin: Option<PinSpec>,
    /// VM exits KVM may skip: auto (pause for decoupled VMs), none, or a
    /// list of hlt,pause,mwait,cstate (KVM applies it to every vCPU of the
    /// VM: only for layouts where each vCPU has a core to itself).
    #[arg(long, value_name = "auto|none|LIST")]
    pub exits: Option<ExitsRequest>,
    /// Halt polling for this VM in ns (KVM_CAP_HALT_POLL) [default: the host's].
    #[arg(long, value_name = "NS")]
    pub halt_poll_ns: Option<u64>,
    /// Run compute vCPU threads with SCHED_FIFO at this priority (1-99;
    /// needs CAP_SYS_NICE or RLIMIT_RTPRIO).
    #[arg(long, value_name = "PRIO")]
    pub realtime: Option<i32>,
    /// Guest memory, e.g. 512M, 2G (plain numbers are MiB) [default: the
    /// --numa nodes' sum, else 256M].
    #[arg(long)]
    pub memory: Option<String>,
    /// The guest's CPU topology: sockets=S,cores=C,threads=T (cores per
    /// socket, threads per core; S*C*T = the vCPUs). CPUID (leaves 0xB,
    /// 0x1F, 0x8000001E), the cache leaves (L1/L2 per core, L3 per socket)
    /// and the APIC IDs follow it [default: one socket per --numa node,
    /// else one socket of single-thread cores].
    #[arg(long, value_name = "SPEC")]
    pub topology: Option<numa::CpuShape>,
    /// A guest NUMA node:
    /// node=N,cpus=LIST,memory=SIZE[,host-node=H][,distance=M:D] (repeat
    /// per node; every vCPU in one node, the memory adding up to --memory). Told to the guest in ACPI SRAT and
    /// SLIT (distance 10 to itself, 20 to others unless given); with
    /// host-node= its memory is bound to that host node (mbind) and its
    /// vCPUs run on that node's cores.
    #[arg(long = "numa", value_name = "SPEC", value_parser = parse_numa)]
    pub numa: Vec<numa::NodeSpec>,
    /// Back guest memory with huge pages the host reserved (hugetlb):
    /// `--hugepages` for 2 MiB pages, `--hugepages=1G` for 1 GiB pages.
    /// The memory size must be a multiple of the page size; too few free
    /// pages fail the start.
    #[arg(long, value_name = "SIZE", num_args = 0..=1, require_equals = true, default_missing_value = "2M")]
    pub hugepages: Option<crate::memory::HugePages>,
    /// Fault in all guest memory before the guest starts, in parallel
    /// (no page faults, no host memory shortage later in the job).
    #[arg(long)]
    pub prefault: bool,
    /// Serial console: stdio, none or file=PATH [default: stdio].
    #[arg(long)]
    pub console: Option<String>,
    /// Serve the REST API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// TOML file with any of the settings of this command, keyed by the
    /// flags' names (`memory = 512`, `api-socket = "..."`); flags override
    /// it. Reference: docs/config.md.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Let the guest end the VM by writing a status byte to this port (default 0xf4);
    /// the status becomes ffmk-vmm's exit code.
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "0xf4", value_parser = parse_port)]
    pub test_exit_port: Option<u16>,
    /// CPU profile: pvm hides what PVM hosts cannot emulate, host exposes everything
    /// [default: chosen from the host kind].
    #[arg(long, value_enum)]
    pub cpu_profile: Option<CpuProfile>,
    /// A virtio-blk disk: path=FILE[,readonly][,direct][,serial=ID][,queues=N]
    /// [,bw=RATE][,iops=N] (raw image; bw in bytes/s with K/M/G, bare = MiB/s;
    /// repeat for more disks).
    #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
    pub disk: Vec<DiskEntry>,
    /// A virtio-net device on a TAP interface:
    /// tap=NAME[,mac=52:54:00:12:34:56][,bridge=BR][,announce=off] (the TAP
    /// is created if it does not exist; with bridge= it joins that Linux
    /// bridge and is brought up when the VM is built, also for a VM
    /// arriving by migration; a VM that moved here is announced on the TAP
    /// when it first runs, unless announce=off; repeat for more).
    #[arg(long, value_name = "SPEC", value_parser = parse_net)]
    pub net: Vec<NetEntry>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-console whose output is appended to this file (bulk guest
    /// output; the 8250 stays the kernel console).
    #[arg(long, value_name = "PATH")]
    pub virtio_console: Option<PathBuf>,
    /// A virtio-vsock device: cid=N,socket=PATH. Host programs reach guest
    /// port P by connecting to PATH and writing "CONNECT P\n"; the guest
    /// reaches host port P through the Unix socket PATH_P.
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockEntry>,
    /// Pass a function through: vfio=DDDD:BB:DD.F[,mmap=off] (a host PCI
    /// function bound to vfio-pci, see `ffmk-vmm vfio bind`; guest RAM is
    /// pinned and mapped for its DMA), vfio=/sys/bus/mdev/devices/UUID (a
    /// mediated device) or vfio-user=SOCKET (a device served by another
    /// process). Repeat for more. With --incoming, plugged in once the VM
    /// has arrived.
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    pub device: Vec<crate::config::DeviceEntry>,
    /// PCIe root ports with a hot-plug slot each (0-8): functions plugged
    /// through the API go there, and the guest's own PCIe hot-plug driver
    /// (Linux: pciehp) finds them and lets go of them when asked, with no
    /// agent. Without slots they go on bus 0 and a guest needs the agent
    /// (or a rescan) to see them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=8))]
    pub hotplug_slots: Option<u8>,
    /// Instead of booting, wait for a live migration on tcp://ADDR:PORT and
    /// run the VM that arrives (memory, vCPUs, CPU profile and devices must
    /// match the source; --kernel is not needed).
    #[arg(long, value_name = "tcp://ADDR:PORT")]
    pub incoming: Option<String>,
    /// With --incoming: give up on a migration that has not switched over
    /// this many seconds after its connection was accepted (a stalled
    /// source cannot hold the port), then wait for the next.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    pub incoming_timeout: u64,
    #[command(flatten)]
    pub plane: PlaneArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
}

fn parse_numa(s: &str) -> Result<numa::NodeSpec, String> {
    s.parse().map_err(|e: numa::guest::Error| e.to_string())
}

fn parse_vsock(s: &str) -> Result<VsockEntry, String> {
    s.parse().map_err(|e: crate::config::Error| e.to_string())
}

fn parse_device(s: &str) -> Result<crate::config::DeviceEntry, String> {
    s.parse().map_err(|e: crate::config::Error| e.to_string())
}

fn parse_net(s: &str) -> Result<NetEntry, String> {
    s.parse().map_err(|e: crate::config::Error| e.to_string())
}

fn parse_disk(s: &str) -> Result<DiskEntry, String> {
    s.parse().map_err(|e: crate::config::Error| e.to_string())
}

fn parse_port(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a port number (0-65535, decimal or 0x-hex)"))
}

impl RunArgs {
    /// The flags as a partial spec, to lay over the config file.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            pin: self.pin.clone(),
            exits: self.exits,
            halt_poll_ns: self.halt_poll_ns,
            realtime: self.realtime,
            topology: self.topology,
            numa: (!self.numa.is_empty()).then(|| self.numa.clone()),
            memory: self.memory.clone(),
            hugepages: self.hugepages,
            prefault: self.prefault.then_some(true),
            console: self.console.clone(),
            api_socket: self.api_socket.clone(),
            test_exit_port: self.test_exit_port,
            cpu_profile: self.cpu_profile,
            disk: (!self.disk.is_empty()).then(|| self.disk.clone()),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            rng: self.rng.then_some(true),
            virtio_console: self.virtio_console.clone(),
            vsock: self.vsock.clone(),
            device: (!self.device.is_empty()).then(|| self.device.clone()),
            hotplug_slots: self.hotplug_slots,
            ..self.confine.spec()
        }
    }
}

impl ConfineArgs {
    /// The confinement flags as a partial spec.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            seccomp: self.seccomp,
            snapshot_dirs: (!self.snapshot_dirs.is_empty()).then(|| self.snapshot_dirs.clone()),
            migrate_to: (!self.migrate_to.is_empty()).then(|| self.migrate_to.clone()),
            hotplug_allow: (!self.hotplug_allow.is_empty()).then(|| self.hotplug_allow.clone()),
            api_group: self.api_group.clone(),
            landlock: self.landlock,
            ..VmSpec::default()
        }
    }
}

impl RestoreArgs {
    /// What the restoring command line sets itself (console, API socket,
    /// placement, confinement), as a partial spec laid over the saved one.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            console: self.console.clone(),
            api_socket: self.api_socket.clone(),
            pin: self.pin.clone(),
            ..self.confine.spec()
        }
    }
}

impl From<&HostArgs> for crate::machine::HostResources {
    fn from(h: &HostArgs) -> Self {
        crate::machine::HostResources {
            disks: h.disks.clone(),
            nets: h.nets.clone(),
            virtio_console: h.virtio_console.clone(),
            vsock: h.vsock.clone(),
            allow: h.allow.clone(),
            numa: h.numa.clone(),
            devices: h.devices.clone(),
        }
    }
}
