//! The plan: a checked config turned into exactly what goes into the maps —
//! dense ids, service keys, resolved interfaces and the initial groups
//! ([`group`]: work unit groups and the even initial assignment).
//!
//! May import `config` and `sys`; nothing above it.

pub mod group;
pub mod ids;

use std::{net::IpAddr, path::PathBuf};

use sluice_common::{
    key,
    maps::{
        FAMILY_V4, FAMILY_V6, ORIGIN_RULES, PIN_TCP, PIN_UDP, SPILL, ServiceEntry, ServiceKey,
        TAG_IPV6_FLOW_LABEL, TAG_NONE, TAG_QUIC_CID, TAG_UDP_PAYLOAD, Tier,
    },
    owner_index, unit_of,
};

pub use self::group::{Group, UnitTable};
use crate::{
    config::{Config, Instance, PinMode, Service, TagSpec},
    sys::link::{self, LinkError},
};

/// An instance as the data path sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstancePlan {
    /// Dense id, from 1 (0 means "no owner").
    pub id: u32,
    pub name: String,
    pub service_id: u32,
    /// Host-side veth the DEVMAP redirects into.
    pub ifindex: u32,
    /// Destination MAC written into delivered frames.
    pub mac: [u8; 6],
    /// The instance's network namespace, where its socket statistics are
    /// read; unknown when the config gives `mac` without `netns`.
    pub netns: Option<PathBuf>,
    /// Whether the data path may deliver to it (a reload keeps a failed
    /// instance out until it recovers).
    pub live: bool,
    /// Id of its network namespace relative to the NIC's (`u32::MAX`: the
    /// NIC's own), where the data path looks its sockets up; `None`:
    /// unknown, no lookup.
    pub netns_id: Option<u32>,
}

/// An instance on another host of the cluster: its packets are
/// encapsulated and sent there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePlan {
    /// Cluster-wide id.
    pub id: u32,
    pub name: String,
    pub service_id: u32,
    /// The host it runs on.
    pub host: String,
}

/// What the host says of an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub netns: Option<PathBuf>,
    /// See [`InstancePlan::netns_id`].
    pub netns_id: Option<u32>,
}

/// An SLA origin rule as the data path needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPlan {
    pub name: String,
    /// Source prefixes: (network, length).
    pub prefixes: Vec<(IpAddr, u8)>,
    /// The subset's instance ids, in config order.
    pub instances: Vec<u32>,
    pub spill: bool,
}

