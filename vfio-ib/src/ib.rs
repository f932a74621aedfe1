//! InfiniBand HCAs as the host kernel shows them in sysfs, and the
//! lifecycle of their virtual functions: list HCAs, ports and VFs, create
//! VFs, give a VF its node/port GUID and link policy (mlx5), bind it to
//! vfio-pci for a VM.
//!
//! The layout read here (see the kernel's ABI documentation
//! `sysfs-class-infiniband` and mlx5's `sriov_sysfs.c`):
//!
//! ```text
//! /sys/class/infiniband/mlx5_0/
//!     device -> ../../../0000:3b:00.0      the PCI function (PF or VF)
//!     node_guid, fw_ver, node_desc
//!     ports/1/{state,phys_state,lid,sm_lid,rate,link_layer}
//!     ports/1/gids/0, ports/1/pkeys/0..
//! /sys/bus/pci/devices/0000:3b:00.0/
//!     sriov_totalvfs, sriov_numvfs, virtfn0 -> ../0000:3b:00.1
//!     sriov/0/{node,port,policy}           mlx5: VF 0's GUIDs and policy
//! ```
use crate::sysfs::{self, PciAddress, Sriov};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Port {
    pub number: u32,
    /// "ACTIVE", "DOWN", "INIT", "ARMED" (without the kernel's "4: ").
    pub state: String,
    pub phys_state: String,
    pub lid: u32,
    pub sm_lid: u32,
    pub rate: String,
    pub link_layer: String,
    pub gid0: String,
    /// Non-zero partition keys.
    pub pkeys: Vec<String>,
}

/// A VF of an HCA, with what mlx5 lets the PF's owner set for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Vf {
    pub index: u32,
    pub address: PciAddress,
    pub driver: Option<String>,
    pub node_guid: Option<String>,
    pub port_guid: Option<String>,
    pub policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hca {
    pub name: String,
    pub address: Option<PciAddress>,
    pub driver: Option<String>,
    pub node_guid: String,
    pub fw_ver: String,
    pub ports: Vec<Port>,
    /// None: this function is not an SR-IOV physical function.
    pub sriov: Option<Sriov>,
    pub vfs: Vec<Vf>,
}

