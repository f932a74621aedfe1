//! The bodies of docs/api.yaml's requests and answers, one type each, used
//! by the VMM to answer and by clients to read. `tests/contract.rs` holds
//! them to docs/api.yaml: a field added here and not there (or the other
//! way round) fails it.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What pause, resume, shutdown and a migration cancel answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    ShuttingDown,
    /// `DELETE /vm/migration`: the migration is being stopped.
    Cancelling,
    /// `run --incoming`: waiting for a VM to migrate in; no VM yet.
    Incoming,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Paused => "paused",
            State::ShuttingDown => "shutting_down",
            State::Cancelling => "cancelling",
            State::Incoming => "incoming",
        })
    }
}

/// `{"state": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReply {
    pub state: State,
}

/// Answer to `POST /vm/announce`: the MAC addresses being announced, one
/// per network device that announces (`announce=off` ones do not). The
/// rounds go on after the answer (five, over 0.8 s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    pub macs: Vec<String>,
    pub rounds: u32,
}

/// A request body the server refuses (400) for what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("dest must be an absolute path")]
    RelativeDest,
    #[error("a cut is a live snapshot's (live: true)")]
    CutNotLive,
    #[error(
        "verify and postcopy exclude each other: post-copy switches over before every page is there"
    )]
    VerifyWithPostcopy,
    #[error("streams {0}: a migration uses 1 to 16 page streams")]
    Streams(u8),
    #[error("'{0}' is not tcp://HOST:PORT")]
    NotTcp(String),
}

// ----- snapshots -----

/// A full snapshot or a layer on the chain the VM last wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    #[default]
    Full,
    Incremental,
}

/// Body of `PUT /vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// An absolute directory.
    pub dest: PathBuf,
    #[serde(default)]
    pub kind: SnapshotKind,
    /// Replace an existing snapshot at `dest` (full snapshots only).
    #[serde(default)]
    pub force: bool,
    /// Copy memory while the guest runs (dirty-log rounds), pausing only for
    /// the last dirty pages and the device/vCPU state.
    #[serde(default)]
    pub live: bool,
    /// A VM with passthrough functions: have the guest agent let go of
    /// them, unplug them for the snapshot and plug them back after it
    /// (without this such a VM refuses to be snapshotted).
    #[serde(default)]
    pub detach_devices: bool,
    /// A job checkpoint's cut (`ffmk-node job checkpoint`; live only): the
    /// VM pauses when its job does, not when its own copy converged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<Cut>,
}

/// A job checkpoint's cut ([`SnapshotRequest::cut`]). The job's driver and
/// the live snapshot meet through files beside `dest` ([`CutFiles`]): once
/// its copy rounds converged the VMM creates `ready`, then goes on copying
/// what the guest dirties until `pause` exists; then it pauses the VM,
/// writes the rest and the device state, creates `captured` and keeps the
/// VM paused until `resume` exists (every VM of the job captured), and only
/// then commits the snapshot. `abort`, or no `pause` (or `resume`) within
/// `max_wait_ms`, ends the snapshot with an error, nothing kept, the VM
/// running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cut {
    pub max_wait_ms: u64,
}

impl Cut {
    /// The longest wait a cut honours (a day): longer ones are cut to it.
    pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(86_400);

    /// `max_wait_ms`, at most [`Cut::MAX_WAIT`].
    pub fn max_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_wait_ms).min(Self::MAX_WAIT)
    }
}

/// The files of a cut whose snapshot goes to `dest`: hidden files named
/// after it in the directory that holds it (`/bb/ckpt/.vm0.ready` for
/// `/bb/ckpt/vm0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutFiles {
    pub ready: PathBuf,
    pub pause: PathBuf,
    pub captured: PathBuf,
    pub resume: PathBuf,
    pub abort: PathBuf,
}

impl CutFiles {
    pub fn beside(dest: &std::path::Path) -> Self {
        let dir = dest.parent().unwrap_or(dest);
        let name = dest
            .file_name()
            .unwrap_or_else(|| std::ffi::OsStr::new("snapshot"));
        let file = |what: &str| {
            let mut n = std::ffi::OsString::from(".");
            n.push(name);
            n.push(".");
            n.push(what);
            dir.join(n)
        };
        CutFiles {
            ready: file("ready"),
            pause: file("pause"),
            captured: file("captured"),
            resume: file("resume"),
            abort: file("abort"),
        }
    }

