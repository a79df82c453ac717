use hyper::header::HeaderValue;

use super::*;
use crate::config::{PriorityRule, RequestKey, RequestMatch};

/// Every unit owned by one instance id.
struct OwnedBy(u32);

impl Owners for OwnedBy {
    fn owner(&self, _service_id: u32, _unit: u32) -> u32 {
        self.0
    }
}

const A: usize = 0;
const B: usize = 1;
const G: usize = 2;

/// Instances `a`, `b` (ids 1, 2) ordinary and `g` (id 3) the subset of
/// rule `gold` (`x-tier: gold`), all with the same load; every unit owned
/// by `owner`.
fn service(owner: u32) -> ServiceL7 {
    let cfg = HttpConfig {
        key: Some(RequestKey::Header("x-user".into())),
        priority: vec![PriorityRule {
            name: "gold".into(),
            when: RequestMatch::Header {
                name: "x-tier".into(),
                value: "gold".into(),
            },
            instances: vec!["g".into()],
        }],
        ..HttpConfig::default()
    };
    let names = ["a", "b", "g"];
    let backends: Vec<Arc<Backend>> = (1..)
        .zip(names)
        .map(|(id, name)| {
            Arc::new(Backend {
                name: name.into(),
                id,
                reserved: cfg.is_reserved(name),
                pool: pool::Pool::new(
                    "198.18.16.2:8080".parse().unwrap(),
                    cfg.pool_size,
                    cfg.pool_idle,
                    cfg.connect_timeout,
                    1,
                ),
                stats: stats::InstanceStats::default(),
                failed: AtomicBool::new(false),
                down_until: AtomicU64::new(0),
                failures: AtomicU32::new(0),
            })
        })
        .collect();
    ServiceL7 {
        id: 1,
        name: "web".into(),
        by_id: backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id, i))
            .collect(),
        router: route::Router::new(&cfg.priority, &names),
        backends,
        counts: Arc::default(),
        owners: Arc::new(OwnedBy(owner)),
        cfg,
    }
}

fn candidates(svc: &ServiceL7, headers: &[(&'static str, &str)]) -> Vec<usize> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    svc.route(&Uri::from_static("/"), &h, 7).collect()
}

fn routed(svc: &ServiceL7, how: route::Routed) -> u64 {
    svc.counts.routed[how.index()].load(Relaxed)
}

#[test]
fn a_failed_or_ejected_owner_is_passed_over() {
    let svc = service(2);
    let alice = [("x-user", "alice")];
    assert_eq!(candidates(&svc, &alice), [B, A]);
    svc.backends[B].failed.store(true, Relaxed);
    assert_eq!(candidates(&svc, &alice), [A], "failed");
    svc.backends[B].failed.store(false, Relaxed);
    for _ in 0..svc.cfg.eject_after_failures {
        svc.failed(B);
    }
    assert_eq!(candidates(&svc, &alice), [A], "ejected");
    // Back once its time is up.
    svc.backends[B].down_until.store(coarse_ms(), Relaxed);
    assert_eq!(candidates(&svc, &alice), [B, A]);
}

#[test]
fn only_failures_in_a_row_eject_an_instance() {
    let svc = service(2);
    let alice = [("x-user", "alice")];
    let n = svc.cfg.eject_after_failures;
    assert!(n > 1, "one failure must not eject");
    for _ in 1..n {
        svc.failed(B);
    }
    assert_eq!(candidates(&svc, &alice), [B, A], "not yet");
    // An answer in between starts the count again.
    svc.answered(B);
    for _ in 1..n {
        svc.failed(B);
    }
    assert_eq!(candidates(&svc, &alice), [B, A], "the count started again");
    svc.failed(B);
    assert_eq!(candidates(&svc, &alice), [A], "ejected after {n} in a row");
}

#[test]
fn each_request_is_counted_by_how_it_was_routed() {
    use route::Routed::{Fallback, Flow, Key, Priority};
    // Owned by the reserved `g`: every request without a rule falls back.
    let svc = service(3);
    assert_eq!(candidates(&svc, &[("x-user", "alice")]), [A, B]);
    assert_eq!(candidates(&svc, &[]), [A, B]);
    assert_eq!(candidates(&svc, &[("x-tier", "gold")]), [G]);
    let counts: Vec<u64> = [Key, Flow, Priority, Fallback]
        .into_iter()
        .map(|how| routed(&svc, how))
        .collect();
    assert_eq!(counts, [1, 1, 1, 2], "key, flow, priority, fallback");
    let hits: u64 = svc.counts.hits.iter().map(|h| h.load(Relaxed)).sum();
    assert_eq!(hits, 2, "a priority request hits no unit");
    // An unknown owner (another host's instance, or none) falls back too.
    let svc = service(9);
    assert_eq!(candidates(&svc, &[("x-user", "alice")]), [A, B]);
    assert_eq!(routed(&svc, Fallback), 1);
}
