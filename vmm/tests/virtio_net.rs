//! virtio-net end to end: the probe guest's ring-3 driver answers ARP and
//! echoes UDP datagrams that a host-side socket sends through a TAP. The
//! VMM and the host side run in a network namespace of their own (a separate
//! "host"), so the test touches none of the machine's interfaces.
mod common;

use common::{capture, ffmk, probe, probe_argv, tmpdir, vmm, Cluster, NetNs, Running, Vm};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Boots the probe with `task` and `--net net` inside the namespace.
fn start_probe(ns: &NetNs, task: &str, net: &str) -> Running {
    let mut argv = vec![
        "netns".to_string(),
        "exec".into(),
        ns.0.clone(),
        vmm().into(),
    ];
    argv.extend(probe_argv(task, &["--test-exit-port", "--net", net]));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    Running::start_with("ip", &argv)
}

#[test]
fn guest_echoes_udp_datagrams_through_a_tap_byte_for_byte() {
    let Some(ns) = NetNs::new("net") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let dir = tmpdir("net");
    let count = 32;
    let task = format!("task=net op=echo count={count} ip=10.0.0.2 timeout_ms=20000");
    let mut vm = start_probe(&ns, &task, "tap=ffmk0,mac=52:54:00:12:34:56");
    let mac = vm
        .next_line(Duration::from_secs(10), |l| l.starts_with("mac="))
        .expect("the guest found its NIC");
    assert_eq!(mac, "mac=52:54:00:12:34:56");
    // ffmk-vmm created the TAP: give it an address on the guest's subnet.
    assert!(ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmk0"]));
    assert!(ns.ip(&["link", "set", "ffmk0", "up"]));
    let echoed = ns.run(move || {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ok = 0;
        for i in 0..count {
            // Sizes from tiny to a full 1472-byte payload, varied contents.
            let len = 1 + (i * 97) % 1472;
            let msg: Vec<u8> = (0..len).map(|j| (j * 31 + i * 7) as u8).collect();
            s.send_to(&msg, "10.0.0.2:7777").unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).expect("echo arrives");
            assert_eq!(from.to_string(), "10.0.0.2:7777");
            assert_eq!(&buf[..n], &msg[..], "datagram {i} came back changed");
            ok += 1;
        }
        ok
    });
    assert_eq!(echoed, count);
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A guest that resets its NIC (a driver reload, kexec, a reboot) finds it
/// working again: the TAP stays with the device (the VMM's threads may not
/// open /dev/net/tun once the VM runs, so it is never reopened).
#[test]
fn a_nic_the_guest_resets_keeps_its_tap() {
    let Some(ns) = NetNs::new("nreset") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let (count, resets) = (4, 2);
    let task = format!("task=net op=echo count={count} resets={resets} timeout_ms=20000");
    let mut vm = start_probe(&ns, &task, "tap=ffmkr0");
    vm.next_line(Duration::from_secs(10), |l| l.starts_with("mac="))
        .expect("the guest found its NIC");
    assert!(ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmkr0"]));
    assert!(ns.ip(&["link", "set", "ffmkr0", "up"]));
    let total = count * (resets + 1);
    let echoed = ns.run(move || {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        // While the guest resets its NIC a datagram may go unanswered:
        // send again until it is echoed.
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        for i in 0..total {
            let msg = format!("datagram {i}");
            let mut buf = [0u8; 2048];
            let echoed = (0..40).any(|_| {
                // (With the TAP gone, as before this was fixed: unreachable.)
                if s.send_to(msg.as_bytes(), "10.0.0.2:7777").is_err() {
                    std::thread::sleep(Duration::from_millis(500));
                    return false;
                }
                s.recv_from(&mut buf)
                    .is_ok_and(|(n, _)| &buf[..n] == msg.as_bytes())
            });
            assert!(echoed, "datagram {i} never came back");
            ok += 1;
        }
        ok
    });
    assert_eq!(echoed, total);
    let (code, err) = vm.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !err.contains("cannot reopen") && !err.contains("in use"),
        "{err}"
    );
    let console = vm.drain().join("\n");
    assert!(console.contains(&format!("reset={resets}")), "{console}");
}

/// `--net tap=NAME,bridge=BR`: the VMM makes its TAP a port of the bridge
/// and brings it up; the guest is on the bridge's network with nobody
/// touching the TAP. A bridge that does not exist is one clear error.
#[test]
fn a_tap_joins_the_bridge_it_is_given() {
    let Some(ns) = NetNs::new("nbridge") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    assert!(ns.ip(&["link", "add", "ffmkbr0", "type", "bridge"]));
    assert!(ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmkbr0"]));
    assert!(ns.ip(&["link", "set", "ffmkbr0", "up"]));
    let count = 8;
    let task = format!("task=net op=echo count={count} timeout_ms=20000");
    let mut vm = start_probe(&ns, &task, "tap=ffmkb0,bridge=ffmkbr0");
    vm.next_line(Duration::from_secs(10), |l| l.starts_with("mac="))
        .expect("the guest found its NIC");
    let link = ns
        .exec("ip")
        .args(["-o", "link", "show", "ffmkb0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(
        link.contains("master ffmkbr0") && link.contains(",UP"),
        "{link}"
    );
    let echoed = ns.run(move || {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut ok = 0;
        for i in 0..count {
            let msg = format!("over the bridge {i}");
            let mut buf = [0u8; 2048];
            // The bridge's port may take a moment to forward (learning).
            let back = (0..20).any(|_| {
                s.send_to(msg.as_bytes(), "10.0.0.2:7777").is_ok()
                    && s.recv_from(&mut buf)
                        .is_ok_and(|(n, _)| &buf[..n] == msg.as_bytes())
            });
            assert!(back, "{msg} never came back");
            ok += 1;
        }
        ok
    });
    assert_eq!(echoed, count);
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    // No such bridge: refused before the guest starts, one line.
    let out = ns
        .exec(vmm())
        .args(probe_argv(
            "task=hello",
            &["--net", "tap=ffmkb1,bridge=nosuchbr"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no bridge of that name"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn guest_measures_transmit_throughput_and_every_datagram_arrives() {
    let Some(ns) = NetNs::new("nbench") else {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let count = 2000;
    let task = format!("task=net op=bench count={count} size=1000");
    let mut vm = start_probe(&ns, &task, "tap=ffmk1");
    vm.next_line(Duration::from_secs(10), |l| l.starts_with("mac="))
        .expect("the guest found its NIC");
    assert!(ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmk1"]));
    assert!(ns.ip(&["link", "set", "ffmk1", "up"]));
    let received = ns.run(move || {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // Room for every datagram even when this thread is slow to run (the
        // guest sends as fast as it can; UDP has no flow control).
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt reads one c_int from a live local.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        s.send_to(b"start", "10.0.0.2:7777").unwrap();
        let mut n = 0;
        let mut buf = [0u8; 2048];
        while n < count {
            match s.recv_from(&mut buf) {
                Ok((len, _)) => {
                    assert_eq!(len, 1000);
                    assert!(buf[..len].iter().enumerate().all(|(i, b)| *b == i as u8));
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    });
    assert_eq!(
        received, count,
        "every datagram the guest sent arrived intact"
    );
    let mib_s: u64 = vm
        .next_line(Duration::from_secs(5), |l| l.starts_with("tx_mib_s="))
        .and_then(|l| l["tx_mib_s=".len()..].parse().ok())
        .expect("the guest reports its rate");
    assert!(mib_s > 0);
    // The receive phase ends 2 s after the last datagram (none are sent here).
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}

/// The probe running `task` with `--net src_net` on host 0 of `cluster`,
/// and a destination for it on host 1 (`--net dst_net`) listening on
/// `listen` (`tcp://ADDR:PORT`); consoles and sockets in `dir`.
fn probe_and_destination(
    cluster: &Cluster,
    dir: &std::path::Path,
    task: &str,
    src_net: &str,
    listen: &str,
    dst_net: &str,
) -> (Vm, Vm) {
    let src_args = probe_argv(task, &["--test-exit-port", "--net", src_net]);
    let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let src = Vm::spawn_in(
        Some(&cluster.hosts[0]),
        &src_args,
        &dir.join("src.console"),
        &dir.join("src.sock"),
    );
    let dst = Vm::spawn_in(
        Some(&cluster.hosts[1]),
        &[
            "run",
            "--incoming",
            listen,
            "--memory",
            "64M",
            "--test-exit-port",
            "--net",
            dst_net,
        ],
        &dir.join("dst.console"),
        &dir.join("dst.sock"),
    );
    (src, dst)
}

/// `ffmk-vmm migrate` of `src` to `to` (`tcp://ADDR:PORT`), to its end.
fn migrate(src: &Vm, to: &str) -> std::process::Output {
    ffmk()
        .args(["migrate", "--api-socket"])
        .arg(&src.sock)
        .args(["--to", to, "--json"])
        .output()
        .unwrap()
}

/// After a live migration the destination announces the VM on its new
/// TAP as QEMU does (docs/migration.md): RARP broadcasts from the VM's MAC,
/// five rounds in about 0.8 s, so switches learn the new port before a
/// peer's traffic is lost to the old one; the guest's network works there.
#[test]
fn a_migrated_vm_is_announced_on_its_new_tap() {
    let Some(cluster) = Cluster::new("nann", 2) else {
        return;
    };
    let dir = tmpdir("net-announce");
    let mac = "52:54:00:aa:bb:01";
    let task = "task=net op=echo count=4 ip=10.0.0.2 timeout_ms=60000";
    let listen = format!("tcp://{}:7311", Cluster::addr(1));
    let (src, dst) = probe_and_destination(
        &cluster,
        &dir,
        task,
        &format!("tap=ffmks0,mac={mac}"),
        &listen,
        "tap=ffmkd0",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&src.console)
        .unwrap_or_default()
        .contains("mac=")
    {
        assert!(
            Instant::now() < deadline,
            "the guest found no NIC: {}",
            src.describe()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The destination made its TAP when it built the VM ahead.
    let host = &cluster.hosts[1];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.ip(&["link", "set", "ffmkd0", "up"]) {
        assert!(
            Instant::now() < deadline,
            "no TAP on the destination: {}",
            dst.describe()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(host.ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmkd0"]));
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (out, done, frames) = std::thread::scope(|scope| {
        let frames = scope.spawn(|| {
            host.run(move || capture("ffmkd0", 0x8035, Duration::from_secs(4), ready_tx))
        });
        ready.recv().unwrap();
        let out = migrate(&src, &listen);
        let done = Instant::now();
        (out, done, frames.join().unwrap())
    });
    assert!(out.status.success(), "{out:?}\n{}", dst.describe());
    let want_mac = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
    let rarps: Vec<&(Instant, Vec<u8>)> = frames
        .iter()
        .filter(|(_, f)| f.len() >= 42 && f[6..12] == want_mac && f[20..22] == [0, 3])
        .collect();
    let info = dst.api(&["info"]);
    assert_eq!(
        rarps.len(),
        5,
        "RARP rounds seen: {} of {} frames; {}",
        rarps.len(),
        frames.len(),
        String::from_utf8_lossy(&info.stdout)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let net = common::virtio_net_info(&info);
    assert_eq!(net["counters"]["announced"], 5, "{info}");
    // The VM kept its MAC (the destination's --net named none).
    assert!(
        net["device"].as_str().is_some_and(|d| d.ends_with(mac)),
        "{info}"
    );
    for (_, f) in &rarps {
        assert_eq!(&f[0..6], &[0xff; 6], "a broadcast");
        assert_eq!(&f[22..28], &want_mac, "the sender's hardware address");
    }
    // Rounds at 0, 50, 200, 450, 800 ms: the whole announcement within a
    // second or two of the switch-over, spread over most of a second.
    let first = rarps[0].0;
    let spread = rarps[4].0 - first;
    assert!(
        spread >= Duration::from_millis(600) && spread < Duration::from_millis(2000),
        "rounds spread over {spread:?}"
    );
    assert!(
        first <= done + Duration::from_secs(1),
        "the first round came late"
    );
    // The guest answers on its new host.
    let echoed = host.run(|| {
        let s = UdpSocket::bind("10.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (0..4)
            .filter(|i| {
                let msg = format!("after the move {i}");
                let mut buf = [0u8; 64];
                s.send_to(msg.as_bytes(), "10.0.0.2:7777").unwrap();
                s.recv_from(&mut buf)
                    .is_ok_and(|(n, _)| &buf[..n] == msg.as_bytes())
            })
            .count()
    });
    assert_eq!(echoed, 4, "{}", dst.describe());
    let (code, err) = dst.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The shape of a cluster's Ethernet: hosts 0 and 1 put their uplink and
/// their VMs' TAPs on a bridge of their own (`vmbr`), all hosts meet on the
/// switch, and a peer on host 2 talks to the VM, which moves from host 0 to
/// host 1. The switch learnt the VM's MAC on host 0's port; the
/// destination's announcement moves it over (with `announce=off` nothing
/// does: the probe only answers, and the frames the destination's TAP
/// queued before the VM arrived, such as the peer's first ARP request,
/// are dropped). Returns how long after the
/// migration's end the peer, starting to send then (every 10 ms), had its
/// first echo (None: not within 6 s).
fn peer_reaches_after_a_move(tag: &str, dst_net: &str) -> Option<Duration> {
    let cluster = Cluster::new(tag, 3).expect("namespaces");
    for i in 0..2 {
        let h = &cluster.hosts[i];
        let (uplink, addr) = (format!("h{i}"), format!("{}/24", Cluster::addr(i)));
        assert!(h.ip(&["link", "add", "vmbr", "type", "bridge"]));
        assert!(h.ip(&["addr", "del", &addr, "dev", &uplink]));
        assert!(h.ip(&["link", "set", &uplink, "master", "vmbr"]));
        assert!(h.ip(&["addr", "add", &addr, "dev", "vmbr"]));
        assert!(h.ip(&["link", "set", "vmbr", "up"]));
    }
    let dir = tmpdir(tag);
    let vm_ip = "10.77.0.50";
    let task = format!("task=net op=echo count=100000 ip={vm_ip} timeout_ms=60000");
    let listen = format!("tcp://{}:7312", Cluster::addr(1));
    let (src, dst) = probe_and_destination(
        &cluster,
        &dir,
        &task,
        "tap=ffmkv0,bridge=vmbr,mac=52:54:00:aa:bb:03",
        &listen,
        dst_net,
    );
    let peer = &cluster.hosts[2];
    // The peer knows the VM's MAC for good: it sends no ARP request that
    // the VM would answer from its new host (which teaches the switch too).
    assert!(peer.ip(&[
        "neigh",
        "replace",
        vm_ip,
        "lladdr",
        "52:54:00:aa:bb:03",
        "dev",
        "h2",
        "nud",
        "permanent"
    ]));
    let to = format!("{vm_ip}:7777");
    // The peer reaches the VM on host 0 (ARP, then echoes): the switch has
    // learnt the VM's MAC on host 0's port.
    let reached = peer.run({
        let to = to.clone();
        move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 64];
            (0..20).any(|_| {
                s.send_to(b"before", &to).unwrap();
                s.recv_from(&mut buf)
                    .is_ok_and(|(n, _)| &buf[..n] == b"before")
            })
        }
    });
    assert!(reached, "the peer never reached the VM: {}", src.describe());
    // The VM is quiet at the switch-over (nothing of its own waits to be
    // sent there, which would teach the switch too).
    std::thread::sleep(Duration::from_millis(300));
    let out = migrate(&src, &listen);
    let done = Instant::now();
    assert!(out.status.success(), "{out:?}\n{}", dst.describe());
    // Then the peer sends every 10 ms until an echo comes, for 6 s at most.
    let first_echo = peer.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut buf = [0u8; 64];
        for n in 0u64.. {
            if done.elapsed() > Duration::from_secs(6) {
                return None;
            }
            s.send_to(&n.to_le_bytes(), &to).unwrap();
            if let Ok((8, _)) = s.recv_from(&mut buf) {
                return Some(done.elapsed());
            }
        }
        None
    });
    dst.kill();
    std::fs::remove_dir_all(dir).unwrap();
    first_echo
}

#[test]
fn a_peer_across_a_switch_reaches_a_migrated_vm_only_if_it_is_announced() {
    if NetNs::new("nswprobe").is_none() {
        eprintln!("skipped: cannot create network namespaces (needs root and iproute2)");
        return;
    }
    let with = peer_reaches_after_a_move("nswa", "tap=ffmkv1,bridge=vmbr");
    let without = peer_reaches_after_a_move("nswq", "tap=ffmkv1,bridge=vmbr,announce=off");
    eprintln!(
        "announce: the peer's first echo after the move: {with:?} announced, {without:?} not"
    );
    assert!(with.is_some_and(|t| t < Duration::from_secs(1)), "{with:?}");
    // Without: the switch keeps sending to host 0 (nothing from the VM
    // told it otherwise; its MAC table forgets after 300 s).
    assert_eq!(
        without, None,
        "the switch learnt the VM's new port unannounced"
    );
}

#[test]
fn bad_net_specs_are_refused_with_one_line_and_exit_code_2() {
    for (spec, want) in [
        ("tap=", "no tap name"),
        ("tap=x,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=x,mac=nonsense", "bad MAC"),
        ("tap=a-very-long-tap-name", "at most 15 bytes"),
        ("ifname=x", "unknown option"),
    ] {
        let out = ffmk()
            .args(["run", "--kernel"])
            .arg(probe())
            .args(["--net", spec])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert_eq!(err.lines().count(), 1, "{spec}: {err}");
        assert!(err.contains(want), "{spec}: {err}");
    }
}
