//! The control loop against an in-memory data path and host: claim, drain,
//! failover, reload, and writes that fail half-way — no kernel, no root.
//! After every step the data path must say what the store says.

use std::{
    collections::HashSet,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_common::{UNITS_PER_SERVICE, maps::NO_OWNER};

use super::{ControlError, Controller, UNOWNED, qos::NetnsStats};
use crate::{
    coord::{
        CoordError, CoordStore, EmbeddedStore,
        fake::{FaultyStore, StoreFault},
    },
    datapath::{
        Datapath,
        fake::{Fault, Faulty, MemDatapath},
    },
    plan::{Group, Plan},
    testing::{config, plan, ready},
};

/// Three instances of one UDP service, `kv-0..2` (ids 1..3, ifindex
/// 101..103); idle instances take no work back, so only what a test does
/// moves groups.
fn text(assign: &str, moves_per_sec: f64) -> String {
    let mut t = format!(
        "[agent]\ninterval_ms = 1000\nmax_moves_per_sec = {moves_per_sec}\n\n\
         [[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
         assign = \"{assign}\"\nwlm = {{ underload = 0.0, min_group_units = 4096 }}\n"
    );
    for i in 0..3 {
        let _ = write!(
            t,
            "\n[[service.instance]]\nname = \"kv-{i}\"\nveth = \"v{i}\"\n"
        );
    }
    t
}

/// A host whose veths exist until a test removes them (by ifindex), and
/// come back when a test re-creates them (veth name -> new ifindex).
#[derive(Clone, Default)]
struct FakeHost {
    gone: Arc<Mutex<HashSet<u32>>>,
    recreated: Arc<Mutex<std::collections::HashMap<String, u32>>>,
    /// What each instance's namespace (by its path's file name) shows;
    /// unreadable when absent.
    sockets: Arc<Mutex<std::collections::HashMap<String, NetnsStats>>>,
}

impl super::qos::Probe for FakeHost {
    fn link_exists(&self, ifindex: u32) -> bool {
        !self.gone.lock().unwrap().contains(&ifindex)
    }

    fn netns_stats(&self, netns: &std::path::Path, _: &[u16]) -> std::io::Result<NetnsStats> {
        let name = netns.file_name().and_then(|n| n.to_str()).unwrap_or("");
        self.sockets
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .ok_or_else(|| std::io::ErrorKind::Unsupported.into())
    }

    fn cgroup_usage_usec(&self, _: &std::path::Path) -> std::io::Result<u64> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    fn resolve(&self, inst: &crate::config::Instance) -> Option<crate::plan::Resolved> {
        let ifindex = match self.recreated.lock().unwrap().get(&inst.veth) {
            Some(&ix) => ix,
            // `v<k>` was made on ifindex 101 + k (see `testing::plan`).
            None => 101 + inst.veth[1..].parse::<u32>().ok()?,
        };
        (!self.gone.lock().unwrap().contains(&ifindex)).then(|| crate::plan::Resolved {
            ifindex,
            mac: [2, 0, 0, 0, 1, u8::try_from(ifindex & 0xff).unwrap()],
            netns: None,
            netns_id: None,
        })
    }
}

struct Rig<D, S> {
    ctl: Controller,
    plan: Plan,
    dp: D,
    store: Arc<S>,
    host: FakeHost,
    now: Instant,
}

impl<D: Datapath, S: CoordStore + 'static> Rig<D, S> {
    fn new(text: &str, store: S, dp: D) -> Self {
        let cfg = config(text);
        let plan = plan(&cfg);
        Self::with_plan(&cfg, plan, store, dp)
    }

    fn with_plan(cfg: &crate::config::Config, mut plan: Plan, store: S, mut dp: D) -> Self {
        let store = Arc::new(store);
        let host = FakeHost::default();
        let ctl = ready(Controller::new(cfg, &mut plan, store.clone()))
            .expect("controller")
            .with_probe(Box::new(host.clone()));
        // What `XdpDatapath::program` writes of the settled assignment.
        for s in &plan.services {
            for (g, o) in &s.groups {
                dp.set_group_owner(s.id, *g, *o).expect("program");
            }
        }
        Self {
            ctl,
            plan,
            dp,
            store,
            host,
            now: Instant::now(),
        }
    }

    /// One control interval, a second after the last.
    fn tick(&mut self) -> Result<Vec<super::MoveEvent>, ControlError> {
        self.now += Duration::from_secs(1);
        ready(self.ctl.tick(&mut self.dp, self.now))
    }

    fn claim(&mut self, unit: u32) -> Option<u32> {
        ready(self.ctl.claim(&mut self.dp, 0, unit, self.now)).expect("claim")
    }

    fn id(&self, name: &str) -> u32 {
        if name == UNOWNED {
            return NO_OWNER;
        }
        self.plan
            .instances
            .iter()
            .find(|i| i.name == name)
            .expect("configured")
            .id
    }

    /// The store's groups of `kv`, checked to partition the units.
    fn groups(&self) -> Vec<crate::coord::GroupEntry> {
        let g = ready(self.store.groups("kv")).expect("groups");
        crate::coord::check_partition(g.iter().map(|e| &e.group)).expect("a partition");
        g
    }

    /// Units whose owner in the data path is not the store's.
    fn disagreements(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in self.groups() {
            let want = self.id(&e.owner);
            out.extend(
                e.group
                    .units()
                    .filter(|&u| self.dp.owner_of_unit(0, u) != want),
            );
        }
        out
    }

    fn assert_agree(&self) {
        let d = self.disagreements();
        assert!(
            d.is_empty(),
            "{} units where the data path disagrees with the store, first {:#06x}",
            d.len(),
            d[0]
        );
    }

    fn owned_by(&self, name: &str) -> Vec<Group> {
        self.groups()
            .into_iter()
            .filter(|e| e.owner == name)
            .map(|e| e.group)
            .collect()
    }
}

