//! Two hosts' control loops on one shared store, each with its own data
//! path and host, and the cluster read between intervals the way the
//! agent's `Cluster::sync` reads it: which instances other hosts run, which
//! hosts are live, and what every instance published. No kernel, no etcd.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_common::maps::NO_OWNER;

use super::{super::Controller, FakeHost};
use crate::{
    control::{MoveEvent, UNKNOWN_OWNER_INTERVALS},
    coord::{CoordStore, EmbeddedStore, GroupEntry, InstanceState},
    datapath::{Datapath, fake::MemDatapath},
    plan::{Group, Plan, RemotePlan, Resolved},
    testing::{config, ready},
};

/// Host `host` serving `kv` with `instances`: capacity 1000 pps, an element
/// sheds the interval it is over 0.8 and never takes work back (only
/// overload moves groups), no cooldown.
fn host_text(instances: &[&str]) -> String {
    let mut t = String::from(
        "[agent]\ninterval_ms = 1000\nmax_moves_per_sec = 1000\n\n\
         [[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
         wlm = { capacity_pps = 1000, overload = 0.8, underload = 0.0, sustain = 1, \
         cooldown_ms = 0, min_group_units = 256 }\n",
    );
    for (k, name) in instances.iter().enumerate() {
        let _ = write!(
            t,
            "\n[[service.instance]]\nname = \"{name}\"\nveth = \"v{k}\"\n"
        );
    }
    t
}

/// One host of the test cluster.
struct Host {
    name: String,
    ctl: Controller,
    dp: MemDatapath,
    probe: FakeHost,
}

/// Hosts sharing one store; `registered` is the cluster's instance
/// registry (name -> id, host), `live` the hosts holding their lease.
struct Cluster {
    store: Arc<EmbeddedStore>,
    hosts: Vec<Host>,
    registered: Vec<(String, u32, String)>,
    live: HashSet<String>,
    now: Instant,
}

impl Cluster {
    fn new() -> Self {
        Self {
            store: Arc::new(EmbeddedStore::in_memory()),
            hosts: Vec::new(),
            registered: Vec::new(),
            live: HashSet::new(),
            now: Instant::now(),
        }
    }

    /// Host `name` joins with `instances`, ids `ids` (cluster-wide), and
    /// settles its start against the store (another host's assignment is
    /// resumed). Returns its index.
    fn join(&mut self, name: &str, instances: &[&str], ids: &[u32]) -> usize {
        let cfg = config(&host_text(instances));
        let registered: Vec<(u32, String)> = ids
            .iter()
            .zip(instances)
            .map(|(id, n)| (*id, (*n).to_owned()))
            .collect();
        // Veth `v<k>` on ifindex 101 + k, as `FakeHost` resolves it.
        let mut k = 0u8;
        let mut plan = Plan::build_with_ids(&cfg, &registered, |_, _| {
            k += 1;
            Ok::<_, std::convert::Infallible>(Resolved {
                ifindex: 100 + u32::from(k),
                mac: [2, 0, 0, 0, 0, k],
                netns: None,
                netns_id: None,
            })
        })
        .unwrap_or_else(|e| match e {});
        for (id, n) in &registered {
            self.registered.push((n.clone(), *id, name.to_owned()));
        }
        self.live.insert(name.to_owned());
        plan.remote = self.remote_of(name);
        let store: Arc<dyn CoordStore> = self.store.clone();
        let probe = FakeHost::default();
        let ctl = ready(Controller::new(&cfg, &mut plan, store))
            .expect("controller")
            .with_probe(Box::new(probe.clone()));
        let mut dp = MemDatapath::default();
        for s in &plan.services {
            for (g, o) in &s.groups {
                dp.set_group_owner(s.id, *g, *o).expect("program");
            }
        }
        self.hosts.push(Host {
            name: name.to_owned(),
            ctl,
            dp,
            probe,
        });
        self.hosts.len() - 1
    }

    /// The instances registered by hosts other than `host`.
    fn remote_of(&self, host: &str) -> Vec<RemotePlan> {
        self.registered
            .iter()
            .filter(|(_, _, h)| h != host)
            .map(|(n, id, h)| RemotePlan {
                id: *id,
                name: n.clone(),
                service_id: 0,
                host: h.clone(),
            })
            .collect()
    }

    /// Every host reads the cluster, as `Cluster::sync` does each interval.
    fn sync(&mut self) {
        let loads = ready(self.store.loads()).expect("loads");
        for i in 0..self.hosts.len() {
            let remote = self.remote_of(&self.hosts[i].name);
            self.hosts[i].ctl.set_remote(&remote, &self.live, &loads);
        }
    }

    /// One interval on host `h` (a second after the last round).
    fn tick(&mut self, h: usize) -> Vec<MoveEvent> {
        let Host { ctl, dp, .. } = &mut self.hosts[h];
        ready(ctl.tick(dp, self.now)).unwrap_or_else(|e| panic!("host {h}'s interval failed: {e}"))
    }

