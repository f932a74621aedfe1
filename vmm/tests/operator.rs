//! What an operator meets (issue: operator experience): commands that
//! never hang, errors that keep their detail, one exit-code rule, logs a
//! machine can read, a configuration file keyed like the flags.
mod common;

use common::{ffmk, probe, tmpdir, Vm};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until `path` exists (a VMM's API socket), at most 20 s.
fn wait_for(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_waiting_incoming_vmm_answers_and_ends_on_sigterm() {
    let dir = tmpdir("incoming-wait");
    let sock = dir.join("in.sock");
    let mut child = ffmk()
        .args([
            "run",
            "--incoming",
            "tcp://127.0.0.1:7431",
            "--memory",
            "64M",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    // info answers at once, with the state and where it waits.
    let out = ffmk()
        .args(["info", "--json", "--timeout", "5", "--api-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "incoming");
    assert_eq!(v["incoming"]["listen"], "127.0.0.1:7431");
    assert_eq!(v["config"]["memory_bytes"], 64 << 20);
    // The summary says the same to a person.
    let out = ffmk()
        .args(["info", "--api-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let summary = text(&out.stdout);
    assert!(
        summary.contains("State:") && summary.contains("incoming"),
        "{summary}"
    );
    // Anything that needs a VM is refused (exit 4), not left hanging.
    let out = ffmk()
        .args(["pause", "--api-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("waits for a migration"));
    // SIGTERM ends it, and its socket goes with it.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not end the wait");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("received SIGTERM while waiting"), "{err}");
    assert!(!sock.exists(), "the API socket is removed");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stopped_vmm_gets_a_timeout_naming_it() {
    let dir = tmpdir("timeout");
    let vm = Vm::boot(&dir, "a", "task=counter hz=5");
    wait_for(&vm.sock);
    vm.wait_counter(1);
    let pid = vm.child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    let out = ffmk()
        .args(["info", "--timeout", "1", "--api-socket"])
        .arg(&vm.sock)
        .output()
        .unwrap();
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        err.contains(&format!("the VMM at {} did not answer", vm.sock.display()))
            && err.contains("within 1 s"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Awake again, it answers.
    assert!(vm.api(&["info"]).status.success());
    let _ = vm.stop();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn command_line_errors_keep_their_detail_and_follow_one_rule() {
    // Missing argument: named, with the usage on a second line.
    let out = ffmk()
        .args(["migrate", "--api-socket", "/nowhere"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not provided: --to <TO>"), "{err}");
    assert!(err.lines().count() <= 2, "{err}");
    // A misspelt flag gets clap's tip.
    let out = ffmk().args(["run", "--kernal", "x"]).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'--kernal'") && err.contains("tip: a similar argument exists: '--kernel'"),
        "{err}"
    );
    // The bare command prints its usage, not an error.
    let out = ffmk().output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Usage: ffmk-vmm") && err.contains("Commands:"),
        "{err}"
    );
    // A level that is not one is refused, from the flag and from RUST_LOG.
    let out = ffmk()
        .args(["--log-level", "verbose", "info", "--api-socket", "/nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("\"verbose\" is not a level"));
    let out = ffmk()
        .env("RUST_LOG", "verbose")
        .args(["info", "--api-socket", "/nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("RUST_LOG"),
        "{}",
        text(&out.stderr)
    );
    // No VMM behind the socket: bad input, one line.
    let out = ffmk()
        .args(["info", "--api-socket", "/nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot connect"));
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let p = probe();
    // `ffmk-vmm [FLAGS] run ... [MORE]` with RUST_LOG as given.
    let run = |flags: &[&str], more: &[&str], rust_log: Option<&str>| {
        let mut c = ffmk();
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        c.args(flags)
            .args([
                "run",
                "--kernel",
                p.to_str().unwrap(),
                "--cmdline",
                "task=hello",
                "--memory",
                "64M",
                "--test-exit-port",
                "--console",
                "none",
            ])
            .args(more);
        c.output().unwrap()
    };
    let out = run(&["--log-level", "info"], &[], None);
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(!err.contains('\x1b'), "no colour codes in a file: {err:?}");
    for line in err.lines() {
        assert!(line.starts_with("ffmk-vmm: "), "one style: {line:?}");
    }
    assert!(err.contains("ffmk-vmm: VM stopped"), "{err}");
    let out = run(&["--log-format", "json", "--log-level", "info"], &[], None);
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    let mut said = false;
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        said |= v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("VM stopped"));
    }
    assert!(said, "{err}");
    // RUST_LOG filters when --log-level is not given: no warning about
    // the compute vCPU's unpinned core.
    let quiet = run(&[], &["--cpus", "service=1,compute=1"], Some("error"));
    let err = text(&quiet.stderr);
    assert!(
        !err.contains("warning:"),
        "RUST_LOG=error hides warnings: {err}"
    );
}

#[test]
fn config_files_use_the_flags_names_and_say_where_they_are_wrong() {
    let dir = tmpdir("config-keys");
    let p = probe();
    let good = dir.join("vm.toml");
    std::fs::write(
        &good,
        format!(
            "kernel = \"{}\"\ncmdline = \"task=hello\"\nmemory = 96\ntest-exit-port = true\n\
             console = \"stdio\"\nsnapshot-dir = \"{}\"\n",
            p.display(),
            dir.display()
        ),
    )
    .unwrap();
    let out = ffmk()
        .arg("run")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("mem_mib=95") || text(&out.stdout).contains("mem_mib=96"));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "kernel = \"k\"\n\nmemory = [1]\n").unwrap();
    let out = ffmk()
        .arg("run")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 3"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn snapshots_go_into_an_empty_prepared_directory_and_refusals_exit_4() {
    let dir = tmpdir("prepared-dir");
    let vm = Vm::boot(&dir, "a", "task=counter hz=5");
    wait_for(&vm.sock);
    vm.wait_counter(1);
    let job = dir.join("job42");
    std::fs::create_dir(&job).unwrap();
    let out = ffmk()
        .args(["snapshot", "--dest", job.to_str().unwrap(), "--api-socket"])
        .arg(&vm.sock)
        .output()
        .unwrap();
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(said.starts_with("full snapshot in"), "{said}");
    assert!(job.join("manifest.json").exists());
    // Now it holds a snapshot: refused (exit 4), the VM runs on.
    let out = ffmk()
        .args(["snapshot", "--dest", job.to_str().unwrap(), "--api-socket"])
        .arg(&vm.sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("already exists"));
    let info = vm.api(&["info"]);
    assert!(info.status.success());
    let _ = vm.stop();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_command_that_prints_takes_json() {
    let dir = tmpdir("json-everywhere");
    let key = dir.join("k.key");
    let k = key.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &[i32])> = vec![
        (vec!["host-info", "--json"], &[0]),
        (vec!["host-check", "--json"], &[0, 1]),
        (vec!["vfio", "list", "--json"], &[0]),
        (vec!["ib", "list", "--json"], &[0]),
        (vec!["ib", "check", "mlx5_9", "--json"], &[0, 1]),
        (vec!["key", "generate", k, "--json"], &[0]),
        (vec!["key", "show", k, "--json"], &[0]),
    ];
    for (args, codes) in cases {
        let out = ffmk().args(&args).output().unwrap();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            codes.contains(&code),
            "{args:?}: exit {code}: {}",
            text(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)));
        match args[0] {
            "key" => assert_eq!(v["kind"], "cluster", "{v}"),
            "ib" if args[1] == "check" => {
                assert_eq!(v["ready"], false, "{v}");
                assert_eq!(code, 1);
                assert!(
                    v["problems"].as_array().is_some_and(|p| !p.is_empty()),
                    "{v}"
                );
            }
            _ => {}
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
