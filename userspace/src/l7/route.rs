//! Which instance a request goes to, as pure functions of the request's
//! head: its key (header, cookie, path segment, query parameter), the
//! priority rule it matches, and the least-loaded of a set of instances.

use hyper::{
    HeaderMap, Uri,
    header::{COOKIE, HeaderValue},
};

use crate::config::{PriorityRule, RequestKey, RequestMatch};

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

/// The value of query parameter `name` as sent (not percent-decoded:
/// clients must spell a key the same way each time).
fn query<'u>(uri: &'u Uri, name: &str) -> Option<&'u [u8]> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

/// Segment `n` (from 1) of the path: `/users/alice/cart`, 2 -> `alice`.
fn path_segment(uri: &Uri, n: u32) -> Option<&[u8]> {
    uri.path()
        .split('/')
        .filter(|s| !s.is_empty())
        .nth(usize::try_from(n).ok()?.checked_sub(1)?)
        .map(str::as_bytes)
}

/// The request's key as configured, if it carries one (an empty value
/// counts as missing).
#[must_use]
pub fn request_key<'r>(key: &RequestKey, uri: &'r Uri, headers: &'r HeaderMap) -> Option<&'r [u8]> {
    match key {
        RequestKey::Header(name) => headers.get(name.as_str()).map(HeaderValue::as_bytes),
        RequestKey::Cookie(name) => cookie(headers, name),
        RequestKey::PathSegment(n) => path_segment(uri, *n),
        RequestKey::Query(name) => query(uri, name),
    }
    .filter(|v| !v.is_empty())
}

/// Whether a request matches `m`.
#[must_use]
pub fn matches(m: &RequestMatch, uri: &Uri, headers: &HeaderMap) -> bool {
    match m {
        RequestMatch::Header { name, value } => headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes()),
        RequestMatch::Cookie { name, value } => cookie(headers, name) == Some(value.as_bytes()),
        RequestMatch::PathPrefix(p) => uri.path().starts_with(p.as_str()),
    }
}

/// The first priority rule the request matches.
#[must_use]
pub fn priority(rules: &[PriorityRule], uri: &Uri, headers: &HeaderMap) -> Option<usize> {
    rules.iter().position(|r| matches(&r.when, uri, headers))
}

/// How loaded an instance is, as its distributor sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    pub in_flight: u64,
    /// Smoothed response latency (head), milliseconds.
    pub latency_ms: f64,
}

impl Load {
    /// Expected wait of one more request: latency times the requests
    /// ahead of it (+1 for itself). A slow instance with nothing in flight
    /// still ranks behind a fast one with a little.
    #[must_use]
    pub fn cost(self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "in-flight counts are small")]
        let queue = (self.in_flight + 1) as f64;
        self.latency_ms.max(0.001) * queue
    }
}

/// The candidate with the lowest [`Load::cost`]; ties go to the first.
#[must_use]
pub fn least_loaded(candidates: impl IntoIterator<Item = (usize, Load)>) -> Option<usize> {
    candidates
        .into_iter()
        .min_by(|a, b| a.1.cost().total_cmp(&b.1.cost()))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&'static str, &str)]) -> (Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        (uri.parse().unwrap(), h)
    }

    #[test]
    fn keys_come_from_the_configured_place() {
        let (u, h) = head(
            "/users/alice/cart?user=bob&x=1",
            &[("x-user", "carol"), ("cookie", "a=1; user=dave; b=2")],
        );
        let key = |k| request_key(&k, &u, &h).map(|v| String::from_utf8(v.to_vec()).unwrap());
        assert_eq!(
            key(RequestKey::Header("x-user".into())).as_deref(),
            Some("carol")
        );
        assert_eq!(
            key(RequestKey::Cookie("user".into())).as_deref(),
            Some("dave")
        );
        assert_eq!(key(RequestKey::PathSegment(2)).as_deref(), Some("alice"));
        assert_eq!(key(RequestKey::PathSegment(1)).as_deref(), Some("users"));
        assert_eq!(key(RequestKey::PathSegment(4)), None);
        assert_eq!(
            key(RequestKey::Query("user".into())).as_deref(),
            Some("bob")
        );
        assert_eq!(key(RequestKey::Query("nope".into())), None);
        assert_eq!(key(RequestKey::Header("x-none".into())), None);
        assert_eq!(key(RequestKey::Cookie("us".into())), None);
    }

    #[test]
    fn an_empty_key_is_missing() {
        let (u, h) = head("/?user=", &[("x-user", ""), ("cookie", "user=")]);
        for k in [
            RequestKey::Header("x-user".into()),
            RequestKey::Cookie("user".into()),
            RequestKey::Query("user".into()),
        ] {
            assert_eq!(request_key(&k, &u, &h), None, "{k:?}");
        }
    }

    #[test]
    fn cookies_in_several_headers_are_found() {
        let (u, h) = head("/", &[("cookie", "a=1"), ("cookie", "plan=pro")]);
        assert!(matches(
            &RequestMatch::Cookie {
                name: "plan".into(),
                value: "pro".into()
            },
            &u,
            &h
        ));
    }

    #[test]
    fn priority_rules_match_in_order() {
        let rule = |name: &str, when| PriorityRule {
            name: name.into(),
            when,
            instances: vec!["x".into()],
        };
        let rules = [
            rule(
                "gold",
                RequestMatch::Header {
                    name: "x-tier".into(),
                    value: "gold".into(),
                },
            ),
            rule("checkout", RequestMatch::PathPrefix("/checkout".into())),
        ];
        let (u, h) = head("/checkout/1", &[("x-tier", "gold")]);
        assert_eq!(priority(&rules, &u, &h), Some(0));
        let (u, h) = head("/checkout/1", &[("x-tier", "silver")]);
        assert_eq!(priority(&rules, &u, &h), Some(1));
        let (u, h) = head("/check", &[("x-tier", "Gold")]);
        assert_eq!(priority(&rules, &u, &h), None, "values match exactly");
    }

    #[test]
    fn least_loaded_weighs_latency_by_queue() {
        let l = |in_flight, latency_ms| Load {
            in_flight,
            latency_ms,
        };
        // A slow instance loses to a fast one with a short queue...
        assert_eq!(least_loaded([(0, l(0, 50.0)), (1, l(3, 5.0))]), Some(1));
        // ...but not to a fast one with a long one.
        assert_eq!(least_loaded([(0, l(0, 50.0)), (1, l(20, 5.0))]), Some(0));
        assert_eq!(least_loaded([(4, l(1, 1.0)), (7, l(1, 1.0))]), Some(4));
        assert_eq!(least_loaded(std::iter::empty()), None);
    }
}
