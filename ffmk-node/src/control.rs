//! The daemons' control protocol: one JSON request per connection, one
//! JSON line back, inside a cluster-plane channel ("control", opened with
//! the cluster key: `cluster_auth`). Peers use it to hand a VM over
//! (`prepare`, `abort`); operators use it for `ffmk-node status`; jobs for
//! checkpoint grants. What a request changes belongs to whoever made it:
//! `abort` needs the token `prepare` gave, `ckpt-release` the one its
//! grant came with.
use cluster_auth::{PlaneStream, Trust};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use vmm_api::model::{DiskConfig, NetConfig};

/// The cluster-plane channel of the control port.
pub const CHANNEL: &str = "control";

/// Requests are small; anything longer is refused.
pub const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The board, the local VMs, migrations and back-offs.
    Status {},
    /// Start a VMM waiting for VM `name` (sent by host `from`).
    Prepare {
        name: String,
        memory_mib: u64,
        cpus: String,
        cpu_profile: Option<String>,
        from: usize,
        /// The VM's runnable vCPU demand and the sender's per-core load
        /// after the move: the receiver refuses if it would end busier.
        vm_load: f64,
        sender_after: f64,
        /// Hot-plug slots the VM has (the receiving VMM builds as many).
        #[serde(default)]
        hotplug_slots: u8,
        /// Passthrough functions it had here: the receiver plugs as many
        /// from its pool once the VM arrived, or refuses.
        #[serde(default)]
        functions: usize,
        /// Its read-only disks: the receiver opens the same files, which
        /// must be under its `shared_disk_dirs`, or refuses.
        #[serde(default)]
        disks: Vec<DiskConfig>,
        /// Its network devices: the receiver puts a new TAP on its bridge
        /// of the same name (in its `vm_bridges`) with the same MAC, or
        /// refuses.
        #[serde(default)]
        nets: Vec<NetConfig>,
    },
    /// The migration of `name` will not come: stop waiting for it
    /// (`token`: what `prepare` answered).
    Abort { name: String, token: String },
    /// Job `job` wants to write a checkpoint of `bytes` to the shared
    /// burst buffer (asked of the checkpoint coordinator; asked again
    /// until granted).
    CkptAcquire { job: String, bytes: u64 },
    /// Job `job` has written its checkpoint (`token`: its grant's).
    CkptRelease { job: String, token: String },
    /// A job checkpoint, step 1 (the job runs): a live snapshot of each of
    /// this host's VMs of `job` into its epoch `epoch` (`crate::job`).
    JobPrecopy { job: String, epoch: String },
    /// Step 2 (every VM of the job paused): the last layer of each.
    JobCapture { job: String, epoch: String },
    /// Step 3 (every host captured): the epoch becomes a valid copy
    /// (`manifest`: the job's, written beside the VMs' snapshots).
    JobCommit {
        job: String,
        epoch: String,
        manifest: serde_json::Value,
    },
    /// The job checkpoint failed: remove this host's part of the epoch.
    JobDiscard { job: String, epoch: String },
    /// The complete checkpoints of `job` this host can read.
    JobList { job: String },
    /// This host's VMs of `job` now (name, state, memory).
    JobMembers { job: String },
    /// A job restore, step 1: can VM `vm` of the epoch start here?
    JobCheck {
        job: String,
        epoch: String,
        vm: String,
    },
    /// Step 2: start it, paused (the job resumes as a whole).
    JobStart {
        job: String,
        epoch: String,
        vm: String,
    },
    /// Where VM `name` is, as this host knows it: running (or paused) here,
    /// moved away by this daemon (to which host), ended here (its VMM's
    /// exit status), or unknown. A Slurm task following its VM asks.
    VmWatch { name: String },
    /// Send `signal` (TERM, INT, HUP, QUIT, USR1, USR2, CONT) to the VMM of
    /// VM `name` here: a Slurm task forwards scancel and time limits.
    VmSignal { name: String, signal: String },
    /// The restore failed elsewhere: stop the paused VM `job-start` started.
    JobStop {
        job: String,
        epoch: String,
        vm: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `prepare`: where the waiting VMM listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `prepare`: what an `abort` of this reservation must show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `status`: the daemon's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `ckpt-acquire` / `ckpt-release`: the coordinator's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ckpt: Option<serde_json::Value>,
    /// `job-*`: what was done (per VM figures, copies found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<serde_json::Value>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            to: None,
            token: None,
            status: None,
            ckpt: None,
            job: None,
        }
    }
    pub fn refuse(why: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(why.into()),
            ..Reply::ok()
        }
    }
}

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read the request: {0}")]
    Read(std::io::Error),
    #[error("request too long or not ended by a newline")]
    TooLong,
    #[error("bad request: {0}")]
    BadRequest(serde_json::Error),
    #[error("cannot reach the daemon at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The handshake failed (the error names the peer).
    #[error("the daemon at {0}")]
    Plane(cluster_auth::Error),
    #[error("{what} {addr}: {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad reply from {addr}: {source}")]
    BadReply {
        addr: SocketAddr,
        source: serde_json::Error,
    },
}

