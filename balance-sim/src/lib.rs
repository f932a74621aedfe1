//! The simulators and comparisons behind ffmk-vmm's balancing and
//! checkpoint coordination (`balance`'s algorithms, run at scale without
//! hosts), and their plots:
//!
//! - [`gossip_sim`]: a discrete-event simulator of a gossiping colony on
//!   the same board code (`ffmk-node gossip-sim`);
//! - [`workload`], [`baseline`], [`evaluate`], [`plot`]: synthetic
//!   FFMK-like workloads, the METIS baseline and the comparison
//!   `ffmk-node balance-sim` runs, and its PNG plot;
//! - [`ckpt_sim`]: jobs checkpointing to one burst buffer, with and without
//!   the coordinator (`ffmk-node ckpt-sim`).
pub mod baseline;
pub mod ckpt_sim;
pub mod evaluate;
pub mod gossip_sim;
pub mod plot;
pub mod workload;
