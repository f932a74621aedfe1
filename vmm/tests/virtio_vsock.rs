//! virtio-vsock end to end with the probe guest's ring-3 vsock stack: a host
//! program reaches a guest port through the Unix socket (`CONNECT <port>`),
//! and the guest reaches a host program listening on `<socket>_<port>`.
mod common;

use common::{probe_argv, tmpdir, Running};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

fn start(task: &str, sock: &Path) -> Running {
    let vsock = format!("cid=3,socket={}", sock.display());
    Running::start_owned(&probe_argv(task, &["--test-exit-port", "--vsock", &vsock]))
}

fn connect(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn host_connects_to_a_guest_port_and_gets_its_bytes_back() {
    let dir = tmpdir("vsock-h2g");
    let sock = dir.join("v.sock");
    let total = 2_000_000usize;
    // The guest echoes until the host half-closes (bytes= is larger).
    let mut vm = start(
        &format!("task=vsock op=echo port=1234 bytes={}", 2 * total),
        &sock,
    );
    vm.next_line(Duration::from_secs(10), |l| l == "vsock_cid=3")
        .expect("guest sees its CID");
    let mut s = connect(&sock);
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        s.write_all(&sent).unwrap();
        // Half close: we send no more but still read the echo.
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    r.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    r.read_to_end(&mut got).expect("the echo, then EOF");
    writer.join().unwrap();
    assert_eq!(
        got.len(),
        total,
        "every byte came back, then the stream closed"
    );
    assert!(got == data, "echo differs");
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn guest_connects_to_a_host_listener_and_refused_ports_are_reset() {
    let dir = tmpdir("vsock-g2h");
    let sock = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        c.write_all(format!("hi guest, you said {msg}\n").as_bytes())
            .unwrap();
        msg
    });
    let mut vm = start(
        "task=vsock op=connect port=5000 msg=hello-from-probe",
        &sock,
    );
    let reply = vm
        .next_line(Duration::from_secs(10), |l| l.starts_with("reply="))
        .expect("the guest got a reply");
    assert_eq!(reply, "reply=hi guest, you said hello-from-probe");
    assert_eq!(host.join().unwrap(), "hello-from-probe");
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    // Nobody listens on port 5001: the guest's request is reset.
    let mut vm = start("task=vsock op=connect port=5001", &sock);
    assert!(vm
        .next_line(Duration::from_secs(10), |l| l == "connect_refused=1")
        .is_some());
    let (code, _) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(!sock.exists(), "the vsock socket is removed on exit");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_connect_lines_get_an_error_and_the_device_goes_on() {
    let dir = tmpdir("vsock-bad");
    let sock = dir.join("v.sock");
    let mut vm = start("task=vsock op=echo port=1234 bytes=5", &sock);
    vm.next_line(Duration::from_secs(10), |l| l == "vsock_cid=3")
        .unwrap();
    let mut bad = connect(&sock);
    bad.write_all(b"HELLO there\n").unwrap();
    let mut line = String::new();
    BufReader::new(bad).read_line(&mut line).unwrap();
    assert!(line.starts_with("ERROR"), "{line:?}");
    // A good client still works afterwards.
    let mut s = connect(&sock);
    s.write_all(b"CONNECT 1234\nhello").unwrap();
    let mut r = BufReader::new(s);
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let mut five = [0u8; 5];
    r.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"hello");
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