    /// All five, for clearing them.
    pub fn all(&self) -> [&PathBuf; 5] {
        [
            &self.ready,
            &self.pause,
            &self.captured,
            &self.resume,
            &self.abort,
        ]
    }

    /// Removes all five (those that exist).
    pub fn clear(&self) {
        for f in self.all() {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl SnapshotRequest {
    /// A full, stopped snapshot into `dest`.
    pub fn full(dest: impl Into<PathBuf>) -> Self {
        SnapshotRequest {
            dest: dest.into(),
            kind: SnapshotKind::Full,
            force: false,
            live: false,
            detach_devices: false,
            cut: None,
        }
    }

    /// The request checked as the server checks it.
    pub fn check(&self) -> Result<(), RequestError> {
        if !self.dest.is_absolute() {
            return Err(RequestError::RelativeDest);
        }
        if self.cut.is_some() && !self.live {
            return Err(RequestError::CutNotLive);
        }
        Ok(())
    }
}

/// Answer to `PUT /vm/snapshot`: the snapshot committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub dest: PathBuf,
    pub kind: SnapshotKind,
    pub live: bool,
    /// Memory copy rounds (1 for a stopped snapshot).
    pub rounds: u32,
    pub chain_id: String,
    pub generation: u64,
    pub layers: u64,
    /// How long the guest was paused.
    pub pause_ms: f64,
    pub total_ms: f64,
    pub pages_written: u64,
    pub data_bytes: u64,
    pub memory_bytes: u64,
    /// Passthrough devices unplugged for the snapshot and plugged back
    /// (`detach_devices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unplugged: Vec<String>,
}

// ----- migration -----

/// Body of `PUT /vm/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp://HOST:PORT` (or `HOST:PORT`).
    pub to: String,
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Throttle the vCPUs when the guest dirties faster than the link.
    #[serde(default = "yes")]
    pub throttle: bool,
    /// Switch to post-copy when a pre-copy round does not meet the
    /// downtime target (instead of more rounds and throttling).
    #[serde(default)]
    pub postcopy: bool,
    /// Verification mode: the destination compares a digest of every page
    /// at the pause before it loads the state (not with post-copy).
    #[serde(default)]
    pub verify: bool,
    /// Page streams: connections (each with a thread per side) that share
    /// the pages; the destination may take fewer. 1 to 16 (default 4).
    #[serde(default = "default_streams")]
    pub streams: u8,
}

fn default_streams() -> u8 {
    4
}

fn default_downtime() -> u64 {
    50
}
fn default_rounds() -> u32 {
    30
}
fn yes() -> bool {
    true
}

impl MigrateRequest {
    /// A migration to `to` with the defaults the server applies.
    pub fn to(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            max_downtime_ms: default_downtime(),
            max_rounds: default_rounds(),
            throttle: true,
            postcopy: false,
            verify: false,
            streams: default_streams(),
        }
    }

    /// The `HOST:PORT` part of `to` (and the request checked).
    pub fn address(&self) -> Result<String, RequestError> {
        if self.verify && self.postcopy {
            return Err(RequestError::VerifyWithPostcopy);
        }
        if !(1..=16).contains(&self.streams) {
            return Err(RequestError::Streams(self.streams));
        }
        parse_tcp(&self.to)
    }
}

/// `tcp://HOST:PORT` or `HOST:PORT` to `HOST:PORT`.
pub fn parse_tcp(s: &str) -> Result<String, RequestError> {
    let rest = s.strip_prefix("tcp://").unwrap_or(s);
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(RequestError::NotTcp(s.into())),
    }
}

/// Answer (202) to `PUT /vm/migrate`: the migration runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateStarted {
    /// Always `running`.
    pub state: String,
    pub to: String,
    /// Passthrough functions unplugged to let the VM go (plugged back if
    /// the migration does not complete).
    #[serde(default)]
    pub unplugged: Vec<String>,
}

pub use crate::migration::{
    MigrationStatus, Outcome as MigrationOutcome, Phase, PostcopyOutcome, Progress,
};

// ----- devices and disks -----

/// Body of `PUT /vm/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBody {
    /// `vfio=DDDD:BB:DD.F[,mmap=on|off]` or `vfio-user=SOCKET`.
    pub device: String,
}

/// Whether a passthrough function is in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    Attached,
    Detached,
}

