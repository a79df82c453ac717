//! `[[service.instance]]` as the file writes it: keys missing or of the
//! wrong type, and the line of each error. The rules about the values are
//! [`InstanceSpec::check`]'s, the same a registration meets.

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
};

use toml::Spanned;

use super::{Checker, InstanceSpans};
use crate::config::{
    Instance,
    instance::{self, FIELDS, InstanceSpec, Problem},
    raw::{Field, RawInstance, shown},
};

/// What the file's side learnt of one instance table.
struct Written {
    /// The table, where a missing key is reported.
    table: Range<usize>,
    /// Errors by key, with where they point.
    errors: Vec<(&'static str, Range<usize>, Problem)>,
    /// Where each given key's value is.
    spans: HashMap<&'static str, Range<usize>>,
    /// Keys missing or of the wrong type: reported here, not judged again.
    reported: HashSet<&'static str>,
}

impl Written {
    /// The value of string key `key` as written. A value of another type
    /// is reported with `bad(as written)`; without `bad` it goes to the
    /// check as written, whose message fits it.
    fn text(
        &mut self,
        key: &'static str,
        f: Option<Field<String>>,
        bad: Option<fn(&str) -> Problem>,
    ) -> Option<String> {
        let f = f?;
        self.spans.insert(key, f.span.clone());
        match (f.value, bad) {
            (Ok(s), _) => Some(s),
            (Err(v), None) => Some(shown(&v)),
            (Err(v), Some(bad)) => {
                let written = shown(&v);
                self.errors.push((key, f.span, bad(&written)));
                self.reported.insert(key);
                Some(written)
            }
        }
    }

    /// A required string key; missing, it is reported with `fix`.
    fn required(
        &mut self,
        key: &'static str,
        f: Option<Field<String>>,
        bad: fn(&str) -> Problem,
        fix: &str,
    ) -> String {
        if f.is_none() {
            self.errors
                .push((key, self.table.clone(), ("missing".into(), fix.into())));
            self.reported.insert(key);
        }
        self.text(key, f, Some(bad)).unwrap_or_default()
    }
}

fn not_a_name(v: &str) -> Problem {
    (
        format!("`{v}` is not a name"),
        "write the name as a string".into(),
    )
}

fn not_a_string(v: &str) -> Problem {
    (
        format!("`{v}` is not a string"),
        "write it in quotes".into(),
    )
}

impl Checker<'_> {
    /// An instance, with the spans of its name and veth.
    pub(super) fn instance(
        &mut self,
        at: &str,
        raw: Spanned<RawInstance>,
    ) -> Option<(Instance, InstanceSpans)> {
        let mut w = Written {
            table: raw.span(),
            errors: Vec::new(),
            spans: HashMap::new(),
            reported: HashSet::new(),
        };
        let raw = raw.into_inner();
        let cpu_limit = raw.cpu_limit.map(|f| {
            w.spans.insert("cpu_limit", f.span.clone());
            f.value.unwrap_or_else(|v| {
                w.errors.push((
                    "cpu_limit",
                    f.span,
                    (
                        format!("{} is not a number", shown(&v)),
                        instance::cpu_limit_fix(),
                    ),
                ));
                // A stand-in in range: whether a cgroup goes with it is
                // still judged.
                instance::CPU_LIMIT.0
            })
        });
        let spec = InstanceSpec {
            service: String::new(),
            name: w.required("name", raw.name, not_a_name, "add name = \"my-instance\""),
            veth: w.required(
                "veth",
                raw.veth,
                instance::bad_veth,
                "add veth = \"<host-side veth of the instance's container>\"",
            ),
            netns: w.text("netns", raw.netns, Some(not_a_string)),
            mac: w.text("mac", raw.mac, None),
            addr: w.text("addr", raw.addr, None),
            cgroup: w.text("cgroup", raw.cgroup, Some(not_a_string)),
            cpu_limit,
            health: w.text("health", raw.health, None),
        };
        let checked = spec.check().map_err(|errors| {
            for e in errors {
                let key = FIELDS
                    .into_iter()
                    .find(|k| *k == e.field)
                    .expect("the check names the instance's keys");
                if !w.reported.contains(key) {
                    let span = w.spans.get(key).unwrap_or(&w.table).clone();
                    w.errors.push((key, span, (e.problem, e.fix)));
                }
            }
        });
        // In the order of the keys, as one instance's errors always were.
        w.errors
            .sort_by_key(|(key, ..)| FIELDS.iter().position(|k| k == key));
        let ok = w.errors.is_empty();
        for (key, span, (problem, fix)) in w.errors {
            self.report(Some(&span), format!("{at}.{key}"), problem, fix);
        }
        let inst = checked.ok().filter(|_| ok)?;
        let spans = (w.spans.remove("name")?, w.spans.remove("veth")?);
        Some((inst, spans))
    }
}
