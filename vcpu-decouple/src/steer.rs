//! Interrupt steering: device interrupts go to service vCPUs only.
//!
//! The guest picks where an MSI goes by the destination it writes into the
//! message address. The VMM commits every MSI route to KVM itself, so it
//! checks each one on the way: a route that would reach a compute vCPU is
//! rewritten to a service vCPU (and counted). The guest is told which CPUs
//! are compute CPUs (`irqaffinity=` etc.), so a well-behaved guest never
//! needs this; it is the guarantee behind the promise.
//!
//! IOAPIC redirection entries live in KVM's in-kernel IOAPIC, where the
//! guest writes them without an exit; those are audited
//! ([`ioapic_targets_compute`]) rather than rewritten.
use crate::topology::Topology;

/// An MSI as written by the guest (x86 layout: destination APIC ID in
/// address bits 12-19, destination mode in bit 2; vector and delivery mode
/// in the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    pub addr: u64,
    pub data: u32,
}

const DEST_SHIFT: u64 = 12;
const DEST_MASK: u64 = 0xff << DEST_SHIFT;
const DEST_LOGICAL: u64 = 1 << 2;
const BROADCAST: u8 = 0xff;

/// What the steering did to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steered {
    /// Already reached service vCPUs only.
    Unchanged,
    /// Rewritten; `from` is the guest's destination field.
    Moved { from: u8, to: u8 },
}

/// The vCPUs (APIC IDs = vCPU ids) a message is delivered to, under the
/// flat logical model Linux and the probe use (logical ID bit n = vCPU n).
pub fn destinations(msi: &Msi, total: u8) -> Vec<u8> {
    let dest = ((msi.addr & DEST_MASK) >> DEST_SHIFT) as u8;
    if msi.addr & DEST_LOGICAL != 0 {
        (0..total.min(8)).filter(|v| dest & (1 << v) != 0).collect()
    } else if dest == BROADCAST {
        (0..total).collect()
    } else {
        vec![dest].into_iter().filter(|d| *d < total).collect()
    }
}

/// Rewrites `msi` so that it reaches service vCPUs only. Vector and
/// delivery mode are kept; a logical destination loses its compute bits,
/// and one that is left with none (or a physical one that names a compute
/// vCPU or everyone) goes to one service vCPU, chosen by the old
/// destination so that different vectors spread over the service set.
pub fn steer(topo: &Topology, msi: Msi) -> (Msi, Steered) {
    if !topo.is_decoupled() {
        return (msi, Steered::Unchanged);
    }
    let total = topo.total();
    let dest = ((msi.addr & DEST_MASK) >> DEST_SHIFT) as u8;
    let hits_compute = destinations(&msi, total).iter().any(|v| *v >= topo.service)
        || (msi.addr & DEST_LOGICAL == 0 && dest == BROADCAST);
    if !hits_compute {
        return (msi, Steered::Unchanged);
    }
    let with_dest = |addr: u64, d: u8| (addr & !DEST_MASK) | (u64::from(d) << DEST_SHIFT);
    if msi.addr & DEST_LOGICAL != 0 {
        let service_bits: u8 = (0..topo.service.min(8)).fold(0, |m, v| m | (1 << v));
        let kept = dest & service_bits;
        if kept != 0 {
            let addr = with_dest(msi.addr, kept);
            return (
                Msi { addr, ..msi },
                Steered::Moved {
                    from: dest,
                    to: kept,
                },
            );
        }
    }
    let to = dest % topo.service;
    let addr = with_dest(msi.addr & !DEST_LOGICAL, to);
    (Msi { addr, ..msi }, Steered::Moved { from: dest, to })
}

/// One IOAPIC redirection entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoapicRoute {
    pub pin: u8,
    pub vector: u8,
    pub masked: bool,
    pub logical: bool,
    pub dest: u8,
}

