//! `GET /vm/migration`: the state of the current (or last) migration, as
//! the migration engine (the `migrate` crate) reports it.
use serde::{Deserialize, Serialize};

/// Where a running migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Connecting,
    Precopy,
    StopAndCopy,
    SwitchOver,
    /// The VM runs on the destination; its missing pages follow.
    Postcopy,
}

/// A progress report, after every round and every few batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub memory_bytes: u64,
    pub round: u32,
    pub sent_bytes: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pages left to send in this round.
    pub remaining_pages: u64,
    pub dirty_pages: u64,
    pub dirty_mib_s: f64,
    pub link_mib_s: f64,
    pub predicted_downtime_ms: f64,
    pub throttle_pct: u32,
}

/// A finished migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub to: String,
    pub rounds: u32,
    /// From the guest's pause here to the destination's RUNNING.
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub sent_bytes: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub memory_bytes: u64,
    pub throttle_pct: u32,
    /// Set when the migration finished in post-copy.
    pub postcopy: Option<PostcopyOutcome>,
    /// Verification mode: the pages the destination compared (every page)
    /// and the time the digests took in the downtime.
    pub verified_pages: Option<u64>,
    pub verify_ms: Option<f64>,
    /// The downtime target asked for (`max_downtime_ms`).
    #[serde(default)]
    pub max_downtime_ms: u64,
    /// Where the downtime went (stop-and-copy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_over: Option<SwitchOver>,
}

impl Outcome {
    /// The measured downtime was over the target: why, in one sentence.
    pub fn missed_target(&self) -> Option<String> {
        let target = self.max_downtime_ms as f64;
        if self.max_downtime_ms == 0 || self.downtime_ms <= target || self.postcopy.is_some() {
            return None;
        }
        let parts = match &self.switch_over {
            Some(s) => format!(
                " (pausing the vCPUs {:.1} ms, the last pages {:.1} ms, capturing and sending \
                 the state {:.1} ms, the destination loading it {:.1} ms, until it ran {:.1} ms)",
                s.pause_ms, s.last_pages_ms, s.state_ms, s.destination_ms, s.resume_ms
            ),
            None => String::new(),
        };
        Some(format!(
            "the downtime was {:.1} ms, over the {} ms target{parts}; the switch-over's fixed \
             cost sets a floor a lower target cannot go under",
            self.downtime_ms, self.max_downtime_ms
        ))
    }
}

/// The parts of a stop-and-copy downtime, in order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SwitchOver {
    /// Until every vCPU had stopped.
    pub pause_ms: f64,
    /// The pages dirtied since the last round (and the digests with verify).
    pub last_pages_ms: f64,
    /// Capturing vCPU and device state and sending it.
    pub state_ms: f64,
    /// Until the destination had loaded it (READY).
    pub destination_ms: f64,
    /// From GO until the destination's vCPUs ran (RUNNING).
    pub resume_ms: f64,
}

/// The post-copy part of a migration, as the source saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostcopyOutcome {
    /// Pages missing on the destination at the switch-over.
    pub missing_pages: u64,
    /// Pages the destination faulted on and asked for.
    pub requested_pages: u64,
    /// From RUNNING to DONE.
    pub postcopy_ms: f64,
}

/// `GET /vm/migration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration was started.
    #[default]
    None,
    Running {
        to: String,
        /// Null until the first report.
        progress: Option<Progress>,
    },
    Completed(Outcome),
    Failed {
        to: String,
        error: String,
        /// Whether the VM runs on here (false only when the switch-over
        /// could not be confirmed, or post-copy failed after it: the VM
        /// stays paused).
        vm_running_here: bool,
    },
}
