//! The saved machine: what a snapshot's state file and a migration's
//! state carry ([`MachineState`]: the configuration a restored VM must
//! have, boot entry, VM-wide and per-vCPU KVM state, and every device's
//! state by device id), and [`Restoring`]: such a state checked against
//! this host, with its memory, ready for `Vm::create`.
//!
//! Taking the state is `capture`'s; building a VM from it is
//! `build::FromState`'s. Nothing here knows the running VM.
use crate::arch::state::{self, VcpuSnapshot, VmSnapshot};
use crate::boot::BootInfo;
use crate::config::{DiskEntry, NetEntry, RunConfig, VmSpec, VsockEntry};
use crate::host::CpuProfile;
use crate::memory::{self, GuestMemoryMmap};
use devices::persist::{Persist, StateError};
use devices::virtio::block::DiskConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::pci::VirtioPci;
use devices::virtio::vsock::VsockConfig;
use serde::{Deserialize, Serialize};
use snapshot::Snapshot;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Version of [`MachineState`]'s layout inside the state file: 3 keeps
/// device states by device id ([`DeviceStates`]).
pub const STATE_VERSION: u32 = 3;
/// The oldest layout still read: version 2 (device states in fields of
/// their own, virtio transports by position) is upgraded as it is read.
pub const OLDEST_STATE_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("{0}")]
    Chain(String),
    #[error("cannot {what}: {detail}")]
    Failed { what: &'static str, detail: String },
    #[error("{origin} cannot be restored here: {why}")]
    Incompatible { origin: String, why: String },
}

impl Error {
    /// HTTP status for the API: the request was wrong (4xx) or the host failed (500).
    pub fn http_status(&self) -> u16 {
        match self {
            Error::Unsupported(_) | Error::Chain(_) => 409,
            Error::Snapshot(snapshot::Error::Exists(_))
            | Error::Snapshot(snapshot::Error::Chain(_))
            | Error::Snapshot(snapshot::Error::NotASnapshot(_)) => 409,
            _ => 500,
        }
    }
}

pub(crate) fn failed<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Failed {
        what,
        detail: e.to_string(),
    }
}

/// Why a state file (or a migration's state) cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("unreadable machine state: {0}")]
    Unreadable(serde_json::Error),
    #[error(
        "state version {0} (this ffmk-vmm reads versions {OLDEST_STATE_VERSION} to {STATE_VERSION})"
    )]
    Version(u64),
    /// A version 2 state that cannot be brought into today's layout.
    #[error("version 2 state: {0}")]
    V2(String),
    #[error("saved configuration: {0}")]
    Config(#[from] crate::config::Error),
    #[error("vCPU count and saved vCPUs differ")]
    VcpuCount,
}

/// A saved vCPU state that cannot be given to KVM.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRestoreError {
    #[error("no saved state for vCPU {0}")]
    Missing(u8),
    #[error(transparent)]
    State(#[from] state::Error),
}

