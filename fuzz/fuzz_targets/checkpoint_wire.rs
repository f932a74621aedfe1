//! The checkpoint endpoint (`ffmk-vmm checkpoint serve`: partner copies,
//! XOR parity parts, fetch and list) reading a hostile client: the real
//! server runs on loopback with a store in the temp directory, and each
//! input is one connection's worth of frames ("FFCK", kind, length,
//! payload) that the harness builds from (kind, u16 length, payload)
//! records (high bit of the kind: sent unframed), inside a cluster-plane
//! channel opened with the key of job "fuzz" (a job's key holder gone bad:
//! requests about other jobs must be refused). What must hold: no
//! panic and no hang in the server; every connection gets an answer or a
//! close.
#![no_main]
use ffmk_fuzz::{feed_plane, trust, Input};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::OnceLock;

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let l = checkpoint_levels::server::bind("127.0.0.1:0".parse().expect("address"))
            .expect("checkpoint endpoint");
        let addr = l.local_addr().expect("endpoint address");
        let dir = std::env::temp_dir().join(format!("ffmk-fuzz-ckpt-{}", std::process::id()));
        std::thread::spawn(move || {
            checkpoint_levels::server::serve(l, dir, 2, trust().clone(), Default::default())
        });
        addr
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut stream = Vec::new();
    while !input.is_empty() {
        let kind = input.u8();
        let len = usize::from(input.u16());
        let payload = input.bytes(len);
        if kind & 0x80 == 0 {
            stream.extend_from_slice(b"FFCK");
            stream.push(kind);
            stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        stream.extend_from_slice(payload);
    }
    let Ok(s) = std::net::TcpStream::connect(server()) else {
        return;
    };
    let Ok(s) = cluster_auth::connect(
        s,
        trust(),
        "checkpoint",
        Some("fuzz"),
        std::time::Duration::from_secs(5),
    ) else {
        return;
    };
    // Returns when the server closed the connection: it handled it.
    let _ = feed_plane(s, stream).join();
});
