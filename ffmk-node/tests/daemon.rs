//! The node daemon end to end: three "hosts" (network namespaces on a
//! bridge), each with an `ffmk-node run` and probe VMs of unequal CPU
//! demand (every probe vCPU spins, so a VM's demand is its vCPU count).
//! Host 0 starts with 3 busy vCPUs, host 1 with 1, host 2 with none. The
//! daemons must find the imbalance over gossip and live-migrate a VM from
//! host 0 to host 2 (the guest's counter goes on there), after which the
//! imbalance is lower and nothing moves back. Then one daemon is killed:
//! the other two keep running, see it age out, and its VM keeps running.
#[path = "../../vmm/tests/common/mod.rs"]
mod common;

use common::{assert_consecutive, counters, probe_argv_mem, vmm, wait_for, Cluster, NetNs, Vm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn node() -> &'static str {
    env!("CARGO_BIN_EXE_ffmk-node")
}

struct Daemon {
    child: Child,
    ns_name: String,
    addr: String,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &NetNs, dir: &Path, i: usize) -> Daemon {
        Daemon::start_with(ns, dir, i, "10.77.0.[1-3]", "")
    }

    /// Daemon `i` of `hosts`, with more config lines.
    fn start_with(ns: &NetNs, dir: &Path, i: usize, hosts: &str, extra: &str) -> Daemon {
        let vm_dir = dir.join(format!("h{i}"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        let log = dir.join(format!("node{i}.log"));
        let config = dir.join(format!("node{i}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"hosts = "{hosts}"
me = "{me}"
vm_dir = "{vm_dir}"
vmm = "{vmm}"
log = "{log}"
period_ms = 200
dead_after = 10
cores = 2
reserve_mib = 64
min_interval_s = 2
settle_s = 60
threshold = 0.25
migration_ports = [7410, 7419]
{extra}
"#,
                me = Cluster::addr(i),
                vm_dir = vm_dir.display(),
                vmm = vmm(),
                log = log.display(),
            ),
        )
        .unwrap();
        let child = common::spawn_daemon(
            ns.exec(node()).args(["run", "--config"]).arg(&config),
            &dir.join(format!("node{i}.stderr")),
        );
        Daemon {
            child,
            ns_name: ns.0.clone(),
            addr: format!("{}:7401", Cluster::addr(i)),
            log,
        }
    }

    fn status(&self) -> Option<Value> {
        let out = Command::new("ip")
            .env("FFMK_CLUSTER_KEY", common::cluster_key())
            .args([
                "netns",
                "exec",
                &self.ns_name,
                node(),
                "status",
                "--connect",
            ])
            .arg(&self.addr)
            .arg("--json")
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A probe VM spinning on `cpus` vCPUs, its socket in the host's VM dir.
fn busy_vm(ns: &NetNs, dir: &Path, host: usize, name: &str, cpus: &str) -> Vm {
    busy_vm_with(ns, dir, host, name, &["--cpus", cpus])
}

fn busy_vm_with(ns: &NetNs, dir: &Path, host: usize, name: &str, flags: &[&str]) -> Vm {
    let vm_dir = dir.join(format!("h{host}"));
    std::fs::create_dir_all(&vm_dir).unwrap();
    let args = probe_argv_mem("task=counter hz=20", "64M", flags);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vm::spawn_in(
        Some(ns),
        &args,
        &vm_dir.join(format!("{name}.console")),
        &vm_dir.join(format!("{name}.sock")),
    )
}

/// Per-host loads from a daemon's board (None until every host is known).
fn board_loads(st: &Value) -> Option<Vec<f64>> {
    st["board"]
        .as_array()?
        .iter()
        .map(|e| e["info"]["load"].as_f64())
        .collect()
}

fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    loads.iter().copied().fold(0.0, f64::max) / mean - 1.0
}

/// Kills a VMM the daemon started (found through its API's pid).
fn kill_vmm_at(sock: &Path) {
    let out = Command::new(vmm())
        .args(["info", "--json", "--api-socket"])
        .arg(sock)
        .output();
    if let Ok(o) = out {
        if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
            if let Some(pid) = v["pid"].as_i64() {
                // SAFETY: kill(2) on a VMM this test caused to start.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Kills the VMMs the daemons started, also when the test fails.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for h in 0..16 {
            let Ok(rd) = std::fs::read_dir(self.0.join(format!("h{h}"))) else {
                continue;
            };
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "sock") {
                    kill_vmm_at(&e.path());
                }
            }
        }
        // FFMK_TEST_KEEP=1 keeps the logs of a failed run.
        if std::env::var_os("FFMK_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn daemons_balance_three_hosts_by_live_migration_and_survive_a_dead_peer() {
    let Some(cluster) = Cluster::new("bal", 3) else {
        return;
    };
    let dir = common::tmpdir("balance-daemon");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    // Host 0: a (2 vCPUs) and b (1 vCPU); host 1: c (1 vCPU); host 2: none.
    let a = busy_vm(&h[0], &dir, 0, "a", "2");
    let b = busy_vm(&h[0], &dir, 0, "b", "1");
    let c = busy_vm(&h[1], &dir, 1, "c", "1");
    for vm in [&a, &b, &c] {
        vm.wait_counter(3);
    }
    let mut daemons: Vec<Daemon> = (0..3).map(|i| Daemon::start(&h[i], &dir, i)).collect();

    // The daemons move a VM from host 0 to host 2 (b, the one whose
    // demand fits the flow; a as well when it shows only one busy vCPU).
    let done = wait_for("a migration", Duration::from_secs(90), || {
        daemons[0]
            .events()
            .into_iter()
            .find(|e| e["event"] == "migration-done")
    });
    eprintln!("migration: {done}");
    // What host 0 acted on (its board): 3, 1, 0 runnable vCPUs.
    let decided = daemons[0]
        .events()
        .into_iter()
        .find(|e| e["event"] == "decision" && e["decision"]["decision"] == "move")
        .expect("the move decision is logged");
    let mut before = vec![decided["load"].as_f64().unwrap(); 3];
    for n in decided["neighbours"].as_array().unwrap() {
        before[n["slot"].as_u64().unwrap() as usize] = n["load"].as_f64().unwrap();
    }
    let imb_before = imbalance(&before);
    eprintln!("loads before {before:?}: imbalance {imb_before:.2}");
    assert!(before[0] > 2.5 && before[2] < 0.5, "{decided}");
    assert_eq!(done["to"], 2, "{done}");
    let name = done["vm"].as_str().unwrap().to_string();
    let moved = dir.join(format!("h2/{name}.sock"));
    assert!(moved.exists());
    // The guest goes on counting on host 2 where it stopped on host 0 (a
    // line the switch-over cut is completed there: join the consoles).
    let src_console = dir.join(format!("h0/{name}.console"));
    let dest_console = dir.join(format!("h2/{name}.console"));
    let joined = wait_for("the counter on host 2", Duration::from_secs(20), || {
        let dest = std::fs::read_to_string(&dest_console).ok()?;
        (counters(&dest).len() >= 5).then_some(())?;
        Some(std::fs::read_to_string(&src_console).ok()? + &dest)
    });
    let last = counters(&joined).last().copied().unwrap();
    assert_consecutive(&joined, last);
    // The source VMM is gone (it exits once the VM has moved).
    let (mut src, stays) = if name == "a" { (a, b) } else { (b, a) };
    wait_for("the source VMM to exit", Duration::from_secs(10), || {
        src.child.try_wait().ok().flatten()
    });

    // The boards show the lower imbalance: 2, 1, 1.
    let after = wait_for("the boards to settle", Duration::from_secs(30), || {
        let loads = board_loads(&daemons[1].status()?)?;
        (loads[2] > 0.5 && loads[0] < before[0] - 0.5).then_some(loads)
    });
    let imb_after = imbalance(&after);
    eprintln!("loads after {after:?}: imbalance {imb_after:.2}");
    assert!(imb_after < imb_before - 0.3, "{imb_before} -> {imb_after}");
    // Every decision is in the logs with its reason.
    let decisions: Vec<Value> = daemons
        .iter()
        .flat_map(|d| d.events())
        .filter(|e| e["event"] == "decision")
        .collect();
    assert!(decisions
        .iter()
        .any(|e| e["decision"]["decision"] == "move"));
    assert!(decisions
        .iter()
        .all(|e| e["decision"] != "stay" || e["reason"].is_string()));

    // Kill host 1's daemon: the others go on, see it die, and its VM runs.
    let _ = daemons[1].child.kill();
    let _ = daemons[1].child.wait();
    let board = wait_for("host 1 to age out", Duration::from_secs(20), || {
        let st = daemons[0].status()?;
        (st["board"][1]["alive"] == false).then_some(st)
    });
    assert_eq!(board["board"][2]["alive"], true, "{board}");
    assert!(daemons[0].alive() && daemons[2].alive());
    assert!(daemons[2].status().is_some(), "host 2's daemon answers");
    c.wait_counter(counters(&c.console()).last().copied().unwrap_or(0) + 3);
    // No second move happened: 2, 1, 1 is as balanced as whole VMs get.
    let moves = daemons[0]
        .events()
        .iter()
        .chain(daemons[2].events().iter())
        .filter(|e| e["event"] == "migration-done")
        .count();
    assert_eq!(moves, 1);

    drop(daemons);
    drop(stays);
    drop(c);
}

#[test]
fn bad_settings_are_refused_with_one_line() {
    let dir = common::tmpdir("balance-config");
    let cases = [
        ("missing.toml", None, "cannot read"),
        ("nohosts.toml", Some("vm_dir = \"/tmp\"\n"), "no host list"),
        (
            "notme.toml",
            Some("vm_dir = \"/tmp\"\nhosts = \"127.0.0.[1-2]\"\nme = \"127.0.0.9\"\n"),
            "not in the host list",
        ),
        (
            "brackets.toml",
            Some("vm_dir = \"/tmp\"\nhosts = \"127.0.0.[1-2\"\nme = \"x\"\n"),
            "unbalanced brackets",
        ),
        (
            "typo.toml",
            Some("vm_dir = \"/tmp\"\nhots = \"a\"\n"),
            "unknown field",
        ),
        (
            "pool.toml",
            Some("vm_dir = \"/tmp\"\nhosts = \"127.0.0.1\"\nme = \"127.0.0.1\"\nvf_pool = [\"0000:3b:00.2\"]\n"),
            "is not vfio=DDDD:BB:DD.F or vfio-user=SOCKET",
        ),
        (
            "disks.toml",
            Some("vm_dir = \"/tmp\"\nhosts = \"127.0.0.1\"\nme = \"127.0.0.1\"\nshared_disk_dirs = [\"images\"]\n"),
            "shared_disk_dirs entry images is not an absolute path",
        ),
        (
            "bridges.toml",
            Some("vm_bridges = [\"br0,mac=1\"]\nvm_dir = \"/tmp\"\nhosts = \"127.0.0.1\"\nme = \"127.0.0.1\"\n"),
            "is not a network interface name",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.join(name);
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        let out = Command::new(node())
            .env("FFMK_CLUSTER_KEY", common::cluster_key())
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
    }
    // status of a daemon that is not there: a clear error, no hang.
    let out = Command::new(node())
        .env("FFMK_CLUSTER_KEY", common::cluster_key())
        .args(["status", "--connect", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ConnectX-shaped vfio-user server (`cargo build -p vfio-ib`).
fn cx_server(socket: &Path) -> Child {
    let bin = Path::new(vmm()).with_file_name("ffmk-vfio-user-cx");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p vfio-ib",
        bin.display()
    );
    let child = Command::new(bin)
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the vfio-user server", Duration::from_secs(10), || {
        socket.exists().then_some(())
    });
    child
}

/// A VM with a passthrough function in a hot-plug slot is balanced like
/// any other: its function leaves through the slot at the source, and the
/// destination's daemon gives it one from its VF pool, which the VMM
/// there plugs into the same slot once the VM arrived.
#[test]
fn a_balanced_vm_leaves_its_function_and_gets_one_from_the_destination_pool() {
    let Some(cluster) = Cluster::new("vfp", 2) else {
        return;
    };
    let dir = common::tmpdir("balance-vf-pool");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    let (sock_a, sock_b) = (dir.join("cx-a.sock"), dir.join("cx-b.sock"));
    let mut servers = [cx_server(&sock_a), cx_server(&sock_b)];
    let (dev_a, dev_b) = (
        format!("vfio-user={}", sock_a.display()),
        format!("vfio-user={}", sock_b.display()),
    );
    // Host 0: "vf" (a function in its slot) and "stay" (vsock: bound to
    // this host), one busy vCPU each; host 1: nothing, one pool function.
    let vf = busy_vm_with(
        &h[0],
        &dir,
        0,
        "vf",
        &["--cpus", "1", "--hotplug-slots", "1"],
    );
    let vsock = format!("cid=3,socket={}", dir.join("stay.vsock").display());
    let stay = busy_vm_with(&h[0], &dir, 0, "stay", &["--cpus", "1", "--vsock", &vsock]);
    vf.wait_counter(2);
    stay.wait_counter(2);
    let added = vf.api(&["device", "add", &dev_a]);
    assert!(added.status.success(), "{added:?}");
    let added: Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(added["bdf"], "01:00.0", "{added}");
    let hosts = "10.77.0.[1-2]";
    let pool = format!("vf_pool = [\"{dev_b}\"]");
    let daemons = [
        Daemon::start_with(&h[0], &dir, 0, hosts, ""),
        Daemon::start_with(&h[1], &dir, 1, hosts, &pool),
    ];
    let pool_free =
        |d: &Daemon| -> Option<usize> { Some(d.status()?["vf_pool"]["free"].as_array()?.len()) };
    assert_eq!(
        wait_for("host 1's status", Duration::from_secs(10), || pool_free(
            &daemons[1]
        )),
        1
    );
    let done = wait_for("the migration", Duration::from_secs(90), || {
        daemons[0]
            .events()
            .into_iter()
            .find(|e| e["event"] == "migration-done")
    });
    assert_eq!(done["vm"], "vf", "{done}");
    assert_eq!(done["to"], 1, "{done}");
    // On host 1 the VM has the pool's function, in its slot.
    let moved = dir.join("h1/vf.sock");
    let info = wait_for(
        "the pool function on host 1",
        Duration::from_secs(20),
        || {
            let out = common::api(&moved, "info");
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["passthrough"].as_array()?.len() == 1).then_some(v)
        },
    );
    assert_eq!(info["passthrough"][0]["device"], dev_b.as_str(), "{info}");
    assert_eq!(info["passthrough"][0]["bdf"], "01:00.0", "{info}");
    assert_eq!(info["config"]["hotplug_slots"], 1, "{info}");
    assert_eq!(pool_free(&daemons[1]), Some(0));
    // The guest goes on counting there.
    let console = dir.join("h1/vf.console");
    wait_for("the counter on host 1", Duration::from_secs(20), || {
        (counters(&std::fs::read_to_string(&console).ok()?).len() >= 3).then_some(())
    });
    let mut src = vf;
    wait_for("the source VMM to exit", Duration::from_secs(10), || {
        src.child.try_wait().ok().flatten()
    });
    drop(daemons);
    drop(stay);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// A VM with a read-only disk under a directory both hosts share and a
/// TAP on its host's bridge is balanced onto the other host: it arrives
/// with the same disk file, a new TAP on that host's bridge and its own
/// MAC, and goes on there. Its neighbour with a read-write disk is the
/// busier choice's equal but may not move, and stays.
#[test]
fn a_vm_with_a_shared_read_only_disk_and_a_bridged_tap_moves_with_them() {
    let Some(cluster) = Cluster::bridged("dnet", 2) else {
        return;
    };
    let dir = common::tmpdir("balance-disk-net");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let (base, own) = (shared.join("base.img"), dir.join("own.img"));
    for f in [&base, &own] {
        std::fs::write(f, vec![0u8; 1 << 20]).unwrap();
    }
    let mac = "52:54:00:77:01:01";
    let disk = format!("path={},readonly", base.display());
    let net = format!("tap=dnet0,bridge=br0,mac={mac}");
    let mover = busy_vm_with(
        &h[0],
        &dir,
        0,
        "mover",
        &["--cpus", "1", "--disk", &disk, "--net", &net],
    );
    let rw = format!("path={}", own.display());
    let stayer = busy_vm_with(&h[0], &dir, 0, "stayer", &["--cpus", "1", "--disk", &rw]);
    mover.wait_counter(2);
    stayer.wait_counter(2);
    let hosts = "10.77.0.[1-2]";
    let takes = format!(
        "shared_disk_dirs = [\"{}\"]\nvm_bridges = [\"br0\"]",
        shared.display()
    );
    let daemons = [
        Daemon::start_with(&h[0], &dir, 0, hosts, ""),
        Daemon::start_with(&h[1], &dir, 1, hosts, &takes),
    ];
    let done = wait_for("the migration", Duration::from_secs(90), || {
        daemons[0]
            .events()
            .into_iter()
            .find(|e| e["event"] == "migration-done")
    });
    assert_eq!(done["vm"], "mover", "{done}");
    assert_eq!(done["to"], 1, "{done}");
    let moved = dir.join("h1/mover.sock");
    let info: Value = wait_for("the VM on host 1", Duration::from_secs(20), || {
        serde_json::from_slice(&common::api(&moved, "info").stdout).ok()
    });
    let config = &info["config"];
    assert_eq!(
        config["disks"][0]["path"],
        base.canonicalize().unwrap().to_str().unwrap(),
        "{info}"
    );
    assert_eq!(config["disks"][0]["readonly"], true, "{info}");
    let nic = &config["nets"][0];
    assert_eq!(nic["bridge"], "br0", "{info}");
    let want_mac: Vec<Value> = [0x52, 0x54, 0, 0x77, 1, 1].map(Value::from).to_vec();
    assert_eq!(nic["mac"].as_array(), Some(&want_mac), "{info}");
    let tap = nic["tap"].as_str().unwrap_or_default().to_string();
    assert!(tap.starts_with("ffmk"), "{info}");
    // The new TAP is a port of host 1's bridge.
    let link = h[1]
        .exec("ip")
        .args(["-o", "link", "show", &tap])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("master br0"), "{link}");
    let console = dir.join("h1/mover.console");
    wait_for("the counter on host 1", Duration::from_secs(20), || {
        (counters(&std::fs::read_to_string(&console).ok()?).len() >= 3).then_some(())
    });
    // The one with a read-write disk stayed, and host 0 says why.
    let st = daemons[0].status().expect("host 0's status");
    let stays = st["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "stayer"))
        .cloned()
        .unwrap_or_default();
    assert!(
        stays["unmovable"]
            .as_str()
            .is_some_and(|w| w.contains("read-write")),
        "{st}"
    );
    let mut src = mover;
    wait_for("the source VMM to exit", Duration::from_secs(10), || {
        src.child.try_wait().ok().flatten()
    });
    drop(daemons);
    drop(stayer);
}

/// `ffmk-node broadcast` run in host `i`'s namespace.
fn broadcast(ns: &NetNs, dir: &Path, i: usize, args: &[&str]) -> std::process::Output {
    ns.exec(node())
        .args(["broadcast", "--config"])
        .arg(dir.join(format!("node{i}.toml")))
        .args(args)
        .output()
        .unwrap()
}

/// The `broadcast` events of a daemon's log with this command.
fn deliveries(d: &Daemon, command: &str) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e["event"] == "broadcast" && e["command"] == command)
        .collect()
}

/// Twelve daemons in network namespaces; two are dead before a broadcast
/// and two are killed while it spreads (a send every 20 ms, so it takes a
/// while): every daemon alive at the end runs the command exactly once.
/// Then commands with an effect (pause and resume a job's VMs in part of
/// the cluster) and bad input (a host outside the cluster, an unknown
/// command, an empty group).
#[test]
fn a_broadcast_reaches_every_live_daemon_despite_dead_ones() {
    let n = 12;
    let Some(cluster) = Cluster::new("bc", n) else {
        return;
    };
    let dir = common::tmpdir("balance-broadcast");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    // Two VMs on host 4 (vsock keeps them there): one of job 7, one not.
    let vm = |name: &str| {
        let vsock = format!(
            "cid=3,socket={}",
            dir.join(format!("{name}.vsock")).display()
        );
        busy_vm_with(&h[4], &dir, 4, name, &["--cpus", "1", "--vsock", &vsock])
    };
    let (job, other) = (vm("job7-a"), vm("other"));
    job.wait_counter(2);
    other.wait_counter(2);
    let hosts = "10.77.0.[1-12]";
    // A send every 20 ms (FFMK_BCAST_GAP_US for ci/bench-broadcast).
    let gap: u64 = std::env::var("FFMK_BCAST_GAP_US")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(20_000);
    let extra = format!("broadcast_gap_us = {gap}\nbroadcast_latency_us = 1000");
    let mut daemons: Vec<Daemon> = (0..n)
        .map(|i| Daemon::start_with(&h[i], &dir, i, hosts, &extra))
        .collect();
    for d in &daemons {
        wait_for("the daemons", Duration::from_secs(10), || d.status());
    }
    // Host 0 is the root; 1, 2 are the roots of the subtrees of every
    // other and every fourth host; dead before it starts: 2 and 3.
    for i in [2, 3] {
        let _ = daemons[i].child.kill();
        let _ = daemons[i].child.wait();
    }
    // --wait 0: back as soon as it is sent.
    let out = broadcast(&h[0], &dir, 0, &["--wait", "0", "echo", "hello"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(12 hosts)"),
        "{out:?}"
    );
    // Killed while it spreads.
    for i in [8, 9] {
        let _ = daemons[i].child.kill();
        let _ = daemons[i].child.wait();
    }
    let alive: Vec<usize> = (0..n).filter(|i| ![2, 3, 8, 9].contains(i)).collect();
    let got = wait_for("every live daemon", Duration::from_secs(20), || {
        let got: Vec<Vec<Value>> = alive
            .iter()
            .map(|&i| deliveries(&daemons[i], "echo hello"))
            .collect();
        got.iter().all(|g| !g.is_empty()).then_some(got)
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut lat: Vec<f64> = Vec::new();
    for (&i, _) in alive.iter().zip(&got) {
        let g = deliveries(&daemons[i], "echo hello");
        assert_eq!(g.len(), 1, "host {i} ran it once: {g:?}");
        assert_eq!(g[0]["result"], "ok");
        assert_eq!(g[0]["origin"], "10.77.0.1");
        lat.push(g[0]["latency_us"].as_f64().unwrap());
    }
    let by_correction = alive
        .iter()
        .filter(|&&i| deliveries(&daemons[i], "echo hello")[0]["via"] == "correction")
        .count();
    lat.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "broadcast: {} live of {n}, latency median {:.1} ms max {:.1} ms, {by_correction} by correction",
        alive.len(),
        lat[lat.len() / 2] / 1e3,
        lat[lat.len() - 1] / 1e3
    );

    // Pause job 7 in hosts 1-6 (10.77.0.3 and .4 are dead): its VM stops,
    // the other VM runs on; resume it.
    let state = |vm: &Vm| -> String {
        let out = common::api(&vm.sock, "info");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["state"].as_str().unwrap_or_default().to_string()
    };
    let out = broadcast(
        &h[0],
        &dir,
        0,
        &["--group", "10.77.0.[1-6]", "pause", "job7-*"],
    );
    assert!(out.status.success(), "{out:?}");
    // It says who ran it: the four live hosts of the six.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("run on 4 of 6 hosts")
            && said.contains("no answer within 3 s from 10.77.0.3, 10.77.0.4"),
        "{said}"
    );
    wait_for("job7-a paused", Duration::from_secs(20), || {
        (state(&job) == "paused").then_some(())
    });
    assert_eq!(state(&other), "running");
    let host4 = deliveries(&daemons[4], "pause job7-*");
    assert_eq!(host4[0]["result"], "paused [job7-a]", "{host4:?}");
    let out = broadcast(
        &h[5],
        &dir,
        5,
        &["--group", "10.77.0.[1-6]", "--json", "resume", "job7-*"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hosts"], 6, "{v}");
    assert_eq!(
        v["missing"],
        serde_json::json!(["10.77.0.3", "10.77.0.4"]),
        "{v}"
    );
    assert!(
        v["delivered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["host"] == "10.77.0.5" && d["result"] == "resumed [job7-a]"),
        "{v}"
    );
    wait_for("job7-a running", Duration::from_secs(20), || {
        (state(&job) == "running").then_some(())
    });
    assert!(
        deliveries(&daemons[11], "pause job7-*").is_empty(),
        "host 11 is not in the group"
    );

    // Bad input: one line, exit 2, nothing sent.
    for (args, want) in [
        (
            vec!["--group", "10.77.0.[11-13]", "echo", "x"],
            "10.77.0.13 is not in the cluster's host list",
        ),
        (vec!["reboot", "now"], "unknown command \"reboot\""),
        (vec!["pause"], "pause takes one pattern"),
    ] {
        let out = broadcast(&h[0], &dir, 0, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A group this host is not in: its daemon refuses.
    let out = broadcast(&h[0], &dir, 0, &["--group", "10.77.0.[5-6]", "echo", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not in group 10.77.0.[5-6]"), "{err}");
    assert!(deliveries(&daemons[5], "echo x").is_empty());
    for d in &mut daemons {
        assert!(d.alive() || d.child.try_wait().is_ok());
    }
    drop(daemons);
    drop(job);
    drop(other);
}

/// One round of checkpoints: job A (VMs a0 on host 0, a1 on host 1) and
/// job B (b0 on host 2) both due now, each through `ffmk-node checkpoint`
/// (host 0's and host 2's daemons ask the coordinator on host 0), each VM
/// writing a full checkpoint to its local level and the burst buffer.
/// Returns each job's JSON line (waited_s, wrote_s, shared, exit).
fn checkpoint_round(h: &[NetNs], dir: &Path) -> Vec<Value> {
    let take = |host: usize, vm: &str| {
        format!(
            "ip netns exec {} {} checkpoint take --full --json --config {} --api-socket {} >/dev/null",
            h[host].0,
            vmm(),
            dir.join(format!("{vm}.levels.toml")).display(),
            dir.join(format!("h{host}/{vm}.sock")).display()
        )
    };
    let jobs = [
        (
            0usize,
            "A",
            format!("{} & {} & wait", take(0, "a0"), take(1, "a1")),
        ),
        (2usize, "B", take(2, "b0")),
    ];
    let runs: Vec<std::process::Child> = jobs
        .iter()
        .map(|(host, job, script)| {
            h[*host]
                .exec(node())
                .args(["checkpoint", "--config"])
                .arg(dir.join(format!("node{host}.toml")))
                .args(["--job", job, "--", "sh", "-c", script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    runs.into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

/// Two jobs checkpoint to one burst buffer (a checkpoint endpoint on its
/// own host behind a 40 Mbit/s link, shaped with tc) at the same moments.
/// Uncoordinated, they split the link and both take longer; with the
/// coordinator (exclusive, 30 s delay bound) one writes at a time, the
/// other waits, and the total time the jobs spend writing is shorter.
#[test]
fn coordinated_checkpoints_take_turns_on_the_burst_buffer() {
    let Some(cluster) = Cluster::new("ck", 4) else {
        return;
    };
    let dir = common::tmpdir("balance-ckpt");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    // The burst buffer: host 3, its incoming traffic limited on the bridge.
    let shaped = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("ffmk-cksw-{}", std::process::id()),
        ])
        .args(["tc", "qdisc", "add", "dev", "p3", "root"])
        .args(["tbf", "rate", "40mbit", "burst", "32kb", "latency", "2s"])
        .status()
        .unwrap();
    assert!(shaped.success(), "tc");
    let bb = dir.join("bb");
    let mut endpoint = h[3]
        .exec(vmm())
        .args(["checkpoint", "serve", "--listen", "10.77.0.4:7070", "--dir"])
        .arg(&bb)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Guests with 8 MiB of data each (rewritten slowly).
    let mut vms = Vec::new();
    for (host, name) in [(0, "a0"), (1, "a1"), (2, "b0")] {
        let vm_dir = dir.join(format!("h{host}"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        let args = probe_argv_mem("task=dirty mib=8 rate=1 hz=10", "64M", &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vms.push(Vm::spawn_in(
            Some(&h[host]),
            &args,
            &vm_dir.join(format!("{name}.console")),
            &vm_dir.join(format!("{name}.sock")),
        ));
        std::fs::write(
            dir.join(format!("{name}.levels.toml")),
            format!(
                "job = \"{name}\"\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n\
                 [[level]]\nkind = \"partner\"\nname = \"bb\"\npeer = \"10.77.0.4:7070\"\n",
                dir.join(format!("{name}.local")).display()
            ),
        )
        .unwrap();
    }
    for vm in &vms {
        vm.wait_counter(3);
    }
    let hosts = "10.77.0.[1-3]";
    let phase = |policy: &str| -> Vec<Vec<Value>> {
        let extra = format!("ckpt_policy = \"{policy}\"\nckpt_max_delay_s = 30");
        let daemons: Vec<Daemon> = (0..3)
            .map(|i| Daemon::start_with(&h[i], &dir, i, hosts, &extra))
            .collect();
        for d in &daemons {
            wait_for("the daemons", Duration::from_secs(10), || d.status());
        }
        let rounds = (0..2).map(|_| checkpoint_round(h, &dir)).collect();
        drop(daemons);
        rounds
    };
    let none = phase("none");
    let exclusive = phase("exclusive");
    let total = |rounds: &[Vec<Value>]| -> f64 {
        rounds
            .iter()
            .flatten()
            .map(|j| j["wrote_s"].as_f64().unwrap())
            .sum()
    };
    let worst_wait = |rounds: &[Vec<Value>]| -> f64 {
        rounds
            .iter()
            .flatten()
            .map(|j| j["waited_s"].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    eprintln!(
        "checkpoints: uncoordinated {:.1} s writing in all (worst wait {:.1} s), \
         coordinated {:.1} s (worst wait {:.1} s)",
        total(&none),
        worst_wait(&none),
        total(&exclusive),
        worst_wait(&exclusive)
    );
    for r in &exclusive {
        for j in r {
            assert_eq!(j["shared"], false, "{j}");
            assert_eq!(j["exit"], 0, "{j}");
        }
        // One waited for the other.
        assert!(
            r.iter().any(|j| j["waited_s"].as_f64().unwrap() > 0.5),
            "{r:?}"
        );
    }
    assert!(none.iter().flatten().any(|j| j["shared"] == true));
    assert!(total(&exclusive) < total(&none), "{none:?}\n{exclusive:?}");
    assert!(worst_wait(&exclusive) < 30.0 + 5.0);
    // A job name the coordinator refuses, and a command that fails: its
    // grant is released all the same (the next job gets one at once).
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| Daemon::start_with(&h[i], &dir, i, hosts, "ckpt_max_delay_s = 30"))
        .collect();
    for d in &daemons {
        wait_for("the daemons", Duration::from_secs(10), || d.status());
    }
    let run = |job: &str, cmd: &[&str]| {
        h[2].exec(node())
            .args(["checkpoint", "--config"])
            .arg(dir.join("node2.toml"))
            .args(["--job", job, "--"])
            .args(cmd)
            .output()
            .unwrap()
    };
    let bad = run("a b", &["true"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--job"));
    let failed = run("C", &["false"]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let next = run("D", &["true"]);
    let v: Value = serde_json::from_slice(&next.stdout).unwrap();
    assert!(v["waited_s"].as_f64().unwrap() < 2.0, "{v}");
    drop(daemons);
    let _ = endpoint.kill();
    let _ = endpoint.wait();
    drop(vms);
}

/// The cluster plane of the daemons: a peer without the cluster key gets
/// nothing from the control port, the gossip port or the broadcast
/// endpoint; a key holder still cannot abort another host's reservation
/// or release another job's grant without their tokens, nor pass a
/// negative load.
#[test]
fn the_daemons_answer_only_key_holders_and_the_holders_of_their_tokens() {
    use ffmk_node::control::{self, Request};
    let Some(c) = Cluster::new("bkey", 2) else {
        return;
    };
    let dir = common::tmpdir("balance-key");
    let hosts = "10.77.0.[1-2]";
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start_with(&c.hosts[i], &dir, i, hosts, "incoming_unused_s = 2"))
        .collect();
    wait_for(
        "both daemons to see each other",
        Duration::from_secs(20),
        || {
            let st = daemons[0].status()?;
            (st["board"][1]["alive"] == true).then_some(())
        },
    );
    let ctl: std::net::SocketAddr = daemons[0].addr.parse().unwrap();
    let key = common::cluster_key().to_path_buf();
    let other = dir.join("other.key");
    assert!(Command::new(vmm())
        .args(["key", "generate"])
        .arg(&other)
        .status()
        .unwrap()
        .success());
    let results = c.hosts[1].run(move || {
        let trust = cluster_auth::Trust::Key(cluster_auth::Key::load(&key).unwrap());
        let stranger = cluster_auth::Trust::Key(cluster_auth::Key::load(&other).unwrap());
        let t = Duration::from_secs(10);
        let mut r = Vec::new();
        // Another cluster's key: refused at the handshake.
        r.push(format!(
            "{:?}",
            control::call(ctl, &stranger, &Request::Status {}, t).err()
        ));
        // The old plain protocol: closed, not a byte back.
        let mut s = std::net::TcpStream::connect(ctl).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut s, b"{\"op\":\"status\"}\n").unwrap();
        let mut back = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut back);
        r.push(format!("plain got {} bytes", back.len()));
        // A negative load does not pass the "would end busier" check.
        let prep = |load: f64| Request::Prepare {
            name: "guest7".into(),
            memory_mib: 64,
            cpus: "1".into(),
            cpu_profile: None,
            from: 1,
            vm_load: load,
            sender_after: 5.0,
            hotplug_slots: 0,
            functions: 0,
            disks: Vec::new(),
            nets: Vec::new(),
        };
        r.push(format!(
            "{:?}",
            control::call(ctl, &trust, &prep(-50.0), t).unwrap().error
        ));
        // A peer cannot have this host open its files for a VM: a disk
        // outside shared_disk_dirs (this daemon has none) is refused.
        let mut steal = prep(0.5);
        if let Request::Prepare { disks, .. } = &mut steal {
            disks.push(vmm_api::model::DiskConfig {
                path: "/etc/shadow".into(),
                readonly: true,
                direct: false,
                serial: None,
                queues: 1,
                bandwidth: None,
                iops: None,
            });
        }
        r.push(format!(
            "{:?}",
            control::call(ctl, &trust, &steal, t).unwrap().error
        ));
        // A reservation is aborted only with its token.
        let ok = control::call(ctl, &trust, &prep(0.5), t).unwrap();
        r.push(format!(
            "prepare ok={} token={} {:?}",
            ok.ok,
            ok.token.is_some(),
            ok.error
        ));
        let abort = |token: &str| Request::Abort {
            name: "guest7".into(),
            token: token.into(),
        };
        r.push(format!(
            "{:?}",
            control::call(ctl, &trust, &abort("guess"), t)
                .unwrap()
                .error
        ));
        let token = ok.token.unwrap_or_default();
        r.push(format!(
            "abort ok={}",
            control::call(ctl, &trust, &abort(&token), t).unwrap().ok
        ));
        // A reservation nobody migrates into is given up (then the slot
        // is free for the next).
        let again = control::call(ctl, &trust, &prep(0.5), t).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        let free = control::call(ctl, &trust, &prep(0.5), t).unwrap();
        r.push(format!(
            "unused ok={} then ok={} ({:?}, {:?})",
            again.ok, free.ok, again.error, free.error
        ));
        if let Some(tok) = free.token {
            let _ = control::call(ctl, &trust, &abort(&tok), t);
        }
        // A grant is released only with its token.
        let g = control::call(
            ctl,
            &trust,
            &Request::CkptAcquire {
                job: "job1".into(),
                bytes: 1,
            },
            t,
        )
        .unwrap();
        let gtoken = g
            .ckpt
            .as_ref()
            .and_then(|c| c["token"].as_str())
            .unwrap_or("")
            .to_string();
        let release = |token: &str| Request::CkptRelease {
            job: "job1".into(),
            token: token.into(),
        };
        r.push(format!(
            "{:?}",
            control::call(ctl, &trust, &release("guess"), t)
                .unwrap()
                .error
        ));
        r.push(format!(
            "release ok={}",
            control::call(ctl, &trust, &release(&gtoken), t).unwrap().ok
        ));
        // Forged gossip (plain, and sealed with another key) and a
        // broadcast request with another key: dropped.
        let u = std::net::UdpSocket::bind("10.77.0.2:0").unwrap();
        u.send_to(b"FFGS plain gossip", "10.77.0.1:7400").unwrap();
        let other_key = match &stranger {
            cluster_auth::Trust::Key(k) => k.cluster().unwrap().clone(),
            _ => unreachable!(),
        };
        let mut sealer = cluster_auth::datagram::Sealer::new(&other_key, "gossip").unwrap();
        u.send_to(&sealer.seal(b"FFGS forged"), "10.77.0.1:7400")
            .unwrap();
        let b = broadcast::udp::request(
            "10.77.0.1:7402".parse().unwrap(),
            "all",
            "pause *",
            Duration::from_millis(500),
            Some(&other_key),
        );
        r.push(format!("broadcast answered: {}", b.is_ok()));
        r
    });
    let text = results.join("\n");
    assert!(results[0].contains("refused the handshake"), "{text}");
    assert_eq!(results[1], "plain got 0 bytes", "{text}");
    assert!(results[2].contains("is not a load"), "{text}");
    assert!(results[3].contains("shares no disk directory"), "{text}");
    assert!(
        results[4].starts_with("prepare ok=true token=true"),
        "{text}"
    );
    assert!(results[5].contains("only the host that asked"), "{text}");
    assert_eq!(results[6], "abort ok=true", "{text}");
    assert!(
        results[7].starts_with("unused ok=true then ok=true"),
        "{text}"
    );
    assert!(
        results[8].contains("not released without its token"),
        "{text}"
    );
    assert_eq!(results[9], "release ok=true", "{text}");
    assert_eq!(results[10], "broadcast answered: false", "{text}");
    std::thread::sleep(Duration::from_millis(500));
    let events = daemons[0].events();
    let has = |ev: &str, what: &str| {
        events
            .iter()
            .any(|e| e["event"] == ev && e.to_string().contains(what))
    };
    assert!(
        has("control-refused", "does not hold the cluster key"),
        "{events:?}"
    );
    assert!(
        has(
            "control-refused",
            "did not open the cluster-plane handshake"
        ),
        "{events:?}"
    );
    assert!(has("gossip-rejected", "refused"), "{events:?}");
    assert!(has("abort-refused", "not the token"), "{events:?}");
    assert!(has("incoming-unused", "guest7"), "{events:?}");
    // Still gossiping with its real peer.
    assert_eq!(daemons[0].status().unwrap()["board"][1]["alive"], true);
    drop(daemons);
}

/// `promtool check metrics` on `page`: (passed, what it said).
fn promtool(page: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; ci/setup tests installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// One sample's value (`name{labels} value` or `name value`).
fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_daemon_and_its_vms_serve_metrics_that_promtool_accepts() {
    let Some(cluster) = Cluster::new("met", 2) else {
        return;
    };
    let dir = common::tmpdir("metrics-daemon");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    let vm = busy_vm(&h[0], &dir, 0, "m", "2");
    vm.wait_counter(3);
    let listen = format!("{}:9464", Cluster::addr(0));
    let _d0 = Daemon::start_with(
        &h[0],
        &dir,
        0,
        "10.77.0.[1-2]",
        &format!("metrics_listen = \"{listen}\""),
    );
    let _d1 = Daemon::start_with(&h[1], &dir, 1, "10.77.0.[1-2]", "");
    let scrape = |url: &str| {
        let out = h[0]
            .exec("python3")
            .args([
                "-c",
                "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                url,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The node: its load and its VM once sampled, and both hosts alive.
    let page = wait_for("the daemon's metrics", Duration::from_secs(30), || {
        let p = scrape(&format!("http://{listen}/metrics"));
        (sample(&p, "ffmk_node_vms") == Some(1.0)
            && sample(&p, "ffmk_cluster_hosts_alive") == Some(2.0))
        .then_some(p)
    });
    let (ok, said) = promtool(&page);
    assert!(ok, "promtool: {said}\n{page}");
    assert!(
        sample(&page, "ffmk_node_load").is_some_and(|l| l > 0.5),
        "{page}"
    );
    assert!(
        page.contains("ffmk_cluster_host_load{host=\"10.77.0.2\"}"),
        "{page}"
    );
    // Anything else is a 404, not a hang.
    let other = scrape(&format!("http://{listen}/other"));
    assert!(other.is_empty(), "{other}");
    // The VM's own page, over its API socket.
    let vm_page = vmm_api::Client::new(&vm.sock)
        .with_timeout(Duration::from_secs(5))
        .metrics()
        .unwrap();
    let (ok, said) = promtool(&vm_page);
    assert!(ok, "promtool: {said}\n{vm_page}");
    for vcpu in ["0", "1"] {
        assert!(
            sample(
                &vm_page,
                &format!("ffmk_vcpu_cpu_seconds_total{{vcpu=\"{vcpu}\",role=\"service\"}}")
            )
            .is_some_and(|s| s > 0.0),
            "{vm_page}"
        );
    }
    assert_eq!(
        sample(&vm_page, "ffmk_vm_state{state=\"running\"}"),
        Some(1.0)
    );
}

/// `ffmk-node job ARGS` run in host `i`'s namespace with its settings.
fn job(ns: &NetNs, dir: &Path, i: usize, args: &[&str]) -> std::process::Output {
    let (verb, rest) = args.split_first().unwrap();
    ns.exec(node())
        .args(["job", verb, "--config"])
        .arg(dir.join(format!("node{i}.toml")))
        .args(rest)
        .output()
        .unwrap()
}

/// A VM's state as its API shows it ("" when it does not answer).
fn vm_state(sock: &Path) -> String {
    let v: Value = serde_json::from_slice(&common::api(sock, "info").stdout).unwrap_or_default();
    v["state"].as_str().unwrap_or_default().to_string()
}

/// A job of two probe VMs on two hosts (a third host runs a VM of another
/// job whose name starts alike) checkpointed as a whole: every VM keeps
/// running, the epoch holds both VMs and a manifest. A job whose second VM
/// refuses to be snapshotted fails as a whole: both VMs run on and nothing
/// of it is kept. The job's VMs are killed; a restore with one VM's copy
/// missing starts nothing; the restore with both swaps their hosts, and
/// each counter goes on from the checkpoint.
#[test]
fn a_job_is_checkpointed_as_a_whole_and_restored_on_other_hosts() {
    let Some(cluster) = Cluster::new("jb", 3) else {
        return;
    };
    let dir = common::tmpdir("balance-job");
    let _cleanup = Cleanup(dir.clone());
    let h = &cluster.hosts;
    let bb = dir.join("bb");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let one = ["--cpus", "1"];
    let a = busy_vm_with(&h[0], &dir, 0, "job7-a", &one);
    let b = busy_vm_with(&h[1], &dir, 1, "job7-b", &one);
    let other = busy_vm_with(&h[2], &dir, 2, "job70-x", &one);
    let c = busy_vm_with(&h[0], &dir, 0, "job8-a", &one);
    // job8-b may write snapshots only elsewhere: it refuses the job's.
    let only = elsewhere.display().to_string();
    let refuser = busy_vm_with(
        &h[1],
        &dir,
        1,
        "job8-b",
        &["--cpus", "1", "--snapshot-dir", &only],
    );
    for vm in [&a, &b, &other, &c, &refuser] {
        vm.wait_counter(2);
    }
    let extra = format!("job_checkpoint_dir = \"{}\"", bb.display());
    let hosts = "10.77.0.[1-3]";
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| Daemon::start_with(&h[i], &dir, i, hosts, &extra))
        .collect();
    for (i, d) in daemons.iter().enumerate() {
        let want = if i == 2 { 1 } else { 2 };
        wait_for(
            "the daemons to see their VMs",
            Duration::from_secs(20),
            || {
                let st = d.status()?;
                (st["vms"].as_array()?.len() == want).then_some(())
            },
        );
    }

    // A job with no VM: one line, exit 1.
    let out = job(&h[0], &dir, 0, &["checkpoint", "nojob"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no VM of job nojob runs on any host"), "{err}");
    // A bad name: exit 2.
    let out = job(&h[0], &dir, 0, &["checkpoint", "../x"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The checkpoint, driven from the host without a VM of the job.
    let out = job(&h[2], &dir, 2, &["checkpoint", "--json", "job7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let epoch = m["epoch"].as_str().unwrap().to_string();
    let mut names: Vec<&str> = m["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["job7-a", "job7-b"], "{m}");
    let pause = m["pause_ms"].as_f64().unwrap();
    eprintln!(
        "job checkpoint: common pause {pause:.1} ms (captured after {:.1}, resume sent after {:.1}), total {:.2} s",
        m["all_captured_after_ms"].as_f64().unwrap(),
        m["resume_sent_after_ms"].as_f64().unwrap(),
        m["total_s"].as_f64().unwrap()
    );
    assert!(pause > 0.0, "{m}");
    // Each VM's snapshot: committed, its pause from its VMM.
    for v in m["vms"].as_array().unwrap() {
        assert!(
            v["snapshot"]["pause_ms"].as_f64().is_some_and(|p| p > 0.0),
            "{m}"
        );
    }
    let ed = bb.join("job7").join(&epoch);
    assert!(
        ed.join("job.json").is_file()
            && ed.join("job7-a/manifest.json").is_file()
            && ed.join("job7-b/manifest.json").is_file()
    );
    assert!(!ed.join("job70-x").exists());
    for vm in [&a, &b, &other] {
        assert_eq!(vm_state(&vm.sock), "running");
    }
    let at_checkpoint = counters(&a.console()).last().copied().unwrap();
    let out = job(&h[1], &dir, 1, &["list", "job7"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&epoch),
        "{out:?}"
    );

    // A VM that refuses: the whole checkpoint fails, nothing is kept.
    let out = job(&h[0], &dir, 0, &["checkpoint", "job8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("job8-b") && last.contains("nothing was kept"),
        "{err}"
    );
    assert_eq!(vm_state(&c.sock), "running");
    assert_eq!(vm_state(&refuser.sock), "running");
    let kept: Vec<_> = std::fs::read_dir(bb.join("job8"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "job8's failed checkpoint left {kept:?}");
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "nothing was written elsewhere"
    );

    // The job's VMs die.
    let a_sock = a.sock.clone();
    drop(a);
    drop(b);
    wait_for("the daemons to lose job7", Duration::from_secs(20), || {
        let gone = [0, 1].iter().all(|&i| {
            daemons[i].status().is_some_and(|st| {
                st["vms"].as_array().is_some_and(|v| {
                    !v.iter()
                        .any(|v| v["name"].as_str().is_some_and(|n| n.starts_with("job7-")))
                })
            })
        });
        gone.then_some(())
    });
    for f in ["h0/job7-a.console", "h1/job7-b.console"] {
        let _ = std::fs::remove_file(dir.join(f));
    }

    // A copy missing: nothing starts.
    let gone = ed.join("job7-b.gone");
    std::fs::rename(ed.join("job7-b"), &gone).unwrap();
    let out = job(&h[0], &dir, 0, &["restore", "job7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("job7-b") && last.contains("nothing was started"),
        "{err}"
    );
    assert_eq!(vm_state(&a_sock), "");
    assert_eq!(vm_state(&dir.join("h1/job7-a.sock")), "");
    std::fs::rename(&gone, ed.join("job7-b")).unwrap();

    // The restore, each VM on the other's host.
    let out = job(
        &h[0],
        &dir,
        0,
        &[
            "restore",
            "--json",
            "--on",
            "job7-a=10.77.0.2",
            "--on",
            "job7-b=10.77.0.1",
            "job7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["epoch"], epoch.as_str(), "{r}");
    let moved = [
        (dir.join("h1/job7-a.sock"), dir.join("h1/job7-a.console")),
        (dir.join("h0/job7-b.sock"), dir.join("h0/job7-b.console")),
    ];
    for (sock, console) in &moved {
        assert_eq!(vm_state(sock), "running", "{r}");
        let seen = wait_for("the restored counter", Duration::from_secs(20), || {
            let c = counters(&std::fs::read_to_string(console).ok()?);
            (c.len() >= 3).then_some(c)
        });
        // It goes on from where the checkpoint left it, one by one.
        assert!(seen[0] > 2, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
        if console.ends_with("job7-a.console") {
            assert!(
                seen[0] <= at_checkpoint + 1,
                "{seen:?} after {at_checkpoint}"
            );
        }
    }
    // The job runs: another restore is refused.
    let out = job(&h[0], &dir, 0, &["restore", "job7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("job job7 still runs"), "{err}");
    drop(daemons);
    drop(other);
    drop(c);
    drop(refuser);
}

/// An environment knob of the job checkpoint figures.
fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The figures of `ci/bench-job-checkpoint` (run with --ignored, in a
/// release build): a job of FFMK_BENCH_VMS probe VMs per host on two hosts,
/// each FFMK_BENCH_MIB of memory with a quarter of it rewritten at
/// FFMK_BENCH_RATE MiB/s. Per run: the job's common pause and total time
/// of `ffmk-node job checkpoint`; each VM's pause in a live snapshot of it
/// alone; and what a job checkpoint without pre-copy would pause: the job
/// paused, each VM's stopped snapshot taken one after the other.
#[test]
#[ignore]
fn job_checkpoint_figures() {
    let Some(cluster) = Cluster::new("jf", 2) else {
        return;
    };
    let (per_host, mib, rate, runs) = (
        knob("FFMK_BENCH_VMS", 2) as usize,
        knob("FFMK_BENCH_MIB", 1024),
        knob("FFMK_BENCH_RATE", 100),
        knob("FFMK_BENCH_RUNS", 3),
    );
    let dir = common::tmpdir("balance-job-figures");
    let _cleanup = Cleanup(dir.clone());
    let bb = std::env::var("FFMK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.join("bb"));
    let h = &cluster.hosts;
    let task = format!("task=dirty mib={} rate={rate}", mib / 4);
    let memory = format!("{mib}M");
    let vms: Vec<Vm> = (0..2 * per_host)
        .map(|i| {
            let host = i % 2;
            let vm_dir = dir.join(format!("h{host}"));
            std::fs::create_dir_all(&vm_dir).unwrap();
            let name = format!("job9-r{i}");
            // (vsock keeps the balancer from moving it meanwhile)
            let vsock = format!(
                "cid=3,socket={}",
                dir.join(format!("{name}.vsock")).display()
            );
            let args = common::probe_argv_mem(&task, &memory, &["--cpus", "1", "--vsock", &vsock]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Vm::spawn_in(
                Some(&h[host]),
                &args,
                &vm_dir.join(format!("{name}.console")),
                &vm_dir.join(format!("{name}.sock")),
            )
        })
        .collect();
    for vm in &vms {
        vm.wait_counter(3);
    }
    let extra = format!(
        "job_checkpoint_dir = \"{}\"\njob_checkpoint_keep = 1",
        bb.display()
    );
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start_with(&h[i], &dir, i, "10.77.0.[1-2]", &extra))
        .collect();
    for d in &daemons {
        wait_for(
            "the daemons to see their VMs",
            Duration::from_secs(20),
            || (d.status()?["vms"].as_array()?.len() == per_host).then_some(()),
        );
    }
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let snapshot = |vm: &Vm, dest: &Path, live: bool| -> f64 {
        let _ = std::fs::remove_dir_all(dest);
        let mut args = vec!["snapshot", "--dest", dest.to_str().unwrap()];
        if live {
            args.push("--live");
        }
        let out = vm.api(&args);
        assert!(out.status.success(), "{out:?}");
        // The outcome is the last line (progress comes before it).
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim().lines().last().unwrap_or("")).unwrap();
        ms(&v["pause_ms"])
    };
    let scratch = bb.join("alone");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut job_pause, mut job_total, mut alone_max, mut in_turn) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let out = job(&h[0], &dir, 0, &["checkpoint", "--json", "job9"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        // Each VM alone, live; then all paused, one stopped snapshot after
        // the other.
        let alone: Vec<f64> = vms
            .iter()
            .enumerate()
            .map(|(i, vm)| snapshot(vm, &scratch.join(format!("live{i}")), true))
            .collect();
        for vm in &vms {
            assert!(vm.api(&["pause"]).status.success());
        }
        let t = Instant::now();
        for (i, vm) in vms.iter().enumerate() {
            snapshot(vm, &scratch.join(format!("stopped{i}")), false);
        }
        let one_by_one = t.elapsed().as_secs_f64() * 1e3;
        for vm in &vms {
            assert!(vm.api(&["resume"]).status.success());
        }
        let _ = std::fs::remove_dir_all(&scratch);
        let longest = alone.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "job-checkpoint: run {run} vms={} mib={mib} rate={rate} pause_ms={:.1} total_s={:.2} \
             longest_alone_live_pause_ms={longest:.1} one_by_one_stopped_ms={one_by_one:.1} \
             captured_after_ms={:.1}",
            vms.len(),
            ms(&m["pause_ms"]),
            ms(&m["total_s"]),
            ms(&m["all_captured_after_ms"]),
        );
        job_pause.push(ms(&m["pause_ms"]));
        job_total.push(ms(&m["total_s"]));
        alone_max.push(longest);
        in_turn.push(one_by_one);
    }
    let (p, a, o) = (median(job_pause), median(alone_max), median(in_turn));
    eprintln!(
        "job-checkpoint: median vms={} mib={mib} rate={rate} runs={runs}: job pause {p:.1} ms, \
         longest single-VM live pause {a:.1} ms (ratio {:.2}), one-by-one stopped {o:.1} ms \
         (ratio {:.3}), total {:.2} s",
        vms.len(),
        p / a,
        p / o,
        median(job_total)
    );
    drop(daemons);
    drop(vms);
}
