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
#[allow(clippy::too_many_arguments)]
fn boot_node(
    host: &NetNs,
    dir: &Path,
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
        &dir.join(format!("{}.console", node.name)),
        &dir.join(format!("{}.sock", node.name)),
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

/// A shell loop (for the guest's command line: no double quotes) that
/// waits until `host` takes SSH logins, at most 5 minutes.
fn wait_ssh(host: &str) -> String {
    format!("n=0; until ssh {host} true; do n=$((n+1)); [ $n -lt 600 ] || exit 3; sleep 0.5; done")
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
    let job = format!(
        "{} && mpirun -np 3 -H n0:2 --oversubscribe ffmk-mpi-checksum {steps} {words} 0 50 && \
         echo job-reference-done && mpirun -np 3 -H n0:2,n1:1 ffmk-mpi-checksum {steps} {words} 200 5",
        wait_ssh("n1")
    );
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
    let mut n1 = n1;
    let deadline = Instant::now() + timeout();
    while !n1.console().contains("ffmk-guest: serving") {
        if matches!(n1.child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            let console = n1.console();
            let (status, err) = n1.stop();
            panic!("n1 did not come up ({status:?}): {err}\n{console}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
