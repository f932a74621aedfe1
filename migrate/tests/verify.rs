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
        streams: 1,
        passthrough: Vec::new(),
    }
}

/// What a test guest writes while the rounds run.
enum Writes {
    /// `page`, while the first copy round runs; the tracking reports that
    /// write only when `report` is set.
    One { page: u64, report: bool },
    /// A different stripe of pages on each of the first four rounds,
    /// every write reported.
    Stripes,
}

struct Guest {
    mem: GuestMemory,
    writes: Writes,
    calls: AtomicU32,
}

impl Guest {
    fn new(mem: GuestMemory, writes: Writes) -> Guest {
        Guest {
            mem,
            writes,
            calls: AtomicU32::new(0),
        }
    }
}

impl Source for Guest {
    fn memory(&self) -> &GuestMemory {
        &self.mem
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn dirty(&self) -> Result<PageBitmap, VmError> {
        let total = total_pages(&self.mem);
        let mut d = PageBitmap::new(total);
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let write = |p: u64, byte: u8, d: &mut PageBitmap, report: bool| {
            write_page(&self.mem, p, &vec![byte; PAGE_SIZE as usize]).map_err(|e| e.to_string())?;
            if report {
                d.set(p);
            }
            Ok::<(), VmError>(())
        };
        match self.writes {
            Writes::One { page, report } if call == 0 => write(page, 0xa5, &mut d, report)?,
            Writes::Stripes if call < 4 => {
                for p in (u64::from(call)..total).step_by(3 + call as usize) {
                    write(p, (p as u8) ^ (call as u8 + 1), &mut d, true)?;
                }
            }
            _ => {}
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
        // (This destination takes no further connections: one stream.)
        let mut inc = Incoming::new(stream, Duration::from_secs(10))?.max_streams(1);
        inc.hello(&hello(), |_| Ok(()))?;
        let mem = memory();
        match inc.memory(&mem, &mut |_| None)? {
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
    // The second region's second page: 0x101000.
    let guest = Guest::new(
        memory(),
        Writes::One {
            page: 129,
            report: false,
        },
    );
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
    let guest = Guest::new(
        memory(),
        Writes::One {
            page: 129,
            report: true,
        },
    );
    let (src, dst) = run(&guest);
    let out = src.expect("source");
    assert_eq!(out.verified_pages, Some(256));
    assert!(out.verify_ms.is_some());
    assert_eq!(dst.expect("destination"), Some(256));
}

fn busy_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20), (GuestAddress(8 << 20), 4 << 20)])
        .expect("guest memory")
}

fn busy_hello() -> Hello {
    Hello {
        memory_bytes: 8 << 20,
        regions: vec![(0, 4 << 20), (8 << 20, 4 << 20)],
        ..hello()
    }
}

/// Migrates a guest of 2 x 4 MiB writing stripes on `streams` page streams, in verification
/// mode; `stray` connects one more authenticated connection with a wrong
/// token first. Returns the source's outcome, the pages the destination
/// verified, and whether its memory equals the source's.
fn run_streams(streams: u8, stray: bool) -> (migrate::source::Outcome, Option<u64>, bool) {
    let guest = Guest::new(busy_memory(), Writes::Stripes);
    for p in 0..total_pages(&guest.mem) {
        write_page(&guest.mem, p, &vec![p as u8 | 1; PAGE_SIZE as usize]).expect("write");
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let trust = Trust::Key(Key::Cluster(cluster_auth::key::generate().expect("key")));
    let theirs = trust.clone();
    let dest = std::thread::spawn(move || -> Result<(Option<u64>, GuestMemory), Error> {
        let accept = |wait: Duration| {
            listener.set_nonblocking(true).ok()?;
            let until = std::time::Instant::now() + wait;
            loop {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).ok()?;
                        return cluster_auth::accept(
                            s,
                            &theirs,
                            &["migration"],
                            Duration::from_secs(5),
                        )
                        .ok()
                        .map(|(s, _)| s);
                    }
                    Err(_) if std::time::Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => return None,
                }
            }
        };
        let first = loop {
            if let Some(s) = accept(Duration::from_secs(10)) {
                break s;
            }
        };
        let mut inc = Incoming::new(first, Duration::from_secs(10))?;
        if stray {
            // Two authenticated connections that are not this migration's
            // streams: one that says nothing (held longer than every
            // timeout), then one with a wrong token.
            let addr = listener.local_addr()?;
            let t = theirs.clone();
            // (The destination may be done before it takes the second:
            // then its handshake fails, which is no concern of the test.)
            std::thread::spawn(move || {
                let open = || {
                    let s = std::net::TcpStream::connect(addr).ok()?;
                    cluster_auth::connect(s, &t, "migration", None, Duration::from_secs(5)).ok()
                };
                let _silent = open();
                if let Some(s) = open() {
                    let mut c = migrate::protocol::Conn::plane(s);
                    let _ = c.send(
                        migrate::protocol::Kind::Join,
                        &migrate::protocol::encode_join("not-the-token", 1),
                    );
                    std::thread::sleep(Duration::from_secs(20));
                }
            });
            // The silent one waits in the listen queue before the source
            // hears ACCEPT and opens its further streams.
            std::thread::sleep(Duration::from_millis(200));
        }
        inc.hello(&busy_hello(), |_| Ok(()))?;
        let mem = busy_memory();
        match inc.memory(&mem, &mut |wait| accept(wait))? {
            Arrival::State(s) => assert_eq!(s, b"state"),
            Arrival::Postcopy { .. } => panic!("post-copy was not asked for"),
        }
        Ok((inc.switch_over(|| Ok(()))?.verified_pages, mem))
    });
    // No downtime target can be met: rounds go on until nothing is dirty
    // (after the guest's fourth stripe).
    let opts = Options {
        verify: true,
        streams,
        max_downtime: Duration::ZERO,
        throttle: false,
        ..Options::default()
    };
    let cancel = AtomicBool::new(false);
    let out = migrate(
        &guest,
        &addr,
        &trust,
        &busy_hello(),
        &opts,
        &cancel,
        &mut |_| {},
    )
    .expect("source");
    let (verified, mem) = dest
        .join()
        .expect("destination thread")
        .expect("destination");
    let mut a = vec![0u8; PAGE_SIZE as usize];
    let mut b = vec![0u8; PAGE_SIZE as usize];
    let same = (0..total_pages(&mem)).all(|p| {
        snapshot::memory::read_page(&guest.mem, p, &mut a).expect("read");
        snapshot::memory::read_page(&mem, p, &mut b).expect("read");
        a == b
    });
    (out, verified, same)
}

#[test]
fn several_page_streams_carry_every_round_and_every_page_arrives() {
    for streams in [1, 2, 4] {
        let (out, verified, same) = run_streams(streams, false);
        assert_eq!(verified, Some(2048), "{streams} streams");
        assert!(same, "{streams} streams: the destination's memory differs");
        assert_eq!(out.rounds, 6, "{streams} streams");
    }
}

#[test]
fn connections_that_are_not_streams_neither_join_nor_delay_the_migration() {
    let started = std::time::Instant::now();
    let (out, verified, same) = run_streams(2, true);
    assert_eq!(verified, Some(2048));
    assert!(same);
    // Neither the silent connection's JOIN timeout (5 s) nor the I/O
    // timeouts (10 s) were waited for.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}, {out:?}");
}
