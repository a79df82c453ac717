//! A request's body on its way to an instance.
//!
//! Up to `body_buffer_bytes` of it is read before an instance is picked
//! (as nginx's `client_body_buffer_size` and HAProxy's
//! `http-buffer-request`): a slow or broken upload of that size then never
//! holds a pooled connection, its failure is the client's and answered 400
//! without an instance seeing any of it, and a whole body can be sent again
//! elsewhere. A longer body is streamed after what was read, and its
//! [`Progress`] tells the proxy when it was sent whole (the response timer
//! starts then) or whether the client broke it (not the instance's fault).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;

const SENDING: u8 = 0;
const SENT: u8 = 1;
const CLIENT_FAILED: u8 = 2;

/// Whether a streamed body has been sent whole, or broken by the client.
#[derive(Default)]
pub(super) struct Progress {
    state: AtomicU8,
    changed: Notify,
}

impl Progress {
    fn finish(&self, how: u8) {
        if self
            .state
            .compare_exchange(SENDING, how, Relaxed, Relaxed)
            .is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    pub(super) fn sent(&self) -> bool {
        self.state.load(Relaxed) == SENT
    }

    pub(super) fn client_failed(&self) -> bool {
        self.state.load(Relaxed) == CLIENT_FAILED
    }

    /// Resolves once the body has been sent whole; never if the client
    /// broke it (the exchange fails on its own then).
    pub(super) async fn until_sent(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.state.load(Relaxed) {
                SENT => return,
                CLIENT_FAILED => std::future::pending().await,
                _ => changed.await,
            }
        }
    }
}

/// A request body as read so far.
pub(super) enum Buffered {
    /// All of it (empty for a request without a body).
    Whole(Bytes),
    /// Its first bytes, and the rest still to come from the client.
    Partial(Upload),
}

/// Reads `body` until its end or past `limit` bytes. An error is the
/// client's (a malformed chunk, a connection cut short).
pub(super) async fn buffer(mut body: Incoming, limit: usize) -> Result<Buffered, hyper::Error> {
    let mut head = VecDeque::new();
    let mut len = 0;
    loop {
        if body.is_end_stream() {
            return Ok(Buffered::Whole(join(head, len)));
        }
        let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        else {
            return Ok(Buffered::Whole(join(head, len)));
        };
        // Trailers are dropped as the `Trailer` header is (hop by hop).
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            len += data.len();
            head.push_back(data);
            if len > limit {
                return Ok(Buffered::Partial(Upload {
                    head,
                    head_len: len,
                    rest: Some(body),
                    progress: Arc::default(),
                }));
            }
        }
    }
}

fn join(mut head: VecDeque<Bytes>, len: usize) -> Bytes {
    match head.len() {
        0 => Bytes::new(),
        1 => head.pop_front().expect("one"),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for b in head {
                all.extend_from_slice(&b);
            }
            all.freeze()
        }
    }
}

/// A body longer than the buffer: what was read, then the rest as the
/// client sends it.
pub(super) struct Upload {
    head: VecDeque<Bytes>,
    head_len: usize,
    rest: Option<Incoming>,
    progress: Arc<Progress>,
}

impl Upload {
    /// A body read whole, sent with its [`Progress`] told.
    pub(super) fn whole(body: Bytes) -> Self {
        Self {
            head_len: body.len(),
            head: VecDeque::from([body]),
            rest: None,
            progress: Arc::default(),
        }
    }

    pub(super) fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(b) = self.head.pop_front() {
            self.head_len -= b.len();
            // Told here too: hyper stops polling once the body says it
            // has ended.
            let _ = self.is_end_stream();
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rest) = self.rest.as_mut() else {
            self.progress.finish(SENT);
            return Poll::Ready(None);
        };
        let r = Pin::new(rest).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.progress.finish(SENT),
            Poll::Ready(Some(Err(_))) => self.progress.finish(CLIENT_FAILED),
            Poll::Ready(Some(Ok(_))) => {
                let _ = self.is_end_stream();
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let end = self.head.is_empty() && self.rest.as_ref().is_none_or(Incoming::is_end_stream);
        if end {
            self.progress.finish(SENT);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head_len as u64;
        let Some(rest) = &self.rest else {
            return SizeHint::with_exact(head);
        };
        let rest = rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + head);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}
