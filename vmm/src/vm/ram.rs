//! The VM's guest memory as one: the mappings, the dirty tracker over them,
//! the snapshot chain they follow, and whether part of them is still on its
//! way (incoming post-copy).
use crate::machine::ChainRef;
use crate::memory::dirty::{self, Session, Tracker};
use crate::memory::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub struct Ram {
    guest: GuestMemoryMmap,
    vm_fd: Arc<VmFd>,
    dirty: Tracker,
    chain: Mutex<Option<ChainRef>>,
    arriving: Arc<AtomicBool>,
}

impl Ram {
    pub(super) fn new(
        guest: GuestMemoryMmap,
        vm_fd: Arc<VmFd>,
        logging: bool,
        chain: Option<ChainRef>,
    ) -> Ram {
        Ram {
            guest,
            vm_fd,
            dirty: Tracker::new(logging),
            chain: Mutex::new(chain),
            arriving: Arc::default(),
        }
    }

    /// Guest memory.
    pub fn guest(&self) -> &GuestMemoryMmap {
        &self.guest
    }

    /// The dirty tracker for one copy of memory; waits while another copy
    /// holds it.
    pub fn dirty_session(&self) -> Result<Session<'_>, dirty::Error> {
        self.dirty.session(&self.vm_fd, &self.guest)
    }

    /// The dirty tracker for one copy, or `Busy` while another holds it.
    pub fn try_dirty_session(&self) -> Result<Session<'_>, dirty::Error> {
        self.dirty.try_session(&self.vm_fd, &self.guest)
    }

    /// The snapshot chain this memory follows (its last snapshot).
    pub fn chain(&self) -> Option<ChainRef> {
        self.chain.lock().ok().and_then(|c| c.clone())
    }

    pub fn set_chain(&self, chain: ChainRef) {
        if let Ok(mut c) = self.chain.lock() {
            *c = Some(chain);
        }
    }

    /// Part of guest memory is still on its way (incoming post-copy):
    /// snapshots and migrations wait until it is all here.
    pub fn arriving(&self) -> &Arc<AtomicBool> {
        &self.arriving
    }
}
