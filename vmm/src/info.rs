//! The VM description served by `GET /vm`.
use crate::vm::Vm;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;
use vcpu_decouple::affinity;

pub fn vm_info(vm: &Vm) -> serde_json::Value {
    let state = if vm.is_paused() { "paused" } else { "running" };
    let vcpus: Vec<_> = vm
        .vcpus
        .iter()
        .map(|v| {
            json!({
                "id": v.shared.id,
                "role": v.shared.role,
                "state": v.shared.state(),
                "exits": v.shared.exits.load(Ordering::Relaxed),
                "io_exits": v.shared.io_exits.load(Ordering::Relaxed),
                "mmio_exits": v.shared.mmio_exits.load(Ordering::Relaxed),
                "pvm_assists": v.shared.pvm_assists.load(Ordering::Relaxed),
            })
        })
        .collect();
    let pci: Vec<_> = vm
        .pci
        .describe()
        .into_iter()
        .map(|(at, name, counters)| {
            let counters: serde_json::Map<String, serde_json::Value> = counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({ "bdf": at.to_string(), "device": name, "counters": counters })
        })
        .collect();
    let disks: Vec<_> = vm
        .config
        .disks
        .iter()
        .zip(&vm.disks)
        .enumerate()
        .map(|(i, (c, d))| {
            json!({
                "index": i,
                "path": c.path,
                "size_bytes": d.disk.sectors() * devices::virtio::block::SECTOR_SIZE,
                "readonly": c.readonly,
            })
        })
        .collect();
    json!({
        "state": state,
        "pid": std::process::id(),
        "pci": pci,
        "passthrough": vm.passthrough.lock().map(|p| p.describe()).unwrap_or_default(),
        "dma_mapped_bytes": vm.passthrough.lock().map(|p| p.dma_mapped_bytes()).unwrap_or(0),
        "disks": disks,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "config": vm.config,
        "host_kind": vm.host_kind,
        "cpu_profile": vm.profile,
        "tsc_khz": vm.tsc_khz,
        "kvm_forced_features": vm.kvm_forced_features,
        "boot": vm.boot,
        "memory": { "bytes": vm.config.memory_bytes, "hugepages": vm.config.hugepages },
        "vcpus": vcpus,
    })
}

/// `GET /vm/vcpus`: per vCPU its role, where its thread runs on the host
/// (read back from /proc, not from what was asked), what exit control
/// applies, and its exit counters (the VMM's and KVM's own).
pub fn vcpus_info(vm: &Vm) -> serde_json::Value {
    let d = &vm.decoupling;
    let pid = std::process::id();
    let vcpus: Vec<_> = vm
        .vcpus
        .iter()
        .map(|v| {
            let s = &v.shared;
            let thread = s
                .tid()
                .and_then(|tid| affinity::thread_info(Path::new("/proc"), pid, tid));
            let kvm = s.kvm_stats.as_ref().and_then(|k| k.read().ok());
            json!({
                "id": s.id,
                "role": s.role,
                "state": s.state(),
                "tid": s.tid(),
                "placement": d.vcpu_cores(s.id).map(|c| c.to_string()),
                "host_cpus_allowed": thread.as_ref().map(|t| t.cpus_allowed.to_string()),
                "last_host_cpu": thread.as_ref().and_then(|t| t.last_cpu),
                "sched_fifo": thread.as_ref().map(|t| t.policy == Some(1)),
                "involuntary_switches": thread.as_ref().and_then(|t| t.involuntary_switches),
                "exits_disabled": d.exits_disabled,
                "halt_poll_ns": d.halt_poll_ns,
                "vmm_exits": {
                    "total": s.exits.load(Ordering::Relaxed),
                    "io": s.io_exits.load(Ordering::Relaxed),
                    "mmio": s.mmio_exits.load(Ordering::Relaxed),
                    "pvm_assists": s.pvm_assists.load(Ordering::Relaxed),
                },
                "kvm_stats": kvm,
            })
        })
        .collect();
    json!({
        "topology": d.topology.to_string(),
        "placement": d.placement,
        "exits_disabled": d.exits_disabled,
        "halt_poll_ns": d.halt_poll_ns,
        "realtime": d.realtime,
        "vcpus": vcpus,
    })
}
