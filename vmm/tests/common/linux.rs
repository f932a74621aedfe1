//! What the Linux end-to-end tests share (linux_guest.rs, linux_job.rs):
//! where Linux can run, the kernel images, the time a boot may take and the
//! command line every test starts with.
use super::image;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Inside the lab (ci/lab): KVM is real but nested under TCG, so everything
/// takes seconds where hardware takes milliseconds.
pub fn in_lab() -> bool {
    std::env::var_os("FFMK_LAB").is_some()
}

/// None (and a "skipped" line) where Linux cannot run here.
pub fn images() -> Option<(PathBuf, PathBuf, PathBuf)> {
    if pvm_host() && std::env::var_os("FFMK_LINUX_ON_PVM").is_none() {
        eprintln!(
            "skipped: PVM host (guest ring 0 is emulated; see docs/pvm-hosts.md): \
             ci/test-linux runs these tests in the nested-KVM lab"
        );
        return None;
    }
    let (dir, build) = match std::env::var("FFMK_LINUX_KERNEL").as_deref() {
        Ok("minimal") => ("", "guest-images/build minimal"),
        Ok("debian") | Err(_) => ("debian/", "guest-images/build debian"),
        Ok(other) => panic!("FFMK_LINUX_KERNEL={other}: want debian or minimal"),
    };
    Some((
        image(&format!("{dir}vmlinux"), build),
        image(&format!("{dir}bzImage"), build),
        image(&format!("{dir}initramfs.cpio.gz"), build),
    ))
}

pub fn timeout() -> Duration {
    // Minutes where ring 0 is emulated or nested under TCG, seconds elsewhere.
    Duration::from_secs(if pvm_host() {
        1800
    } else if in_lab() {
        300
    } else {
        60
    })
}

/// The command line every test starts with: serial console, reboot at once
/// on a panic (so a broken guest ends the VM instead of hanging), on a PVM
/// host `noxsave` (KVM there shows XSAVE even when the profile hides it),
/// and `quiet`: only the kernel's errors reach the console, because in the
/// lab its boot messages cost an L2 almost half of its boot (docs/lab.md).
/// A test that reads kernel messages adds [`KERNEL_LOG`];
/// `FFMK_TEST_KERNEL_LOG=1` gives every test the whole log.
pub fn base_cmdline() -> String {
    let mut line = String::from("console=ttyS0 panic=-1");
    if pvm_host() {
        line.push_str(" noxsave");
    }
    if std::env::var_os("FFMK_TEST_KERNEL_LOG").is_none() {
        line.push_str(" quiet");
    }
    line
}

/// Kernel arguments that put the kernel's informational messages back on
/// the console (after `quiet`, the later one wins).
pub const KERNEL_LOG: &str = "loglevel=7";

/// Waits until `vm`'s console has `needle` (within the Linux tests' timeout).
pub fn wait_console(vm: &super::Vm, needle: &str) {
    let deadline = std::time::Instant::now() + timeout();
    while !vm.console().contains(needle) {
        assert!(std::time::Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ffmk-vmm run` arguments that boot `kernel` with `initrd`, 512 MiB, the
/// test exit port and `cmdline`, followed by `extra`.
pub fn run_argv<'a>(
    kernel: &'a Path,
    initrd: &'a Path,
    cmdline: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut argv = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("a UTF-8 image path"),
        "--initrd",
        initrd.to_str().expect("a UTF-8 image path"),
        "--memory",
        "512M",
        "--test-exit-port",
        "--cmdline",
        cmdline,
    ];
    argv.extend_from_slice(extra);
    argv
}
