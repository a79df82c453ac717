//! `health = "sockets"`: an instance whose application died while its
//! container and veth stayed up is failed from what its namespace's stack
//! shows, and taken back once its application is bound again.

use std::path::PathBuf;

use super::{FakeHost, Rig, mem, text};
use crate::{
    control::qos::NetnsStats,
    coord::EmbeddedStore,
    datapath::fake::MemDatapath,
    testing::{config, plan},
};

/// [`text`]'s three instances, each in namespace `ns-<k>`, with `health`.
fn rig(health: &str) -> Rig<MemDatapath, EmbeddedStore> {
    let mut t = text("even", 1000.0);
    if !health.is_empty() {
        t = t.replace(
            "[[service.instance]]\n",
            &format!("[[service.instance]]\nhealth = \"{health}\"\n"),
        );
    }
    let cfg = config(&t);
    let mut plan = plan(&cfg);
    for (k, i) in plan.instances.iter_mut().enumerate() {
        i.netns = Some(PathBuf::from(format!("/run/netns/ns-{k}")));
    }
    Rig::with_plan(&cfg, plan, EmbeddedStore::in_memory(), mem())
}

/// Instance `k`'s namespace shows `listeners` sockets on the service's
/// port and `refused` refusals so far.
fn show(host: &FakeHost, k: usize, listeners: u32, refused: u64) {
    host.sockets.lock().unwrap().insert(
        format!("ns-{k}"),
        NetnsStats {
            listeners: Some(listeners),
            refused,
            ..NetnsStats::default()
        },
    );
}

#[test]
fn an_instance_whose_application_closes_its_socket_fails_over_and_comes_back_once_bound_again() {
    let mut r = rig("");
    for k in 0..3 {
        show(&r.host, k, 1, 0);
    }
    let lost = r.owned_by("kv-1");
    r.tick().unwrap();
    assert!(!r.ctl.is_failed("kv-1"));
    // The server in kv-1 dies; its container and veth stay.
    show(&r.host, 1, 0, 0);
    let made = r.tick().unwrap();
    r.assert_kv1_failed_over(&made, &lost);
    // Still unbound: it stays failed past the hold-down (5 s).
    for _ in 0..8 {
        r.tick().unwrap();
        assert!(r.ctl.is_failed("kv-1"));
    }
    // Restarted: bound again, it is back after the hold-down.
    show(&r.host, 1, 1, 0);
    let mut ticks = 0;
    while r.ctl.is_failed("kv-1") {
        r.tick().unwrap();
        ticks += 1;
        assert!(ticks <= 7, "not back 7 intervals after binding again");
    }
    assert!(
        ticks >= 5,
        "back after {ticks} intervals, before the hold-down"
    );
    assert!(r.dp.is_live(2));
    r.assert_agree();
}

#[test]
fn an_instance_never_seen_bound_is_not_judged_by_its_sockets() {
    // An application serving from raw or AF_XDP sockets binds nothing.
    let mut r = rig("");
    for k in 0..3 {
        show(&r.host, k, 0, 0);
    }
    for _ in 0..5 {
        r.tick().unwrap();
    }
    assert!((0..3).all(|k| !r.ctl.is_failed(&format!("kv-{k}"))));
}

#[test]
fn health_veth_ignores_the_sockets() {
    let mut r = rig("veth");
    for k in 0..3 {
        show(&r.host, k, 1, 0);
    }
    r.tick().unwrap();
    show(&r.host, 1, 0, 0);
    for _ in 0..3 {
        r.tick().unwrap();
    }
    assert!(!r.ctl.is_failed("kv-1"));
}

#[test]
fn most_traffic_refused_for_two_intervals_fails_an_instance() {
    // Bound, but not where its traffic goes (say to 127.0.0.1 only): its
    // stack refuses what it is sent.
    let mut r = rig("");
    for k in 0..3 {
        show(&r.host, k, 1, 0);
    }
    let unit = r.owned_by("kv-1")[0].base();
    r.tick().unwrap();
    let mut refused = 0;
    // One interval refusing half, then a restart's blip: not failed.
    for (of_100, failed) in [
        (0, false),
        (60, false),
        (10, false),
        (60, false),
        (90, true),
    ] {
        r.dp.deliver(0, unit, 100);
        refused += of_100;
        show(&r.host, 1, 1, refused);
        r.tick().unwrap();
        assert_eq!(r.ctl.is_failed("kv-1"), failed, "refusing {of_100} of 100");
    }
}

/// Ticks until `kv-1` is back; how many it took.
fn ticks_until_back(r: &mut Rig<MemDatapath, EmbeddedStore>, most: u32) -> u32 {
    let mut ticks = 0;
    while r.ctl.is_failed("kv-1") {
        r.tick().unwrap();
        ticks += 1;
        assert!(
            ticks <= most,
            "not back {most} intervals after binding again"
        );
    }
    ticks
}

/// An application that dies again soon after each recovery (a crash under
/// load, say) waits twice as long each time before it gets work back, up
/// to 8 hold-downs; once it stays up for 10 hold-downs, a failure costs
/// one hold-down again.
#[test]
fn an_instance_failing_again_soon_after_recovering_waits_longer_each_time() {
    let mut r = rig("");
    for k in 0..3 {
        show(&r.host, k, 1, 0);
    }
    r.tick().unwrap();
    // Hold-down 5 s, an interval a second: back in 5 to 6 intervals once
    // bound again, then 10 to 11, 20 to 21, 40 to 41, and no longer.
    for want in [5, 10, 20, 40, 40] {
        show(&r.host, 1, 0, 0);
        r.tick().unwrap();
        assert!(r.ctl.is_failed("kv-1"));
        show(&r.host, 1, 1, 0);
        let took = ticks_until_back(&mut r, want + 2);
        assert!(took >= want, "back after {took} intervals, before {want}");
    }
    // Up for 10 hold-downs (50 s): the next failure is a first one again.
    for _ in 0..51 {
        r.tick().unwrap();
    }
    show(&r.host, 1, 0, 0);
    r.tick().unwrap();
    assert!(r.ctl.is_failed("kv-1"));
    show(&r.host, 1, 1, 0);
    let took = ticks_until_back(&mut r, 7);
    assert!(took >= 5, "back after {took} intervals");
    r.assert_agree();
}
