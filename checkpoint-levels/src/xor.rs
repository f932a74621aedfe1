//! XOR parity across a group of N hosts (the SCR scheme).
//!
//! Member i's checkpoint is one archive of B_i bytes, cut into N−1 chunks
//! of S_i = ⌈B_i/(N−1)⌉ bytes (the last ones zero-padded). Chunk k of
//! member i goes to holder (i+k+1) mod N, so each holder j gets exactly one
//! chunk from every other member and stores their XOR (its parity, about
//! B/(N−1) bytes) next to its own archive: B·N/(N−1) per host in all.
//! When host m is lost, chunk k of its archive is parity_j XOR the chunks
//! the other members sent to j = (m+k+1) mod N — readable from the N−1
//! survivors. One loss per group is survivable; two are not.
//!
//! This module has the arithmetic and the holder's side (what an endpoint
//! stores); [`crate::client`] has the member's side (contribute, rebuild).
use crate::dirlevel::CopyInfo;
use crate::files::BLOCK;
use crate::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A member's checkpoint as the group knows it (sent with every part, so
/// any survivor can say what the lost member's archive was).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XorMeta {
    pub job: String,
    pub index: u32,
    pub copy: CopyInfo,
    pub archive_bytes: u64,
    pub archive_crc32: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum XorPart {
    /// Member `index`'s own archive.
    Data { index: u32 },
    /// The chunk for (or the parity of) holder `holder`.
    Parity { holder: u32, chunk_crc32: u32 },
}

/// What a holder keeps for one epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XorEpoch {
    pub epoch: u64,
    pub members: u32,
    /// Archives stored here (normally the holder's own).
    pub data: Vec<XorMeta>,
    pub parity: Option<ParityInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParityInfo {
    pub holder: u32,
    pub bytes: u64,
    pub crc32: u32,
    /// The members whose chunks are in it.
    pub from: Vec<XorMeta>,
}

impl ParityInfo {
    pub fn complete(&self, members: u32) -> bool {
        self.from.len() as u32 + 1 == members
    }
}

/// Chunk size S for an archive of `len` bytes in a group of `n`.
pub fn chunk_size(len: u64, n: u32) -> u64 {
    len.div_ceil(u64::from(n - 1)).max(1)
}

/// Byte range of chunk `k` (may be short or empty at the end).
pub fn chunk_range(len: u64, n: u32, k: u32) -> (u64, u64) {
    let s = chunk_size(len, n);
    let start = (u64::from(k) * s).min(len);
    (start, (start + s).min(len))
}

/// The holder of member `i`'s chunk `k`.
pub fn holder_of(i: u32, k: u32, n: u32) -> u32 {
    (i + k + 1) % n
}

/// Which chunk of member `i` holder `j` (≠ i) keeps.
pub fn chunk_at(i: u32, j: u32, n: u32) -> u32 {
    (j + n - i - 1) % n
}

/// An endpoint's store for one group: `DIR/xor/GROUP/EPOCH/`.
pub struct Holder {
    pub root: PathBuf,
}

fn json_file<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(v).map_err(|e| Error::Refused(e.to_string()))?;
    File::create(&tmp)
        .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

impl Holder {
    pub fn new(dir: &Path, group: &str) -> Holder {
        Holder {
            root: dir.join("xor").join(group),
        }
    }

    fn epoch_dir(&self, epoch: u64) -> PathBuf {
        self.root.join(epoch.to_string())
    }

    pub fn data_path(&self, epoch: u64, index: u32) -> PathBuf {
        self.epoch_dir(epoch).join(format!("data-{index}.arc"))
    }

    pub fn parity_path(&self, epoch: u64) -> PathBuf {
        self.epoch_dir(epoch).join("parity.bin")
    }

    fn members_path(&self, epoch: u64) -> PathBuf {
        self.epoch_dir(epoch).join("members.json")
    }

