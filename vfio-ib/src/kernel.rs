//! Kernel VFIO: a host PCI function bound to `vfio-pci`, opened through its
//! IOMMU group and a type1 container (vfio-ioctls), with all of guest RAM
//! mapped for DMA at IOVA = guest-physical address.
//!
//! One [`Iommu`] (container) serves every passthrough function of a VM, so
//! guest memory is pinned and mapped once. Before anything is opened,
//! [`preflight`] checks what an operator can get wrong (no IOMMU, wrong
//! driver, a group shared with devices still on host drivers) and says so
//! in one line.
use crate::backend::{Backend, Mapping, RegionInfo};
use crate::sysfs::HostError;
use crate::sysfs::{self, HostDevice, PciAddress};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vfio_bindings::bindings::vfio as uapi;
use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Preflight(#[from] crate::sysfs::HostError),
    #[error("the IOMMU mappings' lock is poisoned")]
    Poisoned,
    #[error("a guest RAM region of {0} bytes is too large to map")]
    RegionTooLarge(u64),
    #[error("{what}: {source}")]
    Vfio {
        what: String,
        source: vfio_ioctls::VfioError,
    },
    #[error("the IOMMU's dirty page tracking: cannot {what}: {source}")]
    DirtyPages {
        what: &'static str,
        source: io::Error,
    },
    #[error("DMA map of guest memory {gpa:#x}+{len:#x} failed: {source} (is the locked-memory limit, ulimit -l, large enough for all of guest RAM?)")]
    DmaMap {
        gpa: u64,
        len: u64,
        source: vfio_ioctls::VfioError,
    },
}

impl Error {
    /// Errors an operator fixes on the host (binding, IOMMU, limits).
    pub fn is_user_error(&self) -> bool {
        matches!(self, Error::Preflight(_) | Error::DmaMap { .. })
    }
}

/// Checks that `address` can be passed through: it exists, is bound to
/// vfio-pci, has an IOMMU group whose other members are bound to vfio-pci
/// (or to nothing), and the group's device node exists. Returns the group.
pub fn preflight(root: &Path, address: &PciAddress) -> Result<u32, HostError> {
    let dev = sysfs::device_dir(root, address);
    if !dev.exists() {
        return Err(HostError::Missing {
            address: address.clone(),
            dir: dev,
        });
    }
    let driver = sysfs::driver(root, address);
    if driver.as_deref() != Some("vfio-pci") {
        return Err(HostError::WrongDriver {
            address: address.clone(),
            driver: driver.as_deref().unwrap_or("no driver").into(),
        });
    }
    let group =
        sysfs::iommu_group(root, address).ok_or_else(|| HostError::NoGroup(address.clone()))?;
    for other in sysfs::group_members(root, group) {
        if other == *address {
            continue;
        }
        match sysfs::driver(root, &other).as_deref() {
            None | Some("vfio-pci") | Some("pcieport") => {}
            Some(d) => {
                return Err(HostError::GroupShared {
                    group,
                    address: address.clone(),
                    other,
                    driver: d.into(),
                })
            }
        }
    }
    vfio_nodes(root, group)?;
    Ok(group)
}

/// [`preflight`] for any device kernel VFIO serves: a PCI function, or a
/// mediated device (it exists and has an IOMMU group of its own).
pub fn preflight_device(root: &Path, device: &HostDevice) -> Result<u32, HostError> {
    match device {
        HostDevice::Pci(a) => preflight(root, a),
        HostDevice::Mdev(uuid) => {
            if !device.sysfs_dir(root).exists() {
                return Err(HostError::NoMdev(uuid.clone()));
            }
            let group = device
                .iommu_group(root)
                .ok_or_else(|| HostError::MdevNoGroup(uuid.clone()))?;
            vfio_nodes(root, group)?;
            Ok(group)
        }
    }
}

fn vfio_nodes(root: &Path, group: u32) -> Result<(), HostError> {
    let container = root.join("dev/vfio/vfio");
    if !container.exists() {
        return Err(HostError::NoVfioNode(container));
    }
    let node = root.join("dev/vfio").join(group.to_string());
    if !node.exists() {
        return Err(HostError::NoVfioNode(node));
    }
    Ok(())
}

/// The page size of dirty bitmaps (the smallest the type1 IOMMU tracks
/// on x86).
pub const DIRTY_PAGE: u64 = 4096;

/// Guest RAM as the IOMMU sees it: (guest-physical address, host address, length).
pub type MemoryMap = Vec<(u64, u64, u64)>;

/// The VM's VFIO container: one IOMMU domain for all its functions.
pub struct Iommu {
    container: Arc<VfioContainer>,
    memory: MemoryMap,
    /// IOVA ranges mapped so far (mapped when the first group joined).
    mapped: Mutex<Vec<(u64, u64)>>,
}

