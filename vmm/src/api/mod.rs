//! The REST API over a Unix socket (see docs/api.yaml).
//!
//! A server thread accepts connections and parses HTTP/1.1 requests; each
//! request is handed to the control thread through a channel plus an eventfd
//! (so the control loop wakes up), and the answer goes back to the client.
//! The codec and the body types are the `vmm-api` crate's (shared with
//! every client).
pub use vmm_api::http;
use vmm_api::model::{DeviceBody, MigrateRequest, ResizeBody, SnapshotRequest};

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// What the control thread is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    GetVm,
    /// `GET /vm/vcpus`: roles, host placement, exit control and counters.
    Vcpus,
    /// `GET /vm/interrupts`: where every device interrupt goes.
    Interrupts,
    Pause,
    Resume,
    Shutdown,
    /// `POST /vm/announce`: announce the VM on its TAPs again.
    Announce,
    /// Grow disk `index` to `bytes` (`PUT /vm/disks/{index}/resize`).
    ResizeDisk {
        index: usize,
        bytes: u64,
    },
    /// Take a snapshot (`PUT /vm/snapshot`).
    Snapshot(SnapshotRequest),
    /// Start a live migration (`PUT /vm/migrate`).
    Migrate(MigrateRequest),
    /// `GET /vm/migration`.
    MigrationStatus,
    /// `DELETE /vm/migration`: cancel.
    MigrationCancel,
    /// `GET /metrics`: Prometheus text format.
    Metrics,
    /// `PUT /vm/devices`: hot-plug a passthrough function.
    AddDevice(crate::config::DeviceEntry),
    /// `DELETE /vm/devices/{bdf}[?force=1]`: hot-unplug the one in this
    /// slot (with `force`, without asking the guest agent first).
    RemoveDevice {
        at: devices::pci::Location,
        force: bool,
    },
}

/// An answer to a request.
pub type ApiResponse = http::Response;

pub type ApiMessage = (ApiRequest, Sender<ApiResponse>);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {0} is already in use by a running process")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-group {0}: no such group")]
    NoGroup(String),
    #[error("cannot give API socket {path} to group {group}: {source}")]
    Group {
        path: PathBuf,
        group: String,
        source: std::io::Error,
    },
}

/// The group id of `group` (a name, or a number).
fn group_id(group: &str) -> Result<libc::gid_t, Error> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| Error::NoGroup(group.into()))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(Error::NoGroup(group.into()));
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is plain data (integers and pointers); all-zero
    // is a valid value that getgrnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

/// Binds the socket (refusing a path that is in use) before the VM exists,
/// before any other thread: mode 0600, or 0660 with `group`.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, Error> {
    let gid = group.map(group_id).transpose()?;
    // The socket is created with the umask applied: 0177 gives 0600 from
    // the start, so no other user can connect between bind and chmod.
    // SAFETY: umask only changes this process's file-creation mask; no
    // other thread exists yet to create files meanwhile.
    let old = unsafe { libc::umask(0o177) };
    let bound = bind_socket(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    if let (Some(gid), Some(group)) = (gid, group) {
        use std::os::unix::fs::PermissionsExt;
        let given = std::os::unix::fs::chown(path, None, Some(gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)));
        if let Err(source) = given {
            let _ = std::fs::remove_file(path);
            return Err(Error::Group {
                path: path.into(),
                group: group.into(),
                source,
            });
        }
    }
    Ok(listener)
}

fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket(path.into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.into()));
        }
        // A stale socket from a process that is gone: replace it.
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.into(),
        source,
    })
}

/// How long a client has to send its whole request.
const REQUEST_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection whose reads all end by one deadline.
struct Deadline(std::os::unix::net::UnixStream, std::time::Instant);

impl Deadline {
    fn new(s: std::os::unix::net::UnixStream, within: std::time::Duration) -> Deadline {
        Deadline(s, std::time::Instant::now() + within)
    }
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.1.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request did not arrive in time",
            ));
        }
        self.0.set_read_timeout(Some(left))?;
        self.0.read(buf)
    }
}

