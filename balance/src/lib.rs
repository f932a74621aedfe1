//! Cluster load balancing for ffmk-vmm: the algorithms. Where ranks (VMs)
//! should run; `migrate/` is the mechanism, `ffmk-node/` the daemon that
//! runs these on every host, `balance-sim/` the simulators that sized them.
//!
//! - [`gossip`]: the bulletin board every node keeps about every node, and
//!   its datagrams;
//! - [`diffusion`]: nearest-neighbour diffusion repartitioning of a task
//!   graph (flows, task selection, refinement) and its metrics;
//! - [`ckpt`]: the checkpoint coordinator's state machine (jobs sharing a
//!   burst buffer);
//! - [`hostlist`]: Slurm-style host lists.
pub mod ckpt;
pub mod diffusion;
pub mod gossip;
pub mod hostlist;
