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
//!   the flow cannot carry counts as missing.

use crate::{
    maps::{FAMILY_V4, PROTO_TCP, PROTO_UDP, ServiceEntry, TAG_IPV6_FLOW_LABEL, TAG_NONE},
    parse::{Pass, key_for, parse},
};

/// Bytes at the front of the input that choose the service spec.
pub const SPEC_BYTES: usize = 4;

/// The service spec the first [`SPEC_BYTES`] choose: any tag kind (an
/// unknown one too), offsets past the payload, lengths past the limit.
#[must_use]
pub fn spec(b: [u8; SPEC_BYTES]) -> ServiceEntry {
    ServiceEntry {
        tag_kind: u32::from(b[0] % 4),
        tag_offset: u16::from_le_bytes([b[1], b[2] % 8]),
        tag_len: u16::from(b[3] % 20),
        ..ServiceEntry::default()
    }
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
    let l4_len = if flow.proto == PROTO_TCP { 20 } else { 8 };
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

    match svc.tag_kind {
        TAG_NONE | 3 => assert_eq!(
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
