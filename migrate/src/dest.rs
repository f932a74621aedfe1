//! The receiving side, one connection at a time: the VMM listens, and for
//! each connection calls [`Incoming::hello`] (which builds the VM without
//! its state), [`Incoming::memory`], loads the state into the VM (paused),
//! then [`Incoming::switch_over`]. Any error
//! before GO means: drop what was received, listen again.
use crate::postcopy::Postcopy;
use crate::protocol::{
    decode_device_data, decode_join, decode_postcopy, decode_verify, page_digests, Accept, Conn,
    Hello, Kind, PagesIn, MAX_STREAMS,
};
use crate::{Error, GuestMemory};
use cluster_auth::PlaneStream;
use snapshot::memory::{resident_pages, total_pages, write_page};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where passthrough devices' migration data goes as it arrives: (slot,
/// bytes).
pub type DeviceSink<'a> = dyn FnMut(u8, &[u8]) -> Result<(), String> + 'a;

pub struct Incoming {
    conn: Conn<PlaneStream>,
    pub peer: SocketAddr,
    pub pages_received: u64,
    started: Instant,
    /// The source sends page digests before the state (verification mode).
    verify: bool,
    /// Pages compared so far (frames come in order), the pages found to
    /// differ, and which pages this host has resident (taken at the first
    /// frame, when every page has arrived).
    verified: u64,
    differ: Vec<u64>,
    resident: Option<PageBitmap>,
    io_timeout: Duration,
    /// Page streams taken (1: this connection only), the most this side
    /// takes, and the token further streams show.
    streams: u8,
    max_streams: u8,
    token: String,
}

/// Where a destination gets the further connections of a migration
/// (authenticated on the cluster plane, JOIN not read yet): waits up to
/// the given time for the next one.
pub type Joins<'a> = dyn FnMut(Duration) -> Option<PlaneStream> + Send + 'a;

/// Pages named in a verification failure (the count is always given).
const NAMED_PAGES: usize = 16;

/// How the machine state came.
pub enum Arrival {
    /// Every page is here (pre-copy).
    State(Vec<u8>),
    /// The VM runs here before the `missing` pages are (post-copy).
    Postcopy { state: Vec<u8>, missing: PageBitmap },
}

/// What the destination received.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    pub from: String,
    pub pages: u64,
    pub total_ms: f64,
    /// Verification mode: pages whose digest matched the source's at the
    /// pause (every page of guest RAM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_pages: Option<u64>,
}

impl Incoming {
    /// Takes a connection whose handshake is done (see
    /// [`cluster_auth::accept`] on [`crate::source::CHANNEL`]).
    pub fn new(stream: PlaneStream, io_timeout: Duration) -> Result<Incoming, Error> {
        let peer = stream.tcp().peer_addr()?;
        stream.tcp().set_read_timeout(Some(io_timeout))?;
        stream.tcp().set_write_timeout(Some(io_timeout))?;
        Ok(Incoming {
            conn: Conn::plane(stream),
            peer,
            pages_received: 0,
            started: Instant::now(),
            verify: false,
            verified: 0,
            differ: Vec::new(),
            resident: None,
            io_timeout,
            streams: 1,
            max_streams: MAX_STREAMS,
            token: String::new(),
        })
    }

    /// Takes at most `n` page streams (1: only this connection).
    pub fn max_streams(mut self, n: u8) -> Self {
        self.max_streams = n.clamp(1, MAX_STREAMS);
        self
    }

