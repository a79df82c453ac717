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
        icmp4_frag_needed(40),
        icmp6_too_big(),
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

/// An `ICMPv4` "fragmentation needed" from router 198.18.2.1 to the VIP
/// 198.18.1.1, quoting the first `quoted` bytes of the server's TCP
/// segment 198.18.1.1:7000 -> 198.18.0.1:12345 (IP header included).
fn icmp4_frag_needed(quoted: usize) -> std::vec::Vec<u8> {
    let mut inner = std::vec![0x45, 0, 5, 0xdc, 0, 2, 0x40, 0, 63, PROTO_TCP, 0, 0];
    inner.extend_from_slice(&[198, 18, 1, 1, 198, 18, 0, 1]);
    inner.extend_from_slice(&[0x1b, 0x58, 0x30, 0x39, 0, 0, 0, 9, 0, 0, 0, 7, 0x50, 0x10]);
    inner.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    inner.truncate(quoted);
    let mut v = std::vec![0u8; 12];
    v.extend_from_slice(&[0x08, 0x00]);
    let tot = u16::try_from(20 + 8 + inner.len()).unwrap().to_be_bytes();
    v.extend_from_slice(&[0x45, 0, tot[0], tot[1], 0, 3, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    v.extend_from_slice(&[198, 18, 2, 1, 198, 18, 1, 1]);
    // Type 3 code 4, checksum, unused, next-hop MTU 1400.
    v.extend_from_slice(&[ICMP_DEST_UNREACH, 4, 0, 0, 0, 0, 0x05, 0x78]);
    v.extend_from_slice(&inner);
    v
}

/// An `ICMPv6` "packet too big" (MTU 1280) to the VIP `fd00:5100::1:1`,
/// quoting the server's UDP datagram `[fd00:5100::1:1]:7000` ->
/// `[fd00:5100::2]:12345`.
fn icmp6_too_big() -> std::vec::Vec<u8> {
    let vip = [0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
    let client = [0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let router = [0xfd, 0, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let mut inner = std::vec![0x60, 0, 0, 0, 0x05, 0xc8, PROTO_UDP, 63];
    inner.extend_from_slice(&vip);
    inner.extend_from_slice(&client);
    inner.extend_from_slice(&[0x1b, 0x58, 0x30, 0x39, 0x05, 0xc8, 0, 0]);
    inner.extend_from_slice(b"payload");
    let mut v = std::vec![0u8; 12];
    v.extend_from_slice(&[0x86, 0xdd]);
    let plen = u16::try_from(8 + inner.len()).unwrap().to_be_bytes();
    v.extend_from_slice(&[0x60, 0, 0, 0, plen[0], plen[1], IPPROTO_ICMPV6, 64]);
    v.extend_from_slice(&router);
    v.extend_from_slice(&vip);
    v.extend_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0x05, 0x00]);
    v.extend_from_slice(&inner);
    v
}

/// An ICMP error keys as the flow it is about, seen from the client: the
/// quoted packet's addresses and ports swapped, so it finds the flow's
/// service, unit and pin.
#[test]
fn icmp_errors_parse_as_the_quoted_flow_seen_from_the_client() {
    for quoted in [28, 40] {
        let f = icmp4_frag_needed(quoted);
        let flow = parse(f.as_slice()).unwrap();
        let client_packet = tcp4();
        let client = parse(client_packet.as_slice()).unwrap();
        assert!(flow.icmp, "quoted {quoted}");
        assert_eq!(flow.proto, PROTO_TCP);
        assert_eq!(
            (flow.src, flow.dst, flow.ports),
            (client.src, client.dst, client.ports)
        );
        assert_eq!(flow.service_key(), client.service_key());
        assert_eq!(flow.flow_key(), client.flow_key());
        assert_eq!(flow.pin_key(), client.pin_key());
        assert_eq!(flow.tcp_flags, 0, "no SYN: it opens nothing");
        assert_eq!(flow.l4_off, 14 + 20 + 8 + 20);
    }
    let f = icmp6_too_big();
    let flow = parse(f.as_slice()).unwrap();
    assert!(flow.icmp);
    assert_eq!((flow.family, flow.proto), (FAMILY_V6, PROTO_UDP));
    assert_eq!(key::host::dst_port(flow.ports), 7000);
    assert_eq!(flow.dst[3].to_le_bytes(), [0, 1, 0, 1], "the VIP");
    assert_eq!(flow.src[3].to_le_bytes(), [0, 0, 0, 2], "the client");
}

#[test]
fn icmp_errors_keyed_by_the_flow_hash_whatever_the_tag() {
    let f = icmp6_too_big();
    let flow = parse(f.as_slice()).unwrap();
    let tagged = ServiceEntry {
        tag_kind: TAG_UDP_PAYLOAD,
        tag_offset: 0,
        tag_len: 4,
        ..ServiceEntry::default()
    };
    let k = key_for(f.as_slice(), &flow, &tagged);
    assert_eq!(
        (k.key, k.tagged, k.tag_missing),
        (flow.flow_key(), false, true)
    );
    let k = key_for(f.as_slice(), &flow, &ServiceEntry::default());
    assert_eq!(
        (k.key, k.tagged, k.tag_missing),
        (flow.flow_key(), false, false)
    );
}

#[test]
fn other_icmp_and_unusable_quotes_pass() {
    let mut echo = icmp4_frag_needed(40);
    echo[34] = 8; // echo request
    assert_eq!(parse(echo.as_slice()), Err(Pass::NotL4));
    let mut ttl = icmp4_frag_needed(40);
    ttl[34] = 11; // time exceeded: not for the flow's owner
    assert_eq!(parse(ttl.as_slice()), Err(Pass::NotL4));
    // Fewer than the ports quoted.
    assert_eq!(
        parse(icmp4_frag_needed(23).as_slice()),
        Err(Pass::Truncated)
    );
    // The quoted packet a non-first fragment: no ports in it.
    let mut frag = icmp4_frag_needed(40);
    frag[42 + 6..42 + 8].copy_from_slice(&[0, 0x10]);
    assert_eq!(parse(frag.as_slice()), Err(Pass::Fragment));
    // Quoting ICMP (an error about an error is never sent, RFC 1122).
    let mut icmp = icmp4_frag_needed(40);
    icmp[42 + 9] = IPPROTO_ICMP;
    assert_eq!(parse(icmp.as_slice()), Err(Pass::NotL4));
    let mut v6 = icmp6_too_big();
    v6[54] = 128; // echo request
    assert_eq!(parse(v6.as_slice()), Err(Pass::NotL4));
    // Sent to another address than the quoted packet's source: to one VIP
    // about another's flow, say.
    let mut elsewhere = icmp4_frag_needed(40);
    elsewhere[33] = 2; // outer destination 198.18.1.2
    assert_eq!(parse(elsewhere.as_slice()), Err(Pass::NotL4));
    let mut elsewhere = icmp6_too_big();
    elsewhere[53] = 2; // outer destination fd00:5100::1:2
    assert_eq!(parse(elsewhere.as_slice()), Err(Pass::NotL4));
}
