//! The file system a VMM needs for its configuration, as Landlock rules
//! (`--landlock`, docs/security.md): every path the configuration names,
//! used the way it is used, and nothing else.
use crate::config::{Console, RunConfig};
use sandbox::landlock::Paths;
use std::path::{Path, PathBuf};

pub use sandbox::landlock::Mode as Landlock;

/// Whether the file system is restricted for `config` (`--landlock
/// auto`: when `--snapshot-dir` names where snapshots go; without it, an
/// API client may name any directory, so writes cannot be limited).
pub fn applies(config: &RunConfig) -> bool {
    match config.landlock {
        Landlock::Auto => !config.access.snapshot_dirs.is_empty(),
        Landlock::On => true,
        Landlock::Off => false,
    }
}

/// Read-only system files: what name resolution (a migration target by
/// name) and thread placement read.
const SYSTEM_READ: &[&str] = &[
    "/proc",
    "/sys",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
];

/// The rules for `config`; `restore_from` is the snapshot being restored.
/// Creates the files the VMM would create later (console outputs) and the
/// per-core claim directory, so that rules can name them.
pub fn paths(config: &RunConfig, restore_from: Option<&Path>) -> std::io::Result<Paths> {
    let mut p = Paths::default();
    p.read.extend(SYSTEM_READ.iter().map(PathBuf::from));
    // A restore reads no kernel (the guest is in the snapshot's memory):
    // the kernel path a snapshot records gets no rule.
    if restore_from.is_none() {
        p.read.push(config.kernel.clone());
        p.read.extend(config.initrd.clone());
    }
    p.read.extend(restore_from.map(Path::to_path_buf));
    for d in &config.disks {
        if d.readonly {
            p.read.push(d.path.clone());
        } else {
            p.read_write.push(d.path.clone());
        }
    }
    let mut outputs: Vec<&Path> = Vec::new();
    if let Console::File(f) = &config.console {
        outputs.push(f);
    }
    outputs.extend(config.virtio_console.as_deref());
    for f in outputs {
        // Created now (appended to later, as without Landlock).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)?;
        p.read_write.push(f.to_path_buf());
    }
    if !config.nets.is_empty() {
        p.devices.push("/dev/net/tun".into());
    }
    p.devices.push("/dev/userfaultfd".into());
    // Passthrough: the VFIO container and the group of each device named
    // at start or allowed for hot-plug (a missing one is skipped here and
    // fails with its own message when it is opened).
    let kernel_vfio =
        |d: &&crate::config::DeviceEntry| matches!(d, crate::config::DeviceEntry::Vfio { .. });
    let named = config.devices.iter().chain(&config.hotplug_allow);
    if named.clone().any(|d| kernel_vfio(&d)) {
        p.devices.push("/dev/vfio/vfio".into());
    }
    for d in named {
        let crate::config::DeviceEntry::Vfio { address, .. } = d else {
            continue;
        };
        if let Some(g) = address.iommu_group(Path::new("/")) {
            let node = PathBuf::from(format!("/dev/vfio/{g}"));
            if !p.devices.contains(&node) {
                p.devices.push(node);
            }
        }
    }
    let parent = |f: &Path| {
        f.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    p.socket_dirs
        .extend(config.api_socket.as_deref().map(parent));
    p.socket_dirs
        .extend(config.vsock.as_ref().map(|v| parent(&v.socket)));
    p.trees.extend(config.access.snapshot_dirs.iter().cloned());
    if config.pin.is_some() || config.topology.is_decoupled() {
        let claims = vcpu_decouple::affinity::claims_dir();
        std::fs::create_dir_all(&claims)?;
        p.trees.push(claims);
    }
    Ok(p)
}
