//! The cluster's coordination store, in etcd.
//!
//! Key layout, under `/sluice/<cluster>/`:
//!
//! | key | value | lifetime |
//! | --- | --- | --- |
//! | `assign/<service>` | the service's assignment: `{"next_version", "groups": [[group, owner, version], ...]}` | permanent |
//! | `services/<service>` | what every host must configure alike (VIPs, ports, protocols, tag, ...) | permanent |
//! | `hosts/<host>` | a live host: its underlay address and instances | the host's lease |
//! | `instances/<instance>` | `{"id", "host", "service"}`: the instance's cluster-wide id | until its host drops it, or its host has been gone for the grace |
//! | `ids/<id>` | the instance holding that id | as `instances/<instance>` |
//! | `load/<instance>` | the instance's last published load | the host's lease, or until its host drops it |
//! | `hits/<service>/<host>` | the per-unit hit rates of the service the host delivered | the host's lease |
//!
//! A service's assignment is one key, so every change of it is one etcd
//! transaction comparing that key's revision: read, check the versions of
//! the groups the change touches (a stale one is a [`CoordError::Conflict`],
//! as with the embedded store), write back if nobody wrote in between. A
//! write in between that touched other groups only means reading again; a
//! change never sees half of another. The cost is that the key holds every
//! group (about 30 bytes each): etcd's request limit (`--max-request-bytes`,
//! 1.5 MiB by default) allows some 40,000 groups a service.
//!
//! The cluster's membership (`hosts/`, `instances/`, `ids/`, `services/`,
//! and the host's lease the `load/` and `hits/` keys live by) is in
//! [`membership`].

mod membership;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::broadcast, task::JoinHandle};
use tokio_stream::{StreamExt as _, wrappers::BroadcastStream};

use super::{
    ClaimBatch, CoordError, CoordStore, Event, Events, GroupEntry, Load, Rewrite, Rewritten,
    Version, ops,
};
use crate::plan::Group;

/// How many times a change is tried when other writers keep changing the
/// same service's assignment under it.
const CHANGE_TRIES: u32 = 16;

/// More versions than one write can hand out (a write rewrites at most
/// every group, 2^16, or splits a few hundred claimed units down 16 times):
/// a key made at revision `r` counts from `r << 20`, beyond what the
/// earlier writes (one revision each) can have reached.
const VERSIONS_PER_REVISION: u32 = 20;

/// Where the cluster's etcd is and how long to wait for it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Keys live under `/sluice/<cluster>/`.
    pub cluster: String,
    /// Longest wait for one request: the control loop skips an interval
    /// rather than stall behind an unreachable etcd.
    pub timeout: Duration,
}

/// A service as stored: the assignment and the version counter. The
/// counter is read and written in the same compare-and-swap as the groups
/// (every write compares the key's revision), so two writers never hand out
/// the same version; a key made anew (first, or after someone deleted it)
/// starts its counter at etcd's revision times [`VERSIONS_PER_REVISION`],
/// above every version a deleted key could have handed out.
#[derive(Default, Serialize, Deserialize)]
struct Assignment {
    next_version: Version,
    groups: Vec<(String, String, Version)>,
}

impl Assignment {
    fn entries(&self) -> Result<Vec<GroupEntry>, String> {
        self.groups
            .iter()
            .map(|(g, owner, version)| {
                Ok(GroupEntry {
                    group: g.parse().map_err(|e| format!("group `{g}`: {e}"))?,
                    owner: owner.clone(),
                    version: *version,
                })
            })
            .collect()
    }

    fn from_entries(next_version: Version, entries: &[GroupEntry]) -> Self {
        Self {
            next_version,
            groups: entries
                .iter()
                .map(|e| (e.group.to_string(), e.owner.clone(), e.version))
                .collect(),
        }
    }
}

/// The etcd backend of [`CoordStore`] and of [`super::Membership`].
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
    /// This host's lease, once joined (replaced if it ever expires).
    lease: Arc<Mutex<Option<i64>>>,
    /// This host's name, once joined.
    host: Mutex<Option<String>>,
    /// The lease's renewals as the keeper sees them, once joined.
    lease_state: Mutex<Option<tokio::sync::watch::Receiver<super::LeaseState>>>,
    events: broadcast::Sender<Event>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

