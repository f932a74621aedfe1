//! Slurm launches ffmk-vmm VMs: a private Slurm (Debian's slurm-wlm:
//! slurmctld and two slurmd "nodes" on this machine, munge with its own
//! key and socket) runs jobs whose tasks are `ffmk-node slurm-vm`, one per
//! node. A job's VMs are named after its id and rank, carry the rank
//! layout on their command line, end with the job (exit status through
//! srun) and are stopped by `scancel`.
#[path = "../../vmm/tests/common/mod.rs"]
mod common;

use common::{probe, vmm};
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
        let mut ctld = Command::new("slurmctld");
        ctld.args(["-D", "-i", "-f"]).arg(dir.join("slurm.conf"));
        children.push(quiet(ctld));
        for n in ["n1", "n2"] {
            let mut d = Command::new("slurmd");
            d.args(["-D", "-N", n, "-f"]).arg(dir.join("slurm.conf"));
            children.push(quiet(d));
        }
        let s = Slurm {
            dir: dir.to_path_buf(),
            children,
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
        let mut c = Command::new(program);
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
