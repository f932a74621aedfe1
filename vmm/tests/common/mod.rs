//! Helpers shared by the end-to-end tests (each test binary includes this
//! module; not every binary uses every helper).
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn vmm() -> &'static str {
    env!("CARGO_BIN_EXE_ffmk-vmm")
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
    let mut v: Vec<String> = vec!["run".into(), "--kernel".into()];
    v.push(probe().to_string_lossy().into_owned());
    v.extend(["--cmdline", task, "--memory", "64M"].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The value of the first `key=value` line the guest printed.
pub fn value(out: &Output, key: &str) -> Option<String> {
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix(&format!("{key}="))
            .map(|v| v.trim().to_string())
    })
}

/// `ffmk-vmm CMD --api-socket SOCK` (info, pause, resume, shutdown).
pub fn api(sock: &Path, cmd: &str) -> Output {
    Command::new(vmm())
        .args([cmd, "--api-socket"])
        .arg(sock)
        .output()
        .unwrap()
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
                let _ = self.child.kill();
                panic!("ffmk-vmm did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
