//! The vfio-user wire format (the protocol QEMU and SPDK speak, version
//! 0.1): every message is a 16-byte header (message id, command, size of
//! the whole message, flags, error) and a command-specific payload, file
//! descriptors riding along as SCM_RIGHTS. Parsing here never trusts a
//! length from the peer: every read is bounds-checked and every message
//! size capped.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const HEADER_SIZE: usize = 16;
/// Largest payload either side accepts (region accesses and DMA are far
/// smaller; a larger size is a broken or hostile peer).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Most file descriptors in one message (one per interrupt vector).
pub const MAX_FDS: usize = 2048;

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const DEVICE_GET_INFO: u16 = 4;
pub const DEVICE_GET_REGION_INFO: u16 = 5;
pub const DEVICE_GET_IRQ_INFO: u16 = 7;
pub const DEVICE_SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const DMA_READ: u16 = 11;
pub const DMA_WRITE: u16 = 12;
pub const DEVICE_RESET: u16 = 13;

pub const FLAG_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

/// `DEVICE_GET_INFO` flags.
pub const DEVICE_FLAGS_RESET: u32 = 1;
pub const DEVICE_FLAGS_PCI: u32 = 2;
/// `DEVICE_GET_REGION_INFO` flags.
pub const REGION_READ_FLAG: u32 = 1;
pub const REGION_WRITE_FLAG: u32 = 2;
pub const REGION_MMAP_FLAG: u32 = 4;
/// `DEVICE_SET_IRQS` flags.
pub const IRQ_DATA_NONE: u32 = 1;
pub const IRQ_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_ACTION_TRIGGER: u32 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("message size {0} is out of range ({min}-{max})", min = HEADER_SIZE, max = HEADER_SIZE + MAX_PAYLOAD)]
    Size(u32),
    #[error("{what}: payload of {have} bytes, {need} needed")]
    Short {
        what: &'static str,
        have: usize,
        need: usize,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// Header and payload.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let mut r = Reader::new("header", b);
        // Infallible: 16 bytes hold exactly these fields.
        Header {
            id: r.u16().unwrap_or_default(),
            command: r.u16().unwrap_or_default(),
            size: r.u32().unwrap_or_default(),
            flags: r.u32().unwrap_or_default(),
            error: r.u32().unwrap_or_default(),
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }
}

/// A message as received.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

/// Reads little-endian fields from a payload, never past its end.
pub struct Reader<'a> {
    what: &'static str,
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(what: &'static str, data: &'a [u8]) -> Self {
        Reader { what, data, at: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(WireError::Short {
                what: self.what,
                have: self.data.len(),
                need: self.at.saturating_add(n),
            });
        };
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `N` u32 fields in a row (the shape of most vfio-user payloads).
    pub fn u32s<const N: usize>(&mut self) -> Result<[u32; N], WireError> {
        let mut out = [0u32; N];
        for v in out.iter_mut() {
            *v = self.u32()?;
        }
        Ok(out)
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.at..];
        self.at = self.data.len();
        s
    }
}

/// Builds a payload from little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Sends one message (header built from `header` with its size set).
pub fn send(
    stream: &UnixStream,
    mut header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), WireError> {
    header.size =
        u32::try_from(HEADER_SIZE + payload.len()).map_err(|_| WireError::Size(u32::MAX))?;
    let head = header.encode();
    if fds.is_empty() {
        let mut msg = Vec::with_capacity(HEADER_SIZE + payload.len());
        msg.extend_from_slice(&head);
        msg.extend_from_slice(payload);
        (&*stream).write_all(&msg)?;
        return Ok(());
    }
    // The descriptors go with the first bytes; the rest follows as usual.
    let sent = stream
        .send_with_fds(&[&head[..], payload], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let total = HEADER_SIZE + payload.len();
    if sent < total {
        let mut all = head.to_vec();
        all.extend_from_slice(payload);
        (&*stream).write_all(&all[sent..])?;
    }
    Ok(())
}

/// Receives one message: the header (with any descriptors), then the
/// payload its size announces, refused if out of range.
pub fn recv(stream: &UnixStream) -> Result<Message, WireError> {
    let mut head = [0u8; HEADER_SIZE];
    let mut raw_fds = vec![-1 as RawFd; 32];
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    }];
    // SAFETY: the iovec points at `head`, which outlives the call; the
    // kernel writes at most HEADER_SIZE bytes there and at most
    // `raw_fds.len()` descriptors into `raw_fds`.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the kernel just gave us these descriptors; each is owned
    // by exactly one File from here on (closed if the message is refused).
    let fds: Vec<File> = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(WireError::Closed);
    }
    if n < HEADER_SIZE {
        (&*stream).read_exact(&mut head[n..]).map_err(eof)?;
    }
    let header = Header::decode(&head);
    let size = header.size as usize;
    if !(HEADER_SIZE..=HEADER_SIZE + MAX_PAYLOAD).contains(&size) {
        return Err(WireError::Size(header.size));
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    (&*stream).read_exact(&mut payload).map_err(eof)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

fn eof(e: io::Error) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_readers_stop_at_the_end() {
        let h = Header {
            id: 7,
            command: REGION_READ,
            size: 32,
            flags: FLAG_REPLY,
            error: 0,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        let p = Writer::default().u64(1).u32(2).0;
        let mut r = Reader::new("x", &p);
        assert_eq!(r.u64().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 2);
        assert!(matches!(r.u32(), Err(WireError::Short { need: 16, .. })));
        let mut r = Reader::new("x", &p);
        assert!(r.bytes(usize::MAX).is_err(), "no overflow");
    }

    #[test]
    fn messages_cross_a_socket_with_descriptors_and_bad_sizes_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        use std::os::fd::AsRawFd;
        let h = Header {
            id: 1,
            command: DEVICE_SET_IRQS,
            ..Default::default()
        };
        send(&a, h, &[1, 2, 3], &[efd.as_raw_fd()]).unwrap();
        let m = recv(&b).unwrap();
        assert_eq!(m.header.command, DEVICE_SET_IRQS);
        assert_eq!(m.header.size, 19);
        assert_eq!(m.payload, vec![1, 2, 3]);
        assert_eq!(m.fds.len(), 1);
        // A size below the header or above the cap.
        for size in [3u32, (HEADER_SIZE + MAX_PAYLOAD + 1) as u32] {
            let bad = Header {
                size,
                ..Default::default()
            };
            (&a).write_all(&bad.encode()).unwrap();
            assert!(matches!(recv(&b), Err(WireError::Size(s)) if s == size));
        }
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Closed)));
    }
}
