//! Hop-by-hop headers (RFC 9110, 7.6.1): what the distributor drops
//! between a client and an instance, either way, and the one it keeps for
//! a tunnel (`Upgrade`).

use hyper::{
    HeaderMap, Request, Version,
    header::{self, HeaderName, HeaderValue},
};

/// Headers meaningful for one hop only (RFC 9110, 7.6.1), and those the
/// `Connection` header names. Most messages carry none but `Connection`
/// itself (a kept-alive response's `keep-alive`): one pass over the names
/// decides, and only what is there is looked up again.
pub(super) fn strip(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut fixed = [false; HOP_BY_HOP.len()];
    let mut connection = false;
    for n in h.keys() {
        if n == header::CONNECTION {
            connection = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|x| n == x) {
            fixed[i] = true;
        }
    }
    if connection {
        // Names other than the usual tokens are rare: no allocation for
        // `keep-alive`, `close` or `upgrade`.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !["keep-alive", "close", "upgrade"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for (n, there) in HOP_BY_HOP.iter().zip(fixed) {
        let keep = keep_upgrade && *n == header::UPGRADE;
        if there && !keep {
            h.remove(n);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if connection {
        h.remove(header::CONNECTION);
    }
}

/// Hop-by-hop headers by name (RFC 9110, 7.6.1), `Connection` aside.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn end_to_end_headers_pass_untouched() {
        let mut h = map(&[("host", "a"), ("x-user", "u1"), ("content-length", "3")]);
        strip(&mut h, false);
        assert_eq!(names(&h), ["content-length", "host", "x-user"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, x-secret"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("trailer", "x-sum"),
        ]);
        strip(&mut h, false);
        assert_eq!(names(&h), ["host"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_so_in_connection() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "Upgrade, x-secret"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
        ]);
        strip(&mut h, true);
        assert_eq!(names(&h), ["connection", "host", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
