//! A deliberately small, blocking HTTP/1.1 subset over Unix sockets: the launcher's
//! API server (one short-lived thread per connection, as Firecracker's), and the
//! blocking client that noded's supervisor, `launcher migrate` and the tests use. (noded's
//! own API is served by hyper and axum, with the same limits: `node/src/api.rs`.)
//!
//! Why not a full HTTP stack: both ends are ours, the peers are local processes, and
//! every byte that arrives from another process must be bounded and checked before it is
//! acted on (DESIGN-NOTES, invariant 3). So this module accepts exactly one request per
//! connection (`Connection: close`), requires `Content-Length` for bodies, refuses
//! chunked transfer encoding, and checks the size limits *before* allocating:
//! the header section is at most [`MAX_HEADER_BYTES`], a body at most [`MAX_BODY_BYTES`].
//!
//! The parsing core works on byte slices ([`parse_request_head`], [`parse_response_head`]);
//! the blocking wrappers ([`read_request`], [`request`]) only move bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest accepted header section (request/status line plus headers, including the
/// blank line). Anything larger is refused before more memory is used.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest accepted body. Our bodies are small JSON documents; migration reports included.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default timeout of [`request`]: long enough for any quick API call, short enough that a
/// hung peer does not hang the caller forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong while reading or writing one HTTP message.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket failed (includes timeouts, reported as `WouldBlock`/`TimedOut`).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Could not connect to the peer's socket (it does not exist or nobody listens).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The underlying error (ENOENT, ECONNREFUSED, ...).
        source: std::io::Error,
    },
    /// The peer closed the connection before a complete message arrived.
    #[error("connection closed before a complete message was received")]
    Eof,
    /// The header section exceeded [`MAX_HEADER_BYTES`].
    #[error("header section larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// The declared body exceeded [`MAX_BODY_BYTES`].
    #[error("body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    /// Chunked (or any other) transfer encoding: refused, a Content-Length is required.
    #[error("transfer-encoding is not supported; send the body with a Content-Length header")]
    TransferEncoding,
    /// A request method that carries data without declaring its length.
    #[error("a body requires a Content-Length header")]
    LengthRequired,
    /// The message is not well-formed HTTP/1.x.
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    /// The body is not valid JSON.
    #[error("body is not valid JSON: {0}")]
    Json(String),
}

impl HttpError {
    /// The status code a server should answer with when reading a request failed this way.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadersTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferEncoding => 501,
            HttpError::LengthRequired => 411,
            _ => 400,
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Upper-case method, e.g. `GET`.
    pub method: String,
    /// The request target without the query string, e.g. `/v1/status`.
    pub path: String,
    /// The query string after `?`, if any (not decoded).
    pub query: Option<String>,
    /// Header names lower-cased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The raw body (empty when there is none).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; an empty body is `null`.
    pub fn json(&self) -> Result<serde_json::Value, HttpError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Json(e.to_string()))
    }
}

/// The parsed head of a request: everything but the body, plus the body's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Upper-case method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Lower-cased header names with trimmed values.
    pub headers: Vec<(String, String)>,
    /// The declared Content-Length (0 when absent on a body-less request).
    pub content_length: usize,
}

/// The parsed head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The declared Content-Length, if any (without one, the body runs to EOF).
    pub content_length: Option<usize>,
}

/// Position just past the `\r\n\r\n` (or `\n\n`) that ends the header section, if present.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Splits a header section into lines (without line endings), checking it is text.
fn head_lines(head: &[u8]) -> Result<Vec<&str>, HttpError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| HttpError::Malformed("header section is not UTF-8".into()))?;
    Ok(text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect())
}

/// Parses `Name: value` lines, rejecting obsolete line folding and bad names.
fn parse_headers(lines: &[&str]) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::with_capacity(lines.len());
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed(
                "folded header lines are not supported".into(),
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line without ':': {line:.60}")))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(HttpError::Malformed(format!(
                "invalid header name {name:.60}"
            )));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(headers)
}

/// The body length a message declares, refusing transfer encodings and conflicting
/// Content-Length headers.
fn body_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::TransferEncoding);
    }
    let mut length: Option<u64> = None;
    for (_, v) in headers.iter().filter(|(n, _)| n == "content-length") {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 19 {
            return Err(HttpError::Malformed(format!(
                "invalid Content-Length {v:.30}"
            )));
        }
        let n: u64 = v
            .parse()
            .map_err(|_| HttpError::Malformed(format!("invalid Content-Length {v:.30}")))?;
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::Malformed(
                "conflicting Content-Length headers".into(),
            ));
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY_BYTES as u64 => Err(HttpError::BodyTooLarge(n)),
        // The bound check above makes the conversion lossless.
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

