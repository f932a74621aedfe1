//! VM configuration, one type for all of it: [`VmSpec`] is the TOML schema
//! of `--config`, what `run`'s flags fill in (`cli::RunArgs::spec`, laid
//! over the file: flags win), and the machine part a snapshot or a
//! migration carries ([`RunConfig::machine_spec`]). [`VmSpec::validate`]
//! checks a spec in one place and gives the [`RunConfig`] the VMM runs
//! with.
use crate::host::CpuProfile;
pub use crate::memory::HugePages;
pub use devices::virtio::block::DiskConfig;
pub use devices::virtio::net::NetConfig;
pub use devices::virtio::vsock::VsockConfig;
pub use numa::{CpuShape, Layout as NumaLayout, NodeSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vcpu_decouple::exits::ExitsRequest;
use vcpu_decouple::{PinSpec, Topology};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Access(#[from] crate::access::Error),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}{at}: {msg}")]
    Parse {
        path: PathBuf,
        /// `, line L column C` when the parser knows where.
        at: String,
        msg: String,
    },
    #[error("invalid size '{0}' (examples: 512M, 2G, 1024 = MiB)")]
    MemorySize(String),
    #[error("invalid console '{0}' (stdio, none or file=PATH)")]
    Console(String),
    #[error("no kernel given: use --kernel PATH or `kernel = \"PATH\"` in the config file")]
    NoKernel,
    #[error(transparent)]
    Cpus(#[from] vcpu_decouple::topology::Error),
    #[error("--realtime priority must be 1-99 (got {0})")]
    Realtime(i32),
    #[error("test exit port {0:#x} is taken by a device ({1}); pick another port")]
    ExitPortTaken(u16, &'static str),
    #[error(
        "invalid --disk '{spec}': {why} (path=FILE[,readonly][,direct][,serial=ID][,queues=N][,bw=RATE][,iops=N])"
    )]
    Disk { spec: String, why: String },
    #[error("invalid --device '{spec}': {why} (vfio=DDDD:BB:DD.F[,mmap=off] or vfio-user=SOCKET)")]
    Device { spec: String, why: String },
    #[error("--device {0} is given twice")]
    DeviceTwice(String),
    #[error("hotplug_slots = {0}: at most {MAX_HOTPLUG_SLOTS} hot-plug slots")]
    HotplugSlots(u8),
    #[error("invalid --net '{spec}': {why} (tap=NAME[,mac=52:54:00:12:34:56])")]
    Net { spec: String, why: String },
    #[error("invalid --vsock '{spec}': {why} (cid=N,socket=PATH)")]
    Vsock { spec: String, why: String },
    #[error(transparent)]
    Numa(#[from] numa::guest::Error),
    #[error(transparent)]
    Shape(#[from] numa::shape::Error),
}

/// `--vsock cid=N,socket=PATH` (or `[vsock]` in TOML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockEntry {
    pub cid: u64,
    pub socket: PathBuf,
}

impl std::str::FromStr for VsockEntry {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Vsock {
            spec: spec.into(),
            why,
        };
        let (mut cid, mut socket) = (None, None);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("cid", n)) => {
                    cid = Some(n.parse().map_err(|_| bad(format!("'{n}' is not a CID")))?)
                }
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                _ => return Err(bad(format!("unknown option '{part}'"))),
            }
        }
        match (cid, socket) {
            (Some(cid), Some(socket)) => Ok(VsockEntry { cid, socket }),
            _ => Err(bad("both cid= and socket= are needed".into())),
        }
    }
}

/// One `--net` (or `[[net]]` in TOML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetEntry {
    pub tap: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A Linux bridge the TAP joins when the VMM opens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// false: no announcement after a move (`announce=off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<bool>,
}

impl From<&NetConfig> for NetEntry {
    fn from(n: &NetConfig) -> Self {
        NetEntry {
            tap: n.tap.clone(),
            mac: Some(devices::virtio::net::format_mac(&n.mac)),
            bridge: n.bridge.clone(),
            announce: (!n.announce).then_some(false),
        }
    }
}

impl std::str::FromStr for NetEntry {
    type Err = Error;
    /// `tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,bridge=BR][,announce=on|off]`.
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Net {
            spec: spec.into(),
            why,
        };
        let mut n = NetEntry {
            tap: String::new(),
            mac: None,
            bridge: None,
            announce: None,
        };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) => n.tap = t.into(),
                Some(("mac", m)) => n.mac = Some(m.into()),
                Some(("bridge", b)) => n.bridge = Some(b.into()),
                Some(("announce", "on")) => n.announce = Some(true),
                Some(("announce", "off")) => n.announce = Some(false),
                Some(("announce", other)) => {
                    return Err(bad(format!("announce={other}: want on or off")))
                }
                _ => return Err(bad(format!("unknown option '{part}'"))),
            }
        }
        if n.tap.is_empty() {
            return Err(bad("no tap name".into()));
        }
        Ok(n)
    }
}

/// One `--device` (or an entry of `device = [...]` in TOML): a function
/// passed through to the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceEntry {
    /// A host PCI function bound to vfio-pci (kernel VFIO). `mmap: false`
    /// traps every BAR access instead of mapping BARs into the guest (for
    /// comparison, and for devices whose BARs must not be mapped).
    Vfio {
        address: vfio_ib::HostDevice,
        mmap: bool,
    },
    /// A function served by another process over vfio-user (a Unix socket).
    VfioUser { socket: PathBuf },
}

