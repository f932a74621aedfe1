//! The API's HTTP/1.1 request reader and router, as the API thread runs
//! them on what a local client sends over the Unix socket: header and body
//! limits, Content-Length, the request line, then the route and its JSON
//! body. What must hold: no panic; a request that is read is at most 1 MiB
//! of body; every refusal carries a 4xx status.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let Ok(req) = vmm::api::http::read_request(&mut r) else {
        return;
    };
    assert!(req.body.len() <= 1 << 20);
    if let Err(resp) = vmm::api::route(&req.method, &req.path, &req.body) {
        assert!((400..500).contains(&resp.status), "status {}", resp.status);
    }
});
