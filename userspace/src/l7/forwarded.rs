//! The forwarding headers a request carries to its instance:
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` (RFC 7239),
//! every earlier proxy's element kept and ours appended once.
//!
//! Several lines of `X-Forwarded-For` or of `Forwarded` are one list (RFC
//! 9110, 5.3). They go on as ONE line: the earlier lines joined by ", ",
//! ours last. An instance that reads one line only (many frameworks take
//! the first or the last) then still sees every hop, and ours sits where a
//! reader of the list looks for the nearest one: at the end.
//!
//! `Forwarded` is built to RFC 7239's ABNF (section 4): a value goes as a
//! `token` when it is one, else as a `quoted-string` with `"` and `\`
//! escaped (RFC 9110, 5.6.4); an IPv6 node is `"[addr]"` (section 6). A
//! Host that cannot be a quoted-string (a control byte) is left out of our
//! element. The Host was checked before that ([`host_is_valid`]): an
//! invalid one is answered 400 (RFC 9112, 3.2), so a value made to close
//! the quotes and forge a hop never gets this far.
//!
//! What depends on the connection only (the client's and our address as
//! text) is made once, in a [`Forwarding`]; a request then copies bytes.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What one client connection's requests append, made once per
/// connection.
#[derive(Clone, Debug)]
pub(super) struct Forwarding {
    /// The client's address: our `X-Forwarded-For` element.
    client: HeaderValue,
    /// `for=..;proto=http[;by=..]`: our `Forwarded` element, but its host.
    element: HeaderValue,
}

impl Forwarding {
    /// For a connection from `peer` to `local` (our address, if known).
    pub(super) fn new(peer: SocketAddr, local: Option<SocketAddr>) -> Self {
        // A v4 client on a dual-stack socket is `::ffff:a.b.c.d`: named as
        // the IPv4 address it is.
        let ip = peer.ip().to_canonical();
        let mut element = Vec::with_capacity(64);
        element.extend_from_slice(b"for=");
        push_node(&mut element, ip);
        element.extend_from_slice(b";proto=http");
        if let Some(l) = local {
            element.extend_from_slice(b";by=");
            push_node(&mut element, l.ip().to_canonical());
        }
        Self {
            client: value(ip.to_string().into_bytes()),
            element: value(element),
        }
    }

    /// Appends our elements to `h`'s forwarding headers, and sets
    /// `X-Forwarded-Proto` (the scheme the client used with us).
    pub(super) fn add(&self, h: &mut HeaderMap) {
        let xff = appended(h, &X_FORWARDED_FOR, &self.client, None);
        let host = h.get(header::HOST).map(HeaderValue::as_bytes);
        let fwd = appended(h, &header::FORWARDED, &self.element, host);
        if let Some(v) = xff {
            h.insert(X_FORWARDED_FOR, v);
        }
        if let Some(v) = fwd {
            h.insert(header::FORWARDED, v);
        }
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

/// Bytes made here of addresses and ASCII: always a valid header value.
fn value(bytes: Vec<u8>) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(bytes)).expect("addresses and ASCII")
}

/// A node name (RFC 7239, 6): IPv4 bare, IPv6 as `"[addr]"` (its `:` and
/// brackets are no token).
fn push_node(out: &mut Vec<u8>, ip: IpAddr) {
    let _ = match ip {
        IpAddr::V4(a) => write!(out, "{a}"),
        IpAddr::V6(a) => write!(out, "\"[{a}]\""),
    };
}

/// Header `name`'s lines in `h` as one list, then `ours` (with `;host=`
/// and `host` if given and representable). `None` only if the result is no
/// header value, which a valid `h` and `ours` cannot make.
fn appended(
    h: &HeaderMap,
    name: &HeaderName,
    ours: &HeaderValue,
    host: Option<&[u8]>,
) -> Option<HeaderValue> {
    // An empty Host (a target without authority) names no host.
    let host = host.filter(|v| !v.is_empty() && representable(v));
    // Empty list elements count for nothing (RFC 9110, 5.6.1).
    let earlier = || h.get_all(name).iter().filter(|v| !v.is_empty());
    if earlier().next().is_none() && host.is_none() {
        // The common case: nothing to join, nothing to build.
        return Some(ours.clone());
    }
    let len = earlier().map(|v| v.len() + 2).sum::<usize>()
        + ours.len()
        + host.map_or(0, |v| 8 + 2 * v.len());
    let mut out = BytesMut::with_capacity(len);
    for v in earlier() {
        out.put_slice(v.as_bytes());
        out.put_slice(b", ");
    }
    out.put_slice(ours.as_bytes());
    if let Some(v) = host {
        out.put_slice(b";host=");
        push_value(&mut out, v);
    }
    HeaderValue::from_maybe_shared(out.freeze()).ok()
}

/// `tchar` (RFC 9110, 5.6.2): what a token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `v` can be a `quoted-string`: HTAB, SP, VCHAR and obs-text,
/// as `qdtext` or `quoted-pair` (RFC 9110, 5.6.4); no other control.
fn representable(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// `v` (representable) as a token if it is one, else quoted, `"` and `\`
/// escaped.
fn push_value(out: &mut BytesMut, v: &[u8]) {
    if v.iter().all(|&b| is_tchar(b)) {
        out.put_slice(v);
        return;
    }
    out.put_u8(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            out.put_u8(b'\\');
        }
        out.put_u8(b);
    }
    out.put_u8(b'"');
}

