//! A streamed request body on its way to an instance: framed (chunked when
//! its length is not known) and written as the client sends it. It is
//! polled while the response head is awaited and, when the head comes
//! first, by the response body after it: an instance that answers at once
//! and reads the body as it streams its answer (an echo, a transcoder)
//! gets all of it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use hyper::body::Body as _;
use tokio::io::AsyncWrite;

use super::{upload::Upload, upstream};

/// Why a body could not be sent whole.
pub(super) enum PumpError {
    /// The client broke it (a malformed chunk, cut short).
    Client,
    /// The instance stopped taking it (logged where it happened).
    Instance,
}

pub(super) struct Pump {
    body: Upload,
    chunked: bool,
    /// Framed bytes not yet written (the request head first).
    out: BytesMut,
    /// The client's body has ended (its last chunk is in `out`).
    ended: bool,
}

impl Pump {
    /// A pump for `body`, after `head` (the request head, written first).
    pub(super) fn new(body: Upload, chunked: bool, head: BytesMut) -> Self {
        Self {
            body,
            chunked,
            out: head,
            ended: false,
        }
    }

    /// Writes on `w` until the body has been sent whole.
    pub(super) fn poll_send(
        &mut self,
        w: &mut (impl AsyncWrite + Unpin),
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            while !self.out.is_empty() {
                let written = match ready!(Pin::new(&mut *w).poll_write(cx, &self.out)) {
                    Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                    r => r,
                };
                match written {
                    Ok(n) => self.out.advance(n),
                    Err(e) => {
                        tracing::debug!(error = %e, "the instance stopped taking the request body");
                        return Poll::Ready(Err(PumpError::Instance));
                    }
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            self.out.clear();
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if self.chunked {
                        upstream::chunk_prefix(0, &mut self.out);
                    }
                }
                Some(Err(_)) => return Poll::Ready(Err(PumpError::Client)),
                Some(Ok(frame)) => {
                    // Trailers are dropped, as the `Trailer` header is.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        // One write a chunk, framing and data together.
                        if self.chunked {
                            upstream::chunk_prefix(data.len(), &mut self.out);
                            self.out.extend_from_slice(&data);
                            self.out.extend_from_slice(b"\r\n");
                        } else {
                            self.out.extend_from_slice(&data);
                        }
                    }
                }
            }
        }
    }
}
