//! Key files: the cluster key (one per cluster, on every node, like munge's
//! key) and job keys (derived from it, given to one job's processes).
//!
//! A key file is text, so that it can be copied with the usual tools:
//!
//! ```text
//! ffmk-cluster-key v1
//! 64 hex digits
//! ```
//!
//! or, for a job key, `ffmk-job-key v1 JOB` on the first line. A key file
//! must belong to the user reading it and be readable by nobody else
//! (mode 0600 or 0400): a looser file is refused, as ssh refuses a loose
//! private key.
use crate::Error;
use ring::hkdf;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const KEY_LEN: usize = 32;
/// Where `ffmk-vmm` and `ffmk-node` look for the cluster key when neither
/// a flag nor `FFMK_CLUSTER_KEY` names one.
pub const DEFAULT_PATH: &str = "/etc/ffmk/cluster.key";
/// The environment variable naming the cluster key file.
pub const ENV: &str = "FFMK_CLUSTER_KEY";
const CLUSTER_HEADER: &str = "ffmk-cluster-key v1";
const JOB_HEADER: &str = "ffmk-job-key v1";
/// The longest job name a job key (and the checkpoint service) accepts.
pub const MAX_JOB_NAME: usize = 128;

/// 32 secret bytes, wiped when dropped.
#[derive(Clone)]
pub struct Secret([u8; KEY_LEN]);

impl Secret {
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key for one purpose, derived with HKDF-SHA256 (`label` says which
    /// purpose; different labels give independent keys).
    pub fn derive(&self, label: &[u8]) -> Secret {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ffmk-vmm cluster plane v1");
        let prk = salt.extract(&self.0);
        let info = [label];
        let mut out = [0u8; KEY_LEN];
        // expand fails only for an output longer than 255 hash lengths;
        // 32 bytes is one.
        if let Ok(okm) = prk.expand(&info, hkdf::HKDF_SHA256) {
            let _ = okm.fill(&mut out);
        }
        Secret(out)
    }

    /// A short public name for the key (not secret: a hash), to tell keys
    /// apart in logs and `key show`.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.derive(b"fingerprint").0);
        hex(&d.as_ref()[..8])
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned &mut u8; a volatile write keeps
            // the compiler from dropping the wipe of memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

/// What a process holds: the whole cluster's key, or the key of one job.
#[derive(Clone, Debug)]
pub enum Key {
    Cluster(Secret),
    Job { job: String, key: Secret },
}

impl Key {
    /// The key of `job`'s checkpoint copies. A job key answers only for its
    /// own job.
    pub fn job_key(&self, job: &str) -> Result<Secret, Error> {
        check_job_name(job)?;
        match self {
            Key::Cluster(k) => Ok(job_key(k, job)),
            Key::Job { job: mine, key } if mine == job => Ok(key.clone()),
            Key::Job { job: mine, .. } => Err(Error::Key(format!(
                "this key file is job {mine:?}'s key, not job {job:?}'s"
            ))),
        }
    }

    /// The cluster key, for the channels between nodes (migration, node
    /// control, gossip, broadcast). A job key does not open them.
    pub fn cluster(&self) -> Result<&Secret, Error> {
        match self {
            Key::Cluster(k) => Ok(k),
            Key::Job { job, .. } => Err(Error::Key(format!(
                "a job key (job {job:?}) opens only that job's checkpoint copies, not the \
                 cluster plane: give the cluster key"
            ))),
        }
    }

    /// Reads a key file, checking its owner, mode and format.
    pub fn load(path: &Path) -> Result<Key, Error> {
        let bad = |what: String| Error::Key(format!("{}: {what}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:04o} lets others read the key: chmod 600 it",
                meta.mode() & 0o7777
            )));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(bad(format!(
                "belongs to uid {}, not to this user (uid {me})",
                meta.uid()
            )));
        }
        if meta.len() > 4096 {
            return Err(bad("too long for a key file".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("").trim();
        let secret = lines
            .next()
            .and_then(|l| unhex(l.trim()))
            .ok_or_else(|| bad("no key: the second line must be 64 hex digits".into()))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("more than a key in the file".into()));
        }
        if header == CLUSTER_HEADER {
            return Ok(Key::Cluster(secret));
        }
        match header.strip_prefix(JOB_HEADER).map(str::trim) {
            Some(job) if !job.is_empty() => {
                check_job_name(job).map_err(|e| bad(e.to_string()))?;
                Ok(Key::Job {
                    job: job.to_string(),
                    key: secret,
                })
            }
            _ => Err(bad(format!(
                "not an ffmk key file (the first line must be {CLUSTER_HEADER:?} or \
                 \"{JOB_HEADER} JOB\")"
            ))),
        }
    }

    /// The key file named by `flag`, else by `FFMK_CLUSTER_KEY`, else
    /// [`DEFAULT_PATH`]; the error says all three places when none has one.
    pub fn find(flag: Option<&Path>) -> Result<(Key, PathBuf), Error> {
        let path = match (flag, std::env::var_os(ENV)) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(p)) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let p = PathBuf::from(DEFAULT_PATH);
                if !p.exists() {
                    return Err(Error::NoKey(format!(
                        "no cluster key: none given with --cluster-key, none in ${ENV}, and \
                         {DEFAULT_PATH} does not exist (create one with `ffmk-vmm key \
                         generate`, copy it to every node, or run with --insecure on a \
                         network nobody else can reach)"
                    )));
                }
                p
            }
        };
        let key = Key::load(&path)?;
        Ok((key, path))
    }
}

