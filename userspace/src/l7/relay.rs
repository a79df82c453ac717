//! What the distributor sends a client: an answer of its own, or an
//! instance's response body read in the client connection's task (and,
//! for a body the instance answered before it had whole, the rest of it
//! sent on meanwhile).

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use super::{
    Backend, pool,
    proxy::InFlight,
    pump::{Pump, PumpError},
    upstream::{self, Framing},
};

/// What the distributor sends a client: an answer of its own, or an
/// instance's response body relayed.
#[expect(
    clippy::large_enum_variant,
    reason = "a relay is most replies: moved a few times, not worth an allocation each"
)]
pub(super) enum Reply {
    Own(Option<Bytes>),
    Relay(Relay),
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = upstream::ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, upstream::ReadError>>> {
        match self.get_mut() {
            Self::Own(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Relay(r) => r.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Own(b) => b.is_none(),
            Self::Relay(r) => r.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Own(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Relay(r) => match r.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                Framing::Empty | Framing::Upgrade => SizeHint::with_exact(0),
                Framing::Chunked(_) | Framing::Close => SizeHint::default(),
            },
        }
    }
}

/// A response body relayed from an instance, read in the client
/// connection's task: its connection goes back to the pool once the body
/// has been read whole and the exchange was clean, and is closed if not.
pub(super) struct Relay {
    conn: Option<pool::Conn>,
    framing: Framing,
    /// The rest of a request body the instance answered before it had.
    pump: Option<Pump>,
    /// Whether `conn` may serve another request once the body is read.
    reuse: bool,
    backend: Arc<Backend>,
    _in_flight: InFlight,
}

impl Relay {
    /// `conn`'s response body framed by `framing`; `conn` goes back to the
    /// pool at its end if `reuse`.
    pub(super) fn new(
        conn: pool::Conn,
        framing: Framing,
        pump: Option<Pump>,
        reuse: bool,
        backend: Arc<Backend>,
        in_flight: InFlight,
    ) -> Self {
        Self {
            conn: Some(conn),
            framing,
            pump,
            reuse,
            backend,
            _in_flight: in_flight,
        }
    }

    fn is_end(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    fn give_back(&mut self) {
        if let Some(c) = self.conn.take()
            && self.reuse
        {
            self.backend.pool().put(c);
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, upstream::ReadError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(pump) = self.pump.as_mut() {
            match pump.poll_send(&mut conn.up.stream, cx) {
                Poll::Pending => {}
                // Sent, or the instance stopped taking it: its answer goes on.
                Poll::Ready(Ok(()) | Err(PumpError::Instance)) => self.pump = None,
                Poll::Ready(Err(PumpError::Client)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(upstream::ReadError::ClientBody)));
                }
            }
        }
        match std::task::ready!(upstream::poll_body(&mut conn.up, &mut self.framing, cx)) {
            Ok(upstream::Read::Data(d)) => {
                self.backend.stats.bytes.fetch_add(d.len() as u64, Relaxed);
                if self.is_end() {
                    // The last bytes: the connection can serve the next
                    // request while the client is still being sent these.
                    self.give_back();
                }
                Poll::Ready(Some(Ok(Frame::data(d))))
            }
            Ok(upstream::Read::End) => {
                self.give_back();
                Poll::Ready(None)
            }
            Err(e) => {
                self.conn = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled.
        if self.is_end() {
            self.give_back();
        }
    }
}
