//! Decoupled vCPUs for HPC guests.
//!
//! A VM has *service* vCPUs, which run the guest OS, its interrupts and
//! daemons, and *compute* vCPUs, each alone on a host core, which run the
//! ranks' compute threads and nothing else. This crate holds the pieces
//! that make that true, in the order the VMM uses them:
//!
//! - [`topology`]: `--cpus service=S,compute=C`, vCPU roles, and the guest
//!   kernel parameters that keep the guest's own noise off compute CPUs;
//! - [`placement`]: `--pin service=LIST,compute=LIST[,io=LIST]`, checked
//!   against the host's online and isolated cores;
//! - [`affinity`]: pinning threads, SCHED_FIFO, per-core claims between
//!   VMMs, and reading placements back from `/proc`;
//! - [`exits`]: `KVM_CAP_X86_DISABLE_EXITS` and `KVM_CAP_HALT_POLL`;
//! - [`steer`]: MSI routes rewritten away from compute vCPUs, IOAPIC audit;
//! - [`kvmstats`]: per-vCPU exit counters from KVM's binary statistics;
//! - [`hostcheck`]: what on the host would disturb compute cores;
//! - [`guest`]: the guest side (`ffmk-decouple`): which CPUs are compute
//!   CPUs and which one a local rank gets.
pub mod affinity;
pub mod cpulist;
pub mod exits;
pub mod guest;
pub mod hostcheck;
pub mod kvmstats;
pub mod placement;
pub mod steer;
pub mod topology;

pub use cpulist::CpuList;
pub use placement::{HostCpus, PinSpec, Placement};
pub use topology::{Role, Topology};
