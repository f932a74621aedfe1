//! The VMs on this host, as their VMMs' APIs describe them: every API
//! socket `NAME.sock` in the VM directory is one `ffmk-vmm`. Their load is
//! the runnable vCPU demand: per vCPU thread (tids from `GET /vm/vcpus`),
//! the share of samples in which /proc shows it running or runnable (state
//! `R`). A busy vCPU counts 1 even when the host is oversubscribed and it
//! gets less than a core; a halted one counts 0.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm_api::model::{DeviceState, DiskConfig, NetConfig, State, VmConfig};
use vmm_api::Client;

/// A client of the VMM behind `sock` whose calls end within `timeout`.
pub fn api(sock: &Path, timeout: Duration) -> Client {
    Client::new(sock).with_timeout(timeout)
}

/// What the daemon knows about one local VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalVm {
    pub name: String,
    pub sock: PathBuf,
    pub pid: u32,
    pub state: State,
    pub memory_mib: u64,
    /// `--cpus` as the destination must repeat it.
    pub cpus: String,
    pub cpu_profile: Option<String>,
    #[serde(skip)]
    pub vcpu_tids: Vec<i32>,
    /// Runnable vCPU demand (filled in by the sampler).
    pub load: f64,
    /// Why it may not move (None: it may).
    pub unmovable: Option<String>,
    /// A migration of it is under way (its VMM says so).
    pub migrating: bool,
    /// `--hotplug-slots` of its VMM.
    #[serde(default)]
    pub hotplug_slots: u8,
    /// Its passthrough functions (as `--device` names them).
    #[serde(default)]
    pub passthrough: Vec<String>,
    /// Its disks (read-only ones may move: `arriving`).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Its network devices (those on bridges may move).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// The Slurm allocation it belongs to (`ffmk.nodes=` on its command
    /// line, as `ffmk-node slurm-vm` puts it): it moves only to hosts in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
}

/// The host list after `ffmk.nodes=` on a guest command line.
pub fn allocation(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ffmk.nodes="))
        .filter(|l| !l.is_empty())
        .map(String::from)
}

/// Reasons a VM cannot be rebuilt on another host by `run --incoming`
/// with the same flags: host-bound devices and host-bound placement. A
/// passthrough function moves out of a hot-plug slot (its guest lets go of
/// it through the slot; the destination plugs one of its own), or with its
/// state (VFIO migration: the destination's function of the same kind,
/// from its pool, takes the state; one that does not fit fails the
/// migration and the VM stays).
fn unmovable(config: &VmConfig, passthrough: &[DeviceState]) -> Option<String> {
    if let Some(p) = passthrough.iter().find(|p| !p.hotplug_slot && !p.travels) {
        return Some(format!(
            "has passthrough function {} on bus 0 without VFIO migration (only functions \
             in hot-plug slots, or whose state travels, can move)",
            p.device
        ));
    }
    // Read-only disks and bridged TAPs can be rebuilt at a destination
    // that shares the disk's directory and has the bridge (it refuses
    // otherwise: `arriving`).
    if let Some(d) = config.disks.iter().find(|d| !d.readonly) {
        return Some(format!(
            "has a read-write virtio-blk disk ({}; only read-only ones move)",
            d.path.display()
        ));
    }
    if let Some(n) = config.nets.iter().find(|n| n.bridge.is_none()) {
        return Some(format!(
            "has a virtio-net device on TAP {} without a bridge (only bridged ones move)",
            n.tap
        ));
    }
    if config.vsock.is_some() || config.virtio_console.is_some() {
        return Some("has a vsock or virtio-console bound to host paths".into());
    }
    if config.pin.is_some() {
        return Some("is pinned to host cores (--pin)".into());
    }
    if config.hugepages {
        return Some("uses huge pages (the destination may have none free)".into());
    }
    None
}

