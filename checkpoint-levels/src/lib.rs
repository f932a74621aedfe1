//! Multi-level checkpoints on top of snapshots.
//!
//! A checkpoint is a snapshot directory (the `snapshot` crate's format)
//! written by the VMM to the fastest level, the `local` one; the slower
//! levels are filled from it while the guest runs:
//!
//! - directory levels (`local`, `burst-buffer`, `pfs`) hold
//!   `DIR/JOB/NAME/`, one snapshot chain per NAME ([`dirlevel`]);
//! - a `partner` level streams the copy to another host's endpoint
//!   (`ffmk-vmm checkpoint serve`), which keeps it as a directory level of
//!   its own ([`wire`], [`server`], [`client`]);
//! - an `xor` level spreads parity across a group of N hosts so that one
//!   lost host per group can be rebuilt from the others ([`xor`]).
//!
//! Every copy is staged in a hidden directory, verified against the
//! manifest's checksums and only then made visible, so a copy that can be
//! seen is complete. Incremental chains are copied incrementally: only the
//! layers a level does not hold yet travel. [`interval`] computes per-level
//! intervals (Young/Daly), [`service`] ties it together (take, list, pick
//! the newest valid copy for restore).
pub mod archive;
pub mod client;
pub mod config;
pub mod dirlevel;
pub mod files;
pub mod interval;
pub mod progress;
pub mod server;
pub mod service;
pub mod wire;
pub mod xor;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// The network or the peer failed, or the peer refused.
    #[error("{peer}: {detail}")]
    Peer { peer: String, detail: String },
    /// A malformed archive (stream or file).
    #[error("bad checkpoint archive: {0}")]
    Archive(String),
    #[error("{0}")]
    Refused(String),
    /// The VM to checkpoint is gone (its VMM cannot be reached).
    #[error("the VM is gone: {0}")]
    VmGone(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Names used as path components (jobs, groups, copies): no separators, no
/// hidden names, nothing a peer could use to escape its directory.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "bad {what} name '{name}': use 1-128 of A-Z a-z 0-9 . _ - (not starting with '.')"
        )))
    }
}
