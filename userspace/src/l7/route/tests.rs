use std::cell::Cell;

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

/// Instances as a test sets them: who owns which unit here, which are
/// available (changeable while a request's candidates are being read),
/// and their loads.
struct Fake {
    owners: Vec<(u32, usize)>,
    up: Vec<Cell<bool>>,
    loads: Vec<Load>,
}

impl Instances for Fake {
    fn owner(&self, unit: u32) -> Option<usize> {
        self.owners
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, i)| *i)
    }

    fn available(&self, i: usize) -> bool {
        self.up[i].get()
    }

    fn load(&self, i: usize) -> Load {
        self.loads[i]
    }
}

/// `a`, `b`, `c` ordinary; `g1`, `g2` the subset of rule `gold`
/// (`x-tier: gold`). Requests are keyed by `x-user`.
const NAMES: [&str; 5] = ["a", "b", "c", "g1", "g2"];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const G1: usize = 3;
const G2: usize = 4;

fn config(spill: bool) -> HttpConfig {
    HttpConfig {
        key: Some(RequestKey::Header("x-user".into())),
        priority: vec![PriorityRule {
            name: "gold".into(),
            when: RequestMatch::Header {
                name: "x-tier".into(),
                value: "gold".into(),
            },
            instances: vec!["g1".into(), "g2".into()],
        }],
        spill,
        ..HttpConfig::default()
    }
}

/// All up; cost rising from `c` (lowest) through `a`, `b`, `g2` to `g1`.
fn fake(owners: &[(u32, usize)]) -> Fake {
    let l = |latency_ms| Load {
        in_flight: 0,
        latency_ms,
    };
    Fake {
        owners: owners.to_vec(),
        up: NAMES.iter().map(|_| Cell::new(true)).collect(),
        loads: vec![l(2.0), l(3.0), l(1.0), l(5.0), l(4.0)],
    }
}

fn unit_of_user(user: &str) -> u32 {
    unit_of(key::request(user.as_bytes()))
}

/// What the router decides for a request with `headers` on flow key 7:
/// how, the unit, whether it fell back, and every candidate.
fn decide(
    cfg: &HttpConfig,
    f: &Fake,
    headers: &[(&'static str, &str)],
) -> (Routed, Option<u32>, bool, Vec<usize>) {
    let router = Router::new(&cfg.priority, &NAMES);
    let (u, h) = head("/", headers);
    let r = router.route(cfg, f, &u, &h, 7);
    (r.how, r.unit, r.fell_back, r.candidates.collect())
}

#[test]
fn the_owner_comes_first_then_the_least_loaded_other_ordinary() {
    let alice = unit_of_user("alice");
    let f = fake(&[(alice, B)]);
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), false, vec![B, C])
    );
    // The retry skips the first choice even when it is the least loaded.
    let f = fake(&[(alice, C)]);
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]).3,
        vec![C, A]
    );
}

#[test]
fn an_owner_that_cannot_take_it_falls_back_to_the_least_loaded_ordinary() {
    let alice = unit_of_user("alice");
    // Down (failed or ejected: the same to routing).
    let f = fake(&[(alice, B)]);
    f.up[B].set(false);
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), true, vec![C, A])
    );
    // Reserved: it takes its rule's requests only, even when up.
    let f = fake(&[(alice, G2)]);
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), true, vec![C, A])
    );
    // On another host (or nobody's): the owner array names no instance here.
    let f = fake(&[]);
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), true, vec![C, A])
    );
}

#[test]
fn a_priority_request_goes_to_the_least_loaded_of_its_subset_only() {
    let f = fake(&[(unit_of_user("alice"), A)]);
    let gold = [("x-tier", "gold"), ("x-user", "alice")];
    assert_eq!(
        decide(&config(false), &f, &gold),
        (Routed::Priority, None, false, vec![G2, G1])
    );
    // Its subset down: no instance, not an ordinary one, spill or not.
    f.up[G1].set(false);
    f.up[G2].set(false);
    for spill in [false, true] {
        assert_eq!(
            decide(&config(spill), &f, &gold).3,
            Vec::<usize>::new(),
            "spill {spill}"
        );
    }
}

#[test]
fn reserved_instances_take_fallbacks_only_with_spill() {
    let alice = unit_of_user("alice");
    let f = fake(&[(alice, A)]);
    for i in [A, B, C] {
        f.up[i].set(false);
    }
    assert_eq!(
        decide(&config(false), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), true, vec![])
    );
    assert_eq!(
        decide(&config(true), &f, &[("x-user", "alice")]),
        (Routed::Key, Some(alice), true, vec![G2, G1])
    );
    // Spill is the last resort: an ordinary instance up comes first.
    f.up[B].set(true);
    assert_eq!(
        decide(&config(true), &f, &[("x-user", "alice")]).3,
        vec![B, G2]
    );
}

#[test]
fn without_a_key_the_flow_hash_picks_the_unit() {
    let flow = unit_of(7);
    assert_ne!(flow, unit_of_user("alice"), "the test needs two units");
    let f = fake(&[(flow, A), (unit_of_user("alice"), B)]);
    // The key configured, none in the request.
    assert_eq!(
        decide(&config(false), &f, &[]),
        (Routed::Flow, Some(flow), false, vec![A, C])
    );
    // No key configured: the one the request carries does not count.
    let cfg = HttpConfig {
        key: None,
        ..config(false)
    };
    assert_eq!(
        decide(&cfg, &f, &[("x-user", "alice")]),
        (Routed::Flow, Some(flow), false, vec![A, C])
    );
}

#[test]
fn the_retry_is_chosen_when_asked_and_is_the_last() {
    let alice = unit_of_user("alice");
    let cfg = config(false);
    let f = fake(&[(alice, B)]);
    let router = Router::new(&cfg.priority, &NAMES);
    let (u, h) = head("/", &[("x-user", "alice")]);
    let mut candidates = router.route(&cfg, &f, &u, &h, 7).candidates;
    assert_eq!(candidates.next(), Some(B));
    // `c` went down after the first choice was made.
    f.up[C].set(false);
    assert_eq!(candidates.next(), Some(A));
    assert_eq!(candidates.next(), None, "a request is retried once");
    // No other instance to retry on.
    let f = fake(&[(alice, B)]);
    for i in [A, C] {
        f.up[i].set(false);
    }
    assert_eq!(decide(&cfg, &f, &[("x-user", "alice")]).3, vec![B]);
}

#[test]
fn routed_labels_are_the_metrics_in_counter_order() {
    let labels: Vec<&str> = Routed::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels, ["key", "flow", "priority", "fallback"]);
    for (i, r) in Routed::ALL.iter().enumerate() {
        assert_eq!(r.index(), i, "{r:?}");
    }
}
