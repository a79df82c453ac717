//! Joining the cluster (`cluster.store = "etcd"`): the services checked
//! against the cluster's, the instances given cluster-wide ids, the host's
//! lease taken and kept.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use sluice_common::{
    MAX_HOSTS,
    maps::{ClusterEntry, MemberKey, RemoteHost},
};

use super::Agent;
use crate::{
    config::{Config, Service},
    control::Controller,
    coord::{
        CoordError, CoordStore, EtcdOptions, EtcdStore, HostRecord, InstanceRecord, Membership,
    },
    datapath::{ClusterTables, xdp::XdpDatapath},
    plan::{Plan, RemotePlan, addr_words},
    sys::{ethtool, link, neigh},
};

/// The cluster's instances as a start or reload sees them.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// This host's instances: (id, name).
    pub local: Vec<(u32, String)>,
    /// Every other host's instances, by name.
    pub remote: Vec<(String, InstanceRecord)>,
}

/// This host's membership of the cluster.
pub struct Cluster {
    /// The assignment, and every instance's load.
    pub store: Arc<dyn CoordStore>,
    /// The live hosts and the cluster's instances.
    pub membership: Arc<dyn Membership>,
    /// This host's name (`cluster.host`).
    pub host: String,
    /// This host's underlay address.
    underlay: IpAddr,
    /// The other live hosts' underlay addresses (of this host's family)
    /// at the last look: whom the fence asks.
    peers: Vec<IpAddr>,
    /// Other hosts' slots in the data path's `REMOTE_HOSTS`.
    slots: Slots,
    /// This host's instances as last published in its host record.
    names: Vec<String>,
    /// Since when each host that has instance records was seen not live
    /// (by this agent): collected after [`collect_grace`].
    dead_since: HashMap<String, std::time::Instant>,
    /// [`collect_grace`] of the config joined with.
    grace: std::time::Duration,
    /// Next hops resolved, by host, and when: asked again after
    /// [`NEXT_HOP_REFRESH`] (a gateway may fail over to another MAC).
    next_hops: HashMap<String, ([u8; 6], std::time::Instant)>,
    /// What the data path was last given, so an interval writes only what
    /// changed: each slot's host, the members, each remote instance's
    /// (service, slot, live).
    written: Written,
}

#[derive(Default)]
struct Written {
    hosts: HashMap<u32, RemoteHost>,
    members: Vec<MemberKey>,
    instances: HashMap<u32, (u32, u32, bool)>,
}

/// How long a resolved next hop is used before the neighbour table is
/// asked again.
const NEXT_HOP_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// What one interval's look at the cluster found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Other live hosts.
    pub hosts: usize,
    /// Of them, those whose next hop is not resolved yet.
    pub unresolved: Vec<String>,
}

/// What every host must configure alike for `s`: how its packets are
/// recognised and keyed, and how its elements act. Instances differ by
/// host and are left out.
#[must_use]
pub fn service_spec(s: &Service) -> serde_json::Value {
    serde_json::json!({
        "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": s.ports,
        "protocols": s.protocols.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(),
        "vlan": s.vlan,
        "tag": format!("{:?}", s.tag),
        "pin": format!("{:?}", s.pin),
        "pin_idle_secs": s.pin_idle_secs,
        "assign": if s.on_demand { "on-demand" } else { "even" },
        "wlm": format!("{:?}", s.wlm),
        // Fields older agents did not store read as their defaults
        // (`coord::membership::spec_defaults`): L4, no HTTP, no origins.
        "layer": if s.http.is_some() { "http" } else { "l4" },
        "http": s.http.as_ref().map(|h| serde_json::json!({"key": format!("{:?}", h.key)})),
        "origins": s.origins.iter().map(|o| serde_json::json!({
            "name": o.name,
            "prefixes": o.prefixes.iter().map(|(a, l)| format!("{a}/{l}")).collect::<Vec<_>>(),
            "spill": o.spill,
        })).collect::<Vec<_>>(),
    })
}

