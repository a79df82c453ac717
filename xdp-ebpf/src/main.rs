//! The Sluice XDP program: steer each packet of a service to the instance
//! that owns its work unit. Every step is O(1): one hash lookup for the
//! service, one array load for the owner, one for the instance, and per-CPU
//! counters. Anything that is not a well-formed packet of a service passes to
//! the kernel untouched and is counted by reason.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "BPF-to-BPF calls cost more than inlining, and the verifier tracks packet bounds best within one function"
)]

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, bpf_sock_tuple,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_sk_release, bpf_skc_lookup_tcp, bpf_xdp_adjust_head,
        bpf_xdp_load_bytes,
    },
    macros::{map, xdp},
    maps::{
        Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, XskMap, lpm_trie::Key as LpmKey,
    },
    programs::XdpContext,
};
use sluice_common::{
    DEFAULT_PINNED_FLOWS, HIT_BUCKETS_PER_SERVICE, INSTANCE_SLOTS, MAX_HOSTS, MAX_ORIGIN_PREFIXES,
    MAX_PUNT_QUEUES, MAX_SERVICES, UNITS_PER_SERVICE, counters,
    encap::{self, GUE_LEN, Gue, Tunnel},
    hit_index,
    maps::{
        ClusterEntry, FAMILY_V4, FAMILY_V6, HostEntry, INSTANCE_LIVE, INSTANCE_LOOKUP,
        INSTANCE_REMOTE, InstanceCounters, InstanceEntry, InstanceName, MemberKey, NO_OWNER,
        ORIGIN_RULES, OriginKey, PIN_TCP, PIN_UDP, PROTO_TCP, PROTO_UDP, Pin, PinKey, RemoteHost,
        SPILL, ServiceCounters, ServiceEntry, ServiceKey, ServiceSlot, Tier, mac_word, origin_key,
        previous_parts, tier_slot,
    },
    owner_index,
    parse::{self, ETH_HLEN, Flow, Frame, FromBytes, Pass, VLAN_TAG_LEN},
    unit_of,
};

// Sizes here are upper bounds for the object file; the agent sets the real
// ones at load time from its config, so a small deployment stays small.

/// (VIP, port, protocol, VLAN) -> service: two halves of `mask + 1`
/// slots each (`HOST` says which half is live and the mask), a key in one
/// of its two slots (`ServiceKey::slots`). Two array loads at most, where
/// a hash map would hash the whole key and walk a bucket.
#[map]
static SERVICE_TABLE: Array<ServiceSlot> = Array::with_max_entries(2 * MAX_SERVICES * 4, 0);

/// (service, unit) -> owning instance id, or `NO_OWNER`. Mmapable: the
/// agent rewrites a group's owners with plain stores, not a syscall a unit.
#[map]
static OWNERS: Array<u32> =
    Array::with_max_entries(MAX_SERVICES * UNITS_PER_SERVICE, BPF_F_MMAPABLE);

/// (service, unit) -> the owner before the unit's last move and when (see
/// `maps::previous_entry`): a connection the new owner has no socket for
/// gets its second chance there.
#[map]
static PREVIOUS: Array<u32> =
    Array::with_max_entries(MAX_SERVICES * UNITS_PER_SERVICE, BPF_F_MMAPABLE);

/// Room for the socket lookup's tuple: the program's stack (512 bytes) is
/// spoken for by the parsed headers.
#[map]
static SCRATCH: PerCpuArray<bpf_sock_tuple> = PerCpuArray::with_max_entries(1, 0);

/// This host (entry 0): its MACs — frames for any other MAC are not
/// steered — and the live half of the service table.
#[map]
static HOST: Array<HostEntry> = Array::with_max_entries(1, 0);

/// Instance id -> MAC and liveness.
#[map]
static INSTANCES: Array<InstanceEntry> = Array::with_max_entries(INSTANCE_SLOTS, 0);

/// Instance id -> the instance's name. Never read here: the agent keeps ids
/// with their names in it, pinned with the rest.
#[map]
static INSTANCE_NAMES: Array<InstanceName> = Array::with_max_entries(INSTANCE_SLOTS, 0);