impl std::str::FromStr for DeviceEntry {
    type Err = Error;
    /// `vfio=0000:3b:00.2[,mmap=off]` (the address may be a sysfs path),
    /// `vfio=/sys/bus/mdev/devices/UUID` (a mediated device) or
    /// `vfio-user=SOCKET`.
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Device {
            spec: spec.into(),
            why,
        };
        if let Some(socket) = spec.strip_prefix("vfio-user=") {
            if socket.is_empty() {
                return Err(bad("no socket path".into()));
            }
            return Ok(DeviceEntry::VfioUser {
                socket: socket.into(),
            });
        }
        let mut parts = spec.split(',');
        let first = parts.next().unwrap_or_default();
        let address = match first.split_once('=') {
            Some(("vfio", a)) => a.parse().map_err(bad)?,
            _ => return Err(bad("unknown kind of device".into())),
        };
        let mut mmap = true;
        for p in parts {
            match p.split_once('=') {
                Some(("mmap", "on")) => mmap = true,
                Some(("mmap", "off")) => mmap = false,
                _ => return Err(bad(format!("unknown option '{p}' (mmap=on|off)"))),
            }
        }
        Ok(DeviceEntry::Vfio { address, mmap })
    }
}

impl DeviceEntry {
    /// The device it names (a PCI address or a socket), whatever the options.
    pub fn key(&self) -> String {
        match self {
            DeviceEntry::Vfio { address, .. } => address.to_string(),
            DeviceEntry::VfioUser { socket } => socket.display().to_string(),
        }
    }
}

impl std::fmt::Display for DeviceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceEntry::Vfio { address, mmap } => {
                write!(f, "vfio={address}{}", if *mmap { "" } else { ",mmap=off" })
            }
            DeviceEntry::VfioUser { socket } => write!(f, "vfio-user={}", socket.display()),
        }
    }
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetEntry {
    pub(crate) fn validated(self) -> Result<NetConfig, Error> {
        let bad = |why: &str| Error::Net {
            spec: self.tap.clone(),
            why: why.into(),
        };
        if self.tap.len() > 15 {
            return Err(bad("a TAP name has at most 15 bytes"));
        }
        let mac = match &self.mac {
            Some(m) => parse_mac(m).ok_or_else(|| bad("bad MAC address"))?,
            None => devices::virtio::net::default_mac(&self.tap),
        };
        if mac[0] & 1 != 0 {
            return Err(bad("a multicast MAC cannot be a device address"));
        }
        if self
            .bridge
            .as_ref()
            .is_some_and(|b| b.is_empty() || b.len() > 15)
        {
            return Err(bad("a bridge name has 1 to 15 bytes"));
        }
        Ok(NetConfig {
            tap: self.tap,
            mac,
            bridge: self.bridge,
            announce: self.announce.unwrap_or(true),
        })
    }
}

/// One `--disk` (or `[[disk]]` in TOML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Bandwidth limit: bytes per second with B/K/M/G suffix (bare = MiB/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bw: Option<String>,
    /// Requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
}

impl From<&DiskConfig> for DiskEntry {
    fn from(d: &DiskConfig) -> Self {
        DiskEntry {
            path: d.path.clone(),
            readonly: d.readonly,
            direct: d.direct,
            serial: d.serial.clone(),
            queues: Some(d.queues),
            bw: d.bandwidth.map(|b| format!("{b}B")),
            iops: d.iops,
        }
    }
}

pub const MAX_DISK_QUEUES: u16 = 16;

impl std::str::FromStr for DiskEntry {
    type Err = Error;
    /// `path=FILE[,readonly][,direct][,serial=ID][,queues=N]` (or `FILE,...`).
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Disk {
            spec: spec.into(),
            why,
        };
        let mut d = DiskEntry {
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            serial: None,
            queues: None,
            bw: None,
            iops: None,
        };
        for (i, part) in spec.split(',').enumerate() {
            match part.split_once('=') {
                Some(("path", p)) => d.path = p.into(),
                Some(("serial", id)) if id.len() <= 20 => d.serial = Some(id.into()),
                Some(("serial", _)) => return Err(bad("a serial has at most 20 bytes".into())),
                Some(("bw", r)) => d.bw = Some(r.into()),
                Some(("iops", n)) => {
                    d.iops = Some(
                        n.parse()
                            .map_err(|_| bad(format!("'{n}' is not a number")))?,
                    )
                }
                Some(("queues", n)) => {
                    d.queues = Some(
                        n.parse()
                            .map_err(|_| bad(format!("'{n}' is not a number")))?,
                    )
                }
                Some((k, _)) => return Err(bad(format!("unknown key '{k}'"))),
                None if part == "readonly" || part == "ro" => d.readonly = true,
                None if part == "direct" => d.direct = true,
                None if i == 0 && !part.is_empty() => d.path = part.into(),
                None => return Err(bad(format!("unknown option '{part}'"))),
            }
        }
        if d.path.as_os_str().is_empty() {
            return Err(bad("no path".into()));
        }
        Ok(d)
    }
}

impl DiskEntry {
    pub(crate) fn validated(self) -> Result<DiskConfig, Error> {
        let queues = self.queues.unwrap_or(1);
        if queues == 0 || queues > MAX_DISK_QUEUES {
            return Err(Error::Disk {
                spec: self.path.display().to_string(),
                why: format!("queues must be 1-{MAX_DISK_QUEUES}"),
            });
        }
        let bandwidth = match &self.bw {
            Some(r) => Some(parse_size(r).map_err(|_| Error::Disk {
                spec: self.path.display().to_string(),
                why: format!("bad bandwidth '{r}' (e.g. bw=100M for 100 MiB/s)"),
            })?),
            None => None,
        };
        if self.iops == Some(0) {
            return Err(Error::Disk {
                spec: self.path.display().to_string(),
                why: "iops must be at least 1".into(),
            });
        }
        Ok(DiskConfig {
            path: self.path,
            readonly: self.readonly,
            direct: self.direct,
            serial: self.serial,
            queues,
            bandwidth,
            iops: self.iops,
        })
    }
}

