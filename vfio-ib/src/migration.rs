//! VFIO migration v2: moving a device's internal state with the VM.
//!
//! A kernel VFIO driver that supports it (mlx5_vfio_pci for ConnectX-7
//! Ethernet VFs, hisi_acc, pds, virtio VFs, the `mtty` sample) offers
//! `VFIO_DEVICE_FEATURE_MIGRATION` and a state machine the VMM drives with
//! `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`:
//!
//! ```text
//! source:       RUNNING ─▶ PRE_COPY ─(vCPUs stop)─▶ STOP_COPY ─▶ (done) or back to RUNNING
//!                          │ read the initial data     │ read the rest to EOF
//! destination:  RUNNING ─▶ STOP ─▶ RESUMING ─(write all of it)─▶ STOP ─▶ RUNNING
//! ```
//!
//! The device's data is one byte stream, opaque to the VMM: what is read
//! in PRE_COPY and then in STOP_COPY, concatenated, is what RESUMING takes.
//! With several devices the P2P states (RUNNING_P2P, PRE_COPY_P2P) stop
//! every device's peer-to-peer DMA before any device stops for good.
//! A failed transition leaves the device in ERROR: only a reset brings it
//! back ([`Migratable::recover`]).
//!
//! The kernel walks multi-step arcs itself (RUNNING to STOP_COPY passes
//! through STOP), so one request per target state is enough.
use std::io;
use vfio_bindings::bindings::vfio as uapi;
use vfio_ioctls::{DmaLoggingRange, VfioDevice, VfioError};

/// Reads of a device's migration data go in chunks of this size.
const CHUNK: usize = 1 << 20;
/// A device's state larger than this is refused (a broken driver, or
/// stream, must not make the VMM allocate without bound).
pub const MAX_DEVICE_STATE: usize = 1 << 30;

/// A device's migration state (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Error,
    Stop,
    Running,
    StopCopy,
    Resuming,
    RunningP2p,
    PreCopy,
    PreCopyP2p,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Error,
        State::Stop,
        State::Running,
        State::StopCopy,
        State::Resuming,
        State::RunningP2p,
        State::PreCopy,
        State::PreCopyP2p,
    ];

    pub fn raw(self) -> u32 {
        match self {
            State::Error => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
            State::Stop => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
            State::Running => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
            State::StopCopy => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            State::Resuming => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
            State::RunningP2p => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
            State::PreCopy => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
            State::PreCopyP2p => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
        }
    }

    pub fn from_raw(raw: u32) -> Option<State> {
        State::ALL.into_iter().find(|s| s.raw() == raw)
    }
}

/// What a device's driver supports (`VFIO_DEVICE_FEATURE_MIGRATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Support {
    /// STOP_COPY and RESUMING: the device's state can be saved and loaded.
    pub stop_copy: bool,
    /// RUNNING_P2P: its peer-to-peer DMA can be stopped on its own.
    pub p2p: bool,
    /// PRE_COPY: part of its state can be sent while it runs.
    pub pre_copy: bool,
}

impl Support {
    fn from_flags(flags: u64) -> Support {
        let has = |bit: u32| flags & u64::from(bit) != 0;
        Support {
            stop_copy: has(uapi::VFIO_MIGRATION_STOP_COPY),
            p2p: has(uapi::VFIO_MIGRATION_P2P),
            pre_copy: has(uapi::VFIO_MIGRATION_PRE_COPY),
        }
    }
}

impl std::fmt::Display for Support {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut v = vec![];
        for (on, name) in [
            (self.stop_copy, "STOP_COPY"),
            (self.p2p, "P2P"),
            (self.pre_copy, "PRE_COPY"),
        ] {
            if on {
                v.push(name);
            }
        }
        if v.is_empty() {
            v.push("none");
        }
        f.write_str(&v.join(" | "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{name}: does not support migration (its driver offers no VFIO_DEVICE_FEATURE_MIGRATION with STOP_COPY)")]
    Unsupported { name: String },
    #[error("{name}: cannot go from {from:?} to {to:?}: {source}")]
    Transition {
        name: String,
        from: State,
        to: State,
        source: VfioError,
    },
    #[error("{name}: {what}: {source}")]
    Vfio {
        name: String,
        what: &'static str,
        source: VfioError,
    },
    #[error("{name}: its migration data is larger than {MAX_DEVICE_STATE} bytes")]
    TooLarge { name: String },
    #[error("{name}: the device refused the saved state ({source}); it was reset")]
    Refused { name: String, source: VfioError },
}

/// The migration side of a kernel VFIO device.
pub struct Migratable<'a> {
    device: &'a VfioDevice,
    name: String,
    support: Support,
}

/// Asks the driver what it supports; None when it does not migrate (no
/// STOP_COPY: the kernel or the driver has no migration v2).
pub fn support(device: &VfioDevice) -> Option<Support> {
    match device.query_migration_support() {
        Ok(Some(flags)) => Some(Support::from_flags(flags)).filter(|s| s.stop_copy),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!("migration support query failed: {e}");
            None
        }
    }
}

