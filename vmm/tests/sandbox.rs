//! The VMM's own threads run confined: every thread of a running ffmk-vmm
//! (control, vCPUs, I/O, API) carries a seccomp filter, as the kernel
//! reports it in /proc, unless `--seccomp=off`. What a forbidden call does
//! is tested in the sandbox crate (sandbox/tests/forbidden_calls.rs); that
//! the lists are complete, by every other test here, which runs with
//! filters on.
mod common;

use common::{probe_argv, tmpdir, Vm};
use std::path::Path;

/// (thread name, seccomp mode, number of filters) of every thread of `pid`
/// but KVM's own kernel workers.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name:");
        if name.starts_with("kvm-") {
            continue;
        }
        out.push((
            name,
            field("Seccomp:").parse().unwrap(),
            field("Seccomp_filters:").parse().unwrap(),
        ));
    }
    out.sort();
    out
}

fn start(dir: &Path, name: &str, extra: &[&str]) -> Vm {
    let vsock = format!("cid=9,socket={}", dir.join(format!("{name}.v")).display());
    let mut args = vec!["--cpus", "2", "--rng", "--vsock", &vsock];
    args.extend(extra);
    let argv = probe_argv("task=counter hz=50", &args);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let vm = Vm::spawn(
        &argv,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    );
    vm.wait_counter(3);
    // The API thread is up once it answers.
    assert!(vm.api(&["info"]).status.success());
    vm
}

#[test]
fn every_thread_of_a_running_vmm_carries_its_filter_unless_turned_off() {
    let dir = tmpdir("sandbox-threads");
    let vm = start(&dir, "on", &[]);
    let seen = threads(vm.child.id());
    vm.kill();
    let names: Vec<&str> = seen.iter().map(|(n, _, _)| n.as_str()).collect();
    for want in ["ffmk-vmm", "vcpu0", "vcpu1", "io", "api"] {
        assert!(names.contains(&want), "no {want} thread: {seen:?}");
    }
    for (name, mode, filters) in &seen {
        // Mode 2: filtering. The vCPU, I/O and API threads have a second
        // filter (opens refused with EACCES).
        assert_eq!(*mode, 2, "{name} is not confined: {seen:?}");
        let want = if name == "ffmk-vmm" { 1 } else { 2 };
        assert!(*filters >= want, "{name}: {filters} filter(s): {seen:?}");
    }

    let vm = start(&dir, "off", &["--seccomp", "off"]);
    let seen = threads(vm.child.id());
    vm.kill();
    assert!(seen.iter().all(|(_, mode, _)| *mode == 0), "{seen:?}");
}

#[test]
fn a_wrong_seccomp_mode_is_one_line() {
    let out = common::ffmk()
        .args(["run", "--kernel", "x", "--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--seccomp takes on, log or off"), "{err}");
}

#[test]
fn api_requests_outside_the_allowed_dirs_and_hosts_are_refused_and_the_vm_runs_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("sandbox-access");
    let allowed = dir.join("bb");
    std::fs::create_dir_all(&allowed).unwrap();
    let vm = start(
        &dir,
        "a",
        &[
            "--snapshot-dir",
            allowed.to_str().unwrap(),
            "--migrate-to",
            "10.99.0.2",
        ],
    );
    let mode = std::fs::metadata(&vm.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");
    let refused = |args: &[&str], want: &str| {
        let out = vm.api(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was not refused");
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
    };
    let outside = dir.join("elsewhere");
    refused(
        &["snapshot", "--dest", outside.to_str().unwrap()],
        "outside the directories given with --snapshot-dir",
    );
    refused(
        &[
            "snapshot",
            "--dest",
            allowed.join("../escape").to_str().unwrap(),
        ],
        "is refused",
    );
    refused(
        &["migrate", "--to", "tcp://127.0.0.1:1"],
        "not a host given with --migrate-to",
    );
    assert!(!outside.exists() && !dir.join("escape").exists());
    // Inside the directory: taken; and the guest kept counting throughout.
    let before = common::counters(&vm.console()).last().copied().unwrap();
    vm.snapshot(&allowed.join("s1"), &[]);
    assert!(allowed.join("s1/manifest.json").exists());
    vm.wait_counter(before + 3);
    vm.kill();

    // Settings that cannot work are refused at start, in one line.
    for (flag, value, want) in [
        (
            "--snapshot-dir",
            "/nonexistent/ffmk",
            "--snapshot-dir /nonexistent/ffmk",
        ),
        (
            "--migrate-to",
            "a b",
            "--migrate-to \"a b\" is not HOST or HOST:PORT",
        ),
        (
            "--api-group",
            "no-such-group-ffmk",
            "--api-group no-such-group-ffmk: no such group",
        ),
    ] {
        let p = common::probe();
        let sock = dir.join("bad.sock");
        let out = common::ffmk()
            .args([
                "run",
                "--kernel",
                p.to_str().unwrap(),
                flag,
                value,
                "--api-socket",
            ])
            .arg(&sock)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.contains(want), "{flag}: want {want:?} in: {err}");
        assert!(!sock.exists(), "{flag}: socket left behind");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn with_a_snapshot_dir_landlock_confines_the_vmm_and_the_vm_still_works() {
    let dir = tmpdir("sandbox-landlock");
    let allowed = dir.join("bb");
    std::fs::create_dir_all(&allowed).unwrap();
    let (_, disk) = common::disk_image(&dir);
    let vcon = dir.join("vcon.out");
    let vm = start(
        &dir,
        "ll",
        &[
            "--log-level",
            "info",
            "--snapshot-dir",
            allowed.to_str().unwrap(),
            "--disk",
            &disk,
            "--virtio-console",
            vcon.to_str().unwrap(),
        ],
    );
    // Snapshots go where the configuration allows, and a restore reads them.
    vm.snapshot(&allowed.join("s1"), &[]);
    let before = common::counters(&vm.console()).last().copied().unwrap();
    vm.wait_counter(before + 3);
    // A clean stop (SIGTERM) removes the API socket: its directory allows it.
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, stderr) = vm.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("landlock: fully enforced"), "{stderr}");
    assert!(!dir.join("ll.sock").exists(), "{stderr}");
    let r = Vm::restore(
        &dir,
        "ll2",
        &allowed.join("s1"),
        &[
            "--snapshot-dir",
            allowed.to_str().unwrap(),
            "--allow-snapshot-paths",
            dir.to_str().unwrap(),
        ],
    );
    r.wait_counter(before + 3);
    r.kill();
    std::fs::remove_dir_all(dir).unwrap();
}
