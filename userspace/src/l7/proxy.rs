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
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::{Body as _, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_common::key;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf, unix::AsyncFd},
    net::{TcpListener, TcpStream},
};

use super::{
    Backend, Body, Refusal, ServiceL7, Slot, admit::Gate, forwarded, hop, limit::Lease, pool,
    upload,
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
fn answer(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn refuse(svc: &ServiceL7, r: Refusal, status: StatusCode, why: &str) -> Response<Body> {
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
    /// It never reached the instance (handed back to send elsewhere);
    /// whether that was the instance's fault (refused, reset) rather than
    /// a stale pooled connection or a busy pool.
    Unsent(Box<Request<Body>>, bool),
    /// It may have reached it.
    Sent,
    /// No response head in time.
    Timeout,
    /// The client broke its own body (a malformed chunk, cut short).
    Client,
}

impl Failure {
    /// Whether it counts against the instance.
    fn theirs(&self) -> bool {
        match self {
            Self::Unsent(_, theirs) => *theirs,
            Self::Sent | Self::Timeout => true,
            Self::Client => false,
        }
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Counts a request in flight at an instance until dropped (with the
/// response body it relays).
struct InFlight(Arc<Backend>);

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

/// Sends `req` to instance `i` and waits for the response head: within
/// `response_timeout` of the start, or, for a body streamed as the client
/// sends it (`upload`), of its last byte sent.
async fn send(
    svc: &ServiceL7,
    i: usize,
    req: Request<Body>,
    upload: Option<&upload::Progress>,
) -> Result<Response<Body>, Failure> {
    let b = &svc.backends[i];
    let start = Instant::now();
    let wait = svc.cfg.response_timeout;
    let mut conn = match b.pool().get(wait).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(instance = %b.name, error = %e, "no connection");
            b.stats.answered(None, 0.0);
            let theirs = !matches!(e, pool::PoolError::Busy { .. });
            return Err(Failure::Unsent(Box::new(req), theirs));
        }
    };
    let in_flight = InFlight::new(b);
    let exchange = async {
        if conn.sender.ready().await.is_err() {
            // Closed while idle in the pool: not a failure of the instance.
            return Err(Failure::Unsent(Box::new(req), false));
        }
        conn.sender.try_send_request(req).await.map_err(|mut e| {
            tracing::debug!(instance = %b.name, error = %e.error(), "request failed");
            e.take_message()
                .map_or(Failure::Sent, |r| Failure::Unsent(Box::new(r), true))
        })
    };
    let deadline = async {
        match upload {
            Some(p) => {
                p.until_sent().await;
                tokio::time::sleep(wait).await;
            }
            None => tokio::time::sleep(wait.saturating_sub(start.elapsed())).await,
        }
    };
    let result = tokio::select! {
        r = exchange => r,
        () = deadline => Err(Failure::Timeout),
    };
    let resp = match result {
        Ok(resp) => resp,
        Err(_) if upload.is_some_and(upload::Progress::client_failed) => {
            return Err(Failure::Client);
        }
        Err(f) => {
            b.stats.answered(None, 0.0);
            return Err(f);
        }
    };
    b.stats
        .answered(Some(resp.status().as_u16()), start.elapsed().as_secs_f64());
    let (mut parts, body) = resp.into_parts();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    hop::strip(&mut parts.headers, upgraded);
    // An instance that answered before it had the whole body may read the
    // rest as a request of its own, answered to the next one sent on the
    // connection: such a connection is closed after this response, never
    // pooled. An upgraded one is the tunnel's now.
    let relay = Relay {
        inner: body,
        conn: (!upgraded).then_some(conn),
        reuse: upload.is_none_or(upload::Progress::sent),
        backend: b.clone(),
        _in_flight: in_flight,
    };
    Ok(Response::from_parts(parts, relay.boxed()))
}

/// A response body relayed from an instance: its connection goes back to
/// the pool once the body has been read whole, and is closed if not.
struct Relay {
    inner: Incoming,
    conn: Option<pool::Conn>,
    /// Whether `conn` may serve another request (else it closes).
    reuse: bool,
    backend: Arc<Backend>,
    _in_flight: InFlight,
}

impl Relay {
    fn give_back(&mut self) {
        if let Some(c) = self.conn.take()
            && self.reuse
        {
            self.backend.pool().put(c);
        }
    }
}

impl hyper::body::Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.backend.stats.bytes.fetch_add(d.len() as u64, Relaxed);
                }
            }
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

/// Joins an upgraded client connection to its instance until either side
/// closes or nothing moves for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    instance: hyper::upgrade::OnUpgrade,
    last: Arc<AtomicU64>,
    idle: Duration,
) {
    let (Ok(c), Ok(i)) = tokio::join!(client, instance) else {
        return;
    };
    let (mut c, mut i) = (TokioIo::new(c), TokioIo::new(i));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut i) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        () = idle_for(&last, idle) => {}
    }
}

