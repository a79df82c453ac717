//! Map keys and values shared with the XDP program. Every type is `repr(C)`
//! with its padding written out, and its size asserted, so the two sides can
//! never disagree on a layout.

/// Map names, as the XDP program declares them.
pub mod names {
    pub const SERVICE_TABLE: &str = "SERVICE_TABLE";
    pub const OWNERS: &str = "OWNERS";
    pub const INSTANCES: &str = "INSTANCES";
    pub const DELIVER: &str = "DELIVER";
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    pub const SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
    pub const INSTANCE_COUNTERS: &str = "INSTANCE_COUNTERS";
    pub const UNIT_HITS: &str = "UNIT_HITS";
    pub const PINNED: &str = "PINNED";
    pub const PUNT: &str = "PUNT";
    pub const HOST: &str = "HOST";
    pub const INSTANCE_NAMES: &str = "INSTANCE_NAMES";
    pub const CLUSTER: &str = "CLUSTER";
    pub const REMOTE_HOSTS: &str = "REMOTE_HOSTS";
    pub const MEMBERS: &str = "MEMBERS";
    pub const PREVIOUS: &str = "PREVIOUS";
    pub const ORIGIN: &str = "ORIGIN";
    pub const TIERS: &str = "TIERS";

    /// Every map of the program, for pinning them all.
    pub const ALL: [&str; 18] = [
        ORIGIN,
        TIERS,
        PREVIOUS,
        CLUSTER,
        REMOTE_HOSTS,
        MEMBERS,
        PUNT,
        HOST,
        INSTANCE_NAMES,
        SERVICE_TABLE,
        OWNERS,
        INSTANCES,
        DELIVER,
        GLOBAL_COUNTERS,
        SERVICE_COUNTERS,
        INSTANCE_COUNTERS,
        UNIT_HITS,
        PINNED,
    ];
}

/// Fingerprint of every map's layout: key and value sizes, the counter
/// count, and an epoch bumped by hand when a layout changes at equal size.
/// Written into the pin directory; an agent adopts only pins of its own
/// layout.
pub const LAYOUT: u64 = {
    // 8: `PREVIOUS` entries are 64 bits (owner, 32-bit move time).
    const EPOCH: u64 = 8;
    let parts = [
        EPOCH,
        size_of::<ClusterEntry>() as u64,
        size_of::<RemoteHost>() as u64,
        size_of::<MemberKey>() as u64,
        size_of::<ServiceKey>() as u64,
        size_of::<ServiceEntry>() as u64,
        size_of::<HostEntry>() as u64,
        size_of::<ServiceSlot>() as u64,
        size_of::<InstanceEntry>() as u64,
        size_of::<InstanceName>() as u64,
        size_of::<ServiceCounters>() as u64,
        size_of::<InstanceCounters>() as u64,
        size_of::<PinKey>() as u64,
        size_of::<Pin>() as u64,
        size_of::<OriginKey>() as u64,
        size_of::<Tier>() as u64,
        crate::counters::COUNT as u64,
        names::ALL.len() as u64,
        crate::UNIT_BITS as u64,
        crate::HIT_BITS as u64,
    ];
    // FNV-1a over the parts.
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < parts.len() {
        h ^= parts[i];
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
};

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "sluice_xdp";

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// What a service is found by: (VIP, port, protocol, VLAN).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP as words (see [`crate::key`]); an IPv4 VIP fills word 0 only.
    pub addr: [u32; 4],
    /// Destination port in wire order (the raw 2 bytes as a `u16`).
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    /// VLAN id the packet arrived on; 0 for untagged (or priority-tagged).
    pub vlan: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

impl ServiceKey {
    /// The key as three words, for a comparison in three steps.
    #[inline(always)]
    #[must_use]
    pub const fn words(&self) -> [u64; 3] {
        [
            (self.addr[0] as u64) | ((self.addr[1] as u64) << 32),
            (self.addr[2] as u64) | ((self.addr[3] as u64) << 32),
            (self.port_be as u64)
                | ((self.proto as u64) << 16)
                | ((self.family as u64) << 24)
                | ((self.vlan as u64) << 32)
                | ((self.pad as u64) << 48),
        ]
    }

    /// The key's two candidate slots in a service table half of `mask + 1`
    /// slots (a power of two, at most 65,536): two-choice cuckoo hashing,
    /// so a lookup is two array loads at most, and the agent places every
    /// key in one of its two slots.
    #[inline(always)]
    #[must_use]
    pub const fn slots(&self, mask: u32) -> (u32, u32) {
        let w = self.words();
        // Multiply-xorshift over the words: cheap in the data path, and
        // mixes every bit of the key into both halves of the result.
        let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut i = 0;
        while i < 3 {
            h = (h ^ w[i]).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h ^= h >> 31;
            i += 1;
        }
        #[expect(clippy::cast_possible_truncation, reason = "the two 32-bit halves")]
        let (lo, hi) = (h as u32, (h >> 32) as u32);
        (lo & mask, hi & mask)
    }
}

/// A slot of the service table: a key and its service. A slot whose key's
/// `family` is 0 is empty (no packet has family 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    pub entry: ServiceEntry,
}
const _: () = assert!(size_of::<ServiceSlot>() == 48);

