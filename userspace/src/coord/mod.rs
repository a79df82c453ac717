//! The coordination store: where the assignment (group -> owner, with a
//! version) lives and where elements publish their load.
//!
//! Every change is a compare-and-swap on the versions of the groups it
//! touches, so two elements can never move the same group at once: the
//! second finds the version changed and gets [`CoordError::Conflict`].
//! Owners are instance *names*, stable across restarts and hosts.
//!
//! The trait is async, so that a networked backend (etcd) fits it as well
//! as [`EmbeddedStore`], which serves one host and persists the assignment
//! to a JSON file (write to a temporary file, fsync, rename), so a
//! restarted agent resumes it. Changes are announced on a stream
//! ([`CoordStore::watch`]).
//!
//! Cluster membership (live hosts, instance ids, shared service
//! definitions) is a trait of its own, [`Membership`]; etcd backs both.
//!
//! May import `plan` (for [`Group`]); nothing above it.

mod embedded;
mod etcd;
#[cfg(test)]
pub(crate) mod fake;
mod membership;
mod ops;
#[cfg(any(test, feature = "sim"))]
pub mod sim_store;

use std::{collections::HashMap, path::PathBuf, pin::Pin};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore};
#[cfg(test)]
pub(crate) use membership::differing_fields;
pub use membership::{HostRecord, InstanceRecord, LeaseState, Membership, renew_every};
use serde::{Deserialize, Serialize};
use sluice_common::UNITS_PER_SERVICE;
use tokio_stream::Stream;

use crate::plan::Group;

/// Version of a group entry: unique over the store's life, so a stale
/// version never matches a newer entry (no ABA).
pub type Version = u64;

/// One group of a service's assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    #[serde(with = "group_text")]
    pub group: Group,
    /// Instance name.
    pub owner: String,
    pub version: Version,
}

/// What an element publishes each interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub utilisation: f64,
    pub rate_pps: f64,
    /// Whether it takes work; a record without one (an older agent's) is
    /// `ok`.
    #[serde(default)]
    pub state: InstanceState,
}

/// Whether an instance takes work, as its host publishes it: other hosts
/// move groups only to `ok` ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    #[default]
    Ok,
    /// Its veth is gone or its reports stopped: it owns nothing.
    Failed,
    /// Drained by an operator: it gives its groups away.
    Drained,
    /// In an http service's priority subset: it owns no units.
    Reserved,
}

impl InstanceState {
    /// As `status` and `groups` show it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Drained => "drained",
            Self::Reserved => "reserved",
        }
    }
}

/// A change others may want to react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The assignment of this service changed.
    Assignment { service: String },
    /// The watcher fell behind and missed changes: read everything again.
    Lagged,
}

/// What [`CoordStore::claim_units`] did.
#[derive(Debug, Default)]
pub struct ClaimBatch {
    /// Each unit's owner after the batch, in the order asked (`""`: nobody,
    /// when no owner was offered); `None` for units not reached because
    /// the store failed first (`error`).
    pub owners: Vec<Option<String>>,
    /// The groups the batch gave away, and to whom, in order.
    pub claimed: Vec<(Group, String)>,
    /// The store's failure that stopped the batch part-way, if one did:
    /// what was claimed before it stands.
    pub error: Option<CoordError>,
}

/// How [`CoordStore::rewrite`] changes an assignment: from the groups as
/// stored (`None`: the service has none), the owners they should have (a
/// partition of the units), or `None` to leave them as they are.
pub type Rewrite<'a> =
    dyn Fn(Option<&[GroupEntry]>) -> Option<Vec<(Group, String)>> + Send + Sync + 'a;

/// What [`CoordStore::rewrite`] found and left.
#[derive(Clone, Debug, Default)]
pub struct Rewritten {
    /// The groups as the rewrite found them when it decided (`None`: the
    /// service had none).
    pub found: Option<Vec<GroupEntry>>,
    /// The groups as stored after it, sorted by base (empty: none).
    pub entries: Vec<GroupEntry>,
    /// Whether it wrote.
    pub written: bool,
}

