//! The receiving side, one connection at a time: the VMM listens, and for
//! each connection calls [`Incoming::hello`], [`Incoming::memory`], builds
//! the VM (paused) from the state, then [`Incoming::switch_over`]. Any error
//! before GO means: drop what was received, listen again.
use crate::protocol::{Conn, Hello, Kind, Pages};
use crate::{Error, GuestMemory};
use snapshot::memory::{total_pages, write_page};
use snapshot::PAGE_SIZE;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Incoming {
    conn: Conn<TcpStream>,
    pub peer: SocketAddr,
    pub pages_received: u64,
    started: Instant,
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

    /// Reads the source's hello and accepts it if it fits `mine`, else
    /// answers REFUSE with the reason and returns it as an error.
    pub fn hello(&mut self, mine: &Hello) -> Result<Hello, Error> {
        let body = self.conn.expect(Kind::Hello)?;
        let theirs: Hello = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("unreadable hello: {e}")))?;
        if let Err(why) = mine.check(&theirs) {
            let _ = self.conn.send(Kind::Refuse, why.as_bytes());
            return Err(Error::Refused(why));
        }
        self.conn.send(Kind::Accept, &[])?;
        Ok(theirs)
    }

    /// Writes incoming pages into `mem` until the machine state arrives;
    /// returns the state.
    pub fn memory(&mut self, mem: &GuestMemory) -> Result<Vec<u8>, Error> {
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
                (Kind::State, state) => return Ok(state),
                (k, _) => {
                    return Err(Error::Protocol(format!(
                        "expected Pages or State, got {k:?}"
                    )))
                }
            }
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
        Ok(Received {
            from: self.peer.to_string(),
            pages: self.pages_received,
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Tells the source why this destination gives up.
    pub fn abort(&mut self, why: &str) {
        self.conn.abort(why);
    }
}
