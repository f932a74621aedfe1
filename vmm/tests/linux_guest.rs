//! Linux end-to-end: a Linux kernel boots with the busybox initramfs to
//! `/init`, which runs the command after `--`, reports its status through the
//! test exit port and powers off. With stock Linux drivers: an ext4 image on
//! virtio-blk (built with `mkfs.ext4 -d`, read and written, checked on the
//! host with debugfs) and virtio-net on a TAP in a network namespace (ping,
//! and a 1 MiB HTTP/TCP transfer checked by MD5), and vsock both ways (the
//! initramfs's `vsock-tool` against Unix sockets).
//!
//! The kernel is Debian's stock one (`guest-images/build debian`: its
//! bzImage, the ELF vmlinux inside it and an initramfs with its driver
//! modules); `FFMK_LINUX_KERNEL=minimal` takes the project's minimal kernel
//! instead (`guest-images/build minimal`).
//!
//! Guest ring 0 must run at native speed for this: on a PVM-backed KVM host
//! (see docs/pvm-hosts.md) these tests print "skipped: PVM host" and pass
//! without booting; there `ci/test-linux` runs them inside the nested-KVM lab
//! (ci/lab, docs/lab.md). FFMK_LINUX_ON_PVM=1 runs them on the PVM host anyway.
mod common;

use common::linux::{base_cmdline, images, run_argv, timeout, wait_console, KERNEL_LOG};
use common::{tmpdir, Running};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Boot {
    code: Option<i32>,
    stderr: String,
    console: Vec<String>,
}

fn boot(kernel: &Path, initrd: &Path, cpus: &str, args: &str) -> Boot {
    boot_with(kernel, initrd, cpus, args, &[], None)
}

/// Boots with extra `ffmk-vmm run` flags, optionally inside network
/// namespace `netns` (through `ip netns exec`).
fn boot_with(
    kernel: &Path,
    initrd: &Path,
    cpus: &str,
    args: &str,
    extra: &[&str],
    netns: Option<&str>,
) -> Boot {
    let cmdline = format!("{} {args}", base_cmdline());
    let kernel = kernel.to_string_lossy();
    let initrd = initrd.to_string_lossy();
    let mut argv: Vec<&str> = vec![
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cpus",
        cpus,
        "--memory",
        "512M",
        "--test-exit-port",
        "--cmdline",
        &cmdline,
    ];
    argv.extend_from_slice(extra);
    let mut vm = match netns {
        Some(ns) => {
            let mut full = vec!["netns", "exec", ns, common::vmm()];
            full.extend_from_slice(&argv);
            Running::start_with("ip", &full)
        }
        None => Running::start(&argv),
    };
    let (code, stderr) = vm.wait(timeout());
    Boot {
        code,
        stderr,
        console: vm.drain(),
    }
}

fn has_line(b: &Boot, want: &str) -> bool {
    b.console.iter().any(|l| l.contains(want))
}

#[test]
fn vmlinux_boots_through_pvh_to_init_and_reports_the_command_status() {
    let Some((vmlinux, _, initrd)) = images() else {
        return;
    };
    let b = boot(
        &vmlinux,
        &initrd,
        "2",
        "ffmk_exit_port=244 -- echo ffmk-marker-$((6*7)); exit 7",
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(has_line(&b, "ffmk-init: up"), "{ctx}");
    assert!(has_line(&b, "cpus=2"), "both vCPUs came up: {ctx}");
    assert!(has_line(&b, "ffmk-marker-42"), "{ctx}");
    assert_eq!(b.code, Some(7), "{ctx}");
}

#[test]
fn bzimage_boots_with_the_64bit_protocol_and_powers_off_cleanly() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    // No exit port write: /init's poweroff goes through the ACPI sleep
    // registers, which ffmk-vmm reports as a clean stop (exit code 0).
    let b = boot(
        &bzimage,
        &initrd,
        "4",
        "-- grep -c ^processor /proc/cpuinfo",
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(has_line(&b, "ffmk-init: up"), "{ctx}");
    assert!(b.console.iter().any(|l| l.trim() == "4"), "{ctx}");
    assert!(has_line(&b, "ffmk-init: exit=0"), "{ctx}");
    assert_eq!(b.code, Some(0), "{ctx}");
    assert!(b.stderr.contains("powered off"), "{ctx}");
}

#[test]
fn linux_mounts_a_virtio_blk_ext4_image_reads_and_writes_it() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-blk");
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "ffmk-hello-from-the-host\n").unwrap();
    let img = dir.join("fs.ext4");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&img)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)")
        .success();
    assert!(ok, "mkfs.ext4 -d failed");
    let disk = format!("path={}", img.display());
    let b = boot_with(
        &bzimage,
        &initrd,
        "2",
        "ffmk_exit_port=244 -- mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && \
         cat /mnt/hello.txt && echo ffmk-written-by-the-guest > /mnt/new.txt && umount /mnt",
        &["--disk", &disk],
        None,
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(has_line(&b, "ffmk-hello-from-the-host"), "{ctx}");
    assert_eq!(b.code, Some(0), "{ctx}");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /new.txt"])
        .arg(&img)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ffmk-written-by-the-guest",
        "{ctx}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_pings_and_fetches_a_file_over_virtio_net() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let ns = format!("ffmk-lnet-{}", std::process::id());
    if !std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!("skipped: cannot create a network namespace (needs root)");
        return;
    }
    // The host side, inside the namespace: configure the TAP once ffmk-vmm
    // created it, then serve a 1 MiB blob over TCP to the first client.
    let blob: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let md5 = {
        let f = tempfile_path("blob");
        std::fs::write(&f, &blob).unwrap();
        let out = std::process::Command::new("md5sum")
            .arg(&f)
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        std::fs::remove_file(&f).unwrap();
        sum
    };
    let ns_host = ns.clone();
    let server = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{ns_host}")).unwrap();
        // SAFETY: moves only this thread into the namespace.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + timeout();
        while !ip(&["link", "show", "ffmkl0"]) {
            assert!(std::time::Instant::now() < deadline, "no TAP");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ip(&["addr", "add", "10.0.0.1/24", "dev", "ffmkl0"]));
        assert!(ip(&["link", "set", "ffmkl0", "up"]));
        // A minimal HTTP server: busybox wget is the guest's client.
        let l = std::net::TcpListener::bind("10.0.0.1:5000").unwrap();
        // Non-blocking accept until the deadline: a guest that never
        // connects fails the test instead of hanging it.
        l.set_nonblocking(true).unwrap();
        let mut c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        c.set_nonblocking(false).unwrap();
        let mut req = Vec::new();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            match std::io::Read::read(&mut c, &mut byte) {
                Ok(1) => req.push(byte[0]),
                _ => break,
            }
        }
        let head = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            blob.len()
        );
        std::io::Write::write_all(&mut c, head.as_bytes()).unwrap();
        std::io::Write::write_all(&mut c, &blob).unwrap();
    });
    let b = boot_with(
        &bzimage,
        &initrd,
        "2",
        // Then the driver is reloaded (the device is reset and brought up
        // again, as by kexec or a reboot): the TAP must still be there.
        // One quoted word: the kernel passes init at most 32.
        "ffmk_exit_port=244 -- \"ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && \
         ping -c 2 -W 5 10.0.0.1 && wget -q -O - http://10.0.0.1:5000/blob | md5sum && \
         rmmod virtio_net && insmod /lib/modules/$(grep /virtio_net.ko /lib/modules/load-order) && \
         ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && ping -c 2 -W 5 10.0.0.1 && \
         echo reloaded=$((6*7))\"",
        &["--net", "tap=ffmkl0"],
        Some(&ns),
    );
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    server.join().expect("host side");
    assert!(has_line(&b, "2 packets received"), "{ctx}");
    assert!(has_line(&b, &md5), "the guest got the blob intact: {ctx}");
    assert!(
        // (Computed, so the kernel's echo of its command line cannot match.)
        has_line(&b, "reloaded=42"),
        "the NIC works after a driver reload: {ctx}"
    );
    assert!(!b.stderr.contains("cannot reopen"), "{ctx}");
    assert_eq!(b.code, Some(0), "{ctx}");
}

