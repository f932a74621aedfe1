//! The cluster-plane handshake as a stranger sends it: whatever bytes
//! reach a port that migration, the checkpoint service or the node
//! control port listens on, before any authentication. The input goes on
//! the wire as it is; the responder runs as those endpoints run it.
//! What must hold: no panic, no hang past the handshake deadline, never a
//! channel opened (the input holds no key), and not one byte sent back.
#![no_main]
use ffmk_fuzz::{listener, tcp_pair, trust};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::OnceLock;
use std::time::Duration;

fn loopback() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(listener)
}

fuzz_target!(|data: &[u8]| {
    let (mut ours, theirs) = tcp_pair(loopback());
    let _ = ours.write_all(data);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let r = cluster_auth::accept(
        theirs,
        trust(),
        &["migration", "checkpoint", "control"],
        Duration::from_millis(200),
    );
    assert!(r.is_err(), "a channel opened without the key");
    drop(r);
    let _ = ours.set_read_timeout(Some(Duration::from_secs(1)));
    let mut back = Vec::new();
    let _ = ours.read_to_end(&mut back);
    assert!(back.is_empty(), "the responder answered a stranger");
});
