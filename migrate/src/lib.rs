//! Live migration of a VM between hosts over TCP.
//!
//! - [`protocol`]: versioned frames (magic, version, kind, length, CRC-32 of
//!   the payload) and the messages: hello with the configuration check,
//!   memory pages (zero pages as a flag, no data), machine state, the
//!   switch-over handshake (ready, go, running) and abort;
//! - [`source`]: the pre-copy engine: pages with content first while the
//!   guest runs, then rounds of dirtied pages with bandwidth and dirty-rate
//!   estimates, stop-and-copy once the predicted downtime is under the
//!   target, vCPU throttling when the guest dirties faster than the link,
//!   and giving up cleanly after a round limit;
//! - [`dest`]: the receiving side: checks the hello against its own
//!   configuration, writes pages into guest memory, hands the state over;
//! - [`postcopy`]: the destination's side of post-copy (userfaultfd): the
//!   VM runs while its missing pages arrive, faulted-on pages first.
//!
//! The engine knows no KVM: the VMM gives it guest memory and a
//! [`source::Source`] (dirty pages, pause/resume, the machine state) and
//! builds the VM on the destination from the state it receives, through the
//! same path as a snapshot restore.
pub mod dest;
pub mod postcopy;
pub mod protocol;
pub mod source;

pub use protocol::Hello;

pub type GuestMemory = snapshot::memory::GuestMemory;

/// An error of the VMM behind [`source::Source`] or a destination's
/// callbacks: its own type, kept whole.
pub type VmError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the peer aborted: {0}")]
    Aborted(String),
    /// Verification mode: the destination's copy of guest memory is not
    /// the source's at the pause.
    #[error("{0}")]
    Verify(String),
    #[error("cancelled")]
    Cancelled,
    #[error(
        "no convergence after {rounds} rounds: the guest dirties {dirty_mib_s:.0} MiB/s, the \
         link carries {link_mib_s:.0} MiB/s (even with the vCPUs throttled {throttle_pct}%)"
    )]
    NoConvergence {
        rounds: u32,
        dirty_mib_s: f64,
        link_mib_s: f64,
        throttle_pct: u32,
    },
    /// The VMM failed to do what the migration needs (pause, resume,
    /// track dirty pages, save or load the state, place a page).
    #[error("{0}")]
    Vm(VmError),
    #[error(
        "switch-over not confirmed ({0}): the destination may be running the VM, so the source \
         stays paused; resume it through the API only if the destination is not running it"
    )]
    Unconfirmed(String),
    #[error(
        "post-copy failed after the switch-over ({why}) with {left} pages not yet sent: the \
         destination cannot run the VM without them and stops it; this source keeps the VM as \
         of the switch-over, paused - resuming it through the API rolls the VM back to that \
         point"
    )]
    Postcopy { left: u64, why: String },
}

impl Error {
    /// [`Error::Vm`] with a message of its own.
    pub fn vm(msg: impl Into<String>) -> Error {
        Error::Vm(msg.into().into())
    }
}
