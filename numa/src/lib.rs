//! Guest NUMA and CPU topology for ffmk-vmm.
//!
//! - [`guest`]: the nodes a VM is given (`--numa node=0,cpus=0-3,memory=4G,host-node=0`),
//!   checked in one place against its vCPUs and memory ([`Layout`]);
//! - [`host`]: the host's nodes as sysfs shows them (CPUs, free memory,
//!   free huge pages per node) and the binding of guest memory to them
//!   (`mbind`, `MPOL_BIND`);
//! - [`shape`]: sockets, cores and threads (`--topology`) and the APIC IDs
//!   that encode them.
//!
//! The guest sees the layout through ACPI (SRAT, SLIT, the MADT's APIC IDs)
//! and CPUID (leaves 0xB/0x1F, the cache leaves), written by the VMM from
//! [`Layout`] and [`CpuShape`]; the VMM binds each node's memory and pins each node's
//! vCPUs to the host node's CPUs.
pub mod guest;
pub mod host;
pub mod shape;

pub use guest::{Layout, Node, NodeSpec};
pub use shape::CpuShape;
