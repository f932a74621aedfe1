//! The MSI capability of a passthrough function, emulated: the guest's
//! address/data/mask writes become KVM routes for the function's vectors,
//! and enabling MSI hands their irqfds to the backend, so a device
//! interrupt reaches the guest without passing through the VMM.
use crate::backend::{Backend, IRQ_MSI};
use devices::interrupt::{MsiMessage, MsiVectors};
use std::sync::Arc;

pub const CAP_ID: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;

pub struct Msi {
    /// Bytes 2.. of the capability as the guest sees them (control first).
    control: u16,
    addr: u64,
    data: u16,
    mask: u32,
    vectors: Arc<dyn MsiVectors>,
    /// Vectors handed to the backend (0: MSI off there).
    enabled: u32,
}

impl Msi {
    /// From the physical capability's control word; `vectors` has as many
    /// vectors as the function may use.
    pub fn new(physical_control: u16, vectors: Arc<dyn MsiVectors>) -> Msi {
        let capable = (physical_control >> 1) & 0x7;
        let max = 1u16 << capable;
        let n = vectors.len().min(max);
        // Advertise only what we can route (log2 of n).
        let mmc = 15 - n.max(1).leading_zeros() as u16;
        let control = (physical_control & (CONTROL_64BIT | CONTROL_PER_VECTOR_MASK)) | (mmc << 1);
        Msi {
            control,
            addr: 0,
            data: 0,
            mask: 0,
            vectors,
            enabled: 0,
        }
    }

    fn is64(&self) -> bool {
        self.control & CONTROL_64BIT != 0
    }

    fn masking(&self) -> bool {
        self.control & CONTROL_PER_VECTOR_MASK != 0
    }

    /// Size of the capability in configuration space.
    pub fn len(&self) -> usize {
        10 + if self.is64() { 4 } else { 0 } + if self.masking() { 10 } else { 0 }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// (offset of data, of mask) within the capability.
    fn layout(&self) -> (usize, usize) {
        if self.is64() {
            (0x0c, 0x10)
        } else {
            (0x08, 0x0c)
        }
    }

    /// The capability's bytes from offset 2 (control) on; `out[i]` is
    /// capability byte `2 + i`.
    fn bytes(&self) -> [u8; 22] {
        let mut b = [0u8; 22];
        b[0..2].copy_from_slice(&self.control.to_le_bytes());
        b[2..6].copy_from_slice(&(self.addr as u32).to_le_bytes());
        let (data, mask) = self.layout();
        if self.is64() {
            b[6..10].copy_from_slice(&((self.addr >> 32) as u32).to_le_bytes());
        }
        b[data - 2..data].copy_from_slice(&self.data.to_le_bytes());
        if self.masking() {
            b[mask - 2..mask + 2].copy_from_slice(&self.mask.to_le_bytes());
        }
        b
    }

    /// Guest read of capability byte `rel` (>= 2).
    pub fn read_byte(&self, rel: usize) -> u8 {
        self.bytes().get(rel.wrapping_sub(2)).copied().unwrap_or(0)
    }

    /// Guest write of capability byte `rel` (>= 2). Call [`Msi::apply`]
    /// after a whole access.
    pub fn write_byte(&mut self, rel: usize, v: u8) {
        let (data, mask) = self.layout();
        let set = |word: &mut u64, shift: usize| {
            *word = (*word & !(0xff << shift)) | (u64::from(v) << shift);
        };
        match rel {
            // Enable and multiple-message enable are the guest's.
            2 => {
                let keep = self.control & !(CONTROL_ENABLE | 0x70);
                let mme = (u16::from(v) & 0x70).min(((self.control >> 1) & 0x7) << 4);
                self.control = keep | (u16::from(v) & 1) | mme;
            }
            4..=7 => {
                let mut a = self.addr;
                set(&mut a, (rel - 4) * 8);
                self.addr = a & !0x3;
            }
            8..=11 if self.is64() && rel < data => {
                let mut a = self.addr;
                set(&mut a, (rel - 4) * 8);
                self.addr = a;
            }
            r if r == data || r == data + 1 => {
                let mut d = u64::from(self.data);
                set(&mut d, (r - data) * 8);
                self.data = d as u16;
            }
            r if self.masking() && (mask..mask + 4).contains(&r) => {
                let mut m = u64::from(self.mask);
                set(&mut m, (r - mask) * 8);
                self.mask = m as u32;
            }
            _ => {}
        }
    }

    fn wanted(&self) -> u32 {
        if self.control & CONTROL_ENABLE == 0 {
            return 0;
        }
        (1u32 << ((self.control >> 4) & 0x7)).min(u32::from(self.vectors.len()))
    }

    /// Brings routes and the backend in line with what the guest wrote.
    pub fn apply(&mut self, backend: &dyn Backend) {
        let n = self.wanted();
        for v in 0..self.vectors.len() {
            let live = u32::from(v) < n && self.mask & (1 << v) == 0;
            let msg = live.then(|| MsiMessage {
                addr: self.addr,
                // With several messages, the low bits of data name the vector.
                data: u32::from(self.data) | u32::from(v),
            });
            if let Err(e) = self.vectors.route(v, msg) {
                tracing::warn!("MSI vector {v}: cannot route: {e}");
            }
        }
        if n == self.enabled {
            return;
        }
        if self.enabled != 0 {
            if let Err(e) = backend.disable_irqs(IRQ_MSI) {
                tracing::warn!("{}: {e}", backend.describe());
            }
            self.enabled = 0;
        }
        if n == 0 {
            return;
        }
        let fds: Option<Vec<_>> = (0..n as u16).map(|v| self.vectors.eventfd(v)).collect();
        match fds.map(|f| backend.enable_irqs(IRQ_MSI, &f)) {
            Some(Ok(())) => self.enabled = n,
            Some(Err(e)) => tracing::warn!("{}: MSI: {e}", backend.describe()),
            None => tracing::warn!("{}: MSI vectors have no eventfds", backend.describe()),
        }
    }

    /// MSI off, as if the guest had cleared the enable bit.
    pub fn disable(&mut self, backend: &dyn Backend) {
        self.control &= !CONTROL_ENABLE;
        self.apply(backend);
    }

    pub fn enabled_vectors(&self) -> u32 {
        self.enabled
    }
}