/// This host (one entry, index 0): its MACs — only frames addressed to one
/// of them are steered — and which half of the service table is live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostEntry {
    /// Each MAC as [`mac_word`] packs it; 0 marks an unused slot.
    pub macs: [u64; crate::MAX_HOST_MACS],
    /// Slots in each half of the service table, minus one.
    pub service_mask: u32,
    /// The half of the service table the data path reads (0 or 1). The
    /// agent writes the other half whole, then flips this: a packet sees
    /// one table or the other, never one half-written.
    pub service_half: u32,
}
const _: () = assert!(size_of::<HostEntry>() == 40);

/// A MAC as the low 48 bits of a word, byte 0 lowest: the form the XDP
/// program compares destination MACs in.
#[inline(always)]
#[must_use]
pub const fn mac_word(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

/// No tag: the key is the flow hash of the 5-tuple.
pub const TAG_NONE: u32 = 0;
/// Tag bytes at a fixed offset into the UDP payload.
pub const TAG_UDP_PAYLOAD: u32 = 1;
/// Tag is the IPv6 flow label (a zero label counts as missing).
pub const TAG_IPV6_FLOW_LABEL: u32 = 2;
/// Tag bytes at a fixed offset into a QUIC packet's destination connection
/// id, which the server chose: it survives the client's address changes.
pub const TAG_QUIC_CID: u32 = 3;

/// A service, as the data path needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    /// Dense service id, `0..MAX_SERVICES`: row of the owner array and of
    /// the counters.
    pub id: u32,
    /// One of the `TAG_*` kinds.
    pub tag_kind: u32,
    /// Offset of the tag from the start of the UDP payload
    /// (`TAG_UDP_PAYLOAD`) or of the connection id (`TAG_QUIC_CID`).
    pub tag_offset: u16,
    /// Tag length in bytes, `1..=MAX_TAG_LEN` for `TAG_UDP_PAYLOAD` and
    /// `TAG_QUIC_CID`.
    pub tag_len: u16,
    /// `PIN_TCP` and/or `PIN_UDP`: which flows are pinned to their owner.
    pub flags: u32,
    /// A pinned flow idle this long (seconds) is no longer pinned.
    pub pin_idle_secs: u32,
    /// `TAG_QUIC_CID`: length of the connection ids the servers issue,
    /// `1..=MAX_QUIC_CID_LEN` (a short header does not carry it); else 0.
    pub quic_cid_len: u16,
    pub reserved: u16,
}
const _: () = assert!(size_of::<ServiceEntry>() == 24);

/// Pin TCP flows: an established connection stays with its owner while its
/// unit moves.
pub const PIN_TCP: u32 = 1;
/// Pin UDP flows too (for services whose datagrams carry session state).
pub const PIN_UDP: u32 = 2;
/// The service has SLA origin rules: its packets' sources are looked up in
/// `ORIGIN` (services without rules skip the lookup, and pay nothing).
pub const ORIGIN_RULES: u32 = 4;

/// The data of an `ORIGIN` trie key (after the trie's own `prefix_len`):
/// the service, then the source address in wire order, IPv4 as
/// IPv4-mapped IPv6. A rule's prefix length counts the service's 32 bits,
/// so a packet matches only its own service's rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OriginKey {
    /// The service id, as a whole word (always matched in full).
    pub service: u32,
    /// Address as words ([`crate::key`]): the bytes in wire order.
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<OriginKey>() == 20);

/// Bits of [`OriginKey`] before the address.
pub const ORIGIN_SERVICE_BITS: u32 = 32;

/// Word 2 of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as words hold
/// it: bytes `00 00 ff ff` in wire order.
pub const V4_MAPPED_WORD: u32 = u32::from_le_bytes([0, 0, 0xff, 0xff]);

/// The `ORIGIN` key data of source `src` (as [`crate::parse::Flow`] holds
/// it) of family `family`, for service `service`.
#[inline(always)]
#[must_use]
pub const fn origin_key(service: u32, family: u8, src: [u32; 4]) -> OriginKey {
    let addr = if family == FAMILY_V4 {
        [0, 0, V4_MAPPED_WORD, src[0]]
    } else {
        src
    };
    OriginKey { service, addr }
}

