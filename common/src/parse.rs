//! The packet parser of the data path, written once over a [`Frame`] so the
//! XDP program (direct packet access) and the host (a byte slice) run the
//! same code. Every step is bounded: one VLAN tag and at most
//! [`MAX_IPV6_EXT_HEADERS`] extension headers.

use crate::{
    MAX_IPV6_EXT_HEADERS, MAX_QUIC_CID_LEN, MAX_TAG_LEN, counters, key,
    maps::{
        FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, PinKey, ServiceEntry, ServiceKey,
        TAG_IPV6_FLOW_LABEL, TAG_QUIC_CID, TAG_UDP_PAYLOAD,
    },
};

/// Types for which every bit pattern of their size is a valid value — no
/// padding, no invalid values, no pointers — so they may be read straight
/// from packet bytes. Sealed: only the integers and integer arrays below.
///
/// # Safety
///
/// An implementor must be valid for any `size_of::<Self>()` bytes.
pub unsafe trait FromBytes: Copy + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! from_bytes {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        // SAFETY: a primitive integer: every bit pattern is a value.
        unsafe impl FromBytes for $t {}
        impl<const N: usize> sealed::Sealed for [$t; N] {}
        // SAFETY: an array of such integers, with no padding between them.
        unsafe impl<const N: usize> FromBytes for [$t; N] {}
    )*};
}
from_bytes!(u8, u16, u32, u64);

/// Bytes of a frame, however they are reached.
pub trait Frame {
    /// Length of the frame in bytes.
    fn size(&self) -> usize;
    /// `size_of::<T>()` bytes at `off`, if the frame holds them all.
    fn load<T: FromBytes>(&self, off: usize) -> Option<T>;
    /// The `len` bytes (`1..=16`) at `off`, zero-padded to 16 and read as
    /// four little-endian words ([`key::words16`]); `None` if the frame
    /// does not hold them. Words, not a byte buffer: in the data path a
    /// byte buffer costs a byte-wise zeroing loop.
    fn load_tag(&self, off: usize, len: usize) -> Option<[u32; 4]>;
}

impl Frame for [u8] {
    fn size(&self) -> usize {
        self.len()
    }

    fn load<T: FromBytes>(&self, off: usize) -> Option<T> {
        let bytes = self.get(off..off.checked_add(size_of::<T>())?)?;
        // SAFETY: `bytes` holds exactly size_of::<T>() bytes, and `T:
        // FromBytes` is valid for any bit pattern.
        Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
    }

    fn load_tag(&self, off: usize, len: usize) -> Option<[u32; 4]> {
        let mut buf = [0u8; 16];
        match (self.get(off..off.saturating_add(len)), buf.get_mut(..len)) {
            (Some(src), Some(dst)) if len > 0 => {
                dst.copy_from_slice(src);
                Some(key::words16(&buf))
            }
            _ => None,
        }
    }
}

/// Why a frame is passed to the kernel untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    NotIp,
    /// More than one VLAN tag (802.1ad stacking): not steered, since a
    /// service names one VLAN and the instance's veth carries none.
    StackedVlan,
    Truncated,
    Malformed,
    Fragment,
    NotL4,
    NoService,
}

impl Pass {
    /// The global counter this reason is counted in.
    #[inline(always)]
    #[must_use]
    pub const fn counter(self) -> u32 {
        match self {
            Self::NotIp => counters::PASS_NOT_IP,
            Self::StackedVlan => counters::PASS_STACKED_VLAN,
            Self::Truncated => counters::PASS_TRUNCATED,
            Self::Malformed => counters::PASS_MALFORMED,
            Self::Fragment => counters::PASS_FRAGMENT,
            Self::NotL4 => counters::PASS_NOT_L4,
            Self::NoService => counters::PASS_NO_SERVICE,
        }
    }
}

