//! The checkpoint endpoint (`ffmk-vmm checkpoint serve`): one per host,
//! holding partner copies (`DIR/partner/JOB/NAME`, a directory level) and
//! XOR parts (`DIR/xor/GROUP/EPOCH`) for other hosts, and handing them back
//! for a restore or a rebuild.
use crate::archive::{unpack, Plan};
use crate::dirlevel::{DirLevel, Listed};
use crate::files::manifest_files;
use crate::wire::{Conn, Envelope, Request, Response, PROTOCOL, PROTOCOL_VERSION};
use crate::xor::{Holder, XorPart};
use crate::{check_name, Error, Result};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct Server {
    dir: PathBuf,
    keep: usize,
    /// Parity updates are read-modify-write: one at a time.
    xor_lock: Mutex<()>,
}

/// Binds `listen` (so the caller can report the address, e.g. for port 0).
pub fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).map_err(|e| Error::Peer {
        peer: listen.to_string(),
        detail: format!("cannot listen: {e}"),
    })
}

/// Serves connections until the process ends, each on its own thread.
pub fn serve(listener: TcpListener, dir: PathBuf, keep: usize) -> Result<()> {
    std::fs::create_dir_all(&dir).map_err(crate::io("create", &dir))?;
    let server = Arc::new(Server {
        dir,
        keep,
        xor_lock: Mutex::new(()),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let server = server.clone();
        std::thread::spawn(move || {
            let Ok(mut c) = Conn::new(stream, peer.clone()) else {
                return;
            };
            if let Err(e) = server.handle(&mut c) {
                // Not eprintln!: a closed stderr must not end the endpoint.
                let _ = writeln!(std::io::stderr(), "ffmk-vmm checkpoint serve: {e}");
                let _ = c.send(&Response::Error {
                    reason: e.to_string(),
                });
                c.close_after_refusal();
            }
        });
    }
    Ok(())
}

impl Server {
    fn partner(&self, job: &str) -> Result<DirLevel> {
        check_name("job", job)?;
        Ok(DirLevel::new(&self.dir.join("partner"), job))
    }

    fn holder(&self, group: &str) -> Result<Holder> {
        check_name("group", group)?;
        Ok(Holder::new(&self.dir, group))
    }

    fn handle(&self, c: &mut Conn) -> Result<()> {
        let env: Envelope = c.recv()?;
        if env.protocol != PROTOCOL || env.version != PROTOCOL_VERSION {
            return Err(Error::Refused(format!(
                "protocol {} v{} is not spoken here ({PROTOCOL} v{PROTOCOL_VERSION})",
                env.protocol, env.version
            )));
        }
        match env.request {
            Request::Offer {
                job,
                name,
                manifest,
            } => {
                let level = self.partner(&job)?;
                check_name("copy", &name)?;
                let needed = level.needed(&name, &manifest);
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
