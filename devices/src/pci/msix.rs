//! MSI-X: the capability in configuration space, the vector table and the
//! pending-bit array (both in a BAR), and delivery through [`MsiVectors`].
//!
//! A vector is routed to the guest's address/data pair while MSI-X is
//! enabled, the function is not masked and the entry is not masked; a
//! vector raised while masked sets its pending bit and is delivered when it
//! is unmasked (PCI spec 6.8.2).
use super::config::{ConfigError, ConfigSpace};
use crate::interrupt::{MsiMessage, MsiVectors};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const CAP_ID: u8 = 0x11;
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The table (address low, address high, data, control per vector) and
/// the pending bits; enable and function mask live in configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
}

pub struct Msix {
    table: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    cap_offset: usize,
    vectors: Arc<dyn MsiVectors>,
}

impl Msix {
    /// Adds the capability to `config`: `vectors.len()` entries, the table
    /// at `table_offset` and the PBA at `pba_offset` of BAR `bar`.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: Arc<dyn MsiVectors>,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<Self, ConfigError> {
        let n = vectors.len();
        let mut cap = vec![CAP_ID, 0];
        cap.extend_from_slice(&(n.saturating_sub(1) & 0x7ff).to_le_bytes());
        cap.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only the enable and function-mask bits are the guest's to write.
        let writable = [0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        let cap_offset = config.add_capability(&cap, &writable)?;
        let table = (0..n)
            .map(|_| Entry {
                control: ENTRY_MASKED,
                ..Default::default()
            })
            .collect();
        Ok(Msix {
            table,
            pending: vec![false; usize::from(n)],
            enabled: false,
            function_masked: false,
            cap_offset,
            vectors,
        })
    }

    /// Size in bytes of the table and of the PBA, for laying out the BAR.
    pub fn table_size(n: u16) -> u64 {
        u64::from(n) * ENTRY_SIZE
    }

    pub fn pba_size(n: u16) -> u64 {
        u64::from(n).div_ceil(64) * 8
    }

    pub fn vector_count(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Where the capability is in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    /// The vectors the table's entries are routed to.
    pub fn vectors(&self) -> &Arc<dyn MsiVectors> {
        &self.vectors
    }

    /// Call after every configuration write: picks up enable/mask changes.
    pub fn config_written(&mut self, config: &ConfigSpace) {
        let control = config.u16_at(self.cap_offset + 2);
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.table.len() {
            self.update(v);
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.table[v].masked()
    }

    /// Re-routes vector `v`, and delivers it if it was pending and now can be.
    fn update(&mut self, v: usize) {
        let route = self.deliverable(v).then(|| self.table[v].message());
        if let Err(e) = self.vectors.route(v as u16, route) {
            tracing::warn!("MSI-X vector {v}: cannot route: {e}");
        }
        if route.is_some() && self.pending[v] {
            self.pending[v] = false;
            let _ = self.vectors.trigger(v as u16);
        }
    }

    /// Raises vector `v` (or records it as pending while masked).
    pub fn trigger(&mut self, v: u16) {
        let i = usize::from(v);
        if i >= self.table.len() {
            return;
        }
        if self.deliverable(i) {
            if let Err(e) = self.vectors.trigger(v) {
                tracing::warn!("MSI-X vector {v}: cannot raise: {e}");
            }
        } else {
            self.pending[i] = true;
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let (v, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.table.get(v) else {
            data.fill(0);
            return;
        };
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        bytes[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&e.control.to_le_bytes());
        let f = field as usize;
        match bytes.get(f..f + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    /// Guest write to the table: dword or qword accesses (the spec allows
    /// nothing else); others are ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let (v, field) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE) as usize,
        );
        if v >= self.table.len() || !matches!(data.len(), 4 | 8) || field % 4 != 0 {
            return;
        }
        if field + data.len() > 16 {
            return;
        }
        let before = self.table[v];
        let mut bytes = [0u8; 16];
        self.table_read(v as u64 * ENTRY_SIZE, &mut bytes);
        bytes[field..field + data.len()].copy_from_slice(data);
        let dword =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        self.table[v] = Entry {
            addr_lo: dword(0),
            addr_hi: dword(4),
            data: dword(8),
            control: dword(12) & ENTRY_MASKED,
        };
        if self.table[v] != before {
            self.update(v);
        }
    }

    pub fn save(&self) -> MsixState {
        MsixState {
            table: self
                .table
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
        }
    }

    /// Takes back the table and pending bits, reads enable/mask from
    /// `config` (restored first), and routes every vector again. Refused
    /// (nothing changed) if the vector count differs.
    pub fn restore(
        &mut self,
        s: &MsixState,
        config: &ConfigSpace,
    ) -> Result<(), crate::persist::StateError> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(crate::persist::StateError::Mismatch(format!(
                "{} MSI-X vectors saved, this function has {}",
                s.table.len(),
                self.table.len()
            )));
        }
        for (e, w) in self.table.iter_mut().zip(&s.table) {
            *e = Entry {
                addr_lo: w[0],
                addr_hi: w[1],
                data: w[2],
                control: w[3] & ENTRY_MASKED,
            };
        }
        self.pending.clone_from(&s.pending);
        let control = config.u16_at(self.cap_offset + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..self.table.len() {
            self.update(v);
        }
        Ok(())
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciIds;
    use std::sync::Mutex;

    /// Records what the MSI-X logic asks of the interrupt controller.
    #[derive(Default)]
    struct Recorder {
        routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        fired: Mutex<Vec<u16>>,
    }

    impl MsiVectors for Recorder {
        fn len(&self) -> u16 {
            3
        }
        fn route(&self, v: u16, msg: Option<MsiMessage>) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((v, msg));
            Ok(())
        }
        fn trigger(&self, v: u16) -> std::io::Result<()> {
            self.fired.lock().unwrap().push(v);
            Ok(())
        }
    }

    fn setup() -> (ConfigSpace, Msix, Arc<Recorder>) {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: (1, 0, 0),
            revision: 1,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let rec = Arc::new(Recorder::default());
        let msix = Msix::new(&mut config, rec.clone(), 0, 0x2000, 0x3000).unwrap();
        (config, msix, rec)
    }

    fn set_control(config: &mut ConfigSpace, msix: &mut Msix, value: u16) {
        config.write(msix.cap_offset + 2, &value.to_le_bytes());
        msix.config_written(config);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (config, msix, _) = setup();
        let o = msix.cap_offset;
        assert_eq!(config.raw(o, 1), &[CAP_ID]);
        assert_eq!(config.u16_at(o + 2), 2, "table size - 1");
        assert_eq!(config.u32_at(o + 4), 0x2000);
        assert_eq!(config.u32_at(o + 8), 0x3000);
        assert_eq!(Msix::pba_size(65), 16);
    }

    #[test]
    fn vectors_are_routed_only_when_enabled_and_unmasked_and_pending_ones_fire() {
        let (mut config, mut msix, rec) = setup();
        // Program entry 1 while MSI-X is off: nothing routed yet.
        msix.table_write(16, &0xfee0_0000u32.to_le_bytes());
        msix.table_write(24, &0x4041u32.to_le_bytes());
        msix.table_write(28, &0u32.to_le_bytes()); // unmask
        assert!(rec.routes.lock().unwrap().iter().all(|(_, m)| m.is_none()));
        // Raised while disabled: pending.
        msix.trigger(1);
        let mut pba = [0u8; 1];
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Enable: vector 1 routed and its pending interrupt delivered.
        set_control(&mut config, &mut msix, CONTROL_ENABLE);
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4041,
        };
        assert!(rec.routes.lock().unwrap().contains(&(1, Some(msg))));
        assert_eq!(*rec.fired.lock().unwrap(), vec![1]);
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        msix.trigger(1);
        msix.trigger(0); // masked entry: pending only
        msix.trigger(7); // out of range: ignored
        assert_eq!(*rec.fired.lock().unwrap(), vec![1, 1]);
        // Function mask: routes go away.
        set_control(
            &mut config,
            &mut msix,
            CONTROL_ENABLE | CONTROL_FUNCTION_MASK,
        );
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(2, None)));
        msix.trigger(1);
        assert_eq!(rec.fired.lock().unwrap().len(), 2);
        let mut e = [0u8; 16];
        msix.table_read(16, &mut e);
        assert_eq!(&e[8..12], &0x4041u32.to_le_bytes());
    }