impl Cluster {
    /// Connects to etcd, checks this host's services against the
    /// cluster's, registers its instances and joins under `cluster.host`
    /// (taking the lease over from this host's previous agent, whose id
    /// is kept beside the state file).
    pub async fn join(config: &Config, state: &Path) -> Result<Self, CoordError> {
        let c = &config.cluster;
        let etcd = Arc::new(
            EtcdStore::connect(&EtcdOptions {
                endpoints: c.etcd_endpoints.clone(),
                cluster: c.name.clone(),
                timeout: c.etcd_timeout,
            })
            .await?,
        );
        Self::join_with(config, state, etcd.clone(), etcd).await
    }

    /// As [`Self::join`], through `store` and `membership` (etcd's, or
    /// stand-ins in tests).
    pub async fn join_with(
        config: &Config,
        state: &Path,
        store: Arc<dyn CoordStore>,
        membership: Arc<dyn Membership>,
    ) -> Result<Self, CoordError> {
        let c = &config.cluster;
        let underlay = c
            .underlay
            .expect("the config check requires an underlay with etcd");
        let me = Self {
            store,
            membership,
            host: c.host.clone(),
            underlay,
            peers: Vec::new(),
            slots: Slots::default(),
            names: instance_names(config),
            dead_since: HashMap::new(),
            grace: collect_grace(config),
            next_hops: HashMap::new(),
            written: Written::default(),
        };
        me.check(config).await?;
        me.membership
            .join(
                &HostRecord {
                    name: c.host.clone(),
                    underlay,
                    instances: instance_names(config),
                },
                c.lease_ttl,
                &lease_file(state),
            )
            .await?;
        Ok(me)
    }

    /// Checks `config`'s services against the cluster's.
    pub async fn check(&self, config: &Config) -> Result<(), CoordError> {
        let specs: Vec<(String, serde_json::Value)> = config
            .services
            .iter()
            .map(|s| (s.name.clone(), service_spec(s)))
            .collect();
        self.membership.check_services(&self.host, &specs).await?;
        Ok(())
    }

    /// The cluster-wide ids of `config`'s instances, as (id, name), for the
    /// plan to keep (new instances are registered), and the other hosts'
    /// instances.
    pub async fn registry(&self, config: &Config) -> Result<Registry, CoordError> {
        let pairs: Vec<(&str, &str)> = config
            .services
            .iter()
            .flat_map(|s| {
                s.instances
                    .iter()
                    .map(|i| (i.name.as_str(), s.name.as_str()))
            })
            .collect();
        let ids = self
            .membership
            .register_instances(&self.host, &pairs)
            .await?;
        let local = ids
            .into_iter()
            .zip(pairs)
            .map(|(id, (n, _))| (id, n.to_owned()))
            .collect();
        let remote = self
            .membership
            .instances()
            .await?
            .into_iter()
            .filter(|(_, r)| r.host != self.host)
            .collect();
        Ok(Registry { local, remote })
    }

    /// Points the data path at this host's place in the cluster: where
    /// encapsulated packets leave from (the underlay address, the NIC's
    /// MAC) and arrive at (the encapsulation port), and the NIC's MTU.
    pub fn program_local(
        &self,
        dp: &mut XdpDatapath,
        config: &Config,
        iface: &str,
    ) -> anyhow::Result<()> {
        let mac = link::mac(iface)?.unwrap_or_default();
        let mtu = ethtool::mtu(iface)?;
        let (underlay, family) = addr_words(self.underlay);
        dp.set_cluster(ClusterEntry {
            underlay,
            mac,
            family,
            pad: 0,
            port_be: config.cluster.encap_port.to_be(),
            mtu,
            pad2: 0,
            fence_ns: 0,
        })?;
        Ok(())
    }

