//! Helpers shared by the end-to-end tests (each test binary includes this
//! module; not every binary uses every helper).
#![allow(dead_code)]
pub mod linux;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The ffmk-vmm binary: Cargo's path in vmm's own tests; from other
/// crates' tests (which include this module) the binary next to the test
/// executable's directory (target/PROFILE/), built by `cargo test --workspace`.
pub fn vmm() -> &'static str {
    if let Some(p) = option_env!("CARGO_BIN_EXE_ffmk-vmm") {
        return p;
    }
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let p = exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("ffmk-vmm"))
            .expect("target directory");
        assert!(
            p.exists(),
            "{} is missing: build it (cargo build -p vmm) or run cargo test --workspace",
            p.display()
        );
        p.to_string_lossy().into_owned()
    })
}

/// The cluster key every ffmk-vmm these tests start authenticates with
/// (one fresh key per test process, made by `ffmk-vmm key generate`).
pub fn cluster_key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ffmk-test-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("key directory");
        let path = dir.join("cluster.key");
        let out = Command::new(vmm())
            .args(["key", "generate"])
            .arg(&path)
            .output()
            .expect("ffmk-vmm key generate");
        assert!(
            out.status.success(),
            "ffmk-vmm key generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
}

/// `ffmk-vmm` with this test process's cluster key in its environment.
pub fn ffmk() -> Command {
    let mut c = Command::new(vmm());
    c.env("FFMK_CLUSTER_KEY", cluster_key());
    c
}

/// A built guest image under guest-images/out/, or a panic naming the
/// command that builds it.
pub fn image(name: &str, build: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-images/out")
        .join(name);
    assert!(p.exists(), "{} is missing: run {build}", p.display());
    p
}

/// The probe guest image.
pub fn probe() -> PathBuf {
    image("probe.elf", "guest-images/build probe")
}

/// `run --kernel probe.elf --cmdline TASK --memory 64M EXTRA...`.
pub fn probe_argv(task: &str, extra: &[&str]) -> Vec<String> {
    probe_argv_mem(task, "64M", extra)
}

/// `run --kernel probe.elf --cmdline TASK --memory MEMORY EXTRA...`.
#[allow(dead_code)] // not every test binary uses every helper
pub fn probe_argv_mem(task: &str, memory: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into(), "--kernel".into()];
    v.push(probe().to_string_lossy().into_owned());
    v.extend(["--cmdline", task, "--memory", memory].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The value of the first `key=value` line the guest printed.
pub fn value(out: &Output, key: &str) -> Option<String> {
    text_value(&String::from_utf8_lossy(&out.stdout), key)
}

/// Polls `f` every 100 ms until it gives a value; fails the test naming
/// `what` after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `cmd` in the background with no stdin or stdout and its stderr
/// in the file `stderr` (a daemon a test reads through its logs).
pub fn spawn_daemon(cmd: &mut Command, stderr: &Path) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(stderr).unwrap()))
        .spawn()
        .unwrap()
}

/// The value of the first `key=value` line in `text` (a console).
pub fn text_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(&format!("{key}="))
            .map(|v| v.trim().to_string())
    })
}

/// `ffmk-vmm CMD --json --api-socket SOCK` (info, pause, resume,
/// shutdown): the API's answer as JSON on stdout.
pub fn api(sock: &Path, cmd: &str) -> Output {
    ffmk()
        .args([cmd, "--json", "--api-socket"])
        .arg(sock)
        .output()
        .unwrap()
}