/// A passthrough function: in `GET /vm`'s `passthrough` and the answer to
/// an unplug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// As `--device` names it.
    pub device: String,
    /// Its guest address (`BB:DD.F`).
    pub bdf: String,
    /// In a PCIe hot-plug slot (bus N > 0) rather than on bus 0.
    pub hotplug_slot: bool,
    pub state: Attachment,
    /// Its state travels with the VM (VFIO migration): it stays attached
    /// through a migration or snapshot, and the destination's function of
    /// the same kind takes its state. False for a function that must leave
    /// first (through its hot-plug slot) or cannot move at all. (Absent in
    /// answers of VMMs from before it: false.)
    #[serde(default)]
    pub travels: bool,
}

/// Answer to `PUT /vm/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plugged {
    #[serde(flatten)]
    pub device: DeviceState,
    /// On a VM with vsock: the guest agent's answer to `rescan`, or why
    /// there was none; null without vsock.
    pub guest: Option<String>,
}

/// Body of `PUT /vm/disks/{index}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeBody {
    pub size_bytes: u64,
}

/// Answer to `PUT /vm/disks/{index}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resized {
    pub disk: usize,
    pub size_bytes: u64,
}

// ----- GET /vm -----

/// `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running`, `paused`, or `incoming` (waiting for a migration: no
    /// VM yet, so no devices, vCPUs or boot).
    pub state: State,
    /// The VMM's process id.
    pub pid: u32,
    /// Functions on the PCI root bus, then those in hot-plug slots.
    pub pci: Vec<PciFunction>,
    pub passthrough: Vec<DeviceState>,
    /// Guest RAM mapped (and pinned) for passthrough DMA.
    pub dma_mapped_bytes: u64,
    pub disks: Vec<DiskInfo>,
    pub uptime_ms: u64,
    pub config: VmConfig,
    /// `pvm`, `vmx`, `svm` or `unknown`.
    pub host_kind: String,
    /// `pvm` or `host`.
    pub cpu_profile: String,
    pub tsc_khz: u32,
    pub kvm_forced_features: Vec<String>,
    /// Null while `incoming`.
    pub boot: Option<BootInfo>,
    pub memory: MemoryInfo,
    pub vcpus: Vec<VcpuSummary>,
    /// Only while `incoming`: where the migration is awaited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<Incoming>,
}

/// A VMM waiting in `run --incoming`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The TCP address it listens on (`HOST:PORT`).
    pub listen: String,
    /// How long it has waited.
    pub waiting_ms: u64,
}

/// One PCI function and its activity counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunction {
    pub bdf: String,
    pub device: String,
    pub counters: BTreeMap<String, u64>,
}

/// A virtio-blk disk with its current size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub index: usize,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub readonly: bool,
}

/// What was loaded and how the boot vCPU entered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// `elf` or `bz_image`.
    pub format: String,
    /// `pvh` or `linux64`.
    pub mode: String,
    pub entry: u64,
    pub kernel_end: u64,
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub bytes: u64,
    pub hugepages: bool,
    /// The page size backing guest RAM: 4096, or the huge page size
    /// (2 MiB, 1 GiB). 0 from a VMM before this field.
    #[serde(default)]
    pub page_bytes: u64,
}

/// A vCPU in `GET /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSummary {
    pub id: u8,
    /// `service` or `compute`.
    pub role: String,
    /// `created`, `running`, `paused` or `exited`.
    pub state: String,
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    /// Instructions ffmk-vmm ran for a PVM host's ring-0 emulator.
    pub pvm_assists: u64,
}

/// The effective run configuration (command line merged over `--config`)
/// as `GET /vm` shows it. The fields a client acts on are typed; the rest
/// of the configuration is kept in `other`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// All vCPUs.
    pub cpus: u8,
    pub topology: Topology,
    /// `--pin`: host cores for the VM's threads.
    pub pin: Option<Pin>,
    pub memory_bytes: u64,
    pub hugepages: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: bool,
    pub virtio_console: Option<PathBuf>,
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub hotplug_slots: u8,
    /// Everything else (console, exits, seccomp, access rules, ...).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl VmConfig {
    /// `--cpus` as a destination must repeat it (`N` or
    /// `service=S,compute=C`).
    pub fn cpus_flag(&self) -> String {
        let t = &self.topology;
        if t.compute == 0 {
            t.service.to_string()
        } else {
            format!("service={},compute={}", t.service, t.compute)
        }
    }
}

