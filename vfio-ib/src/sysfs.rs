//! Host PCI functions through sysfs: addresses, drivers, IOMMU groups,
//! binding to vfio-pci and back, SR-IOV virtual functions.
//!
//! Every function takes the root directory the tree hangs from (`/` on a
//! host; a directory laid out like one in the tests), so the logic runs
//! against real kernels and against a captured or synthetic tree alike.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A PCI address `DDDD:BB:DD.F` (the domain may be left out: 0000).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl From<PciAddress> for String {
    fn from(a: PciAddress) -> String {
        a.to_string()
    }
}

impl<'de> serde::Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;

    /// `0000:3b:00.2`, `3b:00.2`, or a sysfs path ending in one.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a PCI address (DDDD:BB:DD.F, e.g. 0000:3b:00.2)");
        let name = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
        let (rest, function) = name.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0", *b, *dev),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max: u32| {
            u32::from_str_radix(t, 16)
                .ok()
                .filter(|v| *v <= max && !t.is_empty() && t.len() <= 4)
                .ok_or_else(bad)
        };
        Ok(PciAddress {
            domain: hex(domain, 0xffff)? as u16,
            bus: hex(bus, 0xff)? as u8,
            device: hex(device, 0x1f)? as u8,
            function: hex(function, 7)? as u8,
        })
    }
}

/// A device kernel VFIO can hand to a VM: a host PCI function bound to
/// vfio-pci, or a mediated device (mdev: a virtual function a host driver
/// such as `mtty` or a vGPU driver serves), named by its sysfs directory
/// `/sys/bus/mdev/devices/UUID`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub enum HostDevice {
    Pci(PciAddress),
    Mdev(String),
}

impl HostDevice {
    /// Its directory in sysfs (under `root`).
    pub fn sysfs_dir(&self, root: &Path) -> PathBuf {
        match self {
            HostDevice::Pci(a) => device_dir(root, a),
            HostDevice::Mdev(uuid) => root.join(MDEV_DEVICES).join(uuid),
        }
    }

    /// Its IOMMU group (every mdev has one of its own).
    pub fn iommu_group(&self, root: &Path) -> Option<u32> {
        link_name(&self.sysfs_dir(root).join("iommu_group"))?
            .parse()
            .ok()
    }
}

const MDEV_DEVICES: &str = "sys/bus/mdev/devices";

/// `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl fmt::Display for HostDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostDevice::Pci(a) => a.fmt(f),
            HostDevice::Mdev(uuid) => write!(f, "/{MDEV_DEVICES}/{uuid}"),
        }
    }
}

impl From<HostDevice> for String {
    fn from(d: HostDevice) -> String {
        d.to_string()
    }
}

impl FromStr for HostDevice {
    type Err = String;

    /// A PCI address (`0000:3b:00.2`, or a sysfs path ending in one), or
    /// an mdev's sysfs path (`/sys/bus/mdev/devices/UUID`).
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
        if is_uuid(name) {
            if !s.contains('/') {
                return Err(format!(
                    "'{s}' looks like an mdev's UUID: name it by its sysfs path, /{MDEV_DEVICES}/{s}"
                ));
            }
            return Ok(HostDevice::Mdev(name.to_ascii_lowercase()));
        }
        s.parse()
            .map(HostDevice::Pci)
            .map_err(|e| format!("{e}, or an mdev's sysfs path (/{MDEV_DEVICES}/UUID)"))
    }
}

impl<'de> serde::Deserialize<'de> for HostDevice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn device_dir(root: &Path, a: &PciAddress) -> PathBuf {
    root.join("sys/bus/pci/devices").join(a.to_string())
}

fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_hex(path: &Path) -> Option<u32> {
    let s = read_trimmed(path)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The driver a function is bound to.
pub fn driver(root: &Path, a: &PciAddress) -> Option<String> {
    link_name(&device_dir(root, a).join("driver"))
}

pub fn iommu_group(root: &Path, a: &PciAddress) -> Option<u32> {
    link_name(&device_dir(root, a).join("iommu_group"))?
        .parse()
        .ok()
}

/// The PCI addresses named by the entries of `dir`, sorted.
fn addresses_in(dir: &Path) -> Vec<PciAddress> {
    let mut v: Vec<PciAddress> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

/// Every PCI function of the host.
pub fn functions(root: &Path) -> Vec<PciAddress> {
    addresses_in(&root.join("sys/bus/pci/devices"))
}

/// Every function in IOMMU group `group`.
pub fn group_members(root: &Path, group: u32) -> Vec<PciAddress> {
    addresses_in(&root.join(format!("sys/kernel/iommu_groups/{group}/devices")))
}

/// Vendor and device ID.
pub fn ids(root: &Path, a: &PciAddress) -> Option<(u16, u16)> {
    let d = device_dir(root, a);
    Some((
        read_hex(&d.join("vendor"))? as u16,
        read_hex(&d.join("device"))? as u16,
    ))
}

/// Whether the host has an IOMMU in use (any group exists).
pub fn has_iommu(root: &Path) -> bool {
    std::fs::read_dir(root.join("sys/kernel/iommu_groups"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Why a host PCI function cannot be changed or passed through as asked
/// (one line each, saying what to do about it).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no PCI device {0} on this host")]
    NoDevice(PciAddress),
    #[error("no PCI device {address} on this host ({} does not exist)", dir.display())]
    Missing { address: PciAddress, dir: PathBuf },
    #[error(
        "cannot bind {0} to vfio-pci: the host has no IOMMU groups (boot with intel_iommu=on or \
         amd_iommu=on, iommu=pt)"
    )]
    NoIommuGroups(PciAddress),
    #[error("the vfio-pci driver is not loaded: modprobe vfio-pci")]
    NoVfioDriver,
    #[error("{address} did not bind to vfio-pci (driver now: {now})")]
    DidNotBind { address: PciAddress, now: String },
    #[error("{0} is not bound to vfio-pci")]
    NotBound(PciAddress),
    #[error(
        "{address} is bound to {driver}, not vfio-pci: run `ffmk-vmm vfio bind {address}` first"
    )]
    WrongDriver { address: PciAddress, driver: String },
    #[error(
        "{0} has no IOMMU group: the host runs without an IOMMU (boot with intel_iommu=on or \
         amd_iommu=on, and iommu=pt)"
    )]
    NoGroup(PciAddress),
    #[error(
        "IOMMU group {group} of {address} also holds {other}, bound to {driver}: bind every \
         member to vfio-pci (or unbind it) first"
    )]
    GroupShared {
        group: u32,
        address: PciAddress,
        other: PciAddress,
        driver: String,
    },
    #[error("{} does not exist: is the vfio-pci module loaded?", .0.display())]
    NoVfioNode(PathBuf),
    #[error("no mediated device {0} on this host (is its driver loaded and the device created?)")]
    NoMdev(String),
    #[error("mediated device {0} has no IOMMU group (is the module mdev loaded?)")]
    MdevNoGroup(String),
    #[error(
        "{0} has no SR-IOV capability (no sriov_totalvfs): is SR-IOV enabled in the firmware?"
    )]
    NoSriov(PciAddress),
    #[error("{pf} supports at most {max} VFs, asked for {asked}")]
    TooManyVfs {
        pf: PciAddress,
        max: u32,
        asked: u32,
    },
    #[error("cannot change the VF count of {pf}: VF {vf} is bound to vfio-pci (in use by a VM?)")]
    VfInUse { pf: PciAddress, vf: PciAddress },
    #[error("cannot write '{value}' to {}: {source}", path.display())]
    Write {
        value: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn write(path: &Path, value: &str) -> Result<(), HostError> {
    std::fs::write(path, value).map_err(|source| HostError::Write {
        value: value.into(),
        path: path.into(),
        source,
    })
}

/// Binds `a` to vfio-pci: `driver_override`, unbind from its driver,
/// `drivers_probe`. Refused when the function is in use by the host in a
/// way that would break it (its group has members on other drivers is
/// left to [`crate::kernel::preflight`], which names them).
pub fn bind_vfio(root: &Path, a: &PciAddress) -> Result<(), HostError> {
    let dev = device_dir(root, a);
    if !dev.exists() {
        return Err(HostError::NoDevice(a.clone()));
    }
    if !has_iommu(root) {
        return Err(HostError::NoIommuGroups(a.clone()));
    }
    if !root.join("sys/bus/pci/drivers/vfio-pci").exists() {
        return Err(HostError::NoVfioDriver);
    }
    match driver(root, a).as_deref() {
        Some("vfio-pci") => return Ok(()),
        Some(_) => write(&dev.join("driver/unbind"), &a.to_string())?,
        None => {}
    }
    write(&dev.join("driver_override"), "vfio-pci")?;
    write(&root.join("sys/bus/pci/drivers_probe"), &a.to_string())?;
    match driver(root, a).as_deref() {
        Some("vfio-pci") => Ok(()),
        other => Err(HostError::DidNotBind {
            address: a.clone(),
            now: other.unwrap_or("none").into(),
        }),
    }
}

/// Gives `a` back to the host: unbind from vfio-pci, clear the override,
/// let the kernel probe its own driver.
pub fn unbind_vfio(root: &Path, a: &PciAddress) -> Result<(), HostError> {
    let dev = device_dir(root, a);
    if driver(root, a).as_deref() != Some("vfio-pci") {
        return Err(HostError::NotBound(a.clone()));
    }
    write(&dev.join("driver/unbind"), &a.to_string())?;
    write(&dev.join("driver_override"), "\n")?;
    write(&root.join("sys/bus/pci/drivers_probe"), &a.to_string())
}

/// SR-IOV state of a physical function.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
    pub vfs: Vec<PciAddress>,
}

