//! What an API client may make the VMM touch: the directories snapshots and
//! checkpoints may be written to (`--snapshot-dir`) and the hosts a VM may
//! be migrated to (`--migrate-to`), fixed when the VMM starts. Without
//! them, any directory the VMM's user can write and any host are allowed
//! (a VMM run by hand); a node's service sets both (docs/security.md).
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Access {
    /// Canonical directories; empty: any.
    pub snapshot_dirs: Vec<PathBuf>,
    /// `HOST` or `HOST:PORT`; empty: any.
    pub migrate_to: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--snapshot-dir {path}: {source}")]
    SnapshotDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--snapshot-dir {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("--migrate-to {0:?} is not HOST or HOST:PORT")]
    MigrateTo(String),
}

impl Access {
    /// Checks the settings (directories exist; hosts are well formed) and
    /// makes the directories canonical, once, at start.
    pub fn new(snapshot_dirs: &[PathBuf], migrate_to: &[String]) -> Result<Access, Error> {
        let mut dirs = Vec::new();
        for d in snapshot_dirs {
            let c = d.canonicalize().map_err(|source| Error::SnapshotDir {
                path: d.clone(),
                source,
            })?;
            if !c.is_dir() {
                return Err(Error::NotADirectory(d.clone()));
            }
            dirs.push(c);
        }
        for h in migrate_to {
            let ok = match h.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
                None => !h.is_empty(),
            };
            if !ok || h.contains('/') || h.chars().any(char::is_whitespace) {
                return Err(Error::MigrateTo(h.clone()));
            }
        }
        Ok(Access {
            snapshot_dirs: dirs,
            migrate_to: migrate_to.to_vec(),
        })
    }

    /// A snapshot or checkpoint destination is allowed if it lies inside
    /// one of the directories, after resolving symbolic links and `..` in
    /// the part that exists (the last component may not exist yet; it may
    /// not be `..`).
    pub fn check_snapshot_dest(&self, dest: &Path) -> Result<(), Refused> {
        if self.snapshot_dirs.is_empty() {
            return Ok(());
        }
        let refused = |why: &'static str| {
            Err(Refused::SnapshotDest {
                dest: dest.to_path_buf(),
                why,
                allowed: self
                    .snapshot_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        };
        if !dest.is_absolute() {
            return refused("not an absolute path");
        }
        let resolved = match dest.canonicalize() {
            Ok(p) => p,
            Err(_) => {
                let (Some(parent), Some(Component::Normal(name))) =
                    (dest.parent(), dest.components().next_back())
                else {
                    return refused("it does not name a directory");
                };
                match parent.canonicalize() {
                    Ok(p) => p.join(name),
                    Err(_) => return refused("its parent directory does not exist"),
                }
            }
        };
        if self
            .snapshot_dirs
            .iter()
            .any(|d| resolved.starts_with(d) && resolved != *d)
        {
            Ok(())
        } else {
            refused("outside the directories given with --snapshot-dir")
        }
    }

    /// A migration target (`HOST:PORT`) is allowed if its host, or host
    /// and port, is on the list.
    pub fn check_migration_target(&self, to: &str) -> Result<(), Refused> {
        if self.migrate_to.is_empty() {
            return Ok(());
        }
        let host = to.rsplit_once(':').map(|(h, _)| h).unwrap_or(to);
        if self.migrate_to.iter().any(|a| a == to || a == host) {
            Ok(())
        } else {
            Err(Refused::MigrationTarget {
                to: to.into(),
                allowed: self.migrate_to.join(", "),
            })
        }
    }
}

/// A destination the VMM was told not to write to or send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("snapshot destination {} is refused: {why} (allowed: {allowed})", dest.display())]
    SnapshotDest {
        dest: PathBuf,
        why: &'static str,
        allowed: String,
    },
    #[error(
        "migration to {to} is refused: not a host given with --migrate-to (allowed: {allowed})"
    )]
    MigrationTarget { to: String, allowed: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ffmk-access-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn destinations_must_stay_inside_the_snapshot_dirs() {
        let root = tmp("dirs");
        let allowed = root.join("bb");
        let other = root.join("elsewhere");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(&other, allowed.join("link")).unwrap();
        let a = Access::new(std::slice::from_ref(&allowed), &[]).unwrap();
        a.check_snapshot_dest(&allowed.join("snap1")).unwrap();
        a.check_snapshot_dest(&allowed.join("job/../snap2"))
            .unwrap_err();
        for bad in [
            other.join("snap"),
            allowed.join("../elsewhere/snap"),
            allowed.join("link/snap"),
            allowed.join("link"),
            allowed.clone(),
            PathBuf::from("relative/snap"),
            allowed.join("missing/snap"),
        ] {
            let e = a.check_snapshot_dest(&bad).unwrap_err();
            assert!(
                e.to_string().contains("is refused"),
                "{}: {e}",
                bad.display()
            );
        }
        // No list: anything goes.
        Access::default()
            .check_snapshot_dest(&other.join("x"))
            .unwrap();
        let e = Access::new(&[root.join("nope")], &[]).unwrap_err();
        assert!(e.to_string().contains("--snapshot-dir"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn migration_targets_must_be_listed() {
        let a = Access::new(&[], &["10.0.0.2".into(), "node7:7300".into()]).unwrap();
        a.check_migration_target("10.0.0.2:7300").unwrap();
        a.check_migration_target("10.0.0.2:1").unwrap();
        a.check_migration_target("node7:7300").unwrap();
        let e = a.check_migration_target("node7:7301").unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        a.check_migration_target("10.0.0.3:7300").unwrap_err();
        for bad in ["", "a b", "host:port", "tcp://x:1"] {
            Access::new(&[], &[bad.into()]).unwrap_err();
        }
    }
}
