//! Snapshots of VMs with virtio devices: the guest drives a device, the VM
//! is snapshotted mid-stream, its VMM killed, and a new VMM restores it.
//! The device must continue exactly where it stood (queue positions, ring
//! addresses, negotiated features, MSI-X), or the probe's ring-3 driver
//! sees a timeout, a stale completion or a gap in its counter.
mod common;

use common::{assert_consecutive, probe_argv_mem, tmpdir, NetNs, Vm};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn probe_run(task: &str, devices: &[&str]) -> Vec<String> {
    let mut extra = vec!["--test-exit-port"];
    extra.extend(devices);
    probe_argv_mem(task, "128M", &extra)
}

fn spawn(ns: Option<&NetNs>, dir: &Path, name: &str, args: &[String]) -> Vm {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vm::spawn_in(
        ns,
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

fn restore(ns: Option<&NetNs>, dir: &Path, name: &str, from: &Path, extra: &[&str]) -> Vm {
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        from.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(ns, dir, name, &args)
}

fn wait_line(vm: &Vm, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !vm.console().lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "no {line:?}: {}", vm.console());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn disk_io_continues_across_live_and_incremental_snapshots_and_restore() {
    let dir = tmpdir("snapdev-blk");
    let (image, disk) = common::disk_image(&dir);
    let vcon = dir.join("vcon.out");
    let vsock = format!("cid=7,socket={}", dir.join("v.sock").display());
    let ops = 150;
    // Besides the disk the guest drives, devices it leaves alone must come
    // back as they were too.
    let args = probe_run(
        &format!("task=blk op=stress ops={ops} hz=50 blocks=64"),
        &[
            "--disk",
            &disk,
            "--rng",
            "--virtio-console",
            vcon.to_str().unwrap(),
            "--vsock",
            &vsock,
        ],
    );
    let vm = spawn(None, &dir, "a", &args);
    vm.wait_counter(20);
    let snap = dir.join("snap");
    // Live: memory copied while the guest does disk I/O, a short pause at
    // the end.
    let live = vm.snapshot(&snap, &["--live"]);
    assert_eq!(live["live"], true, "{live}");
    assert!(live["pause_ms"].as_f64().unwrap() < 1000.0, "{live}");
    vm.wait_counter(45);
    assert!(vm.api(&["pause"]).status.success());
    let inc = vm.snapshot(&snap, &["--incremental"]);
    assert_eq!(inc["layers"], 2, "{inc}");
    let before = vm.console();
    vm.kill();

    // A restore opens no host file because the snapshot names it: not
    // the disk, not the virtio-console file, not the vsock socket, unless
    // this command line names them or allows the directory they are in.
    let dirs = dir.display().to_string();
    for (extra, want) in [
        (vec![], "the snapshot's disk 0 is"),
        (vec!["--allow-snapshot-paths", "/var/empty"], "--disk PATH"),
        (
            vec!["--disk", image.to_str().unwrap()],
            "the snapshot's virtio-console file is",
        ),
        (
            vec!["--disk", &disk, "--disk", image.to_str().unwrap()],
            "the snapshot has 1 disk(s), --disk names 2",
        ),
    ] {
        let (code, err) = restore(None, &dir, "refused", &snap, &extra).wait_exit();
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // The disk image is not in the snapshot: without it, restore refuses.
    let moved = dir.join("moved.img");
    std::fs::rename(&image, &moved).unwrap();
    let (code, err) = restore(
        None,
        &dir,
        "missing",
        &snap,
        &["--allow-snapshot-paths", &dirs],
    )
    .wait_exit();
    // Bad input, as for run (docs/operations.md: one rule).
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("disk.img"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::rename(&moved, &image).unwrap();

    // This host's files named on the command line.
    let r = restore(
        None,
        &dir,
        "b",
        &snap,
        &[
            "--disk",
            &disk,
            "--virtio-console",
            dir.join("vcon2.out").to_str().unwrap(),
            "--vsock",
            &format!("cid=7,socket={}", dir.join("v2.sock").display()),
        ],
    );
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert!(
        after.lines().any(|l| l.starts_with("blk_verified=")),
        "{after}"
    );
    assert_consecutive(&(before + &after), ops);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn network_echo_continues_after_restore_on_a_new_tap() {
    let Some(ns) = NetNs::new("snapnet") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let dir = tmpdir("snapdev-net");
    let tap = "ffmks0";
    let args = probe_run(
        "task=net op=echo count=16 ip=10.0.0.2 timeout_ms=60000",
        &["--net", &format!("tap={tap},mac=52:54:00:12:34:57")],
    );
    let vm = spawn(Some(&ns), &dir, "a", &args);
    wait_line(&vm, "mac=52:54:00:12:34:57");
    let echo = |ns: &NetNs, from: usize| {
        // The TAP is the VMM's: address it each time a VMM made it.
        assert!(ns.ip(&["addr", "add", "10.0.0.1/24", "dev", tap]));
        assert!(ns.ip(&["link", "set", tap, "up"]));
        ns.run(move || {
            let s = UdpSocket::bind("10.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for i in from..from + 8 {
                let msg: Vec<u8> = (0..100 + i * 50).map(|j| (j * 13 + i) as u8).collect();
                s.send_to(&msg, "10.0.0.2:7777").unwrap();
                let mut buf = [0u8; 2048];
                let (n, _) = s
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("echo {i}: {e}"));
                assert_eq!(&buf[..n], &msg[..], "datagram {i} came back changed");
            }
        })
    };
    echo(&ns, 0);
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();

    // TAP devices only from the command line.
    let (code, err) = restore(Some(&ns), &dir, "refused", &snap, &[]).wait_exit();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--net tap=NAME") && err.contains(tap), "{err}");
    let r = restore(
        Some(&ns),
        &dir,
        "b",
        &snap,
        &["--net", &format!("tap={tap}")],
    );
    // The restored VMM made the TAP again; the guest's receive buffers
    // from before the snapshot take the next datagrams.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.ip(&["link", "show", tap]) {
        assert!(Instant::now() < deadline, "no TAP after restore");
        std::thread::sleep(Duration::from_millis(50));
    }
    echo(&ns, 8);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert!(after.lines().any(|l| l == "echoed=16"), "{after}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A restored VM is announced on its TAP when it first runs (RARP, five
/// rounds, docs/migration.md), once per restore, not while it stays
/// paused, and never with `announce=off`; `ffmk-vmm announce` announces
/// a running VM again. The TAP joins a bridge, so the VMM brings it up itself (a TAP
/// that is down takes no frames).
#[test]
fn a_restored_vm_is_announced_when_it_first_runs() {
    let Some(ns) = NetNs::new("snapann") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    assert!(ns.ip(&["link", "add", "ffmkabr", "type", "bridge"]));
    assert!(ns.ip(&["link", "set", "ffmkabr", "up"]));
    let dir = tmpdir("snapdev-announce");
    let net = "tap=ffmka0,bridge=ffmkabr,mac=52:54:00:12:34:58";
    let args = probe_run("task=net op=echo count=1 timeout_ms=60000", &["--net", net]);
    let vm = spawn(Some(&ns), &dir, "a", &args);
    wait_line(&vm, "mac=52:54:00:12:34:58");
    let announced = |vm: &Vm| {
        let info: serde_json::Value =
            serde_json::from_slice(&vm.api(&["info"]).stdout).unwrap_or_default();
        common::virtio_net_info(&info)["counters"]["announced"].as_u64()
    };
    // A VM that booted here announces nothing by itself.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(announced(&vm), Some(0));
    // ... but does when an operator asks (`POST /vm/announce`): five
    // rounds, the MAC named.
    let out = vm.api(&["announce"]);
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        said,
        serde_json::json!({"macs": ["52:54:00:12:34:58"], "rounds": 5})
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while announced(&vm) != Some(5) {
        assert!(Instant::now() < deadline, "{:?}", announced(&vm));
        std::thread::sleep(Duration::from_millis(100));
    }
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();
    let r = restore(Some(&ns), &dir, "b", &snap, &["--paused", "--net", net]);
    // Paused: not yet (the VM does not run here).
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(announced(&r), Some(0), "{}", r.describe());
    assert!(r.api(&["resume"]).status.success());
    // The five rounds take 0.8 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while announced(&r) != Some(5) {
        assert!(Instant::now() < deadline, "{:?}", announced(&r));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pausing and resuming again announces nothing more.
    assert!(r.api(&["pause"]).status.success());
    assert!(r.api(&["resume"]).status.success());
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(announced(&r), Some(5));
    r.kill();
    // announce=off: never, and an operator's announce is refused (409,
    // exit 4: refused) with why.
    let quiet = format!("{net},announce=off");
    let r = restore(Some(&ns), &dir, "c", &snap, &["--net", &quiet]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(announced(&r), Some(0), "{}", r.describe());
    let out = r.api(&["announce"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("announce=off"), "{err}");
    assert_eq!(announced(&r), Some(0));
    r.kill();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Connects to guest port 1234 through the VMM's socket, sends `data` and
/// returns what came back (`close`: half-close, then read to the end).
fn vsock_echo(sock: &Path, data: &[u8], close: bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    s.write_all(data).unwrap();
    let mut got = Vec::new();
    if close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
        rd.read_to_end(&mut got).unwrap();
    } else {
        got.resize(data.len(), 0);
        rd.read_exact(&mut got).unwrap();
    }
    got
}

#[test]
fn vsock_guest_serves_a_new_connection_after_restore() {
    let dir = tmpdir("snapdev-vsock");
    let sock = dir.join("v.sock");
    let args = probe_run(
        "task=vsock op=echo port=1234 bytes=5000 conns=2",
        &["--vsock", &format!("cid=9,socket={}", sock.display())],
    );
    let vm = spawn(None, &dir, "a", &args);
    wait_line(&vm, "vsock_cid=9");
    // One connection before the snapshot moves the queues along.
    let first: Vec<u8> = (0..2000).map(|i| (i * 7) as u8).collect();
    assert!(
        vsock_echo(&sock, &first, true) == first,
        "first echo differs"
    );
    wait_line(&vm, "conn_done=1");
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();

    // The snapshot's own socket path, allowed by its directory.
    let dirs = dir.display().to_string();
    let r = restore(None, &dir, "b", &snap, &["--allow-snapshot-paths", &dirs]);
    let second: Vec<u8> = (0..3000).map(|i| (i * 11) as u8).collect();
    assert!(vsock_echo(&sock, &second, false) == second, "echo differs");
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert!(after.lines().any(|l| l == "echoed=5000"), "{after}");
    std::fs::remove_dir_all(dir).unwrap();
}
