//! HPC jobs of Linux VMs: the HPC image (`guest-images/build hpc`: a
//! Debian root file system with Open MPI, HPCC and an SSH server, one disk
//! image shared read-only by every VM) booted on two "hosts" - network
//! namespaces whose bridges share one Ethernet segment, as a cluster's
//! nodes do - and an MPI job across the VMs (`mpirun` over SSH, ranks
//! talking TCP between VMs). A rank's VM is live-migrated to the other host
//! while the job runs, and the job must end with the checksum of an
//! undisturbed run.
//!
//! Like linux_guest.rs these need a host where Linux guests run (on a
//! PVM-backed host `ci/test-linux` runs them in the nested-KVM lab).
mod common;

use common::linux::{base_cmdline, images, in_lab, run_argv, timeout, wait_console};
use common::{image, tmpdir, Cluster, NetNs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn hpc_image() -> PathBuf {
    image("hpc/rootfs.ext4", "guest-images/build hpc")
}

/// One VM of a job: its name (the guest's host name), address and MAC.
struct Node {
    name: &'static str,
    ip: &'static str,
    mac: &'static str,
}

const N0: Node = Node {
    name: "n0",
    ip: "10.77.0.10",
    mac: "52:54:00:77:00:10",
};
const N1: Node = Node {
    name: "n1",
    ip: "10.77.0.11",
    mac: "52:54:00:77:00:11",
};

/// `ffmk_hosts=` for every node of the job.
fn hosts_arg(nodes: &[&Node]) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}:{}", n.name, n.ip))
        .collect();
    format!("ffmk_hosts={}", list.join(","))
}

/// Boots `node` from the HPC image on `host` (its TAP `tap` on the host's
/// bridge), console and API socket `NAME.*` in `dir`. With `cmd` the guest
/// runs it and powers off with its status; without, it serves (sshd).
fn boot_node(
    host: &NetNs,
    dir: &Path,
    node: &Node,
    nodes: &[&Node],
    cpus: &str,
    tap: &str,
    cmd: Option<&str>,
) -> common::Vm {
    boot_node_as(host, &dir.join(node.name), node, nodes, cpus, tap, cmd)
}

/// [`boot_node`] with its console and API socket at `files.console` and
/// `files.sock`.
#[allow(clippy::too_many_arguments)]
fn boot_node_as(
    host: &NetNs,
    files: &Path,
    node: &Node,
    nodes: &[&Node],
    cpus: &str,
    tap: &str,
    cmd: Option<&str>,
) -> common::Vm {
    let (_, bzimage, initrd) = images().expect("checked by the caller");
    let disk = format!("path={},readonly", hpc_image().display());
    let net = format!("tap={tap},bridge=br0,mac={}", node.mac);
    let mut cmdline = format!(
        "{} ffmk_root=/dev/vda ffmk_hostname={} ffmk_ip={}/24 {}",
        base_cmdline(),
        node.name,
        node.ip,
        hosts_arg(nodes)
    );
    if let Some(cmd) = cmd {
        cmdline.push_str(&format!(" ffmk_exit_port=244 -- \"{cmd}\""));
    }
    common::Vm::spawn_in(
        Some(host),
        &run_argv(
            &bzimage,
            &initrd,
            &cmdline,
            &["--cpus", cpus, "--disk", &disk, "--net", &net],
        ),
        &files.with_extension("console"),
        &files.with_extension("sock"),
    )
}

/// The migrations' downtime target. In the lab (nested under TCG) the
/// link carries ~9 MiB/s and a rank's VM keeps receiving its peers' data
/// (the device writes it to guest memory whatever the vCPUs' throttle):
/// ~75 ms is as low as the prediction gets there, so the default of 50 ms
/// would never be met.
fn max_downtime_ms() -> &'static str {
    if in_lab() {
        "500"
    } else {
        "50"
    }
}

/// n0's command: once n1 takes logins, the 3 ranks in n0 alone (the
/// undisturbed reference: the checksum depends only on the ranks and the
/// arguments), then across n0 and n1, 200 ms between steps.
fn job_command(steps: u32, words: u32) -> String {
    format!(
        "{} && mpirun -np 3 -H n0:2 --oversubscribe ffmk-mpi-checksum {steps} {words} 0 50 {nap} && \
         echo job-reference-done && mpirun -np 3 -H n0:2,n1:1 ffmk-mpi-checksum {steps} {words} 200 5 {nap}",
        wait_ssh("n1"),
        nap = nap_us()
    )
}

