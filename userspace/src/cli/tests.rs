//! The CLI's tables, rendered from API answers.

use super::{groups_table, status_table};
use crate::{
    api::{GroupLine, InstanceLine},
    control::InstanceState,
};

fn line(name: &str, host: &str, utilisation: f64, state: InstanceState) -> InstanceLine {
    InstanceLine {
        service: "kv".into(),
        name: name.into(),
        utilisation,
        rate_pps: 0.0,
        drops_ps: 0.0,
        groups: Vec::new(),
        drained: state == InstanceState::Drained,
        host: host.into(),
        live: true,
        state,
        failure: None,
    }
}

/// The line of instance `name` in `table`, split in words.
fn words<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name))
        .unwrap_or_else(|| panic!("no line for {name}:\n{table}"))
        .split_whitespace()
        .collect()
}

/// A failed instance says why, after its groups.
#[test]
fn status_says_why_an_instance_failed() {
    let mut failed = line("a0", "", 0.0, InstanceState::Failed);
    failed.failure = Some("probe".into());
    let mut ok = line("a1", "", 0.5, InstanceState::Ok);
    ok.groups = vec!["0x0000/1".into()];
    let table = status_table(&[failed, ok]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("a0") && l.ends_with("(failed: probe)")),
        "{table}"
    );
    assert!(
        !table
            .lines()
            .any(|l| l.contains("a1") && l.contains("failed")),
        "{table}"
    );
}

/// Defect (issue 27): `sluice status` showed another host's failed instance
/// as an ordinary one at `util 0.00`, the least loaded, and a drained one
/// on another host not at all as drained.
#[test]
fn status_shows_failed_and_drained_instances_anywhere_in_the_cluster() {
    let table = status_table(&[
        line("a0", "host-a", 0.0, InstanceState::Failed),
        line("a1", "host-a", 0.5, InstanceState::Ok),
        line("b0", "host-b", 0.0, InstanceState::Drained),
    ]);
    let header = words(&table, "instance");
    let col = |name: &str| {
        header
            .iter()
            .position(|w| *w == name)
            .unwrap_or_else(|| panic!("no `{name}` column:\n{table}"))
    };
    let (state, util) = (col("state"), col("util"));
    let a0 = words(&table, "a0");
    assert_eq!(a0[state], "failed", "{table}");
    assert_eq!(
        a0[util], "-",
        "a failed instance's util is not a figure:\n{table}"
    );
    assert_eq!(words(&table, "a1")[state], "ok", "{table}");
    assert_eq!(words(&table, "a1")[util], "0.50", "{table}");
    assert_eq!(words(&table, "b0")[state], "drained", "{table}");
}

/// `sluice groups` names each owner's state: a group still owned by a
/// failed instance stands out.
#[test]
fn groups_show_each_owners_state() {
    let g = |group: &str, owner: &str, state| GroupLine {
        group: group.into(),
        owner: owner.into(),
        version: 7,
        host: "host-a".into(),
        state,
    };
    let table = groups_table(&[
        g("0x0000/1", "a0", InstanceState::Failed),
        g("0x8000/1", "a1", InstanceState::Ok),
    ]);
    assert_eq!(
        words(&table, "a0"),
        ["0x0000/1", "a0", "host-a", "7", "failed"],
        "{table}"
    );
    assert_eq!(words(&table, "a1").last(), Some(&"ok"), "{table}");
}
