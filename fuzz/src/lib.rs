//! What the fuzz targets share: cutting the fuzzer's bytes into pieces, a
//! small guest memory with a split virtqueue laid out from those bytes,
//! and framing helpers for the TCP protocols (the harness frames what the
//! fuzzer chooses, so lengths and checksums are right often enough to
//! reach the code behind them, and sometimes deliberately wrong).
use devices::virtio::GuestMemory;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Reads the fuzzer's input front to back; past the end every read is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Guest RAM of the virtqueue targets.
pub const MEM_BYTES: u64 = 0x10000;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
/// Buffers: everything from here to the end of RAM is the fuzzer's.
pub const DATA: u64 = 0x4000;
pub const QUEUE_SIZE: u16 = 16;

pub fn memory(regions: &[(u64, usize)]) -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    GuestMemory::from_ranges(&ranges).expect("guest memory for a fuzz target")
}

/// A ready split queue of [`QUEUE_SIZE`] entries in fresh memory: the
/// descriptor table (16 descriptors of 16 bytes), the available ring
/// (flags, index, 16 heads) and then the buffers come from `input`, as a
/// driver would have written them.
pub fn queue_from(input: &mut Input, event_idx: bool) -> (GuestMemory, Queue) {
    let mem = memory(&[(0, MEM_BYTES as usize)]);
    let table = input.bytes(16 * usize::from(QUEUE_SIZE));
    mem.write_slice(table, GuestAddress(DESC_TABLE))
        .expect("descriptor table inside memory");
    let avail = input.bytes(4 + 2 * usize::from(QUEUE_SIZE) + 2);
    mem.write_slice(avail, GuestAddress(AVAIL_RING))
        .expect("available ring inside memory");
    let data = input.bytes((MEM_BYTES - DATA) as usize);
    mem.write_slice(data, GuestAddress(DATA))
        .expect("buffers inside memory");
    let mut q = Queue::new(QUEUE_SIZE).expect("queue size is a power of two");
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    (mem, q)
}

/// A loopback listener for targets that speak TCP to the code under test.
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("loopback listener")
}

/// A connected pair: (the end the harness writes, the end the code reads).
pub fn tcp_pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = l.local_addr().expect("listener address");
    let ours = TcpStream::connect(addr).expect("loopback connect");
    let (theirs, _) = l.accept().expect("loopback accept");
    (ours, theirs)
}

/// The cluster key both ends of the fuzzed cluster-plane channels hold
/// (one per fuzzing process): the fuzzed bytes travel inside the
/// authenticated channel, as a key holder's would.
pub fn trust() -> &'static cluster_auth::Trust {
    static T: std::sync::OnceLock<cluster_auth::Trust> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        cluster_auth::Trust::Key(cluster_auth::Key::Cluster(
            cluster_auth::key::generate().expect("random key"),
        ))
    })
}

/// A connected pair with the cluster-plane handshake done on `channel`:
/// (the end the harness writes, the end the code reads).
pub fn plane_pair(
    l: &TcpListener,
    channel: &'static str,
) -> Option<(cluster_auth::PlaneStream, cluster_auth::PlaneStream)> {
    let (ours, theirs) = tcp_pair(l);
    let t = std::thread::spawn(move || {
        cluster_auth::accept(
            theirs,
            trust(),
            &[channel],
            std::time::Duration::from_secs(5),
        )
    });
    let ours = cluster_auth::connect(
        ours,
        trust(),
        channel,
        None,
        std::time::Duration::from_secs(5),
    );
    let theirs = t.join().ok()?.ok()?.0;
    Some((ours.ok()?, theirs))
}

/// Sealed datagrams as a receiver meets them: `how` says whether this one
/// comes from a key holder (sealed with this process's key), is a replay
/// of the last sealed one, or comes raw from a stranger. Returns what the
/// receiver's [`cluster_auth::datagram::Opener`] lets through; a raw or
/// replayed datagram must not get through.
pub struct Datagrams {
    sealer: cluster_auth::datagram::Sealer,
    opener: cluster_auth::datagram::Opener,
    last: Option<Vec<u8>>,
}

impl Datagrams {
    pub fn new(channel: &str) -> Datagrams {
        let cluster_auth::Trust::Key(k) = trust() else {
            unreachable!("the fuzz trust holds a key")
        };
        let c = k.cluster().expect("a cluster key");
        Datagrams {
            sealer: cluster_auth::datagram::Sealer::new(c, channel).expect("sealer"),
            opener: cluster_auth::datagram::Opener::new(c, channel),
            last: None,
        }
    }

    pub fn arrive(&mut self, how: u8, datagram: &[u8]) -> Option<Vec<u8>> {
        match how % 3 {
            0 => {
                let d = self.sealer.seal(datagram);
                self.last = Some(d.clone());
                let got = self.opener.open(&d).expect("a fresh sealed datagram opens");
                assert_eq!(got, datagram);
                Some(got)
            }
            1 => {
                let d = self.last.clone()?;
                assert!(self.opener.open(&d).is_err(), "a replay got through");
                None
            }
            _ => {
                assert!(
                    self.opener.open(datagram).is_err(),
                    "an unsealed datagram got through"
                );
                None
            }
        }
    }
}

/// [`feed`] through a cluster-plane channel.
pub fn feed_plane(mut s: cluster_auth::PlaneStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = s.write_all(&bytes);
        let _ = s.flush();
        let _ = s.tcp().shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut s, &mut sink) {
            if n == 0 {
                break;
            }
        }
    })
}

/// Writes `bytes` from another thread, then closes that sending side, so
/// the reader sees the end; what comes back is read and dropped. Write
/// errors (the peer gave up early) are the peer's business.
pub fn feed(s: TcpStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut w = &s;
        let _ = w.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        let mut r = &s;
        while let Ok(n) = std::io::Read::read(&mut r, &mut sink) {
            if n == 0 {
                break;
            }
        }
    })
}

/// The VM both migration targets describe in their hello: 512 KiB at 0
/// and 512 KiB at 1 MiB (256 pages), two vCPUs.
pub const MIGRATION_REGIONS: [(u64, usize); 2] = [(0, 0x80000), (0x10_0000, 0x80000)];

pub fn migration_hello(postcopy: bool) -> migrate::protocol::Hello {
    migrate::protocol::Hello {
        state_version: vmm::machine::STATE_VERSION,
        memory_bytes: 0x10_0000,
        regions: MIGRATION_REGIONS
            .iter()
            .map(|&(a, l)| (a, l as u64))
            .collect(),
        cpus: 2,
        cpu_vendor: "AuthenticAMD".into(),
        cpu_profile: "pvm".into(),
        devices: vec!["virtio-rng (getrandom)".into()],
        postcopy,
        verify: false,
        layout: String::new(),
        streams: 1,
        passthrough: Vec::new(),
    }
}

/// The migration stream's frame: magic, version, kind, length, CRC32.
pub fn migration_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + payload.len());
    f.extend_from_slice(&migrate::protocol::MAGIC);
    f.extend_from_slice(&migrate::protocol::VERSION.to_le_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Turns the input into a migration byte stream: records of
/// (kind, u16 length, payload). A kind with the high bit set puts its
/// payload on the wire as it is (no frame), for the framing checks.
pub fn migration_stream(input: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let kind = input.u8();
        let len = usize::from(input.u16());
        let payload = input.bytes(len);
        if kind & 0x80 != 0 {
            out.extend_from_slice(payload);
        } else {
            out.extend_from_slice(&migration_frame(kind, payload));
        }
    }
    out
}
