//! From the config as written ([`super::raw`]) to the checked types: every
//! semantic check, each failure recorded with its line, field path,
//! problem and fix, and checking goes on so a file's errors are all
//! reported at once.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_common::{
    MAX_ENDPOINTS, MAX_ORIGIN_PREFIXES, MAX_PINNED_FLOWS, MAX_QUIC_CID_LEN, MAX_SERVICES,
    MAX_TAG_LEN, UNITS_PER_SERVICE,
};
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{
    AgentConfig, Config, ConfigError, FieldError, Instance, MAX_INSTANCES, PinMode, Protocol,
    Service, TagSpec, WlmConfig, WlmPolicy,
    raw::{
        Field, Mac, RawAgent, RawAssign, RawConfig, RawLayer, RawPin, RawProtocol, RawService,
        RawTag, RawTagKind, RawWlm, RawWlmPolicy, shown,
    },
};

mod cluster;
mod http;
mod instance;
mod origin;
mod scale;

/// Parses and checks `text`; `path` labels the errors.
pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let syntax = |e: toml::de::Error| ConfigError::Syntax {
        path: path.to_owned(),
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: e.message().trim_end().to_owned(),
    };
    let mut table = DeTable::parse(text).map_err(syntax)?;
    let mut c = Checker {
        text,
        errors: Vec::new(),
        shaped: HashSet::new(),
    };
    c.shapes(table.get_mut());
    let mut unknown = Vec::new();
    let raw: RawConfig = serde_ignored::deserialize(
        toml::de::Deserializer::from(table.clone()),
        |p: serde_ignored::Path<'_>| unknown.push(segments(&p)),
    )
    .map_err(syntax)?;
    for keys in unknown {
        c.unknown(table.get_ref(), &keys);
    }
    let config = c.config(raw);
    match config {
        Some(config) if c.errors.is_empty() => Ok(config),
        _ => {
            // File order; errors without a line (nothing to point at) first.
            c.errors.sort_by_key(|e| e.line);
            Err(ConfigError::Invalid {
                path: PathBuf::from(path),
                errors: c.errors,
            })
        }
    }
}

/// 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(0, |t| t.matches('\n').count()) + 1
}

/// A key path as segments (`Some(n)`: index `n` of an array), without the
/// wrapper that `Spanned` puts around each value.
fn segments(p: &serde_ignored::Path<'_>) -> Vec<(String, Option<usize>)> {
    use serde_ignored::Path;
    let mut out: Vec<(String, Option<usize>)> = Vec::new();
    let mut walk = vec![p];
    let mut at = p;
    loop {
        match at {
            Path::Root => break,
            Path::Seq { parent, .. }
            | Path::Map { parent, .. }
            | Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => {
                at = parent;
                walk.push(at);
            }
        }
    }
    for p in walk.into_iter().rev() {
        match p {
            Path::Map { key, .. } if !key.starts_with("$__") => out.push((key.clone(), None)),
            Path::Seq { index, .. } => {
                if let Some(last) = out.last_mut() {
                    last.1 = Some(*index);
                }
            }
            _ => {}
        }
    }
    out
}

/// A field path as the errors write it: `service[1].instance[0].veth`.
fn field_path(segs: &[(String, Option<usize>)]) -> String {
    segs.iter()
        .map(|(k, i)| i.map_or_else(|| k.clone(), |i| format!("{k}[{i}]")))
        .collect::<Vec<_>>()
        .join(".")
}

/// What a field held.
enum Got<T> {
    Absent,
    Value(T, Range<usize>),
    /// Present but wrong; already reported.
    Bad,
}

/// What is wrong with `n` as the name of a `what`, and the fix; `None`
/// when it is a good name.
pub(super) fn name_problem(n: &str, what: &str) -> Option<(String, String)> {
    // An instance's name is its report socket's file name, and every name
    // is a metric label.
    if n.starts_with(['.', '-'])
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Some((
            format!("`{n}` is not a plain name"),
            format!(
                "name the {what} with letters, digits, `.`, `_` and `-`, not starting with `.` or `-`"
            ),
        ));
    }
    // The pinned id registry keeps names of this length.
    if n.len() > sluice_common::MAX_NAME_LEN {
        return Some((
            format!("{} bytes long", n.len()),
            format!(
                "shorten the {what}'s name to at most {} bytes",
                sluice_common::MAX_NAME_LEN
            ),
        ));
    }
    None
}