/// A job's key: derived from the cluster key and the job's name.
pub fn job_key(cluster: &Secret, job: &str) -> Secret {
    let mut label = b"job:".to_vec();
    label.extend_from_slice(job.as_bytes());
    cluster.derive(&label)
}

/// Job names are what checkpoint directories are named after: letters,
/// digits, `.`, `_`, `-`, not starting with a dot, at most 128 bytes.
pub fn check_job_name(job: &str) -> Result<(), Error> {
    let ok = !job.is_empty()
        && job.len() <= MAX_JOB_NAME
        && !job.starts_with('.')
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Key(format!(
            "job name {job:?} is not allowed (1-{MAX_JOB_NAME} letters, digits, '.', '_', '-', \
             not starting with '.')"
        )))
    }
}

/// A new random cluster key.
pub fn generate() -> Result<Secret, Error> {
    let mut k = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
        .map_err(|_| Error::Key("the system's random source failed".into()))?;
    Ok(Secret(k))
}

/// Writes a key file (mode 0600, never over an existing file).
pub fn write(path: &Path, key: &Key) -> Result<(), Error> {
    let (header, secret) = match key {
        Key::Cluster(s) => (CLUSTER_HEADER.to_string(), s),
        Key::Job { job, key } => (format!("{JOB_HEADER} {job}"), key),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Key(format!("{}: cannot create: {e}", path.display())))?;
    let text = format!("{header}\n{}\n", hex(secret.bytes()));
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            Error::Key(format!("{}: cannot write: {e}", path.display()))
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Secret> {
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Secret(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cluster-auth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_written_key_reads_back_and_loose_files_are_refused() {
        let d = scratch("keyfile");
        let p = d.join("cluster.key");
        let k = Key::Cluster(generate().unwrap());
        write(&p, &k).unwrap();
        let back = Key::load(&p).unwrap();
        assert_eq!(
            back.cluster().unwrap().bytes(),
            k.cluster().unwrap().bytes()
        );
        assert!(write(&p, &k).is_err(), "never overwrites");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let q = d.join("junk.key");
        std::fs::write(&q, "hello\n").unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::load(&q).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn job_keys_answer_for_their_own_job_only() {
        let c = generate().unwrap();
        let cluster = Key::Cluster(c.clone());
        let a = cluster.job_key("jobA").unwrap();
        assert_ne!(a.bytes(), cluster.job_key("jobB").unwrap().bytes());
        assert_ne!(a.bytes(), c.bytes());
        let job = Key::Job {
            job: "jobA".into(),
            key: a.clone(),
        };
        assert_eq!(job.job_key("jobA").unwrap().bytes(), a.bytes());
        assert!(job.job_key("jobB").is_err());
        assert!(job.cluster().is_err());
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(cluster.job_key(bad).is_err(), "{bad:?}");
        }
    }
}