/// The request's head as the instance is to get it.
fn to_instance(parts: &mut hyper::http::request::Parts, client: &Client, upgrade: bool) {
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

/// A request to send again, with its body's progress.
type Again = (Request<Body>, Option<Arc<upload::Progress>>);

/// The body to send and its progress (none for no body); and, for an
/// idempotent request whose body was read whole, what to send again if
/// the instance fails after it got it.
fn outgoing(
    parts: &mut hyper::http::request::Parts,
    body: Option<upload::Buffered>,
    upgrade: bool,
) -> (Body, Option<Arc<upload::Progress>>, Option<Again>) {
    let (body, progress, whole) = match body {
        None => (empty(), None, Some(Bytes::new())),
        Some(upload::Buffered::Whole(b)) if b.is_empty() => (empty(), None, Some(b)),
        Some(upload::Buffered::Whole(b)) => {
            let u = upload::Upload::whole(b.clone());
            let p = u.progress();
            (u.boxed(), Some(p), Some(b))
        }
        Some(upload::Buffered::Partial(u)) => {
            // hyper sends a GET's or HEAD's body of unknown length only
            // when told it is chunked.
            if u.size_hint().exact().is_none() {
                parts.headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            let p = u.progress();
            (u.boxed(), Some(p), None)
        }
    };
    let again = whole
        .filter(|_| idempotent(&parts.method) && !upgrade)
        .map(|b| {
            let mut p = Request::new(empty());
            *p.method_mut() = parts.method.clone();
            *p.uri_mut() = parts.uri.clone();
            *p.headers_mut() = parts.headers.clone();
            if b.is_empty() {
                (p, None)
            } else {
                let u = upload::Upload::whole(b);
                let progress = u.progress();
                *p.body_mut() = u.boxed();
                (p, Some(progress))
            }
        });
    (body, progress, again)
}

/// Sends `req` to `first`; if that instance fails, once more to the next
/// candidate when the request can be (see [`Failure`]). Only the
/// instances' own failures count against them.
async fn exchange(
    svc: &ServiceL7,
    first: usize,
    mut candidates: impl Iterator<Item = usize>,
    req: Request<Body>,
    progress: Option<Arc<upload::Progress>>,
    again: Option<Again>,
) -> Result<Response<Body>, Failure> {
    let failure = match send(svc, first, req, progress.as_deref()).await {
        Ok(resp) => {
            svc.answered(first);
            return Ok(resp);
        }
        Err(f) => f,
    };
    if failure.theirs() {
        svc.failed(first);
    }
    let retry = match failure {
        // The instance never saw it: any request may go elsewhere.
        Failure::Unsent(req, _) => Some((*req, progress)),
        Failure::Sent => again,
        Failure::Timeout | Failure::Client => return Err(failure),
    };
    let (Some((req, progress)), Some(next)) = (retry, candidates.next()) else {
        return Err(Failure::Sent);
    };
    svc.counts.retries.fetch_add(1, Relaxed);
    let r = send(svc, next, req, progress.as_deref()).await;
    match &r {
        Ok(_) => svc.answered(next),
        Err(f) if f.theirs() => svc.failed(next),
        Err(_) => {}
    }
    r
}

async fn handle(mut req: Request<Incoming>, client: &Client, slot: &Slot) -> Response<Body> {
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
    let (body, progress, again) = outgoing(&mut parts, body, upgrade);
    let req = Request::from_parts(parts, body);
    let outcome = exchange(&svc, first, candidates, req, progress, again).await;
    match outcome {
        Ok(mut resp) => {
            if let Some(from_client) = client_upgrade
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                let to_instance = hyper::upgrade::on(&mut resp);
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
