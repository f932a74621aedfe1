//! The daemon's settings: a TOML file (`ffmk-node run --config FILE`),
//! with `--hosts` and `--me` able to override the file. Every host runs
//! the same host list; its slot on the bulletin board is its position in it.
use balance::gossip::Window;
use balance::hostlist;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Slurm-style host list, the same on every host (`node[01-16]`).
    #[serde(default)]
    pub hosts: String,
    /// This host's name as it appears in `hosts`.
    #[serde(default)]
    pub me: String,
    /// The daemons' address of a host whose name resolves elsewhere (a
    /// node whose name is its compute network's, the daemons on a
    /// management network): `{ node01 = "10.1.0.1" }`. [default: each
    /// name's IPv4 address]
    #[serde(default)]
    pub addresses: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
    #[serde(default = "d_gossip_port")]
    pub gossip_port: u16,
    /// TCP port of the daemon's control service (peers, `ffmk-node status`).
    #[serde(default = "d_control_port")]
    pub control_port: u16,
    /// Ports the destination VMMs listen on for incoming migrations.
    #[serde(default = "d_migration_ports")]
    pub migration_ports: [u16; 2],
    /// Where this host's VMMs put their API sockets (`NAME.sock`); incoming
    /// VMs get theirs (and `NAME.console`, `NAME.vmm.log`) here too.
    pub vm_dir: PathBuf,
    /// The `ffmk-vmm` binary that receives incoming VMs.
    #[serde(default = "d_vmm")]
    pub vmm: PathBuf,
    /// JSON decision log (one object per line) [default: stderr only].
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Gossip period (one time unit of the board).
    #[serde(default = "d_period_ms")]
    pub period_ms: u64,
    /// Gossip window: entries of age <= T periods, or "whole".
    #[serde(default = "d_window")]
    pub window: String,
    /// Ring neighbours the diffusion balances with.
    #[serde(default = "d_neighbours")]
    pub neighbours: usize,
    /// Act when per-core load exceeds the neighbourhood mean by this share.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// A host whose entry is older than this many periods is dead.
    #[serde(default = "d_dead_after")]
    pub dead_after: f64,
    /// Cores VMs may use here [default: the online CPUs].
    #[serde(default)]
    pub cores: Option<u16>,
    /// Memory kept free beyond an incoming VM.
    #[serde(default = "d_reserve_mib")]
    pub reserve_mib: u64,
    /// At least this long between two migrations this host starts.
    #[serde(default = "d_min_interval_s")]
    pub min_interval_s: f64,
    /// A VM that arrived stays at least this long.
    #[serde(default = "d_settle_s")]
    pub settle_s: f64,
    /// Back-off after a failed or refused migration to a host, doubling
    /// up to `backoff_max_s`.
    #[serde(default = "d_backoff_s")]
    pub backoff_s: f64,
    #[serde(default = "d_backoff_max_s")]
    pub backoff_max_s: f64,
    /// A migration not finished by then is cancelled (the VM stays).
    #[serde(default = "d_migration_timeout_s")]
    pub migration_timeout_s: f64,
    /// A reservation for an incoming VM whose peer has not started the
    /// migration (no authenticated connection) by then is given up.
    #[serde(default = "d_incoming_unused_s")]
    pub incoming_unused_s: f64,
    #[serde(default = "d_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// UDP port of the control broadcast endpoint (`ffmk-node broadcast`).
    #[serde(default = "d_broadcast_port")]
    pub broadcast_port: u16,
    /// Pause between two datagrams of one broadcast, and the one-way
    /// latency the correction phase is timed with (microseconds).
    #[serde(default = "d_broadcast_gap_us")]
    pub broadcast_gap_us: u64,
    #[serde(default = "d_broadcast_latency_us")]
    pub broadcast_latency_us: u64,
    /// Passthrough functions this host gives to VMs that arrive with
    /// passthrough functions (which left their source through hot-plug
    /// slots): `["vfio=0000:3b:00.2", "vfio-user=/run/ffmk/cx1.sock"]`,
    /// as `ffmk-vmm run --device` takes them. A function a local VM has
    /// (`GET /vm`) or an arriving one was promised is not free.
    #[serde(default)]
    pub vf_pool: Vec<String>,
    /// Directories of disk images every host has at the same path (a
    /// shared file system, or identical copies): a VM whose virtio-blk
    /// disks are all read-only files under one of these directories may
    /// arrive here with them (e.g. the HPC image all VMs of a job share).
    /// A VM with a read-write disk never moves. [default: none: VMs with
    /// disks do not arrive here]
    #[serde(default)]
    pub shared_disk_dirs: Vec<PathBuf>,
    /// Linux bridges of this host that arriving VMs' TAPs may join: a VM
    /// whose TAPs are all ports of bridges (`--net tap=T,bridge=BR`) may
    /// arrive here when each of its bridges is in this list; it gets new
    /// TAPs on them, keeps its MACs and is announced there (docs/jobs.md).
    /// [default: none: VMs with network devices do not arrive here]
    #[serde(default)]
    pub vm_bridges: Vec<String>,
    /// Where job checkpoints go (`ffmk-node job checkpoint`): the burst
    /// buffer, mounted at the same path on every host of a job (or a
    /// directory of this host's own: then a VM restores only here).
    /// `DIR/JOB/EPOCH/VM/` is one VM's snapshot, `DIR/JOB/EPOCH/job.json`
    /// marks the epoch complete (docs/jobs.md). [default: none: this host
    /// takes part in no job checkpoint]
    #[serde(default)]
    pub job_checkpoint_dir: Option<PathBuf>,
    /// Complete job checkpoints kept per job (older ones are removed when
    /// a new one completes).
    #[serde(default = "d_job_checkpoint_keep")]
    pub job_checkpoint_keep: usize,
    /// The host whose daemon coordinates checkpoint writes to the shared
    /// burst buffer [default: the first host of the list].
    #[serde(default)]
    pub ckpt_coordinator: Option<String>,
    /// "exclusive" (one job writes at a time) or "none" (no coordination).
    #[serde(default = "d_ckpt_policy")]
    pub ckpt_policy: String,
    /// A job waits at most this long for its turn, then writes anyway.
    #[serde(default = "d_ckpt_max_delay_s")]
    pub ckpt_max_delay_s: f64,
    /// A grant not released within this long is dropped (holder died).
    #[serde(default = "d_ckpt_lease_s")]
    pub ckpt_lease_s: f64,
    /// Take no VMs (announced as health "draining").
    #[serde(default)]
    pub drain: bool,
    /// Serve `GET /metrics` (Prometheus text format) over plain HTTP on
    /// this address, e.g. "127.0.0.1:9464" [default: not served]. Only
    /// counts and loads, no control: still, keep it off public networks.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Seed of the gossip partner choice [default: from slot and time].
    #[serde(default)]
    pub seed: Option<u64>,
    /// The cluster key file: gossip, the control port, the broadcast and
    /// the VMMs this daemon starts are authenticated with it [default:
    /// $FFMK_CLUSTER_KEY, else /etc/ffmk/cluster.key].
    #[serde(default)]
    pub cluster_key: Option<PathBuf>,
    /// No authentication or encryption on the cluster plane (only on a
    /// network nobody else reaches; a warning is logged).
    #[serde(default)]
    pub insecure: bool,
}

