//! Steering a packet of a service: from its key and unit to the owner it
//! is delivered to, sent to on another host, or punted to the agent.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use sluice_common::{
    counters,
    encap::{self, Gue},
    hit_index,
    maps::{
        INSTANCE_REMOTE, InstanceEntry, PIN_TCP, PIN_UDP, PROTO_TCP, ServiceCounters, ServiceEntry,
    },
    parse::{self, Flow, Frame},
    unit_of,
};

use crate::{
    XDP_REDIRECT_ACTION,
    cluster::{fenced, to_host},
    count::{bump, count},
    frame::XdpFrame,
    lookup::{live_instance, local_live, unit_owner},
    maps::{DELIVER, GLOBAL_COUNTERS, INSTANCE_COUNTERS, PUNT, SERVICE_COUNTERS, UNIT_HITS},
    origin::tier_owner,
    pins::{SecondChance, pinned_owner, second_chance},
};

/// A packet of a service, arrived from a client (`peer` none) or
/// decapsulated from a cluster member (`peer`: what its GUE header said).
#[inline(always)]
pub(crate) fn steer(
    frame: &mut XdpFrame,
    flow: &Flow,
    svc: &ServiceEntry,
    peer: Option<Gue>,
) -> (u32, u32) {
    let keyed = key_for(frame, flow, svc);
    let unit = unit_of(keyed.key);
    let bytes = frame.size() as u64;

    let sc = if cfg!(feature = "exp-no-counters") {
        None
    } else {
        SERVICE_COUNTERS.get_ptr_mut(svc.id)
    };
    // Counted where the packet entered the cluster, once.
    if peer.is_none() {
        count_arrival(sc, keyed, flow.icmp, bytes);
    }

    let pin_kind = if flow.proto == PROTO_TCP {
        PIN_TCP
    } else {
        PIN_UDP
    };
    // A client of an SLA origin rule: its tier's slot, not the unit's owner.
    let tier = tier_owner(flow, svc, unit, peer);
    let (owner, instance, of_unit) = if let Some(g) = peer {
        let Some((owner, i, of_unit)) = peer_owner(g, svc.id, unit) else {
            return (XDP_DROP, counters::DECAP_STALE);
        };
        (owner, Some(i), of_unit)
    } else if svc.flags & pin_kind != 0 && !cfg!(feature = "exp-no-pins") {
        pinned_owner(flow, svc, unit, tier, sc)
    } else {
        let owner = tier.unwrap_or_else(|| unit_owner(svc.id, unit));
        (owner, live_instance(owner, svc.id), tier.is_none())
    };
    let Some(instance) = instance else {
        // An error about a flow nobody holds claims nothing: to the kernel.
        if flow.icmp {
            count(sc, |c| c.unowned += 1);
            return (XDP_PASS, counters::UNOWNED);
        }
        // No live owner: to the agent, which claims the unit and re-injects
        // the packet. With no socket on this queue, to the kernel.
        if of_unit {
            bump(&UNIT_HITS, hit_index(svc.id, unit));
        }
        count(sc, |c| c.unowned += 1);
        return match PUNT.redirect(frame.rx_queue, u64::from(XDP_PASS)) {
            Ok(action) => (action, counters::PUNTED),
            Err(_) => (XDP_PASS, counters::UNOWNED),
        };
    };
    // A fenced host's table is stale (the others took its units): it
    // neither delivers nor sends on, not even what another host sent it.
    if fenced() {
        return (XDP_DROP, counters::FENCED);
    }
    if instance.flags & INSTANCE_REMOTE != 0 {
        // Its hits are counted where it is delivered.
        return to_host(frame, flow, instance, owner, keyed.key, 0);
    }
    // A connection the unit's owner has no socket for, whose unit moved
    // here lately: its second chance is the previous owner (it may have
    // entered by another host than before, one without its pin). Not for
    // a tier's packet, which does not follow the unit: it stays in its
    // subset; nor for one that had its second chance already.
    let had = tier.is_some() || peer.is_some_and(|g| g.previous == encap::SECOND_CHANCE);
    let (owner, instance) = match second_chance(frame, flow, svc, unit, owner, instance, had) {
        SecondChance::Here => (owner, instance),
        SecondChance::Local(prev, p) => (prev, p),
        SecondChance::Remote(prev, p) => {
            return to_host(frame, flow, p, prev, keyed.key, encap::SECOND_CHANCE);
        }
    };
    // A unit's hits are the load that moves with it: a packet held by a pin
    // to another instance is that instance's load, not the unit's (nor is
    // an ICMP error any load).
    if of_unit && !flow.icmp {
        bump(&UNIT_HITS, hit_index(svc.id, unit));
    }

    let ic = if cfg!(feature = "exp-no-counters") {
        None
    } else {
        INSTANCE_COUNTERS.get_ptr_mut(owner)
    };
    // Lookup failure returns the low bits of the flags: XDP_PASS.
    let redirect = if cfg!(feature = "exp-no-redirect") {
        Ok(XDP_REDIRECT_ACTION)
    } else {
        DELIVER.redirect(owner, u64::from(XDP_PASS))
    };
    let Ok(action) = redirect else {
        count(sc, |c| c.redirect_failed += 1);
        count(ic, |c| c.redirect_failed += 1);
        return (XDP_PASS, counters::REDIRECT_FAILED);
    };
    // The redirect happens after we return, so the frame may still change.
    // The instance's veth carries untagged frames only.
    if flow.vlan_tagged && !frame.pop_vlan() {
        return (XDP_PASS, counters::PASS_TRUNCATED);
    }
    if !frame.set_dst_mac(instance.mac) {
        return (XDP_PASS, counters::PASS_TRUNCATED);
    }
    count(ic, |c| {
        c.packets += 1;
        c.bytes += bytes;
    });
    if peer.is_some() {
        return (action, counters::DECAP_DELIVERED);
    }
    count(sc, |c| c.delivered += 1);
    (action, counters::DELIVERED)
}

