use std::fmt::Write as _;

use super::*;
use crate::config::{
    Config,
    tests::{BASE, only_error, parse, spec},
};

/// `BASE` with `s` written into the file as its service's second instance.
fn written(s: &InstanceSpec) -> String {
    let mut table = format!(
        "\n[[service.instance]]\nname = {:?}\nveth = {:?}\n",
        s.name, s.veth
    );
    for (key, value) in [
        ("netns", &s.netns),
        ("mac", &s.mac),
        ("addr", &s.addr),
        ("cgroup", &s.cgroup),
        ("health", &s.health),
    ] {
        if let Some(v) = value {
            writeln!(table, "{key} = {v:?}").expect("a string takes it");
        }
    }
    if let Some(c) = s.cpu_limit {
        writeln!(table, "cpu_limit = {c:?}").expect("a string takes it");
    }
    // The instance goes after its service's first one.
    let at = BASE.find("[[service]]\nname = \"web\"").expect("web");
    if s.service == "kv" {
        format!("{}{table}\n{}", &BASE[..at], &BASE[at..])
    } else {
        format!("{BASE}{table}")
    }
}

/// The one error `s` meets registered, after checking that the file
/// gives the same problem and fix for it at the same key.
fn same_error(s: &InstanceSpec) -> FieldError {
    let mut running = parse(BASE).unwrap();
    let mut api = running.add_instance(s).expect_err("refused");
    assert_eq!(api.len(), 1, "{api:?}");
    let api = api.remove(0);
    let file = only_error(&written(s));
    let index = usize::from(s.service != "kv");
    assert_eq!(
        file.field,
        format!("service[{index}].instance[1].{}", api.field),
        "{file}"
    );
    assert_eq!(
        (&file.problem, &file.fix),
        (&api.problem, &api.fix),
        "file: {file}\nregistration: {api}"
    );
    api
}

#[test]
fn a_registration_meets_the_files_rules_in_the_same_words() {
    let mut s = spec("kv", "kv-1", "v1");
    s.mac = Some("ff:ff:ff:ff:ff:ff".into());
    let e = same_error(&s);
    assert_eq!(
        (e.field.as_str(), e.problem.as_str(), e.fix.as_str()),
        (
            "mac",
            "`ff:ff:ff:ff:ff:ff` is not a unicast MAC address",
            "write six hex bytes like 02:00:5e:10:00:01, or leave mac out to discover it"
        )
    );
    let mut s = spec("web", "web-1", "w1");
    s.addr = Some("nowhere".into());
    let e = same_error(&s);
    assert_eq!(
        (e.field.as_str(), e.problem.as_str(), e.fix.as_str()),
        (
            "addr",
            "`nowhere` is not an address and port",
            "write addr = \"198.18.16.2:8080\" or \"[fd00:5100::2]:8080\""
        )
    );
    let mut s = spec("kv", "kv-1", "v1");
    s.cpu_limit = Some(2.0);
    let e = same_error(&s);
    assert_eq!(
        (e.field.as_str(), e.problem.as_str(), e.fix.as_str()),
        (
            "cpu_limit",
            "cpu_limit without cgroup",
            "add cgroup = \"/sys/fs/cgroup/<container>\" so CPU usage can be read"
        )
    );
    s.cgroup = Some("/sys/fs/cgroup/kv-1".into());
    s.cpu_limit = Some(5000.0);
    let e = same_error(&s);
    assert_eq!(
        (e.problem.as_str(), e.fix.as_str()),
        ("5000 is out of range", "use a number from 0.01 to 4096")
    );
    let mut s = spec("kv", "kv-1", "v1");
    s.health = Some("ping".into());
    let e = same_error(&s);
    assert_eq!(
        (e.field.as_str(), e.problem.as_str()),
        ("health", "unknown health check `ping`")
    );
    assert_eq!(same_error(&spec("kv", "../x", "v1")).field, "name");
    assert_eq!(same_error(&spec("kv", "", "v1")).problem, "empty");
    assert_eq!(same_error(&spec("kv", "kv-1", "a/b")).field, "veth");
}

#[test]
fn bad_spec_fields_are_named() {
    let mut s = spec("kv", "kv-1", "v1");
    s.mac = Some("ff:ff:ff:ff:ff:ff".into());
    assert_eq!(s.check().unwrap_err()[0].field, "mac");
    let mut s = spec("kv", "kv-1", "v1");
    s.health = Some("ping".into());
    assert_eq!(s.check().unwrap_err()[0].field, "health");
    let mut s = spec("kv", "kv-1", "v1");
    s.cpu_limit = Some(2.0);
    assert_eq!(s.check().unwrap_err()[0].field, "cpu_limit");
    let mut s = spec("kv", "kv-1", "v1");
    s.addr = Some("nowhere".into());
    assert_eq!(s.check().unwrap_err()[0].field, "addr");
}

#[test]
fn every_wrong_field_is_reported_at_once() {
    let mut s = spec("kv", "", "a/b");
    s.mac = Some("x".into());
    s.health = Some("ping".into());
    let fields: Vec<String> = s
        .check()
        .unwrap_err()
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(fields, ["name", "veth", "mac", "health"]);
}

#[test]
fn a_good_spec_is_the_files_instance() {
    let mut s = spec("kv", "kv-1", "v1");
    s.mac = Some("02:00:5e:10:00:09".into());
    s.netns = Some("kv1".into());
    s.cgroup = Some("/sys/fs/cgroup/kv-1".into());
    s.cpu_limit = Some(2.0);
    s.health = Some("reports".into());
    let from_file: Config = parse(&written(&s)).unwrap();
    assert_eq!(s.check().unwrap(), from_file.services[0].instances[1]);
}
