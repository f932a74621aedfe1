//! Live migration end to end between two "hosts": network namespaces on a
//! bridge, each running its own `ffmk-vmm` (source: the probe guest;
//! destination: `run --incoming`). The guest's counter must continue on the
//! destination without a gap or a repeat and its memory must end exactly
//! as an uninterrupted run's; every abort path must leave the source VM
//! running and intact, and the destination refusing or listening again.
mod common;

use common::{
    assert_consecutive, counters, ffmk, probe_argv_mem, text_value as value, tmpdir, Cluster,
    NetNs, Vm,
};
use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

const PORT: u16 = 7300;

fn source(ns: &NetNs, dir: &Path, name: &str, task: &str, memory: &str) -> Vm {
    let args = probe_argv_mem(task, memory, &["--test-exit-port"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vm::spawn_in(
        Some(ns),
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

fn destination(ns: &NetNs, dir: &Path, name: &str, memory: &str) -> Vm {
    destination_with(ns, dir, name, memory, &[])
}

fn destination_with(ns: &NetNs, dir: &Path, name: &str, memory: &str, extra: &[&str]) -> Vm {
    let listen = format!("tcp://{}:{PORT}", Cluster::addr(1));
    let mut args = vec![
        "run",
        "--incoming",
        &listen,
        "--memory",
        memory,
        "--test-exit-port",
    ];
    args.extend(extra);
    let vm = Vm::spawn_in(
        Some(ns),
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    );
    // Listening once the port answers (from the destination's namespace).
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = format!("{}:{PORT}", Cluster::addr(1));
    while !ns.run({
        let addr = addr.clone();
        move || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
                .is_ok()
        }
    }) {
        assert!(Instant::now() < deadline, "the destination does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    vm
}

fn migrate(src: &Vm, extra: &[&str]) -> Output {
    let to = format!("tcp://{}:{PORT}", Cluster::addr(1));
    ffmk()
        .args(["migrate", "--api-socket"])
        .arg(&src.sock)
        .args(["--to", &to, "--json"])
        .args(extra)
        .output()
        .unwrap()
}

/// Starts `ffmk-vmm migrate` in the background.
fn migrate_in_background(src: &Vm, extra: &[&str]) -> std::thread::JoinHandle<Output> {
    let sock = src.sock.clone();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let to = format!("tcp://{}:{PORT}", Cluster::addr(1));
        ffmk()
            .args(["migrate", "--api-socket"])
            .arg(&sock)
            .args(["--to", &to, "--json"])
            .args(&extra)
            .output()
            .unwrap()
    })
}

/// One API request to `vm` (through the VMM's own HTTP client); the
/// JSON body of a 2xx answer.
fn api_call(vm: &Vm, method: &str, path: &str) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
    let (status, body) = vmm::api::http::call(&mut s, method, path, "").unwrap();
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {body}"
    );
    serde_json::from_str(&body).unwrap()
}

fn migration_state(vm: &Vm) -> serde_json::Value {
    api_call(vm, "GET", "/vm/migration")
}

/// Waits until the migration has sent something (it is mid-stream).
fn wait_streaming(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = migration_state(vm);
        if s["progress"]["sent_bytes"].as_u64().unwrap_or(0) > 1 << 20 {
            return;
        }
        assert!(Instant::now() < deadline, "no migration progress: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The source is running and its counter moves on.
fn assert_source_runs(vm: &Vm) {
    let n = counters(&vm.console()).last().copied().unwrap_or(0);
    vm.wait_counter(n + 3);
    let info = vm.api(&["info"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
}

/// Migrates a probe guest rewriting `mib` MiB at `rate` MiB/s, with
/// `extra` flags to `ffmk-vmm migrate`: its counter must continue without
/// a gap or repeat and its memory end exactly as an uninterrupted run's.
/// Returns the outcome line.
fn migrate_dirtying(
    c: &Cluster,
    dir: &Path,
    name: &str,
    (mib, rate): (u32, u32),
    extra: &[&str],
) -> serde_json::Value {
    let max = 80;
    let task = format!("task=dirty mib={mib} rate={rate} hz=20 max={max}");
    // Reference: the same guest without migration.
    let reference = {
        let r = source(&c.hosts[0], dir, &format!("ref-{name}"), &task, "128M");
        let console = r.console.clone();
        let (code, err) = r.wait_exit();
        assert_eq!(code, Some(0), "{err}");
        std::fs::read_to_string(console).unwrap()
    };
    let want = value(&reference, "checksum").expect("reference checksum");

    let dst = destination(&c.hosts[1], dir, &format!("dst-{name}"), "128M");
    let src = source(&c.hosts[0], dir, &format!("src-{name}"), &task, "128M");
    src.wait_counter(15);
    let out = migrate(&src, extra);
    assert!(out.status.success(), "{name}: {out:?}");
    std::fs::write(dir.join(format!("{name}.migrate.err")), &out.stderr).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "completed", "{last}");
    let downtime = last["downtime_ms"].as_f64().unwrap();
    eprintln!(
        "{name}: downtime {downtime:.1} ms, {} rounds, {} MiB sent, total {:.0} ms, post-copy {}",
        last["rounds"],
        last["sent_bytes"].as_u64().unwrap() >> 20,
        last["total_ms"].as_f64().unwrap(),
        last["postcopy"]
    );
    assert!(downtime < 2000.0, "{last}");
    let before = src.console();
    let (code, err) = src.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("migrated to"), "{err}");
    let (code, err) = dst.wait_exit();
    assert_eq!(code, Some(0), "{name}: {err}");
    let after = std::fs::read_to_string(dir.join(format!("dst-{name}.console"))).unwrap();
    assert_consecutive(&(before + &after), max);
    assert!(
        value(&after, "dirty_verify").is_some_and(|v| v.starts_with("ok")),
        "{after}"
    );
    assert_eq!(
        value(&after, "checksum"),
        Some(want),
        "{name}: memory differs"
    );
    last
}

/// What `ffmk-vmm migrate` said on stderr in `migrate_dirtying` `name`.
fn last_stderr(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("{name}.migrate.err"))).unwrap_or_default()
}

#[test]
fn dirtying_guests_migrate_with_their_counter_and_memory_intact() {
    let Some(c) = Cluster::new("mig", 2) else {
        return;
    };
    let dir = tmpdir("migrate");
    for rate in [0, 8, 64] {
        // Verification mode where the guest dirties memory: every page of
        // the destination's copy is compared with the source's at the
        // pause (a page the dirty tracking missed would fail the run).
        // Without dirtying: a 1 ms target no switch-over can meet, which
        // is reported with where the downtime went.
        // One page stream at 8 MiB/s, the default four at 64.
        let extra: &[&str] = match rate {
            0 => &["--max-downtime-ms", "1"],
            8 => &["--verify", "--streams", "1"],
            _ => &["--verify"],
        };
        let last = migrate_dirtying(&c, &dir, &format!("pre{rate}"), (32, rate), extra);
        assert!(last["postcopy"].is_null(), "{last}");
        let s = &last["switch_over"];
        let parts: f64 = [
            "pause_ms",
            "last_pages_ms",
            "state_ms",
            "destination_ms",
            "resume_ms",
        ]
        .iter()
        .map(|k| s[*k].as_f64().unwrap_or_else(|| panic!("{k}: {last}")))
        .sum();
        let downtime = last["downtime_ms"].as_f64().unwrap();
        assert!(
            (parts - downtime).abs() < 1.0,
            "{parts} vs {downtime}: {last}"
        );
        if rate == 0 {
            assert_eq!(last["max_downtime_ms"], 1, "{last}");
            let said = String::from_utf8_lossy(&last_stderr(&dir, "pre0")).into_owned();
            assert!(
                downtime <= 1.0 || said.contains("over the 1 ms target"),
                "{said}"
            );
        }
        if rate > 0 {
            assert_eq!(last["verified_pages"], (128u64 << 20) / 4096, "{last}");
        } else {
            assert!(last["verified_pages"].is_null(), "{last}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn post_copy_moves_a_dirtying_guest_with_its_memory_intact() {
    let Some(c) = Cluster::new("mpc", 2) else {
        return;
    };
    let dir = tmpdir("migrate-postcopy");
    // A target no round meets: post-copy after the first round, with the
    // pages dirtied meanwhile fetched on demand and pushed.
    let postcopy = ["--postcopy", "--max-downtime-ms", "0"];
    for rate in [8, 256] {
        let last = migrate_dirtying(&c, &dir, &format!("post{rate}"), (32, rate), &postcopy);
        let pc = &last["postcopy"];
        assert!(pc["missing_pages"].as_u64().unwrap() > 0, "{last}");
    }
    // Over a 40 Mbit/s link the guest rewrites its 8 MiB several times
    // during the first round: all of it is missing at the switch-over, and
    // the guest runs into missing pages, which it waits for.
    assert!(c.hosts[0]
        .exec("tc")
        .args(["qdisc", "add", "dev", "h0", "root", "tbf", "rate", "40mbit"])
        .args(["burst", "64kb", "latency", "100ms"])
        .status()
        .unwrap()
        .success());
    let last = migrate_dirtying(&c, &dir, "post-slow", (8, 64), &postcopy);
    let pc = &last["postcopy"];
    assert!(pc["missing_pages"].as_u64().unwrap() >= 2048, "{last}");
    assert!(pc["requested_pages"].as_u64().unwrap() > 0, "{last}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_abort_path_leaves_the_source_running() {
    let Some(c) = Cluster::new("mab", 2) else {
        return;
    };
    let dir = tmpdir("migrate-abort");
    // A guest that dirties faster than any round can finish, and a target
    // no round meets: the migration streams until something stops it.
    let endless = [
        "--max-downtime-ms",
        "0",
        "--max-rounds",
        "100000",
        "--no-throttle",
    ];
    let src = source(
        &c.hosts[0],
        &dir,
        "src",
        "task=dirty mib=64 rate=200 hz=20",
        "256M",
    );
    src.wait_counter(5);

    // 1. A destination with other memory refuses before the source pauses.
    let dst = destination(&c.hosts[1], &dir, "small", "128M");
    let out = migrate(&src, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused") && err.contains("memory 256 MiB"),
        "{err}"
    );
    assert_source_runs(&src);
    dst.kill();
    // ... and so does one with another CPU profile.
    let profile = serde_json::from_slice::<serde_json::Value>(
        &ffmk()
            .args(["host-info", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()["profile"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if profile == "host" { "pvm" } else { "host" };
    let dst = destination_with(
        &c.hosts[1],
        &dir,
        "profile",
        "256M",
        &["--cpu-profile", other],
    );
    let out = migrate(&src, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("CPU profile {profile}")), "{err}");
    assert_source_runs(&src);
    dst.kill();

    // 2. Garbage to a listening destination: refused, it listens on, and
    //    then takes part in (3).
    let dst = destination(&c.hosts[1], &dir, "dst", "256M");
    let addr = format!("{}:{PORT}", Cluster::addr(1));
    c.hosts[0].run(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not a migration stream at all");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    });

    // 3. Cancel through the API mid-stream.
    let m = migrate_in_background(&src, &endless);
    wait_streaming(&src);
    assert_eq!(
        api_call(&src, "DELETE", "/vm/migration")["state"],
        "cancelling"
    );
    let out = m.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cancelled"), "{err}");
    assert!(err.contains("the VM runs on here"), "{err}");
    assert_source_runs(&src);

    // 4. The destination dies mid-stream.
    let m = migrate_in_background(&src, &endless);
    wait_streaming(&src);
    dst.kill();
    let out = m.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the VM runs on here"),
        "{err}"
    );
    assert_source_runs(&src);

    // 5. The link goes down mid-stream (the write times out).
    let dst = destination(&c.hosts[1], &dir, "dst2", "256M");
    let m = migrate_in_background(&src, &endless);
    wait_streaming(&src);
    assert!(c.hosts[1].ip(&["link", "set", "h1", "down"]));
    let out = m.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the VM runs on here"),
        "{err}"
    );
    assert_source_runs(&src);
    assert!(c.hosts[1].ip(&["link", "set", "h1", "up"]));

    // 6. The destination whose attempt failed takes the VM next time, into
    //    a VM built afresh: every page verified (a page left over from the
    //    failed attempt's memory would differ), and the guest counts on
    //    there.
    let out = migrate(&src, &["--verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
    .unwrap();
    assert_eq!(last["verified_pages"], (256u64 << 20) / 4096, "{last}");
    let n = counters(&dst.console()).last().copied().unwrap_or(0);
    dst.wait_counter(n + 3);
    dst.kill();
    src.kill();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Starts a post-copy migration of `src` through the API (so that the
/// status read next is this migration's) and waits until the VM runs on
/// the destination while pages follow; if it ends first, fails with both
/// sides' words.
fn start_postcopy(src: &Vm, dst: Vm) -> Vm {
    let body = serde_json::json!({
        "to": format!("tcp://{}:{PORT}", Cluster::addr(1)),
        "postcopy": true,
        "max_downtime_ms": 0,
    });
    let mut s = std::os::unix::net::UnixStream::connect(&src.sock).unwrap();
    let (status, answer) =
        vmm::api::http::call(&mut s, "PUT", "/vm/migrate", &body.to_string()).unwrap();
    assert_eq!(status, 202, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = migration_state(src);
        if s["progress"]["phase"] == "postcopy" {
            return dst;
        }
        if s["state"] != "running" || Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(500));
            let (ended, err) = dst.stop();
            panic!("no post-copy phase: {s}\ndestination ({ended:?}): {err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the migration to end; its final status.
fn migration_end(src: &Vm) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = migration_state(src);
        if s["state"] != "running" {
            return s;
        }
        assert!(Instant::now() < deadline, "the migration does not end: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn post_copy_failures_are_reported_and_never_leave_two_copies() {
    let Some(c) = Cluster::new("mpf", 2) else {
        return;
    };
    let dir = tmpdir("migrate-postcopy-fail");
    // The guest rewrites its 512 MiB faster than the first round sends
    // them: nearly all of it is missing at the switch-over, and the guest
    // faults on page after page there, so post-copy lasts long enough to
    // break it.
    let task = "task=dirty mib=512 rate=4000 hz=20";
    let src = source(&c.hosts[0], &dir, "src", task, "1G");
    src.wait_counter(3);

    // 1. The destination dies in post-copy: the source says so, keeps the
    //    VM paused (never two copies), and resuming it rolls back to the
    //    switch-over.
    let dst = destination(&c.hosts[1], &dir, "dst1", "1G");
    let dst = start_postcopy(&src, dst);
    // It cannot be cancelled any more.
    let mut s = std::os::unix::net::UnixStream::connect(&src.sock).unwrap();
    let (status, body) = vmm::api::http::call(&mut s, "DELETE", "/vm/migration", "").unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("post-copy"), "{body}");
    dst.kill();
    let end = migration_end(&src);
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["vm_running_here"], false, "{end}");
    let err = end["error"].as_str().unwrap();
    assert!(
        err.contains("post-copy failed after the switch-over"),
        "{err}"
    );
    let info: serde_json::Value = serde_json::from_slice(&src.api(&["info"]).stdout).unwrap();
    assert_eq!(info["state"], "paused", "{info}");
    let n = counters(&src.console()).last().copied().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counters(&src.console()).last().copied().unwrap_or(0),
        n,
        "paused"
    );
    assert!(src.api(&["resume"]).status.success());
    src.wait_counter(n + 3);

    // 2. The source dies in post-copy: the destination cannot go on
    //    without the missing pages, says so and exits 1.
    let dst = destination(&c.hosts[1], &dir, "dst2", "1G");
    let dst = start_postcopy(&src, dst);
    src.kill();
    let (code, err) = dst.wait_exit();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("post-copy from") && err.contains("cannot continue"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The cluster plane's trust: a destination takes a VM only from a peer
/// holding the cluster key. A source with another key, a plain TCP peer
/// speaking the old protocol and a key holder that stalls all fail, the
/// destination says why in its log and goes on waiting, and the real
/// migration that starts while the staller holds its connection lands.
#[test]
fn only_holders_of_the_cluster_key_can_send_a_vm() {
    let Some(c) = Cluster::new("mkey", 2) else {
        return;
    };
    let dir = tmpdir("migrate-key");
    let task = "task=dirty mib=8 rate=1 hz=20";
    let dst = destination_with(
        &c.hosts[1],
        &dir,
        "dst",
        "128M",
        &["--incoming-timeout", "3"],
    );
    let addr = format!("{}:{PORT}", Cluster::addr(1));

    // 1. A source holding another cluster's key.
    let other = dir.join("other.key");
    let out = ffmk()
        .args(["key", "generate"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let args = probe_argv_mem(task, "128M", &["--test-exit-port"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = c.hosts[0].exec(common::vmm());
    cmd.env("FFMK_CLUSTER_KEY", &other);
    let rogue = Vm::spawn_cmd(
        cmd,
        &args,
        &dir.join("rogue.console"),
        &dir.join("rogue.sock"),
    );
    rogue.wait_counter(3);
    let out = migrate(&rogue, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refused the handshake"), "{err}");
    assert_source_runs(&rogue);
    rogue.kill();

    // 2. A plain peer speaking the migration protocol without the
    // handshake gets the connection closed and not one byte.
    let heard = c.hosts[0].run({
        let addr = addr.clone();
        move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let mut hello = b"FFMG\x01\x00\x01\x00".to_vec();
            hello.extend_from_slice(&[0u8; 64]);
            let _ = s.write_all(&hello);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        }
    });
    assert!(heard.is_empty(), "the host told a stranger {heard:?}");

    // 3. A key holder that handshakes and then says nothing; meanwhile the
    // real migration starts.
    let key = common::cluster_key().to_path_buf();
    let staller = c.hosts[0].run({
        let addr = addr.clone();
        move || {
            std::thread::spawn(move || {
                let trust = cluster_auth::Trust::Key(cluster_auth::Key::load(&key).unwrap());
                let s = std::net::TcpStream::connect(&addr).unwrap();
                let s = cluster_auth::connect(s, &trust, "migration", None, Duration::from_secs(5))
                    .unwrap();
                std::thread::sleep(Duration::from_secs(6));
                drop(s);
            })
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let src = source(&c.hosts[0], &dir, "src", task, "128M");
    src.wait_counter(3);
    let out = migrate(&src, &["--verify"]);
    assert!(out.status.success(), "{out:?}");
    let _ = staller.join();
    let before = counters(&src.console()).last().copied().unwrap_or(0);
    dst.wait_counter(before + 3);
    let (_, log) = dst.stop();
    assert!(
        log.contains("refused a connection") && log.contains("does not hold the cluster key"),
        "{log}"
    );
    assert!(
        log.contains("did not open the cluster-plane handshake"),
        "{log}"
    );
    assert!(log.contains("did not switch over within 3 s"), "{log}");
}

/// Without a key a destination does not start, a VM cannot migrate (the
/// request says why), and `--insecure` is refused together with a key.
#[test]
fn without_a_cluster_key_nothing_crosses_hosts() {
    if std::path::Path::new("/etc/ffmk/cluster.key").exists() {
        eprintln!("skipped: this host has /etc/ffmk/cluster.key");
        return;
    }
    let out = std::process::Command::new(common::vmm())
        .env_remove("FFMK_CLUSTER_KEY")
        .args([
            "run",
            "--incoming",
            "tcp://127.0.0.1:7399",
            "--memory",
            "64M",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no cluster key") && err.contains("--insecure"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let dir = tmpdir("migrate-nokey");
    let args = probe_argv_mem("task=dirty mib=8 rate=1 hz=20", "64M", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = std::process::Command::new(common::vmm());
    cmd.env_remove("FFMK_CLUSTER_KEY");
    let vm = Vm::spawn_cmd(cmd, &args, &dir.join("vm.console"), &dir.join("vm.sock"));
    vm.wait_counter(2);
    let out = migrate(&vm, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot migrate") && err.contains("no cluster key"),
        "{err}"
    );
    assert_source_runs(&vm);

    let out = ffmk()
        .args(["run", "--incoming", "tcp://127.0.0.1:7399", "--insecure"])
        .arg("--cluster-key")
        .arg(common::cluster_key())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn guest_nodes_move_with_the_vm_and_other_nodes_are_refused() {
    let Some(c) = Cluster::new("mnuma", 2) else {
        return;
    };
    let dir = tmpdir("migrate-numa");
    let nodes = [
        "--cpus",
        "2",
        "--topology",
        "sockets=2,cores=1",
        "--numa",
        "node=0,cpus=0,memory=64M,host-node=0",
        "--numa",
        "node=1,cpus=1,memory=64M,distance=0:30",
    ];
    let mut flags = vec!["--test-exit-port"];
    flags.extend_from_slice(&nodes);
    let args = probe_argv_mem("task=counter", "128M", &flags);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let src = Vm::spawn_in(
        Some(&c.hosts[0]),
        &args,
        &dir.join("src.console"),
        &dir.join("src.sock"),
    );
    src.wait_counter(3);
    // A destination whose guest would see other nodes refuses before the
    // source pauses.
    let dst = destination_with(
        &c.hosts[1],
        &dir,
        "flat",
        "128M",
        &["--cpus", "2", "--numa", "cpus=0-1,memory=128M"],
    );
    let out = migrate(&src, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refused") && err.contains("guest topology"),
        "{err}"
    );
    assert_source_runs(&src);
    dst.kill();
    // The same guest nodes on other host nodes: the VM moves on.
    let mut same = nodes.to_vec();
    same[7] = "node=1,cpus=1,memory=64M,distance=0:30,host-node=0";
    same[5] = "node=0,cpus=0,memory=64M";
    let dst = destination_with(&c.hosts[1], &dir, "dst", "128M", &same);
    let out = migrate(&src, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = counters(&src.console()).last().copied().unwrap_or(0);
    dst.wait_counter(n + 3);
    let info: serde_json::Value = serde_json::from_slice(&dst.api(&["info"]).stdout).unwrap();
    let numa = &info["config"]["numa"]["nodes"];
    assert_eq!(numa[1]["host_node"], 0, "{info}");
    assert!(numa[0]["host_node"].is_null(), "{info}");
    assert_eq!(numa[0]["distances"], serde_json::json!([10, 30]), "{info}");
    dst.kill();
    std::fs::remove_dir_all(dir).unwrap();
}
