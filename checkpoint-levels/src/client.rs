//! The member's side of the remote levels: send a copy to a partner, list
//! and fetch it back; contribute to an XOR group, fetch or rebuild from it.
use crate::archive::{unpack, Plan};
use crate::dirlevel::{CopyInfo, DirLevel};
use crate::files::{hidden_sibling, manifest_files, BLOCK};
use crate::wire::{Conn, Peers, Request, Response};
use crate::xor::{chunk_at, chunk_range, holder_of, ParityInfo, XorEpoch, XorMeta, XorPart};
use crate::{io, Error, Result};
use snapshot::Snapshot;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn unexpected(c: &Conn, r: &Response) -> Error {
    c.fail(format!("unexpected answer {r:?}"))
}

/// After our data: the peer's verdict. If sending failed, the peer may
/// still have said why (it refuses and closes): prefer its reason.
fn verdict(c: &mut Conn, sent: Result<()>) -> Result<Response> {
    match (sent, c.reply()) {
        (_, Ok(r)) => Ok(r),
        (Err(e), Err(_)) => Err(e),
        (Ok(()), Err(e)) => Err(e),
    }
}

/// Sends copy `name` (the chain `src`) to the partner at `addr`; only the
/// files it lacks travel. Returns (files, archive bytes).
pub fn partner_put(
    addr: SocketAddr,
    peers: &Peers,
    job: &str,
    name: &str,
    src: &Snapshot,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(usize, u64)> {
    let (mut c, r) = Conn::request(
        addr,
        Request::Offer {
            job: job.into(),
            name: name.into(),
            manifest: Box::new(src.manifest.clone()),
        },
        peers,
    )?;
    let Response::Need { files } = r else {
        return Err(unexpected(&c, &r));
    };
    let plan = Plan::new(&src.dir, &files)?;
    let total = plan.len();
    let sent = (|| {
        let mut out = c.data_out();
        plan.write(&mut out, &mut |n| progress(n, total))?;
        out.finish()
    })();
    match verdict(&mut c, sent)? {
        Response::Stored { files, .. } => Ok((files, total)),
        r => Err(unexpected(&c, &r)),
    }
}

/// The partner's copies of `job` and the ones it found broken.
/// Copies a peer holds and the ones it found broken (name, why).
pub type Listing = (Vec<CopyInfo>, Vec<(String, String)>);

pub fn partner_list(addr: SocketAddr, peers: &Peers, job: &str) -> Result<Listing> {
    let (c, r) = Conn::request(addr, Request::List { job: job.into() }, peers)?;
    match r {
        Response::Copies { copies, broken } => Ok((copies, broken)),
        r => Err(unexpected(&c, &r)),
    }
}

/// Fetches the partner's copy `name` into `into` (verified there).
pub fn partner_fetch(
    addr: SocketAddr,
    peers: &Peers,
    job: &str,
    name: &str,
    into: &DirLevel,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyInfo> {
    let (mut c, r) = Conn::request(
        addr,
        Request::Fetch {
            job: job.into(),
            name: name.into(),
        },
        peers,
    )?;
    let Response::Sending {
        bytes,
        manifest: Some(m),
    } = r
    else {
        return Err(unexpected(&c, &r));
    };
    into.install(name, &m, &mut |stage, _needed| {
        let mut input = c.data_in();
        unpack(&mut input, stage, &mut |n| progress(n, bytes))?;
        input.expect_end()
    })?;
    Ok(CopyInfo::of(name, &m))
}

/// The files of an XOR archive: the chain's files and its manifest.
fn xor_names(s: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = manifest_files(&s.manifest)
        .into_iter()
        .map(|f| f.name.clone())
        .collect();
    names.push(snapshot::store::MANIFEST.into());
    names
}

/// Removes a scratch file or directory on every way out.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One XOR part on its way to a holder.
struct PartTo<'a> {
    addr: SocketAddr,
    peers: &'a Peers,
    group: &'a str,
    epoch: u64,
    members: u32,
    meta: &'a XorMeta,
    part: XorPart,
}

/// Sends bytes `start..end` of `file` as part `to.part`.
fn put_part(
    to: PartTo,
    file: &File,
    (start, end): (u64, u64),
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let PartTo {
        addr,
        peers,
        group,
        epoch,
        members,
        meta,
        part,
    } = to;
    let (mut c, r) = Conn::request(
        addr,
        Request::XorPut {
            group: group.into(),
            epoch,
            members,
            meta: meta.clone(),
            part,
        },
        peers,
    )?;
    if !matches!(r, Response::Ready) {
        return Err(unexpected(&c, &r));
    }
    let sent = (|| {
        let mut out = c.data_out();
        let mut buf = vec![0u8; BLOCK];
        let mut off = start;
        while off < end {
            let k = BLOCK.min((end - off) as usize);
            file.read_exact_at(&mut buf[..k], off)
                .map_err(|e| Error::Archive(format!("cannot read the archive: {e}")))?;
            out.write_all(&buf[..k]).map_err(|e| c_lost(addr, e))?;
            off += k as u64;
            progress(k as u64);
        }
        out.finish()
    })();
    match verdict(&mut c, sent)? {
        Response::Stored { .. } => Ok(()),
        r => Err(unexpected(&c, &r)),
    }
}

fn c_lost(addr: SocketAddr, e: std::io::Error) -> Error {
    Error::Peer {
        peer: addr.to_string(),
        detail: format!("connection lost: {e}"),
    }
}

/// CRC-32 of a whole file.
fn file_crc(f: &mut File) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(crc.finalize());
        }
        crc.update(&buf[..k]);
    }
}

