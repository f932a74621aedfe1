//! The VM description served by `GET /vm`.
use crate::vm::Vm;
use serde_json::json;
use std::sync::atomic::Ordering;

pub fn vm_info(vm: &Vm) -> serde_json::Value {
    let state = if vm.is_paused() { "paused" } else { "running" };
    let vcpus: Vec<_> = vm
        .vcpus
        .iter()
        .map(|v| {
            json!({
                "id": v.shared.id,
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
        .map(|(slot, name, counters)| {
            let counters: serde_json::Map<String, serde_json::Value> = counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({ "bdf": format!("00:{slot:02x}.0"), "device": name, "counters": counters })
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
        "pci": pci,
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