impl Iommu {
    /// Opens `/dev/vfio/vfio`. `kvm_vfio` is KVM's VFIO pseudo-device, so
    /// KVM knows about non-coherent DMA; `memory` is all of guest RAM.
    pub fn open(kvm_vfio: Option<VfioDeviceFd>, memory: MemoryMap) -> Result<Iommu, Error> {
        let container =
            VfioContainer::new(kvm_vfio.map(Arc::new)).map_err(|source| Error::Vfio {
                what: "cannot open the VFIO container /dev/vfio/vfio".into(),
                source,
            })?;
        Ok(Iommu {
            container: Arc::new(container),
            memory,
            mapped: Mutex::new(Vec::new()),
        })
    }

    /// Opens `address` (checked by [`preflight_device`] first) and maps
    /// guest RAM for DMA if no function did yet.
    pub fn attach(&self, address: &HostDevice) -> Result<KernelDevice, Error> {
        preflight_device(Path::new("/"), address)?;
        let path = address.sysfs_dir(Path::new("/"));
        let device = VfioDevice::new(&path, self.container.clone(), false).map_err(|source| {
            Error::Vfio {
                what: format!("cannot open {address} through VFIO"),
                source,
            }
        })?;
        self.map_memory()?;
        // A known state before the guest sees it.
        device.reset();
        Ok(KernelDevice {
            address: address.clone(),
            path,
            device,
        })
    }

    fn map_memory(&self) -> Result<(), Error> {
        let mut mapped = self.mapped.lock().map_err(|_| Error::Poisoned)?;
        if !mapped.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        for &(gpa, host, len) in &self.memory {
            let size = usize::try_from(len).map_err(|_| Error::RegionTooLarge(len))?;
            // SAFETY: `host..host+len` is guest RAM, mapped for the VM's
            // whole life and only ever accessed through volatile accesses
            // (vm-memory) or by the guest; the device may DMA into it as the
            // guest does. It is unmapped in Drop, before the memory goes.
            let r = unsafe { self.container.vfio_dma_map(gpa, size, host as *mut u8) };
            if let Err(source) = r {
                for &(iova, len) in mapped.iter() {
                    let _ = self.container.vfio_dma_unmap(iova, len as usize);
                }
                mapped.clear();
                return Err(Error::DmaMap { gpa, len, source });
            }
            mapped.push((gpa, len));
        }
        tracing::info!(
            "DMA map of {} MiB of guest RAM took {} ms",
            mapped.iter().map(|m| m.1).sum::<u64>() >> 20,
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Bytes of guest memory mapped for DMA.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped
            .lock()
            .map(|m| m.iter().map(|r| r.1).sum())
            .unwrap_or(0)
    }

    /// Starts the type1 IOMMU's dirty page tracking over every DMA
    /// mapping (`VFIO_IOMMU_DIRTY_PAGES`). What it reports is precise for
    /// mediated devices, whose DMA goes through the kernel (pinned pages
    /// and `vfio_dma_rw` writes); while any function behind a real IOMMU
    /// is in the container, it reports every mapped page.
    pub fn start_dirty_tracking(&self) -> Result<(), Error> {
        self.dirty_pages_ioctl(uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_START, None)
            .map_err(|source| Error::DirtyPages {
                what: "start",
                source,
            })
    }

    /// Stops it (the kernel drops its bitmaps).
    pub fn stop_dirty_tracking(&self) {
        if let Err(e) = self.dirty_pages_ioctl(uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, None) {
            tracing::warn!("the IOMMU's dirty page tracking: cannot stop: {e}");
        }
    }

    /// Pages written through the IOMMU since the last call (or the start):
    /// per DMA mapping, (guest-physical address, length, bitmap words with
    /// one bit per [`DIRTY_PAGE`], bit i of word i/64 for page i).
    pub fn dirty_pages(&self) -> Result<Vec<(u64, u64, Vec<u64>)>, Error> {
        let mapped = self.mapped.lock().map_err(|_| Error::Poisoned)?.clone();
        let mut out = Vec::with_capacity(mapped.len());
        for (iova, len) in mapped {
            let mut words = vec![0u64; (len / DIRTY_PAGE).div_ceil(64) as usize];
            self.dirty_pages_ioctl(
                uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                Some((iova, len, &mut words)),
            )
            .map_err(|source| Error::DirtyPages {
                what: "read the bitmap",
                source,
            })?;
            out.push((iova, len, words));
        }
        Ok(out)
    }

    fn dirty_pages_ioctl(
        &self,
        flags: u32,
        range: Option<(u64, u64, &mut [u64])>,
    ) -> io::Result<()> {
        vmm_sys_util::ioctl_io_nr!(
            VFIO_IOMMU_DIRTY_PAGES,
            uapi::VFIO_TYPE as u32,
            uapi::VFIO_BASE + 17
        );
        /// The ioctl's argument: the header, then (GET_BITMAP) one range.
        #[repr(C)]
        struct Arg {
            argsz: u32,
            flags: u32,
            range: uapi::vfio_iommu_type1_dirty_bitmap_get,
        }
        let mut arg = Arg {
            argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dirty_bitmap>() as u32,
            flags,
            range: uapi::vfio_iommu_type1_dirty_bitmap_get::default(),
        };
        if let Some((iova, size, words)) = range {
            arg.argsz = std::mem::size_of::<Arg>() as u32;
            arg.range.iova = iova;
            arg.range.size = size;
            arg.range.bitmap.pgsize = DIRTY_PAGE;
            arg.range.bitmap.size = (words.len() * 8) as u64;
            arg.range.bitmap.data = words.as_mut_ptr();
        }
        // SAFETY: `arg` is the uapi's layout (the header, then one range
        // for GET_BITMAP, as argsz says); the kernel writes at most
        // `bitmap.size` bytes to `bitmap.data`, which is `words`, alive
        // and exclusively borrowed for the call.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                self.container.as_ref(),
                VFIO_IOMMU_DIRTY_PAGES(),
                &mut arg,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes guest RAM out of the IOMMU domain: no device DMA reaches it
    /// after this. Call while the groups are still in the container (once
    /// the last one leaves, the kernel drops the mappings itself).
    pub fn unmap_all(&self) {
        if let Ok(mut mapped) = self.mapped.lock() {
            for &(iova, len) in mapped.iter() {
                if let Err(e) = self.container.vfio_dma_unmap(iova, len as usize) {
                    tracing::warn!("DMA unmap of {iova:#x}+{len:#x}: {e}");
                }
            }
            mapped.clear();
        }
    }
}

/// A host function opened through VFIO.
pub struct KernelDevice {
    address: HostDevice,
    path: PathBuf,
    device: VfioDevice,
}

impl KernelDevice {
    pub fn address(&self) -> &HostDevice {
        &self.address
    }

    pub fn sysfs_path(&self) -> &Path {
        &self.path
    }

    /// Its migration interface, or why it has none (VFIO migration v2 with
    /// at least STOP_COPY).
    pub fn migration(&self) -> Result<crate::migration::Migratable<'_>, crate::migration::Error> {
        crate::migration::Migratable::new(&self.device, &self.address.to_string())
    }
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        // Nothing the device does after this reaches a guest: its
        // interrupts lose their eventfds and a reset stops its DMA (the
        // IOMMU mappings go with the container).
        for index in [
            crate::backend::IRQ_MSIX,
            crate::backend::IRQ_MSI,
            crate::backend::IRQ_INTX,
        ] {
            if self.irq_count(index) > 0 {
                let _ = self.device.disable_irq(index);
            }
        }
        if crate::migration::support(&self.device).is_some() {
            // Also out of any migration state (a destination whose load
            // failed leaves it in RESUMING), whatever its flags announce.
            crate::migration::reset(&self.device);
        } else {
            self.device.reset();
        }
    }
}

