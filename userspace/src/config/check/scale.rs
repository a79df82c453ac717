//! `[service.scale]`: instance bounds, pacing, the launcher, the failure
//! rule and the SLA windows.

use std::{
    net::{IpAddr, Ipv4Addr},
    ops::Range,
    time::Duration,
};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{Checker, Got, Shape, value_mut};
use crate::config::{
    FailureRule, Launcher, MAX_INSTANCES, PLACEHOLDERS, ScaleConfig, SlaWindow, TemplatePart,
    raw::{Field, RawFailure, RawLauncher, RawLauncherKind, RawScale, RawWindow},
    template_parts,
};

/// A list of strings as written, with its span.
type RawList = Spanned<Vec<Field<String>>>;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `mon`, or a range `mon-fri` (a range may wrap: `fri-mon`): the days it
/// names, 0 being Monday.
fn parse_days(s: &str) -> Option<Vec<usize>> {
    let day = |d: &str| DAYS.iter().position(|n| n.eq_ignore_ascii_case(d.trim()));
    match s.split_once('-') {
        None => Some(vec![day(s)?]),
        Some((a, b)) => {
            let (a, b) = (day(a)?, day(b)?);
            let len = (b + 7 - a) % 7 + 1;
            Some((0..len).map(|k| (a + k) % 7).collect())
        }
    }
}

/// `HH:MM` (or `H:MM`) as a minute of the day; `24:00` (1440) only when
/// `end` (a window's exclusive end).
fn parse_time(s: &str, end: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if end => Some(1440),
        (0..24, 0..60) => Some(h * 60 + m),
        _ => None,
    }
}

/// `address/length`, or a bare address (a host prefix).
fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = if let Some((a, l)) = s.split_once('/') {
        (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?)
    } else {
        let a: IpAddr = s.parse().ok()?;
        (a, if a.is_ipv4() { 32 } else { 128 })
    };
    let most = if addr.is_ipv4() { 32 } else { 128 };
    (len <= most).then_some((addr, len))
}

/// `addr` with the bits past `len` cleared.
fn network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