/// How the guest's CPU topology or NUMA nodes in `saved` differ from what
/// a destination was started with (`--topology`, `--numa`; the host nodes
/// may differ), if they do.
pub fn guest_layout_differs(saved: &RunConfig, here: &RunConfig) -> Option<String> {
    let view = |c: &RunConfig| c.numa.as_ref().map(crate::config::NumaLayout::guest_view);
    if saved.shape != here.shape {
        return Some(format!(
            "its vCPUs are --topology {}, here {}",
            saved.shape, here.shape
        ));
    }
    if view(saved) != view(here) {
        let nodes = |c: &RunConfig| match &c.numa {
            None => "no --numa".to_string(),
            Some(l) => l
                .specs()
                .iter()
                .map(|n| {
                    format!(
                        "--numa {}",
                        crate::config::NodeSpec {
                            host_node: None,
                            ..n.clone()
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
        };
        return Some(format!(
            "its guest NUMA nodes are {}, here {} (the host nodes may differ, the guest's may not)",
            nodes(saved),
            nodes(here)
        ));
    }
    None
}

impl MachineState {
    /// The saved machine's settings, validated (`parse_state` checked
    /// that they are valid and fit the saved vCPUs).
    pub fn settings(&self) -> Result<RunConfig, StateFileError> {
        Ok(self.config.clone().validate()?)
    }

    /// Service and compute vCPUs.
    pub fn topology(&self) -> vcpu_decouple::Topology {
        self.config
            .cpus
            .unwrap_or(vcpu_decouple::Topology::plain(1))
    }
}

/// Everything but memory: what the state file holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    pub version: u32,
    /// The machine part of the VM's spec (`RunConfig::machine_spec`): a
    /// restored VM must have it again; the restoring host adds the rest.
    pub config: VmSpec,
    pub boot: BootInfo,
    pub tsc_khz: u32,
    pub vm: VmSnapshot,
    pub vcpus: Vec<VcpuSnapshot>,
    /// Every device's state, by device id.
    pub devices: DeviceStates,
}

/// Device ids of the platform devices.
pub const SERIAL: &str = "serial";
pub const RTC: &str = "rtc";
pub const PCI: &str = "pci";

/// Device states by device id, each the device's [`Persist::State`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceStates(std::collections::BTreeMap<String, serde_json::Value>);

/// A device state that cannot be saved, is missing, or does not fit.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("device {id}: {source}")]
    Device { id: String, source: StateError },
    #[error("device {id}: unreadable saved state: {source}")]
    Decode {
        id: String,
        source: serde_json::Error,
    },
    #[error("no saved state for device {0}")]
    Missing(String),
    #[error("the saved state has devices this VM does not: {0}")]
    Unknown(String),
}

impl DeviceStates {
    /// Saves `device` as `id`.
    pub fn put<D: Persist<Error = StateError>>(
        &mut self,
        id: &str,
        device: &D,
    ) -> Result<(), DeviceStateError> {
        let state = device.save().map_err(|source| DeviceStateError::Device {
            id: id.into(),
            source,
        })?;
        let value = serde_json::to_value(&state).map_err(|source| DeviceStateError::Decode {
            id: id.into(),
            source,
        })?;
        self.0.insert(id.to_string(), value);
        Ok(())
    }

    /// The saved state of `id`, if there is one.
    pub fn get<D: Persist>(&self, id: &str) -> Result<Option<D::State>, DeviceStateError> {
        self.0
            .get(id)
            .map(D::State::deserialize)
            .transpose()
            .map_err(|source| DeviceStateError::Decode {
                id: id.into(),
                source,
            })
    }

    /// Builds `id` from its saved state.
    pub fn restore<D: Persist<Error = StateError>>(
        &self,
        id: &str,
        args: D::ConstructorArgs,
    ) -> Result<D, DeviceStateError> {
        let state = self
            .get::<D>(id)?
            .ok_or_else(|| DeviceStateError::Missing(id.into()))?;
        D::restore(args, &state).map_err(|source| DeviceStateError::Device {
            id: id.into(),
            source,
        })
    }

    /// Refuses states of devices not in `ids` (the VM built here lacks
    /// them).
    pub fn check_known<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), DeviceStateError> {
        let known: std::collections::BTreeSet<&str> = ids.into_iter().collect();
        let unknown: Vec<&str> = self
            .0
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(DeviceStateError::Unknown(unknown.join(", ")))
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Saves a state that is not a [`Persist`] device's (a passthrough
    /// function's).
    pub fn put_state<T: serde::Serialize>(
        &mut self,
        id: &str,
        state: &T,
    ) -> Result<(), DeviceStateError> {
        let value = serde_json::to_value(state).map_err(|source| DeviceStateError::Decode {
            id: id.into(),
            source,
        })?;
        self.0.insert(id.to_string(), value);
        Ok(())
    }

    /// Every saved state whose id `wanted` accepts, decoded.
    pub fn states_where<T: serde::de::DeserializeOwned>(
        &self,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, T)>, DeviceStateError> {
        self.0
            .iter()
            .filter(|(id, _)| wanted(id))
            .map(|(id, v)| {
                T::deserialize(v)
                    .map(|t| (id.clone(), t))
                    .map_err(|source| DeviceStateError::Decode {
                        id: id.clone(),
                        source,
                    })
            })
            .collect()
    }
}

impl MachineState {
    /// Today's layout.
    pub fn new(
        config: VmSpec,
        boot: BootInfo,
        tsc_khz: u32,
        vm: VmSnapshot,
        vcpus: Vec<VcpuSnapshot>,
        devices: DeviceStates,
    ) -> MachineState {
        MachineState {
            version: STATE_VERSION,
            config,
            boot,
            tsc_khz,
            vm,
            vcpus,
            devices,
        }
    }
}

/// Version 2 of the state file, read only: the machine configuration in a
/// layout of its own, device states in fields of their own, virtio
/// transports by position.
mod v2 {
    use super::*;
    use crate::config::{DiskEntry, NetEntry, VsockEntry};

    #[derive(Deserialize)]
    struct MachineConfig {
        kernel: PathBuf,
        cmdline: String,
        cpus: u8,
        #[serde(default)]
        compute: u8,
        memory_bytes: u64,
        hugepages: bool,
        test_exit_port: Option<u16>,
        cpu_profile: CpuProfile,
        disks: Vec<DiskConfig>,
        nets: Vec<NetConfig>,
        rng: bool,
        virtio_console: Option<PathBuf>,
        vsock: Option<VsockConfig>,
        #[serde(default)]
        hotplug_slots: u8,
    }

    /// A version 2 state (as JSON) in today's layout.
    pub fn upgrade(v: serde_json::Value) -> Result<serde_json::Value, StateFileError> {
        convert(v).map_err(StateFileError::V2)
    }

    fn convert(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
        let o = v.as_object_mut().ok_or("not an object")?;
        let mut take = |k: &str| o.remove(k).filter(|v| !v.is_null());
        let c: MachineConfig = serde_json::from_value(take("config").ok_or("no configuration")?)
            .map_err(|e| format!("configuration: {e}"))?;
        if c.compute >= c.cpus {
            return Err("more compute vCPUs than vCPUs".into());
        }
        let ids = virtio_ids(
            c.disks.len(),
            c.nets.len(),
            c.virtio_console.is_some(),
            c.vsock.is_some(),
            c.rng,
        );
        let mut devices = serde_json::Map::new();
        devices.insert(SERIAL.into(), take("serial").ok_or("no serial port state")?);
        // Absent in states from before the CMOS clock existed.
        if let Some(rtc) = take("rtc") {
            devices.insert(RTC.into(), rtc);
        }
        devices.insert(PCI.into(), take("pci").ok_or("no PCI state")?);
        let virtio = match take("virtio").ok_or("no virtio state")? {
            serde_json::Value::Array(a) => a,
            _ => return Err("virtio state is not a list".into()),
        };
        if ids.len() != virtio.len() {
            return Err(format!(
                "{} virtio devices saved, the saved configuration has {}",
                virtio.len(),
                ids.len()
            ));
        }
        devices.extend(ids.into_iter().zip(virtio));
        let spec = VmSpec {
            kernel: Some(c.kernel),
            cmdline: Some(c.cmdline),
            cpus: Some(vcpu_decouple::Topology {
                service: c.cpus - c.compute,
                compute: c.compute,
            }),
            memory: Some(format!("{}B", c.memory_bytes)),
            hugepages: Some(crate::memory::HugePages::from_flag(c.hugepages)),
            test_exit_port: c.test_exit_port,
            cpu_profile: Some(c.cpu_profile),
            disk: Some(c.disks.iter().map(DiskEntry::from).collect()),
            net: Some(c.nets.iter().map(NetEntry::from).collect()),
            rng: Some(c.rng),
            virtio_console: c.virtio_console,
            vsock: c.vsock.map(|v| VsockEntry {
                cid: v.cid,
                socket: v.socket,
            }),
            hotplug_slots: Some(c.hotplug_slots),
            ..VmSpec::default()
        };
        let spec = serde_json::to_value(spec).map_err(|e| e.to_string())?;
        o.insert("config".into(), spec);
        o.insert("devices".into(), serde_json::Value::Object(devices));
        o.insert("version".into(), STATE_VERSION.into());
        Ok(v)
    }
}

/// The chain a VM's memory follows: its last snapshot.
#[derive(Debug, Clone)]
pub struct ChainRef {
    pub dir: PathBuf,
    pub chain_id: String,
    pub generation: u64,
}

/// A virtio device's transport and its device id (the key of its saved
/// state).
pub struct VirtioFunction {
    pub id: String,
    pub transport: Arc<Mutex<VirtioPci>>,
}

/// The ids of a configuration's virtio devices, in the order they are
/// built and placed on the bus: disks, nets, console, vsock, rng. (The
/// order is also how version 2 states listed them.)
pub fn virtio_ids(disks: usize, nets: usize, console: bool, vsock: bool, rng: bool) -> Vec<String> {
    let mut ids: Vec<String> = (0..disks).map(|i| format!("virtio-blk{i}")).collect();
    ids.extend((0..nets).map(|i| format!("virtio-net{i}")));
    for (on, id) in [
        (console, "virtio-console"),
        (vsock, "virtio-vsock"),
        (rng, "virtio-rng"),
    ] {
        if on {
            ids.push(id.into());
        }
    }
    ids
}

/// Where a VM being restored comes from.
pub enum Origin {
    Snapshot(Box<Snapshot>),
    /// A live migration: state from the stream, memory received into the
    /// prepared VM ([`crate::vm::Prepared`]).
    Migration {
        from: String,
    },
}

/// A machine state checked against this host, with its memory, ready for
/// `Vm::create`.
pub struct Restoring {
    pub origin: Origin,
    pub machine: MachineState,
    /// The saved machine's settings, validated.
    pub saved: RunConfig,
    /// Start with the vCPUs paused (resume through the API).
    pub paused: bool,
}

/// Parses a state file (upgrading version 2's layout) and checks what
/// does not depend on where it came from: its version, its saved
/// configuration and vCPU count.
pub fn parse_state(bytes: &[u8]) -> Result<MachineState, StateFileError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(StateFileError::Unreadable)?;
    let version = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if !(u64::from(OLDEST_STATE_VERSION)..=u64::from(STATE_VERSION)).contains(&version) {
        return Err(StateFileError::Version(version));
    }
    if version == 2 {
        v = v2::upgrade(v)?;
    }
    let machine: MachineState = serde_json::from_value(v).map_err(StateFileError::Unreadable)?;
    let settings = machine.settings()?;
    if machine.vcpus.len() != usize::from(settings.cpus) {
        return Err(StateFileError::VcpuCount);
    }
    Ok(machine)
}

impl Restoring {
    /// A VM arriving by migration: `state` as received.
    pub fn migrated(from: &str, state: &[u8], expect: &RunConfig) -> Result<Restoring, Error> {
        let origin = format!("the VM migrating from {from}");
        let incompatible = |why: String| Error::Incompatible {
            origin: origin.clone(),
            why,
        };
        let machine = parse_state(state).map_err(|e| incompatible(e.to_string()))?;
        let saved = machine
            .settings()
            .map_err(|e| incompatible(e.to_string()))?;
        if saved.memory_bytes != expect.memory_bytes || saved.topology != expect.topology {
            return Err(incompatible(format!(
                "its state is for --cpus {} and {} MiB",
                saved.topology,
                saved.memory_bytes >> 20
            )));
        }
        if let Some(why) = guest_layout_differs(&saved, expect) {
            return Err(incompatible(why));
        }
        Ok(Restoring {
            origin: Origin::Migration { from: from.into() },
            machine,
            saved,
            paused: true,
        })
    }

    pub fn open(dir: &Path, paused: bool) -> Result<Restoring, Error> {
        let snapshot = Snapshot::open(dir)?;
        snapshot.verify()?;
        let incompatible = |why: String| Error::Incompatible {
            origin: format!("snapshot {}", dir.display()),
            why,
        };
        let state = snapshot.read_state()?;
        let machine = parse_state(&state).map_err(|e| incompatible(e.to_string()))?;
        let saved = machine
            .settings()
            .map_err(|e| incompatible(e.to_string()))?;
        let m = &snapshot.manifest;
        if saved.memory_bytes != m.memory_bytes {
            return Err(incompatible(format!(
                "the state is for {} MiB of memory, the memory layers hold {} MiB",
                saved.memory_bytes >> 20,
                m.memory_bytes >> 20
            )));
        }
        let layout: Vec<(u64, u64)> = crate::arch::layout::ram_regions(m.memory_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect();
        if layout != m.regions {
            return Err(incompatible(
                "its memory regions do not match this VMM's layout".into(),
            ));
        }
        let vendor = crate::host::host_vendor();
        if m.host.cpu_vendor != vendor {
            return Err(incompatible(format!(
                "it was taken on a {} CPU, this host is {vendor}",
                m.host.cpu_vendor
            )));
        }
        Ok(Restoring {
            origin: Origin::Snapshot(Box::new(snapshot)),
            machine,
            saved,
            paused,
        })
    }

    /// What the VM is restored from, for messages.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Snapshot(s) => format!("snapshot {}", s.dir.display()),
            Origin::Migration { from, .. } => format!("the VM migrating from {from}"),
        }
    }

    /// The run configuration of the restored VM: the saved machine spec,
    /// this host's resources for its devices (`host`, see
    /// [`host_devices`]) and the restoring command line's own settings
    /// (`local`: console, API socket, placement, confinement) laid over
    /// it, validated as any spec is.
    pub fn run_config(
        &self,
        local: VmSpec,
        host: &HostResources,
    ) -> Result<RunConfig, RestoreConfigError> {
        let d = host_devices(&self.saved, host)?;
        let devices = VmSpec {
            disk: Some(d.disks.iter().map(DiskEntry::from).collect()),
            net: Some(d.nets.iter().map(NetEntry::from).collect()),
            virtio_console: d.virtio_console,
            vsock: d.vsock.map(|v| VsockEntry {
                cid: v.cid,
                socket: v.socket,
            }),
            ..VmSpec::default()
        };
        // The guest keeps its NUMA nodes;
        // this host may put them on other host nodes.
        let numa = match (&self.saved.numa, host.numa.is_empty()) {
            (_, true) => None,
            (Some(l), false) => Some(l.remapped(&host.numa)?.specs()),
            (None, false) => {
                return Err(RestoreConfigError::Host(format!(
                    "--numa: {} has no NUMA nodes to bind",
                    self.describe()
                )))
            }
        };
        // A snapshot that carries passthrough functions' device state
        // (VFIO migration) takes this host's `--device` functions in their
        // places (`Vm::create`); others are plugged through the API.
        let device = match (self.passthrough_slots().is_empty(), host.devices.is_empty()) {
            (true, true) => None,
            (true, false) => {
                return Err(RestoreConfigError::Host(format!(
                    "--device: {} carries no passthrough device state; plug this host's \
                     functions with `ffmk-vmm device add` once the VM runs",
                    self.describe()
                )))
            }
            (false, _) => Some(host.devices.clone()),
        };
        let local = VmSpec {
            device,
            numa,
            ..local
        };
        Ok(self
            .machine
            .config
            .clone()
            .merged(devices)
            .merged(local)
            .validate()?)
    }

    /// Puts the saved state into the devices of a VM built from the same
    /// configuration, by device id: PCI configuration spaces first (all
    /// checked before any changes), then each virtio transport (MSI-X
    /// routes, queues, and activation if the driver was running). A
    /// device without a saved state, or a saved state without a device,
    /// is refused.
    pub fn restore_devices(
        &self,
        pci: &Arc<devices::pci::PciRoot>,
        virtio: &[VirtioFunction],
        passthrough: &crate::passthrough::Passthroughs,
    ) -> Result<(), Error> {
        let devices = &self.machine.devices;
        let incompatible = |e: DeviceStateError| Error::Incompatible {
            origin: self.describe(),
            why: e.to_string(),
        };
        let functions: Vec<(String, crate::passthrough::SavedFunction)> = devices
            .states_where(crate::passthrough::is_state_id)
            .map_err(incompatible)?;
        let ids = [SERIAL, RTC, PCI]
            .into_iter()
            .chain(virtio.iter().map(|f| f.id.as_str()))
            .chain(functions.iter().map(|(id, _)| id.as_str()));
        devices.check_known(ids).map_err(incompatible)?;
        for f in virtio {
            if devices
                .get::<Arc<Mutex<VirtioPci>>>(&f.id)
                .map_err(incompatible)?
                .is_none()
            {
                return Err(incompatible(DeviceStateError::Missing(f.id.clone())));
            }
        }
        devices
            .restore::<Arc<devices::pci::PciRoot>>(PCI, pci.clone())
            .map_err(incompatible)?;
        for f in virtio {
            devices
                .restore::<Arc<Mutex<VirtioPci>>>(&f.id, f.transport.clone())
                .map_err(incompatible)?;
        }
        // Passthrough functions whose device state came along (VFIO
        // migration): after their configuration space.
        let saved: Vec<_> = functions.into_iter().map(|(_, f)| f).collect();
        passthrough
            .load_states(&saved)
            .map_err(|why| Error::Incompatible {
                origin: self.describe(),
                why,
            })
    }

    /// Where the saved VM had passthrough functions whose state came with
    /// it: (slot on bus 0, vendor:device) each.
    pub fn passthrough_slots(&self) -> Vec<(u8, String)> {
        self.machine
            .devices
            .states_where::<crate::passthrough::SavedFunction>(crate::passthrough::is_state_id)
            .map(|v| v.into_iter().map(|(_, f)| (f.slot, f.ids)).collect())
            .unwrap_or_default()
    }

    /// Guest memory: the full layer mapped lazily (`MAP_PRIVATE`), the
    /// incremental layers copied over it. With huge pages, every layer is
    /// copied into fresh huge-page memory instead.
    pub fn memory(&self, config: &RunConfig) -> Result<GuestMemoryMmap, Error> {
        let size = config.memory_bytes;
        let s = match &self.origin {
            Origin::Snapshot(s) => s,
            Origin::Migration { from } => {
                return Err(failed("map memory")(format!(
                    "the memory of the VM migrating from {from} is in the prepared VM"
                )))
            }
        };
        let mem = if config.hugepages.is_on() {
            let m = memory::create(size, config.hugepages, config.numa.as_ref())
                .map_err(|e| failed("map memory")(e.to_string()))?;
            s.apply_layers(0, &m)?;
            m
        } else {
            let m = memory::map_snapshot(size, &s.layer_path(0), config.numa.as_ref())
                .map_err(|e| failed("map the memory layer")(e.to_string()))?;
            s.apply_layers(1, &m)?;
            m
        };
        Ok(mem)
    }

    /// Restores vCPU `id` (TSC frequency first), then reads the state back
    /// and logs (warning) anything KVM holds differently from what it was
    /// given; returns the TSC kHz it runs at.
    pub fn restore_vcpu(
        &self,
        fd: &kvm_ioctls::VcpuFd,
        id: u8,
        host_tsc_khz: u32,
        msr_indices: &[u32],
    ) -> Result<u32, VcpuRestoreError> {
        let saved = self.machine.tsc_khz;
        let mut khz = host_tsc_khz;
        if saved != 0 && saved != host_tsc_khz {
            match fd.set_tsc_khz(saved) {
                Ok(()) => khz = saved,
                Err(e) => tracing::warn!(
                    "vCPU {id}: the snapshot's TSC ran at {saved} kHz, this host's at \
                     {host_tsc_khz} kHz, and KVM cannot scale it ({e}); guest time will drift"
                ),
            }
        }
        let s = self
            .machine
            .vcpus
            .get(usize::from(id))
            .ok_or(VcpuRestoreError::Missing(id))?;
        state::restore_vcpu(fd, s)?;
        match state::differences(fd, s, msr_indices, khz) {
            Ok(d) => {
                for d in d {
                    tracing::warn!("vCPU {id} restored with other state than saved: {d}");
                }
            }
            Err(e) => tracing::warn!("vCPU {id}: cannot read the restored state back: {e}"),
        }
        Ok(khz)
    }

    /// The snapshot chain the restored VM's memory follows (none after a
    /// migration).
    pub fn chain(&self) -> Option<ChainRef> {
        match &self.origin {
            Origin::Snapshot(s) => Some(ChainRef {
                dir: s.dir.clone(),
                chain_id: s.manifest.chain_id.clone(),
                generation: s.manifest.generation,
            }),
            Origin::Migration { .. } => None,
        }
    }
}