/// A service's packet as it arrives from a client: its service's packets
/// and bytes, and whether its tag made it; an ICMP error, globally.
#[inline(always)]
fn count_arrival(sc: Option<*mut ServiceCounters>, keyed: parse::Keyed, icmp: bool, bytes: u64) {
    count(sc, |c| {
        c.packets += 1;
        c.bytes += bytes;
        if keyed.tagged {
            c.tagged += 1;
        }
        if keyed.tag_missing {
            c.tag_missing += 1;
        }
    });
    if keyed.tag_missing {
        bump(&GLOBAL_COUNTERS, counters::TAG_MISSING);
    }
    if icmp {
        bump(&GLOBAL_COUNTERS, counters::ICMP_ERROR);
    }
}

/// Who takes a packet another host sent: the sender's choice, if it is a
/// live instance of this host; else this host's owner of the unit, if that
/// is one; else none. Never sent on: a packet does not loop between hosts
/// whose tables disagree.
#[inline(always)]
fn peer_owner(g: Gue, service_id: u32, unit: u32) -> Option<(u32, &'static InstanceEntry, bool)> {
    let target = u32::from(g.target);
    if let Some(i) = local_live(target, service_id) {
        return Some((target, i, target == unit_owner(service_id, unit)));
    }
    let owner = unit_owner(service_id, unit);
    local_live(owner, service_id).map(|i| (owner, i, true))
}

/// The packet's key (the experiment `exp-no-key-hash` takes the ports
/// word as it is).
#[inline(always)]
fn key_for(frame: &XdpFrame, flow: &Flow, svc: &ServiceEntry) -> parse::Keyed {
    if cfg!(feature = "exp-no-key-hash") {
        return parse::Keyed {
            key: flow.ports,
            tagged: false,
            tag_missing: false,
        };
    }
    parse::key_for(frame, flow, svc)
}
