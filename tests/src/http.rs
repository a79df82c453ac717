//! HTTP/1.1 on both sides of the L7 distributor, for the end-to-end tests:
//! servers to put in instance namespaces and clients to run from the
//! client's.
//!
//! - [`Backend`]: the tests' own server (hyper), which says who it is in
//!   `x-instance`, logs what it was sent, streams, echoes, upgrades to
//!   WebSocket, and dies at once on drop, as a killed instance would.
//! - [`PyServer`]: Python's `http.server`, a server the tests did not write
//!   (HTTP/1.0, one request a connection).
//! - Clients: [`KeptAlive`] (many requests on one connection),
//!   [`stream_upload`] and [`stream_download`] (bodies never held whole),
//!   [`ws_echo`], [`curl`], and raw bytes for what a well-behaved client
//!   never sends: [`raw_exchange`] with [`parse_responses`], [`slowloris`].
//!
//! A socket stays in the namespace it was made in, and every client makes
//! its socket on the calling thread before anything else: call it inside
//! `netns::run_in(client_ns, ..)` (a [`KeptAlive`] made in there may be used
//! from anywhere afterwards). [`curl`] takes the namespace itself.
//!
//! Every wait is bounded: clients by the timeout they are given (or
//! [`TRANSFER_LIMIT`]), servers by their owner, who stops them on drop.

mod backend;
mod client;
mod pattern;
mod pyserver;
mod raw;

use std::{
    io,
    net::{SocketAddr, TcpStream},
    process::ExitStatus,
    time::Duration,
};

pub use backend::{Backend, Framing, SeenRequest};
pub use client::{
    Download, KeptAlive, TRANSFER_LIMIT, curl, stream_download, stream_upload, stream_upload_as,
    ws_echo,
};
pub use pattern::{Fnv1a, pattern_matches, upload_reply};
pub use pyserver::PyServer;
pub use raw::{SlowlorisEnd, SlowlorisResult, parse_responses, raw_exchange, slowloris};

/// Why a client helper got no answer: what the system under test may
/// legitimately cause (a refused connection, a reset, a stall), returned so
/// a test can expect it. Misuse and a broken test machine panic instead.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{what} took longer than {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("response body over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("WebSocket: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("WebSocket: the server stopped after {echoed} of {sent} echoes")]
    WebSocketClosed { sent: usize, echoed: usize },
    #[error("`curl {args}` failed ({status}): {stderr}")]
    Curl {
        args: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl From<tokio_tungstenite::tungstenite::Error> for HttpError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(e))
    }
}

/// One response as a client saw it: status, headers (names lower-case, in
/// order, repeats kept) and the whole body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (any case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Which [`Backend`] answered (its `x-instance` header).
    #[must_use]
    pub fn instance(&self) -> Option<&str> {
        self.header("x-instance")
    }

    /// The body as text (invalid UTF-8 replaced).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The first value of header `name` (any case) in `headers`.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `headers` as (lower-case name, value) pairs, in order, invalid UTF-8
/// replaced.
fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_owned(), value)
        })
        .collect()
}

/// A blocking TCP connection to `addr`, made in the calling thread's
/// namespace, with `timeout` on connecting, reads and writes.
fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, HttpError> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| HttpError::Connect { addr, source })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .expect("setting socket options on a fresh connection");
    Ok(stream)
}

/// A runtime of the caller's own, dropped (with every task on it and the
/// sockets they hold) when the caller is done.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
