//! The simulation's store (the top-level `sim` module's): etcd's semantics in memory, on
//! a simulated clock. One [`SimCluster`] holds the keys; each host's agent
//! talks to it through its own [`SimStore`] handle, so a fault can cut one
//! host off (its calls fail with [`CoordError::Etcd`]) while the others go
//! on.
//!
//! What it keeps of etcd: a global revision bumped by every write; every
//! assignment change a compare-and-swap on group versions (the rules are
//! [`super::ops`], as both real backends apply them); `reset` a plain put
//! of the whole assignment, as `EtcdStore::reset` is today; host records
//! and loads under a lease of the host's TTL that expires on the simulated
//! clock unless renewed (expiry deletes them); instance records and
//! service specs forever; a watch per handle whose events queue up and,
//! when the queue overflows or the host was cut off, turn into one
//! [`Event::Lagged`]. Not kept: the hit rates (`publish_hits`), and the
//! version counter's own races (one counter here).
//!
//! Renewing a lease that has expired fails for good, as etcd-client's
//! keeper does today ("lease not found", issue 27's rejoin defect); with
//! [`Rejoin::Fixed`] the renewal grants a new lease and puts the host
//! record back, the fix's behaviour.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::{
    ClaimBatch, CoordError, CoordStore, Event, Events, GroupEntry, HostRecord, InstanceRecord,
    Load, Membership, Rewrite, Rewritten, Version, membership::in_memory, ops,
};
use crate::plan::Group;

/// Most events a watch queues before it reports [`Event::Lagged`].
const WATCH_QUEUE: usize = 64;

/// What renewing an expired lease does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejoin {
    /// Fails for good (the etcd keeper before issue 27's fix: "lease not
    /// found" forever); `--old-keeper` replays it.
    Never,
    /// A new lease, and the host record put back under it (the keeper's
    /// rejoin).
    Fixed,
}

struct Lease {
    host: String,
    ttl: Duration,
    expires: Duration,
}

struct Watch {
    queue: VecDeque<Event>,
    /// Set when events were lost: the next read is `Lagged`.
    lagged: bool,
}

struct State {
    now: Duration,
    revision: u64,
    next_version: Version,
    services: BTreeMap<String, Vec<GroupEntry>>,
    /// Instance -> (load, the lease it lives by).
    loads: BTreeMap<String, (Load, i64)>,
    /// Host -> (record, lease).
    hosts: BTreeMap<String, (HostRecord, i64)>,
    instances: BTreeMap<String, InstanceRecord>,
    specs: BTreeMap<String, (serde_json::Value, String)>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    /// Each host's lease file: the lease id a restarted agent takes over.
    lease_files: BTreeMap<usize, i64>,
    /// Each host's watch (by host index).
    watches: BTreeMap<usize, Watch>,
    /// Each host's record as it joined (put back by a rejoin).
    records: BTreeMap<usize, HostRecord>,
    /// The lease time hosts join with (a rejoin's).
    ttl: Duration,
    /// Hosts cut off from the store.
    cut: Vec<bool>,
    rejoin: Rejoin,
}

/// The store's keys, shared by every host's [`SimStore`].
#[derive(Clone)]
pub struct SimCluster(Arc<Mutex<State>>);

