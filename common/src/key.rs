//! The one key hash of Sluice: murmur3 (32-bit) over 32-bit words.
//!
//! Words are packet bytes in wire order read as little-endian integers — what
//! a plain 4-byte load gives on `bpfel` — so the XDP program hashes header
//! fields without byte swaps and the host gets the same words with
//! `u32::from_le_bytes`. The finalizer matters: units are the *top* bits of
//! the key, and murmur3's fmix spreads every input bit into them.

/// Fixed seed: both sides must agree, and the key space must not move
/// between agent restarts.
pub const SEED: u32 = 0x0051_1ce5;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Key of an IPv4 flow. `ports` is the first 4 bytes of the UDP/TCP header
/// (source port, destination port) read as one word.
#[inline(always)]
#[must_use]
pub const fn flow_v4(src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let mut h = mix(SEED, src);
    h = mix(h, dst);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h, 13)
}

/// Key of an IPv6 flow; addresses as four words each.
#[inline(always)]
#[must_use]
pub const fn flow_v6(src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> u32 {
    let mut h = mix(SEED, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h, 37)
}

/// Key of a workload tag of `len` bytes (`1..=16`), zero-padded to 16 bytes
/// and read as four words. Always four rounds: the cost does not depend on
/// the tag's length, and the length is folded in so that `ab` and `ab\0`
/// differ.
#[inline(always)]
#[must_use]
pub const fn tag(words: &[u32; 4], len: u32) -> u32 {
    let mut h = mix(SEED ^ 0x7a6, words[0]);
    h = mix(h, words[1]);
    h = mix(h, words[2]);
    h = mix(h, words[3]);
    finish(h, len)
}

/// Key of a tag given as bytes (host side). Bytes past 16 are ignored; the
/// agent's config validation keeps tags at most 16 bytes long.
#[must_use]
pub fn tag_bytes(bytes: &[u8]) -> u32 {
    let mut padded = [0u8; 16];
    let n = bytes.len().min(16);
    padded[..n].copy_from_slice(&bytes[..n]);
    tag(&words16(&padded), u32::try_from(n).unwrap_or(16))
}

/// Key of an application-layer key of any length (an HTTP request's user
/// id): up to 16 bytes it is the tag key of the same bytes, so a user keyed
/// by a packet tag and by a request header lands on the same unit; longer
/// ones are hashed whole, 4 bytes a round.
#[must_use]
pub fn request(bytes: &[u8]) -> u32 {
    if bytes.len() <= 16 {
        return tag_bytes(bytes);
    }
    let mut h = SEED ^ 0x7a6;
    let mut words = bytes.chunks_exact(4);
    for w in &mut words {
        h = mix(h, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut tail = [0u8; 4];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = mix(h, u32::from_le_bytes(tail));
    #[expect(clippy::cast_possible_truncation, reason = "folded in mod 2^32")]
    finish(h, bytes.len() as u32)
}

/// The 16 tag bytes as the four words [`tag`] hashes.
#[inline(always)]
#[must_use]
pub const fn words16(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The tag of an IPv6 flow label: its 3 bytes in wire order, the top nibble
/// (traffic class) cleared. `first_word` is the first 4 bytes of the IPv6
/// header read as one little-endian word.
#[inline(always)]
#[must_use]
pub const fn flow_label_tag(first_word: u32) -> [u32; 4] {
    // Bytes 1..4 of the header hold the 20-bit label under 4 bits of traffic
    // class; shift them down to tag bytes 0..3.
    [(first_word >> 8) & 0x00ff_ff0f, 0, 0, 0]
}

/// Length, in bytes, that a flow-label tag is hashed with.
pub const FLOW_LABEL_TAG_LEN: u32 = 3;

/// Host-side helpers building the words from addresses and ports.
pub mod host {
    /// Word of an IPv4 address.
    #[must_use]
    pub const fn v4(addr: [u8; 4]) -> u32 {
        u32::from_le_bytes(addr)
    }

    /// Words of an IPv6 address.
    #[must_use]
    pub const fn v6(addr: [u8; 16]) -> [u32; 4] {
        super::words16(&addr)
    }

    /// The ports word: source and destination port, in host order.
    #[must_use]
    pub const fn ports(src: u16, dst: u16) -> u32 {
        let s = src.to_be_bytes();
        let d = dst.to_be_bytes();
        u32::from_le_bytes([s[0], s[1], d[0], d[1]])
    }

    /// Destination port from a ports word.
    #[must_use]
    pub const fn dst_port(ports: u32) -> u16 {
        let b = ports.to_le_bytes();
        u16::from_be_bytes([b[2], b[3]])
    }

    /// Flow key of a 5-tuple given as socket addresses (both of one
    /// family) and an IP protocol number.
    #[must_use]
    pub fn flow(src: core::net::SocketAddr, dst: core::net::SocketAddr, proto: u8) -> u32 {
        use core::net::IpAddr;
        let ports = ports(src.port(), dst.port());
        match (src.ip(), dst.ip()) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                super::flow_v6(&v6(s.octets()), &v6(d.octets()), ports, proto)
            }
            (s, d) => super::flow_v4(v4(ip4(s)), v4(ip4(d)), ports, proto),
        }
    }

    /// The IPv4 octets of an address (IPv4-mapped IPv6 included; other IPv6
    /// addresses give 0.0.0.0, which no flow of a v4 service has).
    fn ip4(a: core::net::IpAddr) -> [u8; 4] {
        match a {
            core::net::IpAddr::V4(a) => a.octets(),
            core::net::IpAddr::V6(a) => a.to_ipv4_mapped().map_or([0; 4], |a| a.octets()),
        }
    }

    /// Tag of an IPv6 flow label given as its 20-bit value.
    #[must_use]
    pub const fn flow_label_key(label: u32) -> u32 {
        let b = (label & 0x000f_ffff).to_be_bytes();
        let first = u32::from_le_bytes([0, b[1], b[2], b[3]]);
        super::tag(&super::flow_label_tag(first), super::FLOW_LABEL_TAG_LEN)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::unit_of;

    #[test]
    fn request_keys_match_tags_up_to_16_bytes_and_spread_beyond() {
        assert_eq!(request(b"alice"), tag_bytes(b"alice"));
        assert_eq!(request(&[7; 16]), tag_bytes(&[7; 16]));
        // Past 16 bytes every byte counts (tag_bytes would ignore the tail).
        let a = request(b"user-0000000000000000001");
        let b = request(b"user-0000000000000000002");
        assert_ne!(a, b);
        assert_ne!(request(&[1; 17]), request(&[1; 18]));
        let units: HashSet<u32> = (0..1000)
            .map(|i| unit_of(request(std::format!("a-long-user-name-{i:08}").as_bytes())))
            .collect();
        assert!(
            units.len() > 980,
            "1000 long keys fell on {} units",
            units.len()
        );
    }

    #[test]
    fn ports_word_round_trips_destination_port() {
        assert_eq!(host::dst_port(host::ports(1234, 7000)), 7000);
        assert_eq!(host::ports(0x0102, 0x0304).to_le_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn tag_length_is_part_of_the_key() {
        assert_ne!(tag_bytes(b"ab"), tag_bytes(b"ab\0"));
        assert_eq!(tag_bytes(b"tenant-7"), tag_bytes(b"tenant-7"));
    }

    /// Servers outside Rust compute tag keys themselves (to choose QUIC
    /// connection ids in their own units): these values are the contract
    /// the README quotes, and a key space that must not move.
    #[test]
    fn tag_keys_are_the_documented_values() {
        assert_eq!(tag_bytes(&[1, 2, 3, 4, 5, 6, 7, 8]), 0x5d8f_5c51);
        assert_eq!(tag_bytes(b"tenant-7"), 0xe880_4820);
        assert_eq!(unit_of(tag_bytes(b"tenant-7")), 0xe880);
    }

    #[test]
    fn flow_label_tag_masks_traffic_class() {
        // Header bytes: version 6, traffic class 0xab, label 0x12345.
        let first = u32::from_le_bytes([0x6a, 0xb1, 0x23, 0x45]);
        let w = flow_label_tag(first);
        assert_eq!(w[0].to_le_bytes(), [0x01, 0x23, 0x45, 0]);
        assert_eq!(
            tag(&w, FLOW_LABEL_TAG_LEN),
            host::flow_label_key(0x12345),
            "host and wire forms of the same label must hash alike"
        );
    }

    #[test]
    fn flow_keys_fill_the_units_evenly() {
        // 2^18 sequential source ports over 256 coarse buckets: murmur3's
        // finalizer must spread them within a few percent of uniform.
        let mut buckets = [0u32; 256];
        for p in 0..(1u32 << 18) {
            let ports = host::ports((p & 0xffff) as u16, 7000);
            let k = flow_v4(
                host::v4([198, 18, 0, 1 + u8::try_from(p >> 16).unwrap()]),
                1,
                ports,
                17,
            );
            buckets[(unit_of(k) >> 8) as usize] += 1;
        }
        let expect = (1u32 << 18) / 256;
        for (i, &n) in buckets.iter().enumerate() {
            assert!(
                n.abs_diff(expect) < expect / 6,
                "bucket {i} got {n}, expected about {expect}"
            );
        }
    }

    #[test]
    fn distinct_flows_rarely_collide() {
        let mut seen = HashSet::new();
        for p in 0..50_000u32 {
            seen.insert(flow_v6(&[p, 1, 2, 3], &[4, 5, 6, 7], p.rotate_left(16), 6));
        }
        // Birthday bound for 50k keys in 2^32 is < 1 expected collision.
        assert!(
            seen.len() >= 49_995,
            "too many collisions: {}",
            50_000 - seen.len()
        );
    }
}
