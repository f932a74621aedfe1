//! virtio-blk end to end: the probe guest's ring-3 virtio driver reads,
//! copies and fails to write real image files through `--disk`.
mod common;

use common::{api, ffmk, probe_argv, tmpdir, value, Running};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// A raw image of `sectors` 512-byte sectors with a pattern seeded by `seed`.
fn disk_image(dir: &Path, name: &str, sectors: usize, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed)) as u8
        })
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn run(task: &str, disks: &[String]) -> Output {
    let mut extra = vec!["--test-exit-port"];
    for d in disks {
        extra.extend(["--disk", d.as_str()]);
    }
    ffmk()
        .args(probe_argv(task, &extra))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn spec(p: &Path) -> String {
    format!("path={}", p.display())
}

#[test]
fn guest_reads_the_whole_disk_and_its_crc32_matches_the_host() {
    let dir = tmpdir("blk-read");
    let a = disk_image(&dir, "a.raw", 6144, 3);
    let b = disk_image(&dir, "b.raw", 2048, 9);
    let disks = [spec(&a), format!("{},readonly,queues=2", spec(&b))];
    for (index, img) in [(0, &a), (1, &b)] {
        let out = run(&format!("task=blk op=read disk={index}"), &disks);
        assert!(out.status.success(), "{out:?}");
        let data = std::fs::read(img).unwrap();
        assert_eq!(value(&out, "bytes"), Some(data.len().to_string()));
        assert_eq!(
            value(&out, "crc32"),
            Some(format!("{:08x}", crc32fast::hash(&data))),
            "disk {index}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn guest_copies_the_first_half_over_the_second_with_o_direct() {
    let dir = tmpdir("blk-copy");
    let img = disk_image(&dir, "c.raw", 4096, 5);
    let before = std::fs::read(&img).unwrap();
    let out = run("task=blk op=copy", &[format!("{},direct", spec(&img))]);
    assert!(out.status.success(), "{out:?}");
    let after = std::fs::read(&img).unwrap();
    let half = after.len() / 2;
    assert_eq!(&after[..half], &before[..half], "first half untouched");
    assert!(after[half..] == after[..half], "second half is a copy");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn read_only_disk_fails_guest_writes_and_keeps_the_image() {
    let dir = tmpdir("blk-ro");
    let img = disk_image(&dir, "r.raw", 2048, 7);
    let before = std::fs::read(&img).unwrap();
    let out = run("task=blk op=copy", &[format!("{},readonly", spec(&img))]);
    assert_eq!(out.status.code(), Some(102), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("blk_error=status 1"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn disks_show_in_the_api_and_on_the_pci_bus() {
    let dir = tmpdir("blk-api");
    let img = disk_image(&dir, "api.raw", 64, 1);
    let sock = dir.join("api.sock");
    let disk = format!("{},serial=ffmk0", spec(&img));
    let sock_arg = sock.to_str().unwrap();
    let mut vm = Running::start_owned(&probe_argv(
        "task=counter hz=20",
        &["--disk", &disk, "--api-socket", sock_arg],
    ));
    vm.next_counter(Duration::from_secs(10)).expect("running");
    let info = api(&sock, "info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let pci = v["pci"].as_array().unwrap();
    assert_eq!(pci.len(), 2, "{v}");
    assert_eq!(pci[1]["bdf"], "00:01.0");
    assert!(pci[1]["device"].as_str().unwrap().starts_with("virtio-blk"));
    // The probe never drives this disk: no requests, and the driver never
    // touched the device (status 0).
    assert_eq!(pci[1]["counters"]["requests"], 0, "{v}");
    assert_eq!(pci[1]["counters"]["status"], 0, "{v}");
    assert_eq!(v["config"]["disks"][0]["serial"], "ffmk0");
    assert_eq!(v["disks"][0]["size_bytes"], 64 * 512, "{v}");
    assert_eq!(v["disks"][0]["readonly"], false, "{v}");
    let _ = api(&sock, "shutdown");
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rate_limits_pace_the_guest_and_keep_the_data_right() {
    let dir = tmpdir("blk-rate");
    let img = disk_image(&dir, "rate.raw", 16384, 4); // 8 MiB
    let want = format!("{:08x}", crc32fast::hash(&std::fs::read(&img).unwrap()));
    let timed = |extra: &str| {
        let t = std::time::Instant::now();
        let out = run("task=blk op=read", &[format!("{}{extra}", spec(&img))]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(value(&out, "crc32"), Some(want.clone()), "{extra}");
        t.elapsed()
    };
    let free = timed("");
    // 8 MiB at 4 MiB/s with one second of burst: about 1 s more.
    let bw = timed(",bw=4M");
    // 32 requests of 256 KiB at 16/s with one second of burst: about 1 s.
    let iops = timed(",iops=16");
    assert!(
        bw >= Duration::from_millis(900),
        "bw: {bw:?} (free: {free:?})"
    );
    assert!(
        iops >= Duration::from_millis(900),
        "iops: {iops:?} (free: {free:?})"
    );
    assert!(bw < Duration::from_secs(5) && iops < Duration::from_secs(5));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_disks_are_refused_with_one_line_and_exit_code_2() {
    let dir = tmpdir("blk-bad");
    let odd = dir.join("odd.raw");
    std::fs::write(&odd, [1u8; 1000]).unwrap();
    let empty = dir.join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let good = disk_image(&dir, "good.raw", 8, 2);
    let cases = [
        (spec(&dir.join("missing.raw")), "cannot open disk image"),
        (spec(&odd), "not a whole number of 512-byte sectors"),
        (spec(&empty), "is empty"),
        (format!("{},fast", spec(&good)), "unknown option 'fast'"),
        (format!("{},queues=99", spec(&good)), "queues must be"),
        (format!("{},bw=lots", spec(&good)), "bad bandwidth"),
        (format!("{},iops=0", spec(&good)), "iops must be at least 1"),
    ];
    for (disk, want) in cases {
        let out = run("task=hello", std::slice::from_ref(&disk));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{disk}: {err}");
        assert_eq!(err.lines().count(), 1, "{disk}: {err}");
        assert!(err.contains(want), "{disk}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `ffmk-vmm resize-disk --api-socket S ARGS...`.
fn resize(sock: &Path, args: &[&str]) -> Output {
    ffmk()
        .args(["resize-disk", "--api-socket"])
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn growing_a_disk_interrupts_the_driver_and_the_new_end_is_readable() {
    let dir = tmpdir("blk-resize");
    let img = disk_image(&dir, "grow.raw", 2048, 6); // 1 MiB
    let ro = disk_image(&dir, "ro.raw", 64, 8);
    let before = std::fs::read(&img).unwrap();
    let sock = dir.join("api.sock");
    let disks = [spec(&img), format!("{},readonly", spec(&ro))];
    let mut vm = Running::start_owned(&probe_argv(
        "task=blk op=watch timeout_ms=20000",
        &[
            "--test-exit-port",
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    ));
    vm.next_line(Duration::from_secs(10), |l| l.starts_with("watching"))
        .expect("the probe drives the disk");
    // Refusals first: each one clear, nothing changes.
    for (args, want) in [
        (vec!["--size", "512K"], "shrinking is refused"),
        (vec!["--disk", "1", "--size", "2M"], "read-only"),
        (vec!["--disk", "7", "--size", "2M"], "no disk 7"),
        (vec!["--size", "huge"], "invalid size"),
    ] {
        let out = resize(&sock, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "refusals change nothing"
    );
    let out = resize(&sock, &["--size", "3M"]);
    assert!(out.status.success(), "{out:?}");
    let line = vm
        .next_line(Duration::from_secs(10), |l| {
            l.starts_with("resized_sectors=")
        })
        .expect("the guest sees the configuration change");
    assert!(line.contains("resized_sectors=6144"), "{line}");
    assert!(line.contains("isr=2") || line.contains("isr=3"), "{line}");
    vm.next_line(Duration::from_secs(10), |l| l == "read_new_end=ok")
        .expect("the new end is readable");
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), 3 << 20);
    assert_eq!(&after[..before.len()], &before[..], "old data kept");
    std::fs::remove_dir_all(dir).unwrap();
}
