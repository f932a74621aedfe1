//! The wire format. Every message is one frame:
//!
//! ```text
//! "FFMG" | version u16 | kind u8 | 0 u8 | length u32 | crc32 u32 | payload
//! ```
//!
//! (little endian). The conversation:
//!
//! ```text
//! source                         destination
//! HELLO (json) ----------------->  checks memory, CPU, devices
//!              <----------------- ACCEPT | REFUSE (reason)
//! PAGES ... (a round, guest runs) -> written into guest memory
//! SYNC ------------------------->  (after each round)
//!              <----------------- SYNCED (every page before it is written)
//! PAGES ... (guest paused)       ->
//! STATE (machine state) -------->  loads it into the VM, paused
//!              <----------------- READY | ABORT (reason)
//! GO ---------------------------->  starts the vCPUs
//!              <----------------- RUNNING
//! ```
//!
//! Post-copy (when the source asks for it and the rounds do not converge)
//! replaces the last PAGES and STATE:
//!
//! ```text
//! POSTCOPY (state + missing pages) -> drops the missing pages, traps them
//!              <----------------- REQUEST (pages a fault needs) ...
//! PAGES (requested first, then the rest, guest runs there) ->
//!              <----------------- READY, then after GO: RUNNING
//! COMPLETE ---------------------->  (every missing page sent)
//!              <----------------- DONE (every missing page in place)
//! ```
//!
//! In verification mode (`Hello::verify`) the source sends, after the last
//! PAGES and before STATE, VERIFY frames with a CRC-32 of every guest page
//! as it is at the pause; the destination compares its own copy and answers
//! ABORT naming the pages that differ (the source resumes its guest) instead
//! of loading the state. Post-copy is not verified (pages are missing by
//! design).
//!
//! ABORT may come from either side at any point before GO. A connection
//! that breaks before GO leaves the source running and the destination
//! discarding what it received. After RUNNING in post-copy, a broken
//! connection loses the VM (see `postcopy`). Everything received is checked: frame
//! magic, version, kind, length limits, CRC, page numbers and batch shape.
use crate::Error;
use serde::{Deserialize, Serialize};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::io::{Read, Write};

pub const MAGIC: [u8; 4] = *b"FFMG";
pub const VERSION: u16 = 2;
const HEADER: usize = 16;
/// The largest payload either side accepts (a page batch is ~1 MiB, the
/// machine state well under this).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Pages per PAGES frame.
pub const BATCH_PAGES: usize = 256;
/// Device migration data per DEVICE_DATA frame.
pub const DEVICE_CHUNK: usize = 1 << 20;

/// DEVICE_DATA frames for `data` of the device in `slot`.
pub fn encode_device_data(slot: u8, data: &[u8]) -> Vec<Vec<u8>> {
    data.chunks(DEVICE_CHUNK)
        .map(|c| {
            let mut f = Vec::with_capacity(c.len() + 1);
            f.push(slot);
            f.extend_from_slice(c);
            f
        })
        .collect()
}

/// A DEVICE_DATA frame back: (slot, bytes).
pub fn decode_device_data(payload: &[u8]) -> Result<(u8, &[u8]), Error> {
    match payload.split_first() {
        Some((&slot, data)) if !data.is_empty() => Ok((slot, data)),
        _ => Err(Error::Protocol("an empty device-data frame".into())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Ready = 6,
    Go = 7,
    Running = 8,
    Abort = 9,
    Sync = 10,
    Synced = 11,
    Postcopy = 12,
    Request = 13,
    Complete = 14,
    Done = 15,
    Verify = 16,
    Join = 17,
    End = 18,
    /// Part of a passthrough device's migration data (its PRE_COPY data)
    /// sent during the rounds: the slot byte, then the bytes.
    DeviceData = 19,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Ready,
            7 => Kind::Go,
            8 => Kind::Running,
            9 => Kind::Abort,
            10 => Kind::Sync,
            11 => Kind::Synced,
            12 => Kind::Postcopy,
            13 => Kind::Request,
            14 => Kind::Complete,
            15 => Kind::Done,
            16 => Kind::Verify,
            17 => Kind::Join,
            18 => Kind::End,
            19 => Kind::DeviceData,
            _ => return None,
        })
    }
}

