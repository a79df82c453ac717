//! The encapsulation between cluster hosts: a packet whose owner runs on
//! another host is sent there whole, its IP packet wrapped in GUE over UDP
//! (draft-ietf-intarea-gue, variant 0):
//!
//! ```text
//! Ethernet | outer IPv4 (20) or IPv6 (40) | UDP (8) | GUE (4) | private (8) | inner IP packet
//! ```
//!
//! Why GUE over UDP, not IPIP: receiving NICs spread UDP over their queues
//! by the ports (RSS), and the source port here is taken from the inner
//! flow's key, so one host's traffic to another fans out over the
//! receiver's CPUs while each flow stays in order; IPIP is hashed by the
//! two host addresses only, one queue for everything. GUE's private data
//! carries what the receiver needs and IPIP has no room for: the instance
//! the sender chose (so a pinned flow reaches its pinned owner even while
//! the hosts' owner tables differ), and the group's previous owner (the
//! "second chance" of a connection whose group moved).
//!
//! Overhead: 40 bytes over an IPv4 underlay, 60 over IPv6 (the inner
//! Ethernet header is dropped and the outer one takes its place). A packet
//! that would exceed the underlay MTU is not sent (see the XDP program).
//!
//! Everything here is plain functions on byte arrays, shared by the XDP
//! program and the agent's tests.

use crate::maps::{FAMILY_V4, FAMILY_V6, PROTO_UDP};

/// GUE's port (IANA); `cluster.encap_port` may choose another.
pub const DEFAULT_ENCAP_PORT: u16 = 6080;
/// `Gue::previous` of a packet sent to a unit's previous owner (its second
/// chance): delivered to the target as it is, never passed on again.
pub const SECOND_CHANCE: u16 = 0xFFFF;
/// Bytes of GUE private data: target instance, the service's VLAN,
/// previous owner, reserved (16 bits each, big-endian).
pub const GUE_PRIVATE_LEN: usize = 8;
/// GUE header with its private data.
pub const GUE_LEN: usize = 4 + GUE_PRIVATE_LEN;
/// Outer IPv4 + UDP + GUE.
pub const OUTER_V4_LEN: usize = 20 + 8 + GUE_LEN;
/// Outer IPv6 + UDP + GUE.
pub const OUTER_V6_LEN: usize = 40 + 8 + GUE_LEN;
/// GUE's Hlen: the private data in 32-bit words.
const GUE_HLEN: u8 = 2;
const _: () = assert!(GUE_HLEN as usize * 4 == GUE_PRIVATE_LEN);
/// The outer headers as `u16` lengths.
const OUTER_V4: u16 = 40;
const OUTER_V6_PAYLOAD: u16 = 20;
const _: () =
    assert!(OUTER_V4 as usize == OUTER_V4_LEN && OUTER_V6_PAYLOAD as usize + 40 == OUTER_V6_LEN);

/// TTL / hop limit of the outer header.
pub const OUTER_TTL: u8 = 64;

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;

/// Where an encapsulated packet goes and what it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// Underlay addresses as words ([`crate::key`]); IPv4 uses word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// UDP ports in host order.
    pub sport: u16,
    pub dport: u16,
}

/// What the GUE header and its private data say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gue {
    /// Family of the inner packet: `FAMILY_V4` or `FAMILY_V6`.
    pub inner_family: u8,
    /// The instance the sender chose (cluster-wide id).
    pub target: u16,
    /// The VLAN the packet arrived on (part of its service's key; the
    /// inner packet travels untagged).
    pub vlan: u16,
    /// The group's previous owner during a move, else 0.
    pub previous: u16,
}

/// The UDP source port for a packet of `key`: from the top of the dynamic
/// range, varying with the key so the receiver's RSS spreads flows.
#[inline(always)]
#[must_use]
pub const fn source_port(key: u32) -> u16 {
    // The key's low bits: its top bits are the unit, which many flows
    // share.
    let low = key.to_le_bytes();
    0xC000 | u16::from_le_bytes([low[0], low[1]]) & 0x3FFF
}

/// The GUE header and private data.
#[inline(always)]
#[must_use]
pub const fn gue_bytes(g: &Gue) -> [u8; GUE_LEN] {
    let proto = if g.inner_family == FAMILY_V6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    };
    // Version 0, C 0, Hlen in 32-bit words of optional data (the private
    // data: no flags are set), the inner protocol, no flags.
    let hlen = GUE_HLEN;
    let t = g.target.to_be_bytes();
    let v = g.vlan.to_be_bytes();
    let p = g.previous.to_be_bytes();
    [hlen, proto, 0, 0, t[0], t[1], v[0], v[1], p[0], p[1], 0, 0]
}

