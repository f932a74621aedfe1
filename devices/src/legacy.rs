//! Legacy PC devices at fixed ports.
use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::{EventSink, VmEvent};
use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 data/command ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_CMD: u16 = 0x64;
/// ACPI sleep control (+0) and status (+1) registers (HW-reduced FADT).
pub const ACPI_SLEEP_BASE: u16 = 0x600;
/// Default test exit port (same as QEMU's `isa-debug-exit` default).
pub const DEFAULT_TEST_EXIT_PORT: u16 = 0xf4;

/// Raises the serial interrupt through an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Saved 8250 state: DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR and the
/// receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

/// 8250 UART on the port bus, output to any writer (stdout, a file, a sink).
pub struct SerialPort {
    inner: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialPort {
            inner: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The UART's registers and receive FIFO, for snapshots.
    fn state(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state, writing to `out`.
    fn from_state(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        saved: &SerialSnapshot,
    ) -> Result<Self, StateError> {
        let r = saved.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: saved.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| StateError::Invalid(format!("serial state: {e:?}")))?;
        Ok(SerialPort { inner })
    }

    /// Queues console input for the guest (returns how many bytes fit).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.inner.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

/// What a serial port is built with besides its state.
pub struct SerialArgs {
    /// Raised for the UART's interrupt line.
    pub irq: EventFd,
    /// Where the guest's output goes.
    pub out: Box<dyn Write + Send>,
}

impl Persist for SerialPort {
    type State = SerialSnapshot;
    type ConstructorArgs = SerialArgs;
    type Error = StateError;

    fn save(&self) -> Result<SerialSnapshot, StateError> {
        Ok(self.state())
    }

    fn restore(args: SerialArgs, state: &SerialSnapshot) -> Result<Self, StateError> {
        Self::from_state(args.irq, args.out, state)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, b) {
                tracing::warn!("serial write failed: {e:?}");
            }
            if offset == 0 {
                let _ = self.inner.writer_mut().flush();
            }
        }
    }
}

/// The part of an i8042 controller guests use to reset the machine: command
/// 0xfe on port 0x64 pulses the reset line.
pub struct I8042 {
    sink: EventSink,
}

impl I8042 {
    pub fn new(sink: EventSink) -> Self {
        I8042 { sink }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status register (0x64): output buffer empty, input buffer empty.
        // Data register (0x60): nothing to read.
        data.fill(0);
        if offset == 4 {
            if let Some(b) = data.first_mut() {
                *b = 0x1c; // keyboard unlocked, command/data, system flag
            }
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.sink.report(VmEvent::Reset);
        }
    }
}

/// ACPI hardware-reduced sleep registers: writing SLP_EN with any sleep type
/// (the DSDT only describes S5) powers the VM off.
pub struct AcpiSleep {
    sink: EventSink,
}

impl AcpiSleep {
    pub const SLP_EN: u8 = 1 << 5;

    pub fn new(sink: EventSink) -> Self {
        AcpiSleep { sink }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|v| v & Self::SLP_EN != 0) {
            self.sink.report(VmEvent::PowerOff);
        }
    }
}

/// Test exit port: the first byte written ends the VM with that status.
pub struct TestExitPort {
    sink: EventSink,
}

impl TestExitPort {
    pub fn new(sink: EventSink) -> Self {
        TestExitPort { sink }
    }
}

impl BusDevice for TestExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.sink.report(VmEvent::TestExit(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sink() -> EventSink {
        EventSink::new(Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    #[test]
    fn i8042_reset_and_acpi_poweroff_and_exit_port_report_events() {
        let s = sink();
        I8042::new(s.clone()).write(0, &[0xfe]);
        assert_eq!(s.take(), None, "data port 0x60 does not reset");
        I8042::new(s.clone()).write(4, &[0xfe]);
        assert_eq!(s.take(), Some(VmEvent::Reset));
        AcpiSleep::new(s.clone()).write(0, &[5 << 2]);
        assert_eq!(s.take(), None, "no SLP_EN, no poweroff");
        AcpiSleep::new(s.clone()).write(0, &[(5 << 2) | AcpiSleep::SLP_EN]);
        assert_eq!(s.take(), Some(VmEvent::PowerOff));
        TestExitPort::new(s.clone()).write(0, &[42]);
        TestExitPort::new(s.clone()).write(0, &[7]);
        assert_eq!(s.take(), Some(VmEvent::TestExit(42)), "first event wins");
    }

    #[test]
    fn serial_transmits_bytes_to_its_writer() {
        #[derive(Clone, Default)]
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"ok\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
    }
}
