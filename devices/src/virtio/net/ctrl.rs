//! The control queue (virtio spec 5.1.6.5): each request is a class and a
//! command byte (with command data after them, unused here) in the chain's
//! readable part, and the device answers one status byte at the start of
//! its writable part. The device offers the queue for one reason, the
//! guest's side of announcing a moved VM (`VIRTIO_NET_F_GUEST_ANNOUNCE`):
//! the driver acknowledges an announcement with
//! `VIRTIO_NET_CTRL_ANNOUNCE_ACK`. Every other command is answered
//! `VIRTIO_NET_ERR`; nothing here trusts the chain's shape.
use super::GuestMemory;
use std::io::{Read, Write};

/// `VIRTIO_NET_CTRL_ANNOUNCE` and its one command.
pub const CLASS_ANNOUNCE: u8 = 3;
pub const CMD_ANNOUNCE_ACK: u8 = 0;
/// The status byte the device writes back.
pub const OK: u8 = 0;
pub const ERR: u8 = 1;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The driver has announced the VM (sent its gratuitous ARPs).
    AnnounceAck,
    /// Anything else the driver may send: answered [`ERR`].
    Other { class: u8, command: u8 },
}

/// Reads the request of `chain`, lets `answer` decide the status byte and
/// writes it back. Returns the head index, the length written (0 or 1) and
/// the command, or None as the command for a chain too short to hold a
/// request or without room for the answer (it completes with length 0).
pub fn serve<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
    answer: impl FnOnce(Command) -> u8,
) -> (u16, u32, Option<Command>)
where
    M: std::ops::Deref<Target = GuestMemory> + Clone,
{
    let head = chain.head_index();
    let request = chain.clone().reader(mem).ok().and_then(|mut r| {
        let mut both = [0u8; 2];
        r.read_exact(&mut both).ok()?;
        Some(match both {
            [CLASS_ANNOUNCE, CMD_ANNOUNCE_ACK] => Command::AnnounceAck,
            [class, command] => Command::Other { class, command },
        })
    });
    let Some(command) = request else {
        return (head, 0, None);
    };
    let Ok(mut w) = chain.writer(mem) else {
        return (head, 0, None);
    };
    if w.available_bytes() == 0 {
        return (head, 0, None);
    }
    let status = answer(command);
    match w.write_all(&[status]) {
        Ok(()) => (head, 1, Some(command)),
        Err(_) => (head, 0, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A queue whose one chain is `descs` (address, length, writable),
    /// with the request header at 0x8000.
    fn one_chain(mem: &GuestMemory, header: &[u8], descs: &[(u64, u32, bool)]) -> Queue {
        mem.write_slice(header, GuestAddress(0x8000)).unwrap();
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let d = DESC + 16 * i as u64;
            let next = i + 1 < descs.len();
            let flags = u16::from(next) | if writable { 2 } else { 0 };
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj((i + 1) as u16, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap(); // ring[0] = 0
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn serve_one(header: &[u8], descs: &[(u64, u32, bool)]) -> (u32, Option<Command>, u8) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(0x9000)).unwrap();
        let mut q = one_chain(&mem, header, descs);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let (_, written, command) = serve(&mem, chain, |c| match c {
            Command::AnnounceAck => OK,
            Command::Other { .. } => ERR,
        });
        (
            written,
            command,
            mem.read_obj(GuestAddress(0x9000)).unwrap(),
        )
    }

    #[test]
    fn an_announce_ack_is_answered_ok_and_anything_else_err() {
        let ack = [(0x8000, 2, false), (0x9000, 1, true)];
        assert_eq!(
            serve_one(&[3, 0], &ack),
            (1, Some(Command::AnnounceAck), OK)
        );
        // VIRTIO_NET_CTRL_RX / PROMISC with its data byte: not offered.
        let rx = [(0x8000, 3, false), (0x9000, 1, true)];
        let other = Command::Other {
            class: 0,
            command: 0,
        };
        assert_eq!(serve_one(&[0, 0, 1], &rx), (1, Some(other), ERR));
    }

    #[test]
    fn a_chain_without_a_request_or_room_for_the_answer_gets_nothing() {
        // One readable byte: no whole header.
        let short = [(0x8000, 1, false), (0x9000, 1, true)];
        assert_eq!(serve_one(&[3, 0], &short), (0, None, 0xee));
        // No writable byte for the status.
        let mute = [(0x8000, 2, false)];
        assert_eq!(serve_one(&[3, 0], &mute), (0, None, 0xee));
        // A buffer outside guest memory.
        let outside = [(0x8000, 2, false), (0xffff_0000, 1, true)];
        assert_eq!(serve_one(&[3, 0], &outside), (0, None, 0xee));
    }
}
