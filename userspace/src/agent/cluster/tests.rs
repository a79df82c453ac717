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
fn an_instance_keeps_its_id_over_a_reload_and_a_move_to_another_host() {
    let members = MemMembership::new();
    let ca = host_config("a", 1, 7000, &["a0", "a1"]);
    let a = join(&ca, members.another_agent()).expect("a joins");
    assert_eq!(local(&registry(&a, &ca)), [(1, "a0"), (2, "a1")]);

    // A reload drops a1 and adds a2: a1's id stays a1's.
    let reloaded = host_config("a", 1, 7000, &["a0", "a2"]);
    assert_eq!(local(&registry(&a, &reloaded)), [(1, "a0"), (3, "a2")]);

    // a1 starts on host b: same id, now b's.
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
