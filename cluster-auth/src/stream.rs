//! Authenticated, encrypted TCP channels.
//!
//! The initiator opens with a clear preamble that names the channel
//! ("migration", "checkpoint", ...) and, for the checkpoint service, the
//! job; then comes a Noise `NNpsk0_25519_AESGCM_SHA256` handshake of two
//! messages whose prologue is that preamble. The pre-shared key is the
//! cluster key's plane key, or the job's key when a job is named, so a
//! client holding only job A's key can open job A's copies and nothing
//! else. A responder that cannot decrypt the first message closes the
//! connection without a word: a peer without the key learns nothing about
//! the host. Afterwards every record is `u16 length` + AES-256-GCM
//! ciphertext under a counter nonce per direction, so a record that was
//! changed, dropped, replayed or reordered fails to open and ends the
//! connection.
//!
//! [`PlaneStream`] reads and writes plaintext, buffers writes into
//! records of up to 64 KiB (`flush` sends what is buffered), and can be
//! cloned into a reading and a writing half that work at the same time.
//! With [`Trust::Insecure`] it is the TCP stream itself.
use crate::key::{check_job_name, Key};
use crate::{Error, Trust};
use snow::StatelessTransportState;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const MAGIC: &[u8; 8] = b"FFMKNZ1\0";
const TAG: usize = 16;
/// Noise's largest message.
const MAX_RECORD: usize = 65535;
const MAX_PLAIN: usize = MAX_RECORD - TAG;
/// Long enough for the two handshake messages of this pattern (48 and 48
/// bytes) with room to spare; anything longer is refused.
const MAX_HANDSHAKE: usize = 1024;

/// One end of a cluster-plane connection.
pub struct PlaneStream {
    tcp: TcpStream,
    secure: Option<Arc<Secure>>,
}

struct Secure {
    transport: StatelessTransportState,
    send: Mutex<Sending>,
    recv: Mutex<Receiving>,
}

struct Sending {
    nonce: u64,
    /// Plaintext not yet sealed.
    plain: Vec<u8>,
    /// Sealed records not yet written (written together: one system call
    /// for up to [`WIRE_BATCH`] bytes).
    wire: Vec<u8>,
    broken: bool,
}

/// Sealed bytes gathered before a write.
const WIRE_BATCH: usize = 1 << 20;

struct Receiving {
    nonce: u64,
    /// Bytes read from the socket and not yet opened: `raw[start..end]`
    /// (a record cut by a read timeout stays here for the next read).
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// The last record's plaintext and how much of it was read.
    plain: Vec<u8>,
    pos: usize,
    broken: bool,
}

/// Opens the initiator's side of `channel` (and of `job`'s copies, where
/// given) over a connected socket; the handshake must finish within
/// `deadline`.
pub fn connect(
    tcp: TcpStream,
    trust: &Trust,
    channel: &str,
    job: Option<&str>,
    deadline: Duration,
) -> Result<PlaneStream, Error> {
    no_delay(&tcp);
    let key = match trust {
        Trust::Insecure => return Ok(PlaneStream { tcp, secure: None }),
        Trust::Key(k) => k,
    };
    let peer = peer_name(&tcp);
    let psk = psk(key, job)?;
    let preamble = preamble(channel, job)?;
    let end = Instant::now() + deadline;
    let io = |source| Error::Io {
        peer: peer.clone(),
        source,
    };
    let mut hs = builder(&preamble, psk.bytes())
        .and_then(|b| b.build_initiator())
        .map_err(|e| io(io::Error::other(e)))?;
    let mut buf = [0u8; MAX_HANDSHAKE];
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(|e| io(io::Error::other(e)))?;
    let mut t = &tcp;
    with_deadline(&tcp, end, || {
        let mut first = preamble.clone();
        first.extend_from_slice(&(n as u16).to_be_bytes());
        first.extend_from_slice(&buf[..n]);
        t.write_all(&first)
    })
    .map_err(io)?;
    let reply = match with_deadline(&tcp, end, || read_message(&mut t)) {
        Ok(r) => r,
        Err(e) if refused(&e) => {
            return Err(Error::Refused {
                peer,
                detail: format!(
                    "the {channel} endpoint refused the handshake: it does not hold {} (or is \
                     not an ffmk {channel} endpoint)",
                    match job {
                        Some(j) => format!("job {j:?}'s key"),
                        None => "this cluster's key".into(),
                    }
                ),
            })
        }
        Err(e) => return Err(io(e)),
    };
    hs.read_message(&reply, &mut buf)
        .map_err(|_| Error::Refused {
            peer: peer.clone(),
            detail: format!("the {channel} endpoint answered with a key other than ours"),
        })?;
    finish(tcp, hs, &peer)
}

