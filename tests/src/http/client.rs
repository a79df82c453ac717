//! Well-behaved clients: hyper's HTTP/1.1 client on connections of the
//! test's own, tokio-tungstenite for WebSocket, and the real `curl`.

use std::{
    fs::File,
    io::{Read as _, Seek as _},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{
    Method, Request, Response,
    body::{Body, Incoming},
    client::conn::http1::{self, SendRequest},
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, runtime::Runtime};
use tokio_tungstenite::tungstenite::Message;

use super::{HttpError, Reply, header_pairs, pattern::PatternBody, pattern_matches};

/// Longest response body a [`Reply`] holds.
const BODY_LIMIT: usize = 64 << 20;
/// Longest [`stream_upload`] or [`stream_download`], connecting included.
pub const TRANSFER_LIMIT: Duration = Duration::from_mins(2);
/// Longest a [`curl`] may run, whatever `--max-time` it is given.
const CURL_LIMIT: Duration = Duration::from_mins(1);

/// One HTTP/1.1 connection, kept alive across requests: what the
/// distributor must route request by request, not connection by
/// connection. Made in the calling thread's namespace; usable from any
/// thread afterwards. Closed on drop.
pub struct KeptAlive {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    timeout: Duration,
    /// Drives the connection while a request is under way; dropping it
    /// closes the connection.
    rt: Runtime,
}

impl KeptAlive {
    /// Connects to `addr`. `timeout` bounds the connect and each request,
    /// body included.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, HttpError> {
        let stream = super::connect(addr, timeout)?;
        let rt = super::runtime();
        let sender = rt.block_on(async {
            let (sender, conn) = http1::handshake(TokioIo::new(into_tokio(stream))).await?;
            // Runs only while `send` blocks on the runtime, which is when
            // the connection has anything to do.
            tokio::spawn(conn);
            Ok::<_, HttpError>(sender)
        })?;
        Ok(Self {
            sender,
            host: host(addr),
            timeout,
            rt,
        })
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Reply, HttpError> {
        self.send(
            Request::get(path)
                .body(Bytes::new())
                .expect("a valid GET request"),
        )
    }

    /// Sends `req` (with `Host` set to the address connected to, if it has
    /// none) and reads its whole response.
    pub fn send(&mut self, req: Request<Bytes>) -> Result<Reply, HttpError> {
        let mut req = req.map(Full::new);
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        let (sender, limit) = (&mut self.sender, self.timeout);
        self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                sender.ready().await?;
                collect(sender.send_request(req).await?).await
            })
            .await
            .map_err(|_| HttpError::Timeout {
                what: "a request on a kept-alive connection",
                limit,
            })?
        })
    }

    /// Whether the connection is closed (by the server, or after an error):
    /// every further request would fail.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Uploads `total_bytes` pattern bytes to `path` with POST, on a connection
/// of its own, made a chunk at a time: `chunked`, or with `Content-Length`.
/// A [`super::Backend`] answers [`super::upload_reply`]`(total_bytes)`.
pub fn stream_upload(
    addr: SocketAddr,
    path: &str,
    total_bytes: u64,
    chunked: bool,
) -> Result<Reply, HttpError> {
    stream_upload_as(Method::POST, addr, path, total_bytes, chunked)
}

/// As [`stream_upload`], with `method` (a GET with a body, say).
pub fn stream_upload_as(
    method: Method,
    addr: SocketAddr,
    path: &str,
    total_bytes: u64,
    chunked: bool,
) -> Result<Reply, HttpError> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host(addr));
    if chunked {
        // hyper would send a GET's body of unknown length as none at all.
        req = req.header(header::TRANSFER_ENCODING, "chunked");
    }
    let req = req
        .body(PatternBody::new(total_bytes, !chunked))
        .expect("a valid request");
    exchange(addr, req, "an upload", collect)
}

/// What [`stream_download`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Download {
    pub status: u16,
    pub instance: Option<String>,
    /// Body bytes received.
    pub bytes: u64,
    /// Whether every byte was the pattern ([`super::pattern_matches`]).
    pub pattern_ok: bool,
    /// Whether the body ended as its framing said; false if the connection
    /// broke first.
    pub complete: bool,
}

/// `GET path` on a connection of its own, reading the body as it comes and
/// checking it against the pattern, never holding it whole.
pub fn stream_download(addr: SocketAddr, path: &str) -> Result<Download, HttpError> {
    let req = Request::get(path)
        .header(header::HOST, host(addr))
        .body(Empty::<Bytes>::new())
        .expect("a valid GET request");
    exchange(addr, req, "a download", |resp| async move {
        let mut got = Download {
            status: resp.status().as_u16(),
            instance: resp
                .headers()
                .get("x-instance")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            bytes: 0,
            pattern_ok: true,
            complete: true,
        };
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                got.complete = false;
                break;
            };
            if let Some(data) = frame.data_ref() {
                got.pattern_ok &= pattern_matches(got.bytes, data);
                got.bytes += data.len() as u64;
            }
        }
        Ok(got)
    })
}

