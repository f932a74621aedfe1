//! `ffmk-decouple`, run on this host as if it were a guest whose compute
//! CPU is the last host core (a fake /sys and /proc/cmdline under --root;
//! the affinity calls are real).
use std::path::PathBuf;
use std::process::Command;

fn tool() -> &'static str {
    env!("CARGO_BIN_EXE_ffmk-decouple")
}

/// A guest view with `compute` isolated; None on a one-core host.
fn guest_root(name: &str, compute: u32) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ffmk-decouple-{name}-{}", std::process::id()));
    let cpu = d.join("sys/devices/system/cpu");
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::create_dir_all(d.join("proc")).unwrap();
    std::fs::write(cpu.join("online"), format!("0-{compute}\n")).unwrap();
    std::fs::write(cpu.join("isolated"), format!("{compute}\n")).unwrap();
    std::fs::write(d.join("proc/cmdline"), format!("nohz_full={compute}\n")).unwrap();
    d
}

fn last_core() -> Option<u32> {
    let n = std::thread::available_parallelism().ok()?.get() as u32;
    (n >= 2).then_some(n - 1)
}

fn allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn run_puts_the_program_on_a_compute_cpu() {
    let Some(c) = last_core() else { return };
    let root = guest_root("run", c);
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "cat /proc/self/status; echo cpu=$FFMK_COMPUTE_CPU",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(allowed(&text), c.to_string());
    assert!(text.contains(&format!("cpu={c}")), "{text}");
    // An MPI launcher's local rank picks the CPU (ranks wrap around).
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args(["run", "--", "cat", "/proc/self/status"])
        .env("OMPI_COMM_WORLD_LOCAL_RANK", "3")
        .output()
        .unwrap();
    assert_eq!(
        allowed(&String::from_utf8_lossy(&out.stdout)),
        c.to_string()
    );
}

#[test]
fn pin_moves_every_thread_of_a_running_process() {
    let Some(c) = last_core() else { return };
    let root = guest_root("pin", c);
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args(["pin", &child.id().to_string()])
        .output()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(allowed(&status), c.to_string());
}

#[test]
fn list_and_refusals() {
    let Some(c) = last_core() else { return };
    let root = guest_root("list", c);
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["compute"], c.to_string());
    // Not a compute CPU, no compute CPUs at all: one clear line, exit 1.
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args(["run", "--cpu", "0", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CPU 0 (--cpu) is not a compute CPU"),
        "{out:?}"
    );
    std::fs::write(root.join("sys/devices/system/cpu/isolated"), "\n").unwrap();
    std::fs::write(root.join("proc/cmdline"), "quiet\n").unwrap();
    let out = Command::new(tool())
        .arg("--root")
        .arg(&root)
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this guest has no compute CPUs"),
        "{out:?}"
    );
}
