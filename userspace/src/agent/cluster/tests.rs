//! The cluster glue against an in-memory membership: hosts joining one
//! cluster, their instances' ids, and what is refused.

use std::{fmt::Write as _, path::Path, sync::Arc};

use super::{Cluster, Registry};
use crate::{
    config::Config,
    coord::{CoordError, EmbeddedStore, InstanceRecord, Membership as _, fake::MemMembership},
    testing::{config, ready},
};

/// Host `host-<h>` (underlay `198.18.1.<last>`) serving `kv` on `port`
/// with `instances`.
fn host_config(h: &str, last: u8, port: u16, instances: &[&str]) -> Config {
    let mut text = format!(
        "[cluster]\nstore = \"etcd\"\nhost = \"host-{h}\"\nunderlay = \"198.18.1.{last}\"\n\
         etcd_endpoints = [\"http://198.18.0.1:2379\"]\n\n\
         [[service]]\nname = \"kv\"\nvip = \"198.18.0.100\"\nport = {port}\nprotocol = \"udp\"\n"
    );
    for name in instances {
        write!(
            text,
            "\n[[service.instance]]\nname = \"{name}\"\nveth = \"slc-{name}\"\n"
        )
        .expect("a String takes any text");
    }
    config(&text)
}

fn join(config: &Config, membership: MemMembership) -> Result<Cluster, CoordError> {
    ready(Cluster::join_with(
        config,
        Path::new("sluice.state"),
        Arc::new(EmbeddedStore::in_memory()),
        Arc::new(membership),
    ))
}

fn registry(c: &Cluster, config: &Config) -> Registry {
    ready(c.registry(config)).expect("registry")
}

fn local(r: &Registry) -> Vec<(u32, &str)> {
    r.local.iter().map(|(id, n)| (*id, n.as_str())).collect()
}

fn remote(r: &Registry) -> Vec<(&str, u32, &str)> {
    r.remote
        .iter()
        .map(|(n, rec)| (n.as_str(), rec.id, rec.host.as_str()))
        .collect()
}

#[test]
fn two_hosts_join_one_cluster_and_see_each_others_instances() {
    let members = MemMembership::new();
    let (ca, cb) = (
        host_config("a", 1, 7000, &["a0", "a1"]),
        host_config("b", 2, 7000, &["b0"]),
    );
    let a = join(&ca, members.another_agent()).expect("a joins");
    let ra = registry(&a, &ca);
    assert_eq!(local(&ra), [(1, "a0"), (2, "a1")], "the lowest free ids");
    assert!(ra.remote.is_empty(), "{:?}", ra.remote);

    let b = join(&cb, members.another_agent()).expect("b joins");
    let rb = registry(&b, &cb);
    assert_eq!(local(&rb), [(3, "b0")], "never an id `a` holds");
    assert_eq!(remote(&rb), [("a0", 1, "host-a"), ("a1", 2, "host-a")]);
    assert_eq!(
        remote(&registry(&a, &ca)),
        [("b0", 3, "host-b")],
        "a sees b's instance"
    );

    let hosts = ready(members.hosts()).unwrap();
    assert_eq!(hosts.keys().collect::<Vec<_>>(), ["host-a", "host-b"]);
    assert_eq!(hosts["host-b"].underlay.to_string(), "198.18.1.2");
    assert_eq!(hosts["host-b"].instances, ["b0"]);
}

#[test]
fn a_second_agent_with_the_hosts_name_is_refused_until_the_first_leaves() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0"]);
    let a = join(&ca, members.another_agent()).expect("a joins");
    let e = join(&host_config("a", 9, 7000, &["a0"]), members.another_agent())
        .err()
        .expect("a twin is refused");
    assert!(
        matches!(e, CoordError::HostTaken { ref host, .. } if host == "host-a"),
        "{e}"
    );
    assert!(e.to_string().contains("cluster.host"), "{e}");
    assert_eq!(
        ready(members.hosts()).unwrap()["host-a"]
            .underlay
            .to_string(),
        "198.18.1.1",
        "the first agent's record stands"
    );

    ready(a.membership.leave()).unwrap();
    assert!(ready(members.hosts()).unwrap().is_empty(), "left at once");
    join(&ca, members.another_agent()).expect("the name is free again");
}

#[test]
fn a_service_defined_differently_is_refused_before_the_host_joins() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0"]);
    let a = join(&ca, members.another_agent()).expect("a joins");
    let e = join(&host_config("b", 2, 7001, &["b0"]), members.another_agent())
        .err()
        .expect("b's `kv` differs");
    let text = e.to_string();
    assert!(matches!(e, CoordError::ServiceMismatch { .. }), "{text}");
    assert!(
        text.contains("ports: cluster has [7000], this host [7001]")
            && text.contains("first stored by host `host-a`"),
        "{text}"
    );
    assert_eq!(
        ready(members.hosts()).unwrap().keys().collect::<Vec<_>>(),
        ["host-a"],
        "b stayed out"
    );
    // A reload of `a` that changes the service is refused the same way.
    let e = ready(a.check(&host_config("a", 1, 7002, &["a0"]))).unwrap_err();
    assert!(matches!(e, CoordError::ServiceMismatch { .. }), "{e}");
    ready(a.check(&ca)).expect("the running definition still matches");
}

