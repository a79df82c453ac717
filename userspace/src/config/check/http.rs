//! `layer = "http"` and `[service.http]`: the L7 distributor's routing
//! (request key, priority subsets) and limits.

use std::{ops::Range, time::Duration};

use toml::Spanned;

use super::{Checker, Got};
use crate::config::{
    HttpConfig, HttpLimits, Instance, PriorityRule, Protocol, RequestKey, RequestMatch,
    raw::{Field, RawHttp, RawLayer, RawPriority, RawRequestKey},
};

/// Header and cookie names are HTTP tokens (RFC 9110, 5.6.2).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What the service's `layer`, `protocol`, `tag` and instances' `addr`
/// need of each other, given in one place.
pub(super) struct HttpInputs<'a> {
    pub(super) table: &'a Range<usize>,
    pub(super) layer: Option<Field<RawLayer>>,
    pub(super) http: Option<Spanned<RawHttp>>,
    pub(super) protocols: Option<&'a [Protocol]>,
    /// Span of `tag`, when one is written.
    pub(super) tag: Option<Range<usize>>,
    pub(super) instances: &'a [Option<Instance>],
}

impl Checker<'_> {
    /// The service's L7 settings: `Some(None)` for an L4 service, `None`
    /// when something is wrong (reported).
    #[expect(
        clippy::option_option,
        reason = "None: reported; Some(None): an L4 service"
    )]
    pub(super) fn http(&mut self, at: &str, i: HttpInputs<'_>) -> Option<Option<HttpConfig>> {
        let layer = match self.typed(i.layer, &format!("{at}.layer"), |v| {
            (
                format!("unknown layer `{v}`"),
                "use \"l4\" (each packet to its unit's owner) or \"http\" (each request to its key's owner, through the L7 distributor)".into(),
            )
        }) {
            Got::Absent | Got::Value(RawLayer::L4, _) => false,
            Got::Value(RawLayer::Http, _) => true,
            Got::Bad => return None,
        };
        if !layer {
            return self.l4_has_no_http(at, i.http.as_ref(), i.instances);
        }
        let mut ok = true;
        if i.protocols.is_some_and(|ps| ps != [Protocol::Tcp]) {
            self.report(
                Some(i.table),
                format!("{at}.protocol"),
                "an http service runs over TCP only",
                "write protocol = \"tcp\"",
            );
            ok = false;
        }
        if let Some(span) = &i.tag {
            self.report(
                Some(span),
                format!("{at}.tag"),
                "a packet tag has no meaning for an http service: its connections end at the distributor",
                "remove tag; to route by request, set key in [service.http] (a header, cookie, path segment or query parameter)",
            );
            ok = false;
        }
        for (j, inst) in i.instances.iter().enumerate() {
            if inst.as_ref().is_some_and(|x| x.addr.is_none()) {
                self.report(
                    Some(i.table),
                    format!("{at}.instance[{j}].addr"),
                    "missing: the L7 distributor is a proxy and needs the address it reaches the instance at",
                    "add addr = \"198.18.16.2:8080\" (the instance's own address and port)",
                );
                ok = false;
            }
        }
        let http = match i.http {
            Some(raw) => self.http_table(&format!("{at}.http"), raw, i.instances),
            None => Some(HttpConfig::default()),
        };
        let http = http?;
        let reserved = i
            .instances
            .iter()
            .flatten()
            .filter(|x| http.is_reserved(&x.name))
            .count();
        if reserved > 0 && reserved == i.instances.len() && !http.spill {
            self.report(
                Some(i.table),
                format!("{at}.http.priority"),
                "every instance is in a priority subset, so requests matching no rule have nowhere to go",
                "leave at least one instance out of the priority subsets, or set spill = true in [service.http]",
            );
            ok = false;
        }
        ok.then_some(Some(http))
    }

    #[expect(clippy::option_option, reason = "as for `http`")]
    fn l4_has_no_http(
        &mut self,
        at: &str,
        http: Option<&Spanned<RawHttp>>,
        instances: &[Option<Instance>],
    ) -> Option<Option<HttpConfig>> {
        let mut ok = true;
        if let Some(h) = http {
            self.report(
                Some(&h.span()),
                format!("{at}.http"),
                "[service.http] on an L4 service",
                "add layer = \"http\" to the service, or remove the table",
            );
            ok = false;
        }
        for (j, inst) in instances.iter().enumerate() {
            if inst.as_ref().is_some_and(|x| x.addr.is_some()) {
                self.report(
                    None,
                    format!("{at}.instance[{j}].addr"),
                    "addr is used only by layer = \"http\" services (L4 packets go to the veth)",
                    "remove addr, or add layer = \"http\" to the service",
                );
                ok = false;
            }
        }
        ok.then_some(None)
    }

    fn http_table(
        &mut self,
        at: &str,
        raw: Spanned<RawHttp>,
        instances: &[Option<Instance>],
    ) -> Option<HttpConfig> {
        let mut raw = raw.into_inner();
        let key = match raw.key.take() {
            None => Some(None),
            Some(k) => self.request_key(&format!("{at}.key"), k).map(Some),
        };
        let spill = match self.typed(raw.spill.take(), &format!("{at}.spill"), |v| {
            (
                format!("`{v}` is not true or false"),
                "write spill = true or spill = false".into(),
            )
        }) {
            Got::Absent => Some(false),
            Got::Value(v, _) => Some(v),
            Got::Bad => None,
        };
        let numbers = self.http_numbers(at, &mut raw);
        let names: Vec<&str> = instances
            .iter()
            .flatten()
            .map(|i| i.name.as_str())
            .collect();
        let priority: Vec<Option<PriorityRule>> = raw
            .priority
            .into_iter()
            .enumerate()
            .map(|(k, r)| self.priority(&format!("{at}.priority[{k}]"), r, &names))
            .collect();
        Some(HttpConfig {
            key: key?,
            priority: priority.into_iter().collect::<Option<_>>()?,
            spill: spill?,
            ..numbers?
        })
    }

    /// A whole-number field of the table at `at`.
    fn int_at(
        &mut self,
        at: &str,
        f: Option<Field<u32>>,
        key: &str,
        def: u32,
        lo: u32,
        hi: u32,
    ) -> Option<u32> {
        self.int(f, &format!("{at}.{key}"), def, lo, hi)
    }

    /// A field of the table at `at` in milliseconds.
    fn ms_at(
        &mut self,
        at: &str,
        f: Option<Field<u32>>,
        key: &str,
        def: Duration,
        lo: u32,
        hi: u32,
    ) -> Option<Duration> {
        let def = u32::try_from(def.as_millis()).expect("small");
        self.int_at(at, f, key, def, lo, hi)
            .map(|v| Duration::from_millis(v.into()))
    }

    /// A field of the table at `at` in seconds.
    fn secs_at(
        &mut self,
        at: &str,
        f: Option<Field<u32>>,
        key: &str,
        def: Duration,
        lo: u32,
        hi: u32,
    ) -> Option<Duration> {
        let def = u32::try_from(def.as_secs()).expect("small");
        self.int_at(at, f, key, def, lo, hi)
            .map(|v| Duration::from_secs(v.into()))
    }

    /// The pool's, the limits' and the timeouts' numbers (the rest left
    /// at their defaults).
    fn http_numbers(&mut self, at: &str, raw: &mut RawHttp) -> Option<HttpConfig> {
        let d = HttpConfig::default();
        let pool_size = self.int_at(at, raw.pool_size.take(), "pool_size", d.pool_size, 1, 4096);
        let pool_idle = self.secs_at(
            at,
            raw.pool_idle_secs.take(),
            "pool_idle_secs",
            d.pool_idle,
            1,
            3600,
        );
        let idle_span = raw.idle_timeout_secs.as_ref().map(|f| f.span.clone());
        let response_span = raw.response_timeout_ms.as_ref().map(|f| f.span.clone());
        let limits = self.http_limits(at, raw, &d.limits);
        let connect_timeout = self.ms_at(
            at,
            raw.connect_timeout_ms.take(),
            "connect_timeout_ms",
            d.connect_timeout,
            10,
            60_000,
        );
        let response_timeout = self.ms_at(
            at,
            raw.response_timeout_ms.take(),
            "response_timeout_ms",
            d.response_timeout,
            100,
            3_600_000,
        );
        let body_buffer_bytes = self.int_at(
            at,
            raw.body_buffer_bytes.take(),
            "body_buffer_bytes",
            d.body_buffer_bytes,
            0,
            16 << 20,
        );
        let eject_after_failures = self.int_at(
            at,
            raw.eject_after_failures.take(),
            "eject_after_failures",
            d.eject_after_failures,
            1,
            1000,
        );
        let (limits, response_timeout) = (limits?, response_timeout?);
        let span = idle_span.or(response_span);
        if !self.idle_outlasts_response(at, limits.idle_timeout, response_timeout, span.as_ref()) {
            return None;
        }
        Some(HttpConfig {
            pool_size: pool_size?,
            pool_idle: pool_idle?,
            limits,
            connect_timeout: connect_timeout?,
            response_timeout,
            body_buffer_bytes: body_buffer_bytes?,
            eject_after_failures: eject_after_failures?,
            ..d
        })
    }

    /// `[service.http]`'s limits on what a client may send.
    fn http_limits(&mut self, at: &str, raw: &mut RawHttp, l: &HttpLimits) -> Option<HttpLimits> {
        let max_header_bytes = self.int_at(
            at,
            raw.max_header_bytes.take(),
            "max_header_bytes",
            l.max_header_bytes,
            1024,
            1 << 20,
        );
        let max_headers = self.int_at(
            at,
            raw.max_headers.take(),
            "max_headers",
            l.max_headers,
            8,
            1024,
        );
        let max_request_line = self.int_at(
            at,
            raw.max_request_line.take(),
            "max_request_line",
            l.max_request_line,
            64,
            65_536,
        );
        let header_timeout = self.ms_at(
            at,
            raw.header_timeout_ms.take(),
            "header_timeout_ms",
            l.header_timeout,
            100,
            600_000,
        );
        let idle_timeout = self.secs_at(
            at,
            raw.idle_timeout_secs.take(),
            "idle_timeout_secs",
            l.idle_timeout,
            1,
            86_400,
        );
        // Absent, the distributor derives it from the open-file limit.
        let max_connections = match raw.max_connections.take() {
            None => Some(None),
            f => self
                .int_at(at, f, "max_connections", 0, 1, 1_000_000)
                .map(Some),
        };
        Some(HttpLimits {
            max_header_bytes: max_header_bytes?,
            max_headers: max_headers?,
            max_request_line: max_request_line?,
            header_timeout: header_timeout?,
            idle_timeout: idle_timeout?,
            max_connections: max_connections?,
        })
    }

    /// Whether `idle_timeout_secs` is at least `response_timeout_ms`
    /// (reported if not, at `span`): while a client waits for its answer
    /// nothing moves on its connection, and the idle timeout would cut it
    /// first, silently.
    fn idle_outlasts_response(
        &mut self,
        at: &str,
        idle: Duration,
        response: Duration,
        span: Option<&Range<usize>>,
    ) -> bool {
        if idle >= response {
            return true;
        }
        let (idle, response) = (idle.as_secs(), response.as_millis());
        self.report(
            span,
            format!("{at}.idle_timeout_secs"),
            format!(
                "idle_timeout_secs = {idle} is shorter than response_timeout_ms = {response}: a client waiting that long for a slow answer would be closed as idle"
            ),
            format!(
                "raise idle_timeout_secs to at least {}, or lower response_timeout_ms to {} or less",
                response.div_ceil(1000),
                u128::from(idle) * 1000
            ),
        );
        false
    }

    /// A token-valued field (header or cookie name), if given.
    fn token(&mut self, f: Option<Field<String>>, field: &str) -> Got<String> {
        let bad = |v: &str| {
            (
                format!("`{v}` is not a string"),
                "write the name in quotes".to_owned(),
            )
        };
        match self.typed(f, field, bad) {
            Got::Value(v, span) if !is_token(&v) => {
                self.report(
                    Some(&span),
                    field,
                    format!("`{v}` is not a header or cookie name"),
                    "use letters, digits and !#$%&'*+-.^_`|~ only, e.g. \"X-User\"",
                );
                Got::Bad
            }
            other => other,
        }
    }

    fn request_key(&mut self, at: &str, raw: Spanned<RawRequestKey>) -> Option<RequestKey> {
        let span = raw.span();
        let raw = raw.into_inner();
        let fix = "write one of key = { header = \"X-User\" }, { cookie = \"user\" }, { path_segment = 2 }, { query = \"user\" }";
        let given = [
            raw.header.is_some(),
            raw.cookie.is_some(),
            raw.path_segment.is_some(),
            raw.query.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            self.report(
                Some(&span),
                at,
                format!("{given} places given for the key, one is needed"),
                fix,
            );
            return None;
        }
        if raw.path_segment.is_some() {
            return self
                .int(raw.path_segment, &format!("{at}.path_segment"), 1, 1, 64)
                .map(RequestKey::PathSegment);
        }
        if let Got::Value(h, _) = self.token(raw.header, &format!("{at}.header")) {
            return Some(RequestKey::Header(h.to_ascii_lowercase()));
        }
        if let Got::Value(c, _) = self.token(raw.cookie, &format!("{at}.cookie")) {
            return Some(RequestKey::Cookie(c));
        }
        if let Got::Value(q, _) = self.token(raw.query, &format!("{at}.query")) {
            return Some(RequestKey::Query(q));
        }
        None
    }

    fn priority(
        &mut self,
        at: &str,
        raw: Spanned<RawPriority>,
        names: &[&str],
    ) -> Option<PriorityRule> {
        let table = raw.span();
        let raw = raw.into_inner();
        let name = self.name(raw.name, &table, &format!("{at}.name"), "priority rule");
        let when = self.request_match(
            at,
            &table,
            raw.header,
            raw.cookie,
            raw.value,
            raw.path_prefix,
        );
        let instances = match raw.instances {
            None => {
                self.report(
                    Some(&table),
                    format!("{at}.instances"),
                    "missing",
                    "add instances = [\"<instance of this service>\", ...]: the subset this rule reserves",
                );
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                self.report(
                    Some(&list.span()),
                    format!("{at}.instances"),
                    "empty list",
                    "list at least one instance of this service",
                );
                None
            }
            Some(list) => {
                let mut out = Vec::new();
                let mut ok = true;
                for item in list.into_inner() {
                    match self.typed(Some(item), &format!("{at}.instances"), |v| {
                        (
                            format!("`{v}` is not an instance name"),
                            "write instance names in quotes".into(),
                        )
                    }) {
                        Got::Value(n, span) if !names.contains(&n.as_str()) => {
                            self.report(
                                Some(&span),
                                format!("{at}.instances"),
                                format!("`{n}` is not an instance of this service"),
                                format!("use one of: {}", names.join(", ")),
                            );
                            ok = false;
                        }
                        Got::Value(n, _) => out.push(n),
                        Got::Absent | Got::Bad => ok = false,
                    }
                }
                ok.then_some(out)
            }
        };
        Some(PriorityRule {
            name: name?.0,
            when: when?,
            instances: instances?,
        })
    }

    fn request_match(
        &mut self,
        at: &str,
        table: &Range<usize>,
        header: Option<Field<String>>,
        cookie: Option<Field<String>>,
        value: Option<Field<String>>,
        path_prefix: Option<Field<String>>,
    ) -> Option<RequestMatch> {
        let fix = "write header = \"X-Tier\" with value = \"gold\", or cookie = \"plan\" with value = \"pro\", or path_prefix = \"/checkout\"";
        let given = [header.is_some(), cookie.is_some(), path_prefix.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given != 1 {
            self.report(
                Some(table),
                at,
                format!("{given} things to match given, one is needed"),
                fix,
            );
            return None;
        }
        let string = |c: &mut Self, f, field: &str| {
            c.typed(f, field, |v| {
                (
                    format!("`{v}` is not a string"),
                    "write it in quotes".into(),
                )
            })
        };
        if let Some(p) = path_prefix {
            if value.is_some() {
                self.report(
                    Some(table),
                    format!("{at}.value"),
                    "value has no meaning with path_prefix",
                    "remove value",
                );
                return None;
            }
            return match string(self, Some(p), &format!("{at}.path_prefix")) {
                Got::Value(p, _) if p.starts_with('/') => Some(RequestMatch::PathPrefix(p)),
                Got::Value(p, span) => {
                    self.report(
                        Some(&span),
                        format!("{at}.path_prefix"),
                        format!("`{p}` does not start with `/`"),
                        "write the path as requested, e.g. \"/checkout\"",
                    );
                    None
                }
                Got::Absent | Got::Bad => None,
            };
        }
        let is_header = header.is_some();
        let key = if is_header { "header" } else { "cookie" };
        let name = self.token(header.or(cookie), &format!("{at}.{key}"));
        let value = match string(self, value, &format!("{at}.value")) {
            Got::Value(v, _) => Some(v),
            Got::Absent => {
                self.report(
                    Some(table),
                    format!("{at}.value"),
                    "missing",
                    format!("add value = \"...\": the {key}'s value that matches"),
                );
                None
            }
            Got::Bad => None,
        };
        let Got::Value(name, _) = name else {
            return None;
        };
        let value = value?;
        Some(if is_header {
            RequestMatch::Header {
                name: name.to_ascii_lowercase(),
                value,
            }
        } else {
            RequestMatch::Cookie { name, value }
        })
    }
}

#[cfg(test)]
mod tests;
