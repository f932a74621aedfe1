//! Trust on the cluster plane.
//!
//! Every channel between ffmk processes on different hosts (live
//! migration, the checkpoint service, the node control port, gossip and
//! the control broadcast) is opened with one cluster credential: a key
//! file that every node of the cluster holds, created and copied the way
//! munge's key is (see `docs/security.md`).
//!
//! - [`key`]: key files, the cluster key and the job keys derived from it;
//! - [`stream`]: TCP channels: a Noise `NNpsk0` handshake (mutual
//!   authentication by the pre-shared key, fresh ephemeral keys per
//!   connection), then AES-256-GCM records with implicit counters
//!   (integrity, confidentiality, no replay or reordering);
//! - [`datagram`]: UDP datagrams sealed with AES-256-GCM under a key per
//!   sender session, with a counter window and a timestamp against replay.
//!
//! The cryptography is `snow` (Noise) and `ring`; this crate only frames.
//! [`Trust::Insecure`] exists for networks nobody else can reach and for
//! measurements; it is never the default.
pub mod datagram;
pub mod deadline;
pub mod key;
pub mod stream;

pub use deadline::Deadline;
pub use key::{Key, Secret};
pub use stream::{accept, connect, PlaneStream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster key: {0}")]
    Key(String),
    /// No key file given and none where one is looked for.
    #[error("cluster key: {0}")]
    NoKey(String),
    /// The handshake failed: the peer does not hold the key (or is not a
    /// cluster-plane endpoint of this channel).
    #[error("{peer}: {detail}")]
    Refused { peer: String, detail: String },
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
}

/// A fresh random 128-bit token in hex (for reservations and grants that
/// only their holder may give back).
pub fn token() -> String {
    let mut b = [0u8; 16];
    // A failing system random source leaves zeros: still a token, just a
    // guessable one; SystemRandom does not fail on Linux with getrandom.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How a process talks on the cluster plane.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Authenticated and encrypted with this key.
    Key(Key),
    /// Plain TCP and UDP, no authentication: only where the operator asked
    /// for it (`--insecure`).
    Insecure,
}

impl Trust {
    /// The trust a command line asks for: `--insecure` wins (with a
    /// warning in the log), else the key file from `--cluster-key`,
    /// `$FFMK_CLUSTER_KEY` or the default path.
    pub fn from_args(
        cluster_key: Option<&std::path::Path>,
        insecure: bool,
    ) -> Result<Trust, Error> {
        if insecure {
            tracing::warn!(
                "--insecure: the cluster plane is unauthenticated and unencrypted; anyone who \
                 can reach this host's ports can send it VMs, read guest memory in transit and \
                 drive it"
            );
            return Ok(Trust::Insecure);
        }
        let (key, path) = Key::find(cluster_key)?;
        tracing::debug!(
            "cluster key {} from {}",
            match &key {
                Key::Cluster(k) => k.fingerprint(),
                Key::Job { job, key } => format!("{} (job {job})", key.fingerprint()),
            },
            path.display()
        );
        Ok(Trust::Key(key))
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Trust::Insecure)
    }
}