/// What the source tells the destination first, and what the destination
/// compares with its own configuration before anything else moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Version of the machine-state layout the source sends.
    pub state_version: u32,
    pub memory_bytes: u64,
    /// Guest RAM regions (guest-physical start, length).
    pub regions: Vec<(u64, u64)>,
    pub cpus: u8,
    pub cpu_vendor: String,
    pub cpu_profile: String,
    /// One line per device, in the order their state is saved.
    pub devices: Vec<String>,
    /// The source may switch to post-copy (the destination must be able
    /// to trap missing pages).
    #[serde(default)]
    pub postcopy: bool,
    /// The source sends page digests at the pause for the destination to
    /// compare before it loads the state (VERIFY).
    #[serde(default)]
    pub verify: bool,
    /// What the guest sees of its CPU topology and NUMA nodes (text; empty
    /// for one socket of plain cores and no nodes, as before they existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub layout: String,
    /// Page streams the source offers to send on (this connection and
    /// more); 1 if absent. The destination answers how many it takes.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub streams: u8,
    /// Passthrough functions whose device state comes in the machine
    /// state (VFIO migration), `SLOT=vvvv:dddd` each (slot on bus 0, hex):
    /// the destination puts its own functions there before the state
    /// loads. Empty from a source without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<String>,
}

fn one() -> u8 {
    1
}

fn is_one(n: &u8) -> bool {
    *n == 1
}

/// The most page streams a destination takes.
pub const MAX_STREAMS: u8 = 16;

/// ACCEPT's body: how many page streams the destination takes (this
/// connection included) and the token each further connection shows in
/// its JOIN. An empty body (a destination from before streams) means one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    pub streams: u8,
    pub token: String,
}

impl Accept {
    /// Parses ACCEPT's body; empty is one stream.
    pub fn decode(body: &[u8]) -> Result<Accept, Error> {
        if body.is_empty() {
            return Ok(Accept {
                streams: 1,
                token: String::new(),
            });
        }
        let a: Accept = serde_json::from_slice(body)
            .map_err(|e| Error::Protocol(format!("unreadable accept: {e}")))?;
        if a.streams == 0 || a.streams > MAX_STREAMS {
            return Err(Error::Protocol(format!(
                "the destination takes {} page streams (1 to {MAX_STREAMS})",
                a.streams
            )));
        }
        Ok(a)
    }
}

impl Hello {
    /// Why a VM described by `theirs` cannot continue in one configured as
    /// `self` (each difference on its own line), or Ok.
    pub fn check(&self, theirs: &Hello) -> Result<(), String> {
        let mut why = Vec::new();
        if theirs.state_version != self.state_version {
            why.push(format!(
                "machine-state version {} (this VMM reads {})",
                theirs.state_version, self.state_version
            ));
        }
        if theirs.memory_bytes != self.memory_bytes || theirs.regions != self.regions {
            why.push(format!(
                "memory {} MiB (this VM has {} MiB)",
                theirs.memory_bytes >> 20,
                self.memory_bytes >> 20
            ));
        }
        if theirs.cpus != self.cpus {
            why.push(format!("{} vCPUs (this VM has {})", theirs.cpus, self.cpus));
        }
        if theirs.cpu_vendor != self.cpu_vendor {
            why.push(format!(
                "a {} CPU (this host is {})",
                theirs.cpu_vendor, self.cpu_vendor
            ));
        }
        if theirs.cpu_profile != self.cpu_profile {
            why.push(format!(
                "CPU profile {} (this VM uses {})",
                theirs.cpu_profile, self.cpu_profile
            ));
        }
        if theirs.layout != self.layout {
            let shown = |l: &str| {
                if l.is_empty() {
                    "the default layout".to_string()
                } else {
                    l.to_string()
                }
            };
            why.push(format!(
                "guest topology {} (this VM has {})",
                shown(&theirs.layout),
                shown(&self.layout)
            ));
        }
        if theirs.devices != self.devices {
            why.push(format!(
                "devices [{}] (this VM has [{}])",
                theirs.devices.join(", "),
                self.devices.join(", ")
            ));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(format!("the VM has {}", why.join("; ")))
        }
    }
}

