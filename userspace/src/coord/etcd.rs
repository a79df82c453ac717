//! The cluster's coordination store, in etcd.
//!
//! Key layout, under `/sluice/<cluster>/`:
//!
//! | key | value | lifetime |
//! | --- | --- | --- |
//! | `assign/<service>` | the service's assignment: `{"next_version", "groups": [[group, owner, version], ...]}` | permanent |
//! | `services/<service>` | what every host must configure alike (VIPs, ports, protocols, tag, ...) | permanent |
//! | `hosts/<host>` | a live host: its underlay address and instances | the host's lease |
//! | `instances/<instance>` | `{"id", "host"}`: the instance's cluster-wide id | permanent |
//! | `ids/<id>` | the instance holding that id | permanent |
//! | `load/<instance>` | the instance's last published load | the host's lease |
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
//! Host liveness is a lease: `hosts/<host>` and the host's loads vanish when
//! it stops renewing it, and the other hosts see its instances fail. The
//! lease id is kept beside the agent's state file, so a restarted agent
//! takes its host's lease over instead of waiting for it to expire (which
//! would fail its instances on every other host).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
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

use super::{ClaimBatch, CoordError, CoordStore, Event, Events, GroupEntry, Load, Version, ops};
use crate::plan::Group;

/// How many times a change is tried when other writers keep changing the
/// same service's assignment under it.
const CHANGE_TRIES: u32 = 16;

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

/// A service as stored: the assignment and the version counter.
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