/// What the initiator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub channel: String,
    pub job: Option<String>,
}

/// Takes the responder's side of a connection on one of `channels`; the
/// handshake must finish within `deadline`. A peer without the key (or
/// asking for another channel) gets the connection closed and nothing
/// else; the error says why, for the log.
pub fn accept(
    tcp: TcpStream,
    trust: &Trust,
    channels: &[&str],
    deadline: Duration,
) -> Result<(PlaneStream, Opened), Error> {
    no_delay(&tcp);
    let key = match trust {
        Trust::Insecure => {
            let opened = Opened {
                channel: channels.first().copied().unwrap_or_default().to_string(),
                job: None,
            };
            return Ok((PlaneStream { tcp, secure: None }, opened));
        }
        Trust::Key(k) => k,
    };
    let peer = peer_name(&tcp);
    let end = Instant::now() + deadline;
    let refuse = |detail: String| Error::Refused {
        peer: peer.clone(),
        detail,
    };
    let io = |source| Error::Io {
        peer: peer.clone(),
        source,
    };
    let mut t = &tcp;
    let (preamble, opened) = with_deadline(&tcp, end, || read_preamble(&mut t)).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData {
            refuse(e.to_string())
        } else {
            io(e)
        }
    })?;
    if !channels.contains(&opened.channel.as_str()) {
        return Err(refuse(format!(
            "asked for channel {:?}, this endpoint serves {channels:?}",
            opened.channel
        )));
    }
    let psk = psk(key, opened.job.as_deref()).map_err(|e| refuse(e.to_string()))?;
    let first = with_deadline(&tcp, end, || read_message(&mut t)).map_err(io)?;
    let mut hs = builder(&preamble, psk.bytes())
        .and_then(|b| b.build_responder())
        .map_err(|e| io(io::Error::other(e)))?;
    let mut buf = [0u8; MAX_HANDSHAKE];
    hs.read_message(&first, &mut buf).map_err(|_| {
        refuse(match &opened.job {
            Some(j) => format!("does not hold job {j:?}'s key (handshake failed)"),
            None => "does not hold the cluster key (handshake failed)".into(),
        })
    })?;
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(|e| io(io::Error::other(e)))?;
    with_deadline(&tcp, end, || {
        let mut reply = (n as u16).to_be_bytes().to_vec();
        reply.extend_from_slice(&buf[..n]);
        t.write_all(&reply)
    })
    .map_err(io)?;
    Ok((finish(tcp, hs, &peer)?, opened))
}

fn psk(key: &Key, job: Option<&str>) -> Result<crate::Secret, Error> {
    match job {
        Some(j) => key.job_key(j),
        None => Ok(key.cluster()?.derive(b"plane")),
    }
}

fn builder<'a>(prologue: &'a [u8], psk: &'a [u8; 32]) -> Result<snow::Builder<'a>, snow::Error> {
    let params: snow::params::NoiseParams = PARAMS.parse()?;
    snow::Builder::new(params).prologue(prologue)?.psk(0, psk)
}

/// Turns Nagle's algorithm off. The plane's protocols are request and
/// answer (a migration's SYNC, STATE, READY and GO; a checkpoint's header
/// and its reply), and the stream batches its own records: with Nagle on,
/// a short frame written while the previous one was not yet acknowledged
/// waited for the peer's delayed ACK, and a migration's switch-over took
/// 20-30 ms longer about every other time (`ci/bench-migrate --verbose`,
/// `destination_ms`). Best effort: a socket that refuses still works.
fn no_delay(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
}

fn finish(tcp: TcpStream, hs: snow::HandshakeState, peer: &str) -> Result<PlaneStream, Error> {
    let transport = hs.into_stateless_transport_mode().map_err(|e| Error::Io {
        peer: peer.to_string(),
        source: io::Error::other(e),
    })?;
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(PlaneStream {
        tcp,
        secure: Some(Arc::new(Secure {
            transport,
            send: Mutex::new(Sending {
                nonce: 0,
                plain: Vec::with_capacity(MAX_PLAIN),
                wire: Vec::with_capacity(WIRE_BATCH + 2 + MAX_RECORD),
                broken: false,
            }),
            recv: Mutex::new(Receiving {
                nonce: 0,
                raw: vec![0; WIRE_BATCH],
                start: 0,
                end: 0,
                plain: Vec::with_capacity(MAX_RECORD),
                pos: 0,
                broken: false,
            }),
        })),
    })
}