    /// Reads the source's hello; if it fits `mine`, `prepare` gets ready
    /// for the VM (on this side, before any page arrives) and ACCEPT goes
    /// back. A hello that does not fit, or a `prepare` that fails, is
    /// answered REFUSE with the reason (the source never paused) and
    /// returned as an error.
    pub fn hello<T>(
        &mut self,
        mine: &Hello,
        prepare: impl FnOnce(&Hello) -> Result<T, String>,
    ) -> Result<T, Error> {
        let body = self.conn.expect(Kind::Hello)?;
        let theirs: Hello = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("unreadable hello: {e}")))?;
        let ready = mine.check(&theirs).and_then(|()| prepare(&theirs));
        match ready {
            Ok(t) => {
                self.verify = theirs.verify;
                self.streams = theirs.streams.clamp(1, self.max_streams);
                if self.streams == 1 {
                    // (What a source from before streams expects.)
                    self.conn.send(Kind::Accept, &[])?;
                } else {
                    self.token = cluster_auth::token();
                    let body = serde_json::to_vec(&Accept {
                        streams: self.streams,
                        token: self.token.clone(),
                    })
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                    self.conn.send(Kind::Accept, &body)?;
                }
                Ok(t)
            }
            Err(why) => {
                let _ = self.conn.send(Kind::Refuse, why.as_bytes());
                Err(Error::Refused(why))
            }
        }
    }

    /// Writes incoming pages into `mem` (answering SYNC after each round)
    /// until the machine state arrives, alone or with post-copy. With
    /// several page streams, `joins` brings their connections; each is
    /// written on a thread of its own, and all have ended before the
    /// digests, the state or post-copy are taken.
    pub fn memory(&mut self, mem: &GuestMemory, joins: &mut Joins) -> Result<Arrival, Error> {
        self.memory_and_devices(mem, joins, &mut |slot, _| {
            Err(format!(
                "device data for slot {slot}, which this VM does not expect"
            ))
        })
    }

    /// [`Incoming::memory`], with passthrough devices' migration data sent
    /// during the rounds handed to `devices` (slot, bytes) as it comes; an
    /// error there fails the migration.
    pub fn memory_and_devices(
        &mut self,
        mem: &GuestMemory,
        joins: &mut Joins,
        devices: &mut DeviceSink,
    ) -> Result<Arrival, Error> {
        if self.streams <= 1 {
            return self.receive(mem, &mut || Ok(()), devices);
        }
        let set = StreamSet::default();
        let want = usize::from(self.streams - 1);
        let (token, io_timeout) = (self.token.clone(), self.io_timeout);
        let token = token.as_str();
        let result = std::thread::scope(|scope| {
            let set = &set;
            let joiner =
                scope.spawn(move || join_streams(scope, joins, token, want, io_timeout, mem, set));
            let r = self.receive(mem, &mut || set.wait_ended(want, io_timeout), devices);
            set.stop();
            let _ = joiner.join();
            r
        });
        self.pages_received += set.pages.load(Ordering::Relaxed);
        result
    }

    /// The first connection's frames; `ended` is called once before the
    /// digests, the state or post-copy are taken.
    fn receive(
        &mut self,
        mem: &GuestMemory,
        ended: &mut dyn FnMut() -> Result<(), Error>,
        devices: &mut DeviceSink,
    ) -> Result<Arrival, Error> {
        let total = total_pages(mem);
        let mut streams_ended = false;
        let mut wait_streams = |streams_ended: &mut bool| {
            if !*streams_ended {
                *streams_ended = true;
                ended()?;
            }
            Ok::<(), Error>(())
        };
        let mut frame = Vec::new();
        loop {
            let (kind, len) = self.conn.recv_into(&mut frame)?;
            match (kind, &frame[..len]) {
                (Kind::Pages, _) if self.verified > 0 => {
                    // The digests are of the memory at the pause: nothing
                    // may change it after them.
                    return Err(Error::Protocol(
                        "pages after the page digests (verification mode)".into(),
                    ));
                }
                (Kind::Pages, body) => {
                    self.pages_received += write_pages(mem, body, total)?;
                }
                (Kind::Sync, _) => self.conn.send(Kind::Synced, &[])?,
                (Kind::DeviceData, body) => {
                    let (slot, data) = decode_device_data(body)?;
                    if let Err(why) = devices(slot, data) {
                        self.conn.abort(&why);
                        return Err(Error::Vm(why.into()));
                    }
                }
                (Kind::Verify, body) if self.verify => {
                    wait_streams(&mut streams_ended)?;
                    let (first, theirs) = decode_verify(body, total)?;
                    if first != self.verified {
                        return Err(Error::Protocol(format!(
                            "page digests from page {first}, expected page {}",
                            self.verified
                        )));
                    }
                    let resident = self.resident.get_or_insert_with(|| resident_pages(mem));
                    let mine = page_digests(mem, resident, first, theirs.len() as u64)?;
                    self.differ.extend(
                        (0..theirs.len())
                            .filter(|&i| mine[i] != theirs[i])
                            .map(|i| first + i as u64),
                    );
                    self.verified += theirs.len() as u64;
                }
                (Kind::State, state) => {
                    wait_streams(&mut streams_ended)?;
                    if self.verify {
                        self.check_verified(mem, total)?;
                    }
                    return Ok(Arrival::State(state.to_vec()));
                }
                (Kind::Postcopy, body) => {
                    wait_streams(&mut streams_ended)?;
                    let (state, missing) = decode_postcopy(body, total)?;
                    return Ok(Arrival::Postcopy { state, missing });
                }
                (k, _) => {
                    return Err(Error::Protocol(format!(
                        "expected Pages, Sync, State or Postcopy, got {k:?}"
                    )))
                }
            }
        }
    }

    /// Verification mode, the state has come: every page must have been
    /// compared and found equal; otherwise the source is told which pages
    /// differ (it resumes its guest) and the migration fails here.
    fn check_verified(&mut self, mem: &GuestMemory, total: u64) -> Result<(), Error> {
        let why = if self.verified != total {
            format!(
                "verification: the source sent digests of {} of {total} pages",
                self.verified
            )
        } else if !self.differ.is_empty() {
            let named: Vec<String> = self
                .differ
                .iter()
                .take(NAMED_PAGES)
                .map(|&p| match page_address(mem, p) {
                    Some(gpa) => format!("{p} (guest-physical {gpa:#x})"),
                    None => p.to_string(),
                })
                .collect();
            format!(
                "verification: {} of {total} pages differ from the source's at the pause: {}{}",
                self.differ.len(),
                named.join(", "),
                if self.differ.len() > NAMED_PAGES {
                    ", ..."
                } else {
                    ""
                }
            )
        } else {
            return Ok(());
        };
        self.conn.abort(&why);
        Err(Error::Verify(why))
    }

    /// Switches to post-copy: `missing` pages of `mem` are trapped and
    /// fetched from here on ([`Postcopy`]).
    pub fn postcopy(
        self,
        mem: &GuestMemory,
        missing: PageBitmap,
    ) -> Result<(Postcopy, Received), Error> {
        let received = self.received();
        let conn = self.conn;
        Ok((Postcopy::start(mem, missing, conn)?, received))
    }

    fn received(&self) -> Received {
        Received {
            from: self.peer.to_string(),
            pages: self.pages_received,
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            verified_pages: (self.verify && self.differ.is_empty() && self.verified > 0)
                .then_some(self.verified),
        }
    }

    /// Tells the source the VM stands ready and waits for GO; then `start`
    /// runs the vCPUs and RUNNING goes back. An error from `start` is sent
    /// as ABORT (the source resumes its copy).
    pub fn switch_over(
        &mut self,
        start: impl FnOnce() -> Result<(), crate::VmError>,
    ) -> Result<Received, Error> {
        self.conn.send(Kind::Ready, &[])?;
        self.conn.expect(Kind::Go)?;
        if let Err(e) = start() {
            self.conn
                .abort(&format!("the destination could not start the VM: {e}"));
            return Err(Error::Vm(e));
        }
        self.conn.send(Kind::Running, &[])?;
        Ok(self.received())
    }

    /// Tells the source why this destination gives up.
    pub fn abort(&mut self, why: &str) {
        self.conn.abort(why);
    }
}

