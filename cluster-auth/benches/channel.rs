//! Throughput of a cluster-plane channel against plain TCP over loopback,
//! side by side in one run: 1 GiB in 1 MiB frames (write, flush), read
//! back with read_exact, as migration and the checkpoint service use it.
//! Medians of 5 runs each, alternating.
//!
//!     cargo bench -p cluster-auth --bench channel
use cluster_auth::{Key, Trust};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const TOTAL: usize = 1 << 30;
const FRAME: usize = 1 << 20;

fn run(trust: &Trust) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    let t2 = trust.clone();
    let reader = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let (mut s, _) =
            cluster_auth::accept(s, &t2, &["bench"], Duration::from_secs(5)).expect("accept");
        let mut buf = vec![0u8; FRAME];
        let mut got = 0;
        while got < TOTAL {
            s.read_exact(&mut buf).expect("read");
            got += FRAME;
        }
    });
    let s = TcpStream::connect(addr).expect("connect");
    let mut s =
        cluster_auth::connect(s, trust, "bench", None, Duration::from_secs(5)).expect("handshake");
    let frame = vec![0x5au8; FRAME];
    let t = Instant::now();
    for _ in 0..TOTAL / FRAME {
        s.write_all(&frame).expect("write");
        s.flush().expect("flush");
    }
    reader.join().expect("reader");
    (TOTAL as f64 / (1 << 20) as f64) / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let key = Trust::Key(Key::Cluster(cluster_auth::key::generate().expect("key")));
    let (mut secure, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        secure.push(run(&key));
        plain.push(run(&Trust::Insecure));
    }
    let (s, p) = (median(secure), median(plain));
    println!("channel 1 GiB over loopback in 1 MiB frames, medians of 5:");
    println!("  plain TCP       {p:8.0} MiB/s");
    println!("  cluster key     {s:8.0} MiB/s  ({:.2}x plain)", s / p);
}
