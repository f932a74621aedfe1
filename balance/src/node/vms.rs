//! The VMs on this host, as their VMMs' APIs describe them: every API
//! socket `NAME.sock` in the VM directory is one `ffmk-vmm`. Their load is
//! the runnable vCPU demand: per vCPU thread (tids from `GET /vm/vcpus`),
//! the share of samples in which /proc shows it running or runnable (state
//! `R`). A busy vCPU counts 1 even when the host is oversubscribed and it
//! gets less than a core; a halted one counts 0.
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One call to a VMM's REST API: (status, JSON body).
pub fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), String> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to {}: {e}", sock.display()))?;
    let t = Some(timeout);
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    let (status, text) = vmm::api::http::call(&mut s, method, path, body)
        .map_err(|e| format!("{method} {path} on {}: {e}", sock.display()))?;
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, v))
}

/// The message of an API error body (`{"error": ...}`).
pub fn api_error(v: &serde_json::Value) -> String {
    v.get("error")
        .and_then(|e| e.as_str())
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}

/// What the daemon knows about one local VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalVm {
    pub name: String,
    pub sock: PathBuf,
    pub pid: u32,
    pub state: String,
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
}

fn cpus_spec(topology: &serde_json::Value) -> Option<String> {
    let s = topology.get("service")?.as_u64()?;
    let c = topology.get("compute")?.as_u64()?;
    Some(if c == 0 {
        s.to_string()
    } else {
        format!("service={s},compute={c}")
    })
}

/// Reasons a VM cannot be rebuilt on another host by `run --incoming`
/// with the same flags: host-bound devices and host-bound placement. A
/// passthrough function may move only out of a hot-plug slot (its guest
/// lets go of it through the slot; the destination plugs one of its own).
fn unmovable(config: &serde_json::Value, passthrough: &[serde_json::Value]) -> Option<String> {
    if passthrough
        .iter()
        .any(|p| p.get("hotplug_slot").and_then(|h| h.as_bool()) != Some(true))
    {
        return Some(
            "has passthrough functions on bus 0 (only those in hot-plug slots can leave \
             without a guest agent)"
                .into(),
        );
    }
    let nonempty = |k: &str| {
        config
            .get(k)
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
    };
    let set = |k: &str| config.get(k).is_some_and(|v| !v.is_null());
    if nonempty("disks") {
        return Some("has virtio-blk disks (host files)".into());
    }
    if nonempty("nets") {
        return Some("has virtio-net devices (host TAPs)".into());
    }
    if set("vsock") || set("virtio_console") {
        return Some("has a vsock or virtio-console bound to host paths".into());
    }
    if set("pin") {
        return Some("is pinned to host cores (--pin)".into());
    }
    if config.get("hugepages").and_then(|v| v.as_bool()) == Some(true) {
        return Some("uses huge pages (the destination may have none free)".into());
    }
    None
}

/// Describes the VM behind `sock` (named `name`).
pub fn describe(name: &str, sock: &Path, timeout: Duration) -> Result<LocalVm, String> {
    let (st, vm) = api(sock, "GET", "/vm", "", timeout)?;
    if st != 200 {
        return Err(format!("GET /vm: {st} {}", api_error(&vm)));
    }
    let config = vm.get("config").cloned().unwrap_or_default();
    let pid = vm
        .get("pid")
        .and_then(|p| p.as_u64())
        .ok_or("GET /vm has no pid (an ffmk-vmm older than the node daemon)")? as u32;
    let memory = config
        .get("memory_bytes")
        .and_then(|m| m.as_u64())
        .ok_or("GET /vm has no config.memory_bytes")?;
    let cpus = config
        .get("topology")
        .and_then(cpus_spec)
        .ok_or("GET /vm has no config.topology")?;
    let (st, vcpus) = api(sock, "GET", "/vm/vcpus", "", timeout)?;
    if st != 200 {
        return Err(format!("GET /vm/vcpus: {st} {}", api_error(&vcpus)));
    }
    let vcpu_tids = vcpus
        .get("vcpus")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.get("tid").and_then(|t| t.as_i64()))
                .map(|t| t as i32)
                .collect()
        })
        .unwrap_or_default();
    let passthrough = vm
        .get("passthrough")
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    let (_, mig) = api(sock, "GET", "/vm/migration", "", timeout)?;
    let migrating = mig.get("state").and_then(|s| s.as_str()) == Some("running");
    Ok(LocalVm {
        name: name.to_string(),
        sock: sock.to_path_buf(),
        pid,
        state: vm
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string(),
        memory_mib: memory >> 20,
        cpus,
        cpu_profile: vm
            .get("cpu_profile")
            .and_then(|p| p.as_str())
            .map(String::from),
        vcpu_tids,
        load: 0.0,
        unmovable: unmovable(&config, &passthrough),
        migrating,
        hotplug_slots: config
            .get("hotplug_slots")
            .and_then(|h| h.as_u64())
            .map_or(0, |h| h.min(u64::from(u8::MAX)) as u8),
        passthrough: passthrough
            .iter()
            .filter_map(|p| p.get("device").and_then(|d| d.as_str()).map(String::from))
            .collect(),
    })
}

/// Every VM in `dir` (API sockets `*.sock`), and the sockets that did not
/// answer (stale sockets of VMMs that are gone, or VMMs that are busy).
/// VMs named in `waiting` (VMMs still waiting for an incoming migration,
/// which answer only once it arrived) get a short look, and no error.
/// VMs named in `skip` are not asked at all (the one migrating out: the
/// daemon that moves it must be the one that reads how its migration
/// ended, since the source VMM exits once a client has seen that).
pub fn discover(
    dir: &Path,
    waiting: &[String],
    skip: &[String],
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
        if skip.contains(&name) {
            continue;
        }
        let wait = waiting.contains(&name);
        let timeout = Duration::from_millis(if wait { 300 } else { 3000 });
        match describe(&name, &sock, timeout) {
            Ok(vm) => vms.push(vm),
            Err(_) if wait => {}
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

    #[test]
    fn devices_and_pinning_make_a_vm_unmovable() {
        let plain = serde_json::json!({"disks": [], "nets": [], "pin": null, "vsock": null});
        assert_eq!(unmovable(&plain, &[]), None);
        let disk = serde_json::json!({"disks": [{"path": "/x"}]});
        assert!(unmovable(&disk, &[]).is_some());
        let pin = serde_json::json!({"pin": {"service": "0"}});
        assert!(unmovable(&pin, &[]).is_some());
        // Passthrough functions: in hot-plug slots they may leave, on bus
        // 0 they keep the VM here.
        let in_slot = serde_json::json!({"device": "vfio=0000:3b:00.2", "bdf": "01:00.0", "hotplug_slot": true});
        let on_bus0 = serde_json::json!({"device": "vfio=0000:3b:00.3", "bdf": "00:05.0", "hotplug_slot": false});
        assert_eq!(unmovable(&plain, std::slice::from_ref(&in_slot)), None);
        let why = unmovable(&plain, &[in_slot, on_bus0]).unwrap_or_default();
        assert!(why.contains("bus 0"), "{why}");
        assert_eq!(
            cpus_spec(&serde_json::json!({"service": 1, "compute": 2})).as_deref(),
            Some("service=1,compute=2")
        );
        assert_eq!(
            cpus_spec(&serde_json::json!({"service": 2, "compute": 0})).as_deref(),
            Some("2")
        );
    }
}