/// One batch of pages being built: page numbers (memory-file numbering:
/// RAM regions back to back) with a flag for all-zero pages, and the data
/// of the rest, read straight from guest memory into one buffer that is
/// kept from batch to batch (no allocation, no second copy per page).
#[derive(Debug, Default)]
pub struct Pages {
    entries: Vec<(u64, bool)>,
    /// `data[..used]` holds the pages; the rest is room kept for later.
    data: Vec<u8>,
    used: usize,
}

/// What [`Pages::read`] did with a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Data,
    Zero,
    /// All zero and left out (`skip_zero`).
    Skipped,
}

impl Pages {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Room for one more page of data at `data[used..]`.
    fn room(&mut self) -> &mut [u8] {
        let end = self.used + PAGE_SIZE as usize;
        if self.data.len() < end {
            self.data
                .resize(end.max(BATCH_PAGES * PAGE_SIZE as usize), 0);
        }
        &mut self.data[self.used..end]
    }

    /// Adds a page; `data` is None for an all-zero page (the tests' way to
    /// build a batch; the engine reads pages in with [`Pages::read`]).
    #[cfg(test)]
    fn push(&mut self, page: u64, data: Option<&[u8]>) {
        self.entries.push((page, data.is_none()));
        if let Some(d) = data {
            self.room().copy_from_slice(&d[..PAGE_SIZE as usize]);
            self.used += PAGE_SIZE as usize;
        }
    }

    /// Reads page `page` of `mem` into the batch: as data, or as a zero
    /// page when it is all zero (left out with `skip_zero`).
    pub fn read(
        &mut self,
        mem: &crate::GuestMemory,
        page: u64,
        skip_zero: bool,
    ) -> std::io::Result<Taken> {
        let room = self.room();
        snapshot::memory::read_page(mem, page, room)?;
        if snapshot::memory::is_zero(room) {
            if skip_zero {
                return Ok(Taken::Skipped);
            }
            self.entries.push((page, true));
            return Ok(Taken::Zero);
        }
        self.entries.push((page, false));
        self.used += PAGE_SIZE as usize;
        Ok(Taken::Data)
    }

    /// The frame's head: the count and the index (the data follows).
    fn head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.entries.len() * 8);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for &(page, zero) in &self.entries {
            out.extend_from_slice(&(page << 1 | u64::from(zero)).to_le_bytes());
        }
        out
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut out = self.head();
        out.extend_from_slice(&self.data[..self.used]);
        out
    }
}

/// A received batch of pages, checked, its data borrowed from the frame.
#[derive(Debug, PartialEq, Eq)]
pub struct PagesIn<'a> {
    entries: Vec<(u64, bool)>,
    data: &'a [u8],
}

impl<'a> PagesIn<'a> {
    /// Parses and checks a batch: its shape, and every page below `pages`.
    pub fn decode(payload: &'a [u8], pages: u64) -> Result<PagesIn<'a>, Error> {
        let bad = |why: String| Error::Protocol(format!("bad page batch: {why}"));
        let count = payload
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("shorter than its count".into()))?;
        if count > BATCH_PAGES {
            return Err(bad(format!("{count} pages (at most {BATCH_PAGES})")));
        }
        let index_end = 4 + count * 8;
        let index = payload
            .get(4..index_end)
            .ok_or_else(|| bad("index cut short".into()))?;
        let entries: Vec<(u64, bool)> = index
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                let v = u64::from_le_bytes(w);
                (v >> 1, v & 1 == 1)
            })
            .collect();
        if let Some(&(p, _)) = entries.iter().find(|(p, _)| *p >= pages) {
            return Err(bad(format!("page {p} is past guest RAM ({pages} pages)")));
        }
        let with_data = entries.iter().filter(|(_, zero)| !zero).count();
        let data = &payload[index_end..];
        if data.len() != with_data * PAGE_SIZE as usize {
            return Err(bad(format!(
                "{} data bytes for {with_data} pages",
                data.len()
            )));
        }
        Ok(PagesIn { entries, data })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (page, data or None for zero) in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&'a [u8]>)> + '_ {
        let mut at = 0;
        let data = self.data;
        self.entries.iter().map(move |&(page, zero)| {
            if zero {
                (page, None)
            } else {
                let d = &data[at..at + PAGE_SIZE as usize];
                at += PAGE_SIZE as usize;
                (page, Some(d))
            }
        })
    }
}

