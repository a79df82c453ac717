//! Settling against a store other writers change at the same time: what
//! they did between `settle` and `commit` survives the commit and its undo,
//! and a host whose init lost the race follows the store.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use super::*;
use crate::{
    control::Controller,
    coord::{ClaimBatch, EmbeddedStore, Events, GroupEntry, Load, Rewrite, Rewritten, Version},
    testing::{config, plan, ready},
};

/// `services` UDP services `s0..`, each with instances `<s>-0..n`.
fn text(services: usize, n: usize) -> String {
    let mut t = String::from("[agent]\ninterval_ms = 1000\n");
    for s in 0..services {
        let _ = write!(
            t,
            "\n[[service]]\nname = \"s{s}\"\nvip = \"198.18.1.{}\"\nport = 7000\nprotocol = \"udp\"\n",
            s + 1
        );
        for i in 0..n {
            let _ = write!(
                t,
                "\n[[service.instance]]\nname = \"s{s}-{i}\"\nveth = \"v{s}{i}\"\n"
            );
        }
    }
    t
}

fn owners(store: &dyn CoordStore, service: &str) -> Vec<(Group, String)> {
    ready(store.groups(service))
        .unwrap()
        .into_iter()
        .map(|e| (e.group, e.owner))
        .collect()
}

/// Defect D3: a reload that drops an instance wrote the whole assignment
/// back with a plain put, reverting a move another host made between
/// `settle` and `commit`.
#[test]
fn a_move_between_settle_and_commit_survives_the_commit() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let cfg3 = config(&text(1, 3));
    ready(Controller::new(&cfg3, &mut plan(&cfg3), store.clone())).unwrap();
    let cfg2 = config(&text(1, 2));
    let mut two = plan(&cfg2);
    let settled = ready(Controller::settle(&cfg2, &mut two, &*store)).unwrap();
    // Another host's element moves one of s0-0's groups meanwhile.
    let before = ready(store.groups("s0")).unwrap();
    let g = before.iter().find(|e| e.owner == "s0-0").unwrap().clone();
    ready(store.move_group("s0", g.group, g.version, "s0-1")).unwrap();
    ready(Controller::commit(settled, &cfg2, &mut two, store.clone())).unwrap();
    let after = ready(store.groups("s0")).unwrap();
    assert_eq!(
        after.iter().find(|e| e.group == g.group).unwrap().owner,
        "s0-1",
        "the other writer's move was reverted by the commit"
    );
    assert!(
        after.iter().all(|e| e.owner != "s0-2"),
        "s0-2's groups went"
    );
    // The data path is programmed with what the store holds.
    let ids: HashMap<u32, &str> = two
        .instances
        .iter()
        .map(|i| (i.id, i.name.as_str()))
        .collect();
    let programmed: Vec<(Group, String)> = two.services[0]
        .groups
        .iter()
        .map(|(g, o)| (*g, ids[o].to_owned()))
        .collect();
    assert_eq!(programmed, owners(&*store, "s0"));
}

/// A store whose write of service `s1` fails, after another writer moved
/// group `victim` of `s0` to `s0-1` (as another host's element would
/// between a commit's first and second write).
struct Interleaved {
    inner: EmbeddedStore,
    victim: std::sync::Mutex<Option<Group>>,
}

impl Interleaved {
    fn interfere(&self, service: &str) -> Result<(), CoordError> {
        if service != "s1" {
            return Ok(());
        }
        let Some(g) = *self.victim.lock().unwrap() else {
            return Ok(());
        };
        let e = ready(self.inner.groups("s0"))?
            .into_iter()
            .find(|e| e.group == g)
            .unwrap();
        ready(self.inner.move_group("s0", g, e.version, "s0-1"))?;
        Err(CoordError::Io {
            path: "fault-injected".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        })
    }
}

#[async_trait::async_trait]
impl CoordStore for Interleaved {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        self.inner.groups(service).await
    }
    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        self.interfere(service)?;
        self.inner.init(service, groups).await
    }
    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        self.interfere(service)?;
        self.inner.reset(service, groups).await
    }
    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError> {
        self.interfere(service)?;
        self.inner.rewrite(service, f).await
    }
    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.inner.move_group(service, group, version, to).await
    }
    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.inner.split(service, group, version).await
    }
    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.inner.merge(service, a, b).await
    }
    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError> {
        self.inner
            .claim_units(service, units, size, owners, turn)
            .await
    }
    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError> {
        self.inner.publish_load(instance, load).await
    }
    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError> {
        self.inner.loads().await
    }
    fn watch(&self) -> Events {
        self.inner.watch()
    }
}

