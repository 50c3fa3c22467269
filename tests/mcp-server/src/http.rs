//! Just enough HTTP/1.1 for protocol v1: requests with Content-Length bodies, keep-alive, multipart/form-data.

use std::io::{BufRead, Read, Write};

/// Longest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the client asked to close the connection after this request.
    pub fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

#[derive(Debug)]
pub enum HttpError {
    /// The connection failed or was closed mid-request.
    Io(std::io::Error),
    /// The request is malformed: answer with this status and close.
    Bad(u16, String),
}

impl From<std::io::Error> for HttpError {
    fn from(e: std::io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// Reads one request; `Ok(None)` when the client closed the connection between requests.
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let budget = (MAX_HEAD_BYTES + 1).saturating_sub(head.len()) as u64;
        let n = reader.take(budget).read_until(b'\n', &mut line)?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(HttpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD_BYTES {
            return Err(HttpError::Bad(431, "request head too large".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(HttpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if line == b"\r\n" || line == b"\n" {
            if head.len() == line.len() {
                // Tolerate an empty line before the request line.
                head.clear();
                continue;
            }
            break;
        }
    }
    let text = std::str::from_utf8(&head)
        .map_err(|_| HttpError::Bad(400, "request head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad(400, "malformed request line".into()));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Bad(505, format!("{version} is not supported")));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Bad(400, "malformed header line".into()));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Err(HttpError::Bad(
            411,
            "chunked bodies are not accepted; send Content-Length".into(),
        ));
    }
    let length = match request.header("content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| HttpError::Bad(400, "bad Content-Length".into()))?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return Err(HttpError::Bad(
            413,
            format!("body of {length} bytes is over the limit of {MAX_BODY_BYTES}"),
        ));
    }
    request.body = vec![0; length];
    reader.read_exact(&mut request.body)?;
    Ok(Some(request))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    }
}

/// A response to write.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Extra headers (Content-Type, Content-Length and Connection are added).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
            content_type: "application/json",
        }
    }
}

/// Writes a response.
pub fn write_response(
    writer: &mut impl Write,
    response: &Response,
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let body = &response.body;
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    writer.write_all(&out)?;
    writer.flush()
}

/// One part of a multipart/form-data body.
#[derive(Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub data: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Splits a multipart/form-data body (RFC 7578) into its named parts.
pub fn multipart(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    let mut params = content_type.split(';').map(str::trim);
    if !params
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/form-data"))
    {
        return Err(format!(
            "Content-Type is {content_type:?}, expected multipart/form-data"
        ));
    }
    let boundary = params
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or("multipart/form-data without a boundary")?;
    let delimiter = format!("--{boundary}").into_bytes();
    let mut pos = find(body, &delimiter, 0).ok_or("no multipart boundary in the body")?;
    let mut parts = Vec::new();
    loop {
        pos += delimiter.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        if body.get(pos..pos + 2) != Some(b"\r\n") {
            return Err("malformed multipart boundary line".into());
        }
        pos += 2;
        let head_end = find(body, b"\r\n\r\n", pos).ok_or("multipart part without headers")?;
        let head = std::str::from_utf8(&body[pos..head_end])
            .map_err(|_| "multipart headers are not UTF-8")?;
        let name = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case("content-disposition"))
            .flat_map(|(_, v)| v.split(';').map(str::trim))
            .find_map(|p| p.strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_owned())
            .ok_or("multipart part without a name")?;
        let data_start = head_end + 4;
        let mut close = b"\r\n".to_vec();
        close.extend_from_slice(&delimiter);
        let data_end = find(body, &close, data_start).ok_or("multipart part is not closed")?;
        parts.push(Part {
            name,
            data: body[data_start..data_end].to_vec(),
        });
        if parts.len() > 8 {
            return Err("too many multipart parts".into());
        }
        pos = data_end + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_requests_and_keeps_alive() {
        let raw =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
        let mut reader = std::io::BufReader::new(&raw[..]);
        let first = read_request(&mut reader)
            .expect("first")
            .expect("a request");
        assert_eq!(
            (
                first.method.as_str(),
                first.path.as_str(),
                first.body.as_slice()
            ),
            ("POST", "/a", &b"abc"[..]),
            "first request"
        );
        assert_eq!(
            first.header("host"),
            Some("x"),
            "header names are lower case"
        );
        let second = read_request(&mut reader)
            .expect("second")
            .expect("a request");
        assert_eq!(second.path, "/b", "second request on the same connection");
        assert!(
            read_request(&mut reader).expect("eof").is_none(),
            "clean end"
        );
    }

    #[test]
    fn refuses_oversized_and_chunked_requests() {
        let raw = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let err = read_request(&mut std::io::BufReader::new(raw.as_bytes())).expect_err("too big");
        assert!(matches!(err, HttpError::Bad(413, _)), "{err:?}");
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let err = read_request(&mut std::io::BufReader::new(&raw[..])).expect_err("chunked");
        assert!(matches!(err, HttpError::Bad(411, _)), "{err:?}");
        let raw = vec![b'a'; MAX_HEAD_BYTES + 10];
        let err = read_request(&mut std::io::BufReader::new(&raw[..])).expect_err("long head");
        assert!(
            matches!(err, HttpError::Bad(431, _) | HttpError::Io(_)),
            "{err:?}"
        );
    }

    #[test]
    fn splits_multipart_bodies() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"bundle.json\"; filename=\"bundle.json\"\r\nContent-Type: application/json\r\n\r\n{\"a\":1}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"bundle.sig\"\r\n\r\n\x00\r\n\x01\r\n--XyZ--\r\n";
        let parts = multipart("multipart/form-data; boundary=XyZ", body).expect("parts");
        assert_eq!(
            parts,
            vec![
                Part {
                    name: "bundle.json".into(),
                    data: b"{\"a\":1}".to_vec()
                },
                Part {
                    name: "bundle.sig".into(),
                    data: b"\x00\r\n\x01".to_vec()
                },
            ],
            "both parts, binary data intact"
        );
        assert!(multipart("application/json", body).is_err(), "wrong type");
        assert!(multipart("multipart/form-data; boundary=XyZ", b"--XyZ\r\nbroken").is_err());
    }
}
