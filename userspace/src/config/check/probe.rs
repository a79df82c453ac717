//! A service's `probe`: the active check of its instances' applications.

use std::{ops::Range, time::Duration};

use toml::Spanned;

use super::{Checker, Got};
/// Where a field is, if it was given.
fn span<T>(f: Option<&Field<T>>) -> Option<Range<usize>> {
    f.as_ref().map(|f| f.span.clone())
}

use crate::config::{
    Probe, ProbeKind,
    raw::{Field, RawProbe, RawProbeKind},
};

/// Payloads written as `0x` and hex digits are bytes (a DNS query, a
/// binary protocol's ping); anything else is the text itself.
fn payload(s: &str) -> Result<Vec<u8>, String> {
    let Some(hex) = s.strip_prefix("0x") else {
        return Ok(s.as_bytes().to_vec());
    };
    if hex.is_empty() || hex.len() % 2 != 0 {
        return Err(format!("`{s}` has an odd number of hex digits, or none"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|k| {
            u8::from_str_radix(&hex[k..k + 2], 16)
                .map_err(|_| format!("`{}` in `{s}` is not a hex byte", &hex[k..k + 2]))
        })
        .collect()
}

impl Checker<'_> {
    fn probe_payload(&mut self, f: Option<Field<String>>, field: &str) -> Option<Vec<u8>> {
        let bad = |v: &str| {
            (
                format!("`{v}` is not a string"),
                "write the payload as a string: text, or 0x and hex digits".into(),
            )
        };
        match self.typed(f, field, bad) {
            Got::Absent => Some(Vec::new()),
            Got::Value(s, span) => match payload(&s) {
                Ok(b) => Some(b),
                Err(problem) => {
                    self.report(
                        Some(&span),
                        field,
                        problem,
                        "write 0x and pairs of hex digits (0x0001ff), or plain text",
                    );
                    None
                }
            },
            Got::Bad => None,
        }
    }

    /// `None` when something is wrong (reported).
    #[expect(
        clippy::option_option,
        reason = "None: reported; Some(None): no probe table"
    )]
    pub(super) fn probe(
        &mut self,
        at: &str,
        raw: Option<Spanned<RawProbe>>,
    ) -> Option<Option<Probe>> {
        let Some(raw) = raw else { return Some(None) };
        let table = raw.span();
        let mut raw = raw.into_inner();
        let kinds = "\"udp\" (a datagram and its answer), \"tcp\" (a connection), \"http\" (a GET and its status) or \"exec\" (a command in the instance's namespace)";
        let (kind, _) = self.required(
            raw.kind.take(),
            &table,
            &format!("{at}.kind"),
            &format!("set kind = {kinds}"),
            |v| (format!("unknown probe kind `{v}`"), format!("use {kinds}")),
        )?;
        let ok = self.probe_keys_apply(at, kind, &raw);
        let timing = self.probe_timing(at, &mut raw);
        let kind = self.probe_kind(at, &table, kind, raw);
        let (interval, timeout, rise, fall) = timing?;
        let probe = Probe {
            kind: kind?,
            interval,
            timeout,
            rise,
            fall,
        };
        ok.then_some(Some(probe))
    }

    /// Reports every key given that `kind` does not use; whether none was.
    fn probe_keys_apply(&mut self, at: &str, kind: RawProbeKind, raw: &RawProbe) -> bool {
        let name = match kind {
            RawProbeKind::Udp => "udp",
            RawProbeKind::Tcp => "tcp",
            RawProbeKind::Http => "http",
            RawProbeKind::Exec => "exec",
        };
        let keys = [
            ("port", span(raw.port.as_ref()), kind != RawProbeKind::Exec),
            ("send", span(raw.send.as_ref()), kind == RawProbeKind::Udp),
            (
                "expect",
                span(raw.expect.as_ref()),
                kind == RawProbeKind::Udp,
            ),
            ("path", span(raw.path.as_ref()), kind == RawProbeKind::Http),
            (
                "status",
                span(raw.status.as_ref()),
                kind == RawProbeKind::Http,
            ),
            (
                "command",
                raw.command.as_ref().map(Spanned::span),
                kind == RawProbeKind::Exec,
            ),
        ];
        let mut ok = true;
        for (key, span, applies) in keys {
            if let Some(span) = span
                && !applies
            {
                self.report(
                    Some(&span),
                    format!("{at}.{key}"),
                    format!("`{key}` does not apply to probe kind `{name}`"),
                    "remove it, or use the kind it belongs to",
                );
                ok = false;
            }
        }
        ok
    }

    /// Interval, timeout (within the interval), rise and fall.
    fn probe_timing(
        &mut self,
        at: &str,
        raw: &mut RawProbe,
    ) -> Option<(Duration, Duration, u32, u32)> {
        let interval_ms = self.int(
            raw.interval_ms.take(),
            &format!("{at}.interval_ms"),
            1000,
            50,
            3_600_000,
        );
        let timeout_span = span(raw.timeout_ms.as_ref());
        let timeout_ms = self.int(
            raw.timeout_ms.take(),
            &format!("{at}.timeout_ms"),
            500,
            10,
            3_600_000,
        );
        let timeout_ms = match (interval_ms, timeout_ms) {
            (Some(i), Some(t)) if t > i => {
                self.report(
                    timeout_span.as_ref(),
                    format!("{at}.timeout_ms"),
                    format!("{t} is longer than interval_ms {i}"),
                    "a probe must end before the next starts: lower timeout_ms, or raise interval_ms",
                );
                None
            }
            (_, t) => t,
        };
        let rise = self.int(raw.rise.take(), &format!("{at}.rise"), 2, 1, 100);
        let fall = self.int(raw.fall.take(), &format!("{at}.fall"), 2, 1, 100);
        Some((
            Duration::from_millis(interval_ms?.into()),
            Duration::from_millis(timeout_ms?.into()),
            rise?,
            fall?,
        ))
    }

    fn probe_kind(
        &mut self,
        at: &str,
        table: &Range<usize>,
        kind: RawProbeKind,
        raw: RawProbe,
    ) -> Option<ProbeKind> {
        let port = match self.typed(raw.port, &format!("{at}.port"), |v| {
            (
                format!("`{v}` is not a port"),
                "use a port from 1 to 65535".into(),
            )
        }) {
            Got::Value(0, span) => {
                self.report(
                    Some(&span),
                    format!("{at}.port"),
                    "port 0",
                    "use a port from 1 to 65535",
                );
                None
            }
            Got::Value(p, _) => Some(Some(p)),
            Got::Absent => Some(None),
            Got::Bad => None,
        };
        Some(match kind {
            RawProbeKind::Udp => {
                let send = self.probe_payload(raw.send, &format!("{at}.send"));
                let expect = self.probe_payload(raw.expect, &format!("{at}.expect"));
                if matches!(&send, Some(s) if s.is_empty()) {
                    self.report(
                        Some(table),
                        format!("{at}.send"),
                        "missing: a UDP probe needs something to send",
                        "add send = \"ping\" (text) or send = \"0x...\" (bytes): a request the application answers",
                    );
                    return None;
                }
                ProbeKind::Udp {
                    port: port?,
                    send: send?,
                    expect: expect?,
                }
            }
            RawProbeKind::Tcp => ProbeKind::Tcp { port: port? },
            RawProbeKind::Http => {
                let path = self.probe_path(&format!("{at}.path"), raw.path);
                let status = self.probe_status(&format!("{at}.status"), raw.status);
                ProbeKind::Http {
                    port: port?,
                    path: path?,
                    status: status?,
                }
            }
            RawProbeKind::Exec => ProbeKind::Exec {
                command: self.argv(
                    &format!("{at}.command"),
                    table,
                    raw.command,
                    "add command = [\"/usr/local/bin/check\", \"{vip}\", \"{port}\"]: it runs in the instance's namespace and must exit 0",
                )?,
            },
        })
    }

    fn probe_path(&mut self, field: &str, raw: Option<Field<String>>) -> Option<String> {
        match self.typed(raw, field, |v| {
            (
                format!("`{v}` is not a string"),
                "write path = \"/healthz\"".into(),
            )
        }) {
            Got::Absent => Some("/".to_owned()),
            Got::Value(p, span)
                if !p.starts_with('/') || p.chars().any(|c| c.is_ascii_control() || c == ' ') =>
            {
                self.report(
                    Some(&span),
                    field,
                    format!("`{p}` is not a request path"),
                    "start it with / and leave out spaces and control characters, e.g. \"/healthz\"",
                );
                None
            }
            Got::Value(p, _) => Some(p),
            Got::Bad => None,
        }
    }

    #[expect(
        clippy::option_option,
        reason = "None: reported; Some(None): any 2xx or 3xx"
    )]
    fn probe_status(&mut self, field: &str, raw: Option<Field<u16>>) -> Option<Option<u16>> {
        let fix = "use a status from 100 to 599, e.g. 200";
        match self.typed(raw, field, |v| {
            (format!("`{v}` is not a status"), fix.into())
        }) {
            Got::Absent => Some(None),
            Got::Value(s, _) if (100..=599).contains(&s) => Some(Some(s)),
            Got::Value(s, span) => {
                self.report(
                    Some(&span),
                    field,
                    format!("{s} is not an HTTP status"),
                    fix,
                );
                None
            }
            Got::Bad => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::payload;
    use crate::config::{
        Probe, ProbeKind,
        tests::{BASE, only_error, parse},
    };

    /// BASE with `probe` as service `kv`'s probe table (inline).
    fn with_probe(probe: &str) -> String {
        BASE.replacen(
            "protocol = \"udp\"\n",
            &format!("protocol = \"udp\"\nprobe = {{ {probe} }}\n"),
            1,
        )
    }

    #[test]
    fn probes_parse_with_their_defaults() {
        let c = parse(&with_probe(
            "kind = \"udp\", send = \"0x0001\", expect = \"ok\"",
        ))
        .expect("config");
        assert_eq!(
            c.services[0].probe,
            Some(Probe {
                kind: ProbeKind::Udp {
                    port: None,
                    send: vec![0, 1],
                    expect: b"ok".to_vec(),
                },
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
            })
        );
        assert_eq!(c.services[1].probe, None, "opt-in");
        let c = parse(&with_probe(
            "kind = \"http\", port = 8080, path = \"/healthz\", status = 204, interval_ms = 300, timeout_ms = 300, rise = 1, fall = 5",
        ))
        .expect("config");
        let p = c.services[0].probe.as_ref().expect("probe");
        assert_eq!(
            p.kind,
            ProbeKind::Http {
                port: Some(8080),
                path: "/healthz".into(),
                status: Some(204)
            }
        );
        assert_eq!((p.rise, p.fall), (1, 5));
        let c = parse(&with_probe(
            "kind = \"exec\", command = [\"check\", \"{vip}:{port}\"]",
        ))
        .expect("config");
        assert!(
            matches!(&c.services[0].probe.as_ref().expect("probe").kind, ProbeKind::Exec { command } if command.len() == 2)
        );
    }

    #[test]
    fn probe_errors_name_the_field_and_the_fix() {
        for (probe, field, problem) in [
            ("send = \"x\"", "service[0].probe.kind", "missing"),
            (
                "kind = \"icmp\"",
                "service[0].probe.kind",
                "unknown probe kind `icmp`",
            ),
            ("kind = \"udp\"", "service[0].probe.send", "missing"),
            (
                "kind = \"udp\", send = \"0x1\"",
                "service[0].probe.send",
                "odd number",
            ),
            (
                "kind = \"udp\", send = \"x\", expect = \"0xg0\"",
                "service[0].probe.expect",
                "`g0`",
            ),
            (
                "kind = \"tcp\", path = \"/\"",
                "service[0].probe.path",
                "does not apply to probe kind `tcp`",
            ),
            (
                "kind = \"exec\", command = [\"x\"], port = 1",
                "service[0].probe.port",
                "does not apply",
            ),
            (
                "kind = \"tcp\", port = 0",
                "service[0].probe.port",
                "port 0",
            ),
            (
                "kind = \"tcp\", interval_ms = 200, timeout_ms = 300",
                "service[0].probe.timeout_ms",
                "longer than interval_ms 200",
            ),
            (
                "kind = \"tcp\", fall = 0",
                "service[0].probe.fall",
                "out of range",
            ),
            (
                "kind = \"http\", status = 700",
                "service[0].probe.status",
                "not an HTTP status",
            ),
            (
                "kind = \"http\", path = \"healthz\"",
                "service[0].probe.path",
                "not a request path",
            ),
            ("kind = \"exec\"", "service[0].probe.command", "missing"),
            (
                "kind = \"exec\", command = [\"check\", \"{host}\"]",
                "service[0].probe.command[1]",
                "unknown placeholder `{host}`",
            ),
        ] {
            let e = only_error(&with_probe(probe));
            assert_eq!(e.field, field, "{probe}: {e:?}");
            assert!(e.problem.contains(problem), "{probe}: {e:?}");
            assert!(!e.fix.is_empty(), "{probe}: {e:?}");
        }
    }

    #[test]
    fn payloads_are_text_or_hex_bytes() {
        assert_eq!(payload("ping").unwrap(), b"ping");
        assert_eq!(payload("0x00ff10").unwrap(), vec![0, 0xff, 0x10]);
        assert!(payload("0x0").is_err());
        assert!(payload("0x").is_err());
        assert!(payload("0xzz").unwrap_err().contains("`zz`"));
    }
}