fn preamble(channel: &str, job: Option<&str>) -> Result<Vec<u8>, Error> {
    if channel.is_empty() || channel.len() > 32 || !channel.bytes().all(|b| b.is_ascii_lowercase())
    {
        return Err(Error::Key(format!("bad channel name {channel:?}")));
    }
    let job = job.unwrap_or("");
    if !job.is_empty() {
        check_job_name(job)?;
    }
    let mut p = MAGIC.to_vec();
    p.push(channel.len() as u8);
    p.extend_from_slice(channel.as_bytes());
    p.push(job.len() as u8);
    p.extend_from_slice(job.as_bytes());
    Ok(p)
}

fn read_preamble(r: &mut impl Read) -> io::Result<(Vec<u8>, Opened)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut p = vec![0u8; MAGIC.len() + 1];
    r.read_exact(&mut p)?;
    if &p[..MAGIC.len()] != MAGIC {
        return Err(bad(
            "did not open the cluster-plane handshake (an insecure or foreign peer)",
        ));
    }
    let clen = p[MAGIC.len()] as usize;
    if clen == 0 || clen > 32 {
        return Err(bad("bad channel name in the handshake"));
    }
    let mut rest = vec![0u8; clen + 1];
    r.read_exact(&mut rest)?;
    let jlen = rest[clen] as usize;
    let mut job = vec![0u8; jlen];
    r.read_exact(&mut job)?;
    let channel = String::from_utf8(rest[..clen].to_vec())
        .ok()
        .filter(|c| c.bytes().all(|b| b.is_ascii_lowercase()))
        .ok_or_else(|| bad("bad channel name in the handshake"))?;
    let job = match jlen {
        0 => None,
        _ => {
            let j = String::from_utf8(job.clone()).map_err(|_| bad("bad job name"))?;
            check_job_name(&j).map_err(|e| bad(&e.to_string()))?;
            Some(j)
        }
    };
    p.extend_from_slice(&rest);
    p.extend_from_slice(&job.clone().unwrap_or_default().into_bytes());
    Ok((p, Opened { channel, job }))
}

fn read_message(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handshake message too long",
        ));
    }
    let mut m = vec![0u8; len];
    r.read_exact(&mut m)?;
    Ok(m)
}

/// Runs a blocking exchange with the socket's timeouts set to what is left
/// of the deadline.
fn with_deadline<T>(
    tcp: &TcpStream,
    end: Instant,
    f: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let left = end.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake did not finish in time",
        ));
    }
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))?;
    f().map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake did not finish in time",
        ),
        _ => e,
    })
}

fn refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "peer".into())
}

impl PlaneStream {
    /// A second handle on the same connection (one thread reads while
    /// another writes).
    pub fn try_clone(&self) -> io::Result<PlaneStream> {
        Ok(PlaneStream {
            tcp: self.tcp.try_clone()?,
            secure: self.secure.clone(),
        })
    }

    /// The socket, for timeouts, shutdown and addresses. Reading or
    /// writing it directly would break the record stream.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the cluster-plane connection broke earlier",
    )
}