impl EtcdStore {
    /// Connects and starts watching the assignments.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, CoordError> {
        let endpoints = opts.endpoints.join(",");
        let connect = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(2), opts.timeout);
        let client = tokio::time::timeout(
            opts.timeout * 3,
            Client::connect(&opts.endpoints, Some(connect)),
        )
        .await
        .map_err(|_| CoordError::Etcd {
            endpoints: endpoints.clone(),
            op: "connect",
            reason: format!("no answer within {:?}", opts.timeout * 3),
        })?
        .map_err(|e| CoordError::Etcd {
            endpoints: endpoints.clone(),
            op: "connect",
            reason: e.to_string(),
        })?;
        let store = Self {
            client,
            prefix: format!("/sluice/{}/", opts.cluster),
            endpoints,
            lease: Arc::new(Mutex::new(None)),
            host: Mutex::new(None),
            lease_state: Mutex::new(None),
            events: broadcast::channel(1024).0,
            tasks: Mutex::new(Vec::new()),
        };
        // A first request, so that a wrong endpoint fails the start, not
        // the first control interval.
        store
            .client
            .kv_client()
            .get(
                store.key("assign/"),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| store.err("read", &e))?;
        let watcher = tokio::spawn(watch_assignments(
            store.client.clone(),
            store.key("assign/"),
            store.events.clone(),
        ));
        store.tasks.lock().expect("tasks lock").push(watcher);
        Ok(store)
    }

    /// Runs `txn`; `op` names it in the error.
    async fn txn(
        &self,
        op: &'static str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, CoordError> {
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| self.err(op, &e))
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn err(&self, op: &'static str, e: &etcd_client::Error) -> CoordError {
        CoordError::Etcd {
            endpoints: self.endpoints.clone(),
            op,
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, key: &str, reason: impl std::fmt::Display) -> CoordError {
        CoordError::Corrupt {
            path: PathBuf::from(format!("etcd {} {key}", self.endpoints)),
            reason: reason.to_string(),
        }
    }

    /// The service's assignment and the revision of its key.
    async fn read(&self, service: &str) -> Result<(Assignment, Vec<GroupEntry>, i64), CoordError> {
        self.read_at(service)
            .await?
            .0
            .ok_or_else(|| CoordError::UnknownService {
                service: service.to_owned(),
            })
    }

    /// As [`Self::read`], `None` when the service has no assignment, and
    /// etcd's revision at the read.
    async fn read_at(
        &self,
        service: &str,
    ) -> Result<(Option<(Assignment, Vec<GroupEntry>, i64)>, i64), CoordError> {
        let key = self.key(&format!("assign/{service}"));
        let resp = self
            .client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.err("read", &e))?;
        let at = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let Some(kv) = resp.kvs().first() else {
            return Ok((None, at));
        };
        let a: Assignment =
            serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&key, e))?;
        let entries = a.entries().map_err(|e| self.corrupt(&key, e))?;
        super::check_partition(entries.iter().map(|e| &e.group))
            .map_err(|e| self.corrupt(&key, e))?;
        let revision = kv.mod_revision();
        Ok((Some((a, entries, revision)), at))
    }

    /// Applies `f` to the service's groups and writes them back if nobody
    /// wrote in between; reads again if somebody did.
    async fn change<T>(
        &self,
        service: &str,
        f: impl Fn(&mut Vec<GroupEntry>, &mut Version) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        let key = self.key(&format!("assign/{service}"));
        for _ in 0..CHANGE_TRIES {
            let (a, mut entries, revision) = self.read(service).await?;
            let mut next = a.next_version;
            let out = f(&mut entries, &mut next)?;
            let value = serde_json::to_vec(&Assignment::from_entries(next, &entries))
                .expect("assignment serialises");
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            let resp = self.txn("write", txn).await?;
            if resp.succeeded() {
                return Ok(out);
            }
        }
        Err(CoordError::Contended {
            service: service.to_owned(),
            tries: CHANGE_TRIES,
        })
    }

    /// For a key that does not parse: an empty assignment at the key's
    /// revision (a write compares it), with its counter starting anew.
    async fn revisions(
        &self,
        key: &str,
    ) -> Result<(Option<(Assignment, Vec<GroupEntry>, i64)>, i64), CoordError> {
        let resp = self
            .client
            .kv_client()
            .get(key, Some(GetOptions::new().with_keys_only()))
            .await
            .map_err(|e| self.err("read", &e))?;
        let at = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let next = u64::try_from(at).unwrap_or(0) << VERSIONS_PER_REVISION;
        Ok((
            resp.kvs().first().map(|kv| {
                let a = Assignment {
                    next_version: next,
                    groups: Vec::new(),
                };
                (a, Vec::new(), kv.mod_revision())
            }),
            at,
        ))
    }

    /// Rewrites the service's assignment with `f` (see
    /// [`CoordStore::rewrite`]), comparing the key's revision (its creation
    /// when it has none); with `fresh`, every group gets a fresh version.
    async fn rewrite_with(
        &self,
        service: &str,
        f: &Rewrite<'_>,
        fresh: bool,
    ) -> Result<Rewritten, CoordError> {
        let key = self.key(&format!("assign/{service}"));
        for _ in 0..CHANGE_TRIES {
            let (read, at) = match self.read_at(service).await {
                // A reset replaces a corrupt assignment (the agent never
                // resets; an operator's tool may).
                Err(CoordError::Corrupt { .. }) if fresh => self.revisions(&key).await?,
                r => r?,
            };
            let (found, mut next, compare) = match read {
                Some((a, entries, revision)) => (
                    Some(entries),
                    a.next_version,
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                ),
                None => (
                    None,
                    u64::try_from(at).unwrap_or(0) << VERSIONS_PER_REVISION,
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                ),
            };
            let Some(groups) = f(found.as_deref()) else {
                let entries = found.clone().unwrap_or_default();
                return Ok(Rewritten {
                    found,
                    entries,
                    written: false,
                });
            };
            let keep = if fresh { None } else { found.as_deref() };
            let entries = ops::rewrite(keep, &mut next, service, &groups)?;
            let value = serde_json::to_vec(&Assignment::from_entries(next, &entries))
                .expect("assignment serialises");
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            if self.txn("write", txn).await?.succeeded() {
                return Ok(Rewritten {
                    found,
                    entries,
                    written: true,
                });
            }
        }
        Err(CoordError::Contended {
            service: service.to_owned(),
            tries: CHANGE_TRIES,
        })
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, T>, CoordError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err("read", &e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let name = key.strip_prefix(prefix).unwrap_or(&key).to_owned();
                let v = serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&key, e))?;
                Ok((name, v))
            })
            .collect()
    }
}