fn class_dir(root: &Path) -> PathBuf {
    root.join("sys/class/infiniband")
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// "4: ACTIVE" -> "ACTIVE".
fn after_colon(s: String) -> String {
    match s.split_once(':') {
        Some((_, rest)) => rest.trim().to_string(),
        None => s,
    }
}

fn number(s: Option<String>) -> u32 {
    s.and_then(|v| {
        let v = v.trim_start_matches("0x");
        u32::from_str_radix(v, 16).ok()
    })
    .unwrap_or(0)
}

fn port(dir: &Path, number_: u32) -> Port {
    let mut pkeys: Vec<(u32, String)> = std::fs::read_dir(dir.join("pkeys"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let i: u32 = e.file_name().to_str()?.parse().ok()?;
            let v = read(&e.path())?;
            (u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()? & 0x7fff != 0)
                .then_some((i, v))
        })
        .collect();
    pkeys.sort();
    Port {
        number: number_,
        state: after_colon(read(&dir.join("state")).unwrap_or_default()),
        phys_state: after_colon(read(&dir.join("phys_state")).unwrap_or_default()),
        lid: number(read(&dir.join("lid"))),
        sm_lid: number(read(&dir.join("sm_lid"))),
        rate: read(&dir.join("rate")).unwrap_or_default(),
        link_layer: read(&dir.join("link_layer")).unwrap_or_default(),
        gid0: read(&dir.join("gids/0")).unwrap_or_default(),
        pkeys: pkeys.into_iter().map(|(_, v)| v).collect(),
    }
}

fn pci_of(dir: &Path) -> Option<PciAddress> {
    let target = std::fs::read_link(dir.join("device")).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// Every HCA the host kernel has, sorted by name.
pub fn list(root: &Path) -> Vec<Hca> {
    let mut names: Vec<String> = std::fs::read_dir(class_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    names.iter().filter_map(|n| hca(root, n)).collect()
}

pub fn hca(root: &Path, name: &str) -> Option<Hca> {
    let dir = class_dir(root).join(name);
    if !dir.is_dir() {
        return None;
    }
    let mut ports: Vec<Port> = std::fs::read_dir(dir.join("ports"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            Some(port(&e.path(), n))
        })
        .collect();
    ports.sort_by_key(|p| p.number);
    let address = pci_of(&dir);
    let sriov = address.as_ref().and_then(|a| sysfs::sriov(root, a));
    let vfs = match (&address, &sriov) {
        (Some(pf), Some(s)) => s
            .vfs
            .iter()
            .enumerate()
            .map(|(i, vf)| {
                let cfg = sysfs::device_dir(root, pf).join(format!("sriov/{i}"));
                Vf {
                    index: i as u32,
                    address: vf.clone(),
                    driver: sysfs::driver(root, vf),
                    node_guid: read(&cfg.join("node")),
                    port_guid: read(&cfg.join("port")),
                    policy: read(&cfg.join("policy")),
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(Hca {
        name: name.to_string(),
        driver: address.as_ref().and_then(|a| sysfs::driver(root, a)),
        address,
        node_guid: read(&dir.join("node_guid")).unwrap_or_default(),
        fw_ver: read(&dir.join("fw_ver")).unwrap_or_default(),
        ports,
        sriov,
        vfs,
    })
}

/// Why an HCA or one of its VFs cannot be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum IbError {
    #[error("no InfiniBand HCA '{0}': this host has none (is mlx5_ib loaded?)")]
    NoHcas(String),
    #[error("no InfiniBand HCA '{name}' (this host has {have})")]
    NoHca { name: String, have: String },
    #[error("{0}: no PCI device behind it")]
    NoPciDevice(String),
    #[error("{hca}: {source}")]
    Host {
        hca: String,
        source: sysfs::HostError,
    },
    #[error(
        "{hca} has {count} VFs; there is no VF {vf} (create them with `ffmk-vmm ib create-vfs \
         {hca} N`)"
    )]
    NoVf { hca: String, count: usize, vf: u32 },
    #[error(
        "{hca}: no {} (GUIDs and policy of VFs are set this way by mlx5 only; driver here: \
         {driver})",
        dir.display()
    )]
    NotMlx5 {
        hca: String,
        dir: PathBuf,
        driver: String,
    },
    #[error("'{0}' is not a GUID (8 hex bytes separated by ':')")]
    BadGuid(String),
    #[error("'{0}' is not a VF policy (Up, Down or Follow)")]
    BadPolicy(String),
    #[error("{hca}: VF {vf}: cannot set the {what}: {source}")]
    Write {
        hca: String,
        vf: u32,
        what: &'static str,
        source: std::io::Error,
    },
}

fn need(root: &Path, name: &str) -> Result<Hca, IbError> {
    hca(root, name).ok_or_else(|| {
        let have: Vec<String> = list(root).into_iter().map(|h| h.name).collect();
        if have.is_empty() {
            IbError::NoHcas(name.into())
        } else {
            IbError::NoHca {
                name: name.into(),
                have: have.join(", "),
            }
        }
    })
}

fn pf_of(h: &Hca) -> Result<PciAddress, IbError> {
    h.address
        .clone()
        .ok_or_else(|| IbError::NoPciDevice(h.name.clone()))
}

/// Creates `n` VFs on HCA `name`.
pub fn create_vfs(root: &Path, name: &str, n: u32) -> Result<Vec<PciAddress>, IbError> {
    let h = need(root, name)?;
    let pf = pf_of(&h)?;
    sysfs::create_vfs(root, &pf, n).map_err(|source| IbError::Host {
        hca: name.into(),
        source,
    })?;
    Ok(sysfs::sriov(root, &pf).map(|s| s.vfs).unwrap_or_default())
}

fn vf_dir(root: &Path, h: &Hca, vf: u32) -> Result<PathBuf, IbError> {
    let pf = pf_of(h)?;
    if vf as usize >= h.vfs.len() {
        return Err(IbError::NoVf {
            hca: h.name.clone(),
            count: h.vfs.len(),
            vf,
        });
    }
    let dir = sysfs::device_dir(root, &pf).join(format!("sriov/{vf}"));
    if !dir.is_dir() {
        return Err(IbError::NotMlx5 {
            hca: h.name.clone(),
            dir,
            driver: h.driver.as_deref().unwrap_or("none").into(),
        });
    }
    Ok(dir)
}

/// Checks a GUID as `xx:xx:xx:xx:xx:xx:xx:xx`.
pub fn parse_guid(s: &str) -> Result<String, IbError> {
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 8
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(IbError::BadGuid(s.into()))
    }
}

/// Sets the node and port GUID of VF `vf` of HCA `name` (mlx5).
pub fn set_guids(root: &Path, name: &str, vf: u32, node: &str, port: &str) -> Result<(), IbError> {
    let node = parse_guid(node)?;
    let port = parse_guid(port)?;
    let h = need(root, name)?;
    let dir = vf_dir(root, &h, vf)?;
    if let Some(v) = h.vfs.get(vf as usize) {
        if v.driver.as_deref() == Some("vfio-pci") {
            // mlx5 applies GUIDs when the VF's driver loads; a VF a VM
            // holds would keep its old ones until the next FLR.
            tracing::info!(
                "{}: VF {vf} is bound to vfio-pci; the GUIDs apply at its next reset",
                h.name
            );
        }
    }
    for (file, what, v) in [("node", "node GUID", &node), ("port", "port GUID", &port)] {
        std::fs::write(dir.join(file), v).map_err(|source| IbError::Write {
            hca: h.name.clone(),
            vf,
            what,
            source,
        })?;
    }
    Ok(())
}

/// Sets the link policy of VF `vf`: "Up", "Down" or "Follow" (the PF's port).
pub fn set_policy(root: &Path, name: &str, vf: u32, policy: &str) -> Result<(), IbError> {
    let policy = match policy.to_ascii_lowercase().as_str() {
        "up" => "Up",
        "down" => "Down",
        "follow" => "Follow",
        _ => return Err(IbError::BadPolicy(policy.into())),
    };
    let h = need(root, name)?;
    let dir = vf_dir(root, &h, vf)?;
    std::fs::write(dir.join("policy"), policy).map_err(|source| IbError::Write {
        hca: h.name.clone(),
        vf,
        what: "policy",
        source,
    })
}

/// What keeps HCA `name` from giving VMs working VFs: one line each.
pub fn problems(root: &Path, name: &str) -> Result<Vec<String>, IbError> {
    let mut p = Vec::new();
    if !sysfs::has_iommu(root) {
        p.push(
            "the host has no IOMMU groups: boot with intel_iommu=on or amd_iommu=on (and iommu=pt)"
                .into(),
        );
    }
    let h = match need(root, name) {
        Ok(h) => h,
        // The host-wide pieces are still worth knowing about.
        Err(e) => {
            p.push(e.to_string());
            if !root.join("sys/bus/pci/drivers/vfio-pci").exists() {
                p.push("vfio-pci is not loaded: modprobe vfio-pci".into());
            }
            return Ok(p);
        }
    };
    match &h.sriov {
        None => p.push(format!(
            "{}: no SR-IOV (sriov_totalvfs missing): enable SR-IOV in the HCA firmware (mlxconfig SRIOV_EN=1 NUM_OF_VFS=N) and the BIOS",
            h.name
        )),
        Some(s) if s.num_vfs == 0 => p.push(format!(
            "{}: no VFs yet: `ffmk-vmm ib create-vfs {} N` (up to {})",
            h.name, h.name, s.total_vfs
        )),
        Some(_) => {}
    }
    if !root.join("sys/bus/pci/drivers/vfio-pci").exists() {
        p.push("vfio-pci is not loaded: modprobe vfio-pci".into());
    }
    for port in &h.ports {
        if port.state != "ACTIVE" {
            p.push(format!(
                "{} port {}: state {} (physical: {}): check the cable and the switch",
                h.name, port.number, port.state, port.phys_state
            ));
        } else if port.link_layer == "InfiniBand" && port.lid == 0 {
            p.push(format!(
                "{} port {}: no LID: is a subnet manager running (opensm)?",
                h.name, port.number
            ));
        }
    }
    for vf in &h.vfs {
        if vf
            .node_guid
            .as_deref()
            .is_some_and(|g| g.trim_start_matches(['0', ':']).is_empty())
        {
            p.push(format!(
                "{} VF {}: node GUID is zero: set one with `ffmk-vmm ib set-guid`",
                h.name, vf.index
            ));
        }
    }
    Ok(p)
}

#[cfg(test)]
pub(crate) mod tree {
    //! A sysfs tree laid out like a host with one ConnectX-6 (mlx5) PF with
    //! SR-IOV, as the kernel ABI documents it.
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    pub fn put(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn link(root: &Path, rel: &str, target: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        symlink(target, p).unwrap();
    }

    pub fn pci_function(root: &Path, addr: &str, device: &str, driver: Option<&str>, group: u32) {
        let d = format!("sys/devices/pci0000:3a/0000:3a:00.0/{addr}");
        put(root, &format!("{d}/vendor"), "0x15b3\n");
        put(root, &format!("{d}/device"), &format!("{device}\n"));
        put(root, &format!("{d}/driver_override"), "(null)\n");
        link(
            root,
            &format!("sys/bus/pci/devices/{addr}"),
            &format!("../../../devices/pci0000:3a/0000:3a:00.0/{addr}"),
        );
        if let Some(drv) = driver {
            std::fs::create_dir_all(root.join(format!("sys/bus/pci/drivers/{drv}"))).unwrap();
            link(
                root,
                &format!("{d}/driver"),
                &format!("../../../../bus/pci/drivers/{drv}"),
            );
        }
        link(
            root,
            &format!("{d}/iommu_group"),
            &format!("../../../../kernel/iommu_groups/{group}"),
        );
        link(
            root,
            &format!("sys/kernel/iommu_groups/{group}/devices/{addr}"),
            &format!("../../../../devices/pci0000:3a/0000:3a:00.0/{addr}"),
        );
    }

    /// One HCA `mlx5_0` on 0000:3b:00.0 with `vfs` VFs (of 8), port 1
    /// active with LID 0x11.
    pub fn mlx5_host(vfs: u32) -> (tempdir::Dir, PathBuf) {
        let t = tempdir::Dir::new();
        let root = t.path().to_path_buf();
        pci_function(&root, "0000:3b:00.0", "0x101b", Some("mlx5_core"), 20);
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let pf = "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0";
        put(&root, &format!("{pf}/sriov_totalvfs"), "8\n");
        put(&root, &format!("{pf}/sriov_numvfs"), &format!("{vfs}\n"));
        for i in 0..vfs {
            let addr = format!("0000:3b:00.{}", i + 1);
            pci_function(&root, &addr, "0x101c", Some("mlx5_core"), 21 + i);
            link(&root, &format!("{pf}/virtfn{i}"), &format!("../{addr}"));
            put(
                &root,
                &format!("{pf}/sriov/{i}/node"),
                "00:00:00:00:00:00:00:00\n",
            );
            put(
                &root,
                &format!("{pf}/sriov/{i}/port"),
                "00:00:00:00:00:00:00:00\n",
            );
            put(&root, &format!("{pf}/sriov/{i}/policy"), "Down\n");
        }
        let ib = format!("{pf}/infiniband/mlx5_0");
        link(
            &root,
            "sys/class/infiniband/mlx5_0",
            "../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0",
        );
        link(&root, &format!("{ib}/device"), "../../../0000:3b:00.0");
        put(&root, &format!("{ib}/node_guid"), "b859:9f03:00d4:1a20\n");
        put(&root, &format!("{ib}/fw_ver"), "20.31.1014\n");
        let p = format!("{ib}/ports/1");
        put(&root, &format!("{p}/state"), "4: ACTIVE\n");
        put(&root, &format!("{p}/phys_state"), "5: LinkUp\n");
        put(&root, &format!("{p}/lid"), "0x11\n");
        put(&root, &format!("{p}/sm_lid"), "0x1\n");
        put(&root, &format!("{p}/rate"), "200 Gb/sec (4X HDR)\n");
        put(&root, &format!("{p}/link_layer"), "InfiniBand\n");
        put(
            &root,
            &format!("{p}/gids/0"),
            "fe80:0000:0000:0000:b859:9f03:00d4:1a20\n",
        );
        put(&root, &format!("{p}/pkeys/0"), "0xffff\n");
        put(&root, &format!("{p}/pkeys/1"), "0x0000\n");
        put(&root, &format!("{p}/pkeys/2"), "0x8001\n");
        put(&root, "sys/bus/pci/drivers_probe", "");
        (t, root)
    }

    /// A temporary directory removed on drop (no extra crate for it).
    pub mod tempdir {
        use std::path::{Path, PathBuf};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vfio-ib-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tree::*;
    use super::*;

    #[test]
    fn lists_an_mlx5_hca_with_ports_and_vfs() {
        let (_t, root) = mlx5_host(2);
        let hcas = list(&root);
        assert_eq!(hcas.len(), 1);
        let h = &hcas[0];
        assert_eq!(h.name, "mlx5_0");
        assert_eq!(h.address.as_ref().unwrap().to_string(), "0000:3b:00.0");
        assert_eq!(h.driver.as_deref(), Some("mlx5_core"));
        assert_eq!(h.fw_ver, "20.31.1014");
        assert_eq!(h.ports.len(), 1);
        let p = &h.ports[0];
        assert_eq!((p.state.as_str(), p.lid, p.sm_lid), ("ACTIVE", 0x11, 1));
        assert_eq!(p.pkeys, vec!["0xffff", "0x8001"], "zero pkeys are left out");
        assert_eq!(h.sriov.as_ref().unwrap().total_vfs, 8);
        assert_eq!(h.vfs.len(), 2);
        assert_eq!(h.vfs[1].address.to_string(), "0000:3b:00.2");
        assert_eq!(h.vfs[1].policy.as_deref(), Some("Down"));
    }

    #[test]
    fn guids_and_policy_are_checked_then_written() {
        let (_t, root) = mlx5_host(2);
        set_guids(
            &root,
            "mlx5_0",
            1,
            "02:00:00:00:00:00:00:01",
            "02:00:00:00:00:00:01:01",
        )
        .unwrap();
        set_policy(&root, "mlx5_0", 1, "follow").unwrap();
        let h = hca(&root, "mlx5_0").unwrap();
        assert_eq!(
            h.vfs[1].node_guid.as_deref(),
            Some("02:00:00:00:00:00:00:01")
        );
        assert_eq!(
            h.vfs[1].port_guid.as_deref(),
            Some("02:00:00:00:00:00:01:01")
        );
        assert_eq!(h.vfs[1].policy.as_deref(), Some("Follow"));
        let e = set_guids(&root, "mlx5_0", 1, "02:00", "02:00:00:00:00:00:01:01").unwrap_err();
        assert!(e.to_string().contains("not a GUID"), "{e}");
        let e = set_guids(
            &root,
            "mlx5_0",
            5,
            "02:00:00:00:00:00:00:01",
            "02:00:00:00:00:00:00:01",
        )
        .unwrap_err();
        assert!(e.to_string().contains("has 2 VFs; there is no VF 5"), "{e}");
        let e = set_policy(&root, "mlx5_0", 0, "sideways").unwrap_err();
        assert!(e.to_string().contains("not a VF policy"), "{e}");
        let e = set_policy(&root, "mlx5_9", 0, "up").unwrap_err();
        assert!(e.to_string().contains("this host has mlx5_0"), "{e}");
    }

    #[test]
    fn problems_name_each_missing_piece_in_one_line() {
        let (_t, root) = mlx5_host(0);
        let p = problems(&root, "mlx5_0").unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no VFs yet"), "{p:?}");
        // Port down, no IOMMU, no vfio-pci, zero GUIDs.
        let (_t, root) = mlx5_host(1);
        let port = "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0/ports/1";
        put(&root, &format!("{port}/state"), "1: DOWN\n");
        put(&root, &format!("{port}/phys_state"), "3: Disabled\n");
        std::fs::remove_dir_all(root.join("sys/kernel/iommu_groups")).unwrap();
        std::fs::remove_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let p = problems(&root, "mlx5_0").unwrap();
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].contains("no IOMMU groups"));
        assert!(p[1].contains("vfio-pci is not loaded"));
        assert!(p[2].contains("state DOWN (physical: Disabled)"));
        assert!(p[3].contains("node GUID is zero"));
        // No subnet manager: active but no LID.
        let (_t, root) = mlx5_host(0);
        let port = "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0/ports/1";
        put(&root, &format!("{port}/lid"), "0x0\n");
        let p = problems(&root, "mlx5_0").unwrap();
        assert!(p.iter().any(|l| l.contains("subnet manager")), "{p:?}");
    }

    #[test]
    fn create_vfs_refuses_what_the_kernel_would() {
        let (_t, root) = mlx5_host(2);
        let e = create_vfs(&root, "mlx5_0", 9).unwrap_err();
        assert!(e.to_string().contains("at most 8 VFs"), "{e}");
        // A VF in use by a VM blocks changing the count.
        link(
            &root,
            "sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.1/driver",
            "../../../../bus/pci/drivers/vfio-pci",
        );
        let e = create_vfs(&root, "mlx5_0", 4).unwrap_err();
        assert!(
            e.to_string().contains("0000:3b:00.1 is bound to vfio-pci"),
            "{e}"
        );
        // Same count: nothing to do.
        create_vfs(&root, "mlx5_0", 2).unwrap();
    }
}
