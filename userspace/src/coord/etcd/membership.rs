//! Cluster membership in etcd: `hosts/<host>` under the host's lease,
//! `instances/<instance>` and `ids/<id>` for the cluster-wide ids,
//! `services/<service>` for the definition every host must share (see the
//! key table in [`super`]).
//!
//! Host liveness is a lease: `hosts/<host>` and the host's loads vanish when
//! it stops renewing it, and the other hosts see its instances fail. The
//! lease id is kept beside the agent's state file, so a restarted agent
//! takes its host's lease over instead of waiting for it to expire (which
//! would fail its instances on every other host).
//!
//! Instance records go when nobody runs the instance any more: its host
//! deletes them when a reload drops it ([`Membership::retire_instances`]),
//! and any live host deletes those of a host gone for longer than the
//! agent's grace ([`Membership::collect_host`]). Each delete compares the
//! record's revision, so a record another host took over, or another
//! collector deleted, is left alone.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{CHANGE_TRIES, EtcdStore};
use crate::coord::{
    CoordError, HostRecord, InstanceRecord, LeaseState, Membership,
    membership::{differing_fields, lowest_free_id, renew_every, taken},
};

#[async_trait::async_trait]
impl Membership for EtcdStore {
    /// Joins the cluster as `host`: takes the host's lease (over from the
    /// previous agent of this host when its lease is still live, as after
    /// a restart), publishes the host record under it, and keeps the lease
    /// alive from then on. `lease_file` keeps the lease id across restarts.
    /// Refused when another live agent holds the host's name.
    async fn join(
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
        // When the lease is known to run until from (a full time from it).
        let mut renewed = Instant::now();
        let mut stream = None;
        // `ttl()` is the whole seconds left, rounded down: 0 is a lease in
        // its last second, still holding the host's record (-1: gone).
        if let Some(prev) = previous
            && let Ok(r) = lease.time_to_live(prev, None).await
            && r.ttl() >= 0
        {
            // Taken over: renewed at once, as the previous agent's data
            // path fences `T - M` after that agent's last renewal, and the
            // start has a program to load before the fence task runs.
            let sent = Instant::now();
            match renew(&self.client, &mut stream, prev, renew_wait(ttl)).await {
                Renewal::Acked => (renewed, id) = (sent, Some(prev)),
                // Expired meanwhile: a new lease.
                Renewal::Lost => {}
                // As if renewed when it had that much left.
                Renewal::Failed(_) => {
                    let left = Duration::from_secs(r.ttl().unsigned_abs());
                    renewed = renewed
                        .checked_sub(ttl.saturating_sub(left))
                        .unwrap_or(renewed);
                    id = Some(prev);
                }
            }
        }
        let resumed = id.is_some();
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
        let (state, watched) = watch::channel(LeaseState {
            renewed,
            joins: 0,
            lost: None,
            resumed,
        });
        *self.lease_state.lock().expect("lease state lock") = Some(watched);
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            Rejoin {
                key,
                value: serde_json::to_vec(host).expect("host record serialises"),
                lease: self.lease.clone(),
                lease_file: lease_file.to_owned(),
            },
            (id, stream),
            ttl,
            state,
        ));
        self.tasks.lock().expect("tasks lock").push(keeper);
        Ok(())
    }

    /// The lease is revoked, so the other hosts take this host's groups
    /// now rather than after the lease's time.
    async fn leave(&self) -> Result<(), CoordError> {
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

    async fn hosts(&self) -> Result<BTreeMap<String, HostRecord>, CoordError> {
        let prefix = self.key("hosts/");
        self.list(&prefix).await
    }

    async fn instances(&self) -> Result<BTreeMap<String, InstanceRecord>, CoordError> {
        let prefix = self.key("instances/");
        self.list(&prefix).await
    }

    /// A new instance's id is claimed in one transaction with its name, so
    /// two hosts never take the same id. Every name is checked against the
    /// live hosts first; one refused on the way (a host that took a name
    /// meanwhile) undoes the names this call created.
    async fn register_instances(
        &self,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError> {
        // Read once; again only after losing a race for an id.
        let mut known = self.instances().await?;
        let live = self.hosts().await?;
        for (name, _) in instances {
            if let Some(rec) = known.get(*name) {
                taken(name, host, rec, &live)?;
            }
        }
        let mut ids = Vec::with_capacity(instances.len());
        let mut created = Vec::new();
        for (name, service) in instances {
            match self
                .register_instance(host, name, service, &mut known)
                .await
            {
                Ok((id, new)) => {
                    ids.push(id);
                    if new {
                        created.push(*name);
                    }
                }
                Err(e) => {
                    let keep: Vec<&str> = known
                        .iter()
                        .filter(|(n, r)| r.host == host && !created.contains(&n.as_str()))
                        .map(|(n, _)| n.as_str())
                        .collect();
                    if let Err(undo) = self.retire_instances(host, &keep).await {
                        tracing::warn!(error = %undo, "undoing a refused registration failed: the next reload deletes what is left");
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    /// One transaction an instance, on the record's revision: a record
    /// rewritten meanwhile (taken over by another host) stays.
    async fn retire_instances(&self, host: &str, keep: &[&str]) -> Result<Vec<String>, CoordError> {
        let mut gone = Vec::new();
        for (name, rec, revision) in self.instances_at().await? {
            if rec.host != host || keep.contains(&name.as_str()) {
                continue;
            }
            if self.delete_instance(&name, &rec, revision, None).await? {
                gone.push(name);
            }
        }
        Ok(gone)
    }

    /// Under this host's lease, and only while `hosts/<host>` is still
    /// under it (a host whose lease ended joins again with its record).
    async fn update_host(&self, host: &HostRecord) -> Result<(), CoordError> {
        let Some(lease) = *self.lease.lock().expect("lease lock") else {
            return Ok(());
        };
        let key = self.key(&format!("hosts/{}", host.name));
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key.as_str(),
                serde_json::to_vec(host).expect("host record serialises"),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        self.txn("update host", txn).await?;
        Ok(())
    }

    /// Each instance in one transaction comparing its record's revision
    /// and that `hosts/<host>` does not exist: of two collectors, the
    /// second finds the record gone; a host that joined again, or took
    /// the instance over, keeps it.
    async fn collect_host(&self, host: &str) -> Result<Vec<String>, CoordError> {
        let host_key = self.key(&format!("hosts/{host}"));
        let mut gone = Vec::new();
        for (name, rec, revision) in self.instances_at().await? {
            if rec.host == host
                && self
                    .delete_instance(&name, &rec, revision, Some(&host_key))
                    .await?
            {
                gone.push(name);
            }
        }
        Ok(gone)
    }

    /// One transaction a service: store this host's definition if the
    /// cluster has none, else read the cluster's to compare.
    async fn check_services(
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

    fn lease_state(&self) -> Option<watch::Receiver<LeaseState>> {
        self.lease_state.lock().expect("lease state lock").clone()
    }
}

impl EtcdStore {
    /// Registers `name` against `known` (the registry as last read, kept up
    /// to date with what this call writes): its id, and whether this call
    /// created the record.
    async fn register_instance(
        &self,
        host: &str,
        name: &str,
        service: &str,
        known: &mut BTreeMap<String, InstanceRecord>,
    ) -> Result<(u32, bool), CoordError> {
        let key = self.key(&format!("instances/{name}"));
        for _ in 0..CHANGE_TRIES {
            let record = |id| InstanceRecord {
                id,
                host: host.to_owned(),
                service: service.to_owned(),
            };
            if let Some(rec) = known.get(name) {
                let id = rec.id;
                if *rec == record(id) {
                    return Ok((id, false));
                }
                // Ours (the service changed), or a dead host's: taken over
                // only if that host is still not live and nobody rewrote
                // the record since it was read.
                let revision = self.revision_of(&key).await?;
                let value = serde_json::to_vec(&record(id)).expect("instance record serialises");
                let mut when = vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )];
                if rec.host != host {
                    when.push(Compare::create_revision(
                        self.key(&format!("hosts/{}", rec.host)),
                        CompareOp::Equal,
                        0,
                    ));
                }
                let txn = Txn::new()
                    .when(when)
                    .and_then([TxnOp::put(key.as_str(), value, None)]);
                if revision != 0 && self.txn("register", txn).await?.succeeded() {
                    known.insert(name.to_owned(), record(id));
                    return Ok((id, false));
                }
            } else {
                let id = lowest_free_id(known)?;
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
                    return Ok((id, true));
                }
            }
            // Another host took the name, the id or the record meanwhile.
            *known = self.instances().await?;
            if let Some(rec) = known.get(name) {
                taken(name, host, rec, &self.hosts().await?)?;
            }
        }
        Err(CoordError::Contended {
            service: format!("instance registry ({name})"),
            tries: CHANGE_TRIES,
        })
    }

    /// The modification revision of `key` (0: no such key).
    async fn revision_of(&self, key: &str) -> Result<i64, CoordError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| self.err("read", &e))?;
        Ok(resp
            .kvs()
            .first()
            .map_or(0, etcd_client::KeyValue::mod_revision))
    }

    /// Every instance record with its modification revision.
    async fn instances_at(&self) -> Result<Vec<(String, InstanceRecord, i64)>, CoordError> {
        let prefix = self.key("instances/");
        let resp = self
            .client
            .kv_client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err("read", &e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let name = key.strip_prefix(prefix.as_str()).unwrap_or(&key).to_owned();
                let rec = serde_json::from_slice(kv.value()).map_err(|e| self.corrupt(&key, e))?;
                Ok((name, rec, kv.mod_revision()))
            })
            .collect()
    }

    /// Deletes instance `name`'s record, its id and its load, if the record
    /// is still at `revision` (and, given `dead_host`, that host's key
    /// does not exist); whether it did.
    async fn delete_instance(
        &self,
        name: &str,
        rec: &InstanceRecord,
        revision: i64,
        dead_host: Option<&str>,
    ) -> Result<bool, CoordError> {
        let key = self.key(&format!("instances/{name}"));
        let mut when = vec![Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            revision,
        )];
        if let Some(h) = dead_host {
            when.push(Compare::create_revision(h, CompareOp::Equal, 0));
        }
        let txn = Txn::new().when(when).and_then([
            TxnOp::delete(key.as_str(), None),
            TxnOp::delete(self.key(&format!("ids/{}", rec.id)), None),
            TxnOp::delete(self.key(&format!("load/{name}")), None),
        ]);
        Ok(self.txn("delete instance", txn).await?.succeeded())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSpec {
    /// The host that stored it first.
    host: String,
    spec: serde_json::Value,
}

/// What it takes to join again after the lease expired.
struct Rejoin {
    key: String,
    value: Vec<u8>,
    lease: Arc<Mutex<Option<i64>>>,
    lease_file: PathBuf,
}

/// What one renewal came to.
enum Renewal {
    /// etcd acknowledged it: the lease runs a full time from its sending.
    Acked,
    /// etcd says the lease is gone.
    Lost,
    /// No answer, or an error that says nothing of the lease.
    Failed(String),
}

/// Renews the lease every [`renew_every`] and tells `state` each
/// acknowledged renewal's send time (what the fence counts from). A lease
/// found lost is replaced: the host joins again under a new lease, and
/// `state.joins` counts it (the agent then re-reads its tables: it may
/// have missed moves). Lost is what etcd says: a renewal answered with TTL
/// 0, or — the keep-alive stream opened anew after a partition fails with
/// "lease not found" — `time_to_live` finding it gone.
async fn keep_alive(
    client: Client,
    rejoin: Rejoin,
    (mut id, mut stream): (i64, Option<(LeaseKeeper, LeaseKeepAliveStream)>),
    ttl: Duration,
    state: watch::Sender<LeaseState>,
) {
    let every = renew_every(ttl);
    let wait = renew_wait(ttl);
    // A stream handed over comes from the join's own renewal, just made.
    if stream.is_some() {
        tokio::time::sleep(every).await;
    }
    loop {
        let sent = Instant::now();
        match renew(&client, &mut stream, id, wait).await {
            Renewal::Acked => state.send_modify(|s| s.renewed = s.renewed.max(sent)),
            Renewal::Failed(e) => {
                tracing::warn!(error = %e, lease = id, "renewing this host's lease failed; retrying");
                stream = None;
            }
            Renewal::Lost => {
                tracing::error!(
                    lease = id,
                    "this host's lease expired: the cluster counted its instances as failed; joining again"
                );
                stream = None;
                state.send_modify(|s| {
                    s.lost.get_or_insert(sent);
                });
                let granted = Instant::now();
                match join_again(&client, &rejoin, ttl).await {
                    Ok(Some(new)) => {
                        id = new;
                        state.send_modify(|s| {
                            s.renewed = granted;
                            s.joins += 1;
                            s.lost = None;
                        });
                        continue;
                    }
                    Ok(None) => return,
                    Err(e) => tracing::warn!(error = %e, "joining again failed; retrying"),
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// How long a renewal may go unanswered: a hung stream is noticed before
/// the fence's warning (`T/3`) ends.
fn renew_wait(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(200))
}

/// One renewal of lease `id`, on `stream` (opened if there is none; the
/// opening sends a renewal and waits for its answer), answered within
/// `wait`.
async fn renew(
    client: &Client,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    id: i64,
    wait: Duration,
) -> Renewal {
    let once = async {
        if let Some((keeper, answers)) = stream.as_mut() {
            keeper.keep_alive().await.map_err(|e| e.to_string())?;
            return match answers.message().await.map_err(|e| e.to_string())? {
                Some(r) => Ok(r.ttl() > 0),
                None => Err("the keep-alive stream ended".to_owned()),
            };
        }
        let opened = client.lease_client().keep_alive(id).await;
        match opened {
            Ok(s) => {
                *stream = Some(s);
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let why = match tokio::time::timeout(wait, once).await {
        Ok(Ok(true)) => return Renewal::Acked,
        Ok(Ok(false)) => return Renewal::Lost,
        Ok(Err(e)) => e,
        Err(_) => format!("no answer within {wait:?}"),
    };
    // Whether the lease is still there says whether to retry or rejoin.
    match tokio::time::timeout(wait, client.lease_client().time_to_live(id, None)).await {
        Ok(Ok(r)) if r.ttl() <= 0 => Renewal::Lost,
        _ => Renewal::Failed(why),
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
