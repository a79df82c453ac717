//! Everything that crosses the kernel/user line, in one `no_std` crate that
//! builds for both `bpfel-unknown-none` and the host.
//!
//! The XDP program and the agent call the very same [`key`] functions and the
//! same [`parse`] code, so the unit the data path picks for a packet is, by
//! construction, the unit the agent computes for it. Host builds make both
//! unit-testable.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "the XDP program needs these inlined: BPF calls are costly and the verifier tracks bounds best within one function"
)]

pub mod counters;
pub mod encap;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod key;
pub mod maps;
pub mod parse;

/// Width `B` of a work unit: a unit is the top `B` bits of a key.
pub const UNIT_BITS: u32 = 16;
/// Work units in one service's key space.
pub const UNITS_PER_SERVICE: u32 = 1 << UNIT_BITS;
/// Upper bound on configured services; service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 256;
/// Upper bound on a host's service endpoints (VIP, port, protocol): the
/// service table keeps at least four slots per endpoint, at most 65,536.
pub const MAX_ENDPOINTS: usize = 1 << 14;
/// Upper bound on instances, over all services; instance ids are
/// `1..=MAX_INSTANCES` (0 is `maps::NO_OWNER`).
pub const MAX_INSTANCES: u32 = 4096;
/// Slots of the maps indexed by instance id: one more than the instances,
/// since id 0 stays empty.
pub const INSTANCE_SLOTS: u32 = MAX_INSTANCES + 1;
/// Longest instance name, in bytes (the pinned id registry holds names).
pub const MAX_NAME_LEN: usize = 64;
/// Receive queues the punt path serves (slots of the `PUNT` XSKMAP).
pub const MAX_PUNT_QUEUES: u32 = 64;
/// Capacity of the pinned-flow map unless the config says otherwise.
pub const DEFAULT_PINNED_FLOWS: u32 = 1 << 20;
/// Largest pinned-flow map the config may ask for.
pub const MAX_PINNED_FLOWS: u32 = 1 << 26;
/// Resolution of the per-unit hit counters: `2^HIT_BITS` buckets per service,
/// each covering `2^(UNIT_BITS - HIT_BITS)` consecutive units. 256 buckets of
/// 8 bytes keep them at 2 KiB per service per CPU.
pub const HIT_BITS: u32 = 8;
/// Hit buckets per service.
pub const HIT_BUCKETS_PER_SERVICE: u32 = 1 << HIT_BITS;
/// Longest workload tag carried in a UDP payload.
pub const MAX_TAG_LEN: u32 = 16;
/// Longest QUIC connection id (RFC 9000, 17.2).
pub const MAX_QUIC_CID_LEN: u32 = 20;
/// Host MACs the data path accepts frames for (the interface's own, plus
/// configured ones such as a VRRP virtual MAC).
pub const MAX_HOST_MACS: usize = 4;
/// Other hosts of a cluster the data path can send to (`REMOTE_HOSTS`
/// slots, from 1).
pub const MAX_HOSTS: u32 = 256;
/// Most source prefixes of SLA origin rules on one host, over all
/// services (entries of the `ORIGIN` trie).
pub const MAX_ORIGIN_PREFIXES: u32 = 1024;
/// Most IPv6 extension headers walked before the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// The work unit a key falls in.
#[inline(always)]
#[must_use]
pub const fn unit_of(key: u32) -> u32 {
    key >> (32 - UNIT_BITS)
}

/// Index into the owner array of `unit` of service `service_id`.
#[inline(always)]
#[must_use]
pub const fn owner_index(service_id: u32, unit: u32) -> u32 {
    (service_id << UNIT_BITS) | unit
}

/// Index into the per-unit hit counters of `unit` of service `service_id`.
#[inline(always)]
#[must_use]
pub const fn hit_index(service_id: u32, unit: u32) -> u32 {
    (service_id << HIT_BITS) | (unit >> (UNIT_BITS - HIT_BITS))
}

#[cfg(any(test, feature = "fuzz"))]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_top_bits_of_key() {
        assert_eq!(unit_of(0xABCD_1234), 0xABCD);
        assert_eq!(unit_of(0), 0);
        assert_eq!(unit_of(u32::MAX), UNITS_PER_SERVICE - 1);
    }

    #[test]
    fn indices_do_not_collide_across_services() {
        assert_eq!(owner_index(1, 0), UNITS_PER_SERVICE);
        assert_eq!(owner_index(0, UNITS_PER_SERVICE - 1) + 1, owner_index(1, 0));
        assert_eq!(hit_index(0, UNITS_PER_SERVICE - 1) + 1, hit_index(1, 0));
        assert_eq!(hit_index(2, 0x0100), 2 * HIT_BUCKETS_PER_SERVICE + 1);
    }
}