/// Opens a WebSocket to `ws://addr/path`, sends each message as text and
/// waits for its echo; returns the echoes, in order. `timeout` bounds it
/// all.
pub fn ws_echo(
    addr: SocketAddr,
    path: &str,
    messages: &[&str],
    timeout: Duration,
) -> Result<Vec<String>, HttpError> {
    let stream = super::connect(addr, timeout)?;
    super::runtime().block_on(async {
        tokio::time::timeout(timeout, async {
            let url = format!("ws://{addr}{path}");
            let (mut ws, _) = tokio_tungstenite::client_async(url, into_tokio(stream)).await?;
            let mut echoes = Vec::with_capacity(messages.len());
            for &m in messages {
                ws.send(Message::text(m)).await?;
                // Pings and pongs in between are not echoes.
                let echo = loop {
                    match ws.next().await.transpose()? {
                        Some(Message::Text(t)) => break t.to_string(),
                        Some(Message::Binary(b)) => break String::from_utf8_lossy(&b).into_owned(),
                        Some(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                        Some(Message::Close(_)) | None => {
                            return Err(HttpError::WebSocketClosed {
                                sent: messages.len(),
                                echoed: echoes.len(),
                            });
                        }
                    }
                };
                echoes.push(echo);
            }
            // Closing politely is the server's courtesy, not the test's
            // concern.
            let _ = ws.close(None).await;
            Ok(echoes)
        })
        .await
        .map_err(|_| HttpError::Timeout {
            what: "a WebSocket echo",
            limit: timeout,
        })?
    })
}

/// Runs the real `curl -sS --max-time 10 -w '\n%{http_code}' ARGS...` in
/// namespace `ns` and returns the status and body. `args` hold the URL and
/// may override `--max-time` (the run is cut at a minute regardless), but
/// not `-w`. Err if curl failed (no connection, timeout): its stderr says
/// why.
pub fn curl(ns: &str, args: &[&str]) -> Result<(u16, String), HttpError> {
    let scratch = || tempfile::tempfile().expect("a temporary file for curl's output");
    let (mut out, mut err) = (scratch(), scratch());
    let to = |f: &File| Stdio::from(f.try_clone().expect("a second handle on a temporary file"));
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", sluice::sys::netns::named(ns).display()))
        .args(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(to(&out))
        .stderr(to(&err))
        .spawn()
        .expect("running nsenter curl (are util-linux and curl installed?)");
    let deadline = Instant::now() + CURL_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for curl") {
            break status;
        }
        if Instant::now() >= deadline {
            // Still running, so the pid is still curl's.
            let _ = child.kill();
            let _ = child.wait();
            return Err(HttpError::Timeout {
                what: "curl",
                limit: CURL_LIMIT,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &mut File| {
        let mut bytes = Vec::new();
        f.rewind()
            .and_then(|()| f.read_to_end(&mut bytes))
            .expect("reading curl's output back");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    if !status.success() {
        return Err(HttpError::Curl {
            args: args.join(" "),
            status,
            stderr: stderr.trim().to_owned(),
        });
    }
    let (body, code) = stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl printed no status line: {stdout:?}"));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl's status {code:?} is not a number"));
    Ok((code, body.to_owned()))
}

/// One request on a connection of its own, its response handed to
/// `consume`; all within [`TRANSFER_LIMIT`].
fn exchange<B, T, F>(
    addr: SocketAddr,
    req: Request<B>,
    what: &'static str,
    consume: impl FnOnce(Response<Incoming>) -> F,
) -> Result<T, HttpError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = Result<T, HttpError>>,
{
    let stream = super::connect(addr, TRANSFER_LIMIT)?;
    super::runtime().block_on(async {
        tokio::time::timeout(TRANSFER_LIMIT, async {
            let (mut sender, conn) = http1::handshake(TokioIo::new(into_tokio(stream))).await?;
            tokio::spawn(conn);
            consume(sender.send_request(req).await?).await
        })
        .await
        .map_err(|_| HttpError::Timeout {
            what,
            limit: TRANSFER_LIMIT,
        })?
    })
}

/// The whole response, its body at most [`BODY_LIMIT`].
async fn collect(resp: Response<Incoming>) -> Result<Reply, HttpError> {
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => HttpError::Http(*e),
            Err(_) => HttpError::TooLarge { limit: BODY_LIMIT },
        })?
        .to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: header_pairs(&parts.headers),
        body: body.to_vec(),
    })
}

/// A connected blocking stream as tokio's, on the runtime being entered.
fn into_tokio(stream: std::net::TcpStream) -> TcpStream {
    stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
        .expect("handing a connection to tokio")
}

/// `Host` for `addr` (`[v6]:port` for IPv6).
fn host(addr: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string()).expect("an address is a valid header value")
}
