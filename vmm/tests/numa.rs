//! Guest NUMA nodes and CPU topology (issue: NUMA, topology, start-up and
//! footprint), seen from inside the guest: the probe reads CPUID on every
//! CPU and parses SRAT and SLIT. From outside: the memory binding in
//! /proc/PID/numa_maps, the vCPUs' host CPUs, snapshots that keep the
//! layout, and settings that do not add up refused before anything starts.
mod common;

use common::{api, ffmk, probe_argv_mem, tmpdir, Vm};
use std::collections::BTreeSet;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `key=value` words of a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `run --kernel probe.elf --cmdline TASK FLAGS...` (no --memory: the
/// nodes' sum, or the default).
fn probe_args(task: &str, flags: &[&str]) -> Vec<String> {
    let mut v = vec!["run".to_string(), "--kernel".into()];
    v.push(common::probe().to_string_lossy().into_owned());
    v.extend(["--cmdline".to_string(), task.into()]);
    v.extend(flags.iter().map(|s| s.to_string()));
    v
}

fn run_topo(memory: &str, extra: &[&str]) -> String {
    let mut flags = vec!["--test-exit-port"];
    flags.extend_from_slice(extra);
    let out = ffmk()
        .args(probe_argv_mem("task=topo", memory, &flags))
        .output()
        .unwrap();
    let console = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{console}\n{}",
        text(&out.stderr)
    );
    console
}