/// Whether the request's Host is one a server may take (RFC 9112, 3.2:
/// more than one Host line, or an invalid value, is a 400): `uri-host
/// [":" port]` of RFC 3986's characters only — unreserved, sub-delims,
/// `%`, `:` and IP-literal brackets. No quote, backslash, space or control
/// passes. A request without Host (HTTP/1.0) passes, naming no host.
///
/// A byte class rather than `http::uri::Authority`'s parser: that one
/// wants an owned copy of the value (an allocation per request) and takes
/// userinfo (`@`), which a Host must not carry.
pub(super) fn host_is_valid(h: &HeaderMap) -> bool {
    let mut hosts = h.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => true,
        (Some(v), None) => v
            .as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b)),
        (Some(_), Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    /// A request's headers after `lines`, from `from`, to 198.18.1.1:80.
    fn forwarded(from: &str, lines: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(*n, HeaderValue::from_bytes(v).expect("a header value"));
        }
        Forwarding::new(peer(from), Some(peer("198.18.1.1:80"))).add(&mut h);
        h
    }

    fn all<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII"))
            .collect()
    }

    const OURS: &str = "for=198.18.0.2;proto=http;by=198.18.1.1";

    #[test]
    fn a_host_goes_as_a_token_or_quoted_with_quotes_and_backslashes_escaped() {
        for (host, value) in [
            (&b"web.example"[..], "web.example"),
            (b"a:8080", "\"a:8080\""),
            (b"[fd00:5100::1]:80", "\"[fd00:5100::1]:80\""),
            (b"a b", "\"a b\""),
            (b"x;for=6.6.6.6,y", "\"x;for=6.6.6.6,y\""),
            (
                br#"a", for=6.6.6.6;host="b"#,
                r#""a\", for=6.6.6.6;host=\"b""#,
            ),
            (br"a\b", r#""a\\b""#),
        ] {
            let h = forwarded("198.18.0.2:4000", &[("host", host)]);
            assert_eq!(
                all(&h, "forwarded"),
                [format!("{OURS};host={value}")],
                "Host {}",
                String::from_utf8_lossy(host)
            );
        }
    }

    #[test]
    fn obs_text_is_quoted_and_a_host_no_quoted_string_can_hold_is_left_out() {
        let h = forwarded("198.18.0.2:4000", &[("host", b"a\tb\xe9")]);
        let mut want = format!("{OURS};host=\"a\tb").into_bytes();
        want.extend_from_slice(b"\xe9\"");
        assert_eq!(h.get("forwarded").expect("forwarded").as_bytes(), want);
        // HeaderValue refuses other controls; were one there, our element
        // would go without the host rather than not at all.
        let ours = HeaderValue::from_static(OURS);
        for control in [&b"a\x01b"[..], b"a\x7fb", b"a\r\nb"] {
            let v = appended(&HeaderMap::new(), &header::FORWARDED, &ours, Some(control));
            assert_eq!(v, Some(ours.clone()), "{control:?}");
        }
    }

    #[test]
    fn an_ipv6_client_is_quoted_in_forwarded_and_bare_in_x_forwarded_for() {
        let mut h = HeaderMap::new();
        Forwarding::new(
            peer("[fd00:5100::2]:4000"),
            Some(peer("[fd00:5100:1::1]:80")),
        )
        .add(&mut h);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=\"[fd00:5100::2]\";proto=http;by=\"[fd00:5100:1::1]\""]
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["fd00:5100::2"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        // A v4 client on a dual-stack socket is named as IPv4.
        let mut h = HeaderMap::new();
        Forwarding::new(peer("[::ffff:198.18.0.2]:4000"), None).add(&mut h);
        assert_eq!(all(&h, "forwarded"), ["for=198.18.0.2;proto=http"]);
        assert_eq!(all(&h, "x-forwarded-for"), ["198.18.0.2"]);
    }

    #[test]
    fn every_earlier_line_is_kept_and_ours_appended_once() {
        let h = forwarded(
            "198.18.0.2:4000",
            &[
                ("x-forwarded-for", b"198.18.200.1"),
                ("forwarded", b"for=198.18.200.1"),
                ("x-forwarded-for", b"198.18.200.2, 198.18.200.3"),
                ("x-forwarded-for", b""),
                (
                    "forwarded",
                    b"for=\"[fd00:5100::9]\";proto=https, for=198.18.200.3",
                ),
                ("host", b"a"),
            ],
        );
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["198.18.200.1, 198.18.200.2, 198.18.200.3, 198.18.0.2"]
        );
        assert_eq!(
            all(&h, "forwarded"),
            [format!(
                "for=198.18.200.1, for=\"[fd00:5100::9]\";proto=https, for=198.18.200.3, {OURS};host=a"
            )]
        );
    }

    #[test]
    fn nothing_earlier_and_no_host_is_our_element_alone() {
        let h = forwarded("198.18.0.2:4000", &[]);
        assert_eq!(all(&h, "forwarded"), [OURS]);
        assert_eq!(all(&h, "x-forwarded-for"), ["198.18.0.2"]);
        let h = forwarded("198.18.0.2:4000", &[("host", b"")]);
        assert_eq!(all(&h, "forwarded"), [OURS], "an empty Host names none");
    }

    #[test]
    fn a_host_is_valid_with_uri_characters_only_and_once() {
        let valid = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::HOST, HeaderValue::from_static(l));
            }
            host_is_valid(&h)
        };
        for ok in [
            &[][..],
            &[""],
            &["web.example"],
            &["web.example:8080"],
            &["[fd00:5100::1]:80"],
            &["198.18.1.1"],
            &["x;for=6.6.6.6,y"],
        ] {
            assert!(valid(ok), "{ok:?}");
        }
        for bad in [
            &[r#"a", for=6.6.6.6;host="b"#][..],
            &[r"a\b"],
            &["a b"],
            &["user@web.example"],
            &["a", "b"],
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
    }
}
