//! End-to-end tests: the real `ffmk-vmm` binary boots the probe guest under
//! real KVM. Build the guest first: `guest-images/build probe` (ci/test does).
mod common;

use common::{api, ffmk, probe, probe_argv, tmpdir, value, Running};
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

fn run_probe(task: &str, cpus: u32, memory: &str) -> Output {
    run_probe_with(task, cpus, memory, &[])
}

/// `run_probe` with extra `ffmk-vmm run` flags.
fn run_probe_with(task: &str, cpus: u32, memory: &str, extra: &[&str]) -> Output {
    ffmk()
        .args(["run", "--kernel"])
        .arg(probe())
        .args([
            "--cmdline",
            task,
            "--cpus",
            &cpus.to_string(),
            "--memory",
            memory,
            "--test-exit-port",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn hello_reports_every_vcpu() {
    for cpus in [1, 2, 4] {
        let out = run_probe("task=hello", cpus, "128M");
        assert!(out.status.success(), "{cpus} vCPUs: {out:?}");
        assert_eq!(
            value(&out, "cpus").as_deref(),
            Some(cpus.to_string().as_str()),
            "{out:?}"
        );
        assert_eq!(value(&out, "hello").as_deref(), Some("ffmk-probe"));
    }
}

#[test]
fn cpu_profile_decides_what_cpuid_shows_the_guest() {
    let run = |profile: &str| {
        let out = run_probe_with("task=hello", 1, "64M", &["--cpu-profile", profile]);
        assert!(out.status.success(), "{out:?}");
        out
    };
    let host_flag = |flag: &str| {
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == flag))
    };
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if pvm && !host_flag("cpuid_fault") {
        // The probe reads CPUID in ring 3, which a PVM host can trap only
        // with CPUID faulting: without it the guest sees the host's CPUID
        // and no profile can change what ring 3 reads (docs/pvm-hosts.md).
        eprintln!(
            "skipped: this PVM host has no CPUID faulting; guest ring 3 reads the host's CPUID"
        );
        return;
    }
    // CX16 is hidden by the pvm profile on every host (KVM honours it even
    // on PVM hosts, unlike XSAVE: docs/pvm-hosts.md).
    assert_eq!(value(&run("pvm"), "cpu_cx16").as_deref(), Some("0"));
    let host_has_cx16 = host_flag("cx16");
    let expect = if host_has_cx16 { "1" } else { "0" };
    assert_eq!(value(&run("host"), "cpu_cx16").as_deref(), Some(expect));
    if !pvm {
        assert_eq!(value(&run("pvm"), "cpu_xsave").as_deref(), Some("0"));
    }
}

#[test]
fn pci_root_bus_is_seen_through_ports_and_ecam() {
    let out = run_probe("task=pci", 1, "64M");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(value(&out, "pci_ecam").as_deref(), Some("0xe0000000"));
    assert_eq!(
        value(&out, "pci").as_deref(),
        Some("00:00.0 id=8086:0d57 class=060000"),
        "host bridge first"
    );
    assert_eq!(value(&out, "pci_ecam_agrees").as_deref(), Some("1"));
    assert_eq!(value(&out, "pci_config_writes").as_deref(), Some("1"));
}

#[test]
fn virtio_rng_gives_fresh_random_bytes() {
    let out = run_probe_with("task=rng", 1, "64M", &["--rng"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(value(&out, "rng_bytes").as_deref(), Some("64"));
    assert_eq!(value(&out, "rng_distinct").as_deref(), Some("1"));
    let hex = value(&out, "rng_hex").unwrap();
    assert_eq!(hex.len(), 128);
    assert_ne!(hex, "0".repeat(128));
    // Without --rng the guest finds no device.
    let none = run_probe("task=rng", 1, "64M");
    assert_eq!(none.status.code(), Some(100), "{none:?}");
}

#[test]
fn virtio_console_output_lands_in_the_host_file() {
    let dir = tmpdir("vcon");
    let log = dir.join("job.log");
    let log_arg = log.to_str().unwrap();
    let out = run_probe_with(
        "task=vcon lines=50",
        1,
        "64M",
        &["--virtio-console", log_arg],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(value(&out, "vcon_lines").as_deref(), Some("50"));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 50, "{text}");
    assert_eq!(lines[49], "vcon line 49 from the probe");
    // The serial console does not carry it.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("vcon line"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memtouch_checksum_is_stable_across_runs_sizes_and_vcpus() {
    let mut seen = vec![];
    for (cpus, memory) in [(1, "64M"), (2, "512M"), (4, "512M"), (2, "5G")] {
        let out = run_probe("task=memtouch mib=32", cpus, memory);
        assert!(out.status.success(), "{out:?}");
        seen.push(value(&out, "checksum").expect("checksum printed"));
    }
    assert!(seen.iter().all(|c| c == &seen[0]), "{seen:?}");
    // More memory than the guest has is refused by the probe itself.
    let out = run_probe("task=memtouch mib=512", 1, "64M");
    assert_eq!(out.status.code(), Some(100), "{out:?}");
}

#[test]
fn guest_memory_size_is_what_was_asked() {
    for (memory, mib) in [("64M", 63), ("1G", 1023), ("5G", 5119)] {
        let out = run_probe("task=hello", 1, memory);
        // RAM below 1 MiB minus the EBDA and BIOS area is reported too.
        let got: u64 = value(&out, "mem_mib").unwrap().parse().unwrap();
        assert_eq!(got, mib, "{memory}");
    }
}

#[test]
fn crashes_and_resets_end_the_vm_cleanly_and_are_reported() {
    // (task, vCPUs, exit code, where the report goes, what it says)
    let cases = [
        ("task=triplefault", 2, 3, "stderr", "triple fault"),
        // ... with where the vCPU was and what KVM had for it.
        ("task=triplefault", 1, 3, "stderr", "triple fault at RIP 0x"),
        ("task=reset", 1, 0, "stderr", "reset"),
        ("task=fault", 1, 101, "stdout", "fault vector=6"),
        ("task=exit status=42", 1, 42, "stdout", ""),
    ];
    for (task, cpus, code, stream, says) in cases {
        let out = run_probe(task, cpus, "64M");
        assert_eq!(out.status.code(), Some(code), "{task}: {out:?}");
        let text = if stream == "stderr" {
            &out.stderr
        } else {
            &out.stdout
        };
        assert!(
            String::from_utf8_lossy(text).contains(says),
            "{task}: {out:?}"
        );
    }
}

/// The `required:` list of a schema in docs/api.yaml (kept true by the test
/// that reads GET /vm).
fn documented_required(schema: &str) -> Vec<String> {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml"))
        .expect("docs/api.yaml");
    let from = yaml
        .find(&format!("\n    {schema}:\n"))
        .unwrap_or_else(|| panic!("schema {schema} in docs/api.yaml"));
    let line = yaml[from..]
        .lines()
        .find(|l| l.trim_start().starts_with("required:"))
        .expect("required list");
    let list = line.split_once('[').and_then(|(_, r)| r.split_once(']'));
    let keys: Vec<String> = list
        .expect("required: [a, b]")
        .0
        .split(',')
        .map(|k| k.trim().to_string())
        .collect();
    assert!(keys.len() > 3, "{keys:?}");
    keys
}

#[test]
fn counter_survives_pause_and_resume_through_the_api() {
    let dir = tmpdir("pause");
    let sock = dir.join("api.sock");
    let mut vm = Running::start_owned(&probe_argv(
        "task=counter hz=20",
        &["--cpus", "2", "--api-socket", sock.to_str().unwrap()],
    ));
    let first = vm
        .next_counter(Duration::from_secs(10))
        .expect("counter runs");
    let out = api(&sock, "pause");
    assert!(out.status.success(), "{out:?}");
    // Drain what was printed before the pause took effect, then expect silence.
    let mut last = first;
    while let Some(n) = vm.next_counter(Duration::from_millis(300)) {
        assert_eq!(n, last + 1);
        last = n;
    }
    assert_eq!(
        vm.next_counter(Duration::from_millis(700)),
        None,
        "no output while paused"
    );
    let info = api(&sock, "info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "paused");
    assert_eq!(v["vcpus"].as_array().unwrap().len(), 2);
    for key in documented_required("VmInfo") {
        assert!(
            v.get(&key).is_some(),
            "GET /vm lacks {key}, which docs/api.yaml requires"
        );
    }
    let again = api(&sock, "pause");
    assert_eq!(again.status.code(), Some(4), "refused: exit 4");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already paused"));
    assert!(api(&sock, "resume").status.success());
    let next = vm
        .next_counter(Duration::from_secs(5))
        .expect("counter continues");
    assert_eq!(next, last + 1, "no gap and no repeat across the pause");
    assert!(api(&sock, "shutdown").status.success());
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("shutdown requested through the API"), "{err}");
    assert!(!sock.exists(), "API socket removed on exit");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let mut vm = Running::start_owned(&probe_argv("task=counter hz=50", &[]));
    vm.next_counter(Duration::from_secs(10))
        .expect("counter runs");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, err) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("received SIGTERM"), "{err}");
}

/// Every bad input: exit code 2, exactly one line on stderr, nothing left behind.
#[test]
fn bad_input_gives_one_line_and_exit_code_2() {
    let dir = tmpdir("bad");
    let probe = probe();
    let probe = probe.to_str().unwrap();
    let text = dir.join("not-a-kernel");
    std::fs::write(&text, "hello\n").unwrap();
    let unreadable = dir.join("no-such-dir/vmlinux");
    let toml = dir.join("vm.toml");
    std::fs::write(&toml, format!("kernel = \"{probe}\"\nmemroy = \"1G\"\n")).unwrap();
    let busy = dir.join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let fresh_sock = dir.join("fresh.sock");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--kernal", probe], "--kernal"),
        (vec!["run"], "no kernel"),
        (
            vec!["run", "--kernel", unreadable.to_str().unwrap()],
            "cannot open kernel",
        ),
        (
            vec!["run", "--kernel", text.to_str().unwrap()],
            "not a kernel image",
        ),
        (
            vec![
                "run",
                "--kernel",
                probe,
                "--memory",
                "100T",
                "--api-socket",
                fresh_sock.to_str().unwrap(),
            ],
            "cannot give",
        ),
        (
            vec!["run", "--kernel", probe, "--memory", "lots"],
            "invalid size",
        ),
        (vec!["run", "--kernel", probe, "--cpus", "0"], "--cpus"),
        (
            vec!["run", "--kernel", probe, "--console", "tty"],
            "invalid console",
        ),
        (
            vec!["run", "--config", toml.to_str().unwrap()],
            "unknown field `memroy`",
        ),
        (
            vec![
                "run",
                "--kernel",
                probe,
                "--api-socket",
                busy.to_str().unwrap(),
            ],
            "already in use",
        ),
        (
            vec![
                "run",
                "--kernel",
                probe,
                "--initrd",
                unreadable.to_str().unwrap(),
            ],
            "cannot open initramfs",
        ),
        (
            vec!["info", "--api-socket", unreadable.to_str().unwrap()],
            "cannot connect",
        ),
    ];
    for (args, needle) in cases {
        let out = ffmk().args(&args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        // One line; a command-line error adds clap's tip or the usage.
        let lines = err.lines().count();
        assert!(
            lines == 1
                || (lines == 2
                    && err
                        .lines()
                        .nth(1)
                        .is_some_and(|l| l.starts_with("ffmk-vmm: tip:")
                            || l.starts_with("ffmk-vmm: usage:"))),
            "{args:?}: one line expected, got: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(
        !fresh_sock.exists(),
        "a failed start leaves no API socket behind"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_file_sets_everything_and_flags_override_it() {
    let dir = tmpdir("toml");
    let toml = dir.join("vm.toml");
    let mut f = std::fs::File::create(&toml).unwrap();
    writeln!(
        f,
        "kernel = \"{}\"\ncmdline = \"task=hello\"\ncpus = 2\nmemory = \"96M\"\ntest_exit_port = 0xf4\nconsole = \"stdio\"",
        probe().display()
    )
    .unwrap();
    let out = ffmk()
        .args(["run", "--config"])
        .arg(&toml)
        .args(["--cpus", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(value(&out, "cpus").as_deref(), Some("3"));
    assert_eq!(value(&out, "mem_mib").as_deref(), Some("95"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn host_info_reports_kind_and_profile() {
    let out = ffmk().args(["host-info", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["capabilities"]["irqchip"].as_bool().unwrap());
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(v["host_kind"] == "pvm", pvm);
    assert_eq!(v["profile"] == "pvm", pvm);
    if pvm {
        let hidden: Vec<&str> = v["hidden_cpu_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(hidden.contains(&"cx16") && hidden.contains(&"xsave"));
    }
}