#[test]
fn the_guest_sees_the_sockets_cores_and_nodes_it_was_given() {
    // 2 sockets of 3 cores: the core field needs 2 bits, so APIC IDs are
    // 0-2 and 4-6. Node 1 runs across the MMIO hole (RAM above 3 GiB
    // continues at 4 GiB).
    let console = run_topo(
        "3136M",
        &[
            "--cpus",
            "6",
            "--topology",
            "sockets=2,cores=3,threads=1",
            "--numa",
            "node=0,cpus=0-2,memory=64M,host-node=0",
            "--numa",
            "node=1,cpus=3-5,memory=3G,distance=0:17",
        ],
    );
    let cpus: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("topo cpu="))
        .collect();
    assert_eq!(cpus.len(), 6, "{console}");
    let mut apics = BTreeSet::new();
    for l in &cpus {
        let apic: u32 = field(l, "apic").unwrap().parse().unwrap();
        apics.insert(apic);
        assert_eq!(field(l, "x2apic"), Some(apic.to_string().as_str()), "{l}");
        assert_eq!(field(l, "smt_shift"), Some("0"), "{l}");
        assert_eq!(field(l, "core_shift"), Some("2"), "{l}");
        assert_eq!(field(l, "core_level_cpus"), Some("3"), "{l}");
        // L3 shared by a socket's 4 APIC IDs (3 used).
        assert_eq!(field(l, "l3_sharing"), Some("4"), "{l}");
        // AMD's 0x8000001E names the node (-1: an Intel table without it).
        let ext = field(l, "ext_node").unwrap();
        assert!(ext == "-1" || ext == (apic >> 2).to_string(), "{l}");
    }
    assert_eq!(apics, BTreeSet::from([0, 1, 2, 4, 5, 6]), "{console}");
    let srat_cpus: BTreeSet<(u32, u32)> = console
        .lines()
        .filter(|l| l.starts_with("srat cpu"))
        .map(|l| {
            (
                field(l, "apic").unwrap().parse().unwrap(),
                field(l, "node").unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        srat_cpus,
        BTreeSet::from([(0, 0), (1, 0), (2, 0), (4, 1), (5, 1), (6, 1)]),
        "{console}"
    );
    let mem: Vec<(&str, &str, &str)> = console
        .lines()
        .filter(|l| l.starts_with("srat mem"))
        .map(|l| {
            (
                field(l, "base").unwrap(),
                field(l, "len").unwrap(),
                field(l, "node").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        mem,
        vec![
            ("0x0", "0x4000000", "0"),
            ("0x4000000", "0xbc000000", "1"),
            ("0x100000000", "0x4000000", "1"),
        ],
        "{console}"
    );
    assert!(console.contains("slit row=0 [10, 17]"), "{console}");
    assert!(console.contains("slit row=1 [17, 10]"), "{console}");
}

#[test]
fn threads_share_a_core_and_a_flat_vm_has_no_nodes() {
    let console = run_topo(
        "64M",
        &["--cpus", "4", "--topology", "sockets=1,cores=2,threads=2"],
    );
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("topo cpu="))
        .collect();
    assert_eq!(lines.len(), 4, "{console}");
    for l in lines {
        assert_eq!(field(l, "smt_shift"), Some("1"), "{l}");
        assert_eq!(field(l, "core_shift"), Some("2"), "{l}");
        assert_eq!(field(l, "core_level_cpus"), Some("4"), "{l}");
    }
    assert!(
        console.contains("srat=none") && console.contains("slit=none"),
        "{console}"
    );
    // Without --topology: one socket of plain cores, APIC IDs 0-2.
    let console = run_topo("64M", &["--cpus", "3"]);
    let apics: BTreeSet<&str> = console
        .lines()
        .filter(|l| l.starts_with("topo cpu="))
        .filter_map(|l| field(l, "apic"))
        .collect();
    assert_eq!(apics, BTreeSet::from(["0", "1", "2"]), "{console}");
}

#[test]
fn numa_settings_that_do_not_add_up_are_refused_before_anything_starts() {
    let dir = tmpdir("numa-bad");
    let sock = dir.join("bad.sock");
    for (flags, want) in [
        (
            &["--cpus", "4", "--numa", "cpus=0-1,memory=64M"][..],
            "vCPU(s) 2-3 are in no node",
        ),
        (
            &[
                "--cpus",
                "2",
                "--memory",
                "128M",
                "--numa",
                "cpus=0-1,memory=64M",
            ][..],
            "adds up to 64 MiB but --memory is 128 MiB",
        ),
        (
            &["--cpus", "2", "--numa", "cpus=0-1,memory=64M,host-node=63"][..],
            "host node 63 does not exist",
        ),
        (
            &[
                "--cpus",
                "2",
                "--numa",
                "cpus=0,memory=64M,distance=1:20",
                "--numa",
                "cpus=1,memory=64M,distance=0:30",
            ][..],
            "distances must be symmetric",
        ),
        (
            &[
                "--cpus",
                "2",
                "--numa",
                "cpus=0-1,memory=64M",
                "--numa",
                "cpus=1,memory=64M",
            ][..],
            "vCPU 1 is in node 0 and node 1",
        ),
        (
            &["--cpus", "4", "--topology", "sockets=3"][..],
            "is 3 vCPUs but the VM has 4",
        ),
        (
            &[
                "--cpus",
                "2",
                "--topology",
                "sockets=1,cores=2",
                "--numa",
                "cpus=0,memory=64M",
                "--numa",
                "cpus=1,memory=64M",
            ][..],
            "spans guest NUMA nodes 0 and 1",
        ),
        (
            &[
                "--cpus",
                "2",
                "--numa",
                "cpus=0-1,memory=64M",
                "--hugepages=1G",
            ][..],
            "multiple of 1024 MiB",
        ),
        (&["--numa", "cpus=0,memory=lots"][..], "not a size"),
    ] {
        let out = ffmk()
            .args(probe_args("task=hello", flags))
            .arg("--api-socket")
            .arg(&sock)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: {err}");
        assert!(!sock.exists(), "{flags:?}: nothing starts");
    }
}

/// The VMAs of `pid` bound to host node list `nodes` (numa_maps says
/// `bind:NODES`), with their sizes (from smaps) in bytes.
fn bound_bytes(pid: u32, nodes: &str) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap_or_default();
    let starts: Vec<u64> = maps
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(&format!("bind:{nodes}")))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .collect();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    smaps
        .lines()
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            starts.contains(&a).then_some(b - a)
        })
        .sum()
}

