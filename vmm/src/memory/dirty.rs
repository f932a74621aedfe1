//! Which guest pages changed: the VM's dirty tracker.
//!
//! A page is dirty when the guest wrote it (KVM's dirty log of each memory
//! slot, on once logging starts) or the VMM did (virtio devices, the
//! `vmm_written` bitmap of each region). Logging is off until the first
//! live copy needs it (it costs the guest write-protection faults and
//! large pages), then stays on so incremental snapshots can follow.
//!
//! One copy at a time uses the tracker, through a [`Session`]: a
//! snapshot or a migration. Pages a session fetched go back to the
//! tracker unless it [`Session::commit`]s - the copy they went into
//! failed, so the next one must take them again, and a later incremental
//! layer never misses a page.
use super::{host_addr, vmm_written, GuestMemoryMmap};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use snapshot::{PageBitmap, PAGE_SIZE};
use std::sync::{Mutex, MutexGuard, TryLockError};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another copy (a migration or a snapshot) holds the tracker.
    #[error("another copy of this VM's memory is in progress")]
    Busy,
    #[error("the dirty tracker's lock is poisoned")]
    Poisoned,
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A passthrough device's DMA dirty pages could not be read.
    #[error("device DMA dirty pages: {0}")]
    Device(String),
}

/// Registers guest RAM with KVM, one slot per region, with or without
/// dirty-page logging (turning it on starts with a clean log).
pub fn register(vm_fd: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr(region),
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the
        // Vm keeps for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(|source| Error::Kvm {
            what: "set guest memory region",
            source,
        })?;
    }
    Ok(())
}

/// Pages in all of guest memory.
pub fn total_pages(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len() / PAGE_SIZE).sum()
}

struct Log {
    logging: bool,
    /// Pages fetched by copies that did not complete.
    carry: Option<PageBitmap>,
}

/// The VM's dirty tracker (one per VM, owned by it).
pub struct Tracker {
    log: Mutex<Log>,
}

impl Tracker {
    /// `logging`: the slots were registered with dirty logging on.
    pub fn new(logging: bool) -> Tracker {
        Tracker {
            log: Mutex::new(Log {
                logging,
                carry: None,
            }),
        }
    }

    /// The tracker for one copy; waits while another copy holds it.
    pub fn session<'a>(
        &'a self,
        vm_fd: &'a VmFd,
        mem: &'a GuestMemoryMmap,
    ) -> Result<Session<'a>, Error> {
        let log = self.log.lock().map_err(|_| Error::Poisoned)?;
        Ok(Session::new(log, vm_fd, mem))
    }

    /// The tracker for one copy, or [`Error::Busy`] while another copy
    /// holds it.
    pub fn try_session<'a>(
        &'a self,
        vm_fd: &'a VmFd,
        mem: &'a GuestMemoryMmap,
    ) -> Result<Session<'a>, Error> {
        let log = match self.log.try_lock() {
            Ok(l) => l,
            Err(TryLockError::WouldBlock) => return Err(Error::Busy),
            Err(TryLockError::Poisoned(_)) => return Err(Error::Poisoned),
        };
        Ok(Session::new(log, vm_fd, mem))
    }
}

/// One copy's exclusive use of the tracker.
pub struct Session<'a> {
    log: MutexGuard<'a, Log>,
    vm_fd: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    /// Everything fetched in this session (given back unless committed).
    fetched: PageBitmap,
    committed: bool,
}

impl<'a> Session<'a> {
    fn new(log: MutexGuard<'a, Log>, vm_fd: &'a VmFd, mem: &'a GuestMemoryMmap) -> Self {
        Session {
            log,
            vm_fd,
            mem,
            fetched: PageBitmap::new(total_pages(mem)),
            committed: false,
        }
    }

    /// Whether dirty logging is on (pages since the last fetch are known).
    pub fn logging(&self) -> bool {
        self.log.logging
    }

    /// Turns dirty logging on if it is off: the log starts clean here.
    /// Returns whether it was off (everything must be copied once).
    pub fn start(&mut self) -> Result<bool, Error> {
        if self.log.logging {
            return Ok(false);
        }
        register(self.vm_fd, self.mem, true)?;
        for region in self.mem.iter() {
            vmm_written(region).reset();
        }
        self.log.logging = true;
        Ok(true)
    }

    /// Pages dirtied since the last fetch (KVM's log OR the VMM's writes,
    /// both cleared), with those earlier copies fetched and gave back.
    pub fn fetch(&mut self) -> Result<PageBitmap, Error> {
        let mut bits = PageBitmap::new(total_pages(self.mem));
        let mut first = 0;
        for (slot, region) in self.mem.iter().enumerate() {
            let log = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| Error::Kvm {
                    what: "read the dirty log",
                    source,
                })?;
            bits.or_words(first, &log);
            bits.or_words(first, &vmm_written(region).get_and_reset());
            first += region.len() / PAGE_SIZE;
        }
        if let Some(c) = self.log.carry.take() {
            bits.union(&c);
        }
        self.fetched.union(&bits);
        Ok(bits)
    }

    /// The copy completed: what it fetched is saved (or has left with the
    /// VM) and is not fetched again.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.committed || self.fetched.count() == 0 {
            return;
        }
        let fetched = std::mem::replace(&mut self.fetched, PageBitmap::new(0));
        match &mut self.log.carry {
            Some(c) => c.union(&fetched),
            None => self.log.carry = Some(fetched),
        }
    }
}

impl precopy::Tracker for Session<'_> {
    type Error = Error;

    fn fetch(&mut self) -> Result<PageBitmap, Error> {
        Session::fetch(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn page(n: u64) -> PageBitmap {
        let mut b = PageBitmap::new(64 << 20 >> 12);
        b.set(n);
        b
    }

    /// Pages fetched by a copy that does not complete are fetched again by
    /// the next one; a copy that commits consumes them.
    #[test]
    fn a_failed_copy_gives_its_pages_back_and_a_committed_one_keeps_them() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm_fd = kvm.create_vm().expect("a VM");
        let mem =
            crate::memory::create(64 << 20, crate::memory::HugePages::Off, None).expect("memory");
        register(&vm_fd, &mem, false).expect("slots");
        let tracker = Tracker::new(false);

        let mut s = tracker.session(&vm_fd, &mem).expect("a session");
        assert!(!s.logging());
        assert!(s.start().expect("logging on"), "logging was off");
        assert!(!s.start().expect("logging on"), "and stays on");
        // The VMM writes page 5 (a device's DMA).
        mem.write_obj(1u64, GuestAddress(5 << 12)).expect("write");
        assert_eq!(s.fetch().expect("fetch"), page(5));
        assert_eq!(s.fetch().expect("fetch").count(), 0, "fetching clears");
        // Another copy cannot start meanwhile.
        assert!(matches!(
            tracker.try_session(&vm_fd, &mem),
            Err(Error::Busy)
        ));
        drop(s); // the copy failed

        let mut s = tracker.try_session(&vm_fd, &mem).expect("free again");
        assert!(s.logging());
        mem.write_obj(1u64, GuestAddress(7 << 12)).expect("write");
        let mut both = page(5);
        both.union(&page(7));
        assert_eq!(s.fetch().expect("fetch"), both, "page 5 comes back");
        s.commit();

        let mut s = tracker.session(&vm_fd, &mem).expect("a session");
        assert_eq!(s.fetch().expect("fetch").count(), 0, "nothing left over");
    }
}