/// JOIN, the first frame of a further page stream: the token from ACCEPT
/// and the stream's number (1 and up).
pub fn encode_join(token: &str, index: u8) -> Vec<u8> {
    let mut out = vec![index];
    out.extend_from_slice(token.as_bytes());
    out
}

/// Parses a JOIN: (stream number, token).
pub fn decode_join(payload: &[u8]) -> Result<(u8, &[u8]), Error> {
    match payload.split_first() {
        Some((&index, token)) if (1..MAX_STREAMS).contains(&index) => Ok((index, token)),
        _ => Err(Error::Protocol(format!(
            "bad join ({} bytes)",
            payload.len()
        ))),
    }
}

/// Page numbers a destination asks for (post-copy faults), at most this
/// many per REQUEST.
pub const MAX_REQUEST: usize = 1024;

pub fn encode_request(pages: &[u64]) -> Vec<u8> {
    pages.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Parses a REQUEST: 1..=[`MAX_REQUEST`] page numbers, each below `pages`.
pub fn decode_request(payload: &[u8], pages: u64) -> Result<Vec<u64>, Error> {
    let bad = |why: String| Error::Protocol(format!("bad page request: {why}"));
    if payload.is_empty() || payload.len() % 8 != 0 || payload.len() / 8 > MAX_REQUEST {
        return Err(bad(format!("{} bytes", payload.len())));
    }
    // chunks_exact(8) gives 8-byte slices only.
    let list: Vec<u64> = payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if let Some(p) = list.iter().find(|&&p| p >= pages) {
        return Err(bad(format!("page {p} is past guest RAM ({pages} pages)")));
    }
    Ok(list)
}

/// POSTCOPY: the machine state and the pages the destination does not have
/// (dirtied since they were sent), as a bitmap.
pub fn encode_postcopy(state: &[u8], missing: &PageBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + state.len() + (missing.pages() / 8) as usize);
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(state);
    out.extend_from_slice(&missing.to_bytes());
    out
}

pub fn decode_postcopy(payload: &[u8], pages: u64) -> Result<(Vec<u8>, PageBitmap), Error> {
    let bad = |why: &str| Error::Protocol(format!("bad post-copy message: {why}"));
    let len = payload
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("too short"))?;
    let state = payload
        .get(4..4 + len)
        .ok_or_else(|| bad("state cut short"))?;
    let missing = PageBitmap::from_bytes(pages, &payload[4 + len..])
        .ok_or_else(|| bad("the page bitmap does not fit guest RAM"))?;
    Ok((state.to_vec(), missing))
}

/// Page digests per VERIFY frame (256 KiB of CRCs for 256 MiB of guest
/// RAM): the destination compares one frame while the source digests the
/// next.
pub const VERIFY_PAGES: usize = 1 << 16;

