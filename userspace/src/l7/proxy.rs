//! One client connection: hyper parses and frames every request (limits,
//! pipelining in order, `Expect: 100-continue`, chunked bodies streamed),
//! each is routed on its own and relayed over a pooled connection to its
//! instance; an `Upgrade` (WebSocket) is tunnelled to one instance for the
//! rest of the connection.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    http::request::Parts,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_common::key;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf, unix::AsyncFd},
    net::{TcpListener, TcpStream},
};

use super::{
    Backend, Refusal, ServiceL7, Slot,
    admit::Gate,
    forwarded, hop,
    limit::Lease,
    pool,
    pump::{Pump, PumpError},
    relay::{Relay, Reply},
    upload,
    upstream::{self, Framing, Head, Sending, Upstream},
};

/// Accepts connections until the task is aborted, at most the service's
/// cap at once: a pending connection is taken from the listen backlog only
/// once the service has room for it (see [`super::admit`]), so no place
/// under the cap is held by a listener waiting for a client.
pub(super) async fn accept(listener: TcpListener, slot: Arc<Slot>, gate: Arc<Gate>) {
    let listener = match listener.into_std().and_then(|l| {
        // SAFETY: the std listener owns its descriptor, and the AsyncFd owns
        // the listener from here on: the descriptor stays open, the same
        // one, for as long as the AsyncFd lives.
        unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }.map_err(Into::into)
    }) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "watching a listening socket for HTTP connections");
            return;
        }
    };
    loop {
        let mut ready = match listener.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let lease = gate.admit().await;
        let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) else {
            // Gone meanwhile (the client gave up): wait for the next.
            continue;
        };
        match accepted.and_then(|(s, peer)| {
            s.set_nonblocking(true)?;
            Ok((TcpStream::from_std(s)?, peer))
        }) {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, peer, slot.clone(), lease));
            }
            Err(e) => {
                drop(lease);
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!(error = %e, "accepting an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The header count hyper allows when not told (its `DEFAULT_MAX_HEADERS`).
const HYPER_MAX_HEADERS: u32 = 100;

/// A stream that notes when bytes last moved either way.
struct Watched {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    /// Its place under the service's cap, for as long as the connection
    /// lives (an upgraded one too: the tunnel holds the stream).
    _lease: Lease,
}

impl Watched {
    fn touch(&self) {
        self.last.store(super::coarse_ms(), Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves when nothing has moved for `idle`.
async fn idle_for(last: &AtomicU64, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = super::coarse_ms();
        let quiet = now.saturating_sub(last.load(Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, slot: Arc<Slot>, lease: Lease) {
    let svc = slot.current();
    let limits = svc.cfg.limits.clone();
    let local = stream.local_addr().ok();
    let last = Arc::new(AtomicU64::new(super::coarse_ms()));
    let io = Watched {
        inner: stream,
        last: last.clone(),
        _lease: lease,
    };
    let client = Arc::new(Client {
        peer,
        flow: local.map_or(0, |l| {
            key::host::flow(peer, l, sluice_common::maps::PROTO_TCP)
        }),
        forwarding: forwarded::Forwarding::new(peer, local),
        last: last.clone(),
    });
    let handler = service_fn(move |req| {
        let (slot, client) = (slot.clone(), client.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(req, &client, &slot).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes as usize)
        .keep_alive(true);
    // hyper's own limit is 100 on the stack; set, it builds a vector of
    // that many slots each request.
    if limits.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(limits.max_headers as usize);
    }
    let conn = builder
        .serve_connection(TokioIo::new(io), handler)
        .with_upgrades();
    let result = tokio::select! {
        r = conn => r,
        () = idle_for(&last, limits.idle_timeout) => {
            svc.counts.refuse(Refusal::Idle);
            return;
        }
    };
    if let Err(e) = result {
        let why = if e.is_parse_too_large() {
            Some(Refusal::HeaderTooLarge)
        } else if e.is_parse() || e.is_parse_status() {
            Some(Refusal::BadRequest)
        } else if e.is_timeout() {
            Some(Refusal::HeaderTimeout)
        } else {
            // The client went away: not a refusal.
            None
        };
        if let Some(r) = why {
            svc.counts.refuse(r);
        }
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// A response of the distributor's own.
fn answer(status: StatusCode, why: &str) -> Response<Reply> {
    let mut r = Response::new(Reply::Own(Some(Bytes::from(format!("{why}\n")))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn refuse(svc: &ServiceL7, r: Refusal, status: StatusCode, why: &str) -> Response<Reply> {
    svc.counts.refuse(r);
    answer(status, why)
}

/// Safe to send twice (RFC 9110, 9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The client connection a request came on.
struct Client {
    peer: SocketAddr,
    /// The flow key of the connection, as the XDP program would hash it:
    /// a client's requests without a key stay on one instance.
    flow: u32,
    /// Its part of the forwarding headers, made once.
    forwarding: forwarded::Forwarding,
    /// When bytes last moved on it (see [`Watched`]).
    last: Arc<AtomicU64>,
}

impl Client {
    fn watch(&self) -> Arc<AtomicU64> {
        self.last.clone()
    }
}

/// Why a request got no response from an instance.
enum Failure {
    /// It never reached the instance; whether that was the instance's
    /// fault (refused, reset) rather than a busy pool.
    Unsent(bool),
    /// It may have reached it.
    Sent,
    /// A kept-alive connection closed or reset as the request went out,
    /// nothing answered: the instance closing an idle connection as it was
    /// taken, or the instance gone (then its refused connections count).
    Stale,
    /// No response head in time.
    Timeout,
    /// The client broke its own body (a malformed chunk, cut short).
    Client,
}

impl Failure {
    /// Whether it counts against the instance.
    fn theirs(&self) -> bool {
        match self {
            Self::Unsent(theirs) => *theirs,
            Self::Sent | Self::Timeout => true,
            Self::Stale | Self::Client => false,
        }
    }
}

/// Counts a request in flight at an instance until dropped (with the
/// response body it relays).
pub(super) struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(b: &Arc<Backend>) -> Self {
        b.stats.in_flight.fetch_add(1, Relaxed);
        Self(b.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A request body as it goes to an instance.
enum Outgoing {
    /// Read whole (empty: none); can be sent again.
    Whole(Bytes),
    /// Streamed as the client sends it; `None` once sending began.
    Stream(Option<upload::Upload>),
}

impl Outgoing {
    /// Whether it can still be sent (again).
    const fn intact(&self) -> bool {
        !matches!(self, Self::Stream(None))
    }
}

/// How an exchange on a connection broke.
enum Broke {
    Write(std::io::Error),
    Read(upstream::ReadError),
    Timeout,
    Client,
}

/// Writes the request and a body read whole, then reads the response head.
async fn whole(up: &mut Upstream, parts: &Parts, body: &Bytes) -> Result<(Head, Sent), Broke> {
    let sending = if !body.is_empty() {
        Sending::Length(body.len() as u64)
    } else if parts.headers.contains_key(header::CONTENT_LENGTH) {
        // The client said 0: so does the instance's request.
        Sending::Length(0)
    } else {
        Sending::Nothing
    };
    let mut out = std::mem::take(&mut up.out);
    out.clear();
    upstream::write_head(parts, sending, &mut out);
    // Small bodies go in the head's write.
    let r = if body.len() <= COPY_BODY_BELOW {
        out.extend_from_slice(body);
        up.stream.write_all(&out).await
    } else {
        match up.stream.write_all(&out).await {
            Ok(()) => up.stream.write_all(body).await,
            e => e,
        }
    };
    up.out = out;
    let to_head = parts.method == Method::HEAD;
    match r {
        Ok(()) => up
            .read_head(to_head)
            .await
            .map(|h| (h, Sent::Whole))
            .map_err(Broke::Read),
        // An instance that refuses a request (401, 413) may answer and
        // close before it has read the body: its answer is the client's.
        Err(e) => up
            .read_head(to_head)
            .await
            .map(|h| (h, Sent::Partly))
            .map_err(|_| Broke::Write(e)),
    }
}

/// Bodies shorter than this are copied after the head, one write for both.
const COPY_BODY_BELOW: usize = 4096;

/// Writes the request and streams its body as the client sends it, while
/// reading the response head: an instance may answer before it has the
/// whole body (a 413, or an echo). The response timer starts once the body
/// was sent whole. Also gives how the body's sending stands.
async fn streamed(
    up: &mut Upstream,
    parts: &Parts,
    body: upload::Upload,
    wait: Duration,
) -> Result<(Head, Sent), Broke> {
    let sending = match body.size_hint().exact() {
        Some(n) => Sending::Length(n),
        None => Sending::Chunked,
    };
    let mut head = BytesMut::new();
    upstream::write_head(parts, sending, &mut head);
    let mut pump = Pump::new(body, sending == Sending::Chunked, head);
    let to_head = parts.method == Method::HEAD;
    let (mut rd, mut wr) = up.stream.split();
    let head = upstream::read_head(&mut rd, &mut up.buf, to_head);
    let timer = tokio::time::sleep(wait);
    tokio::pin!(head, timer);
    let mut sent = None;
    loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| pump.poll_send(&mut wr, cx)), if sent.is_none() => {
                sent = Some(match r {
                    Ok(()) => Sent::Whole,
                    Err(PumpError::Client) => return Err(Broke::Client),
                    // The instance stopped reading: its answer may be on
                    // its way still.
                    Err(PumpError::Instance) => Sent::Partly,
                });
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            h = &mut head => {
                let h = h.map_err(Broke::Read)?;
                return Ok((h, sent.unwrap_or(Sent::Sending(pump))));
            }
            () = &mut timer, if sent.is_some() => return Err(Broke::Timeout),
        }
    }
}

/// How far a request's body was sent when its response head came.
enum Sent {
    Whole,
    /// Not whole, and no more will be.
    Partly,
    /// Still going: the response body sends the rest as it is read.
    Sending(Pump),
}

/// What an instance answered: the response, and for a 101 the connection
/// (the tunnel's now).
struct Answer {
    resp: Response<Reply>,
    upgraded: Option<Upstream>,
}

/// Sends the request to instance `i` and waits for the response head:
/// within `response_timeout` of the start, or, for a body streamed as the
/// client sends it, of its last byte sent.
async fn send(
    svc: &ServiceL7,
    i: usize,
    parts: &Parts,
    body: &mut Outgoing,
) -> Result<Answer, Failure> {
    let b = &svc.backends[i];
    let start = tokio::time::Instant::now();
    let wait = svc.cfg.response_timeout;
    let mut conn = match b.pool().get(wait).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(instance = %b.name, error = %e, "no connection");
            b.stats.answered(None, 0.0);
            return Err(Failure::Unsent(!matches!(e, pool::PoolError::Busy { .. })));
        }
    };
    let in_flight = InFlight::new(b);
    let result = match body {
        Outgoing::Whole(bytes) => {
            tokio::time::timeout_at(start + wait, whole(&mut conn.up, parts, bytes))
                .await
                .unwrap_or(Err(Broke::Timeout))
        }
        Outgoing::Stream(u) => {
            let u = u.take().expect("a streamed body is sent once");
            streamed(&mut conn.up, parts, u, wait).await
        }
    };
    let (head, sent) = match result {
        Ok(r) => r,
        Err(broke) => {
            let failure = match broke {
                Broke::Client => return Err(Failure::Client),
                Broke::Timeout => Failure::Timeout,
                Broke::Write(_) | Broke::Read(upstream::ReadError::Closed { any: false })
                    if conn.reused =>
                {
                    Failure::Stale
                }
                Broke::Write(e) => {
                    tracing::debug!(instance = %b.name, error = %e, "request failed");
                    Failure::Sent
                }
                Broke::Read(e) => {
                    tracing::debug!(instance = %b.name, error = %e, "response failed");
                    Failure::Sent
                }
            };
            b.stats.answered(None, 0.0);
            return Err(failure);
        }
    };
    b.stats
        .answered(Some(head.status.as_u16()), start.elapsed().as_secs_f64());
    let Head {
        status,
        reason,
        version,
        mut headers,
        framing,
        keep_alive,
    } = head;
    let upgraded = framing == Framing::Upgrade;
    hop::strip(&mut headers, upgraded);
    let mut resp = Response::new(Reply::Own(None));
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    if let Some(reason) = reason {
        resp.extensions_mut().insert(reason);
    }
    *resp.headers_mut() = headers;
    if upgraded {
        return Ok(Answer {
            resp,
            upgraded: Some(conn.up),
        });
    }
    // An instance that answered before it had the whole body may read the
    // rest as a request of its own, answered to the next one sent on the
    // connection: such a connection is closed after this response, never
    // pooled.
    let (reuse, pump) = match sent {
        Sent::Whole => (keep_alive, None),
        Sent::Partly => (false, None),
        Sent::Sending(p) => (false, Some(p)),
    };
    *resp.body_mut() = Reply::Relay(Relay::new(conn, framing, pump, reuse, b.clone(), in_flight));
    Ok(Answer {
        resp,
        upgraded: None,
    })
}

/// Joins an upgraded client connection to its instance until either side
/// closes or nothing moves for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut instance: Upstream,
    last: Arc<AtomicU64>,
    idle: Duration,
) {
    let Ok(c) = client.await else {
        return;
    };
    let mut c = TokioIo::new(c);
    // What the instance sent after its 101 head.
    if !instance.buf.is_empty() && c.write_all(&instance.buf).await.is_err() {
        return;
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut instance.stream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        () = idle_for(&last, idle) => {}
    }
}

/// The request's head as the instance is to get it.
fn to_instance(parts: &mut Parts, client: &Client, upgrade: bool) {
    hop::strip(&mut parts.headers, upgrade);
    // hyper answers `Expect: 100-continue` itself when the body is read
    // (as it is sent on); the instance must not wait for one of its own.
    parts.headers.remove(header::EXPECT);
    client.forwarding.add(&mut parts.headers);
    // Origin form for the instance; most requests are in it already.
    if parts.uri.scheme().is_some() || parts.uri.path_and_query().is_none() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    }
    parts.version = Version::HTTP_11;
}

/// Sends the request to `first`; if that instance fails, once more to
/// the next candidate when the request can be (see [`Failure`]). Only the
/// instances' own failures count against them.
async fn exchange(
    svc: &ServiceL7,
    first: usize,
    mut candidates: impl Iterator<Item = usize>,
    parts: &Parts,
    mut body: Outgoing,
    idempotent: bool,
) -> Result<Answer, Failure> {
    let failure = match send(svc, first, parts, &mut body).await {
        Ok(a) => {
            svc.answered(first);
            return Ok(a);
        }
        Err(f) => f,
    };
    if failure.theirs() {
        svc.failed(first);
    }
    let retry = match failure {
        // The instance never saw it: any request may go elsewhere.
        Failure::Unsent(_) => body.intact(),
        Failure::Sent | Failure::Stale => idempotent && body.intact(),
        Failure::Timeout | Failure::Client => return Err(failure),
    };
    let (true, Some(next)) = (retry, candidates.next()) else {
        return Err(Failure::Sent);
    };
    svc.counts.retries.fetch_add(1, Relaxed);
    let r = send(svc, next, parts, &mut body).await;
    match &r {
        Ok(_) => svc.answered(next),
        Err(f) if f.theirs() => svc.failed(next),
        Err(_) => {}
    }
    r
}

async fn handle(mut req: Request<Incoming>, client: &Client, slot: &Slot) -> Response<Reply> {
    let svc = slot.current();
    let target_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    if target_len > svc.cfg.limits.max_request_line as usize {
        return refuse(
            &svc,
            Refusal::UriTooLong,
            StatusCode::URI_TOO_LONG,
            "request target too long",
        );
    }
    // RFC 9112, 3.2: an invalid Host (or two) is a 400; it is what
    // `Forwarded` would carry on.
    if !forwarded::host_is_valid(req.headers()) {
        return refuse(
            &svc,
            Refusal::BadRequest,
            StatusCode::BAD_REQUEST,
            "invalid Host",
        );
    }
    // A tunnel to wherever the client names is not what a distributor is
    // for (and an instance would get it as `GET /`).
    if req.method() == Method::CONNECT {
        return refuse(
            &svc,
            Refusal::BadRequest,
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not proxied",
        );
    }
    let upgrade = hop::is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // A short body is read whole before an instance is picked: a slow or
    // broken upload is then the client's alone (see `upload`).
    let body = if body.is_end_stream() {
        None
    } else {
        match upload::buffer(body, svc.cfg.body_buffer_bytes as usize).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(peer = %client.peer, error = %e, "request body");
                return refuse(
                    &svc,
                    Refusal::BadRequest,
                    StatusCode::BAD_REQUEST,
                    "the request body is malformed or was cut short",
                );
            }
        }
    };
    let mut candidates = svc.route(&parts.uri, &parts.headers, client.flow);
    let Some(first) = candidates.next() else {
        return refuse(
            &svc,
            Refusal::NoInstance,
            StatusCode::SERVICE_UNAVAILABLE,
            "no instance can take this request",
        );
    };
    to_instance(&mut parts, client, upgrade);
    let body = match body {
        None => Outgoing::Whole(Bytes::new()),
        Some(upload::Buffered::Whole(b)) => Outgoing::Whole(b),
        Some(upload::Buffered::Partial(u)) => Outgoing::Stream(Some(u)),
    };
    let again = idempotent(&parts.method) && !upgrade;
    match exchange(&svc, first, candidates, &parts, body, again).await {
        Ok(Answer { resp, upgraded }) => {
            if let (Some(from_client), Some(to_instance)) = (client_upgrade, upgraded) {
                tokio::spawn(tunnel(
                    from_client,
                    to_instance,
                    client.watch(),
                    svc.cfg.limits.idle_timeout,
                ));
            }
            resp
        }
        Err(Failure::Client) => refuse(
            &svc,
            Refusal::BadRequest,
            StatusCode::BAD_REQUEST,
            "the request body is malformed or was cut short",
        ),
        Err(Failure::Timeout) => refuse(
            &svc,
            Refusal::InstanceTimeout,
            StatusCode::GATEWAY_TIMEOUT,
            "the instance did not answer in time",
        ),
        Err(_) => refuse(
            &svc,
            Refusal::InstanceFailed,
            StatusCode::BAD_GATEWAY,
            "the instance failed",
        ),
    }
}
