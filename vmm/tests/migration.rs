//! Live migration end to end between two "hosts": network namespaces on a
//! bridge, each running its own `ffmk-vmm` (source: the probe guest;
//! destination: `run --incoming`). The guest's counter must continue on the
//! destination without a gap or a repeat and its memory must end exactly
//! as an uninterrupted run's; every abort path must leave the source VM
//! running and intact, and the destination refusing or listening again.
mod common;

use common::{
    assert_consecutive, counters, probe_argv_mem, text_value as value, tmpdir, vmm, Cluster, NetNs,
    Vm,
};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
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
    Command::new(vmm())
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
        Command::new(vmm())
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

#[test]
fn dirtying_guests_migrate_with_their_counter_and_memory_intact() {
    let Some(c) = Cluster::new("mig", 2) else {
        eprintln!("skipped: cannot create network namespaces (needs root and iproute2)");
        return;
    };
    let dir = tmpdir("migrate");
    for rate in [0, 8, 64] {
        let max = 80;
        let task = format!("task=dirty mib=32 rate={rate} hz=20 max={max}");
        // Reference: the same guest without migration.
        let reference = {
            let r = source(&c.hosts[0], &dir, &format!("ref{rate}"), &task, "128M");
            let console = r.console.clone();
            let (code, err) = r.wait_exit();
            assert_eq!(code, Some(0), "{err}");
            std::fs::read_to_string(console).unwrap()
        };
        let want = value(&reference, "checksum").expect("reference checksum");

        let dst = destination(&c.hosts[1], &dir, &format!("dst{rate}"), "128M");
        let src = source(&c.hosts[0], &dir, &format!("src{rate}"), &task, "128M");
        src.wait_counter(15);
        let out = migrate(&src, &[]);
        assert!(out.status.success(), "rate {rate}: {out:?}");
        let last: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
                .unwrap();
        assert_eq!(last["state"], "completed", "{last}");
        let downtime = last["downtime_ms"].as_f64().unwrap();
        eprintln!(
            "rate {rate} MiB/s: downtime {downtime:.1} ms, {} rounds, {} MiB sent, total {:.0} ms",
            last["rounds"],
            last["sent_bytes"].as_u64().unwrap() >> 20,
            last["total_ms"].as_f64().unwrap()
        );
        assert!(downtime < 2000.0, "{last}");
        let before = src.console();
        let (code, err) = src.wait_exit();
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("migrated to"), "{err}");
        let (code, err) = dst.wait_exit();
        assert_eq!(code, Some(0), "rate {rate}: {err}");
        let after = std::fs::read_to_string(dir.join(format!("dst{rate}.console"))).unwrap();
        assert_consecutive(&(before + &after), max);
        assert!(
            value(&after, "dirty_verify").is_some_and(|v| v.starts_with("ok")),
            "{after}"
        );
        assert_eq!(value(&after, "checksum"), Some(want), "memory differs");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_abort_path_leaves_the_source_running() {
    let Some(c) = Cluster::new("mab", 2) else {
        eprintln!("skipped: cannot create network namespaces (needs root and iproute2)");
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
    let mut dst = destination(&c.hosts[1], &dir, "small", "128M");
    let out = migrate(&src, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused") && err.contains("memory 256 MiB"),
        "{err}"
    );
    assert_source_runs(&src);
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    // ... and so does one with another CPU profile.
    let profile = serde_json::from_slice::<serde_json::Value>(
        &Command::new(vmm())
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
    let mut dst = destination_with(
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
    dst.child.kill().unwrap();
    let _ = dst.child.wait();

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
    dst.kill();

    // The destination logs: garbage and the cancel were refused/cleaned up
    // and it kept listening.
    src.kill();
    std::fs::remove_dir_all(dir).unwrap();
}
