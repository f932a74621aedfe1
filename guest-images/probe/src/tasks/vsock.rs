//! `task=vsock`: a tiny ring-3 vsock stack (stream sockets, polling).
//! - `op=echo port=P bytes=N [conns=C]`: accepts a host connection on port
//!   P and echoes what arrives until N bytes went back in all (or the host
//!   closes), up to C connections one after the other (`conn_done=K` after
//!   each); prints `vsock_cid=`, then `echoed=N`;
//! - `op=connect port=P msg=TEXT`: connects to host port P, sends TEXT,
//!   prints the reply as `reply=...`, then closes.
use crate::boot::{Args, BootInfo};
use crate::virtio::{self, Device, Queue};
use crate::{println, time, STATUS_PROBE_ERROR};

const HDR: usize = 44;
const BUF: u64 = 4096;
const RX_BUFS: u16 = 32;
const HOST_CID: u64 = 2;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const OUR_BUF_ALLOC: u32 = 64 << 10;

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn rd<T: Copy>(a: u64) -> T {
    // SAFETY: task memory the device wrote (a used receive buffer).
    unsafe { core::ptr::read_volatile(a as *const T) }
}

fn wr<T: Copy>(a: u64, v: T) {
    // SAFETY: task memory the device does not own right now.
    unsafe { core::ptr::write_volatile(a as *mut T, v) }
}

impl Hdr {
    fn read(a: u64) -> Hdr {
        Hdr {
            src_cid: rd(a),
            dst_cid: rd(a + 8),
            src_port: rd(a + 16),
            dst_port: rd(a + 20),
            len: rd(a + 24),
            op: rd(a + 30),
            flags: rd(a + 32),
            buf_alloc: rd(a + 36),
            fwd_cnt: rd(a + 40),
        }
    }
    fn write(&self, a: u64) {
        wr(a, self.src_cid);
        wr(a + 8, self.dst_cid);
        wr(a + 16, self.src_port);
        wr(a + 20, self.dst_port);
        wr(a + 24, self.len);
        wr(a + 28, 1u16); // stream
        wr(a + 30, self.op);
        wr(a + 32, self.flags);
        wr(a + 36, self.buf_alloc);
        wr(a + 40, self.fwd_cnt);
    }
}

struct Stack {
    cid: u64,
    rx: Queue,
    tx: Queue,
    bufs: u64,
    txbuf: u64,
    fwd_cnt: u32,
}

impl Stack {
    fn send(&mut self, to_port: u32, from_port: u32, op: u16, flags: u32, payload: &[u8]) -> bool {
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: from_port,
            dst_port: to_port,
            len: payload.len() as u32,
            op,
            flags,
            buf_alloc: OUR_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        h.write(self.txbuf);
        for (i, b) in payload.iter().enumerate() {
            wr(self.txbuf + (HDR + i) as u64, *b);
        }
        self.tx
            .submit(
                &[(self.txbuf, (HDR + payload.len()) as u32, false)],
                2_000_000,
            )
            .is_some()
    }

