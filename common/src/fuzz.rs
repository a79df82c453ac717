//! What the fuzz target checks (`cargo xtask fuzz`), kept here so unit
//! tests run the same checks on every `cargo test`.
//!
//! For any bytes, [`check`] parses them as a frame and keys the flow under
//! a service spec taken from the first bytes; it panics if an invariant of
//! the parser breaks:
//! - nothing panics or reads outside the frame (the `[u8]` frame checks
//!   every load);
//! - a parsed flow lies inside the frame, and its IP packet ends inside it;
//! - what follows the IP packet (Ethernet padding) changes nothing: the
//!   frame cut at the packet's end parses and keys the same;
//! - the frame cut anywhere inside the packet is `Truncated`, never
//!   another flow;
//! - keying is the flow hash when the service has no tag, and a tag kind
//!   the flow cannot carry counts as missing;
//! - a tag read from the datagram (`udp-payload`, `quic-cid`) is the one
//!   [`reference_tag`] finds, a plain slice-based reading of the same
//!   rules, or missing exactly when that finds none.

use crate::{
    MAX_QUIC_CID_LEN, MAX_TAG_LEN, key,
    maps::{
        FAMILY_V4, PROTO_TCP, PROTO_UDP, ServiceEntry, TAG_IPV6_FLOW_LABEL, TAG_NONE, TAG_QUIC_CID,
        TAG_UDP_PAYLOAD,
    },
    parse::{Flow, Pass, key_for, parse},
};

/// Bytes at the front of the input that choose the service spec.
pub const SPEC_BYTES: usize = 4;

/// Tag kinds [`spec`] chooses from: every kind, and [`UNKNOWN_KIND`].
const KINDS: u8 = 5;
/// A tag kind the data path does not know: keyed as untagged.
const UNKNOWN_KIND: u32 = 4;

/// The service spec the first [`SPEC_BYTES`] choose: any tag kind (an
/// unknown one too), offsets past the payload, lengths past the limit,
/// QUIC connection id lengths past 20 (`b[2] >> 3`).
#[must_use]
pub fn spec(b: [u8; SPEC_BYTES]) -> ServiceEntry {
    ServiceEntry {
        tag_kind: u32::from(b[0] % KINDS),
        tag_offset: u16::from_le_bytes([b[1], b[2] % 8]),
        tag_len: u16::from(b[3] % 20),
        quic_cid_len: u16::from(b[2] >> 3),
        ..ServiceEntry::default()
    }
}

/// The tag bytes of a `udp-payload` or `quic-cid` service, read from the
/// datagram as a slice, written apart from the data path's reading: the
/// datagram (by its UDP length), then for QUIC the destination connection
/// id of a long header (its length byte, at most 20) or of a short header
/// (fixed bit set; the service's id length); the tag at its offset in it.
#[must_use]
pub fn reference_tag<'f>(frame: &'f [u8], flow: &Flow, svc: &ServiceEntry) -> Option<&'f [u8]> {
    let udp = frame
        .get(flow.l4_off..)
        .filter(|_| flow.proto == PROTO_UDP)?;
    let datagram = udp.get(..usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?])))?;
    let payload = datagram.get(8..)?;
    let within = if svc.tag_kind == TAG_QUIC_CID {
        let (&flags, rest) = payload.split_first()?;
        let cid = if flags & 0x80 != 0 {
            let (&n, rest) = rest.get(4..)?.split_first()?;
            rest.get(..usize::from(n))?
        } else if flags & 0x40 != 0 {
            rest.get(..usize::from(svc.quic_cid_len))?
        } else {
            return None;
        };
        if cid.len() > MAX_QUIC_CID_LEN as usize {
            return None;
        }
        cid
    } else {
        payload
    };
    let (off, len) = (usize::from(svc.tag_offset), usize::from(svc.tag_len));
    if len == 0 || len > MAX_TAG_LEN as usize {
        return None;
    }
    within.get(off..off + len)
}

/// End of the IP packet of a frame that parsed, from its own length field.
fn ip_end(frame: &[u8], vlan: bool, family: u8) -> usize {
    let l3 = if vlan { 18 } else { 14 };
    let len = |at: usize| usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    if family == FAMILY_V4 {
        l3 + len(l3 + 2)
    } else {
        l3 + 40 + len(l3 + 4)
    }
}

/// Checks the parser's invariants on `data` (see the module doc).
///
/// # Panics
/// When one breaks: that is the finding.
pub fn check(data: &[u8]) {
    let Some((head, frame)) = data.split_first_chunk::<SPEC_BYTES>() else {
        return;
    };
    let svc = spec(*head);
    let Ok(flow) = parse(frame) else {
        return;
    };
    let end = ip_end(frame, flow.vlan_tagged, flow.family);
    // Of a quoted packet (an ICMP error's), only the ports are read.
    let l4_len = if flow.icmp {
        4
    } else if flow.proto == PROTO_TCP {
        20
    } else {
        8
    };
    assert!(matches!(flow.proto, PROTO_UDP | PROTO_TCP), "{flow:?}");
    assert!(
        flow.l4_off + l4_len <= end && end <= frame.len(),
        "flow outside the packet or the packet outside the frame: {flow:?}, end {end}, frame {}",
        frame.len()
    );
    let keyed = key_for(frame, &flow, &svc);

    // Padding after the packet changes nothing.
    let exact = &frame[..end];
    assert_eq!(parse(exact), Ok(flow), "padding changed the flow");
    assert_eq!(
        key_for(exact, &flow, &svc),
        keyed,
        "padding changed the key: {svc:?}"
    );
    // Every cut inside the packet is truncated. The parser reads nothing
    // past the transport header but the length fields, so cuts up to there
    // and one inside the last byte cover every path.
    for cut in (0..(flow.l4_off + l4_len).min(end)).chain([end - 1]) {
        assert_eq!(parse(&frame[..cut]), Err(Pass::Truncated), "cut at {cut}");
    }

    if flow.icmp {
        assert!(
            keyed.key == flow.flow_key() && !keyed.tagged,
            "an ICMP error is keyed by the quoted flow's hash: {keyed:?}"
        );
        return;
    }
    match svc.tag_kind {
        TAG_UDP_PAYLOAD | TAG_QUIC_CID => {
            let want = reference_tag(exact, &flow, &svc)
                .map_or((flow.flow_key(), false, true), |tag| {
                    (key::tag_bytes(tag), true, false)
                });
            assert_eq!(
                (keyed.key, keyed.tagged, keyed.tag_missing),
                want,
                "tag read from the datagram (key, tagged, missing) differs from the reference: {svc:?}"
            );
        }
        TAG_NONE | UNKNOWN_KIND => assert_eq!(
            (keyed.key, keyed.tagged, keyed.tag_missing),
            (flow.flow_key(), false, false),
            "no tag: the flow hash"
        ),
        TAG_IPV6_FLOW_LABEL if flow.family == FAMILY_V4 => {
            assert!(keyed.tag_missing && !keyed.tagged, "v4 has no flow label");
        }
        _ => assert_ne!(keyed.tagged, keyed.tag_missing, "{keyed:?}"),
    }
}