/// The XOR group as this member sees it.
pub struct Group<'a> {
    /// How to reach the other members.
    pub peers: &'a Peers,
    pub name: &'a str,
    pub members: &'a [SocketAddr],
    pub index: usize,
}

impl<'a> Group<'a> {
    /// The group of an `xor` level's target (`None` for other kinds).
    pub fn of(target: &'a crate::config::Target, peers: &'a Peers) -> Option<Group<'a>> {
        match target {
            crate::config::Target::Xor {
                group,
                members,
                index,
            } => Some(Group {
                peers,
                name: group,
                members,
                index: *index,
            }),
            _ => None,
        }
    }

    fn n(&self) -> u32 {
        self.members.len() as u32
    }
}

/// Contributes the chain `src` (copy `name` of `job`) to `epoch`: its whole
/// archive to this member's own endpoint and one chunk to every other
/// member. `scratch` is a directory for the archive file. Returns bytes sent.
pub fn xor_put(
    g: &Group,
    epoch: u64,
    job: &str,
    name: &str,
    src: &Snapshot,
    scratch: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let path = Scratch(hidden_sibling(scratch, "xor-archive", name));
    let plan = Plan::new(&src.dir, &xor_names(src))?;
    {
        let mut f = std::io::BufWriter::new(File::create(&path.0).map_err(io("create", &path.0))?);
        plan.write(&mut f, &mut |_| {})?;
        f.flush().map_err(io("write", &path.0))?;
    }
    let mut file = File::open(&path.0).map_err(io("open", &path.0))?;
    // The checksum the holders check: of the whole archive, as written.
    let crc = file_crc(&mut file).map_err(io("read", &path.0))?;
    let len = plan.len();
    let meta = XorMeta {
        job: job.into(),
        index: g.index as u32,
        copy: CopyInfo::of(name, &src.manifest),
        archive_bytes: len,
        archive_crc32: crc,
    };
    let n = g.n();
    let i = g.index as u32;
    let total = len + len.div_ceil(u64::from(n - 1)) * u64::from(n - 1);
    let mut done = 0u64;
    let mut tick = |k: u64| {
        done += k;
        progress(done, total)
    };
    put_part(
        PartTo {
            addr: g.members[g.index],
            peers: g.peers,
            group: g.name,
            epoch,
            members: n,
            meta: &meta,
            part: XorPart::Data { index: i },
        },
        &file,
        (0, len),
        &mut tick,
    )?;
    for k in 0..n - 1 {
        let j = holder_of(i, k, n);
        let range = chunk_range(len, n, k);
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; (range.1 - range.0).min(BLOCK as u64) as usize];
        let mut off = range.0;
        while off < range.1 {
            let m = buf.len().min((range.1 - off) as usize);
            file.read_exact_at(&mut buf[..m], off)
                .map_err(io("read", &path.0))?;
            crc.update(&buf[..m]);
            off += m as u64;
        }
        put_part(
            PartTo {
                addr: g.members[j as usize],
                peers: g.peers,
                group: g.name,
                epoch,
                members: n,
                meta: &meta,
                part: XorPart::Parity {
                    holder: j,
                    chunk_crc32: crc.finalize(),
                },
            },
            &file,
            range,
            &mut tick,
        )?;
    }
    Ok(total)
}

