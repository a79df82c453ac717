//! The real `sluice` binary in a namespace of the test's own: the CLI
//! (status, groups, drain with progress, undrain, clear errors) and the
//! Prometheus endpoint (every metric the Grafana dashboard uses exists).

mod common;

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    time::Duration,
};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn status_groups_drain_undrain() {
    let missing = common::sluice(&["status", "--api-socket", "/nonexistent/agent.sock"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("no agent answers on /nonexistent/agent.sock"),
        "{}",
        text(&missing)
    );

    let ns = common::netns("cli", 2);
    let config = format!(
        "[agent]\ninterval_ms = 200\nmax_moves_per_sec = 20\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
         # Idle instances would otherwise merge their groups while the test looks.\n\
         wlm = {{ underload = 0.0 }}\n{}",
        common::instances_toml("kv", 2)
    );
    let agent = common::start(&ns, &config, &["--metrics-addr", "127.0.0.1:9478"]);
    let sock = agent.socket.to_str().expect("utf-8 path").to_owned();
    std::thread::sleep(Duration::from_millis(500));

    let status = common::sluice(&["status", "--api-socket", &sock]);
    let out = text(&status);
    assert!(status.status.success(), "{out}");
    assert!(
        out.contains("kv-0")
            && out.contains("kv-1")
            && out.contains("0x0000/1")
            && out.contains("0x8000/1"),
        "{out}"
    );

    let groups = common::sluice(&["groups", "kv", "--api-socket", &sock]);
    let out = text(&groups);
    assert!(
        out.lines()
            .any(|l| l.starts_with("0x0000/1") && l.contains("kv-0")),
        "{out}"
    );

    let drain = common::sluice(&["drain", "kv-0", "--timeout", "30", "--api-socket", &sock]);
    let out = text(&drain);
    assert!(drain.status.success(), "{out}");
    assert!(
        out.contains("kv-0: 1/1 groups moved") && out.trim_end().ends_with("kv-0: drained"),
        "{out}"
    );

    let groups = common::sluice(&["groups", "kv", "--api-socket", &sock]);
    let out = text(&groups);
    assert!(
        out.lines().skip(1).all(|l| l.contains("kv-1")),
        "everything is kv-1's now: {out}"
    );
    let out = text(&common::sluice(&["status", "--api-socket", &sock]));
    assert!(
        out.lines()
            .any(|l| l.contains("kv-0") && l.contains("(drained)")),
        "{out}"
    );

    let undrain = common::sluice(&["undrain", "kv-0", "--api-socket", &sock]);
    assert!(undrain.status.success(), "{}", text(&undrain));
    std::thread::sleep(Duration::from_millis(500));
    let out = text(&common::sluice(&["status", "--api-socket", &sock]));
    assert!(!out.contains("(drained)"), "{out}");

    let bad = common::sluice(&["drain", "nope", "--api-socket", &sock]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("unknown instance `nope`"),
        "{}",
        text(&bad)
    );
    drop(agent);
}

/// GET /metrics from inside the namespace.
fn scrape(ns: &str, port: u16) -> std::io::Result<String> {
    let ns = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = File::open(&ns)?;
            // SAFETY: an open namespace file; only this thread moves.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut c = TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            c.read_to_string(&mut body)?;
            Ok(body)
        })
        .join()
        .expect("scrape thread")
    })
}

fn names_in_exposition(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("sluice_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn names_in_dashboard(json: &str) -> BTreeSet<String> {
    let d: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    let mut out = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("sluice_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                out.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    out
}

#[test]
fn dashboard_uses_only_exported_metrics() {
    let ns = common::netns("met", 1);
    let config = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n{}",
        common::instances_toml("kv", 1)
    );
    let agent = common::start(&ns, &config, &["--metrics-addr", "127.0.0.1:9477"]);
    // A few control intervals, so every gauge has been set.
    std::thread::sleep(Duration::from_millis(700));
    let body = scrape(&ns.0, 9477).expect("scrape /metrics");
    assert!(
        body.starts_with("HTTP/1."),
        "not an HTTP answer: {body:.200}"
    );
    let exported = names_in_exposition(&body);
    let dashboard = names_in_dashboard(include_str!("../../dashboards/sluice.json"));
    assert!(
        dashboard.len() >= 15,
        "the dashboard names only {dashboard:?}"
    );
    let missing: Vec<_> = dashboard.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the agent does not export: {missing:?}\nexported: {exported:?}"
    );
    assert!(!exported.contains("sluice_no_such_metric"));
    // Bounded labels: no label carries a unit or a flow.
    for l in body.lines().filter(|l| l.starts_with("sluice_")) {
        assert!(
            !l.contains("unit=") && !l.contains("flow="),
            "unbounded label: {l}"
        );
    }
    drop(agent);
}