/// How long a waiting rank sleeps between looks at its requests
/// (ffmk-mpi-checksum's NAP_US). In the lab, ranks that spin in MPI keep
/// their L2 vCPUs busy without a VM exit, and three of them on L1's two
/// vCPUs stalled L1 (RCU stalls, freezes: docs/lab.md); ranks that nap
/// let their vCPUs halt. The checksum is the same either way.
fn nap_us() -> u32 {
    if in_lab() {
        2000
    } else {
        0
    }
}

/// A shell loop (for the guest's command line: no double quotes) that
/// waits until `host` takes SSH logins, at most 5 minutes.
fn wait_ssh(host: &str) -> String {
    format!("n=0; until ssh {host} true; do n=$((n+1)); [ $n -lt 600 ] || exit 3; sleep 0.5; done")
}

/// `vm` once its guest serves (sshd up); its VMM's error if it ends or
/// does not get there in time.
fn serving(mut vm: common::Vm) -> common::Vm {
    let deadline = Instant::now() + timeout();
    while !vm.console().contains("ffmk-guest: serving") {
        if matches!(vm.child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            let console = vm.console();
            let (status, err) = vm.stop();
            panic!("the node did not come up ({status:?}): {err}\n{console}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    vm
}

/// The final lines of ffmk-mpi-checksum runs on a console, in order.
fn final_checksums(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.split("ffmk-mpi-checksum: ").nth(1))
        .map(str::to_string)
        .collect()
}

/// An Open MPI job of 3 ranks in 2 VMs on 2 hosts (n0: 2 vCPUs, ranks 0
/// and 1, on host 0; n1: 1 vCPU, rank 2, on host 1). n0 first runs the
/// same program with all 3 ranks in itself (the undisturbed reference: the
/// checksum depends only on the ranks and the arguments), then the job
/// across both VMs, during which n1 is live-migrated to host 0 (a new
/// `--incoming` VMM on a new TAP on host 0's bridge; the migration stream
/// crosses the hosts' link). The job must finish with the reference
/// checksum. Prints the migration's downtime and the time from the
/// switch-over until the first frame from a peer reached the moved VM on
/// its new TAP.
#[test]
fn linux_mpi_job_across_two_hosts_keeps_its_checksum_when_a_rank_migrates() {
    if images().is_none() {
        return;
    }
    let Some(cluster) = Cluster::bridged("job", 2) else {
        return;
    };
    let dir = tmpdir("linux-mpi-job");
    let nodes = [&N0, &N1];
    // 100 steps of 512 KiB per rank; the pause keeps the job going for
    // 20 s or more whatever the host's speed. The reference runs 3 ranks
    // on n0's 2 vCPUs: told it is oversubscribed, Open MPI yields instead
    // of spinning while it waits.
    let (steps, words) = (100, 65536);
    let job = job_command(steps, words);
    let n1 = boot_node(&cluster.hosts[1], &dir, &N1, &nodes, "1", "jobt1", None);
    let n0 = boot_node(
        &cluster.hosts[0],
        &dir,
        &N0,
        &nodes,
        "2",
        "jobt0",
        Some(&job),
    );
    // n1 arrives on host 0 through a VMM that waits there from the start
    // (its TAP is on the bridge before the switch-over).
    let to = format!("tcp://{}:7431", Cluster::addr(0));
    let disk = format!("path={},readonly", hpc_image().display());
    let net = format!("tap=jobt1b,bridge=br0,mac={}", N1.mac);
    let dst = common::Vm::spawn_in(
        Some(&cluster.hosts[0]),
        &[
            "run",
            "--incoming",
            &to,
            "--memory",
            "512M",
            "--test-exit-port",
            "--disk",
            &disk,
            "--net",
            &net,
        ],
        &dir.join("n1b.console"),
        &dir.join("n1b.sock"),
    );
    let t0 = Instant::now();
    let at = || format!("{:.1} s", t0.elapsed().as_secs_f64());
    // n1 serves first (its VMM's error, not n0's "no route to host", if
    // it does not).
    let n1 = serving(n1);
    eprintln!("job: n1 up at {}", at());
    wait_console(&n0, "job-reference-done");
    eprintln!("job: reference run done at {}", at());
    wait_console(&n0, &format!("step 10/{steps} "));
    eprintln!("job: step 10 at {}, migrating n1", at());
    let deadline = Instant::now() + timeout();
    while !cluster.hosts[0].ip(&["link", "show", "jobt1b"]) {
        assert!(Instant::now() < deadline, "{}", dst.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Frames from n0 to n1 on n1's new TAP: the first one after the
    // switch-over is when the peer reached the moved VM again.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let window = Duration::from_secs(40);
    let (out, started, done, frames) = std::thread::scope(|scope| {
        let frames = scope.spawn(|| {
            // ETH_P_ALL: a packet socket bound to one protocol sees only
            // what the TAP receives, not what the bridge sends the VM.
            cluster.hosts[0].run(move || common::capture("jobt1b", 0x0003, window, ready_tx))
        });
        ready.recv().unwrap();
        let started = Instant::now();
        let out = cluster.hosts[1]
            .exec(common::vmm())
            .args(["migrate", "--api-socket"])
            .arg(&n1.sock)
            .args([
                "--to",
                &to,
                "--json",
                "--max-downtime-ms",
                max_downtime_ms(),
            ])
            .output()
            .unwrap();
        let done = Instant::now();
        (out, started, done, frames.join().unwrap())
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", dst.describe());
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))
        .unwrap_or(serde_json::Value::Null);
    let mac = |m: &str| -> Vec<u8> {
        m.split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    };
    let (to_n1, from_n0) = (mac(N1.mac), mac(N0.mac));
    // Milliseconds after `migrate` returned (negative: before it did).
    let first_peer = frames
        .iter()
        .find(|(t, f)| {
            *t > started
                && f.len() >= 14
                && f[0..6] == to_n1[..]
                && f[6..12] == from_n0[..]
                && f[12..14] == [0x08, 0x00]
        })
        .map(|(t, _)| {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            ms(t.saturating_duration_since(done)) - ms(done.saturating_duration_since(*t))
        });
    eprintln!("job: migrated at {}", at());
    let (code, err) = n1.wait_exit();
    assert_eq!(code, Some(0), "the source VMM: {err}");
    // The job goes on and ends.
    let deadline = Instant::now() + timeout();
    let mut dst = dst;
    while final_checksums(&n0.console()).len() < 2 {
        // The moved rank's VM must live until the job ends.
        if matches!(dst.child.try_wait(), Ok(Some(_))) {
            let console = dst.console();
            let (status, err) = dst.stop();
            panic!(
                "n1 ended on host 0 ({status:?}) while the job ran: {err}\n{console}\nthe job: {}",
                n0.console()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the job did not finish: {}\nn0's VMM: {}\nn1 on host 0: {}\n{}\nits VMM: {}",
            n0.console(),
            n0.hang_report(),
            dst.describe(),
            dst.console(),
            dst.hang_report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = n0.console();
    let after_move = console
        .split(&format!("step 10/{steps} "))
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("step "))
        .count();
    let (code, err) = n0.wait_exit();
    assert_eq!(code, Some(0), "{err}\n{console}");
    let sums = final_checksums(&console);
    assert_eq!(sums.len(), 2, "{console}");
    assert!(
        sums[0].starts_with(&format!("ranks=3 steps={steps} words={words} ")),
        "{console}"
    );
    assert_eq!(
        sums[0], sums[1],
        "the migrated job's checksum differs from the undisturbed run's:\n{console}"
    );
    assert!(console.contains("rank 2 on n1 "), "{console}");
    eprintln!(
        "job: checksum {} kept; n1 moved host 1 -> host 0 with downtime {} ms, total {} ms; \
         {after_move} progress lines after the move began; first frame from n0 on the new TAP {}",
        sums[1].rsplit('=').next().unwrap_or(""),
        report["downtime_ms"],
        report["total_ms"],
        match first_peer {
            Some(ms) => format!("{ms:.1} ms after migrate returned"),
            None => format!("not seen within the {window:?} capture"),
        }
    );
    // KVM took the moved vCPU's state as given (the TSC above all: the
    // VMM receiving it was started as long ago as the VM had been running,
    // which KVM's TSC heuristics took for a vCPU to line up with).
    let (_, err) = dst.stop();
    assert!(!err.contains("restored with other state"), "{err}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// The `ffmk-node` binary beside the `ffmk-vmm` the tests run
/// (`cargo build -p ffmk-node`; ci/test-linux builds it).
fn ffmk_node() -> PathBuf {
    Path::new(common::vmm()).with_file_name("ffmk-node")
}

/// Starts host `i`'s node daemon (of hosts 10.77.0.1 and .2) with its VM
/// directory `dir/hI`, job checkpoints under `dir/bb` and the HPC image's
/// directory shared; it never balances (the job test moves VMs itself).
fn node_daemon(host: &NetNs, dir: &Path, i: usize) -> std::process::Child {
    let vm_dir = dir.join(format!("h{i}"));
    std::fs::create_dir_all(&vm_dir).unwrap();
    let config = dir.join(format!("node{i}.toml"));
    let image_dir = hpc_image().canonicalize().unwrap();
    std::fs::write(
        &config,
        format!(
            r#"hosts = "10.77.0.[1-2]"
me = "{me}"
vm_dir = "{vm_dir}"
vmm = "{vmm}"
log = "{log}"
period_ms = 1000
cores = 2
reserve_mib = 64
threshold = 100.0
migration_ports = [7410, 7419]
job_checkpoint_dir = "{bb}"
shared_disk_dirs = ["{images}", "{given}"]
vm_bridges = ["br0"]
"#,
            me = Cluster::addr(i),
            vm_dir = vm_dir.display(),
            vmm = common::vmm(),
            log = dir.join(format!("node{i}.log")).display(),
            bb = dir.join("bb").display(),
            images = image_dir.parent().unwrap().display(),
            given = hpc_image().parent().unwrap().display(),
        ),
    )
    .unwrap();
    host.exec(ffmk_node().to_str().unwrap())
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("node{i}.stderr"))).unwrap())
        .spawn()
        .unwrap()
}

/// An MPI job of 3 ranks in 2 VMs on 2 hosts (VMs job7-n0 and job7-n1 in
/// the node daemons' VM directories), checkpointed as a whole by `ffmk-node
/// job checkpoint job7` while it runs; the job goes on. Then the negative
/// case: the same two VMs snapshotted one after the other while the job
/// runs (n1 some steps later than n0). Both VMs are stopped. The
/// one-after-the-other snapshots restored: n1 has acknowledged data that
/// n0's snapshot never sent, so the job cannot finish with its checksum.
/// Then `ffmk-node job restore job7` restarts the consistent checkpoint
/// with each VM on the other host, and the job finishes with the checksum
/// of the undisturbed reference run.
#[test]
fn linux_mpi_job_checkpoint_is_a_consistent_cut_and_restarts_with_its_checksum() {
    if images().is_none() {
        return;
    }
    assert!(
        ffmk_node().exists(),
        "{} is missing: cargo build -p ffmk-node",
        ffmk_node().display()
    );
    let Some(cluster) = Cluster::bridged("jck", 2) else {
        return;
    };
    let h = &cluster.hosts;
    let dir = tmpdir("linux-mpi-job-checkpoint");
    let nodes = [&N0, &N1];
    let (steps, words) = (100, 65536);
    let job = job_command(steps, words);
    let n1 = boot_node_as(
        &h[1],
        &dir.join("h1/job7-n1"),
        &N1,
        &nodes,
        "1",
        "jckt1",
        None,
    );
    let n0 = boot_node_as(
        &h[0],
        &dir.join("h0/job7-n0"),
        &N0,
        &nodes,
        "2",
        "jckt0",
        Some(&job),
    );
    let mut daemons = [node_daemon(&h[0], &dir, 0), node_daemon(&h[1], &dir, 1)];
    let t0 = Instant::now();
    let at = || format!("{:.1} s", t0.elapsed().as_secs_f64());
    let n1 = serving(n1);
    wait_console(&n0, "job-reference-done");
    eprintln!("job: reference run done at {}", at());
    let node = |i: usize, args: &[&str]| {
        h[i].exec(ffmk_node().to_str().unwrap())
            .args([args[0], args[1], "--config"])
            .arg(dir.join(format!("node{i}.toml")))
            .args(&args[2..])
            .output()
            .unwrap()
    };

    // The consistent checkpoint, 10 steps in.
    wait_console(&n0, &format!("step 10/{steps} "));
    let started = Instant::now();
    let out = node(0, &["job", "checkpoint", "--json", "job7"]);
    let took = started.elapsed();
    let logs = || {
        (0..2)
            .map(|i| {
                let log =
                    std::fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("\"broadcast") || l.contains("\"job-"))
                    .collect();
                format!("--- host {i}'s daemon:\n{}", lines.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        n0.console(),
        logs()
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let epoch = m["epoch"].as_str().unwrap().to_string();
    eprintln!(
        "job: checkpoint {epoch} at {}: the job paused {:.1} ms (copies converged after {:.0} ms), {:.2} s in all",
        at(),
        m["pause_ms"].as_f64().unwrap_or(-1.0),
        m["converged_ms"].as_f64().unwrap_or(-1.0),
        took.as_secs_f64()
    );

    // The negative case: one VM after the other, 5 steps apart.
    let seq = dir.join("seq");
    std::fs::create_dir_all(&seq).unwrap();
    let snap = |vm: &common::Vm, to: &str| {
        let out = common::ffmk()
            .args(["snapshot", "--live", "--api-socket"])
            .arg(&vm.sock)
            .arg("--dest")
            .arg(seq.join(to))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let progress = |console: &str| console.matches("step ").count();
    snap(&n0, "n0");
    let seen = progress(&n0.console());
    let deadline = Instant::now() + timeout();
    while progress(&n0.console()) < seen + 1 {
        assert!(Instant::now() < deadline, "{}", n0.console());
        std::thread::sleep(Duration::from_millis(100));
    }
    snap(&n1, "n1");
    eprintln!("job: n0 and n1 snapshotted one after the other at {}", at());

    // The job goes on after its checkpoint (two more progress lines);
    // then both VMs are stopped: what follows restarts the job from the
    // copies. (Letting it run to its end here only exposes it longer to
    // the lab's L2 triple faults: docs/lab.md.)
    let reference = final_checksums(&n0.console())[0].clone();
    let seen = progress(&n0.console());
    let deadline = Instant::now() + timeout();
    let mut n0 = n0;
    while progress(&n0.console()) < seen + 2 {
        if matches!(n0.child.try_wait(), Ok(Some(_))) {
            let console = n0.console();
            let (status, err) = n0.stop();
            panic!(
                "n0's VMM ended ({status:?}) after the checkpoint: {err}\n{console}\n{}",
                logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the job did not go on after its checkpoint: {}\n{}",
            n0.console(),
            n0.hang_report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "job: went on after the checkpoint; stopping both VMs at {}",
        at()
    );
    let _ = n0.stop();
    let _ = n1.stop();

    // The one-after-the-other snapshots, restored on their hosts.
    let restore = |i: usize, from: &str, tap: &str, mac: &str| {
        let net = format!("tap={tap},bridge=br0,mac={mac}");
        let disk = format!("path={},readonly", hpc_image().display());
        common::Vm::spawn_in(
            Some(&h[i]),
            &[
                "restore",
                "--from",
                seq.join(from).to_str().unwrap(),
                "--net",
                &net,
                "--disk",
                &disk,
            ],
            &dir.join(format!("seq-{from}.console")),
            &dir.join(format!("seq-{from}.sock")),
        )
    };
    let s0 = restore(0, "n0", "jcks0", N0.mac);
    let s1 = restore(1, "n1", "jcks1", N1.mac);
    let broken_within = Duration::from_secs(if in_lab() { 90 } else { 30 });
    let deadline = Instant::now() + broken_within;
    let mut s0 = s0;
    let outcome = loop {
        let c = s0.console();
        if let Some(sum) = final_checksums(&c).first().cloned() {
            break format!("finished with {sum}");
        }
        if let Ok(Some(st)) = s0.child.try_wait() {
            break format!("n0's VM ended ({st}) without a checksum");
        }
        if Instant::now() > deadline {
            break format!("no progress to the end within {broken_within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("job: the one-after-the-other restore: {outcome}");
    assert!(
        !outcome.contains(&reference),
        "the snapshots taken one after the other restored a job that finished with its checksum: \
         the negative case shows nothing"
    );
    let _ = s0.stop();
    let _ = s1.stop();

    // The consistent checkpoint, each VM on the other host.
    for f in ["h0/job7-n0.console", "h1/job7-n1.console"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    // The daemons have seen the job's VMs go (they look once a second).
    std::thread::sleep(Duration::from_secs(3));
    let out = node(
        0,
        &[
            "job",
            "restore",
            "--json",
            "--on",
            "job7-n0=10.77.0.2",
            "--on",
            "job7-n1=10.77.0.1",
            "job7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "job: restored at {}: {}",
        at(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let console = dir.join("h1/job7-n0.console");
    let deadline = Instant::now() + timeout();
    let restored = loop {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        if !final_checksums(&c).is_empty() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the restored job did not finish: {c}\n{}",
            std::fs::read_to_string(dir.join("h1/job7-n0.vmm.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let sums = final_checksums(&restored);
    assert_eq!(
        sums.last(),
        Some(&reference),
        "the restored job's checksum differs:\n{restored}"
    );
    eprintln!(
        "job: the restored job finished at {} with the reference checksum",
        at()
    );
    for d in &mut daemons {
        let _ = d.kill();
        let _ = d.wait();
    }
    // The restored VMMs (started by the daemons) end with their job or here.
    for sock in ["h1/job7-n0.sock", "h0/job7-n1.sock"] {
        let _ = common::ffmk()
            .args(["shutdown", "--api-socket"])
            .arg(dir.join(sock))
            .output();
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}
