//! Broadcast datagrams from anyone on the network, as an `ffmk-node`
//! broadcast endpoint takes them (`broadcast::wire`, then the node state
//! machine of `broadcast::node`): the input is a list of datagrams (u16
//! length each) arriving at rank 0 of a group of up to 64 ranks.
//! What must hold: no panic; a datagram that decodes encodes back to the
//! same bytes; a node only ever sends to ranks of its group, and the
//! messages it sends for one broadcast stay bounded (tree children plus
//! one walk per side plus one answer per sender), whatever it was told.
#![no_main]
use broadcast::node::Node;
use broadcast::wire::{Message, What};
use ffmk_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = u32::from(input.u8() % 64) + 1;
    let mut node: Option<Node> = None;
    let mut senders = 0u32;
    let mut sent = 0u32;
    while !input.is_empty() {
        let len = usize::from(input.u16());
        let datagram = input.bytes(len);
        let Ok(m) = Message::decode(datagram) else {
            continue;
        };
        assert_eq!(m.encode().as_deref(), Ok(datagram), "round trip");
        let What::Relay(kind) = m.what else {
            continue;
        };
        // The endpoint drops a message whose group size is not its own.
        if m.n != n {
            continue;
        }
        let nd = node.get_or_insert_with(|| Node::new(0, n, m.tree));
        nd.receive(m.from, m.origin, kind, m.dir);
        senders += 1;
        let correcting = input.u8() & 1 == 1;
        for _ in 0..input.u8() {
            let Some(s) = nd.next_send(correcting) else {
                break;
            };
            assert!(s.to < n, "sent to rank {} of {n}", s.to);
            sent += 1;
        }
        assert!(
            sent <= 2 * n + 64 + senders,
            "{sent} messages in a group of {n}"
        );
    }
});
