//! End-to-end tests: the real `ffmk-vmm` binary boots the probe guest under
//! real KVM. Build the guest first: `guest-images/build probe` (ci/test does).
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn vmm() -> &'static str {
    env!("CARGO_BIN_EXE_ffmk-vmm")
}

fn probe() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out/probe.elf");
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build probe",
        p.display()
    );
    p
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ffmk-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_probe(task: &str, cpus: u32, memory: &str) -> Output {
    Command::new(vmm())
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
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn value(out: &Output, key: &str) -> Option<String> {
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix(&format!("{key}="))
            .map(|v| v.trim().to_string())
    })
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
    let out = run_probe("task=triplefault", 2, "64M");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("triple fault"),
        "{out:?}"
    );
    let out = run_probe("task=reset", 1, "64M");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reset"),
        "{out:?}"
    );
    let out = run_probe("task=fault", 1, "64M");
    assert_eq!(out.status.code(), Some(101));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fault vector=6"),
        "{out:?}"
    );
    let out = run_probe("task=exit status=42", 1, "64M");
    assert_eq!(out.status.code(), Some(42));
}

/// A running VM whose console lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(vmm())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running { child, lines: rx }
    }

    fn next_counter(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(n) = l.strip_prefix("counter=") {
                        return n.trim().parse().ok();
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    fn wait(mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (s.code(), err);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ffmk-vmm did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn api(sock: &PathBuf, cmd: &str) -> Output {
    Command::new(vmm())
        .args([cmd, "--api-socket"])
        .arg(sock)
        .output()
        .unwrap()
}

#[test]
fn counter_survives_pause_and_resume_through_the_api() {
    let dir = tmpdir("pause");
    let sock = dir.join("api.sock");
    let probe = probe();
    let vm = Running::start(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "task=counter hz=20",
        "--cpus",
        "2",
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
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
    let again = api(&sock, "pause");
    assert_eq!(again.status.code(), Some(1));
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
    let probe = probe();
    let vm = Running::start(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "task=counter hz=50",
    ]);
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
            "invalid memory size",
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
        let out = Command::new(vmm())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.lines().count(),
            1,
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
    let out = Command::new(vmm())
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
    let out = Command::new(vmm())
        .args(["host-info", "--json"])
        .output()
        .unwrap();
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