/// Instance id -> host-side veth of the instance.
#[map]
static DELIVER: DevMap = DevMap::with_max_entries(INSTANCE_SLOTS, 0);

#[map]
static GLOBAL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
static SERVICE_COUNTERS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static INSTANCE_COUNTERS: PerCpuArray<InstanceCounters> =
    PerCpuArray::with_max_entries(INSTANCE_SLOTS, 0);

/// Pinned flows: 5-tuple -> the instance it stays with while its unit moves.
/// LRU, so a full table forgets the least recently used flow.
#[map]
static PINNED: LruHashMap<PinKey, Pin> = LruHashMap::with_max_entries(DEFAULT_PINNED_FLOWS, 0);

/// Receive queue -> the agent's `AF_XDP` socket on it: where packets of
/// units without a live owner go (the punt).
#[map]
static PUNT: XskMap = XskMap::with_max_entries(MAX_PUNT_QUEUES, 0);

/// This host in its cluster (entry 0); all zero without a cluster.
#[map]
static CLUSTER: Array<ClusterEntry> = Array::with_max_entries(1, 0);

/// Host index -> another host's underlay address and next hop.
#[map]
static REMOTE_HOSTS: Array<RemoteHost> = Array::with_max_entries(MAX_HOSTS + 1, 0);

/// Underlay addresses of the cluster's hosts: the only sources whose
/// encapsulated packets are taken.
#[map]
static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(MAX_HOSTS + 1, 0);

/// SLA origin rules: (service, source prefix) -> the rule's tier, an index
/// into `TIERS`. Looked up only for services flagged `ORIGIN_RULES`.
#[map]
static ORIGIN: LpmTrie<OriginKey, u32> = LpmTrie::with_max_entries(MAX_ORIGIN_PREFIXES, 0);

/// Tier -> its subset's instance ids over `TIER_SLOTS` slots (or `SPILL`,
/// or `NO_OWNER`): a packet of a rule takes slot `unit % TIER_SLOTS`, one
/// array load. Two halves, so a reload writes its tiers beside the live
/// ones.
#[map]
static TIERS: Array<Tier> = Array::with_max_entries(2 * MAX_ORIGIN_PREFIXES, 0);

/// Per-unit hit counts, `HIT_BUCKETS_PER_SERVICE` coarse buckets a service.
#[map]
static UNIT_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * HIT_BUCKETS_PER_SERVICE, 0);

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
fn sluice_xdp(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame::new(&ctx);
    let (action, counter) = match try_sluice_xdp(&mut frame) {
        Ok(outcome) => outcome,
        Err(pass) => (XDP_PASS, pass.counter()),
    };
    // A delivered packet is counted once, in its service's `delivered`:
    // the agent sums those into the global figure.
    if counter != counters::DELIVERED {
        bump(&GLOBAL_COUNTERS, counter);
    }
    action
}

/// Returns the action and the global counter it is counted under.
#[inline(always)]
fn try_sluice_xdp(frame: &mut XdpFrame) -> Result<(u32, u32), Pass> {
    let mut flow = parse::parse(&*frame)?;
    if cfg!(feature = "exp-parse-only") {
        return Ok((XDP_REDIRECT_ACTION, counters::DELIVERED));
    }
    let Some(host) = HOST.get(0) else {
        return Err(Pass::NoService);
    };
    let mut peer = None;
    if cfg!(feature = "exp-service-twice") {
        core::hint::black_box(find_service(
            host,
            &core::hint::black_box(flow.service_key()),
        ));
    }
    let svc = if let Some(svc) = find_service(host, &flow.service_key()) {
        if !cfg!(feature = "exp-no-mac-check") && !frame.for_host(host) {
            return Ok((XDP_PASS, counters::PASS_NOT_FOR_HOST));
        }
        svc
    } else {
        // Not a service's: perhaps a cluster member's encapsulated packet.
        let g = match decapsulate(frame, &flow, host)? {
            Ok(g) => g,
            Err(outcome) => return Ok(outcome),
        };
        // The inner packet's headers take the outer's place (one steer, one
        // set of parsed headers on the 512-byte stack).
        let Ok(inner) = parse::parse(&*frame) else {
            return Ok((XDP_DROP, counters::DECAP_MALFORMED));
        };
        flow = inner;
        peer = Some(g);
        // The inner packet travels untagged; its service's VLAN came along.
        let mut key = flow.service_key();
        key.vlan = g.vlan;
        let Some(svc) = find_service(host, &key) else {
            return Ok((XDP_DROP, counters::DECAP_STALE));
        };
        svc
    };
    Ok(steer(frame, &flow, svc, peer))
}

