//! Linux end-to-end: the minimal kernel (guest-images/linux) boots with the
//! busybox initramfs to `/init`, which runs the command after `--`, reports
//! its status through the test exit port and powers off.
//!
//! Guest ring 0 must run at native speed for this: on a PVM-backed KVM host
//! (see docs/pvm-hosts.md) these tests print "skipped: PVM host" and pass
//! without booting; set FFMK_LINUX_ON_PVM=1 to run them there anyway.
//! Build the images first: `guest-images/build` (ci/test does).
mod common;

use common::{image, Running};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// None (and a "skipped" line) where Linux cannot run here.
fn images() -> Option<(PathBuf, PathBuf, PathBuf)> {
    if pvm_host() && std::env::var_os("FFMK_LINUX_ON_PVM").is_none() {
        eprintln!("skipped: PVM host (guest ring 0 is emulated; see docs/pvm-hosts.md)");
        return None;
    }
    let build = "guest-images/build";
    Some((
        image("vmlinux", build),
        image("bzImage", build),
        image("initramfs.cpio.gz", build),
    ))
}

fn timeout() -> Duration {
    // Minutes where ring 0 is emulated, seconds elsewhere.
    Duration::from_secs(if pvm_host() { 1800 } else { 60 })
}

struct Boot {
    code: Option<i32>,
    stderr: String,
    console: Vec<String>,
}

/// The command line every test starts with: serial console, reboot at once
/// on a panic (so a broken guest ends the VM instead of hanging), and on a
/// PVM host `noxsave` (KVM there shows XSAVE even when the profile hides it).
fn base_cmdline() -> &'static str {
    if pvm_host() {
        "console=ttyS0 panic=-1 noxsave"
    } else {
        "console=ttyS0 panic=-1"
    }
}

fn boot(kernel: &Path, initrd: &Path, cpus: u32, args: &str) -> Boot {
    let cmdline = format!("{} {args}", base_cmdline());
    let kernel = kernel.to_string_lossy();
    let initrd = initrd.to_string_lossy();
    let cpus = cpus.to_string();
    let mut vm = Running::start(&[
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cpus",
        &cpus,
        "--memory",
        "512M",
        "--test-exit-port",
        "--cmdline",
        &cmdline,
    ]);
    let (code, stderr) = vm.wait(timeout());
    Boot {
        code,
        stderr,
        console: vm.drain(),
    }
}

fn has_line(b: &Boot, want: &str) -> bool {
    b.console.iter().any(|l| l.contains(want))
}

#[test]
fn vmlinux_boots_through_pvh_to_init_and_reports_the_command_status() {
    let Some((vmlinux, _, initrd)) = images() else {
        return;
    };
    let b = boot(
        &vmlinux,
        &initrd,
        2,
        "ffmk_exit_port=244 -- echo ffmk-marker-$((6*7)); exit 7",
    );
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(has_line(&b, "ffmk-init: up"), "{ctx}");
    assert!(has_line(&b, "cpus=2"), "both vCPUs came up: {ctx}");
    assert!(has_line(&b, "ffmk-marker-42"), "{ctx}");
    assert_eq!(b.code, Some(7), "{ctx}");
}

#[test]
fn bzimage_boots_with_the_64bit_protocol_and_powers_off_cleanly() {
    let Some((_, bzimage, initrd)) = images() else {
        return;
    };
    // No exit port write: /init's poweroff goes through the ACPI sleep
    // registers, which ffmk-vmm reports as a clean stop (exit code 0).
    let b = boot(&bzimage, &initrd, 4, "-- grep -c ^processor /proc/cpuinfo");
    let ctx = format!("stderr: {}\nconsole:\n{}", b.stderr, b.console.join("\n"));
    assert!(has_line(&b, "ffmk-init: up"), "{ctx}");
    assert!(b.console.iter().any(|l| l.trim() == "4"), "{ctx}");
    assert!(has_line(&b, "ffmk-init: exit=0"), "{ctx}");
    assert_eq!(b.code, Some(0), "{ctx}");
    assert!(b.stderr.contains("powered off"), "{ctx}");
}
