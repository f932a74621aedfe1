//! The receiving side, one connection at a time: the VMM listens, and for
//! each connection calls [`Incoming::hello`] (which builds the VM without
//! its state), [`Incoming::memory`], loads the state into the VM (paused),
//! then [`Incoming::switch_over`]. Any error
//! before GO means: drop what was received, listen again.
use crate::postcopy::Postcopy;
use crate::protocol::{decode_postcopy, Conn, Hello, Kind, Pages};
use crate::{Error, GuestMemory};
use snapshot::memory::{total_pages, write_page};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Incoming {
    conn: Conn<TcpStream>,
    pub peer: SocketAddr,
    pub pages_received: u64,
    started: Instant,
}

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
}

impl Incoming {
    pub fn new(stream: TcpStream, io_timeout: Duration) -> Result<Incoming, Error> {
        let peer = stream.peer_addr()?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(Incoming {
            conn: Conn::new(stream),
            peer,
            pages_received: 0,
            started: Instant::now(),
        })
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
                self.conn.send(Kind::Accept, &[])?;
                Ok(t)
            }
            Err(why) => {
                let _ = self.conn.send(Kind::Refuse, why.as_bytes());
                Err(Error::Refused(why))
            }
        }
    }

    /// Writes incoming pages into `mem` (answering SYNC after each round)
    /// until the machine state arrives, alone or with post-copy.
    pub fn memory(&mut self, mem: &GuestMemory) -> Result<Arrival, Error> {
        let total = total_pages(mem);
        let zero = vec![0u8; PAGE_SIZE as usize];
        loop {
            match self.conn.recv()? {
                (Kind::Pages, body) => {
                    let pages = Pages::decode(&body, total)?;
                    for (page, data) in pages.iter() {
                        write_page(mem, page, data.unwrap_or(&zero))?;
                    }
                    self.pages_received += pages.len() as u64;
                }
                (Kind::Sync, _) => self.conn.send(Kind::Synced, &[])?,
                (Kind::State, state) => return Ok(Arrival::State(state)),
                (Kind::Postcopy, body) => {
                    let (state, missing) = decode_postcopy(&body, total)?;
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
        }
    }

    /// Tells the source the VM stands ready and waits for GO; then `start`
    /// runs the vCPUs and RUNNING goes back. An error from `start` is sent
    /// as ABORT (the source resumes its copy).
    pub fn switch_over(
        &mut self,
        start: impl FnOnce() -> Result<(), String>,
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