#[test]
fn an_instance_keeps_its_id_over_a_reload_and_a_dropped_ones_id_is_free_again() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0", "a1"]);
    let mut a = join(&ca, members.another_agent()).expect("a joins");
    assert_eq!(local(&registry(&a, &ca)), [(1, "a0"), (2, "a1")]);

    // A reload drops a1 and adds a2: a0 keeps its id; a1's is not given
    // while the reload may still be refused.
    let reloaded = host_config("a", 1, 7000, &["a0", "a2"]);
    assert_eq!(local(&registry(&a, &reloaded)), [(1, "a0"), (3, "a2")]);
    ready(a.settled(&reloaded)).expect("settled");
    assert!(!ready(members.instances()).unwrap().contains_key("a1"));

    // a1 starts on host b: a new instance, with the id that is free again.
    let cb = host_config("b", 2, 7000, &["a1"]);
    let b = join(&cb, members.another_agent()).expect("b joins");
    assert_eq!(local(&registry(&b, &cb)), [(2, "a1")]);
    assert_eq!(
        ready(members.instances()).unwrap()["a1"],
        InstanceRecord {
            id: 2,
            host: "host-b".into(),
            service: "kv".into(),
        }
    );
    assert_eq!(remote(&registry(&a, &reloaded)), [("a1", 2, "host-b")]);
}

/// Host `host-<h>` serving `web` on TCP port 80, at L7 (`layer = "http"`)
/// or L4.
fn web_config(h: &str, last: u8, l7: bool, instance: &str) -> Config {
    let (layer, addr) = if l7 {
        (
            "layer = \"http\"\n",
            format!("addr = \"198.18.16.{last}:8080\"\n"),
        )
    } else {
        ("", String::new())
    };
    config(&format!(
        "[cluster]\nstore = \"etcd\"\nhost = \"host-{h}\"\nunderlay = \"198.18.1.{last}\"\n\
         etcd_endpoints = [\"http://198.18.0.1:2379\"]\n\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.0.101\"\nport = 80\nprotocol = \"tcp\"\n{layer}\n\
         [[service.instance]]\nname = \"{instance}\"\nveth = \"slc-{instance}\"\n{addr}"
    ))
}

/// D6: a service run at L7 on one host and at L4 on another reads the same
/// packets two ways; the second host is refused, naming the field.
#[test]
fn a_service_at_l7_on_one_host_and_l4_on_another_is_refused() {
    let members = MemMembership::new();
    join(&web_config("a", 1, true, "w0"), members.another_agent()).expect("a joins");
    let e = join(&web_config("b", 2, false, "w1"), members.another_agent())
        .err()
        .expect("b runs `web` at L4");
    let text = e.to_string();
    assert!(matches!(e, CoordError::ServiceMismatch { .. }), "{text}");
    assert!(text.contains("layer: cluster has \"http\""), "{text}");
}

/// D6, compatibility: a definition stored by an older agent has no `layer`,
/// `http` or `origins` field; an L4 service without origins matches it.
#[test]
fn a_definition_without_the_newer_fields_reads_them_as_their_defaults() {
    let ours = super::service_spec(&web_config("a", 1, false, "w0").services[0]);
    let mut older = ours.clone();
    let object = older.as_object_mut().expect("an object");
    object.remove("layer");
    object.remove("http");
    object.remove("origins");
    assert_eq!(
        crate::coord::differing_fields(&older, &ours),
        Vec::<String>::new()
    );
    let l7 = super::service_spec(&web_config("a", 1, true, "w0").services[0]);
    assert!(
        crate::coord::differing_fields(&older, &l7)
            .iter()
            .any(|f| f.starts_with("layer: cluster has \"l4\"")),
        "{:?}",
        crate::coord::differing_fields(&older, &l7)
    );
}

