//! What a passthrough function needs from whoever serves the device: its
//! regions (BARs and configuration space), its interrupts and a reset.
//! Kernel VFIO ([`crate::kernel`]) is one backend; a device served by
//! another process (vfio-user) is another.
use std::io;
use vmm_sys_util::eventfd::EventFd;

/// Region indices, as VFIO numbers them for PCI functions.
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
pub const ROM_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_ROM_REGION_INDEX;
/// Interrupt indices.
pub const IRQ_INTX: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
pub const IRQ_MSI: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
pub const IRQ_MSIX: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;

/// One region of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// Parts that may be mapped into the guest: (offset, length), page
    /// aligned. Empty: every access is trapped and forwarded.
    pub mappable: Vec<(u64, u64)>,
}

/// A mapping of part of a region into the VMM's address space; unmapped
/// when dropped.
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory shared with the kernel; the
// pointer is only handed to KVM (as a memory slot's user address) and
// unmapped once, on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above: no Rust reference to the memory is ever created.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read and write.
    pub fn new(fd: std::os::fd::RawFd, offset: u64, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("mapping too large"))?;
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("bad offset"))?;
        // SAFETY: a fresh shared mapping of a device file; the kernel checks
        // fd, offset and length, and nothing else is mapped at the address
        // it picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned, unmapped once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

pub trait Backend: Send + Sync {
    /// For logs and `GET /vm` (e.g. the host PCI address).
    fn describe(&self) -> String;

    /// Region `index`, or None when the device does not have it.
    fn region(&self, index: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`. A failed
    /// read leaves all ones (what a missing device reads as).
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);

    fn write(&self, index: u32, offset: u64, data: &[u8]);

    /// Maps part of a region (one of its `mappable` areas).
    fn map(&self, index: u32, offset: u64, len: u64) -> io::Result<Mapping>;

    /// How many vectors interrupt index `index` has (0: none).
    fn irq_count(&self, index: u32) -> u32;

    /// Signals `fds[v]` when the device raises vector `v` of `index`.
    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;

    fn disable_irqs(&self, index: u32) -> io::Result<()>;

    /// Has the device unmask INTx itself whenever `fd` is signalled (the
    /// guest's EOI). Default: not supported.
    fn set_intx_unmask_fd(&self, _fd: &EventFd) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Unmasks INTx once (after the guest's EOI). Default: nothing.
    fn unmask_intx(&self) {}

    /// The device's migration interface (VFIO migration v2), where it has
    /// one. Default: none.
    fn migration(&self) -> Option<crate::migration::Migratable<'_>> {
        None
    }

    /// Function-level reset, where the device has one.
    fn reset(&self);

    /// Why the device stopped working, if it did (a server that broke
    /// the protocol). Default: it never does.
    fn failure(&self) -> Option<String> {
        None
    }

    /// The function is on the guest's bus: from now on failures are the
    /// guest's to see (all ones) and the operator's to read in the log;
    /// before, they are errors returned to whoever attaches it.
    fn attached(&self) {}
}