impl SimCluster {
    /// An empty store for `hosts` hosts.
    #[must_use]
    pub fn new(hosts: usize, rejoin: Rejoin) -> Self {
        Self(Arc::new(Mutex::new(State {
            now: Duration::ZERO,
            revision: 0,
            next_version: 0,
            services: BTreeMap::new(),
            loads: BTreeMap::new(),
            hosts: BTreeMap::new(),
            instances: BTreeMap::new(),
            specs: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 0,
            lease_files: BTreeMap::new(),
            watches: BTreeMap::new(),
            records: BTreeMap::new(),
            ttl: Duration::from_secs(5),
            cut: vec![false; hosts],
            rejoin,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().expect("sim store lock")
    }

    /// A new agent of host `host` (its first, or one restarted): a new
    /// watch, and the host's lease file.
    #[must_use]
    pub fn handle(&self, host: usize) -> SimStore {
        self.state().watches.insert(
            host,
            Watch {
                queue: VecDeque::new(),
                lagged: false,
            },
        );
        SimStore {
            cluster: self.clone(),
            host,
        }
    }

    /// The simulated clock moved to `now`: leases not renewed since
    /// expire, and their keys go.
    pub fn advance(&self, now: Duration) {
        let mut s = self.state();
        s.now = now;
        let gone: Vec<i64> = s
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            s.expire(id);
        }
    }

    /// Cuts host `host` off from the store, or heals it.
    pub fn set_cut(&self, host: usize, cut: bool) {
        let mut s = self.state();
        s.cut[host] = cut;
        if !cut && let Some(w) = s.watches.get_mut(&host) {
            // The watch reconnects and reports what it missed as a lag.
            w.lagged = true;
        }
    }

    /// Host `host`'s lease ends now (etcd lost it), as if it had expired.
    pub fn expire_lease(&self, host: usize) {
        let mut s = self.state();
        if let Some(&id) = s.lease_files.get(&host)
            && s.leases.contains_key(&id)
        {
            s.expire(id);
        }
    }

    /// Host `host`'s watch loses what it queued: the next read is a lag.
    pub fn drop_watch(&self, host: usize) {
        if let Some(w) = self.state().watches.get_mut(&host) {
            w.queue.clear();
            w.lagged = true;
        }
    }

    /// The next event of host `host`'s watch, if one waits.
    #[must_use]
    pub fn next_event(&self, host: usize) -> Option<Event> {
        let mut s = self.state();
        if s.cut[host] {
            return None;
        }
        let w = s.watches.get_mut(&host)?;
        if w.lagged {
            w.lagged = false;
            w.queue.clear();
            return Some(Event::Lagged);
        }
        w.queue.pop_front()
    }

    /// Whether host `host`'s watch has an event waiting.
    #[must_use]
    pub fn has_event(&self, host: usize) -> bool {
        let s = self.state();
        !s.cut[host]
            && s.watches
                .get(&host)
                .is_some_and(|w| w.lagged || !w.queue.is_empty())
    }

    /// Every service's assignment.
    #[must_use]
    pub fn assignments(&self) -> BTreeMap<String, Vec<GroupEntry>> {
        self.state().services.clone()
    }

    /// The live hosts' records.
    #[must_use]
    pub fn hosts(&self) -> BTreeMap<String, HostRecord> {
        self.state()
            .hosts
            .iter()
            .map(|(n, (r, _))| (n.clone(), r.clone()))
            .collect()
    }

    /// Every registered instance.
    #[must_use]
    pub fn instances(&self) -> BTreeMap<String, InstanceRecord> {
        self.state().instances.clone()
    }

    /// The store's revision (every write bumps it).
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.state().revision
    }
}

impl State {
    /// The loads of instances whose records were deleted: one revision
    /// each, as etcd's deletes.
    fn forget_loads(&mut self, gone: &[String]) {
        for n in gone {
            self.loads.remove(n);
            self.revision += 1;
        }
    }

    fn expire(&mut self, id: i64) {
        self.leases.remove(&id);
        self.hosts.retain(|_, (_, l)| *l != id);
        self.loads.retain(|_, (_, l)| *l != id);
        self.revision += 1;
    }

    fn announce(&mut self, service: &str) {
        self.revision += 1;
        for w in self.watches.values_mut() {
            if w.queue.len() >= WATCH_QUEUE {
                w.lagged = true;
            } else {
                w.queue.push_back(Event::Assignment {
                    service: service.to_owned(),
                });
            }
        }
    }
}

/// One host's handle on the [`SimCluster`].
pub struct SimStore {
    cluster: SimCluster,
    host: usize,
}

impl SimStore {
    /// The cluster this handle talks to.
    #[must_use]
    pub fn cluster(&self) -> &SimCluster {
        &self.cluster
    }

    /// The state, or the failure a cut-off host sees.
    fn reach(&self, op: &'static str) -> Result<MutexGuard<'_, State>, CoordError> {
        let s = self.cluster.state();
        if s.cut[self.host] {
            return Err(CoordError::Etcd {
                endpoints: "sim".into(),
                op,
                reason: "host cut off from the store".into(),
            });
        }
        Ok(s)
    }

    /// Renews this host's lease (its keeper's one keep-alive). See
    /// [`Rejoin`] for an expired one.
    pub fn renew(&self) -> Result<bool, CoordError> {
        let mut s = self.reach("lease keep alive")?;
        let Some(&id) = s.lease_files.get(&self.host) else {
            return Ok(false);
        };
        let now = s.now;
        if let Some(l) = s.leases.get_mut(&id) {
            l.expires = now + l.ttl;
            return Ok(false);
        }
        match s.rejoin {
            Rejoin::Never => Err(CoordError::Etcd {
                endpoints: "sim".into(),
                op: "lease keep alive",
                reason: "lease not found".into(),
            }),
            Rejoin::Fixed => {
                let Some(record) = s.records.get(&self.host).cloned() else {
                    return Ok(false);
                };
                if s.hosts.contains_key(&record.name) {
                    return Ok(false);
                }
                s.next_lease += 1;
                let (id, ttl) = (s.next_lease, s.ttl);
                s.leases.insert(
                    id,
                    Lease {
                        host: record.name.clone(),
                        ttl,
                        expires: now + ttl,
                    },
                );
                s.lease_files.insert(self.host, id);
                s.hosts.insert(record.name.clone(), (record, id));
                s.revision += 1;
                Ok(true)
            }
        }
    }

    fn services_of<'a>(
        s: &'a mut State,
        service: &str,
    ) -> Result<(&'a mut Vec<GroupEntry>, &'a mut Version), CoordError> {
        let State {
            services,
            next_version,
            ..
        } = s;
        let e = services
            .get_mut(service)
            .ok_or_else(|| CoordError::UnknownService {
                service: service.to_owned(),
            })?;
        Ok((e, next_version))
    }

    /// Applies `f` to `service`'s groups; announces it if it succeeds.
    fn change<T>(
        &self,
        op: &'static str,
        service: &str,
        f: impl FnOnce(&mut Vec<GroupEntry>, &mut Version) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        let mut s = self.reach(op)?;
        let (entries, next) = Self::services_of(&mut s, service)?;
        let mut work = entries.clone();
        let mut n = *next;
        let out = f(&mut work, &mut n)?;
        *entries = work;
        *next = n;
        s.announce(service);
        Ok(out)
    }
}

#[async_trait::async_trait]
impl CoordStore for SimStore {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        let s = self.reach("get")?;
        s.services
            .get(service)
            .cloned()
            .ok_or_else(|| CoordError::UnknownService {
                service: service.to_owned(),
            })
    }

    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        let mut guard = self.reach("init")?;
        let s = &mut *guard;
        if s.services.contains_key(service) {
            return Ok(false);
        }
        let built = ops::rewrite(None, &mut s.next_version, service, groups)?;
        s.services.insert(service.to_owned(), built);
        s.announce(service);
        Ok(true)
    }

    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        let mut guard = self.reach("reset")?;
        let s = &mut *guard;
        let built = ops::rewrite(None, &mut s.next_version, service, groups)?;
        s.services.insert(service.to_owned(), built);
        s.announce(service);
        Ok(())
    }

    /// One compare-and-swap, as etcd's transaction: `f` decides on what is
    /// stored, and nothing is written in between.
    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError> {
        let mut guard = self.reach("rewrite")?;
        let s = &mut *guard;
        let found = s.services.get(service).cloned();
        let Some(groups) = f(found.as_deref()) else {
            let entries = found.clone().unwrap_or_default();
            return Ok(Rewritten {
                found,
                entries,
                written: false,
            });
        };
        let entries = ops::rewrite(found.as_deref(), &mut s.next_version, service, &groups)?;
        s.services.insert(service.to_owned(), entries.clone());
        s.announce(service);
        Ok(Rewritten {
            found,
            entries,
            written: true,
        })
    }

    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.change("move", service, |e, n| {
            ops::move_group(e, n, service, group, version, to)
        })
    }

    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.change("split", service, |e, n| {
            ops::split(e, n, service, group, version)
        })
    }

    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.change("merge", service, |e, n| ops::merge(e, n, service, a, b))
    }

    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError> {
        {
            let mut s = self.reach("claim")?;
            let (entries, _) = Self::services_of(&mut s, service)?;
            if ops::nothing_to_claim(entries, units, owners) {
                return Ok(ops::owners_of(entries, units));
            }
        }
        self.change("claim", service, |e, n| {
            ops::claim_units(e, n, service, units, size, owners, turn)
        })
    }

    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError> {
        let mut s = self.reach("publish load")?;
        let lease = s.lease_files.get(&self.host).copied().unwrap_or(0);
        // Under a lease that is gone, etcd refuses the put.
        if !s.leases.contains_key(&lease) {
            return Err(CoordError::Etcd {
                endpoints: "sim".into(),
                op: "publish load",
                reason: "lease not found".into(),
            });
        }
        s.loads.insert(instance.to_owned(), (load, lease));
        s.revision += 1;
        Ok(())
    }

    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError> {
        let s = self.reach("loads")?;
        Ok(s.loads
            .iter()
            .map(|(n, (l, _))| (n.clone(), l.clone()))
            .collect())
    }

    /// The simulation reads each host's events through
    /// [`SimCluster::next_event`]; this stream never yields.
    fn watch(&self) -> Events {
        Box::pin(tokio_stream::empty())
    }
}