/// The transport flow of a parsed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub family: u8,
    pub proto: u8,
    /// Addresses as words ([`crate::key`]); IPv4 uses word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Source and destination port, the first 4 bytes of the L4 header.
    pub ports: u32,
    /// Offset of the UDP/TCP header.
    pub l4_off: usize,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP.
    pub tcp_flags: u8,
    /// First word of the IPv6 header (version, class, flow label); 0 for v4.
    pub ip6_word0: u32,
    /// The frame carries one VLAN tag (to pop before delivery).
    pub vlan_tagged: bool,
    /// Its VLAN id; 0 when untagged or priority-tagged.
    pub vlan: u16,
}

impl Flow {
    /// Key of the service map this flow is looked up under.
    #[inline(always)]
    #[must_use]
    pub const fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.dst,
            port_be: (self.ports >> 16) as u16,
            proto: self.proto,
            family: self.family,
            vlan: self.vlan,
            pad: 0,
        }
    }

    /// Key of the pinned-flow map.
    #[inline(always)]
    #[must_use]
    pub const fn pin_key(&self) -> PinKey {
        PinKey {
            src: self.src,
            dst: self.dst,
            ports: self.ports,
            proto: self.proto,
            family: self.family,
            pad: 0,
        }
    }

    /// The flow hash of the 5-tuple.
    #[inline(always)]
    #[must_use]
    pub const fn flow_key(&self) -> u32 {
        if self.family == FAMILY_V4 {
            key::flow_v4(self.src[0], self.dst[0], self.ports, self.proto)
        } else {
            key::flow_v6(&self.src, &self.dst, self.ports, self.proto)
        }
    }
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_HLEN: usize = 14;

/// Parses Ethernet, one VLAN tag, IPv4 or IPv6, and UDP or TCP.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(f: &F) -> Result<Flow, Pass> {
    let mut ethertype = u16::from_be(f.load::<u16>(12).ok_or(Pass::Truncated)?);
    let mut l3 = ETH_HLEN;
    let mut vlan = None;
    if is_vlan(ethertype) {
        // A tag is 2 bytes of TCI, then the inner ethertype.
        let tag = f.load::<[u16; 2]>(ETH_HLEN).ok_or(Pass::Truncated)?;
        vlan = Some(u16::from_be(tag[0]) & 0x0fff);
        ethertype = u16::from_be(tag[1]);
        l3 += 4;
        if is_vlan(ethertype) {
            return Err(Pass::StackedVlan);
        }
    }
    let mut flow = match ethertype {
        ETH_P_IP => parse_v4(f, l3),
        ETH_P_IPV6 => parse_v6(f, l3),
        _ => Err(Pass::NotIp),
    }?;
    if let Some(vid) = vlan {
        flow.vlan_tagged = true;
        flow.vlan = vid;
    }
    Ok(flow)
}

#[inline(always)]
const fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Bytes of a VLAN tag, which the data path pops before delivery: the
/// instance's veth carries untagged frames only. The tag sits at
/// `12..12 + VLAN_TAG_LEN`.
pub const VLAN_TAG_LEN: usize = 4;