/// A packet of a service, arrived from a client (`peer` none) or
/// decapsulated from a cluster member (`peer`: what its GUE header said).
#[inline(always)]
fn steer(frame: &mut XdpFrame, flow: &Flow, svc: &ServiceEntry, peer: Option<Gue>) -> (u32, u32) {
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
    }

    let pin_kind = if flow.proto == PROTO_TCP {
        PIN_TCP
    } else {
        PIN_UDP
    };
    // A client of an SLA origin rule: its tier's slot, not the unit's owner.
    let tier = tier_owner(flow, svc, unit, peer);
    let (owner, instance, of_unit) = if let Some(g) = peer {
        // The sender's choice, if it is a live instance of this host;
        // else this host's owner of the unit, if that is one. Never sent
        // on: a packet does not loop between hosts whose tables disagree.
        let target = u32::from(g.target);
        if let Some(i) = local_live(target, svc.id) {
            (target, Some(i), target == unit_owner(svc.id, unit))
        } else {
            let owner = unit_owner(svc.id, unit);
            let Some(i) = local_live(owner, svc.id) else {
                return (XDP_DROP, counters::DECAP_STALE);
            };
            (owner, Some(i), true)
        }
    } else if svc.flags & pin_kind != 0 && !cfg!(feature = "exp-no-pins") {
        pinned_owner(flow, svc, unit, tier, sc)
    } else {
        let owner = tier.unwrap_or_else(|| unit_owner(svc.id, unit));
        (owner, live_instance(owner, svc.id), tier.is_none())
    };
    let Some(instance) = instance else {
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
    // to another instance is that instance's load, not the unit's.
    if of_unit {
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

/// Where a packet for a local `owner` goes: there, or, for a TCP packet of
/// a connection the owner has no socket for while the unit's previous
/// owner (moved away less than the service's pin idle time ago) is live,
/// to the previous owner.
enum SecondChance {
    Here,
    Local(u32, &'static InstanceEntry),
    Remote(u32, &'static InstanceEntry),
}

/// `settled`: the packet stays with `owner` whatever (see the caller).
#[inline(always)]
fn second_chance(
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
        reason = "seconds; only their low 16 bits are compared"
    )]
    // SAFETY: helper without arguments.
    let now_secs = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    if now_secs.wrapping_sub(moved_at) & 0xFFFF > svc.pin_idle_secs {
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

/// A packet that is not a service's: a cluster member's encapsulated
/// packet (to our underlay address and encapsulation port) is taken out of
/// its outer headers, leaving the inner packet behind a fresh Ethernet
/// header, and its GUE header is returned; `Err(outcome)`: taken, but
/// dropped; `Err(Pass)` outside: not one, it passes.
#[inline(always)]
fn decapsulate(
    frame: &mut XdpFrame,
    outer: &Flow,
    host: &HostEntry,
) -> Result<Result<Gue, (u32, u32)>, Pass> {
    let Some(cl) = CLUSTER.get(0) else {
        return Err(Pass::NoService);
    };
    if cl.family == 0
        || outer.proto != PROTO_UDP
        || outer.family != cl.family
        || (outer.ports >> 16) as u16 != cl.port_be
        || outer.dst != cl.underlay
    {
        return Err(Pass::NoService);
    }
    if !frame.for_host(host) {
        return Ok(Err((XDP_PASS, counters::PASS_NOT_FOR_HOST)));
    }
    let member = MemberKey {
        addr: outer.src,
        family: outer.family,
        pad: [0; 3],
    };
    // SAFETY: only read.
    if unsafe { MEMBERS.get(member) }.is_none() {
        return Ok(Err((XDP_DROP, counters::DECAP_REFUSED)));
    }
    let malformed = Ok(Err((XDP_DROP, counters::DECAP_MALFORMED)));
    let gue_at = outer.l4_off + 8;
    let Some(g) = frame
        .load::<[u8; GUE_LEN]>(gue_at)
        .and_then(|b| encap::parse_gue(&b))
    else {
        return malformed;
    };
    let Some(src_mac) = frame.load::<[u8; 6]>(6) else {
        return malformed;
    };
    // The inner packet gets an Ethernet header in place of the outer
    // headers' last bytes: the frame then starts ETH_HLEN before it.
    if !frame.strip(gue_at + GUE_LEN - ETH_HLEN) {
        return malformed;
    }
    let ethertype: u16 = if g.inner_family == FAMILY_V6 {
        0x86DD
    } else {
        0x0800
    };
    if !frame.write_eth([0; 6], src_mac, ethertype) {
        return malformed;
    }
    Ok(Ok(g))
}

/// Encapsulates the packet for `owner`, an instance on another host, and
/// sends it back out of the NIC towards that host's next hop.
#[inline(always)]
fn to_host(
    frame: &mut XdpFrame,
    flow: &Flow,
    instance: &InstanceEntry,
    owner: u32,
    key: u32,
    previous: u16,
) -> (u32, u32) {
    let (Some(cl), Some(host)) = (CLUSTER.get(0), REMOTE_HOSTS.get(instance.host)) else {
        return (XDP_DROP, counters::ENCAP_NO_ROUTE);
    };
    if cl.family == 0 || host.next_hop == [0; 6] {
        return (XDP_DROP, counters::ENCAP_NO_ROUTE);
    }
    if flow.vlan_tagged && !frame.pop_vlan() {
        return (XDP_PASS, counters::PASS_TRUNCATED);
    }
    let inner_len = frame.size() - ETH_HLEN;
    let outer_len = encap::outer_len(cl.family);
    // Not fragmented: dropped and counted, as Katran does by default with
    // packets over its maximum size; the underlay is to have room.
    if inner_len + outer_len > usize::from(cl.mtu) {
        return (XDP_DROP, counters::ENCAP_TOO_BIG);
    }
    if !frame.grow(outer_len) {
        return (XDP_DROP, counters::ENCAP_TOO_BIG);
    }
    let (ethertype, ok) = {
        let t = Tunnel {
            src: cl.underlay,
            dst: host.underlay,
            sport: encap::source_port(key),
            dport: u16::from_be(cl.port_be),
        };
        #[expect(
            clippy::cast_possible_truncation,
            reason = "ids are below MAX_INSTANCES"
        )]
        let g = Gue {
            inner_family: flow.family,
            target: owner as u16,
            vlan: flow.vlan,
            previous,
        };
        #[expect(clippy::cast_possible_truncation, reason = "below the MTU, a u16")]
        let len = inner_len as u16;
        if cl.family == FAMILY_V4 {
            (
                0x0800,
                frame.write_at(ETH_HLEN, &encap::outer_v4(&t, len, &g)),
            )
        } else {
            (
                0x86DD,
                frame.write_at(ETH_HLEN, &encap::outer_v6(&t, len, &g)),
            )
        }
    };
    if !ok || !frame.write_eth(host.next_hop, cl.mac, ethertype) {
        return (XDP_DROP, counters::ENCAP_TOO_BIG);
    }
    (XDP_TX, counters::ENCAPSULATED)
}

/// The service `key` names, from the live half of the service table.
#[inline(always)]
fn find_service(host: &HostEntry, key: &ServiceKey) -> Option<&'static ServiceEntry> {
    let (a, b) = key.slots(host.service_mask);
    let base = (host.service_half & 1) * (host.service_mask + 1);
    let want = key.words();
    // Word by word: comparing the arrays would call a byte-wise memcmp.
    let same = |w: [u64; 3]| w[0] == want[0] && w[1] == want[1] && w[2] == want[2];
    for slot in [a, b] {
        if let Some(s) = SERVICE_TABLE.get(base + slot)
            && same(s.key.words())
        {
            return Some(&s.entry);
        }
    }
    None
}

/// The owner an SLA origin rule gives a packet of `svc`: `None` when the
/// service has no rules, the source is in no rule's prefix, or its tier
/// slot spills over (the unit's owner takes it); else the slot's instance,
/// or `NO_OWNER` (punted). A cluster member's packet (`peer`) carries its
/// target already.
#[inline(always)]
fn tier_owner(flow: &Flow, svc: &ServiceEntry, unit: u32, peer: Option<Gue>) -> Option<u32> {
    if svc.flags & ORIGIN_RULES == 0 || peer.is_some() {
        return None;
    }
    // Every bit of the key: the longest prefix of the service's rules
    // holding the source matches.
    let key = LpmKey::new(
        u32::try_from(size_of::<OriginKey>() * 8).unwrap_or(0),
        origin_key(svc.id, flow.family, flow.src),
    );
    let tier = *ORIGIN.get(&key)?;
    let slot = TIERS
        .get(tier)
        .and_then(|t| t.slots.get(tier_slot(unit) as usize).copied())
        .unwrap_or(NO_OWNER);
    if slot == SPILL {
        bump(&GLOBAL_COUNTERS, counters::ORIGIN_SPILLED);
        return None;
    }
    bump(&GLOBAL_COUNTERS, counters::ORIGIN);
    Some(slot)
}

#[inline(always)]
fn unit_owner(service_id: u32, unit: u32) -> u32 {
    OWNERS
        .get(owner_index(service_id, unit))
        .copied()
        .unwrap_or(NO_OWNER)
}

/// The instance entry of `owner` if it is live and serves `service_id`.
#[inline(always)]
fn live_instance(owner: u32, service_id: u32) -> Option<&'static InstanceEntry> {
    if owner == NO_OWNER {
        return None;
    }
    INSTANCES
        .get(owner)
        .filter(|i| i.flags & INSTANCE_LIVE != 0 && i.service_id == service_id)
}