    /// A second passes: every host reads the cluster, then runs its
    /// interval; then every host follows the store's changes, as the agent
    /// does when its watch reports them.
    fn round(&mut self) -> Vec<MoveEvent> {
        self.now += Duration::from_secs(1);
        self.sync();
        let made = (0..self.hosts.len()).flat_map(|h| self.tick(h)).collect();
        for Host { ctl, dp, .. } in &mut self.hosts {
            ready(ctl.follow(dp, Some("kv"))).expect("follow");
        }
        made
    }

    fn groups(&self) -> Vec<GroupEntry> {
        ready(self.store.groups("kv")).expect("groups")
    }

    fn owned_by(&self, name: &str) -> Vec<Group> {
        self.groups()
            .into_iter()
            .filter(|e| e.owner == name)
            .map(|e| e.group)
            .collect()
    }

    /// Host `h`'s data path says what the store says, units of owners it
    /// does not know excepted (`unknown`: they are punted, `NO_OWNER`).
    fn assert_agree(&self, h: usize, unknown: &[&str]) {
        let ids: HashMap<&str, u32> = self
            .registered
            .iter()
            .map(|(n, id, _)| (n.as_str(), *id))
            .collect();
        for e in self.groups() {
            let want = if e.owner.is_empty() || unknown.contains(&e.owner.as_str()) {
                NO_OWNER
            } else {
                ids[e.owner.as_str()]
            };
            for u in e.group.units().step_by(64) {
                assert_eq!(
                    self.hosts[h].dp.owner_of_unit(0, u),
                    want,
                    "host {h}: unit {u:#06x} of {} owned by `{}`",
                    e.group,
                    e.owner
                );
            }
        }
    }
}

fn group(base: u32, prefix_len: u32) -> Group {
    Group::new(base, prefix_len).expect("a group")
}

/// Host A runs `a0` (id 1, owns units 0x0000..0x8000 at the start) and `a1`
/// (id 2, 0x8000..); host B runs `b0` (id 3), given 0x0000..0x4000 by hand.
fn two_hosts() -> Cluster {
    let mut c = Cluster::new();
    let a = c.join("host-a", &["a0", "a1"], &[1, 2]);
    let b = c.join("host-b", &["b0"], &[3]);
    assert_eq!((a, b), (0, 1));
    c.sync();
    let Host { ctl, dp, .. } = &mut c.hosts[1];
    ready(ctl.move_group(dp, "kv", group(0, 2), "b0")).expect("b0 takes a quarter");
    let Host { ctl, dp, .. } = &mut c.hosts[0];
    ready(ctl.follow(dp, Some("kv"))).expect("A follows");
    assert_eq!(c.owned_by("a0"), vec![group(0x4000, 2)]);
    c
}

/// Defect (issue 27, D1): a failed instance on another host was a move
/// target. Its host publishes its load every interval like any other's —
/// utilisation about 0, the least loaded peer — and the other hosts' peers
/// were filtered only by their host's lease: an overloaded element on host
/// B shed work onto host A's failed `a0`, whose failover had already run.
#[test]
fn an_overloaded_host_never_sheds_to_another_hosts_failed_instance() {
    let mut c = two_hosts();
    // a1 is half loaded all along.
    c.hosts[0].dp.deliver(0, 0x8010, 500);
    c.round();
    c.hosts[0].dp.deliver(0, 0x8010, 500);
    c.round();
    // a0's veth goes: A takes it out and unowns its groups.
    c.hosts[0].probe.gone.lock().unwrap().insert(101);
    c.hosts[0].dp.deliver(0, 0x8010, 500);
    let made = c.round();
    assert!(c.hosts[0].ctl.is_failed("a0"));
    assert!(
        made.iter().any(|e| e.kind == "failover" && e.from == "a0"),
        "{made:?}"
    );
    assert!(c.owned_by("a0").is_empty());
    // Now b0 is overloaded (900 pps of 1000, in two halves of its group):
    // a1 has no room for either half, and a0 is failed.
    for _ in 0..4 {
        c.hosts[0].dp.deliver(0, 0x8010, 500);
        c.hosts[1].dp.deliver(0, 0x0010, 450);
        c.hosts[1].dp.deliver(0, 0x2010, 450);
        let made = c.round();
        assert!(
            made.iter().all(|e| e.to != "a0"),
            "a group was moved onto the failed a0: {made:?}"
        );
        assert!(
            c.owned_by("a0").is_empty(),
            "a0 owns {:?}",
            c.owned_by("a0")
        );
    }
    // Host B sees it as failed, not as an idle peer.
    let a0 = c.hosts[1]
        .ctl
        .remote_status()
        .into_iter()
        .find(|r| r.name == "a0")
        .expect("a0 seen by host B");
    assert_eq!(a0.state, InstanceState::Failed);
    c.assert_agree(0, &[]);
    c.assert_agree(1, &[]);
}

