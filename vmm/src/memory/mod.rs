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
    #[error("with --hugepages={0} the memory size must be a multiple of {size}", size = .0.label())]
    HugeAlignment(HugePages),
    #[error("this host has no {size} huge pages ({dir} does not exist)", size = .0.label(), dir = .0.sysfs())]
    NoSuchHugePages(HugePages),
    #[error(
        "the host has {free} free {size} huge pages and the guest's {mib} MiB need {need}: \
         reserve them first (echo {enough} > {dir}/nr_hugepages)",
        size = .pages.label(), dir = .pages.sysfs(), mib = (.need * .pages.bytes()) >> 20,
        enough = .total + .need - .free
    )]
    TooFewHugePages {
        pages: HugePages,
        need: u64,
        free: u64,
        /// The pool's size now.
        total: u64,
    },
    #[error("cannot fault in guest memory at {addr:#x}: {source}")]
    Prefault { addr: u64, source: std::io::Error },
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
    #[error(transparent)]
    Numa(#[from] numa::host::Error),
}

pub const MIN_MEMORY: u64 = 16 << 20;

/// What backs guest RAM: the host's base pages (with transparent huge
/// pages where the kernel gives them), or hugetlb pages of 2 MiB or 1 GiB
/// reserved by the operator (`--hugepages[=1G]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    #[default]
    Off,
    Size2M,
    Size1G,
}

impl HugePages {
    pub fn is_on(self) -> bool {
        self != HugePages::Off
    }

    /// The huge page size in bytes (the base page size when off).
    pub fn bytes(self) -> u64 {
        match self {
            HugePages::Off => PAGE_SIZE as u64,
            HugePages::Size2M => HUGE_PAGE_SIZE,
            HugePages::Size1G => 1 << 30,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            HugePages::Off => "4 KiB",
            HugePages::Size2M => "2 MiB",
            HugePages::Size1G => "1 GiB",
        }
    }

    /// The host's pool of these pages.
    pub fn sysfs(self) -> String {
        format!(
            "/sys/kernel/mm/hugepages/hugepages-{}kB",
            self.bytes() >> 10
        )
    }

    /// The old saved form: a flag that meant 2 MiB pages.
    pub fn from_flag(on: bool) -> HugePages {
        if on {
            HugePages::Size2M
        } else {
            HugePages::Off
        }
    }

    /// Pages of the pool free for a new mapping (free minus those other
    /// mappings reserved) and the pool's size; None when the host has no
    /// such pool.
    fn available(self) -> Option<(u64, u64)> {
        let dir = self.sysfs();
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(format!("{dir}/{f}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let free = read("free_hugepages")?.saturating_sub(read("resv_hugepages").unwrap_or(0));
        Some((free, read("nr_hugepages").unwrap_or(0)))
    }

    fn mmap_flags(self) -> libc::c_int {
        match self {
            HugePages::Off => 0,
            // The page size's log2 in the flags' bits 26-31 (mmap(2),
            // MAP_HUGE_SHIFT), as Linux's MAP_HUGE_2MB and MAP_HUGE_1GB.
            HugePages::Size2M => libc::MAP_HUGETLB | (21 << 26),
            HugePages::Size1G => libc::MAP_HUGETLB | (30 << 26),
        }
    }
}

impl std::str::FromStr for HugePages {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "2M" | "2MiB" | "2m" => Ok(HugePages::Size2M),
            "1G" | "1GiB" | "1g" => Ok(HugePages::Size1G),
            "off" => Ok(HugePages::Off),
            other => Err(format!(
                "unknown huge page size '{other}' (want 2M or 1G, or off)"
            )),
        }
    }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            HugePages::Off => "off",
            HugePages::Size2M => "2M",
            HugePages::Size1G => "1G",
        })
    }
}