struct Checker<'a> {
    text: &'a str,
    errors: Vec<FieldError>,
    /// Fields taken out for their shape (see [`Checker::shapes`]): their
    /// one error is said; "missing" and the like are not said again.
    shaped: HashSet<String>,
}

/// The shape a compound value must have.
#[derive(Clone, Copy)]
enum Shape {
    Table,
    List,
    /// A list of tables (`[[service]]`).
    Tables,
}

impl Shape {
    fn fits(self, v: &DeValue<'_>) -> bool {
        match (self, v) {
            (Self::Table, DeValue::Table(_)) | (Self::List, DeValue::Array(_)) => true,
            (Self::Tables, DeValue::Array(items)) => items
                .iter()
                .all(|i| matches!(i.get_ref(), DeValue::Table(_))),
            _ => false,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Table => "a table",
            Self::List => "a list",
            Self::Tables => "a list of tables",
        }
    }
}

/// The compound keys of a service, their shapes and how to write them.
const SERVICE_SHAPES: [(&str, Shape, &str); 8] = [
    (
        "http",
        Shape::Table,
        "write the L7 settings in a [service.http] table",
    ),
    (
        "ports",
        Shape::List,
        "write ports = [7000, 7001], or port = 7000 for one",
    ),
    (
        "vips",
        Shape::List,
        "write vips = [\"198.18.0.100\", \"fd00:5100::100\"], or vip = \"198.18.0.100\" for one",
    ),
    (
        "protocols",
        Shape::List,
        "write protocols = [\"udp\", \"tcp\"], or protocol = \"udp\" for one",
    ),
    (
        "tag",
        Shape::Table,
        "write tag = { kind = \"udp-payload\", offset = 0, length = 8 }",
    ),
    (
        "wlm",
        Shape::Table,
        "write wlm = { capacity_pps = 100000 }, or a [service.wlm] table",
    ),
    (
        "origin",
        Shape::Tables,
        "write each origin rule as a [[service.origin]] table with name, prefixes and instances",
    ),
    (
        "instance",
        Shape::Tables,
        "write each instance as a [[service.instance]] table with name and veth",
    ),
];

/// The value of `key` in `table`, to change.
fn value_mut<'t, 'i>(table: &'t mut DeTable<'i>, key: &str) -> Option<&'t mut DeValue<'i>> {
    table
        .iter_mut()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v.get_mut())
}

/// Where an instance's name and veth are written.
type InstanceSpans = (Range<usize>, Range<usize>);

/// Where the uniqueness checks point.
struct ServiceSpans {
    name: Range<usize>,
    ports: Vec<Range<usize>>,
    ports_field: String,
    instances: Vec<InstanceSpans>,
}