/// After a live migration a Linux guest is announced on its new TAP both
/// ways (docs/migration.md, "Announcing a moved VM"): the destination's
/// RARP broadcasts, and the guest's own gratuitous ARP, which its driver
/// sends when the device asks (VIRTIO_NET_F_GUEST_ANNOUNCE) and then
/// acknowledges on the control queue. The VM keeps its MAC.
#[test]
fn linux_migrated_guest_announces_itself_on_its_new_tap() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let Some(ns) = common::NetNs::new("lann") else {
        eprintln!("skipped: cannot create a network namespace (needs root)");
        return;
    };
    assert!(ns.ip(&["link", "set", "lo", "up"]));
    let dir = tmpdir("linux-announce");
    let mac = "52:54:00:aa:bb:02";
    let cmdline = format!(
        "{} ffmk_exit_port=244 -- \"ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && \
         echo net-up=$((6*7)) && sleep 600\"",
        base_cmdline()
    );
    let net = format!("tap=ffmka0,mac={mac}");
    let src = common::Vm::spawn_in(
        Some(&ns),
        &run_argv(&bzimage, &initrd, &cmdline, &["--net", &net]),
        &dir.join("src.console"),
        &dir.join("src.sock"),
    );
    let dst = common::Vm::spawn_in(
        Some(&ns),
        &[
            "run",
            "--incoming",
            "tcp://127.0.0.1:7398",
            "--memory",
            "512M",
            "--test-exit-port",
            "--net",
            "tap=ffmka1",
        ],
        &dir.join("dst.console"),
        &dir.join("dst.sock"),
    );
    wait_console(&src, "net-up=42");
    let deadline = std::time::Instant::now() + timeout();
    while !ns.ip(&["link", "set", "ffmka1", "up"]) {
        assert!(std::time::Instant::now() < deadline, "{}", dst.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (out, done, frames) = std::thread::scope(|scope| {
        // ETH_P_ALL: RARP and ARP alike (and whatever else the guest sends).
        let frames = scope.spawn(|| {
            ns.run(move || common::capture("ffmka1", 0x0003, Duration::from_secs(20), ready_tx))
        });
        ready.recv().unwrap();
        let out = common::ffmk()
            .args(["migrate", "--api-socket"])
            .arg(&src.sock)
            .args(["--to", "tcp://127.0.0.1:7398", "--json"])
            .output()
            .unwrap();
        let done = std::time::Instant::now();
        (out, done, frames.join().unwrap())
    });
    assert!(out.status.success(), "{out:?}\n{}", dst.describe());
    let want_mac = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02];
    let from_vm = |ethertype: [u8; 2]| -> Vec<&(std::time::Instant, Vec<u8>)> {
        frames
            .iter()
            .filter(|(_, f)| f.len() >= 42 && f[6..12] == want_mac && f[12..14] == ethertype)
            .collect()
    };
    let rarps = from_vm([0x80, 0x35]);
    // A gratuitous ARP: the guest's address as sender and as target.
    let garps: Vec<_> = from_vm([0x08, 0x06])
        .into_iter()
        .filter(|(_, f)| f[28..32] == [10, 0, 0, 2] && f[38..42] == [10, 0, 0, 2])
        .collect();
    let info = api_json(&dst, &["info"]);
    let ctx = format!(
        "{} frames captured; {info}\n{}",
        frames.len(),
        dst.describe()
    );
    assert_eq!(rarps.len(), 5, "{ctx}");
    assert!(!garps.is_empty(), "no gratuitous ARP from the guest: {ctx}");
    let net = common::virtio_net_info(&info);
    assert!(
        net["counters"]["guest_announced"].as_u64().unwrap_or(0) >= 1,
        "{ctx}"
    );
    assert!(
        net["device"].as_str().is_some_and(|d| d.ends_with(mac)),
        "{ctx}"
    );
    let ms = |t: std::time::Instant| t.saturating_duration_since(done).as_millis();
    eprintln!(
        "announced: RARP rounds {} (first {} ms after migrate returned), guest ARPs {} (first {} ms)",
        rarps.len(),
        ms(rarps[0].0),
        garps.len(),
        ms(garps[0].0)
    );
    let (src_code, err) = src.wait_exit();
    assert_eq!(src_code, Some(0), "{err}");
    dst.kill();
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ffmk-{}-{name}", std::process::id()))
}

