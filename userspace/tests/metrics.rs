//! The real `sluice run`, scraped over HTTP: every metric the Grafana
//! dashboard uses exists.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A network namespace of this test, deleted on drop (with its links).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The agent we started; stopped by its pid on drop.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(i32::try_from(self.0.id()).expect("pid"), libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {}", args.join(" "));
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
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: set up, start, scrape, compare"
)]
fn dashboard_uses_only_exported_metrics() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the agent attaches XDP"
    );
    let ns = Netns(format!("sl-met-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ns.0, "link", "add", "nic0", "type", "veth", "peer", "name", "wire0",
    ]);
    ip(&[
        "-n",
        &ns.0,
        "link",
        "add",
        "v0",
        "type",
        "veth",
        "peer",
        "name",
        "p0",
        "address",
        "02:5c:00:00:00:01",
    ]);
    for dev in ["nic0", "wire0", "v0", "p0"] {
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
         [[service.instance]]\nname = \"kv-0\"\nveth = \"v0\"\nmac = \"02:5c:00:00:00:01\"\n",
    )
    .expect("config");
    let sock = dir.path().join("agent.sock");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_sluice"),
            "run",
            "--iface",
            "nic0",
            "--stats-interval",
            "0",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("state.json"))
        .arg("--api-socket")
        .arg(&sock)
        .args(["--metrics-addr", "127.0.0.1:9477"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let mut agent = AgentProcess(child);
    let t = Instant::now();
    while sluice::api::call(&sock, &sluice::api::Request::Status {}).is_err() {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = agent
                .0
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut err));
            panic!("the agent exited ({status}): {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
}