/// Ports the VMM's own devices use (a test exit port must avoid them).
pub const RESERVED_PORTS: &[(u16, u16, &str)] = &[
    (0x20, 0x21, "PIC"),
    (0x40, 0x43, "PIT"),
    (0x60, 0x64, "i8042"),
    (0xa0, 0xa1, "PIC"),
    (0x3f8, 0x3ff, "COM1"),
    (0x600, 0x601, "ACPI sleep registers"),
    (0xcf8, 0xcff, "PCI configuration"),
    (0xc000, 0xffff, "PCI I/O BARs"),
];

/// Everything `run` accepts: the TOML schema, the target of the flags and
/// the saved machine configuration. Every field is optional: a partial
/// spec lays over another ([`VmSpec::merged`]).
///
/// In TOML the keys are the flags' names (`api-socket`, `snapshot-dir`);
/// the snake_case names (`api_socket`, `snapshot_dirs`) are read too, and
/// are what a saved machine spec (snapshot, migration stream) holds, so a
/// state written by this version reads in the versions before it.
/// docs/config.md is generated from this type and `run`'s flags.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// `4` or `"service=1,compute=3"`.
    #[serde(
        default,
        deserialize_with = "de_cpus",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpus: Option<Topology>,
    /// `"service=0,compute=1-3,io=0"`.
    #[serde(
        default,
        deserialize_with = "de_parsed",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub pin: Option<PinSpec>,
    /// `"auto"`, `"none"` or `"hlt,pause"`.
    #[serde(
        default,
        deserialize_with = "de_parsed",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub exits: Option<ExitsRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "halt-poll-ns")]
    pub halt_poll_ns: Option<u64>,
    /// SCHED_FIFO priority for compute vCPU threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realtime: Option<i32>,
    /// `"sockets=2,cores=4,threads=2"`: the guest's CPU topology.
    #[serde(
        default,
        deserialize_with = "de_parsed",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub topology: Option<CpuShape>,
    /// Guest NUMA nodes: `[[numa]]` tables (`node`, `cpus`, `memory`,
    /// `host-node`, `distance = ["1:20"]`) or the flag's text,
    /// `numa = ["node=0,cpus=0-1,memory=1G,host-node=0"]`.
    #[serde(
        default,
        deserialize_with = "de_entries",
        skip_serializing_if = "Option::is_none"
    )]
    pub numa: Option<Vec<NodeSpec>>,
    /// `"512M"`, `"2G"`, `"4Gi"`, `1024` (a number: MiB), `"268435456B"`.
    #[serde(
        default,
        deserialize_with = "de_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<String>,
    /// `true` (2 MiB pages), `"2M"`, `"1G"` or `false`; saved as `true`
    /// for 2 MiB pages, as before 1 GiB pages existed.
    #[serde(
        default,
        deserialize_with = "de_hugepages",
        skip_serializing_if = "Option::is_none"
    )]
    pub hugepages: Option<HugePages>,
    /// Fault in all guest memory before the guest starts (`--prefault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "api-socket")]
    pub api_socket: Option<PathBuf>,
    /// `true` (port 0xf4), a port number, or `"0xf4"`.
    #[serde(
        default,
        alias = "test-exit-port",
        deserialize_with = "de_port",
        skip_serializing_if = "Option::is_none"
    )]
    pub test_exit_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "cpu-profile")]
    pub cpu_profile: Option<CpuProfile>,
    /// `[[disk]]` tables, or the flag's text: `disk = ["path=a.raw,readonly"]`.
    #[serde(
        default,
        deserialize_with = "de_entries",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk: Option<Vec<DiskEntry>>,
    /// `[[net]]` tables, or the flag's text: `net = "tap=tap0"`.
    #[serde(
        default,
        deserialize_with = "de_entries",
        skip_serializing_if = "Option::is_none"
    )]
    pub net: Option<Vec<NetEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "virtio-console")]
    pub virtio_console: Option<PathBuf>,
    /// A `[vsock]` table, or the flag's text: `vsock = "cid=3,socket=v.sock"`.
    #[serde(
        default,
        deserialize_with = "de_entry",
        skip_serializing_if = "Option::is_none"
    )]
    pub vsock: Option<VsockEntry>,
    /// `["vfio=0000:3b:00.2"]`: functions passed through.
    #[serde(
        default,
        deserialize_with = "de_devices",
        serialize_with = "ser_devices",
        skip_serializing_if = "Option::is_none"
    )]
    pub device: Option<Vec<DeviceEntry>>,
    /// `"on"`, `"log"` or `"off"`.
    #[serde(
        default,
        deserialize_with = "de_parsed",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub seccomp: Option<sandbox::Mode>,
    #[serde(
        default,
        alias = "snapshot-dir",
        alias = "snapshot-dirs",
        deserialize_with = "de_texts",
        skip_serializing_if = "Option::is_none"
    )]
    pub snapshot_dirs: Option<Vec<PathBuf>>,
    #[serde(
        default,
        alias = "migrate-to",
        deserialize_with = "de_texts",
        skip_serializing_if = "Option::is_none"
    )]
    pub migrate_to: Option<Vec<String>>,
    /// Hot-plug root ports (PCIe native hot-plug slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "hotplug-slots")]
    pub hotplug_slots: Option<u8>,
    /// `["vfio-user=/run/ffmk/cx0.sock"]`: what the API may hot-plug.
    #[serde(
        default,
        alias = "hotplug-allow",
        deserialize_with = "de_devices",
        serialize_with = "ser_devices",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_allow: Option<Vec<DeviceEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(alias = "api-group")]
    pub api_group: Option<String>,
    /// `"auto"`, `"on"` or `"off"`.
    #[serde(
        default,
        deserialize_with = "de_parsed",
        serialize_with = "ser_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub landlock: Option<sandbox::landlock::Mode>,
}

