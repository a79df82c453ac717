//! The distributor's end of a connection to an instance: HTTP/1.1 requests
//! written and responses read by the client connection's own task, as
//! Pingora does. hyper's client would run each connection as a task of its
//! own and pass every request, response and body chunk between the two over
//! channels: several task wake-ups a request for nothing, since one client
//! request uses one instance connection at a time.
//!
//! The client side stays hyper's (it is what frames untrusted input); this
//! side reads what an instance answers, with the same care: the response's
//! framing is decided as RFC 9112, 6.3 says, heads and chunk framing are
//! bounded, and a connection is reused only when its exchange ended cleanly.

use std::{
    io,
    task::{Context, Poll, Waker, ready},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use hyper::{
    HeaderMap, StatusCode, Version,
    header::{self, HeaderName, HeaderValue},
    http::request::Parts,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    net::TcpStream,
};

use super::chunked;

/// Most bytes of a response head (status line and headers), and most
/// headers in it: hyper's client defaults.
const MAX_HEAD_BYTES: usize = 400 * 1024;
const MAX_HEADERS: usize = 100;
/// How much is read at once.
const READ_BYTES: usize = 16 * 1024;

/// A connection to an instance and the bytes read from it not yet used.
pub(super) struct Upstream {
    pub(super) stream: TcpStream,
    pub(super) buf: BytesMut,
    /// Where request heads are written (kept: one allocation a connection).
    pub(super) out: BytesMut,
}

/// Why an instance's response could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("reading from the instance")]
    Io(#[from] io::Error),
    /// Closed before a whole response; `any` says whether any of it came.
    #[error("the instance closed the connection {}", if *.any { "mid-response" } else { "before answering" })]
    Closed { any: bool },
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("malformed chunked body: {0}")]
    Chunk(#[from] chunked::ChunkError),
    /// The client broke the request body while the answer was relayed.
    #[error("the client broke its request body")]
    ClientBody,
}

/// How a request's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sending {
    /// No body, and no framing header (a GET as most are).
    Nothing,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: the length is not known.
    Chunked,
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// None (a HEAD's response, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked(chunked::Decoder),
    /// Until the instance closes the connection.
    Close,
    /// 101: the connection is the tunnel's from here.
    Upgrade,
}

/// A response head as read.
pub(super) struct Head {
    pub(super) status: StatusCode,
    /// The instance's reason phrase when it is not the status's usual one.
    pub(super) reason: Option<hyper::ext::ReasonPhrase>,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    /// Whether the connection may carry another request after this
    /// response's body.
    pub(super) keep_alive: bool,
}

impl Upstream {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// Whether an idle connection can carry a request: the instance sent
    /// nothing on it while it idled (bytes or an end mean it is closing or
    /// out of step). No system call unless the socket was last seen
    /// readable.
    pub(super) fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // Unconstrained: out of its task's budget, tokio would say
        // `Pending` without looking at the socket.
        let ready = std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(|cx| {
            self.stream.poll_read_ready(cx)
        })));
        match ready.poll(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Reads more into the buffer (0: the instance closed).
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            self.buf.reserve(READ_BYTES);
            match self.stream.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    /// Reads the response head (see [`read_head`]).
    pub(super) async fn read_head(&mut self, to_head: bool) -> Result<Head, ReadError> {
        read_head(&mut self.stream, &mut self.buf, to_head).await
    }
}

/// Reads a response head from `rd` into `buf`, past any 1xx interim
/// response but 101; what follows it stays in `buf`.
pub(super) async fn read_head(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    to_head: bool,
) -> Result<Head, ReadError> {
    let mut any = !buf.is_empty();
    loop {
        if let Some(head) = parse(buf, to_head)? {
            return Ok(head);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(ReadError::HeadTooLarge);
        }
        buf.reserve(READ_BYTES);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed { any }),
            Ok(_) => any = true,
            // A kept-alive connection the instance closed as the request
            // arrived is reset: as good as closed before answering.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !any => {
                return Err(ReadError::Closed { any });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes a request head for `parts` with the framing of `sending` into
/// `out`: the client's own framing headers are replaced.
pub(super) fn write_head(parts: &Parts, sending: Sending, out: &mut BytesMut) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.reserve(256 + target.len());
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    match sending {
        Sending::Nothing => {}
        Sending::Length(n) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa(n, &mut [0; 20]));
            out.put_slice(b"\r\n");
        }
        Sending::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
}

/// `n` in decimal, in `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Writes one chunk's framing around `len` bytes of data (`len` 0: the
/// last chunk, no trailers).
pub(super) fn chunk_prefix(len: usize, out: &mut BytesMut) {
    if len == 0 {
        out.put_slice(b"0\r\n\r\n");
    } else {
        let mut hex = [0u8; 16];
        let mut at = hex.len();
        let mut n = len;
        loop {
            at -= 1;
            hex[at] = b"0123456789abcdef"[n % 16];
            n /= 16;
            if n == 0 {
                break;
            }
        }
        out.put_slice(&hex[at..]);
        out.put_slice(b"\r\n");
    }
}