#[async_trait::async_trait]
impl Membership for SimStore {
    async fn join(
        &self,
        host: &HostRecord,
        ttl: Duration,
        _lease_file: &Path,
    ) -> Result<(), CoordError> {
        let mut s = self.reach("join")?;
        let previous = s.lease_files.get(&self.host).copied();
        if let Some((_, holder)) = s.hosts.get(&host.name)
            && Some(*holder) != previous
        {
            return Err(CoordError::HostTaken {
                host: host.name.clone(),
                ttl,
            });
        }
        let now = s.now;
        // A restart takes the live lease over; else a new one.
        let id = if let Some(id) = previous.filter(|p| s.leases.contains_key(p)) {
            id
        } else {
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(
                id,
                Lease {
                    host: host.name.clone(),
                    ttl,
                    expires: now + ttl,
                },
            );
            id
        };
        if let Some(l) = s.leases.get_mut(&id) {
            l.expires = now + ttl;
            debug_assert_eq!(l.host, host.name);
        }
        s.lease_files.insert(self.host, id);
        s.hosts.insert(host.name.clone(), (host.clone(), id));
        s.records.insert(self.host, host.clone());
        s.ttl = ttl;
        s.revision += 1;
        Ok(())
    }

    async fn leave(&self) -> Result<(), CoordError> {
        let mut s = self.reach("lease revoke")?;
        if let Some(id) = s.lease_files.remove(&self.host) {
            s.expire(id);
        }
        Ok(())
    }

