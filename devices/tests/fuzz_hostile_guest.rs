//! A bounded fuzz harness for what a hostile guest controls: virtqueue
//! descriptor tables and rings, virtio-blk requests, and every register of
//! the PCI / virtio / MSI-X configuration it can reach. It runs on stable
//! Rust (cargo-fuzz needs nightly) with a seeded generator, so a failure
//! names the seed that reproduces it:
//!
//!     FFMK_FUZZ_SEED=1234 FFMK_FUZZ_ITERS=1 cargo test -p devices --test fuzz_hostile_guest
//!
//! `FFMK_FUZZ_ITERS` (default 10,000 per target) bounds the time CI spends.
//! Invariants checked: no panic; a request never reports more bytes than the
//! chain's writable buffers hold; a read-only image never changes; the image
//! never changes size.
use devices::interrupt::{MsiMessage, MsiVectors};
use devices::pci::{PciDevice, PciRoot};
use devices::virtio::block::{serve_request, Disk, DiskConfig};
use devices::virtio::pci::VirtioPci;
use devices::virtio::{Activation, GuestMemory, VirtioDevice};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn iterations() -> u64 {
    std::env::var("FFMK_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn seeds() -> Vec<u64> {
    match std::env::var("FFMK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=iterations()).collect(),
    }
}

const MEM: u64 = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;

fn image(name: &str, sectors: usize) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ffmk-fuzz-{}-{name}", std::process::id()));
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 253) as u8).collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// An address: usually a sensible buffer, sometimes anywhere.
fn addr(r: &mut Rng) -> u64 {
    match r.below(10) {
        0 => r.next(),
        1 => MEM - r.below(64),
        2 => DESC + r.below(0x3000), // inside the rings themselves
        _ => 0x8000 + r.below(MEM - 0x10000),
    }
}

fn len(r: &mut Rng) -> u32 {
    match r.below(10) {
        0 => 0,
        1 => r.next() as u32,
        2 => 1,
        3 => 16,
        _ => (r.below(16) * 512 + r.below(3) * 16) as u32,
    }
}

