//! A service's `tag`: where its packets carry their workload tag
//! (`udp-payload`, `ipv6-flow-label`, `quic-cid`), and what the tag needs
//! of the service's protocols and VIPs.

use std::{net::IpAddr, ops::Range};

use sluice_common::{MAX_QUIC_CID_LEN, MAX_TAG_LEN};
use toml::Spanned;

use super::{Checker, Got};
use crate::config::{
    Protocol, TagSpec,
    raw::{Field, RawTag, RawTagKind},
};

impl Checker<'_> {
    pub(super) fn tag(
        &mut self,
        at: &str,
        raw: Spanned<RawTag>,
        protocols: &[Protocol],
        vips: &[IpAddr],
    ) -> Option<TagSpec> {
        let table = raw.span();
        let raw = raw.into_inner();
        let field = format!("{at}.tag.kind");
        let kinds = "\"none\", \"udp-payload\", \"quic-cid\" or \"ipv6-flow-label\"";
        let (kind, kind_span) = self.required(
            raw.kind,
            &table,
            &field,
            &format!("set kind = {kinds}"),
            |v| (format!("unknown tag kind `{v}`"), format!("use {kinds}")),
        )?;
        let name = match kind {
            RawTagKind::None => "none",
            RawTagKind::Ipv6FlowLabel => "ipv6-flow-label",
            RawTagKind::UdpPayload => "udp-payload",
            RawTagKind::QuicCid => "quic-cid",
        };
        let reads_bytes = matches!(kind, RawTagKind::UdpPayload | RawTagKind::QuicCid);
        if (raw.offset.is_some() || raw.length.is_some()) && !reads_bytes {
            self.report(
                Some(&table),
                format!("{at}.tag"),
                format!("offset and length do not apply to tag kind `{name}`"),
                "remove them, or use kind = \"udp-payload\" or \"quic-cid\"",
            );
            return None;
        }
        if let Some(cid) = &raw.cid_length
            && kind != RawTagKind::QuicCid
        {
            self.report(
                Some(&cid.span),
                format!("{at}.tag.cid_length"),
                format!("cid_length does not apply to tag kind `{name}`"),
                "remove it, or use kind = \"quic-cid\"",
            );
            return None;
        }
        match kind {
            RawTagKind::None => Some(TagSpec::None),
            RawTagKind::Ipv6FlowLabel if vips.iter().any(IpAddr::is_ipv4) => {
                let v4 = vips.iter().find(|v| v.is_ipv4()).expect("found");
                self.report(
                    Some(&kind_span),
                    &field,
                    format!("the flow label is an IPv6 field but vip {v4} is IPv4"),
                    "use IPv6 vips only, or kind = \"none\" / \"udp-payload\"",
                );
                None
            }
            RawTagKind::Ipv6FlowLabel => Some(TagSpec::Ipv6FlowLabel),
            RawTagKind::UdpPayload | RawTagKind::QuicCid if protocols != [Protocol::Udp] => {
                self.report(
                    Some(&kind_span),
                    &field,
                    format!("a {name} tag needs the service to be UDP only"),
                    "set protocol = \"udp\" (a TCP side goes in a service of its own), or use kind = \"none\"",
                );
                None
            }
            RawTagKind::UdpPayload => {
                let length = self.tag_length(at, &table, raw.length);
                let offset =
                    self.tag_offset(at, raw.offset, 9000, "any datagram", "the UDP payload");
                Some(TagSpec::UdpPayload {
                    offset: offset?,
                    length: length?,
                })
            }
            RawTagKind::QuicCid => {
                self.quic_cid_tag(at, &table, raw.cid_length, raw.offset, raw.length)
            }
        }
    }

    /// The required `length` of a tag read from the datagram.
    fn tag_length(
        &mut self,
        at: &str,
        table: &Range<usize>,
        length: Option<Field<u16>>,
    ) -> Option<u16> {
        let length_fix = format!(
            "use 1 to {MAX_TAG_LEN}; longer tags can be shortened to a prefix that still names the unit of work"
        );
        match self.required(
            length,
            table,
            &format!("{at}.tag.length"),
            &format!("set length = 1..{MAX_TAG_LEN} (tag bytes)"),
            |v| {
                (
                    format!("{v} bytes is not a supported tag length"),
                    length_fix.clone(),
                )
            },
        ) {
            Some((l, _)) if l >= 1 && u32::from(l) <= MAX_TAG_LEN => Some(l),
            Some((l, span)) => {
                self.report(
                    Some(&span),
                    format!("{at}.tag.length"),
                    format!("{l} bytes is not a supported tag length"),
                    length_fix,
                );
                None
            }
            None => None,
        }
    }

    /// The `offset` of a tag read from the datagram, `0..=max` bytes into
    /// `within`; 0 when absent.
    fn tag_offset(
        &mut self,
        at: &str,
        offset: Option<Field<u16>>,
        max: u16,
        outside: &str,
        within: &str,
    ) -> Option<u16> {
        let offset_err = |v: &str| {
            (
                format!("offset {v} is outside {outside}"),
                format!("use a byte offset from 0 to {max} into {within}"),
            )
        };
        match self.typed(offset, &format!("{at}.tag.offset"), offset_err) {
            Got::Absent => Some(0),
            Got::Value(o, _) if o <= max => Some(o),
            Got::Value(o, span) => {
                let (problem, fix) = offset_err(&o.to_string());
                self.report(Some(&span), format!("{at}.tag.offset"), problem, fix);
                None
            }
            Got::Bad => None,
        }
    }

    /// `cid_length` and `length` (required) and `offset` of a `quic-cid`
    /// tag: the tag must lie inside the connection id.
    fn quic_cid_tag(
        &mut self,
        at: &str,
        table: &Range<usize>,
        cid_length: Option<Field<u16>>,
        offset: Option<Field<u16>>,
        length: Option<Field<u16>>,
    ) -> Option<TagSpec> {
        let max = u16::try_from(MAX_QUIC_CID_LEN).expect("20");
        let field = format!("{at}.tag.cid_length");
        let fix = format!(
            "use 1 to {max}: the length of the connection ids your servers issue (QUIC allows at most {max} bytes)"
        );
        let cid_length = match self.required(
            cid_length,
            table,
            &field,
            &format!(
                "set cid_length = 1..{max}, the length of the connection ids your servers issue (a short header does not carry it)"
            ),
            |v| {
                (
                    format!("{v} bytes is not a QUIC connection id length"),
                    fix.clone(),
                )
            },
        ) {
            Some((l, _)) if (1..=max).contains(&l) => Some(l),
            Some((l, span)) => {
                self.report(
                    Some(&span),
                    &field,
                    format!("{l} bytes is not a QUIC connection id length"),
                    fix,
                );
                None
            }
            None => None,
        };
        let length = self.tag_length(at, table, length);
        let offset = self.tag_offset(
            at,
            offset,
            max - 1,
            "any QUIC connection id",
            "the destination connection id",
        );
        let (cid_length, offset, length) = (cid_length?, offset?, length?);
        if offset + length > cid_length {
            self.report(
                Some(table),
                format!("{at}.tag.length"),
                format!(
                    "offset {offset} + length {length} reaches past the {cid_length}-byte connection id"
                ),
                format!(
                    "make offset + length at most cid_length ({cid_length}): a shorter tag, a smaller offset, or longer connection ids"
                ),
            );
            return None;
        }
        Some(TagSpec::QuicCid {
            cid_length,
            offset,
            length,
        })
    }
}