    async fn hosts(&self) -> Result<BTreeMap<String, HostRecord>, CoordError> {
        let s = self.reach("hosts")?;
        Ok(s.hosts
            .iter()
            .map(|(n, (r, _))| (n.clone(), r.clone()))
            .collect())
    }

    async fn instances(&self) -> Result<BTreeMap<String, InstanceRecord>, CoordError> {
        Ok(self.reach("instances")?.instances.clone())
    }

    /// As `EtcdStore::register_instances`: a known name keeps its id (and
    /// moves to this host if its host is gone; a live host's is refused);
    /// a new one takes the lowest free id.
    async fn register_instances(
        &self,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError> {
        let mut s = self.reach("register")?;
        let live: BTreeMap<String, HostRecord> = s
            .hosts
            .iter()
            .map(|(n, (r, _))| (n.clone(), r.clone()))
            .collect();
        let ids = in_memory::register(&mut s.instances, &live, host, instances)?;
        s.revision += ids.len() as u64;
        Ok(ids)
    }

    async fn retire_instances(&self, host: &str, keep: &[&str]) -> Result<Vec<String>, CoordError> {
        let mut s = self.reach("retire")?;
        let gone = in_memory::retire(&mut s.instances, host, |n| keep.contains(&n));
        s.forget_loads(&gone);
        Ok(gone)
    }

    async fn update_host(&self, host: &HostRecord) -> Result<(), CoordError> {
        let mut s = self.reach("update host")?;
        let lease = s.lease_files.get(&self.host).copied();
        if let Some((rec, l)) = s.hosts.get_mut(&host.name)
            && Some(*l) == lease
        {
            *rec = host.clone();
            s.records.insert(self.host, host.clone());
            s.revision += 1;
        }
        Ok(())
    }

    async fn collect_host(&self, host: &str) -> Result<Vec<String>, CoordError> {
        let mut s = self.reach("collect")?;
        if s.hosts.contains_key(host) {
            return Ok(Vec::new());
        }
        let gone = in_memory::retire(&mut s.instances, host, |_| false);
        s.forget_loads(&gone);
        Ok(gone)
    }

    async fn check_services(
        &self,
        host: &str,
        specs: &[(String, serde_json::Value)],
    ) -> Result<(), CoordError> {
        let mut s = self.reach("service check")?;
        in_memory::check_specs(&mut s.specs, host, specs)
    }
}
