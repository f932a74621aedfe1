//! Guest memory: anonymous (or hugetlbfs-backed) mappings with a dirty bitmap
//! that records the pages the VMM itself writes, and the VM's dirty
//! tracker over them ([`dirty`]: what snapshots and migration copy).
pub mod dirty;

use crate::arch::layout;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestRegionMmap, MmapRegion};

/// Guest memory as used everywhere in ffmk-vmm.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: usize = 4096;
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
const PAGE_NONZERO: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(PAGE_SIZE) {
    Some(n) => n,
    None => panic!("page size is not zero"),
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memory size must be at least {min} MiB (got {got} MiB)", min = MIN_MEMORY >> 20, got = .0 >> 20)]
    TooSmall(u64),
    #[error("with --hugepages the memory size must be a multiple of 2 MiB")]
    HugeAlignment,
    #[error("the host cannot give {mib} MiB of guest memory{hint}: {source}", mib = .size >> 20)]
    Map {
        size: u64,
        hint: &'static str,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the host cannot give {mib} MiB of guest memory: it has {host_mib} MiB of RAM", mib = .size >> 20, host_mib = .host >> 20)]
    HostTooSmall { size: u64, host: u64 },
    #[error("cannot build the guest memory map: {0}")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
}

pub const MIN_MEMORY: u64 = 16 << 20;

/// Maps `size` bytes of guest RAM at the addresses of [`layout::ram_regions`].
/// Memory is not reserved with MAP_NORESERVE, so a size the host cannot back
/// fails here, before the VM exists.
pub fn create(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, Error> {
    if size < MIN_MEMORY {
        return Err(Error::TooSmall(size));
    }
    if hugepages && size % HUGE_PAGE_SIZE != 0 {
        return Err(Error::HugeAlignment);
    }
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if hugepages {
        flags |= libc::MAP_HUGETLB;
    }
    let host = host_memory_bytes();
    if size > host {
        return Err(Error::HostTooSmall { size, host });
    }
    let hint = if hugepages {
        " as 2 MiB huge pages (see /proc/sys/vm/nr_hugepages)"
    } else {
        ""
    };
    let mut regions = Vec::new();
    for (addr, len) in layout::ram_regions(size) {
        let build = || {
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, PAGE_NONZERO))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
        };
        let region = if hugepages {
            build()
        } else {
            in_aligned_hole(len, build)
        }
        .map_err(|source| Error::Map { size, hint, source })?;
        if !hugepages && region.as_ptr() as u64 % HUGE_PAGE_SIZE != addr.0 % HUGE_PAGE_SIZE {
            tracing::debug!("guest RAM at {addr:#x?} is not 2 MiB-aligned in the VMM");
        }
        regions.push(GuestRegionMmap::new(region, addr).ok_or(Error::Map {
            size,
            hint: " (region does not fit the address space)",
            source: vm_memory::mmap::MmapRegionError::InvalidPointer,
        })?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Runs `map` (which maps `len` bytes wherever the kernel chooses) so that
/// the mapping most likely lands 2 MiB-aligned: then transparent huge
/// pages back guest-physical 2 MiB pages with host 2 MiB pages, which KVM
/// maps as huge pages in the guest's page tables and the IOMMU as 2 MiB
/// entries for passthrough DMA (pinning 1 GiB for a device took 2.7 s in
/// the lab unaligned, see docs/perf.md). vm-memory owns (and unmaps) the
/// mapping, so it cannot be given an address: instead a `len + 2 MiB`
/// reservation is made, an aligned hole of `len` is opened in it and
/// `map` runs, and the kernel's top-down search takes the highest gap that
/// fits, the hole just opened; the rest of the reservation is released.
/// Only a hint: wherever the mapping lands it is correct.
fn in_aligned_hole<T>(len: usize, map: impl FnOnce() -> T) -> T {
    let align = HUGE_PAGE_SIZE as usize;
    let total = len + align;
    // SAFETY: a fresh inaccessible reservation; no memory is touched.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return map();
    }
    let base = r as usize;
    let hole = base.next_multiple_of(align);
    // SAFETY: each munmap covers only parts of the reservation made above,
    // which nothing else uses: the hole, then the head and tail around it.
    unsafe { libc::munmap(hole as *mut libc::c_void, len) };
    let mapped = map();
    // SAFETY: as above (the head and tail of the reservation).
    unsafe {
        if hole > base {
            libc::munmap(base as *mut libc::c_void, hole - base);
        }
        let tail = hole + len;
        if base + total > tail {
            libc::munmap(tail as *mut libc::c_void, base + total - tail);
        }
    }
    mapped
}

/// Maps `size` bytes of guest RAM from a snapshot's full memory layer,
/// `MAP_PRIVATE`: pages are read from the file when the guest first touches
/// them and the guest's writes stay in this process, so restoring takes the
/// same time whatever the memory size, and the snapshot is never changed.
pub fn map_snapshot(size: u64, file: &std::path::Path) -> Result<GuestMemoryMmap, Error> {
    if size < MIN_MEMORY {
        return Err(Error::TooSmall(size));
    }
    let f = std::sync::Arc::new(std::fs::File::open(file).map_err(|e| Error::Map {
        size,
        hint: " from the snapshot's memory file",
        source: vm_memory::mmap::MmapRegionError::Mmap(e),
    })?);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout::ram_regions(size) {
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, PAGE_NONZERO))
            .with_file_offset(vm_memory::FileOffset::from_arc(f.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE)
            .build()
            .map_err(|source| Error::Map {
                size,
                hint: " from the snapshot's memory file",
                source,
            })?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(Error::Map {
            size,
            hint: " (region does not fit the address space)",
            source: vm_memory::mmap::MmapRegionError::InvalidPointer,
        })?);
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Physical memory of the host (the most a guest could ever be given).
fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page as u64)
}

/// The pages of a region the VMM itself wrote (device DMA, boot loading).
pub fn vmm_written(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let r: &MmapRegion<AtomicBitmap> = region;
    r.bitmap()
}

/// Host address of a region, for `KVM_SET_USER_MEMORY_REGION`.
pub fn host_addr(region: &GuestRegionMmap<AtomicBitmap>) -> u64 {
    let r: &MmapRegion<AtomicBitmap> = region;
    r.as_ptr() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn creates_regions_and_tracks_vmm_writes() {
        let mem = create(64 << 20, false).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x5000))
            .unwrap();
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        use vm_memory::bitmap::Bitmap;
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x9000));
    }

    #[test]
    fn refuses_bad_sizes() {
        assert!(matches!(create(1 << 20, false), Err(Error::TooSmall(_))));
        assert!(matches!(
            create((64 << 20) + 4096, true),
            Err(Error::HugeAlignment)
        ));
        let msg = create(1 << 50, false).unwrap_err().to_string();
        assert!(msg.contains("cannot give"), "{msg}");
    }
}
