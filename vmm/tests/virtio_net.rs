//! virtio-net end to end: the probe guest's ring-3 driver answers ARP and
//! echoes UDP datagrams that a host-side socket sends through a TAP. The
//! VMM and the host side run in a network namespace of their own (a separate
//! "host"), so the test touches none of the machine's interfaces.
mod common;

use common::{ffmk, probe, probe_argv, tmpdir, vmm, NetNs, Running};
use std::net::UdpSocket;
use std::time::Duration;

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
