//! A request's body on its way to an instance.
//!
//! Up to `body_buffer_bytes` of it is read before an instance is picked
//! (as nginx's `client_body_buffer_size` and HAProxy's
//! `http-buffer-request`): a slow or broken upload of that size then never
//! holds a pooled connection, its failure is the client's and answered 400
//! without an instance seeing any of it, and a whole body can be sent again
//! elsewhere. A longer body is streamed after what was read (the proxy
//! tells a client's failure from an instance's as it sends it).

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};

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
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.as_ref().is_none_or(Incoming::is_end_stream)
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