/// As [`live_instance`], and on this host.
#[inline(always)]
fn local_live(id: u32, service_id: u32) -> Option<&'static InstanceEntry> {
    live_instance(id, service_id).filter(|i| i.flags & INSTANCE_REMOTE == 0)
}

/// Owner of a flow of a pinning service, with its entry if live, and
/// whether it is the unit's owner: the pin's owner while the pin is fresh
/// and its owner live, else the unit's owner (or `tier`'s, an origin
/// rule's choice), pinned from now on. A TCP SYN starts a new connection:
/// it follows the unit's owner and replaces any pin an earlier connection
/// on the same 5-tuple left (clients reuse ports).
#[inline(always)]
fn pinned_owner(
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
    } else if tcp && flow.tcp_flags & TCP_SYN == 0 {
        count(sc, |c| c.pins_lost += 1);
    }
    let owner = tier.unwrap_or_else(|| unit_owner(svc.id, unit));
    let instance = live_instance(owner, svc.id);
    if let Some(i) = instance {
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

/// Updates a per-CPU counter slot, if the lookup found one.
#[inline(always)]
fn count<T>(slot: Option<*mut T>, f: impl FnOnce(&mut T)) {
    if cfg!(feature = "exp-no-counters") {
        return;
    }
    if let Some(p) = slot {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        f(unsafe { &mut *p });
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if cfg!(feature = "exp-no-counters") {
        return;
    }
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        unsafe { *c += 1 };
    }
}

/// What an experiment build returns where it skips the redirect.
const XDP_REDIRECT_ACTION: u32 = aya_ebpf::bindings::xdp_action::XDP_REDIRECT;

/// `VLAN_TAG_LEN` as the head adjustment that drops a tag.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "4 fits in an i32"
)]
const VLAN_POP: i32 = VLAN_TAG_LEN as i32;

