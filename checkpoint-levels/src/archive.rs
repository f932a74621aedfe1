//! One stream for a set of sparse files: what the partner level sends over
//! TCP and what the XOR level computes parity over.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! "FFMKARC1"  u32 files
//! per file:   u16 name length, name, u64 size, u32 extents, extents x (u64 offset, u64 length)
//! data:       every extent's bytes, files and extents in header order
//! trailer:    u32 CRC-32 of everything before it
//! ```
//!
//! Holes are not sent. The reader trusts nothing: names must be plain file
//! names, extents must be ordered, inside the file and not overlapping, and
//! the trailer must match; files are created new (never over existing ones).
use crate::files::{data_extents, BLOCK};
use crate::{io, Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FFMKARC1";
/// Bounds a malicious header cannot exceed.
const MAX_FILES: u32 = 4096;
const MAX_NAME: usize = 255;
const MAX_FILE_BYTES: u64 = 1 << 44;

struct Entry {
    name: String,
    path: PathBuf,
    size: u64,
    extents: Vec<(u64, u64)>,
}

/// Files to be sent, with their extents found up front so the stream's
/// length is known before it starts.
pub struct Plan {
    entries: Vec<Entry>,
    header: Vec<u8>,
}

impl Plan {
    /// The files `names` of directory `dir`.
    pub fn new(dir: &Path, names: &[String]) -> Result<Plan> {
        let mut entries = Vec::new();
        for name in names {
            let path = dir.join(name);
            let f = File::open(&path).map_err(io("open", &path))?;
            let size = f.metadata().map_err(io("stat", &path))?.len();
            let extents = data_extents(&f, size).map_err(io("read", &path))?;
            entries.push(Entry {
                name: name.clone(),
                path,
                size,
                extents,
            });
        }
        let mut header = MAGIC.to_vec();
        header.extend((entries.len() as u32).to_le_bytes());
        for e in &entries {
            header.extend((e.name.len() as u16).to_le_bytes());
            header.extend(e.name.as_bytes());
            header.extend(e.size.to_le_bytes());
            header.extend((e.extents.len() as u32).to_le_bytes());
            for (o, l) in &e.extents {
                header.extend(o.to_le_bytes());
                header.extend(l.to_le_bytes());
            }
        }
        Ok(Plan { entries, header })
    }

    /// Bytes the stream will have.
    pub fn len(&self) -> u64 {
        self.header.len() as u64
            + self
                .entries
                .iter()
                .flat_map(|e| e.extents.iter().map(|(_, l)| l))
                .sum::<u64>()
            + 4
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the stream; `progress` gets the bytes written so far.
    /// Returns the stream's CRC-32 (its trailer).
    pub fn write(&self, out: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<u32> {
        let mut crc = crc32fast::Hasher::new();
        let net = |e: std::io::Error| Error::Archive(format!("cannot send: {e}"));
        out.write_all(&self.header).map_err(net)?;
        crc.update(&self.header);
        let mut sent = self.header.len() as u64;
        let mut buf = vec![0u8; BLOCK];
        for e in &self.entries {
            let f = File::open(&e.path).map_err(io("open", &e.path))?;
            for &(start, n) in &e.extents {
                let mut off = start;
                while off < start + n {
                    let k = BLOCK.min((start + n - off) as usize);
                    f.read_exact_at(&mut buf[..k], off)
                        .map_err(io("read", &e.path))?;
                    out.write_all(&buf[..k]).map_err(net)?;
                    crc.update(&buf[..k]);
                    off += k as u64;
                    sent += k as u64;
                    progress(sent);
                }
            }
        }
        let sum = crc.finalize();
        out.write_all(&sum.to_le_bytes()).map_err(net)?;
        out.flush().map_err(net)?;
        progress(sent + 4);
        Ok(sum)
    }
}

/// Reads from `r` while hashing what was read.
struct Hashing<'a> {
    r: &'a mut dyn Read,
    crc: crc32fast::Hasher,
    read: u64,
}

impl Hashing<'_> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Archive("truncated".into())
            } else {
                Error::Archive(format!("cannot receive: {e}"))
            }
        })?;
        self.crc.update(buf);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.exact(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn bad(detail: impl Into<String>) -> Error {
    Error::Archive(detail.into())
}

/// Unpacks a stream into `dir` (which must exist); returns the file names.
/// On any error the files it created are removed again.
pub fn unpack(r: &mut dyn Read, dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<Vec<String>> {
    let mut created = Vec::new();
    let result = unpack_into(r, dir, progress, &mut created);
    if result.is_err() {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

fn unpack_into(
    r: &mut dyn Read,
    dir: &Path,
    progress: &mut dyn FnMut(u64),
    created: &mut Vec<PathBuf>,
) -> Result<Vec<String>> {
    let mut h = Hashing {
        r,
        crc: crc32fast::Hasher::new(),
        read: 0,
    };
    let mut magic = [0u8; 8];
    h.exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not an ffmk checkpoint archive (bad magic)"));
    }
    let count = h.u32()?;
    if count > MAX_FILES {
        return Err(bad(format!("{count} files (at most {MAX_FILES})")));
    }
    let mut entries = Vec::new();
    for _ in 0..count {
        let n = h.u16()? as usize;
        if n == 0 || n > MAX_NAME {
            return Err(bad("bad file name length"));
        }
        let mut name = vec![0u8; n];
        h.exact(&mut name)?;
        let name = String::from_utf8(name).map_err(|_| bad("file name is not UTF-8"))?;
        crate::check_name("file", &name).map_err(|e| bad(e.to_string()))?;
        if entries.iter().any(|e: &Entry| e.name == name) {
            return Err(bad(format!("file {name} twice")));
        }
        let size = h.u64()?;
        if size > MAX_FILE_BYTES {
            return Err(bad(format!("file {name} claims {size} bytes")));
        }
        let k = h.u32()?;
        if u64::from(k) > size.div_ceil(4096) + 1 {
            return Err(bad(format!("file {name}: {k} extents for {size} bytes")));
        }
        let mut extents = Vec::with_capacity(k as usize);
        let mut end = 0u64;
        for _ in 0..k {
            let (o, l) = (h.u64()?, h.u64()?);
            if o < end || l == 0 || o.checked_add(l).is_none_or(|e| e > size) {
                return Err(bad(format!("file {name}: bad extent {o}+{l}")));
            }
            end = o + l;
            extents.push((o, l));
        }
        entries.push(Entry {
            path: dir.join(&name),
            name,
            size,
            extents,
        });
    }
    let mut buf = vec![0u8; BLOCK];
    for e in &entries {
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&e.path)
            .map_err(io("create", &e.path))?;
        created.push(e.path.clone());
        f.set_len(e.size).map_err(io("size", &e.path))?;
        for &(start, n) in &e.extents {
            let mut off = start;
            while off < start + n {
                let k = BLOCK.min((start + n - off) as usize);
                h.exact(&mut buf[..k])?;
                f.write_all_at(&buf[..k], off)
                    .map_err(io("write", &e.path))?;
                off += k as u64;
                progress(h.read);
            }
        }
        f.sync_all().map_err(io("sync", &e.path))?;
    }
    let want = h.crc.clone().finalize();
    let mut t = [0u8; 4];
    h.r.read_exact(&mut t)
        .map_err(|_| bad("truncated (no trailer)"))?;
    if u32::from_le_bytes(t) != want {
        return Err(bad("checksum mismatch"));
    }
    Ok(entries.into_iter().map(|e| e.name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ffmk-arc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sparse_file(path: &Path) {
        let f = File::create(path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 100], 40 << 20).unwrap();
    }

    #[test]
    fn round_trip_keeps_content_and_holes() {
        let src = tmp("src");
        let dst = tmp("dst");
        sparse_file(&src.join("mem-1.bin"));
        std::fs::write(src.join("state-1.json"), b"{\"x\":1}").unwrap();
        let names = vec!["mem-1.bin".to_string(), "state-1.json".to_string()];
        let plan = Plan::new(&src, &names).unwrap();
        let mut stream = Vec::new();
        plan.write(&mut stream, &mut |_| {}).unwrap();
        assert_eq!(stream.len() as u64, plan.len());
        assert!(stream.len() < 1 << 20, "holes were sent: {}", stream.len());
        let got = unpack(&mut stream.as_slice(), &dst, &mut |_| {}).unwrap();
        assert_eq!(got, names);
        for n in &names {
            assert_eq!(
                std::fs::read(src.join(n)).unwrap(),
                std::fs::read(dst.join(n)).unwrap()
            );
        }
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }

    #[test]
    fn damaged_streams_are_refused_and_leave_nothing() {
        let src = tmp("src2");
        sparse_file(&src.join("mem-1.bin"));
        let plan = Plan::new(&src, &["mem-1.bin".to_string()]).unwrap();
        let mut stream = Vec::new();
        plan.write(&mut stream, &mut |_| {}).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", stream[..stream.len() / 2].to_vec()),
            ("flipped", {
                let mut s = stream.clone();
                let n = s.len();
                s[n - 50] ^= 1;
                s
            }),
            ("garbage", b"hello world, not an archive".to_vec()),
            ("escape", {
                let mut s = MAGIC.to_vec();
                s.extend(1u32.to_le_bytes());
                s.extend(5u16.to_le_bytes());
                s.extend(b"../x1");
                s
            }),
        ];
        for (what, bytes) in cases {
            let dst = tmp(&format!("bad-{what}"));
            assert!(
                unpack(&mut bytes.as_slice(), &dst, &mut |_| {}).is_err(),
                "{what} accepted"
            );
            assert_eq!(
                std::fs::read_dir(&dst).unwrap().count(),
                0,
                "{what} left files"
            );
            let _ = std::fs::remove_dir_all(&dst);
        }
        let _ = std::fs::remove_dir_all(&src);
    }
}
