//! PCI: one root bus (segment 0, bus 0) whose functions are reached through
//! configuration mechanism #1 (ports 0xCF8/0xCFC) and through ECAM (MMIO,
//! described to the guest by the ACPI MCFG table), with memory BARs placed by
//! the VMM (acting as firmware) in the PCI windows of the guest address space.
//!
//! - [`config`]: a function's configuration space with write masks, BARs and
//!   capabilities;
//! - [`root`]: the root bus (host bridge at 00:00.0), BAR allocation and the
//!   bus devices that route config and BAR accesses to functions;
//! - [`port`]: PCIe root ports with a hot-plug slot each (native hot-plug).
//!
//! A device is anything implementing [`PciDevice`]: emulated (virtio) devices
//! and passthrough functions (crate `vfio-ib`, which this crate does not
//! know). Functions live at `00:DD.0`, or at `NN:00.0` in the hot-plug slot
//! of root port NN; both take devices after boot (hot-plug).
pub mod config;
pub mod msix;
pub mod port;
pub mod root;

pub use config::{Bar, BarKind, ConfigSpace, PciIds};
pub use msix::Msix;
pub use port::RootPort;
pub use root::{Location, PciConfigIo, PciEcam, PciRoot, PciWindow, PCI_IO_WINDOW};

/// The IOAPIC pins PCI INTx lines of the root bus are wired to: INTA-INTD
/// of slot S go to GSIs `PCI_INTX_GSI_BASE + (S + pin) % 4`, the usual
/// swizzle (the DSDT's `_PRT` says the same to the guest).
pub const PCI_INTX_GSI_BASE: u32 = 16;

/// The GSI of `pin` (1 = INTA .. 4 = INTD) of the function in `slot` of the
/// root bus.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin.clamp(1, 4)) - 1) % 4
}

/// A PCI function shared between its bus slot and the VMM.
pub type SharedPciDevice = std::sync::Arc<std::sync::Mutex<dyn PciDevice>>;

/// A device's activity counters: (name, value).
pub type Counters = Vec<(&'static str, u64)>;

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// The guest wrote `data` at `offset` of the configuration space (after
    /// the write masks were applied): react to control bits (MSI-X enable,
    /// ...). Default: nothing to do.
    fn config_written(&mut self, _offset: usize, _data: &[u8]) {}

    /// Guest read of configuration space. Default: the emulated bytes. A
    /// passthrough function composes its own view (some registers come
    /// from the hardware).
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// Guest write of configuration space. Default: through the write
    /// masks, then [`PciDevice::config_written`].
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
        self.config_written(offset, data);
    }

    /// Guest access to BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Short name for logs and `GET /vm`.
    fn name(&self) -> String;

    /// Activity counters for `GET /vm` (name, value). Default: none.
    fn counters(&self) -> Counters {
        Vec::new()
    }
}
