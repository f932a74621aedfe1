//! Interrupt routing: KVM's GSI routing table (the in-kernel PIC/IOAPIC pins
//! plus one MSI route per device vector) and irqfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`IrqRouting`] keeps
//! it: the default routes `KVM_CREATE_IRQCHIP` installs (GSI 0-15 to both
//! PICs and the IOAPIC, 16-23 to the IOAPIC) and the MSI routes, and commits
//! all of them on every change.
use devices::interrupt::{MsiMessage, MsiVectors};
use kvm_bindings::kvm_irqchip;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vcpu_decouple::steer::{self, IoapicRoute, Msi, Steered};
use vcpu_decouple::Topology;
use vmm_api::model::{Interrupts, IoapicPin, MsiRoute};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries.
const MAX_GSI: u32 = 4096;

pub struct IrqRouting {
    vm: Arc<VmFd>,
    /// Compute vCPUs never get a device interrupt (`vcpu_decouple::steer`).
    topology: Topology,
    msi: Mutex<MsiRoutes>,
}

/// One MSI route: the message the guest wrote, and the one committed to
/// KVM (different when it was steered away from a compute vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    guest: MsiMessage,
    committed: MsiMessage,
}

struct MsiRoutes {
    routes: BTreeMap<u32, Route>,
    next_gsi: u32,
    /// Routes rewritten so far.
    steered: u64,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi(gsi: u32, m: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.addr as u32;
    e.u.msi.address_hi = (m.addr >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// The routes KVM_CREATE_IRQCHIP starts with.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..16 {
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        v.push(irqchip(gsi, chip, pin));
    }
    for gsi in 0..24 {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl IrqRouting {
    pub fn new(vm: Arc<VmFd>, topology: Topology) -> Self {
        IrqRouting {
            vm,
            topology,
            msi: Mutex::new(MsiRoutes {
                routes: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
                steered: 0,
            }),
        }
    }

    fn commit(&self, routes: &BTreeMap<u32, Route>) -> std::io::Result<()> {
        let mut entries = default_routes();
        entries.extend(routes.iter().map(|(gsi, r)| msi(*gsi, &r.committed)));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn set(&self, gsi: u32, m: Option<MsiMessage>) -> std::io::Result<()> {
        let mut msi = self
            .msi
            .lock()
            .map_err(|_| std::io::Error::other("routing lock poisoned"))?;
        let changed = match m {
            Some(guest) => {
                let (to, steered) = steer::steer(
                    &self.topology,
                    Msi {
                        addr: guest.addr,
                        data: guest.data,
                    },
                );
                let committed = MsiMessage {
                    addr: to.addr,
                    data: to.data,
                };
                let route = Route { guest, committed };
                let changed = msi.routes.insert(gsi, route) != Some(route);
                if let (true, Steered::Moved { from, to }) = (changed, steered) {
                    msi.steered += 1;
                    tracing::warn!(
                        "the guest routed MSI vector {:#x} (GSI {gsi}) to APIC destination {from:#x}, \
                         which includes compute vCPUs; delivering it to service vCPU(s) {to:#x} instead",
                        guest.data & 0xff
                    );
                }
                changed
            }
            None => msi.routes.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&msi.routes)?;
        }
        Ok(())
    }

    /// Every interrupt route and where it lands (`GET /vm/interrupts`): MSI
    /// routes as the guest wrote them and as committed, and the in-kernel
    /// IOAPIC's redirection entries with the ones that reach compute vCPUs.
    pub fn describe(&self) -> Interrupts {
        let total = self.topology.total();
        let dests = |m: &MsiMessage| {
            steer::destinations(
                &Msi {
                    addr: m.addr,
                    data: m.data,
                },
                total,
            )
        };
        let (msi, steered) = match self.msi.lock() {
            Ok(g) => (
                g.routes
                    .iter()
                    .map(|(gsi, r)| MsiRoute {
                        gsi: *gsi,
                        vector: r.committed.data & 0xff,
                        guest_vcpus: dests(&r.guest),
                        vcpus: dests(&r.committed),
                        steered: r.guest != r.committed,
                    })
                    .collect::<Vec<_>>(),
                g.steered,
            ),
            Err(_) => (Vec::new(), 0),
        };
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        let ioapic: Vec<IoapicRoute> = match self.vm.get_irqchip(&mut chip) {
            // SAFETY: chip_id IOAPIC makes KVM fill the `ioapic` member.
            Ok(()) => unsafe { chip.chip.ioapic }
                .redirtbl
                .iter()
                .enumerate()
                // SAFETY: every redirection entry is a plain 64-bit value.
                .map(|(pin, e)| IoapicRoute::decode(pin as u8, unsafe { e.bits }))
                .collect(),
            Err(e) => {
                tracing::debug!("cannot read the IOAPIC: {e}");
                Vec::new()
            }
        };
        let on_compute: Vec<u8> = steer::ioapic_targets_compute(&self.topology, &ioapic)
            .iter()
            .map(|r| r.pin)
            .collect();
        let pins: Vec<_> = ioapic
            .iter()
            .filter(|r| !r.masked)
            .map(|r| IoapicPin {
                pin: r.pin,
                vector: r.vector,
                vcpus: r.destinations(total),
            })
            .collect();
        Interrupts {
            compute_vcpus: self.topology.compute_cpus().as_slice().to_vec(),
            msi,
            msi_steered: steered,
            ioapic: pins,
            ioapic_pins_on_compute_vcpus: on_compute,
        }
    }

    /// `n` MSI vectors: one GSI and one irqfd each.
    pub fn msi_vectors(self: &Arc<Self>, n: u16) -> std::io::Result<Arc<KvmMsiVectors>> {
        let first = {
            let mut msi = self
                .msi
                .lock()
                .map_err(|_| std::io::Error::other("routing lock poisoned"))?;
            let first = msi.next_gsi;
            if first + u32::from(n) > MAX_GSI {
                return Err(std::io::Error::other("out of interrupt routes (GSIs)"));
            }
            msi.next_gsi += u32::from(n);
            first
        };
        let mut fds = Vec::with_capacity(usize::from(n));
        for v in 0..u32::from(n) {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            self.vm
                .register_irqfd(&fd, first + v)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            fds.push(fd);
        }
        Ok(Arc::new(KvmMsiVectors {
            routing: self.clone(),
            first_gsi: first,
            fds,
        }))
    }
}

/// A device's MSI vectors on KVM.
pub struct KvmMsiVectors {
    routing: Arc<IrqRouting>,
    first_gsi: u32,
    fds: Vec<EventFd>,
}

impl MsiVectors for KvmMsiVectors {
    fn len(&self) -> u16 {
        self.fds.len() as u16
    }

    fn route(&self, v: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
        if usize::from(v) >= self.fds.len() {
            return Err(std::io::Error::other(format!("no MSI vector {v}")));
        }
        self.routing.set(self.first_gsi + u32::from(v), msg)
    }

    fn trigger(&self, v: u16) -> std::io::Result<()> {
        match self.fds.get(usize::from(v)) {
            Some(fd) => fd.write(1),
            None => Err(std::io::Error::other(format!("no MSI vector {v}"))),
        }
    }

    fn eventfd(&self, v: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_both_pics_and_the_ioapic() {
        let r = default_routes();
        assert_eq!(r.len(), 40);
        let pins: Vec<_> = r
            .iter()
            .map(|e| {
                // SAFETY: every entry was built as an irqchip route, so
                // the irqchip member of the union is the one written.
                let (chip, pin) = unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
                (e.gsi, chip, pin)
            })
            .collect();
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
    }

    #[test]
    fn msi_routes_are_committed_to_a_real_vm() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let routing = Arc::new(IrqRouting::new(vm, Topology::plain(1)));
        let vectors = routing.msi_vectors(2).unwrap();
        assert_eq!(vectors.len(), 2);
        let m = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x31,
        };
        vectors.route(1, Some(m)).unwrap();
        vectors.trigger(1).unwrap();
        vectors.route(1, None).unwrap();
        assert!(vectors.route(2, Some(m)).is_err());
        assert!(vectors.trigger(5).is_err());
        let more = routing.msi_vectors(3).unwrap();
        assert_eq!(more.first_gsi, FIRST_MSI_GSI + 2);
    }
}
