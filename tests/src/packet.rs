//! A frame builder for tests and benchmarks: Ethernet with VLAN tags, IPv4
//! with options and fragments, IPv6 with extension headers and flow label,
//! UDP and TCP with correct checksums.

use std::net::{IpAddr, SocketAddr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0x51, 0x00, 0x00, 0x00, 0x01];
pub const NIC_MAC: [u8; 6] = [0x02, 0x51, 0x00, 0x00, 0x00, 0x02];

/// An IPv6 extension header to insert before the transport header.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options, padded to `8 * (len + 1)` bytes.
    HopByHop { len: u8 },
    /// Destination options.
    DestOpts { len: u8 },
    /// Routing header (type 0 layout, no addresses).
    Routing { len: u8 },
    /// Fragment header with a 13-bit offset (in 8-byte units) and M flag.
    Fragment { offset: u16, more: bool },
}

impl Ext {
    const fn proto(&self) -> u8 {
        match self {
            Self::HopByHop { .. } => 0,
            Self::Routing { .. } => 43,
            Self::Fragment { .. } => 44,
            Self::DestOpts { .. } => 60,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Udp,
    /// TCP with these flags (SYN = 0x02, ACK = 0x10, ...).
    Tcp(u8),
    /// Another IP protocol, with the payload as its body.
    Other(u8),
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, VLAN id), outermost first.
    pub vlans: Vec<(u16, u16)>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options, padded to a multiple of 4 bytes.
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset (8-byte units) and MF flag.
    pub ipv4_frag: (u16, bool),
    pub ipv6_ext: Vec<Ext>,
    pub flow_label: u32,
}

impl Packet {
    #[must_use]
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(src, dst, L4::Udp)
    }

    #[must_use]
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp(flags))
    }

    #[must_use]
    pub fn new(src: SocketAddr, dst: SocketAddr, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "source and destination families differ"
        );
        Self {
            dst_mac: NIC_MAC,
            src_mac: CLIENT_MAC,
            vlans: Vec::new(),
            src,
            dst,
            l4,
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            ipv4_frag: (0, false),
            ipv6_ext: Vec::new(),
            flow_label: 0,
        }
    }

    #[must_use]
    pub fn payload(mut self, p: impl Into<Vec<u8>>) -> Self {
        self.payload = p.into();
        self
    }

    #[must_use]
    pub const fn dst_mac(mut self, mac: [u8; 6]) -> Self {
        self.dst_mac = mac;
        self
    }

    #[must_use]
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    #[must_use]
    pub fn ipv4_options(mut self, opts: impl Into<Vec<u8>>) -> Self {
        self.ipv4_options = opts.into();
        self
    }

    #[must_use]
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_frag = (offset, more);
        self
    }

    #[must_use]
    pub fn ext(mut self, e: Ext) -> Self {
        self.ipv6_ext.push(e);
        self
    }

    #[must_use]
    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label;
        self
    }

    /// Offset of the IP header in the built frame.
    #[must_use]
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128 + self.payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        let transport = self.transport();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0); // end of option list
                }
                let hl = 20 + opts.len();
                let tot = hl + transport.len();
                let frag = (self.ipv4_frag.0 & 0x1fff) | if self.ipv4_frag.1 { 0x2000 } else { 0 };
                let mut h = vec![0x40 | u8::try_from(hl / 4).expect("IHL fits"), 0];
                h.extend_from_slice(&u16::try_from(tot).expect("fits").to_be_bytes());
                h.extend_from_slice(&[0x12, 0x34]);
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[64, self.proto(), 0, 0]);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                h.extend_from_slice(&opts);
                let c = checksum(&h, 0);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let ext = self.ext_bytes();
                let word0 = (6u32 << 28) | (self.flow_label & 0x000f_ffff);
                f.extend_from_slice(&word0.to_be_bytes());
                f.extend_from_slice(
                    &u16::try_from(ext.len() + transport.len())
                        .expect("fits")
                        .to_be_bytes(),
                );
                f.push(self.ipv6_ext.first().map_or(self.proto(), Ext::proto));
                f.push(64);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&ext);
            }
            _ => unreachable!("checked in new"),
        }
        f.extend_from_slice(&transport);
        f
    }

    const fn proto(&self) -> u8 {
        match self.l4 {
            L4::Udp => 17,
            L4::Tcp(_) => 6,
            L4::Other(p) => p,
        }
    }

    fn ext_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, e) in self.ipv6_ext.iter().enumerate() {
            let next = self.ipv6_ext.get(i + 1).map_or(self.proto(), Ext::proto);
            match *e {
                Ext::HopByHop { len } | Ext::DestOpts { len } | Ext::Routing { len } => {
                    let total = 8 * (usize::from(len) + 1);
                    let mut h = vec![0u8; total];
                    h[0] = next;
                    h[1] = len;
                    if let Ext::Routing { .. } = e {
                        h[2] = 0; // routing type
                        h[3] = 0; // segments left
                    } else {
                        // PadN covering the rest of the header.
                        h[2] = 1;
                        h[3] = u8::try_from(total - 4).expect("fits");
                    }
                    out.extend_from_slice(&h);
                }
                Ext::Fragment { offset, more } => {
                    let fo = (offset << 3) | u16::from(more);
                    out.extend_from_slice(&[next, 0]);
                    out.extend_from_slice(&fo.to_be_bytes());
                    out.extend_from_slice(&0x0102_0304u32.to_be_bytes());
                }
            }
        }
        out
    }

    /// The transport header and payload, with a correct checksum.
    fn transport(&self) -> Vec<u8> {
        let (sp, dp) = (self.src.port(), self.dst.port());
        let mut t = match self.l4 {
            L4::Udp => {
                let mut t = Vec::with_capacity(8 + self.payload.len());
                t.extend_from_slice(&sp.to_be_bytes());
                t.extend_from_slice(&dp.to_be_bytes());
                t.extend_from_slice(
                    &u16::try_from(8 + self.payload.len())
                        .expect("fits")
                        .to_be_bytes(),
                );
                t.extend_from_slice(&[0, 0]);
                t
            }
            L4::Tcp(flags) => {
                let mut t = Vec::with_capacity(20 + self.payload.len());
                t.extend_from_slice(&sp.to_be_bytes());
                t.extend_from_slice(&dp.to_be_bytes());
                t.extend_from_slice(&1000u32.to_be_bytes());
                t.extend_from_slice(&0u32.to_be_bytes());
                t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
                t
            }
            L4::Other(_) => Vec::new(),
        };
        t.extend_from_slice(&self.payload);
        let csum_at = match self.l4 {
            L4::Udp => 6,
            L4::Tcp(_) => 16,
            L4::Other(_) => return t,
        };
        let pseudo = pseudo_header_sum(self.src.ip(), self.dst.ip(), self.proto(), t.len());
        let mut c = checksum(&t, pseudo);
        if c == 0 && matches!(self.l4, L4::Udp) {
            c = 0xffff;
        }
        t[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        t
    }
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut b = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        _ => unreachable!("same family"),
    }
    b.extend_from_slice(&u32::try_from(len).expect("fits").to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, proto]);
    sum16(&b)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// What a router on the way back to `client`'s sender sends the VIP when
