//! Fault-tolerant control broadcast: corrected trees.
//!
//! A command for every node of a job or cluster ("pause these VMs", "take a
//! coordinated checkpoint", "drain host X") must reach every node that is
//! alive, even when some died and nobody has noticed yet. A plain tree
//! loses the whole subtree of a dead node; flooding costs n² messages.
//! Corrected trees (after Hoefler et al.'s corrected gossip and Küttler et
//! al.'s corrected trees) do both phases:
//!
//! 1. **Tree phase** ([`tree`]): a binomial tree rooted at the origin. With
//!    the interleaved numbering the subtree of a node is spread around the
//!    ring (every other rank, every fourth, ...), so a dead node's subtree
//!    leaves single gaps between informed nodes instead of one long hole.
//! 2. **Checked correction** ([`node`]): every informed node sends to its
//!    ring neighbours, one more step out each time, alternating sides,
//!    until it hears a correction message from that side. An informed live
//!    node on each side of a gap walks into it, so every live node is
//!    reached while the correction costs only a few messages per node.
//!
//! The algorithm is one state machine ([`node::Node`]) with two drivers: a
//! discrete-event simulator in the LogP style ([`sim`], up to millions of
//! nodes) and a UDP runtime ([`udp`], one endpoint per host) that ffmk-node
//! runs. [`wire`] is the datagram format.
pub mod node;
pub mod sim;
pub mod tree;
pub mod udp;
pub mod wire;

pub use node::{Kind, Node};
pub use tree::Tree;
