//! `[[service.origin]]`: SLA origin rules of L4 services — packets from
//! given source prefixes go to a reserved subset of the instances.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
};

use toml::Spanned;

use super::{Checker, Got};
use crate::config::{OriginRule, raw::RawOrigin};

/// What the rules of one service are checked against.
pub(super) struct OriginInputs<'a> {
    pub(super) table: &'a Range<usize>,
    /// The service is `layer = "http"`.
    pub(super) http: bool,
    /// Names of the service's instances (those that checked out).
    pub(super) names: &'a [&'a str],
    /// How many instances the service has, checked or not.
    pub(super) instance_count: usize,
}

/// `addr/len` (or a bare address: one host) as (network, length); `Err`
/// says what is wrong and how to write it.
fn prefix(text: &str) -> Result<(IpAddr, u8), (String, String)> {
    let example = "write an IPv4 or IPv6 prefix, e.g. \"198.18.5.0/24\" or \"fd00:5100:5::/48\"";
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Err((format!("`{text}` is not an IP prefix"), example.into()));
    };
    let most: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() && !text.contains('/') {
        most
    } else {
        match len.parse::<u8>() {
            Ok(l) if l <= most => l,
            _ => {
                return Err((
                    format!("`{text}`: the prefix length is not a number from 0 to {most}"),
                    example.into(),
                ));
            }
        }
    };
    let network = network(addr, len);
    if network != addr {
        return Err((
            format!("`{text}` has host bits set"),
            format!("write the network: \"{network}/{len}\""),
        ));
    }
    Ok((addr, len))
}

