//! ffmk-vmm, the monitor. Read top-down: `cli` (what the user asks) →
//! `config` (validated VM configuration) → `vm` (memory, KVM VM, boot,
//! devices, vCPU threads) → `vcpu` (the `KVM_RUN` loop) → `control` (the
//! event loop that ends the VM) and `api` (REST over a Unix socket);
//! `checkpoint` takes snapshots and restores from them (`arch::state` holds
//! the KVM state path); `passthrough` puts host functions (crate
//! `vfio-ib`) on the PCI bus and `agent` asks the guest to let go of them.
pub mod access;
pub mod agent;
pub mod api;
pub mod arch;
pub mod boot;

pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod decouple;
pub mod host;
pub mod info;
pub mod irq;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod passthrough;
pub mod reach;
pub mod reference;
pub mod vcpu;
pub mod vm;
