//! How devices raise message-signalled interrupts without knowing KVM: the
//! monitor gives each MSI-X capable device a [`MsiVectors`] (in ffmk-vmm:
//! one GSI per vector, KVM GSI routing and an irqfd each).

/// Where an MSI goes: the address/data pair the guest wrote into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

pub trait MsiVectors: Send + Sync {
    /// How many vectors this set has.
    fn len(&self) -> u16;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Routes vector `v` to `msg`, or takes its route away (`None`: masked or
    /// disabled). Called whenever the guest changes the table or the masks.
    fn route(&self, v: u16, msg: Option<MsiMessage>) -> std::io::Result<()>;

    /// Raises vector `v` (which the caller knows to be routed and unmasked).
    fn trigger(&self, v: u16) -> std::io::Result<()>;

    /// The eventfd that raises vector `v`, for handing to another thread or
    /// to the kernel (e.g. as a vhost call fd). None if there is none.
    fn eventfd(&self, _v: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        None
    }
}