pub fn xor_list(addr: SocketAddr, peers: &Peers, group: &str) -> Result<Vec<XorEpoch>> {
    let (c, r) = Conn::request(
        addr,
        Request::XorList {
            group: group.into(),
        },
        peers,
    )?;
    match r {
        Response::Xor { epochs } => Ok(epochs),
        r => Err(unexpected(&c, &r)),
    }
}

/// Fetches a part into the file `path`; checks its length and CRC.
fn fetch_part(
    addr: SocketAddr,
    peers: &Peers,
    group: &str,
    epoch: u64,
    part: XorPart,
    want: (u64, u32),
    path: &Path,
) -> Result<()> {
    let (mut c, r) = Conn::request(
        addr,
        Request::XorFetch {
            group: group.into(),
            epoch,
            part,
        },
        peers,
    )?;
    let Response::Sending { .. } = r else {
        return Err(unexpected(&c, &r));
    };
    let mut f = File::create(path).map_err(io("create", path))?;
    let mut input = c.data_in();
    let mut crc = crc32fast::Hasher::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; BLOCK];
    loop {
        let k = input.read(&mut buf).map_err(|e| c_lost(addr, e))?;
        if k == 0 {
            break;
        }
        crc.update(&buf[..k]);
        f.write_all(&buf[..k]).map_err(io("write", path))?;
        n += k as u64;
    }
    if (n, crc.finalize()) != want {
        return Err(Error::Peer {
            peer: addr.to_string(),
            detail: format!("{part:?} of epoch {epoch} is damaged (size or checksum)"),
        });
    }
    Ok(())
}

/// What the group holds of member `index`'s checkpoint at `epoch`, from
/// any reachable member: its metadata and whether a rebuild is possible.
pub struct XorCandidate {
    pub epoch: u64,
    pub meta: XorMeta,
    /// The member's own endpoint still has its archive.
    pub own_data: bool,
    /// Every other member has its data and a complete parity.
    pub rebuildable: bool,
}

