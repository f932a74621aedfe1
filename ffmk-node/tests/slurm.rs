//! Slurm launches ffmk-vmm VMs: a private Slurm (Debian's slurm-wlm:
//! slurmctld and two slurmd "nodes" on this machine, munge with its own
//! key and socket) runs jobs whose tasks are `ffmk-node slurm-vm`, one per
//! node. A job's VMs are named after its id and rank, carry the rank
//! layout on their command line, end with the job (exit status through
//! srun) and are stopped by `scancel`.
#[path = "../../vmm/tests/common/mod.rs"]
mod common;

use common::{probe, vmm, wait_for, NetNs};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn node() -> &'static str {
    env!("CARGO_BIN_EXE_ffmk-node")
}

/// The private cluster's daemons, killed on drop.
struct Slurm {
    dir: PathBuf,
    children: Vec<Child>,
    /// Where it runs (its own network namespace, or the test's).
    ns: Option<NetNs>,
}

/// `program`, in network namespace `ns` if there is one (entered with
/// nsenter: `ip netns exec` would also give it a /sys of its own, without
/// the cgroup file systems slurmd wants).
fn program_in(ns: Option<&NetNs>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", ns.0)).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Slurm {
    /// None (and a "skipped" line) without slurm-wlm, munge or root.
    fn start(dir: &Path) -> Option<Slurm> {
        Slurm::start_in(dir, None)
    }

    /// [`Slurm::start`] with the Slurm daemons (and every command of
    /// [`Slurm::cmd`]) in network namespace `ns`.
    fn start_in(dir: &Path, ns: Option<NetNs>) -> Option<Slurm> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root
            || !["slurmctld", "slurmd", "srun", "munged"]
                .iter()
                .all(|p| have(p))
        {
            eprintln!("skipped: needs root, slurm-wlm and munge (ci/setup installs them)");
            return None;
        }
        let m = dir.join("munge");
        std::fs::create_dir_all(&m).unwrap();
        let key: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(m.join("key"), key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(m.join("key"), std::fs::Permissions::from_mode(0o400)).unwrap();
        let sock = m.join("sock");
        let mut children = vec![Command::new("munged")
            .args(["--foreground", "--force"])
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--key-file={}", m.join("key").display()))
            .arg(format!("--pid-file={}", m.join("pid").display()))
            .arg(format!("--log-file={}", m.join("log").display()))
            .arg(format!("--seed-file={}", m.join("seed").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()];
        let d = dir.display();
        let conf = format!(
            "ClusterName=ffmktest\nSlurmctldHost=localhost(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool-%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\nSwitchType=switch/none\nMpiDefault=none\n\
             ReturnToService=2\nSelectType=select/cons_tres\nSlurmctldPort=6917\nSlurmdPort=6918\n\
             KillWait=5\n\
             NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[6931-6932] CPUs=1 \
             State=UNKNOWN\n\
             PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP\n",
            sock = sock.display()
        );
        for sub in ["state", "spool-n1", "spool-n2"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("slurm.conf"), conf).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "munged did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let quiet = |mut c: Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut ctld = program_in(ns.as_ref(), "slurmctld");
        ctld.args(["-D", "-i", "-f"]).arg(dir.join("slurm.conf"));
        children.push(quiet(ctld));
        for n in ["n1", "n2"] {
            let mut d = program_in(ns.as_ref(), "slurmd");
            d.args(["-D", "-N", n, "-f"]).arg(dir.join("slurm.conf"));
            children.push(quiet(d));
        }
        let s = Slurm {
            dir: dir.to_path_buf(),
            children,
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = s.cmd("sinfo").args(["-h", "-o", "%T %D"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if text.trim() == "idle 2" {
                break;
            }
            if Instant::now() > deadline {
                let tail = |f: &str| {
                    let t = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(8)..].join("\n")
                };
                panic!(
                    "Slurm did not come up: sinfo said {text:?} {}\n--- slurmctld.log\n{}\n--- slurmd-n1.log\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    tail("slurmctld.log"),
                    tail("slurmd-n1.log")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(s)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = program_in(self.ns.as_ref(), program);
        c.env("SLURM_CONF", self.dir.join("slurm.conf"));
        c.env("FFMK_CLUSTER_KEY", common::cluster_key());
        c
    }

    /// `srun -N2 --ntasks-per-node=1 ffmk-node slurm-vm ...`.
    fn srun_vms(&self, vms: &Path, cmdline: &str, extra: &[&str]) -> Command {
        let p = probe();
        let mut c = self.cmd("srun");
        c.args([
            "-N2",
            "--ntasks-per-node=1",
            node(),
            "slurm-vm",
            "--vmm",
            vmm(),
        ])
        .arg("--vm-dir")
        .arg(vms)
        .arg("--kernel")
        .arg(&p)
        .args(["--memory", "64M", "--cmdline", cmdline, "--"])
        .args(extra);
        c
    }
}

fn api(sock: &Path) -> Option<Value> {
    let out = common::api(sock, "info");
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn slurm_jobs_start_one_vm_per_node_and_stop_them_at_the_end() {
    let dir = common::tmpdir("slurm");
    let Some(slurm) = Slurm::start(&dir) else {
        return;
    };
    let vms = dir.join("vms");
    // A job whose guests end by themselves: srun's status is theirs.
    let out = slurm
        .srun_vms(&vms, "task=counter hz=20 max=10", &["--test-exit-port"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mut consoles: Vec<String> = std::fs::read_dir(&vms)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".console"))
        .collect();
    consoles.sort();
    let job: String = consoles[0]
        .trim_start_matches("job")
        .split('-')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        consoles,
        vec![
            format!("job{job}-rank0.console"),
            format!("job{job}-rank1.console")
        ]
    );
    for c in &consoles {
        let text = std::fs::read_to_string(vms.join(c)).unwrap();
        assert!(text.contains("counter=10"), "{c}: {text}");
    }
    assert!(err.contains("on n1") && err.contains("on n2"), "{err}");

    // A job that runs until cancelled: its VMs have the rank layout and
    // are gone after scancel.
    let mut running = slurm
        .srun_vms(&vms, "task=counter hz=10", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let next = job.parse::<u64>().unwrap() + 1;
    let socks: Vec<PathBuf> = (0..2)
        .map(|r| vms.join(format!("job{next}-rank{r}.sock")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let infos: Vec<Value> = loop {
        let got: Vec<Option<Value>> = socks.iter().map(|s| api(s)).collect();
        if got.iter().all(Option::is_some) {
            break got.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "the VMs of job {next} did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for (r, info) in infos.iter().enumerate() {
        let cmdline = info["config"]["cmdline"].as_str().unwrap_or_default();
        assert!(
            cmdline.contains(&format!("ffmk.job={next} ffmk.rank={r} ffmk.ranks=2"))
                && cmdline.contains("ffmk.nodes=n[1-2]"),
            "{cmdline}"
        );
    }
    let pids: Vec<i32> = infos
        .iter()
        .map(|i| i["pid"].as_i64().unwrap() as i32)
        .collect();
    let cancel = slurm.cmd("scancel").arg(next.to_string()).status().unwrap();
    assert!(cancel.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = |p: i32| unsafe { libc::kill(p, 0) } == 0;
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "VMs of a cancelled job still run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = running.wait();

    // Outside Slurm: one clear line, nothing started.
    let out = Command::new(node())
        .env("FFMK_CLUSTER_KEY", common::cluster_key())
        .args(["slurm-vm", "--vm-dir"])
        .arg(&vms)
        .args(["--kernel", "/nonexistent"])
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Every missing variable in one message, not one per try.
    assert!(
        err.contains("SLURM_JOB_ID, ") && err.contains("SLURM_JOB_NODELIST are not set"),
        "{err}"
    );
    drop(slurm);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A task whose node is not in the job's allocation, or whose rank is out
/// of range, is refused with one line and starts nothing (no Slurm needed:
/// the step's environment is given by hand).
#[test]
fn a_step_environment_that_does_not_add_up_is_refused() {
    let dir = common::tmpdir("slurm-env");
    let run = |node_name: &str, rank: &str| {
        Command::new(node())
            .env("FFMK_CLUSTER_KEY", common::cluster_key())
            .args(["slurm-vm", "--vmm", "/nonexistent/ffmk-vmm", "--vm-dir"])
            .arg(dir.join("vms"))
            .args(["--kernel", "/nonexistent"])
            .env("SLURM_JOB_ID", "42")
            .env("SLURM_PROCID", rank)
            .env("SLURM_NTASKS", "2")
            .env("SLURMD_NODENAME", node_name)
            .env("SLURM_JOB_NODELIST", "n[1-2]")
            .output()
            .unwrap()
    };
    for (name, rank, want) in [
        ("n9", "0", "node n9 is not in the allocation n[1-2]"),
        ("n1", "2", "rank 2 of 2 ranks"),
        ("n1", "x", "SLURM_PROCID \"x\" is not a number"),
    ] {
        let out = run(name, rank);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // All good but the VMM is missing: said so, nothing left behind.
    let out = run("n2", "1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run /nonexistent/ffmk-vmm"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A node daemon of the private cluster: host `me` (n1 or n2, 127.0.0.1
/// and .2 in the cluster's namespace), its VMs in `dir/vms-ME`.
fn node_daemon(slurm: &Slurm, me: &str) -> Child {
    let dir = &slurm.dir;
    let vm_dir = dir.join(format!("vms-{me}"));
    std::fs::create_dir_all(&vm_dir).unwrap();
    let config = dir.join(format!("node-{me}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"hosts = "n[1-2]"
me = "{me}"
addresses = {{ n1 = "127.0.0.1", n2 = "127.0.0.2" }}
vm_dir = "{vm_dir}"
vmm = "{vmm}"
log = "{log}"
period_ms = 200
dead_after = 10
cores = 2
reserve_mib = 64
min_interval_s = 1
settle_s = 60
threshold = 0.25
migration_ports = [7410, 7419]
"#,
            vm_dir = vm_dir.display(),
            vmm = vmm(),
            log = dir.join(format!("node-{me}.log")).display(),
        ),
    )
    .unwrap();
    common::spawn_daemon(
        slurm.cmd(node()).args(["run", "--config"]).arg(&config),
        &dir.join(format!("node-{me}.stderr")),
    )
}

/// The JSON events of a node daemon's log.
fn events(dir: &Path, me: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("node-{me}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Slurm keeps track of a rank whose VM the node daemons move. The private
/// cluster's two nodes are hosts n1 and n2 of two node daemons (in one
/// network namespace, on 127.0.0.1 and .2: their `addresses`). A VM on n1 that cannot move
/// (vsock) keeps two vCPUs busy there. A job on n1 alone: its rank's VM is
/// never moved to n2, outside its allocation. A job on n1 and n2: the
/// daemons move rank 0's VM to n2; its task stays on n1 as the VM's proxy
/// (the job runs on in squeue), and scancel stops the VM on n2. A third
/// job's moved VM ends by itself: srun ends then, with its status.
#[test]
fn a_rank_whose_vm_moves_stays_a_slurm_task_until_its_vm_ends() {
    let dir = common::tmpdir("slurm-follow");
    let Some(ns) = NetNs::new("slurmf") else {
        eprintln!("skipped: cannot create a network namespace");
        return;
    };
    // Loopback, and an address that is not (getaddrinfo's AI_ADDRCONFIG,
    // which Slurm uses, finds no IPv4 without one).
    assert!(
        ns.ip(&["link", "set", "lo", "up"])
            && ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
            && ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"])
            && ns.ip(&["link", "set", "v0", "up"])
            && ns.ip(&["link", "set", "v1", "up"])
    );
    let Some(slurm) = Slurm::start_in(&dir, Some(ns)) else {
        return;
    };
    // Two busy vCPUs on n1 that stay there (vsock).
    let vsock = format!("cid=3,socket={}", dir.join("blocker.vsock").display());
    std::fs::create_dir_all(dir.join("vms-n1")).unwrap();
    let args = common::probe_argv_mem(
        "task=counter hz=20",
        "64M",
        &["--cpus", "2", "--vsock", &vsock],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let blocker = common::Vm::spawn_cmd(
        slurm.cmd(vmm()),
        &args,
        &dir.join("vms-n1/blocker.console"),
        &dir.join("vms-n1/blocker.sock"),
    );
    blocker.wait_counter(2);
    let daemons = [node_daemon(&slurm, "n1"), node_daemon(&slurm, "n2")];
    // The daemons and every VMM they or the jobs started go, also when
    // the test fails (a spinning probe left behind starves later tests).
    struct Leftovers(Vec<Child>, PathBuf);
    impl Drop for Leftovers {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
            for node in ["n1", "n2"] {
                let Ok(rd) = std::fs::read_dir(self.1.join(format!("vms-{node}"))) else {
                    continue;
                };
                for e in rd.flatten() {
                    if e.path().extension().is_some_and(|x| x == "sock") {
                        if let Some(pid) = api(&e.path()).and_then(|v| v["pid"].as_i64()) {
                            // SAFETY: kill(2) on a VMM this test caused to start.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
    }
    let _leftovers = Leftovers(daemons.into(), dir.clone());
    let config = dir.join("node-%n.toml");
    let srun = |nodes: &[&str], cmdline: &str, extra: &[&str]| {
        let mut c = slurm.cmd("srun");
        c.args(nodes)
            .args(["--ntasks-per-node=1", node(), "slurm-vm", "--vmm", vmm()])
            .arg("--config")
            .arg(&config)
            .arg("--kernel")
            .arg(probe())
            .args(["--memory", "64M", "--cmdline", cmdline, "--"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let sock = |node: &str, name: &str| dir.join(format!("vms-{node}/{name}.sock"));
    let state = |s: &Path| api(s).and_then(|v| v["state"].as_str().map(String::from));
    let queue = || -> String {
        let out = slurm
            .cmd("squeue")
            .args(["-h", "-o", "%i %T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // The id of the newest job in squeue, newer than `after`.
    let job_after = |after: u64| -> u64 {
        wait_for("a new job in squeue", Duration::from_secs(20), || {
            let out = slurm.cmd("squeue").args(["-h", "-o", "%i"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|j| j.parse().ok())
                .filter(|&j| j > after)
                .max()
        })
    };

    // Job A on n1 alone: its VM may not leave n1.
    let mut a = srun(&["-N1", "-w", "n1"], "task=counter hz=10", &[]);
    let ja = job_after(0);
    let a_sock = sock("n1", &format!("job{ja}-rank0"));
    wait_for("job A's VM", Duration::from_secs(20), || state(&a_sock));
    let held = wait_for("n1 holding job A's VM", Duration::from_secs(20), || {
        events(&dir, "n1").into_iter().find(|e| {
            e["event"] == "decision"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("moves only within its Slurm allocation n1"))
        })
    });
    assert_eq!(state(&a_sock).as_deref(), Some("running"), "{held}");
    assert!(
        !events(&dir, "n1")
            .iter()
            .any(|e| e["event"] == "migration-start"),
        "job A's VM left its allocation"
    );
    assert!(slurm
        .cmd("scancel")
        .arg(ja.to_string())
        .status()
        .unwrap()
        .success());
    let st = a.wait().unwrap();
    assert!(!st.success(), "a cancelled job's srun fails: {st:?}");

    // Job B on n1 and n2: rank 0's VM moves to n2, its task follows it.
    let mut b = srun(&["-N2"], "task=counter hz=10", &[]);
    let jb = job_after(ja);
    let name = format!("job{jb}-rank0");
    let moved = wait_for("rank 0's VM moved to n2", Duration::from_secs(60), || {
        events(&dir, "n1")
            .into_iter()
            .find(|e| e["event"] == "migration-done" && e["vm"] == name.as_str())
    });
    assert_eq!(moved["to_host"], "n2", "{moved}");
    let there = sock("n2", &name);
    wait_for("the VM running on n2", Duration::from_secs(20), || {
        (state(&there).as_deref() == Some("running")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        b.try_wait().unwrap().is_none(),
        "srun ended while the VM runs on n2"
    );
    let q = queue();
    assert!(q.contains(&format!("{jb} RUNNING")), "{q}");
    let pid = api(&there).and_then(|v| v["pid"].as_i64()).unwrap() as i32;
    assert!(slurm
        .cmd("scancel")
        .arg(jb.to_string())
        .status()
        .unwrap()
        .success());
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = |p: i32| unsafe { libc::kill(p, 0) } == 0;
    wait_for("the VM on n2 to stop", Duration::from_secs(30), || {
        (!alive(pid)).then_some(())
    });
    let out = b.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{name} moved to n2")), "{err}");
    assert!(
        events(&dir, "n2").iter().any(|e| e["event"] == "vm-signal"
            && e["vm"] == name.as_str()
            && e["signal"] == "TERM"),
        "{err}"
    );

    // Job C: its moved VM ends by itself; srun ends then, with status 0.
    let c = srun(
        &["-N2"],
        "task=counter hz=10 max=150",
        &["--test-exit-port"],
    );
    let jc = job_after(jb);
    let name = format!("job{jc}-rank0");
    wait_for(
        "job C's rank 0 moved to n2",
        Duration::from_secs(60),
        || {
            events(&dir, "n1")
                .into_iter()
                .find(|e| e["event"] == "migration-done" && e["vm"] == name.as_str())
        },
    );
    let there = sock("n2", &name);
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(
        err.contains(&format!("{name} ended on n2 with status 0")),
        "{err}"
    );
    let console = std::fs::read_to_string(there.with_extension("console")).unwrap_or_default();
    assert!(console.contains("counter=150"), "{console}");
    drop(_leftovers);
    drop(blocker);
    drop(slurm);
    let _ = std::fs::remove_dir_all(dir);
}
