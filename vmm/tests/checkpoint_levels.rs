//! Multi-level checkpoints end to end: real VMMs and checkpoint endpoints
//! on separate "hosts" (network namespaces joined by a bridge), real TCP
//! between them. A guest is checkpointed, its host loses the VM and its
//! local storage, and `checkpoint restore` brings the guest back from the
//! newest copy that survived: the partner's, one rebuilt from XOR parity,
//! or a slower level's when a faster one is damaged.
mod common;

use common::{assert_consecutive, counters, ffmk, probe, tmpdir, vmm, Cluster, NetNs, Vm};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

/// `ffmk-vmm checkpoint serve` on a host; killed on drop.
struct Endpoint {
    child: Child,
    addr: String,
}

impl Endpoint {
    fn start(ns: Option<&NetNs>, listen: &str, store: &Path) -> Endpoint {
        let mut cmd = match ns {
            Some(ns) => ns.exec(vmm()),
            None => ffmk(),
        };
        let mut child = cmd
            .args(["checkpoint", "serve", "--listen", listen, "--dir"])
            .arg(store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // It says where it listens once the socket is bound.
        let mut line = String::new();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        err.read_line(&mut line).unwrap();
        // Keep reading what it reports so its stderr never closes.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let addr = line
            .split("endpoint on ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or_else(|| panic!("endpoint did not start: {line}"))
            .to_string();
        Endpoint { child, addr }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ffmk-vmm checkpoint ARGS`, in `ns` when given.
fn checkpoint(ns: Option<&NetNs>, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => ns.exec(vmm()),
        None => ffmk(),
    };
    cmd.arg("checkpoint").args(args).output().unwrap()
}

/// `checkpoint take`; returns the final JSON event (the outcome).
fn take(ns: Option<&NetNs>, config: &Path, vm: &Vm, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec![
        "take",
        "--config",
        config.to_str().unwrap(),
        "--api-socket",
        vm.sock.to_str().unwrap(),
        "--json",
    ];
    args.extend(extra);
    let out = checkpoint(ns, &args);
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, last["checkpoint"].clone())
}

fn level<'a>(outcome: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    outcome["levels"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["level"] == name))
        .unwrap_or_else(|| panic!("no level {name} in {outcome}"))
}

fn boot(ns: Option<&NetNs>, dir: &Path, name: &str, max: u64) -> Vm {
    let task = format!("task=counter hz=50 max={max}");
    let p = probe();
    Vm::spawn_in(
        ns,
        &[
            "run",
            "--kernel",
            p.to_str().unwrap(),
            "--cmdline",
            &task,
            "--memory",
            "64M",
            "--test-exit-port",
        ],
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

/// Pauses the VM and returns its console so far (the checkpoint's point).
fn pause(vm: &Vm) -> String {
    assert!(vm.api(&["pause"]).status.success());
    std::thread::sleep(std::time::Duration::from_millis(50));
    vm.console()
}

fn restore(ns: Option<&NetNs>, dir: &Path, name: &str, config: &Path) -> Vm {
    Vm::spawn_in(
        ns,
        &[
            "checkpoint",
            "restore",
            "--config",
            config.to_str().unwrap(),
        ],
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

fn write_config(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

#[test]
fn partner_copy_over_tcp_restores_a_host_that_lost_its_local_copy() {
    let Some(c) = Cluster::new("ckp", 2) else {
        return;
    };
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let dir = tmpdir("ck-partner");
    let ep = Endpoint::start(
        Some(b),
        &format!("{}:7070", Cluster::addr(1)),
        &dir.join("b-store"),
    );
    let cfg = write_config(
        &dir.join("a.toml"),
        &format!(
            "job = \"rank0\"\nmtti_s = 3600\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n\
             [[level]]\nkind = \"partner\"\npeer = \"{}\"\n",
            dir.join("a-local").display(),
            ep.addr
        ),
    );
    let vm = boot(Some(a), &dir, "a", 150);
    vm.wait_counter(10);
    // A live checkpoint of the running guest: a new chain, sent whole.
    let (out, first) = take(Some(a), &cfg, &vm, &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(first["local"]["kind"], "full", "{first}");
    assert_eq!(level(&first, "partner")["ok"], true, "{first}");
    vm.wait_counter(30);
    // The next one extends the chain; only the new layer crosses the wire.
    let before = pause(&vm);
    let (out, second) = take(Some(a), &cfg, &vm, &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(second["local"]["kind"], "incremental", "{second}");
    let sent = |o: &serde_json::Value| level(o, "partner")["bytes"].as_u64().unwrap();
    assert!(
        sent(&second) * 2 < sent(&first),
        "incremental copy sent {} bytes, the full one {}",
        sent(&second),
        sent(&first)
    );
    // Host A loses the VM and its node-local storage.
    vm.kill();
    std::fs::remove_dir_all(dir.join("a-local")).unwrap();
    let r = restore(Some(a), &dir, "a2", &cfg);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("using level partner: ") && err.contains("generation 2"),
        "{err}"
    );
    assert_consecutive(
        &(before + &std::fs::read_to_string(dir.join("a2.console")).unwrap()),
        150,
    );
    drop(ep);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn xor_group_of_three_rebuilds_the_member_whose_host_was_lost() {
    let Some(c) = Cluster::new("ckx", 3) else {
        return;
    };
    let dir = tmpdir("ck-xor");
    let members: Vec<String> = (0..3)
        .map(|i| format!("{}:7070", Cluster::addr(i)))
        .collect();
    let mut eps: Vec<Option<Endpoint>> = (0..3)
        .map(|i| {
            Some(Endpoint::start(
                Some(&c.hosts[i]),
                &members[i],
                &dir.join(format!("store{i}")),
            ))
        })
        .collect();
    let cfgs: Vec<PathBuf> = (0..3)
        .map(|i| {
            write_config(
                &dir.join(format!("m{i}.toml")),
                &format!(
                    "job = \"rank{i}\"\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n\
                     [[level]]\nkind = \"xor\"\ngroup = \"job7\"\nmembers = {:?}\nindex = {i}\n",
                    dir.join(format!("local{i}")).display(),
                    members
                ),
            )
        })
        .collect();
    // Different guests: each member's archive differs in content and length.
    let vms: Vec<Vm> = (0..3)
        .map(|i| {
            boot(
                Some(&c.hosts[i]),
                &dir,
                &format!("v{i}"),
                120 + 10 * i as u64,
            )
        })
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        vm.wait_counter(10 + 5 * i as u64);
    }
    // All paused first: a busy machine must not let a guest run to its end
    // while another member's checkpoint is being taken.
    let before: Vec<String> = vms.iter().map(pause).collect();
    for (i, vm) in vms.iter().enumerate() {
        let (out, o) = take(Some(&c.hosts[i]), &cfgs[i], vm, &["--epoch", "1"]);
        assert!(out.status.success(), "member {i}: {out:?}");
        assert_eq!(level(&o, "xor")["ok"], true, "{o}");
    }
    // The job is lost; host 1 is lost with all it stored. A replacement
    // host comes up with the same address and empty storage.
    for vm in vms {
        vm.kill();
    }
    eps[1] = None;
    std::fs::remove_dir_all(dir.join("store1")).unwrap();
    std::fs::remove_dir_all(dir.join("local1")).unwrap();
    eps[1] = Some(Endpoint::start(
        Some(&c.hosts[1]),
        &members[1],
        &dir.join("store1"),
    ));
    let list = checkpoint(
        Some(&c.hosts[1]),
        &["list", "--config", cfgs[1].to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("epoch 1, needs rebuild"), "{text}");
    for i in 0..3 {
        let r = restore(Some(&c.hosts[i]), &dir, &format!("r{i}"), &cfgs[i]);
        let (code, err) = r.wait_exit();
        assert_eq!(code, Some(0), "member {i}: {err}");
        if i == 1 {
            assert!(
                err.contains("using level xor") && err.contains("rebuilt from XOR parity"),
                "{err}"
            );
        } else {
            assert!(err.contains("using level local"), "{err}");
        }
        assert_consecutive(
            &(before[i].clone()
                + &std::fs::read_to_string(dir.join(format!("r{i}.console"))).unwrap()),
            120 + 10 * i as u64,
        );
    }
    drop(eps);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Flips one byte of a copy's state file: its checksum no longer matches.
fn damage(copy: &Path) {
    let state = std::fs::read_dir(copy)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("state-"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[5] ^= 0x20;
    std::fs::write(&state, bytes).unwrap();
}

#[test]
fn restore_takes_the_newest_copy_that_is_valid_at_any_level() {
    let dir = tmpdir("ck-newest");
    let cfg = write_config(
        &dir.join("c.toml"),
        &format!(
            "job = \"solo\"\nlive = false\n[[level]]\nkind = \"local\"\ndir = \"{}\"\nkeep = 3\n\
             [[level]]\nkind = \"pfs\"\ndir = \"{}\"\nkeep = 3\n",
            dir.join("local").display(),
            dir.join("pfs").display()
        ),
    );
    let vm = boot(None, &dir, "a", 200);
    vm.wait_counter(10);
    let older = pause(&vm);
    let (out, c1) = take(None, &cfg, &vm, &["--full"]);
    assert!(out.status.success(), "{out:?}");
    assert!(vm.api(&["resume"]).status.success());
    vm.wait_counter(30);
    let newer = pause(&vm);
    let (out, c2) = take(None, &cfg, &vm, &["--full"]);
    assert!(out.status.success(), "{out:?}");
    vm.kill();
    let (n1, n2) = (c1["name"].as_str().unwrap(), c2["name"].as_str().unwrap());
    assert_ne!(n1, n2);
    // The newest local copy is damaged: the same checkpoint at the slower
    // level is used (and placed back in the local level).
    damage(&dir.join("local/solo").join(n2));
    let dry = checkpoint(
        None,
        &["restore", "--config", cfg.to_str().unwrap(), "--dry-run"],
    );
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{err}");
    assert!(
        err.contains(&format!("skipped local {n2} generation 1")),
        "{err}"
    );
    assert!(err.contains(&format!("using level pfs: {n2}")), "{err}");
    // Damaged at both levels: the older checkpoint is the newest valid one.
    damage(&dir.join("local/solo").join(n2));
    damage(&dir.join("pfs/solo").join(n2));
    let r = restore(None, &dir, "b", &cfg);
    let (code, err) = r.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&format!("using level local: {n1}")), "{err}");
    let after = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert_consecutive(&(older.clone() + &after), 200);
    assert!(counters(&newer).len() > counters(&older).len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unreachable_levels_and_garbage_fail_clearly_and_harm_nothing() {
    let dir = tmpdir("ck-bad");
    let ep = Endpoint::start(None, "127.0.0.1:0", &dir.join("store"));
    // Garbage and a peer without the handshake: not a word back, the
    // endpoint serves on.
    for junk in [b"GET / HTTP/1.0\r\n\r\n".to_vec(), {
        let msg =
            br#"{"protocol":"ffmk-checkpoint","version":99,"request":{"op":"list","job":"x"}}"#;
        let mut f = b"FFCK\x01".to_vec();
        f.extend((msg.len() as u32).to_le_bytes());
        f.extend(msg);
        f
    }] {
        let mut s = std::net::TcpStream::connect(&ep.addr).unwrap();
        s.write_all(&junk).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.is_empty(), "told a stranger {answer:?}");
    }
    // A dead partner: the local copy is written, the level fails with one
    // line, the exit status says so, the VM runs on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let cfg = write_config(
        &dir.join("c.toml"),
        &format!(
            "job = \"j\"\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n[[level]]\nkind = \"partner\"\npeer = \"{dead_addr}\"\n\
             [[level]]\nkind = \"partner\"\nname = \"alive\"\npeer = \"{}\"\n",
            dir.join("local").display(),
            ep.addr
        ),
    );
    let vm = boot(None, &dir, "a", 100000);
    vm.wait_counter(5);
    let (out, o) = take(None, &cfg, &vm, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("only partly placed")
            && err.contains(&format!("partner failed ({dead_addr}: cannot connect")),
        "{err}"
    );
    assert_eq!(level(&o, "alive")["ok"], true, "{o}");
    let list = checkpoint(None, &["list", "--config", cfg.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("local ") && text.contains("alive "), "{text}");
    assert!(text.contains("note: partner: "), "{text}");
    let n = counters(&vm.console()).len();
    vm.wait_counter(n as u64 + 5);
    // Bad configurations and unknown levels: one line, exit 2.
    for (text, want) in [
        ("job = \"j\"\n", "at least a local"),
        ("job = \"j\"\n[[level]]\nkind = \"local\"\n", "needs dir"),
    ] {
        let bad = write_config(&dir.join("bad.toml"), text);
        let (out, _) = take(None, &bad, &vm, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want) && err.lines().count() == 1, "{err}");
    }
    let (out, _) = take(None, &cfg, &vm, &["--levels", "tape"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no level named 'tape'"));
    vm.kill();
    drop(ep);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn run_checkpoints_at_the_local_interval_and_fills_slower_levels_at_theirs() {
    let dir = tmpdir("ck-run");
    let cfg = write_config(
        &dir.join("c.toml"),
        &format!(
            "job = \"periodic\"\nmtti_s = 3600\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n\
             [[level]]\nkind = \"pfs\"\ndir = \"{}\"\n",
            dir.join("local").display(),
            dir.join("pfs").display()
        ),
    );
    let vm = boot(None, &dir, "a", 100000);
    vm.wait_counter(5);
    let run = |sock: &Path, extra: &[&str]| {
        let mut args = vec!["run", "--config", cfg.to_str().unwrap(), "--api-socket"];
        args.push(sock.to_str().unwrap());
        args.extend(["--every", "0.2"]);
        args.extend(extra);
        checkpoint(None, &args)
    };
    let out = run(&vm.sock, &["--count", "3", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let done = |level: &str| {
        events
            .iter()
            .filter(|e| e["event"] == "level_done" && e["level"] == level)
            .count()
    };
    // Three local checkpoints (one chain, extended); the pfs level's Daly
    // interval for a cost of milliseconds and a 1 h MTTI is far longer than
    // the run, so it was filled once, at the start.
    assert_eq!(done("local"), 3, "{events:?}");
    assert_eq!(done("pfs"), 1, "{events:?}");
    let plan = checkpoint(None, &["plan", "--config", cfg.to_str().unwrap(), "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["cost_from"], "measured", "{rows}");
        let (y, d) = (
            row["young_s"].as_f64().unwrap(),
            row["daly_s"].as_f64().unwrap(),
        );
        assert!(d > 0.0 && d <= y, "{rows}");
    }
    // A VM that is gone ends the run cleanly.
    vm.kill();
    let out = run(&dir.join("a.sock"), &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 checkpoint(s)"),
        "{out:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A raw client holding `key`: opens the checkpoint channel for `job` and
/// sends one request; the endpoint's answer.
fn raw_request(addr: &str, key: &Path, job: &str, request: serde_json::Value) -> String {
    let trust = cluster_auth::Trust::Key(cluster_auth::Key::load(key).unwrap());
    let s = std::net::TcpStream::connect(addr).unwrap();
    let mut s = match cluster_auth::connect(
        s,
        &trust,
        "checkpoint",
        Some(job),
        std::time::Duration::from_secs(5),
    ) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let msg = serde_json::json!({"protocol": "ffmk-checkpoint", "version": 2, "request": request})
        .to_string();
    let mut f = b"FFCK\x01".to_vec();
    f.extend((msg.len() as u32).to_le_bytes());
    f.extend(msg.as_bytes());
    s.write_all(&f).unwrap();
    s.flush().unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The endpoint serves a job's copies only to that job's key: another
/// job's key, another cluster's key and a request about another job on a
/// job's connection are refused; a copy dated in the future is refused; a
/// flood of idle connections is capped and cannot hold the endpoint past
/// the request deadline.
#[test]
fn the_endpoint_serves_each_job_only_to_its_key() {
    let dir = tmpdir("ck-trust");
    let store = dir.join("store");
    let mut cmd = ffmk();
    let mut child = cmd
        .args(["checkpoint", "serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&store)
        .args(["--max-connections", "4", "--request-timeout", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            log2.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    let ep = Endpoint {
        child,
        addr: line
            .split("endpoint on ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap()
            .to_string(),
    };
    let job_key = |job: &str| {
        let p = dir.join(format!("{job}.key"));
        let out = ffmk()
            .args(["key", "job", job, "--out"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        p
    };
    let (ka, kb) = (job_key("jobA"), job_key("jobB"));
    let cfg = |job: &str| {
        write_config(
            &dir.join(format!("{job}.toml")),
            &format!(
                "job = \"{job}\"\n[[level]]\nkind = \"local\"\ndir = \"{}\"\n\
                 [[level]]\nkind = \"partner\"\npeer = \"{}\"\n",
                dir.join(format!("{job}-local")).display(),
                ep.addr
            ),
        )
    };
    let (ca, cb) = (cfg("jobA"), cfg("jobB"));
    let run = |key: &Path, args: &[&str]| {
        let mut c = std::process::Command::new(vmm());
        c.env("FFMK_CLUSTER_KEY", key).arg("checkpoint").args(args);
        c.output().unwrap()
    };
    // Job A stores a copy with its own job key.
    let vm = boot(None, &dir, "a", 100000);
    vm.wait_counter(5);
    let out = run(
        &ka,
        &[
            "take",
            "--config",
            ca.to_str().unwrap(),
            "--api-socket",
            vm.sock.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let listed = |key: &Path, cfg: &Path| {
        let out = run(key, &["list", "--config", cfg.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(
        listed(&ka, &ca).contains("partner "),
        "{}",
        listed(&ka, &ca)
    );
    // Job B's key does not open job A's copies, not even by naming job A.
    let text = listed(&kb, &ca);
    assert!(!text.contains("partner "), "{text}");
    assert!(
        text.contains("job \"jobB\"'s key, not job \"jobA\"'s"),
        "{text}"
    );
    let answer = raw_request(
        &ep.addr,
        &kb,
        "jobB",
        serde_json::json!({"op": "list", "job": "jobA"}),
    );
    assert!(
        answer.contains("on a connection opened with") && answer.contains("jobB"),
        "{answer}"
    );
    // Job B sees its own (empty) set.
    assert!(!listed(&kb, &cb).contains("partner "));
    // Another cluster's key: refused at the handshake.
    let other = dir.join("other.key");
    assert!(ffmk()
        .args(["key", "generate"])
        .arg(&other)
        .status()
        .unwrap()
        .success());
    let text = listed(&other, &ca);
    assert!(text.contains("refused the handshake"), "{text}");
    // A copy dated in the year 2100 is refused.
    let copy = std::fs::read_dir(dir.join("jobA-local").join("jobA"))
        .unwrap()
        .flatten()
        .find(|e| e.path().join("manifest.json").exists())
        .expect("a local copy")
        .path();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("manifest.json")).unwrap()).unwrap();
    let future = 4_102_444_800_000u64;
    manifest["created_unix_ms"] = future.into();
    for l in manifest["layers"].as_array_mut().unwrap() {
        l["created_unix_ms"] = future.into();
    }
    let answer = raw_request(
        &ep.addr,
        &ka,
        "jobA",
        serde_json::json!({"op": "offer", "job": "jobA", "name": "zzz", "manifest": manifest}),
    );
    assert!(answer.contains("in the future"), "{answer}");
    // Planted in a level's directory instead (a shared burst buffer): a
    // restore does not choose it, and says why.
    let planted = copy.with_file_name("ckpt-9999999999999");
    std::fs::create_dir_all(&planted).unwrap();
    for f in std::fs::read_dir(&copy).unwrap().flatten() {
        std::fs::copy(f.path(), planted.join(f.file_name())).unwrap();
    }
    std::fs::write(
        planted.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let out = run(
        &ka,
        &["restore", "--config", ca.to_str().unwrap(), "--dry-run"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("ignored: dated") && !err.contains("using level local: ckpt-9999999999999"),
        "{err}"
    );
    // Idle connections: four are held, the fifth is closed at once, and
    // after the deadline the endpoint serves again. (First, the refusals
    // above end: a refused connection lingers half a second so that its
    // peer reads the reason.)
    std::thread::sleep(std::time::Duration::from_secs(1));
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&ep.addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut fifth = std::net::TcpStream::connect(&ep.addr).unwrap();
    fifth
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = fifth.read(&mut b);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the fifth connection stays open: {r:?}; {}",
        log.lock().unwrap()
    );
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(listed(&ka, &ca).contains("partner "));
    drop(idle);
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("refused, 4 connections already served"),
        "{log}"
    );
    assert!(log.contains("does not hold job \"jobA\"'s key"), "{log}");
    vm.kill();
    drop(ep);
    std::fs::remove_dir_all(dir).unwrap();
}