impl Checker<'_> {
    /// Takes out wrong-shaped compound values of service `i`'s scale
    /// table (see [`Checker::shapes`]).
    pub(super) fn scale_shapes(&mut self, svc: &mut DeTable<'_>, i: usize) {
        let at = format!("service[{i}].scale");
        self.shape(
            svc,
            "scale",
            Shape::Table,
            &at,
            "write the scaling settings in a [service.scale] table",
        );
        let Some(DeValue::Table(scale)) = value_mut(svc, "scale") else {
            return;
        };
        for (key, shape, fix) in [
            (
                "launcher",
                Shape::Table,
                "write launcher = { kind = \"command\", start = [...], stop = [...] }",
            ),
            (
                "failure",
                Shape::Table,
                "write the failure rule in a [service.scale.failure] table",
            ),
            (
                "window",
                Shape::Tables,
                "write each SLA window as a [[service.scale.window]] table",
            ),
        ] {
            self.shape(scale, key, shape, &format!("{at}.{key}"), fix);
        }
        if let Some(DeValue::Table(launcher)) = value_mut(scale, "launcher") {
            for (key, fix) in [
                (
                    "start",
                    "write start = [\"podman\", \"run\", \"-d\", \"--name\", \"{name}\", \"<image>\"]",
                ),
                (
                    "stop",
                    "write stop = [\"podman\", \"rm\", \"-f\", \"{name}\"]",
                ),
                (
                    "command",
                    "write command = [\"python3\", \"-m\", \"http.server\", \"{port}\"]",
                ),
                ("routes", "write routes = [\"198.18.0.0/24\"]"),
            ] {
                self.shape(
                    launcher,
                    key,
                    Shape::List,
                    &format!("{at}.launcher.{key}"),
                    fix,
                );
            }
        }
        if let Some(DeValue::Array(windows)) = value_mut(scale, "window") {
            for (k, w) in windows.iter_mut().enumerate() {
                if let DeValue::Table(w) = w.get_mut() {
                    self.shape(
                        w,
                        "days",
                        Shape::List,
                        &format!("{at}.window[{k}].days"),
                        "write days = [\"mon-fri\"] or [\"sat\", \"sun\"]",
                    );
                }
            }
        }
    }

    /// A service's scaling settings: `Some(None)` without a scale table,
    /// `None` when something is wrong (reported). `configured` is the
    /// number of instances the file gives the service; `underload` the
    /// service's WLM under-load threshold, when it is valid.
    #[expect(
        clippy::option_option,
        reason = "None: reported; Some(None): no scale table"
    )]
    pub(super) fn scale(
        &mut self,
        at: &str,
        raw: Option<Spanned<RawScale>>,
        configured: usize,
        underload: Option<f64>,
    ) -> Option<Option<ScaleConfig>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let table = raw.span();
        let mut raw = raw.into_inner();
        let (min, max) = self.bounds(at, &table, &mut raw, configured);
        let out_intervals = self.int(
            raw.out_intervals,
            &format!("{at}.out_intervals"),
            5,
            1,
            100_000,
        );
        let in_intervals = self.int(
            raw.in_intervals,
            &format!("{at}.in_intervals"),
            30,
            1,
            1_000_000,
        );
        let cooldown = self.num(
            raw.cooldown_secs,
            &format!("{at}.cooldown_secs"),
            30.0,
            0.001,
            86_400.0,
        );
        let drain_deadline = self.num(
            raw.drain_deadline_secs,
            &format!("{at}.drain_deadline_secs"),
            30.0,
            0.0,
            86_400.0,
        );
        let launcher = match raw.launcher {
            None => Some(None),
            Some(l) => self.launcher(&format!("{at}.launcher"), l).map(Some),
        };
        let failure = match raw.failure {
            None => Some(FailureRule::default()),
            Some(f) => self.failure(&format!("{at}.failure"), f),
        };
        let windows: Vec<Option<SlaWindow>> = raw
            .window
            .into_iter()
            .enumerate()
            .map(|(k, w)| self.window(&format!("{at}.window[{k}]"), w, max, underload))
            .collect();
        Some(Some(ScaleConfig {
            min_instances: min?,
            max_instances: max?,
            out_intervals: out_intervals?,
            in_intervals: in_intervals?,
            cooldown: Duration::from_secs_f64(cooldown?),
            drain_deadline: Duration::from_secs_f64(drain_deadline?),
            launcher: launcher?,
            failure: failure?,
            windows: windows.into_iter().collect::<Option<_>>()?,
        }))
    }

    /// `min_instances` and `max_instances`, against each other, the
    /// agent's limit and the instances already configured.
    fn bounds(
        &mut self,
        at: &str,
        table: &Range<usize>,
        raw: &mut RawScale,
        configured: usize,
    ) -> (Option<u32>, Option<u32>) {
        let limit = u32::try_from(MAX_INSTANCES).expect("a small limit");
        let whole = |field: &'static str| {
            move |v: &str| {
                (
                    format!("{v} is not a whole number"),
                    format!("write {field} as a whole number from 1 to {limit}"),
                )
            }
        };
        let min_field = format!("{at}.min_instances");
        let min = match self.typed(raw.min_instances.take(), &min_field, whole("min_instances")) {
            Got::Absent => Some(1),
            Got::Value(0, span) => {
                self.report(
                    Some(&span),
                    &min_field,
                    "0 instances: the service would have nobody to serve it",
                    "use min_instances = 1 or more",
                );
                None
            }
            Got::Value(v, span) if v > limit => {
                self.report(
                    Some(&span),
                    &min_field,
                    format!("{v} is above the agent's limit of {limit} instances"),
                    format!("use at most {limit}"),
                );
                None
            }
            Got::Value(v, _) => Some(v),
            Got::Bad => None,
        };
        let max_field = format!("{at}.max_instances");
        let max = match self.required(
            raw.max_instances.take(),
            table,
            &max_field,
            "add max_instances = N: the most instances the agent may run for the service",
            whole("max_instances"),
        ) {
            Some((v, span)) if v > limit => {
                self.report(
                    Some(&span),
                    &max_field,
                    format!("{v} is above the agent's limit of {limit} instances"),
                    format!("use at most {limit}"),
                );
                None
            }
            Some((v, span)) if min.is_some_and(|m| v < m) => {
                let m = min.expect("checked");
                self.report(
                    Some(&span),
                    &max_field,
                    format!("max_instances {v} is below min_instances {m}"),
                    format!("raise max_instances to at least {m}, or lower min_instances"),
                );
                None
            }
            Some((v, span)) if usize::try_from(v).is_ok_and(|v| configured > v) => {
                self.report(
                    Some(&span),
                    &max_field,
                    format!(
                        "{configured} instances are configured, more than max_instances {v} (the bounds count configured instances too)"
                    ),
                    format!(
                        "raise max_instances to at least {configured}, or configure fewer [[service.instance]] tables"
                    ),
                );
                None
            }
            Some((v, _)) => Some(v),
            None => None,
        };
        (min, max)
    }

    fn launcher(&mut self, at: &str, raw: Spanned<RawLauncher>) -> Option<Launcher> {
        let table = raw.span();
        let raw = raw.into_inner();
        let kinds = "\"command\" (your start and stop commands) or \"netns\" (the agent runs the server command in a network namespace of its own)";
        let (kind, _) = self.required(
            raw.kind,
            &table,
            &format!("{at}.kind"),
            &format!("set kind = {kinds}"),
            |v| {
                (
                    format!("unknown launcher kind `{v}`"),
                    format!("use {kinds}"),
                )
            },
        )?;
        let (name, other, foreign) = match kind {
            RawLauncherKind::Command => (
                "command",
                "netns",
                vec![
                    ("command", raw.command.as_ref().map(Spanned::span)),
                    ("subnet", raw.subnet.as_ref().map(|f| f.span.clone())),
                    ("routes", raw.routes.as_ref().map(Spanned::span)),
                ],
            ),
            RawLauncherKind::Netns => (
                "netns",
                "command",
                vec![
                    ("start", raw.start.as_ref().map(Spanned::span)),
                    ("stop", raw.stop.as_ref().map(Spanned::span)),
                ],
            ),
        };
        let mut ok = true;
        for (key, span) in foreign {
            if let Some(span) = span {
                self.report(
                    Some(&span),
                    format!("{at}.{key}"),
                    format!("`{key}` does not apply to launcher kind `{name}`"),
                    format!("remove it, or use kind = \"{other}\""),
                );
                ok = false;
            }
        }
        let start_timeout = self
            .num(
                raw.start_timeout_secs,
                &format!("{at}.start_timeout_secs"),
                30.0,
                0.1,
                3600.0,
            )
            .map(Duration::from_secs_f64);
        let launcher = match kind {
            RawLauncherKind::Command => {
                let start = self.argv(
                    &format!("{at}.start"),
                    &table,
                    raw.start,
                    "add start = [\"podman\", \"run\", \"-d\", \"--name\", \"{name}\", \"<image>\"]: the command that starts one instance",
                );
                let stop = self.argv(
                    &format!("{at}.stop"),
                    &table,
                    raw.stop,
                    "add stop = [\"podman\", \"rm\", \"-f\", \"{name}\"]: the command that stops one instance",
                );
                Launcher::Command {
                    start: start?,
                    stop: stop?,
                    start_timeout: start_timeout?,
                }
            }
            RawLauncherKind::Netns => {
                let command = self.argv(
                    &format!("{at}.command"),
                    &table,
                    raw.command,
                    "add command = [\"python3\", \"-m\", \"http.server\", \"{port}\"]: the server each instance runs",
                );
                let subnet = self.subnet(&format!("{at}.subnet"), &table, raw.subnet);
                let routes = self.routes(&format!("{at}.routes"), raw.routes);
                Launcher::Netns {
                    command: command?,
                    subnet: subnet?,
                    routes: routes?,
                    start_timeout: start_timeout?,
                }
            }
        };
        ok.then_some(launcher)
    }

    /// A command line: a non-empty list of strings, the program not empty,
    /// every placeholder a known one.
    pub(super) fn argv(
        &mut self,
        field: &str,
        table: &Range<usize>,
        raw: Option<RawList>,
        missing_fix: &str,
    ) -> Option<Vec<String>> {
        let Some(raw) = raw else {
            self.report(Some(table), field, "missing", missing_fix);
            return None;
        };
        let span = raw.span();
        let items = raw.into_inner();
        if items.is_empty() {
            self.report(
                Some(&span),
                field,
                "empty list: there is no program to run",
                "give the program and its arguments, one string each",
            );
            return None;
        }
        let known = PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ");
        let mut out = Some(Vec::with_capacity(items.len()));
        for (k, item) in items.into_iter().enumerate() {
            let at = format!("{field}[{k}]");
            let got = self.typed(Some(item), &at, |v| {
                (
                    format!("`{v}` is not a string"),
                    "write each argument in quotes".into(),
                )
            });
            let Got::Value(arg, span) = got else {
                out = None;
                continue;
            };
            let problem = if k == 0 && arg.is_empty() {
                Some((
                    "the program is an empty string".to_owned(),
                    "name the program to run first, e.g. \"podman\"".to_owned(),
                ))
            } else {
                match template_parts(&arg) {
                    Err(e) => Some((
                        format!("`{arg}` has {e}"),
                        "write {{ and }} for a literal brace".to_owned(),
                    )),
                    Ok(parts) => parts.iter().find_map(|p| match p {
                        TemplatePart::Placeholder(name) if !PLACEHOLDERS.contains(name) => Some((
                            format!("unknown placeholder `{{{name}}}` in `{arg}`"),
                            format!("use {known} (write {{{{ and }}}} for a literal brace)"),
                        )),
                        _ => None,
                    }),
                }
            };
            match problem {
                Some((problem, fix)) => {
                    self.report(Some(&span), &at, problem, fix);
                    out = None;
                }
                None => {
                    if let Some(v) = &mut out {
                        v.push(arg);
                    }
                }
            }
        }
        out
    }

    /// The netns launcher's subnet: an IPv4 prefix from /16 to /30, its
    /// host bits clear.
    fn subnet(
        &mut self,
        field: &str,
        table: &Range<usize>,
        raw: Option<Field<String>>,
    ) -> Option<(Ipv4Addr, u8)> {
        let example = "subnet = \"198.18.96.0/20\"";
        let (s, span) = self.required(
            raw,
            table,
            field,
            &format!("add {example}: the addresses the instances' namespaces get"),
            |v| (format!("`{v}` is not a string"), format!("write {example}")),
        )?;
        let bad = |c: &mut Self, problem: String, fix: String| {
            c.report(Some(&span), field, problem, fix);
            None
        };
        let Some((addr, len)) = parse_prefix(&s) else {
            return bad(
                self,
                format!("`{s}` is not an address prefix"),
                format!("write {example}"),
            );
        };
        let IpAddr::V4(v4) = addr else {
            return bad(
                self,
                format!("`{s}` is IPv6; the namespaces' subnet must be IPv4"),
                format!("use an IPv4 prefix, e.g. {example}"),
            );
        };
        if !(16..=30).contains(&len) {
            let size = if len > 30 { "too small" } else { "too large" };
            return bad(
                self,
                format!("/{len} is {size} for the instances' subnet"),
                "use a prefix length from /16 to /30".into(),
            );
        }
        let net = network(addr, len);
        if net != addr {
            return bad(
                self,
                format!("`{s}` has host bits set"),
                format!("write the network address: \"{net}/{len}\""),
            );
        }
        Some((v4, len))
    }

    /// The netns launcher's routes: prefixes (a bare address is a host
    /// route), host bits clear.
    fn routes(&mut self, field: &str, raw: Option<RawList>) -> Option<Vec<(IpAddr, u8)>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let mut out = Some(Vec::new());
        for (k, item) in raw.into_inner().into_iter().enumerate() {
            let at = format!("{field}[{k}]");
            let fix = "write a prefix like \"198.18.0.0/24\" or \"fd00:5100::/64\", or an address";
            let Got::Value(s, span) = self.typed(Some(item), &at, |v| {
                (format!("`{v}` is not a string"), fix.into())
            }) else {
                out = None;
                continue;
            };
            let problem = match parse_prefix(&s) {
                None => Some((format!("`{s}` is not an address prefix"), fix.to_owned())),
                Some((a, len)) if network(a, len) != a => Some((
                    format!("`{s}` has host bits set"),
                    format!("write the network address: \"{}/{len}\"", network(a, len)),
                )),
                Some(p) => {
                    if let Some(v) = &mut out {
                        v.push(p);
                    }
                    None
                }
            };
            if let Some((problem, fix)) = problem {
                self.report(Some(&span), &at, problem, fix);
                out = None;
            }
        }
        out
    }

    fn failure(&mut self, at: &str, raw: Spanned<RawFailure>) -> Option<FailureRule> {
        let d = FailureRule::default();
        let raw = raw.into_inner();
        let restarts = self.int(raw.restarts, &format!("{at}.restarts"), d.restarts, 0, 1000);
        let window = self.num(
            raw.window_secs,
            &format!("{at}.window_secs"),
            d.window.as_secs_f64(),
            1.0,
            604_800.0,
        );
        Some(FailureRule {
            restarts: restarts?,
            window: Duration::from_secs_f64(window?),
        })
    }

    fn window(
        &mut self,
        at: &str,
        raw: Spanned<RawWindow>,
        max: Option<u32>,
        underload: Option<f64>,
    ) -> Option<SlaWindow> {
        let table = raw.span();
        let raw = raw.into_inner();
        let days = self.days(&format!("{at}.days"), raw.days);
        let time = |c: &mut Self, f: Option<Field<String>>, key: &str, end: bool| {
            let field = format!("{at}.{key}");
            let fix = if end {
                "write the local time as HH:MM, from 00:00 to 24:00"
            } else {
                "write the local time as HH:MM, from 00:00 to 23:59"
            };
            let bad = |v: &str| (format!("`{v}` is not a time of day"), fix.to_owned());
            let (s, span) =
                c.required(f, &table, &field, &format!("add {key} = \"08:00\""), bad)?;
            let m = parse_time(&s, end);
            if m.is_none() {
                let (problem, fix) = bad(&s);
                c.report(Some(&span), &field, problem, fix);
            }
            m.map(|m| (m, span))
        };
        let from = time(self, raw.from, "from", false);
        let to = time(self, raw.to, "to", true);
        let clash = match (&from, &to) {
            (Some((f, _)), Some((t, span))) if f == t => Some(span.clone()),
            _ => None,
        };
        if let Some(span) = &clash {
            let shown = raw_time(from.as_ref().map_or(0, |f| f.0));
            self.report(
                Some(span),
                format!("{at}.to"),
                format!("from and to are both {shown}: the window is empty"),
                "for the whole day write from = \"00:00\", to = \"24:00\"; a window crossing midnight has to before from (from = \"22:00\", to = \"06:00\")",
            );
        }
        let min_field = format!("{at}.min_instances");
        let min_instances = match self.typed(raw.min_instances, &min_field, |v| {
            (
                format!("{v} is not a whole number"),
                "write min_instances as a whole number from 1 to the service's max_instances"
                    .into(),
            )
        }) {
            Got::Absent => Some(None),
            Got::Value(m, span) if m == 0 || max.is_some_and(|x| m > x) => {
                let most = max.map_or_else(|| "max_instances".to_owned(), |x| x.to_string());
                self.report(
                    Some(&span),
                    &min_field,
                    format!("{m} is outside 1 to max_instances ({most})"),
                    format!("use a whole number from 1 to {most}"),
                );
                None
            }
            Got::Value(m, _) => Some(Some(m)),
            Got::Bad => None,
        };
        let overload_span = raw.overload.as_ref().map(|f| f.span.clone());
        let overload = match raw.overload {
            None => Some(None),
            f => match self.num(f, &format!("{at}.overload"), 0.0, 0.05, 10.0) {
                Some(o) if underload.is_some_and(|u| o <= u) => {
                    let u = underload.expect("checked");
                    self.report(
                        overload_span.as_ref(),
                        format!("{at}.overload"),
                        format!("overload {o} is not above the service's wlm.underload {u}"),
                        format!("raise it above {u} (keep a gap), or lower wlm.underload"),
                    );
                    None
                }
                o => o.map(Some),
            },
        };
        if clash.is_some() {
            return None;
        }
        Some(SlaWindow {
            days: days?,
            from: from?.0,
            to: to?.0,
            min_instances: min_instances?,
            overload: overload?,
        })
    }

    /// A window's days: all seven when absent.
    fn days(&mut self, field: &str, raw: Option<RawList>) -> Option<[bool; 7]> {
        let Some(raw) = raw else {
            return Some([true; 7]);
        };
        let span = raw.span();
        let items = raw.into_inner();
        let fix = "use mon, tue, wed, thu, fri, sat, sun, or a range like \"mon-fri\"";
        if items.is_empty() {
            self.report(
                Some(&span),
                field,
                "empty list: the window would never hold",
                format!("list its days ({fix}), or leave days out for every day"),
            );
            return None;
        }
        let mut days = Some([false; 7]);
        for (k, item) in items.into_iter().enumerate() {
            let at = format!("{field}[{k}]");
            let bad = |v: &str| (format!("`{v}` is not a day"), fix.to_owned());
            match self.typed(Some(item), &at, bad) {
                Got::Value(s, span) => {
                    if let Some(named) = parse_days(&s) {
                        if let Some(d) = &mut days {
                            for n in named {
                                d[n] = true;
                            }
                        }
                    } else {
                        let (problem, fix) = bad(&s);
                        self.report(Some(&span), &at, problem, fix);
                        days = None;
                    }
                }
                Got::Absent | Got::Bad => days = None,
            }
        }
        days
    }
}

/// A minute of the day as `HH:MM`.
fn raw_time(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[cfg(test)]
mod tests;