/// Reads a GUE header and private data; `None` unless it is exactly what
/// [`gue_bytes`] writes (version 0, data message, this length, IPv4 or
/// IPv6 inside).
#[inline(always)]
#[must_use]
pub const fn parse_gue(b: &[u8; GUE_LEN]) -> Option<Gue> {
    if b[0] != GUE_HLEN || b[2] != 0 || b[3] != 0 || b[10] != 0 || b[11] != 0 {
        return None;
    }
    let inner_family = match b[1] {
        IPPROTO_IPIP => FAMILY_V4,
        IPPROTO_IPV6 => FAMILY_V6,
        _ => return None,
    };
    Some(Gue {
        inner_family,
        target: u16::from_be_bytes([b[4], b[5]]),
        vlan: u16::from_be_bytes([b[6], b[7]]),
        previous: u16::from_be_bytes([b[8], b[9]]),
    })
}

/// One's-complement sum of 16-bit big-endian words, folded.
#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let b = sum.to_le_bytes();
    u16::from_le_bytes([b[0], b[1]])
}

/// A header word of two bytes, for the checksum.
#[inline(always)]
const fn word(hi: u8, lo: u8) -> u32 {
    ((hi as u32) << 8) | lo as u32
}

/// Outer IPv4 + UDP + GUE for an inner IP packet of `inner_len` bytes.
/// Don't-fragment is set (an oversized packet is not sent at all); the UDP
/// checksum is 0, which IPv4 allows.
#[inline(always)]
#[must_use]
pub const fn outer_v4(tun: &Tunnel, inner_len: u16, gue: &Gue) -> [u8; OUTER_V4_LEN] {
    let total = OUTER_V4.wrapping_add(inner_len);
    let udp_len = total - 20;
    let src = tun.src[0].to_le_bytes();
    let dst = tun.dst[0].to_le_bytes();
    // The checksum over the header as written below, checksum field 0.
    let sum = 0x4500
        + total as u32
        + 0x4000
        + word(OUTER_TTL, PROTO_UDP)
        + word(src[0], src[1])
        + word(src[2], src[3])
        + word(dst[0], dst[1])
        + word(dst[2], dst[3]);
    let csum = (!fold(sum)).to_be_bytes();
    let len = total.to_be_bytes();
    let sport = tun.sport.to_be_bytes();
    let dport = tun.dport.to_be_bytes();
    let ulen = udp_len.to_be_bytes();
    let gb = gue_bytes(gue);
    [
        0x45, 0, len[0], len[1], 0, 0, 0x40, 0, OUTER_TTL, PROTO_UDP, csum[0], csum[1], src[0],
        src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], sport[0], sport[1], dport[0],
        dport[1], ulen[0], ulen[1], 0, 0, gb[0], gb[1], gb[2], gb[3], gb[4], gb[5], gb[6], gb[7],
        gb[8], gb[9], gb[10], gb[11],
    ]
}

/// Outer IPv6 + UDP + GUE for an inner IP packet of `inner_len` bytes. The
/// UDP checksum is 0: RFC 6935 allows it for tunnels, and the receiver is
/// the XDP program, which checks the sender's address instead.
#[inline(always)]
#[must_use]
pub const fn outer_v6(tun: &Tunnel, inner_len: u16, gue: &Gue) -> [u8; OUTER_V6_LEN] {
    let payload = OUTER_V6_PAYLOAD.wrapping_add(inner_len).to_be_bytes();
    let sport = tun.sport.to_be_bytes();
    let dport = tun.dport.to_be_bytes();
    let gb = gue_bytes(gue);
    let [s0, s1, s2, s3] = [
        tun.src[0].to_le_bytes(),
        tun.src[1].to_le_bytes(),
        tun.src[2].to_le_bytes(),
        tun.src[3].to_le_bytes(),
    ];
    let [d0, d1, d2, d3] = [
        tun.dst[0].to_le_bytes(),
        tun.dst[1].to_le_bytes(),
        tun.dst[2].to_le_bytes(),
        tun.dst[3].to_le_bytes(),
    ];
    // Written out whole: a zeroed array filled in place would cost the
    // data path a byte-wise memset.
    [
        0x60, 0, 0, 0, payload[0], payload[1], PROTO_UDP, OUTER_TTL, //
        s0[0], s0[1], s0[2], s0[3], s1[0], s1[1], s1[2], s1[3], //
        s2[0], s2[1], s2[2], s2[3], s3[0], s3[1], s3[2], s3[3], //
        d0[0], d0[1], d0[2], d0[3], d1[0], d1[1], d1[2], d1[3], //
        d2[0], d2[1], d2[2], d2[3], d3[0], d3[1], d3[2], d3[3], //
        sport[0], sport[1], dport[0], dport[1], payload[0], payload[1], 0, 0, //
        gb[0], gb[1], gb[2], gb[3], gb[4], gb[5], gb[6], gb[7], gb[8], gb[9], gb[10], gb[11],
    ]
}

