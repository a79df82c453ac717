//! Cluster membership: which hosts are live, which instances the cluster
//! has (each with a cluster-wide id), and the service definitions every
//! host must share. The assignment itself is [`super::CoordStore`]'s.
//!
//! [`super::EtcdStore`] is the cluster's backend (its hosts live by etcd
//! leases); `fake::MemMembership` is an in-memory one for unit tests. The
//! rules both follow are here: the lowest free instance id
//! ([`lowest_free_id`]) and what counts as a service defined differently
//! ([`differing_fields`]).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::CoordError;

/// A live host as the cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// Where other hosts send the packets of this host's instances.
    pub underlay: IpAddr,
    /// Its instances' names.
    pub instances: Vec<String>,
}

/// A registered instance: its cluster-wide id, the host it runs on and
/// the service it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: u32,
    pub host: String,
    pub service: String,
}

/// This host's lease as its keeper last saw it: what the fence
/// (`control::fence`) counts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// When the last acknowledged renewal (or the grant) was sent.
    pub renewed: Instant,
    /// How many times the lease was found lost and the host joined again.
    pub joins: u64,
    /// Since when the lease is known lost, if it is and not yet replaced.
    pub lost: Option<Instant>,
    /// The join took the lease of this host's previous agent over (a
    /// restart within the lease): that agent's data path still delivers.
    pub resumed: bool,
}

/// This host's membership of the cluster, as the agent uses it.
#[async_trait::async_trait]
pub trait Membership: Send + Sync {
    /// Joins the cluster as `host` and stays live from then on (the
    /// backend keeps it so, e.g. by renewing a lease of `ttl`), taking the
    /// name over from this host's previous agent (a restart; `lease_file`
    /// keeps what that takes). Refused with [`CoordError::HostTaken`] when
    /// another live agent holds the host's name.
    async fn join(
        &self,
        host: &HostRecord,
        ttl: Duration,
        lease_file: &Path,
    ) -> Result<(), CoordError>;
    /// Leaves the cluster at once, so the other hosts take this host's
    /// groups now.
    async fn leave(&self) -> Result<(), CoordError>;
    /// The live hosts, by name.
    async fn hosts(&self) -> Result<BTreeMap<String, HostRecord>, CoordError>;
    /// Every registered instance, by name.
    async fn instances(&self) -> Result<BTreeMap<String, InstanceRecord>, CoordError>;
    /// Cluster-wide ids for this host's instances, given as (name,
    /// service), in the same order: a registered instance keeps its id
    /// (and now runs on `host`, if it ran on a host no longer live); a new
    /// one takes the lowest id nobody holds ([`lowest_free_id`]), never
    /// one another host took meanwhile. A name registered to another live
    /// host is refused with [`CoordError::InstanceTaken`], and nothing of
    /// this call stays registered.
    async fn register_instances(
        &self,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError>;
    /// Deletes the records (name, id, load) of `host`'s instances that are
    /// not in `keep`: a reload dropped them, so their names and ids are
    /// free again. Returns the names deleted.
    async fn retire_instances(&self, host: &str, keep: &[&str]) -> Result<Vec<String>, CoordError>;
    /// Publishes this host's record again (its instances changed), if it
    /// is still joined.
    async fn update_host(&self, host: &HostRecord) -> Result<(), CoordError>;
    /// Deletes the records of `host`'s instances if `host` is not live:
    /// each only if nobody changed it meanwhile (another collector, or a
    /// host that took the instance over), so collectors never collide.
    /// Returns the names this call deleted.
    async fn collect_host(&self, host: &str) -> Result<Vec<String>, CoordError>;
    /// Checks this host's definition of each service against the one the
    /// cluster has (the first host to check one stores its own): services
    /// are the same on every host, or the packets of one would be read
    /// differently depending on where they enter. A mismatch is refused
    /// with [`CoordError::ServiceMismatch`], naming the fields that differ
    /// ([`differing_fields`]).
    async fn check_services(
        &self,
        host: &str,
        specs: &[(String, serde_json::Value)],
    ) -> Result<(), CoordError>;
    /// The host's lease as it is renewed, lost and replaced, once joined;
    /// `None`: the backend has no lease to watch (nothing to fence by).
    fn lease_state(&self) -> Option<tokio::sync::watch::Receiver<LeaseState>> {
        None
    }
}

/// How often a host's lease is renewed: a tenth of its time. The fence
/// (`control::fence`, at `9T/10` past the last acknowledged renewal)
/// counts from the last renewal before a crash, so a recent one leaves a
/// restarted agent the most time to take the lease over.
#[must_use]
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(100))
}