impl Checker<'_> {
    fn report(
        &mut self,
        at: Option<&Range<usize>>,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let field = field.into();
        if self.shaped.contains(&field) {
            return;
        }
        self.errors.push(FieldError {
            line: at.map(|r| line_of(self.text, r.start)),
            field,
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    /// Compound values of the wrong shape (a number where a list belongs, a
    /// string where a table does) are reported with their field and fix,
    /// and taken out, so the rest of the file is still read and checked.
    fn shapes(&mut self, root: &mut DeTable<'_>) {
        self.shape(
            root,
            "agent",
            Shape::Table,
            "agent",
            "write the agent's settings in an [agent] table",
        );
        if let Some(DeValue::Table(agent)) = value_mut(root, "agent") {
            self.shape(
                agent,
                "host_macs",
                Shape::List,
                "agent.host_macs",
                "write host_macs = [\"02:00:5e:00:01:01\"]",
            );
        }
        self.shape(
            root,
            "cluster",
            Shape::Table,
            "cluster",
            "write the cluster's settings in a [cluster] table",
        );
        if let Some(DeValue::Table(cluster)) = value_mut(root, "cluster") {
            self.shape(
                cluster,
                "etcd_endpoints",
                Shape::List,
                "cluster.etcd_endpoints",
                "write etcd_endpoints = [\"http://198.18.0.1:2379\"]",
            );
        }
        self.shape(
            root,
            "service",
            Shape::Tables,
            "service",
            "write each service as a [[service]] table",
        );
        if let Some(DeValue::Array(services)) = value_mut(root, "service") {
            for (i, svc) in services.iter_mut().enumerate() {
                if let DeValue::Table(svc) = svc.get_mut() {
                    for (key, shape, fix) in SERVICE_SHAPES {
                        self.shape(svc, key, shape, &format!("service[{i}].{key}"), fix);
                    }
                    self.scale_shapes(svc, i);
                    if let Some(DeValue::Table(http)) = value_mut(svc, "http") {
                        self.shape(
                            http,
                            "key",
                            Shape::Table,
                            &format!("service[{i}].http.key"),
                            "write key = { header = \"X-User\" }",
                        );
                        self.shape(
                            http,
                            "priority",
                            Shape::Tables,
                            &format!("service[{i}].http.priority"),
                            "write each rule as a [[service.http.priority]] table",
                        );
                    }
                }
            }
        }
    }

    /// Checks that `table[key]`, if there, has `shape`; if not, reports it
    /// as `field` and takes it out.
    fn shape(&mut self, table: &mut DeTable<'_>, key: &str, shape: Shape, field: &str, fix: &str) {
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
            return;
        };
        if shape.fits(v.get_ref()) {
            return;
        }
        let span = v.span();
        let written: String = self
            .text
            .get(span.clone())
            .unwrap_or("")
            .chars()
            .take(40)
            .collect();
        let k = k.clone();
        self.report(
            Some(&span),
            field,
            format!("`{written}` is not {}", shape.name()),
            fix,
        );
        self.shaped.insert(field.to_owned());
        table.remove(&k);
    }

    /// An unknown key, reported at its own line.
    fn unknown(&mut self, root: &DeTable<'_>, segs: &[(String, Option<usize>)]) {
        let span = key_span(root, segs);
        let (key, parent) = segs
            .split_last()
            .map_or((String::new(), &[][..]), |(k, p)| (k.0.clone(), p));
        let within = if parent.is_empty() {
            "the top level".to_owned()
        } else {
            format!("`{}`", field_path(parent))
        };
        self.report(
            span.as_ref(),
            field_path(segs),
            format!("unknown key `{key}` in {within}"),
            "remove it, or check its spelling against the config reference in the README",
        );
    }

    /// A field's typed value; a wrong one is reported with `bad(as
    /// written)` giving the problem and the fix.
    fn typed<T>(
        &mut self,
        f: Option<Field<T>>,
        field: &str,
        bad: impl FnOnce(&str) -> (String, String),
    ) -> Got<T> {
        match f {
            None => Got::Absent,
            Some(Field { span, value: Ok(v) }) => Got::Value(v, span),
            Some(Field {
                span,
                value: Err(raw),
            }) => {
                let (problem, fix) = bad(&shown(&raw));
                self.report(Some(&span), field, problem, fix);
                Got::Bad
            }
        }
    }

    /// A required field: reported as missing at its table when absent.
    fn required<T>(
        &mut self,
        f: Option<Field<T>>,
        table: &Range<usize>,
        field: &str,
        missing_fix: &str,
        bad: impl FnOnce(&str) -> (String, String),
    ) -> Option<(T, Range<usize>)> {
        match self.typed(f, field, bad) {
            Got::Value(v, span) => Some((v, span)),
            Got::Absent => {
                self.report(Some(table), field, "missing", missing_fix);
                None
            }
            Got::Bad => None,
        }
    }

    /// A required, non-empty name of a `what` (`service`, `instance`).
    fn name(
        &mut self,
        f: Option<Field<String>>,
        table: &Range<usize>,
        field: &str,
        what: &str,
    ) -> Option<(String, Range<usize>)> {
        let bad = |v: &str| {
            (
                format!("`{v}` is not a name"),
                "write the name as a string".to_owned(),
            )
        };
        match self.required(f, table, field, &format!("add name = \"my-{what}\""), bad) {
            Some((n, span)) if n.is_empty() => {
                self.report(
                    Some(&span),
                    field,
                    "empty",
                    format!("give the {what} a name"),
                );
                None
            }
            Some((n, span)) => match name_problem(&n, what) {
                Some((problem, fix)) => {
                    self.report(Some(&span), field, problem, fix);
                    None
                }
                None => Some((n, span)),
            },
            None => None,
        }
    }

    /// An optional whole number in `lo..=hi`, or `default`.
    fn int(
        &mut self,
        f: Option<Field<u32>>,
        field: &str,
        default: u32,
        lo: u32,
        hi: u32,
    ) -> Option<u32> {
        let fix = format!("use a whole number from {lo} to {hi}");
        let bad = |v: &str| {
            (
                format!("{v} is not a whole number from {lo} to {hi}"),
                fix.clone(),
            )
        };
        match self.typed(f, field, bad) {
            Got::Absent => Some(default),
            Got::Value(v, _) if (lo..=hi).contains(&v) => Some(v),
            Got::Value(v, span) => {
                self.report(Some(&span), field, format!("{v} is out of range"), fix);
                None
            }
            Got::Bad => None,
        }
    }

    /// An optional number in `lo..=hi`, or `default`.
    fn num(
        &mut self,
        f: Option<Field<f64>>,
        field: &str,
        default: f64,
        lo: f64,
        hi: f64,
    ) -> Option<f64> {
        let fix = format!("use a number from {lo} to {hi}");
        match self.typed(f, field, |v| (format!("{v} is not a number"), fix.clone())) {
            Got::Absent => Some(default),
            Got::Value(v, _) if v.is_finite() && (lo..=hi).contains(&v) => Some(v),
            Got::Value(v, span) => {
                self.report(Some(&span), field, format!("{v} is out of range"), fix);
                None
            }
            Got::Bad => None,
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let agent = self.agent(raw.agent);
        let cluster = self.cluster(raw.cluster);
        if raw.service.is_empty() {
            self.report(
                None,
                "service",
                "no service is configured",
                "add at least one [[service]] table with name, vip, ports, protocol and [[service.instance]] entries",
            );
        }
        if let Some(extra) = raw.service.get(MAX_SERVICES as usize) {
            let span = extra.span();
            self.report(
                Some(&span),
                "service",
                format!(
                    "{} services configured, at most {MAX_SERVICES} are supported",
                    raw.service.len()
                ),
                "split the services over several hosts",
            );
        }
        let checked: Vec<Option<(Service, ServiceSpans)>> = raw
            .service
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.service(i, s))
            .collect();
        let count: usize = checked
            .iter()
            .flatten()
            .map(|(s, _)| s.instances.len())
            .sum();
        if count > MAX_INSTANCES {
            self.report(
                None,
                "service[].instance",
                format!("{count} instances configured, at most {MAX_INSTANCES} are supported"),
                "spread the instances over several hosts",
            );
        }
        let endpoints: usize = checked
            .iter()
            .flatten()
            .map(|(s, _)| s.endpoints().count())
            .sum();
        if endpoints > MAX_ENDPOINTS {
            self.report(
                None,
                "service[].ports",
                format!(
                    "{endpoints} endpoints (VIP × port × protocol) configured, at most {MAX_ENDPOINTS} are supported"
                ),
                "use fewer VIPs or ports per service, or spread the services over several hosts",
            );
        }
        let prefixes: usize = checked
            .iter()
            .flatten()
            .flat_map(|(s, _)| &s.origins)
            .map(|r| r.prefixes.len())
            .sum();
        if prefixes > MAX_ORIGIN_PREFIXES as usize {
            self.report(
                None,
                "service[].origin[].prefixes",
                format!(
                    "{prefixes} origin prefixes configured, at most {MAX_ORIGIN_PREFIXES} are supported on one host"
                ),
                "join neighbouring prefixes into shorter ones, or spread the services over several hosts",
            );
        }
        let (services, spans): (Vec<_>, Vec<_>) = checked.into_iter().flatten().unzip();
        self.unique(&services, &spans);
        Some(Config {
            agent: agent?,
            cluster: cluster?,
            services,
        })
    }

    fn agent(&mut self, raw: Option<Spanned<RawAgent>>) -> Option<AgentConfig> {
        let d = AgentConfig::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Some(d);
        };
        let interval_ms = self.int(raw.interval_ms, "agent.interval_ms", 1000, 50, 60_000);
        let max_moves_per_sec = self.num(
            raw.max_moves_per_sec,
            "agent.max_moves_per_sec",
            d.max_moves_per_sec,
            0.01,
            1000.0,
        );
        let pinned_flows = self.int(
            raw.pinned_flows,
            "agent.pinned_flows",
            d.pinned_flows,
            1024,
            MAX_PINNED_FLOWS,
        );
        let punt_queue = self.int(
            raw.punt_queue,
            "agent.punt_queue",
            d.punt_queue,
            16,
            1 << 24,
        );
        let host_macs = self.host_macs(raw.host_macs);
        let hold_down_ms = self.int(
            raw.recovery_hold_down_ms,
            "agent.recovery_hold_down_ms",
            u32::try_from(d.recovery_hold_down.as_millis()).expect("small"),
            0,
            600_000,
        );
        let punt_zero_copy = match self.typed(raw.punt_zero_copy, "agent.punt_zero_copy", |v| {
            (
                format!("`{v}` is not true or false"),
                "write punt_zero_copy = true or false (without quotes)".into(),
            )
        }) {
            Got::Absent => Some(false),
            Got::Value(v, _) => Some(v),
            Got::Bad => None,
        };
        Some(AgentConfig {
            interval: Duration::from_millis(interval_ms?.into()),
            max_moves_per_sec: max_moves_per_sec?,
            pinned_flows: pinned_flows?,
            punt_queue: punt_queue?,
            host_macs: host_macs?,
            punt_zero_copy: punt_zero_copy?,
            recovery_hold_down: Duration::from_millis(hold_down_ms?.into()),
        })
    }

    /// `agent.host_macs`: unicast MACs, at most `MAX_HOST_MACS - 1` (the
    /// interface's own MAC takes one slot).
    fn host_macs(&mut self, raw: Option<Spanned<Vec<Field<Mac>>>>) -> Option<Vec<[u8; 6]>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let most = sluice_common::MAX_HOST_MACS - 1;
        let list_span = raw.span();
        let items = raw.into_inner();
        if items.len() > most {
            self.report(
                Some(&list_span),
                "agent.host_macs",
                format!("{} MACs given, at most {most} are supported", items.len()),
                "list only the MACs this host receives service traffic on besides the interface's own",
            );
            return None;
        }
        let mut out = Some(Vec::new());
        for (i, f) in items.into_iter().enumerate() {
            let got = self.typed(Some(f), &format!("agent.host_macs[{i}]"), |v| {
                (
                    format!("`{v}` is not a unicast MAC address"),
                    "write it as aa:bb:cc:dd:ee:ff, with the multicast bit clear".into(),
                )
            });
            match got {
                Got::Value(Mac(m), _) => {
                    if let Some(v) = &mut out {
                        v.push(m);
                    }
                }
                Got::Bad => out = None,
                Got::Absent => {}
            }
        }
        out
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one field after another, in the order of the config reference"
    )]
    fn service(
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

    fn tag(
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

    fn wlm_policy(&mut self, at: &str, raw: Option<Field<RawWlmPolicy>>) -> Option<WlmPolicy> {
        let bad = |v: &str| {
            (
                format!("unknown policy `{v}`"),
                "use \"spread\" (take work only from more loaded peers) or \"pack\" (gather work onto few instances)".into(),
            )
        };
        match self.typed(raw, &format!("{at}.policy"), bad) {
            Got::Absent => Some(WlmConfig::default().policy),
            Got::Value(RawWlmPolicy::Spread, _) => Some(WlmPolicy::Spread),
            Got::Value(RawWlmPolicy::Pack, _) => Some(WlmPolicy::Pack),
            Got::Bad => None,
        }
    }

    fn wlm(&mut self, at: &str, raw: Option<Spanned<RawWlm>>) -> Option<WlmConfig> {
        let d = WlmConfig::default();
        let Some(raw) = raw else { return Some(d) };
        let raw = raw.into_inner();
        let underload_span = raw.underload.as_ref().map(|f| f.span.clone());
        let overload = self.num(
            raw.overload,
            &format!("{at}.overload"),
            d.overload,
            0.05,
            10.0,
        );
        let underload = self.num(
            raw.underload,
            &format!("{at}.underload"),
            d.underload,
            0.0,
            10.0,
        );
        if let (Some(o), Some(u)) = (overload, underload)
            && u >= o
        {
            self.report(
                underload_span.as_ref(),
                format!("{at}.underload"),
                format!("underload {u} is not below overload {o}"),
                "keep a gap between the two (e.g. underload = 0.3, overload = 0.8), or the loop would move groups back and forth",
            );
        }
        let mut target = |name: &str, v: Option<Field<f64>>| match v {
            None => Some(None),
            v => self
                .num(v, &format!("{at}.{name}"), 0.0, 1e-6, 1e12)
                .map(Some),
        };
        let latency_target_ms = target("latency_target_ms", raw.latency_target_ms);
        let queue_target = target("queue_target", raw.queue_target);
        let in_flight_target = target("in_flight_target", raw.in_flight_target);
        let min_span = raw.min_group_units.as_ref().map(|f| f.span.clone());
        let min_group_units = self.int(
            raw.min_group_units,
            &format!("{at}.min_group_units"),
            d.min_group_units,
            1,
            UNITS_PER_SERVICE,
        );
        let min_group_units = match min_group_units {
            Some(m) if !m.is_power_of_two() => {
                self.report(
                    min_span.as_ref(),
                    format!("{at}.min_group_units"),
                    format!("{m} is not a power of two"),
                    "groups are aligned powers of two: use 1, 2, 4, ... 65536",
                );
                None
            }
            m => m,
        };
        let capacity_pps = self.num(
            raw.capacity_pps,
            &format!("{at}.capacity_pps"),
            d.capacity_pps,
            1.0,
            1e10,
        );
        let sustain = self.int(raw.sustain, &format!("{at}.sustain"), d.sustain, 1, 1000);
        let policy = self.wlm_policy(at, raw.policy);
        let balance_band = self.num(
            raw.balance_band,
            &format!("{at}.balance_band"),
            d.balance_band,
            0.01,
            1.0,
        );
        let cooldown_ms = self.int(
            raw.cooldown_ms,
            &format!("{at}.cooldown_ms"),
            5000,
            0,
            3_600_000,
        );
        Some(WlmConfig {
            policy: policy?,
            balance_band: balance_band?,
            capacity_pps: capacity_pps?,
            overload: overload?,
            underload: underload.filter(|u| overload.is_some_and(|o| *u < o))?,
            sustain: sustain?,
            cooldown: Duration::from_millis(cooldown_ms?.into()),
            min_group_units: min_group_units?,
            latency_target_ms: latency_target_ms?,
            queue_target: queue_target?,
            in_flight_target: in_flight_target?,
        })
    }

    /// Names, endpoints, instance names and veths are each used once.
    fn unique(&mut self, services: &[Service], spans: &[ServiceSpans]) {
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

/// Span of the key at `segs` in the parsed file, if it is there.
fn key_span(root: &DeTable<'_>, segs: &[(String, Option<usize>)]) -> Option<Range<usize>> {
    let mut table = root;
    for (n, (key, index)) in segs.iter().enumerate() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == key)?;
        if n + 1 == segs.len() {
            return Some(k.span());
        }
        let mut value = v.get_ref();
        if let (Some(i), DeValue::Array(items)) = (index, value) {
            value = items.get(*i)?.get_ref();
        }
        match value {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    None
}