/// The etcd backend of [`CoordStore`], plus the cluster's membership.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
    /// This host's lease, once joined (replaced if it ever expires).
    lease: Arc<Mutex<Option<i64>>>,
    /// This host's name, once joined.
    host: Mutex<Option<String>>,
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
        let key = self.key(&format!("assign/{service}"));
        let resp = self
            .client
            .kv_client()
            .get(key.as_str(), None)
            .await
            .map_err(|e| self.err("read", &e))?;
        let Some(kv) = resp.kvs().first() else {
            return Err(CoordError::UnknownService {
                service: service.to_owned(),
            });
        };
        let a: Assignment =
            serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&key, e))?;
        let entries = a.entries().map_err(|e| self.corrupt(&key, e))?;
        super::check_partition(entries.iter().map(|e| &e.group))
            .map_err(|e| self.corrupt(&key, e))?;
        Ok((a, entries, kv.mod_revision()))
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

    /// Writes `groups` as the service's assignment: only if it has none
    /// (`only_new`), else whatever it has.
    async fn write_new(
        &self,
        service: &str,
        groups: &[(Group, String)],
        only_new: bool,
    ) -> Result<bool, CoordError> {
        let key = self.key(&format!("assign/{service}"));
        // Versions keep growing over a reset: a stale version never matches.
        let next = match self.read(service).await {
            Ok((a, _, _)) => a.next_version,
            Err(CoordError::UnknownService { .. } | CoordError::Corrupt { .. }) => 0,
            Err(e) => return Err(e),
        };
        let mut next = next;
        let entries = ops::build(&mut next, service, groups)?;
        let value = serde_json::to_vec(&Assignment::from_entries(next, &entries))
            .expect("assignment serialises");
        let put = TxnOp::put(key.as_str(), value, None);
        let txn = if only_new {
            Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put])
        } else {
            Txn::new().and_then([put])
        };
        let resp = self.txn("write", txn).await?;
        Ok(resp.succeeded())
    }

    /// Joins the cluster as `host`: takes the host's lease (over from the
    /// previous agent of this host when its lease is still live, as after
    /// a restart), publishes the host record under it, and keeps the lease
    /// alive from then on. `lease_file` keeps the lease id across restarts.
    /// Refused when another live agent holds the host's name.
    pub async fn join(
        &self,
        host: &HostRecord,
        ttl: Duration,
        lease_file: &Path,
    ) -> Result<(), CoordError> {
        let key = self.key(&format!("hosts/{}", host.name));
        let mut lease = self.client.lease_client();
        let previous = std::fs::read_to_string(lease_file)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok());
        let mut id = None;
        if let Some(prev) = previous
            && let Ok(r) = lease.time_to_live(prev, None).await
            && r.ttl() > 0
        {
            id = Some(prev);
        }
        let id = match id {
            Some(id) => id,
            None => lease
                .grant(
                    i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
                    None,
                )
                .await
                .map_err(|e| self.err("lease grant", &e))?
                .id(),
        };
        let value = serde_json::to_vec(host).expect("host record serialises");
        // Ours if nobody holds it or our lease does (a restart).
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(key.as_str(), CompareOp::Equal, id)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value,
                        Some(PutOptions::new().with_lease(id)),
                    )]),
            )]);
        let resp = self.txn("join", txn).await?;
        let nested_ok = resp.op_responses().into_iter().any(|r| match r {
            etcd_client::TxnOpResponse::Txn(t) => t.succeeded(),
            _ => false,
        });
        if !resp.succeeded() && !nested_ok {
            return Err(CoordError::HostTaken {
                host: host.name.clone(),
                ttl,
            });
        }
        if let Some(dir) = lease_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| CoordError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        std::fs::write(lease_file, id.to_string()).map_err(|source| CoordError::Io {
            path: lease_file.to_owned(),
            source,
        })?;
        *self.lease.lock().expect("lease lock") = Some(id);
        *self.host.lock().expect("host lock") = Some(host.name.clone());
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            Rejoin {
                key,
                value: serde_json::to_vec(host).expect("host record serialises"),
                lease: self.lease.clone(),
                lease_file: lease_file.to_owned(),
            },
            id,
            ttl,
        ));
        self.tasks.lock().expect("tasks lock").push(keeper);
        Ok(())
    }

    /// Leaves the cluster at once: the lease is revoked, so the other hosts
    /// take this host's groups now rather than after the lease's time.
    pub async fn leave(&self) -> Result<(), CoordError> {
        let id = self.lease.lock().expect("lease lock").take();
        if let Some(id) = id {
            self.client
                .lease_client()
                .revoke(id)
                .await
                .map_err(|e| self.err("lease revoke", &e))?;
        }
        Ok(())
    }

    /// The live hosts, by name.
    pub async fn hosts(&self) -> Result<BTreeMap<String, HostRecord>, CoordError> {
        let prefix = self.key("hosts/");
        self.list(&prefix).await
    }

    /// Every registered instance, by name.
    pub async fn instances(&self) -> Result<BTreeMap<String, InstanceRecord>, CoordError> {
        let prefix = self.key("instances/");
        self.list(&prefix).await
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

    /// Cluster-wide ids for this host's instances, given as (name,
    /// service), in the same order: a registered instance keeps its id
    /// (and now runs on `host`); a new one takes the lowest id nobody
    /// holds, claimed in one transaction with its name so two hosts never
    /// take the same id.
    pub async fn register_instances(
        &self,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError> {
        // Read once; again only after losing a race for an id.
        let mut known = self.instances().await?;
        let mut ids = Vec::with_capacity(instances.len());
        for (name, service) in instances {
            ids.push(
                self.register_instance(host, name, service, &mut known)
                    .await?,
            );
        }
        Ok(ids)
    }

    /// Registers `name` against `known` (the registry as last read, kept up
    /// to date with what this call writes).
    async fn register_instance(
        &self,
        host: &str,
        name: &str,
        service: &str,
        known: &mut BTreeMap<String, InstanceRecord>,
    ) -> Result<u32, CoordError> {
        let key = self.key(&format!("instances/{name}"));
        for _ in 0..CHANGE_TRIES {
            let record = |id| InstanceRecord {
                id,
                host: host.to_owned(),
                service: service.to_owned(),
            };
            if let Some(rec) = known.get(name) {
                let id = rec.id;
                if *rec != record(id) {
                    let value =
                        serde_json::to_vec(&record(id)).expect("instance record serialises");
                    self.client
                        .kv_client()
                        .put(key.as_str(), value, None)
                        .await
                        .map_err(|e| self.err("register", &e))?;
                    known.insert(name.to_owned(), record(id));
                }
                return Ok(id);
            }
            let held: std::collections::HashSet<u32> = known.values().map(|r| r.id).collect();
            let Some(id) = (1..=sluice_common::MAX_INSTANCES).find(|i| !held.contains(i)) else {
                return Err(CoordError::NoInstanceIds {
                    max: sluice_common::MAX_INSTANCES,
                });
            };
            let id_key = self.key(&format!("ids/{id}"));
            let value = serde_json::to_vec(&record(id)).expect("instance record serialises");
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(id_key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(key.as_str(), value, None),
                    TxnOp::put(id_key.as_str(), name, None),
                ]);
            if self.txn("register", txn).await?.succeeded() {
                known.insert(name.to_owned(), record(id));
                return Ok(id);
            }
            // Another host took the name or the id meanwhile.
            *known = self.instances().await?;
        }
        Err(CoordError::Contended {
            service: format!("instance registry ({name})"),
            tries: CHANGE_TRIES,
        })
    }

    /// Checks this host's definition of each service against the one the
    /// cluster has (the first host to start stores its own): services are
    /// the same on every host, or the packets of one would be read
    /// differently depending on where they enter. A mismatch is refused
    /// with the fields that differ.
    pub async fn check_services(
        &self,
        host: &str,
        specs: &[(String, serde_json::Value)],
    ) -> Result<(), CoordError> {
        for (service, spec) in specs {
            let key = self.key(&format!("services/{service}"));
            let stored = StoredSpec {
                host: host.to_owned(),
                spec: spec.clone(),
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    serde_json::to_vec(&stored).expect("spec serialises"),
                    None,
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self.txn("service check", txn).await?;
            if resp.succeeded() {
                continue;
            }
            let theirs = resp.op_responses().into_iter().find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let Some(theirs) = theirs else { continue };
            let theirs: StoredSpec =
                serde_json::from_slice(&theirs).map_err(|e| self.corrupt(&key, e))?;
            let fields = differing_fields(&theirs.spec, spec);
            if !fields.is_empty() {
                return Err(CoordError::ServiceMismatch {
                    service: service.clone(),
                    fields,
                    host: theirs.host,
                });
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSpec {
    /// The host that stored it first.
    host: String,
    spec: serde_json::Value,
}

/// Top-level fields of two JSON objects that differ, as `field: theirs, ours`.
fn differing_fields(theirs: &serde_json::Value, ours: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let t = theirs.as_object().unwrap_or(&empty);
    let o = ours.as_object().unwrap_or(&empty);
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

/// What it takes to join again after the lease expired.
struct Rejoin {
    key: String,
    value: Vec<u8>,
    lease: Arc<Mutex<Option<i64>>>,
    lease_file: PathBuf,
}

/// Renews the lease a third of its time apart. A lease that expired anyway
/// (this host out of etcd's reach for longer than its time: the other
/// hosts have taken its groups) is replaced: the host joins again under a
/// new lease and its elements take work from there.
async fn keep_alive(client: Client, rejoin: Rejoin, mut id: i64, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    loop {
        match client.lease_client().keep_alive(id).await {
            Ok((mut keeper, mut stream)) => loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(Some(_)) => {
                        tracing::error!(
                            lease = id,
                            "this host's lease expired: the cluster counted its instances as failed; joining again"
                        );
                        match join_again(&client, &rejoin, ttl).await {
                            Ok(Some(new)) => id = new,
                            Ok(None) => return,
                            Err(e) => tracing::warn!(error = %e, "joining again failed; retrying"),
                        }
                        break;
                    }
                    _ => break,
                }
                tokio::time::sleep(every).await;
            },
            Err(e) => {
                tracing::warn!(error = %e, lease = id, "renewing this host's lease failed; retrying");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A new lease and the host record under it, if nobody took the host's
/// name meanwhile (`None`: somebody did, and this host stays out).
async fn join_again(
    client: &Client,
    rejoin: &Rejoin,
    ttl: Duration,
) -> Result<Option<i64>, etcd_client::Error> {
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let id = client.lease_client().grant(secs, None).await?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            rejoin.key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            rejoin.key.as_str(),
            rejoin.value.clone(),
            Some(PutOptions::new().with_lease(id)),
        )]);
    if !client.kv_client().txn(txn).await?.succeeded() {
        tracing::error!(key = %rejoin.key, "another agent holds this host's name now; this one stays out of the cluster");
        return Ok(None);
    }
    *rejoin.lease.lock().expect("lease lock") = Some(id);
    if let Err(e) = std::fs::write(&rejoin.lease_file, id.to_string()) {
        tracing::warn!(error = %e, file = %rejoin.lease_file.display(), "keeping the new lease id failed");
    }
    tracing::info!(lease = id, "joined the cluster again");
    Ok(Some(id))
}

#[async_trait::async_trait]
impl CoordStore for EtcdStore {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        Ok(self.read(service).await?.1)
    }

    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        self.write_new(service, groups, true).await
    }

    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        self.write_new(service, groups, false).await.map(|_| ())
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
