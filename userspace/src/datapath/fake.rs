//! Data paths for unit tests of the control loop, without a kernel:
//! [`MemDatapath`] keeps the owner table and the counters in memory (tests
//! drive traffic into it with [`MemDatapath::deliver`]), and [`Faulty`]
//! wraps any data path and makes one chosen kind of write fail once.

use std::{
    collections::{BTreeMap, HashMap},
    io,
};

use aya::{maps::MapError, sys::SyscallError};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE, UNITS_PER_SERVICE, hit_index,
    maps::{InstanceCounters, MemberKey, NO_OWNER, RemoteHost, ServiceCounters, Tier, names},
};

use super::{ClusterTables, Datapath, DatapathError, GlobalCounters};
use crate::plan::Group;

/// An in-memory data path: what the XDP program would hold, and what it
/// would count if packets of the given units arrived.
#[derive(Debug, Default)]
pub(crate) struct MemDatapath {
    /// Service -> each unit's owner (`NO_OWNER` until written): a vector,
    /// so whole-service writes stay cheap in the simulation.
    owners: HashMap<u32, Vec<u32>>,
    /// Instances marked not live.
    dead: std::collections::HashSet<u32>,
    /// Where each re-pointed instance now goes: (ifindex, MAC).
    pub(crate) targets: HashMap<u32, (u32, [u8; 6])>,
    global: GlobalCounters,
    services: HashMap<u32, ServiceCounters>,
    instances: HashMap<u32, InstanceCounters>,
    hits: HashMap<u32, u64>,
    /// (service, rule) -> its tier; absent: every slot `NO_OWNER`.
    pub(crate) tiers: HashMap<(u32, u32), Tier>,
    /// The fence deadline last set ([`Datapath::set_fence`]).
    fence: Option<std::time::Instant>,
    /// The cluster tables ([`ClusterTables`]): other hosts by slot, the
    /// members whose encapsulated packets are taken, and each other
    /// host's instance as (service, host slot, live).
    pub(crate) remote_hosts: BTreeMap<u32, RemoteHost>,
    pub(crate) members: Vec<MemberKey>,
    pub(crate) remote_instances: BTreeMap<u32, (u32, u32, bool)>,
}

impl MemDatapath {
    /// As if `n` packets of `unit` of service `service_id` arrived: counted
    /// against the unit, and delivered to its owner if it has a live one.
    pub(crate) fn deliver(&mut self, service_id: u32, unit: u32, n: u64) {
        let owner = self.owner_of_unit(service_id, unit);
        *self.hits.entry(hit_index(service_id, unit)).or_default() += n;
        let s = self.services.entry(service_id).or_default();
        s.packets += n;
        if owner != NO_OWNER && !self.dead.contains(&owner) {
            s.delivered += n;
            self.instances.entry(owner).or_default().packets += n;
        } else {
            s.unowned += n;
        }
    }

    pub(crate) fn is_live(&self, id: u32) -> bool {
        !self.dead.contains(&id)
    }

    /// The fence deadline last set: after it, this host delivers nothing
    /// as an owner (`None`: unfenced).
    pub(crate) fn fence(&self) -> Option<std::time::Instant> {
        self.fence
    }

    /// As if `n` packets of `unit` of service `service_id` came in
    /// encapsulated by another host for instance `id` of this host:
    /// delivered to it if it is live, else dropped (`decap_stale`).
    /// Returns whether they were delivered.
    pub(crate) fn deliver_to(&mut self, service_id: u32, unit: u32, id: u32, n: u64) -> bool {
        *self.hits.entry(hit_index(service_id, unit)).or_default() += n;
        let takes = !self.dead.contains(&id) && self.is_local(id);
        let s = self.services.entry(service_id).or_default();
        s.packets += n;
        if !takes {
            return false;
        }
        s.delivered += n;
        self.instances.entry(id).or_default().packets += n;
        true
    }

    /// Whether instance `id` is this host's (not a remote entry).
    fn is_local(&self, id: u32) -> bool {
        !self.remote_instances.contains_key(&id)
    }
}

impl ClusterTables for MemDatapath {
    fn set_remote_host(&mut self, index: u32, host: RemoteHost) -> Result<(), DatapathError> {
        self.remote_hosts.insert(index, host);
        Ok(())
    }

