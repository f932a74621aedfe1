//! Verification mode over real TCP on loopback: a page that the dirty
//! tracking did not report is found at the pause, named, and the migration
//! fails before the destination loads anything (the source's guest runs
//! on); with every write reported, all pages are verified.
use cluster_auth::{Key, Trust};
use migrate::dest::{Arrival, Incoming};
use migrate::source::{migrate, Options, Source};
use migrate::VmError;
use migrate::{Error, GuestMemory, Hello};
use snapshot::memory::{total_pages, write_page};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use vm_memory::GuestAddress;

/// Two RAM regions with a hole between them, like a guest's.
fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), 512 << 10),
        (GuestAddress(0x10_0000), 512 << 10),
    ])
    .expect("guest memory")
}

fn hello() -> Hello {
    Hello {
        state_version: 1,
        memory_bytes: 1 << 20,
        regions: vec![(0, 512 << 10), (0x10_0000, 512 << 10)],
        cpus: 1,
        cpu_vendor: "test".into(),
        cpu_profile: "test".into(),
        devices: vec![],
        postcopy: false,
        verify: false,
        layout: String::new(),
    }
}

/// A guest that writes `page` while the first copy round runs; the
/// tracking reports that write only when `report` is set.
struct Guest {
    mem: GuestMemory,
    page: u64,
    report: bool,
    calls: AtomicU32,
}

impl Source for Guest {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn dirty(&self) -> Result<PageBitmap, VmError> {
        let mut d = PageBitmap::new(total_pages(&self.mem));
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            let data = vec![0xa5u8; PAGE_SIZE as usize];
            write_page(&self.mem, self.page, &data).map_err(|e| e.to_string())?;
            if self.report {
                d.set(self.page);
            }
        }
        Ok(d)
    }
    fn pause(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn state(&self) -> Result<Vec<u8>, VmError> {
        Ok(b"state".to_vec())
    }
}

/// Runs one migration of `guest` into fresh memory on loopback; returns
/// the source's and the destination's results.
fn run(
    guest: &Guest,
) -> (
    Result<migrate::source::Outcome, Error>,
    Result<Option<u64>, Error>,
) {
    // Some content in both regions, sent in the first round.
    for p in [1, 3, 130, 200] {
        write_page(&guest.mem, p, &vec![p as u8; PAGE_SIZE as usize]).expect("write");
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let trust = Trust::Key(Key::Cluster(cluster_auth::key::generate().expect("key")));
    let theirs = trust.clone();
    let dest = std::thread::spawn(move || -> Result<Option<u64>, Error> {
        let (stream, _) = listener.accept()?;
        let (stream, _) =
            cluster_auth::accept(stream, &theirs, &["migration"], Duration::from_secs(5))
                .map_err(|e| Error::Protocol(e.to_string()))?;
        let mut inc = Incoming::new(stream, Duration::from_secs(10))?;
        inc.hello(&hello(), |_| Ok(()))?;
        let mem = memory();
        match inc.memory(&mem)? {
            Arrival::State(s) => assert_eq!(s, b"state"),
            Arrival::Postcopy { .. } => panic!("post-copy was not asked for"),
        }
        Ok(inc.switch_over(|| Ok(()))?.verified_pages)
    });
    let opts = Options {
        verify: true,
        ..Options::default()
    };
    let cancel = AtomicBool::new(false);
    let out = migrate(guest, &addr, &trust, &hello(), &opts, &cancel, &mut |_| {});
    (out, dest.join().expect("destination thread"))
}

#[test]
fn a_page_the_tracking_missed_fails_the_migration_by_name() {
    let guest = Guest {
        mem: memory(),
        page: 129, // the second region's second page: 0x101000
        report: false,
        calls: AtomicU32::new(0),
    };
    let (src, dst) = run(&guest);
    let why = match dst {
        Err(Error::Verify(why)) => why,
        other => panic!("destination: {other:?}"),
    };
    assert!(
        why.contains("1 of 256 pages differ") && why.contains("129 (guest-physical 0x101000)"),
        "{why}"
    );
    match src {
        Err(Error::Aborted(a)) => assert!(a.contains("129 (guest-physical 0x101000)"), "{a}"),
        other => panic!("source: {other:?}"),
    }
}

#[test]
fn with_every_write_reported_every_page_is_verified() {
    let guest = Guest {
        mem: memory(),
        page: 129,
        report: true,
        calls: AtomicU32::new(0),
    };
    let (src, dst) = run(&guest);
    let out = src.expect("source");
    assert_eq!(out.verified_pages, Some(256));
    assert!(out.verify_ms.is_some());
    assert_eq!(dst.expect("destination"), Some(256));
}
