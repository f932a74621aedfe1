//! The checkpoint endpoint (`ffmk-vmm checkpoint serve`): one per host,
//! holding partner copies (`DIR/partner/JOB/NAME`, a directory level) and
//! XOR parts (`DIR/xor/GROUP/EPOCH`) for other hosts, and handing them back
//! for a restore or a rebuild.
//!
//! A connection is served only after the cluster-plane handshake, and only
//! for the owner whose key opened it: a job's partner copies (an XOR
//! group's parts) are written, pruned, listed and fetched with that job's
//! (group's) key alone. Limits: a cap on connections, a
//! deadline for each whole request, a disk quota per job and on the number
//! of jobs, and no copy dated in the future.
use crate::archive::{unpack, Plan};
use crate::dirlevel::{DirLevel, Listed};
use crate::files::manifest_files;
use crate::wire::{Conn, Envelope, Request, Response, CHANNEL, PROTOCOL, PROTOCOL_VERSION};
use crate::xor::{Holder, XorPart};
use crate::{check_name, Error, Result};
use cluster_auth::Trust;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Server {
    dir: PathBuf,
    keep: usize,
    limits: Limits,
    /// Parity updates are read-modify-write: one at a time.
    xor_lock: Mutex<()>,
}

/// What one endpoint allows.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are closed at once.
    pub connections: usize,
    /// A whole request (handshake to last byte) must end within this.
    pub request: Duration,
    /// Bytes stored per job (partner copies and XOR parts together).
    pub job_bytes: u64,
    /// Jobs with something stored here.
    pub jobs: usize,
    /// How far in the future a copy may be dated (clocks differ a little).
    pub clock_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            request: Duration::from_secs(900),
            job_bytes: 256 << 30,
            jobs: 1024,
            clock_skew: Duration::from_secs(300),
        }
    }
}

/// Binds `listen` (so the caller can report the address, e.g. for port 0).
pub fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).map_err(|e| Error::Peer {
        peer: listen.to_string(),
        detail: format!("cannot listen: {e}"),
    })
}