/// Parses a request's header section (everything up to and including the blank line).
pub fn parse_request_head(head: &[u8]) -> Result<RequestHead, HttpError> {
    if head.len() > MAX_HEADER_BYTES {
        return Err(HttpError::HeadersTooLarge);
    }
    let lines = head_lines(head)?;
    let (first, rest) = lines
        .split_first()
        .ok_or_else(|| HttpError::Malformed("empty request".into()))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!(
            "bad request line {first:.80}"
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed(format!("bad method {method:.20}")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Malformed(format!(
            "unsupported version {version:.20}"
        )));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "bad request target {target:.80}"
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let headers = parse_headers(rest)?;
    // Without Content-Length there is no body: bytes after the head are ignored, never
    // guessed at (one request per connection).
    let content_length = body_length(&headers)?.unwrap_or(0);
    Ok(RequestHead {
        method: method.to_string(),
        path,
        query,
        headers,
        content_length,
    })
}

/// Parses a response's header section.
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, HttpError> {
    if head.len() > MAX_HEADER_BYTES {
        return Err(HttpError::HeadersTooLarge);
    }
    let lines = head_lines(head)?;
    let (first, rest) = lines
        .split_first()
        .ok_or_else(|| HttpError::Malformed("empty response".into()))?;
    let mut parts = first.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed(format!("bad status line {first:.80}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("bad status line {first:.80}")));
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..=599).contains(c) && code.len() == 3)
        .ok_or_else(|| HttpError::Malformed(format!("bad status code {code:.10}")))?;
    let headers = parse_headers(rest)?;
    Ok(ResponseHead {
        status,
        content_length: body_length(&headers)?,
    })
}

/// Reads until the end of the header section; returns (head, bytes read past it).
fn read_head_blocking(r: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Only read as much as may still belong to the header section (plus what a
        // single read may bring of the body), so memory stays bounded.
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Eof);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[scan_from..]).map(|e| e + scan_from) {
            if end > MAX_HEADER_BYTES {
                return Err(HttpError::HeadersTooLarge);
            }
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEADER_BYTES {
            return Err(HttpError::HeadersTooLarge);
        }
    }
}

/// Reads exactly `len` body bytes, starting with those already read past the head.
fn read_body_blocking(
    r: &mut impl Read,
    mut body: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>, HttpError> {
    body.truncate(len);
    if body.len() < len {
        let already = body.len();
        body.resize(len, 0);
        r.read_exact(&mut body[already..]).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                HttpError::Eof
            } else {
                HttpError::Io(e)
            }
        })?;
    }
    Ok(body)
}

/// Reads one request (blocking). Limits are checked before the body is allocated.
pub fn read_request(r: &mut impl Read) -> Result<Request, HttpError> {
    let (head, rest) = read_head_blocking(r)?;
    let head = parse_request_head(&head)?;
    let body = read_body_blocking(r, rest, head.content_length)?;
    Ok(Request {
        method: head.method,
        path: head.path,
        query: head.query,
        headers: head.headers,
        body,
    })
}

/// The reason phrase for the status codes we use.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Serializes a complete response with a JSON body.
pub fn encode_response(status: u16, body: &serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    encode_raw_response(status, "application/json", &body)
}

/// Serializes a complete response with an arbitrary body (used for `/metrics`).
pub fn encode_raw_response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Writes a response with a JSON body (blocking).
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    body: &serde_json::Value,
) -> Result<(), HttpError> {
    w.write_all(&encode_response(status, body))?;
    w.flush()?;
    Ok(())
}

/// Convenience: an error response body `{"error": message}`.
pub fn error_body(message: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": message.to_string() })
}

/// Serializes a request with an optional JSON body.
pub fn encode_request(method: &str, path: &str, body: Option<&serde_json::Value>) -> Vec<u8> {
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap_or_else(|_| b"null".to_vec()))
        .unwrap_or_default();
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Reads one response (blocking): status and raw body.
pub fn read_response(r: &mut impl Read) -> Result<(u16, Vec<u8>), HttpError> {
    let (head, rest) = read_head_blocking(r)?;
    let head = parse_response_head(&head)?;
    let body = match head.content_length {
        Some(len) => read_body_blocking(r, rest, len)?,
        None => {
            // No length: the body runs to EOF (Connection: close), still bounded.
            let mut body = rest;
            let mut limited = r.take((MAX_BODY_BYTES + 1).saturating_sub(body.len()) as u64);
            limited.read_to_end(&mut body)?;
            if body.len() > MAX_BODY_BYTES {
                return Err(HttpError::BodyTooLarge(body.len() as u64));
            }
            body
        }
    };
    Ok((head.status, body))
}

/// Parses a response body as JSON (`null` when empty).
fn body_json(body: &[u8]) -> Result<serde_json::Value, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| HttpError::Json(e.to_string()))
}