#[inline(always)]
fn parse_v4<F: Frame + ?Sized>(f: &F, l3: usize) -> Result<Flow, Pass> {
    let vhl = f.load::<u8>(l3).ok_or(Pass::Truncated)?;
    if vhl >> 4 != 4 {
        return Err(Pass::Malformed);
    }
    let hdr_len = usize::from(vhl & 0x0f) * 4;
    if hdr_len < 20 {
        return Err(Pass::Malformed);
    }
    // Fixed part first, then the options: both must be in the frame.
    let fixed = f.load::<[u32; 5]>(l3).ok_or(Pass::Truncated)?;
    if f.load::<u8>(l3 + hdr_len - 1).is_none() {
        return Err(Pass::Truncated);
    }
    let w0 = fixed[0].to_le_bytes();
    let tot_len = usize::from(u16::from_be_bytes([w0[2], w0[3]]));
    if tot_len < hdr_len {
        return Err(Pass::Malformed);
    }
    if l3 + tot_len > f.size() {
        return Err(Pass::Truncated);
    }
    let w1 = fixed[1].to_le_bytes();
    // MF flag or a fragment offset: a fragment.
    if u16::from_be_bytes([w1[2], w1[3]]) & 0x3fff != 0 {
        return Err(Pass::Fragment);
    }
    let proto = fixed[2].to_le_bytes()[1];
    let l4_off = l3 + hdr_len;
    let (ports, tcp_flags) = parse_l4(f, proto, l4_off, l3 + tot_len)?;
    Ok(Flow {
        family: FAMILY_V4,
        proto,
        src: [fixed[3], 0, 0, 0],
        dst: [fixed[4], 0, 0, 0],
        ports,
        l4_off,
        tcp_flags,
        ip6_word0: 0,
        vlan_tagged: false,
        vlan: 0,
    })
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

#[inline(always)]
fn parse_v6<F: Frame + ?Sized>(f: &F, l3: usize) -> Result<Flow, Pass> {
    let word0 = f.load::<u32>(l3).ok_or(Pass::Truncated)?;
    if word0.to_le_bytes()[0] >> 4 != 6 {
        return Err(Pass::Malformed);
    }
    let hdr = f.load::<[u32; 10]>(l3).ok_or(Pass::Truncated)?;
    let w1 = hdr[1].to_le_bytes();
    let payload_len = usize::from(u16::from_be_bytes([w1[0], w1[1]]));
    let end = l3 + 40 + payload_len;
    if end > f.size() {
        return Err(Pass::Truncated);
    }
    let mut next = w1[2];
    let mut off = l3 + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h = f.load::<[u8; 2]>(off).ok_or(Pass::Truncated)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let h = f.load::<[u8; 2]>(off).ok_or(Pass::Truncated)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let h = f.load::<[u8; 4]>(off).ok_or(Pass::Truncated)?;
                // Offset (13 bits) or M flag set: a real fragment. An atomic
                // fragment (both zero) carries the whole datagram.
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                    return Err(Pass::Fragment);
                }
                next = h[0];
                off += 8;
            }
            _ => break,
        }
        if off > end {
            return Err(Pass::Truncated);
        }
        walked += 1;
    }
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    ) {
        // Longer chain than we walk: not ours to judge, but not steerable.
        return Err(Pass::Malformed);
    }
    let (ports, tcp_flags) = parse_l4(f, next, off, end)?;
    Ok(Flow {
        family: FAMILY_V6,
        proto: next,
        src: [hdr[2], hdr[3], hdr[4], hdr[5]],
        dst: [hdr[6], hdr[7], hdr[8], hdr[9]],
        ports,
        l4_off: off,
        tcp_flags,
        ip6_word0: word0,
        vlan_tagged: false,
        vlan: 0,
    })
}

/// Checks the UDP/TCP header at `off` (the IP packet ends at `end`) and
/// returns its ports word and TCP flags.
#[inline(always)]
fn parse_l4<F: Frame + ?Sized>(
    f: &F,
    proto: u8,
    off: usize,
    end: usize,
) -> Result<(u32, u8), Pass> {
    match proto {
        PROTO_UDP => {
            let h = f.load::<[u32; 2]>(off).ok_or(Pass::Truncated)?;
            if off + 8 > end {
                return Err(Pass::Truncated);
            }
            let b = h[1].to_le_bytes();
            // A datagram longer than its IP packet is malformed (the kernel
            // drops it too); a key read by its length would reach padding.
            let udp_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
            if udp_len < 8 || udp_len > end - off {
                return Err(Pass::Malformed);
            }
            Ok((h[0], 0))
        }
        PROTO_TCP => {
            let h = f.load::<[u32; 5]>(off).ok_or(Pass::Truncated)?;
            if off + 20 > end {
                return Err(Pass::Truncated);
            }
            let w3 = h[3].to_le_bytes();
            let doff = usize::from(w3[0] >> 4) * 4;
            if doff < 20 || doff > end - off {
                return Err(Pass::Malformed);
            }
            Ok((h[0], w3[1]))
        }
        _ => Err(Pass::NotL4),
    }
}

/// The key of a packet of a service, and whether its tag made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keyed {
    pub key: u32,
    /// The service has a tag kind and the packet carried the tag.
    pub tagged: bool,
    /// The service has a tag kind but the packet lacked it.
    pub tag_missing: bool,
}