impl<S: CoordStore + 'static> Rig<MemDatapath, S> {
    /// `kv-1` (id 2) was failed over by the interval that `made` these
    /// moves: failed, out of the data path, each of its groups `lost`
    /// unowned; their units are punted now, and the first packet of one
    /// claims it for a survivor.
    fn assert_kv1_failed_over(&mut self, made: &[super::MoveEvent], lost: &[Group]) {
        assert!(self.ctl.is_failed("kv-1"), "failed at this interval");
        assert!(!self.dp.is_live(2), "out of the data path at once");
        assert_eq!(
            made.iter().filter(|e| e.kind == "failover").count(),
            lost.len()
        );
        assert!(self.owned_by("kv-1").is_empty());
        self.assert_agree();
        let unit = lost[0].base();
        assert_eq!(self.dp.owner_of_unit(0, unit), NO_OWNER);
        let owner = self.claim(unit).expect("a survivor");
        assert!(owner == 1 || owner == 3, "claimed by {owner}");
    }
}

mod cluster;
mod sockets;

fn mem() -> MemDatapath {
    MemDatapath::default()
}

#[test]
fn claim_gives_an_unowned_group_to_the_least_loaded_and_writes_it() {
    let mut r = Rig::new(
        &text("on-demand", 1000.0),
        EmbeddedStore::in_memory(),
        mem(),
    );
    assert_eq!(r.groups().len(), 1, "on-demand: one unowned group");
    assert!(r.groups()[0].owner.is_empty());
    // kv-0 is busy: its utilisation is measured over two intervals.
    let first = r.claim(0x0010).expect("an owner");
    r.assert_agree();
    assert_eq!(
        r.groups().iter().filter(|e| !e.owner.is_empty()).count(),
        1,
        "one min_group_units group claimed"
    );
    let again = r.claim(0x0fff).expect("same group");
    assert_eq!(again, first, "a unit of a claimed group keeps its owner");
    let claims = |r: &Rig<_, _>| r.ctl.history().iter().filter(|e| e.kind == "claim").count();
    assert_eq!(claims(&r), 1, "no second claim for the same group");

    // Equally idle instances take turns: the next two claims go to the
    // other two.
    let owners: HashSet<u32> = [0x1000, 0x2000]
        .into_iter()
        .map(|u| r.claim(u).expect("an owner"))
        .chain([first])
        .collect();
    assert_eq!(owners.len(), 3, "claims spread over all instances");
    r.assert_agree();

    // Now load the owner of unit 0x0010 well past the others.
    r.tick().unwrap();
    r.dp.deliver(0, 0x0010, 90_000);
    r.tick().unwrap();
    for u in (0x3000..UNITS_PER_SERVICE).step_by(0x1000) {
        assert_ne!(r.claim(u), Some(first), "unit {u:#x} went to the busy one");
    }
    r.assert_agree();
    assert_eq!(claims(&r), 16);
}