    #[test]
    fn odd_table_accesses_are_ignored() {
        let (_, mut msix, _) = setup();
        msix.table_write(16, &[1, 2]); // 2-byte write
        msix.table_write(18, &[1, 2, 3, 4]); // unaligned
        msix.table_write(14, &[0; 8]); // crosses an entry
        msix.table_write(48, &[0; 4]); // past the table
        let mut e = [0u8; 16];
        msix.table_read(16, &mut e);
        assert_eq!(&e[..12], &[0u8; 12]);
        assert_eq!(&e[12..], &1u32.to_le_bytes(), "still masked");
        let mut far = [0xaau8; 4];
        msix.table_read(1 << 20, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn saved_state_restores_on_a_fresh_function_and_routes_again() {
        let (mut config, mut msix, _) = setup();
        msix.table_write(16, &0xfee0_1000u32.to_le_bytes());
        msix.table_write(24, &0x4051u32.to_le_bytes());
        msix.table_write(28, &0u32.to_le_bytes());
        set_control(&mut config, &mut msix, CONTROL_ENABLE);
        msix.trigger(2); // masked: pending
        let saved = msix.save();
        let bytes = config.save();

        let (mut config2, mut msix2, rec2) = setup();
        config2.restore(&bytes).unwrap();
        msix2.restore(&saved, &config2).unwrap();
        let msg = MsiMessage {
            addr: 0xfee0_1000,
            data: 0x4051,
        };
        assert!(rec2.routes.lock().unwrap().contains(&(1, Some(msg))));
        assert!(msix2.enabled());
        let mut pba = [0u8; 1];
        msix2.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b100, "pending bit carried over");
        msix2.trigger(1);
        assert_eq!(*rec2.fired.lock().unwrap(), vec![1]);

        // Another vector count, or another function's bytes: refused.
        let mut short = saved.clone();
        short.table.pop();
        assert!(msix2.restore(&short, &config2).is_err());
        let other = ConfigSpace::new(PciIds {
            vendor: 0x8086,
            device: 0x1234,
            class: (2, 0, 0),
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let err = config2.restore(&other.save()).unwrap_err().to_string();
        assert!(err.contains("read-only configuration byte 0x0"), "{err}");
        assert!(config2.restore(&bytes[..100]).is_err());
        assert_eq!(config2.save(), bytes, "a refused restore changes nothing");
    }
}
