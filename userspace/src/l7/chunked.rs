//! Reading an instance's chunked response body (RFC 9112, 7.1) out of the
//! connection's read buffer, data handed on without a copy. Extensions and
//! trailers are read past and dropped (the `Trailer` header is hop by hop);
//! sizes, extensions and trailers are bounded, so an instance that sends
//! garbage fails its response instead of growing the buffer.

use bytes::{Buf as _, Bytes, BytesMut};

/// Most bytes of one chunk's extensions, and of all trailer lines.
const MAX_EXTENSION_BYTES: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChunkError {
    #[error("chunk size is not hexadecimal")]
    Size,
    #[error("chunk size too large")]
    TooLarge,
    #[error("chunk extensions or trailers too long")]
    TooLong,
    #[error("chunk not followed by CRLF")]
    Delimiter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk size: its value so far, whether a digit was seen.
    Size(u64, bool),
    /// Past the size's digits: whitespace before a `;` (the size).
    Space(u64),
    /// In `;` extensions up to the line's CR (the size, bytes skipped).
    Extension(u64, usize),
    /// Expecting the LF of a size line.
    SizeLf(u64),
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// Expecting the CR, then the LF, after a chunk's data.
    DataCr,
    DataLf,
    /// Trailer section: bytes read, bytes on the current line.
    Trailer(usize, usize),
    /// Expecting the LF of a trailer line (or of the final empty line).
    TrailerLf(usize, usize),
    Done,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The body ended (the last chunk and trailers read).
    End,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decoder(State);

impl Default for Decoder {
    fn default() -> Self {
        Self(State::Size(0, false))
    }
}

impl Decoder {
    /// Consumes what it can of `buf`: framing bytes are dropped, the first
    /// data run found is split off and returned. Bytes after the body's
    /// end stay in `buf`.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        let mut at = 0;
        loop {
            if let State::Data(left) = self.0 {
                // Framing read so far goes; data is cut off without a copy.
                buf.advance(at);
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - n as u64;
                self.0 = if left == 0 {
                    State::DataCr
                } else {
                    State::Data(left)
                };
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            if self.0 == State::Done {
                buf.advance(at);
                return Ok(Decoded::End);
            }
            let Some(&b) = buf.get(at) else {
                buf.advance(at);
                return Ok(Decoded::More);
            };
            at += 1;
            self.0 = step(self.0, b)?;
        }
    }
}

fn step(state: State, b: u8) -> Result<State, ChunkError> {
    Ok(match state {
        State::Size(size, any) => match (b as char).to_digit(16) {
            // One more digit would wrap the `u64`.
            Some(_) if size > u64::MAX >> 4 => return Err(ChunkError::TooLarge),
            Some(d) => State::Size(size * 16 + u64::from(d), true),
            None if !any => return Err(ChunkError::Size),
            None => match b {
                b'\r' => State::SizeLf(size),
                b';' => State::Extension(size, 0),
                b' ' | b'\t' => State::Space(size),
                _ => return Err(ChunkError::Size),
            },
        },
        State::Space(size) => match b {
            b'\r' => State::SizeLf(size),
            b';' => State::Extension(size, 0),
            b' ' | b'\t' => State::Space(size),
            _ => return Err(ChunkError::Size),
        },
        State::Extension(size, n) => match b {
            b'\r' => State::SizeLf(size),
            // Control bytes (a bare LF above all) are not extension text.
            _ if b != b'\t' && (b < 0x20 || b == 0x7f) => return Err(ChunkError::Delimiter),
            _ if n >= MAX_EXTENSION_BYTES => return Err(ChunkError::TooLong),
            _ => State::Extension(size, n + 1),
        },
        State::SizeLf(size) => match (b, size) {
            (b'\n', 0) => State::Trailer(0, 0),
            (b'\n', n) => State::Data(n),
            _ => return Err(ChunkError::Delimiter),
        },
        State::DataCr if b == b'\r' => State::DataLf,
        State::DataLf if b == b'\n' => State::Size(0, false),
        State::Trailer(total, line) => {
            if total >= MAX_TRAILER_BYTES {
                return Err(ChunkError::TooLong);
            }
            match b {
                b'\r' => State::TrailerLf(total + 1, line),
                b'\n' => return Err(ChunkError::Delimiter),
                _ => State::Trailer(total + 1, line + 1),
            }
        }
        State::TrailerLf(_, 0) if b == b'\n' => State::Done,
        State::TrailerLf(total, _) if b == b'\n' => State::Trailer(total + 1, 0),
        State::DataCr | State::DataLf | State::TrailerLf(..) => {
            return Err(ChunkError::Delimiter);
        }
        State::Data(_) | State::Done => unreachable!("handled by decode"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes: the body, and what
    /// was left after its end.
    fn decode(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => body.extend_from_slice(&b),
                Decoded::End => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&wire[fed..]);
                    return Ok((body, rest));
                }
                Decoded::More if fed == wire.len() => panic!("ran out at {fed}: {body:?}"),
                Decoded::More => {
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunks_are_joined_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n1;name=value\r\n \r\nA \r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = decode(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[test]
    fn trailers_and_leading_zeros_are_read_past() {
        let wire = b"0004\r\nabcd\r\n000\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n";
        let (body, rest) = decode(wire, 1).unwrap();
        assert_eq!(body, b"abcd");
        assert!(rest.is_empty());
    }

    #[test]
    fn a_malformed_body_is_an_error() {
        let cases: [(&[u8], ChunkError); 9] = [
            (b"5 5\r\n", ChunkError::Size),
            (b"5;x\nhello\r\n", ChunkError::Delimiter),
            (b"\r\n", ChunkError::Size),
            (b"g\r\n", ChunkError::Size),
            (b"-1\r\n", ChunkError::Size),
            (b"3\r\nabcX", ChunkError::Delimiter),
            (b"3\nabc", ChunkError::Size),
            (b"1\r\na\r\n0\r\nbare\nlf", ChunkError::Delimiter),
            (b"10000000000000000\r\n", ChunkError::TooLarge),
        ];
        for (wire, want) in cases {
            let mut d = Decoder::default();
            let mut buf = BytesMut::from(wire);
            let got = loop {
                match d.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => {}
                    Ok(other) => panic!("{:?}: {other:?}", String::from_utf8_lossy(wire)),
                    Err(e) => break e,
                }
            };
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn the_largest_size_that_fits_is_read_and_one_more_digit_is_refused() {
        let mut d = Decoder::default();
        let mut buf = BytesMut::from(&b"fffffffffffffff\r\nab"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"ab")))
        );
        assert_eq!(d.0, State::Data(0x0fff_ffff_ffff_fffd));
        let mut buf = BytesMut::from(&b"fffffffffffffffff\r\n"[..]);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(ChunkError::TooLarge)
        );
    }

    #[test]
    fn endless_extensions_and_trailers_are_cut_off() {
        let mut wire = b"1;".to_vec();
        wire.extend(std::iter::repeat_n(b'x', MAX_EXTENSION_BYTES + 1));
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(ChunkError::TooLong)
        );
        let mut wire = b"0\r\n".to_vec();
        for _ in 0..=MAX_TRAILER_BYTES / 8 {
            wire.extend_from_slice(b"X-A: b\r\n");
        }
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(ChunkError::TooLong)
        );
    }
}