/// Maps `size` bytes of guest RAM at the addresses of [`layout::ram_regions`].
/// Memory is not reserved with MAP_NORESERVE, so a size the host cannot back
/// fails here, before the VM exists; huge pages are counted against the
/// host's free pool first, and the mapping reserves them (so the guest
/// never meets a SIGBUS for a huge page that is not there). With `numa`,
/// each guest node's share is bound to its host node before anything
/// touches it, once that node is known to have the memory (or the huge
/// pages) free.
pub fn create(
    size: u64,
    huge: HugePages,
    numa: Option<&numa::Layout>,
) -> Result<GuestMemoryMmap, Error> {
    if size < MIN_MEMORY {
        return Err(Error::TooSmall(size));
    }
    let hugepages = huge.is_on();
    if hugepages && size % huge.bytes() != 0 {
        return Err(Error::HugeAlignment(huge));
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | huge.mmap_flags();
    let host = host_memory_bytes();
    if size > host {
        return Err(Error::HostTooSmall { size, host });
    }
    if hugepages {
        let need = size / huge.bytes();
        match huge.available() {
            None => return Err(Error::NoSuchHugePages(huge)),
            Some((free, total)) if free < need => {
                return Err(Error::TooFewHugePages {
                    pages: huge,
                    need,
                    free,
                    total,
                })
            }
            Some(_) => {}
        }
    }
    if let Some(l) = numa {
        check_nodes(l, huge)?;
    }
    let hint = match huge {
        HugePages::Off => "",
        HugePages::Size2M => " as 2 MiB huge pages (see /proc/sys/vm/nr_hugepages)",
        HugePages::Size1G => {
            " as 1 GiB huge pages (see /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages)"
        }
    };
    let mut regions = Vec::new();
    let mut offset = 0;
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
        bind_nodes(region.as_ptr() as usize, offset, len as u64, numa)?;
        offset += len as u64;
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

/// Faults in all of guest RAM now (`--prefault`), so that neither the
/// guest's first touches (a page fault each, a zeroed 1 GiB page a
/// time) nor the host's memory running short later land on a running
/// job. Ranges of at least 64 MiB (and whole huge pages) go to worker
/// threads, each asking the kernel to populate its range writable
/// (`MADV_POPULATE_WRITE`, Linux 5.14; older kernels get one write per
/// page). Without `numa` host nodes: one thread per host CPU this process
/// may use. With them, each host node's ranges go to threads pinned to
/// that node's CPUs (one per CPU, at most one per range), so pages are
/// zeroed by the node they belong to. Returns the threads used. Call it
/// on fresh memory, before anything is loaded into it (the fallback
/// writes zeros).
pub fn prefault(
    mem: &GuestMemoryMmap,
    huge: HugePages,
    numa: Option<&numa::Layout>,
) -> Result<usize, Error> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: u64 = 64 << 20;
    let step = CHUNK.max(huge.bytes()) as usize;
    let nodes = numa.map(numa::Layout::ram_ranges).unwrap_or_default();
    // (host address, guest address, length) by host node (None: unbound).
    let mut queues: std::collections::BTreeMap<Option<u32>, Vec<(usize, u64, usize)>> =
        std::collections::BTreeMap::new();
    let mut ram = 0u64;
    for r in mem.iter() {
        let (base, gpa, len) = (host_addr(r) as usize, r.start_addr().0, r.len() as usize);
        let mut off = 0;
        while off < len {
            let n = step.min(len - off);
            let at = ram + off as u64;
            let node = nodes
                .iter()
                .find(|x| (x.offset..x.offset + x.len).contains(&at))
                .and_then(|x| x.host_node);
            queues
                .entry(node)
                .or_default()
                .push((base + off, gpa + off as u64, n));
            off += n;
        }
        ram += len as u64;
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let page = huge.bytes() as usize;
    // One queue: its ranges, the next one to take, and the CPUs its
    // threads run on (None: wherever they are).
    let mut work = Vec::new();
    for (node, ranges) in queues {
        let cpus = match node {
            Some(h) => Some(numa::host::node_cpus(std::path::Path::new("/"), h)?),
            None => None,
        };
        let threads = cpus
            .as_ref()
            .map_or(all, |c| c.len())
            .min(ranges.len())
            .max(1);
        work.push((ranges, AtomicUsize::new(0), cpus, threads));
    }
    let populate = |ranges: &[(usize, u64, usize)], next: &AtomicUsize| -> Result<(), Error> {
        while let Some(&(host, gpa, len)) = ranges.get(next.fetch_add(1, Ordering::Relaxed)) {
            // SAFETY: `host..host+len` lies inside a guest RAM mapping that
            // `mem` owns and keeps for this call; populating it changes no
            // contents (fresh anonymous or hugetlb memory reads as zero).
            let rc =
                unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            if rc == 0 {
                continue;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(Error::Prefault {
                    addr: gpa,
                    source: err,
                });
            }
            // A kernel without MADV_POPULATE_WRITE: one write per page.
            for p in (0..len).step_by(page) {
                // SAFETY: as above; the byte written is the zero it held.
                unsafe { std::ptr::write_volatile((host + p) as *mut u8, 0) };
            }
        }
        Ok(())
    };
    let used = work.iter().map(|w| w.3).sum();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (ranges, next, cpus, threads) in &work {
            for _ in 0..*threads {
                handles.push(s.spawn(move || {
                    if let Some(c) = cpus {
                        // Only where the pages are zeroed: a thread that
                        // cannot move still faults them in on the bound node.
                        let _ = vcpu_decouple::affinity::pin_current_thread(c, "prefault");
                    }
                    populate(ranges, next)
                }));
            }
        }
        let mut result = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(Error::Prefault {
                    addr: 0,
                    source: std::io::Error::other("a prefault thread panicked"),
                })
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })?;
    Ok(used)
}