    /// The next packet (header, payload address) within `timeout_us`; the
    /// caller calls `repost` when done with the payload.
    fn recv(&mut self, timeout_us: u64) -> Option<(Hdr, u64, u16)> {
        let deadline = time::now_us() + timeout_us;
        loop {
            if let Some((slot, _len)) = self.rx.poll_used() {
                let a = self.bufs + u64::from(slot) * BUF;
                return Some((Hdr::read(a), a + HDR as u64, slot));
            }
            if time::now_us() > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    fn repost(&mut self, slot: u16) {
        self.rx
            .post(slot, self.bufs + u64::from(slot) * BUF, BUF as u32, true);
        self.rx.kick();
    }
}

fn open(info: &mut BootInfo) -> Result<Stack, u8> {
    let Some(f) = virtio::find(info.ecam_base(), 19, 0) else {
        println!("probe: error: no virtio-vsock device");
        return Err(STATUS_PROBE_ERROR);
    };
    let dev = Device::open(f, 0).map_err(|_| STATUS_PROBE_ERROR)?;
    let ring = Queue::bytes(RX_BUFS);
    let mem = info
        .take(2 * ring + u64::from(RX_BUFS + 1) * BUF)
        .ok_or(STATUS_PROBE_ERROR)?;
    let rx = dev
        .setup_queue(0, RX_BUFS, mem)
        .map_err(|_| STATUS_PROBE_ERROR)?;
    let tx = dev
        .setup_queue(1, 16, mem + ring)
        .map_err(|_| STATUS_PROBE_ERROR)?;
    dev.driver_ok();
    let cid: u64 = rd(dev.device_cfg);
    let bufs = mem + 2 * ring;
    let mut s = Stack {
        cid,
        rx,
        tx,
        bufs,
        txbuf: bufs + u64::from(RX_BUFS) * BUF,
        fwd_cnt: 0,
    };
    for slot in 0..RX_BUFS.min(s.rx.size()) {
        s.rx.post(slot, bufs + u64::from(slot) * BUF, BUF as u32, true);
    }
    s.rx.kick();
    println!("vsock_cid={cid}");
    Ok(s)
}

pub fn run(info: &mut BootInfo, args: &Args) -> u8 {
    let mut s = match open(info) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let port = args.num("port", 1234) as u32;
    let timeout = args.num("timeout_ms", 20_000) * 1000;
    match args.get("op").unwrap_or("echo") {
        "echo" => {
            let Some(ring) = info.take(u64::from(OUR_BUF_ALLOC)) else {
                return STATUS_PROBE_ERROR;
            };
            let want = args.num("bytes", 1 << 20);
            let mut echoed = 0;
            for conn in 1..=args.num("conns", 1) {
                s.fwd_cnt = 0; // counters are per connection
                match echo(&mut s, ring, port, want - echoed, timeout) {
                    Ok(n) => echoed += n,
                    Err(status) => {
                        println!("echoed={echoed}");
                        return status;
                    }
                }
                println!("conn_done={conn}");
                if echoed >= want {
                    break;
                }
            }
            println!("echoed={echoed}");
            0
        }
        "connect" => connect(&mut s, port, args.get("msg").unwrap_or("hello"), timeout),
        other => {
            println!("probe: error: unknown vsock op '{other}' (echo, connect)");
            STATUS_PROBE_ERROR
        }
    }
}

/// Echo with flow control both ways: what arrives is queued in a ring of
/// `OUR_BUF_ALLOC` bytes (the credit we advertise, so it cannot overflow) and
/// counted as forwarded only once echoed; we send only within the host's
/// credit, asking for more when it runs out.
fn echo(s: &mut Stack, info_ring: u64, port: u32, want: u64, timeout: u64) -> Result<u64, u8> {
    let ring = info_ring;
    let cap = OUR_BUF_ALLOC as u64;
    let (mut head, mut tail) = (0u64, 0u64); // bytes queued = tail - head
    let mut peer: Option<u32> = None;
    let (mut host_buf_alloc, mut host_fwd_cnt, mut tx_cnt) = (0u32, 0u32, 0u32);
    let mut asked = false;
    let mut echoed = 0u64;
    let mut closing = false;
    let mut out = [0u8; (BUF as usize) - HDR];
    loop {
        // Send what we can.
        if let Some(p) = peer {
            loop {
                let credit =
                    host_buf_alloc.saturating_sub(tx_cnt.wrapping_sub(host_fwd_cnt)) as u64;
                let n = (tail - head).min(credit).min(out.len() as u64) as usize;
                if n == 0 {
                    if tail > head && credit == 0 && !asked {
                        asked = true;
                        s.send(p, port, OP_CREDIT_REQUEST, 0, &[]);
                    }
                    break;
                }
                for (i, b) in out[..n].iter_mut().enumerate() {
                    *b = rd(ring + (head + i as u64) % cap);
                }
                head += n as u64;
                tx_cnt = tx_cnt.wrapping_add(n as u32);
                s.fwd_cnt = s.fwd_cnt.wrapping_add(n as u32);
                if !s.send(p, port, OP_RW, 0, &out[..n]) {
                    println!("probe: error: vsock transmit timed out");
                    return Err(STATUS_PROBE_ERROR);
                }
                echoed += n as u64;
            }
        }
        if echoed >= want || (closing && tail == head) {
            break;
        }
        let Some((h, data, slot)) = s.recv(timeout) else {
            println!("probe: error: vsock: nothing for {} ms", timeout / 1000);
            return Err(STATUS_PROBE_ERROR);
        };
        let len = (h.len as usize).min(BUF as usize - HDR) as u64;
        if h.dst_port != port || h.src_cid != HOST_CID {
            s.repost(slot);
            if h.op != OP_RST {
                s.send(h.src_port, h.dst_port, OP_RST, 0, &[]);
            }
            continue;
        }
        if peer == Some(h.src_port) {
            host_buf_alloc = h.buf_alloc;
            host_fwd_cnt = h.fwd_cnt;
            asked = false;
        }
        match h.op {
            OP_REQUEST if peer.is_none() => {
                peer = Some(h.src_port);
                host_buf_alloc = h.buf_alloc;
                host_fwd_cnt = h.fwd_cnt;
                s.send(h.src_port, port, OP_RESPONSE, 0, &[]);
            }
            OP_RW if peer == Some(h.src_port) => {
                let room = cap - (tail - head);
                for i in 0..len.min(room) {
                    wr(ring + (tail + i) % cap, rd::<u8>(data + i));
                }
                tail += len.min(room);
            }
            OP_CREDIT_REQUEST if peer == Some(h.src_port) => {
                s.send(h.src_port, port, OP_CREDIT_UPDATE, 0, &[]);
            }
            OP_SHUTDOWN => closing = true,
            OP_RST => break,
            _ => {}
        }
        s.repost(slot);
    }
    if let Some(p) = peer {
        s.send(p, port, OP_RST, 0, &[]);
    }
    Ok(echoed)
}

fn connect(s: &mut Stack, port: u32, msg: &str, timeout: u64) -> u8 {
    let local = 1024;
    s.send(port, local, OP_REQUEST, 0, &[]);
    let mut reply = [0u8; 256];
    let mut got = 0;
    let mut established = false;
    loop {
        let Some((h, data, slot)) = s.recv(timeout) else {
            println!("probe: error: vsock: no answer");
            return STATUS_PROBE_ERROR;
        };
        let len = (h.len as usize).min(BUF as usize - HDR);
        let op = h.op;
        if op == OP_RW {
            for i in 0..len.min(reply.len() - got) {
                reply[got + i] = rd(data + i as u64);
            }
            got = (got + len).min(reply.len());
            s.fwd_cnt = s.fwd_cnt.wrapping_add(len as u32);
        }
        s.repost(slot);
        match op {
            OP_RESPONSE if !established => {
                established = true;
                s.send(port, local, OP_RW, 0, msg.as_bytes());
            }
            OP_RST if !established => {
                println!("connect_refused=1");
                return 0;
            }
            OP_RW if reply[..got].contains(&b'\n') => break,
            OP_SHUTDOWN | OP_RST => break,
            _ => {}
        }
    }
    let text = core::str::from_utf8(&reply[..got]).unwrap_or("?");
    println!("reply={}", text.trim_end());
    s.send(port, local, OP_SHUTDOWN, 3, &[]);
    let _ = s.recv(1_000_000); // the host's RST
    0
}