#[test]
fn drain_moves_every_group_away_within_the_move_limit() {
    let mut r = Rig::new(&text("even", 1.0), EmbeddedStore::in_memory(), mem());
    let before = r.owned_by("kv-0");
    assert!(!before.is_empty());
    r.ctl.set_drained("kv-0", true).unwrap();
    assert!(matches!(
        r.ctl.set_drained("nope", true),
        Err(ControlError::UnknownInstance { .. })
    ));
    let mut steps = 0;
    while !r.owned_by("kv-0").is_empty() {
        let made = r.tick().unwrap();
        // One move a second, and ticks are a second apart.
        assert!(made.len() <= 1, "{made:?}");
        assert!(made.iter().all(|e| e.kind == "drain" && e.from == "kv-0"));
        r.assert_agree();
        steps += 1;
        assert!(steps <= before.len() + 1, "the drain does not end");
    }
    assert_eq!(steps, before.len(), "one interval a group");
    // Drained, it takes nothing: not from claims, not from its peers.
    for _ in 0..5 {
        r.tick().unwrap();
    }
    assert!(r.owned_by("kv-0").is_empty());
    r.ctl.set_drained("kv-0", false).unwrap();
    assert!(!r.ctl.is_drained("kv-0"));
}

#[test]
fn failover_unowns_a_vanished_instance_and_survivors_claim_its_units() {
    let mut r = Rig::new(&text("even", 1000.0), EmbeddedStore::in_memory(), mem());
    let lost = r.owned_by("kv-1");
    r.tick().unwrap();
    assert!(!r.ctl.is_failed("kv-1"));
    r.host.gone.lock().unwrap().insert(102);
    let made = r.tick().unwrap();
    r.assert_kv1_failed_over(&made, &lost);
    r.assert_agree();
    // A failed instance stays out of claims.
    for g in &lost {
        assert_ne!(r.claim(g.base()), Some(2));
    }
    r.assert_agree();
}

/// Defect: a store error in the middle of a failover left the failed
/// instance's groups owned by it in the store, and `claim` returned the dead
/// owner, so punted frames went into a dead veth until the failover was
/// finished.
#[test]
fn claim_never_returns_a_failed_owner_while_its_failover_is_pending() {
    let mut r = Rig::new(&text("even", 1000.0), FaultyStore::new(), mem());
    let lost = r.owned_by("kv-1");
    r.tick().unwrap();
    r.host.gone.lock().unwrap().insert(102);
    // The failover's first store write fails (disk full).
    r.store.fail_once(StoreFault::Move);
    assert!(r.tick().is_err(), "the failed write is reported");
    assert!(r.ctl.is_failed("kv-1"));
    assert!(!r.dp.is_live(2), "out of the data path at once");
    let pending: Vec<Group> = r.owned_by("kv-1");
    assert!(!pending.is_empty(), "the store still names the dead owner");
    for g in &pending {
        assert_eq!(
            r.claim(g.base()),
            None,
            "no frame for {g} to the dead owner"
        );
    }
    // The next interval finishes the failover; then its units are claimed
    // by survivors.
    r.tick().unwrap();
    assert!(r.owned_by("kv-1").is_empty());
    let owner = r.claim(lost[0].base()).expect("a survivor");
    assert!(owner == 1 || owner == 3, "claimed by {owner}");
    r.assert_agree();
}