/// The digest of one page.
pub fn page_digest(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// The digests of pages `first..first + count` of `mem` (memory-file
/// numbering). Pages not in `resident` (the host never made them resident)
/// are zero and get the zero page's digest without being read.
pub fn page_digests(
    mem: &crate::GuestMemory,
    resident: &PageBitmap,
    first: u64,
    count: u64,
) -> std::io::Result<Vec<u32>> {
    let zero = page_digest(&[0u8; PAGE_SIZE as usize]);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    (first..first + count)
        .map(|p| {
            if !resident.get(p) {
                return Ok(zero);
            }
            snapshot::memory::read_page(mem, p, &mut page)?;
            Ok(page_digest(&page))
        })
        .collect()
}

/// VERIFY: the first page number, then one digest per page from it on.
pub fn encode_verify(first: u64, digests: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + digests.len() * 4);
    out.extend_from_slice(&first.to_le_bytes());
    for d in digests {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// Parses a VERIFY frame: 1..=[`VERIFY_PAGES`] digests, every page below
/// `pages`. Returns the first page and the digests.
pub fn decode_verify(payload: &[u8], pages: u64) -> Result<(u64, Vec<u32>), Error> {
    let bad = |why: String| Error::Protocol(format!("bad page digests: {why}"));
    if payload.len() < 12 || (payload.len() - 8) % 4 != 0 {
        return Err(bad(format!("{} bytes", payload.len())));
    }
    let first = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
    let digests: Vec<u32> = payload[8..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
        .collect();
    if digests.len() > VERIFY_PAGES {
        return Err(bad(format!(
            "{} digests (at most {VERIFY_PAGES})",
            digests.len()
        )));
    }
    if first
        .checked_add(digests.len() as u64)
        .is_none_or(|end| end > pages)
    {
        return Err(bad(format!(
            "pages {first}+{} are past guest RAM ({pages} pages)",
            digests.len()
        )));
    }
    Ok((first, digests))
}

/// A framed connection (a cluster-plane stream in practice: encrypted and
/// authenticated unless the operator asked for `--insecure`).
pub struct Conn<S> {
    stream: S,
    /// Bytes written, for bandwidth estimates and reports.
    pub sent: u64,
    /// Frames carry and check a CRC-32 of their payload; off inside an
    /// authenticated channel, whose records are already checked (AEAD).
    checksums: bool,
}

impl Conn<cluster_auth::PlaneStream> {
    /// A framed connection over a cluster-plane channel: CRC-32s only when
    /// the channel does not authenticate its records (`--insecure`).
    pub fn plane(stream: cluster_auth::PlaneStream) -> Self {
        let checksums = !stream.is_secure();
        Conn {
            stream,
            sent: 0,
            checksums,
        }
    }

    /// A second handle on the same connection (one side reads, the other
    /// writes).
    pub fn try_clone(&self) -> Result<Self, Error> {
        Ok(Conn::plane(self.stream.try_clone()?))
    }

    /// The socket under the channel (timeouts, shutdown, buffer sizes).
    pub fn stream(&self) -> &std::net::TcpStream {
        self.stream.tcp()
    }
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            sent: 0,
            checksums: true,
        }
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        self.send_parts(kind, &[payload])
    }

    /// One frame whose payload is `parts` back to back (written as they
    /// are: no copy into one buffer first).
    fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), Error> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = kind as u8;
        h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        if self.checksums {
            let mut crc = crc32fast::Hasher::new();
            parts.iter().for_each(|p| crc.update(p));
            h[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
        }
        self.stream.write_all(&h)?;
        for p in parts {
            self.stream.write_all(p)?;
        }
        self.stream.flush()?;
        self.sent += (HEADER + len) as u64;
        Ok(())
    }

    pub fn send_hello(&mut self, hello: &Hello) -> Result<(), Error> {
        let body = serde_json::to_vec(hello).map_err(|e| Error::Protocol(e.to_string()))?;
        self.send(Kind::Hello, &body)
    }

    pub fn send_pages(&mut self, pages: &Pages) -> Result<(), Error> {
        self.send_parts(Kind::Pages, &[&pages.head(), &pages.data[..pages.used]])
    }

    pub fn abort(&mut self, why: &str) {
        let _ = self.send(Kind::Abort, why.as_bytes());
    }

    /// The next frame, checked. ABORT from the peer becomes
    /// [`Error::Aborted`].
    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>), Error> {
        let mut payload = Vec::new();
        let (kind, len) = self.recv_into(&mut payload)?;
        payload.truncate(len);
        Ok((kind, payload))
    }

    /// The next frame, its payload in `buf[..len]`; `buf` only grows, so
    /// a loop of frames reuses one buffer.
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<(Kind, usize), Error> {
        let mut h = [0u8; HEADER];
        self.stream.read_exact(&mut h)?;
        if h[0..4] != MAGIC {
            return Err(Error::Protocol(
                "not an ffmk-vmm migration stream (bad magic)".into(),
            ));
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {version} (this VMM speaks {VERSION})"
            )));
        }
        let kind = Kind::from_u8(h[6])
            .ok_or_else(|| Error::Protocol(format!("unknown message kind {}", h[6])))?;
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "a {len}-byte message (at most {MAX_PAYLOAD})"
            )));
        }
        let len = len as usize;
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let payload = &mut buf[..len];
        self.stream.read_exact(payload)?;
        if self.checksums && crc32fast::hash(payload) != crc {
            return Err(Error::Protocol(format!(
                "checksum mismatch in a {kind:?} message"
            )));
        }
        if kind == Kind::Abort {
            return Err(Error::Aborted(String::from_utf8_lossy(payload).into()));
        }
        Ok((kind, len))
    }

    /// The next frame, which must be of kind `want`.
    pub fn expect(&mut self, want: Kind) -> Result<Vec<u8>, Error> {
        let (kind, payload) = self.recv()?;
        if kind != want {
            return Err(Error::Protocol(format!("expected {want:?}, got {kind:?}")));
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    struct Pipe(Cursor<Vec<u8>>);
    impl Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.get_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pipe() -> Conn<Pipe> {
        Conn::new(Pipe(Cursor::new(Vec::new())))
    }

    #[test]
    fn device_data_goes_in_frames_of_at_most_a_chunk_with_its_slot() {
        let data = vec![7u8; DEVICE_CHUNK + 10];
        let frames = encode_device_data(3, &data);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].len(), DEVICE_CHUNK + 1);
        let (slot, body) = decode_device_data(&frames[1]).unwrap();
        assert_eq!((slot, body.len()), (3, 10));
        assert!(encode_device_data(3, &[]).is_empty());
        assert!(decode_device_data(&[]).is_err());
        assert!(decode_device_data(&[3]).is_err(), "a slot and no bytes");
        assert_eq!(
            Kind::from_u8(Kind::DeviceData as u8),
            Some(Kind::DeviceData)
        );
    }

    fn hello() -> Hello {
        Hello {
            state_version: 2,
            memory_bytes: 256 << 20,
            regions: vec![(0, 256 << 20)],
            cpus: 2,
            cpu_vendor: "GenuineIntel".into(),
            cpu_profile: "portable".into(),
            devices: vec!["virtio-blk queues=1".into()],
            postcopy: false,
            verify: false,
            layout: String::new(),
            streams: 1,
            passthrough: Vec::new(),
        }
    }

    #[test]
    fn streams_are_negotiated_and_joins_checked() {
        // A hello without `streams` (an older source) offers one, and one
        // is not written out.
        let old = serde_json::to_value(hello()).unwrap();
        assert!(old.get("streams").is_none(), "{old}");
        let h: Hello = serde_json::from_value(old).unwrap();
        assert_eq!(h.streams, 1);
        // An empty ACCEPT (an older destination) takes one.
        assert_eq!(Accept::decode(&[]).unwrap().streams, 1);
        let a = Accept {
            streams: 4,
            token: "ab".into(),
        };
        assert_eq!(Accept::decode(&serde_json::to_vec(&a).unwrap()).unwrap(), a);
        for bad in [0u8, MAX_STREAMS + 1] {
            let body = serde_json::to_vec(&Accept {
                streams: bad,
                token: "ab".into(),
            })
            .unwrap();
            assert!(Accept::decode(&body).is_err(), "{bad}");
        }
        assert!(Accept::decode(b"{").is_err());
        assert_eq!(
            decode_join(&encode_join("tok", 3)).unwrap(),
            (3, &b"tok"[..])
        );
        assert!(decode_join(&[]).is_err());
        assert!(decode_join(&encode_join("tok", 0)).is_err());
        assert!(decode_join(&encode_join("tok", MAX_STREAMS)).is_err());
    }

    #[test]
    fn frames_round_trip_and_page_batches_keep_zero_pages_dataless() {
        let mut c = pipe();
        c.send_hello(&hello()).unwrap();
        let mut p = Pages::default();
        let page = vec![7u8; PAGE_SIZE as usize];
        p.push(3, Some(&page));
        p.push(9, None);
        c.send_pages(&p).unwrap();
        c.abort("operator cancelled");
        let (k, body) = c.recv().unwrap();
        assert_eq!(k, Kind::Hello);
        assert_eq!(serde_json::from_slice::<Hello>(&body).unwrap(), hello());
        let body = c.expect(Kind::Pages).unwrap();
        assert_eq!(
            body.len(),
            4 + 16 + PAGE_SIZE as usize,
            "zero page: no data"
        );
        let got = PagesIn::decode(&body, 10).unwrap();
        assert_eq!(got.len(), 2);
        let v: Vec<_> = got.iter().map(|(n, d)| (n, d.map(|d| d[0]))).collect();
        assert_eq!(v, vec![(3, Some(7)), (9, None)]);
        assert!(matches!(c.recv(), Err(Error::Aborted(m)) if m == "operator cancelled"));
    }

    #[test]
    fn damaged_frames_and_batches_are_refused() {
        let frame = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut c = pipe();
            c.send(Kind::Ready, b"abc").unwrap();
            edit(c.stream.0.get_mut());
            c.recv().unwrap_err().to_string()
        };
        assert!(frame(&|b| b[0] = b'X').contains("bad magic"));
        assert!(frame(&|b| b[4] = 9).contains("protocol version 9"));
        assert!(frame(&|b| b[6] = 77).contains("unknown message kind 77"));
        assert!(frame(&|b| b[8..12].copy_from_slice(&u32::MAX.to_le_bytes())).contains("at most"));
        assert!(frame(&|b| b[17] ^= 1).contains("checksum mismatch"));
        assert!(frame(&|b| b.truncate(18)).contains("connection lost"));

        let mut p = Pages::default();
        p.push(5, None);
        let enc = p.encode();
        assert!(PagesIn::decode(&enc, 5)
            .unwrap_err()
            .to_string()
            .contains("past guest RAM"));
        let mut extra = enc.clone();
        extra.push(0);
        assert!(PagesIn::decode(&extra, 10)
            .unwrap_err()
            .to_string()
            .contains("data bytes"));
        let mut many = enc.clone();
        many[0..4].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(PagesIn::decode(&many, 10).is_err());
        assert!(PagesIn::decode(&[1, 0], 10).is_err());
    }

    #[test]
    fn page_digests_round_trip_and_bad_ones_are_refused() {
        let d = encode_verify(3, &[1, 2, 0xdead_beef]);
        assert_eq!(decode_verify(&d, 6).unwrap(), (3, vec![1, 2, 0xdead_beef]));
        // Past guest RAM, empty, cut short, too many, overflowing.
        assert!(decode_verify(&d, 5).is_err());
        assert!(decode_verify(&encode_verify(0, &[]), 6).is_err());
        assert!(decode_verify(&d[..d.len() - 1], 6).is_err());
        let many = vec![0u32; VERIFY_PAGES + 1];
        assert!(decode_verify(&encode_verify(0, &many), 1 << 30).is_err());
        assert!(decode_verify(&encode_verify(u64::MAX, &[1]), u64::MAX).is_err());
        // The zero page's digest is what a never-resident page gets.
        assert_eq!(
            page_digest(&[0u8; PAGE_SIZE as usize]),
            crc32fast::hash(&[0u8; PAGE_SIZE as usize])
        );
    }

    #[test]
    fn requests_and_postcopy_messages_are_checked() {
        assert_eq!(decode_request(&encode_request(&[3, 7]), 8).unwrap(), [3, 7]);
        assert!(decode_request(&encode_request(&[3, 8]), 8)
            .unwrap_err()
            .to_string()
            .contains("past guest RAM"));
        assert!(decode_request(&[], 8).is_err());
        assert!(decode_request(&[1, 2, 3], 8).is_err());
        assert!(decode_request(&encode_request(&vec![1; MAX_REQUEST + 1]), 8).is_err());

        let mut missing = PageBitmap::new(100);
        missing.set(4);
        missing.set(99);
        let enc = encode_postcopy(b"{state}", &missing);
        let (state, got) = decode_postcopy(&enc, 100).unwrap();
        assert_eq!(state, b"{state}");
        assert_eq!(got, missing);
        assert!(decode_postcopy(&enc, 1000).is_err(), "other memory size");
        assert!(decode_postcopy(&enc[..6], 100).is_err());
        let mut long = enc.clone();
        long[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode_postcopy(&long, 100).is_err());
    }

    #[test]
    fn hello_check_names_every_difference() {
        let mine = hello();
        assert!(mine.check(&mine.clone()).is_ok());
        let mut theirs = hello();
        theirs.memory_bytes = 512 << 20;
        theirs.regions = vec![(0, 512 << 20)];
        theirs.cpu_profile = "host".into();
        let why = mine.check(&theirs).unwrap_err();
        assert!(
            why.contains("memory 512 MiB (this VM has 256 MiB)"),
            "{why}"
        );
        assert!(why.contains("CPU profile host"), "{why}");
        assert!(!why.contains("vCPUs"), "{why}");
    }
}
