//! Snapshot directories: create, extend with a layer, open and verify,
//! compact. The manifest is the commit point: every other file is written
//! and synced first, and a failure removes what it wrote, so an existing
//! snapshot is never damaged and a half snapshot never looks complete.
use crate::manifest::{now_unix_ms, FileEntry, HostProfile, Layer, LayerKind, Manifest};
use crate::memory::{self, PageBitmap, Written, CHUNK_PAGES};
use crate::{FORMAT_NAME, FORMAT_VERSION, PAGE_SIZE};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot directory {0} already exists (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("{0} is not a snapshot (no manifest.json)")]
    NotASnapshot(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot manifest {path} is corrupt: {detail}")]
    BadManifest { path: PathBuf, detail: String },
    #[error("snapshot {path} has format version {found}; this ffmk-vmm reads version {want}")]
    Version {
        path: PathBuf,
        found: u32,
        want: u32,
    },
    #[error("snapshot file {0} is missing (layer or state lost)")]
    Missing(PathBuf),
    #[error(
        "snapshot file {path} is truncated or resized ({bytes} bytes, the manifest says {want})"
    )]
    Size {
        path: PathBuf,
        bytes: u64,
        want: u64,
    },
    #[error("snapshot file {0} fails its checksum (corrupt)")]
    Checksum(PathBuf),
    #[error(
        "snapshot file {path} holds data in page {page}, which its layer does not define \
         (only holes or zeros may be there): corrupt or tampered with"
    )]
    StrayData { path: PathBuf, page: u64 },
    #[error("{0}")]
    Chain(String),
}

type Result<T> = std::result::Result<T, Error>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An opened snapshot whose manifest and file sizes were checked.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// Reads the manifest and checks the format, the chain's shape and that
    /// every file exists with the recorded size. Checksums: [`Snapshot::verify`].
    pub fn open(dir: &Path) -> Result<Snapshot> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotASnapshot(dir.into()))
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        let bad = |detail: String| Error::BadManifest {
            path: path.clone(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            return Err(bad(format!("not an {FORMAT_NAME} manifest")));
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(Error::Version {
                path: dir.into(),
                found,
                want: FORMAT_VERSION,
            });
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let s = Snapshot {
            dir: dir.into(),
            manifest,
        };
        s.check_shape().map_err(bad)?;
        s.check_file(&s.manifest.state)?;
        for l in &s.manifest.layers {
            s.check_file(&l.memory)?;
            s.check_file(&l.pages)?;
        }
        Ok(s)
    }

    fn check_shape(&self) -> std::result::Result<(), String> {
        let m = &self.manifest;
        let bytes = m.memory_file_bytes();
        if bytes != m.memory_bytes || bytes % PAGE_SIZE != 0 || m.regions.is_empty() {
            return Err(format!(
                "regions cover {bytes} bytes, memory is {} bytes",
                m.memory_bytes
            ));
        }
        match m.layers.first() {
            None => return Err("no memory layers".into()),
            Some(l) if l.kind != LayerKind::Full => {
                return Err("the first layer is not a full one".into())
            }
            _ => {}
        }
        if m.layers[1..]
            .iter()
            .any(|l| l.kind != LayerKind::Incremental)
        {
            return Err("a full layer in the middle of the chain".into());
        }
        for l in &m.layers {
            if l.memory.bytes != bytes {
                return Err(format!("layer {} is not the size of memory", l.memory.name));
            }
        }
        m.check_names().map_err(|e| e.to_string())
    }

    fn check_file(&self, f: &FileEntry) -> Result<()> {
        let path = self.dir.join(&f.name);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Missing(path)),
            Err(e) => return Err(io("read", &path)(e)),
        };
        if meta.len() != f.bytes {
            return Err(Error::Size {
                path,
                bytes: meta.len(),
                want: f.bytes,
            });
        }
        Ok(())
    }

    pub fn pages(&self) -> u64 {
        self.manifest.memory_bytes / PAGE_SIZE
    }

    /// The state file's bytes, checksum checked.
    pub fn read_state(&self) -> Result<Vec<u8>> {
        let path = self.dir.join(&self.manifest.state.name);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        if crc32fast::hash(&data) != self.manifest.state.crc32 {
            return Err(Error::Checksum(path));
        }
        Ok(data)
    }

    /// Layer `i`'s memory file (opened read-only) and page bitmap (checked).
    pub fn layer(&self, i: usize) -> Result<(File, PageBitmap)> {
        let l = &self.manifest.layers[i];
        let bpath = self.dir.join(&l.pages.name);
        let bytes = std::fs::read(&bpath).map_err(io("read", &bpath))?;
        if crc32fast::hash(&bytes) != l.pages.crc32 {
            return Err(Error::Checksum(bpath));
        }
        let bits = PageBitmap::from_bytes(self.pages(), &bytes).ok_or(Error::Size {
            path: bpath.clone(),
            bytes: bytes.len() as u64,
            want: self.pages().div_ceil(64) * 8,
        })?;
        let mpath = self.dir.join(&l.memory.name);
        let file = File::open(&mpath).map_err(io("open", &mpath))?;
        Ok((file, bits))
    }

    pub fn layer_path(&self, i: usize) -> PathBuf {
        self.dir.join(&self.manifest.layers[i].memory.name)
    }

    /// Checks every checksum (state, bitmaps, the defined pages of each
    /// layer). Reads only defined pages: cost follows the data stored.
    pub fn verify(&self) -> Result<()> {
        let mut all = vec![self.manifest.state.name.clone()];
        all.extend(self.manifest.layers.iter().map(|l| l.memory.name.clone()));
        self.verify_files(&all)
    }

    /// Checks the checksums of the files named in `files` only (state,
    /// bitmaps, layers): for a copy whose other files were verified before.
    pub fn verify_files(&self, files: &[String]) -> Result<()> {
        let named = |n: &str| files.iter().any(|f| f == n);
        if named(&self.manifest.state.name) {
            self.read_state()?;
        }
        for (i, l) in self.manifest.layers.iter().enumerate() {
            if named(&l.memory.name) || named(&l.pages.name) {
                let (file, bits) = self.layer(i)?;
                let path = self.dir.join(&l.memory.name);
                let crc = memory::checksum_layer(&file, &bits).map_err(io("read", &path))?;
                if crc != l.memory.crc32 {
                    return Err(Error::Checksum(path));
                }
                if let Some(page) = memory::stray_data(&file, &bits).map_err(io("read", &path))? {
                    return Err(Error::StrayData { path, page });
                }
            }
        }
        Ok(())
    }

    /// Copies the pages of layers `from..` into `mem` (the layers on top of
    /// a base that is already there).
    pub fn apply_layers(&self, from: usize, mem: &memory::GuestMemory) -> Result<()> {
        for i in from..self.manifest.layers.len() {
            let (file, bits) = self.layer(i)?;
            memory::apply_layer(&file, &bits, mem).map_err(io("read", &self.layer_path(i)))?;
        }
        Ok(())
    }
}