impl OriginPlan {
    /// The rule's starting tier: its subset's instances for which `live`
    /// holds, round robin over the slots; with none, every slot spills
    /// over (with `spill`) or has nobody.
    #[must_use]
    pub fn tier(&self, live: impl Fn(u32) -> bool) -> Tier {
        let live: Vec<u32> = self
            .instances
            .iter()
            .copied()
            .filter(|i| live(*i))
            .collect();
        let mut tier = Tier::default();
        for (k, slot) in tier.slots.iter_mut().enumerate() {
            *slot = match (live.get(k % live.len().max(1)), self.spill) {
                (Some(id), _) => *id,
                (None, true) => SPILL,
                (None, false) => sluice_common::maps::NO_OWNER,
            };
        }
        tier
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    /// Dense id, from 0.
    pub id: u32,
    pub name: String,
    /// One service-map key per port.
    pub keys: Vec<ServiceKey>,
    pub entry: ServiceEntry,
    /// Each group of the service and the instance id that owns it.
    pub groups: Vec<(Group, u32)>,
    /// `groups` were read back from a pinned data path's owner array
    /// (the store had lost them), not made even.
    pub groups_from_pins: bool,
    /// SLA origin rules, in config order (a rule's index names its tier).
    pub origins: Vec<OriginPlan>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    pub instances: Vec<InstancePlan>,
    /// Instances of the same services on other hosts (a cluster's).
    pub remote: Vec<RemotePlan>,
    /// Capacity of the pinned-flow map.
    pub pinned_flows: u32,
    /// MACs the data path steers frames for: the configured ones here; the
    /// agent adds its interface's own ([`Self::add_host_mac`]).
    pub host_macs: Vec<[u8; 6]>,
}

/// Failure to resolve an instance's interface.
#[derive(Debug, thiserror::Error)]
#[error("instance `{instance}` (`{field}`)")]
pub struct ResolveError {
    pub instance: String,
    /// Config field the operator should look at.
    pub field: String,
    #[source]
    pub source: LinkError,
}

/// Ifindex, MAC and namespace of an instance, from the host's interfaces.
pub fn resolve_instance(inst: &Instance, field: &str) -> Result<Resolved, ResolveError> {
    let wrap = |field: String| {
        move |source| ResolveError {
            instance: inst.name.clone(),
            field,
            source,
        }
    };
    let ifindex = link::ifindex(&inst.veth).map_err(wrap(format!("{field}.veth")))?;
    let named = inst.netns.as_deref().map(crate::sys::netns::named);
    let (mac, netns) = if let Some(mac) = inst.mac {
        (mac, named)
    } else {
        let (mac, path) =
            link::discover_peer_mac(&inst.veth, inst.netns.as_deref()).map_err(|e| {
                // A namespace that cannot be entered is the `netns` field's
                // fault; a peer not found is fixed by giving `mac`.
                let which = if matches!(e, LinkError::Netns { .. }) {
                    "netns"
                } else {
                    "mac"
                };
                wrap(format!("{field}.{which}"))(e)
            })?;
        (mac, Some(path))
    };
    // The peer's namespace, as the NIC's namespace numbers it; the peer in
    // this one (`None` from rtnetlink): the NIC's own.
    let netns_id = link::peer_netns_id(&inst.veth)
        .ok()
        .map(|id| id.unwrap_or(u32::MAX));
    Ok(Resolved {
        ifindex,
        mac,
        netns,
        netns_id,
    })
}

/// An address as the data path's words (IPv4: word 0 only), with its
/// family (`FAMILY_V4`/`FAMILY_V6`).
#[must_use]
pub fn addr_words(a: IpAddr) -> ([u32; 4], u8) {
    match a {
        IpAddr::V4(a) => ([key::host::v4(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => (key::host::v6(a.octets()), FAMILY_V6),
    }
}

/// Service-map key for a VIP, port, protocol number and VLAN (0: none).
#[must_use]
pub fn service_key(vip: IpAddr, port: u16, proto: u8, vlan: u16) -> ServiceKey {
    let (addr, family) = addr_words(vip);
    ServiceKey {
        addr,
        port_be: port.to_be(),
        proto,
        family,
        vlan,
        pad: 0,
    }
}

/// The origin rules of `svc`, whose instances have `ids` (config order).
fn origin_plans(svc: &Service, ids: &[u32]) -> Vec<OriginPlan> {
    let id_of = |name: &String| {
        svc.instances
            .iter()
            .zip(ids)
            .find(|(i, _)| &i.name == name)
            .map(|(_, id)| *id)
    };
    svc.origins
        .iter()
        .map(|r| OriginPlan {
            name: r.name.clone(),
            prefixes: r.prefixes.clone(),
            instances: r.instances.iter().filter_map(id_of).collect(),
            spill: r.spill,
        })
        .collect()
}

impl Plan {
    /// Builds the plan with ids in config order; `resolve` gives each
    /// instance's ifindex and MAC (the agent asks the host, tests hand in
    /// their own).
    pub fn build<E>(
        config: &Config,
        resolve: impl FnMut(&Instance, &str) -> Result<Resolved, E>,
    ) -> Result<Self, E> {
        Self::build_with_ids(config, &[], resolve)
    }

    /// As [`Self::build`], each instance keeping the id `registered`
    /// (id, name) gives its name ([`ids::assign`]).
    pub fn build_with_ids<E>(
        config: &Config,
        registered: &[(u32, String)],
        mut resolve: impl FnMut(&Instance, &str) -> Result<Resolved, E>,
    ) -> Result<Self, E> {
        let names: Vec<&str> = config
            .services
            .iter()
            .flat_map(|s| &s.instances)
            .map(|i| i.name.as_str())
            .collect();
        let mut ids = ids::assign(registered, &names).into_iter();
        let mut plan = Self {
            pinned_flows: config.agent.pinned_flows,
            host_macs: config.agent.host_macs.clone(),
            ..Self::default()
        };
        for (sid, svc) in config.services.iter().enumerate() {
            let id = u32::try_from(sid).expect("at most MAX_SERVICES services");
            let (tag_kind, tag_offset, tag_len, quic_cid_len) = match svc.tag {
                TagSpec::None => (TAG_NONE, 0, 0, 0),
                TagSpec::UdpPayload { offset, length } => (TAG_UDP_PAYLOAD, offset, length, 0),
                TagSpec::Ipv6FlowLabel => (TAG_IPV6_FLOW_LABEL, 0, 0, 0),
                TagSpec::QuicCid {
                    cid_length,
                    offset,
                    length,
                } => (TAG_QUIC_CID, offset, length, cid_length),
            };
            let mut service_ids: Vec<u32> = Vec::with_capacity(svc.instances.len());
            for (j, inst) in svc.instances.iter().enumerate() {
                let r = resolve(inst, &format!("service[{sid}].instance[{j}]"))?;
                let instance_id = ids.next().expect("one id a name");
                service_ids.push(instance_id);
                plan.instances.push(InstancePlan {
                    id: instance_id,
                    name: inst.name.clone(),
                    service_id: id,
                    ifindex: r.ifindex,
                    mac: r.mac,
                    netns: r.netns,
                    live: true,
                    netns_id: r.netns_id,
                });
            }
            let origins = origin_plans(svc, &service_ids);
            // Instances reserved for priority requests or origin rules own
            // no units.
            let owners: Vec<u32> = svc
                .instances
                .iter()
                .zip(service_ids)
                .filter(|(i, _)| !svc.is_reserved(&i.name))
                .map(|(_, id)| id)
                .collect();
            let groups = if svc.on_demand || owners.is_empty() {
                vec![(Group::ALL, sluice_common::maps::NO_OWNER)]
            } else {
                group::even(owners.len())
                    .into_iter()
                    .zip(owners)
                    .flat_map(|(gs, owner)| gs.into_iter().map(move |g| (g, owner)))
                    .collect()
            };
            plan.services.push(ServicePlan {
                id,
                name: svc.name.clone(),
                // An http service's packets are not the XDP program's: they
                // pass to the host's TCP stack, where the L7 distributor
                // listens.
                keys: if svc.http.is_some() {
                    Vec::new()
                } else {
                    svc.endpoints()
                        .map(|(vip, port, proto)| service_key(vip, port, proto.number(), svc.vlan))
                        .collect()
                },
                entry: ServiceEntry {
                    id,
                    tag_kind,
                    tag_offset,
                    tag_len,
                    flags: match svc.pin {
                        PinMode::None => 0,
                        PinMode::Tcp => PIN_TCP,
                        PinMode::TcpUdp => PIN_TCP | PIN_UDP,
                    } | if origins.is_empty() { 0 } else { ORIGIN_RULES },
                    pin_idle_secs: svc.pin_idle_secs,
                    quic_cid_len,
                    reserved: 0,
                },
                groups,
                groups_from_pins: false,
                origins,
            });
        }
        Ok(plan)
    }

    /// The id of service `name`.
    #[must_use]
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.iter().find(|s| s.name == name).map(|s| s.id)
    }

    /// Owner of every unit of service `service_id`.
    #[must_use]
    pub fn unit_table(&self, service_id: u32) -> UnitTable {
        UnitTable::from_groups(
            self.services[service_id as usize]
                .groups
                .iter()
                .map(|(g, o)| (g, *o)),
        )
    }

    /// The instance the agent expects a packet with `key` of `service_id`
    /// to reach.
    #[must_use]
    pub fn owner_of_key(&self, service_id: u32, key: u32) -> u32 {
        let unit = unit_of(key);
        self.services[service_id as usize]
            .groups
            .iter()
            .find(|(g, _)| g.contains(unit))
            .map_or(sluice_common::maps::NO_OWNER, |(_, o)| *o)
    }

    /// Starts service `service_id` from the owners a pinned data path holds
    /// (`owners[u]`: unit `u`'s owner id), when they make sense for it:
    /// each is unowned or an instance of this service, and some unit has
    /// one. Returns whether it did.
    pub fn take_pinned_owners(&mut self, service_id: u32, owners: &[u32]) -> bool {
        let ours = |o: u32| {
            o == sluice_common::maps::NO_OWNER
                || self
                    .instances
                    .iter()
                    .any(|i| i.id == o && i.service_id == service_id)
        };
        if owners.len() != sluice_common::UNITS_PER_SERVICE as usize
            || !owners.iter().all(|&o| ours(o))
            || owners.iter().all(|&o| o == sluice_common::maps::NO_OWNER)
        {
            return false;
        }
        let s = &mut self.services[service_id as usize];
        s.groups = group::coalesce(owners);
        s.groups_from_pins = true;
        true
    }

    /// Steers frames for `mac` too (first, so it is never the one dropped
    /// for want of a slot; the config allows one fewer than the slots).
    pub fn add_host_mac(&mut self, mac: [u8; 6]) {
        if !self.host_macs.contains(&mac) {
            self.host_macs.insert(0, mac);
        }
    }

    #[must_use]
    pub fn instance(&self, id: u32) -> Option<&InstancePlan> {
        self.instances.iter().find(|i| i.id == id)
    }

    /// Every origin rule's (service id, rule index) and the rule.
    pub fn origin_rules(&self) -> impl Iterator<Item = (u32, u32, &OriginPlan)> {
        self.services
            .iter()
            .flat_map(|s| (0..).zip(&s.origins).map(move |(k, r)| (s.id, k, r)))
    }

    /// Entries the owner array needs.
    #[must_use]
    pub fn owner_entries(&self) -> u32 {
        owner_index(u32::try_from(self.services.len()).expect("bounded"), 0).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_subset_instances_own_no_units() {
        let config = crate::config::tests::parse(
            r#"
[[service]]
name = "kv"
vip = "198.18.0.100"
port = 7000
protocol = "udp"

[[service.origin]]
name = "gold"
prefixes = ["198.18.5.0/24"]
instances = ["kv-2"]

[[service.instance]]
name = "kv-0"
veth = "i0"
mac = "02:00:00:00:00:01"

[[service.instance]]
name = "kv-1"
veth = "i1"
mac = "02:00:00:00:00:02"

[[service.instance]]
name = "kv-2"
veth = "i2"
mac = "02:00:00:00:00:03"
"#,
        )
        .unwrap();
        let plan = Plan::build(&config, |i, _| {
            Ok::<_, std::convert::Infallible>(Resolved {
                ifindex: 1,
                mac: i.mac.unwrap(),
                netns: None,
                netns_id: None,
            })
        })
        .unwrap();
        let owners: std::collections::HashSet<u32> =
            plan.services[0].groups.iter().map(|(_, o)| *o).collect();
        assert_eq!(owners, [1, 2].into(), "kv-2 (id 3) is reserved");
    }

    #[test]
    fn a_missing_netns_is_blamed_on_the_netns_field() {
        // Defect: it was reported against `mac`.
        let inst = Instance {
            name: "a".into(),
            veth: "lo".into(),
            mac: None,
            netns: Some("sluice-no-such-netns".into()),
            cgroup: None,
            cpu_limit: None,
            health: crate::config::HealthCheck::default(),
            addr: None,
        };
        let e = resolve_instance(&inst, "service[0].instance[2]").unwrap_err();
        assert_eq!(e.field, "service[0].instance[2].netns");
        assert!(
            format!("{:?}", e.source).contains("sluice-no-such-netns"),
            "{e:?}"
        );
    }
}