/// Serves requests until the process ends; returns the control side.
pub fn start_server(
    listener: UnixListener,
    wake: Arc<EventFd>,
) -> std::io::Result<Receiver<ApiMessage>> {
    let (tx, rx) = channel::<ApiMessage>();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Confined before the first connection is read.
            if let Err(e) = sandbox::seccomp::confine(sandbox::ThreadKind::Api, "api") {
                tracing::error!("{e}: the API is not served");
                return;
            }
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                // One connection at a time: a client that sends slowly
                // gets REQUEST_TIME for all of its request, then an error.
                let mut stream = Deadline::new(stream, REQUEST_TIME);
                let response = match http::read_request(&mut stream) {
                    Ok(req) => match route(&req.method, &req.path, &req.body) {
                        Ok(api) => {
                            let (rtx, rrx) = channel();
                            if tx.send((api, rtx)).is_err() || wake.write(1).is_err() {
                                break;
                            }
                            rrx.recv().unwrap_or_else(|_| {
                                ApiResponse::error(503, "the VM is shutting down")
                            })
                        }
                        Err(r) => r,
                    },
                    Err(e) => ApiResponse::error(400, e.to_string()),
                };
                let _ = http::write_response(&mut stream.0, &response);
            }
        })?;
    Ok(rx)
}

/// Maps method, path and body to a request (or an HTTP error). A method a
/// path does not take gets 405 with an `Allow` header listing the ones it
/// does (RFC 9110). The paths are `vmm_api::endpoint`'s.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    use vmm_api::endpoint::{self as ep, Found};
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let (e, params) = match ep::find(method, path) {
        Found::Endpoint(e, params) => (e, params),
        Found::Method(allowed) => {
            let path = path.trim_end_matches('/');
            let mut r = ApiResponse::error(405, format!("{method} is not allowed on {path}"));
            r.allow = Some(allowed.join(", "));
            return Err(r);
        }
        Found::NoPath => {
            let path = path.trim_end_matches('/');
            return Err(ApiResponse::error(404, format!("no such endpoint: {path}")));
        }
    };
    let param = params.first().copied().unwrap_or("");
    Ok(match e {
        ep::GET_VM => ApiRequest::GetVm,
        ep::GET_VCPUS => ApiRequest::Vcpus,
        ep::GET_INTERRUPTS => ApiRequest::Interrupts,
        ep::MIGRATION_STATUS => ApiRequest::MigrationStatus,
        ep::CANCEL_MIGRATION => ApiRequest::MigrationCancel,
        ep::PAUSE => ApiRequest::Pause,
        ep::RESUME => ApiRequest::Resume,
        ep::SHUTDOWN => ApiRequest::Shutdown,
        ep::ANNOUNCE => ApiRequest::Announce,
        ep::SNAPSHOT => snapshot_request(body)?,
        ep::MIGRATE => migrate_request(body)?,
        ep::ADD_DEVICE => {
            let b: DeviceBody = json_body(
                body,
                "device",
                r#"{"device": "vfio=DDDD:BB:DD.F" | "vfio-user=SOCKET"}"#,
            )?;
            ApiRequest::AddDevice(
                b.device
                    .parse()
                    .map_err(|e: crate::config::Error| ApiResponse::error(400, e.to_string()))?,
            )
        }
        ep::REMOVE_DEVICE => ApiRequest::RemoveDevice {
            at: param
                .parse()
                .map_err(|e: String| ApiResponse::error(404, format!("no such device: {e}")))?,
            force: query
                .split('&')
                .any(|kv| kv == "force=1" || kv == "force=true"),
        },
        ep::RESIZE_DISK => resize_request(param, body)?,
        ep::METRICS => ApiRequest::Metrics,
        other => {
            return Err(ApiResponse::error(
                501,
                format!("{} is not served by this VMM", other.operation),
            ))
        }
    })
}

