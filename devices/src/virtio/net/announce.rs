//! Telling the network where a VM is after it moved (a live migration or a
//! restore on another host): until a frame with the VM's MAC comes in on
//! the new port, the switches (and Linux bridges) on the way still send
//! its traffic to the old one. The device announces the VM twice over, as
//! QEMU does: it sends RARP broadcasts with the VM's MAC on the TAP itself
//! (works with any guest), and where the driver accepted
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` it asks the guest to send its own
//! gratuitous ARPs (which also carry its IP addresses). Both happen in
//! [`ROUNDS`] rounds, backing off, in case the first frames are lost while
//! links come up.
use crate::tap::VNET_HDR_LEN;
use std::time::Duration;

/// The wait before each round, the first counted from the device's
/// activation on the new host (QEMU's defaults: 5 rounds, the first at
/// once, then gaps of 50 ms growing by 100 ms).
pub const ROUNDS: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(250),
    Duration::from_millis(350),
];

/// Ethertype of Reverse ARP.
pub const ETH_P_RARP: u16 = 0x8035;

/// A RARP "reverse request" from `mac` to everyone (RFC 903), with the
/// virtio-net header the TAP expects in front (all zero: no offloads),
/// padded to Ethernet's 60-byte minimum. Both hardware addresses are the
/// VM's, both protocol addresses zero, as QEMU sends it.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; VNET_HDR_LEN + 60] {
    let mut f = [0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    let arp = &mut e[14..];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    arp[8..14].copy_from_slice(&mac);
    arp[18..24].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rarp_frame_is_a_broadcast_reverse_request_from_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert!(f[..VNET_HDR_LEN].iter().all(|&b| b == 0));
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(e.len(), 60);
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        // htype 1, ptype IPv4, hlen 6, plen 4, op 3.
        assert_eq!(&e[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[28..32], &[0; 4]);
        assert_eq!(&e[32..38], &mac);
        assert!(e[38..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rounds_back_off() {
        assert!(ROUNDS.windows(2).all(|w| w[0] <= w[1]));
        let total: Duration = ROUNDS.iter().sum();
        assert_eq!(total, Duration::from_millis(800));
    }
}