/// Epochs of `g` holding this member's checkpoint, newest first.
pub fn xor_candidates(g: &Group, skipped: &mut Vec<String>) -> Vec<XorCandidate> {
    let n = g.n();
    let me = g.index as u32;
    let mut views: Vec<(usize, Vec<XorEpoch>)> = Vec::new();
    for (j, addr) in g.members.iter().enumerate() {
        match xor_list(*addr, g.peers, g.name) {
            Ok(e) => views.push((j, e)),
            Err(e) => skipped.push(format!("xor member {j}: {e}")),
        }
    }
    let mut epochs: Vec<u64> = views
        .iter()
        .flat_map(|(_, v)| v.iter().map(|e| e.epoch))
        .collect();
    epochs.sort_unstable_by(|a, b| b.cmp(a));
    epochs.dedup();
    let mut out = Vec::new();
    for epoch in epochs {
        let at = |j: usize| {
            views
                .iter()
                .find(|(k, _)| *k == j)
                .and_then(|(_, v)| v.iter().find(|e| e.epoch == epoch && e.members == n))
        };
        let own = at(g.index).and_then(|e| e.data.iter().find(|m| m.index == me).cloned());
        let from_parity = (0..g.members.len()).find_map(|j| {
            at(j)?
                .parity
                .as_ref()?
                .from
                .iter()
                .find(|m| m.index == me)
                .cloned()
        });
        let Some(meta) = own.clone().or(from_parity) else {
            continue;
        };
        let rebuildable = (0..g.members.len()).filter(|&j| j != g.index).all(|j| {
            at(j).is_some_and(|e| {
                e.data.iter().any(|m| m.index == j as u32)
                    && e.parity.as_ref().is_some_and(|p: &ParityInfo| {
                        p.complete(n) && p.from.iter().any(|m| m == &meta)
                    })
            })
        });
        out.push(XorCandidate {
            epoch,
            meta,
            own_data: own.is_some(),
            rebuildable,
        });
    }
    out
}

/// Gets member `g.index`'s checkpoint of `c.epoch` into `into`: straight
/// from its own endpoint when that still has it, else rebuilt from the
/// other members' archives and parity. `scratch` holds the temporary files.
pub fn xor_restore(
    g: &Group,
    c: &XorCandidate,
    into: &DirLevel,
    scratch: &Path,
) -> Result<(CopyInfo, bool)> {
    let me = g.index as u32;
    let work = Scratch(hidden_sibling(scratch, "fetch", "xor-work"));
    std::fs::create_dir(&work.0).map_err(io("create", &work.0))?;
    let arc = work.0.join("rebuilt.arc");
    let want = (c.meta.archive_bytes, c.meta.archive_crc32);
    let direct = c.own_data
        && fetch_part(
            g.members[g.index],
            g.peers,
            g.name,
            c.epoch,
            XorPart::Data { index: me },
            want,
            &arc,
        )
        .is_ok();
    if !direct {
        if !c.rebuildable {
            return Err(Error::Refused(format!(
                "epoch {} cannot be rebuilt: a member other than this one is missing too",
                c.epoch
            )));
        }
        rebuild(g, c, &work.0, &arc)?;
    }
    let info = install_xor_archive(&arc, &c.meta.copy.name, into, scratch)?;
    Ok((info, !direct))
}

