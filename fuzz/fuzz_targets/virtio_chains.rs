//! Descriptor chains a hostile driver builds, served by the code of every
//! virtio device: the first byte picks the device (block, net transmit,
//! net receive with and without mergeable buffers, vsock transmit and
//! receive, console, rng, net control), the second sets EVENT_IDX; then come the descriptor
//! table, the available ring and the buffers ([`ffmk_fuzz::queue_from`]).
//! Every chain the queue hands out is served and completed, as the I/O
//! thread does. What must hold: no panic, and no used length beyond what
//! the chain's writable descriptors hold.
#![no_main]
use devices::virtio::block::{self, Disk, DiskConfig};
use devices::virtio::{console, net, rng, vsock, GuestMemory};
use ffmk_fuzz::{queue_from, Input};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use virtio_queue::{DescriptorChain, QueueT};

/// A 64 KiB raw image in the temp directory, shared by all runs.
fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ffmk-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 64 << 10]).expect("fuzz disk image");
        let d = Disk::open(&DiskConfig {
            path: path.clone(),
            readonly: false,
            direct: false,
            serial: Some("fuzz".into()),
            queues: 1,
            bandwidth: None,
            iops: None,
        })
        .expect("fuzz disk");
        let _ = std::fs::remove_file(&path); // the open file stays
        d
    })
}

fn writable_bytes(chain: &DescriptorChain<&GuestMemory>) -> u64 {
    chain.clone().writable().map(|d| u64::from(d.len())).sum()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let device = input.u8() % 9;
    let event_idx = input.u8() & 1 != 0;
    let (mem, mut q) = queue_from(&mut input, event_idx);
    if device == 2 || device == 3 {
        // Receive: the frame comes from the tail of the input.
        let mut frame = input.rest().to_vec();
        let _ = net::write_rx_frame(&mem, &mut q, &mut frame, device == 3);
        return;
    }
    // Vsock receive: the packet's payload is the input's tail (or 3000
    // bytes when the input ends with the buffers).
    let mut rx_payload = match input.rest() {
        [] => vec![0x5a; 3000],
        tail => tail.to_vec(),
    };
    for _ in 0..64 {
        let Some(chain) = devices::virtio::pop_or_rearm(&mut q, &mem) else {
            break;
        };
        let head = chain.head_index();
        let room = writable_bytes(&chain);
        let used = match device {
            0 => block::serve_request(disk(), &mem, chain).unwrap_or(0),
            1 => {
                let _ = net::tx_frame(&mem, chain);
                0
            }
            4 => {
                if let Some((h, payload)) = vsock::tx_packet(&mem, chain) {
                    assert!(payload.len() <= h.len as usize);
                    assert_eq!(vsock::Header::parse(&h.bytes()), Some(h));
                }
                0
            }
            5 => {
                let _ = console::chain_output(&mem, chain);
                0
            }
            7 => {
                // A packet for the guest: a connection's data, split over
                // as many receive chains as it takes.
                let h = vsock::Header {
                    src_cid: 2,
                    dst_cid: 3,
                    src_port: 1024,
                    dst_port: 7777,
                    kind: 1, // stream
                    op: 5,   // data
                    ..Default::default()
                };
                let (written, taken) = vsock::rx_packet(&mem, chain, &h, &rx_payload);
                assert!(taken <= rx_payload.len());
                assert!(written == 0 || written == vsock::HDR_LEN + taken);
                rx_payload.drain(..taken);
                written as u32
            }
            8 => {
                let (h, written, command) = net::ctrl::serve(&mem, chain, |_| net::ctrl::OK);
                assert_eq!(h, head);
                assert_eq!(command.is_some(), written == 1);
                written
            }
            _ => rng::fill_chain(&mem, chain) as u32,
        };
        assert!(
            u64::from(used) <= room,
            "device {device} reports {used} bytes written into {room} writable bytes"
        );
        let _ = q.add_used(&mem, head, used);
    }
});