/// Outer header length for an underlay of `family`.
#[inline(always)]
#[must_use]
pub const fn outer_len(family: u8) -> usize {
    if family == FAMILY_V4 {
        OUTER_V4_LEN
    } else {
        OUTER_V6_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_le_bytes(a), 0, 0, 0]
    }

    /// The RFC 1071 checksum of a whole header (checksum field included)
    /// is 0 when the field is right.
    fn verify(hdr: &[u8]) -> u16 {
        let mut sum = 0u32;
        for w in hdr.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        !fold(sum)
    }

    #[test]
    fn gue_round_trips_and_refuses_anything_else() {
        for fam in [FAMILY_V4, FAMILY_V6] {
            let g = Gue {
                inner_family: fam,
                target: 0x0102,
                vlan: 100,
                previous: 7,
            };
            assert_eq!(parse_gue(&gue_bytes(&g)), Some(g));
        }
        let good = gue_bytes(&Gue {
            inner_family: FAMILY_V4,
            target: 1,
            vlan: 0,
            previous: 0,
        });
        for (i, v) in [(0, 0x40), (0, 3), (1, 17), (2, 0x80), (3, 1), (11, 1)] {
            let mut b = good;
            b[i] = v;
            assert_eq!(parse_gue(&b), None, "byte {i} = {v:#x}");
        }
    }

    #[test]
    fn outer_v4_is_a_valid_header() {
        let t = Tunnel {
            src: words4([198, 18, 10, 1]),
            dst: words4([198, 18, 10, 2]),
            sport: source_port(0xdead_beef),
            dport: DEFAULT_ENCAP_PORT,
        };
        let g = Gue {
            inner_family: FAMILY_V6,
            target: 42,
            vlan: 0,
            previous: 0,
        };
        let o = outer_v4(&t, 1000, &g);
        assert_eq!(o[0], 0x45);
        assert_eq!(u16::from_be_bytes([o[2], o[3]]), 1040);
        assert_eq!(verify(&o[..20]), 0, "header checksum");
        assert_eq!(&o[12..16], &[198, 18, 10, 1]);
        assert_eq!(&o[16..20], &[198, 18, 10, 2]);
        assert_eq!(u16::from_be_bytes([o[22], o[23]]), 6080);
        assert_eq!(u16::from_be_bytes([o[24], o[25]]), 1020, "UDP length");
        let mut gue = [0u8; GUE_LEN];
        gue.copy_from_slice(&o[28..]);
        assert_eq!(parse_gue(&gue), Some(g));
    }

    #[test]
    fn outer_v4_checksum_holds_for_any_addresses_and_length() {
        let mut x = 0x1234_5678u32;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let t = Tunnel {
                src: [x, 0, 0, 0],
                dst: [x.rotate_left(7), 0, 0, 0],
                sport: 1,
                dport: 2,
            };
            let len = (x % 9000) as u16;
            let o = outer_v4(&t, len, &gue_fixture());
            assert_eq!(verify(&o[..20]), 0, "{x:#x} {len}");
        }
    }

    fn gue_fixture() -> Gue {
        Gue {
            inner_family: FAMILY_V4,
            target: 1,
            vlan: 7,
            previous: 2,
        }
    }

    #[test]
    fn outer_v6_carries_the_addresses_and_lengths() {
        let src = [0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let t = Tunnel {
            src: crate::key::words16(&src),
            dst: crate::key::words16(&dst),
            sport: 50000,
            dport: 6080,
        };
        let o = outer_v6(&t, 1280, &gue_fixture());
        assert_eq!(o[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([o[4], o[5]]), 1280 + 20);
        assert_eq!(o[6], PROTO_UDP);
        assert_eq!(&o[8..24], &src);
        assert_eq!(&o[24..40], &dst);
        assert_eq!(u16::from_be_bytes([o[40], o[41]]), 50000);
        assert_eq!(u16::from_be_bytes([o[44], o[45]]), 1280 + 20);
        assert_eq!(outer_len(FAMILY_V6), o.len());
    }

    #[test]
    fn the_source_port_is_in_the_dynamic_range_and_follows_the_key() {
        assert!(source_port(0) >= 0xC000);
        assert_ne!(source_port(1), source_port(2));
        assert_eq!(source_port(0xffff_0001), source_port(0x0000_0001));
    }
}