/// Describes the VM behind `sock` (named `name`).
pub fn describe(name: &str, sock: &Path, timeout: Duration) -> Result<LocalVm, String> {
    let api = api(sock, timeout);
    let vm = api.vm().map_err(|e| e.to_string())?;
    let vcpus = api.vcpus().map_err(|e| e.to_string())?;
    let migrating = matches!(
        api.migration(),
        Ok(vmm_api::model::MigrationStatus::Running { .. })
    );
    Ok(LocalVm {
        name: name.to_string(),
        sock: sock.to_path_buf(),
        pid: vm.pid,
        state: vm.state,
        memory_mib: vm.config.memory_bytes >> 20,
        cpus: vm.config.cpus_flag(),
        cpu_profile: Some(vm.cpu_profile.clone()),
        vcpu_tids: vcpus.vcpus.iter().filter_map(|v| v.tid).collect(),
        load: 0.0,
        unmovable: unmovable(&vm.config, &vm.passthrough),
        migrating,
        hotplug_slots: vm.config.hotplug_slots,
        passthrough: vm.passthrough.iter().map(|p| p.device.clone()).collect(),
        disks: vm.config.disks.clone(),
        nets: vm.config.nets.clone(),
        allocation: allocation(&vm.config.cmdline),
    })
}

/// Every VM in `dir` (API sockets `*.sock`), and the sockets that did not
/// answer (stale sockets of VMMs that are gone, or VMMs that are busy).
/// VMs named in `waiting` (VMMs still waiting for an incoming migration)
/// get a short look, and no error; a VMM that says it is waiting
/// (`state: incoming`) is left out.
/// VMs named in `skip` are not asked at all (the one migrating out: the
/// daemon that moves it must be the one that reads how its migration
/// ended, since the source VMM exits once a client has seen that).
pub fn discover(
    dir: &Path,
    waiting: &[String],
    skip: &[String],
) -> (Vec<LocalVm>, Vec<(String, String)>) {
    scan(dir, waiting, skip, &|_| true, false)
}

/// [`discover`] for the VMs whose names `keep` accepts, asked now (not
/// the sampler's last look, which misses a VM whose VMM was busy then,
/// e.g. writing a snapshot). Stale sockets (no VMM behind them) are left
/// out without an error.
pub fn discover_matching(
    dir: &Path,
    skip: &[String],
    keep: &dyn Fn(&str) -> bool,
) -> (Vec<LocalVm>, Vec<(String, String)>) {
    scan(dir, &[], skip, keep, true)
}

fn scan(
    dir: &Path,
    waiting: &[String],
    skip: &[String],
    keep: &dyn Fn(&str) -> bool,
    skip_stale: bool,
) -> (Vec<LocalVm>, Vec<(String, String)>) {
    let (mut vms, mut errors) = (Vec::new(), Vec::new());
    let Ok(rd) = std::fs::read_dir(dir) else {
        errors.push((
            dir.display().to_string(),
            "cannot read the VM directory".into(),
        ));
        return (vms, errors);
    };
    let mut socks: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    socks.sort();
    for sock in socks {
        let name = sock
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if skip.contains(&name) || !keep(&name) {
            continue;
        }
        let wait = waiting.contains(&name);
        let timeout = Duration::from_millis(if wait { 300 } else { 3000 });
        match describe(&name, &sock, timeout) {
            // A VMM still waiting for its VM (`state: incoming`) is not a
            // VM of this host yet.
            Ok(vm) if vm.state == State::Incoming => {}
            Ok(vm) => vms.push(vm),
            Err(_) if wait => {}
            Err(_) if skip_stale && std::os::unix::net::UnixStream::connect(&sock).is_err() => {}
            Err(e) => errors.push((name, e)),
        }
    }
    (vms, errors)
}

/// Whether thread `tid` of `pid` is running or runnable now (None: gone).
fn runnable(pid: u32, tid: i32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The state follows the command name's closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.trim_start().starts_with('R'))
}

/// Accumulates runnable samples per VM between two reads.
#[derive(Default)]
pub struct Sampler {
    /// name -> (runnable vCPU samples, sampling rounds)
    counts: HashMap<String, (u64, u64)>,
}

