//! The real `sluice` binary in a namespace of the test's own: the CLI
//! (status, groups, drain with progress, undrain, clear errors) and the
//! Prometheus endpoint (every metric the Grafana dashboard uses exists).

use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use sluice_tests::{netns, process};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn status_groups_drain_undrain() {
    let missing = process::sluice(&["status", "--api-socket", "/nonexistent/agent.sock"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("no agent answers on /nonexistent/agent.sock"),
        "{}",
        text(&missing)
    );

    let ns = process::netns("cli", 2);
    let config = format!(
        "[agent]\ninterval_ms = 200\nmax_moves_per_sec = 20\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
         # Idle instances would otherwise merge their groups while the test looks.\n\
         wlm = {{ underload = 0.0 }}\n{}",
        process::instances_toml("kv", 2)
    );
    let pins = process::PinDir::new("cli");
    let state = tempfile::tempdir().expect("tempdir");
    let agent = process::start(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9478,
        },
    );
    let sock = agent.socket.to_str().expect("utf-8 path").to_owned();
    std::thread::sleep(Duration::from_millis(500));

    let status = process::sluice(&["status", "--api-socket", &sock]);
    let out = text(&status);
    assert!(status.status.success(), "{out}");
    assert!(
        out.contains("kv-0")
            && out.contains("kv-1")
            && out.contains("0x0000/1")
            && out.contains("0x8000/1"),
        "{out}"
    );

    let groups = process::sluice(&["groups", "kv", "--api-socket", &sock]);
    let out = text(&groups);
    assert!(
        out.lines()
            .any(|l| l.starts_with("0x0000/1") && l.contains("kv-0")),
        "{out}"
    );

    let drain = process::sluice(&["drain", "kv-0", "--timeout", "30", "--api-socket", &sock]);
    let out = text(&drain);
    assert!(drain.status.success(), "{out}");
    assert!(
        out.contains("kv-0: 1/1 groups moved") && out.trim_end().ends_with("kv-0: drained"),
        "{out}"
    );

    let groups = process::sluice(&["groups", "kv", "--api-socket", &sock]);
    let out = text(&groups);
    assert!(
        out.lines().skip(1).all(|l| l.contains("kv-1")),
        "everything is kv-1's now: {out}"
    );
    let out = text(&process::sluice(&["status", "--api-socket", &sock]));
    assert!(
        out.lines()
            .any(|l| l.contains("kv-0") && l.split_whitespace().any(|w| w == "drained")),
        "{out}"
    );

    let undrain = process::sluice(&["undrain", "kv-0", "--api-socket", &sock]);
    assert!(undrain.status.success(), "{}", text(&undrain));
    std::thread::sleep(Duration::from_millis(500));
    let out = text(&process::sluice(&["status", "--api-socket", &sock]));
    assert!(
        !out.lines()
            .any(|l| l.split_whitespace().any(|w| w == "drained")),
        "{out}"
    );

    let bad = process::sluice(&["drain", "nope", "--api-socket", &sock]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("unknown instance `nope`"),
        "{}",
        text(&bad)
    );
    drop(agent);
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
    let ns = process::netns("met", 1);
    // An http service too, for the L7 distributor's metrics (its instance
    // shares kv-0's container; no request is sent).
    let config = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\nscale = {{ max_instances = 2 }}\n{}\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.1.2\"\nport = 80\nprotocol = \"tcp\"\nlayer = \"http\"\n\
         [[service.instance]]\nname = \"web-0\"\nveth = \"v0\"\nmac = \"02:5c:00:00:00:01\"\naddr = \"198.18.9.9:8080\"\n",
        process::instances_toml("kv", 1)
    );
    let pins = process::PinDir::new("met");
    let state = tempfile::tempdir().expect("tempdir");
    let agent = process::start(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9477,
        },
    );
    // A few control intervals, so every gauge has been set.
    std::thread::sleep(Duration::from_millis(700));
    let body = process::scrape(&ns.0, 9477).expect("scrape /metrics");
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

/// Packets `dev` received, inside the namespace.
fn rx_packets(ns: &str, dev: &str) -> u64 {
    netns::run_in(ns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
        text.lines()
            .find_map(|l| {
                l.trim_start()
                    .strip_prefix(&format!("{dev}:"))
                    .map(str::to_owned)
            })
            .and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok())
            .expect("rx packets")
    })
}

fn xdp_attached(ns: &str) -> bool {
    xdp_prog_id(ns).is_some()
}