/// Why a restore cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum RestoreConfigError {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A device of the snapshot has no host resource named on this host.
    #[error("{0}")]
    Host(String),
    #[error(transparent)]
    Numa(#[from] numa::guest::Error),
}

/// What a restoring host names for a snapshot's devices (the restore
/// command's `--disk`, `--net`, `--virtio-console`, `--vsock`), and the
/// directories whose files a snapshot may name itself
/// (`--allow-snapshot-paths`).
#[derive(Debug, Clone, Default)]
pub struct HostResources {
    pub disks: Vec<DiskEntry>,
    pub nets: Vec<NetEntry>,
    pub virtio_console: Option<PathBuf>,
    pub vsock: Option<VsockEntry>,
    pub allow: Vec<PathBuf>,
    /// `--numa node=N,host-node=H`: the saved guest nodes on this host's nodes.
    pub numa: Vec<crate::config::NodeSpec>,
    /// `--device`: this host's passthrough functions for those whose
    /// device state the snapshot carries (VFIO migration), in slot order.
    pub devices: Vec<crate::config::DeviceEntry>,
}

/// The host side of a restored VM's devices.
pub struct HostDevices {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub virtio_console: Option<PathBuf>,
    pub vsock: Option<VsockConfig>,
}

/// This host's resources for the devices of `saved`: from `host` (the
/// restoring command line), in the snapshot's order, or the snapshot's own
/// paths where they lie (symbolic links resolved) below a directory
/// `host.allow` names. A TAP device is always named on the command line.
/// Anything else is refused in one line that says what to give.
pub fn host_devices(
    saved: &RunConfig,
    host: &HostResources,
) -> Result<HostDevices, RestoreConfigError> {
    let refuse = |s: String| RestoreConfigError::Host(s);
    let allowed = |what: &str, p: &Path, flag: &str| -> Result<PathBuf, RestoreConfigError> {
        // The file a path names: its existing parent resolved (a socket
        // or console file may not exist yet), then the last component.
        let resolved = match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
                std::fs::canonicalize(dir).ok().map(|d| d.join(name))
            }
            _ => None,
        };
        let inside = resolved.as_ref().is_some_and(|r| {
            host.allow.iter().any(|a| {
                std::fs::canonicalize(a).is_ok_and(|a| r.starts_with(&a))
                    && std::fs::symlink_metadata(r).map_or(true, |m| !m.file_type().is_symlink())
            })
        });
        if inside {
            return Ok(p.to_path_buf());
        }
        Err(refuse(format!(
            "the snapshot's {what} is {}: a restore opens no host file a snapshot names; give \
             this host's with {flag}, or allow the snapshot's directory with \
             --allow-snapshot-paths DIR",
            p.display()
        )))
    };
    // Disks: same number, same read-only flag.
    let disks = if host.disks.is_empty() {
        let mut v = Vec::new();
        for (i, d) in saved.disks.iter().enumerate() {
            allowed(&format!("disk {i}"), &d.path, "--disk PATH")?;
            v.push(d.clone());
        }
        v
    } else {
        if host.disks.len() != saved.disks.len() {
            return Err(refuse(format!(
                "the snapshot has {} disk(s), --disk names {}",
                saved.disks.len(),
                host.disks.len()
            )));
        }
        let mut v = Vec::new();
        for (i, (d, s)) in host.disks.iter().zip(&saved.disks).enumerate() {
            let d = d
                .clone()
                .validated()
                .map_err(|e| refuse(format!("--disk: {e}")))?;
            if d.readonly != s.readonly {
                return Err(refuse(format!(
                    "disk {i} was saved {}, --disk gives it {}",
                    if s.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    if d.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            v.push(d);
        }
        v
    };
    // Network devices: TAP names only from the command line.
    if host.nets.len() != saved.nets.len() {
        return Err(refuse(if host.nets.is_empty() {
            format!(
                "the snapshot has {} network device(s) (saved on TAP {}): name this host's TAP \
                 devices with --net tap=NAME (a restore attaches to no TAP a snapshot names)",
                saved.nets.len(),
                saved
                    .nets
                    .iter()
                    .map(|n| n.tap.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "the snapshot has {} network device(s), --net names {}",
                saved.nets.len(),
                host.nets.len()
            )
        }));
    }
    let mut nets = Vec::new();
    for (n, s) in host.nets.iter().zip(&saved.nets) {
        let keep_mac = n.mac.is_none();
        let mut c = n
            .clone()
            .validated()
            .map_err(|e| refuse(format!("--net: {e}")))?;
        if keep_mac {
            c.mac = s.mac;
        }
        nets.push(c);
    }
    let virtio_console = match (&saved.virtio_console, &host.virtio_console) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(refuse(
                "--virtio-console: the snapshot has no virtio-console".into(),
            ))
        }
        (Some(_), Some(p)) => Some(p.clone()),
        (Some(p), None) => Some(allowed("virtio-console file", p, "--virtio-console PATH")?),
    };
    let vsock = match (&saved.vsock, &host.vsock) {
        (None, None) => None,
        (None, Some(_)) => return Err(refuse("--vsock: the snapshot has no vsock device".into())),
        (Some(s), Some(h)) if s.cid != h.cid => {
            return Err(refuse(format!(
                "--vsock: the snapshot's guest has cid {}, not {}",
                s.cid, h.cid
            )))
        }
        (Some(s), Some(h)) => Some(VsockConfig {
            cid: s.cid,
            socket: h.socket.clone(),
        }),
        (Some(s), None) => Some(VsockConfig {
            cid: s.cid,
            socket: allowed("vsock socket", &s.socket, "--vsock cid=N,socket=PATH")?,
        }),
    };
    Ok(HostDevices {
        disks,
        nets,
        virtio_console,
        vsock,
    })
}