/// A value that has a text form (`Display` and `FromStr` agree), as text.
fn ser_text<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// `device = ["vfio=..."]`.
fn ser_devices<S: serde::Serializer>(
    v: &Option<Vec<DeviceEntry>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let texts: Option<Vec<String>> = v
        .as_ref()
        .map(|d| d.iter().map(ToString::to_string).collect());
    texts.serialize(s)
}

impl VmSpec {
    /// Reads a TOML file; relative paths are taken relative to its directory.
    pub fn load(path: &Path) -> Result<VmSpec, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        let mut c: VmSpec = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.into(),
            at: e
                .span()
                .map(|s| line_column(&text, s.start))
                .unwrap_or_default(),
            msg: e.message().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let disks = c.disk.iter_mut().flatten().map(|d| &mut d.path);
        let vsock = c.vsock.iter_mut().map(|v| &mut v.socket);
        let snapshot_dirs = c.snapshot_dirs.iter_mut().flatten();
        for p in [
            &mut c.kernel,
            &mut c.initrd,
            &mut c.api_socket,
            &mut c.virtio_console,
        ]
        .into_iter()
        .flatten()
        .chain(disks)
        .chain(vsock)
        .chain(snapshot_dirs)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    /// `self` with every field that `over` sets replaced.
    pub fn merged(self, over: VmSpec) -> VmSpec {
        VmSpec {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            cpus: over.cpus.or(self.cpus),
            pin: over.pin.or(self.pin),
            exits: over.exits.or(self.exits),
            halt_poll_ns: over.halt_poll_ns.or(self.halt_poll_ns),
            realtime: over.realtime.or(self.realtime),
            topology: over.topology.or(self.topology),
            numa: over.numa.or(self.numa),
            memory: over.memory.or(self.memory),
            hugepages: over.hugepages.or(self.hugepages),
            prefault: over.prefault.or(self.prefault),
            console: over.console.or(self.console),
            api_socket: over.api_socket.or(self.api_socket),
            test_exit_port: over.test_exit_port.or(self.test_exit_port),
            cpu_profile: over.cpu_profile.or(self.cpu_profile),
            // Disks given on the command line replace the file's list.
            disk: over.disk.or(self.disk),
            net: over.net.or(self.net),
            device: over.device.or(self.device),
            hotplug_allow: over.hotplug_allow.or(self.hotplug_allow),
            hotplug_slots: over.hotplug_slots.or(self.hotplug_slots),
            rng: over.rng.or(self.rng),
            virtio_console: over.virtio_console.or(self.virtio_console),
            vsock: over.vsock.or(self.vsock),
            seccomp: over.seccomp.or(self.seccomp),
            snapshot_dirs: over.snapshot_dirs.or(self.snapshot_dirs),
            migrate_to: over.migrate_to.or(self.migrate_to),
            api_group: over.api_group.or(self.api_group),
            landlock: over.landlock.or(self.landlock),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Console {
    Stdio,
    None,
    File(PathBuf),
}

impl std::str::FromStr for Console {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(Console::Stdio),
            "none" | "off" => Ok(Console::None),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Console::File(p.into())),
                _ => Err(Error::Console(s.into())),
            },
        }
    }
}

/// A complete, validated VM configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// All vCPUs (`topology.total()`).
    pub cpus: u8,
    /// Service and compute vCPUs (see the `vcpu-decouple` crate).
    pub topology: Topology,
    /// Host cores for the VM's threads (`--pin`).
    pub pin: Option<PinSpec>,
    pub exits: ExitsRequest,
    pub halt_poll_ns: Option<u64>,
    /// SCHED_FIFO priority for compute vCPU threads.
    pub realtime: Option<i32>,
    pub memory_bytes: u64,
    /// Sockets, cores and threads (`--topology`; APIC IDs follow it).
    #[serde(serialize_with = "as_text")]
    pub shape: CpuShape,
    /// Guest NUMA nodes (`--numa`), None for one node.
    pub numa: Option<NumaLayout>,
    pub hugepages: HugePages,
    /// Fault in all guest memory before the guest starts.
    pub prefault: bool,
    pub console: Console,
    pub api_socket: Option<PathBuf>,
    pub test_exit_port: Option<u16>,
    pub cpu_profile: Option<CpuProfile>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: bool,
    pub virtio_console: Option<PathBuf>,
    pub vsock: Option<VsockConfig>,
    /// `--device`: passed-through functions.
    #[serde(default)]
    pub devices: Vec<DeviceEntry>,
    /// `--hotplug-allow`: what `PUT /vm/devices` may plug (empty: any).
    #[serde(default)]
    pub hotplug_allow: Vec<DeviceEntry>,
    /// `--hotplug-slots`: PCIe root ports with a hot-plug slot each.
    #[serde(default)]
    pub hotplug_slots: u8,
    /// `--seccomp`.
    #[serde(serialize_with = "as_text")]
    pub seccomp: sandbox::Mode,
    /// `--snapshot-dir`, `--migrate-to`.
    pub access: crate::access::Access,
    /// `--api-group`.
    pub api_group: Option<String>,
    /// `--landlock`.
    #[serde(serialize_with = "as_text")]
    pub landlock: sandbox::landlock::Mode,
}

fn as_text<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub const DEFAULT_MEMORY: &str = "256M";
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const MAX_VCPUS: u32 = vcpu_decouple::topology::MAX_VCPUS;
/// Hot-plug root ports a VM may have (each takes a bus of the 16 the ECAM
/// covers, and windows of 16 MiB below 4 GiB and 512 MiB above RAM).
pub const MAX_HOTPLUG_SLOTS: u8 = 8;