/// Serves connections until the process ends, each on its own thread
/// (at most `limits.connections` at once).
pub fn serve(
    listener: TcpListener,
    dir: PathBuf,
    keep: usize,
    trust: Trust,
    limits: Limits,
) -> Result<()> {
    std::fs::create_dir_all(&dir).map_err(crate::io("create", &dir))?;
    let server = Arc::new(Server {
        dir,
        keep,
        limits,
        xor_lock: Mutex::new(()),
    });
    let trust = Arc::new(trust);
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if busy.load(Ordering::Acquire) >= server.limits.connections {
            log(&format!(
                "{peer}: refused, {} connections already served",
                server.limits.connections
            ));
            continue;
        }
        busy.fetch_add(1, Ordering::AcqRel);
        let (server, trust, mine) = (server.clone(), trust.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("checkpoint-conn".into())
            .spawn(move || {
                server.connection(stream, &trust, &peer);
                mine.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
    Ok(())
}

fn log(line: &str) {
    // Not eprintln!: a closed stderr must not end the endpoint.
    let _ = writeln!(std::io::stderr(), "ffmk-vmm checkpoint serve: {line}");
}

impl Server {
    /// One connection: handshake, one request, within the deadline.
    fn connection(&self, stream: std::net::TcpStream, trust: &Trust, peer: &str) {
        let deadline = cluster_auth::Deadline::arm(&stream, self.limits.request);
        let (stream, opened) = match cluster_auth::accept(
            stream,
            trust,
            &[CHANNEL],
            Duration::from_secs(10).min(self.limits.request),
        ) {
            Ok(s) => s,
            Err(e) => return log(&format!("refused a connection: {e}")),
        };
        let Ok(mut c) = Conn::new(stream, peer.to_string()) else {
            return;
        };
        if let Err(e) = self.handle(&mut c, opened.job.as_deref()) {
            let e = if deadline.expired() {
                Error::Refused(format!(
                    "{peer}: the request did not end within {} s ({e})",
                    self.limits.request.as_secs()
                ))
            } else {
                e
            };
            log(&e.to_string());
            let _ = c.send(&Response::Error {
                reason: e.to_string(),
            });
            c.close_after_refusal();
        }
    }

    fn partner(&self, job: &str) -> Result<DirLevel> {
        check_name("job", job)?;
        Ok(DirLevel::new(&self.dir.join("partner"), job))
    }

    fn holder(&self, group: &str) -> Result<Holder> {
        check_name("group", group)?;
        Ok(Holder::new(&self.dir, group))
    }

    /// Bytes stored for an owner (job or XOR group) here.
    fn job_bytes(&self, owner: &str) -> u64 {
        du(&self.dir.join("partner").join(owner)) + du(&self.dir.join("xor").join(owner))
    }

    /// Owners (jobs and XOR groups) with something stored here.
    fn jobs(&self) -> std::collections::BTreeSet<String> {
        let mut jobs = std::collections::BTreeSet::new();
        for d in ["partner", "xor"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.join(d)) {
                jobs.extend(
                    rd.flatten()
                        .filter_map(|e| e.file_name().into_string().ok()),
                );
            }
        }
        jobs
    }

    /// Refuses what would take `job` past its quota, or add a job past
    /// the cap.
    fn check_room(&self, job: &str, adding: u64) -> Result<()> {
        let jobs = self.jobs();
        if !jobs.contains(job) && jobs.len() >= self.limits.jobs {
            return Err(Error::Refused(format!(
                "this endpoint already holds {} jobs (its limit)",
                jobs.len()
            )));
        }
        let have = self.job_bytes(job);
        if have.saturating_add(adding) > self.limits.job_bytes {
            return Err(Error::Refused(format!(
                "job {job} would hold {:.1} GiB here, over its quota of {:.1} GiB",
                have.saturating_add(adding) as f64 / f64::from(1 << 30),
                self.limits.job_bytes as f64 / f64::from(1 << 30)
            )));
        }
        Ok(())
    }

    fn handle(&self, c: &mut Conn, keyed_job: Option<&str>) -> Result<()> {
        let env: Envelope = c.recv()?;
        if env.protocol != PROTOCOL || env.version != PROTOCOL_VERSION {
            return Err(Error::Refused(format!(
                "protocol {} v{} is not spoken here ({PROTOCOL} v{PROTOCOL_VERSION})",
                env.protocol, env.version
            )));
        }
        // With a key, the connection belongs to one job.
        if let Some(keyed) = keyed_job {
            if env.request.owner() != keyed {
                return Err(Error::Refused(format!(
                    "a request about {:?} on a connection opened with {keyed:?}'s key",
                    env.request.owner()
                )));
            }
        }
        match env.request {
            Request::Offer {
                job,
                name,
                manifest,
            } => {
                let level = self.partner(&job)?;
                check_name("copy", &name)?;
                manifest
                    .check_names()
                    .map_err(|e| Error::Refused(e.to_string()))?;
                self.check_date(
                    crate::dirlevel::CopyInfo::of(&name, &manifest)
                        .taken_unix_ms
                        .max(manifest.created_unix_ms),
                )?;
                let needed = level.needed(&name, &manifest);
                let adding: u64 = manifest_files(&manifest)
                    .into_iter()
                    .filter(|f| needed.contains(&f.name))
                    .map(|f| f.bytes)
                    .fold(0, u64::saturating_add);
                self.check_room(&job, adding)?;
                c.send(&Response::Need {
                    files: needed.clone(),
                })?;
                let mut bytes = 0u64;
                let files = level.install(&name, &manifest, &mut |stage, want| {
                    let mut input = c.data_in();
                    let got = unpack(&mut input, stage, &mut |n| bytes = n)?;
                    input.expect_end()?;
                    if got.as_slice() != want {
                        return Err(Error::Archive(format!(
                            "sent files {got:?}, asked for {want:?}"
                        )));
                    }
                    Ok(())
                })?;
                let _ = level.prune(self.keep, &name);
                c.send(&Response::Stored { files, bytes })
            }
            Request::List { job } => {
                let mut copies = Vec::new();
                let mut broken = Vec::new();
                for l in self.partner(&job)?.list()? {
                    match l {
                        Listed::Ok(info, _) => copies.push(info),
                        Listed::Broken { name, why } => broken.push((name, why)),
                    }
                }
                c.send(&Response::Copies { copies, broken })
            }
            Request::Fetch { job, name } => {
                check_name("copy", &name)?;
                let level = self.partner(&job)?;
                let s = snapshot::Snapshot::open(&level.root.join(&name))?;
                let names: Vec<String> = manifest_files(&s.manifest)
                    .into_iter()
                    .map(|f| f.name.clone())
                    .collect();
                let plan = Plan::new(&s.dir, &names)?;
                c.send(&Response::Sending {
                    bytes: plan.len(),
                    manifest: Some(Box::new(s.manifest.clone())),
                })?;
                let mut out = c.data_out();
                plan.write(&mut out, &mut |_| {})?;
                out.finish()
            }
            Request::XorPut {
                group,
                epoch,
                members,
                meta,
                part,
            } => {
                let holder = self.holder(&group)?;
                check_name("job", &meta.job)?;
                if !(2..=64).contains(&members) || meta.index >= members {
                    return Err(Error::Refused(format!(
                        "member {} of a group of {members}",
                        meta.index
                    )));
                }
                self.check_date(meta.copy.taken_unix_ms)?;
                self.check_room(&group, meta.archive_bytes)?;
                c.send(&Response::Ready)?;
                let _guard = self
                    .xor_lock
                    .lock()
                    .map_err(|_| Error::Refused("parity store poisoned".into()))?;
                let mut input = c.data_in();
                let bytes = match part {
                    XorPart::Data { index } if index == meta.index => {
                        holder.put_data(epoch, members, &meta, &mut input)?
                    }
                    XorPart::Data { index } => {
                        return Err(Error::Refused(format!(
                            "data of member {index} described as member {}'s",
                            meta.index
                        )))
                    }
                    XorPart::Parity {
                        holder: h,
                        chunk_crc32,
                    } => holder.put_chunk(epoch, members, h, chunk_crc32, &meta, &mut input)?,
                };
                input.expect_end()?;
                holder.prune(self.keep);
                c.send(&Response::Stored { files: 1, bytes })
            }
            Request::XorList { group } => {
                let epochs = self.holder(&group)?.list();
                c.send(&Response::Xor { epochs })
            }
            Request::XorFetch { group, epoch, part } => {
                let holder = self.holder(&group)?;
                let path = match part {
                    XorPart::Data { index } => holder.data_path(epoch, index),
                    XorPart::Parity { .. } => holder.parity_path(epoch),
                };
                let mut f = std::fs::File::open(&path).map_err(|_| {
                    Error::Refused(format!(
                        "no {part:?} of epoch {epoch} of group {group} here"
                    ))
                })?;
                let bytes = f.metadata().map_err(crate::io("stat", &path))?.len();
                c.send(&Response::Sending {
                    bytes,
                    manifest: None,
                })?;
                let mut out = c.data_out();
                std::io::copy(&mut f, &mut out).map_err(|e| c_fail(&path, e))?;
                out.finish()
            }
        }
    }
}

fn c_fail(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::Archive(format!("cannot send {}: {e}", path.display()))
}

impl Server {
    /// A copy dated in the future would always look newest: refused.
    fn check_date(&self, unix_ms: u64) -> Result<()> {
        let now = snapshot::manifest::now_unix_ms();
        let skew = self.limits.clock_skew.as_millis() as u64;
        if unix_ms > now.saturating_add(skew) {
            return Err(Error::Refused(format!(
                "a copy dated {} s in the future",
                (unix_ms - now) / 1000
            )));
        }
        Ok(())
    }
}

/// Bytes of the files below `dir` (0 if it does not exist).
fn du(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .fold(0, u64::saturating_add)
}
