//! File helpers: sparse extents and copies, and frozen views of a chain.
use crate::{io, Error, Result};
use snapshot::{Manifest, Snapshot};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Copy buffer size.
pub const BLOCK: usize = 1 << 20;

/// The data extents (offset, length) of `file`, whose length is `len`:
/// holes are skipped (a 4 GiB memory file with 100 MiB written has ~100 MiB
/// of extents). Filesystems without SEEK_DATA report one extent.
pub fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) if pos == 0 => return Ok(vec![(0, len)]),
                _ => return Err(e),
            }
        }
        let start = data as u64;
        if start >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}

/// Copies `src` to the new file `dst` keeping holes as holes; `progress`
/// gets the data bytes copied so far. Returns the data bytes copied.
pub fn copy_sparse(src: &Path, dst: &Path, progress: &mut dyn FnMut(u64)) -> Result<u64> {
    let from = File::open(src).map_err(io("open", src))?;
    let len = from.metadata().map_err(io("stat", src))?.len();
    let to = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io("create", dst))?;
    to.set_len(len).map_err(io("size", dst))?;
    let mut buf = Vec::new();
    let mut kernel_copy = true;
    let mut copied = 0u64;
    for (start, n) in data_extents(&from, len).map_err(io("read", src))? {
        let mut off = start;
        while off < start + n {
            let k = (8 * BLOCK).min((start + n - off) as usize);
            // In the kernel (no copy through user space) where the file
            // systems allow it; read/write otherwise.
            let done = if kernel_copy {
                match copy_range(&from, &to, off, k) {
                    Ok(d) if d > 0 => d,
                    _ => {
                        kernel_copy = false;
                        0
                    }
                }
            } else {
                0
            };
            let done = if done > 0 {
                done
            } else {
                let k = k.min(BLOCK);
                buf.resize(BLOCK, 0);
                from.read_exact_at(&mut buf[..k], off)
                    .map_err(io("read", src))?;
                to.write_all_at(&buf[..k], off).map_err(io("write", dst))?;
                k
            };
            off += done as u64;
            copied += done as u64;
            progress(copied);
        }
    }
    to.sync_all().map_err(io("sync", dst))?;
    Ok(copied)
}

/// `copy_file_range` of `len` bytes at `off` in both files.
fn copy_range(from: &File, to: &File, off: u64, len: usize) -> std::io::Result<usize> {
    let mut src = off as libc::loff_t;
    let mut dst = off as libc::loff_t;
    // SAFETY: both descriptors are open files we own; the offsets are
    // locals the kernel updates; no user memory is passed otherwise.
    let r = unsafe {
        libc::copy_file_range(from.as_raw_fd(), &mut src, to.as_raw_fd(), &mut dst, len, 0)
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The files of `m`, manifest excluded.
pub fn manifest_files(m: &Manifest) -> Vec<&snapshot::FileEntry> {
    let mut v = vec![&m.state];
    for l in &m.layers {
        v.push(&l.memory);
        v.push(&l.pages);
    }
    v
}

/// Writes `m` as the manifest of `dir` (temporary file, synced, renamed).
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let path = dir.join(snapshot::store::MANIFEST);
    let tmp = dir.join(".manifest.json.tmp");
    let text = serde_json::to_vec_pretty(m).map_err(|e| Error::Archive(e.to_string()))?;
    let r = File::create(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()
        })
        .map_err(io("write", &tmp))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(io("rename", &tmp)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A hidden sibling directory name that no other process uses.
pub fn hidden_sibling(parent: &Path, tag: &str, name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    parent.join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// A chain as of one generation, held still: its files hard-linked into a
/// hidden sibling directory, so later layers (which delete the previous
/// state file) or a replacement of the chain cannot change what is being
/// copied. Removed on drop.
pub struct Frozen {
    pub snapshot: Snapshot,
}

impl Frozen {
    pub fn of(chain: &Path) -> Result<Frozen> {
        let parent = chain.parent().unwrap_or(Path::new("."));
        let name = chain
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "chain".into());
        let mut last = None;
        // A layer committed between reading the manifest and linking its
        // files removes the old state file: read the manifest again.
        for _ in 0..5 {
            let m = Snapshot::open(chain)?.manifest;
            let dir = hidden_sibling(parent, "frozen", &name);
            std::fs::create_dir(&dir).map_err(io("create", &dir))?;
            let linked = manifest_files(&m).into_iter().try_for_each(|f| {
                std::fs::hard_link(chain.join(&f.name), dir.join(&f.name))
                    .map_err(io("link", &chain.join(&f.name)))
            });
            match linked.and_then(|()| write_manifest(&dir, &m)) {
                Ok(()) => match Snapshot::open(&dir) {
                    Ok(snapshot) => return Ok(Frozen { snapshot }),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e.into());
                    }
                },
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Refused(format!("cannot freeze {}", chain.display()))))
    }

    pub fn dir(&self) -> &Path {
        &self.snapshot.dir
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.snapshot.dir);
    }
}

/// Data bytes of the snapshot's files (what a copy moves).
pub fn data_bytes(s: &Snapshot) -> u64 {
    let m = &s.manifest;
    m.state.bytes
        + m.layers
            .iter()
            .map(|l| l.data_bytes + l.pages.bytes)
            .sum::<u64>()
}