/// `cpus = 4` or `cpus = "service=1,compute=3"` in TOML.
fn de_cpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Topology>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Cpus {
        Count(u32),
        Spec(String),
    }
    let spec = match Option::<Cpus>::deserialize(d)? {
        None => return Ok(None),
        Some(Cpus::Count(n)) => n.to_string(),
        Some(Cpus::Spec(s)) => s,
    };
    spec.parse().map(Some).map_err(serde::de::Error::custom)
}

/// `device = ["vfio=..."]` in TOML.
fn de_devices<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<DeviceEntry>>, D::Error> {
    de_texts(d)
}

/// One value or a list of values; each a string parsed as the flag is.
fn de_texts<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    // null (a saved spec's unset key) is unset.
    let texts = match Option::<OneOrMany>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("want a string or a list of strings"))?
    {
        None => return Ok(None),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    texts
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// A table (its fields as in TOML) or the flag's text (`"path=a,readonly"`).
fn entry<T, E>(v: serde_json::Value) -> Result<T, E>
where
    T: std::str::FromStr + serde::de::DeserializeOwned,
    T::Err: std::fmt::Display,
    E: serde::de::Error,
{
    match v {
        serde_json::Value::String(s) => s.parse().map_err(E::custom),
        other => T::deserialize(other).map_err(E::custom),
    }
}

/// `[vsock]` or `vsock = "cid=3,socket=..."`.
fn de_entry<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + serde::de::DeserializeOwned,
    T::Err: std::fmt::Display,
{
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v => entry(v).map(Some),
    }
}

/// `[[disk]]` tables, one string, or a list of strings and tables.
fn de_entries<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + serde::de::DeserializeOwned,
    T::Err: std::fmt::Display,
{
    let items = match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    items
        .into_iter()
        .map(entry)
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `memory = 512` (MiB, as on the command line) or `memory = "2G"`.
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        MiB(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("want a size: a number of MiB or \"2G\""))?
    {
        None => Ok(None),
        Some(Size::MiB(n)) => Ok(Some(n.to_string())),
        Some(Size::Text(t)) => Ok(Some(t)),
    }
}

/// `test-exit-port = true` (0xf4), `= 0xf4`, `= 244` or `= "0xf4"`.
fn de_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        On(bool),
        Number(u16),
        Text(String),
    }
    let bad = || serde::de::Error::custom("want true, false or a port number (0-65535)");
    match Option::<Port>::deserialize(d).map_err(|_| bad())? {
        None | Some(Port::On(false)) => Ok(None),
        Some(Port::On(true)) => Ok(Some(TEST_EXIT_PORT)),
        Some(Port::Number(n)) => Ok(Some(n)),
        Some(Port::Text(t)) => {
            let n = match t.strip_prefix("0x") {
                Some(h) => u16::from_str_radix(h, 16),
                None => t.parse(),
            };
            n.map(Some).map_err(|_| bad())
        }
    }
}

/// `hugepages = true | false | "2M" | "1G"`.
fn de_hugepages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<HugePages>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Pages {
        On(bool),
        Size(String),
    }
    match Option::<Pages>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("want true, false, \"2M\" or \"1G\""))?
    {
        None => Ok(None),
        Some(Pages::On(on)) => Ok(Some(HugePages::from_flag(on))),
        Some(Pages::Size(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl Serialize for HugePages {
    /// 2 MiB pages as `true` and none as `false` (what a version before
    /// 1 GiB pages reads), 1 GiB pages as `"1G"`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HugePages::Off => s.serialize_bool(false),
            HugePages::Size2M => s.serialize_bool(true),
            HugePages::Size1G => s.serialize_str("1G"),
        }
    }
}

/// The test exit port `--test-exit-port` without a value opens.
pub const TEST_EXIT_PORT: u16 = 0xf4;

/// A TOML string parsed the way the command-line flag is.
fn de_parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// `, line L column C` of byte `offset` in `text` (both from 1).
fn line_column(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(", line {line} column {column}")
}

impl VmSpec {
    /// Checks the whole spec (the one place settings are validated) and
    /// gives what the VMM runs with.
    pub fn validate(self) -> Result<RunConfig, Error> {
        let c = self;
        let topology = c.cpus.unwrap_or(Topology::plain(1));
        if let Some(p) = c.realtime {
            if !(1..=99).contains(&p) {
                return Err(Error::Realtime(p));
            }
        }
        if let Some(port) = c.test_exit_port {
            if let Some(&(_, _, what)) = RESERVED_PORTS
                .iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&port))
            {
                return Err(Error::ExitPortTaken(port, what));
            }
        }
        let hugepages = c.hugepages.unwrap_or_default();
        let cpus = u32::from(topology.total());
        // Memory: --memory, else the NUMA nodes' sum, else the default.
        let memory = c.memory.as_deref().map(parse_size).transpose()?;
        let numa = match c.numa.as_deref() {
            None | Some([]) => None,
            Some(nodes) => Some(NumaLayout::new(nodes, cpus, memory, hugepages.bytes())?),
        };
        let memory_bytes = match (&numa, memory) {
            (_, Some(m)) => m,
            (Some(l), None) => l.total_memory(),
            (None, None) => parse_size(DEFAULT_MEMORY)?,
        };
        let shape = c
            .topology
            .unwrap_or_else(|| CpuShape::default_for(cpus, numa.as_ref()));
        shape.check(cpus, numa.as_ref())?;
        Ok(RunConfig {
            kernel: c.kernel.ok_or(Error::NoKernel)?,
            initrd: c.initrd,
            cmdline: topology.guest_cmdline(c.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)),
            cpus: topology.total(),
            topology,
            pin: c.pin,
            exits: c.exits.unwrap_or_default(),
            halt_poll_ns: c.halt_poll_ns,
            realtime: c.realtime,
            memory_bytes,
            shape,
            numa,
            hugepages,
            prefault: c.prefault.unwrap_or(false),
            console: c.console.as_deref().unwrap_or("stdio").parse()?,
            api_socket: c.api_socket,
            test_exit_port: c.test_exit_port,
            cpu_profile: c.cpu_profile,
            disks: c
                .disk
                .unwrap_or_default()
                .into_iter()
                .map(DiskEntry::validated)
                .collect::<Result<_, _>>()?,
            nets: c
                .net
                .unwrap_or_default()
                .into_iter()
                .map(NetEntry::validated)
                .collect::<Result<_, _>>()?,
            rng: c.rng.unwrap_or(false),
            virtio_console: c.virtio_console,
            vsock: c.vsock.map(|v| VsockConfig {
                cid: v.cid,
                socket: v.socket,
            }),
            devices: {
                let d = c.device.unwrap_or_default();
                let addr = DeviceEntry::key;
                if let Some((_, e)) = d
                    .iter()
                    .enumerate()
                    .find(|(i, e)| d[..*i].iter().any(|o| addr(o) == addr(e)))
                {
                    return Err(Error::DeviceTwice(addr(e)));
                }
                d
            },
            hotplug_allow: c.hotplug_allow.unwrap_or_default(),
            hotplug_slots: match c.hotplug_slots.unwrap_or(0) {
                n if n > MAX_HOTPLUG_SLOTS => return Err(Error::HotplugSlots(n)),
                n => n,
            },
            seccomp: c.seccomp.unwrap_or_default(),
            access: crate::access::Access::new(
                c.snapshot_dirs.as_deref().unwrap_or_default(),
                c.migrate_to.as_deref().unwrap_or_default(),
            )?,
            api_group: c.api_group,
            landlock: c.landlock.unwrap_or_default(),
        })
    }
}

