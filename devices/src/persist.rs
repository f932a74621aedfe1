//! Saving a device's state and building the device again from it.
//!
//! Every device whose state outlives a snapshot or a migration implements
//! [`Persist`] (in the shape of Firecracker's trait of the same name):
//! a typed, serde-encoded [`Persist::State`], the host resources building
//! one needs besides its state ([`Persist::ConstructorArgs`]: an interrupt
//! eventfd, a console writer, the transport as wired on the bus) and a
//! typed [`StateError`]. The monitor keeps the states by device id, so a
//! device is found by name, never by position.
//!
//! States are versioned by their fields: a field added later carries
//! `#[serde(default)]` (and a default that means "as before"), so a state
//! written before it existed still restores; `tests` here and in the
//! monitor hold older encodings to that.

/// A device that can be saved and built again from what was saved.
pub trait Persist: Sized {
    /// What is saved.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What building the device needs besides its state.
    type ConstructorArgs;
    /// Why a state cannot be taken or does not fit.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The device's state; called with the device quiesced (vCPUs
    /// paused, device I/O frozen).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// The device, continuing from `state`. Everything is checked before
    /// anything changes: an error leaves no half-restored device.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Why a device state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state does not fit the device built here (another kind, other
    /// queues, features it does not offer, other slots).
    #[error("{0}")]
    Mismatch(String),
    /// The state holds values no device of this kind can have.
    #[error("{0}")]
    Invalid(String),
    /// A lock of the device was poisoned by a thread that panicked.
    #[error("{0}: lock poisoned")]
    Poisoned(&'static str),
}