#[test]
fn linux_vsock_connections_round_trip_both_ways() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tmpdir("linux-vsock");
    let sock = dir.join("v.sock");
    let vsock = format!("cid=3,socket={}", sock.display());
    let start = |cmd: &str| {
        let cmdline = format!("{} ffmk_exit_port=244 -- {cmd}", base_cmdline());
        Running::start(&run_argv(&bzimage, &initrd, &cmdline, &["--vsock", &vsock]))
    };
    // Host -> guest: the guest echoes on port 1234.
    let mut vm = start("vsock-tool echo 1234");
    vm.next_line(timeout(), |l| l.contains("vsock-tool: listening on 1234"))
        .expect("the guest listens");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i * 13 + i / 977) as u8)
        .collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        s.write_all(&sent).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = vec![0u8; data.len()];
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "echo differs");
    let (code, err) = vm.wait(timeout());
    assert_eq!(code, Some(0), "{err}");
    // Guest -> host: a host program listens on port 5000.
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + timeout();
    let host = std::thread::spawn(move || {
        // Accept until the deadline: a guest that never connects fails the
        // test instead of hanging it.
        let mut c = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return "(the guest never connected)".to_string();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        c.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        c.write_all(b"hello linux\n").unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let mut vm = start("vsock-tool send 2 5000 hello-from-linux");
    let reply = vm.next_line(timeout(), |l| l.contains("vsock-tool: reply"));
    let got = host.join().unwrap();
    if got != "hello-from-linux" {
        let _ = vm.child.kill();
        panic!("host side got {got:?}; console:\n{}", vm.drain().join("\n"));
    }
    assert!(reply.unwrap_or_default().contains("hello linux"));
    let (code, err) = vm.wait(timeout());
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Connects to guest port 1234 (`vsock-tool echo 1234`) through `sock`
/// and checks 64 KiB come back unchanged.
fn assert_vsock_echo(sock: &Path) {
    use std::io::{BufRead, BufReader, Read, Write};
    let deadline = std::time::Instant::now() + timeout() / 6;
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    rd.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = vec![0u8; data.len()];
    rd.read_exact(&mut got).unwrap();
    assert!(got == data, "echo differs");
}

/// Starts the bzImage (512 MiB, the test exit port, `extra` flags, the
/// kernel's `kernel_args`) running `cmd`, with its console and API socket
/// in `dir` under `name`.
fn spawn_bzimage(
    dir: &Path,
    name: &str,
    bzimage: &Path,
    initrd: &Path,
    extra: &[&str],
    kernel_args: &str,
    cmd: &str,
) -> common::Vm {
    let cmdline = format!(
        "{} {kernel_args} ffmk_exit_port=244 -- {cmd}",
        base_cmdline()
    );
    common::Vm::spawn(
        &run_argv(bzimage, initrd, &cmdline, extra),
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

/// Boots the bzImage with a vsock device on `vsock_sock` running
/// `vsock-tool echo 1234`, console and API socket in `dir` under `name`,
/// and waits until the guest listens.
fn boot_vsock_echo(
    dir: &Path,
    name: &str,
    bzimage: &Path,
    initrd: &Path,
    vsock_sock: &Path,
) -> common::Vm {
    let vsock = format!("cid=3,socket={}", vsock_sock.display());
    let vm = spawn_bzimage(
        dir,
        name,
        bzimage,
        initrd,
        &["--vsock", &vsock],
        "",
        "vsock-tool echo 1234",
    );
    wait_console(&vm, "vsock-tool: listening on 1234");
    vm
}

#[test]
fn linux_snapshot_restore_keeps_answering_on_vsock() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-snap");
    let sock = dir.join("v.sock");
    let vm = boot_vsock_echo(&dir, "a", &bzimage, &initrd, &sock);
    // Snapshot the booted guest, lose its VMM, restore it in a new one.
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();
    // The snapshot's own vsock socket path, allowed by its directory (a
    // restore takes no host path from a snapshot otherwise).
    let allow = dir.display().to_string();
    let r = common::Vm::restore(&dir, "b", &snap, &["--allow-snapshot-paths", &allow]);
    assert_vsock_echo(&sock);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_migrated_after_boot_keeps_answering_on_vsock() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-migrate");
    let vsock = |name: &str| format!("cid=3,socket={}", dir.join(name).display());
    let dst = spawn_incoming(
        &dir,
        "tcp://127.0.0.1:7399",
        &["--vsock", &vsock("dst.vsock")],
    );
    let src = boot_vsock_echo(&dir, "src", &bzimage, &initrd, &dir.join("src.vsock"));
    migrate_away(src, "tcp://127.0.0.1:7399");
    // The guest answers on the destination's vsock socket.
    assert_vsock_echo(&dir.join("dst.vsock"));
    let (code, err) = dst.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_keeps_its_noise_off_the_compute_cpu_and_decouples_a_process() {
    // (No second ` -- ` in a guest command: the kernel stops passing
    // arguments to init at it.)
    let Some((vmlinux, _, initrd)) = images() else {
        return;
    };
    if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
        eprintln!("skipped: needs two host cores");
        return;
    }
    let b = boot(
        &vmlinux,
        &initrd,
        "service=1,compute=1",
        "ffmk_exit_port=244 -- echo isolated=$(cat /sys/devices/system/cpu/isolated); \
         echo nohz_full=$(cat /sys/devices/system/cpu/nohz_full); \
         for f in /proc/irq/*/smp_affinity_list; do echo irq-affinity=$(cat $f); done; \
         ffmk-decouple list; ffmk-decouple run grep Cpus_allowed_list /proc/self/status; \
         ffmk-fwq fwq --cpus 1 --samples 2000",
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert_eq!(b.code, Some(0), "{ctx}");
    // Whole lines: the kernel echoes its command line (which holds both the
    // command and nohz_full=1) to the console too.
    let is_line = |want: &str| b.console.iter().any(|l| l.trim() == want);
    assert!(is_line("isolated=1"), "{ctx}");
    assert!(is_line("nohz_full=1"), "{ctx}");
    let affinities: Vec<&String> = b
        .console
        .iter()
        .filter(|l| l.starts_with("irq-affinity="))
        .collect();
    assert!(!affinities.is_empty(), "{ctx}");
    for a in affinities {
        assert!(
            a.trim_end().ends_with("irq-affinity=0"),
            "an IRQ may reach the compute CPU: {a}\n{ctx}"
        );
    }
    assert!(has_line(&b, "compute CPUs: 1"), "{ctx}");
    assert!(
        b.console
            .iter()
            .any(|l| l.contains("Cpus_allowed_list:") && l.trim_end().ends_with('1')),
        "{ctx}"
    );
    assert!(has_line(&b, "fwq cpu=1"), "{ctx}");
}

/// What `ffmk-checksum STEPS ITER` prints, computed here: the sum after
/// each step.
fn checksum_sums(steps: u64, iter: u64) -> Vec<u64> {
    let mut s = 0u64;
    (0..steps)
        .map(|k| {
            for i in 0..iter {
                s = (s * 31 + i + k) % 1_000_003;
            }
            s
        })
        .collect()
}

/// The (step, sum) lines and the final sum the checksum workload printed.
fn checksum_lines(console: &str) -> (Vec<(u64, u64)>, Option<u64>) {
    let num = |l: &str, key: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let steps = console
        .lines()
        .filter(|l| l.starts_with("checksum step="))
        .filter_map(|l| Some((num(l, "step")?, num(l, "sum")?)))
        .collect();
    let last = console
        .lines()
        .rev()
        .find(|l| l.starts_with("checksum final="))
        .and_then(|l| num(l, "final"));
    // (`num` finds `step=`, `sum=` and `final=` as words of the line.)
    (steps, last)
}

const CHECKSUM_STEPS: u64 = 30;
const CHECKSUM_ITER: u64 = 1500;

/// Boots the bzImage running the checksum workload, console and API socket
/// in `dir` under `name`, and waits until it printed its third step.
fn boot_checksum(dir: &Path, name: &str, bzimage: &Path, initrd: &Path) -> common::Vm {
    let cmd = format!("ffmk-checksum {CHECKSUM_STEPS} {CHECKSUM_ITER} 0.3");
    let vm = spawn_bzimage(dir, name, bzimage, initrd, &[], "", &cmd);
    let deadline = std::time::Instant::now() + timeout();
    while checksum_lines(&vm.console()).0.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(Duration::from_millis(100));
    }
    vm
}

/// The workload's output over a VM's two lives (before and after a
/// snapshot or a migration): every step exactly once, in order, each sum
/// and the final one equal to an uninterrupted run's.
fn assert_checksum_continues(before: &str, after: &str) {
    let want = checksum_sums(CHECKSUM_STEPS, CHECKSUM_ITER);
    let (a, _) = checksum_lines(before);
    let (b, last) = checksum_lines(after);
    let ctx = format!("before:\n{before}\nafter:\n{after}");
    assert!(!a.is_empty() && !b.is_empty(), "{ctx}");
    let steps: Vec<u64> = a.iter().chain(&b).map(|&(k, _)| k).collect();
    assert_eq!(steps, (1..=CHECKSUM_STEPS).collect::<Vec<_>>(), "{ctx}");
    for &(k, sum) in a.iter().chain(&b) {
        assert_eq!(sum, want[k as usize - 1], "step {k}: {ctx}");
    }
    assert_eq!(last, want.last().copied(), "{ctx}");
}

#[test]
fn linux_checksum_workload_survives_snapshot_and_restore() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-snap-sum");
    let vm = boot_checksum(&dir, "a", &bzimage, &initrd);
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();
    let r = common::Vm::restore(&dir, "b", &snap, &[]);
    assert_second_life_finishes(&dir, "a", "b", r);
}

#[test]
fn linux_checksum_workload_survives_live_snapshot_kill_and_restore() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-live-snap-sum");
    let vm = boot_checksum(&dir, "a", &bzimage, &initrd);
    // Copied while the guest runs; paused only for the last dirty pages
    // and the state: the snapshot is of the moment of that pause, so the
    // restored guest goes on after the last step printed by then (some
    // step between the ones printed before and after the call).
    let before = checksum_lines(&vm.console()).0.len() as u64;
    let snap = dir.join("snap");
    let out = vm.snapshot(&snap, &["--live"]);
    eprintln!("live snapshot: {out}");
    let first_life = vm.console();
    vm.kill();
    let r = common::Vm::restore(&dir, "b", &snap, &[]);
    let (code, err) = r.wait_exit();
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap_or_default();
    assert_eq!(code, Some(0), "{err}\n{after}");
    assert!(!err.contains("restored with other state"), "{err}");
    let printed = checksum_lines(&first_life).0.len() as u64;
    let (b, last) = checksum_lines(&after);
    let want = checksum_sums(CHECKSUM_STEPS, CHECKSUM_ITER);
    let ctx = format!("first life:\n{first_life}\nrestored:\n{after}");
    let resumed_at = b.first().map(|&(k, _)| k).unwrap_or(0);
    assert!(
        (before + 1..=printed + 1).contains(&resumed_at),
        "restored at step {resumed_at}, snapshot taken between steps {before} and {printed}: {ctx}"
    );
    let steps: Vec<u64> = b.iter().map(|&(k, _)| k).collect();
    assert_eq!(
        steps,
        (resumed_at..=CHECKSUM_STEPS).collect::<Vec<_>>(),
        "{ctx}"
    );
    for &(k, sum) in &b {
        assert_eq!(sum, want[k as usize - 1], "step {k}: {ctx}");
    }
    assert_eq!(last, want.last().copied(), "{ctx}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_checksum_workload_survives_live_migration() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-migrate-sum");
    let dst = spawn_incoming(&dir, "tcp://127.0.0.1:7398", &[]);
    let src = boot_checksum(&dir, "src", &bzimage, &initrd);
    migrate_away(src, "tcp://127.0.0.1:7398");
    assert_second_life_finishes(&dir, "src", "dst", dst);
}

/// A destination VMM (`run --incoming ADDR`, 512 MiB like the source,
/// console and API socket `dst.*` in `dir`) with `extra` flags. Each test
/// listens on a port of its own: on hosts that run Linux guests directly,
/// cargo runs the tests side by side.
fn spawn_incoming(dir: &Path, addr: &str, extra: &[&str]) -> common::Vm {
    let mut args = vec![
        "run",
        "--incoming",
        addr,
        "--memory",
        "512M",
        "--test-exit-port",
    ];
    args.extend_from_slice(extra);
    common::Vm::spawn(&args, &dir.join("dst.console"), &dir.join("dst.sock"))
}

/// Live-migrates `src` to `to` (`ffmk-vmm migrate --verify`: the
/// destination compares every page with the source's at the pause, so a
/// page the dirty tracking missed fails here, named, instead of crashing
/// the guest later) and checks that the source VMM then ends cleanly.
fn migrate_away(src: common::Vm, to: &str) {
    let out = common::ffmk()
        .args(["migrate", "--api-socket"])
        .arg(&src.sock)
        .args(["--to", to, "--json", "--verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))
        .unwrap_or(serde_json::Value::Null);
    assert!(last["verified_pages"].as_u64().unwrap_or(0) > 0, "{stdout}");
    eprintln!(
        "migrated: downtime {} ms (digests {} ms), {} pages verified",
        last["downtime_ms"], last["verify_ms"], last["verified_pages"]
    );
    let (code, err) = src.wait_exit();
    assert_eq!(code, Some(0), "{err}");
}

/// Waits for `second` (the restored or migrated VM, console `after` in
/// `dir`) to end cleanly, checks the workload over both consoles and
/// removes `dir`.
fn assert_second_life_finishes(dir: &Path, before: &str, after: &str, second: common::Vm) {
    let (code, err) = second.wait_exit();
    let read = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.console")));
    let (before, after) = (
        read(before).unwrap_or_default(),
        read(after).unwrap_or_default(),
    );
    assert_eq!(code, Some(0), "{err}\n{after}");
    // KVM took the vCPU state as given (the VMM reads it back at restore).
    assert!(!err.contains("restored with other state"), "{err}");
    assert_checksum_continues(&before, &after);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_reboot_is_reported_as_a_reset_and_ends_the_vm() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let b = boot(&bzimage, &initrd, "2", "-- echo rebooting; reboot -f");
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(b.console.iter().any(|l| l.trim() == "rebooting"), "{ctx}");
    assert_eq!(b.code, Some(0), "{ctx}");
    assert!(b.stderr.contains("reset"), "{ctx}");
}

#[test]
fn checksum_reference_matches_the_recurrence() {
    // The reference the Linux tests compare with: s = (s*31 + i + k) mod
    // 1000003, checked by hand for the first steps.
    let mut s = 0u64;
    for i in 0..3 {
        s = (s * 31 + i) % 1_000_003;
    }
    assert_eq!(checksum_sums(1, 3), vec![s]);
    assert_eq!(s, 33);
    let (steps, last) = checksum_lines("checksum step=1 sum=33\nx\nchecksum final=33\n");
    assert_eq!((steps, last), (vec![(1, 33)], Some(33)));
}

#[test]
fn linux_drives_virtio_rng_and_virtio_console() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-rng-con");
    let out = dir.join("vcon.out");
    let vcon = out.to_string_lossy();
    // The kernel's hwrng core picks the virtio device; the guest writes a
    // line to the virtio console (/dev/hvc0), which lands in the host file.
    let b = boot_with(
        &bzimage,
        &initrd,
        "2",
        "ffmk_exit_port=244 -- echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
         head -c 4096 /dev/hwrng | wc -c; echo ffmk-hello-over-hvc > /dev/hvc0",
        &["--rng", "--virtio-console", &vcon],
        None,
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert_eq!(b.code, Some(0), "{ctx}");
    assert!(
        b.console
            .iter()
            .any(|l| l.trim().starts_with("rng=virtio_rng")),
        "{ctx}"
    );
    assert!(b.console.iter().any(|l| l.trim() == "4096"), "{ctx}");
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(got.contains("ffmk-hello-over-hvc"), "{got:?}\n{ctx}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `ffmk-vfio-user-cx`, built next to ffmk-vmm (by `cargo test
/// --workspace`, or `cargo build -p vfio-ib`, which ci/test-linux runs).
fn cx_server() -> PathBuf {
    let p = Path::new(common::vmm()).with_file_name("ffmk-vfio-user-cx");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p vfio-ib",
        p.display()
    );
    p
}

fn api_json(vm: &common::Vm, args: &[&str]) -> serde_json::Value {
    let out = vm.api(args);
    assert!(out.status.success(), "{args:?}: {out:?}\n{}", vm.describe());
    // One JSON document, or (snapshot) progress lines and the answer last.
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap()
    })
}

/// The agent with a hook standing in for the MPI runtime: it refuses the
/// first detach (not ready to let go) and agrees afterwards; it hears of
/// every rescan. One double-quoted word on the kernel command line (the
/// kernel passes init at most 32 words).
const AGENT_WITH_HOOK: &str = "\"echo '[ $1 = detach ] && [ ! -e /tmp/once ] && touch /tmp/once \
    && echo hook: refused $2 && exit 1; echo hook: $1 $2' > /tmp/hook; \
    vsock-tool agent 1027 /tmp/hook\"";

#[test]
fn linux_guest_agent_lets_go_of_a_passthrough_device_and_finds_a_new_one() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-agent");
    let cx = dir.join("cx.sock");
    let mut server = start_cx(&cx);
    let device = format!("vfio-user={}", cx.display());
    let vsock = format!("cid=3,socket={}", dir.join("v.sock").display());
    let vm = spawn_bzimage(
        &dir,
        "a",
        &bzimage,
        &initrd,
        &["--vsock", &vsock, "--device", &device],
        KERNEL_LOG,
        AGENT_WITH_HOOK,
    );
    wait_console(&vm, "vsock-tool: agent on 1027");
    let info = api_json(&vm, &["info"]);
    let bdf = info["passthrough"][0]["bdf"].as_str().unwrap().to_string();
    // Linux enumerated it at boot.
    assert!(
        vm.console().contains("[15b3:101c] type 00 class 0x020700"),
        "{}",
        vm.console()
    );
    // Unplug: the hook (the MPI runtime's say) refuses the first time;
    // the function stays.
    let refused = vm.api(&["device", "remove", &bdf]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the hook refused to let go of"), "{err}");
    assert_eq!(
        api_json(&vm, &["info"])["passthrough"][0]["bdf"],
        bdf.as_str()
    );
    assert!(vm.console().contains(&format!("hook: refused 0000:{bdf}")));
    // Then it agrees, and the agent removes it in the guest first.
    let removed = api_json(&vm, &["device", "remove", &bdf]);
    assert_eq!(removed["state"], "detached");
    assert!(
        vm.console().contains(&format!(
            "agent: detach 0000:{bdf} -> ok detached 0000:{bdf}"
        )),
        "{}",
        vm.console()
    );
    assert_eq!(
        api_json(&vm, &["info"])["passthrough"],
        serde_json::json!([])
    );
    // Plug again: the agent rescans and Linux finds it.
    let added = api_json(&vm, &["device", "add", &device]);
    let new_bdf = added["bdf"].as_str().unwrap();
    let guest = added["guest"].as_str().unwrap_or_default();
    assert!(
        guest.contains(&format!("0000:{new_bdf}=15b3:101c")),
        "the guest sees it after its rescan: {guest}"
    );
    assert!(vm.console().contains(&format!("hook: detach 0000:{bdf}")));
    wait_console(&vm, "hook: rescanned");
    // No agent answer, no unplug (unless forced).
    let out = vm.api(&["device", "remove", "00:1f.0"]);
    assert!(!out.status.success());
    // A snapshot: refused while the device is in, taken with it out for
    // the moment (the agent lets go, then rescans).
    let snap = dir.join("snap");
    let refused = vm.api(&["snapshot", "--dest", snap.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("detach_devices"));
    let taken = api_json(
        &vm,
        &[
            "snapshot",
            "--dest",
            snap.to_str().unwrap(),
            "--detach-devices",
        ],
    );
    assert_eq!(taken["unplugged"][0], device.as_str(), "{taken}");
    assert_eq!(
        api_json(&vm, &["info"])["passthrough"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let rescans = vm
        .console()
        .matches("agent: rescan -> ok rescanned")
        .count();
    assert_eq!(rescans, 2, "{}", vm.console());
    let _ = vm.api(&["shutdown"]);
    let (code, err) = vm.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let _ = server.kill();
    let _ = server.wait();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts `ffmk-vfio-user-cx` on `socket`.
fn start_cx(socket: &Path) -> std::process::Child {
    let child = std::process::Command::new(cx_server())
        .arg(socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Waits until `vm`'s `GET /vm` lists `n` passthrough functions.
fn wait_passthrough(vm: &common::Vm, n: usize) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout();
    loop {
        let info = api_json(vm, &["info"]);
        if info["passthrough"].as_array().map_or(0, Vec::len) == n {
            return info;
        }
        assert!(std::time::Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn linux_vm_with_a_passthrough_device_migrates_without_it_and_gets_one_there() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-migrate-vf");
    let (cx_a, cx_b) = (dir.join("cx-a.sock"), dir.join("cx-b.sock"));
    let mut servers = [start_cx(&cx_a), start_cx(&cx_b)];
    let vsock = |name: &str| format!("cid=3,socket={}", dir.join(name).display());
    let dev = |s: &Path| format!("vfio-user={}", s.display());
    let dst = spawn_incoming(
        &dir,
        "tcp://127.0.0.1:7397",
        &["--vsock", &vsock("dst.vsock"), "--device", &dev(&cx_b)],
    );
    let src = spawn_bzimage(
        &dir,
        "src",
        &bzimage,
        &initrd,
        &["--vsock", &vsock("src.vsock"), "--device", &dev(&cx_a)],
        "",
        "vsock-tool agent 1027",
    );
    wait_console(&src, "vsock-tool: agent on 1027");
    // A migration that fails (nobody listens): the device leaves with the
    // guest's consent, then comes back, and the guest finds it again.
    let failed = common::ffmk()
        .args(["migrate", "--api-socket"])
        .arg(&src.sock)
        .args(["--to", "tcp://127.0.0.1:9", "--json"])
        .output()
        .unwrap();
    assert!(!failed.status.success(), "{failed:?}");
    let info = wait_passthrough(&src, 1);
    assert_eq!(info["passthrough"][0]["device"], dev(&cx_a).as_str());
    wait_console(&src, "agent: rescan -> ok rescanned");
    assert!(
        src.console().contains("agent: detach 0000:00:"),
        "{}",
        src.console()
    );
    // The real one: unplugged here, migrated, a VF of the destination
    // plugged in there, and the guest's agent finds it.
    migrate_away(src, "tcp://127.0.0.1:7397");
    let info = wait_passthrough(&dst, 1);
    assert_eq!(
        info["passthrough"][0]["device"],
        dev(&cx_b).as_str(),
        "{info}"
    );
    let bdf = info["passthrough"][0]["bdf"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + timeout();
    let want = format!("0000:{bdf}=15b3:101c");
    while !dst
        .console()
        .lines()
        .any(|l| l.contains("agent: rescan") && l.contains(&want))
    {
        assert!(std::time::Instant::now() < deadline, "{}", dst.console());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(dst.api(&["shutdown"]).status.success());
    let (code, err) = dst.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The guest's PCI functions, as the `PCI_WATCH` loop last printed them.
fn guest_pci(vm: &common::Vm) -> Option<String> {
    // Lines the loop printed (the kernel's echo of the command line has
    // the same words, further into its line).
    vm.console()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("guest-pci:").map(String::from))
}

/// Waits until the guest's last listing has (or lacks) `bdf`.
fn wait_guest_pci(vm: &common::Vm, bdf: &str, present: bool) {
    let deadline = std::time::Instant::now() + timeout();
    while guest_pci(vm).is_none_or(|l| l.contains(bdf) != present) {
        assert!(
            std::time::Instant::now() < deadline,
            "{bdf} present={present}: {}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Guest command: print slot 1's address, then the list of PCI functions
/// each time it changes (no double quotes: it travels on the kernel
/// command line).
const PCI_WATCH: &str = "echo slot1=$(cat /sys/bus/pci/slots/1/address); s=; while :; do \
    n=$(ls /sys/bus/pci/devices | tr '\\n' ,); [ x$n = x$s ] || echo guest-pci:$n; s=$n; \
    sleep 0.3; done";

/// PCIe native hot-plug with no guest agent: Linux's pciehp binds to the
/// VM's root port, scans a function plugged into its slot, powers the slot
/// off when the attention button asks for the function (DELETE without
/// force), and copes with a surprise removal (force). A live migration
/// takes the function out through its slot and the destination plugs its
/// own into the same slot, which the guest finds there.
#[test]
fn linux_pciehp_takes_functions_in_hot_plug_slots_and_gives_them_back() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let dir = tmpdir("linux-pciehp");
    let (cx_a, cx_b) = (dir.join("cx-a.sock"), dir.join("cx-b.sock"));
    let mut servers = [start_cx(&cx_a), start_cx(&cx_b)];
    let dev = |s: &Path| format!("vfio-user={}", s.display());
    let vm = spawn_bzimage(
        &dir,
        "src",
        &bzimage,
        &initrd,
        &["--hotplug-slots", "1"],
        KERNEL_LOG,
        PCI_WATCH,
    );
    wait_guest_pci(&vm, "0000:00:1f.0", true);
    // pciehp registered the slot, behind the root port at 00:1f.0.
    assert!(
        vm.console().contains("slot1=0000:01:00"),
        "{}",
        vm.console()
    );
    assert!(!guest_pci(&vm).unwrap().contains("0000:01:00.0"));

    let added = api_json(&vm, &["device", "add", &dev(&cx_a)]);
    assert_eq!(added["bdf"], "01:00.0", "{added}");
    assert_eq!(added["hotplug_slot"], true);
    wait_guest_pci(&vm, "0000:01:00.0", true);
    assert!(
        vm.console()
            .contains("pci 0000:01:00.0: [15b3:101c] type 00 class 0x020700"),
        "{}",
        vm.console()
    );

    // Orderly removal: the attention button; pciehp waits 5 s, unbinds,
    // powers the slot off; only then does the API answer.
    let asked = std::time::Instant::now();
    let removed = api_json(&vm, &["device", "remove", "01:00.0"]);
    assert_eq!(removed["state"], "detached");
    assert!(
        asked.elapsed() >= Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        vm.console().contains("Slot(1): Attention button pressed"),
        "{}",
        vm.console()
    );
    wait_guest_pci(&vm, "0000:01:00.0", false);

    // In again, then a live migration: out through the slot, and the
    // destination's function into the same slot over there.
    api_json(&vm, &["device", "add", &dev(&cx_a)]);
    wait_guest_pci(&vm, "0000:01:00.0", true);
    let dst = spawn_incoming(
        &dir,
        "tcp://127.0.0.1:7398",
        &["--hotplug-slots", "1", "--device", &dev(&cx_b)],
    );
    migrate_away(vm, "tcp://127.0.0.1:7398");
    let info = wait_passthrough(&dst, 1);
    assert_eq!(
        info["passthrough"][0]["device"],
        dev(&cx_b).as_str(),
        "{info}"
    );
    assert_eq!(info["passthrough"][0]["bdf"], "01:00.0", "{info}");
    wait_guest_pci(&dst, "0000:01:00.0", true);

    // Surprise removal: no waiting for the guest, which is told.
    let forced = api_json(&dst, &["device", "remove", "01:00.0", "--force"]);
    assert_eq!(forced["state"], "detached");
    wait_guest_pci(&dst, "0000:01:00.0", false);
    assert!(dst.api(&["shutdown"]).status.success());
    let (code, err) = dst.wait_exit();
    assert!(code.is_some(), "{err}");
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `key=value` of the first console line that starts with `prefix`.
fn line_field(b: &Boot, prefix: &str, key: &str) -> Option<String> {
    let line = b
        .console
        .iter()
        .find(|l| l.trim_start().starts_with(prefix))?;
    let rest = line.split_once(&format!(" {key}="))?.1;
    Some(rest.split_whitespace().next().unwrap_or("").to_string())
}

/// Boots the bzImage with `extra` flags (512 MiB, 2 vCPUs unless given)
/// and prints what lscpu, numactl -H and hwloc read: the node and CPU
/// topology trees of sysfs (built by the kernel from SRAT, SLIT and CPUID).
/// Unquoted $(...) collapses white space: `dist=10 21`.
// The kernel log on: the test also checks that the kernel did not warn
// about the topology it was given.
fn guest_topology(bzimage: &Path, initrd: &Path, extra: &[&str]) -> (Boot, String) {
    let b = boot_with(
        bzimage,
        initrd,
        "2",
        &format!(
            "{KERNEL_LOG} ffmk_exit_port=244 -- \"cd /sys/devices/system && echo nodes=$(cat node/online) && \
         for n in $(seq 0 $(($(ls -d node/node* | wc -l) - 1))); do echo numa$n cpus=$(cat node/node$n/cpulist) \
         dist=$(cat node/node$n/distance) $(grep MemTotal node/node$n/meminfo); done && for c in 0 1; do \
         t=cpu/cpu$c/topology; echo topo$c pkg=$(cat $t/physical_package_id) smt=$(cat $t/thread_siblings_list) \
         llc=$(for i in cpu/cpu$c/cache/index*; do [ $(cat $i/level) = 3 ] && cat $i/shared_cpu_list; done); done\""
        ),
        extra,
        None,
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert_eq!(b.code, Some(0), "{ctx}");
    (b, ctx)
}

/// The CPUs sharing a CPU's L3 (`llc` of [`guest_topology`]) are `want`;
/// nothing is accepted where the guest was shown no L3, except in the
/// NUMA lab, whose CPU model has one.
fn assert_llc(llc: &str, want: &str, ctx: &str) {
    if llc.is_empty() && std::env::var_os("FFMK_NUMA_REQUIRED").is_none() {
        return;
    }
    assert_eq!(llc, want, "the L3's CPUs: {ctx}");
}

// Tests named numa_lab_* run (in ci/test-linux) in a lab whose L1 has two
// NUMA nodes and a CPU model whose kernel takes cache sharing from CPUID
// (EPYC-Rome: on the first EPYC's model numbers Linux assumes 8-CPU core
// complexes whatever CPUID says).

#[test]
fn numa_lab_linux_sees_the_cpu_topology_and_numa_nodes_it_was_given() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    // Two threads of one core: SMT siblings sharing every cache.
    let (b, ctx) = guest_topology(
        &bzimage,
        &initrd,
        &["--topology", "sockets=1,cores=1,threads=2"],
    );
    for cpu in 0..2 {
        let p = format!("topo{cpu}");
        assert_eq!(line_field(&b, &p, "pkg").as_deref(), Some("0"), "{ctx}");
        assert_eq!(line_field(&b, &p, "smt").as_deref(), Some("0-1"), "{ctx}");
        assert_llc(&line_field(&b, &p, "llc").unwrap_or_default(), "0-1", &ctx);
    }
    assert!(has_line(&b, "nodes=0"), "{ctx}");
    // Two nodes (one socket each, by default), 21 apart.
    let (b, ctx) = guest_topology(
        &bzimage,
        &initrd,
        &[
            "--numa",
            "node=0,cpus=0,memory=256M",
            "--numa",
            "node=1,cpus=1,memory=256M,distance=0:21",
        ],
    );
    assert!(has_line(&b, "nodes=0-1"), "{ctx}");
    assert!(
        !b.console
            .iter()
            .any(|l| l.contains("is not on the same node")),
        "the guest's scheduler found a cache shared across nodes: {ctx}"
    );
    for n in 0..2u64 {
        let node = format!("numa{n}");
        assert_eq!(line_field(&b, &node, "cpus"), Some(n.to_string()), "{ctx}");
        let dist = if n == 0 {
            "dist=10 21 Node 0"
        } else {
            "dist=21 10 Node 1"
        };
        assert!(has_line(&b, dist), "{ctx}");
        // Each node has its 256 MiB less what the kernel keeps for itself.
        let kb: u64 = b
            .console
            .iter()
            .find_map(|l| {
                l.split_once(&format!("Node {n} MemTotal:"))?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("node {n}: {ctx}"));
        assert!(
            (150_000..=262_144).contains(&kb),
            "node {n}: {kb} kB: {ctx}"
        );
        let cpu = format!("topo{n}");
        assert_eq!(line_field(&b, &cpu, "pkg"), Some(n.to_string()), "{ctx}");
        assert_eq!(line_field(&b, &cpu, "smt"), Some(n.to_string()), "{ctx}");
        assert_llc(
            &line_field(&b, &cpu, "llc").unwrap_or_default(),
            &n.to_string(),
            &ctx,
        );
    }
}

/// The CPUs of the lab's (or host's) NUMA node `n`, None without it.
fn host_node_cpus(n: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/devices/system/node/node{n}/cpulist"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Pages of `pid`'s mappings bound to `bind` (`bind:0`), by node, from
/// numa_maps (`N0=123`), and the bound mappings' total size in pages
/// (from maps).
fn bound_pages(pid: u32, bind: &str) -> (std::collections::BTreeMap<String, u64>, u64) {
    let numa = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap_or_default();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut on = std::collections::BTreeMap::new();
    let mut size = 0;
    for l in numa.lines() {
        let mut words = l.split_whitespace();
        let (Some(start), Some(policy)) = (words.next(), words.next()) else {
            continue;
        };
        if policy != format!("bind:{bind}") {
            continue;
        }
        for w in words {
            if let Some((n, pages)) = w.split_once('=').filter(|(k, _)| k.starts_with('N')) {
                *on.entry(n.to_string()).or_default() += pages.parse::<u64>().unwrap_or(0);
            }
        }
        size += maps
            .lines()
            .find(|m| m.starts_with(&format!("{start}-")))
            .and_then(|m| {
                let (a, b) = m.split_whitespace().next()?.split_once('-')?;
                Some((u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?) >> 12)
            })
            .unwrap_or(0);
    }
    (on, size)
}

/// The host CPUs the VMM's thread `name` may run on.
fn thread_cpus(pid: u32, name: &str) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

#[test]
fn numa_lab_two_host_nodes_back_the_guest_nodes_and_run_their_vcpus() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    let (Some(cpus0), Some(cpus1)) = (host_node_cpus(0), host_node_cpus(1)) else {
        assert!(
            std::env::var_os("FFMK_NUMA_REQUIRED").is_none(),
            "FFMK_NUMA_REQUIRED is set but this host has one NUMA node"
        );
        eprintln!("skipped: one host NUMA node (ci/test-linux runs this in a lab with two)");
        return;
    };
    let dir = tmpdir("linux-numa");
    // The guest's node 0 on host node 0, node 1 on host node 1; the
    // triad runs on guest node 0's CPU, on local then on remote memory.
    let vm = spawn_bzimage(
        &dir,
        "numa",
        &bzimage,
        &initrd,
        &[
            "--cpus",
            "2",
            "--numa",
            "node=0,cpus=0,memory=256M,host-node=0",
            "--numa",
            "node=1,cpus=1,memory=256M,host-node=1",
        ],
        "",
        "\"ffmk-stream --node 0 --mib 16 --runs 3 && ffmk-stream --node 1 --cpu-node 0 --mib 16 --runs 3 \
         && echo numa-ready=$((6*7)) && sleep 600\"",
    );
    wait_console(&vm, "numa-ready=42");
    let console = vm.console();
    let pid = vm.pid();
    let (on0, size0) = bound_pages(pid, "0");
    let (on1, size1) = bound_pages(pid, "1");
    let (vcpu0, vcpu1) = (thread_cpus(pid, "vcpu0"), thread_cpus(pid, "vcpu1"));
    vm.kill();
    let ctx =
        format!("node 0: {on0:?} of {size0}; node 1: {on1:?} of {size1}\nconsole:\n{console}");
    // Each guest node's 256 MiB are bound to its host node, and the pages
    // the guest touched there came from it.
    assert_eq!((size0, size1), (65536, 65536), "{ctx}");
    assert!(
        on0.keys().all(|k| k == "N0") && on0.contains_key("N0"),
        "{ctx}"
    );
    // (The triad's 48 MiB on guest node 1.)
    assert!(
        on1.keys().all(|k| k == "N1") && on1.get("N1").copied().unwrap_or(0) >= 12288,
        "{ctx}"
    );
    assert_eq!(vcpu0.as_deref(), Some(cpus0.as_str()), "{ctx}");
    assert_eq!(vcpu1.as_deref(), Some(cpus1.as_str()), "{ctx}");
    let rate = |node: &str| -> f64 {
        console
            .lines()
            .find(|l| l.contains(&format!("stream mem_node={node} cpu_node=0")))
            .and_then(|l| l.split("triad_mib_s=").nth(1)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no triad for node {node}: {ctx}"))
    };
    let (local, remote) = (rate("0"), rate("1"));
    assert!(local > 0.0 && remote > 0.0, "{ctx}");
    // The same on the host, in the same run: the difference its nodes
    // have, which the guest's should show.
    let host = |node: &str| -> f64 {
        let out = std::process::Command::new(ffmk_stream())
            .args([
                "--node",
                node,
                "--cpu-node",
                "0",
                "--mib",
                "16",
                "--runs",
                "3",
            ])
            .output()
            .expect("ffmk-stream on the host");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.split("triad_mib_s=")
            .nth(1)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("ffmk-stream: {text}"))
    };
    let (host_local, host_remote) = (host("0"), host("1"));
    eprintln!(
        "triad from node 0's CPU, MiB/s: guest local {local:.0}, remote {remote:.0} (local/remote {:.2}); \
         host local {host_local:.0}, remote {host_remote:.0} (local/remote {:.2})",
        local / remote,
        host_local / host_remote
    );
}

/// `ffmk-stream`, built next to ffmk-vmm (`cargo build -p numa`).
fn ffmk_stream() -> PathBuf {
    let p = Path::new(common::vmm()).with_file_name("ffmk-stream");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p numa --bin ffmk-stream",
        p.display()
    );
    p
}