impl RunConfig {
    /// The APIC ID of each vCPU, by vCPU number (`--topology`; checked to
    /// be at most 254 when the config was validated).
    pub fn apic_ids(&self) -> Vec<u8> {
        (0..u32::from(self.cpus))
            .map(|i| self.shape.apic_id(i).min(254) as u8)
            .collect()
    }

    /// The machine part of these settings as a spec: what a snapshot or
    /// a migration carries and a restored VM must have again (no host
    /// placement, sockets, console or confinement: the restoring host
    /// chooses those).
    pub fn machine_spec(&self, profile: CpuProfile) -> VmSpec {
        VmSpec {
            kernel: Some(self.kernel.clone()),
            cmdline: Some(self.cmdline.clone()),
            cpus: Some(self.topology),
            memory: Some(format!("{}B", self.memory_bytes)),
            // Left out when it is what the VM gets anyway, so that the
            // states of VMs without them read in versions before them.
            topology: (self.shape
                != CpuShape::default_for(u32::from(self.cpus), self.numa.as_ref()))
            .then_some(self.shape),
            numa: self.numa.as_ref().map(NumaLayout::specs),
            hugepages: Some(self.hugepages),
            // Where memory is faulted in is the host's choice.
            prefault: None,
            test_exit_port: self.test_exit_port,
            cpu_profile: Some(profile),
            disk: Some(self.disks.iter().map(DiskEntry::from).collect()),
            net: Some(self.nets.iter().map(NetEntry::from).collect()),
            rng: Some(self.rng),
            virtio_console: self.virtio_console.clone(),
            vsock: self.vsock.as_ref().map(|v| VsockEntry {
                cid: v.cid,
                socket: v.socket.clone(),
            }),
            hotplug_slots: Some(self.hotplug_slots),
            ..VmSpec::default()
        }
    }
}

