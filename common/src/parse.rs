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
    /// An ICMP error about this flow (IPv4 destination unreachable, IPv6
    /// destination unreachable or packet too big), addressed to the VIP by
    /// a router on the way back to the client: the fields above are the
    /// quoted packet's, source and destination swapped, so the error keys
    /// as the flow's own packets do and reaches the instance that holds the
    /// connection (its path MTU). `l4_off` is the quoted transport header's.
    pub icmp: bool,
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
    if proto == IPPROTO_ICMP {
        return icmp_v4(f, l4_off, l3 + tot_len, fixed[4]);
    }
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
        icmp: false,
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
    if next == IPPROTO_ICMPV6 {
        return icmp_v6(f, off, end, [hdr[6], hdr[7], hdr[8], hdr[9]]);
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
        icmp: false,
    })
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP destination unreachable (fragmentation needed is its code 4).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// The ICMP header before the quoted packet: type, code, checksum, and 4
/// bytes (unused, or the next hop's MTU).
const ICMP_HLEN: usize = 8;

/// The source and destination ports of a ports word swapped: the flow the
/// quoted packet (instance to client) belongs to, as the client sends it.
#[inline(always)]
const fn swap_ports(ports: u32) -> u32 {
    ports.rotate_left(16)
}

/// An `ICMPv4` error at `off` (the packet ends at `end`): the flow of the
/// UDP or TCP packet it quotes, seen from the client. Only the first 8
/// bytes of the quoted transport header are sure to be there (RFC 792):
/// the ports are all that is read of it.
#[inline(always)]
fn icmp_v4<F: Frame + ?Sized>(f: &F, off: usize, end: usize, to: u32) -> Result<Flow, Pass> {
    let h = f.load::<[u8; 2]>(off).ok_or(Pass::Truncated)?;
    if h[0] != ICMP_DEST_UNREACH {
        return Err(Pass::NotL4);
    }
    let inner = off + ICMP_HLEN;
    // Two bytes, not one: the verifier does not take a one-byte load's
    // bounds check as LLVM rewrites it (see `quic_dcid`).
    let vhl = f.load::<[u8; 2]>(inner).ok_or(Pass::Truncated)?[0];
    if vhl >> 4 != 4 {
        return Err(Pass::Malformed);
    }
    let hdr_len = usize::from(vhl & 0x0f) * 4;
    if hdr_len < 20 {
        return Err(Pass::Malformed);
    }
    let fixed = f.load::<[u32; 5]>(inner).ok_or(Pass::Truncated)?;
    let l4_off = inner + hdr_len;
    let ports = f.load::<u32>(l4_off).ok_or(Pass::Truncated)?;
    if l4_off + 4 > end {
        return Err(Pass::Truncated);
    }
    // A quoted non-first fragment carries no ports.
    let w1 = fixed[1].to_le_bytes();
    if u16::from_be_bytes([w1[2], w1[3]]) & 0x1fff != 0 {
        return Err(Pass::Fragment);
    }
    let proto = fixed[2].to_le_bytes()[1];
    // An error goes to the source of the packet it quotes: one that does
    // not is no flow's (and must not reach another VIP's instances).
    if (proto != PROTO_UDP && proto != PROTO_TCP) || fixed[3] != to {
        return Err(Pass::NotL4);
    }
    Ok(Flow {
        family: FAMILY_V4,
        proto,
        src: [fixed[4], 0, 0, 0],
        dst: [fixed[3], 0, 0, 0],
        ports: swap_ports(ports),
        l4_off,
        tcp_flags: 0,
        ip6_word0: 0,
        vlan_tagged: false,
        vlan: 0,
        icmp: true,
    })
}

/// An `ICMPv6` error at `off` (the packet ends at `end`): destination
/// unreachable or packet too big, quoting a UDP or TCP packet with no
/// extension headers (what a server sends back).
#[inline(always)]
fn icmp_v6<F: Frame + ?Sized>(f: &F, off: usize, end: usize, to: [u32; 4]) -> Result<Flow, Pass> {
    let h = f.load::<[u8; 2]>(off).ok_or(Pass::Truncated)?;
    if h[0] != ICMPV6_DEST_UNREACH && h[0] != ICMPV6_PACKET_TOO_BIG {
        return Err(Pass::NotL4);
    }
    let inner = off + ICMP_HLEN;
    let hdr = f.load::<[u32; 10]>(inner).ok_or(Pass::Truncated)?;
    if hdr[0].to_le_bytes()[0] >> 4 != 6 {
        return Err(Pass::Malformed);
    }
    let l4_off = inner + 40;
    let ports = f.load::<u32>(l4_off).ok_or(Pass::Truncated)?;
    if l4_off + 4 > end {
        return Err(Pass::Truncated);
    }
    let proto = hdr[1].to_le_bytes()[2];
    // As for IPv4: to the quoted packet's source only.
    if (proto != PROTO_UDP && proto != PROTO_TCP)
        || hdr[2] != to[0]
        || hdr[3] != to[1]
        || hdr[4] != to[2]
        || hdr[5] != to[3]
    {
        return Err(Pass::NotL4);
    }
    Ok(Flow {
        family: FAMILY_V6,
        proto,
        src: [hdr[6], hdr[7], hdr[8], hdr[9]],
        dst: [hdr[2], hdr[3], hdr[4], hdr[5]],
        ports: swap_ports(ports),
        l4_off,
        tcp_flags: 0,
        ip6_word0: 0,
        vlan_tagged: false,
        vlan: 0,
        icmp: true,
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
    // An ICMP error quotes what the server sent, not the client's tag: the
    // flow hash (the flow label is the server's too).
    if flow.icmp {
        return Keyed {
            key: flow.flow_key(),
            tagged: false,
            tag_missing: matches!(
                svc.tag_kind,
                TAG_UDP_PAYLOAD | TAG_QUIC_CID | TAG_IPV6_FLOW_LABEL
            ),
        };
    }
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
mod tests;
