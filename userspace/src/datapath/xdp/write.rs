//! Writing the data path: the whole plan (instances, owners, origin
//! rules, services, host MACs), the cluster's hosts and members, the punt
//! sockets, and the [`Datapath`] implementation the control loop writes
//! through.

use std::{
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{
    Array, DevMap, HashMap, MapData, MapError, PerCpuArray,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use sluice_common::{
    MAX_HOST_MACS,
    maps::{
        ClusterEntry, FAMILY_V4, HostEntry, INSTANCE_LIVE, INSTANCE_LOOKUP, INSTANCE_REMOTE,
        InstanceCounters, InstanceEntry, InstanceName, MemberKey, NO_OWNER, OriginKey, RemoteHost,
        ServiceCounters, ServiceEntry, ServiceKey, ServiceSlot, Tier, mac_word, names, origin_key,
        origin_prefix_len, previous_entry,
    },
    owner_index,
};

use super::{XdpDatapath, map_err};
use crate::{
    datapath::{Datapath, DatapathError, GlobalCounters, service_table},
    plan::{Group, Plan},
};

/// Seconds of the clock the XDP program reads (`bpf_ktime_get_coarse_ns`:
/// `CLOCK_MONOTONIC_COARSE`), in 32 bits as `PREVIOUS` keeps them.
fn coarse_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u32::try_from(ts.tv_sec & 0xFFFF_FFFF).expect("masked")
}

/// `at` in nanoseconds of `CLOCK_MONOTONIC`, the clock `Instant` reads
/// (and, coarse, the XDP program): its distance from now added to the
/// clock's now. Never 0, which means "no fence".
fn kernel_ns(at: Instant) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let now = Instant::now();
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let mono = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let t = if at >= now {
        mono.saturating_add(ns(at - now))
    } else {
        mono.saturating_sub(ns(now - at))
    };
    t.max(1)
}

/// Entry 0 of `CLUSTER` through a descriptor of its own, shared by the
/// data path and its [`FenceWriter`]s: the lock keeps one's read, modify
/// and write of the entry from undoing the other's.
pub(super) type ClusterMap = Arc<Mutex<Array<MapData, ClusterEntry>>>;

/// [`ClusterMap`] for the loaded `CLUSTER` map `data`.
pub(super) fn cluster_map(data: &MapData) -> Result<ClusterMap, DatapathError> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| DatapathError::Map {
            name: names::CLUSTER,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error,
            }),
        })?;
    let data = MapData::from_fd(fd).map_err(map_err(names::CLUSTER))?;
    let map = Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::CLUSTER))?;
    Ok(Arc::new(Mutex::new(map)))
}

/// Sets this host's fence in the data path ([`XdpDatapath::set_fence`])
/// from another task than the one holding the [`XdpDatapath`]: the agent's
/// fence task writes each deadline as it changes, while the control loop
/// may wait on the store.
#[derive(Clone)]
pub struct FenceWriter(ClusterMap);

impl FenceWriter {
    /// A writer on the `CLUSTER` map a previous agent pinned in `pin_dir`,
    /// before this agent adopts its data path (which loads a program
    /// first); `None` when nothing is pinned there.
    pub fn pinned(pin_dir: &Path) -> Result<Option<Self>, DatapathError> {
        let path = pin_dir.join(names::CLUSTER);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path).map_err(map_err(names::CLUSTER))?;
        let map = Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::CLUSTER))?;
        Ok(Some(Self(Arc::new(Mutex::new(map)))))
    }

    /// As [`XdpDatapath::set_fence`].
    pub fn set(&self, until: Option<Instant>) -> Result<(), DatapathError> {
        let mut map = self.0.lock().expect("cluster map lock");
        let entry = ClusterEntry {
            fence_ns: until.map_or(0, kernel_ns),
            ..map.get(&0, 0).map_err(map_err(names::CLUSTER))?
        };
        map.set(0, entry, 0).map_err(map_err(names::CLUSTER))
    }
}

