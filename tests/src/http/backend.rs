//! The tests' own HTTP/1.1 server, one per instance: it names itself in
//! every response and logs every request, so a test can tell where the
//! distributor sent what, and with which headers.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty, Full, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};

use super::pattern::{Fnv1a, PatternBody};
use crate::netns;

/// Requests kept in the log; older ones are forgotten (still counted).
const LOG_LIMIT: usize = 100_000;
/// Longest `/slow` wait: a typo must not hold a test for hours.
const SLOW_LIMIT: Duration = Duration::from_mins(1);

/// A request as the backend received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Names lower-case, in order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
}

impl SeenRequest {
    /// The first value of header `name` (any case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        super::find_header(&self.headers, name)
    }
}

/// How a request's body was delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Neither header: no body.
    None,
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What the server's tasks share with the test.
struct State {
    instance: HeaderValue,
    name: String,
    delay_us: AtomicU64,
    requests: AtomicUsize,
    log: Mutex<VecDeque<SeenRequest>>,
    /// Connections open now, and the most ever open at once.
    open: AtomicUsize,
    most_open: AtomicUsize,
}

/// A running backend; stopped on drop. Routes:
///
/// - `/slow?ms=N`: answers after N ms (at most a minute);
/// - `/download?bytes=N`: N pattern bytes (see [`super::pattern_matches`]),
///   chunked, made 64 KiB at a time as they are sent;
/// - `/upload` (POST, PUT, or GET with a body): reads the body as it comes and answers
///   [`super::upload_reply`] for it; `Expect: 100-continue` is honoured;
/// - `/echo-headers`: the request's headers, a `name: value` line each;
/// - `/ws`: WebSocket, echoing text and binary messages;
/// - `/status?code=N`: status N;
/// - anything else: 200 with the instance name.
///
/// Every response carries `x-instance: <name>`, and every request is
/// counted and logged before [`Backend::set_delay`] holds it.
pub struct Backend {
    pub name: String,
    /// Where it listens (the port filled in if 0 was asked for).
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend named `name` listening on `addr` inside namespace
    /// `netns`, on a thread and runtime of its own; it accepts connections
    /// once this returns.
    #[must_use]
    pub fn start(netns: &str, addr: SocketAddr, name: &str) -> Self {
        let listener = netns::run_in(netns, || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("backend {name}: binding {addr} in {netns}: {e}"));
        let addr = listener.local_addr().expect("a bound listener's address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let state = Arc::new(State {
            instance: HeaderValue::from_str(name)
                .unwrap_or_else(|e| panic!("backend name {name:?} as a header value: {e}")),
            name: name.to_owned(),
            delay_us: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            log: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            most_open: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || serve(listener, shared, stopped))
            .expect("spawning a backend thread");
        Self {
            name: name.to_owned(),
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Requests received so far, including those it never got to answer.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Connections open to it now, and the most open at once since it
    /// started (or since [`Backend::reset_most_open`]).
    #[must_use]
    pub fn connections(&self) -> (usize, usize) {
        (
            self.state.open.load(Ordering::Relaxed),
            self.state.most_open.load(Ordering::Relaxed),
        )
    }

    /// Starts counting the most connections open at once afresh.
    pub fn reset_most_open(&self) {
        let open = self.state.open.load(Ordering::Relaxed);
        self.state.most_open.store(open, Ordering::Relaxed);
    }

    /// The last 100,000 requests received, oldest first.
    #[must_use]
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.log().iter().cloned().collect()
    }

    /// How many of the logged requests carried each value of header
    /// `name` (e.g. per `x-user`); requests without it are not counted.
    #[must_use]
    pub fn header_counts(&self, name: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for value in self.log().iter().filter_map(|r| r.header(name)) {
            *counts.entry(value.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    /// Holds every request from now on for `delay` before answering it: a
    /// slow instance. Zero: answer at once again.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::Relaxed);
    }

    /// Stops the backend at once, as if its process were killed: the
    /// listener and every connection are closed where they stand, requests
    /// in flight unanswered (the kernel sends FIN, or RST where the backend
    /// left data unread). Returns when all are closed; the address can be
    /// bound again.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic in there was the backend's own; the test sees its
            // effect on the wire.
            let _ = thread.join();
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, VecDeque<SeenRequest>> {
        self.state
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The backend's thread: accepts and serves until `stopped`, then drops
/// the runtime, and with it every task and the socket each one holds.
fn serve(listener: std::net::TcpListener, state: Arc<State>, stopped: oneshot::Receiver<()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for a backend");
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).expect("registering the listener");
        tokio::select! {
            _ = stopped => {}
            () = accept(&listener, &state) => {}
        }
    });
    drop(rt);
}

async fn accept(listener: &tokio::net::TcpListener, state: &Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, or a connection reset while queued: the
            // next one may do.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let _open = Open::new(&state);
            let service = {
                let state = Arc::clone(&state);
                service_fn(move |req| answer(Arc::clone(&state), req))
            };
            // A client that goes away mid-request is no error of the
            // backend's.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Counts a connection open while it lives.
struct Open(Arc<State>);

impl Open {
    fn new(state: &Arc<State>) -> Self {
        let now = state.open.fetch_add(1, Ordering::Relaxed) + 1;
        state.most_open.fetch_max(now, Ordering::Relaxed);
        Self(Arc::clone(state))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

type Answer = Response<UnsyncBoxBody<Bytes, Infallible>>;

async fn answer(state: Arc<State>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    record(&state, &req);
    let delay = Duration::from_micros(state.delay_us.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut resp = route(&state, req).await;
    resp.headers_mut()
        .insert("x-instance", state.instance.clone());
    Ok(resp)
}

fn record(state: &State, req: &Request<Incoming>) {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let headers = req.headers();
    let chunked = headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
    });
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok());
    let seen = SeenRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), ToString::to_string),
        headers: super::header_pairs(headers),
        framing: match (chunked, length) {
            (true, _) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::None,
        },
    };
    let mut log = state.log.lock().unwrap_or_else(PoisonError::into_inner);
    if log.len() == LOG_LIMIT {
        log.pop_front();
    }
    log.push_back(seen);
}