#[test]
fn a_store_write_failing_mid_move_changes_neither_owner() {
    let mut r = Rig::new(&text("even", 1000.0), FaultyStore::new(), mem());
    let target: Group = "0x0000/4".parse().unwrap();
    // The move splits kv-0's first group down to `target`, then moves it:
    // the move's write fails (disk full).
    r.store.fail_once(StoreFault::Move);
    let e = ready(r.ctl.move_group(&mut r.dp, "kv", target, "kv-2"));
    assert!(
        matches!(e, Err(ControlError::Coord(CoordError::Io { .. }))),
        "{e:?}"
    );
    let g = r.groups();
    let holder = g
        .iter()
        .find(|e| e.group.contains(target.base()))
        .expect("a partition");
    assert_eq!(holder.owner, "kv-0", "the store kept the owner");
    r.assert_agree();
    // The next attempt goes through, whole.
    let made = ready(r.ctl.move_group(&mut r.dp, "kv", target, "kv-2")).unwrap();
    assert_eq!(made.len(), 1);
    assert!(r.owned_by("kv-2").contains(&target));
    r.assert_agree();

    // Same for a drain step: its failed write is retried next interval.
    r.ctl.set_drained("kv-1", true).unwrap();
    r.store.fail_once(StoreFault::Move);
    assert!(r.tick().is_err(), "the failed write is reported");
    r.assert_agree();
    while !r.owned_by("kv-1").is_empty() {
        r.tick().unwrap();
        r.assert_agree();
    }
}

#[test]
fn a_data_path_write_failing_once_is_repaired_from_the_store() {
    let mut r = Rig::new(
        &text("even", 1000.0),
        EmbeddedStore::in_memory(),
        Faulty::new(mem()),
    );
    r.ctl.set_drained("kv-0", true).unwrap();
    r.dp.fail_once(Fault::SetGroupOwner);
    let e = r.tick();
    assert!(matches!(e, Err(ControlError::Datapath(_))), "{e:?}");
    assert_eq!(r.dp.fired, 1);
    assert!(
        !r.disagreements().is_empty(),
        "the store moved, the data path did not"
    );
    r.tick().unwrap();
    r.assert_agree();
    // A failure to take a failed instance out is reported, and the
    // instance is taken out on the next interval.
    r.dp.fail_once(Fault::SetInstanceLive);
    r.host.gone.lock().unwrap().insert(103);
    assert!(r.tick().is_err());
    r.tick().unwrap();
    assert!(r.ctl.is_failed("kv-2") && !r.dp.inner.is_live(3));
    r.assert_agree();
}

#[test]
fn reload_resumes_the_stored_assignment_unless_it_names_a_removed_instance() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let text3 = text("even", 1000.0);
    let cfg = config(&text3);
    let mut first = plan(&cfg);
    let mut ctl = ready(Controller::new(&cfg, &mut first, store.clone())).unwrap();
    let mut dp = mem();
    let target: Group = "0x0000/3".parse().unwrap();
    ready(ctl.move_group(&mut dp, "kv", target, "kv-1")).unwrap();
    let stored = ready(store.groups("kv")).unwrap();

    // Same instances: the stored assignment is resumed, moves and all.
    let mut again = plan(&cfg);
    ready(Controller::new(&cfg, &mut again, store.clone())).unwrap();
    let resumed: Vec<(Group, u32)> = stored
        .iter()
        .map(|e| {
            (
                e.group,
                first
                    .instances
                    .iter()
                    .find(|i| i.name == e.owner)
                    .unwrap()
                    .id,
            )
        })
        .collect();
    assert_eq!(again.services[0].groups, resumed);

    // kv-2 removed: only the groups the store gave it change hands (to
    // kv-0 and kv-1 in turn); every other group stays where it was.
    let text2 = text3.replace(
        "\n[[service.instance]]\nname = \"kv-2\"\nveth = \"v2\"\n",
        "",
    );
    let cfg2 = config(&text2);
    let mut two = plan(&cfg2);
    ready(Controller::new(&cfg2, &mut two, store.clone())).unwrap();
    let after = ready(store.groups("kv")).unwrap();
    assert_eq!(after.len(), stored.len(), "no group split or merged");
    let mut given = HashSet::new();
    for (b, a) in stored.iter().zip(&after) {
        assert_eq!(b.group, a.group);
        if b.owner == "kv-2" {
            given.insert(a.owner.clone());
        } else {
            assert_eq!(a.owner, b.owner, "{} stays with its owner", b.group);
        }
    }
    assert_eq!(
        given,
        HashSet::from(["kv-0".to_owned(), "kv-1".to_owned()]),
        "kv-2's groups went to both survivors"
    );
    let owners: HashSet<u32> = two.services[0].groups.iter().map(|g| g.1).collect();
    assert_eq!(owners, HashSet::from([1, 2]));
}