fn resize_request(index: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let index = index
        .parse::<usize>()
        .map_err(|_| ApiResponse::error(404, format!("no such disk: {index}")))?;
    let b: ResizeBody = json_body(body, "resize", r#"{"size_bytes": N}"#)?;
    Ok(ApiRequest::ResizeDisk {
        index,
        bytes: b.size_bytes,
    })
}

fn snapshot_request(body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let r: SnapshotRequest = json_body(
        body,
        "snapshot",
        r#"{"dest": DIR, "kind": "full"|"incremental", "force": bool, "live": bool}"#,
    )?;
    r.check()
        .map_err(|e| ApiResponse::error(400, e.to_string()))?;
    Ok(ApiRequest::Snapshot(r))
}

fn migrate_request(body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let r: MigrateRequest = json_body(
        body,
        "migrate",
        r#"{"to": "tcp://HOST:PORT", "max_downtime_ms": N, "max_rounds": N, "throttle": bool, "streams": N}"#,
    )?;
    r.address()
        .map_err(|e| ApiResponse::error(400, e.to_string()))?;
    Ok(ApiRequest::Migrate(r))
}

/// A request's JSON body, or 400 naming the request and the shape it wants.
fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
    want: &str,
) -> Result<T, ApiResponse> {
    serde_json::from_slice(body)
        .map_err(|e| ApiResponse::error(400, format!("bad {what} request (want {want}): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/vm", b"").unwrap(), ApiRequest::GetVm);
        assert_eq!(
            route("DELETE", "/vm/devices/00:1f.0", b"").unwrap(),
            ApiRequest::RemoveDevice {
                at: devices::pci::Location::root(0x1f),
                force: false
            }
        );
        assert_eq!(
            route("DELETE", "/vm/devices/00:05.0?force=1", b"").unwrap(),
            ApiRequest::RemoveDevice {
                at: devices::pci::Location::root(5),
                force: true
            }
        );
        assert_eq!(
            route("DELETE", "/vm/devices/0000:02:00.0", b"").unwrap(),
            ApiRequest::RemoveDevice {
                at: devices::pci::Location { bus: 2, slot: 0 },
                force: false
            }
        );
        assert_eq!(
            route(
                "PUT",
                "/vm/devices",
                br#"{"device": "vfio-user=/run/cx.sock"}"#
            )
            .unwrap(),
            ApiRequest::AddDevice("vfio-user=/run/cx.sock".parse().unwrap())
        );
        assert_eq!(route("PUT", "/vm/pause/", b"").unwrap(), ApiRequest::Pause);
        assert_eq!(
            route("POST", "/vm/announce", b"").unwrap(),
            ApiRequest::Announce
        );
        let refused = route("PUT", "/vm/announce", b"").unwrap_err();
        assert_eq!(
            (refused.status, refused.allow.as_deref()),
            (405, Some("POST"))
        );
        let refused = route("GET", "/vm/pause", b"").unwrap_err();
        assert_eq!(
            (refused.status, refused.allow.as_deref()),
            (405, Some("PUT"))
        );
        let refused = route("TRACE", "/vm/migration", b"").unwrap_err();
        assert_eq!(refused.allow.as_deref(), Some("GET, DELETE"));
        assert_eq!(route("GET", "/nope", b"").unwrap_err().status, 404);
        assert_eq!(
            route("PUT", "/vm/disks/1/resize", br#"{"size_bytes": 4096}"#).unwrap(),
            ApiRequest::ResizeDisk {
                index: 1,
                bytes: 4096
            }
        );
        match route(
            "PUT",
            "/vm/snapshot",
            br#"{"dest": "/s", "kind": "incremental"}"#,
        ) {
            Ok(ApiRequest::Snapshot(r)) => {
                assert_eq!(r.kind, crate::capture::Kind::Incremental);
                assert!(!r.live && !r.force);
            }
            other => panic!("{other:?}"),
        }
        match route("PUT", "/vm/migrate", br#"{"to": "tcp://10.0.0.2:7000"}"#) {
            Ok(ApiRequest::Migrate(r)) => {
                assert_eq!(r.address().unwrap(), "10.0.0.2:7000");
                assert_eq!(
                    (r.max_downtime_ms, r.max_rounds, r.throttle),
                    (50, 30, true)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            route("DELETE", "/vm/migration", b"").unwrap(),
            ApiRequest::MigrationCancel
        );
        for (method, path, body, status) in [
            ("GET", "/vm/snapshot", "{}", 405),
            ("PUT", "/vm/snapshot", r#"{"dest": "rel"}"#, 400),
            (
                "PUT",
                "/vm/snapshot",
                r#"{"dest": "/s", "kind": "half"}"#,
                400,
            ),
            ("PUT", "/vm/snapshot", r#"{"dest": "/s", "extra": 1}"#, 400),
            ("GET", "/vm/disks/0/resize", "{}", 405),
            ("PUT", "/vm/disks/x/resize", r#"{"size_bytes": 1}"#, 404),
            ("PUT", "/vm/disks/0/resize", "{}", 400),
            ("PUT", "/vm/disks/0/resize", r#"{"size_bytes": -1}"#, 400),
            ("PUT", "/vm/disks/0/resize", r#"{"size": 1}"#, 400),
            ("GET", "/vm/devices", "{}", 405),
            ("PUT", "/vm/devices", r#"{"device": "pci=1"}"#, 400),
            ("PUT", "/vm/devices", r#"{"dev": "vfio-user=/s"}"#, 400),
            ("DELETE", "/vm/devices/5", "", 404),
            ("DELETE", "/vm/devices/00:20.0", "", 404),
            ("PUT", "/vm/devices/00:05.0", "", 405),
            ("GET", "/vm/migrate", "{}", 405),
            ("PUT", "/vm/migrate", r#"{"to": "nowhere"}"#, 400),
            ("PUT", "/vm/migrate", r#"{"to": "tcp://h:1", "x": 1}"#, 400),
            (
                "PUT",
                "/vm/migrate",
                r#"{"to": "tcp://h:1", "verify": true, "postcopy": true}"#,
                400,
            ),
            (
                "PUT",
                "/vm/migrate",
                r#"{"to": "tcp://h:1", "streams": 0}"#,
                400,
            ),
            (
                "PUT",
                "/vm/migrate",
                r#"{"to": "tcp://h:1", "streams": 17}"#,
                400,
            ),
            (
                "PUT",
                "/vm/migrate",
                r#"{"to": "tcp://h:1", "streams": 256}"#,
                400,
            ),
            ("PUT", "/vm/migration", "", 405),
        ] {
            assert_eq!(
                route(method, path, body.as_bytes()).unwrap_err().status,
                status,
                "{method} {path} {body}"
            );
        }
    }

    /// The server takes every endpoint of the contract (with a valid body).
    #[test]
    fn every_endpoint_of_the_contract_is_served() {
        for e in vmm_api::endpoint::ALL {
            let (params, body): (&[&str], &str) = match e.operation {
                "snapshotVm" => (&[], r#"{"dest": "/s"}"#),
                "migrateVm" => (&[], r#"{"to": "h:1"}"#),
                "addDevice" => (&[], r#"{"device": "vfio-user=/s"}"#),
                "removeDevice" => (&["01:00.0"], ""),
                "resizeDisk" => (&["0"], r#"{"size_bytes": 512}"#),
                _ => (&[], ""),
            };
            let path = e.path(params);
            assert!(
                route(e.method, &path, body.as_bytes()).is_ok(),
                "{} {path}",
                e.method
            );
        }
    }

    #[test]
    fn bind_refuses_live_sockets_and_non_sockets_and_replaces_stale_ones() {
        let dir = std::env::temp_dir().join(format!("ffmk-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        let live = bind(&p, None).unwrap();
        assert!(matches!(bind(&p, None), Err(Error::InUse(_))));
        drop(live);
        bind(&p, None).expect("stale socket is replaced");
        let f = dir.join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(matches!(bind(&f, None), Err(Error::NotASocket(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_is_its_owners_or_its_groups_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("ffmk-api-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let _l = bind(&p, None).unwrap();
        assert_eq!(mode(&p), 0o600);
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let q = dir.join("group.sock");
        let _g = bind(&q, Some(&gid.to_string())).unwrap();
        assert_eq!(mode(&q), 0o660);
        assert_eq!(std::fs::metadata(&q).unwrap().gid(), gid);
        let e = bind(&dir.join("x.sock"), Some("no-such-group-ffmk")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--api-group no-such-group-ffmk: no such group"
        );
        assert!(!dir.join("x.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