/// The further page streams of one migration on the destination.
#[derive(Default)]
struct StreamSet {
    /// The first connection is done (or failed): streams stop.
    stopping: AtomicBool,
    /// Their sockets (from before their JOIN), to shut them down when
    /// stopping.
    sockets: Mutex<Vec<TcpStream>>,
    /// Stream numbers taken so far.
    joined: Mutex<Vec<u8>>,
    /// Streams that ended with END, and the first failure.
    ended: Mutex<(usize, Option<String>)>,
    changed: Condvar,
    pages: AtomicU64,
}

impl StreamSet {
    /// Keeps a clone of the connection's socket, to shut it down when
    /// stopping; false if already stopping (the connection is shut).
    fn track(&self, stream: &PlaneStream) -> bool {
        let Ok(socket) = stream.tcp().try_clone() else {
            return false;
        };
        let Ok(mut sockets) = self.sockets.lock() else {
            return false;
        };
        // `stop` sets the flag before it takes the lock: a socket added
        // after it went through the list sees the flag here.
        if self.stopping.load(Ordering::Acquire) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            return false;
        }
        sockets.push(socket);
        true
    }

    /// Takes stream number `index` (1..=want) if no other has it.
    fn claim(&self, index: u8, want: usize) -> bool {
        let Ok(mut joined) = self.joined.lock() else {
            return false;
        };
        let i = usize::from(index);
        if i == 0 || i > want || joined.contains(&index) {
            return false;
        }
        joined.push(index);
        true
    }

    fn joined(&self) -> usize {
        self.joined.lock().map(|j| j.len()).unwrap_or(0)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Ok(sockets) = self.sockets.lock() {
            for s in sockets.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn finished(&self, why: Option<String>) {
        if let Ok(mut e) = self.ended.lock() {
            match why {
                None => e.0 += 1,
                Some(w) => {
                    e.1.get_or_insert(w);
                }
            }
        }
        self.changed.notify_all();
    }

    /// Waits until `want` streams have ended with END (each after its
    /// last pages were written).
    fn wait_ended(&self, want: usize, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut e = self
            .ended
            .lock()
            .map_err(|_| Error::Protocol("page streams: lock poisoned".into()))?;
        loop {
            if let Some(why) = &e.1 {
                return Err(Error::Protocol(format!("a page stream failed: {why}")));
            }
            if e.0 >= want {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Protocol(format!(
                    "{} of {want} page streams ended within {timeout:?}",
                    e.0
                )));
            }
            e = self
                .changed
                .wait_timeout(e, left)
                .map_err(|_| Error::Protocol("page streams: lock poisoned".into()))?
                .0;
        }
    }
}

