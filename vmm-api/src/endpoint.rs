//! The endpoints of the API, by their operationId in docs/api.yaml. The
//! server routes with [`find`], the client builds its paths with
//! [`Endpoint::path`], and `tests/contract.rs` checks [`ALL`] against the
//! document: an endpoint exists in all three places or fails a test.

/// One method on one path template (`/vm/disks/{index}/resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub operation: &'static str,
    pub method: &'static str,
    pub path: &'static str,
}

const fn ep(operation: &'static str, method: &'static str, path: &'static str) -> Endpoint {
    Endpoint {
        operation,
        method,
        path,
    }
}

pub const GET_VM: Endpoint = ep("getVm", "GET", "/vm");
pub const GET_VCPUS: Endpoint = ep("getVcpus", "GET", "/vm/vcpus");
pub const GET_INTERRUPTS: Endpoint = ep("getInterrupts", "GET", "/vm/interrupts");
pub const PAUSE: Endpoint = ep("pauseVm", "PUT", "/vm/pause");
pub const RESUME: Endpoint = ep("resumeVm", "PUT", "/vm/resume");
pub const SHUTDOWN: Endpoint = ep("shutdownVm", "PUT", "/vm/shutdown");
pub const ANNOUNCE: Endpoint = ep("announceVm", "POST", "/vm/announce");
pub const SNAPSHOT: Endpoint = ep("snapshotVm", "PUT", "/vm/snapshot");
pub const MIGRATE: Endpoint = ep("migrateVm", "PUT", "/vm/migrate");
pub const MIGRATION_STATUS: Endpoint = ep("migrationStatus", "GET", "/vm/migration");
pub const CANCEL_MIGRATION: Endpoint = ep("cancelMigration", "DELETE", "/vm/migration");
pub const ADD_DEVICE: Endpoint = ep("addDevice", "PUT", "/vm/devices");
pub const REMOVE_DEVICE: Endpoint = ep("removeDevice", "DELETE", "/vm/devices/{bdf}");
pub const RESIZE_DISK: Endpoint = ep("resizeDisk", "PUT", "/vm/disks/{index}/resize");
/// Prometheus text format (not JSON).
pub const METRICS: Endpoint = ep("getMetrics", "GET", "/metrics");

/// Every endpoint (for one path, in the order `Allow` lists its methods).
pub const ALL: &[Endpoint] = &[
    GET_VM,
    GET_VCPUS,
    GET_INTERRUPTS,
    PAUSE,
    RESUME,
    SHUTDOWN,
    ANNOUNCE,
    SNAPSHOT,
    MIGRATE,
    MIGRATION_STATUS,
    CANCEL_MIGRATION,
    ADD_DEVICE,
    REMOVE_DEVICE,
    RESIZE_DISK,
    METRICS,
];

impl Endpoint {
    /// The values of the template's `{parameters}` if `path` (without
    /// query or trailing slash) fits it.
    pub fn matches<'a>(&self, path: &'a str) -> Option<Vec<&'a str>> {
        let mut params = Vec::new();
        let mut want = self.path.split('/');
        let mut have = path.split('/');
        loop {
            match (want.next(), have.next()) {
                (None, None) => return Some(params),
                (Some(w), Some(h)) if w.starts_with('{') && w.ends_with('}') => {
                    if h.is_empty() {
                        return None;
                    }
                    params.push(h)
                }
                (Some(w), Some(h)) if w == h => {}
                _ => return None,
            }
        }
    }

    /// The path with the template's parameters filled in, in order.
    pub fn path(&self, params: &[&str]) -> String {
        let mut params = params.iter();
        self.path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    params.next().copied().unwrap_or(seg)
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// What a request names: the endpoint with its parameters, or the methods
/// its path takes (a 405 lists them), or nothing (404).
pub enum Found<'a> {
    Endpoint(Endpoint, Vec<&'a str>),
    /// The path exists; the method is not among these.
    Method(Vec<&'static str>),
    NoPath,
}

/// The endpoint for `method` on `path` (no query; a trailing slash is
/// ignored).
pub fn find<'a>(method: &str, path: &'a str) -> Found<'a> {
    let path = path.trim_end_matches('/');
    let mut methods = Vec::new();
    for e in ALL {
        if let Some(params) = e.matches(path) {
            if e.method == method {
                return Found::Endpoint(*e, params);
            }
            methods.push(e.method);
        }
    }
    if methods.is_empty() {
        Found::NoPath
    } else {
        Found::Method(methods)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_and_fill() {
        assert_eq!(RESIZE_DISK.matches("/vm/disks/3/resize"), Some(vec!["3"]));
        assert_eq!(RESIZE_DISK.matches("/vm/disks//resize"), None);
        assert_eq!(RESIZE_DISK.matches("/vm/disks/3"), None);
        assert_eq!(GET_VM.matches("/vm"), Some(vec![]));
        assert_eq!(GET_VM.matches("/vm/x"), None);
        assert_eq!(REMOVE_DEVICE.path(&["01:00.0"]), "/vm/devices/01:00.0");
        assert!(matches!(find("GET", "/vm/"), Found::Endpoint(GET_VM, _)));
        match find("PUT", "/vm/migration") {
            Found::Method(m) => assert_eq!(m, ["GET", "DELETE"]),
            _ => panic!("405 expected"),
        }
        assert!(matches!(find("GET", "/nope"), Found::NoPath));
        // Every endpoint finds itself, and only itself.
        for e in ALL {
            let params: Vec<&str> = e
                .path
                .split('/')
                .filter(|s| s.starts_with('{'))
                .map(|_| "1")
                .collect();
            match find(e.method, &e.path(&params)) {
                Found::Endpoint(f, _) => assert_eq!(f, *e),
                _ => panic!("{e:?}"),
            }
        }
    }
}