async fn route(state: &State, req: Request<Incoming>) -> Answer {
    let query = req.uri().query().unwrap_or("").to_owned();
    match req.uri().path() {
        "/slow" => {
            let Some(ms) = param(&query, "ms") else {
                return text(StatusCode::BAD_REQUEST, "want /slow?ms=N\n");
            };
            tokio::time::sleep(Duration::from_millis(ms).min(SLOW_LIMIT)).await;
            text(StatusCode::OK, state.name.clone())
        }
        "/download" => match param(&query, "bytes") {
            Some(n) => Response::new(PatternBody::new(n, false).boxed_unsync()),
            None => text(StatusCode::BAD_REQUEST, "want /download?bytes=N\n"),
        },
        "/upload" if matches!(*req.method(), Method::POST | Method::PUT | Method::GET) => {
            upload(req).await
        }
        "/upload" => text(StatusCode::METHOD_NOT_ALLOWED, "POST, PUT or GET\n"),
        "/echo-headers" => {
            let mut out = String::new();
            for (n, v) in req.headers() {
                out.push_str(n.as_str());
                out.push_str(": ");
                out.push_str(&String::from_utf8_lossy(v.as_bytes()));
                out.push('\n');
            }
            text(StatusCode::OK, out)
        }
        "/ws" => websocket(req),
        "/status" => match param(&query, "code")
            .and_then(|c| u16::try_from(c).ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(code) => text(code, state.name.clone()),
            None => text(StatusCode::BAD_REQUEST, "want /status?code=N\n"),
        },
        _ => text(StatusCode::OK, state.name.clone()),
    }
}

/// Reads the body as it arrives (hyper sends `100 Continue` first if it
/// was asked to) and answers its length and checksum.
async fn upload(req: Request<Incoming>) -> Answer {
    let mut body = req.into_body();
    let (mut len, mut sum) = (0u64, Fnv1a::default());
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return text(StatusCode::BAD_REQUEST, "body cut short\n");
        };
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
            sum.update(data);
        }
    }
    text(StatusCode::OK, format!("{len} {}", sum.finish()))
}

/// Answers the upgrade with 101 and echoes messages on the upgraded
/// connection, in a task of the backend's runtime (so killed with it).
fn websocket(mut req: Request<Incoming>) -> Answer {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| wants)
    else {
        return text(StatusCode::UPGRADE_REQUIRED, "WebSocket only\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Pings are answered and closes returned by tungstenite itself.
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Empty::new().boxed_unsync())
        .expect("a valid 101 response")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp
}

/// Query parameter `key` as a number.
fn param(query: &str, key: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}