/// How long a further connection has to show its JOIN (the source sends
/// it right after the handshake).
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes further connections from `joins` until `want` have shown `token`
/// in their JOIN, and writes what each carries on a thread of its own (in
/// `scope`) until END. Each connection reads its JOIN on its own thread,
/// so a silent one delays no other; one with another token or a number
/// already taken is dropped (a late one of an earlier attempt, say).
fn join_streams<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    joins: &mut Joins,
    token: &'scope str,
    want: usize,
    io_timeout: Duration,
    mem: &'scope GuestMemory,
    set: &'scope StreamSet,
) {
    while set.joined() < want && !set.stopping.load(Ordering::Acquire) {
        let Some(stream) = joins(Duration::from_millis(100)) else {
            continue;
        };
        // Known before its JOIN: stopping shuts it down, whatever it does.
        if !set.track(&stream) {
            return;
        }
        scope.spawn(move || {
            let _ = stream.tcp().set_read_timeout(Some(JOIN_TIMEOUT));
            let _ = stream.tcp().set_write_timeout(Some(io_timeout));
            let mut conn = Conn::plane(stream);
            let index = match conn.expect(Kind::Join).and_then(|b| {
                let (index, theirs) = decode_join(&b)?;
                Ok((index, theirs == token.as_bytes()))
            }) {
                Ok((index, true)) if set.claim(index, want) => index,
                Ok(_) => {
                    tracing::warn!("migration: dropped a page stream with a wrong token or number");
                    return;
                }
                Err(e) => {
                    tracing::warn!("migration: dropped a page stream: {e}");
                    return;
                }
            };
            let _ = conn.stream().set_read_timeout(Some(io_timeout));
            let why = match receive_stream(&mut conn, mem, set) {
                Ok(()) => None,
                Err(_) if set.stopping.load(Ordering::Acquire) => Some("stopped".into()),
                Err(e) => Some(format!("stream {index}: {e}")),
            };
            set.finished(why);
        });
    }
}

/// Checks a PAGES frame and writes its pages into `mem`; returns how many.
fn write_pages(mem: &GuestMemory, body: &[u8], total: u64) -> Result<u64, Error> {
    const ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    let pages = PagesIn::decode(body, total)?;
    for (page, data) in pages.iter() {
        write_page(mem, page, data.unwrap_or(&ZERO))?;
    }
    Ok(pages.len() as u64)
}

/// One further stream: pages into `mem`, SYNC answered, until END.
fn receive_stream(
    conn: &mut Conn<PlaneStream>,
    mem: &GuestMemory,
    set: &StreamSet,
) -> Result<(), Error> {
    let total = total_pages(mem);
    let mut frame = Vec::new();
    loop {
        let (kind, len) = conn.recv_into(&mut frame)?;
        match (kind, &frame[..len]) {
            (Kind::Pages, body) => {
                let n = write_pages(mem, body, total)?;
                set.pages.fetch_add(n, Ordering::Relaxed);
            }
            (Kind::Sync, _) => conn.send(Kind::Synced, &[])?,
            (Kind::End, _) => return Ok(()),
            (k, _) => {
                return Err(Error::Protocol(format!(
                    "expected Pages, Sync or End on a page stream, got {k:?}"
                )))
            }
        }
    }
}

/// The guest-physical address of page `page` (memory-file numbering).
fn page_address(mem: &GuestMemory, page: u64) -> Option<u64> {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
    let mut first = 0;
    for r in mem.iter() {
        let n = r.len() / PAGE_SIZE;
        if page < first + n {
            return Some(r.start_addr().0 + (page - first) * PAGE_SIZE);
        }
        first += n;
    }
    None
}