impl Secure {
    /// Seals `plain` as one record after the ones waiting; writes them all
    /// once a batch is full.
    fn send_record(&self, tcp: &TcpStream, s: &mut Sending, plain: &[u8]) -> io::Result<()> {
        let at = s.wire.len();
        s.wire.resize(at + 2 + plain.len() + TAG, 0);
        let n = self
            .transport
            .write_message(s.nonce, plain, &mut s.wire[at + 2..])
            .map_err(io::Error::other)?;
        s.nonce += 1;
        s.wire[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        s.wire.truncate(at + 2 + n);
        if s.wire.len() >= WIRE_BATCH {
            write_wire(tcp, s)?;
        }
        Ok(())
    }

    /// Seals what is buffered and writes every waiting record.
    fn flush_buffered(&self, tcp: &TcpStream, s: &mut Sending) -> io::Result<()> {
        if !s.plain.is_empty() {
            let plain = std::mem::take(&mut s.plain);
            let r = self.send_record(tcp, s, &plain);
            s.plain = plain;
            s.plain.clear();
            r?;
        }
        write_wire(tcp, s)
    }
}

fn write_wire(tcp: &TcpStream, s: &mut Sending) -> io::Result<()> {
    if s.wire.is_empty() {
        return Ok(());
    }
    let mut t = tcp;
    let r = t.write_all(&s.wire).inspect_err(|_| s.broken = true);
    s.wire.clear();
    r
}

impl Write for PlaneStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(sec) = &self.secure else {
            return self.tcp.write(buf);
        };
        let mut s = lock(&sec.send);
        if s.broken {
            return Err(broken());
        }
        if s.plain.is_empty() && buf.len() >= MAX_PLAIN {
            sec.send_record(&self.tcp, &mut s, &buf[..MAX_PLAIN])?;
            return Ok(MAX_PLAIN);
        }
        let take = buf.len().min(MAX_PLAIN - s.plain.len());
        s.plain.extend_from_slice(&buf[..take]);
        if s.plain.len() == MAX_PLAIN {
            let plain = std::mem::take(&mut s.plain);
            let r = sec.send_record(&self.tcp, &mut s, &plain);
            s.plain = plain;
            s.plain.clear();
            r?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(sec) = &self.secure else {
            return self.tcp.flush();
        };
        let mut s = lock(&sec.send);
        if s.broken {
            return Err(broken());
        }
        sec.flush_buffered(&self.tcp, &mut s)
    }
}