impl IoapicRoute {
    pub fn decode(pin: u8, bits: u64) -> IoapicRoute {
        IoapicRoute {
            pin,
            vector: bits as u8,
            masked: bits & (1 << 16) != 0,
            logical: bits & (1 << 11) != 0,
            dest: (bits >> 56) as u8,
        }
    }

    /// The vCPUs this pin interrupts (none while masked).
    pub fn destinations(&self, total: u8) -> Vec<u8> {
        if self.masked {
            return Vec::new();
        }
        let addr =
            (u64::from(self.dest) << DEST_SHIFT) | if self.logical { DEST_LOGICAL } else { 0 };
        destinations(&Msi { addr, data: 0 }, total)
    }
}

/// Unmasked IOAPIC pins whose destination includes a compute vCPU.
pub fn ioapic_targets_compute(topo: &Topology, routes: &[IoapicRoute]) -> Vec<IoapicRoute> {
    routes
        .iter()
        .filter(|r| {
            r.destinations(topo.total())
                .iter()
                .any(|v| *v >= topo.service)
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phys(dest: u8, vector: u32) -> Msi {
        Msi {
            addr: 0xfee0_0000 | (u64::from(dest) << 12),
            data: vector,
        }
    }

    #[test]
    fn physical_destinations_on_compute_vcpus_move_to_service_vcpus() {
        let t = Topology::new(2, 2).unwrap();
        for dest in 0..2 {
            assert_eq!(
                steer(&t, phys(dest, 0x41)),
                (phys(dest, 0x41), Steered::Unchanged)
            );
        }
        let (m, s) = steer(&t, phys(3, 0x41));
        assert_eq!(s, Steered::Moved { from: 3, to: 1 });
        assert_eq!(m, phys(1, 0x41));
        let (m, _) = steer(&t, phys(2, 0x4041));
        assert_eq!((destinations(&m, 4), m.data), (vec![0], 0x4041));
        // Broadcast would reach the compute vCPUs too.
        let (m, s) = steer(&t, phys(0xff, 0x30));
        assert!(matches!(s, Steered::Moved { from: 0xff, .. }));
        assert!(destinations(&m, 4).iter().all(|v| *v < 2));
    }

    #[test]
    fn logical_destinations_lose_their_compute_bits() {
        let t = Topology::new(2, 2).unwrap();
        let logical = |mask: u8| Msi {
            addr: 0xfee0_0000 | (u64::from(mask) << 12) | DEST_LOGICAL,
            data: 0x51,
        };
        assert_eq!(destinations(&logical(0b1010), 4), vec![1, 3]);
        let (m, s) = steer(&t, logical(0b1010));
        assert_eq!(
            s,
            Steered::Moved {
                from: 0b1010,
                to: 0b10
            }
        );
        assert_eq!(destinations(&m, 4), vec![1]);
        let (m, _) = steer(&t, logical(0b1100));
        assert_eq!(m.addr & DEST_LOGICAL, 0);
        assert_eq!(destinations(&m, 4), vec![0]);
    }

    #[test]
    fn nothing_is_touched_without_compute_vcpus() {
        let t = Topology::plain(4);
        assert_eq!(steer(&t, phys(3, 0x41)).1, Steered::Unchanged);
    }

    #[test]
    fn ioapic_audit_finds_pins_on_compute_vcpus() {
        let t = Topology::new(1, 1).unwrap();
        let routes = [
            IoapicRoute::decode(4, 0x24),
            IoapicRoute::decode(9, 0x29 | (1u64 << 56)),
            IoapicRoute::decode(10, 0x2a | (1u64 << 56) | (1 << 16)),
            IoapicRoute::decode(11, 0x2b | (0b11u64 << 56) | (1 << 11)),
        ];
        let bad: Vec<u8> = ioapic_targets_compute(&t, &routes)
            .iter()
            .map(|r| r.pin)
            .collect();
        assert_eq!(bad, vec![9, 11]);
    }
}