/// `addr` with every bit past the first `len` cleared.
fn network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl Checker<'_> {
    /// The service's origin rules; `None` when something is wrong
    /// (reported).
    pub(super) fn origins(
        &mut self,
        at: &str,
        raw: Vec<Spanned<RawOrigin>>,
        i: &OriginInputs<'_>,
    ) -> Option<Vec<OriginRule>> {
        if raw.is_empty() {
            return Some(Vec::new());
        }
        if i.http {
            self.report(
                Some(&raw[0].span()),
                format!("{at}.origin"),
                "origin rules steer packets, but an http service's connections end at the L7 distributor",
                "reserve instances for important requests with [[service.http.priority]] instead, or remove the [[service.origin]] tables",
            );
            return None;
        }
        let mut ok = true;
        let mut rules: Vec<OriginRule> = Vec::new();
        for (k, r) in raw.into_iter().enumerate() {
            let Some(rule) = self.origin(&format!("{at}.origin[{k}]"), r, &rules, i.names) else {
                ok = false;
                continue;
            };
            rules.push(rule);
        }
        let reserved: std::collections::HashSet<&str> = rules
            .iter()
            .flat_map(|r| r.instances.iter().map(String::as_str))
            .collect();
        if ok && i.instance_count > 0 && reserved.len() >= i.instance_count {
            self.report(
                Some(i.table),
                format!("{at}.origin"),
                "every instance is in an origin rule's subset, so packets from other clients have nowhere to go",
                "leave at least one instance out of the [[service.origin]] subsets",
            );
            ok = false;
        }
        ok.then_some(rules)
    }

    /// One rule; `before` are the service's rules checked so far (names,
    /// prefixes and instances may appear in one rule only).
    fn origin(
        &mut self,
        at: &str,
        raw: Spanned<RawOrigin>,
        before: &[OriginRule],
        names: &[&str],
    ) -> Option<OriginRule> {
        let table = raw.span();
        let raw = raw.into_inner();
        let name = match self.name(raw.name, &table, &format!("{at}.name"), "origin rule") {
            Some((n, span)) if before.iter().any(|r| r.name == n) => {
                self.report(
                    Some(&span),
                    format!("{at}.name"),
                    format!("`{n}` names another origin rule of this service too"),
                    "give each [[service.origin]] of a service its own name",
                );
                None
            }
            other => other.map(|(n, _)| n),
        };
        let prefixes =
            self.origin_prefixes(&format!("{at}.prefixes"), &table, raw.prefixes, before);
        let instances = self.origin_instances(
            &format!("{at}.instances"),
            &table,
            raw.instances,
            before,
            names,
        );
        let spill = match self.typed(raw.spill, &format!("{at}.spill"), |v| {
            (
                format!("`{v}` is not true or false"),
                "write spill = true or spill = false".into(),
            )
        }) {
            Got::Absent => Some(false),
            Got::Value(v, _) => Some(v),
            Got::Bad => None,
        };
        Some(OriginRule {
            name: name?,
            prefixes: prefixes?,
            instances: instances?,
            spill: spill?,
        })
    }

    fn origin_prefixes(
        &mut self,
        field: &str,
        table: &Range<usize>,
        raw: Option<Spanned<Vec<crate::config::raw::Field<String>>>>,
        before: &[OriginRule],
    ) -> Option<Vec<(IpAddr, u8)>> {
        let list = self.origin_list(
            field,
            table,
            raw,
            "add prefixes = [\"198.18.5.0/24\"]: the clients this rule serves",
            "list at least one source prefix",
        )?;
        let mut out = Vec::with_capacity(list.len());
        let mut ok = true;
        for (text, span) in list {
            match prefix(&text) {
                Err((problem, fix)) => {
                    self.report(Some(&span), field, problem, fix);
                    ok = false;
                }
                Ok(p) if out.contains(&p) => {
                    self.report(
                        Some(&span),
                        field,
                        format!("`{text}` is listed twice"),
                        "list each prefix once",
                    );
                    ok = false;
                }
                Ok(p) => {
                    if let Some(r) = before.iter().find(|r| r.prefixes.contains(&p)) {
                        self.report(
                            Some(&span),
                            field,
                            format!("`{text}` is a prefix of origin rule `{}` too", r.name),
                            "list a prefix in one rule only (a longer prefix inside it may go to another rule: the longest match wins)",
                        );
                        ok = false;
                    }
                    out.push(p);
                }
            }
        }
        ok.then_some(out)
    }

    fn origin_instances(
        &mut self,
        field: &str,
        table: &Range<usize>,
        raw: Option<Spanned<Vec<crate::config::raw::Field<String>>>>,
        before: &[OriginRule],
        names: &[&str],
    ) -> Option<Vec<String>> {
        let list = self.origin_list(
            field,
            table,
            raw,
            "add instances = [\"<instance of this service>\", ...]: the subset this rule reserves",
            "list at least one instance of this service",
        )?;
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (n, span) in list {
            let (problem, fix) = if !names.contains(&n.as_str()) {
                (
                    format!("`{n}` is not an instance of this service"),
                    format!("use one of: {}", names.join(", ")),
                )
            } else if out.contains(&n) {
                (
                    format!("`{n}` is listed twice"),
                    "list each instance once".into(),
                )
            } else if let Some(r) = before.iter().find(|r| r.instances.contains(&n)) {
                (
                    format!("`{n}` is reserved by origin rule `{}` already", r.name),
                    "put an instance in one rule's subset only (or merge the two rules' prefixes into one rule)".into(),
                )
            } else {
                out.push(n);
                continue;
            };
            self.report(Some(&span), field, problem, fix);
            ok = false;
        }
        ok.then_some(out)
    }

    /// A required, non-empty list of strings, each with its span.
    fn origin_list(
        &mut self,
        field: &str,
        table: &Range<usize>,
        raw: Option<Spanned<Vec<crate::config::raw::Field<String>>>>,
        missing_fix: &str,
        empty_fix: &str,
    ) -> Option<Vec<(String, Range<usize>)>> {
        let Some(list) = raw else {
            self.report(Some(table), field, "missing", missing_fix);
            return None;
        };
        if list.get_ref().is_empty() {
            self.report(Some(&list.span()), field, "empty list", empty_fix);
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for item in list.into_inner() {
            match self.typed(Some(item), field, |v| {
                (
                    format!("`{v}` is not a string"),
                    "write each item in quotes".into(),
                )
            }) {
                Got::Value(v, span) => out.push((v, span)),
                Got::Absent | Got::Bad => ok = false,
            }
        }
        ok.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use crate::config::{
        ConfigError, FieldError,
        tests::{only_error, parse},
    };

    const KV: &str = r#"
[[service]]
name = "kv"
vip = "198.18.0.100"
port = 7000
protocol = "udp"

[[service.origin]]
name = "gold"
prefixes = ["198.18.5.0/24", "fd00:5100:5::/48"]
instances = ["kv-2", "kv-3"]

[[service.origin]]
name = "silver"
prefixes = ["198.18.6.0/24"]
instances = ["kv-1"]
spill = true

[[service.instance]]
name = "kv-0"
veth = "i0"

[[service.instance]]
name = "kv-1"
veth = "i1"

[[service.instance]]
name = "kv-2"
veth = "i2"

[[service.instance]]
name = "kv-3"
veth = "i3"
"#;

    /// `KV` with `from` replaced by `to`: its one error.
    fn one_error(from: &str, to: &str) -> FieldError {
        assert!(KV.contains(from), "{from}");
        only_error(&KV.replacen(from, to, 1))
    }

    #[test]
    fn origin_rules_parse_and_reserve_their_instances() {
        let c = parse(KV).unwrap();
        let s = &c.services[0];
        assert_eq!(s.origins.len(), 2);
        let gold = &s.origins[0];
        assert_eq!(gold.name, "gold");
        assert_eq!(
            gold.prefixes,
            [
                ("198.18.5.0".parse::<IpAddr>().unwrap(), 24),
                ("fd00:5100:5::".parse::<IpAddr>().unwrap(), 48)
            ]
        );
        assert_eq!(gold.instances, ["kv-2", "kv-3"]);
        assert!(!gold.spill, "spill is off by default");
        assert!(s.origins[1].spill);
        assert!(s.is_reserved("kv-1") && s.is_reserved("kv-2") && s.is_reserved("kv-3"));
        assert!(!s.is_reserved("kv-0"));
    }

    #[test]
    fn a_bare_address_is_one_host() {
        let c = parse(&KV.replace("\"198.18.6.0/24\"", "\"198.18.6.7\"")).unwrap();
        assert_eq!(
            c.services[0].origins[1].prefixes,
            [("198.18.6.7".parse::<IpAddr>().unwrap(), 32)]
        );
    }

    #[test]
    fn origin_errors_name_the_field_and_the_fix() {
        for (from, to, field, says, fix) in [
            (
                "instances = [\"kv-2\", \"kv-3\"]",
                "instances = [\"kv-2\", \"kv-9\"]",
                "service[0].origin[0].instances",
                "not an instance of this service",
                "use one of: kv-0",
            ),
            (
                "name = \"silver\"",
                "name = \"gold\"",
                "service[0].origin[1].name",
                "another origin rule",
                "its own name",
            ),
            (
                "\"198.18.5.0/24\"",
                "\"198.18.5.1/24\"",
                "service[0].origin[0].prefixes",
                "host bits set",
                "\"198.18.5.0/24\"",
            ),
            (
                "\"fd00:5100:5::/48\"",
                "\"fd00:5100:5::1/48\"",
                "service[0].origin[0].prefixes",
                "host bits set",
                "\"fd00:5100:5::/48\"",
            ),
            (
                "\"198.18.5.0/24\"",
                "\"198.18.5.0/33\"",
                "service[0].origin[0].prefixes",
                "from 0 to 32",
                "e.g.",
            ),
            (
                "\"198.18.5.0/24\"",
                "\"kv.example/24\"",
                "service[0].origin[0].prefixes",
                "not an IP prefix",
                "e.g.",
            ),
            (
                "prefixes = [\"198.18.6.0/24\"]",
                "prefixes = [\"198.18.5.0/24\"]",
                "service[0].origin[1].prefixes",
                "origin rule `gold` too",
                "one rule only",
            ),
            (
                "instances = [\"kv-1\"]",
                "instances = [\"kv-2\"]",
                "service[0].origin[1].instances",
                "reserved by origin rule `gold`",
                "one rule's subset",
            ),
            (
                "instances = [\"kv-1\"]",
                "instances = []",
                "service[0].origin[1].instances",
                "empty list",
                "at least one instance",
            ),
            (
                "prefixes = [\"198.18.6.0/24\"]\n",
                "",
                "service[0].origin[1].prefixes",
                "missing",
                "prefixes = [",
            ),
            (
                "spill = true",
                "spill = \"yes\"",
                "service[0].origin[1].spill",
                "not true or false",
                "spill = true",
            ),
            (
                "instances = [\"kv-1\"]",
                "instances = [\"kv-1\", \"kv-0\"]",
                "service[0].origin",
                "every instance",
                "leave at least one instance out",
            ),
        ] {
            let e = one_error(from, to);
            assert_eq!(e.field, field, "{e}");
            assert!(e.problem.contains(says), "{e}");
            assert!(e.fix.contains(fix), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
    }

    #[test]
    fn an_http_service_is_told_to_use_priority_rules() {
        let http = KV
            .replace("protocol = \"udp\"", "protocol = \"tcp\"\nlayer = \"http\"")
            .replace("veth = \"i0\"", "veth = \"i0\"\naddr = \"198.18.16.2:80\"")
            .replace("veth = \"i1\"", "veth = \"i1\"\naddr = \"198.18.16.3:80\"")
            .replace("veth = \"i2\"", "veth = \"i2\"\naddr = \"198.18.16.4:80\"")
            .replace("veth = \"i3\"", "veth = \"i3\"\naddr = \"198.18.16.5:80\"");
        let e = only_error(&http);
        assert_eq!(e.field, "service[0].origin", "{e}");
        assert!(e.fix.contains("[[service.http.priority]]"), "{e}");
    }

    #[test]
    fn too_many_prefixes_on_one_host_are_refused() {
        let most = sluice_common::MAX_ORIGIN_PREFIXES;
        let many: Vec<String> = (0..=most)
            .map(|k| format!("\"fd00:5100:7:{k:x}::/64\""))
            .collect();
        let text = KV.replace(
            "prefixes = [\"198.18.6.0/24\"]",
            &format!("prefixes = [{}]", many.join(", ")),
        );
        let e = match parse(&text) {
            Err(ConfigError::Invalid { errors, .. }) => errors,
            other => panic!("expected field errors, got {other:?}"),
        };
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].field, "service[].origin[].prefixes", "{e:#?}");
        assert!(e[0].problem.contains(&most.to_string()), "{e:#?}");
        assert!(!e[0].fix.is_empty());
    }
}
