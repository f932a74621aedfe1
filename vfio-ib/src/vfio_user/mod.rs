//! vfio-user: a PCI function served by another process over a Unix
//! socket (software devices, and a second way to test passthrough).
//! [`wire`] is the message format both sides use; [`client`] is the
//! VMM's side, a [`crate::Backend`].
pub mod client;
pub mod wire;

pub use client::{GuestDma, NotRam, VfioUser};