/// A step of [`XdpDatapath::program`], in the order it takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramStep {
    /// The plan's instances and their veths.
    Instances,
    /// Every unit's owner.
    Owners,
    /// The origin rules' tiers.
    Origins,
    /// The service table.
    Services,
    /// The host's MACs.
    HostMacs,
    /// Instances no longer configured taken out, now that nothing names
    /// them: until then, a packet still sent to one (by another host whose
    /// table follows the store a moment later, which this host must not
    /// send a decapsulated packet on to) is delivered to it.
    Retired,
}

impl XdpDatapath {
    /// Writes the whole plan: instances and their veths first, then owners,
    /// and the services, so no packet matches a service whose owners are
    /// not in place yet; instances no longer configured go out last, when
    /// no unit names them (the running program reads the maps throughout).
    ///
    /// Ids come from the registry ([`crate::plan::ids`]): an id now held by
    /// another name than before gets a new generation, so the pins its
    /// previous instance left do not hold, and its counters start from
    /// zero; ids no longer configured are taken out of the data path.
    pub fn program(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        self.program_observed(plan, |_, _| {})
    }

    /// As [`Self::program`], handing the data path to `after` as each step
    /// leaves it (tests send packets through every one: none may find its
    /// unit without a deliverer).
    pub fn program_observed(
        &mut self,
        plan: &Plan,
        mut after: impl FnMut(&Self, ProgramStep),
    ) -> Result<(), DatapathError> {
        let retired = self.program_instances(plan)?;
        after(self, ProgramStep::Instances);
        for s in &plan.services {
            for (g, owner) in &s.groups {
                self.set_group_owner(s.id, *g, *owner)?;
            }
        }
        after(self, ProgramStep::Owners);
        self.set_origins(plan)?;
        after(self, ProgramStep::Origins);
        self.set_services(plan)?;
        after(self, ProgramStep::Services);
        self.set_host_macs(&plan.host_macs)?;
        after(self, ProgramStep::HostMacs);
        self.retire(&retired)?;
        after(self, ProgramStep::Retired);
        Ok(())
    }

