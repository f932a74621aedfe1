//! The guest agent: a program in the guest that lets go of a passthrough
//! function before the VMM unplugs it, and looks for new ones after a
//! plug (the Linux initramfs has one: `vsock-tool agent 1027`). The VMM
//! reaches it through its own vsock device: it connects to the device's
//! Unix socket, asks for guest port [`PORT`] (`CONNECT 1027`), sends one
//! command line and reads one answer line, `ok ...` or `error ...`:
//!
//! ```text
//! detach 0000:00:05.0   ->  ok detached 0000:00:05.0
//! rescan                ->  ok rescanned 0000:00:01.0=1af4:1044 0000:00:05.0=15b3:101c ...
//! ```
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The guest port the agent listens on.
pub const PORT: u32 = 1027;
/// How long the guest may take to answer (removing a function whose
/// driver is busy can take a while).
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may take to accept the connection. A guest whose
/// kernel has a vsock driver answers at once (a reset when nothing
/// listens); only a guest without one leaves the request unanswered, and
/// waiting the whole [`TIMEOUT`] for it made every agent-less removal
/// take 20 s per question.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nobody answered: no agent runs in the guest (or it is not up yet).
    #[error("no guest agent answered on vsock port {PORT} ({0}); run `vsock-tool agent {PORT}` (or your agent) in the guest")]
    NoAgent(String),
    /// The agent answered with an error.
    #[error("the guest agent refused: {0}")]
    Refused(String),
}

/// Sends `command` to the agent through the vsock device's socket and
/// returns its `ok` answer (without the `ok `).
pub fn ask(vsock_socket: &Path, command: &str, timeout: Duration) -> Result<String, Error> {
    let no = |what: &str, e: std::io::Error| Error::NoAgent(format!("{what}: {e}"));
    let s = UnixStream::connect(vsock_socket).map_err(|e| no("vsock socket", e))?;
    s.set_read_timeout(Some(timeout.min(CONNECT_TIMEOUT)))
        .map_err(|e| no("socket", e))?;
    (&s).write_all(format!("CONNECT {PORT}\n").as_bytes())
        .map_err(|e| no("connect", e))?;
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| no("connect", e))?;
    if !line.starts_with("OK ") {
        return Err(Error::NoAgent(if line.is_empty() {
            "the guest refused the connection".into()
        } else {
            line.trim().to_string()
        }));
    }
    s.set_read_timeout(Some(timeout))
        .map_err(|e| no("socket", e))?;
    (&s).write_all(format!("{command}\n").as_bytes())
        .map_err(|e| no("send", e))?;
    line.clear();
    r.read_line(&mut line).map_err(|e| no("answer", e))?;
    let answer = line.trim();
    match answer.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None if answer.is_empty() => Err(Error::NoAgent("no answer".into())),
        None => Err(Error::Refused(
            answer
                .strip_prefix("error")
                .unwrap_or(answer)
                .trim()
                .to_string(),
        )),
    }
}
