//! `[[service]]`: its name, VIPs, ports, protocols, VLAN, pinning and
//! assignment, each part's own checks called in config order; and what
//! must be unique over the services (names, endpoints, instances, veths).

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
};

use toml::Spanned;

use super::{Checker, Got, InstanceSpans, ServiceSpans, http, origin};
use crate::config::{
    Instance, PinMode, Protocol, Service, TagSpec,
    raw::{Field, RawAssign, RawLayer, RawPin, RawProtocol, RawService},
};

impl Checker<'_> {
    #[expect(
        clippy::too_many_lines,
        reason = "one field after another, in the order of the config reference"
    )]
    pub(super) fn service(
        &mut self,
        index: usize,
        raw: Spanned<RawService>,
    ) -> Option<(Service, ServiceSpans)> {
        let at = format!("service[{index}]");
        let table = raw.span();
        let raw = raw.into_inner();
        let name = self.name(raw.name, &table, &format!("{at}.name"), "service");
        let vips = self
            .one_or_many(
                &at,
                &table,
                ("vip", "vips"),
                raw.vip,
                raw.vips,
                "vip = \"198.18.0.100\" or vips = [\"198.18.0.100\", \"fd00:5100::100\"]",
                |v| {
                    (
                        format!("`{v}` is not an IP address"),
                        "write an IPv4 (198.18.0.100) or IPv6 (fd00:5100::100) address, without port or prefix length".into(),
                    )
                },
            )
            .map(|(v, ..)| v);
        let ports = self.ports(&at, &table, raw.port, raw.ports);
        let vlan = self.int(raw.vlan, &format!("{at}.vlan"), 0, 0, 4094);
        let protocols = self
            .one_or_many(
                &at,
                &table,
                ("protocol", "protocols"),
                raw.protocol,
                raw.protocols,
                "protocol = \"udp\" or protocols = [\"udp\", \"tcp\"]",
                |v| {
                    (
                        format!("unknown protocol `{v}`"),
                        "use \"udp\" or \"tcp\"".into(),
                    )
                },
            )
            .map(|(ps, ..)| {
                ps.into_iter()
                    .map(|p| match p {
                        RawProtocol::Udp => Protocol::Udp,
                        RawProtocol::Tcp => Protocol::Tcp,
                    })
                    .collect::<Vec<_>>()
            });
        let tag_span = raw.tag.as_ref().map(Spanned::span);
        let tag = match (raw.tag, &protocols, &vips) {
            (None, ..) => Some(TagSpec::None),
            (Some(tag), Some(protocols), Some(vips)) => self.tag(&at, tag, protocols, vips),
            // Without protocols or vips the tag cannot be judged; its own
            // errors still show once those are fixed.
            (Some(_), ..) => None,
        };
        if raw.instance.is_empty() {
            self.report(
                Some(&table),
                format!("{at}.instance"),
                format!(
                    "service `{}` has no instance",
                    name.as_ref().map_or("", |n| n.0.as_str())
                ),
                "add a [[service.instance]] table with name and veth",
            );
        }
        let instances: Vec<Option<(Instance, InstanceSpans)>> = raw
            .instance
            .into_iter()
            .enumerate()
            .map(|(j, inst)| self.instance(&format!("{at}.instance[{j}]"), inst))
            .collect();
        let is_http = raw
            .layer
            .as_ref()
            .is_some_and(|l| matches!(l.value, Ok(RawLayer::Http)));
        let origins = {
            let names: Vec<&str> = instances
                .iter()
                .flatten()
                .map(|(i, _)| i.name.as_str())
                .collect();
            let inputs = origin::OriginInputs {
                table: &table,
                http: is_http,
                names: &names,
                instance_count: instances.len(),
            };
            self.origins(&at, raw.origin, &inputs)
        };
        let http = self.http(
            &at,
            http::HttpInputs {
                table: &table,
                layer: raw.layer,
                http: raw.http,
                protocols: protocols.as_deref(),
                tag: tag_span,
                instances: &instances
                    .iter()
                    .map(|i| i.as_ref().map(|(i, _)| i.clone()))
                    .collect::<Vec<_>>(),
            },
        );
        let pin = match self.typed(raw.pin, &format!("{at}.pin"), |v| {
            (
                format!("unknown pin mode `{v}`"),
                "use \"none\", \"tcp\" or \"tcp+udp\"".into(),
            )
        }) {
            Got::Absent
                if protocols
                    .as_ref()
                    .is_some_and(|ps| ps.contains(&Protocol::Tcp)) =>
            {
                Some(PinMode::Tcp)
            }
            Got::Absent | Got::Value(RawPin::None, _) => Some(PinMode::None),
            Got::Value(RawPin::Tcp, _) => Some(PinMode::Tcp),
            Got::Value(RawPin::TcpUdp, _) => Some(PinMode::TcpUdp),
            Got::Bad => None,
        };
        let pin_idle_secs = self.int(
            raw.pin_idle_secs,
            &format!("{at}.pin_idle_secs"),
            300,
            1,
            86_400,
        );
        let wlm = self.wlm(&format!("{at}.wlm"), raw.wlm);
        let scale = self.scale(
            &format!("{at}.scale"),
            raw.scale,
            instances.len(),
            wlm.as_ref().map(|w| w.underload),
        );
        let probe = self.probe(&format!("{at}.probe"), raw.probe);
        let on_demand = match self.typed(raw.assign, &format!("{at}.assign"), |v| {
            (
                format!("unknown assignment `{v}`"),
                "use \"even\" (units split over the instances at start) or \"on-demand\" (claimed by first packets)".into(),
            )
        }) {
            Got::Absent | Got::Value(RawAssign::Even, _) => Some(false),
            Got::Value(RawAssign::OnDemand, _) => Some(true),
            Got::Bad => None,
        };
        let (ports, port_spans, ports_field) = ports?;
        let (name, name_span) = name?;
        let (instances, instance_spans): (Vec<_>, Vec<_>) = instances
            .into_iter()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .unzip();
        Some((
            Service {
                name,
                vips: vips?,
                ports,
                protocols: protocols?,
                vlan: u16::try_from(vlan?).expect("checked to be at most 4094"),
                tag: tag?,
                pin: pin?,
                pin_idle_secs: pin_idle_secs?,
                on_demand: on_demand?,
                wlm: wlm?,
                instances,
                http: http?,
                scale: scale?,
                origins: origins?,
                probe: probe?,
            },
            ServiceSpans {
                name: name_span,
                ports: port_spans,
                ports_field,
                instances: instance_spans,
            },
        ))
    }

    /// A value given as `one = x` or `many = [x, y]`: the list, each
    /// item's span, and the field used. Missing, empty, both given, or an
    /// item twice are errors; `bad` says what is wrong with an item.
    #[expect(
        clippy::too_many_arguments,
        reason = "the two spellings and their wording"
    )]
    fn one_or_many<T: PartialEq + std::fmt::Display>(
        &mut self,
        at: &str,
        table: &Range<usize>,
        (one_key, many_key): (&str, &str),
        one: Option<Field<T>>,
        many: Option<Spanned<Vec<Field<T>>>>,
        example: &str,
        bad: impl Fn(&str) -> (String, String),
    ) -> Option<(Vec<T>, Vec<Range<usize>>, String)> {
        let (field, list, list_span) = match (one, many) {
            (Some(p), Some(_)) => {
                self.report(
                    Some(&p.span),
                    format!("{at}.{one_key}"),
                    format!("both `{one_key}` and `{many_key}` are set"),
                    format!("keep one: {example}"),
                );
                return None;
            }
            (Some(p), None) => {
                let span = p.span.clone();
                (format!("{at}.{one_key}"), vec![p], span)
            }
            (None, Some(ps)) => {
                let span = ps.span();
                (format!("{at}.{many_key}"), ps.into_inner(), span)
            }
            (None, None) => {
                self.report(
                    Some(table),
                    format!("{at}.{many_key}"),
                    "missing",
                    format!("add {example}"),
                );
                return None;
            }
        };
        if list.is_empty() {
            self.report(
                Some(&list_span),
                &field,
                "empty list",
                format!("list at least one ({example})"),
            );
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        let mut spans = Vec::with_capacity(list.len());
        let mut ok = true;
        for item in list {
            match self.typed(Some(item), &field, &bad) {
                Got::Value(v, span) if out.contains(&v) => {
                    self.report(
                        Some(&span),
                        &field,
                        format!("{v} is listed twice"),
                        "list each once",
                    );
                    ok = false;
                }
                Got::Value(v, span) => {
                    out.push(v);
                    spans.push(span);
                }
                Got::Absent | Got::Bad => ok = false,
            }
        }
        ok.then_some((out, spans, field))
    }

    /// `port` or `ports`: the list, each port's span, and the field used.
    fn ports(
        &mut self,
        at: &str,
        table: &Range<usize>,
        port: Option<Field<u16>>,
        ports: Option<Spanned<Vec<Field<u16>>>>,
    ) -> Option<(Vec<u16>, Vec<Range<usize>>, String)> {
        let bad = |v: &str| {
            (
                format!("{v} is not a port"),
                "use a number from 1 to 65535".to_owned(),
            )
        };
        let (ports, spans, field) = self.one_or_many(
            at,
            table,
            ("port", "ports"),
            port,
            ports,
            "port = 7000 or ports = [7000, 7001]",
            bad,
        )?;
        if let Some(i) = ports.iter().position(|&p| p == 0) {
            let (problem, fix) = bad("0");
            self.report(Some(&spans[i]), &field, problem, fix);
            return None;
        }
        Some((ports, spans, field))
    }

    /// Names, endpoints, instance names and veths are each used once.
    pub(super) fn unique(&mut self, services: &[Service], spans: &[ServiceSpans]) {
        let mut names = HashSet::new();
        let mut endpoints = HashMap::new();
        let mut instances = HashSet::new();
        let mut veths = HashMap::new();
        for (i, (s, sp)) in services.iter().zip(spans).enumerate() {
            if !names.insert(&s.name) {
                self.report(
                    Some(&sp.name),
                    format!("service[{i}].name"),
                    format!("service name `{}` is used twice", s.name),
                    "give every service its own name",
                );
            }
            for (vip, port, proto) in s.endpoints() {
                if let Some(other) = endpoints.insert((vip, port, proto, s.vlan), &s.name) {
                    let at = s.ports.iter().position(|p| *p == port).expect("a port");
                    let shown = if vip.is_ipv6() {
                        format!("[{vip}]:{port}")
                    } else {
                        format!("{vip}:{port}")
                    };
                    self.report(
                        Some(&sp.ports[at]),
                        sp.ports_field.clone(),
                        format!("{proto} {shown} already belongs to service `{other}`"),
                        "use a different vip or port for one of the two services",
                    );
                }
            }
            for (j, (inst, (name_span, veth_span))) in
                s.instances.iter().zip(&sp.instances).enumerate()
            {
                if !instances.insert(&inst.name) {
                    self.report(
                        Some(name_span),
                        format!("service[{i}].instance[{j}].name"),
                        format!("instance name `{}` is used twice", inst.name),
                        "give every instance its own name",
                    );
                }
                // One container (one veth) may hold instances of several
                // services, one of each, seen alike (MAC, namespace).
                let Some((other, other_service)) = veths.insert(&inst.veth, (inst, i)) else {
                    continue;
                };
                let field = format!("service[{i}].instance[{j}].veth");
                if other_service == i {
                    self.report(
                        Some(veth_span),
                        field,
                        format!(
                            "veth `{}` is already the veth of instance `{}` of this service",
                            inst.veth, other.name
                        ),
                        "give each instance of a service its own container and veth pair (instances of different services may share one)",
                    );
                } else if other.mac != inst.mac || other.netns != inst.netns {
                    self.report(
                        Some(veth_span),
                        field,
                        format!(
                            "veth `{}` is shared with instance `{}`, but their `mac` or `netns` differ",
                            inst.veth, other.name
                        ),
                        "instances behind one veth live in one container: give them the same mac and netns (or leave both out)",
                    );
                }
            }
        }
    }
}