/// A response head parsed out of `buf` (and cut off it), or none yet.
fn parse(buf: &mut BytesMut, to_head: bool) -> Result<Option<Head>, ReadError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut headers);
        let len = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Head("more than 100 headers"));
            }
            Err(_) => return Err(ReadError::Head("not HTTP/1.x")),
        };
        let code = r.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| ReadError::Head("status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints: the final response follows.
            let _ = buf.split_to(len);
            continue;
        }
        let reason = r
            .reason
            .filter(|why| status.canonical_reason() != Some(*why))
            .and_then(|why| hyper::ext::ReasonPhrase::try_from(why.as_bytes()).ok());
        let version = if r.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values are cut off the head without a copy: where each
        // name and value lies, then the head frozen.
        let base = buf.as_ptr() as usize;
        let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
        let n = r.headers.len();
        for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            *span = (name, name + h.name.len(), value, value + h.value.len());
        }
        let head = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(n);
        for &(a, b, c, d) in &spans[..n] {
            let name =
                HeaderName::from_bytes(&head[a..b]).map_err(|_| ReadError::Head("header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(c..d))
                .map_err(|_| ReadError::Head("header value"))?;
            map.append(name, value);
        }
        return frame(status, version, map, to_head).map(|h| Some(Head { reason, ..h }));
    }
}

/// The response's framing (RFC 9112, 6.3) and whether the connection can
/// be kept.
fn frame(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    to_head: bool,
) -> Result<Head, ReadError> {
    let mut keep_alive = connection_kept(&headers, version);
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        Framing::Upgrade
    } else if to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if let Some(chunked) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(last_coding_is_chunked)
    {
        // Both framings: the length is not to be trusted, nor the
        // connection after (RFC 9112, 6.3, 3).
        if headers.remove(header::CONTENT_LENGTH).is_some()
            || version == Version::HTTP_10
            || chunked_twice(&headers)
        {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(chunked::Decoder::default())
        } else {
            Framing::Close
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Head {
        status,
        reason: None,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// `chunked` named more than once over the `Transfer-Encoding` lines.
fn chunked_twice(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count()
        > 1
}

fn last_coding_is_chunked(te: &HeaderValue) -> bool {
    te.as_bytes()
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// One length, however many times it is repeated (RFC 9110, 8.6); two
/// different ones are an error.
fn content_length(headers: &HeaderMap) -> Result<u64, ReadError> {
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(ReadError::Head("Content-Length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(ReadError::Head("two Content-Length values"));
            }
            length = Some(n);
        }
    }
    length.ok_or(ReadError::Head("Content-Length"))
}

/// Whether the instance keeps the connection open after this response.
fn connection_kept(headers: &HeaderMap, version: Version) -> bool {
    let mut close = version == Version::HTTP_10;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                return false;
            }
            if token.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    !close
}

/// What a response body's next read gave.
pub(super) enum Read {
    Data(Bytes),
    /// The body ended; the connection may be reused when the exchange was
    /// clean.
    End,
}

/// Reads the next part of a response body framed by `framing`.
pub(super) fn poll_body(
    up: &mut Upstream,
    framing: &mut Framing,
    cx: &mut Context<'_>,
) -> Poll<Result<Read, ReadError>> {
    loop {
        match framing {
            Framing::Empty | Framing::Upgrade | Framing::Length(0) => {
                return Poll::Ready(Ok(Read::End));
            }
            Framing::Length(left) if !up.buf.is_empty() => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(up.buf.len());
                *left -= n as u64;
                return Poll::Ready(Ok(Read::Data(up.buf.split_to(n).freeze())));
            }
            Framing::Chunked(d) => match d.decode(&mut up.buf)? {
                chunked::Decoded::Data(b) => return Poll::Ready(Ok(Read::Data(b))),
                chunked::Decoded::End => {
                    *framing = Framing::Empty;
                    return Poll::Ready(Ok(Read::End));
                }
                chunked::Decoded::More => {}
            },
            Framing::Close if !up.buf.is_empty() => {
                let all = up.buf.split().freeze();
                return Poll::Ready(Ok(Read::Data(all)));
            }
            Framing::Length(_) | Framing::Close => {}
        }
        if ready!(up.poll_fill(cx))? == 0 {
            if *framing == Framing::Close {
                *framing = Framing::Empty;
                return Poll::Ready(Ok(Read::End));
            }
            return Poll::Ready(Err(ReadError::Closed { any: true }));
        }
    }
}

#[cfg(test)]
mod tests;