/// The `ORIGIN` key length of a source prefix `len` bits long, of family
/// `family` (IPv4 prefixes sit under `::ffff:0:0/96`).
#[inline(always)]
#[must_use]
pub const fn origin_prefix_len(family: u8, len: u32) -> u32 {
    ORIGIN_SERVICE_BITS + if family == FAMILY_V4 { 96 + len } else { len }
}

/// Slots of a [`Tier`]: a packet takes slot `unit % TIER_SLOTS`.
pub const TIER_SLOTS: u32 = 64;

/// A tier slot that sends the packet to its unit's own owner (`OWNERS`),
/// as if no rule matched: the subset spills over.
pub const SPILL: u32 = u32::MAX;

/// Value of `TIERS`, indexed by the tier `ORIGIN` gives: the subset's
/// instance ids over [`TIER_SLOTS`] slots, one array load a packet. A slot
/// is an instance id, [`SPILL`], or [`NO_OWNER`] (nobody: punted).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    pub slots: [u32; TIER_SLOTS as usize],
}
const _: () = assert!(size_of::<Tier>() == 256);

impl Default for Tier {
    fn default() -> Self {
        Self {
            slots: [NO_OWNER; TIER_SLOTS as usize],
        }
    }
}

/// The [`Tier`] slot a packet of `unit` takes.
#[inline(always)]
#[must_use]
pub const fn tier_slot(unit: u32) -> u32 {
    unit & (TIER_SLOTS - 1)
}

/// Key of the pinned-flow LRU map: the 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PinKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ports: u32,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}
const _: () = assert!(size_of::<PinKey>() == 40);

/// Value of the pinned-flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pin {
    /// Instance the flow stays with.
    pub owner: u32,
    /// The owner's [`InstanceEntry::generation`] when the pin was made: the
    /// pin holds only while it is the same, so an id handed to a newcomer
    /// does not inherit the flows of the instance that had it before.
    pub generation: u16,
    pub pad: u16,
    /// Last packet seen, `bpf_ktime_get_coarse_ns`.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Pin>() == 16);

/// No owner in the owner array: the unit is unowned.
pub const NO_OWNER: u32 = 0;

/// Instance is live: its packets may be delivered.
pub const INSTANCE_LIVE: u32 = 1;
/// Instance runs on another host ([`InstanceEntry::host`]): its packets are
/// encapsulated and sent there.
pub const INSTANCE_REMOTE: u32 = 2;
/// The instance's sockets can be looked up ([`InstanceEntry::netns_id`]):
/// a connection its unit's previous owner still holds gets its second
/// chance there.
pub const INSTANCE_LOOKUP: u32 = 4;

/// An entry of `PREVIOUS` (indexed like `OWNERS`): the unit's owner before
/// its last move, and when that was (seconds of `CLOCK_MONOTONIC_COARSE`),
/// so a packet of a connection the new owner has no socket for can go to
/// the old one ("second chance") for a while. 0: none. 64 bits, as an
/// array element takes 8 bytes anyway: 32 bits of seconds wrap after 136
/// years, where 16 wrapped every 18 h and old moves looked recent again.
#[inline(always)]
#[must_use]
pub const fn previous_entry(owner: u32, moved_at_secs: u32) -> u64 {
    owner as u64 | (moved_at_secs as u64) << 32
}

/// The owner and the move's time (seconds) of a `PREVIOUS` entry.
#[inline(always)]
#[must_use]
#[expect(clippy::cast_possible_truncation, reason = "the two halves")]
pub const fn previous_parts(entry: u64) -> (u32, u32) {
    (entry as u32, (entry >> 32) as u32)
}

/// Value of the instance array, indexed by instance id (ids start at 1; 0 is
/// [`NO_OWNER`]). The DEVMAP `DELIVER` holds the matching host-side veth at
/// the same index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InstanceEntry {
    /// MAC of the instance's own (container-side) interface.
    pub mac: [u8; 6],
    /// Bumped each time the id is given to another instance (see
    /// [`Pin::generation`]).
    pub generation: u16,
    /// `INSTANCE_LIVE` or 0.
    pub flags: u32,
    /// Service id the instance serves (to catch a stale owner entry).
    pub service_id: u32,
    /// With `INSTANCE_REMOTE`: the host it runs on, an index into
    /// `REMOTE_HOSTS` (from 1).
    pub host: u32,
    /// With `INSTANCE_LOOKUP`: the id of its network namespace relative to
    /// the NIC's (`u32::MAX`: the NIC's own), where its sockets are looked
    /// up.
    pub netns_id: u32,
}
const _: () = assert!(size_of::<InstanceEntry>() == 24);

