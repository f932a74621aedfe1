//! The VM descriptions served by `GET /vm` and `GET /vm/vcpus` (the types
//! are the `vmm-api` crate's).
use crate::vm::Vm;
use std::path::Path;
use std::sync::atomic::Ordering;
use vcpu_decouple::affinity;
use vmm_api::model::{
    DiskInfo, MemoryInfo, PciFunction, State, VcpuDetail, VcpuSummary, VcpusInfo, VmConfig, VmInfo,
    VmmExits,
};

/// A value's JSON text as a string (`"pvm"` -> `pvm`).
fn name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// The run configuration as `GET /vm` shows it.
pub fn config_view(config: &crate::config::RunConfig) -> Result<VmConfig, serde_json::Error> {
    let mut v = serde_json::to_value(config)?;
    // The view's `hugepages` is a flag (as before 1 GiB pages); the page
    // size is `memory.page_bytes` and, here, `hugepage_size`.
    if let Some(o) = v.as_object_mut() {
        o.insert("hugepages".into(), config.hugepages.is_on().into());
        if config.hugepages.is_on() {
            o.insert("hugepage_size".into(), config.hugepages.to_string().into());
        }
    }
    serde_json::from_value(v)
}

pub fn vm_info(vm: &Vm) -> Result<VmInfo, serde_json::Error> {
    let vcpus = vm
        .vcpus
        .iter()
        .map(|v| VcpuSummary {
            id: v.shared.id,
            role: name(&v.shared.role),
            state: name(&v.shared.state()),
            exits: v.shared.exits.load(Ordering::Relaxed),
            io_exits: v.shared.io_exits.load(Ordering::Relaxed),
            mmio_exits: v.shared.mmio_exits.load(Ordering::Relaxed),
            pvm_assists: v.shared.pvm_assists.load(Ordering::Relaxed),
        })
        .collect();
    let pci = vm
        .devices
        .pci()
        .describe()
        .into_iter()
        .map(|(at, device, counters)| PciFunction {
            bdf: at.to_string(),
            device,
            counters: counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })
        .collect();
    let disks = vm
        .config
        .disks
        .iter()
        .zip(vm.devices.disks())
        .enumerate()
        .map(|(index, (c, d))| DiskInfo {
            index,
            path: c.path.clone(),
            size_bytes: d.disk.sectors() * devices::virtio::block::SECTOR_SIZE,
            readonly: c.readonly,
        })
        .collect();
    let (passthrough, dma_mapped_bytes) = vm
        .devices
        .passthrough()
        .map(|p| (p.describe(), p.dma_mapped_bytes()))
        .unwrap_or_default();
    Ok(VmInfo {
        state: if vm.is_paused() {
            State::Paused
        } else {
            State::Running
        },
        pid: std::process::id(),
        pci,
        passthrough,
        dma_mapped_bytes,
        disks,
        uptime_ms: vm.started.elapsed().as_millis() as u64,
        config: config_view(&vm.config)?,
        host_kind: name(&vm.platform.host_kind),
        cpu_profile: name(&vm.platform.profile),
        tsc_khz: vm.platform.tsc_khz,
        kvm_forced_features: vm
            .platform
            .kvm_forced_features
            .iter()
            .map(|f| f.to_string())
            .collect(),
        boot: Some(serde_json::to_value(&vm.platform.boot).and_then(serde_json::from_value)?),
        memory: MemoryInfo {
            bytes: vm.config.memory_bytes,
            hugepages: vm.config.hugepages.is_on(),
            page_bytes: vm.config.hugepages.bytes(),
        },
        vcpus,
        incoming: None,
    })
}

/// `GET /vm` of a VMM waiting in `run --incoming` on `listen` since
/// `since`: the configuration it will take a VM with, no VM yet.
pub fn incoming_info(
    config: &crate::config::RunConfig,
    listen: &str,
    since: std::time::Instant,
) -> Result<VmInfo, serde_json::Error> {
    let host_kind = crate::host::HostKind::detect();
    let profile = config.cpu_profile.unwrap_or(host_kind.default_profile());
    Ok(VmInfo {
        state: State::Incoming,
        pid: std::process::id(),
        pci: Vec::new(),
        passthrough: Vec::new(),
        dma_mapped_bytes: 0,
        disks: Vec::new(),
        uptime_ms: 0,
        config: config_view(config)?,
        host_kind: name(&host_kind),
        cpu_profile: name(&profile),
        tsc_khz: 0,
        kvm_forced_features: Vec::new(),
        boot: None,
        memory: MemoryInfo {
            bytes: config.memory_bytes,
            hugepages: config.hugepages.is_on(),
            page_bytes: config.hugepages.bytes(),
        },
        vcpus: Vec::new(),
        incoming: Some(vmm_api::model::Incoming {
            listen: listen.into(),
            waiting_ms: since.elapsed().as_millis() as u64,
        }),
    })
}