#[test]
fn node_memory_is_bound_and_a_snapshot_keeps_the_layout() {
    let dir = tmpdir("numa-snap");
    let numa = [
        "--cpus",
        "2",
        "--topology",
        "sockets=2,cores=1",
        "--numa",
        "node=0,cpus=0,memory=64M,host-node=0",
        "--numa",
        "node=1,cpus=1,memory=64M,distance=0:25",
    ];
    let args = probe_args("task=counter", &numa);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = Vm::spawn(&args, &dir.join("a.console"), &dir.join("a.sock"));
    vm.wait_counter(2);
    // Node 0's 64 MiB (and only those) are bound to host node 0.
    assert_eq!(bound_bytes(vm.pid(), "0"), 64 << 20, "{}", vm.describe());
    let info = api(&vm.sock, "info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let config = &v["config"];
    assert_eq!(config["shape"], "sockets=2,cores=1,threads=1", "{v}");
    assert_eq!(
        config["numa"]["nodes"][1]["distances"],
        serde_json::json!([25, 10]),
        "{v}"
    );
    assert_eq!(config["numa"]["nodes"][0]["host_node"], 0, "{v}");
    let snap = dir.join("snap");
    vm.snapshot(&snap, &[]);
    vm.kill();

    // The guest keeps its nodes: a restore that changes them is refused.
    for (flag, want) in [
        ("node=1,memory=128M", "only host-node= may change"),
        ("node=0,host-node=63", "host node 63 does not exist"),
        ("node=2,host-node=0", "the guest has 2 node(s)"),
    ] {
        let out = ffmk()
            .args(["restore", "--console", "none", "--from"])
            .arg(&snap)
            .args(["--numa", flag])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(want), "{flag}: {err}");
    }
    // ... and one that moves node 1 onto host node 0 runs on, bound there.
    let r = Vm::restore(&dir, "b", &snap, &["--numa", "node=1,host-node=0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::counters(&r.console()).len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        common::counters(&r.console()).len() >= 2,
        "{}",
        r.describe()
    );
    assert_eq!(bound_bytes(r.pid(), "0"), 128 << 20, "{}", r.describe());
    let v: serde_json::Value = serde_json::from_slice(&api(&r.sock, "info").stdout).unwrap();
    assert_eq!(v["config"]["numa"]["nodes"][1]["host_node"], 0, "{v}");
    assert_eq!(v["config"]["shape"], "sockets=2,cores=1,threads=1", "{v}");
    r.kill();
}

/// `MemFree` + `Inactive(file)` and `MemTotal` of host node 0 (kB).
fn node0_kb() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/sys/devices/system/node/node0/meminfo").ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.split(':')
                    .next()
                    .and_then(|k| k.split_whitespace().last())
                    == Some(name)
            })
            .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some((
        field("MemFree") + field("Inactive(file)"),
        field("MemTotal"),
    ))
}

#[test]
fn a_host_node_without_the_memory_is_refused_before_anything_starts() {
    let Some((free_kb, total_kb)) = node0_kb() else {
        eprintln!("skipped: no /sys/devices/system/node/node0");
        return;
    };
    // More than node 0 has free, but less than the host has (that is
    // refused earlier, for the whole host): the node's own check.
    let want_mib = (free_kb >> 10) + 512;
    if want_mib >= total_kb >> 10 {
        eprintln!("skipped: node 0 has too little memory in use for the check");
        return;
    }
    let want_mib = want_mib.next_multiple_of(2);
    let node = format!("cpus=0,memory={want_mib}M,host-node=0");
    let out = ffmk()
        .args(probe_args("task=hello", &["--numa", &node]))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("host node 0 has") && err.contains(&format!("need {want_mib} MiB")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
