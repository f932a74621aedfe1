//! Interrupt routing: KVM's GSI routing table (the in-kernel PIC/IOAPIC pins
//! plus one MSI route per device vector) and irqfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`IrqRouting`] keeps
//! it: the default routes `KVM_CREATE_IRQCHIP` installs (GSI 0-15 to both
//! PICs and the IOAPIC, 16-23 to the IOAPIC) and the MSI routes, and commits
//! all of them on every change.
use devices::interrupt::{MsiMessage, MsiVectors};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries.
const MAX_GSI: u32 = 4096;

pub struct IrqRouting {
    vm: Arc<VmFd>,
    msi: Mutex<MsiRoutes>,
}

struct MsiRoutes {
    routes: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
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
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouting {
            vm,
            msi: Mutex::new(MsiRoutes {
                routes: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    fn commit(&self, routes: &BTreeMap<u32, MsiMessage>) -> std::io::Result<()> {
        let mut entries = default_routes();
        entries.extend(routes.iter().map(|(gsi, m)| msi(*gsi, m)));
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
            Some(m) => msi.routes.insert(gsi, m) != Some(m),
            None => msi.routes.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&msi.routes)?;
        }
        Ok(())
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
        // SAFETY (test): reading the irqchip member of entries built as irqchip routes.
        let pins: Vec<_> = r
            .iter()
            .map(|e| {
                (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe {
                    e.u.irqchip.pin
                })
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
        let routing = Arc::new(IrqRouting::new(vm));
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
