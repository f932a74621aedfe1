//! Landlock: the file system a confined VMM may reach.
//!
//! [`Paths`] lists what the VM's configuration names, by how it is used;
//! [`restrict`] turns it into a Landlock rule set for the calling thread
//! and every thread it starts afterwards (Landlock applies per thread, so
//! ffmk-vmm calls it before it starts any). Anything not listed is out of
//! reach: opening, creating, removing or renaming fails with EACCES.
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use std::path::{Path, PathBuf};

/// The newest Landlock ABI whose file-system rights the rules use (v5:
/// `ioctl` on device files). Older kernels enforce what they know.
const RULES_ABI: ABI = ABI::V5;

/// `--landlock`: whether the file system is restricted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Restricted when `--snapshot-dir` names where snapshots go (without
    /// it, an API client may name any directory, so writes cannot be
    /// limited).
    #[default]
    Auto,
    /// Restricted; without `--snapshot-dir` no snapshot can be written.
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--landlock takes auto, on or off, not {s:?}")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::On => "on",
            Mode::Off => "off",
        })
    }
}

/// What the VMM may reach, and how.
#[derive(Debug, Default, Clone)]
pub struct Paths {
    /// Read (files or whole trees): kernel, initramfs, a snapshot to
    /// restore, /proc and /sys, name-service files.
    pub read: Vec<PathBuf>,
    /// Read and write existing files (disk images, a console file).
    pub read_write: Vec<PathBuf>,
    /// Device files used with ioctl (/dev/net/tun, /dev/userfaultfd).
    pub devices: Vec<PathBuf>,
    /// Directories where Unix sockets are created and removed (the API
    /// socket, the vsock socket and its per-port sockets).
    pub socket_dirs: Vec<PathBuf>,
    /// Trees written freely: snapshot and checkpoint directories, the
    /// per-core claim files.
    pub trees: Vec<PathBuf>,
}

/// How far the kernel enforced the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    /// An older Landlock: some rights (such as truncate or device ioctl)
    /// are not restricted.
    Partly,
    /// No Landlock in this kernel: nothing is restricted.
    Not,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("Landlock: cannot open {path} for a rule: {source}")]
    Path {
        path: PathBuf,
        source: landlock::PathFdError,
    },
}

/// Restricts the calling thread (and the threads it starts later) to
/// `paths`. Paths that do not exist are skipped (a configuration names
/// them only where they exist: the caller checked what it needs).
pub fn restrict(paths: &Paths) -> Result<Enforced, Error> {
    let abi = RULES_ABI;
    let read = AccessFs::from_read(abi);
    let file_rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile;
    let tree = AccessFs::from_all(abi) & !AccessFs::Execute;
    let mut rules: Vec<(&Path, landlock::BitFlags<AccessFs>)> = Vec::new();
    rules.extend(paths.read.iter().map(|p| (p.as_path(), read)));
    rules.extend(paths.read_write.iter().map(|p| (p.as_path(), file_rw)));
    rules.extend(paths.devices.iter().map(|p| (p.as_path(), device)));
    rules.extend(paths.socket_dirs.iter().map(|p| (p.as_path(), sockets)));
    rules.extend(paths.trees.iter().map(|p| (p.as_path(), tree)));

    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .create()?;
    for (path, access) in rules {
        if !path.exists() {
            continue;
        }
        let fd = PathFd::new(path).map_err(|source| Error::Path {
            path: path.into(),
            source,
        })?;
        // Rights that only mean something for directories are dropped
        // for files (Landlock refuses them there).
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