/// The packet's key under `svc`'s tag spec: the tag if the service has one
/// and the packet carries it, else the flow hash.
#[inline(always)]
pub fn key_for<F: Frame + ?Sized>(f: &F, flow: &Flow, svc: &ServiceEntry) -> Keyed {
    let tag = match svc.tag_kind {
        TAG_UDP_PAYLOAD | TAG_QUIC_CID => datagram_tag(f, flow, svc),
        TAG_IPV6_FLOW_LABEL if flow.family == FAMILY_V6 => {
            let words = key::flow_label_tag(flow.ip6_word0);
            (words[0] != 0).then(|| key::tag(&words, key::FLOW_LABEL_TAG_LEN))
        }
        TAG_IPV6_FLOW_LABEL => None,
        _ => {
            return Keyed {
                key: flow.flow_key(),
                tagged: false,
                tag_missing: false,
            };
        }
    };
    match tag {
        Some(key) => Keyed {
            key,
            tagged: true,
            tag_missing: false,
        },
        None => Keyed {
            key: flow.flow_key(),
            tagged: false,
            tag_missing: true,
        },
    }
}

/// The key of a tag read from the datagram: at a fixed offset into the
/// payload (`TAG_UDP_PAYLOAD`) or into the QUIC destination connection id
/// (`TAG_QUIC_CID`). Both kinds share this one read.
#[inline(always)]
fn datagram_tag<F: Frame + ?Sized>(f: &F, flow: &Flow, svc: &ServiceEntry) -> Option<u32> {
    if flow.proto != PROTO_UDP || svc.tag_len == 0 || u32::from(svc.tag_len) > MAX_TAG_LEN {
        return None;
    }
    let len = usize::from(svc.tag_len);
    // The tag must lie inside the datagram, not just inside the frame
    // (Ethernet pads short frames).
    let udp_len = usize::from(u16::from_be(f.load::<u16>(flow.l4_off + 4)?));
    let payload = flow.l4_off + 8;
    let end = flow.l4_off + udp_len;
    let start = if svc.tag_kind == TAG_QUIC_CID {
        quic_dcid(f, payload, end, svc)?
    } else {
        payload
    };
    let off = start + usize::from(svc.tag_offset);
    if off + len > end {
        return None;
    }
    Some(key::tag(&f.load_tag(off, len)?, u32::from(svc.tag_len)))
}