/// The lowest instance id none of `known` holds.
pub(super) fn lowest_free_id(known: &BTreeMap<String, InstanceRecord>) -> Result<u32, CoordError> {
    let held: HashSet<u32> = known.values().map(|r| r.id).collect();
    (1..=sluice_common::MAX_INSTANCES)
        .find(|i| !held.contains(i))
        .ok_or(CoordError::NoInstanceIds {
            max: sluice_common::MAX_INSTANCES,
        })
}

/// A registration of `name` by `host` refused: `holder` holds it and is
/// live.
pub(super) fn taken(
    name: &str,
    host: &str,
    holder: &InstanceRecord,
    live: &BTreeMap<String, HostRecord>,
) -> Result<(), CoordError> {
    if holder.host != host && live.contains_key(&holder.host) {
        return Err(CoordError::InstanceTaken {
            instance: name.to_owned(),
            host: holder.host.clone(),
        });
    }
    Ok(())
}

/// Service definition fields newer than the first cluster release, with
/// the value a definition stored by an older agent (which lacks them)
/// means: an L4 service, no HTTP settings, no origin rules.
fn spec_defaults() -> serde_json::Value {
    serde_json::json!({"layer": "l4", "http": null, "origins": []})
}

/// Top-level fields of two JSON objects that differ, as `field: theirs,
/// ours`; a field one side lacks reads as its default ([`spec_defaults`]).
pub(crate) fn differing_fields(
    theirs: &serde_json::Value,
    ours: &serde_json::Value,
) -> Vec<String> {
    let empty = serde_json::Map::new();
    let with_defaults = |v: &serde_json::Value| {
        let mut m = spec_defaults().as_object().cloned().unwrap_or_default();
        m.extend(v.as_object().unwrap_or(&empty).clone());
        m
    };
    let (t, o) = (&with_defaults(theirs), &with_defaults(ours));
    let mut keys: Vec<&String> = t.keys().chain(o.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| t.get(*k) != o.get(*k))
        .map(|k| {
            let show =
                |v: Option<&serde_json::Value>| v.map_or("(unset)".into(), ToString::to_string);
            format!(
                "{k}: cluster has {}, this host {}",
                show(t.get(k)),
                show(o.get(k))
            )
        })
        .collect()
}

/// The membership rules over records held in memory, shared by the two
/// in-memory backends (`fake::MemMembership` and the simulation's
/// `sim_store::SimStore`), so both keep them as etcd's transactions do.
#[cfg(any(test, feature = "sim"))]
pub(super) mod in_memory {
    use std::collections::BTreeMap;

    use super::{HostRecord, InstanceRecord, lowest_free_id, taken};
    use crate::coord::{CoordError, membership::differing_fields};

    /// [`super::Membership::register_instances`]: every name checked
    /// against the `live` hosts before anything is written (a refusal
    /// applies nothing); a known name keeps its id, a new one takes the
    /// lowest free id.
    pub(in crate::coord) fn register(
        records: &mut BTreeMap<String, InstanceRecord>,
        live: &BTreeMap<String, HostRecord>,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError> {
        for &(name, _) in instances {
            if let Some(rec) = records.get(name) {
                taken(name, host, rec, live)?;
            }
        }
        let mut ids = Vec::with_capacity(instances.len());
        for &(name, service) in instances {
            let id = match records.get(name) {
                Some(rec) => rec.id,
                None => lowest_free_id(records)?,
            };
            records.insert(
                name.to_owned(),
                InstanceRecord {
                    id,
                    host: host.to_owned(),
                    service: service.to_owned(),
                },
            );
            ids.push(id);
        }
        Ok(ids)
    }

    /// Deletes the records of `host`'s instances `keep` does not name;
    /// returns their names.
    pub(in crate::coord) fn retire(
        records: &mut BTreeMap<String, InstanceRecord>,
        host: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let gone: Vec<String> = records
            .iter()
            .filter(|(n, r)| r.host == host && !keep(n))
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            records.remove(n);
        }
        gone
    }

    /// [`super::Membership::check_services`] against `stored` (service ->
    /// its definition and the host that stored it first).
    pub(in crate::coord) fn check_specs(
        stored: &mut BTreeMap<String, (serde_json::Value, String)>,
        host: &str,
        specs: &[(String, serde_json::Value)],
    ) -> Result<(), CoordError> {
        for (service, spec) in specs {
            let (theirs, first) = stored
                .entry(service.clone())
                .or_insert_with(|| (spec.clone(), host.to_owned()));
            let fields = differing_fields(theirs, spec);
            if !fields.is_empty() {
                return Err(CoordError::ServiceMismatch {
                    service: service.clone(),
                    fields,
                    host: first.clone(),
                });
            }
        }
        Ok(())
    }
}
