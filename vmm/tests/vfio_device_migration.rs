//! A passthrough device that moves with the VM (VFIO migration v2), end to
//! end: a Linux guest (Debian's kernel) drives the kernel's `mtty` sample
//! device - a mediated 16550-style serial port whose transmit register
//! loops back into its receive FIFO - through Linux's own 8250_pci driver
//! (I/O BARs, INTx), and keeps writing numbered lines to it and reading
//! them back while the VM is live-migrated to another VMM with another
//! mtty device, or snapshotted, killed and restored onto another one. The
//! device's state (the bytes in its FIFO, its registers) travels in the
//! migration stream and the snapshot: every line arrives, in order, none
//! lost or doubled (`cmp` against `seq` in the guest), and the guest
//! finishes on the second VMM.
//!
//! And what may go wrong: a destination given no function, or one that
//! refuses the state (an mtty with one port where the source's has two:
//! the same vendor and device ID, another state layout), fails the
//! migration with one line, and the source's VM runs on with its device,
//! which then migrates to a destination that fits.
//!
//! Needs the mtty driver (Linux 6.7 or later, for migration with
//! PRE_COPY): `ci/test-vfio` runs this in a lab whose L1 runs the backports
//! kernel, with FFMK_MTTY_MODULE naming the mtty.ko it built. Elsewhere it
//! prints "skipped" (FFMK_MTTY_REQUIRED=1 makes that a failure).
mod common;

use common::linux::{images, timeout};
use common::{tmpdir, Vm};
use std::path::Path;
use std::time::{Duration, Instant};

const TYPES: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";
/// Single-port mtty devices: their state does not fit a dual-port one.
const TYPES_1: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1";
/// Lines the guest sends through the device.
const LINES: u32 = 3000;

/// The mtty driver, loaded from FFMK_MTTY_MODULE if it is not yet; false
/// (and a "skipped" line) where there is none.
fn mtty() -> bool {
    if !Path::new(TYPES).exists() {
        if let Some(module) = std::env::var_os("FFMK_MTTY_MODULE") {
            let ok = std::process::Command::new("insmod")
                .arg(&module)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "insmod {module:?} failed");
        }
    }
    if Path::new(TYPES).exists() {
        return true;
    }
    assert!(
        std::env::var_os("FFMK_MTTY_REQUIRED").is_none(),
        "FFMK_MTTY_REQUIRED is set but there is no mtty driver ({TYPES})"
    );
    eprintln!("skipped: no mtty driver (ci/test-vfio runs this in the lab)");
    false
}

/// An mtty device (two ports) made for a test, removed when dropped.
struct Mdev(String);

impl Mdev {
    fn create(uuid: &str) -> Mdev {
        Mdev::create_in(TYPES, uuid)
    }

    fn create_in(types: &str, uuid: &str) -> Mdev {
        std::fs::write(format!("{types}/create"), uuid).expect("create an mtty device");
        Mdev(uuid.into())
    }

    fn spec(&self) -> String {
        format!("vfio=/sys/bus/mdev/devices/{}", self.0)
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/bus/mdev/devices/{}/remove", self.0), "1");
    }
}

/// The guest's job: numbered lines out through the device's first port
/// (ttyS4: ttyS0-3 are the legacy ports), read back as they loop around,
/// compared with what was sent. Every 10 s the guest logs the port's own
/// counters (bytes sent and received, from /proc/tty/driver/serial) to the
/// console: a test that fails shows whether the port stalled and where.
/// (No quotes: the kernel splits the command line at spaces and `init`
/// joins the words with one space again, so a backslash keeps a space.)
fn guest_cmdline() -> String {
    format!(
        "console=ttyS0 panic=-1 quiet 8250.nr_uarts=8 ffmk_exit_port=244 -- \
         (while sleep 10;do grep ^4: /proc/tty/driver/serial|sed s/^/\\<2\\>mtty-watch\\ />/dev/kmsg;done)&\
         stty -F /dev/ttyS4 raw -echo;echo MTTY-START;\
         (seq 1 {LINES}|while read i;do echo $i;usleep 2000;done)>/dev/ttyS4&\
         head -n {LINES} /dev/ttyS4>/tmp/o;seq 1 {LINES}|cmp - /tmp/o&&echo MTTY-OK"
    )
}