/// Blocking client: one request on a fresh connection, with [`DEFAULT_TIMEOUT`].
pub fn request(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), HttpError> {
    request_with_timeout(socket_path, method, path, body, Some(DEFAULT_TIMEOUT))
}

/// Blocking client with an explicit timeout for each read and write (`None`: wait
/// forever, for calls such as `PUT /v1/migrate` that block until a migration ends).
pub fn request_with_timeout(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Option<Duration>,
) -> Result<(u16, serde_json::Value), HttpError> {
    let (status, raw) = request_raw(socket_path, method, path, body, timeout)?;
    Ok((status, body_json(&raw)?))
}

/// Like [`request_with_timeout`] but returns the body unparsed (for `/metrics`).
pub fn request_raw(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let socket_path = socket_path.as_ref();
    let mut stream = UnixStream::connect(socket_path).map_err(|source| HttpError::Connect {
        path: socket_path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    stream.write_all(&encode_request(method, path, body))?;
    stream.flush()?;
    read_response(&mut stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(bytes: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &bytes[..])
    }

    #[test]
    fn parses_simple_get() {
        let r = req(b"GET /v1/status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/v1/status");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.header("HOST"), Some("a"));
        assert!(r.body.is_empty());
        assert_eq!(r.json().unwrap(), serde_json::Value::Null);
    }

    #[test]
    fn parses_body_with_content_length() {
        let r = req(b"PUT /v1/migrate HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"to\":\"x\"}\nEXTRA")
            .unwrap();
        assert_eq!(r.body, b"{\"to\":\"x\"}\n");
        assert_eq!(r.json().unwrap()["to"], "x");
    }

    #[test]
    fn accepts_bare_newlines() {
        let r = req(b"GET / HTTP/1.0\nA: b\n\n").unwrap();
        assert_eq!(r.header("a"), Some("b"));
    }

    #[test]
    fn refuses_chunked() {
        let e = req(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .unwrap_err();
        assert!(matches!(e, HttpError::TransferEncoding), "{e}");
        assert_eq!(e.status(), 501);
        assert!(e.to_string().contains("Content-Length"));
    }

    #[test]
    fn refuses_large_headers_without_reading_everything() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 10));
        big.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(req(&big), Err(HttpError::HeadersTooLarge)));
        // An endless header stream stops at the limit too.
        let mut endless = std::io::repeat(b'a');
        assert!(matches!(
            read_request(&mut endless),
            Err(HttpError::HeadersTooLarge)
        ));
    }

    #[test]
    fn refuses_large_body_before_allocating() {
        let e = req(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").unwrap_err();
        assert!(matches!(e, HttpError::BodyTooLarge(99_999_999_999)));
        assert_eq!(e.status(), 413);
        let e =
            req(b"PUT / HTTP/1.1\r\nContent-Length: 999999999999999999999999\r\n\r\n").unwrap_err();
        assert!(matches!(e, HttpError::Malformed(_)));
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / \r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"GET / HTTP/1.1\r\n\xff\xfe: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a",
        ];
        for case in cases {
            assert!(
                req(case).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(case)
            );
        }
        let r = req(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}").unwrap();
        assert!(matches!(r.json(), Err(HttpError::Json(_))));
    }

    #[test]
    fn response_round_trip() {
        let bytes = encode_response(404, &error_body("no such VM"));
        let (status, body) = read_response(&mut &bytes[..]).unwrap();
        assert_eq!(status, 404);
        assert_eq!(body_json(&body).unwrap()["error"], "no such VM");
        assert!(parse_response_head(b"HTTP/1.1 9999 X\r\n\r\n").is_err());
        assert!(parse_response_head(b"FTP 200 OK\r\n\r\n").is_err());
        let (s, b) = read_response(&mut &b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}"[..]).unwrap();
        assert_eq!((s, body_json(&b).unwrap()["a"].as_u64()), (200, Some(1)));
    }

    #[test]
    fn request_encoding_parses_back() {
        let body = serde_json::json!({"to": "unix:/x", "local": true});
        let bytes = encode_request("PUT", "/v1/migrate", Some(&body));
        let r = req(&bytes).unwrap();
        assert_eq!(r.json().unwrap(), body);
    }

    #[test]
    fn blocking_client_against_thread_server() {
        let dir = std::env::temp_dir().join(format!("http-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let r = read_request(&mut s).unwrap();
            write_response(&mut s, 200, &serde_json::json!({"path": r.path})).unwrap();
        });
        let (status, body) = request(&sock, "GET", "/v1/status", None).unwrap();
        server.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["path"], "/v1/status");
        let e = request(dir.join("missing.sock"), "GET", "/", None).unwrap_err();
        assert!(matches!(e, HttpError::Connect { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
