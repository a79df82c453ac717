//! The body both ends of a transfer agree on without storing it: byte `i` is
//! `i % 251`. The cycle is prime, so it never lines up with chunk or buffer
//! sizes, and a chunk lost, repeated or moved shows wherever it lands.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Bytes in one generated chunk.
pub(super) const CHUNK: usize = 64 * 1024;
const CYCLE: usize = 251;

/// A chunk of the pattern and one cycle more: any chunk, from any offset,
/// is a slice of it, shared rather than copied.
static PATTERN: LazyLock<Bytes> = LazyLock::new(|| {
    (0..CHUNK + CYCLE)
        .map(|i| u8::try_from(i % CYCLE).expect("below the cycle"))
        .collect::<Vec<u8>>()
        .into()
});

/// `len` (at most [`CHUNK`]) pattern bytes from offset `at`.
fn slice(at: u64, len: usize) -> Bytes {
    let start = usize::try_from(at % CYCLE as u64).expect("below the cycle");
    PATTERN.slice(start..start + len)
}

/// Whether `data`, found at offset `at` of a body, is the pattern there.
#[must_use]
pub fn pattern_matches(at: u64, data: &[u8]) -> bool {
    let mut at = at;
    data.chunks(CHUNK).all(|piece| {
        let ok = piece == slice(at, piece.len());
        at += piece.len() as u64;
        ok
    })
}

/// A body of `len` pattern bytes, made a chunk at a time as hyper sends it.
pub(super) struct PatternBody {
    sent: u64,
    len: u64,
    sized: bool,
}

impl PatternBody {
    /// `sized`: tell hyper the length, which it sends as `Content-Length`;
    /// otherwise the length is unknown to it and it sends the body chunked.
    pub(super) fn new(len: u64, sized: bool) -> Self {
        Self {
            sent: 0,
            len,
            sized,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let left = this.len - this.sent;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(left.min(CHUNK as u64)).expect("at most a chunk");
        let data = slice(this.sent, n);
        this.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.len - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// FNV-1a, 64 bits: the checksum `/upload` answers with. Not for security;
/// enough to tell a byte lost, changed or moved.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[must_use]
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// What a [`super::Backend`]'s `/upload` answers for a body of `len`
/// pattern bytes: `"<len> <fnv1a>"`.
#[must_use]
pub fn upload_reply(len: u64) -> String {
    let mut sum = Fnv1a::default();
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(CHUNK as u64)).expect("at most a chunk");
        sum.update(&slice(at, n));
        at += n as u64;
    }
    format!("{len} {}", sum.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_i_mod_251_across_chunks() {
        let whole: Vec<u8> = (0..3 * CHUNK as u64 + 7)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        assert!(pattern_matches(0, &whole));
        assert!(pattern_matches(1000, &whole[1000..]));
        assert!(
            !pattern_matches(1001, &whole[1000..]),
            "an offset off by one"
        );
        let mut bad = whole.clone();
        bad[2 * CHUNK + 3] ^= 1;
        assert!(!pattern_matches(0, &bad), "one byte changed");
    }

    #[test]
    fn upload_reply_is_the_checksum_of_the_generated_body() {
        let mut sum = Fnv1a::default();
        let body: Vec<u8> = (0..200_000u64)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        sum.update(&body);
        assert_eq!(upload_reply(200_000), format!("200000 {}", sum.finish()));
        assert_eq!(upload_reply(0), format!("0 {}", 0xcbf2_9ce4_8422_2325_u64));
    }
}