/// Changes of the store, as they happen.
pub type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("service `{service}` has no assignment in the store")]
    UnknownService { service: String },
    #[error(
        "group {group} of `{service}` changed under us (expected version {expected}, found {found:?})"
    )]
    Conflict {
        service: String,
        group: Group,
        expected: Version,
        /// Current version, or `None` when the group no longer exists
        /// (it was split or merged).
        found: Option<Version>,
    },
    #[error("{a} and {b} are not buddies and cannot merge")]
    NotBuddies { a: Group, b: Group },
    #[error("{a} and {b} have different owners; move one first")]
    DifferentOwners { a: Group, b: Group },
    #[error("group {group} is a single unit and cannot split")]
    Indivisible { group: Group },
    #[error("initial assignment of `{service}` is not a partition of the units: {reason}")]
    NotAPartition { service: String, reason: String },
    #[error("store file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store file {path} is corrupt: {reason}; move it away to start from a fresh assignment"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "etcd at {endpoints}: {op} failed: {reason}; check that etcd runs there and `cluster.etcd_endpoints` names it"
    )]
    Etcd {
        endpoints: String,
        op: &'static str,
        reason: String,
    },
    #[error(
        "the assignment of `{service}` kept changing under us ({tries} tries); the change is left for the next interval"
    )]
    Contended { service: String, tries: u32 },
    #[error(
        "host `{host}` is already live in the cluster: another agent runs with this `cluster.host`. Give each host its own name, or stop the other agent (its lease ends {ttl:?} after it stops)"
    )]
    HostTaken {
        host: String,
        ttl: std::time::Duration,
    },
    #[error(
        "instance `{instance}` already runs on host `{host}`, which is live: an instance name is the cluster's, one instance a name. Rename this host's instance, or remove it from `{host}` first (a host gone for longer than its lease gives its instances up to the next host that starts them)"
    )]
    InstanceTaken { instance: String, host: String },
    #[error("all {max} instance ids of the cluster are taken")]
    NoInstanceIds { max: u32 },
    #[error(
        "service `{service}` is configured differently on this host than in the cluster (first stored by host `{host}`): {}. Services must be the same on every host: make this host's config match, or change the service everywhere and remove its key from etcd",
        fields.join("; ")
    )]
    ServiceMismatch {
        service: String,
        fields: Vec<String>,
        host: String,
    },
}

/// The coordination store, as the WLM elements use it. Every write is a
/// compare-and-swap on group versions.
#[async_trait::async_trait]
pub trait CoordStore: Send + Sync {
    /// Groups of `service`, sorted by base.
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError>;
    /// The group of `service` that holds `unit`.
    async fn group_of(&self, service: &str, unit: u32) -> Result<GroupEntry, CoordError> {
        Ok(self
            .groups(service)
            .await?
            .into_iter()
            .find(|e| e.group.contains(unit))
            .expect("the groups partition the units"))
    }
    /// Stores `groups` as the assignment of `service` unless it has one;
    /// returns whether it did. The groups must partition the units.
    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError>;
    /// Replaces the assignment of `service` whole, every group with a
    /// fresh version (tests and benches set up assignments with it; the
    /// agent changes assignments only by compare-and-swap).
    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError>;
    /// Rewrites the assignment of `service` as one compare-and-swap: `f`
    /// decides from the groups as stored; if another writer got in before
    /// the write, they are read again and `f` decides again, so a change
    /// made meanwhile stands unless `f` itself changes it. A group `f`
    /// leaves with its extent and owner keeps its version; every other
    /// gets a fresh one. Backends apply `ops::rewrite`.
    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError>;
    /// Gives `group` to `to`, if it is still at `version`.
    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError>;
    /// Splits `group` into its halves, same owner, if it is at `version`.
    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError>;
    /// Merges two buddies with one owner, if both are at their versions.
    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError>;
    /// Claims, for the punt path, the units among `units` that nobody
    /// owns: splits each such unit's group down to `size` units around it
    /// and gives that part to the next of `owners` in turn (the batch's
    /// k-th claim goes to `owners[(turn + k) % owners.len()]`). Units of
    /// owned groups keep their owners; with no `owners`, nothing is
    /// claimed. The whole batch is one write (all or nothing): backends
    /// apply `ops::claim_units` to the service's groups.
    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError>;
    /// Publishes an instance's load.
    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError>;
    /// Every instance's last published load.
    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError>;
    /// Publishes the per-unit hit rates (`HIT_BUCKETS_PER_SERVICE` buckets)
    /// of `service` this host delivered. One host alone: nothing to share.
    async fn publish_hits(&self, _service: &str, _rates: &[f64]) -> Result<(), CoordError> {
        Ok(())
    }
    /// The per-unit hit rates of `service` the other hosts delivered,
    /// summed (every packet is delivered by exactly one host, its owner's,
    /// so the sum with this host's own is the cluster's); `None` on one host.
    async fn others_hits(&self, _service: &str) -> Result<Option<Vec<f64>>, CoordError> {
        Ok(None)
    }
    /// Changes from now on.
    fn watch(&self) -> Events;
}

/// Checks that `groups` (any order) cover every unit exactly once.
pub fn check_partition<'a>(groups: impl IntoIterator<Item = &'a Group>) -> Result<(), String> {
    let mut sorted: Vec<&Group> = groups.into_iter().collect();
    sorted.sort_by_key(|g| g.base());
    let mut at = 0;
    for g in sorted {
        if g.base() != at {
            return Err(if g.base() < at {
                format!("{g} overlaps the group before it")
            } else {
                format!("units {at:#06x}..{:#06x} have no group", g.base())
            });
        }
        at += g.size();
    }
    if at != UNITS_PER_SERVICE {
        return Err(format!("units {at:#06x}.. have no group"));
    }
    Ok(())
}

mod group_text {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::plan::Group;

    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "serde's `with` hands a reference"
    )]
    pub(super) fn serialize<S: Serializer>(g: &Group, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(g)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Group, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}
