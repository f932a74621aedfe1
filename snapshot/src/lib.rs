//! The ffmk-vmm snapshot format.
//!
//! A snapshot is a directory:
//!
//! - `manifest.json` ([`Manifest`]): format version, the VM configuration,
//!   the host/CPU profile it was taken on, the memory layout, the chain of
//!   memory layers and the state file, each with its size and checksum. The
//!   manifest is written last and renamed into place, so it is the commit
//!   point: a snapshot whose manifest is missing is not a snapshot.
//! - `state-G.json`: the device and vCPU state (opaque to this crate: the VMM
//!   serialises it), for the newest generation G only.
//! - `mem-L.bin` + `pages-L.bin` per layer L: a memory file laid out like
//!   guest RAM (the RAM regions back to back), sparse, with only the pages
//!   the layer defines written; and a bitmap of the pages it defines. A full
//!   layer defines every page (pages not in its bitmap are zero, and are
//!   holes in the file), so it can be `mmap`ed `MAP_PRIVATE` as guest memory.
//!   An incremental layer defines the pages dirtied since the previous one
//!   (a dirtied page that became zero is defined and a hole).
//!
//! [`memory`] writes and applies layers; [`store`] creates, extends,
//! verifies and compacts snapshot directories without ever leaving a
//! half-written snapshot that looks complete.
pub mod manifest;
pub mod memory;
pub mod store;

pub use manifest::{
    FileEntry, HostProfile, Layer, LayerKind, Manifest, FORMAT_NAME, FORMAT_VERSION,
};
pub use memory::{PageBitmap, Selection};
pub use store::{compact, Commit, Error, Pending, Snapshot};

/// Guest page size the memory files are organised in.
pub const PAGE_SIZE: u64 = 4096;
