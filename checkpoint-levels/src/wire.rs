//! The checkpoint endpoint's protocol: framed messages over TCP.
//!
//! Every frame is `"FFCK"`, a kind byte, a u32 length (little-endian) and
//! the payload. Kind 1 is a JSON message ([`Envelope`] from the client
//! first, then [`Request`]/[`Response`] turns), kind 2 a block of data (at
//! most 1 MiB), kind 3 ends a data stream. One operation per connection:
//! the client sends the envelope, the server answers, bulk data follows as
//! data frames, and the receiver of data has the last word (stored / error).
//! Frames over their size limit, unknown kinds, a wrong protocol name or
//! version are refused with a reason; sockets time out so a dead peer
//! cannot hang either side.
//!
//! All of it runs inside a cluster-plane channel (`cluster_auth`) opened
//! with the key of the job (partner copies) or XOR group the request is
//! about: an endpoint serves a connection only that owner's data.
use crate::dirlevel::CopyInfo;
use crate::xor::{XorEpoch, XorMeta, XorPart};
use crate::{Error, Result};
use cluster_auth::{PlaneStream, Trust};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use snapshot::Manifest;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const PROTOCOL: &str = "ffmk-checkpoint";
pub const PROTOCOL_VERSION: u32 = 2;
/// The cluster-plane channel of the checkpoint service.
pub const CHANNEL: &str = "checkpoint";
const MAGIC: &[u8; 4] = b"FFCK";
const MSG: u8 = 1;
const DATA: u8 = 2;
const END: u8 = 3;
const MAX_MSG: u32 = 4 << 20;
const MAX_DATA: u32 = 1 << 20;
/// A peer that sends or accepts nothing for this long is gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub protocol: String,
    pub version: u32,
    pub request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Store copy `name` of `job` (answer: which files to send).
    Offer {
        job: String,
        name: String,
        manifest: Box<Manifest>,
    },
    /// The copies held for `job`.
    List { job: String },
    /// Send copy `name` of `job` as an archive.
    Fetch { job: String, name: String },
    /// Store a member's own archive (at its own endpoint) or a parity chunk.
    XorPut {
        group: String,
        epoch: u64,
        members: u32,
        meta: XorMeta,
        part: XorPart,
    },
    /// What this endpoint holds for an XOR group.
    XorList { group: String },
    /// Send member data or this holder's parity for `epoch`.
    XorFetch {
        group: String,
        epoch: u64,
        part: XorPart,
    },
}

impl Request {
    /// Whose data the request is about: the job of partner copies, the
    /// group of XOR parts (its members are the ranks of one job and read
    /// each other's parts to rebuild). The connection must be opened with
    /// that name's key.
    pub fn owner(&self) -> &str {
        match self {
            Request::Offer { job, .. } | Request::List { job } | Request::Fetch { job, .. } => job,
            Request::XorPut { group, .. }
            | Request::XorList { group }
            | Request::XorFetch { group, .. } => group,
        }
    }
}

/// How this process's checkpoint clients authenticate to the endpoints of
/// other hosts (chosen on the command line): the cluster's trust, or why
/// there is none - given back by the first request that needs a peer, so
/// levels on this host work without a key.
#[derive(Clone, Debug)]
pub struct Peers(std::result::Result<Trust, String>);

impl Peers {
    pub fn new(trust: std::result::Result<Trust, String>) -> Peers {
        Peers(trust)
    }

    /// No key configured: levels on other hosts cannot be reached.
    pub fn none() -> Peers {
        Peers(Err(
            "no cluster key configured for checkpoint clients".into()
        ))
    }
}

impl Default for Peers {
    fn default() -> Self {
        Peers::none()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Need {
        files: Vec<String>,
    },
    Ready,
    Stored {
        files: usize,
        bytes: u64,
    },
    Copies {
        copies: Vec<CopyInfo>,
        broken: Vec<(String, String)>,
    },
    Sending {
        bytes: u64,
        manifest: Option<Box<Manifest>>,
    },
    Xor {
        epochs: Vec<XorEpoch>,
    },
    Error {
        reason: String,
    },
}

/// One connection (either side).
pub struct Conn {
    r: BufReader<PlaneStream>,
    w: BufWriter<PlaneStream>,
    pub peer: String,
}

impl Conn {
    /// Connects to `addr` and opens the channel with `job`'s key.
    pub fn connect(addr: SocketAddr, job: &str, peers: &Peers) -> Result<Conn> {
        let peer = addr.to_string();
        let trust = match &peers.0 {
            Ok(t) => t,
            Err(e) => {
                return Err(Error::Peer {
                    peer,
                    detail: e.clone(),
                })
            }
        };
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| Error::Peer {
                peer: peer.clone(),
                detail: format!("cannot connect: {e}"),
            })?;
        let s = cluster_auth::connect(s, trust, CHANNEL, Some(job), Duration::from_secs(10))
            .map_err(|e| Error::Peer {
                peer: peer.clone(),
                detail: match e {
                    cluster_auth::Error::Refused { detail, .. } => detail,
                    e => e.to_string(),
                },
            })?;
        Conn::new(s, peer)
    }

