//! From the config as written ([`super::raw`]) to the checked types: every
//! semantic check, each failure recorded with its line, field path,
//! problem and fix, and checking goes on so a file's errors are all
//! reported at once.
//!
//! This file is the checker's machinery (parsing, spans and lines, shapes,
//! unknown keys, typed values) and the whole file's limits; each part of
//! the config has its own child: `agent`, `cluster`, `service` (and what
//! is unique over the services), `tag`, `wlm`, `instance`, `http`,
//! `origin`, `scale`.

use std::{
    collections::HashSet,
    ops::Range,
    path::{Path, PathBuf},
};

use sluice_common::{MAX_ENDPOINTS, MAX_ORIGIN_PREFIXES, MAX_SERVICES};
use toml::de::{DeTable, DeValue};

use super::{
    Config, ConfigError, FieldError, MAX_INSTANCES, Service,
    raw::{Field, RawConfig, shown},
};

mod agent;
mod cluster;
mod http;
mod instance;
mod origin;
mod probe;
mod scale;
mod service;
mod tag;
mod wlm;

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