/// How a daemon and its tools talk to other hosts.
#[derive(Debug, Clone)]
pub struct Plane {
    pub trust: cluster_auth::Trust,
    /// What the VMMs it starts are given: `--cluster-key PATH` or
    /// `--insecure`.
    pub vmm_args: Vec<String>,
}

impl Config {
    /// The cluster key (or `--insecure`) this configuration asks for.
    pub fn plane(&self) -> Result<Plane, cluster_auth::Error> {
        plane(self.cluster_key.as_deref(), self.insecure)
    }
}

/// The cluster key file `cluster_key` (else `$FFMK_CLUSTER_KEY`, else the
/// default path), or no protection with `insecure`.
pub fn plane(
    cluster_key: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Plane, cluster_auth::Error> {
    if insecure {
        eprintln!(
            "ffmk-node: warning: --insecure: the cluster plane is unauthenticated; anyone who \
             reaches this host's ports can drive this daemon and its VMs"
        );
        return Ok(Plane {
            trust: cluster_auth::Trust::Insecure,
            vmm_args: vec!["--insecure".into()],
        });
    }
    let (key, path) = cluster_auth::Key::find(cluster_key)?;
    key.cluster()?;
    Ok(Plane {
        trust: cluster_auth::Trust::Key(key),
        vmm_args: vec!["--cluster-key".into(), path.display().to_string()],
    })
}

fn d_gossip_port() -> u16 {
    7400
}
fn d_control_port() -> u16 {
    7401
}
fn d_ckpt_policy() -> String {
    "exclusive".into()
}
fn d_ckpt_max_delay_s() -> f64 {
    300.0
}
fn d_ckpt_lease_s() -> f64 {
    3600.0
}
fn d_job_checkpoint_keep() -> usize {
    2
}
fn d_broadcast_port() -> u16 {
    7402
}
fn d_broadcast_gap_us() -> u64 {
    500
}
fn d_broadcast_latency_us() -> u64 {
    200
}
fn d_migration_ports() -> [u16; 2] {
    [7410, 7429]
}
fn d_vmm() -> PathBuf {
    "ffmk-vmm".into()
}
fn d_period_ms() -> u64 {
    1000
}
fn d_window() -> String {
    "whole".into()
}
fn d_neighbours() -> usize {
    4
}
fn d_threshold() -> f64 {
    0.25
}
fn d_dead_after() -> f64 {
    10.0
}
fn d_reserve_mib() -> u64 {
    512
}
fn d_min_interval_s() -> f64 {
    10.0
}
fn d_settle_s() -> f64 {
    30.0
}
fn d_backoff_s() -> f64 {
    5.0
}
fn d_backoff_max_s() -> f64 {
    300.0
}
fn d_incoming_unused_s() -> f64 {
    30.0
}
fn d_migration_timeout_s() -> f64 {
    300.0
}
fn d_max_downtime_ms() -> u64 {
    300
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {}", .0.display(), .1)]
    Read(PathBuf, std::io::Error),
    #[error("{}: {}", .0.display(), .1)]
    Parse(PathBuf, String),
    #[error(transparent)]
    Hosts(#[from] hostlist::Error),
    #[error("no host list (set hosts in the config or --hosts)")]
    NoHosts,
    #[error("this host ({0:?}) is not in the host list")]
    NotListed(String),
    #[error("host {0:?} is listed twice")]
    Duplicate(String),
    #[error("cannot resolve host {0:?}: {1}")]
    Resolve(String, String),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// A config checked and resolved: peers' addresses, this host's slot.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub names: Vec<String>,
    pub slot: usize,
    pub gossip: Vec<SocketAddr>,
    pub control: Vec<SocketAddr>,
    pub window: Window,
    pub cores: u16,
}

impl Resolved {
    /// The slot of the checkpoint coordinator's host.
    pub fn ckpt_coordinator(&self) -> usize {
        self.config
            .ckpt_coordinator
            .as_ref()
            .and_then(|c| self.names.iter().position(|n| n == c))
            .unwrap_or(0)
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| Error::Parse(path.into(), e.message().to_string()))
    }

    pub fn resolve(self) -> Result<Resolved, Error> {
        if self.hosts.trim().is_empty() {
            return Err(Error::NoHosts);
        }
        let names = hostlist::expand(&self.hosts)?;
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            if !seen.insert(n) {
                return Err(Error::Duplicate(n.clone()));
            }
        }
        let slot = names
            .iter()
            .position(|n| *n == self.me)
            .ok_or_else(|| Error::NotListed(self.me.clone()))?;
        let invalid = |m: &str| Err(Error::Invalid(m.into()));
        if self.period_ms == 0 {
            return invalid("period_ms must be positive");
        }
        if !(self.threshold > 0.0 && self.threshold.is_finite()) {
            return invalid("threshold must be a positive share (0.25 = 25%)");
        }
        if self.dead_after <= 1.0 {
            return invalid("dead_after must be more than one period");
        }
        if self.migration_ports[0] > self.migration_ports[1] {
            return invalid("migration_ports must be [low, high]");
        }
        if self.broadcast_gap_us == 0 || self.broadcast_gap_us > 1_000_000 {
            return invalid("broadcast_gap_us must be 1 to 1000000");
        }
        self.ckpt_policy
            .parse::<balance::ckpt::Policy>()
            .map_err(Error::Invalid)?;
        if !(self.ckpt_max_delay_s >= 0.0 && self.ckpt_lease_s > 0.0) {
            return invalid("ckpt_max_delay_s must be >= 0 and ckpt_lease_s > 0");
        }
        if let Some(c) = &self.ckpt_coordinator {
            if !names.contains(c) {
                return Err(Error::Invalid(format!(
                    "ckpt_coordinator {c} is not in the host list"
                )));
            }
        }
        for (i, f) in self.vf_pool.iter().enumerate() {
            let kind_ok = f.strip_prefix("vfio=").is_some_and(|a| !a.is_empty())
                || f.strip_prefix("vfio-user=").is_some_and(|s| !s.is_empty());
            if !kind_ok {
                return Err(Error::Invalid(format!(
                    "vf_pool entry {f:?} is not vfio=DDDD:BB:DD.F or vfio-user=SOCKET"
                )));
            }
            if self.vf_pool[..i].contains(f) {
                return Err(Error::Invalid(format!("vf_pool lists {f} twice")));
            }
        }
        for d in &self.shared_disk_dirs {
            if !d.is_absolute() {
                return Err(Error::Invalid(format!(
                    "shared_disk_dirs entry {} is not an absolute path",
                    d.display()
                )));
            }
        }
        if let Some(d) = &self.job_checkpoint_dir {
            if !d.is_absolute() {
                return Err(Error::Invalid(format!(
                    "job_checkpoint_dir {} is not an absolute path",
                    d.display()
                )));
            }
        }
        if self.job_checkpoint_keep == 0 {
            return Err(Error::Invalid(
                "job_checkpoint_keep 0: at least the newest checkpoint is kept".into(),
            ));
        }
        for b in &self.vm_bridges {
            if !crate::arriving::interface_name(b) {
                return Err(Error::Invalid(format!(
                    "vm_bridges entry {b:?} is not a network interface name"
                )));
            }
        }
        let window: Window = self.window.parse().map_err(Error::Invalid)?;
        for n in self.addresses.keys() {
            if !names.contains(n) {
                return Err(Error::Invalid(format!(
                    "addresses names {n}, which is not in the host list"
                )));
            }
        }
        let addr = |n: &str, port: u16| -> Result<SocketAddr, Error> {
            if let Some(ip) = self.addresses.get(n) {
                return Ok(SocketAddr::from((*ip, port)));
            }
            (n, port)
                .to_socket_addrs()
                .map_err(|e| Error::Resolve(n.into(), e.to_string()))?
                .find(|a| a.is_ipv4())
                .ok_or_else(|| Error::Resolve(n.into(), "no IPv4 address".into()))
        };
        let gossip = names
            .iter()
            .map(|n| addr(n, self.gossip_port))
            .collect::<Result<Vec<_>, _>>()?;
        let control = names
            .iter()
            .map(|n| addr(n, self.control_port))
            .collect::<Result<Vec<_>, _>>()?;
        let online = std::thread::available_parallelism()
            .map(|n| n.get() as u16)
            .unwrap_or(1);
        let cores = self.cores.unwrap_or(online).max(1);
        Ok(Resolved {
            names,
            slot,
            gossip,
            control,
            window,
            cores,
            config: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_resolves_to_slots_and_addresses() {
        let c: Config = toml::from_str(
            r#"
            hosts = "127.0.0.[1-3]"
            me = "127.0.0.2"
            vm_dir = "/tmp/x"
            period_ms = 200
            "#,
        )
        .expect("parses");
        let r = c.resolve().expect("resolves");
        assert_eq!(r.slot, 1);
        assert_eq!(r.gossip[2].to_string(), "127.0.0.3:7400");
        assert_eq!(r.control[0].to_string(), "127.0.0.1:7401");
        // Names that resolve elsewhere, with the daemons' addresses given.
        let c: Config = toml::from_str(
            r#"
            hosts = "n[1-2]"
            me = "n2"
            vm_dir = "/tmp/x"
            addresses = { n1 = "127.0.0.1", n2 = "127.0.0.2" }
            "#,
        )
        .expect("parses");
        let r = c.resolve().expect("resolves");
        assert_eq!(r.gossip[1].to_string(), "127.0.0.2:7400");
        let c: Config = toml::from_str(
            "hosts = \"n1\"\nme = \"n1\"\nvm_dir = \"/tmp\"\naddresses = { n9 = \"127.0.0.9\" }",
        )
        .expect("parses");
        assert!(matches!(c.resolve(), Err(Error::Invalid(m)) if m.contains("n9")));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = |extra: &str| -> Result<Resolved, Error> {
            let c: Config = toml::from_str(&format!("vm_dir = \"/tmp\"\n{extra}"))
                .map_err(|e| Error::Invalid(e.to_string()))?;
            c.resolve()
        };
        assert!(matches!(base(""), Err(Error::NoHosts)));
        assert!(matches!(
            base("hosts = \"127.0.0.1\"\nme = \"x\""),
            Err(Error::NotListed(_))
        ));
        assert!(matches!(
            base("hosts = \"127.0.0.1,127.0.0.1\"\nme = \"127.0.0.1\""),
            Err(Error::Duplicate(_))
        ));
        assert!(matches!(
            base("hosts = \"127.0.0.1\"\nme = \"127.0.0.1\"\nthreshold = -1"),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(base("bogus = 1"), Err(Error::Invalid(_))));
    }
}
