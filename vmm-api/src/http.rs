//! Just enough HTTP/1.1 for a local control API: one request per
//! connection, JSON bodies. Both sides live here (the VMM's server reads
//! requests and writes responses; [`crate::Client`] does the reverse), so
//! the limits below are the same at both ends.
use std::io::{Read, Write};

/// Largest header a message may have.
pub const MAX_HEADER: usize = 16 * 1024;
/// Header lines after the request line.
pub const MAX_HEADER_LINES: usize = 64;
/// Largest body a message may have.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("malformed HTTP response")]
    BadResponse,
}

/// A request as the server read it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads head and body; returns (head, body) split at the blank line.
fn read_message(s: &mut impl Read) -> Result<(String, Vec<u8>), Error> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEADER {
            return Err(Error::Malformed("header too large"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::Malformed(
                "connection closed before the end of the header",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec())
        .map_err(|_| Error::Malformed("header is not UTF-8"))?;
    if head.lines().count() > 1 + MAX_HEADER_LINES {
        return Err(Error::Malformed("too many header lines (at most 64)"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| Error::Malformed("bad Content-Length"))
        })
        .transpose()?;
    match len {
        Some(len) if len > MAX_BODY => return Err(Error::Malformed("body too large")),
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(Error::Malformed(
                        "connection closed before the end of the body",
                    ));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {}
    }
    Ok((head, body))
}

/// Reads one request (server side).
pub fn read_request(s: &mut impl Read) -> Result<Request, Error> {
    let (head, body) = read_message(s)?;
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") && p.starts_with('/') => {
            Ok(Request {
                method: m.into(),
                path: p.into(),
                body,
            })
        }
        _ => Err(Error::Malformed("bad request line")),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// An answer: a status, a body (JSON unless `content_type` says
/// otherwise) and, with a 405, the methods the path takes.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The methods a path takes, sent as `Allow` with a 405.
    pub allow: Option<String>,
    /// `None`: `application/json`.
    pub content_type: Option<&'static str>,
}

impl Response {
    /// `value` as the JSON body (a 500 should it not encode: the API's
    /// own types always do).
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status,
                body,
                allow: None,
                content_type: None,
            },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        let body = crate::model::ErrorBody { error: msg.into() };
        Response {
            status,
            body: serde_json::to_string(&body).unwrap_or_else(|_| "{}".into()),
            allow: None,
            content_type: None,
        }
    }

    /// A 200 with a body of another type (the metrics page).
    pub fn text(body: String, content_type: &'static str) -> Self {
        Response {
            status: 200,
            body,
            allow: None,
            content_type: Some(content_type),
        }
    }
}

/// Writes one response (server side).
pub fn write_response(s: &mut impl Write, r: &Response) -> std::io::Result<()> {
    let allow = match &r.allow {
        Some(methods) => format!("Allow: {methods}\r\n"),
        None => String::new(),
    };
    write!(
        s,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
        r.status,
        reason(r.status),
        r.content_type.unwrap_or("application/json"),
        r.body.len(),
        r.body
    )?;
    s.flush()
}

/// Client side: sends one request and returns (status, body).
pub fn call(
    s: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Error> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let (head, body) = read_message(s)?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or(Error::BadResponse)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn parses_requests_with_and_without_body() {
        let r = read_request(&mut Cursor::new(
            b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ))
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.len()),
            ("GET", "/vm", 0)
        );
        let r = read_request(&mut Cursor::new(
            b"PUT /vm/pause HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        ))
        .unwrap();
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /vm SPDY/3\r\n\r\n",
            b"GET /vm HTTP/1.1\r\n",
            b"PUT /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        ] {
            assert!(
                read_request(&mut Cursor::new(bad.to_vec())).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = format!(
            "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(read_request(&mut Cursor::new(huge.into_bytes())).is_err());
    }

    #[test]
    fn response_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::error(409, "x")).unwrap();
        let (head, body) = read_message(&mut Cursor::new(out)).unwrap();
        assert!(head.starts_with("HTTP/1.1 409 Conflict"));
        assert_eq!(body, b"{\"error\":\"x\"}");
        let mut refused = Response::error(405, "TRACE is not allowed on /vm");
        refused.allow = Some("GET".into());
        let mut out = Vec::new();
        write_response(&mut out, &refused).unwrap();
        let (head, _) = read_message(&mut Cursor::new(out)).unwrap();
        assert!(head.starts_with("HTTP/1.1 405 Method Not Allowed"));
        assert!(head.contains("\r\nAllow: GET\r\n"), "{head}");
    }
}