impl Sampler {
    /// One sampling round over `vms` (name, pid, tids).
    pub fn sample(&mut self, vms: &[(String, u32, Vec<i32>)]) {
        for (name, pid, tids) in vms {
            let r = tids
                .iter()
                .filter(|t| runnable(*pid, **t) == Some(true))
                .count() as u64;
            let c = self.counts.entry(name.clone()).or_default();
            c.0 += r;
            c.1 += 1;
        }
    }

    /// Mean runnable vCPUs per VM since the last call; starts over.
    pub fn take(&mut self) -> HashMap<String, f64> {
        self.counts
            .drain()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(k, (r, n))| (k, r as f64 / n as f64))
            .collect()
    }
}

/// Free memory of the host in MiB (MemAvailable).
pub fn free_mib() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib >> 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_is_runnable_and_the_sampler_averages() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).ok();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let tid = rx.recv().expect("tid");
        let pid = std::process::id();
        let mut s = Sampler::default();
        for _ in 0..50 {
            s.sample(&[("busy".into(), pid, vec![tid])]);
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().ok();
        let l = s.take();
        // Runnable in most samples (it may wait for a core on a busy host,
        // which still counts as R).
        assert!(l["busy"] > 0.8, "{l:?}");
        assert!(s.take().is_empty());
        assert_eq!(runnable(pid, i32::MAX), None);
    }

    /// A configuration as `GET /vm` shows it, with `extra` over it.
    fn config(extra: serde_json::Value) -> VmConfig {
        let mut c = serde_json::json!({
            "kernel": "/k", "initrd": null, "cmdline": "", "cpus": 1,
            "topology": {"service": 1, "compute": 0}, "pin": null,
            "memory_bytes": 1 << 28, "hugepages": false, "disks": [], "nets": [],
            "rng": false, "virtio_console": null, "vsock": null, "hotplug_slots": 0,
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        serde_json::from_value(c).expect("a configuration")
    }

    #[test]
    fn devices_and_pinning_make_a_vm_unmovable() {
        let plain =
            config(serde_json::json!({"disks": [], "nets": [], "pin": null, "vsock": null}));
        assert_eq!(unmovable(&plain, &[]), None);
        let disk = config(
            serde_json::json!({"disks": [{"path": "/x", "readonly": false,
            "direct": false, "serial": null, "queues": 1, "bandwidth": null, "iops": null}]}),
        );
        assert!(unmovable(&disk, &[]).is_some());
        let pin = config(serde_json::json!({"pin": {"service": "0", "compute": null, "io": null}}));
        assert!(unmovable(&pin, &[]).is_some());
        // Passthrough functions: in hot-plug slots they may leave, on bus
        // 0 they keep the VM here unless their state travels.
        let function = |device: &str, bdf: &str, hotplug_slot, travels| DeviceState {
            device: device.into(),
            bdf: bdf.into(),
            hotplug_slot,
            state: vmm_api::model::Attachment::Attached,
            travels,
        };
        let in_slot = function("vfio=0000:3b:00.2", "01:00.0", true, false);
        let on_bus0 = function("vfio=0000:3b:00.3", "00:05.0", false, false);
        let travelling = function("vfio=/sys/bus/mdev/devices/u", "00:06.0", false, true);
        assert_eq!(unmovable(&plain, std::slice::from_ref(&in_slot)), None);
        assert_eq!(unmovable(&plain, &[in_slot.clone(), travelling]), None);
        let why = unmovable(&plain, &[in_slot, on_bus0]).unwrap_or_default();
        assert!(why.contains("bus 0") && why.contains("3b:00.3"), "{why}");
        // A VMM from before `travels` answers without it: not travelling.
        let old: DeviceState = serde_json::from_value(serde_json::json!({
            "device": "vfio=0000:3b:00.3", "bdf": "00:05.0",
            "hotplug_slot": false, "state": "attached"}))
        .expect("an old answer");
        assert!(!old.travels);
        let topology = |service, compute| {
            config(serde_json::json!({"topology": {"service": service, "compute": compute}}))
        };
        assert_eq!(topology(1, 2).cpus_flag(), "service=1,compute=2");
        assert_eq!(topology(2, 0).cpus_flag(), "2");
    }
}
