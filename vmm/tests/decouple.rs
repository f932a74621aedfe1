//! Decoupled vCPUs end to end (real KVM, the probe guest): threads land on
//! the host cores asked for (read back from /proc), device interrupts never
//! reach a compute vCPU, the guest is told its compute CPUs, and impossible
//! layouts are refused with one clear line.
mod common;

use common::{probe, tmpdir, Vm};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use vcpu_decouple::affinity;

/// Host cores 0 and 1 exist (the development and CI machines have two).
fn two_cores() -> bool {
    let ok = std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2;
    if !ok {
        eprintln!("skipped: needs two host cores");
    }
    ok
}

/// `ffmk-vmm ARGS` with its own core-claim directory (tests run in parallel
/// and each may book core 1).
fn ffmk(claims: &Path) -> Command {
    let mut c = common::ffmk();
    c.env("FFMK_RUN_DIR", claims);
    c
}

fn probe_run(claims: &Path, task: &str, args: &[&str]) -> Output {
    ffmk(claims)
        .args([
            "run",
            "--kernel",
            probe().to_str().unwrap(),
            "--memory",
            "64M",
            "--test-exit-port",
            "--cmdline",
            task,
        ])
        .args(args)
        .output()
        .unwrap()
}

fn spawn(claims: &Path, dir: &Path, name: &str, args: &[&str]) -> Vm {
    let probe = probe();
    let mut argv = vec![
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--memory",
        "64M",
        "--test-exit-port",
        "--cmdline",
        "task=counter",
    ];
    argv.extend_from_slice(args);
    Vm::spawn_cmd(
        ffmk(claims),
        &argv,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

/// `irqroute target=T vector=V arrived=LIST` lines as (T, LIST).
fn routes(out: &Output) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("irqroute target=")?;
            let (t, rest) = rest.split_once(' ')?;
            let arrived = rest.split_once("arrived=")?.1;
            Some((t.parse().ok()?, arrived.to_string()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn threads_run_on_the_cores_asked_for() {
    if !two_cores() {
        return;
    }
    let dir = tmpdir("decouple-pin");
    let vm = spawn(
        &dir,
        &dir,
        "pin",
        &[
            "--cpus",
            "service=2,compute=1",
            "--pin",
            "service=0,compute=1",
        ],
    );
    vm.wait_counter(2);
    let pid = vm.child.id();
    let threads = affinity::threads(Path::new("/proc"), pid);
    let allowed = |name: &str| {
        threads
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.cpus_allowed.to_string())
            .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"))
    };
    assert_eq!(allowed("vcpu2"), "1", "the compute vCPU is alone on core 1");
    assert_eq!(allowed("vcpu0"), "0");
    assert_eq!(allowed("vcpu1"), "0");
    assert_eq!(allowed("io"), "0");
    // Every other thread of the VMM (control, API) stays off the compute core.
    for t in threads.iter().filter(|t| t.name != "vcpu2") {
        assert!(
            !t.cpus_allowed.contains(1),
            "{t:?} may run on the compute core"
        );
    }
    // The API reports the same, read back from /proc, and the guest got the
    // kernel parameters that keep its own noise off vCPU 2.
    let out = vm.api(&["info"]);
    assert!(out.status.success());
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("isolcpus=nohz,domain,managed_irq,2 nohz_full=2 rcu_nocbs=2 irqaffinity=0-1"),
        "{body}"
    );
    let v: serde_json::Value = {
        let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
        let (status, body) = vmm::api::http::call(&mut s, "GET", "/vm/vcpus", "").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    assert_eq!(v["topology"], "service=2,compute=1");
    let vcpus = v["vcpus"].as_array().unwrap();
    assert_eq!(vcpus[2]["role"], "compute");
    assert_eq!(vcpus[2]["host_cpus_allowed"], "1");
    assert_eq!(vcpus[2]["last_host_cpu"], 1);
    assert_eq!(vcpus[0]["host_cpus_allowed"], "0");
    assert!(vcpus[2]["kvm_stats"]["exits"].as_u64().is_some(), "{v}");
    // PAUSE exits off for a decoupled VM, where the host offers it.
    assert!(
        v["exits_disabled"] == "pause" || v["exits_disabled"] == "none",
        "{v}"
    );
    // The compute core is booked: a second VM cannot have it.
    let second = probe_run(
        &dir,
        "task=hello",
        &[
            "--cpus",
            "service=1,compute=1",
            "--pin",
            "service=0,compute=1",
        ],
    );
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!(
            "host core 1 is already a compute core of another ffmk-vmm (pid {pid})"
        )),
        "{err}"
    );
    let (_, err) = vm.stop();
    assert!(!err.contains("panicked"), "{err}");
    // Once it is gone, the core is free again.
    let third = probe_run(
        &dir,
        "task=hello",
        &[
            "--cpus",
            "service=1,compute=1",
            "--pin",
            "service=0,compute=1",
        ],
    );
    assert!(third.status.success(), "{third:?}");
}

#[test]
fn device_interrupts_never_reach_a_compute_vcpu() {
    if !two_cores() {
        return;
    }
    let dir = tmpdir("decouple-irq");
    // A plain VM delivers each MSI where the guest pointed it...
    let out = probe_run(&dir, "task=irqroute", &["--cpus", "3", "--rng"]);
    assert!(out.status.success(), "{out:?}");
    let plain = routes(&out);
    assert_eq!(
        plain,
        vec![(0, "0".into()), (1, "1".into()), (2, "2".into())],
        "{out:?}"
    );
    // ...a decoupled one steers the MSI aimed at compute vCPU 2 to a service vCPU.
    let out = probe_run(
        &dir,
        "task=irqroute",
        &[
            "--cpus",
            "service=2,compute=1",
            "--pin",
            "service=0,compute=1",
            "--rng",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let steered = routes(&out);
    assert_eq!(steered.len(), 3, "{out:?}");
    assert_eq!(steered[0], (0, "0".into()));
    assert_eq!(steered[1], (1, "1".into()));
    assert_eq!(steered[2].0, 2);
    assert!(steered[2].1 == "0" || steered[2].1 == "1", "{steered:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("delivering it to service vCPU"),
        "the rewrite is reported: {err}"
    );
}

#[test]
fn interrupt_routes_are_listed_with_their_targets() {
    if !two_cores() {
        return;
    }
    let dir = tmpdir("decouple-routes");
    let vm = spawn(
        &dir,
        &dir,
        "routes",
        &[
            "--cpus",
            "service=1,compute=1",
            "--pin",
            "service=0,compute=1",
            "--rng",
        ],
    );
    vm.wait_counter(1);
    let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
    let (status, body) = vmm::api::http::call(&mut s, "GET", "/vm/interrupts", "").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["compute_vcpus"], serde_json::json!([1]));
    assert_eq!(v["msi_steered"], 0);
    assert_eq!(v["ioapic_pins_on_compute_vcpus"], serde_json::json!([]));
    vm.stop();
}

#[test]
fn fwq_runs_on_the_compute_vcpu_and_reports_its_noise() {
    if !two_cores() {
        return;
    }
    let dir = tmpdir("decouple-fwq");
    let out = probe_run(
        &dir,
        "task=fwq samples=2000 noise=pio",
        &[
            "--cpus",
            "service=1,compute=1",
            "--pin",
            "service=0,compute=1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fwq_cpus=1 samples=2000"), "{text}");
    assert!(text.contains("fwq_irqs cpu=0 role=noise"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("fwq cpu=1 "))
        .unwrap_or_else(|| panic!("{text}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    assert!(
        field("min=") > 0 && field("min=") <= field("median=") && field("median=") <= field("max=")
    );
    // The noise task did its work on the service vCPU.
    let ops: u64 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("noise_ops="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(ops > 0, "{text}");
}

#[test]
fn impossible_layouts_are_refused_with_one_line() {
    let dir = tmpdir("decouple-bad");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--cpus", "service=0,compute=2"],
            "at least one service vCPU",
        ),
        (
            &["--cpus", "service=1,compute=1", "--pin", "compute=1,1"],
            "CPU 1 is listed twice",
        ),
        (
            &["--cpus", "service=1,compute=2", "--pin", "compute=1"],
            "lists 1 host core(s) but the VM has 2 compute vCPU(s)",
        ),
        (
            &["--cpus", "service=1,compute=1", "--pin", "compute=4095"],
            "host core 4095 (compute list) is not online",
        ),
        (
            &[
                "--cpus",
                "service=1,compute=1",
                "--pin",
                "service=0-1,compute=1",
            ],
            "host core 1 is in both the compute and the service list",
        ),
        (
            &["--cpus", "2", "--pin", "compute=1"],
            "needs compute vCPUs",
        ),
        (
            &["--cpus", "2", "--realtime", "10"],
            "--realtime applies to compute vCPUs",
        ),
        (
            &["--cpus", "service=1,compute=1", "--realtime", "100"],
            "--realtime priority must be 1-99",
        ),
        (
            &["--cpus", "service=1,compute=1", "--exits", "hlt,nap"],
            "invalid --exits",
        ),
        (
            &["--cpus", "service=1,compute=1", "--pin", "gpu=1"],
            "unknown list 'gpu'",
        ),
    ];
    for (args, want) in cases {
        let out = probe_run(&dir, "task=hello", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.trim().lines().count() <= 3,
            "{args:?}: one clear message: {err}"
        );
    }
}

#[test]
fn compute_vcpus_can_run_real_time_where_permitted() {
    if !two_cores() {
        return;
    }
    let dir = tmpdir("decouple-rt");
    let mut vm = spawn(
        &dir,
        &dir,
        "rt",
        &[
            "--cpus",
            "service=1,compute=1",
            "--pin",
            "service=0,compute=1",
            "--realtime",
            "10",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::counters(&vm.console())
        .last()
        .is_none_or(|&c| c < 1)
    {
        let ended = vm.child.try_wait().unwrap().is_some();
        if ended || Instant::now() > deadline {
            let (_, err) = vm.stop();
            // Without CAP_SYS_NICE the VM is refused, clearly.
            assert!(err.contains("real-time scheduling (SCHED_FIFO priority 10) for compute vCPU 1 is not permitted"), "{err}");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let threads = affinity::threads(Path::new("/proc"), vm.child.id());
    let compute = threads.iter().find(|t| t.name == "vcpu1").unwrap();
    let service = threads.iter().find(|t| t.name == "vcpu0").unwrap();
    assert_eq!(
        (compute.policy, service.policy),
        (Some(1), Some(0)),
        "{threads:?}"
    );
    vm.stop();
}

#[test]
fn step_sync_fwq_runs_in_lockstep_on_several_vcpus() {
    let dir = tmpdir("decouple-step");
    // Plain VM (no pinning needed): CPUs 1 and 2 measure with a barrier
    // after every sample, CPU 0 makes timer noise; FTQ the same way.
    for mode in ["fwq", "ftq interval_us=20"] {
        let task = format!("task=fwq samples=300 fwq_cpus=1-2 sync=step noise=timer mode={mode}");
        let out = probe_run(&dir, &task, &["--cpus", "3"]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("fwq_cpus=2 samples=300"), "{text}");
        assert!(text.contains("sync=step"), "{text}");
        for cpu in [1, 2] {
            assert!(text.contains(&format!("fwq cpu={cpu} ")), "{text}");
        }
        assert!(!text.contains("fwq cpu=0 "), "CPU 0 makes noise: {text}");
    }
}
