//! Device passthrough for ffmk-vmm, and the InfiniBand VF lifecycle.
//!
//! MPI inside the guest keeps kernel-bypass access to the HCA: the VMM
//! sets the channel up (a VF on the guest's PCI bus, its BARs mapped, its
//! interrupts wired to KVM, guest RAM mapped for its DMA) and then stays
//! out of the data path.
//!
//! - [`backend`]: what a passthrough function needs from whoever serves
//!   the device (regions, interrupts, reset);
//! - [`kernel`]: kernel VFIO (container/group via vfio-ioctls) as that
//!   backend, with the checks an operator needs ([`kernel::preflight`]);
//! - [`passthrough`]: the PCI function the guest sees (configuration space
//!   composed from the device and emulation, BARs mapped or trapped,
//!   MSI/MSI-X relayed through irqfds);
//! - [`migration`]: VFIO migration v2, a device's state saved and loaded
//!   (PRE_COPY, STOP_COPY, RESUMING) where its driver supports it;
//! - [`msi`]: the emulated MSI capability;
//! - [`sysfs`]: host PCI functions: drivers, IOMMU groups, binding to
//!   vfio-pci, SR-IOV;
//! - [`ib`]: InfiniBand HCAs, ports and VFs (mlx5) from sysfs.
//!
//! The `devices` crate knows nothing of this one: a passthrough function is
//! just another `devices::pci::PciDevice`.
pub mod backend;
pub mod ib;
pub mod kernel;
pub mod migration;
pub mod msi;
pub mod passthrough;
pub mod sysfs;
pub mod vfio_user;

pub use backend::{Backend, Mapping, RegionInfo};
pub use passthrough::{GuestMapper, Passthrough};
pub use sysfs::{HostDevice, PciAddress};