/// Defect D3, the undo: a commit that fails half-way put every service it
/// had written back whole, reverting what others did in between. Now only
/// the groups it changed go back, each only if nobody changed it since.
#[test]
fn a_failed_commit_undoes_only_its_own_changes() {
    let store = Arc::new(Interleaved {
        inner: EmbeddedStore::in_memory(),
        victim: std::sync::Mutex::new(None),
    });
    let cfg3 = config(&text(2, 3));
    ready(Controller::new(&cfg3, &mut plan(&cfg3), store.clone())).unwrap();
    let stored = owners(&*store, "s0");
    let of_2: Vec<Group> = stored
        .iter()
        .filter(|(_, o)| o == "s0-2")
        .map(|(g, _)| *g)
        .collect();
    assert!(of_2.len() >= 2, "s0-2 has groups to hand out: {stored:?}");
    // The other writer moves one of the groups this commit hands over.
    *store.victim.lock().unwrap() = Some(of_2[0]);
    let cfg2 = config(&text(2, 2));
    let mut two = plan(&cfg2);
    let settled = ready(Controller::settle(&cfg2, &mut two, &*store)).unwrap();
    assert!(ready(Controller::commit(settled, &cfg2, &mut two, store.clone())).is_err());
    let after = owners(&*store, "s0");
    for ((g, was), (_, now)) in stored.iter().zip(&after) {
        if *g == of_2[0] {
            assert_eq!(now, "s0-1", "the other writer's move of {g} was undone");
        } else {
            assert_eq!(now, was, "{g} is back with its owner");
        }
    }
}

/// Another host's init won the race: this host follows the store's
/// assignment, not its own plan.
#[test]
fn an_init_that_lost_the_race_follows_the_store() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let cfg = config(&text(1, 3));
    let mut mine = plan(&cfg);
    let settled = ready(Controller::settle(&cfg, &mut mine, &*store)).unwrap();
    // The other host's init: everything to s0-1.
    let all: Group = "0x0000/0".parse().unwrap();
    assert!(ready(store.init("s0", &[(all, "s0-1".to_owned())])).unwrap());
    ready(Controller::commit(settled, &cfg, &mut mine, store.clone())).unwrap();
    let id1 = mine.instances.iter().find(|i| i.name == "s0-1").unwrap().id;
    assert_eq!(mine.services[0].groups, vec![(all, id1)]);
    assert_eq!(owners(&*store, "s0"), vec![(all, "s0-1".to_owned())]);
}

/// SIGHUP on every host at once, one config dropping an instance: the
/// dropped instance's groups go to this host's remaining instances, never
/// to another host's (which may be dropping it at the same moment).
#[test]
fn a_dropped_instance_s_groups_go_to_this_host_s_instances() {
    // Sixteen groups over five instances: a2 has three.
    let names = ["a0", "a1", "a2", "b0", "b1"];
    let stored: Vec<GroupEntry> = (0..16u32)
        .map(|i| GroupEntry {
            group: Group::new(i << 12, 4).unwrap(),
            owner: names[i as usize % 5].to_owned(),
            version: u64::from(i) + 1,
        })
        .collect();
    let step = settle_service(
        Some(&stored),
        &["a0", "a1", "b0", "b1"],
        &["a0", "a1"],
        vec![],
        false,
    );
    let StoreStep::Reset(groups, _) = step else {
        panic!("{step:?}")
    };
    for (e, (g, o)) in stored.iter().zip(&groups) {
        assert_eq!(e.group, *g);
        if e.owner == "a2" {
            assert!(o == "a0" || o == "a1", "{g} of a2 went to {o}");
        } else {
            assert_eq!(*o, e.owner);
        }
    }
}

/// The same through a reload's decision: another host's instances (in the
/// plan's `remote`) and a failed local instance take none of the dropped
/// instance's groups.
#[test]
fn a_reload_deals_dropped_groups_to_live_local_instances_only() {
    let store = Arc::new(EmbeddedStore::in_memory());
    // Stored: s0-0..3 here, r0 and r1 on another host, sixteen groups.
    let names = ["s0-0", "s0-1", "s0-2", "s0-3", "r0", "r1"];
    let groups: Vec<(Group, String)> = (0..16u32)
        .map(|i| {
            (
                Group::new(i << 12, 4).unwrap(),
                names[i as usize % 6].to_owned(),
            )
        })
        .collect();
    ready(store.init("s0", &groups)).unwrap();
    // The reload drops s0-3; s0-2 has failed.
    let cfg = config(&text(1, 3));
    let mut p = plan(&cfg);
    for (k, n) in ["r0", "r1"].iter().enumerate() {
        p.remote.push(crate::plan::RemotePlan {
            id: 100 + u32::try_from(k).unwrap(),
            name: (*n).to_owned(),
            service_id: p.services[0].id,
            host: "other".to_owned(),
        });
    }
    for i in &mut p.instances {
        i.live = i.name != "s0-2";
    }
    let settled = ready(Controller::settle(&cfg, &mut p, &*store)).unwrap();
    ready(Controller::commit(settled, &cfg, &mut p, store.clone())).unwrap();
    for ((g, was), (_, now)) in groups.iter().zip(owners(&*store, "s0")) {
        if was == "s0-3" {
            assert!(now == "s0-0" || now == "s0-1", "{g} of s0-3 went to {now}");
        } else {
            assert_eq!(&now, was);
        }
    }
}

/// Two hosts starting at once: the winner's init names instances this
/// host has not seen registered yet. They are not instances "no longer
/// configured": the store's assignment stands.
#[test]
fn an_init_lost_to_unknown_instances_leaves_them_their_groups() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let cfg = config(&text(1, 3));
    let mut mine = plan(&cfg);
    let settled = ready(Controller::settle(&cfg, &mut mine, &*store)).unwrap();
    let all: Group = "0x0000/0".parse().unwrap();
    assert!(ready(store.init("s0", &[(all, "other-0".to_owned())])).unwrap());
    ready(Controller::commit(settled, &cfg, &mut mine, store.clone())).unwrap();
    assert_eq!(owners(&*store, "s0"), vec![(all, "other-0".to_owned())]);
}
