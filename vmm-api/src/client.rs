//! A typed client of one VMM's API socket: one method per endpoint of
//! docs/api.yaml, each returning that endpoint's answer type.
use crate::endpoint::{self, Endpoint};
use crate::http;
use crate::model::*;
use serde::de::DeserializeOwned;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a call did not return the answer it asked for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{method} {path}: {source}")]
    Http {
        method: &'static str,
        path: String,
        source: http::Error,
    },
    /// The VMM took no request or gave no answer in time: stopped
    /// (SIGSTOP), wedged, or busy past the limit.
    #[error("the VMM at {path} did not answer {method} {request} within {}", secs(*.after))]
    Timeout {
        path: PathBuf,
        method: &'static str,
        request: String,
        after: Duration,
    },
    /// The VMM answered with an error status.
    #[error("{method} {path} failed ({status}): {message}")]
    Api {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path}: the answer is not what the API promises: {source}")]
    Decode {
        method: &'static str,
        path: String,
        source: serde_json::Error,
    },
}

impl Error {
    /// The HTTP status of a refused request.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What the VMM said (a refused request), or the whole error.
    pub fn message(&self) -> String {
        match self {
            Error::Api { message, .. } => message.clone(),
            e => e.to_string(),
        }
    }

    /// The VMM is not there (nothing listens on the socket).
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect { .. })
    }

    /// The VMM did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// `5 s`, `0.5 s`.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// The API socket of one VMM.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the VMM behind `socket`; calls wait as long as the VMM
    /// takes (see [`Client::with_timeout`]).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// Every read and write of a call ends within `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request: (status, body text). For endpoints without a typed
    /// method, and for tools that pass answers through.
    pub fn call(
        &self,
        method: &'static str,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), Error> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| Error::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let http = |source: std::io::Error| Error::Http {
            method,
            path: path.into(),
            source: http::Error::Io(source),
        };
        s.set_read_timeout(self.timeout).map_err(http)?;
        s.set_write_timeout(self.timeout).map_err(http)?;
        http::call(&mut s, method, path, body).map_err(|source| match (&source, self.timeout) {
            (http::Error::Io(e), Some(after))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Error::Timeout {
                    path: self.socket.clone(),
                    method,
                    request: path.into(),
                    after,
                }
            }
            _ => Error::Http {
                method,
                path: path.into(),
                source,
            },
        })
    }

    /// A call to `e` (its template filled with `params`) whose 2xx answer
    /// is a `T`; other answers are [`Error::Api`] with the VMM's message.
    fn request<T: DeserializeOwned>(
        &self,
        e: Endpoint,
        params: &[&str],
        query: &str,
        body: Option<&dyn erased::Body>,
    ) -> Result<T, Error> {
        let path = e.path(params) + query;
        let method = e.method;
        let body = match body {
            Some(b) => b.json().map_err(|source| Error::Decode {
                method,
                path: path.clone(),
                source,
            })?,
            None => String::new(),
        };
        let (status, text) = self.call(method, &path, &body)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(Error::Api {
                method,
                path,
                status,
                message,
            });
        }
        serde_json::from_str(&text).map_err(|source| Error::Decode {
            method,
            path,
            source,
        })
    }

    /// `GET /vm`.
    pub fn vm(&self) -> Result<VmInfo, Error> {
        self.request(endpoint::GET_VM, &[], "", None)
    }

    /// `GET /vm/vcpus`.
    pub fn vcpus(&self) -> Result<VcpusInfo, Error> {
        self.request(endpoint::GET_VCPUS, &[], "", None)
    }

    /// `GET /vm/interrupts`.
    pub fn interrupts(&self) -> Result<Interrupts, Error> {
        self.request(endpoint::GET_INTERRUPTS, &[], "", None)
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<StateReply, Error> {
        self.request(endpoint::PAUSE, &[], "", None)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<StateReply, Error> {
        self.request(endpoint::RESUME, &[], "", None)
    }

    /// `PUT /vm/shutdown`.
    pub fn shutdown(&self) -> Result<StateReply, Error> {
        self.request(endpoint::SHUTDOWN, &[], "", None)
    }

    /// `POST /vm/announce`: the VM's network devices announce it again.
    pub fn announce(&self) -> Result<Announced, Error> {
        self.request(endpoint::ANNOUNCE, &[], "", None)
    }

    /// `PUT /vm/snapshot`.
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotReply, Error> {
        self.request(endpoint::SNAPSHOT, &[], "", Some(req))
    }

    /// `PUT /vm/migrate` (202: it runs; follow it with [`Client::migration`]).
    pub fn migrate(&self, req: &MigrateRequest) -> Result<MigrateStarted, Error> {
        self.request(endpoint::MIGRATE, &[], "", Some(req))
    }

    /// `GET /vm/migration`.
    pub fn migration(&self) -> Result<MigrationStatus, Error> {
        self.request(endpoint::MIGRATION_STATUS, &[], "", None)
    }

    /// `DELETE /vm/migration`.
    pub fn cancel_migration(&self) -> Result<StateReply, Error> {
        self.request(endpoint::CANCEL_MIGRATION, &[], "", None)
    }

    /// `PUT /vm/devices`.
    pub fn add_device(&self, device: &str) -> Result<Plugged, Error> {
        let body = DeviceBody {
            device: device.into(),
        };
        self.request(endpoint::ADD_DEVICE, &[], "", Some(&body))
    }

    /// `DELETE /vm/devices/{bdf}[?force=1]`.
    pub fn remove_device(&self, bdf: &str, force: bool) -> Result<DeviceState, Error> {
        let query = if force { "?force=1" } else { "" };
        self.request(endpoint::REMOVE_DEVICE, &[bdf], query, None)
    }

    /// `PUT /vm/disks/{index}/resize`.
    /// `GET /metrics`: the Prometheus text page.
    pub fn metrics(&self) -> Result<String, Error> {
        let e = endpoint::METRICS;
        let (status, text) = self.call(e.method, e.path, "")?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.error)
            .unwrap_or(text);
        Err(Error::Api {
            method: e.method,
            path: e.path.into(),
            status,
            message,
        })
    }

    pub fn resize_disk(&self, index: usize, size_bytes: u64) -> Result<Resized, Error> {
        let index = index.to_string();
        let body = ResizeBody { size_bytes };
        self.request(endpoint::RESIZE_DISK, &[&index], "", Some(&body))
    }
}

/// Request bodies behind one object-safe trait.
mod erased {
    pub trait Body {
        fn json(&self) -> Result<String, serde_json::Error>;
    }

    impl<T: serde::Serialize> Body for T {
        fn json(&self) -> Result<String, serde_json::Error> {
            serde_json::to_string(self)
        }
    }
}
