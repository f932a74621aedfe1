//! `task=net op=echo count=N [ip=10.0.0.2] [resets=R]`: answers ARP for
//! `ip` and sends every UDP datagram addressed to it back to its sender
//! (addresses and ports swapped, so the checksums stay valid), until N were
//! echoed. Prints `mac=`, then `echoed=N`. With `resets=R` it then resets
//! the device and brings it up again, R times, echoing N more each time (as
//! a driver reload does; prints `reset=K` before each).
//!
//! `task=net op=bench count=N size=S`: throughput. The first UDP datagram
//! from the host names the peer; the probe then sends N datagrams of S
//! payload bytes to it as fast as the device takes them (`tx_mib_s=`), then
//! counts the datagrams the host sends until N arrived or 2 s pass without
//! one (`rx_frames=`, `rx_mib_s=`).
use crate::boot::{Args, BootInfo};
use crate::virtio::{self, Device, Queue};
use crate::{println, time, STATUS_PROBE_ERROR};

const HDR: usize = 12; // virtio-net header
const BUF: u64 = 2048;
const RX_BUFFERS: u16 = 64;
const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in ip.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn frame(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: `addr` is one of the task's own 2 KiB buffers; the device is
    // done with it (it came back on the used ring) until we post it again.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Turns a received frame into the reply in place; false if there is none.
fn reply(f: &mut [u8], mac: [u8; 6], ip: [u8; 4]) -> bool {
    if f.len() < 14 {
        return false;
    }
    let mut peer_mac = [0u8; 6];
    peer_mac.copy_from_slice(&f[6..12]);
    match be16(f, 12) {
        ETH_ARP if f.len() >= 42 && be16(f, 20) == 1 && f[38..42] == ip => {
            f[0..6].copy_from_slice(&peer_mac);
            f[6..12].copy_from_slice(&mac);
            f[21] = 2; // reply
            f.copy_within(22..32, 32); // sender becomes target

            f[22..28].copy_from_slice(&mac);
            f[28..32].copy_from_slice(&ip);
            true
        }
        ETH_IP if f.len() >= 42 && f[23] == 17 && f[30..34] == ip => {
            let ihl = usize::from(f[14] & 0xf) * 4;
            if ihl < 20 || f.len() < 14 + ihl + 8 {
                return false;
            }
            f[0..6].copy_from_slice(&peer_mac);
            f[6..12].copy_from_slice(&mac);
            for i in 0..4 {
                f.swap(26 + i, 30 + i); // IP addresses
            }
            let udp = 14 + ihl;
            f.swap(udp, udp + 2); // ports
            f.swap(udp + 1, udp + 3);
            true
        }
        _ => false,
    }
}

/// Turns the echo reply of a UDP frame in `f` into a datagram of `size`
/// payload bytes to the same peer (lengths fixed, UDP checksum off).
fn shape_udp(f: &mut [u8], size: usize) -> usize {
    let ihl = usize::from(f[14] & 0xf) * 4;
    let udp = 14 + ihl;
    let ip_len = (ihl + 8 + size) as u16;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for i in (14..14 + ihl).step_by(2) {
        sum += u32::from(u16::from_be_bytes([f[i], f[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[udp + 4..udp + 6].copy_from_slice(&((8 + size) as u16).to_be_bytes());
    f[udp + 6..udp + 8].copy_from_slice(&[0, 0]); // no UDP checksum
    for (i, b) in f[udp + 8..udp + 8 + size].iter_mut().enumerate() {
        *b = i as u8;
    }
    udp + 8 + size
}

/// The NIC brought up: its queues, the receive buffers and the transmit
/// buffer, its MAC and the address the probe answers for.
struct Nic {
    rx: Queue,
    tx: Queue,
    bufs: u64,
    txbuf: u64,
    mac: [u8; 6],
    ip: [u8; 4],
}

fn bench(nic: &mut Nic, args: &Args) -> u8 {
    let (bufs, txbuf, mac, ip) = (nic.bufs, nic.txbuf, nic.mac, nic.ip);
    let (rx, tx) = (&mut nic.rx, &mut nic.tx);
    let count = args.num("count", 10_000);
    let size = (args.num("size", 1400) as usize).min(1472);
    // Wait for the host's first datagram (answering ARP meanwhile).
    loop {
        let Some((slot, len)) = rx.poll_used() else {
            core::hint::spin_loop();
            continue;
        };
        let addr = bufs + u64::from(slot) * BUF;
        let len = (len as usize).min(BUF as usize);
        let out = frame(txbuf, len);
        out.copy_from_slice(frame(addr, len));
        rx.post(slot, addr, BUF as u32, true);
        rx.kick();
        let is_ip = len > HDR + 14 && be16(out, HDR + 12) == ETH_IP;
        if reply(&mut out[HDR..], mac, ip) {
            if is_ip {
                break; // `out` now holds the reply: our datagrams' template
            }
            out[..HDR].fill(0);
            let _ = tx.submit(&[(txbuf, len as u32, false)], 1_000_000);
        }
    }
    // Transmit phase.
    let out = frame(txbuf, BUF as usize);
    out[..HDR].fill(0);
    let frame_len = HDR + shape_udp(&mut out[HDR..], size);
    // Keep the transmit ring full: every descriptor points at the same
    // frame (the device copies it out), completions free slots.
    let t0 = time::now_us();
    let (mut posted, mut done, mut free) = (0u64, 0u64, tx.size());
    let mut next_slot = 0u16;
    while done < count {
        let mut kicked = false;
        while free > 0 && posted < count {
            tx.post(next_slot, txbuf, frame_len as u32, false);
            next_slot = (next_slot + 1) % tx.size();
            free -= 1;
            posted += 1;
            kicked = true;
        }
        if kicked {
            tx.kick();
        }
        let stall = time::now_us();
        loop {
            if tx.poll_used().is_some() {
                done += 1;
                free += 1;
                break;
            }
            if time::now_us() - stall > 1_000_000 {
                println!("probe: error: transmit timed out");
                return STATUS_PROBE_ERROR;
            }
            core::hint::spin_loop();
        }
    }
    let us = (time::now_us() - t0).max(1);
    println!("tx_frames={count}");
    println!("tx_mib_s={}", (count * size as u64 * 1_000_000 / us) >> 20);
    // Receive phase.
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut first = 0;
    let mut last = time::now_us();
    while frames < count && time::now_us() - last < 2_000_000 {
        let Some((slot, len)) = rx.poll_used() else {
            core::hint::spin_loop();
            continue;
        };
        last = time::now_us();
        if frames == 0 {
            first = last;
        }
        let addr = bufs + u64::from(slot) * BUF;
        let f = frame(addr, (len as usize).min(BUF as usize));
        if f.len() > HDR + 42 && be16(f, HDR + 12) == ETH_IP && f[HDR + 23] == 17 {
            frames += 1;
            bytes += (f.len() - HDR - 42) as u64;
        }
        rx.post(slot, addr, BUF as u32, true);
        rx.kick();
    }
    let us = (last - first).max(1);
    println!("rx_frames={frames}");
    println!("rx_mib_s={}", (bytes * 1_000_000 / us) >> 20);
    0
}

/// Echoes until `count` UDP datagrams went back: Ok(count), or Err(how
/// many) when no frame came for `timeout_ms` or a transmit timed out.
fn echo(nic: &mut Nic, count: u64, args: &Args) -> Result<u64, u64> {
    let (bufs, txbuf, mac, ip) = (nic.bufs, nic.txbuf, nic.mac, nic.ip);
    let (rx, tx) = (&mut nic.rx, &mut nic.tx);
    let mut echoed = 0;
    let deadline_idle_us = args.num("timeout_ms", 30_000) * 1000;
    let mut last = time::now_us();
    while echoed < count {
        let Some((slot, len)) = rx.poll_used() else {
            if time::now_us() - last > deadline_idle_us {
                println!("probe: error: no frame for {} ms", deadline_idle_us / 1000);
                return Err(echoed);
            }
            core::hint::spin_loop();
            continue;
        };
        last = time::now_us();
        let addr = bufs + u64::from(slot) * BUF;
        let len = (len as usize).min(BUF as usize);
        if len > HDR {
            let out = frame(txbuf, len);
            out.copy_from_slice(frame(addr, len));
            let is_udp = be16(out, HDR + 12) == ETH_IP;
            if reply(&mut out[HDR..], mac, ip) {
                out[..HDR].fill(0); // no offloads on the way back
                if tx
                    .submit(&[(txbuf, len as u32, false)], 1_000_000)
                    .is_none()
                {
                    println!("probe: error: transmit timed out");
                    return Err(echoed);
                }
                if is_udp {
                    echoed += 1;
                }
            }
        }
        rx.post(slot, addr, BUF as u32, true);
        rx.kick();
    }
    Ok(echoed)
}

pub fn run(info: &mut BootInfo, args: &Args) -> u8 {
    let Some(ip) = parse_ip(args.get("ip").unwrap_or("10.0.0.2")) else {
        println!("probe: error: bad ip=");
        return STATUS_PROBE_ERROR;
    };
    let count = args.num("count", 1);
    let resets = args.num("resets", 0);
    let Some(f) = virtio::find(info.ecam_base(), 1, 0) else {
        println!("probe: error: no virtio-net device");
        return STATUS_PROBE_ERROR;
    };
    let ring = Queue::bytes(RX_BUFFERS);
    let Some(mem) = info.take(2 * ring + u64::from(RX_BUFFERS + 1) * BUF) else {
        println!("probe: error: no memory for the rings");
        return STATUS_PROBE_ERROR;
    };
    let mut echoed = 0;
    for round in 0..=resets {
        if round > 0 {
            println!("reset={round}");
        }
        // Opening the device resets it first (status 0), as a driver does.
        let Ok(dev) = Device::open(f, 0) else {
            println!("probe: error: virtio-net did not accept the driver");
            return STATUS_PROBE_ERROR;
        };
        let (Ok(mut rx), Ok(tx)) = (
            dev.setup_queue(0, RX_BUFFERS, mem),
            dev.setup_queue(1, 16, mem + ring),
        ) else {
            println!("probe: error: virtio-net queues");
            return STATUS_PROBE_ERROR;
        };
        dev.driver_ok();
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            // SAFETY: the device configuration starts with the MAC address.
            *b = unsafe { core::ptr::read_volatile((dev.device_cfg + i as u64) as *const u8) };
        }
        if round == 0 {
            println!(
                "mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
            );
        }
        let bufs = mem + 2 * ring;
        let slots = RX_BUFFERS.min(rx.size());
        for s in 0..slots {
            rx.post(s, bufs + u64::from(s) * BUF, BUF as u32, true);
        }
        rx.kick();
        let mut nic = Nic {
            rx,
            tx,
            bufs,
            txbuf: bufs + u64::from(RX_BUFFERS) * BUF,
            mac,
            ip,
        };
        if args.get("op") == Some("bench") {
            return bench(&mut nic, args);
        }
        match echo(&mut nic, count, args) {
            Ok(n) => echoed += n,
            Err(n) => {
                println!("echoed={}", echoed + n);
                return STATUS_PROBE_ERROR;
            }
        }
    }
    println!("echoed={echoed}");
    0
}