/// Traffic flows through an agent restart with zero loss: the program and
/// maps stay pinned while no agent runs, and the new agent adopts them.
/// Then `sluice detach` takes the data path down.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: start, send, restart, count, detach"
)]
fn restart_loses_nothing_and_detach_cleans_up() {
    let ns = process::netns("rst", 1);
    // The "client" is the namespace itself, sending out of wire0 into nic0.
    let nic_mac = {
        let out = std::process::Command::new("ip")
            .args(["-n", &ns.0, "-br", "link", "show", "nic0"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)
            .expect("mac")
            .to_owned()
    };
    process::ip(&["-n", &ns.0, "addr", "add", "198.18.0.2/24", "dev", "wire0"]);
    process::ip(&[
        "-n",
        &ns.0,
        "route",
        "add",
        "198.18.1.0/24",
        "via",
        "198.18.0.1",
        "dev",
        "wire0",
    ]);
    process::ip(&[
        "-n",
        &ns.0,
        "neigh",
        "replace",
        "198.18.0.1",
        "lladdr",
        &nic_mac,
        "dev",
        "wire0",
    ]);
    // The instance side needs NAPI to take redirected frames.
    netns::run_in(&ns.0, || {
        netns::set_offload("p0", netns::Offload::Gro, true)
    })
    .expect("gro on p0");
    let config = format!(
        "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n{}",
        process::instances_toml("kv", 1)
    );
    let pins = process::PinDir::new("rst");
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("state.json");
    let start = |cleanup| {
        process::start(
            &ns,
            &process::Start {
                config: &config,
                pin_dir: &pins.0,
                state: &state,
                cleanup,
                metrics_port: 9479,
            },
        )
    };
    let first = start(false);
    let before = rx_packets(&ns.0, "p0");
    let sock =
        netns::run_in(&ns.0, || std::net::UdpSocket::bind("198.18.0.2:0")).expect("client socket");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let t = std::time::Instant::now();
            // About 4,000 a second, for at most 20 s.
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && t.elapsed() < Duration::from_secs(20)
            {
                for _ in 0..4 {
                    sock.send_to(&sent.to_be_bytes(), "198.18.1.1:7000")
                        .expect("send");
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(first.stop().success(), "the first agent exits cleanly");
    assert!(
        xdp_attached(&ns.0),
        "the program stays attached while no agent runs"
    );
    std::thread::sleep(Duration::from_millis(500));
    let second = start(false);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    std::thread::sleep(Duration::from_millis(300));
    let delivered = rx_packets(&ns.0, "p0") - before;
    eprintln!("through a restart: sent {sent}, delivered {delivered}");
    assert!(sent > 5000, "sent only {sent}");
    assert_eq!(delivered, sent, "datagrams lost across the restart");

    // Not under a running agent: it would be left steering with nothing.
    let refused = process::sluice(&["detach", "--pin-dir", pins.0.to_str().expect("utf-8")]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains(&format!("another agent (PID {})", second.pid())),
        "{}",
        text(&refused)
    );
    assert!(xdp_attached(&ns.0), "a refused detach leaves it attached");
    assert!(second.stop().success());
    assert!(xdp_attached(&ns.0));
    let out = process::sluice(&["detach", "--pin-dir", pins.0.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("detached and removed"),
        "{}",
        text(&out)
    );
    assert!(!xdp_attached(&ns.0), "detach takes the program down");
    assert!(!pins.0.exists());
}

/// SIGHUP applies a valid config as a whole and leaves an invalid one
/// without effect; `check-config` names the line.
#[test]
fn sighup_reload_is_all_or_nothing() {
    let ns = process::netns("hup", 2);
    let config = |name: &str, vip: &str| {
        format!(
            "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 7000\nprotocol = \"udp\"\nwlm = {{ underload = 0.0 }}\n{}",
            process::instances_toml(name, 2)
        )
    };
    let pins = process::PinDir::new("hup");
    let state = tempfile::tempdir().expect("tempdir");
    let first = config("kv", "198.18.1.1");
    let mut agent = process::start(
        &ns,
        &process::Start {
            config: &first,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9480,
        },
    );
    let sock = agent.socket.to_str().expect("utf-8").to_owned();
    let services = |sock: &str| {
        let out = text(&process::sluice(&["status", "--api-socket", sock]));
        out.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<BTreeSet<_>>()
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(services(&sock), BTreeSet::from(["kv".to_owned()]));

    // An invalid config: refused, the running one stays.
    let bad = config("kv2", "not-an-address");
    std::fs::write(agent.config_path(), &bad).expect("write");
    let check = process::sluice(&["check-config", agent.config_path().to_str().expect("utf-8")]);
    assert!(!check.status.success());
    assert!(
        text(&check).contains("sluice.toml:6: `service[0].vip`"),
        "{}",
        text(&check)
    );
    agent.hup();
    std::thread::sleep(Duration::from_millis(800));
    assert!(agent.running(), "a bad reload must not stop the agent");
    assert_eq!(
        services(&sock),
        BTreeSet::from(["kv".to_owned()]),
        "nothing of the bad config applied"
    );
    assert!(xdp_attached(&ns.0));

    // A valid one: applied whole.
    std::fs::write(agent.config_path(), config("kvb", "198.18.1.2")).expect("write");
    agent.hup();
    let t = std::time::Instant::now();
    while services(&sock) != BTreeSet::from(["kvb".to_owned()]) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the reload did not apply: {:?}",
            services(&sock)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.running());
    assert!(xdp_attached(&ns.0), "still attached after the swap");
    drop(agent);
}

/// Id of the XDP program on `nic0` in `ns`, if one is attached.
fn xdp_prog_id(ns: &str) -> Option<u32> {
    netns::run_in(ns, || sluice::sys::link::xdp_program("nic0")).expect("nic0")
}

/// Defects: a second `sluice run` on the same interface adopted the link
/// and rewrote the maps before anything refused it; one on another pin
/// directory failed with a bare EBUSY and left every map pinned (the 1M
/// pinned-flow map alone ~126 MB of locked memory).
#[test]
fn a_second_agent_touches_nothing_and_leaves_nothing() {
    let ns = process::netns("two", 1);
    let config = format!(
        "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n{}",
        process::instances_toml("kv", 1)
    );
    let pins = process::PinDir::new("two");
    let other_pins = process::PinDir::new("two-other");
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("state.json");
    let other_state = state_dir.path().join("other.json");
    let first = process::start(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state,
            cleanup: true,
            metrics_port: 9481,
        },
    );
    let prog = xdp_prog_id(&ns.0).expect("the first agent attached");

    // Same interface, same pin directory and state: refused up front.
    let (status, err) = process::start_failing(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state,
            cleanup: false,
            metrics_port: 9482,
        },
    );
    assert!(!status.success());
    assert!(
        err.contains(&format!("another agent (PID {})", first.pid())),
        "the error names the running agent's PID: {err}"
    );
    assert_eq!(
        xdp_prog_id(&ns.0),
        Some(prog),
        "the running program was not swapped out"
    );

    // Same interface, a pin directory of its own: the attach fails, the
    // error says what holds the interface, and nothing stays pinned.
    let (status, err) = process::start_failing(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &other_pins.0,
            state: &other_state,
            cleanup: false,
            metrics_port: 9483,
        },
    );
    assert!(!status.success());
    assert!(
        err.contains(&format!("already has an XDP program attached (id {prog}")),
        "the error says what holds the interface: {err}"
    );
    assert!(
        !other_pins.0.exists(),
        "a failed start removes what it pinned"
    );
    assert_eq!(xdp_prog_id(&ns.0), Some(prog));
    assert!(first.stop().success());
}

/// Defect: adopted maps were checked by size only, so an agent whose map
/// layout differed (a counter array grown, a key widened) adopted them and
/// misread them. Now the pin directory records its layout and every map's
/// type, key and value size are checked before adoption.
#[test]
fn pins_of_another_layout_are_refused() {
    assert!(sluice_tests::is_root(), "loads XDP programs: run as root");
    let config = sluice::config::Config::parse(
        "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n[[service.instance]]\nname = \"a\"\nveth = \"x\"\nmac = \"02:00:00:00:00:01\"\n",
        std::path::Path::new("layout.toml"),
    )
    .expect("config");
    let plan = sluice::plan::Plan::build(&config, |_, _| {
        Ok::<_, std::convert::Infallible>(sluice::plan::Resolved {
            ifindex: 1,
            mac: [2, 0, 0, 0, 0, 1],
            netns: None,
            netns_id: None,
        })
    })
    .expect("plan");
    let pins = process::PinDir::new("layout");
    let load = || sluice::datapath::xdp::XdpDatapath::load_with(&plan, Some(&pins.0));
    drop(load().expect("a fresh pin"));
    // Its own pins, read back with the real maps' types and sizes: adopted.
    drop(load().expect("adopting pins of the same layout"));
    // Another layout recorded: refused, naming the fix.
    let tag = std::fs::read_dir(&pins.0)
        .expect("pin dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("layout="))
        .expect("a layout tag")
        .path();
    std::fs::remove_dir(&tag).expect("remove the tag");
    std::fs::create_dir(pins.0.join("layout=0000000000000001")).expect("another layout");
    let err = load().err().expect("another layout is refused");
    let text = err.to_string();
    assert!(
        text.contains("another Sluice version") && text.contains("sluice detach --pin-dir"),
        "{text}"
    );
    // No layout recorded (pins made before layout checks): refused too.
    std::fs::remove_dir(pins.0.join("layout=0000000000000001")).expect("remove");
    assert!(load().is_err(), "unrecorded layout is refused");
}

/// Moves each instance veth's peer of `ns` into a namespace of its own (an
/// instance's container); returns those and a config that names them.
fn instance_homes(ns: &process::Netns, n: usize) -> (Vec<process::Netns>, String) {
    let mut config = String::from(
        "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n",
    );
    let homes = (0..n)
        .map(|i| {
            let home = process::Netns(format!("{}-i{i}", ns.0));
            process::ip(&["netns", "add", &home.0]);
            process::ip(&[
                "-n",
                &ns.0,
                "link",
                "set",
                &format!("p{i}"),
                "netns",
                &home.0,
            ]);
            process::ip(&["-n", &home.0, "link", "set", &format!("p{i}"), "up"]);
            let _ = write!(
                config,
                "[[service.instance]]\nname = \"kv-{i}\"\nveth = \"v{i}\"\nnetns = \"{}\"\n",
                home.0
            );
            home
        })
        .collect();
    (homes, config)
}

/// Access: the control socket is root's alone, and each instance reports
/// through a socket of its own, for itself only, from its own network
/// namespace. The reporters run as `nobody` (65534), as an unprivileged
/// container's would.
#[test]
fn only_root_controls_and_an_instance_reports_for_itself_only() {
    const NOBODY: u32 = 65534;
    let ns = process::netns("acl", 2);
    let (homes, config) = instance_homes(&ns, 2);
    let pins = process::PinDir::new("acl");
    let state = tempfile::tempdir().expect("tempdir");
    let agent = process::start(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9482,
        },
    );
    let sock = agent.socket.to_str().expect("utf-8 path").to_owned();
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(p).expect("socket").permissions(),
        ) & 0o777
    };
    assert_eq!(mode(&agent.socket), 0o600, "control socket mode");
    let (r0, r1) = (agent.report_socket("kv-0"), agent.report_socket("kv-1"));
    assert_eq!(mode(&r0), 0o666, "report socket mode");
    let (r0, r1) = (r0.to_str().unwrap(), r1.to_str().unwrap());

    // A user that is not root can neither drain nor read the status.
    for args in [
        vec!["drain", "kv-0", "--timeout", "5", "--api-socket", &sock],
        vec!["status", "--api-socket", &sock],
    ] {
        let out = process::sluice_as(NOBODY, None, &args);
        assert!(!out.status.success(), "{args:?} as nobody: {}", text(&out));
        assert!(
            text(&out).contains("is not for this user"),
            "{args:?}: {}",
            text(&out)
        );
    }
    let status = text(&process::sluice(&["status", "--api-socket", &sock]));
    assert!(
        !status
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "drained")),
        "nothing drained: {status}"
    );

    let report = |uid: u32, home: Option<&str>, instance: &str, socket: &str| {
        let args = [
            "report",
            "--instance",
            instance,
            "--queue-depth",
            "5",
            "--socket",
            socket,
        ];
        process::sluice_as(uid, home, &args)
    };
    // kv-0's reporter, unprivileged in kv-0's namespace, on its socket.
    let own = report(NOBODY, Some(&homes[0].0), "kv-0", r0);
    assert!(own.status.success(), "{}", text(&own));
    // ... cannot report for kv-1, neither on its own socket ...
    let lie = report(NOBODY, Some(&homes[0].0), "kv-1", r0);
    assert!(
        text(&lie).contains("takes reports for `kv-0` only, not `kv-1`"),
        "{}",
        text(&lie)
    );
    // ... nor on kv-1's (bind-mounted there by mistake, say), even as root
    // inside its container.
    for uid in [NOBODY, 0] {
        let lie = report(uid, Some(&homes[0].0), "kv-1", r1);
        assert!(
            text(&lie).contains("from its own network namespace only"),
            "uid {uid}: {}",
            text(&lie)
        );
    }
    // A host user that is not root cannot report for an instance either.
    let host = report(NOBODY, None, "kv-0", r0);
    assert!(
        text(&host).contains("from its own network namespace only"),
        "{}",
        text(&host)
    );
    drop(agent);
    drop(homes);
}