/// As with a failed one: a drained instance on another host publishes a
/// load near 0 and was the overloaded host's favourite receiver.
#[test]
fn an_overloaded_host_never_sheds_to_another_hosts_drained_instance() {
    let mut c = two_hosts();
    c.hosts[0].ctl.set_drained("a0", true).expect("a0 is A's");
    for _ in 0..2 {
        c.hosts[0].dp.deliver(0, 0x8010, 500);
        c.round();
    }
    assert!(c.owned_by("a0").is_empty(), "a0 gave its group away");
    for _ in 0..4 {
        c.hosts[0].dp.deliver(0, 0x8010, 500);
        c.hosts[1].dp.deliver(0, 0x0010, 450);
        c.hosts[1].dp.deliver(0, 0x2010, 450);
        let made = c.round();
        assert!(
            made.iter().all(|e| e.to != "a0"),
            "a group was moved onto the drained a0: {made:?}"
        );
    }
    let a0 = c.hosts[1]
        .ctl
        .remote_status()
        .into_iter()
        .find(|r| r.name == "a0")
        .expect("a0 seen by host B");
    assert_eq!(a0.state, InstanceState::Drained);
    c.assert_agree(0, &[]);
    c.assert_agree(1, &[]);
}

/// Defect (issue 27, D1): a failed instance's failover ran once. A group
/// another host moved onto it afterwards (it still looked like a peer
/// there) stayed with it for good: dead everywhere in the cluster.
#[test]
fn a_group_moved_onto_a_failed_instance_is_moved_away_within_two_intervals() {
    let mut c = two_hosts();
    c.round();
    c.hosts[0].probe.gone.lock().unwrap().insert(101);
    c.round();
    assert!(c.owned_by("a0").is_empty());
    // Host B, reading the cluster before A's failover, gives b0's group
    // to a0 (the store takes any registered name).
    let e = c
        .groups()
        .into_iter()
        .find(|e| e.owner == "b0")
        .expect("b0's group");
    ready(c.store.move_group("kv", e.group, e.version, "a0")).expect("moved onto a0");
    for h in 0..2 {
        let Host { ctl, dp, .. } = &mut c.hosts[h];
        ready(ctl.follow(dp, Some("kv"))).expect("follow");
    }
    assert_eq!(c.owned_by("a0"), vec![e.group]);
    c.round();
    c.round();
    assert!(
        c.owned_by("a0").is_empty(),
        "the failed a0 still owns {:?} two intervals later",
        c.owned_by("a0")
    );
    c.assert_agree(0, &[]);
    c.assert_agree(1, &[]);
}

/// Defect (issue 27, D1): a group whose owner this host does not know (an
/// instance removed on another host, its records gone) failed every data
/// path rewrite with `UnknownInstance`; the rewrite was retried at the top
/// of every interval, which then returned before measuring: no failover,
/// no WLM, no drains on this host, for good.
#[test]
fn an_owner_removed_from_the_cluster_does_not_stop_the_other_hosts_loop() {
    let mut c = two_hosts();
    c.round();
    // b0 is removed from host B's config and the cluster's records, with
    // its group still in the store (B stopped before giving it away).
    c.registered.retain(|(n, _, _)| n != "b0");
    c.sync();
    // A hears of a change of the assignment and follows it (the agent
    // logs a failure and carries on).
    let Host { ctl, dp, .. } = &mut c.hosts[0];
    let followed = ready(ctl.follow(dp, Some("kv")));
    // A keeps measuring: a1's traffic shows in its status.
    c.now += Duration::from_secs(1);
    c.hosts[0].dp.deliver(0, 0x8010, 300);
    let made = c.tick(0);
    assert!(followed.is_ok(), "following the store failed: {followed:?}");
    c.assert_agree(0, &["b0"]);
    let a1 = ready(c.hosts[0].ctl.status())
        .expect("status")
        .into_iter()
        .find(|s| s.name == "a1")
        .expect("a1");
    assert!(a1.sample.rate_pps > 0.0, "host A measured nothing: {a1:?}");
    // And once it has been unknown for UNKNOWN_OWNER_INTERVALS (2)
    // intervals, the orphaned group is taken, by compare and swap, by one
    // of A's instances.
    assert!(c.owned_by("b0").len() == 1, "not before: {made:?}");
    let mut made = made;
    for _ in 1..UNKNOWN_OWNER_INTERVALS {
        c.now += Duration::from_secs(1);
        made.extend(c.tick(0));
    }
    assert!(
        c.owned_by("b0").is_empty(),
        "b0 still owns {:?}",
        c.owned_by("b0")
    );
    assert!(
        made.iter().any(|e| e.kind == "failover" && e.from == "b0"),
        "{made:?}"
    );
    c.assert_agree(0, &[]);
}

/// A load record an older agent wrote (no state) reads as `ok`, so a
/// rolling upgrade keeps every instance a peer.
#[test]
fn an_older_agents_load_record_reads_as_ok() {
    let old: crate::coord::Load =
        serde_json::from_str(r#"{"utilisation":0.5,"rate_pps":10.0}"#).expect("an old record");
    assert_eq!(old.state, InstanceState::Ok);
    let failed = crate::coord::Load {
        state: InstanceState::Failed,
        ..crate::coord::Load::default()
    };
    let text = serde_json::to_string(&failed).expect("serialises");
    assert!(text.contains(r#""state":"failed""#), "{text}");
}