/// Service and compute vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub service: u8,
    pub compute: u8,
}

/// `--pin`, CPU lists in the kernel's notation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub service: Option<String>,
    pub compute: Option<String>,
    pub io: Option<String>,
}

/// `--disk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub serial: Option<String>,
    pub queues: u16,
    /// Bytes/s.
    pub bandwidth: Option<u64>,
    /// Requests/s.
    pub iops: Option<u64>,
}

/// `--net`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// false: the VM is not announced after a move (`announce=off`);
    /// absent: it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<bool>,
    /// The Linux bridge the TAP joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// `--vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

// ----- GET /vm/vcpus -----

/// `GET /vm/vcpus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpusInfo {
    /// `service=S,compute=C`.
    pub topology: String,
    /// Null when threads float over all host cores.
    pub placement: Option<Placement>,
    /// `KVM_CAP_X86_DISABLE_EXITS`, applied to every vCPU.
    pub exits_disabled: String,
    pub halt_poll_ns: Option<u64>,
    /// SCHED_FIFO priority of compute vCPU threads.
    pub realtime: Option<i32>,
    pub vcpus: Vec<VcpuDetail>,
}

/// Where a VM's threads run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub service: String,
    /// Core of compute vCPU k is the k-th entry.
    pub compute: String,
    pub io: String,
    pub warnings: Vec<String>,
}

/// A vCPU in `GET /vm/vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuDetail {
    pub id: u8,
    pub role: String,
    pub state: String,
    pub tid: Option<i32>,
    /// The cores asked for.
    pub placement: Option<String>,
    /// `Cpus_allowed_list` of the thread.
    pub host_cpus_allowed: Option<String>,
    pub last_host_cpu: Option<u32>,
    pub sched_fifo: Option<bool>,
    pub involuntary_switches: Option<u64>,
    pub exits_disabled: String,
    pub halt_poll_ns: Option<u64>,
    pub vmm_exits: VmmExits,
    /// KVM's binary statistics of the vCPU.
    pub kvm_stats: Option<BTreeMap<String, u64>>,
}

/// Exits the VMM saw from one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmExits {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub pvm_assists: u64,
}

// ----- GET /vm/interrupts -----

/// `GET /vm/interrupts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupts {
    pub compute_vcpus: Vec<u32>,
    pub msi: Vec<MsiRoute>,
    /// MSI routes rewritten away from compute vCPUs so far.
    pub msi_steered: u64,
    pub ioapic: Vec<IoapicPin>,
    pub ioapic_pins_on_compute_vcpus: Vec<u8>,
}

/// One MSI route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiRoute {
    pub gsi: u32,
    pub vector: u32,
    /// Where the guest aimed it.
    pub guest_vcpus: Vec<u8>,
    /// Where it is delivered.
    pub vcpus: Vec<u8>,
    pub steered: bool,
}

/// One unmasked IOAPIC pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicPin {
    pub pin: u8,
    pub vector: u8,
    pub vcpus: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_is_live_and_its_files_lie_beside_dest() {
        let cut = |live: bool| SnapshotRequest {
            live,
            cut: Some(Cut { max_wait_ms: 1000 }),
            ..SnapshotRequest::full("/bb/job7/ckpt-1/vm")
        };
        assert_eq!(cut(true).check(), Ok(()));
        assert_eq!(cut(false).check(), Err(RequestError::CutNotLive));
        let f = CutFiles::beside(std::path::Path::new("/bb/job7/ckpt-1/vm"));
        assert_eq!(f.ready, PathBuf::from("/bb/job7/ckpt-1/.vm.ready"));
        assert_eq!(f.abort, PathBuf::from("/bb/job7/ckpt-1/.vm.abort"));
        assert_eq!(
            CutFiles::beside(std::path::Path::new("/")).pause,
            PathBuf::from("/.snapshot.pause")
        );
        assert_eq!(
            Cut {
                max_wait_ms: u64::MAX
            }
            .max_wait(),
            Cut::MAX_WAIT
        );
        // Without a cut, as before.
        assert_eq!(SnapshotRequest::full("/x").check(), Ok(()));
        assert_eq!(
            SnapshotRequest::full("x").check(),
            Err(RequestError::RelativeDest)
        );
    }
}
