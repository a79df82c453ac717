//! Every map of the program, as Katran keeps its maps in `balancer_maps.h`:
//! the agent finds them by these names (and pins them), and `common::maps`
//! holds the types of their keys and values.
//!
//! Sizes here are upper bounds for the object file; the agent sets the real
//! ones at load time from its config, so a small deployment stays small.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, bpf_sock_tuple},
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, XskMap},
};
use sluice_common::{
    DEFAULT_PINNED_FLOWS, HIT_BUCKETS_PER_SERVICE, INSTANCE_SLOTS, MAX_HOSTS, MAX_ORIGIN_PREFIXES,
    MAX_PUNT_QUEUES, MAX_SERVICES, UNITS_PER_SERVICE, counters,
    maps::{
        ClusterEntry, HostEntry, InstanceCounters, InstanceEntry, InstanceName, MemberKey,
        OriginKey, Pin, PinKey, RemoteHost, ServiceCounters, ServiceSlot, Tier,
    },
};

/// (VIP, port, protocol, VLAN) -> service: two halves of `mask + 1`
/// slots each (`HOST` says which half is live and the mask), a key in one
/// of its two slots (`ServiceKey::slots`). Two array loads at most, where
/// a hash map would hash the whole key and walk a bucket.
#[map]
pub(crate) static SERVICE_TABLE: Array<ServiceSlot> =
    Array::with_max_entries(2 * MAX_SERVICES * 4, 0);

/// (service, unit) -> owning instance id, or `NO_OWNER`. Mmapable: the
/// agent rewrites a group's owners with plain stores, not a syscall a unit.
#[map]
pub(crate) static OWNERS: Array<u32> =
    Array::with_max_entries(MAX_SERVICES * UNITS_PER_SERVICE, BPF_F_MMAPABLE);

/// (service, unit) -> the owner before the unit's last move and when (see
/// `maps::previous_entry`): a connection the new owner has no socket for
/// gets its second chance there.
#[map]
pub(crate) static PREVIOUS: Array<u64> =
    Array::with_max_entries(MAX_SERVICES * UNITS_PER_SERVICE, BPF_F_MMAPABLE);

/// Room for the socket lookup's tuple: the program's stack (512 bytes) is
/// spoken for by the parsed headers.
#[map]
pub(crate) static SCRATCH: PerCpuArray<bpf_sock_tuple> = PerCpuArray::with_max_entries(1, 0);

/// Room for copies of a packet's IP header (40 bytes, an IPv6 one's size)
/// and TCP header (20, from [`HEADERS_TCP_AT`]), for the SYN cookie check.
#[map]
pub(crate) static HEADERS: PerCpuArray<[u32; 15]> = PerCpuArray::with_max_entries(1, 0);

/// Where the TCP header's copy starts in a `HEADERS` slot.
pub(crate) const HEADERS_TCP_AT: usize = 40;

/// This host (entry 0): its MACs — frames for any other MAC are not
/// steered — and the live half of the service table.
#[map]
pub(crate) static HOST: Array<HostEntry> = Array::with_max_entries(1, 0);

/// Instance id -> MAC and liveness.
#[map]
pub(crate) static INSTANCES: Array<InstanceEntry> = Array::with_max_entries(INSTANCE_SLOTS, 0);

/// Instance id -> the instance's name. Never read here: the agent keeps ids
/// with their names in it, pinned with the rest.
#[map]
pub(crate) static INSTANCE_NAMES: Array<InstanceName> = Array::with_max_entries(INSTANCE_SLOTS, 0);

/// Instance id -> host-side veth of the instance.
#[map]
pub(crate) static DELIVER: DevMap = DevMap::with_max_entries(INSTANCE_SLOTS, 0);

#[map]
pub(crate) static GLOBAL_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
pub(crate) static SERVICE_COUNTERS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub(crate) static INSTANCE_COUNTERS: PerCpuArray<InstanceCounters> =
    PerCpuArray::with_max_entries(INSTANCE_SLOTS, 0);

/// Pinned flows: 5-tuple -> the instance it stays with while its unit moves.
/// LRU, so a full table forgets the least recently used flow.
#[map]
pub(crate) static PINNED: LruHashMap<PinKey, Pin> =
    LruHashMap::with_max_entries(DEFAULT_PINNED_FLOWS, 0);

/// Receive queue -> the agent's `AF_XDP` socket on it: where packets of
/// units without a live owner go (the punt).
#[map]
pub(crate) static PUNT: XskMap = XskMap::with_max_entries(MAX_PUNT_QUEUES, 0);

/// This host in its cluster (entry 0); all zero without a cluster.
#[map]
pub(crate) static CLUSTER: Array<ClusterEntry> = Array::with_max_entries(1, 0);

/// Host index -> another host's underlay address and next hop.
#[map]
pub(crate) static REMOTE_HOSTS: Array<RemoteHost> = Array::with_max_entries(MAX_HOSTS + 1, 0);

/// Underlay addresses of the cluster's hosts: the only sources whose
/// encapsulated packets are taken.
#[map]
pub(crate) static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(MAX_HOSTS + 1, 0);

/// SLA origin rules: (service, source prefix) -> the rule's tier, an index
/// into `TIERS`. Looked up only for services flagged `ORIGIN_RULES`.
#[map]
pub(crate) static ORIGIN: LpmTrie<OriginKey, u32> =
    LpmTrie::with_max_entries(MAX_ORIGIN_PREFIXES, 0);

/// Tier -> its subset's instance ids over `TIER_SLOTS` slots (or `SPILL`,
/// or `NO_OWNER`): a packet of a rule takes slot `unit % TIER_SLOTS`, one
/// array load. Two halves, so a reload writes its tiers beside the live
/// ones.
#[map]
pub(crate) static TIERS: Array<Tier> = Array::with_max_entries(2 * MAX_ORIGIN_PREFIXES, 0);

/// Per-unit hit counts, `HIT_BUCKETS_PER_SERVICE` coarse buckets a service.
#[map]
pub(crate) static UNIT_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * HIT_BUCKETS_PER_SERVICE, 0);