fn boot(dir: &Path, name: &str, device: &str) -> Vm {
    let Some((vmlinux, _, initrd)) = images() else {
        unreachable!("checked by the caller")
    };
    let cmdline = guest_cmdline();
    let args = [
        "run",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
        "--test-exit-port",
        "--cmdline",
        &cmdline,
        "--device",
        device,
    ];
    // Info lines: the source says how it finds the device's DMA writes.
    let mut cmd = common::ffmk();
    cmd.env("RUST_LOG", "warn,vmm::passthrough=info");
    Vm::spawn_cmd(
        cmd,
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

fn wait_console(vm: &Vm, needle: &str) {
    let deadline = Instant::now() + timeout();
    while !vm.console().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no '{needle}' on the console:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn linux_drives_mtty_through_a_live_migration() {
    if images().is_none() || !mtty() {
        return;
    }
    let a = Mdev::create("b1b2c3d4-0000-4000-8000-00000000000a");
    let b = Mdev::create("b1b2c3d4-0000-4000-8000-00000000000b");
    let dir = tmpdir("linux-mtty-migrate");
    let dst = Vm::spawn(
        &[
            "run",
            "--incoming",
            "tcp://127.0.0.1:7411",
            "--memory",
            "128M",
            "--test-exit-port",
            "--device",
            &b.spec(),
        ],
        &dir.join("dst.console"),
        &dir.join("dst.sock"),
    );
    let src = boot(&dir, "src", &a.spec());
    wait_console(&src, "MTTY-START");
    // Some lines through the device first.
    std::thread::sleep(Duration::from_secs(2));
    let out = common::ffmk()
        .args(["migrate", "--api-socket"])
        .arg(&src.sock)
        .args(["--to", "tcp://127.0.0.1:7411", "--json", "--verify"])
        // Nested under TCG, a debug build moves 10-15 MiB/s: the default
        // 50 ms target may never be met while the guest writes.
        .args(["--max-downtime-ms", "1000"])
        .output()
        .unwrap();
    if !out.status.success() {
        let console = src.console();
        let (ended, err) = src.stop();
        let (_, dst_err) = dst.stop();
        panic!("{out:?}\n{console}\nthe source ({ended:?}):\n{err}\nthe destination:\n{dst_err}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap_or_default();
    eprintln!(
        "migrated with mtty: downtime {} ms, total {} ms",
        last["downtime_ms"], last["total_ms"]
    );
    assert!(
        !src.console().contains("MTTY-OK"),
        "the stream ended before the migration: make it longer"
    );
    let src_console = src.console.clone();
    let (code, err) = src.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    // mtty logs no DMA of its own: the IOMMU container's tracking (which
    // sees what a mediated device pins or writes) stands in.
    assert!(
        err.contains("DMA dirty pages from the IOMMU container"),
        "{err}"
    );
    let (code, err) = dst.wait_exit_within(timeout());
    let after = std::fs::read_to_string(dir.join("dst.console")).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "the guest on the destination failed:\nbefore:\n{}\nafter:\n{after}\n{err}",
        std::fs::read_to_string(&src_console).unwrap_or_default()
    );
    assert!(after.contains("MTTY-OK"), "{after}");
    assert!(
        err.contains("took the device state"),
        "the destination's mtty did not take the source's state: {err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linux_drives_mtty_through_a_snapshot_and_a_restore_elsewhere() {
    if images().is_none() || !mtty() {
        return;
    }
    let a = Mdev::create("c1b2c3d4-0000-4000-8000-00000000000a");
    let b = Mdev::create("c1b2c3d4-0000-4000-8000-00000000000b");
    let dir = tmpdir("linux-mtty-snapshot");
    let src = boot(&dir, "src", &a.spec());
    wait_console(&src, "MTTY-START");
    std::thread::sleep(Duration::from_secs(2));
    // No --detach-devices: the device's state is saved with the VM.
    let snap = dir.join("snap");
    let reply = src.snapshot(&snap, &[]);
    assert!(
        reply["unplugged"].as_array().is_none_or(|u| u.is_empty()),
        "{reply}"
    );
    assert!(
        !src.console().contains("MTTY-OK"),
        "the stream ended before the snapshot: make it longer"
    );
    src.kill();
    let dst = Vm::restore(&dir, "dst", &snap, &["--device", &b.spec()]);
    let (code, err) = dst.wait_exit_within(timeout());
    let after = std::fs::read_to_string(dir.join("dst.console")).unwrap_or_default();
    assert_eq!(code, Some(0), "after the restore:\n{after}\n{err}");
    assert!(after.contains("MTTY-OK"), "{after}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `ffmk-vmm migrate` of the VM behind `sock` to `to`: its output.
fn migrate(sock: &Path, to: &str) -> std::process::Output {
    common::ffmk()
        .args(["migrate", "--api-socket"])
        .arg(sock)
        .args(["--to", to, "--json", "--max-downtime-ms", "1000"])
        .output()
        .unwrap()
}

fn incoming(dir: &Path, name: &str, port: u16, device: Option<&str>) -> Vm {
    let addr = format!("tcp://127.0.0.1:{port}");
    let mut args = vec![
        "run",
        "--incoming",
        &addr,
        "--memory",
        "128M",
        "--test-exit-port",
    ];
    if let Some(d) = device {
        args.extend(["--device", d]);
    }
    let vm = Vm::spawn(
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    );
    // It listens once its API socket is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.sock.exists() {
        assert!(Instant::now() < deadline, "the destination did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

#[test]
fn a_destination_that_cannot_take_the_device_state_leaves_the_vm_running_here() {
    if !mtty() {
        return;
    }
    let a = Mdev::create("e1b2c3d4-0000-4000-8000-00000000000a");
    let b = Mdev::create("e1b2c3d4-0000-4000-8000-00000000000b");
    let one_port = Mdev::create_in(TYPES_1, "e1b2c3d4-0000-4000-8000-00000000000c");
    let dir = tmpdir("mtty-refused");
    let src = Vm::boot_with(&dir, "src", "task=counter hz=20", &["--device", &a.spec()]);
    src.wait_counter(5);
    // The API says the function's state travels (what ffmk-node's
    // balancer looks at before it moves a VM with a function on bus 0).
    let info = src.api(&["info"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
    assert_eq!(info["passthrough"][0]["travels"], true, "{info}");

    // No function given: refused before any memory moves.
    let none = incoming(&dir, "none", 7431, None);
    let out = migrate(&src.sock, "tcp://127.0.0.1:7431");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("--device") && err.contains("4348:3253"),
        "{err}"
    );
    let (ended, _) = none.stop();
    assert_eq!(ended, None, "the destination keeps waiting for another try");

    // A function of the same IDs that does not fit (one port where the
    // source's has two): its device refuses the state (mtty checks the
    // header of the PRE_COPY data as it arrives, during the rounds).
    let wrong = incoming(&dir, "wrong", 7432, Some(&one_port.spec()));
    let out = migrate(&src.sock, "tcp://127.0.0.1:7432");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("refused the saved state"), "{err}");
    eprintln!("refused: {}", err.trim());
    let (ended, _) = wrong.stop();
    assert_eq!(ended, None, "the destination keeps waiting for another try");

    // The source's VM ran on all along, its device with it: a destination
    // that fits takes it.
    let counted = src
        .console()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("counter=")?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    src.wait_counter(counted + 5);
    let good = incoming(&dir, "good", 7433, Some(&b.spec()));
    let out = migrate(&src.sock, "tcp://127.0.0.1:7433");
    assert!(out.status.success(), "{out:?}");
    let (code, err) = src.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    // The destination's function took the state the source's device
    // gave after the two failed attempts (a save begun anew each time).
    let (ended, err) = good.stop();
    assert_eq!(ended, None, "the destination runs the VM: {err}");
    assert!(err.contains("took the device state"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
