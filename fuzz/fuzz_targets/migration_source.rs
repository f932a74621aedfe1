//! The source of a live migration reading a hostile destination: a
//! listener on loopback plays the destination and answers with the framed
//! records of the input (as in `migration_dest`: kind, length, payload;
//! high bit = unframed), whatever the source sent. The source engine runs
//! as `ffmk-vmm migrate` runs it (pre-copy rounds with SYNC, stop-and-copy
//! or post-copy with page requests served, page digests in verification
//! mode, READY/GO/RUNNING), over a VM
//! whose memory and dirty log are real guest memory and fuzzed page sets.
//! What must hold: no panic, no hang, and a migration that did not reach
//! RUNNING leaves the VM resumed here.
#![no_main]
use ffmk_fuzz::{feed_plane, listener, memory, migration_hello, migration_stream, trust, Input};
use libfuzzer_sys::fuzz_target;
use migrate::VmError;
use migrate::source::{migrate, Options, Source};
use migrate::GuestMemory;
use snapshot::PageBitmap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

struct Vm {
    mem: GuestMemory,
    /// Page sets the dirty log reports, one per call.
    dirty: Mutex<Vec<Vec<u64>>>,
    state: Vec<u8>,
    /// pause() minus resume() calls.
    paused: AtomicI32,
}

impl Source for Vm {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn dirty(&self) -> Result<PageBitmap, VmError> {
        let mut b = PageBitmap::new(256);
        if let Some(pages) = self.dirty.lock().map_err(|e| e.to_string())?.pop() {
            for p in pages {
                b.set(p % 256);
            }
        }
        Ok(b)
    }
    fn pause(&self) -> Result<(), VmError> {
        self.paused.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.paused.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn state(&self) -> Result<Vec<u8>, VmError> {
        Ok(self.state.clone())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let rounds = usize::from(input.u8() % 4);
    let dirty = (0..rounds)
        .map(|_| {
            let n = usize::from(input.u8() % 64);
            (0..n).map(|_| u64::from(input.u8())).collect()
        })
        .collect();
    let vm = Vm {
        mem: memory(&ffmk_fuzz::MIGRATION_REGIONS),
        dirty: Mutex::new(dirty),
        state: b"{\"version\":2}".to_vec(),
        paused: AtomicI32::new(0),
    };
    let replies = migration_stream(&mut input);
    let l = listener();
    let Ok(addr) = l.local_addr() else { return };
    let dest = std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            if let Ok((s, _)) =
                cluster_auth::accept(s, trust(), &["migration"], Duration::from_secs(2))
            {
                let _ = feed_plane(s, replies).join();
            }
        }
    });
    let opts = Options {
        max_downtime: Duration::from_millis(if flags & 2 != 0 { 0 } else { 50 }),
        max_rounds: 3,
        throttle: false,
        io_timeout: Duration::from_secs(2),
        postcopy: flags & 1 != 0,
        verify: flags & 4 != 0,
        streams: 1,
    };
    let cancel = AtomicBool::new(false);
    let hello = migration_hello(opts.postcopy);
    let result = migrate(
        &vm,
        &addr.to_string(),
        trust(),
        &hello,
        &opts,
        &cancel,
        &mut |_| {},
    );
    let _ = dest.join();
    // Before GO fails: the VM runs on here. Past GO (confirmed or not) it
    // stays paused here, since the destination may run it.
    let paused = vm.paused.load(Ordering::SeqCst);
    let held = matches!(
        result,
        Ok(_) | Err(migrate::Error::Unconfirmed(_)) | Err(migrate::Error::Postcopy { .. })
    );
    assert_eq!(paused, i32::from(held), "{result:?}");
});
