//! Address buses: map address ranges to devices. One [`Bus`] routes a vCPU's
//! port I/O (`in`/`out`), another its MMIO exits; both use the same
//! [`BusDevice`] interface.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("address range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("address range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A bus shared by every vCPU thread.
#[derive(Default, Clone)]
pub struct Bus {
    /// base -> (len, device)
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

/// The port-I/O bus (ports are addresses below 0x10000).
pub type PioBus = Bus;
/// The MMIO bus (guest-physical addresses no RAM backs).
pub type MmioBus = Bus;

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len.wrapping_sub(1))
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let overlaps = self
            .devices
            .range(..=end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + (l - 1) >= base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all
    /// ones, as on a PC. Returns whether a device claimed the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                if let Ok(mut d) = dev.lock() {
                    d.read(off, data);
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                if let Ok(mut d) = dev.lock() {
                    d.write(off, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(Vec<(u64, u8)>);
    impl BusDevice for Latch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Latch(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3fa, 2, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3fa,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(0x3f0, 9, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        bus.insert(0x3f0, 8, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert!(matches!(
            bus.insert(0x1000, 0, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(1, 7)]);
        // MMIO-sized addresses.
        bus.insert(0xfeb0_0000, 0x1000, dev.clone()).unwrap();
        assert!(bus.read(0xfeb0_0fff, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
