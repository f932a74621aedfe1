//! `manifest.json`: what a snapshot directory holds and how to check it.
use serde::{Deserialize, Serialize};

pub const FORMAT_NAME: &str = "ffmk-snapshot";
/// Bumped on any incompatible change of the manifest, state or memory files.
pub const FORMAT_VERSION: u32 = 1;

/// One file of the snapshot: its name in the directory, its length, and the
/// CRC-32 of its content (for memory files: of the pages the layer defines,
/// in page order, so holes are not read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Defines every page (pages not in the bitmap are zero).
    Full,
    /// Defines the pages dirtied since the previous layer.
    Incremental,
}

/// One memory layer of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub kind: LayerKind,
    /// Copied while the guest ran (dirty-log rounds) before the final pause.
    pub live: bool,
    pub memory: FileEntry,
    pub pages: FileEntry,
    /// Pages this layer defines (its bitmap's population).
    pub pages_defined: u64,
    /// Bytes of page data actually written (zero pages are holes).
    pub data_bytes: u64,
    /// How long the guest was paused for this layer.
    pub pause_ms: f64,
    pub created_unix_ms: u64,
}

/// Where the snapshot was taken: restore refuses an incompatible host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProfile {
    /// CPU vendor string from CPUID leaf 0 (e.g. "GenuineIntel").
    pub cpu_vendor: String,
    /// The VMM's CPU profile name the guest saw (e.g. "pvm", "host").
    pub cpu_profile: String,
    /// Host kind (pvm, vmx, svm).
    pub host_kind: String,
    pub tsc_khz: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Identifies the chain: an incremental snapshot extends only the chain
    /// its VM last wrote (or was restored from).
    pub chain_id: String,
    /// Snapshots taken into this chain so far (kept by `compact`).
    pub generation: u64,
    pub created_unix_ms: u64,
    /// The VM configuration (opaque here; the VMM reads it back).
    pub vm_config: serde_json::Value,
    pub host: HostProfile,
    /// Guest RAM size and its regions (guest physical address, length).
    pub memory_bytes: u64,
    pub regions: Vec<(u64, u64)>,
    pub layers: Vec<Layer>,
    /// Device and vCPU state of the newest generation.
    pub state: FileEntry,
}

impl Manifest {
    /// Bytes of a memory file: the regions back to back.
    pub fn memory_file_bytes(&self) -> u64 {
        self.regions.iter().map(|(_, len)| len).sum()
    }

    pub fn pause_ms(&self) -> f64 {
        self.layers.last().map(|l| l.pause_ms).unwrap_or(0.0)
    }

    /// Total bytes of the snapshot's files.
    pub fn stored_bytes(&self) -> u64 {
        self.state.bytes
            + self
                .layers
                .iter()
                .map(|l| l.data_bytes + l.pages.bytes)
                .sum::<u64>()
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A file name a manifest may hold: a plain name inside the snapshot's
/// directory (no path separator, no NUL, not `.`-hidden, not `..`, at most
/// 255 bytes). Every name (state, memory layers, bitmaps) is checked before
/// a file is opened, written or removed by it.
pub fn check_file_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0']);
    if ok {
        Ok(())
    } else {
        Err(NameError::Bad(name.into()))
    }
}

/// A file name a manifest may not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("bad file name {0:?} (a manifest names files inside its own directory only)")]
    Bad(String),
    #[error("file name {0:?} used twice in the manifest")]
    Twice(String),
}

impl Manifest {
    /// Every file name in the manifest passes [`check_file_name`], and no
    /// two entries name the same file.
    pub fn check_names(&self) -> Result<(), NameError> {
        let mut seen = std::collections::BTreeSet::new();
        let names = std::iter::once(&self.state.name).chain(
            self.layers
                .iter()
                .flat_map(|l| [&l.memory.name, &l.pages.name]),
        );
        for n in names {
            check_file_name(n)?;
            if n == crate::store::MANIFEST || !seen.insert(n) {
                return Err(NameError::Twice(n.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_inside_the_directory_pass() {
        for good in ["state-3.json", "mem-1.bin", "pages-2c.bin"] {
            assert!(check_file_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../outside/x.json",
            "/etc/passwd",
            ".hidden",
            "..",
            "a/b",
            "a\\b",
            "a\0b",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name(&"x".repeat(256)).is_err());
    }
}