    /// Every epoch held, newest first.
    pub fn list(&self) -> Vec<XorEpoch> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for e in rd.flatten() {
            let Some(epoch) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            let dir = e.path();
            let Some(members) = read_json::<u32>(&self.members_path(epoch)) else {
                continue;
            };
            let mut data = Vec::new();
            for i in 0..members {
                if let Some(m) = read_json::<XorMeta>(&dir.join(format!("data-{i}.json"))) {
                    data.push(m);
                }
            }
            let parity = read_json::<ParityInfo>(&dir.join("parity.json"));
            out.push(XorEpoch {
                epoch,
                members,
                data,
                parity,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.epoch));
        out
    }

    /// Records the group size for `epoch` (the same for every part).
    fn open_epoch(&self, epoch: u64, members: u32) -> Result<()> {
        let dir = self.epoch_dir(epoch);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        match read_json::<u32>(&self.members_path(epoch)) {
            Some(n) if n != members => Err(Error::Refused(format!(
                "epoch {epoch} of this group has {n} members here, the request says {members}"
            ))),
            Some(_) => Ok(()),
            None => json_file(&self.members_path(epoch), &members),
        }
    }

    /// Stores member `meta.index`'s archive from `r` (checked against its
    /// size and checksum before it counts).
    pub fn put_data(
        &self,
        epoch: u64,
        members: u32,
        meta: &XorMeta,
        r: &mut dyn Read,
    ) -> Result<u64> {
        self.open_epoch(epoch, members)?;
        let path = self.data_path(epoch, meta.index);
        let tmp = path.with_extension("arc.tmp");
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            let mut crc = crc32fast::Hasher::new();
            let mut n = 0u64;
            let mut buf = vec![0u8; BLOCK];
            loop {
                let k = r
                    .read(&mut buf)
                    .map_err(|e| Error::Archive(e.to_string()))?;
                if k == 0 {
                    break;
                }
                n += k as u64;
                if n > meta.archive_bytes {
                    return Err(Error::Archive("more data than announced".into()));
                }
                crc.update(&buf[..k]);
                f.write_all(&buf[..k]).map_err(io("write", &tmp))?;
            }
            if n != meta.archive_bytes || crc.finalize() != meta.archive_crc32 {
                return Err(Error::Archive(format!(
                    "member {} sent {n} bytes that do not match its announced archive",
                    meta.index
                )));
            }
            f.sync_all().map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
            json_file(&path.with_extension("json"), meta)?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// XORs member `meta.index`'s chunk for holder `holder` (from `r`) into
    /// this holder's parity. The new parity is written beside the old one
    /// and renamed over it; its checksum is recorded so a torn update is
    /// detected. A member that already contributed the same archive is
    /// accepted again without change; a different one is refused.
    pub fn put_chunk(
        &self,
        epoch: u64,
        members: u32,
        holder: u32,
        chunk_crc32: u32,
        meta: &XorMeta,
        r: &mut dyn Read,
    ) -> Result<u64> {
        if holder >= members || meta.index >= members || holder == meta.index {
            return Err(Error::Refused(format!(
                "member {} cannot send a chunk to holder {holder} of {members}",
                meta.index
            )));
        }
        self.open_epoch(epoch, members)?;
        let info_path = self.epoch_dir(epoch).join("parity.json");
        let mut info = read_json::<ParityInfo>(&info_path).unwrap_or(ParityInfo {
            holder,
            bytes: 0,
            crc32: crc32fast::hash(&[]),
            from: Vec::new(),
        });
        if info.holder != holder {
            return Err(Error::Refused(format!(
                "this endpoint holds parity {} of epoch {epoch}, not {holder}",
                info.holder
            )));
        }
        if let Some(had) = info.from.iter().find(|m| m.index == meta.index) {
            if had == meta {
                // A retry of a contribution that was stored: drain and accept.
                std::io::copy(r, &mut std::io::sink())
                    .map_err(|e| Error::Archive(e.to_string()))?;
                return Ok(0);
            }
            return Err(Error::Refused(format!(
                "member {} already contributed a different checkpoint to epoch {epoch}",
                meta.index
            )));
        }
        let k = chunk_at(meta.index, holder, members);
        let (start, end) = chunk_range(meta.archive_bytes, members, k);
        let want = end - start;
        let path = self.parity_path(epoch);
        let tmp = path.with_extension("bin.tmp");
        let result = (|| {
            let old = match File::open(&path) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io("open", &path)(e)),
            };
            let old_len = info.bytes;
            let new_len = old_len.max(want);
            let out = File::create(&tmp).map_err(io("create", &tmp))?;
            let mut crc = crc32fast::Hasher::new();
            let mut chunk_crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; BLOCK];
            let mut prev = vec![0u8; BLOCK];
            let mut off = 0u64;
            while off < new_len {
                let k = BLOCK.min((new_len - off) as usize);
                // This block of the chunk (zero past its end).
                let in_chunk = want.saturating_sub(off).min(k as u64) as usize;
                r.read_exact(&mut buf[..in_chunk]).map_err(|e| {
                    Error::Archive(format!("chunk shorter than announced ({want} bytes): {e}"))
                })?;
                chunk_crc.update(&buf[..in_chunk]);
                buf[in_chunk..k].fill(0);
                let in_old = old_len.saturating_sub(off).min(k as u64) as usize;
                if let Some(f) = &old {
                    f.read_exact_at(&mut prev[..in_old], off)
                        .map_err(io("read", &path))?;
                }
                prev[in_old..k].fill(0);
                for (b, p) in buf[..k].iter_mut().zip(&prev[..k]) {
                    *b ^= p;
                }
                crc.update(&buf[..k]);
                out.write_all_at(&buf[..k], off)
                    .map_err(io("write", &tmp))?;
                off += k as u64;
            }
            let mut extra = [0u8; 1];
            if r.read(&mut extra)
                .map_err(|e| Error::Archive(e.to_string()))?
                != 0
            {
                return Err(Error::Archive("chunk longer than announced".into()));
            }
            if chunk_crc.finalize() != chunk_crc32 {
                return Err(Error::Archive("chunk checksum mismatch".into()));
            }
            out.sync_all().map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
            info.bytes = new_len;
            info.crc32 = crc.finalize();
            info.from.push(meta.clone());
            info.from.sort_by_key(|m| m.index);
            json_file(&info_path, &info)?;
            Ok(want)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Keeps the `keep` newest epochs that are complete here (own data and
    /// full parity) and everything newer; removes older epochs.
    pub fn prune(&self, keep: usize) {
        let epochs = self.list();
        let mut complete = 0;
        for e in &epochs {
            if complete >= keep {
                let _ = std::fs::remove_dir_all(self.epoch_dir(e.epoch));
                continue;
            }
            if !e.data.is_empty() && e.parity.as_ref().is_some_and(|p| p.complete(e.members)) {
                complete += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_has_one_holder_and_no_member_holds_its_own() {
        for n in 2..9u32 {
            for i in 0..n {
                let mut held: Vec<u32> = (0..n - 1).map(|k| holder_of(i, k, n)).collect();
                assert!(!held.contains(&i));
                for k in 0..n - 1 {
                    assert_eq!(chunk_at(i, holder_of(i, k, n), n), k);
                }
                held.sort();
                held.dedup();
                assert_eq!(held.len() as u32, n - 1);
            }
        }
    }

    #[test]
    fn chunks_cover_the_archive() {
        for (len, n) in [(0u64, 3u32), (1, 3), (10, 3), (11, 4), (1 << 20, 5)] {
            let mut covered = 0;
            for k in 0..n - 1 {
                let (s, e) = chunk_range(len, n, k);
                assert_eq!(s, covered.min(len));
                covered = e;
            }
            assert_eq!(covered, len);
        }
    }
}