/// Announces every change of an assignment key; re-establishes the watch
/// when it breaks (etcd restarted or unreachable), telling watchers they
/// may have missed changes.
async fn watch_assignments(client: Client, prefix: String, events: broadcast::Sender<Event>) {
    loop {
        let mut watch = client.watch_client();
        match watch
            .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(mut stream) => {
                while let Some(Ok(resp)) = stream.next().await {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key());
                        if let Some(service) = key.strip_prefix(prefix.as_str())
                            && matches!(ev.event_type(), EventType::Put | EventType::Delete)
                        {
                            let _ = events.send(Event::Assignment {
                                service: service.to_owned(),
                            });
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "watching the assignment failed"),
        }
        // Whatever changed while the watch was down is read again.
        let _ = events.send(Event::Lagged);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[async_trait::async_trait]
impl CoordStore for EtcdStore {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        Ok(self.read(service).await?.1)
    }

    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        let only_new = |found: Option<&[GroupEntry]>| found.is_none().then(|| groups.to_vec());
        Ok(self.rewrite_with(service, &only_new, true).await?.written)
    }

    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        let all = |_: Option<&[GroupEntry]>| Some(groups.to_vec());
        self.rewrite_with(service, &all, true).await.map(|_| ())
    }

    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError> {
        self.rewrite_with(service, f, false).await
    }

    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.change(service, |entries, next| {
            ops::move_group(entries, next, service, group, version, to)
        })
        .await
    }

    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.change(service, |entries, next| {
            ops::split(entries, next, service, group, version)
        })
        .await
    }

    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.change(service, |entries, next| {
            ops::merge(entries, next, service, a, b)
        })
        .await
    }

    /// The whole batch in one transaction (a compare-and-swap on the
    /// service's key, read again and redone if another writer got in
    /// first), not one per split and claim; none when nothing is claimed.
    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError> {
        let (_, entries, _) = self.read(service).await?;
        if ops::nothing_to_claim(&entries, units, owners) {
            return Ok(ops::owners_of(&entries, units));
        }
        self.change(service, |entries, next| {
            ops::claim_units(entries, next, service, units, size, owners, turn)
        })
        .await
    }

    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError> {
        let lease = *self.lease.lock().expect("lease lock");
        let opts = lease.map(|id| PutOptions::new().with_lease(id));
        self.client
            .kv_client()
            .put(
                self.key(&format!("load/{instance}")),
                serde_json::to_vec(&load).expect("load serialises"),
                opts,
            )
            .await
            .map_err(|e| self.err("publish load", &e))?;
        Ok(())
    }

    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError> {
        let prefix = self.key("load/");
        Ok(self.list::<Load>(&prefix).await?.into_iter().collect())
    }

    async fn publish_hits(&self, service: &str, rates: &[f64]) -> Result<(), CoordError> {
        let Some(host) = self.host.lock().expect("host lock").clone() else {
            return Ok(());
        };
        let lease = *self.lease.lock().expect("lease lock");
        // Whole packets a second are precise enough, and short.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "rates, rounded"
        )]
        let rounded: Vec<u64> = rates.iter().map(|r| r.max(0.0).round() as u64).collect();
        self.client
            .kv_client()
            .put(
                self.key(&format!("hits/{service}/{host}")),
                serde_json::to_vec(&rounded).expect("rates serialise"),
                lease.map(|id| PutOptions::new().with_lease(id)),
            )
            .await
            .map_err(|e| self.err("publish hits", &e))?;
        Ok(())
    }

    async fn others_hits(&self, service: &str) -> Result<Option<Vec<f64>>, CoordError> {
        let me = self.host.lock().expect("host lock").clone();
        let prefix = self.key(&format!("hits/{service}/"));
        let mut sum: Vec<f64> = Vec::new();
        for (host, rates) in self.list::<Vec<u64>>(&prefix).await? {
            if Some(&host) == me.as_ref() {
                continue;
            }
            if sum.len() < rates.len() {
                sum.resize(rates.len(), 0.0);
            }
            for (s, r) in sum.iter_mut().zip(rates) {
                #[expect(clippy::cast_precision_loss, reason = "rates")]
                let r = r as f64;
                *s += r;
            }
        }
        Ok(Some(sum))
    }

    fn watch(&self) -> Events {
        Box::pin(BroadcastStream::new(self.events.subscribe()).map(|e| e.unwrap_or(Event::Lagged)))
    }
}