impl<'a> Migratable<'a> {
    /// The migration interface of `device` (`name` for messages), or why
    /// there is none.
    pub fn new(device: &'a VfioDevice, name: &str) -> Result<Migratable<'a>, Error> {
        let support = support(device).ok_or_else(|| Error::Unsupported { name: name.into() })?;
        Ok(Migratable {
            device,
            name: name.into(),
            support,
        })
    }

    pub fn support(&self) -> Support {
        self.support
    }

    fn vfio(&self, what: &'static str) -> impl FnOnce(VfioError) -> Error + '_ {
        move |source| Error::Vfio {
            name: self.name.clone(),
            what,
            source,
        }
    }

    pub fn state(&self) -> Result<State, Error> {
        let raw = self
            .device
            .get_migration_state()
            .map_err(self.vfio("read the migration state"))?;
        Ok(State::from_raw(raw).unwrap_or(State::Error))
    }

    /// Moves the device to `to` (the kernel walks the arc).
    pub fn set_state(&self, to: State) -> Result<(), Error> {
        let from = self.state().unwrap_or(State::Error);
        if from == to {
            return Ok(());
        }
        self.device
            .set_migration_state(to.raw())
            .map_err(|source| Error::Transition {
                name: self.name.clone(),
                from,
                to,
                source,
            })?;
        tracing::debug!("{}: migration state {from:?} -> {to:?}", self.name);
        Ok(())
    }

    /// Starts a save: PRE_COPY where the device has it (the device keeps
    /// running; its initial data can be read), else nothing yet.
    pub fn begin(&self) -> Result<(), Error> {
        if self.support.pre_copy {
            self.set_state(State::PreCopy)?;
        }
        Ok(())
    }

    /// Bytes the device still has to send in PRE_COPY (initial plus dirty,
    /// the driver's estimate); 0 outside PRE_COPY.
    pub fn precopy_pending(&self) -> Result<u64, Error> {
        if !matches!(self.state()?, State::PreCopy | State::PreCopyP2p) {
            return Ok(0);
        }
        let info = self
            .device
            .mig_get_precopy_info()
            .map_err(self.vfio("VFIO_MIG_GET_PRECOPY_INFO"))?;
        Ok(info.initial_bytes.saturating_add(info.dirty_bytes))
    }

    /// The PRE_COPY data the device has now (empty outside PRE_COPY or
    /// when it has nothing yet): reads until the driver has no more for
    /// the moment (a read of 0 bytes, or ENOMSG).
    pub fn read_precopy(&self) -> Result<Vec<u8>, Error> {
        if !matches!(self.state()?, State::PreCopy | State::PreCopyP2p) {
            return Ok(Vec::new());
        }
        self.read_stream(true)
    }

    /// Stops the device's peer-to-peer DMA (RUNNING_P2P, or PRE_COPY_P2P
    /// during pre-copy) where it can: with several devices, every one does
    /// this before any stops for good, so none is still the target of
    /// another's DMA when it stops. A device without P2P is left alone.
    pub fn quiesce_p2p(&self) -> Result<(), Error> {
        if !self.support.p2p {
            return Ok(());
        }
        match self.state()? {
            State::PreCopy => self.set_state(State::PreCopyP2p),
            State::Running => self.set_state(State::RunningP2p),
            _ => Ok(()),
        }
    }

    /// Stops the device for good and reads the rest of its state
    /// (STOP_COPY, to the end of the stream). The vCPUs must be stopped.
    pub fn stop_and_copy(&self) -> Result<Vec<u8>, Error> {
        self.quiesce_p2p()?;
        self.set_state(State::StopCopy)?;
        self.read_stream(false)
    }

    fn read_stream(&self, precopy: bool) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match self.device.read_migration_data(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > MAX_DEVICE_STATE {
                        return Err(Error::TooLarge {
                            name: self.name.clone(),
                        });
                    }
                }
                // In PRE_COPY, "nothing more for now".
                Err(VfioError::VfioMigrationDataIo(e))
                    if precopy && e.raw_os_error() == Some(libc::ENOMSG) =>
                {
                    break
                }
                Err(VfioError::VfioMigrationDataIo(e))
                    if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.vfio("read its migration data")(e)),
            }
        }
        Ok(out)
    }

    /// The save did not complete (the migration failed or was cancelled;
    /// or a snapshot was taken): the device runs on with its state.
    pub fn resume(&self) -> Result<(), Error> {
        self.set_state(State::Running)
    }

    /// Writes the first part of a saved state (PRE_COPY data sent during
    /// the rounds): the device enters RESUMING, which [`Self::load`] then
    /// finishes. A device that refuses it is reset.
    pub fn load_part(&self, data: &[u8]) -> Result<(), Error> {
        self.set_state(State::Resuming)?;
        self.device.write_migration_data(data).map_err(|source| {
            self.recover();
            Error::Refused {
                name: self.name.clone(),
                source,
            }
        })
    }

    /// Loads a saved state (the PRE_COPY and STOP_COPY data, one after
    /// the other; or the rest of it after [`Self::load_part`]) and leaves
    /// the device in STOP, ready to run. A device that refuses it is reset
    /// and left running with its own state.
    pub fn load(&self, data: &[u8]) -> Result<(), Error> {
        self.load_part(data)?;
        // The driver checks and applies the state on leaving RESUMING.
        if let Err(e) = self.set_state(State::Stop) {
            self.recover();
            return Err(match e {
                Error::Transition { source, .. } => Error::Refused {
                    name: self.name.clone(),
                    source,
                },
                other => other,
            });
        }
        Ok(())
    }

    /// After a failed transition (ERROR) or a refused load: a reset puts
    /// the device back in RUNNING with its reset state.
    pub fn recover(&self) {
        if !matches!(self.state(), Ok(State::Running)) {
            reset(self.device);
            if self.set_state(State::Running).is_err() {
                tracing::warn!(
                    "{}: still not RUNNING after a reset (state {:?})",
                    self.name,
                    self.state()
                );
            }
        }
    }

    /// Starts the device's own DMA dirty logging over `ranges` (guest
    /// RAM, IOVA = guest-physical) with `page` bytes per bit. Ok(None):
    /// the device has no DMA logging, so every page mapped for its DMA must
    /// count as dirty at the switch-over.
    pub fn start_dirty_logging(
        &self,
        page: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Option<u64>, Error> {
        let ranges: Vec<DmaLoggingRange> = ranges
            .iter()
            .map(|&(iova, length)| DmaLoggingRange { iova, length })
            .collect();
        match self.device.start_dma_logging(page, &ranges) {
            Ok(granule) => Ok(Some(granule)),
            Err(VfioError::VfioDeviceFeature(e))
                if matches!(e.errno(), libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.vfio("start DMA dirty logging")(e)),
        }
    }

    /// Pages (bitmap words, one bit per `page`) the device wrote by DMA
    /// in `range` since the last report.
    pub fn dirty_pages(&self, range: (u64, u64), page: u64) -> Result<Vec<u64>, Error> {
        self.device
            .report_dma_logging(
                DmaLoggingRange {
                    iova: range.0,
                    length: range.1,
                },
                page,
            )
            .map_err(self.vfio("read the DMA dirty log"))
    }

    pub fn stop_dirty_logging(&self) -> Result<(), Error> {
        self.device
            .stop_dma_logging()
            .map_err(self.vfio("stop DMA dirty logging"))
    }
}