/// The frame under direct packet access.
struct XdpFrame {
    ctx: *mut aya_ebpf::bindings::xdp_md,
    data: usize,
    end: usize,
    rx_queue: u32,
}

impl XdpFrame {
    #[inline(always)]
    fn new(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx,
            data: ctx.data(),
            end: ctx.data_end(),
            rx_queue: ctx.rx_queue_index(),
        }
    }

    /// Whether the destination MAC is one of the host's.
    #[inline(always)]
    fn for_host(&self, host: &HostEntry) -> bool {
        let Some(dst) = self.load::<[u8; 6]>(0) else {
            return false;
        };
        let dst = mac_word(dst);
        // Zero marks an unused slot, and no frame is for MAC 0.
        dst != 0 && host.macs.contains(&dst)
    }

    /// Removes the frame's one VLAN tag: the frame starts `VLAN_TAG_LEN`
    /// bytes later, with the source MAC written back in front of the inner
    /// ethertype (the caller writes the destination MAC). On failure the
    /// frame is unchanged.
    #[inline(always)]
    fn pop_vlan(&mut self) -> bool {
        let Some(src) = self.load::<[u8; 6]>(6) else {
            return false;
        };
        if !self.adjust(VLAN_POP) {
            return false;
        }
        if self.data + 12 > self.end {
            return false;
        }
        // SAFETY: the 12 bytes at `data` were just checked to be in the frame.
        unsafe { write_mac(self.data + 6, src) };
        true
    }

    /// Moves the frame's start by `delta` bytes (positive: drops bytes at
    /// the front) and reloads the packet pointers.
    #[inline(always)]
    fn adjust(&mut self, delta: i32) -> bool {
        // SAFETY: `ctx` is this run's context.
        if unsafe { bpf_xdp_adjust_head(self.ctx, delta) } != 0 {
            return false;
        }
        // The helper invalidates every packet pointer: reload them.
        // SAFETY: `ctx` is this run's context.
        unsafe {
            self.data = (*self.ctx).data as usize;
            self.end = (*self.ctx).data_end as usize;
        }
        true
    }

    /// Drops `n` bytes (< 256) at the front.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "n < 256"
    )]
    fn strip(&mut self, n: usize) -> bool {
        n < 256 && self.adjust(n as i32)
    }

    /// Makes room for `n` bytes (< 256) at the front.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "n < 256"
    )]
    fn grow(&mut self, n: usize) -> bool {
        n < 256 && self.adjust(-(n as i32))
    }

    /// Writes `bytes` (a multiple of 4 bytes long) at `off`, if the frame
    /// holds them: in 4-byte stores, as a copy of the array would be a call
    /// to a byte-wise `memmove` in BPF.
    #[inline(always)]
    fn write_at<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> bool {
        const { assert!(N.is_multiple_of(4)) };
        let start = self.data + off;
        if start + N > self.end {
            return false;
        }
        let mut at = 0;
        while at < N {
            let w = u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            // SAFETY: the N bytes at `start` were just checked to be in the
            // frame, and `at + 4 <= N`.
            unsafe { ((start + at) as *mut u32).write_unaligned(w) };
            at += 4;
        }
        true
    }

    /// Whether a socket other than a listener, in network namespace
    /// `netns_id` (relative to the NIC's; `u32::MAX`: the NIC's own),
    /// would take this TCP packet: an established connection, or one being
    /// set up or closed.
    #[inline(always)]
    fn has_connection(&self, flow: &Flow, netns_id: u32) -> bool {
        const TCP_LISTEN: u32 = 10;
        let Some(tuple) = SCRATCH.get_ptr_mut(0) else {
            // Cannot look: assume the owner has it, as without a cluster.
            return true;
        };
        #[expect(clippy::cast_possible_truncation, reason = "the port halves")]
        let (sport, dport) = (flow.ports as u16, (flow.ports >> 16) as u16);
        let size = if flow.family == FAMILY_V4 {
            // SAFETY: this CPU's scratch slot; writing the union's IPv4
            // member whole.
            unsafe {
                (*tuple).__bindgen_anon_1.ipv4 =
                    aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                        saddr: flow.src[0],
                        daddr: flow.dst[0],
                        sport,
                        dport,
                    };
            }
            12
        } else {
            // SAFETY: as above, the IPv6 member.
            unsafe {
                (*tuple).__bindgen_anon_1.ipv6 =
                    aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                        saddr: flow.src,
                        daddr: flow.dst,
                        sport,
                        dport,
                    };
            }
            36
        };
        // A negative id (as i32) means the context's own namespace.
        let netns = u64::from(netns_id) | if netns_id == u32::MAX { !0u64 << 32 } else { 0 };
        // SAFETY: `ctx` is this run's context and `tuple` holds `size`
        // bytes of the tuple's member for the family.
        let sk = unsafe { bpf_skc_lookup_tcp(self.ctx.cast(), tuple, size, netns, 0) };
        if sk.is_null() {
            return false;
        }
        // SAFETY: a socket the helper returned, read then released.
        let state = unsafe { (*sk).state };
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
        state != TCP_LISTEN
    }

    /// Writes an Ethernet header at the front.
    #[inline(always)]
    fn write_eth(&self, dst: [u8; 6], src: [u8; 6], ethertype: u16) -> bool {
        if self.data + ETH_HLEN > self.end {
            return false;
        }
        // SAFETY: the 14 bytes at `data` were just checked to be in the frame.
        unsafe {
            write_mac(self.data, dst);
            write_mac(self.data + 6, src);
            ((self.data + 12) as *mut u16).write_unaligned(ethertype.to_be());
        }
        true
    }

    #[inline(always)]
    fn set_dst_mac(&self, mac: [u8; 6]) -> bool {
        if self.data + 6 > self.end {
            return false;
        }
        // SAFETY: the 6 bytes at `data` were just checked to be in the frame.
        unsafe { write_mac(self.data, mac) };
        true
    }
}