/// Rebuilds member `g.index`'s archive into `out` from the others.
fn rebuild(g: &Group, c: &XorCandidate, work: &Path, out: &Path) -> Result<()> {
    let n = g.n();
    let me = g.index as u32;
    // Every other member's archive (with its metadata) and parity.
    let mut data: Vec<Option<(File, u64)>> = (0..n).map(|_| None).collect();
    let mut parity: Vec<Option<File>> = (0..n).map(|_| None).collect();
    for j in (0..n).filter(|&j| j != me) {
        let addr = g.members[j as usize];
        let epochs = xor_list(addr, g.peers, g.name)?;
        let e = epochs
            .iter()
            .find(|e| e.epoch == c.epoch)
            .ok_or_else(|| Error::Refused(format!("member {j} no longer has epoch {}", c.epoch)))?;
        let dm = e.data.iter().find(|m| m.index == j).ok_or_else(|| {
            Error::Refused(format!("member {j} lacks its archive of epoch {}", c.epoch))
        })?;
        let p = e.parity.as_ref().filter(|p| p.complete(n)).ok_or_else(|| {
            Error::Refused(format!(
                "member {j}'s parity of epoch {} is incomplete",
                c.epoch
            ))
        })?;
        let dpath = work.join(format!("data-{j}"));
        fetch_part(
            addr,
            g.peers,
            g.name,
            c.epoch,
            XorPart::Data { index: j },
            (dm.archive_bytes, dm.archive_crc32),
            &dpath,
        )?;
        let ppath = work.join(format!("parity-{j}"));
        fetch_part(
            addr,
            g.peers,
            g.name,
            c.epoch,
            XorPart::Parity {
                holder: j,
                chunk_crc32: 0,
            },
            (p.bytes, p.crc32),
            &ppath,
        )?;
        data[j as usize] = Some((
            File::open(&dpath).map_err(io("open", &dpath))?,
            dm.archive_bytes,
        ));
        parity[j as usize] = Some(File::open(&ppath).map_err(io("open", &ppath))?);
    }
    let len = c.meta.archive_bytes;
    let f = File::create(out).map_err(io("create", out))?;
    let mut acc = vec![0u8; BLOCK];
    let mut tmp = vec![0u8; BLOCK];
    // Reads `n` bytes at `off` of `file` (of length `flen`) into `buf`,
    // zeros past its end.
    let read_padded = |file: &File, flen: u64, off: u64, buf: &mut [u8]| -> Result<()> {
        let have = flen.saturating_sub(off).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..have], off)
            .map_err(|e| Error::Archive(format!("cannot read a fetched part: {e}")))?;
        buf[have..].fill(0);
        Ok(())
    };
    for k in 0..n - 1 {
        let j = holder_of(me, k, n);
        let (start, end) = chunk_range(len, n, k);
        let p = parity[j as usize]
            .as_ref()
            .ok_or_else(|| Error::Refused("parity missing".into()))?;
        let plen = p.metadata().map_err(io("stat", out))?.len();
        let mut off = 0u64;
        while start + off < end {
            let m = BLOCK.min((end - start - off) as usize);
            read_padded(p, plen, off, &mut acc[..m])?;
            for i in (0..n).filter(|&i| i != me && i != j) {
                let (file, ilen) = data[i as usize]
                    .as_ref()
                    .ok_or_else(|| Error::Refused("data missing".into()))?;
                let (cs, ce) = chunk_range(*ilen, n, chunk_at(i, j, n));
                let clen = ce - cs;
                // Bytes of member i's chunk at this offset (zero-padded).
                let have = clen.saturating_sub(off).min(m as u64) as usize;
                file.read_exact_at(&mut tmp[..have], cs + off)
                    .map_err(|e| Error::Archive(format!("cannot read a fetched part: {e}")))?;
                tmp[have..m].fill(0);
                for (a, b) in acc[..m].iter_mut().zip(&tmp[..m]) {
                    *a ^= b;
                }
            }
            f.write_all_at(&acc[..m], start + off)
                .map_err(io("write", out))?;
            off += m as u64;
        }
    }
    f.set_len(len).map_err(io("size", out))?;
    drop(f);
    let mut r = File::open(out).map_err(io("open", out))?;
    if file_crc(&mut r).map_err(io("read", out))? != c.meta.archive_crc32 {
        return Err(Error::Archive(format!(
            "the archive rebuilt from parity for epoch {} does not match its checksum",
            c.epoch
        )));
    }
    Ok(())
}

/// Unpacks an XOR archive and installs it into `into` as copy `name`.
fn install_xor_archive(
    arc: &Path,
    name: &str,
    into: &DirLevel,
    scratch: &Path,
) -> Result<CopyInfo> {
    let dir = Scratch(hidden_sibling(scratch, "fetch", name));
    std::fs::create_dir(&dir.0).map_err(io("create", &dir.0))?;
    let mut f = std::io::BufReader::new(File::open(arc).map_err(io("open", arc))?);
    unpack(&mut f, &dir.0, &mut |_| {})?;
    let s = Snapshot::open(&dir.0)?;
    into.install(name, &s.manifest, &mut |stage, _needed| {
        for f in manifest_files(&s.manifest) {
            let from = dir.0.join(&f.name);
            std::fs::rename(&from, stage.join(&f.name)).map_err(io("move", &from))?;
        }
        Ok(())
    })?;
    Ok(CopyInfo::of(name, &s.manifest))
}