/// Everything but memory that goes into a new manifest.
pub struct Commit {
    pub written: Written,
    pub live: bool,
    pub pause_ms: f64,
    pub state: Vec<u8>,
    pub vm_config: serde_json::Value,
    pub host: HostProfile,
    pub memory_bytes: u64,
    pub regions: Vec<(u64, u64)>,
}

enum Mode {
    /// A new snapshot built in `work` (a sibling temp dir), renamed to
    /// `dir`; or, `in_place`, written straight into `dir`, an empty
    /// directory prepared for it (a job's directory on a burst buffer,
    /// whose parent may not be writable): its manifest, written last, is
    /// what makes it a snapshot.
    New { replace: bool, in_place: bool },
    /// A layer added to the existing chain in `dir`.
    Extend(Box<Manifest>),
}

/// A snapshot or layer being written; dropped without `commit`, it removes
/// what it wrote.
pub struct Pending {
    dir: PathBuf,
    work: PathBuf,
    mode: Mode,
    created: Vec<PathBuf>,
    done: bool,
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Fall back to time and pid: unique enough to tell chains apart.
        let t = now_unix_ms() ^ (u64::from(std::process::id()) << 40);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `m` as `dir`'s manifest: to a temporary file, synced, then
/// renamed over the old one (the commit point), then the directory synced.
/// On failure the old manifest is untouched and the temporary file gone.
fn publish_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(m).map_err(|e| Error::BadManifest {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let tmp = dir.join(format!(".{MANIFEST}.tmp"));
    let done = write_synced(&tmp, &text)
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(io("rename", &tmp)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done?;
    sync_dir(dir);
    Ok(())
}

/// An existing directory with nothing in it.
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// A new file, never one that exists (nothing is written over).
fn create_new(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(data).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

impl Pending {
    /// Starts a full snapshot into `dir`, which must not exist unless
    /// `replace` (then it is swapped only once the new one is complete).
    pub fn full(dir: &Path, replace: bool) -> Result<Pending> {
        if is_empty_dir(dir) {
            return Ok(Pending {
                dir: dir.into(),
                work: dir.into(),
                mode: Mode::New {
                    replace,
                    in_place: true,
                },
                created: Vec::new(),
                done: false,
            });
        }
        if dir.exists() && !replace {
            return Err(Error::Exists(dir.into()));
        }
        let name = dir
            .file_name()
            .ok_or_else(|| Error::Chain(format!("{} is not a directory name", dir.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let work = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(io("create", &work))?;
        Ok(Pending {
            dir: dir.into(),
            work,
            mode: Mode::New {
                replace,
                in_place: false,
            },
            created: Vec::new(),
            done: false,
        })
    }

    /// Starts an incremental layer on the chain in `dir`, which must be the
    /// chain `chain_id` at `generation` (what the VM last wrote or restored).
    pub fn extend(dir: &Path, chain_id: &str, generation: u64) -> Result<Pending> {
        let s = Snapshot::open(dir)?;
        if s.manifest.chain_id != chain_id || s.manifest.generation != generation {
            return Err(Error::Chain(format!(
                "{} holds chain {} at generation {}, but this VM's memory follows chain {chain_id} \
                 at generation {generation}; take a full snapshot first",
                dir.display(),
                s.manifest.chain_id,
                s.manifest.generation
            )));
        }
        Ok(Pending {
            dir: dir.into(),
            work: dir.into(),
            mode: Mode::Extend(Box::new(s.manifest)),
            created: Vec::new(),
            done: false,
        })
    }

    fn generation(&self) -> u64 {
        match &self.mode {
            Mode::New { .. } => 1,
            Mode::Extend(m) => m.generation + 1,
        }
    }

    fn new_file(&mut self, name: &str) -> Result<(PathBuf, File)> {
        let path = self.work.join(name);
        let f = create_new(&path)?;
        self.created.push(path.clone());
        Ok((path, f))
    }

    /// The layer's memory file, empty, for [`memory::write_layer`].
    pub fn memory_file(&mut self) -> Result<File> {
        let name = format!("mem-{}.bin", self.generation());
        Ok(self.new_file(&name)?.1)
    }

    /// Writes bitmap, state and manifest and makes the snapshot visible.
    pub fn commit(mut self, c: Commit) -> Result<Manifest> {
        let generation = self.generation();
        let mem_name = format!("mem-{generation}.bin");
        let mpath = self.work.join(&mem_name);
        File::open(&mpath)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &mpath))?;
        let bits = c.written.defined.to_bytes();
        let pages_name = format!("pages-{generation}.bin");
        let (ppath, _) = self.new_file(&pages_name)?;
        write_synced(&ppath, &bits)?;
        let state_name = format!("state-{generation}.json");
        let (spath, _) = self.new_file(&state_name)?;
        write_synced(&spath, &c.state)?;
        let memory_file_bytes: u64 = c.regions.iter().map(|(_, l)| l).sum();
        let layer = Layer {
            kind: match self.mode {
                Mode::New { .. } => LayerKind::Full,
                Mode::Extend(_) => LayerKind::Incremental,
            },
            live: c.live,
            memory: FileEntry {
                name: mem_name,
                bytes: memory_file_bytes,
                crc32: c.written.crc32,
            },
            pages: FileEntry {
                name: pages_name,
                bytes: bits.len() as u64,
                crc32: crc32fast::hash(&bits),
            },
            pages_defined: c.written.defined.count(),
            data_bytes: c.written.data_bytes,
            pause_ms: c.pause_ms,
            created_unix_ms: now_unix_ms(),
        };
        let state = FileEntry {
            name: state_name,
            bytes: c.state.len() as u64,
            crc32: crc32fast::hash(&c.state),
        };
        let (manifest, old_state) = match &self.mode {
            Mode::New { .. } => (
                Manifest {
                    format: FORMAT_NAME.into(),
                    version: FORMAT_VERSION,
                    chain_id: random_id(),
                    generation,
                    created_unix_ms: now_unix_ms(),
                    vm_config: c.vm_config,
                    host: c.host,
                    memory_bytes: c.memory_bytes,
                    regions: c.regions,
                    layers: vec![layer],
                    state,
                },
                None,
            ),
            Mode::Extend(base) => {
                let mut m = (**base).clone();
                m.generation = generation;
                m.vm_config = c.vm_config;
                m.layers.push(layer);
                let old = std::mem::replace(&mut m.state, state);
                (m, Some(old.name))
            }
        };
        self.write_manifest(&manifest)?;
        match self.mode {
            Mode::New { in_place: true, .. } => {}
            Mode::New { replace, .. } => self.publish(replace)?,
            Mode::Extend(_) => {
                if let Some(old) = old_state {
                    let _ = std::fs::remove_file(self.dir.join(old));
                }
            }
        }
        self.done = true;
        Ok(manifest)
    }

    fn write_manifest(&mut self, m: &Manifest) -> Result<()> {
        publish_manifest(&self.work, m)
    }

    /// Moves the finished work directory to its name (swapping out an old
    /// snapshot only when asked to replace it).
    fn publish(&mut self, replace: bool) -> Result<()> {
        let old = self.dir.with_file_name(format!(
            ".{}.old-{}",
            self.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let had_old = replace && self.dir.exists();
        if had_old {
            std::fs::rename(&self.dir, &old).map_err(io("move aside", &self.dir))?;
        }
        if let Err(e) = std::fs::rename(&self.work, &self.dir) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dir);
            }
            return Err(io("publish", &self.dir)(e));
        }
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        if let Some(p) = self.dir.parent() {
            sync_dir(p);
        }
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.mode {
            Mode::New {
                in_place: false, ..
            } => {
                let _ = std::fs::remove_dir_all(&self.work);
            }
            Mode::New { in_place: true, .. } | Mode::Extend(_) => {
                for p in &self.created {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

/// The set runs of `bits`, cut into pieces of at most [`CHUNK_PAGES`].
fn chunks(bits: &PageBitmap) -> impl Iterator<Item = (u64, u64)> {
    bits.runs().into_iter().flat_map(|(start, count)| {
        (0..count.div_ceil(CHUNK_PAGES)).map(move |k| {
            let s = start + k * CHUNK_PAGES;
            (s, CHUNK_PAGES.min(start + count - s))
        })
    })
}

/// Folds the chain in `dir` into one full layer, in place: the new layer
/// and manifest are written first, then the old layers are removed. Chain
/// id and generation stay, so the VM that wrote the chain can extend it.
pub fn compact(dir: &Path) -> Result<Manifest> {
    let s = Snapshot::open(dir)?;
    s.verify()?;
    let mut m = s.manifest.clone();
    if m.layers.len() == 1 {
        return Ok(m);
    }
    let pages = s.pages();
    let name = format!("mem-{}c.bin", m.generation);
    let path = dir.join(&name);
    let out = create_new(&path)?;
    let pages_name = format!("pages-{}c.bin", m.generation);
    let ppath = dir.join(&pages_name);
    // Until the manifest names them, the new files are removed on failure.
    let cleanup = |e: Error| {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&ppath);
        e
    };
    out.set_len(m.memory_bytes)
        .map_err(io("size", &path))
        .map_err(cleanup)?;
    // Newest layer wins: copy layers oldest first, defined pages only.
    let mut union = PageBitmap::new(pages);
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    for i in 0..m.layers.len() {
        let (file, bits) = s.layer(i).map_err(cleanup)?;
        for (start, count) in chunks(&bits) {
            let len = (count * PAGE_SIZE) as usize;
            file.read_exact_at(&mut buf[..len], start * PAGE_SIZE)
                .map_err(io("read", &s.layer_path(i)))
                .map_err(cleanup)?;
            out.write_all_at(&buf[..len], start * PAGE_SIZE)
                .map_err(io("write", &path))
                .map_err(cleanup)?;
        }
        union.union(&bits);
    }
    // Keep only non-zero pages defined, and punch the zero ones out.
    let mut defined = PageBitmap::new(pages);
    let mut crc = crc32fast::Hasher::new();
    let mut data_bytes = 0;
    for (start, count) in chunks(&union) {
        let len = (count * PAGE_SIZE) as usize;
        out.read_exact_at(&mut buf[..len], start * PAGE_SIZE)
            .map_err(io("read", &path))
            .map_err(cleanup)?;
        for (i, page) in buf[..len].chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = start + i as u64;
            if memory::is_zero(page) {
                memory::punch_page(&out, p * PAGE_SIZE)
                    .map_err(io("write", &path))
                    .map_err(cleanup)?;
                continue;
            }
            defined.set(p);
            crc.update(page);
            data_bytes += PAGE_SIZE;
        }
    }
    out.sync_all().map_err(io("sync", &path)).map_err(cleanup)?;
    let bits = defined.to_bytes();
    write_synced(&ppath, &bits).map_err(cleanup)?;
    let old_files: Vec<String> = m
        .layers
        .iter()
        .flat_map(|l| [l.memory.name.clone(), l.pages.name.clone()])
        .collect();
    let last = m.layers.last().cloned();
    m.layers = vec![Layer {
        kind: LayerKind::Full,
        live: false,
        memory: FileEntry {
            name,
            bytes: m.memory_bytes,
            crc32: crc.finalize(),
        },
        pages: FileEntry {
            name: pages_name,
            bytes: bits.len() as u64,
            crc32: crc32fast::hash(&bits),
        },
        pages_defined: defined.count(),
        data_bytes,
        pause_ms: last.map(|l| l.pause_ms).unwrap_or(0.0),
        created_unix_ms: now_unix_ms(),
    }];
    publish_manifest(dir, &m).map_err(cleanup)?;
    for f in old_files {
        let _ = std::fs::remove_file(dir.join(f));
    }
    Ok(m)
}