fn io_err(what: &str, e: vfio_ioctls::VfioError) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Backend for KernelDevice {
    fn describe(&self) -> String {
        format!("vfio {}", self.address)
    }

    fn region(&self, index: u32) -> Option<RegionInfo> {
        let size = self.device.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.device.get_region_flags(index);
        let mut mappable = Vec::new();
        if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            let caps = self.device.get_region_caps(index);
            let sparse = caps.iter().find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.clone()),
                _ => None,
            });
            match sparse {
                Some(areas) => mappable.extend(areas.iter().map(|a| (a.offset, a.size))),
                None => mappable.push((0, size)),
            }
        }
        Some(RegionInfo {
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mappable,
        })
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.device.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn map(&self, index: u32, offset: u64, len: u64) -> io::Result<Mapping> {
        let base = self.device.get_region_offset(index);
        Mapping::new(self.device.as_raw_fd(), base + offset, len)
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(index, fds.to_vec())
            .map_err(|e| io_err("enable interrupts", e))
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        self.device
            .disable_irq(index)
            .map_err(|e| io_err("disable interrupts", e))
    }

    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(crate::backend::IRQ_INTX, vec![fd])
            .map_err(|e| io_err("INTx unmask eventfd", e))
    }

    fn unmask_intx(&self) {
        if let Err(e) = self.device.unmask_irq(crate::backend::IRQ_INTX) {
            tracing::warn!("{}: INTx unmask: {e}", self.address);
        }
    }

    fn reset(&self) {
        self.device.reset();
    }

    fn migration(&self) -> Option<crate::migration::Migratable<'_>> {
        KernelDevice::migration(self).ok()
    }
}