    /// The instance maps and the id registry, for `plan` (see
    /// [`Self::program`]); returns the ids no longer configured, for
    /// [`Self::retire`].
    fn program_instances(&mut self, plan: &Plan) -> Result<Vec<u32>, DatapathError> {
        let registered = self.registered()?;
        let held_by = |id: u32, name: &str| registered.iter().any(|(r, n)| *r == id && n == name);
        let retired: Vec<u32> = registered
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !plan.instances.iter().any(|i| i.id == *id))
            .collect();
        let newcomers: Vec<u32> = plan
            .instances
            .iter()
            .filter(|i| !held_by(i.id, &i.name))
            .map(|i| i.id)
            .collect();
        {
            let mut counters: PerCpuArray<&mut MapData, InstanceCounters> =
                self.map_mut(names::INSTANCE_COUNTERS)?;
            let syscall = |call, io_error| DatapathError::Map {
                name: names::INSTANCE_COUNTERS,
                source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
            };
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| syscall("nr_cpus", e))?;
            for id in &newcomers {
                let zero =
                    aya::maps::PerCpuValues::try_from(vec![InstanceCounters::default(); cpus])
                        .map_err(|e| syscall("zeroing per-CPU values", e))?;
                counters
                    .set(*id, zero, 0)
                    .map_err(map_err(names::INSTANCE_COUNTERS))?;
            }
        }
        {
            let mut instances: Array<&mut MapData, InstanceEntry> =
                self.map_mut(names::INSTANCES)?;
            for i in &plan.instances {
                let old = instances.get(&i.id, 0).map_err(map_err(names::INSTANCES))?;
                let generation = if newcomers.contains(&i.id) {
                    old.generation.wrapping_add(1)
                } else {
                    old.generation
                };
                let entry = InstanceEntry {
                    mac: i.mac,
                    generation,
                    flags: if i.live { INSTANCE_LIVE } else { 0 }
                        | if i.netns_id.is_some() {
                            INSTANCE_LOOKUP
                        } else {
                            0
                        },
                    service_id: i.service_id,
                    host: 0,
                    netns_id: i.netns_id.unwrap_or(u32::MAX),
                };
                instances
                    .set(i.id, entry, 0)
                    .map_err(map_err(names::INSTANCES))?;
            }
        }
        // A failed instance's veth may be gone: it is pointed at its new
        // one when it recovers.
        for i in plan.instances.iter().filter(|i| i.live) {
            self.set_deliver(i.id, i.ifindex)?;
        }
        {
            let mut registry: Array<&mut MapData, InstanceName> =
                self.map_mut(names::INSTANCE_NAMES)?;
            for i in &plan.instances {
                let mut entry = InstanceName::default();
                entry.name[..i.name.len()].copy_from_slice(i.name.as_bytes());
                registry
                    .set(i.id, entry, 0)
                    .map_err(map_err(names::INSTANCE_NAMES))?;
            }
        }
        Ok(retired)
    }

    /// Takes `retired` out of the data path and the id registry; the
    /// generation stays, for the next holder.
    fn retire(&mut self, retired: &[u32]) -> Result<(), DatapathError> {
        for id in retired {
            self.update_instance(*id, |e| e.flags = 0)?;
        }
        let mut registry: Array<&mut MapData, InstanceName> =
            self.map_mut(names::INSTANCE_NAMES)?;
        for id in retired {
            registry
                .set(*id, InstanceName::default(), 0)
                .map_err(map_err(names::INSTANCE_NAMES))?;
        }
        Ok(())
    }

    /// Writes the plan's origin rules: their tiers into the half of `TIERS`
    /// the live `ORIGIN` entries do not point into, then the `ORIGIN`
    /// entries (each one update: a packet sees a rule's old tier or its
    /// new one), then takes out the entries of prefixes no longer
    /// configured. A failure half-way leaves the live tiers untouched; a
    /// roll-back programs the running plan again.
    fn set_origins(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let live: Vec<(LpmKey<OriginKey>, u32)> = {
            let trie: LpmTrie<&MapData, OriginKey, u32> = self.map(names::ORIGIN)?;
            trie.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(names::ORIGIN))?
        };
        let half_len = {
            let tiers: Array<&MapData, Tier> = self.map(names::TIERS)?;
            tiers.len() / 2
        };
        let half = live.first().map_or(0, |(_, t)| (t / half_len + 1) & 1);
        let mut tiers = std::collections::HashMap::new();
        {
            let mut map: Array<&mut MapData, Tier> = self.map_mut(names::TIERS)?;
            for (at, (service, rule, r)) in (0..).zip(plan.origin_rules()) {
                let t = half * half_len + at;
                let tier = r.tier(|id| plan.instance(id).is_some_and(|i| i.live));
                map.set(t, tier, 0).map_err(map_err(names::TIERS))?;
                tiers.insert((service, rule), t);
            }
        }
        let mut wanted = Vec::new();
        for (service, rule, r) in plan.origin_rules() {
            for &(addr, len) in &r.prefixes {
                let (words, family) = crate::plan::addr_words(addr);
                let key = LpmKey::new(
                    origin_prefix_len(family, u32::from(len)),
                    origin_key(service, family, words),
                );
                wanted.push((key, tiers[&(service, rule)]));
            }
        }
        let mut trie: LpmTrie<&mut MapData, OriginKey, u32> = self.map_mut(names::ORIGIN)?;
        for (key, t) in &wanted {
            trie.insert(key, t, 0).map_err(map_err(names::ORIGIN))?;
        }
        let same = |a: &LpmKey<OriginKey>, b: &LpmKey<OriginKey>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        for (key, _) in &live {
            if !wanted.iter().any(|(w, _)| same(w, key)) {
                trie.remove(key).map_err(map_err(names::ORIGIN))?;
            }
        }
        self.tiers = tiers;
        Ok(())
    }

    /// Writes the plan's services into the half of the service table the
    /// data path does not read, then makes that half the live one.
    fn set_services(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let services: Vec<(ServiceKey, ServiceEntry)> = plan
            .services
            .iter()
            .flat_map(|s| s.keys.iter().map(|k| (*k, s.entry)))
            .collect();
        let mut host = self.host_entry()?;
        let table: Array<&MapData, ServiceSlot> = self.map(names::SERVICE_TABLE)?;
        let slots = table.len() / 2;
        let layout = service_table::place(&services, slots)?;
        let half = if host.service_mask + 1 == slots {
            (host.service_half + 1) & 1
        } else {
            // Fresh maps: both halves are empty, either will do.
            0
        };
        let mut table: Array<&mut MapData, ServiceSlot> = self.map_mut(names::SERVICE_TABLE)?;
        for (i, slot) in (0..).zip(layout) {
            table
                .set(half * slots + i, slot, 0)
                .map_err(map_err(names::SERVICE_TABLE))?;
        }
        host.service_mask = slots - 1;
        host.service_half = half;
        let mut map: Array<&mut MapData, HostEntry> = self.map_mut(names::HOST)?;
        map.set(0, host, 0).map_err(map_err(names::HOST))
    }

    fn host_entry(&self) -> Result<HostEntry, DatapathError> {
        let map: Array<&MapData, HostEntry> = self.map(names::HOST)?;
        map.get(&0, 0).map_err(map_err(names::HOST))
    }

    /// Rewrites entry `id` of the `INSTANCES` map with `f`.
    fn update_instance(
        &mut self,
        id: u32,
        f: impl FnOnce(&mut InstanceEntry),
    ) -> Result<(), DatapathError> {
        let mut instances: Array<&mut MapData, InstanceEntry> = self.map_mut(names::INSTANCES)?;
        let mut e = instances.get(&id, 0).map_err(map_err(names::INSTANCES))?;
        f(&mut e);
        instances.set(id, e, 0).map_err(map_err(names::INSTANCES))
    }

    /// Points id `id` of the `DELIVER` map at interface `ifindex`.
    fn set_deliver(&mut self, id: u32, ifindex: u32) -> Result<(), DatapathError> {
        let mut deliver: DevMap<&mut MapData> = self.map_mut(names::DELIVER)?;
        deliver.set(id, ifindex, None, 0).map_err(|e| match e {
            aya::maps::xdp::XdpMapError::MapError(source) => DatapathError::Map {
                name: names::DELIVER,
                source,
            },
            aya::maps::xdp::XdpMapError::ChainedProgramNotSupported => {
                unreachable!("no chained program is given")
            }
        })
    }

    /// The MACs frames must be addressed to for the program to steer them.
    pub fn set_host_macs(&mut self, macs: &[[u8; 6]]) -> Result<(), DatapathError> {
        let mut entry = self.host_entry()?;
        entry.macs = [0; MAX_HOST_MACS];
        for (slot, mac) in entry.macs.iter_mut().zip(macs.iter().take(MAX_HOST_MACS)) {
            *slot = mac_word(*mac);
        }
        let mut host: Array<&mut MapData, HostEntry> = self.map_mut(names::HOST)?;
        host.set(0, entry, 0).map_err(map_err(names::HOST))
    }

    /// This host's place in its cluster: where encapsulated packets leave
    /// from and arrive at (all zero: no cluster). The fence stays as
    /// [`Self::set_fence`] (or a [`FenceWriter`]) left it, whatever `entry`
    /// says.
    pub fn set_cluster(&mut self, entry: ClusterEntry) -> Result<(), DatapathError> {
        let mut map = self.cluster.lock().expect("cluster map lock");
        let fence_ns = map.get(&0, 0).map_err(map_err(names::CLUSTER))?.fence_ns;
        map.set(0, ClusterEntry { fence_ns, ..entry }, 0)
            .map_err(map_err(names::CLUSTER))
    }

    /// Stops this host delivering as an owner after `until`: in cluster
    /// mode, past it the program drops (and counts `fenced`) every packet
    /// it would deliver to an instance or encapsulate to another host.
    /// `None`: no fence. A deadline already past fences at once.
    pub fn set_fence(&mut self, until: Option<Instant>) -> Result<(), DatapathError> {
        self.fence_writer().set(until)
    }

    /// A handle that sets the fence as [`Self::set_fence`] does, for the
    /// agent's fence task: it must not wait for the control loop, which
    /// may be waiting on an unreachable store.
    #[must_use]
    pub fn fence_writer(&self) -> FenceWriter {
        FenceWriter(self.cluster.clone())
    }

    /// For a reload: this data path, which adopted `old`'s pinned maps,
    /// writes the `CLUSTER` entry through `old`'s handle, so the fence
    /// writers given out and this data path keep taking turns on it.
    pub fn keep_fence_writers(&mut self, old: &Self) {
        self.cluster = old.cluster.clone();
    }

    /// Records that `group`'s units of `service_id` left `owner` `ago`,
    /// as a move does (the second chance's window counts from then): for
    /// tests and tools that replay an old move.
    pub fn set_previous(&mut self, service_id: u32, group: Group, owner: u32, ago: Duration) {
        let ago = u32::try_from(ago.as_secs()).unwrap_or(u32::MAX);
        let moved_at = coarse_secs().wrapping_sub(ago);
        for unit in group.units() {
            let i = owner_index(service_id, unit);
            self.previous.set_wide(i, previous_entry(owner, moved_at));
        }
    }

    /// Whether the fence set by [`Self::set_fence`] is down now (in a
    /// cluster): this host then sends nothing on as an owner.
    pub fn is_fenced(&self) -> Result<bool, DatapathError> {
        let cl = self.cluster_entry()?;
        Ok(cl.family != 0 && cl.fence_ns != 0 && kernel_ns(Instant::now()) > cl.fence_ns)
    }

    /// `frame` (untagged Ethernet, its inner packet of `family`, of key
    /// `key` and arrived on `vlan`) encapsulated for `owner`, an instance
    /// on another host, byte for byte as the XDP program sends it (see
    /// `cluster::to_host` there): for a punted frame whose unit the store
    /// gives to another host. `None` where the program would drop it: no
    /// cluster, fenced, not a remote instance, no next hop, too big.
    pub fn encapsulate(
        &self,
        frame: &[u8],
        owner: u32,
        key: u32,
        family: u8,
        vlan: u16,
    ) -> Result<Option<Vec<u8>>, DatapathError> {
        use sluice_common::{encap, parse::ETH_HLEN};
        let cl = self.cluster_entry()?;
        if cl.family == 0 || self.is_fenced()? {
            return Ok(None);
        }
        let instances: Array<&MapData, InstanceEntry> = self.map(names::INSTANCES)?;
        let inst = instances
            .get(&owner, 0)
            .map_err(map_err(names::INSTANCES))?;
        let hosts: Array<&MapData, RemoteHost> = self.map(names::REMOTE_HOSTS)?;
        let Ok(host) = hosts.get(&inst.host, 0) else {
            return Ok(None);
        };
        let inner = frame.get(ETH_HLEN..).unwrap_or_default();
        let outer_len = encap::outer_len(cl.family);
        if inst.flags & INSTANCE_REMOTE == 0
            || host.next_hop == [0; 6]
            || inner.len() + outer_len > usize::from(cl.mtu)
        {
            return Ok(None);
        }
        let (Ok(target), Ok(len)) = (u16::try_from(owner), u16::try_from(inner.len())) else {
            return Ok(None);
        };
        let t = encap::Tunnel {
            src: cl.underlay,
            dst: host.underlay,
            sport: encap::source_port(key),
            dport: u16::from_be(cl.port_be),
        };
        let g = encap::Gue {
            inner_family: family,
            target,
            vlan,
            previous: 0,
        };
        let mut out = Vec::with_capacity(ETH_HLEN + outer_len + inner.len());
        out.extend_from_slice(&host.next_hop);
        out.extend_from_slice(&cl.mac);
        if cl.family == FAMILY_V4 {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            out.extend_from_slice(&encap::outer_v4(&t, len, &g));
        } else {
            out.extend_from_slice(&0x86DDu16.to_be_bytes());
            out.extend_from_slice(&encap::outer_v6(&t, len, &g));
        }
        out.extend_from_slice(inner);
        Ok(Some(out))
    }

    fn cluster_entry(&self) -> Result<ClusterEntry, DatapathError> {
        let map = self.cluster.lock().expect("cluster map lock");
        map.get(&0, 0).map_err(map_err(names::CLUSTER))
    }

    /// Another host of the cluster, at `index` (`1..=MAX_HOSTS`).
    pub fn set_remote_host(&mut self, index: u32, host: RemoteHost) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, RemoteHost> = self.map_mut(names::REMOTE_HOSTS)?;
        map.set(index, host, 0)
            .map_err(map_err(names::REMOTE_HOSTS))
    }

    /// The underlay addresses encapsulated packets are taken from: exactly
    /// `members` from now on.
    pub fn set_members(&mut self, members: &[MemberKey]) -> Result<(), DatapathError> {
        let mut map: HashMap<&mut MapData, MemberKey, u32> = self.map_mut(names::MEMBERS)?;
        let stale: Vec<MemberKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !members.contains(k))
            .collect();
        for k in &stale {
            map.remove(k).map_err(map_err(names::MEMBERS))?;
        }
        for (i, k) in (1..).zip(members) {
            map.insert(k, i, 0).map_err(map_err(names::MEMBERS))?;
        }
        Ok(())
    }

    /// Where instance `id`'s sockets are looked up for the second chance:
    /// the id of its network namespace relative to the NIC's (`u32::MAX`:
    /// the NIC's own); `None`: nowhere.
    pub fn set_instance_netns(
        &mut self,
        id: u32,
        netns_id: Option<u32>,
    ) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            e.netns_id = netns_id.unwrap_or(u32::MAX);
            if netns_id.is_some() {
                e.flags |= INSTANCE_LOOKUP;
            } else {
                e.flags &= !INSTANCE_LOOKUP;
            }
        })
    }

    /// Instance `id` of service `service_id` runs on remote host `host`
    /// (an index of [`Self::set_remote_host`]): its packets are
    /// encapsulated and sent there while `live`.
    pub fn set_remote_instance(
        &mut self,
        id: u32,
        service_id: u32,
        host: u32,
        live: bool,
    ) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            e.service_id = service_id;
            e.host = host;
            e.mac = [0; 6];
            e.flags = INSTANCE_REMOTE | if live { INSTANCE_LIVE } else { 0 };
        })
    }

    /// Registers the agent's `AF_XDP` socket `fd` for receive queue `queue`:
    /// from now on, packets of unowned units on that queue are punted to it.
    pub fn set_punt_socket(
        &mut self,
        queue: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DatapathError> {
        let mut map: aya::maps::XskMap<&mut MapData> = self.map_mut(names::PUNT)?;
        map.set(queue, fd, 0).map_err(map_err(names::PUNT))
    }

    /// The `TIERS` entry of origin rule `rule` of service `service_id`.
    fn tier_index(&self, service_id: u32, rule: u32) -> Result<u32, DatapathError> {
        self.tiers
            .get(&(service_id, rule))
            .copied()
            .ok_or(DatapathError::UnknownTier { service_id, rule })
    }
}