/// A sparse 1 MiB raw disk image `dir/disk.img`, and its `--disk` spec.
#[allow(dead_code)] // not every test binary uses every helper
pub fn disk_image(dir: &Path) -> (PathBuf, String) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let spec = format!("path={}", image.display());
    (image, spec)
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ffmk-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running VM whose console lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        Self::start_with(vmm(), args)
    }

    pub fn start_owned(args: &[String]) -> Running {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start(&args)
    }

    /// Starts `program` (e.g. `ip netns exec NS ffmk-vmm ...`).
    pub fn start_with(program: &str, args: &[&str]) -> Running {
        let mut child = Command::new(program)
            .env("FFMK_CLUSTER_KEY", cluster_key())
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

    /// The next console line for which `want` holds, within `within`.
    pub fn next_line(&self, within: Duration, want: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if want(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Every console line not consumed yet (call after the VM exited).
    pub fn drain(&self) -> Vec<String> {
        let mut v = vec![];
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            v.push(l);
        }
        v
    }

    pub fn next_counter(&self, within: Duration) -> Option<u64> {
        self.next_line(within, |l| l.starts_with("counter="))
            .and_then(|l| l["counter=".len()..].trim().parse().ok())
    }

    pub fn wait(&mut self, within: Duration) -> (Option<i32>, String) {
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
                let threads = threads_report(self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
                // What the guest got to, and what the VMM said, for the
                // hang's diagnosis.
                let console = self.drain();
                let tail = &console[console.len().saturating_sub(40)..];
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "ffmk-vmm did not exit in {within:?}; its stderr:\n{err}\nthe console's last lines:\n{}\n{threads}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(tag: &str) -> Option<NetNs> {
        let name = format!("ffmk-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(NetNs(name))
    }

    /// `ip netns exec NS PROGRAM` (add the arguments).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c.env("FFMK_CLUSTER_KEY", cluster_key());
        c
    }

    pub fn ip(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "ip"])
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Runs `f` on a thread that entered the namespace (sockets it opens
    /// live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on a namespace fd we opened; it only changes this
            // thread's network namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A VMM whose console goes to a file.
pub struct Vm {
    pub child: Child,
    pub console: PathBuf,
    pub sock: PathBuf,
}

impl Vm {
    pub fn spawn(args: &[&str], console: &Path, sock: &Path) -> Vm {
        Vm::spawn_in(None, args, console, sock)
    }

    /// Like `spawn`, inside network namespace `ns` when given.
    pub fn spawn_in(ns: Option<&NetNs>, args: &[&str], console: &Path, sock: &Path) -> Vm {
        let cmd = match ns {
            Some(ns) => ns.exec(vmm()),
            None => ffmk(),
        };
        Vm::spawn_cmd(cmd, args, console, sock)
    }

    /// Like `spawn`, from a prepared command (e.g. with its own environment).
    pub fn spawn_cmd(mut cmd: Command, args: &[&str], console: &Path, sock: &Path) -> Vm {
        let child = cmd
            .args(args)
            .arg("--console")
            .arg(format!("file={}", console.display()))
            .arg("--api-socket")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vm {
            child,
            console: console.into(),
            sock: sock.into(),
        }
    }

    pub fn boot(dir: &Path, name: &str, task: &str) -> Vm {
        Vm::boot_with(dir, name, task, &[])
    }

    /// Like `boot`, with more flags for `run`.
    pub fn boot_with(dir: &Path, name: &str, task: &str, extra: &[&str]) -> Vm {
        let p = probe();
        let mut args = vec![
            "run",
            "--kernel",
            p.to_str().unwrap(),
            "--cmdline",
            task,
            "--memory",
            "128M",
            "--test-exit-port",
        ];
        args.extend_from_slice(extra);
        Vm::spawn(
            &args,
            &dir.join(format!("{name}.console")),
            &dir.join(format!("{name}.sock")),
        )
    }

    pub fn restore(dir: &Path, name: &str, from: &Path, extra: &[&str]) -> Vm {
        let mut args = vec!["restore", "--from", from.to_str().unwrap()];
        args.extend(extra);
        Vm::spawn(
            &args,
            &dir.join(format!("{name}.console")),
            &dir.join(format!("{name}.sock")),
        )
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    #[allow(dead_code)] // not every test binary uses every helper
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the guest printed `counter=N` with N >= `n`.
    pub fn wait_counter(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if counters(&self.console()).last().is_some_and(|&c| c >= n) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("counter {n} not reached: {}", self.console());
    }

    /// For failure messages: whether the VMM still runs, and the end of
    /// the guest's console.
    #[allow(dead_code)] // not every test binary uses every helper
    pub fn describe(&self) -> String {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The state is the field after the command name (in parentheses).
        let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
        let console = self.console();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "VMM pid {} {}; the console's last lines:\n{}",
            self.child.id(),
            match state {
                "Z" | "?" => "has EXITED",
                _ => "is running",
            },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// `ffmk-vmm ARGS --json --api-socket SOCK`.
    pub fn api(&self, args: &[&str]) -> Output {
        ffmk()
            .args(args)
            .arg("--json")
            .arg("--api-socket")
            .arg(&self.sock)
            .output()
            .unwrap()
    }

    pub fn snapshot(&self, dest: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["snapshot", "--dest", dest.to_str().unwrap()];
        args.extend(extra);
        let out = self.api(&args);
        assert!(out.status.success(), "{out:?}");
        // The answer is the last line (progress lines may come first).
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap()
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the VMM wrote to stderr (once it has ended).
    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Kills the VMM if it still runs; how it had ended (None: it was
    /// running) and its stderr.
    pub fn stop(mut self) -> (Option<std::process::ExitStatus>, String) {
        let ended = self.child.try_wait().unwrap();
        let _ = self.child.kill();
        let _ = self.child.wait();
        (ended, self.stderr())
    }

    pub fn wait_exit(self) -> (Option<i32>, String) {
        self.wait_exit_within(Duration::from_secs(60))
    }

    /// Like `wait_exit`, waiting up to `within`.
    pub fn wait_exit_within(mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.code(), self.stderr());
            }
            if Instant::now() >= deadline {
                let report = self.hang_report();
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "VM did not exit in {} s: {}\n{report}\nthe VMM's stderr:\n{}",
                    within.as_secs(),
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// For a VMM that hangs: what its API says, and where each of its
    /// threads waits (state, kernel wait channel and, as root, the
    /// kernel stack).
    pub fn hang_report(&self) -> String {
        let info = ffmk()
            .args(["info", "--json", "--timeout", "5", "--api-socket"])
            .arg(&self.sock)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| e.to_string());
        format!("info: {}\n{}", info.trim(), threads_report(self.child.id()))
    }
}

impl Drop for Vm {
    /// A test that fails half-way must not leave its VMs running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The values of complete `counter=N` lines.
pub fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("counter="))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The console of a VM and of its restored continuation, joined: a line
/// cut by the snapshot is completed by the restored guest.
pub fn assert_consecutive(joined: &str, last: u64) {
    let c = counters(joined);
    let want: Vec<u64> = (1..=last).collect();
    assert_eq!(c, want, "counter with a gap or a repeat:\n{joined}");
}

/// Hosts on one machine: a network namespace per host, joined by veth pairs
/// to a bridge in a "switch" namespace; host i has 10.77.0.(i+1)/24. In a
/// [`Cluster::bridged`] one, each host's link is a port of the host's own
/// bridge `br0`, which holds the host's address and takes its VMs' TAPs
/// (`--net tap=NAME,bridge=br0`): hosts and VMs share one Ethernet segment,
/// the shape of a cluster's network. All of it disappears when dropped.
pub struct Cluster {
    pub hosts: Vec<NetNs>,
    _switch: NetNs,
}

impl Cluster {
    /// `None` where namespaces cannot be made (not root, no iproute2); the
    /// calling test then reports itself skipped and returns.
    pub fn new(tag: &str, n: usize) -> Option<Cluster> {
        Cluster::report(Cluster::build(tag, n, false))
    }

    /// Hosts whose VMs join their bridge `br0` (see [`Cluster`]).
    pub fn bridged(tag: &str, n: usize) -> Option<Cluster> {
        Cluster::report(Cluster::build(tag, n, true))
    }

    fn report(c: Option<Cluster>) -> Option<Cluster> {
        if c.is_none() {
            eprintln!("skipped: cannot create network namespaces (needs root and iproute2)");
        }
        c
    }

    fn build(tag: &str, n: usize, bridged: bool) -> Option<Cluster> {
        let switch = NetNs::new(&format!("{tag}sw"))?;
        let mut hosts = Vec::new();
        let ok = switch.ip(&["link", "add", "br0", "type", "bridge"])
            && switch.ip(&["link", "set", "br0", "up"]);
        if !ok {
            return None;
        }
        for i in 0..n {
            let h = NetNs::new(&format!("{tag}{i}"))?;
            let (p, v) = (format!("p{i}"), format!("h{i}"));
            let ok = switch.ip(&[
                "link", "add", &p, "type", "veth", "peer", "name", &v, "netns", &h.0,
            ]) && switch.ip(&["link", "set", &p, "master", "br0"])
                && switch.ip(&["link", "set", &p, "up"]);
            let addressed = if bridged {
                h.ip(&["link", "add", "br0", "type", "bridge"])
                    && h.ip(&["link", "set", &v, "master", "br0"])
                    && h.ip(&["link", "set", "br0", "up"])
                    && h.ip(&["link", "set", "br0", "address", &Cluster::mac(i)])
                    && h.ip(&[
                        "addr",
                        "add",
                        &format!("{}/24", Cluster::addr(i)),
                        "dev",
                        "br0",
                    ])
            } else {
                h.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", Cluster::addr(i)),
                    "dev",
                    &v,
                ])
            };
            let ok = ok
                && addressed
                && h.ip(&["link", "set", &v, "up"])
                && h.ip(&["link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
            hosts.push(h);
        }
        Some(Cluster {
            hosts,
            _switch: switch,
        })
    }

    pub fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Host i's bridge's MAC: fixed, so that it does not change as ports
    /// (the VMs' TAPs) come and go.
    fn mac(i: usize) -> String {
        format!("52:54:00:77:ff:{:02x}", i + 1)
    }
}

/// Where each thread of process `pid` waits: state, kernel wait channel,
/// system call and (as root) kernel stack - for the failure message of a
/// VMM that hangs.
pub fn threads_report(pid: u32) -> String {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let mut ids: Vec<_> = std::fs::read_dir(&tasks)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ids.sort();
    let mut out = format!("the VMM's threads (pid {pid}):");
    for id in ids {
        let dir = tasks.join(&id);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
        out.push_str(&format!(
            "\nthread {} {} state {state} wchan {} syscall {}\n{}",
            id.to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("syscall").trim(),
            read("stack").trim_end()
        ));
    }
    out
}

/// Frames of ethertype `proto` that arrive on interface `ifname` of the
/// calling thread's network namespace, with when they came, until
/// `window` has passed since `ready` was signalled.
pub fn capture(
    ifname: &str,
    proto: u16,
    window: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> Vec<(Instant, Vec<u8>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: if_nametoindex reads the NUL-terminated name we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: a plain socket call; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto.to_be())) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: bind reads the sockaddr_ll we pass with its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt reads one timeval from a live local.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    ready.send(()).unwrap();
    let end = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            got.push((Instant::now(), buf[..n as usize].to_vec()));
        }
    }
    got
}

/// The first virtio-net function in `GET /vm`'s answer (`ffmk-vmm info`):
/// its device line and counters (Null when there is none).
pub fn virtio_net_info(info: &serde_json::Value) -> serde_json::Value {
    info["pci"]
        .as_array()
        .and_then(|p| {
            p.iter().find(|f| {
                f["device"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("virtio-net"))
            })
        })
        .cloned()
        .unwrap_or_default()
}