pub fn sriov(root: &Path, pf: &PciAddress) -> Option<Sriov> {
    let d = device_dir(root, pf);
    let total_vfs = read_trimmed(&d.join("sriov_totalvfs"))?.parse().ok()?;
    let num_vfs = read_trimmed(&d.join("sriov_numvfs"))?.parse().ok()?;
    let mut vfs: Vec<(u32, PciAddress)> = std::fs::read_dir(&d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let n: u32 = name.strip_prefix("virtfn")?.parse().ok()?;
            Some((n, link_name(&e.path())?.parse().ok()?))
        })
        .collect();
    vfs.sort();
    Some(Sriov {
        total_vfs,
        num_vfs,
        vfs: vfs.into_iter().map(|(_, a)| a).collect(),
    })
}

/// Sets the number of VFs of `pf` (through 0 when it already has some, as
/// the kernel requires).
pub fn create_vfs(root: &Path, pf: &PciAddress, n: u32) -> Result<(), HostError> {
    let s = sriov(root, pf).ok_or_else(|| HostError::NoSriov(pf.clone()))?;
    if n > s.total_vfs {
        return Err(HostError::TooManyVfs {
            pf: pf.clone(),
            max: s.total_vfs,
            asked: n,
        });
    }
    if s.num_vfs == n {
        return Ok(());
    }
    let path = device_dir(root, pf).join("sriov_numvfs");
    if s.num_vfs != 0 {
        for vf in &s.vfs {
            if driver(root, vf).as_deref() == Some("vfio-pci") {
                return Err(HostError::VfInUse {
                    pf: pf.clone(),
                    vf: vf.clone(),
                });
            }
        }
        write(&path, "0")?;
    }
    write(&path, &n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_devices_are_pci_functions_or_mdev_paths() {
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        let path = format!("/sys/bus/mdev/devices/{uuid}");
        let d: HostDevice = path.parse().unwrap();
        assert_eq!(d, HostDevice::Mdev(uuid.into()));
        assert_eq!(d.to_string(), path, "prints as it is given");
        assert_eq!(
            d.sysfs_dir(Path::new("/x")),
            Path::new("/x").join(&path[1..])
        );
        let upper: HostDevice = path
            .to_uppercase()
            .replace("/SYS/BUS/MDEV/DEVICES", "/sys/bus/mdev/devices")
            .parse()
            .unwrap();
        assert_eq!(upper, d, "UUIDs compare in lower case");
        let e = uuid.parse::<HostDevice>().unwrap_err();
        assert!(e.contains("sysfs path"), "{e}");
        let pci: HostDevice = "3b:00.2".parse().unwrap();
        assert_eq!(pci.to_string(), "0000:3b:00.2");
        let e = "nonsense".parse::<HostDevice>().unwrap_err();
        assert!(e.contains("not a PCI address") && e.contains("mdev"), "{e}");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<HostDevice>(&json).unwrap(), d);
    }

    #[test]
    fn pci_addresses_parse_and_print() {
        let a: PciAddress = "0000:3b:00.2".parse().unwrap();
        assert_eq!(a.to_string(), "0000:3b:00.2");
        assert_eq!("3b:00.2".parse::<PciAddress>().unwrap(), a);
        assert_eq!(
            "/sys/bus/pci/devices/0000:3b:00.2/"
                .parse::<PciAddress>()
                .unwrap(),
            a
        );
        for bad in [
            "",
            "3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "x:y:z.1",
            "00000:00:00.0",
            "0:0:0:0.0",
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(e.to_string().contains("not a PCI address"), "{bad}: {e}");
        }
    }
}