/// Writes a MAC at `at` as a word and a half-word: a 6-byte array copy
/// would be a call to a byte-wise `memmove` in BPF.
///
/// # Safety
///
/// The 6 bytes at `at` must be in the frame.
#[inline(always)]
unsafe fn write_mac(at: usize, mac: [u8; 6]) {
    // SAFETY: the caller's promise.
    unsafe {
        (at as *mut u32).write_unaligned(u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]));
        ((at + 4) as *mut u16).write_unaligned(u16::from_ne_bytes([mac[4], mac[5]]));
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn size(&self) -> usize {
        self.end - self.data
    }

    #[inline(always)]
    fn load<T: FromBytes>(&self, off: usize) -> Option<T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: the bytes were just checked to be in the frame, and `T:
        // FromBytes` is valid for any bit pattern.
        Some(unsafe { (start as *const T).read_unaligned() })
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offsets are within a frame (< 64 KiB) and len <= 16"
    )]
    fn load_tag(&self, off: usize, len: usize) -> Option<[u32; 4]> {
        if len == 0 || len > 16 {
            return None;
        }
        // Fast case: 16 bytes readable in the linear frame. Read them all
        // and keep the first `len`: two loads and two masks, no helper call.
        // (The caller has checked the tag lies inside the datagram.)
        if off <= 4096 {
            let start = self.data + off;
            if start + 16 <= self.end {
                // SAFETY: the 16 bytes were just checked to be in the frame.
                let (lo, hi) = unsafe {
                    (
                        (start as *const u64).read_unaligned(),
                        ((start + 8) as *const u64).read_unaligned(),
                    )
                };
                let bits = (len as u64) * 8;
                let lo_mask = if bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                let hi_mask = if bits >= 128 {
                    u64::MAX
                } else if bits <= 64 {
                    0
                } else {
                    (1u64 << (bits - 64)) - 1
                };
                let (lo, hi) = (lo & lo_mask, hi & hi_mask);
                return Some([lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32]);
            }
        }
        // Near the end of the frame, or in a fragment of a multi-buffer
        // frame: the helper copies exactly `len` bytes.
        let mut words = [0u32; 4];
        // SAFETY: `words` holds 16 >= `len` bytes.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.ctx, off as u32, words.as_mut_ptr().cast(), len as u32)
        };
        (ret == 0).then_some(words)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