impl Read for PlaneStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(sec) = &self.secure else {
            return self.tcp.read(buf);
        };
        let mut r = lock(&sec.recv);
        let r = &mut *r;
        if r.broken {
            return Err(broken());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        while r.pos == r.plain.len() {
            // A whole record in `raw`? Else read more (as much as comes).
            let have = r.end - r.start;
            let need = if have >= 2 {
                2 + u16::from_be_bytes([r.raw[r.start], r.raw[r.start + 1]]) as usize
            } else {
                2
            };
            if need > 2 && need < 2 + TAG {
                r.broken = true;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a record shorter than its tag",
                ));
            }
            if have < need || need == 2 {
                if r.start > 0 && r.raw.len() - r.start < 2 + MAX_RECORD {
                    let (start, end) = (r.start, r.end);
                    r.raw.copy_within(start..end, 0);
                    r.start = 0;
                    r.end = end - start;
                }
                let end = r.end;
                let mut t = &self.tcp;
                let n = t.read(&mut r.raw[end..])?;
                if n == 0 {
                    if have == 0 {
                        return Ok(0);
                    }
                    r.broken = true;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a record",
                    ));
                }
                r.end += n;
                continue;
            }
            let rec = r.start + 2..r.start + need;
            r.start += need;
            // A caller with room for the whole record gets it opened
            // straight into its buffer (one copy less); the bytes past the
            // plaintext it may find changed are not part of the answer.
            let direct = buf.len() >= need - 2;
            if !direct {
                r.plain.resize(MAX_RECORD, 0);
            }
            let Receiving {
                raw, plain, nonce, ..
            } = &mut *r;
            let out: &mut [u8] = if direct { &mut *buf } else { plain };
            let opened = sec.transport.read_message(*nonce, &raw[rec], out);
            match opened {
                Ok(n) if direct => {
                    r.nonce += 1;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                Ok(n) => {
                    r.nonce += 1;
                    r.plain.truncate(n);
                    r.pos = 0;
                }
                Err(_) => {
                    r.broken = true;
                    r.plain.clear();
                    r.pos = 0;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a record failed authentication (changed, replayed or not from the peer)",
                    ));
                }
            }
        }
        let n = buf.len().min(r.plain.len() - r.pos);
        buf[..n].copy_from_slice(&r.plain[r.pos..r.pos + n]);
        r.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::generate;
    use std::net::TcpListener;

    fn pair(
        client: Trust,
        server: Trust,
        job: Option<&'static str>,
    ) -> (
        Result<PlaneStream, Error>,
        Result<(PlaneStream, Opened), Error>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            accept(s, &server, &["checkpoint"], Duration::from_secs(5))
        });
        let c = TcpStream::connect(addr).unwrap();
        let c = connect(c, &client, "checkpoint", job, Duration::from_secs(5));
        (c, srv.join().unwrap())
    }

    fn cluster() -> Trust {
        Trust::Key(Key::Cluster(generate().unwrap()))
    }

    #[test]
    fn both_ends_with_the_key_talk_in_both_directions_through_clones() {
        let t = cluster();
        let (c, s) = pair(t.clone(), t, None);
        let (mut c, (mut s, opened)) = (c.unwrap(), s.unwrap());
        assert_eq!(opened.channel, "checkpoint");
        assert!(c.is_secure());
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let mut reader = s.try_clone().unwrap();
        let want = big.clone();
        let r = std::thread::spawn(move || {
            let mut got = vec![0u8; want.len()];
            reader.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
        });
        c.write_all(&big).unwrap();
        c.flush().unwrap();
        s.write_all(b"stored").unwrap();
        s.flush().unwrap();
        let mut a = [0u8; 6];
        c.read_exact(&mut a).unwrap();
        assert_eq!(&a, b"stored");
        r.join().unwrap();
        drop(s);
        assert_eq!(
            c.read(&mut a).unwrap(),
            0,
            "a clean end at a record boundary"
        );
    }

    #[test]
    fn a_peer_with_another_key_is_refused_on_both_sides_and_told_nothing() {
        let (c, s) = pair(cluster(), cluster(), None);
        let e = c.err().unwrap().to_string();
        assert!(e.contains("refused the handshake"), "{e}");
        let e = s.err().unwrap().to_string();
        assert!(e.contains("does not hold the cluster key"), "{e}");
    }

    #[test]
    fn an_insecure_client_is_refused_by_a_keyed_endpoint() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.write_all(b"FFCK\x01 plain request").unwrap();
        let (s, _) = l.accept().unwrap();
        let s = accept(s, &cluster(), &["checkpoint"], Duration::from_secs(5));
        let e = s.err().unwrap().to_string();
        assert!(
            e.contains("did not open the cluster-plane handshake"),
            "{e}"
        );
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the refusal says nothing: {rest:?}");
    }

    #[test]
    fn a_job_key_opens_its_own_job_only() {
        let c = generate().unwrap();
        let server = Trust::Key(Key::Cluster(c.clone()));
        let a = Trust::Key(Key::Job {
            job: "jobA".into(),
            key: crate::key::job_key(&c, "jobA"),
        });
        let (cl, s) = pair(a.clone(), server.clone(), Some("jobA"));
        assert!(cl.is_ok());
        assert_eq!(s.unwrap().1.job.as_deref(), Some("jobA"));
        let (cl, _) = pair(a.clone(), server.clone(), Some("jobB"));
        assert!(cl.err().unwrap().to_string().contains("job \"jobB\""));
        // A forged job key for B (A's key under B's name) fails the handshake.
        let forged = Trust::Key(Key::Job {
            job: "jobB".into(),
            key: crate::key::job_key(&c, "jobA"),
        });
        let (cl, s) = pair(forged, server, Some("jobB"));
        assert!(cl.is_err());
        assert!(s.err().unwrap().to_string().contains("jobB"));
    }

    #[test]
    fn a_silent_peer_cannot_hold_the_handshake() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let t0 = Instant::now();
        let e = accept(s, &cluster(), &["migration"], Duration::from_millis(300));
        assert!(e.err().unwrap().to_string().contains("in time"));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_changed_record_breaks_the_connection() {
        let t = cluster();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A relay in the middle that flips one byte after the handshake.
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let raddr = relay.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut a, _) = relay.accept().unwrap();
            let mut b = TcpStream::connect(addr).unwrap();
            let mut b2 = b.try_clone().unwrap();
            let mut a2 = a.try_clone().unwrap();
            std::thread::spawn(move || std::io::copy(&mut b2, &mut a2));
            let mut buf = vec![0u8; 4096];
            let mut total = 0usize;
            loop {
                let n = a.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                if total <= 500 && total + n > 500 {
                    buf[500 - total] ^= 0x40;
                }
                total += n;
                b.write_all(&buf[..n]).unwrap();
            }
        });
        let t2 = t.clone();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let (mut s, _) = accept(s, &t2, &["migration"], Duration::from_secs(5)).unwrap();
            let mut got = vec![0u8; 1000];
            s.read_exact(&mut got)
        });
        let c = TcpStream::connect(raddr).unwrap();
        let mut c = connect(c, &t, "migration", None, Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(&[7u8; 1000]).unwrap();
        c.flush().unwrap();
        let e = srv.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
    }
}
