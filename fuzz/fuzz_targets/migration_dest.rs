//! The destination of a live migration reading a hostile source: the input
//! is a list of (kind, length, payload) records that the harness frames
//! (magic, version, length, CRC32) and sends over loopback TCP, inside
//! the authenticated channel (a key holder gone bad); a kind with
//! the high bit set goes on the wire unframed. The destination runs as
//! `ffmk-vmm run --incoming` does: hello check, pages into guest memory
//! (answering SYNC), the machine state (parsed as a restore would) or
//! the post-copy switch (state and missing-page bitmap), then READY/GO.
//! What must hold: no panic and no hang; every error is an `Error` value.
#![no_main]
use ffmk_fuzz::{
    feed_plane, listener, memory, migration_hello, migration_stream, plane_pair, Input,
};
use libfuzzer_sys::fuzz_target;
use migrate::dest::{Arrival, Incoming};
use std::net::TcpListener;
use std::sync::OnceLock;
use std::time::Duration;

fn loopback() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(listener)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let postcopy = input.u8() & 1 != 0;
    let stream = migration_stream(&mut input);
    let Some((ours, theirs)) = plane_pair(loopback(), "migration") else {
        return;
    };
    let writer = feed_plane(ours, stream);
    let mem = memory(&ffmk_fuzz::MIGRATION_REGIONS);
    if let Ok(incoming) = Incoming::new(theirs, Duration::from_secs(2)) {
        // (One stream: no further connections come to a fuzzed stream.)
        let mut incoming = incoming.max_streams(1);
        let mine = migration_hello(postcopy);
        if incoming.hello(&mine, |_| Ok(())).is_ok() {
            match incoming.memory(&mem, &mut |_| None) {
                Ok(Arrival::State(state)) => {
                    let _ = vmm::machine::parse_state(&state);
                    let _ = incoming.switch_over(|| Ok(()));
                }
                Ok(Arrival::Postcopy { state, missing }) => {
                    assert_eq!(missing.pages(), 256);
                    let _ = vmm::machine::parse_state(&state);
                }
                Err(_) => {}
            }
        }
    }
    let _ = writer.join();
});
