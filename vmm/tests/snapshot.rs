//! Snapshots end to end: the probe guest is snapshotted (full and
//! incremental), its VMM killed, and a new VMM restores it; the guest's
//! counter must continue without a gap or repeat, and its memory must be
//! exactly what it would have been without the interruption. Corrupted
//! snapshots and refused requests get one clear line each.
mod common;

use common::{assert_consecutive, counters, ffmk, text_value as value, tmpdir, Vm};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn counter_continues_after_snapshot_kill_and_restore() {
    let dir = tmpdir("snap-counter");
    let vm = Vm::boot(&dir, "a", "task=counter hz=50 max=100");
    vm.wait_counter(10);
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    let s = vm.snapshot(&snap, &[]);
    assert_eq!(s["kind"], "full");
    assert!(s["pause_ms"].as_f64().unwrap() >= 0.0, "{s}");
    // Untouched memory is not written: far less than the 128 MiB guest.
    assert!(s["data_bytes"].as_u64().unwrap() < 4 << 20, "{s}");
    let before = vm.console();
    vm.kill();
    // Restore paused, check it is, then resume through the API.
    let r = Vm::restore(&dir, "b", &snap, &["--paused"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.console(), "", "a paused restore runs nothing");
    let info = r.api(&["info"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "paused", "{v}");
    assert!(r.api(&["resume"]).status.success());
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("restored"), "{err}");
    // KVM holds the vCPU state the VMM gave it (read back at restore).
    assert!(!err.contains("restored with other state"), "{err}");
    assert_consecutive(
        &(before + &std::fs::read_to_string(dir.join("b.console")).unwrap()),
        100,
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn incremental_chain_and_compact_restore_memory_exactly() {
    let dir = tmpdir("snap-chain");
    let task = "task=dirty mib=16 rate=32 hz=20 max=60";
    // Reference: the same guest without interruption.
    let reference = Vm::boot(&dir, "ref", task);
    let reference_console = {
        let c = reference.console.clone();
        let (code, err) = reference.wait_exit();
        assert_eq!(code, Some(0), "{err}");
        std::fs::read_to_string(c).unwrap()
    };
    let want = value(&reference_console, "checksum").expect("reference checksum");

    let vm = Vm::boot(&dir, "a", task);
    let snap = dir.join("chain");
    vm.wait_counter(5);
    let full = vm.snapshot(&snap, &[]);
    vm.wait_counter(12);
    let inc1 = vm.snapshot(&snap, &["--incremental"]);
    vm.wait_counter(18);
    assert!(vm.api(&["pause"]).status.success());
    let inc2 = vm.snapshot(&snap, &["--incremental"]);
    assert_eq!(inc2["generation"], 3);
    assert_eq!(inc2["layers"], 3);
    // An increment holds the dirtied pages, not all of them.
    let (f, i) = (
        full["pages_written"].as_u64().unwrap(),
        inc1["pages_written"].as_u64().unwrap(),
    );
    assert!(i > 0 && i < f, "full {f} pages, incremental {i}");
    let before = vm.console();
    vm.kill();

    let r = Vm::restore(&dir, "b", &snap, &[]);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert_eq!(
        value(&after, "dirty_verify")
            .as_deref()
            .map(|v| v.starts_with("ok")),
        Some(true),
        "{after}"
    );
    assert_eq!(value(&after, "checksum"), Some(want.clone()));
    assert_consecutive(&(before.clone() + &after), 60);

    // Compact into one full layer: same memory, one layer left.
    let out = ffmk()
        .args(["snapshot", "compact"])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m["generation"], 3);
    let names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        4,
        "manifest, state, one memory file, one bitmap: {names:?}"
    );
    let r = Vm::restore(&dir, "c", &snap, &[]);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("c.console")).unwrap();
    assert_eq!(value(&after, "checksum"), Some(want));
    assert_consecutive(&(before + &after), 60);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Copies a snapshot directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn damaged_snapshots_are_refused_with_one_clear_line() {
    let dir = tmpdir("snap-bad");
    let vm = Vm::boot(&dir, "a", "task=dirty mib=4 rate=8 hz=20");
    vm.wait_counter(3);
    let good = dir.join("good");
    vm.snapshot(&good, &[]);
    vm.wait_counter(6);
    vm.snapshot(&good, &["--incremental"]);
    vm.kill();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    // A byte inside a page the full layer stored.
    let bits = std::fs::read(good.join("pages-1.bin")).unwrap();
    let first_page = bits
        .iter()
        .enumerate()
        .find(|(_, b)| **b != 0)
        .map(|(i, b)| i as u64 * 8 + u64::from(b.trailing_zeros()))
        .unwrap();
    // A page the full layer leaves out (a hole, zero in the guest).
    let hole_page = (0..bits.len() as u64 * 8)
        .find(|p| bits[(p / 8) as usize] & (1 << (p % 8)) == 0)
        .unwrap();
    let hole_want = format!("holds data in page {hole_page}, which its layer does not define");
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            // Outside the checksummed pages, but mapped into the guest.
            "data-in-a-hole",
            Box::new(move |d| {
                use std::os::unix::fs::FileExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("mem-1.bin"))
                    .unwrap()
                    .write_all_at(b"x", hole_page * 4096 + 7)
                    .unwrap();
            }),
            &hole_want,
        ),
        (
            "version",
            Box::new(|d| edit_manifest(d, |m| m["version"] = 99.into())),
            "format version 99",
        ),
        (
            "memory-checksum",
            Box::new(move |d| {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("mem-1.bin"))
                    .unwrap();
                let mut b = [0u8; 1];
                std::fs::File::open(d.join("mem-1.bin"))
                    .unwrap()
                    .read_exact_at(&mut b, first_page * 4096 + 100)
                    .unwrap();
                f.write_all_at(&[b[0] ^ 0xff], first_page * 4096 + 100)
                    .unwrap();
            }),
            "fails its checksum",
        ),
        (
            "state-checksum",
            Box::new(|d| {
                let p = d.join("state-2.json");
                let mut s = std::fs::read(&p).unwrap();
                let n = s.len() / 2;
                s[n] ^= 1;
                std::fs::write(p, s).unwrap();
            }),
            "fails its checksum",
        ),
        (
            "truncated",
            Box::new(|d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("mem-2.bin"))
                    .unwrap();
                f.set_len(4096).unwrap();
            }),
            "truncated",
        ),
        (
            "missing-layer",
            Box::new(|d| std::fs::remove_file(d.join("mem-2.bin")).unwrap()),
            "is missing",
        ),
        (
            "memory-size",
            Box::new(|d| edit_manifest(d, |m| m["memory_bytes"] = (256u64 << 20).into())),
            "memory is 268435456 bytes",
        ),
        (
            "cpu",
            Box::new(|d| edit_manifest(d, |m| m["host"]["cpu_vendor"] = other_vendor().into())),
            if other_vendor() == "AuthenticAMD" {
                "taken on a AuthenticAMD CPU"
            } else {
                "taken on a GenuineIntel CPU"
            },
        ),
        (
            // A state file outside the snapshot (its checksum fitting): never
            // read, never removed by a later incremental snapshot.
            "state-outside",
            Box::new(|d| {
                let outside = d.with_file_name(format!(
                    "{}-outside.json",
                    d.file_name().unwrap().to_string_lossy()
                ));
                std::fs::copy(d.join("state-2.json"), &outside).unwrap();
                let name = format!("../{}", outside.file_name().unwrap().to_string_lossy());
                edit_manifest(d, |m| m["state"]["name"] = name.clone().into())
            }),
            "a manifest names files inside its own directory only",
        ),
        (
            "state-absolute",
            Box::new(|d| edit_manifest(d, |m| m["state"]["name"] = "/etc/hostname".into())),
            "a manifest names files inside its own directory only",
        ),
        (
            "garbage-manifest",
            Box::new(|d| std::fs::write(d.join("manifest.json"), b"{not json").unwrap()),
            "is corrupt",
        ),
        (
            "no-manifest",
            Box::new(|d| std::fs::remove_file(d.join("manifest.json")).unwrap()),
            "is not a snapshot",
        ),
    ];
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    for (name, damage, want) in cases {
        let d = dir.join(name);
        copy_dir(&good, &d);
        damage(&d);
        let mut child = ffmk()
            .args(["restore", "--console", "none", "--from"])
            .arg(&d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A damaged snapshot that is not refused would run on: give up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: the damaged snapshot was restored and runs");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(want), "{name}: want '{want}' in: {err}");
    }
    // The undamaged original still restores and runs.
    let r = Vm::restore(&dir, "ok", &good, &[]);
    r.wait_counter(8);
    r.kill();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn refused_or_failed_snapshots_leave_the_vm_running_and_nothing_half_written() {
    let dir = tmpdir("snap-refuse");
    let vm = Vm::boot(&dir, "a", "task=counter hz=50");
    vm.wait_counter(3);
    let snap = dir.join("s");
    let refusals: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--dest".into(),
                snap.display().to_string(),
                "--incremental".into(),
            ],
            "take a full one first",
        ),
        (
            vec!["--dest".into(), "/proc/ffmk-no-such/s".into()],
            "cannot create",
        ),
    ];
    for (args, want) in &refusals {
        let mut a = vec!["snapshot"];
        a.extend(args.iter().map(String::as_str));
        let out = vm.api(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    vm.snapshot(&snap, &[]);
    let manifest = std::fs::read(snap.join("manifest.json")).unwrap();
    // An existing snapshot is not replaced unless asked.
    let out = vm.api(&["snapshot", "--dest", snap.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(snap.join("manifest.json")).unwrap(), manifest);
    let s = vm.snapshot(&snap, &["--force"]);
    assert_ne!(
        std::fs::read(snap.join("manifest.json")).unwrap(),
        manifest,
        "{s}"
    );
    // An incremental snapshot into a different chain is refused.
    let other = dir.join("other");
    copy_dir(&snap, &other);
    edit_manifest(&other, |m| m["chain_id"] = "0000000000000000".into());
    let out = vm.api(&[
        "snapshot",
        "--incremental",
        "--dest",
        other.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds chain"),
        "{out:?}"
    );
    // Still running, and no partial directories were left behind.
    let n = counters(&vm.console()).last().copied().unwrap();
    vm.wait_counter(n + 5);
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    vm.kill();

    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn live_snapshot_of_a_dirtying_guest_restores_consistently() {
    let dir = tmpdir("snap-live");
    let task = "task=dirty mib=32 rate=32 hz=20 max=50";
    let reference = Vm::boot(&dir, "ref", task);
    let c = reference.console.clone();
    let (code, err) = reference.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let want = value(&std::fs::read_to_string(c).unwrap(), "checksum").unwrap();

    let vm = Vm::boot(&dir, "a", task);
    vm.wait_counter(5);
    let snap = dir.join("live");
    let s = vm.snapshot(&snap, &["--live"]);
    assert_eq!(s["live"], true, "{s}");
    assert!(s["rounds"].as_u64().unwrap() >= 2, "{s}");
    let pause = s["pause_ms"].as_f64().unwrap();
    let total = s["total_ms"].as_f64().unwrap();
    assert!(pause < total, "{s}");
    // The guest kept running during the copy; kill it well before its end.
    vm.kill();
    let r = Vm::restore(&dir, "b", &snap, &[]);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert!(after.contains("dirty_verify=ok"), "{after}");
    assert_eq!(value(&after, "checksum"), Some(want));
    let out = ffmk()
        .args(["snapshot", "inspect", "--verify"])
        .arg(&snap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("(live)"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A CPU vendor that is not this host's (the manifest of a snapshot taken
/// elsewhere).
fn other_vendor() -> &'static str {
    let amd = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("vendor_id") && l.contains("AuthenticAMD"));
    if amd {
        "GenuineIntel"
    } else {
        "AuthenticAMD"
    }
}

/// Rewrites a snapshot's state file in the layout of state version 2 (the
/// layout before device states were kept by id) and fixes the manifest;
/// without `rtc`, as version 2 states from before the CMOS clock were.
fn to_state_version_2(snap: &Path, rtc: bool) {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    let name = m["state"]["name"].as_str().unwrap().to_string();
    let mut s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join(&name)).unwrap()).unwrap();
    assert_eq!(s["version"], 3, "today's layout");
    let devices = s["devices"].as_object().unwrap().clone();
    // Version 2's machine configuration (for this guest: one vCPU, an rng,
    // no disk, network, console or vsock).
    let spec = s["config"].clone();
    let memory: u64 = spec["memory"]
        .as_str()
        .unwrap()
        .trim_end_matches('B')
        .parse()
        .unwrap();
    let config = serde_json::json!({
        "kernel": spec["kernel"], "cmdline": spec["cmdline"], "cpus": 1, "compute": 0,
        "memory_bytes": memory, "hugepages": false, "test_exit_port": spec["test_exit_port"],
        "cpu_profile": spec["cpu_profile"], "disks": [], "nets": [], "rng": true,
        "virtio_console": null, "vsock": null, "hotplug_slots": 0,
    });
    let o = s.as_object_mut().unwrap();
    o.remove("devices");
    o.insert("config".into(), config);
    o.insert("version".into(), 2.into());
    for id in ["serial", "rtc", "pci"] {
        if id != "rtc" || rtc {
            o.insert(id.into(), devices[id].clone());
        }
    }
    // Version 2 listed virtio transports in build order.
    o.insert("virtio".into(), serde_json::json!([devices["virtio-rng"]]));
    let bytes = serde_json::to_vec(&s).unwrap();
    std::fs::write(snap.join(&name), &bytes).unwrap();
    edit_manifest(snap, |m| {
        m["state"]["crc32"] = crc32fast::hash(&bytes).into();
        m["state"]["bytes"] = bytes.len().into();
    });
}

#[test]
fn snapshots_in_the_previous_state_layout_still_restore() {
    let dir = tmpdir("snap-v2");
    let vm = Vm::boot_with(&dir, "a", "task=counter hz=50 max=100", &["--rng"]);
    vm.wait_counter(10);
    assert!(vm.api(&["pause"]).status.success());
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    let before = vm.console();
    vm.kill();
    // A version from the future is refused in one line, naming both.
    let future = dir.join("future");
    copy_dir(&snap, &future);
    let name = {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(future.join("manifest.json")).unwrap()).unwrap();
        m["state"]["name"].as_str().unwrap().to_string()
    };
    let mut s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(future.join(&name)).unwrap()).unwrap();
    s["version"] = 99.into();
    let bytes = serde_json::to_vec(&s).unwrap();
    std::fs::write(future.join(&name), &bytes).unwrap();
    edit_manifest(&future, |m| {
        m["state"]["crc32"] = crc32fast::hash(&bytes).into();
        m["state"]["bytes"] = bytes.len().into();
    });
    let out = ffmk()
        .args(["restore", "--from"])
        .arg(&future)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("state version 99"), "{err}");
    // The previous layout restores and the guest goes on where it was,
    // also from a state written before a device (the CMOS clock) existed.
    let old = dir.join("old");
    copy_dir(&snap, &old);
    to_state_version_2(&snap, true);
    to_state_version_2(&old, false);
    for (name, from) in [("b", &snap), ("c", &old)] {
        let r = Vm::restore(&dir, name, from, &[]);
        let (code, err) = r.wait_exit();
        assert_eq!(code, Some(0), "{err}");
        let after = std::fs::read_to_string(dir.join(format!("{name}.console"))).unwrap();
        assert_consecutive(&(before.clone() + &after), 100);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