impl Datapath for XdpDatapath {
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError> {
        // Plain stores into the mapped arrays: no syscall a unit. A unit
        // that changes hands remembers its previous owner, for the second
        // chance of the connections still there.
        let t = Instant::now();
        let moved_at = coarse_secs();
        for unit in group.units() {
            let i = owner_index(service_id, unit);
            let old = self.owners.get(i);
            if old != owner && old != NO_OWNER {
                self.previous.set_wide(i, previous_entry(old, moved_at));
            }
            self.owners.set(i, owner);
        }
        crate::telemetry::map_write(t.elapsed().as_secs_f64());
        Ok(())
    }

    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.owners.get(owner_index(service_id, unit))
    }

    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            if live {
                e.flags |= INSTANCE_LIVE;
            } else {
                e.flags &= !INSTANCE_LIVE;
            }
        })
    }

    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.set_deliver(id, ifindex)?;
        self.update_instance(id, |e| e.mac = mac)
    }

    // The counters are read in `counters`.
    fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        self.sum_global_counters()
    }

    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        self.sum_service_counters(id)
    }

    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        self.sum_instance_counters(id)
    }

    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError> {
        let t = self.tier_index(service_id, rule)?;
        let map: Array<&MapData, Tier> = self.map(names::TIERS)?;
        map.get(&t, 0).map_err(map_err(names::TIERS))
    }

    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError> {
        let t = self.tier_index(service_id, rule)?;
        let mut map: Array<&mut MapData, Tier> = self.map_mut(names::TIERS)?;
        map.set(t, tier, 0).map_err(map_err(names::TIERS))
    }

    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        self.sum_unit_hits(id)
    }

    fn set_fence(&mut self, until: Option<Instant>) -> Result<(), DatapathError> {
        Self::set_fence(self, until)
    }
}
