//! To and from the cluster's other hosts: decapsulating a member's GUE
//! packet, and encapsulating one for an instance on another host (as
//! Katran's `pckt_encap.h`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use sluice_common::{
    counters,
    encap::{self, GUE_LEN, Gue, Tunnel},
    maps::{FAMILY_V4, FAMILY_V6, HostEntry, InstanceEntry, MemberKey, PROTO_UDP},
    parse::{ETH_HLEN, Flow, Frame, Pass},
};

use crate::{
    frame::XdpFrame,
    maps::{CLUSTER, MEMBERS, REMOTE_HOSTS},
};

/// A packet that is not a service's: a cluster member's encapsulated
/// packet (to our underlay address and encapsulation port) is taken out of
/// its outer headers, leaving the inner packet behind a fresh Ethernet
/// header, and its GUE header is returned; `Err(outcome)`: taken, but
/// dropped; `Err(Pass)` outside: not one, it passes.
#[inline(always)]
pub(crate) fn decapsulate(
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

/// Whether this host is fenced: in a cluster, past the deadline the agent
/// set (its lease not renewed in time), it acts as no unit's owner. The
/// clock is read only then; coarse, it lags by a tick at most, which the
/// agent's margin covers.
#[inline(always)]
pub(crate) fn fenced() -> bool {
    let Some(cl) = CLUSTER.get(0) else {
        return false;
    };
    // SAFETY: helper without arguments.
    cl.family != 0 && cl.fence_ns != 0 && unsafe { bpf_ktime_get_coarse_ns() } > cl.fence_ns
}

/// Encapsulates the packet for `owner`, an instance on another host, and
/// sends it back out of the NIC towards that host's next hop.
#[inline(always)]
pub(crate) fn to_host(
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