/// the server's answer (addresses and ports swapped; an ACK for TCP, 1,400
/// bytes of payload for UDP) does not fit its next hop: an `ICMPv4`
/// "fragmentation needed" (next-hop MTU 1400) or an `ICMPv6` "packet too
/// big" (1280), quoting the first `quoted` bytes of the answer's IP
/// packet, in a frame addressed to the host as `client`'s own are.
#[must_use]
pub fn icmp_error(client: &Packet, quoted: usize) -> Vec<u8> {
    let reply = match client.l4 {
        L4::Tcp(_) => Packet::tcp(client.dst, client.src, 0x10),
        _ => Packet::udp(client.dst, client.src).payload(vec![0x5a; 1400]),
    }
    .build();
    let mut frame = client.build()[..14].to_vec();
    let quote = &reply[14..reply.len().min(14 + quoted)];
    match client.dst.ip() {
        IpAddr::V4(vip) => {
            let tot = u16::try_from(20 + 8 + quote.len())
                .expect("small")
                .to_be_bytes();
            frame.extend_from_slice(&[0x45, 0, tot[0], tot[1], 0, 1, 0, 0, 64, 1, 0, 0]);
            frame.extend_from_slice(&[198, 18, 2, 1]);
            frame.extend_from_slice(&vip.octets());
            frame.extend_from_slice(&[3, 4, 0, 0, 0, 0, 0x05, 0x78]);
        }
        IpAddr::V6(vip) => {
            let plen = u16::try_from(8 + quote.len()).expect("small").to_be_bytes();
            frame.extend_from_slice(&[0x60, 0, 0, 0, plen[0], plen[1], 58, 64]);
            frame.extend_from_slice(&[0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
            frame.extend_from_slice(&vip.octets());
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0x05, 0x00]);
        }
    }
    frame.extend_from_slice(quote);
    frame
}

/// Internet checksum of `b`, starting from a partial sum.
#[must_use]
pub fn checksum(b: &[u8], initial: u32) -> u16 {
    let mut s = initial + sum16(b);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).expect("folded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let f = Packet::udp(
            "198.18.0.1:1000".parse().unwrap(),
            "198.18.1.1:7000".parse().unwrap(),
        )
        .payload(b"abc".to_vec())
        .ipv4_options([1, 1, 1, 1])
        .build();
        assert_eq!(
            checksum(&f[14..38], 0),
            0,
            "header with options sums to zero"
        );
        assert_eq!(f[14], 0x46);
    }

    #[test]
    fn udp_checksum_verifies() {
        let p = Packet::udp(
            "198.18.0.1:1000".parse().unwrap(),
            "198.18.1.1:7000".parse().unwrap(),
        )
        .payload(b"hello".to_vec());
        let f = p.build();
        let udp = &f[34..];
        let pseudo = pseudo_header_sum(p.src.ip(), p.dst.ip(), 17, udp.len());
        assert_eq!(checksum(udp, pseudo), 0);
    }
}