/// VFIO_DEVICE_RESET, whether or not the device's flags announce a reset:
/// a driver with migration must take one to leave ERROR or RESUMING (the
/// uapi's only way back), and mtty, for one, takes it without saying so.
pub(crate) fn reset(device: &VfioDevice) {
    use std::os::fd::AsRawFd;
    vmm_sys_util::ioctl_io_nr!(
        VFIO_DEVICE_RESET,
        uapi::VFIO_TYPE as u32,
        uapi::VFIO_BASE + 11
    );
    // SAFETY: an argument-less ioctl on the device's own descriptor; the
    // kernel checks it and touches no memory of ours.
    let r = unsafe { vmm_sys_util::ioctl::ioctl(&FdRef(device.as_raw_fd()), VFIO_DEVICE_RESET()) };
    if r < 0 {
        tracing::warn!("VFIO_DEVICE_RESET: {}", io::Error::last_os_error());
    }
}

/// A borrowed descriptor for vmm-sys-util's ioctl helpers.
struct FdRef(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for FdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_uapi_numbers() {
        for s in State::ALL {
            assert_eq!(State::from_raw(s.raw()), Some(s));
        }
        assert_eq!(State::from_raw(8), None);
    }

    #[test]
    fn support_flags_are_read_bit_by_bit() {
        // What mtty reports: STOP_COPY | P2P | PRE_COPY.
        let s = Support::from_flags(7);
        assert!(s.stop_copy && s.p2p && s.pre_copy);
        assert_eq!(s.to_string(), "STOP_COPY | P2P | PRE_COPY");
        let s = Support::from_flags(1);
        assert!(s.stop_copy && !s.p2p && !s.pre_copy);
        assert_eq!(Support::from_flags(0).to_string(), "none");
    }
}
