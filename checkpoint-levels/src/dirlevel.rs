//! A directory level: `ROOT = DIR/JOB`, one snapshot chain per `ROOT/NAME`.
//!
//! Copies arrive through [`DirLevel::install`]: the files a level lacks are
//! written into a hidden staging directory next to the copy, the files it
//! already holds (earlier layers of the same chain) are hard-linked in, the
//! whole is verified against the manifest's checksums, and only then does
//! the copy change — by renaming the new layer files in and the manifest
//! over (same chain), or by swapping the directory (new chain). A reader
//! never sees a copy that is not complete and valid.
use crate::files::{hidden_sibling, manifest_files, write_manifest};
use crate::{io, Result};
use serde::{Deserialize, Serialize};
use snapshot::{Manifest, Snapshot};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What a level holds of one copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyInfo {
    pub name: String,
    pub chain_id: String,
    pub generation: u64,
    /// When its newest layer was taken: the copy's age.
    pub taken_unix_ms: u64,
    pub stored_bytes: u64,
    pub memory_bytes: u64,
}

impl CopyInfo {
    pub fn of(name: &str, m: &Manifest) -> CopyInfo {
        CopyInfo {
            name: name.into(),
            chain_id: m.chain_id.clone(),
            generation: m.generation,
            taken_unix_ms: m
                .layers
                .last()
                .map(|l| l.created_unix_ms)
                .unwrap_or(m.created_unix_ms),
            stored_bytes: m.stored_bytes(),
            memory_bytes: m.memory_bytes,
        }
    }

    /// Newer first; equal times: the higher generation.
    pub fn newer_than(&self, other: &CopyInfo) -> bool {
        (self.taken_unix_ms, self.generation) > (other.taken_unix_ms, other.generation)
    }
}

/// A copy found in a level: usable (opened, sizes right) or not, and why.
pub enum Listed {
    Ok(CopyInfo, Box<Snapshot>),
    Broken { name: String, why: String },
}

pub struct DirLevel {
    pub root: PathBuf,
}

/// Removes a staging directory on every way out.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_names(m: &Manifest) -> BTreeSet<String> {
    manifest_files(m)
        .into_iter()
        .map(|f| f.name.clone())
        .collect()
}

impl DirLevel {
    pub fn new(dir: &Path, job: &str) -> DirLevel {
        DirLevel {
            root: dir.join(job),
        }
    }

