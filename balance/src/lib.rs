//! Cluster load balancing for ffmk-vmm: the policy that decides when and
//! where ranks (VMs) move; `migrate/` is the mechanism.
//!
//! - [`gossip`]: the bulletin board every node keeps about every node;
//! - [`sim`]: a discrete-event simulator of a gossiping colony on the same
//!   board code;
//! - [`diffusion`]: nearest-neighbour diffusion repartitioning of a task
//!   graph (flows, task selection, refinement) and its metrics.
pub mod diffusion;
pub mod gossip;
pub mod sim;