    fn set_members(&mut self, members: &[MemberKey]) -> Result<(), DatapathError> {
        members.clone_into(&mut self.members);
        Ok(())
    }

    fn set_remote_instance(
        &mut self,
        id: u32,
        service_id: u32,
        host: u32,
        live: bool,
    ) -> Result<(), DatapathError> {
        self.remote_instances.insert(id, (service_id, host, live));
        Ok(())
    }
}

impl Datapath for MemDatapath {
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError> {
        let units = self
            .owners
            .entry(service_id)
            .or_insert_with(|| vec![NO_OWNER; UNITS_PER_SERVICE as usize]);
        let base = group.base() as usize;
        units[base..base + group.size() as usize].fill(owner);
        Ok(())
    }

    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.owners
            .get(&service_id)
            .map_or(NO_OWNER, |u| u[unit as usize])
    }

    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError> {
        if live {
            self.dead.remove(&id);
        } else {
            self.dead.insert(id);
        }
        Ok(())
    }

    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.targets.insert(id, (ifindex, mac));
        Ok(())
    }

    fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        Ok(self.global)
    }

    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        Ok(self.services.get(&id).copied().unwrap_or_default())
    }

    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        Ok(self.instances.get(&id).copied().unwrap_or_default())
    }

    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError> {
        Ok(self
            .tiers
            .get(&(service_id, rule))
            .copied()
            .unwrap_or_default())
    }

    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError> {
        self.tiers.insert((service_id, rule), *tier);
        Ok(())
    }

    fn set_fence(&mut self, until: Option<std::time::Instant>) -> Result<(), DatapathError> {
        self.fence = until;
        Ok(())
    }

    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        Ok((0..HIT_BUCKETS_PER_SERVICE)
            .map(|b| {
                self.hits
                    .get(&(id * HIT_BUCKETS_PER_SERVICE + b))
                    .copied()
                    .unwrap_or(0)
            })
            .collect())
    }
}

/// Which call of a [`Faulty`] data path fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::enum_variant_names,
    reason = "each is named after the call that fails"
)]
pub(crate) enum Fault {
    SetGroupOwner,
    SetInstanceLive,
    SetTier,
}

/// A data path whose next call of one kind fails, once, the way a map
/// update fails in the kernel (`ENOMEM`), writing nothing.
#[derive(Debug, Default)]
pub(crate) struct Faulty<D> {
    pub(crate) inner: D,
    armed: Option<Fault>,
    /// Faults delivered so far.
    pub(crate) fired: usize,
}

impl<D> Faulty<D> {
    pub(crate) fn new(inner: D) -> Self {
        Self {
            inner,
            armed: None,
            fired: 0,
        }
    }

    /// The next call of kind `f` fails.
    pub(crate) fn fail_once(&mut self, f: Fault) {
        self.armed = Some(f);
    }

    fn trip(&mut self, f: Fault, map: &'static str) -> Result<(), DatapathError> {
        if self.armed != Some(f) {
            return Ok(());
        }
        self.armed = None;
        self.fired += 1;
        Err(DatapathError::Map {
            name: map,
            source: MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error: io::Error::from_raw_os_error(libc::ENOMEM),
            }),
        })
    }
}

impl<D: Datapath> Datapath for Faulty<D> {
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError> {
        self.trip(Fault::SetGroupOwner, names::OWNERS)?;
        self.inner.set_group_owner(service_id, group, owner)
    }

    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.inner.owner_of_unit(service_id, unit)
    }

    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError> {
        self.trip(Fault::SetInstanceLive, names::INSTANCES)?;
        self.inner.set_instance_live(id, live)
    }

    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.trip(Fault::SetInstanceLive, names::INSTANCES)?;
        self.inner.set_instance_target(id, ifindex, mac)
    }

    fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        self.inner.global_counters()
    }

    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        self.inner.service_counters(id)
    }

    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        self.inner.instance_counters(id)
    }

    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        self.inner.unit_hits(id)
    }

    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError> {
        self.inner.tier(service_id, rule)
    }

    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError> {
        self.trip(Fault::SetTier, names::TIERS)?;
        self.inner.set_tier(service_id, rule, tier)
    }

    fn set_fence(&mut self, until: Option<std::time::Instant>) -> Result<(), DatapathError> {
        self.inner.set_fence(until)
    }
}
