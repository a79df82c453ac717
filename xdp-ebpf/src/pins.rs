//! A connection stays with its instance while its unit moves: pinned
//! flows, and the second chance of a TCP connection the new owner has no
//! socket for.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use sluice_common::{
    counters,
    maps::{
        INSTANCE_LOOKUP, INSTANCE_REMOTE, InstanceEntry, NO_OWNER, PROTO_TCP, Pin, ServiceCounters,
        ServiceEntry, previous_parts,
    },
    owner_index,
    parse::Flow,
};

use crate::{
    count::{bump, count},
    frame::XdpFrame,
    lookup::{live_instance, unit_owner},
    maps::{GLOBAL_COUNTERS, PINNED, PREVIOUS},
};

/// Where a packet for a local `owner` goes: there, or, for a TCP packet of
/// a connection the owner has no socket for while the unit's previous
/// owner (moved away less than the service's pin idle time ago) is live,
/// to the previous owner.
pub(crate) enum SecondChance {
    Here,
    Local(u32, &'static InstanceEntry),
    Remote(u32, &'static InstanceEntry),
}

/// `settled`: the packet stays with `owner` whatever (see the caller).
#[inline(always)]
pub(crate) fn second_chance(
    frame: &XdpFrame,
    flow: &Flow,
    svc: &ServiceEntry,
    unit: u32,
    owner: u32,
    instance: &InstanceEntry,
    settled: bool,
) -> SecondChance {
    const TCP_SYN: u8 = 0x02;
    if settled
        || flow.proto != PROTO_TCP
        || flow.tcp_flags & TCP_SYN != 0
        || instance.flags & INSTANCE_LOOKUP == 0
    {
        return SecondChance::Here;
    }
    let Some(&entry) = PREVIOUS.get(owner_index(svc.id, unit)) else {
        return SecondChance::Here;
    };
    let (prev, moved_at) = previous_parts(entry);
    if prev == NO_OWNER || prev == owner {
        return SecondChance::Here;
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "seconds in 32 bits wrap after 136 years"
    )]
    // SAFETY: helper without arguments.
    let now_secs = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    if now_secs.wrapping_sub(moved_at) > svc.pin_idle_secs {
        return SecondChance::Here;
    }
    if frame.has_connection(flow, instance.netns_id) {
        return SecondChance::Here;
    }
    let Some(p) = live_instance(prev, svc.id) else {
        return SecondChance::Here;
    };
    bump(&GLOBAL_COUNTERS, counters::SECOND_CHANCE);
    if p.flags & INSTANCE_REMOTE != 0 {
        SecondChance::Remote(prev, p)
    } else {
        SecondChance::Local(prev, p)
    }
}

/// Owner of a flow of a pinning service, with its entry if live, and
/// whether it is the unit's owner: the pin's owner while the pin is fresh
/// and its owner live, else the unit's owner (or `tier`'s, an origin
/// rule's choice), pinned from now on. A TCP SYN starts a new connection:
/// it follows the unit's owner and replaces any pin an earlier connection
/// on the same 5-tuple left (clients reuse ports). An ICMP error about
/// the flow follows its pin but neither makes one nor counts one lost.
#[inline(always)]
pub(crate) fn pinned_owner(
    flow: &Flow,
    svc: &ServiceEntry,
    unit: u32,
    tier: Option<u32>,
    sc: Option<*mut ServiceCounters>,
) -> (u32, Option<&'static InstanceEntry>, bool) {
    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;
    let key = flow.pin_key();
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let idle_ns = u64::from(svc.pin_idle_secs) * 1_000_000_000;
    let tcp = flow.proto == PROTO_TCP;
    let new_connection = tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if new_connection {
        // Not looked up: whatever pin is there is replaced below.
    } else if let Some(pin) = PINNED.get_ptr_mut(key) {
        // SAFETY: the value stays valid for this run; a racing update of
        // `last_seen_ns` from another CPU is benign.
        let pin = unsafe { &mut *pin };
        if now.wrapping_sub(pin.last_seen_ns) <= idle_ns
            && let Some(instance) = live_instance(pin.owner, svc.id)
            && instance.generation == pin.generation
        {
            pin.last_seen_ns = now;
            count(sc, |c| c.pin_hits += 1);
            let of_unit = tier.is_none() && pin.owner == unit_owner(svc.id, unit);
            return (pin.owner, Some(instance), of_unit);
        }
        count(sc, |c| c.pins_expired += 1);
    } else if tcp && flow.tcp_flags & TCP_SYN == 0 && !flow.icmp {
        count(sc, |c| c.pins_lost += 1);
    }
    let owner = tier.unwrap_or_else(|| unit_owner(svc.id, unit));
    let instance = live_instance(owner, svc.id);
    // An ICMP error follows a pin, never makes one.
    if let Some(i) = instance
        && !flow.icmp
    {
        let pin = Pin {
            owner,
            generation: i.generation,
            pad: 0,
            last_seen_ns: now,
        };
        if PINNED.insert(key, pin, 0).is_ok() {
            count(sc, |c| c.pins_created += 1);
        }
    }
    (owner, instance, tier.is_none())
}
