//! Gossip datagrams from anyone on the network, as `ffmk-node` takes them
//! (`ffmk_node::take_gossip`): the input is a list of datagrams (u16
//! length each) arriving one time unit apart at node 0 of an 8-node board,
//! each sealed by a key holder, replayed, or sent raw by a stranger, and
//! opened as the daemon opens them (`cluster_auth::datagram`).
//! What must hold: no panic; a datagram that decodes encodes back to the
//! same bytes; no entry on the board is ever from the future (age < 0),
//! whatever ages the peers claim; what the board then sends decodes; and
//! no raw or replayed datagram gets past the opener.
#![no_main]
use balance::gossip::{wire, Board, Window};
use ffmk_node::take_gossip;
use ffmk_fuzz::{Datagrams, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let window = match input.u8() % 3 {
        0 => Window::Whole,
        w => Window::Age(f64::from(w) * 2.0),
    };
    let mut board: Board<wire::NodeInfo> = Board::new(8, Some(0), window);
    let mut now = 100.0;
    board.know_all(now);
    let mut out = Vec::new();
    let mut seal = Datagrams::new("gossip");
    while !input.is_empty() {
        let how = input.u8();
        let len = usize::from(input.u16());
        let raw = input.bytes(len);
        let Some(datagram) = seal.arrive(how, raw) else {
            now += 1.0;
            continue;
        };
        let datagram = datagram.as_slice();
        if let Ok(m) = wire::decode(datagram) {
            if m.entries.len() <= wire::MAX_ENTRIES {
                assert_eq!(wire::encode(m.sender, m.incarnation, &m.entries), datagram);
            }
        }
        let _ = take_gossip(&mut board, 0, now, datagram);
        for slot in 0..8 {
            if let Some(age) = board.age(slot, now) {
                assert!(age >= 0.0, "slot {slot} is {age} old at {now}");
            }
        }
        let _ = board.refresh(now, 1, wire::NodeInfo::default());
        out.clear();
        board.select(now, &mut out);
        for chunk in out.chunks(wire::MAX_ENTRIES) {
            let msg = wire::encode(0, 1, chunk);
            assert!(
                wire::decode(&msg).is_ok(),
                "the board sent what it cannot read"
            );
        }
        now += 1.0;
    }
});
