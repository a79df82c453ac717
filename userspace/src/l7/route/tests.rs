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
