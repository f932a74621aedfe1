//! Guest memory as an HPC job wants it (issue: NUMA, topology, start-up
//! and footprint): huge pages of 2 MiB and 1 GiB the host reserved,
//! counted before the guest starts, and all of it faulted in up front.
//! These tests change the host's huge page pools (as root) and put them
//! back as they were.
mod common;

use common::{ffmk, probe_argv_mem, tmpdir, Vm};
use std::path::Path;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One of the host's huge page pools, set to a size for the test and
/// put back to what it was on drop.
struct Pool {
    dir: String,
    before: u64,
}

impl Pool {
    fn open(kb: u64) -> Pool {
        let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
        let before = Pool::read(&dir, "nr_hugepages");
        Pool { dir, before }
    }

    fn read(dir: &str, what: &str) -> u64 {
        std::fs::read_to_string(format!("{dir}/{what}"))
            .unwrap_or_else(|e| panic!("{dir}/{what}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Asks for `n` pages; returns how many the kernel could give.
    fn set(&self, n: u64) -> u64 {
        std::fs::write(format!("{}/nr_hugepages", self.dir), n.to_string())
            .unwrap_or_else(|e| panic!("cannot size {}: {e} (run as root)", self.dir));
        Pool::read(&self.dir, "nr_hugepages")
    }

    fn free(&self) -> u64 {
        Pool::read(&self.dir, "free_hugepages")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{}/nr_hugepages", self.dir),
            self.before.to_string(),
        );
    }
}

/// The page size (kB) of the mapping of `bytes` (the guest's RAM) in the
/// VMM with pid `pid`.
fn guest_ram_page_kb(pid: u32, bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut size_ok = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size_ok = v.trim().trim_end_matches(" kB").parse::<u64>().ok() == Some(bytes >> 10);
        } else if let Some(v) = line.strip_prefix("KernelPageSize:") {
            if size_ok {
                return v.trim().trim_end_matches(" kB").parse().ok();
            }
        }
    }
    None
}

fn boot(dir: &Path, name: &str, memory: &str, extra: &[&str]) -> Vm {
    let argv = probe_argv_mem("task=counter", memory, extra);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    Vm::spawn(
        &args,
        &dir.join(format!("{name}.console")),
        &dir.join(format!("{name}.sock")),
    )
}

#[test]
fn huge_pages_back_the_guest_and_too_few_fail_before_it_starts() {
    let dir = tmpdir("hugepages");
    let pool = Pool::open(2048);
    // 64 MiB need 32 pages: with 31 free the start fails with one line
    // that says how many to reserve, exit 2, and takes none of them.
    assert_eq!(
        pool.set(31),
        31,
        "the host could not reserve 31 2 MiB pages"
    );
    let out = ffmk()
        .args(probe_argv_mem(
            "task=hello",
            "64M",
            &["--hugepages", "--test-exit-port"],
        ))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("31 free 2 MiB huge pages")
            && err.contains("need 32")
            && err.contains("echo 32 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "{err}"
    );
    assert_eq!(pool.free(), 31);
    // With enough, the guest runs on them, faulted in up front.
    assert_eq!(pool.set(32), 32);
    let vm = boot(&dir, "m2", "64M", &["--hugepages", "--prefault"]);
    vm.wait_counter(2);
    assert_eq!(guest_ram_page_kb(vm.pid(), 64 << 20), Some(2048));
    assert_eq!(
        pool.free(),
        0,
        "--prefault leaves no page of the 32 unfaulted"
    );
    let (ended, err) = vm.stop();
    assert!(ended.is_none(), "{err}");
    // A size that is not a multiple of the page size.
    let out = ffmk()
        .args(probe_argv_mem("task=hello", "1536M", &["--hugepages=1G"]))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("multiple of 1 GiB"), "{err}");
    // 1 GiB pages, where the host can still find a free gigabyte.
    let giant = Pool::open(1 << 20);
    if giant.set(1) == 1 {
        let vm = boot(&dir, "m1g", "1G", &["--hugepages=1G"]);
        vm.wait_counter(2);
        assert_eq!(guest_ram_page_kb(vm.pid(), 1 << 30), Some(1 << 20));
        let (ended, err) = vm.stop();
        assert!(ended.is_none(), "{err}");
    } else {
        eprintln!("1 GiB pages not tested: the host could not reserve one now");
    }
}

#[test]
fn prefault_makes_all_guest_memory_resident_before_the_guest_runs() {
    let dir = tmpdir("prefault");
    let vm = boot(&dir, "p", "256M", &["--prefault"]);
    vm.wait_counter(1);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.pid())).unwrap();
    // The guest RAM mapping: 256 MiB, all of it resident.
    let mut size = 0;
    let mut resident = None;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if size == 256 << 10 {
                resident = v.trim().trim_end_matches(" kB").parse::<u64>().ok();
            }
        }
    }
    assert_eq!(resident, Some(256 << 10), "guest RAM is not all resident");
    let (ended, err) = vm.stop();
    assert!(ended.is_none(), "{err}");
}