    /// After the agent started: the data path learns this host's place,
    /// then the other hosts; their next hops are given a moment to
    /// resolve (up to a second), so the first packets for them go out.
    pub async fn start(&mut self, agent: &mut Agent, config: &Config) -> anyhow::Result<()> {
        self.program_local(&mut agent.datapath, config, &agent.iface)?;
        // Instances this host's previous agent ran and this one does not.
        if let Err(e) = self.settled(config).await {
            tracing::warn!(error = %e, "deleting the records of instances this host no longer runs failed; the next reload tries again");
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let seen = self.sync(agent).await?;
            if seen.unresolved.is_empty() || std::time::Instant::now() > until {
                tracing::info!(hosts = seen.hosts, unresolved = ?seen.unresolved, "the data path knows the other hosts");
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// One interval's look at the cluster: the live hosts, every
    /// instance, their loads. The data path learns where each other
    /// host's instances are (their host's underlay and next hop), whose
    /// encapsulated packets to take, and which instances are live; the
    /// control loop learns its remote peers and their loads.
    pub async fn sync(&mut self, agent: &mut Agent) -> anyhow::Result<Seen> {
        let Agent {
            datapath,
            plan,
            control,
            ..
        } = agent;
        self.sync_tables(datapath, plan, control, neigh::next_hop_mac)
            .await
    }

    /// [`Self::sync`]'s work on the parts it touches: the cluster tables of
    /// `dp` (the XDP data path, or the simulation's), the plan's other
    /// hosts' instances, the control loop's peers; next hops resolved by
    /// `next_hop`.
    pub async fn sync_tables(
        &mut self,
        dp: &mut dyn ClusterTables,
        plan: &mut Plan,
        control: &mut Controller,
        next_hop: fn(IpAddr) -> std::io::Result<Option<[u8; 6]>>,
    ) -> anyhow::Result<Seen> {
        let hosts = self.membership.hosts().await?;
        let instances = self.membership.instances().await?;
        let loads = self.store.loads().await?;
        let live: HashSet<String> = hosts.keys().cloned().collect();
        self.slots.forget_dead(&live);
        if let Err(e) = self
            .collect_seen(&hosts, &instances, std::time::Instant::now())
            .await
        {
            tracing::warn!(error = %e, "collecting the records of dead hosts failed; tried again next interval");
        }
        let mut seen = Seen::default();
        let (_, family) = addr_words(self.underlay);
        let mut members = Vec::new();
        let mut peers = Vec::new();
        for (name, h) in &hosts {
            if *name == self.host {
                continue;
            }
            let (underlay, fam) = addr_words(h.underlay);
            if fam != family {
                tracing::warn!(host = %name, underlay = %h.underlay, "a host of the other address family: its instances are out of reach");
                continue;
            }
            seen.hosts += 1;
            peers.push(h.underlay);
            members.push(MemberKey {
                addr: underlay,
                family,
                pad: [0; 3],
            });
            let slot = self.slots.slot(name)?;
            let stale = self
                .next_hops
                .get(name)
                .is_none_or(|(_, at)| at.elapsed() > NEXT_HOP_REFRESH);
            if stale {
                match next_hop(h.underlay) {
                    Ok(Some(mac)) => {
                        self.next_hops
                            .insert(name.clone(), (mac, std::time::Instant::now()));
                    }
                    // A known one stays in use until the table says otherwise.
                    Ok(None) if self.next_hops.contains_key(name) => {}
                    Ok(None) => seen.unresolved.push(name.clone()),
                    Err(e) => {
                        tracing::warn!(host = %name, error = %e, "no next hop towards the host");
                        seen.unresolved.push(name.clone());
                    }
                }
            }
            let host = RemoteHost {
                underlay,
                next_hop: self.next_hops.get(name).map(|n| n.0).unwrap_or_default(),
                pad: 0,
            };
            if self.written.hosts.get(&slot) != Some(&host) {
                dp.set_remote_host(slot, host)?;
                self.written.hosts.insert(slot, host);
            }
        }
        if members != self.written.members {
            dp.set_members(&members)?;
            self.written.members = members;
        }
        let mut remote = Vec::new();
        for (name, rec) in &instances {
            if rec.host == self.host {
                continue;
            }
            let Some(service_id) = plan.service_id(&rec.service) else {
                continue;
            };
            // A dead host's instances name no slot: its slot may be given
            // to another host.
            let entry = if live.contains(&rec.host) {
                (service_id, self.slots.slot(&rec.host)?, true)
            } else {
                (service_id, 0, false)
            };
            if self.written.instances.get(&rec.id) != Some(&entry) {
                dp.set_remote_instance(rec.id, entry.0, entry.1, entry.2)?;
                self.written.instances.insert(rec.id, entry);
            }
            remote.push(RemotePlan {
                id: rec.id,
                name: name.clone(),
                service_id,
                host: rec.host.clone(),
            });
        }
        self.peers = peers;
        self.forget_vanished(dp, &remote)?;
        self.slots.end_of_look();
        control.set_host_live(live.contains(&self.host));
        control.set_remote(&remote, &live, &loads);
        plan.remote = remote;
        Ok(seen)
    }

    /// This host's underlay address.
    #[must_use]
    pub const fn underlay(&self) -> IpAddr {
        self.underlay
    }

    /// The other live hosts' underlay addresses at the last look.
    #[must_use]
    pub fn peers(&self) -> &[IpAddr] {
        &self.peers
    }

    /// Instances deleted from the cluster since the last look (dropped by
    /// a reload, or collected): not live in the data path, and pointing at
    /// no slot any more (the slot may be given to another host).
    fn forget_vanished(
        &mut self,
        dp: &mut dyn ClusterTables,
        remote: &[RemotePlan],
    ) -> anyhow::Result<()> {
        let ids: HashSet<u32> = remote.iter().map(|r| r.id).collect();
        let vanished: Vec<(u32, u32)> = self
            .written
            .instances
            .iter()
            .filter(|(id, _)| !ids.contains(id))
            .map(|(id, e)| (*id, e.0))
            .collect();
        for (id, service_id) in vanished {
            dp.set_remote_instance(id, service_id, 0, false)?;
            self.written.instances.remove(&id);
        }
        Ok(())
    }

    /// After a reload, whose programming may have rewritten instance
    /// entries: the next look writes everything again.
    pub fn forget_written(&mut self) {
        self.written = Written::default();
    }

    /// After a start or a reload took effect with `config`: the records of
    /// this host's instances it no longer runs are deleted (their names and
    /// ids free for any host), and the host record lists the ones it runs.
    /// Not before: a refused reload keeps the instances it would drop.
    pub async fn settled(&mut self, config: &Config) -> Result<(), CoordError> {
        let names = instance_names(config);
        let keep: Vec<&str> = names.iter().map(String::as_str).collect();
        let gone = self.membership.retire_instances(&self.host, &keep).await?;
        if !gone.is_empty() {
            tracing::info!(instances = ?gone, "deleted the cluster's records of the instances this host dropped");
        }
        self.names = names;
        self.membership.update_host(&self.record()).await
    }

    /// One look for records to collect at `now` (see [`Self::collect_seen`]).
    pub async fn collect(&mut self, now: std::time::Instant) -> Result<Vec<String>, CoordError> {
        let hosts = self.membership.hosts().await?;
        let instances = self.membership.instances().await?;
        self.collect_seen(&hosts, &instances, now).await
    }

    /// Deletes the instance records of hosts seen not live for
    /// [`collect_grace`] (any live host may; the store's compare-and-swap
    /// keeps two collectors from colliding); returns the names deleted.
    /// Also publishes this host's record again when it lists other
    /// instances than the host runs (as after joining again under a new
    /// lease with the record it started with).
    async fn collect_seen(
        &mut self,
        hosts: &BTreeMap<String, HostRecord>,
        instances: &BTreeMap<String, InstanceRecord>,
        now: std::time::Instant,
    ) -> Result<Vec<String>, CoordError> {
        if hosts
            .get(&self.host)
            .is_some_and(|h| h.instances != self.names)
        {
            self.membership.update_host(&self.record()).await?;
        }
        let lost: Vec<&String> = self
            .names
            .iter()
            .filter(|n| instances.get(*n).is_none_or(|r| r.host != self.host))
            .collect();
        if !lost.is_empty() {
            tracing::error!(instances = ?lost, "the cluster has no record of these instances of this host (collected while this host was out of etcd's reach for longer than the grace): the other hosts cannot reach them; reload (SIGHUP) to register them again");
        }
        let dead: HashSet<&String> = instances
            .values()
            .map(|r| &r.host)
            .filter(|h| !hosts.contains_key(*h) && **h != self.host)
            .collect();
        self.dead_since.retain(|h, _| dead.contains(h));
        let mut gone = Vec::new();
        for host in dead {
            let since = *self.dead_since.entry(host.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= self.grace {
                let names = self.membership.collect_host(host).await?;
                tracing::info!(host = %host, instances = ?names, "collected the records of a host gone for longer than the grace");
                gone.extend(names);
                self.dead_since.remove(host);
            }
        }
        Ok(gone)
    }

    fn record(&self) -> HostRecord {
        HostRecord {
            name: self.host.clone(),
            underlay: self.underlay,
            instances: self.names.clone(),
        }
    }
}

/// How many lease times a host must have been gone before its instances'
/// records are collected.
pub const COLLECT_AFTER_LEASES: u32 = 12;

/// The shortest grace, whatever the lease time.
pub const COLLECT_AT_LEAST: std::time::Duration = std::time::Duration::from_mins(5);

/// How long a host must be seen not live before any other host deletes
/// its instances' records (name, id, load): [`COLLECT_AFTER_LEASES`] lease
/// times, and at least [`COLLECT_AT_LEAST`]. A host whose agent still runs
/// but lost etcd for longer finds its instances unknown to the cluster
/// when it is back (it logs so; a reload registers them again, under new
/// ids), so the grace is far longer than an ordinary outage or restart;
/// it only has to be finite for ids and slots never to run out.
#[must_use]
pub fn collect_grace(config: &Config) -> std::time::Duration {
    (config.cluster.lease_ttl * COLLECT_AFTER_LEASES).max(COLLECT_AT_LEAST)
}

/// Other hosts' slots in the data path's `REMOTE_HOSTS` (1..=`MAX_HOSTS`),
/// for live hosts only: a host keeps its slot while it is live, and a
/// slot freed when its host is gone is given again.
#[derive(Default)]
struct Slots {
    by_host: HashMap<String, u32>,
    /// Free slots, to give again.
    free: Vec<u32>,
    /// Freed during this look: free from the next one on, once no
    /// instance entry of the data path names them.
    freed: Vec<u32>,
    /// The highest slot ever given.
    top: u32,
}

impl Slots {
    /// The `REMOTE_HOSTS` slot of live host `name`: its own, else the
    /// lowest free one.
    fn slot(&mut self, name: &str) -> anyhow::Result<u32> {
        if let Some(s) = self.by_host.get(name) {
            return Ok(*s);
        }
        let next = if let Some((i, _)) = self.free.iter().enumerate().min_by_key(|(_, s)| **s) {
            self.free.swap_remove(i)
        } else if self.top < MAX_HOSTS {
            self.top += 1;
            self.top
        } else {
            anyhow::bail!("more than {MAX_HOSTS} other live hosts in the cluster");
        };
        self.by_host.insert(name.to_owned(), next);
        Ok(next)
    }

    /// Frees the slots of the hosts not in `live`.
    fn forget_dead(&mut self, live: &HashSet<String>) {
        let freed = &mut self.freed;
        self.by_host.retain(|h, s| {
            let keep = live.contains(h);
            if !keep {
                freed.push(*s);
            }
            keep
        });
    }

    /// After a look rewrote the instance entries: the slots it freed may
    /// be given again.
    fn end_of_look(&mut self) {
        self.free.append(&mut self.freed);
    }
}

fn instance_names(config: &Config) -> Vec<String> {
    config
        .services
        .iter()
        .flat_map(|s| &s.instances)
        .map(|i| i.name.clone())
        .collect()
}

/// Where the host's lease id is kept: beside the state file.
#[must_use]
pub fn lease_file(state: &Path) -> std::path::PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".lease");
    p.into()
}

#[cfg(test)]
mod tests;