/// Defect: `failed` was never cleared, so a container re-created (its veth
/// on a new ifindex) stayed out until the agent restarted.
#[test]
fn a_failed_instance_comes_back_after_the_hold_down_and_takes_work() {
    let text = text("even", 1000.0).replace("[agent]\n", "[agent]\nrecovery_hold_down_ms = 3000\n");
    let mut r = Rig::new(&text, EmbeddedStore::in_memory(), mem());
    let lost = r.owned_by("kv-1");
    r.tick().unwrap();
    r.host.gone.lock().unwrap().insert(102);
    r.tick().unwrap();
    assert!(r.ctl.is_failed("kv-1"));
    // Re-created on ifindex 202; it flaps once during the hold-down, which
    // starts the hold-down again.
    r.host.recreated.lock().unwrap().insert("v1".into(), 202);
    r.tick().unwrap(); // seen back: the hold-down starts (t0)
    r.tick().unwrap(); // t0 + 1 s
    r.host.gone.lock().unwrap().insert(202);
    r.tick().unwrap(); // gone again
    r.host.gone.lock().unwrap().remove(&202);
    for k in 0..3 {
        r.tick().unwrap(); // back at t1, t1 + 1 s, t1 + 2 s
        assert!(r.ctl.is_failed("kv-1"), "still held down after {k} s");
        assert!(!r.dp.is_live(2));
    }
    r.tick().unwrap(); // t1 + 3 s: the hold-down is over
    assert!(!r.ctl.is_failed("kv-1"), "recovered");
    assert!(r.dp.is_live(2));
    assert_eq!(r.dp.targets.get(&2), Some(&(202, [2, 0, 0, 0, 1, 202])));
    // It takes work again: claims of its old, still unowned units reach it
    // in turn with the others.
    let claimed: HashSet<u32> = lost.iter().filter_map(|g| r.claim(g.base())).collect();
    assert!(claimed.contains(&2), "claims went to {claimed:?}");
    r.assert_agree();
    // And a failure after recovery is found on the new ifindex.
    r.host.gone.lock().unwrap().insert(202);
    r.tick().unwrap();
    assert!(r.ctl.is_failed("kv-1"));
}

/// Defect 7 of issue 27: a punted frame's unit the store gives to an
/// instance on another (live) host was `NoOwner`, its frame dropped; it is
/// that instance's, to be encapsulated to its host. While its host is not
/// live, nobody's yet (this host's elements take its groups).
#[test]
fn a_punted_unit_owned_on_another_host_is_claimed_as_remote() {
    use std::collections::HashMap;

    use super::Claimed;
    use crate::plan::RemotePlan;

    let mut r = Rig::new(&text("even", 1000.0), EmbeddedStore::in_memory(), mem());
    let remote = [RemotePlan {
        id: 9,
        name: "kv-r".to_owned(),
        service_id: 0,
        host: "h2".to_owned(),
    }];
    let live = HashSet::from(["h2".to_owned()]);
    r.ctl.set_remote(&remote, &live, &HashMap::new());
    let e = r.groups()[0].clone();
    ready(r.store.move_group("kv", e.group, e.version, "kv-r")).expect("moved");
    let claim = |r: &mut Rig<_, _>| {
        let (got, err) = ready(r.ctl.claim_batch(&mut r.dp, 0, &[e.group.base()], r.now));
        assert!(err.is_none(), "{err:?}");
        got
    };
    assert_eq!(claim(&mut r), [Claimed::Remote(9)]);
    r.ctl.set_remote(&remote, &HashSet::new(), &HashMap::new());
    assert_eq!(claim(&mut r), [Claimed::NoOwner], "its host is not live");
}