/// D4: an instance name live on another host is refused (start and reload
/// alike, nothing of the refused registration applied); once that host is
/// gone, the instance may move here, keeping its id.
#[test]
fn an_instance_name_live_on_another_host_is_refused_until_that_host_is_gone() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0"]);
    let a = join(&ca, members.another_agent()).expect("a joins");
    assert_eq!(local(&registry(&a, &ca)), [(1, "a0")]);

    let cb = host_config("b", 2, 7000, &["b0", "a0"]);
    let b = join(&cb, members.another_agent()).expect("b joins");
    let e = ready(b.registry(&cb)).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, CoordError::InstanceTaken { ref instance, ref host } if instance == "a0" && host == "host-a"),
        "{text}"
    );
    assert!(text.contains("Rename"), "says how to fix it: {text}");
    let reg = ready(members.instances()).unwrap();
    assert_eq!(reg["a0"].host, "host-a", "a's instance stays a's");
    assert!(!reg.contains_key("b0"), "nothing half-applied: {reg:?}");
    assert!(
        remote(&registry(&a, &ca)).is_empty(),
        "a's own instance is not remote"
    );

    // A reload of b adding a0 is refused the same way.
    let cb0 = host_config("b", 2, 7000, &["b0"]);
    assert_eq!(local(&registry(&b, &cb0)), [(2, "b0")]);
    let e = ready(b.registry(&cb)).unwrap_err();
    assert!(matches!(e, CoordError::InstanceTaken { .. }), "{e}");

    // a is gone (its lease ended): a0 moves to b with its id.
    ready(a.membership.leave()).unwrap();
    assert_eq!(local(&registry(&b, &cb)), [(2, "b0"), (1, "a0")]);
    assert_eq!(ready(members.instances()).unwrap()["a0"].host, "host-b");
}

/// The host record lists the host's instances as they are after a reload.
#[test]
fn the_host_record_follows_a_reload() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0", "a1"]);
    let mut a = join(&ca, members.another_agent()).expect("a joins");
    registry(&a, &ca);
    ready(a.settled(&ca)).expect("settled");
    let reloaded = host_config("a", 1, 7000, &["a0", "a2"]);
    registry(&a, &reloaded);
    ready(a.settled(&reloaded)).expect("settled");
    assert_eq!(
        ready(members.hosts()).unwrap()["host-a"].instances,
        ["a0", "a2"]
    );
}

/// D5: a reload that drops an instance deletes its record, so its id is
/// free again: a cluster that registers and drops instances for ever never
/// runs out of ids.
#[test]
fn dropped_instances_free_their_ids_over_many_reloads() {
    let members = MemMembership::new();
    let first = host_config("a", 1, 7000, &["keep"]);
    let mut a = join(&first, members.another_agent()).expect("a joins");
    registry(&a, &first);
    for n in 0..=sluice_common::MAX_INSTANCES + 10 {
        let name = format!("x{n}");
        let c = host_config("a", 1, 7000, &["keep", &name]);
        let r = ready(a.registry(&c)).unwrap_or_else(|e| panic!("reload {n}: {e}"));
        // The previous reload's instance still holds its id until this
        // reload took effect: the new one takes 2 or 3, never more.
        assert!(
            matches!(local(&r)[..], [(1, "keep"), (2 | 3, _)]),
            "reload {n}: {:?}",
            local(&r)
        );
        ready(a.settled(&c)).expect("settled");
    }
    assert_eq!(
        ready(members.instances())
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["keep", &format!("x{}", sluice_common::MAX_INSTANCES + 10)]
    );
}

/// D5: the instances of a host gone longer than the grace are collected
/// (their ids free again); a host gone for less keeps them.
#[test]
fn a_dead_hosts_instances_are_collected_after_the_grace() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0"]);
    let cb = host_config("b", 2, 7000, &["b0"]);
    let mut a = join(&ca, members.another_agent()).expect("a joins");
    registry(&a, &ca);
    let b = join(&cb, members.another_agent()).expect("b joins");
    registry(&b, &cb);
    ready(b.membership.leave()).unwrap();

    let t0 = std::time::Instant::now();
    let grace = super::collect_grace(&ca);
    assert!(ready(a.collect(t0)).unwrap().is_empty(), "just gone");
    assert!(
        ready(a.collect(t0 + grace / 2)).unwrap().is_empty(),
        "within the grace"
    );
    assert_eq!(ready(a.collect(t0 + grace)).unwrap(), ["b0"]);
    assert_eq!(
        ready(members.instances())
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["a0"]
    );
}

/// D5: `REMOTE_HOSTS` slots go to live hosts only: over the cluster's life
/// far more than `MAX_HOSTS` hosts come and go, and a slot freed when its
/// host died is given again (not while instance entries may still name
/// it: only from the next look on).
#[test]
fn remote_host_slots_are_reused_after_their_host_is_gone() {
    let mut slots = super::Slots::default();
    for round in 0..3 * sluice_common::MAX_HOSTS {
        let live: std::collections::HashSet<String> =
            [format!("h{round}"), "steady".to_owned()].into();
        slots.forget_dead(&live);
        let s = slots
            .slot(&format!("h{round}"))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!((1..=3).contains(&s), "round {round}: slot {s}");
        assert!(slots.slot("steady").is_ok());
        slots.end_of_look();
    }
    assert_eq!(
        slots.slot("steady").unwrap(),
        2,
        "a live host keeps its slot"
    );
}
