//! `GET /metrics`: the VM in Prometheus text format — its state, vCPU
//! exits and the host CPU time of each vCPU thread, device I/O counters,
//! the dirty rate of a running migration, and the timings of the last
//! migration and snapshot. Scraped by Prometheus (docs/operations.md).
use crate::migration::Status;
use crate::vm::Vm;
use std::sync::atomic::Ordering;
use vmm_api::metrics::{Kind, Page};
use vmm_api::model::SnapshotReply;

/// Snapshots this VMM took through its API.
#[derive(Debug, Default, Clone)]
pub struct Snapshots {
    pub taken: u64,
    pub failed: u64,
    pub last: Option<SnapshotReply>,
}

/// Device counters that are levels, not running totals.
const GAUGES: [&str; 4] = ["status", "msix_enabled", "msi_vectors", "mapped_bar_bytes"];

/// Nanoseconds thread `tid` of this process has run on a CPU
/// (`/proc/self/task/TID/schedstat`, first field).
fn cpu_ns(tid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The page for `vm`.
pub fn page(vm: &Vm, migration: &Status, snapshots: &Snapshots) -> String {
    let mut p = Page::new();
    p.one("ffmk_up", Kind::Gauge, "1: the VMM answers", 1.0);
    let state = if vm.is_paused() { "paused" } else { "running" };
    p.family("ffmk_vm_state", Kind::Gauge, "1 for the VM's state");
    for s in ["running", "paused"] {
        p.sample(
            "ffmk_vm_state",
            &[("state", s)],
            f64::from(u8::from(s == state)),
        );
    }
    p.one(
        "ffmk_vm_uptime_seconds",
        Kind::Gauge,
        "Seconds since the VM started here",
        vm.started.elapsed().as_secs_f64(),
    );
    p.one(
        "ffmk_vm_memory_bytes",
        Kind::Gauge,
        "Guest memory",
        vm.config.memory_bytes as f64,
    );
    p.one(
        "ffmk_vm_vcpus",
        Kind::Gauge,
        "vCPUs (service and compute)",
        vm.vcpus.iter().count() as f64,
    );
    vcpus(&mut p, vm);
    devices(&mut p, vm);
    migration_metrics(&mut p, migration);
    snapshot_metrics(&mut p, snapshots);
    p.finish()
}

fn vcpus(p: &mut Page, vm: &Vm) {
    type Counter = fn(&crate::vcpu::VcpuShared) -> u64;
    let counters: [(&str, &str, Counter); 4] = [
        (
            "ffmk_vcpu_exits_total",
            "VM exits of the vCPU that ffmk-vmm handled",
            |s| s.exits.load(Ordering::Relaxed),
        ),
        ("ffmk_vcpu_io_exits_total", "Port I/O exits", |s| {
            s.io_exits.load(Ordering::Relaxed)
        }),
        ("ffmk_vcpu_mmio_exits_total", "MMIO exits", |s| {
            s.mmio_exits.load(Ordering::Relaxed)
        }),
        (
            "ffmk_vcpu_pvm_assists_total",
            "Instructions ffmk-vmm ran for a PVM host's ring-0 emulator",
            |s| s.pvm_assists.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        p.family(name, Kind::Counter, help);
        for v in vm.vcpus.iter() {
            let id = v.shared.id.to_string();
            let role = role(v);
            p.sample(
                name,
                &[("vcpu", &id), ("role", &role)],
                get(&v.shared) as f64,
            );
        }
    }
    let name = "ffmk_vcpu_cpu_seconds_total";
    p.family(
        name,
        Kind::Counter,
        "Host CPU time of the vCPU's thread (in the guest and in the VMM)",
    );
    for v in vm.vcpus.iter() {
        if let Some(ns) = v.shared.tid().and_then(cpu_ns) {
            let id = v.shared.id.to_string();
            let role = role(v);
            p.sample(name, &[("vcpu", &id), ("role", &role)], ns as f64 / 1e9);
        }
    }
}

fn role(v: &crate::vm::VcpuHandle) -> String {
    match serde_json::to_value(v.shared.role) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn devices(p: &mut Page, vm: &Vm) {
    let described = vm.devices.pci().describe();
    for (name, kind, help, gauge) in [
        (
            "ffmk_device_events_total",
            Kind::Counter,
            "A device's activity counter (requests, bytes, frames, errors, ...), named by `counter`",
            false,
        ),
        (
            "ffmk_device_value",
            Kind::Gauge,
            "A device's level (virtio status, MSI vectors, mapped BAR bytes)",
            true,
        ),
    ] {
        p.family(name, kind, help);
        for (at, device, counters) in &described {
            let bdf = at.to_string();
            for (counter, value) in counters {
                if GAUGES.contains(counter) == gauge {
                    p.sample(
                        name,
                        &[("bdf", &bdf), ("device", device), ("counter", counter)],
                        *value as f64,
                    );
                }
            }
        }
    }
}

fn migration_metrics(p: &mut Page, status: &Status) {
    let state = match status {
        Status::None => "none",
        Status::Running { .. } => "running",
        Status::Completed(_) => "completed",
        Status::Failed { .. } => "failed",
    };
    p.family(
        "ffmk_migration_state",
        Kind::Gauge,
        "1 for the state of this VM's migration",
    );
    for s in ["none", "running", "completed", "failed"] {
        p.sample(
            "ffmk_migration_state",
            &[("state", s)],
            f64::from(u8::from(s == state)),
        );
    }
    if let Status::Running {
        progress: Some(g), ..
    } = status
    {
        let mib = f64::from(1 << 20);
        p.one(
            "ffmk_migration_dirty_bytes_per_second",
            Kind::Gauge,
            "How fast the guest dirties memory (last round)",
            g.dirty_mib_s * mib,
        );
        p.one(
            "ffmk_migration_link_bytes_per_second",
            Kind::Gauge,
            "How fast pages went to the destination (last round)",
            g.link_mib_s * mib,
        );
        p.one(
            "ffmk_migration_predicted_downtime_seconds",
            Kind::Gauge,
            "The downtime a switch-over now would take",
            g.predicted_downtime_ms / 1e3,
        );
        p.one(
            "ffmk_migration_round",
            Kind::Gauge,
            "Copy round",
            f64::from(g.round),
        );
        p.one(
            "ffmk_migration_sent_bytes",
            Kind::Gauge,
            "Bytes sent so far",
            g.sent_bytes as f64,
        );
    }
    if let Status::Completed(o) = status {
        p.one(
            "ffmk_migration_downtime_seconds",
            Kind::Gauge,
            "Downtime of the completed migration",
            o.downtime_ms / 1e3,
        );
        p.one(
            "ffmk_migration_duration_seconds",
            Kind::Gauge,
            "From start to end of the completed migration",
            o.total_ms / 1e3,
        );
    }
}

fn snapshot_metrics(p: &mut Page, s: &Snapshots) {
    p.one(
        "ffmk_snapshots_total",
        Kind::Counter,
        "Snapshots taken through the API",
        s.taken as f64,
    );
    p.one(
        "ffmk_snapshot_failures_total",
        Kind::Counter,
        "Snapshots asked for that failed",
        s.failed as f64,
    );
    if let Some(r) = &s.last {
        p.one(
            "ffmk_snapshot_last_pause_seconds",
            Kind::Gauge,
            "How long the last snapshot paused the guest",
            r.pause_ms / 1e3,
        );
        p.one(
            "ffmk_snapshot_last_duration_seconds",
            Kind::Gauge,
            "How long the last snapshot took",
            r.total_ms / 1e3,
        );
        p.one(
            "ffmk_snapshot_last_bytes",
            Kind::Gauge,
            "Data the last snapshot wrote",
            r.data_bytes as f64,
        );
    }
}