/// Maps `size` bytes of guest RAM from a snapshot's full memory layer,
/// `MAP_PRIVATE`: pages are read from the file when the guest first touches
/// them and the guest's writes stay in this process, so restoring takes the
/// same time whatever the memory size, and the snapshot is never changed.
/// With `numa`, the pages the guest writes (its private copies) come from
/// each node's host node; pages it only reads stay in the page cache.
pub fn map_snapshot(
    size: u64,
    file: &std::path::Path,
    numa: Option<&numa::Layout>,
) -> Result<GuestMemoryMmap, Error> {
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
        bind_nodes(region.as_ptr() as usize, offset, len as u64, numa)?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(Error::Map {
            size,
            hint: " (region does not fit the address space)",
            source: vm_memory::mmap::MmapRegionError::InvalidPointer,
        })?);
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Checks that the host nodes `numa` binds guest nodes to exist and have
/// the memory (or, with huge pages, the pages on that node) free now.
pub fn check_nodes(numa: &numa::Layout, huge: HugePages) -> Result<(), Error> {
    Ok(numa::host::check(
        std::path::Path::new("/"),
        &numa.ram_ranges(),
        huge.is_on().then(|| huge.bytes()),
    )?)
}

/// Binds the parts of the RAM mapping at `host` (RAM offsets `offset` to
/// `offset + len`) that belong to guest nodes with a host node.
fn bind_nodes(
    host: usize,
    offset: u64,
    len: u64,
    numa: Option<&numa::Layout>,
) -> Result<(), Error> {
    for r in numa.map(numa::Layout::ram_ranges).unwrap_or_default() {
        let Some(node) = r.host_node else { continue };
        let start = r.offset.max(offset);
        let end = (r.offset + r.len).min(offset + len);
        if start < end {
            numa::host::bind(
                host + (start - offset) as usize,
                (end - start) as usize,
                node,
            )?;
        }
    }
    Ok(())
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
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn creates_regions_and_tracks_vmm_writes() {
        let mem = create(64 << 20, HugePages::Off, None).unwrap();
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
        assert!(matches!(
            create(1 << 20, HugePages::Off, None),
            Err(Error::TooSmall(_))
        ));
        assert!(matches!(
            create((64 << 20) + 4096, HugePages::Size2M, None),
            Err(Error::HugeAlignment(HugePages::Size2M))
        ));
        let msg = create(3 << 29, HugePages::Size1G, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("multiple of 1 GiB"), "{msg}");
        let msg = create(1 << 50, HugePages::Off, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot give"), "{msg}");
    }

    #[test]
    fn page_sizes_parse_and_print() {
        for (text, want) in [("2M", HugePages::Size2M), ("1G", HugePages::Size1G)] {
            let p: HugePages = text.parse().unwrap();
            assert_eq!(p, want);
            assert_eq!(p.to_string(), text);
        }
        assert!("3M".parse::<HugePages>().unwrap_err().contains("2M or 1G"));
        assert_eq!(
            HugePages::Size1G.sysfs(),
            "/sys/kernel/mm/hugepages/hugepages-1048576kB"
        );
    }

    #[test]
    fn prefault_makes_all_of_guest_ram_resident() {
        let mem = create(64 << 20, HugePages::Off, None).unwrap();
        let threads = prefault(&mem, HugePages::Off, None).unwrap();
        assert_eq!(threads, 1, "one 64 MiB range is one thread's work");
        let r = mem.iter().next().unwrap();
        let pages = (r.len() as usize).div_ceil(PAGE_SIZE);
        let mut vec = vec![0u8; pages];
        // SAFETY: the region's mapping is page-aligned and `vec` has a
        // byte per page.
        let rc = unsafe {
            libc::mincore(
                host_addr(r) as *mut libc::c_void,
                r.len() as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        assert!(vec.iter().all(|b| b & 1 == 1), "a page is not resident");
    }
}