/// Fills the descriptor table and the available ring with noise shaped
/// like requests; returns the queue the device would see.
fn hostile_queue(r: &mut Rng, mem: &GuestMemory) -> Queue {
    for i in 0..u64::from(QSIZE) {
        let d = DESC + 16 * i;
        let mut flags = (r.below(8)) as u16; // NEXT | WRITE | INDIRECT
        if r.chance(60) {
            flags &= !4; // mostly direct descriptors
        }
        let (a, l) = if r.chance(30) {
            (0x8000, 16)
        } else {
            (addr(r), len(r))
        };
        mem.write_obj(a, GuestAddress(d)).unwrap();
        mem.write_obj(l, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(r.below(u64::from(QSIZE) + 4) as u16, GuestAddress(d + 14))
            .unwrap();
    }
    // Often a well-formed request with one field then spoiled, so the
    // deep paths (data transfer, status) are reached too.
    if r.chance(50) {
        let data_flags: u16 = if r.chance(50) { 2 | 1 } else { 1 };
        let chain: [(u64, u32, u16, u16); 3] = [
            (0x8000, 16, 1, 1),
            (0x9000, (1 + r.below(8) as u32) * 512, data_flags, 2),
            (0xa000, 1, 2, 0),
        ];
        for (i, (a, l, f, n)) in chain.into_iter().enumerate() {
            let d = DESC + 16 * i as u64;
            mem.write_obj(a, GuestAddress(d)).unwrap();
            mem.write_obj(l, GuestAddress(d + 8)).unwrap();
            mem.write_obj(f, GuestAddress(d + 12)).unwrap();
            mem.write_obj(n, GuestAddress(d + 14)).unwrap();
        }
        if r.chance(70) {
            let field = DESC + 16 * r.below(3) + [0, 8, 12, 14][r.below(4) as usize];
            mem.write_obj(r.next() as u16, GuestAddress(field)).unwrap();
        }
    }
    // A request header at 0x8000 with a random (often valid) type and sector.
    let kinds = [0u32, 1, 4, 8, 11, 13, 99, r.next() as u32];
    let kind = kinds[r.below(kinds.len() as u64) as usize];
    let sector = if r.chance(70) { r.below(64) } else { r.next() };
    mem.write_obj(kind, GuestAddress(0x8000)).unwrap();
    mem.write_obj(sector, GuestAddress(0x8008)).unwrap();
    // Discard/write-zeroes segments anywhere the chain might point.
    mem.write_obj(r.below(80), GuestAddress(0x9000)).unwrap();
    mem.write_obj(r.below(40) as u32, GuestAddress(0x9008))
        .unwrap();
    let avail_idx = if r.chance(90) {
        r.below(u64::from(QSIZE) + 1) as u16
    } else {
        r.next() as u16
    };
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    for i in 0..u64::from(QSIZE) {
        mem.write_obj(
            r.below(u64::from(QSIZE) + 2) as u16,
            GuestAddress(AVAIL + 4 + 2 * i),
        )
        .unwrap();
    }
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// A plain one-queue disk on `path`.
fn disk_config(path: &std::path::Path, readonly: bool) -> DiskConfig {
    DiskConfig {
        path: path.into(),
        readonly,
        direct: false,
        serial: None,
        queues: 1,
        bandwidth: None,
        iops: None,
    }
}

#[test]
fn virtio_blk_survives_hostile_queues() {
    let rw_path = image("rw", 64);
    let ro_path = image("ro", 64);
    let rw = Disk::open(&disk_config(&rw_path, false)).unwrap();
    let ro = Disk::open(&disk_config(&ro_path, true)).unwrap();
    let ro_before = std::fs::read(&ro_path).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut served = 0u64;
    for seed in seeds() {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let disk = if r.chance(50) { &rw } else { &ro };
        let mut q = hostile_queue(&mut r, &mem);
        // Serve at most a queue's worth of chains, as the device's loop does.
        for _ in 0..QSIZE {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let max: u64 = chain.clone().writable().map(|d| u64::from(d.len())).sum();
            let used = serve_request(disk, &mem, chain);
            if let Some(u) = used {
                assert!(
                    u64::from(u) <= max,
                    "seed {seed}: used {u} > writable {max}"
                );
                served += 1;
            }
            let _ = q.add_used(&mem, head, used.unwrap_or(0));
        }
    }
    assert!(
        served > 0,
        "the generator never produced a servable request"
    );
    assert_eq!(
        std::fs::read(&ro_path).unwrap(),
        ro_before,
        "read-only image changed"
    );
    assert_eq!(
        std::fs::metadata(&rw_path).unwrap().len(),
        64 * 512,
        "image resized"
    );
    std::fs::remove_file(rw_path).unwrap();
    std::fs::remove_file(ro_path).unwrap();
}

#[test]
fn net_and_vsock_transmit_parsers_survive_hostile_queues() {
    use devices::virtio::net::tx_frame;
    use devices::virtio::vsock::{tx_packet, HDR_LEN};
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut frames = 0u64;
    for seed in seeds() {
        let mut r = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
        // A vsock header with a hostile length at the usual header address.
        mem.write_obj(r.next() as u32, GuestAddress(0x8000 + 24))
            .unwrap();
        let mut q = hostile_queue(&mut r, &mem);
        for _ in 0..QSIZE {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let readable: u64 = chain.clone().readable().map(|d| u64::from(d.len())).sum();
            if let Some(f) = tx_frame(&mem, chain.clone()) {
                assert!(
                    f.len() as u64 <= readable && f.len() <= 65_562,
                    "seed {seed}"
                );
                frames += 1;
            }
            if let Some((h, p)) = tx_packet(&mem, chain) {
                assert!(p.len() <= h.len as usize, "seed {seed}: payload beyond len");
                assert!((HDR_LEN + p.len()) as u64 <= readable, "seed {seed}");
            }
        }
    }
    assert!(frames > 0, "the generator never produced a readable frame");
}

#[test]
fn net_receive_path_survives_hostile_queues() {
    use devices::virtio::net::{write_rx_frame, RxOutcome};
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut outcomes = [0u64; 3];
    for seed in seeds() {
        let mut r = Rng(seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
        let mut q = hostile_queue(&mut r, &mem);
        let len = match r.below(4) {
            0 => r.below(12) as usize,
            1 => 65_562,
            _ => 12 + r.below(9000) as usize,
        };
        let mut frame = vec![0xabu8; len];
        let mergeable = r.chance(50);
        let before = q.next_avail();
        match write_rx_frame(&mem, &mut q, &mut frame, mergeable) {
            RxOutcome::NoBuffers => {
                assert_eq!(q.next_avail(), before, "seed {seed}: buffers consumed");
                outcomes[0] += 1;
            }
            RxOutcome::Dropped => outcomes[1] += 1,
            RxOutcome::Delivered => outcomes[2] += 1,
        }
    }
    if seeds().len() > 100 {
        assert!(
            outcomes.iter().all(|n| *n > 0),
            "outcomes seen: {outcomes:?}"
        );
    }
}

#[test]
fn net_control_queue_survives_hostile_queues() {
    use devices::virtio::net::ctrl::{serve, Command, ERR, OK};
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut answered = 0u64;
    for seed in seeds() {
        let mut r = Rng(seed.wrapping_mul(0x2127_599b_f432_5c37) | 1);
        // Often the announce acknowledgement where a request's header sits.
        let header: [u8; 2] = if r.chance(50) {
            [3, 0]
        } else {
            [r.next() as u8, r.next() as u8]
        };
        mem.write_slice(&header, GuestAddress(0x8000)).unwrap();
        let mut q = hostile_queue(&mut r, &mem);
        for _ in 0..QSIZE {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let room: u64 = chain.clone().writable().map(|d| u64::from(d.len())).sum();
            let head = chain.head_index();
            let (h, written, command) = serve(&mem, chain, |c| match c {
                Command::AnnounceAck => OK,
                Command::Other { .. } => ERR,
            });
            assert_eq!(h, head, "seed {seed}");
            assert!(
                u64::from(written) <= room,
                "seed {seed}: {written} into {room}"
            );
            assert_eq!(command.is_some(), written == 1, "seed {seed}");
            answered += u64::from(written);
        }
    }
    assert!(answered > 0, "the generator never produced a whole request");
}

/// Interrupt vectors that go nowhere (the transport's logic is under test).
struct NoIrq;
impl MsiVectors for NoIrq {
    fn len(&self) -> u16 {
        3
    }
    fn route(&self, _: u16, _: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device that accepts activation without serving (no I/O thread needed).
struct Inert;
impl VirtioDevice for Inert {
    fn device_type(&self) -> u16 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QSIZE, QSIZE]
    }
    fn features(&self) -> u64 {
        devices::virtio::VIRTIO_F_VERSION_1 | devices::virtio::VIRTIO_F_RING_EVENT_IDX
    }
    fn config_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn config_write(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, a: Activation) -> Result<(), devices::virtio::ActivateError> {
        assert!(a.queues.iter().all(|q| q.queue.ready()));
        Ok(())
    }
    fn reset(&mut self) {}
    fn describe(&self) -> String {
        "inert".into()
    }
}

#[test]
fn pci_and_virtio_registers_survive_random_accesses() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let root = Arc::new(PciRoot::new((0xc000_0000, 0x2000_0000), (1 << 36, 1 << 36)).unwrap());
    let dev = Arc::new(Mutex::new(
        VirtioPci::new(Box::new(Inert), Arc::new(NoIrq), mem.clone()).unwrap(),
    ));
    root.add(dev.clone()).unwrap();
    let mut ecam = devices::pci::PciEcam::new(root.clone());
    let mut cf8 = devices::pci::PciConfigIo::new(root.clone());
    use devices::bus::BusDevice;
    for seed in seeds() {
        let mut r = Rng(seed | 1);
        for _ in 0..64 {
            let size = [1usize, 2, 4, 8, 3][r.below(5) as usize];
            let mut buf = vec![0u8; size];
            let value = r.next().to_le_bytes();
            buf.copy_from_slice(&value[..size]);
            match r.below(6) {
                0 => ecam.write(r.below(2 << 20), &buf),
                1 => ecam.read(r.below(2 << 20), &mut buf),
                2 => cf8.write(r.below(8), &buf),
                3 => cf8.read(r.below(8), &mut buf),
                _ => {
                    // BAR 0 registers: mostly the common configuration.
                    let off = if r.chance(70) {
                        r.below(0x40)
                    } else {
                        r.below(0x9000)
                    };
                    let mut d = dev.lock().unwrap();
                    if r.chance(50) {
                        d.bar_write(r.below(2) as usize, off, &buf);
                    } else {
                        d.bar_read(r.below(2) as usize, off, &mut buf);
                    }
                }
            }
        }
        // Walk a driver through a full, valid bring-up now and then: the
        // transport must still work after the noise.
        if seed % 16 == 0 {
            let mut d = dev.lock().unwrap();
            d.bar_write(0, 0x14, &[0]); // reset
            assert_eq!(d.status(), 0, "seed {seed}: reset");
        }
    }
}

/// Found by `cargo fuzz` (target pci_virtio): a driver that sets its
/// available index more than a queue's length ahead of the device and
/// then sets DRIVER_OK. The block device's drain loop saw "more requests
/// arrived" and "no request can be read" at once and spun forever on the
/// I/O thread, so activation (and with it the vCPU that wrote the status)
/// never returned. Now the device gives up on that ring until the next
/// notification, and a reset and a fresh start work.
#[test]
fn a_runaway_available_index_does_not_hold_the_io_thread() {
    use devices::virtio::block::Block;
    use devices::virtio::IoThread;
    let p = image("runaway", 8);
    // Dropped by hand at the end: a stuck I/O thread cannot be joined, and
    // the test must fail instead of hanging there.
    let io = std::mem::ManuallyDrop::new(
        IoThread::spawn("test-io", || {
            sandbox::seccomp::confine(sandbox::ThreadKind::Io, "io").map_err(|e| e.to_string())
        })
        .unwrap(),
    );
    let block = Block::new(disk_config(&p, false), io.endpoint()).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap(); // idx: 100 ahead of 0
    let dev = Arc::new(Mutex::new(
        VirtioPci::new(Box::new(block), Arc::new(NoIrq), mem.clone()).unwrap(),
    ));
    let bring_up = |dev: Arc<Mutex<VirtioPci>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut d = dev.lock().unwrap();
            d.bar_write(0, 0x14, &[0]);
            d.bar_write(0, 0x14, &[1 | 2]);
            d.bar_write(0, 0x08, &1u32.to_le_bytes());
            d.bar_write(0, 0x0c, &1u32.to_le_bytes()); // VERSION_1
            d.bar_write(0, 0x14, &[1 | 2 | 8]);
            d.bar_write(0, 0x16, &0u16.to_le_bytes());
            d.bar_write(0, 0x18, &QSIZE.to_le_bytes());
            // Ring addresses: 32-bit halves, as the spec has drivers write them.
            for (reg, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
                d.bar_write(0, reg, &(addr as u32).to_le_bytes());
                d.bar_write(0, reg + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            d.bar_write(0, 0x1c, &1u16.to_le_bytes());
            d.bar_write(0, 0x14, &[1 | 2 | 8 | 4]);
            let _ = tx.send(d.status());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
    };
    let status = bring_up(dev.clone()).expect("DRIVER_OK returned (the I/O thread is not stuck)");
    assert_eq!(status & 4, 4, "the device is live");
    // The I/O thread still serves: a reset stops the handler, a second
    // bring-up starts a new one.
    let status = bring_up(dev).expect("a second bring-up returned");
    assert_eq!(status & 4, 4);
    drop(std::mem::ManuallyDrop::into_inner(io));
    let _ = std::fs::remove_file(p);
}