/// `GET /vm/vcpus`: per vCPU its role, where its thread runs on the host
/// (read back from /proc, not from what was asked), what exit control
/// applies, and its exit counters (the VMM's and KVM's own).
pub fn vcpus_info(vm: &Vm) -> Result<VcpusInfo, serde_json::Error> {
    let d = &vm.vcpus.decoupling();
    let pid = std::process::id();
    let vcpus = vm
        .vcpus
        .iter()
        .map(|v| {
            let s = &v.shared;
            let thread = s
                .tid()
                .and_then(|tid| affinity::thread_info(Path::new("/proc"), pid, tid));
            VcpuDetail {
                id: s.id,
                role: name(&s.role),
                state: name(&s.state()),
                tid: s.tid(),
                placement: d.vcpu_cores(s.id).map(|c| c.to_string()),
                host_cpus_allowed: thread.as_ref().map(|t| t.cpus_allowed.to_string()),
                last_host_cpu: thread.as_ref().and_then(|t| t.last_cpu),
                sched_fifo: thread.as_ref().map(|t| t.policy == Some(1)),
                involuntary_switches: thread.as_ref().and_then(|t| t.involuntary_switches),
                exits_disabled: name(&d.exits_disabled),
                halt_poll_ns: d.halt_poll_ns,
                vmm_exits: VmmExits {
                    total: s.exits.load(Ordering::Relaxed),
                    io: s.io_exits.load(Ordering::Relaxed),
                    mmio: s.mmio_exits.load(Ordering::Relaxed),
                    pvm_assists: s.pvm_assists.load(Ordering::Relaxed),
                },
                kvm_stats: s.kvm_stats.as_ref().and_then(|k| k.read().ok()),
            }
        })
        .collect();
    Ok(VcpusInfo {
        topology: d.topology.to_string(),
        placement: serde_json::to_value(&d.placement).and_then(serde_json::from_value)?,
        exits_disabled: name(&d.exits_disabled),
        halt_poll_ns: d.halt_poll_ns,
        realtime: d.realtime,
        vcpus,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::VmSpec;

    /// Every setting the API types shows up typed in `GET /vm`'s config:
    /// the server's configuration and the API's view of it agree.
    #[test]
    fn a_full_run_configuration_is_what_the_api_promises() {
        let file: VmSpec = toml::from_str(
            r#"
            kernel = "/k"
            initrd = "/i"
            cpus = "service=1,compute=2"
            pin = "service=0,compute=1-2"
            memory = "1G"
            hugepages = true
            disk = [{ path = "/d.raw", readonly = true, serial = "s1", queues = 2 }]
            net = [{ tap = "tap0" }]
            rng = true
            virtio_console = "/c.sock"
            vsock = { cid = 3, socket = "/v.sock" }
            hotplug_slots = 2
            "#,
        )
        .expect("a configuration");
        let config = file.validate().expect("valid");
        let view = super::config_view(&config).expect("the API's view");
        assert_eq!(view.cpus_flag(), "service=1,compute=2");
        assert_eq!(view.memory_bytes, 1 << 30);
        assert!(view.hugepages && view.rng);
        assert_eq!(view.pin.and_then(|p| p.compute).as_deref(), Some("1-2"));
        assert_eq!(view.disks[0].serial.as_deref(), Some("s1"));
        assert!(view.disks[0].readonly);
        assert_eq!(view.nets[0].tap, "tap0");
        assert_eq!(view.vsock.map(|v| v.cid), Some(3));
        assert_eq!(view.hotplug_slots, 2);
        // What the API does not type is still there.
        assert!(
            view.other.contains_key("seccomp"),
            "{:?}",
            view.other.keys()
        );
    }
}
