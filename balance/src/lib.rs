//! Cluster load balancing for ffmk-vmm: the policy that decides when and
//! where ranks (VMs) move; `migrate/` is the mechanism.
//!
//! - [`gossip`]: the bulletin board every node keeps about every node;
//! - [`sim`]: a discrete-event simulator of a gossiping colony on the same
//!   board code;
//! - [`diffusion`]: nearest-neighbour diffusion repartitioning of a task
//!   graph (flows, task selection, refinement) and its metrics;
//! - [`workload`], [`baseline`], [`evaluate`]: synthetic FFMK-like
//!   workloads, the METIS baseline and the comparison `balance-sim` runs;
//! - [`node`]: the `ffmk-node run` daemon (board over UDP, policy, moves by
//!   live migration) and [`hostlist`], Slurm-style host lists.
pub mod baseline;
pub mod ckpt;
pub mod diffusion;
pub mod evaluate;
pub mod gossip;
pub mod hostlist;
pub mod node;
pub mod plot;
pub mod sim;
pub mod workload;