    /// Every copy, newest first (broken ones at the end).
    pub fn list(&self) -> Result<Vec<Listed>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("read", &self.root)(e)),
        };
        let mut ok = Vec::new();
        let mut broken = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match Snapshot::open(&entry.path()) {
                Ok(s) => ok.push((CopyInfo::of(&name, &s.manifest), Box::new(s))),
                Err(e) => broken.push(Listed::Broken {
                    name,
                    why: e.to_string(),
                }),
            }
        }
        ok.sort_by(|a, b| {
            (b.0.taken_unix_ms, b.0.generation).cmp(&(a.0.taken_unix_ms, a.0.generation))
        });
        let mut out: Vec<Listed> = ok.into_iter().map(|(i, s)| Listed::Ok(i, s)).collect();
        out.extend(broken);
        Ok(out)
    }

    /// The copy `name`'s current manifest, if it is a copy of the same
    /// chain whose files agree with `m` (so only new files need to travel).
    fn same_chain(&self, name: &str, m: &Manifest) -> Option<Manifest> {
        let old = Snapshot::open(&self.root.join(name)).ok()?.manifest;
        if old.chain_id != m.chain_id || old.generation > m.generation {
            return None;
        }
        let new = manifest_files(m);
        let agree = manifest_files(&old)
            .into_iter()
            .all(|f| new.iter().all(|n| n.name != f.name || *n == f));
        agree.then_some(old)
    }

    /// The files of `m` this level must receive to hold copy `name`.
    pub fn needed(&self, name: &str, m: &Manifest) -> Vec<String> {
        let have = self
            .same_chain(name, m)
            .map(|old| {
                manifest_files(&old)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        manifest_files(m)
            .into_iter()
            .filter(|f| !have.contains(f))
            .map(|f| f.name.clone())
            .collect()
    }

    /// Makes copy `name` hold `m`. `fill(staging, needed)` must create the
    /// `needed` files in `staging`; everything is verified before the copy
    /// changes. Returns the number of files that travelled.
    pub fn install(
        &self,
        name: &str,
        m: &Manifest,
        fill: &mut dyn FnMut(&Path, &[String]) -> Result<()>,
    ) -> Result<usize> {
        crate::check_name("copy", name)?;
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        let target = self.root.join(name);
        let old = self.same_chain(name, m);
        let needed = self.needed(name, m);
        let stage = Staging(hidden_sibling(&self.root, "incoming", name));
        std::fs::create_dir(&stage.0).map_err(io("create", &stage.0))?;
        fill(&stage.0, &needed)?;
        for f in manifest_files(m) {
            if !needed.contains(&f.name) && !stage.0.join(&f.name).exists() {
                std::fs::hard_link(target.join(&f.name), stage.0.join(&f.name))
                    .map_err(io("link", &target.join(&f.name)))?;
            }
        }
        write_manifest(&stage.0, m)?;
        // Files already held were verified when they arrived and are never
        // changed: check what is new (a new chain: everything).
        let staged = Snapshot::open(&stage.0)?;
        if old.is_some() {
            staged.verify_files(&needed)?;
        } else {
            staged.verify()?;
        }
        if old.is_some() {
            for f in &needed {
                std::fs::rename(stage.0.join(f), target.join(f))
                    .map_err(io("move into place", &target.join(f)))?;
            }
            write_manifest(&target, m)?;
            let keep = file_names(m);
            for entry in std::fs::read_dir(&target)
                .map_err(io("read", &target))?
                .flatten()
            {
                let n = entry.file_name().to_string_lossy().into_owned();
                if n != snapshot::store::MANIFEST && !n.starts_with('.') && !keep.contains(&n) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        } else {
            let aside = hidden_sibling(&self.root, "old", name);
            let had = target.exists();
            if had {
                std::fs::rename(&target, &aside).map_err(io("move aside", &target))?;
            }
            if let Err(e) = std::fs::rename(&stage.0, &target) {
                if had {
                    let _ = std::fs::rename(&aside, &target);
                }
                return Err(io("publish", &target)(e));
            }
            if had {
                let _ = std::fs::remove_dir_all(&aside);
            }
        }
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        Ok(needed.len())
    }

    /// Keeps the `keep` newest valid copies (and `protect`); removes older
    /// ones and staging left behind by processes that died. Returns the
    /// names removed.
    pub fn prune(&self, keep: usize, protect: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut kept = 0;
        for l in self.list()? {
            if let Listed::Ok(info, s) = l {
                if info.name == protect || kept < keep {
                    kept += usize::from(info.name != protect);
                    continue;
                }
                std::fs::remove_dir_all(&s.dir).map_err(io("remove", &s.dir))?;
                removed.push(info.name);
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = stale_pid(&n) {
                    // SAFETY: kill with signal 0 only checks whether the pid exists.
                    if unsafe { libc::kill(pid, 0) } != 0 {
                        let _ = std::fs::remove_dir_all(e.path());
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes copy `name` if it exists but does not verify (so a good
    /// copy from elsewhere is not built on its damaged files).
    pub fn discard_if_invalid(&self, name: &str) -> Result<()> {
        let dir = self.root.join(name);
        if dir.exists() && Snapshot::open(&dir).and_then(|s| s.verify()).is_err() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        Ok(())
    }
}

/// The pid in a hidden staging name `.NAME.TAG-PID-N`.
fn stale_pid(name: &str) -> Option<i32> {
    if !name.starts_with('.') {
        return None;
    }
    let mut parts = name.rsplitn(3, '-');
    let _n = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    ["incoming", "old", "frozen", "fetch", "xor-archive"]
        .iter()
        .any(|t| rest.ends_with(&format!(".{t}")))
        .then_some(pid)
}

/// Copies the chain `src` (frozen) into `level` as copy `name`, sending only
/// the layers the level lacks. Returns (files copied, data bytes copied).
pub fn copy_into(
    level: &DirLevel,
    name: &str,
    src: &Snapshot,
    progress: &mut dyn FnMut(u64),
) -> Result<(usize, u64)> {
    let mut bytes = 0u64;
    let files = level.install(name, &src.manifest, &mut |stage, needed| {
        for f in needed {
            let base = bytes;
            bytes += crate::files::copy_sparse(&src.dir.join(f), &stage.join(f), &mut |n| {
                progress(base + n)
            })?;
        }
        Ok(())
    })?;
    Ok((files, bytes))
}