/// Reads one request line (bounded) from a connection.
pub fn read_request(s: &mut impl Read) -> Result<Request, ControlError> {
    let mut line = String::new();
    BufReader::new(s.take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(ControlError::Read)?;
    if !line.ends_with('\n') {
        return Err(ControlError::TooLong);
    }
    serde_json::from_str(&line).map_err(ControlError::BadRequest)
}

pub fn write_reply(s: &mut impl Write, r: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).map_err(std::io::Error::other)?;
    text.push('\n');
    s.write_all(text.as_bytes())?;
    s.flush()
}

/// Sends `req` to the daemon at `addr` (authenticated with `trust`) and
/// returns its reply.
pub fn call(
    addr: SocketAddr,
    trust: &Trust,
    req: &Request,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let io = |what: &'static str| move |source| ControlError::Io { what, addr, source };
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| ControlError::Unreachable { addr, source })?;
    let mut s: PlaneStream = cluster_auth::connect(
        s,
        trust,
        CHANNEL,
        None,
        timeout.min(Duration::from_secs(10)),
    )
    .map_err(ControlError::Plane)?;
    s.tcp()
        .set_read_timeout(Some(timeout))
        .map_err(io("cannot set a timeout for"))?;
    s.tcp()
        .set_write_timeout(Some(timeout))
        .map_err(io("cannot set a timeout for"))?;
    let mut text =
        serde_json::to_string(req).map_err(|source| ControlError::BadReply { addr, source })?;
    text.push('\n');
    s.write_all(text.as_bytes())
        .and_then(|()| s.flush())
        .map_err(io("cannot send to"))?;
    let mut line = String::new();
    BufReader::new((&mut s).take(16 << 20))
        .read_line(&mut line)
        .map_err(io("no reply from"))?;
    serde_json::from_str(&line).map_err(|source| ControlError::BadReply { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_refused() {
        let r = Request::Prepare {
            name: "vm1".into(),
            memory_mib: 256,
            cpus: "1".into(),
            cpu_profile: Some("pvm".into()),
            from: 0,
            vm_load: 1.0,
            sender_after: 0.5,
            hotplug_slots: 1,
            functions: 1,
            disks: vec![DiskConfig {
                path: "/srv/images/hpc.ext4".into(),
                readonly: true,
                direct: false,
                serial: None,
                queues: 1,
                bandwidth: None,
                iops: None,
            }],
            nets: vec![NetConfig {
                tap: "t0".into(),
                mac: [0x52, 0x54, 0, 0, 0, 1],
                announce: None,
                bridge: Some("br0".into()),
            }],
        };
        // A peer from before hot-plug slots: none, no functions.
        let old = r#"{"op":"prepare","name":"a","memory_mib":1,"cpus":"1","cpu_profile":null,"from":0,"vm_load":0,"sender_after":0}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(old),
            Ok(Request::Prepare {
                hotplug_slots: 0,
                functions: 0,
                ref disks,
                ref nets,
                ..
            }) if disks.is_empty() && nets.is_empty()
        ));
        let text = serde_json::to_string(&r).expect("encodes");
        assert!(text.contains("\"op\":\"prepare\""));
        assert_eq!(serde_json::from_str::<Request>(&text).expect("decodes"), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).is_err());
    }
}