/// Where the destination connection id of the QUIC packet at `at` starts,
/// if its header parses, the id is long enough to hold `svc`'s tag, and all
/// of it lies before `end` (the datagram's end). The layout is QUIC's
/// version-independent one (RFC 8999), the 20-byte limit v1's and v2's: a
/// long header is flags, a 4-byte version, the id's length and the id; a
/// short header is flags and the id, whose length only the servers know
/// (`svc.quic_cid_len`). Coalesced packets after the first are not read:
/// the first one names the connection.
#[inline(always)]
fn quic_dcid<F: Frame + ?Sized>(f: &F, at: usize, end: usize, svc: &ServiceEntry) -> Option<usize> {
    // Two-byte loads: a header with a non-empty id has them, and the
    // verifier does not take a one-byte packet load's bounds check as
    // LLVM rewrites it (`p + 1 > end` becomes `p >= end`).
    let first = f.load::<[u8; 2]>(at)?[0];
    let (dcid, dcid_len) = if first & 0x80 != 0 {
        (at + 6, usize::from(f.load::<[u8; 2]>(at + 4)?[1]))
    } else if first & 0x40 != 0 {
        (at + 1, usize::from(svc.quic_cid_len))
    } else {
        // A short header with the fixed bit clear is not QUIC v1 (or the
        // bit was greased, RFC 9287, which the servers must not allow).
        return None;
    };
    let need = usize::from(svc.tag_offset) + usize::from(svc.tag_len);
    if dcid_len > MAX_QUIC_CID_LEN as usize || dcid_len < need || dcid + dcid_len > end {
        return None;
    }
    Some(dcid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(payload: &[u8]) -> std::vec::Vec<u8> {
        let mut v = std::vec![0u8; 12];
        v.extend_from_slice(&[0x08, 0x00]);
        let tot = u16::try_from(20 + 8 + payload.len()).unwrap().to_be_bytes();
        v.extend_from_slice(&[0x45, 0, tot[0], tot[1], 0, 1, 0x40, 0, 64, 17, 0, 0]);
        v.extend_from_slice(&[198, 18, 0, 1, 198, 18, 1, 1]);
        let ul = u16::try_from(8 + payload.len()).unwrap().to_be_bytes();
        v.extend_from_slice(&[0x30, 0x39, 0x1b, 0x58, ul[0], ul[1], 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_a_udp4_frame() {
        let f = udp4(b"hello");
        let flow = parse(f.as_slice()).unwrap();
        assert_eq!(flow.family, FAMILY_V4);
        assert_eq!(flow.proto, PROTO_UDP);
        assert_eq!(flow.l4_off, 34);
        assert_eq!(key::host::dst_port(flow.ports), 7000);
        assert_eq!(flow.dst[0], key::host::v4([198, 18, 1, 1]));
        assert_eq!(flow.service_key().port_be, 7000u16.to_be());
    }

    #[test]
    fn every_truncation_is_caught() {
        let f = udp4(b"hello");
        for cut in 0..f.len() - 5 {
            assert_eq!(
                parse(&f[..cut]),
                Err(Pass::Truncated),
                "frame cut at {cut} bytes"
            );
        }
    }

    #[test]
    fn udp_tag_inside_datagram_only() {
        let svc = ServiceEntry {
            tag_kind: TAG_UDP_PAYLOAD,
            tag_offset: 1,
            tag_len: 4,
            ..ServiceEntry::default()
        };
        let f = udp4(b"xabcd");
        let flow = parse(f.as_slice()).unwrap();
        let k = key_for(f.as_slice(), &flow, &svc);
        assert!(k.tagged);
        assert_eq!(k.key, key::tag_bytes(b"abcd"));

        // Same bytes present in the frame as Ethernet padding, but the UDP
        // length says the datagram ends earlier: the tag is missing.
        let mut short = udp4(b"xab");
        short.extend_from_slice(b"cd");
        let flow = parse(short.as_slice()).unwrap();
        let k = key_for(short.as_slice(), &flow, &svc);
        assert!(k.tag_missing && !k.tagged);
        assert_eq!(k.key, flow.flow_key());
    }

    fn quic_svc(cid_len: u16, offset: u16, len: u16) -> ServiceEntry {
        ServiceEntry {
            tag_kind: TAG_QUIC_CID,
            tag_offset: offset,
            tag_len: len,
            quic_cid_len: cid_len,
            ..ServiceEntry::default()
        }
    }

    /// The key of a UDP/IPv4 datagram carrying `payload` under `svc`.
    fn keyed(payload: &[u8], svc: &ServiceEntry) -> Keyed {
        let f = udp4(payload);
        let flow = parse(f.as_slice()).unwrap();
        key_for(f.as_slice(), &flow, svc)
    }

    fn assert_tag(payload: &[u8], svc: &ServiceEntry, tag: &[u8], what: &str) {
        let k = keyed(payload, svc);
        assert!(k.tagged && !k.tag_missing, "{what}: {k:?}");
        assert_eq!(k.key, key::tag_bytes(tag), "{what}: key of {tag:02x?}");
    }

    fn assert_missing(payload: &[u8], svc: &ServiceEntry, what: &str) {
        let f = udp4(payload);
        let flow = parse(f.as_slice()).unwrap();
        let k = key_for(f.as_slice(), &flow, svc);
        assert!(k.tag_missing && !k.tagged, "{what}: {k:?}");
        assert_eq!(
            k.key,
            flow.flow_key(),
            "{what}: falls back to the flow hash"
        );
    }

    /// A QUIC v1 long header (Initial, type bits 00): flags, version,
    /// DCID length and DCID, a 0-byte SCID, then `rest`.
    fn quic_long(dcid: &[u8], rest: &[u8]) -> std::vec::Vec<u8> {
        let mut v = std::vec![0xc3, 0, 0, 0, 1, u8::try_from(dcid.len()).unwrap()];
        v.extend_from_slice(dcid);
        v.push(0);
        v.extend_from_slice(rest);
        v
    }

    /// A QUIC short header: flags (fixed bit set), DCID, then `rest`.
    fn quic_short(dcid: &[u8], rest: &[u8]) -> std::vec::Vec<u8> {
        let mut v = std::vec![0x43];
        v.extend_from_slice(dcid);
        v.extend_from_slice(rest);
        v
    }

    const CID: [u8; 20] = *b"0123456789abcdefghij";

    #[test]
    fn quic_long_and_short_headers_key_by_the_dcid_bytes() {
        let svc = quic_svc(8, 2, 4);
        let dcid = &CID[..8];
        assert_tag(&quic_long(dcid, b"pnpayload"), &svc, b"2345", "long header");
        assert_tag(
            &quic_short(dcid, b"pnpayload"),
            &svc,
            b"2345",
            "short header",
        );
        // Handshake (type 10) and 0-RTT (01) are long headers alike; a
        // long header's DCID may differ in length from the servers' ids
        // (the client's first Initial chooses its own).
        let mut handshake = quic_long(&CID[..12], b"x");
        handshake[0] = 0xe0;
        assert_tag(&handshake, &svc, b"2345", "handshake, 12-byte DCID");
        // The flags' other bits (spin, key phase, packet number length)
        // change nothing.
        let mut short = quic_short(dcid, b"pn");
        short[0] = 0x7f;
        assert_tag(&short, &svc, b"2345", "short header, every flag bit set");
        // A different id in the tag's bytes: a different key.
        let other = quic_short(b"01ZZZZ67", b"pn");
        assert_tag(&other, &svc, b"ZZZZ", "another id");
        // Bytes of the id outside the tag do not matter.
        assert_tag(&quic_short(b"xx2345yy", b"pn"), &svc, b"2345", "outside");
    }

    #[test]
    fn quic_odd_lengths() {
        let cid = &CID[..];
        for (offset, len) in [(0, 1), (19, 1), (0, 3), (17, 3), (0, 16), (4, 16)] {
            let svc = quic_svc(20, offset, len);
            let tag = &cid[usize::from(offset)..usize::from(offset + len)];
            let what = std::format!("cid_length 20, offset {offset}, length {len}");
            assert_tag(
                &quic_long(cid, b""),
                &svc,
                tag,
                &std::format!("long, {what}"),
            );
            assert_tag(
                &quic_short(cid, b""),
                &svc,
                tag,
                &std::format!("short, {what}"),
            );
        }
        // cid_length 1: the whole id is the tag.
        assert_tag(
            &quic_short(b"Q", b"pn"),
            &quic_svc(1, 0, 1),
            b"Q",
            "1-byte ids",
        );
    }

    #[test]
    fn quic_truncated_headers_fall_back_to_the_flow_hash() {
        let svc = quic_svc(8, 2, 4);
        let long = quic_long(&CID[..8], b"");
        let short = quic_short(&CID[..8], b"");
        // The whole DCID must be in the datagram: every shorter prefix of
        // its header is missing the tag, including the empty payload.
        // Flags, version, id length: 6 bytes; then the 8-byte id.
        for cut in 0..14 {
            assert_missing(
                &long[..cut],
                &svc,
                &std::format!("long header cut at {cut}"),
            );
        }
        assert_tag(
            &long[..14],
            &svc,
            b"2345",
            "long header ending with its DCID",
        );
        // Flags, then the 8-byte id.
        for cut in 0..9 {
            assert_missing(
                &short[..cut],
                &svc,
                &std::format!("short header cut at {cut}"),
            );
        }
        assert_tag(
            &short[..9],
            &svc,
            b"2345",
            "short header ending with its DCID",
        );
        // The same bytes as Ethernet padding, after the datagram's end,
        // do not count.
        let mut padded = udp4(&short[..5]);
        padded.extend_from_slice(&short[5..]);
        let flow = parse(padded.as_slice()).unwrap();
        assert!(
            key_for(padded.as_slice(), &flow, &svc).tag_missing,
            "padding"
        );
    }

    #[test]
    fn quic_bad_dcid_lengths_and_flags_fall_back_to_the_flow_hash() {
        let svc = quic_svc(8, 2, 4);
        // A DCID length byte over 20 is no QUIC v1 header, however many
        // bytes follow.
        for len in [21, 32, 255] {
            let mut p = quic_long(&CID, &[0u8; 300]);
            p[5] = len;
            assert_missing(&p, &svc, &std::format!("DCID length {len}"));
        }
        let mut p = quic_long(&CID, &[0u8; 300]);
        p[5] = 20;
        assert_tag(&p, &svc, b"2345", "DCID length 20");
        // A DCID too short to hold offset + length (6 bytes).
        for len in 0..6u8 {
            let p = quic_long(&CID[..usize::from(len)], b"rest of the packet");
            assert_missing(&p, &svc, &std::format!("{len}-byte DCID"));
        }
        assert_tag(&quic_long(&CID[..6], b"rest"), &svc, b"2345", "6-byte DCID");
        // A short header without the fixed bit.
        for flags in [0x00, 0x03, 0x3f] {
            let mut p = quic_short(&CID[..8], b"pn");
            p[0] = flags;
            assert_missing(&p, &svc, &std::format!("flags {flags:#04x}"));
        }
        // Service entries the agent would never write: no id length, one
        // too short for the tag, one over 20, a tag of 0 or 17 bytes.
        let short = quic_short(&CID, b"pn");
        for bad in [
            quic_svc(0, 0, 1),
            quic_svc(5, 2, 4),
            quic_svc(21, 2, 4),
            quic_svc(8, 2, 0),
            quic_svc(20, 0, 17),
        ] {
            assert_missing(&short, &bad, &std::format!("{bad:?}"));
        }
    }

    #[test]
    fn quic_cid_tags_need_udp() {
        let f = tcp4();
        let flow = parse(f.as_slice()).unwrap();
        let k = key_for(f.as_slice(), &flow, &quic_svc(8, 0, 4));
        assert!(k.tag_missing && !k.tagged, "{k:?}");
    }

    /// IPv6 with one 8-byte Hop-by-Hop header, then UDP and `payload`.
    fn udp6_hop(payload: &[u8]) -> std::vec::Vec<u8> {
        let mut v = std::vec![0u8; 12];
        v.extend_from_slice(&[0x86, 0xdd]);
        let plen = u16::try_from(8 + 8 + payload.len()).unwrap().to_be_bytes();
        v.extend_from_slice(&[0x60, 0, 0, 0, plen[0], plen[1], IPPROTO_HOPOPTS, 64]);
        for last in [1, 2] {
            v.extend_from_slice(&[0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]);
        }
        // Next header UDP, length 0 (8 bytes), a PadN option filling it.
        v.extend_from_slice(&[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        let ul = u16::try_from(8 + payload.len()).unwrap().to_be_bytes();
        v.extend_from_slice(&[0x30, 0x39, 0x1b, 0x58, ul[0], ul[1], 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    /// IPv4 and a 20-byte TCP header (SYN), no payload.
    fn tcp4() -> std::vec::Vec<u8> {
        let mut v = std::vec![0u8; 12];
        v.extend_from_slice(&[0x08, 0x00]);
        v.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        v.extend_from_slice(&[198, 18, 0, 1, 198, 18, 1, 1]);
        v.extend_from_slice(&[0x30, 0x39, 0x1b, 0x58, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02]);
        v.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        v
    }

    fn with_len(frame: &[u8], at: usize, len: usize) -> std::vec::Vec<u8> {
        let mut f = frame.to_vec();
        f[at..at + 2].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        f
    }

    #[test]
    fn a_length_ending_inside_an_extension_header_is_truncated() {
        let f = udp6_hop(b"hi");
        assert!(parse(f.as_slice()).is_ok());
        // The whole frame is there; the IPv6 payload length ends inside the
        // Hop-by-Hop header.
        for plen in 0..8 {
            assert_eq!(
                parse(with_len(&f, 18, plen).as_slice()),
                Err(Pass::Truncated),
                "payload length {plen}"
            );
        }
    }

    #[test]
    fn a_length_ending_inside_the_l4_header_is_truncated() {
        let v6 = udp6_hop(b"hi");
        for plen in 8..16 {
            assert_eq!(
                parse(with_len(&v6, 18, plen).as_slice()),
                Err(Pass::Truncated),
                "IPv6 payload length {plen}"
            );
        }
        let udp = udp4(b"hi");
        for tot in 20..28 {
            assert_eq!(
                parse(with_len(&udp, 16, tot).as_slice()),
                Err(Pass::Truncated),
                "IPv4 total length {tot}, UDP"
            );
        }
        let tcp = tcp4();
        assert_eq!(parse(tcp.as_slice()).map(|f| f.tcp_flags), Ok(0x02));
        for tot in 20..40 {
            assert_eq!(
                parse(with_len(&tcp, 16, tot).as_slice()),
                Err(Pass::Truncated),
                "IPv4 total length {tot}, TCP"
            );
        }
    }

    #[test]
    fn l4_lengths_past_the_packet_are_malformed() {
        // UDP length 9 + 2 bytes of payload claims a byte past the packet.
        let udp = udp4(b"hi");
        assert_eq!(
            parse(with_len(&udp, 38, 11).as_slice()),
            Err(Pass::Malformed)
        );
        let v6 = udp6_hop(b"hi");
        assert_eq!(
            parse(with_len(&v6, 66, 11).as_slice()),
            Err(Pass::Malformed)
        );
        // TCP data offset 6 (24 bytes) in a 20-byte segment.
        let mut tcp = tcp4();
        tcp[46] = 0x60;
        assert_eq!(parse(tcp.as_slice()), Err(Pass::Malformed));
    }

    /// The fuzz target's checks, on every seed frame under every tag kind,
    /// and on every single-byte change of those frames: what `cargo xtask
    /// fuzz` explores at length, run on each `cargo test`.
    #[test]
    fn the_fuzz_checks_hold_on_seeds_and_their_one_byte_mutations() {
        let mut vlan = udp4(b"abcdefgh");
        vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        let seeds = [
            udp4(b"abcdefgh"),
            tcp4(),
            udp6_hop(b"abcdefgh"),
            vlan,
            udp4(&quic_short(&CID[..8], b"pn")),
            udp6_hop(&quic_long(&CID, b"")),
        ];
        let mut runs = 0;
        for seed in &seeds {
            for spec in [
                [0, 0, 0, 0],
                [1, 1, 0, 4],
                [1, 0, 0, 16],
                [2, 0, 0, 0],
                // quic-cid: ids of 8 bytes, the tag 4 at 2; 20 and 16 at 4.
                [3, 2, 8 << 3, 4],
                [3, 4, 20 << 3, 16],
                [4, 9, 9, 9],
            ] {
                let mut input = spec.to_vec();
                input.extend_from_slice(seed);
                crate::fuzz::check(&input);
                for at in 4..input.len() {
                    for value in [0x00, 0x01, 0x06, 0x11, 0x2c, 0x3c, 0x45, 0x60, 0x81, 0xff] {
                        let mut m = input.clone();
                        m[at] = value;
                        crate::fuzz::check(&m);
                        runs += 1;
                    }
                }
            }
        }
        assert!(runs > 25_000, "{runs}");
        // The QUIC seeds are tagged under their specs: the reference
        // comparison runs on found tags, not only on missing ones.
        for (seed, spec) in [
            (&seeds[4], [3, 2, 8 << 3, 4]),
            (&seeds[5], [3, 4, 20 << 3, 16]),
        ] {
            let flow = parse(seed.as_slice()).unwrap();
            let k = key_for(seed.as_slice(), &flow, &crate::fuzz::spec(spec));
            assert!(k.tagged, "{spec:?}: {k:?}");
        }
    }
}
