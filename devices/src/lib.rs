//! Devices of ffmk-vmm.
//!
//! - [`bus`]: the port-I/O and MMIO buses that route a vCPU's exits to a device;
//! - [`pci`]: the PCI root bus (config mechanism #1, ECAM, BAR windows);
//! - [`legacy`]: the PC devices a guest expects at fixed ports: 8250 serial
//!   (through vm-superio), the i8042 reset line, an ACPI sleep register
//!   (poweroff) and the opt-in test exit port.
//!
//! - [`persist`]: the save/restore contract every device with state keeps.
//!
//! Devices never end the VM themselves: they report a [`VmEvent`] through an
//! [`EventSink`], and the monitor decides what to do with it.
pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod rate_limiter;
pub mod rtc;
pub mod tap;
pub mod virtio;

use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Something a device asks the monitor to do with the whole VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest wrote its exit status to the test exit port.
    TestExit(u8),
}

/// Where devices report [`VmEvent`]s: the first event is kept and an eventfd
/// wakes the monitor's control loop.
#[derive(Clone)]
pub struct EventSink {
    first: Arc<Mutex<Option<VmEvent>>>,
    evt: Arc<EventFd>,
}

impl EventSink {
    pub fn new(evt: Arc<EventFd>) -> Self {
        EventSink {
            first: Arc::new(Mutex::new(None)),
            evt,
        }
    }

    /// Records `e` (unless an earlier event is pending) and wakes the monitor.
    pub fn report(&self, e: VmEvent) {
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert(e);
        }
        if let Err(err) = self.evt.write(1) {
            tracing::error!("cannot signal VM event {e:?}: {err}");
        }
    }

    /// The event reported first, if any.
    pub fn take(&self) -> Option<VmEvent> {
        self.first.lock().ok().and_then(|mut f| f.take())
    }
}
