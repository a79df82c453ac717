//! Bytes on a socket, for what a well-behaved client never sends: pipelined
//! requests, malformed heads, smuggling attempts (`Content-Length` with
//! `Transfer-Encoding`), a head dribbled a byte at a time.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{HttpError, Reply};

/// Most bytes [`raw_exchange`] reads back.
const RAW_LIMIT: usize = 64 << 20;
/// Most headers a response head may have for [`parse_responses`].
const MAX_HEADERS: usize = 64;

/// Writes `bytes` on a fresh connection to `addr` and reads what comes
/// back until the server closes, `timeout` has passed (since connecting),
/// or 64 MiB. A kept-alive connection stays open until the timeout: end the
/// last request with `Connection: close` to return as soon as it is
/// answered. Err only if the connection could not be made; a reset ends
/// the read with what had arrived.
pub fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let deadline = Instant::now() + timeout;
    let mut stream = super::connect(addr, timeout)?;
    // A server may refuse and close before reading it all; what it said
    // before closing is still there to read.
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    while out.len() < RAW_LIMIT {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream
            .set_read_timeout(Some(left))
            .expect("setting a read timeout");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The complete responses in `data`, in order: interim ones (`100
/// Continue`) too, each with an empty body. A body is delimited by
/// `Transfer-Encoding: chunked` (decoded; trailers dropped), by
/// `Content-Length`, or else by the end of `data`; 204 and 304 have none.
/// Parsing stops after a `101` (what follows is another protocol) and at
/// the first response that is malformed or cut short, which is left out.
/// Responses to `HEAD` cannot be told from here: don't mix them in.
#[must_use]
pub fn parse_responses(mut data: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    // Every round consumes at least a head, so it ends.
    while !data.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = head.parse(data) else {
            break;
        };
        let status = head.code.unwrap_or_default();
        let headers: Vec<(String, String)> = head
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).into_owned();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        data = &data[head_len..];
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = reply
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        let length = reply
            .header("content-length")
            .map(|v| v.trim().parse::<usize>());
        if status == 101 {
            out.push(reply);
            break;
        } else if status < 200 || status == 204 || status == 304 {
            // No body.
        } else if chunked {
            let Some((body, used)) = dechunk(data) else {
                break;
            };
            reply.body = body;
            data = &data[used..];
        } else if let Some(length) = length {
            let Some(body) = length.ok().and_then(|n| data.get(..n)) else {
                break;
            };
            reply.body = body.to_vec();
            data = &data[body.len()..];
        } else {
            reply.body = data.to_vec();
            data = &[];
        }
        out.push(reply);
    }
    out
}

/// Decodes a chunked body at the start of `data`: the body and how many
/// bytes it took, trailers included. None if malformed or cut short.
fn dechunk(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    // Every round consumes at least a line, so it ends.
    loop {
        let line = line_at(data, at)?;
        at += line.len() + 2;
        let size = std::str::from_utf8(line).ok()?;
        let size = size.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let trailer = line_at(data, at)?;
                at += trailer.len() + 2;
                if trailer.is_empty() {
                    return Some((body, at));
                }
            }
        }
        body.extend_from_slice(data.get(at..at.checked_add(size)?)?);
        at += size;
        if data.get(at..at + 2)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

/// The line starting at `at`, without its CRLF; None if it has no end.
fn line_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let rest = data.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some(&rest[..end])
}

/// What a [`slowloris`] run came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlowlorisResult {
    /// Head bytes written.
    pub sent: usize,
    /// When the server acted, or the whole run if it did not.
    pub after: Duration,
    pub end: SlowlorisEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlowlorisEnd {
    /// The server let the head dribble on for the whole run.
    Open,
    /// It closed the connection without a word.
    Closed,
    Reset,
    /// It answered (a 408, say; 0 if the status line did not parse), with
    /// these bytes.
    Answered {
        status: u16,
        bytes: Vec<u8>,
    },
}

/// Sends a request head that never ends, a byte every `dribble`, for at
/// most `total`, and reports what the server did about it. A server that
/// guards against slow clients closes or answers well before `total`.
pub fn slowloris(
    addr: SocketAddr,
    dribble: Duration,
    total: Duration,
) -> Result<SlowlorisResult, HttpError> {
    const HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: slowloris.test\r\n";
    const FILLER: &[u8] = b"X-Slow: a\r\n";
    assert!(!dribble.is_zero(), "slowloris needs a pause between bytes");
    let mut stream = super::connect(addr, total.max(dribble))?;
    stream
        .set_read_timeout(Some(dribble))
        .expect("setting a read timeout");
    let start = Instant::now();
    let rounds = usize::try_from(total.as_nanos() / dribble.as_nanos()).unwrap_or(usize::MAX);
    let mut sent = 0;
    let mut buf = [0; 4096];
    let end = |end, sent| SlowlorisResult {
        sent,
        after: start.elapsed(),
        end,
    };
    for &byte in HEAD
        .iter()
        .chain(FILLER.iter().cycle())
        .take(rounds.saturating_add(1))
    {
        if start.elapsed() >= total {
            break;
        }
        match stream.write(&[byte]) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Ok(end(SlowlorisEnd::Reset, sent));
            }
            Err(_) => return Ok(end(SlowlorisEnd::Closed, sent)),
        }
        // The read's timeout is the pause before the next byte.
        match stream.read(&mut buf) {
            Ok(0) => return Ok(end(SlowlorisEnd::Closed, sent)),
            Ok(n) => {
                let at = start.elapsed();
                let bytes = read_rest(&mut stream, &buf[..n]);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut head = httparse::Response::new(&mut headers);
                let _ = head.parse(&bytes);
                let status = head.code.unwrap_or_default();
                return Ok(SlowlorisResult {
                    sent,
                    after: at,
                    end: SlowlorisEnd::Answered { status, bytes },
                });
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Ok(end(SlowlorisEnd::Reset, sent));
            }
            Err(_) => {}
        }
    }
    Ok(end(SlowlorisEnd::Open, sent))
}

/// `first` and whatever follows it within a second (a server that answers
/// a slow client usually closes right after).
fn read_rest(stream: &mut std::net::TcpStream, first: &[u8]) -> Vec<u8> {
    let mut bytes = first.to_vec();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0; 4096];
    while bytes.len() < RAW_LIMIT {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_responses_come_out_in_order() {
        let data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Instance: a\r\n\r\nhi\
HTTP/1.1 100 Continue\r\n\r\n\
HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n\
HTTP/1.1 204 No Content\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let got = parse_responses(data);
        let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 100, 404, 204, 200]);
        assert_eq!(got[0].body, b"hi");
        assert_eq!(
            got[0].instance(),
            Some("a"),
            "header names are matched in any case"
        );
        assert_eq!(got[2].body, b"abcde");
        assert!(got[1].body.is_empty() && got[3].body.is_empty() && got[4].body.is_empty());
    }

    #[test]
    fn a_body_without_length_runs_to_the_end() {
        let got =
            parse_responses(b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP\r\n\r\nall of it\r\n\r\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, b"all of it\r\n\r\n");
    }

    #[test]
    fn a_response_cut_short_is_left_out() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx".to_vec();
        for tail in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nabc",
            b"garbage\r\n\r\n",
        ] {
            let got = parse_responses(&[&ok[..], tail].concat());
            assert_eq!(got.len(), 1, "{:?}", String::from_utf8_lossy(tail));
            assert_eq!(got[0].body, b"x");
        }
    }

    #[test]
    fn parsing_stops_at_an_upgrade() {
        let got = parse_responses(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].status, 101);
        assert!(got[0].body.is_empty());
    }
}
