//! The port-I/O bus: maps port ranges to devices.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the range's base.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range {base:#x}+{len} overlaps an existing device")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len} is empty or wraps around")]
    BadRange { base: u16, len: u16 },
}

type Slot = (u16, Arc<Mutex<dyn PioDevice>>);

/// Port-I/O bus shared by every vCPU thread.
#[derive(Default, Clone)]
pub struct PioBus {
    /// base -> (len, device)
    devices: BTreeMap<u16, Slot>,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len - 1)
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

    fn find(&self, port: u16) -> Option<(u16, &Arc<Mutex<dyn PioDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=port).next_back()?;
        (port - base < *len).then_some((port - base, dev))
    }

    /// Reads from the device at `port`; unclaimed ports read as all ones, as on a PC.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Writes to the device at `port`; writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
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

    struct Latch(Vec<(u16, u8)>);
    impl PioDevice for Latch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = PioBus::new();
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
            bus.insert(0xffff, 2, dev.clone()),
            Err(BusError::BadRange {
                base: 0xffff,
                len: 2
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(1, 7)]);
    }
}
