//! The page path alone: how fast the pre-copy engine moves guest memory
//! from one `GuestMemory` into a fresh one over loopback, with the cluster
//! key (AES-GCM records) and without (`--insecure`), on 1 and 4 page
//! streams. No vCPU and no dirtying: one full round, then the switch-over.
//! The destination's memory is new for every run, so its first-touch page
//! faults are counted, as on a real destination. Medians of 5 runs each,
//! the configurations alternating.
//!
//!     cargo bench -p migrate --bench pages [-- MIB]
use cluster_auth::{Key, Trust};
use migrate::dest::{Arrival, Incoming};
use migrate::source::{migrate, Options, Source};
use migrate::{GuestMemory, Hello, VmError};
use snapshot::memory::{total_pages, write_page};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vm_memory::GuestAddress;

struct Idle(GuestMemory);

impl Source for Idle {
    fn memory(&self) -> &GuestMemory {
        &self.0
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn dirty(&self) -> Result<PageBitmap, VmError> {
        Ok(PageBitmap::new(total_pages(&self.0)))
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

fn hello(bytes: u64, streams: u8) -> Hello {
    Hello {
        state_version: 1,
        memory_bytes: bytes,
        regions: vec![(0, bytes)],
        cpus: 1,
        cpu_vendor: "bench".into(),
        cpu_profile: "bench".into(),
        devices: vec![],
        postcopy: false,
        verify: false,
        layout: String::new(),
        streams,
        passthrough: Vec::new(),
    }
}

/// One migration of `guest`; returns MiB/s of guest memory moved.
fn run(guest: &Idle, bytes: u64, trust: &Trust, streams: u8) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let theirs = trust.clone();
    let dest = std::thread::spawn(move || {
        let accept = |listener: &TcpListener, wait: Duration| {
            listener.set_nonblocking(true).ok()?;
            let until = Instant::now() + wait;
            let s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(_) => return None,
                }
            };
            s.set_nonblocking(false).ok()?;
            cluster_auth::accept(s, &theirs, &["migration"], Duration::from_secs(5))
                .ok()
                .map(|(s, _)| s)
        };
        let first = accept(&listener, Duration::from_secs(10)).expect("first connection");
        let mut inc = Incoming::new(first, Duration::from_secs(10)).expect("incoming");
        inc.hello(&hello(bytes, streams), |_| Ok(()))
            .expect("hello");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)]).expect("memory");
        match inc
            .memory(&mem, &mut |wait| accept(&listener, wait))
            .expect("pages")
        {
            Arrival::State(_) => {}
            Arrival::Postcopy { .. } => panic!("post-copy was not asked for"),
        }
        inc.switch_over(|| Ok(())).expect("switch-over");
    });
    let opts = Options {
        streams,
        throttle: false,
        ..Options::default()
    };
    let cancel = AtomicBool::new(false);
    let t = Instant::now();
    migrate(
        guest,
        &addr,
        trust,
        &hello(bytes, streams),
        &opts,
        &cancel,
        &mut |_| {},
    )
    .expect("migration");
    let secs = t.elapsed().as_secs_f64();
    dest.join().expect("destination");
    bytes as f64 / (1 << 20) as f64 / secs
}

/// The median, the lowest and the highest.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mib: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let bytes = mib << 20;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)]).expect("memory");
    // Every page different and none zero (zero pages cost no data).
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in 0..total_pages(&mem) {
        page[..8].copy_from_slice(&(p + 1).to_le_bytes());
        page[8..].fill((p % 251) as u8 | 1);
        write_page(&mem, p, &page).expect("write");
    }
    let guest = Idle(mem);
    let key = Trust::Key(Key::Cluster(cluster_auth::key::generate().expect("key")));
    let configs: [(&str, &Trust, u8); 4] = [
        ("cluster key, 1 stream ", &key, 1),
        ("cluster key, 4 streams", &key, 4),
        ("--insecure, 1 stream  ", &Trust::Insecure, 1),
        ("--insecure, 4 streams ", &Trust::Insecure, 4),
    ];
    let mut results = vec![Vec::new(); configs.len()];
    for _ in 0..5 {
        for (i, (_, trust, streams)) in configs.iter().enumerate() {
            results[i].push(run(&guest, bytes, trust, *streams));
        }
    }
    println!("pre-copy of {mib} MiB (every page non-zero) over loopback, medians of 5 [range]:");
    for ((name, _, _), r) in configs.iter().zip(results) {
        let (m, lo, hi) = spread(r);
        println!("  {name}  {m:7.0} MiB/s  [{lo:.0}-{hi:.0}]");
    }
}