/// Parses "512M", "2G", "1GiB", "1024" (MiB), "65536K", "4096B" into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    numa::guest::parse_size(s).ok_or_else(|| Error::MemorySize(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1024").unwrap(), 1 << 30);
        assert_eq!(parse_size("65536K").unwrap(), 64 << 20);
        for bad in ["", "M", "12X", "-1G", "0", "99999999999999999999T", "1.5G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// A saved spec (JSON) may say null for a key it does not set.
    #[test]
    fn null_is_unset_in_a_saved_spec() {
        let keys = [
            "memory",
            "test_exit_port",
            "disk",
            "net",
            "vsock",
            "device",
            "snapshot_dirs",
            "migrate_to",
            "hotplug_allow",
            "cpus",
            "pin",
            "exits",
            "seccomp",
            "landlock",
        ];
        let json = format!(
            "{{\"kernel\": \"k\", {}}}",
            keys.map(|k| format!("\"{k}\": null")).join(", ")
        );
        let spec: VmSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(
            spec,
            VmSpec {
                kernel: Some("k".into()),
                ..VmSpec::default()
            }
        );
    }

    #[test]
    fn consoles() {
        assert_eq!("stdio".parse::<Console>().unwrap(), Console::Stdio);
        assert_eq!("none".parse::<Console>().unwrap(), Console::None);
        assert_eq!(
            "file=/tmp/x".parse::<Console>().unwrap(),
            Console::File("/tmp/x".into())
        );
        assert!("file=".parse::<Console>().is_err());
        assert!("tty".parse::<Console>().is_err());
    }

    #[test]
    fn toml_rejects_unknown_keys_and_flags_override_file() {
        let e = toml::from_str::<VmSpec>("kernel = \"k\"\nmemroy = \"1G\"\n").unwrap_err();
        assert!(
            e.message().contains("unknown field `memroy`"),
            "{}",
            e.message()
        );
        let file: VmSpec = toml::from_str("kernel = \"k\"\ncpus = 2\nmemory = \"1G\"\ntest_exit_port = 0xf4\ncpu_profile = \"host\"\n").unwrap();
        let flags = VmSpec {
            cpus: Some(Topology::plain(4)),
            ..Default::default()
        };
        let c = (file.merged(flags)).validate().unwrap();
        assert_eq!(
            (c.cpus, c.memory_bytes, c.test_exit_port),
            (4, 1 << 30, Some(0xf4))
        );
        assert_eq!(c.cpu_profile, Some(CpuProfile::Host));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn validation() {
        assert!(matches!(
            (VmSpec::default()).validate(),
            Err(Error::NoKernel)
        ));
        let with = |f: fn(&mut VmSpec)| {
            let mut c = VmSpec {
                kernel: Some("k".into()),
                ..Default::default()
            };
            f(&mut c);
            c.validate()
        };
        assert!(matches!(
            with(|c| c.realtime = Some(0)),
            Err(Error::Realtime(0))
        ));
        assert!(matches!(
            with(|c| c.test_exit_port = Some(0xcfc)),
            Err(Error::ExitPortTaken(0xcfc, "PCI configuration"))
        ));
        assert!(with(|c| c.test_exit_port = Some(0xf4)).is_ok());
    }

    #[test]
    fn toml_takes_decoupled_topologies() {
        for bad in ["cpus = 0", "cpus = 255", "cpus = \"service=0,compute=1\""] {
            assert!(toml::from_str::<VmSpec>(bad).is_err(), "{bad}");
        }
        let file: VmSpec = toml::from_str(
            "kernel = \"k\"\ncpus = \"service=1,compute=2\"\npin = \"service=0,compute=1,2\"\nexits = \"hlt,pause\"\nrealtime = 10\n",
        )
        .unwrap();
        let c = file.validate().unwrap();
        assert_eq!((c.cpus, c.topology.compute), (3, 2));
        assert_eq!(c.pin.unwrap().compute.unwrap().as_slice(), &[1, 2]);
        assert_eq!(c.exits, ExitsRequest::Mask(6));
        assert!(
            c.cmdline
                .ends_with("nohz_full=1-2 rcu_nocbs=1-2 irqaffinity=0"),
            "{}",
            c.cmdline
        );
        let e = toml::from_str::<VmSpec>("pin = \"compute=1,1\"").unwrap_err();
        assert!(
            e.message().contains("CPU 1 is listed twice"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn huge_pages_read_as_a_flag_or_a_size_and_save_as_before() {
        for (text, want) in [
            ("hugepages = true", HugePages::Size2M),
            ("hugepages = false", HugePages::Off),
            ("hugepages = \"2M\"", HugePages::Size2M),
            ("hugepages = \"1G\"\nprefault = true", HugePages::Size1G),
        ] {
            let spec: VmSpec = toml::from_str(&format!("kernel = \"k\"\n{text}")).unwrap();
            let c = spec.validate().unwrap();
            assert_eq!(c.hugepages, want, "{text}");
            assert_eq!(c.prefault, text.contains("prefault"), "{text}");
        }
        let e = toml::from_str::<VmSpec>("hugepages = \"3M\"").unwrap_err();
        assert!(e.message().contains("want 2M or 1G"), "{}", e.message());
        // A saved spec keeps `true` for 2 MiB pages (what a version before
        // 1 GiB pages reads) and says "1G" for 1 GiB pages.
        let saved = |h| {
            let spec = VmSpec {
                hugepages: Some(h),
                ..VmSpec::default()
            };
            serde_json::to_value(&spec).unwrap()["hugepages"].clone()
        };
        assert_eq!(saved(HugePages::Size2M), serde_json::json!(true));
        assert_eq!(saved(HugePages::Off), serde_json::json!(false));
        assert_eq!(saved(HugePages::Size1G), serde_json::json!("1G"));
    }

    #[test]
    fn disk_specs() {
        let d: DiskEntry = "path=/img/a.raw,readonly,serial=abc,queues=4"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.readonly && !d.direct);
        assert_eq!((d.serial.as_deref(), d.queues), (Some("abc"), Some(4)));
        let l: DiskEntry = "c.raw,bw=4M,iops=100".parse().unwrap();
        let l = l.validated().unwrap();
        assert_eq!((l.bandwidth, l.iops), (Some(4 << 20), Some(100)));
        let bad_bw: DiskEntry = "c.raw,bw=fast".parse().unwrap();
        assert!(bad_bw.validated().is_err());
        let d: DiskEntry = "b.raw,direct".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("b.raw"));
        assert!(d.direct);
        for bad in [
            "",
            "readonly",
            "path=a,colour=red",
            "a,fast",
            "a,queues=x",
            "a,serial=123456789012345678901",
        ] {
            assert!(bad.parse::<DiskEntry>().is_err(), "{bad}");
        }
        let zero = DiskEntry {
            queues: Some(0),
            ..d.clone()
        };
        assert!(zero.validated().is_err());
        assert_eq!(d.validated().unwrap().queues, 1);
        // TOML: [[disk]] tables, paths relative to the file.
        let dir = std::env::temp_dir().join(format!("ffmk-cfg-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(
            &f,
            "kernel = \"k\"\n[[disk]]\npath = \"a.raw\"\nreadonly = true\n[[disk]]\npath = \"/b.raw\"\nqueues = 2\n",
        )
        .unwrap();
        let c = (VmSpec::load(&f).unwrap()).validate().unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, dir.join("a.raw"));
        assert!(c.disks[0].readonly);
        assert_eq!(
            (c.disks[1].path.as_path(), c.disks[1].queues),
            (Path::new("/b.raw"), 2)
        );
        std::fs::write(&f, "kernel = \"k\"\n[[disk]]\npath = \"a\"\nspeed = 1\n").unwrap();
        assert!(matches!(VmSpec::load(&f), Err(Error::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn net_specs() {
        let n: NetEntry = "tap=ffmk0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        let c = n.validated().unwrap();
        assert_eq!(
            (c.tap.as_str(), c.mac),
            ("ffmk0", [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])
        );
        let d: NetEntry = "tap=t1".parse().unwrap();
        assert_eq!(
            d.clone().validated().unwrap().mac,
            devices::virtio::net::default_mac("t1")
        );
        assert!(d.clone().validated().unwrap().announce, "on unless said");
        let quiet: NetEntry = "tap=t1,announce=off".parse().unwrap();
        assert!(!quiet.validated().unwrap().announce);
        for bad in [
            "",
            "ffmk0",
            "tap=x,speed=1",
            "mac=52:54:00:00:00:01",
            "tap=x,announce=maybe",
        ] {
            assert!(bad.parse::<NetEntry>().is_err(), "{bad}");
        }
        for mac in ["52:54:00:00:00", "zz:54:00:00:00:01", "01:00:5e:00:00:01"] {
            let e = NetEntry {
                tap: "t".into(),
                mac: Some(mac.into()),
                bridge: None,
                announce: None,
            };
            assert!(e.validated().is_err(), "{mac}");
        }
        let long = NetEntry {
            tap: "a-very-long-tap-name".into(),
            mac: None,
            bridge: None,
            announce: None,
        };
        assert!(long.validated().is_err());
        let bridged: NetEntry = "tap=t2,bridge=br0".parse().unwrap();
        assert_eq!(
            bridged.clone().validated().unwrap().bridge.as_deref(),
            Some("br0")
        );
        let too_long = NetEntry {
            bridge: Some("a-very-long-bridge".into()),
            ..bridged
        };
        assert!(too_long.validated().is_err());
    }

    #[test]
    fn vsock_specs() {
        let v: VsockEntry = "cid=7,socket=/run/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket.as_path()), (7, Path::new("/run/v.sock")));
        for bad in [
            "cid=7",
            "socket=/x",
            "cid=x,socket=/x",
            "cid=3,socket=/x,port=1",
            "",
        ] {
            assert!(bad.parse::<VsockEntry>().is_err(), "{bad}");
        }
    }

    #[test]
    fn file_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("ffmk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(&f, "kernel = \"probe.elf\"\n").unwrap();
        assert_eq!(
            VmSpec::load(&f).unwrap().kernel.unwrap(),
            dir.join("probe.elf")
        );
        std::fs::write(&f, "kernel = 3\n").unwrap();
        assert!(VmSpec::load(&f)
            .unwrap_err()
            .to_string()
            .contains("invalid config file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_specs() {
        let d: DeviceEntry = "vfio=0000:3b:00.2".parse().unwrap();
        assert_eq!(d.to_string(), "vfio=0000:3b:00.2");
        let d: DeviceEntry = "vfio=/sys/bus/pci/devices/0000:3b:00.2,mmap=off"
            .parse()
            .unwrap();
        assert_eq!(d.to_string(), "vfio=0000:3b:00.2,mmap=off");
        let d: DeviceEntry = "vfio-user=/run/cx.sock".parse().unwrap();
        assert_eq!(d.to_string(), "vfio-user=/run/cx.sock");
        for bad in [
            "vfio=",
            "vfio=3b",
            "pci=0000:00:01.0",
            "vfio=0000:00:01.0,x=1",
            "vfio",
            "vfio-user=",
        ] {
            let e = bad.parse::<DeviceEntry>().unwrap_err().to_string();
            assert!(e.starts_with("invalid --device"), "{bad}: {e}");
        }
        let twice = VmSpec {
            kernel: Some("k".into()),
            device: Some(vec![
                "vfio=0000:3b:00.2".parse().unwrap(),
                "vfio=3b:00.2,mmap=off".parse().unwrap(),
            ]),
            ..Default::default()
        };
        let e = twice.validate().unwrap_err().to_string();
        assert_eq!(e, "--device 0000:3b:00.2 is given twice");
        let toml = "kernel = 'k'\ndevice = ['vfio=0000:3b:00.2']\n";
        let c: VmSpec = toml::from_str(toml).unwrap();
        let c = c.validate().unwrap();
        assert_eq!(c.devices.len(), 1);
        assert!(toml::from_str::<VmSpec>("device = ['vfio=zz']").is_err());
    }

    /// One type is the TOML schema and the saved form: a spec written out
    /// reads back the same, as TOML and as JSON, and the machine part of a
    /// validated spec validates to the same machine.
    #[test]
    fn a_spec_reads_back_as_written_and_the_machine_part_validates_the_same() {
        let text = r#"
            kernel = "/k"
            cmdline = "console=ttyS0"
            cpus = "service=1,compute=2"
            pin = "service=0,compute=1-2,io=0"
            exits = "hlt,pause"
            memory = "1G"
            hugepages = false
            disk = [{ path = "/d.raw", readonly = true, serial = "s1", queues = 2, bw = "100M", iops = 500 }]
            net = [{ tap = "tap0", mac = "52:54:00:12:34:56" }]
            rng = true
            vsock = { cid = 3, socket = "/v.sock" }
            device = ["vfio=0000:3b:00.2,mmap=off", "vfio-user=/run/cx.sock"]
            seccomp = "log"
            landlock = "off"
            hotplug_slots = 2
        "#;
        let spec: VmSpec = toml::from_str(text).unwrap();
        let again: VmSpec = toml::from_str(&toml::to_string(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
        let json: VmSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(json, spec);
        let run = spec.validate().unwrap();
        let machine = run.machine_spec(CpuProfile::Pvm).validate().unwrap();
        assert_eq!(
            (
                machine.topology,
                machine.memory_bytes,
                machine.cmdline.clone()
            ),
            (run.topology, run.memory_bytes, run.cmdline.clone())
        );
        assert_eq!(machine.disks, run.disks);
        assert_eq!(machine.nets, run.nets);
        assert_eq!(machine.vsock, run.vsock);
        assert_eq!((machine.rng, machine.hotplug_slots), (true, 2));
        // Host placement and confinement are not part of the machine.
        assert!(machine.pin.is_none() && machine.devices.is_empty());
    }
}