/// This host in the cluster (entry 0 of `CLUSTER`): where encapsulated
/// packets leave from and arrive at. All zero on a host without a cluster:
/// nothing is encapsulated or decapsulated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClusterEntry {
    /// This host's underlay address, as words ([`crate::key`]).
    pub underlay: [u32; 4],
    /// The NIC's MAC: the source of encapsulated frames.
    pub mac: [u8; 6],
    /// Family of the underlay (`FAMILY_V4`/`FAMILY_V6`); 0: no cluster.
    pub family: u8,
    pub pad: u8,
    /// The encapsulation's UDP port, in wire order (as `Flow::ports` has it).
    pub port_be: u16,
    /// The NIC's MTU: an encapsulated packet longer than this is not sent.
    pub mtu: u16,
    pub pad2: u32,
    /// The fence: past this time (ns of `CLOCK_MONOTONIC`, read coarse)
    /// this host no longer acts as an owner — every packet it would
    /// deliver to an instance or encapsulate to another host is dropped
    /// and counted `fenced`. 0: no fence. Nanoseconds in 64 bits never
    /// wrap, so a fence left by an agent that died stays up.
    pub fence_ns: u64,
}
const _: () = assert!(size_of::<ClusterEntry>() == 40);

/// Another host of the cluster (`REMOTE_HOSTS`, indexed from 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RemoteHost {
    /// Its underlay address, as words; the same family as ours.
    pub underlay: [u32; 4],
    /// The next hop's MAC towards it (the neighbour table's); all zero
    /// while unresolved: its packets are not sent.
    pub next_hop: [u8; 6],
    pub pad: u16,
}
const _: () = assert!(size_of::<RemoteHost>() == 24);

/// Key of `MEMBERS`: an underlay address packets are decapsulated from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemberKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<MemberKey>() == 20);

/// Value of the `INSTANCE_NAMES` array, indexed by instance id: the name of
/// the instance holding the id, NUL-padded (all zero: the id is free).
/// Read and written by the agent only; pinned with the rest, so ids stay
/// with their names across reloads and restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceName {
    pub name: [u8; crate::MAX_NAME_LEN],
}
const _: () = assert!(size_of::<InstanceName>() == 64);

impl Default for InstanceName {
    fn default() -> Self {
        Self {
            name: [0; crate::MAX_NAME_LEN],
        }
    }
}

/// Per-CPU counters of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Packets that matched the service.
    pub packets: u64,
    pub bytes: u64,
    /// Redirected to an owner.
    pub delivered: u64,
    /// No live owner for the unit.
    pub unowned: u64,
    /// The owner's DEVMAP slot was empty.
    pub redirect_failed: u64,
    /// Keyed by the workload tag.
    pub tagged: u64,
    /// Tagged service, but the packet lacked the tag: keyed by flow hash.
    pub tag_missing: u64,
    /// Delivered to the owner its pin names, not (necessarily) the unit's.
    pub pin_hits: u64,
    /// Pins created (first packet of a flow, or after its pin expired).
    pub pins_created: u64,
    /// A TCP packet without SYN found no pin: its pin was evicted from the
    /// LRU map or idled out, so it may now reach a different instance.
    pub pins_lost: u64,
    /// A pin was found but had idled out, or its owner is gone.
    pub pins_expired: u64,
    pub reserved: [u64; 5],
}
const _: () = assert!(size_of::<ServiceCounters>() == 128);

/// Per-CPU counters of one instance: what the data path delivered to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InstanceCounters {
    pub packets: u64,
    pub bytes: u64,
    pub redirect_failed: u64,
    pub reserved: u64,
}
const _: () = assert!(size_of::<InstanceCounters>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (each): repr(C), made only of integers and integer arrays,
    // with every padding byte written out as a named field and the size
    // asserted above, so any bytes the kernel hands back are a valid value.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InstanceEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InstanceName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InstanceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PinKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Pin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClusterEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RemoteHost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Tier {}
}

#[cfg(feature = "user")]
mod ops {
    use core::ops::AddAssign;

    use super::{InstanceCounters, ServiceCounters};

    impl AddAssign for ServiceCounters {
        fn add_assign(&mut self, o: Self) {
            self.packets += o.packets;
            self.bytes += o.bytes;
            self.delivered += o.delivered;
            self.unowned += o.unowned;
            self.redirect_failed += o.redirect_failed;
            self.tagged += o.tagged;
            self.tag_missing += o.tag_missing;
            self.pin_hits += o.pin_hits;
            self.pins_created += o.pins_created;
            self.pins_lost += o.pins_lost;
            self.pins_expired += o.pins_expired;
        }
    }

    impl AddAssign for InstanceCounters {
        fn add_assign(&mut self, o: Self) {
            self.packets += o.packets;
            self.bytes += o.bytes;
            self.redirect_failed += o.redirect_failed;
        }
    }
}
