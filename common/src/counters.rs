//! Indices of the global per-CPU counters: one per action or pass reason.
//! Every packet the program sees lands in exactly one of the [`OUTCOMES`]
//! (the `PASS_*` reasons, `DELIVERED`, `PUNTED`, `UNOWNED`,
//! `REDIRECT_FAILED`): they partition the traffic. `TAG_MISSING` is not an
//! outcome but an attribute, counted beside one.

/// Not IPv4 or IPv6 (ARP, LLDP, ...).
pub const PASS_NOT_IP: u32 = 0;
/// The frame ends inside a header it claims to carry.
pub const PASS_TRUNCATED: u32 = 1;
/// A header is inconsistent: IPv4 IHL < 5, a length field shorter than its
/// header, a TCP data offset < 5, an IPv6 extension chain too long.
pub const PASS_MALFORMED: u32 = 2;
/// An IP fragment: only the first carries ports, so none is steered and all
/// go to the kernel, which reassembles them.
pub const PASS_FRAGMENT: u32 = 3;
/// IP, but neither UDP nor TCP (ESP, ICMP other than an error about a
/// UDP or TCP flow, ...).
pub const PASS_NOT_L4: u32 = 4;
/// UDP/TCP not addressed to a configured (VIP, port, protocol).
pub const PASS_NO_SERVICE: u32 = 5;
/// Redirected to the owner of the unit. The data path counts these in the
/// service counters only (`ServiceCounters::delivered`); the agent sums
/// them into this slot when it reads the global counters.
pub const DELIVERED: u32 = 6;
/// The unit has no live owner and no agent socket took it: passed to the
/// kernel.
pub const UNOWNED: u32 = 7;
/// The owner's DEVMAP slot was empty: passed to the kernel.
pub const REDIRECT_FAILED: u32 = 8;
/// Not an action: service packets keyed by flow hash because the tag was
/// missing. Counted in addition to the action.
pub const TAG_MISSING: u32 = 9;
/// The unit has no live owner and the agent's `AF_XDP` socket took the
/// packet (the punt); without a socket it is `UNOWNED`.
pub const PUNTED: u32 = 10;

/// More than one VLAN tag: stacked tags are not steered.
pub const PASS_STACKED_VLAN: u32 = 11;
/// A service packet whose destination MAC is not one of the host's
/// (broadcast, multicast, or a frame for another host seen in promiscuous
/// mode): not steered.
pub const PASS_NOT_FOR_HOST: u32 = 12;
// A packet on a VLAN its service is not on is `PASS_NO_SERVICE`: the VLAN
// id is part of the service key.

/// The owner runs on another host: encapsulated and sent there.
pub const ENCAPSULATED: u32 = 13;
/// The owner runs on another host, but the packet would exceed the
/// underlay's MTU once encapsulated: dropped.
pub const ENCAP_TOO_BIG: u32 = 14;
/// The owner runs on another host whose next hop is not resolved yet:
/// dropped.
pub const ENCAP_NO_ROUTE: u32 = 15;
/// Encapsulated by a cluster member and delivered here.
pub const DECAP_DELIVERED: u32 = 16;
/// To our encapsulation port, but not from a cluster member: dropped.
pub const DECAP_REFUSED: u32 = 17;
/// From a member, but not a packet we encapsulate (bad GUE header, inner
/// packet malformed): dropped.
pub const DECAP_MALFORMED: u32 = 18;
/// From a member for an instance that is not a live one of this host, and
/// this host's owner of the unit is not one either (the hosts' tables
/// disagree during a move): dropped rather than sent on, so a packet never
/// loops between hosts.
pub const DECAP_STALE: u32 = 19;

/// Not an outcome: a TCP packet the unit's owner has no connection for,
/// sent to the unit's previous owner, which may (the "second chance").
/// Counted beside the outcome (`delivered`, `encapsulated`).
pub const SECOND_CHANCE: u32 = 20;

/// Not an outcome: a packet from a source prefix of one of its service's
/// SLA origin rules, steered by the rule's tier (to a subset instance, or
/// punted when the tier has none). Counted beside the outcome.
pub const ORIGIN: u32 = 21;
/// Not an outcome: a packet of an origin rule whose tier slot spilled
/// over to the unit's own owner. Counted beside the outcome.
pub const ORIGIN_SPILLED: u32 = 22;

/// The host is fenced (its cluster lease could not be renewed in time,
/// see `ClusterEntry::fence_ns`): a packet it would deliver to an instance
/// or encapsulate to another host, dropped, so that no unit has two
/// deliverers once the other hosts take this one's units.
pub const FENCED: u32 = 23;

/// Not an outcome: an ICMP error about a flow of a service (destination
/// unreachable, packet too big) steered as the flow's own packets are, to
/// the instance that holds the connection. Counted beside the outcome
/// (`delivered`, `encapsulated`, or `unowned` when the unit has no owner:
/// an error never claims one).
pub const ICMP_ERROR: u32 = 24;

/// Number of global counters.
pub const COUNT: u32 = 25;

/// Whether counter `index` is an outcome (one per packet) rather than an
/// attribute counted beside one.
#[must_use]
pub const fn is_outcome(index: u32) -> bool {
    !matches!(
        index,
        TAG_MISSING | SECOND_CHANCE | ORIGIN | ORIGIN_SPILLED | ICMP_ERROR
    ) && index < COUNT
}

/// Names for display and metrics, indexed like the counters.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ip",
    "pass_truncated",
    "pass_malformed",
    "pass_fragment",
    "pass_not_l4",
    "pass_no_service",
    "delivered",
    "unowned",
    "redirect_failed",
    "tag_missing",
    "punted",
    "pass_stacked_vlan",
    "pass_not_for_host",
    "encapsulated",
    "encap_too_big",
    "encap_no_route",
    "decap_delivered",
    "decap_refused",
    "decap_malformed",
    "decap_stale",
    "second_chance",
    "origin",
    "origin_spilled",
    "fenced",
    "icmp_error",
];