    pub fn new(s: PlaneStream, peer: String) -> Result<Conn> {
        let fail = |e: std::io::Error| Error::Peer {
            peer: peer.clone(),
            detail: e.to_string(),
        };
        s.tcp().set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        s.tcp().set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        let w = s.try_clone().map_err(fail)?;
        Ok(Conn {
            r: BufReader::with_capacity(1 << 20, s),
            w: BufWriter::with_capacity(1 << 20, w),
            peer,
        })
    }

    pub fn fail(&self, detail: impl std::fmt::Display) -> Error {
        Error::Peer {
            peer: self.peer.clone(),
            detail: detail.to_string(),
        }
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 9];
        head[..4].copy_from_slice(MAGIC);
        head[4] = kind;
        head[5..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.w
            .write_all(&head)
            .and_then(|()| self.w.write_all(payload))
            .map_err(|e| self.fail(format!("connection lost: {e}")))
    }

    fn read_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.r.read_exact(&mut head).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.fail("connection closed")
            } else {
                self.fail(format!("connection lost: {e}"))
            }
        })?;
        if &head[..4] != MAGIC {
            return Err(self.fail("not an ffmk checkpoint endpoint (bad frame magic)"));
        }
        let kind = head[4];
        let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        let limit = match kind {
            MSG => MAX_MSG,
            DATA => MAX_DATA,
            END => 0,
            k => return Err(self.fail(format!("unknown frame kind {k}"))),
        };
        if len > limit {
            return Err(self.fail(format!("frame of {len} bytes (limit {limit})")));
        }
        let mut payload = vec![0u8; len as usize];
        self.r
            .read_exact(&mut payload)
            .map_err(|e| self.fail(format!("connection lost: {e}")))?;
        Ok((kind, payload))
    }

    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let text = serde_json::to_vec(msg).map_err(|e| self.fail(e))?;
        self.frame(MSG, &text)?;
        self.w
            .flush()
            .map_err(|e| self.fail(format!("connection lost: {e}")))
    }

    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T> {
        let (kind, payload) = self.read_frame()?;
        if kind != MSG {
            return Err(self.fail("expected a message, got data"));
        }
        serde_json::from_slice(&payload).map_err(|e| self.fail(format!("bad message: {e}")))
    }

    /// Ends the connection after a refusal so the peer reads the reason:
    /// our side is shut for writing, and what the peer still sends is
    /// drained for a moment (closing with unread input would reset the
    /// connection and could destroy the answer in flight).
    pub fn close_after_refusal(mut self) {
        let _ = self.w.flush();
        let s = self.r.get_ref().tcp();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut sink = [0u8; 64 << 10];
        let mut left = 16usize << 20;
        while let Ok(n) = self.r.read(&mut sink) {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    }

    /// The server's answer; an error answer becomes an error.
    pub fn reply(&mut self) -> Result<Response> {
        match self.recv::<Response>()? {
            Response::Error { reason } => Err(self.fail(reason)),
            r => Ok(r),
        }
    }

    /// Starts a request (client side).
    pub fn request(addr: SocketAddr, request: Request, peers: &Peers) -> Result<(Conn, Response)> {
        let mut c = Conn::connect(addr, request.owner(), peers)?;
        c.send(&Envelope {
            protocol: PROTOCOL.into(),
            version: PROTOCOL_VERSION,
            request,
        })?;
        let r = c.reply()?;
        Ok((c, r))
    }

    /// A writer of data frames; [`DataOut::finish`] ends the stream.
    pub fn data_out(&mut self) -> DataOut<'_> {
        DataOut {
            c: self,
            buf: Vec::with_capacity(MAX_DATA as usize),
        }
    }

    /// A reader of data frames up to the end frame.
    pub fn data_in(&mut self) -> DataIn<'_> {
        DataIn {
            c: self,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

pub struct DataOut<'a> {
    c: &'a mut Conn,
    buf: Vec<u8>,
}

impl DataOut<'_> {
    fn push(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            self.c
                .frame(DATA, &b)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.buf = b;
            self.buf.clear();
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.push().map_err(|e| self.c.fail(e))?;
        self.c.frame(END, &[])?;
        self.c
            .w
            .flush()
            .map_err(|e| self.c.fail(format!("connection lost: {e}")))
    }
}

impl Write for DataOut<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = MAX_DATA as usize - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_DATA as usize {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push()
    }
}

pub struct DataIn<'a> {
    c: &'a mut Conn,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl DataIn<'_> {
    /// Reads to the end frame, requiring that nothing is left over.
    pub fn expect_end(mut self) -> Result<()> {
        let mut rest = [0u8; 1];
        match self.read(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err(self.c.fail("more data than announced")),
            Err(e) => Err(self.c.fail(e)),
        }
    }
}

impl Read for DataIn<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let (kind, payload) = self
                .c
                .read_frame()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            match kind {
                DATA => {
                    self.buf = payload;
                    self.pos = 0;
                }
                END => self.done = true,
                _ => return Err(std::io::Error::other("a message inside a data stream")),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
