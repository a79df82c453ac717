//! Instances that come and go while the real agent runs: registered and
//! removed through the CLI under traffic on the namespace testbed.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_tests::{
    netns, process,
    scale::{LaunchedGuard, launched_running, sink_count},
    testbed::{self, Testbed},
    traffic::{PacedSender, TcpServers, UdpServers, tcp_echo},
};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `sluice instance list`'s line for `name`, if it is listed.
fn listed(sock: &str, name: &str) -> Option<String> {
    let out = process::sluice(&["instance", "list", "--api-socket", sock]);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .map(str::to_owned)
}

/// Echoes once on every connection; returns the serving instances.
fn echo_all(conns: &mut [TcpStream], round: usize) -> Vec<String> {
    conns
        .iter_mut()
        .enumerate()
        .map(|(k, c)| {
            tcp_echo(c, &format!("r{round}c{k};"))
                .unwrap_or_else(|e| panic!("connection {k}, round {round}: {e}"))
        })
        .collect()
}

/// An instance added under traffic takes work through the WLM; removed, it
/// is drained, waits for quiet, and leaves: not one UDP datagram lost, and
/// the TCP connections on the kept instances never reset.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: add, take work, remove, count"
)]
fn instances_added_and_removed_under_traffic_lose_nothing() {
    let tb = Testbed::new("live", 3).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let vip = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let namespaces: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let names: Vec<String> = (0..3).map(|k| format!("inst-{k}")).collect();
    let udp = UdpServers::start(&namespaces, vip);
    let tcp = TcpServers::start(&namespaces, vip, &names);
    // Two instances at 1,000 pps each cannot take 3,000: a third one gets
    // work as soon as it joins.
    let config = format!(
        "[agent]\ninterval_ms = 200\nmax_moves_per_sec = 20\n\n[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocols = [\"udp\", \"tcp\"]\nwlm = {{ capacity_pps = 1000, sustain = 2, cooldown_ms = 400, min_group_units = 1024 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let pins = process::PinDir::new("live");
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("state.json");
    let start = || {
        process::start_on(
            &tb.host,
            testbed::NIC,
            &process::Start {
                config: &config,
                pin_dir: &pins.0,
                state: &state,
                cleanup: false,
                metrics_port: 9484,
            },
        )
    };
    let agent = start();
    let sock = agent.socket.to_str().expect("utf-8").to_owned();

    let mut conns: Vec<TcpStream> = (0..16)
        .map(|_| {
            netns::run_in(&tb.client, || {
                TcpStream::connect_timeout(&vip, Duration::from_secs(5))
            })
            .expect("connect")
        })
        .collect();
    let owners = echo_all(&mut conns, 0);
    assert!(
        owners.iter().all(|o| o == "inst-0" || o == "inst-1"),
        "{owners:?}"
    );
    let sender = PacedSender::spawn(
        &tb.client,
        vip,
        64,
        3000,
        Duration::from_secs(90),
        |i, s| format!("{i}:{s}").into_bytes(),
    );
    std::thread::sleep(Duration::from_secs(1));

    // Bad registrations change nothing and say why.
    let nothere = process::sluice(&[
        "instance",
        "add",
        "--service",
        "kv",
        "--name",
        "inst-9",
        "--veth",
        "nosuchveth",
        "--api-socket",
        &sock,
    ]);
    assert!(!nothere.status.success());
    assert!(
        text(&nothere).contains("not added; nothing changed"),
        "{}",
        text(&nothere)
    );
    let taken = process::sluice(&[
        "instance",
        "add",
        "--service",
        "kv",
        "--name",
        "inst-0",
        "--veth",
        &tb.instances[2].veth,
        "--api-socket",
        &sock,
    ]);
    assert!(
        text(&taken).contains("`name`") && text(&taken).contains("in use"),
        "{}",
        text(&taken)
    );
    let file_instance = process::sluice(&["instance", "remove", "inst-0", "--api-socket", &sock]);
    assert!(
        text(&file_instance).contains("in the config file"),
        "{}",
        text(&file_instance)
    );

    let added = process::sluice(&[
        "instance",
        "add",
        "--service",
        "kv",
        "--name",
        "inst-2",
        "--veth",
        &tb.instances[2].veth,
        "--netns",
        &tb.instances[2].netns,
        "--api-socket",
        &sock,
    ]);
    assert!(added.status.success(), "{}", text(&added));
    assert!(text(&added).contains("inst-2 added"), "{}", text(&added));
    // It takes work through the WLM.
    let t = Instant::now();
    loop {
        let line = listed(&sock, "inst-2").expect("inst-2 is listed");
        let groups: usize = line
            .split_whitespace()
            .nth(5)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        if groups > 0 && line.contains("running") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "inst-2 took no work: {line}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Kept across a restart of the agent (the data path stays pinned).
    assert!(agent.stop().success());
    let saved = std::fs::read_to_string(state_dir.path().join("state.instances.json"))
        .expect("the registrations file");
    assert!(saved.contains("inst-2"), "{saved}");
    let agent = start();
    let sock = agent.socket.to_str().expect("utf-8").to_owned();
    assert!(
        listed(&sock, "inst-2").is_some_and(|l| l.contains("running")),
        "inst-2 is back after the restart\n{}",
        agent.log()
    );
    let during = echo_all(&mut conns, 1);
    assert_eq!(
        during, owners,
        "established connections stay on their instance"
    );

    let removed = process::sluice(&[
        "instance",
        "remove",
        "inst-2",
        "--deadline",
        "15",
        "--timeout",
        "60",
        "--api-socket",
        &sock,
    ]);
    let out = text(&removed);
    assert!(removed.status.success(), "{out}\n{}", agent.log());
    assert!(
        out.contains("draining") && out.trim_end().ends_with("inst-2: removed"),
        "{out}"
    );
    assert!(listed(&sock, "inst-2").is_none());
    assert!(
        !std::fs::read_to_string(state_dir.path().join("state.instances.json"))
            .expect("the registrations file")
            .contains("inst-2")
    );
    assert!(
        agent.log().contains("removed: drained and quiet"),
        "{}",
        agent.log()
    );
    let after = echo_all(&mut conns, 2);
    assert_eq!(after, owners, "no connection on a kept instance broke");

    std::thread::sleep(Duration::from_millis(500));
    let sent = sender.finish().expect("sender");
    udp.wait_for(sent, Duration::from_secs(5));
    let got = udp.finish();
    let per: Vec<usize> = got.iter().map(Vec::len).collect();
    let total: u64 = per.iter().map(|&n| n as u64).sum();
    eprintln!("sent {sent}, received per instance {per:?}");
    assert!(per[2] > 0, "inst-2 received nothing while it was in");
    assert_eq!(total, sent, "datagrams lost: per instance {per:?}");
    drop(conns);
    let errors = tcp.finish();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(agent.stop().success());
}

/// Starts `sluice run` on `tb` with `config` (pins and state of its own,
/// removed on exit); metrics on `port`.
fn start_agent(
    tb: &Testbed,
    config: &str,
    tag: &str,
    port: u16,
) -> (process::Agent, process::PinDir, tempfile::TempDir) {
    let pins = process::PinDir::new(tag);
    let state = tempfile::tempdir().expect("tempdir");
    let agent = process::start_on(
        &tb.host,
        testbed::NIC,
        &process::Start {
            config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: port,
        },
    );
    (agent, pins, state)
}

/// Waits until `done`, polling every 200 ms; fails the test with `what`
/// and the agent's log after `secs` seconds.
fn wait_until(agent: &process::Agent, what: &str, secs: u64, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what} within {secs} s\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Load stepped up past what the instances absorb: the scaler launches
/// instances one at a time, a cooldown apart, up to max; load gone, it
/// stops them again down to min. The launcher's side effects (namespaces,
/// servers receiving) are observed, and no datagram is lost.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario: out, then in")]
fn the_scaler_launches_under_load_and_stops_when_idle() {
    let tb = Testbed::new("scale", 1).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let launched_guard = LaunchedGuard((0..4).map(|k| format!("kv-s{k}")).collect());
    let vip = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let udp = UdpServers::start(std::slice::from_ref(&tb.instances[0].netns), vip);
    let counts = tempfile::tempdir().expect("tempdir");
    let config = sluice_tests::scale::config(
        "kv",
        counts.path(),
        "min_instances = 2\nmax_instances = 4\nout_intervals = 3\nin_intervals = 5\ncooldown_secs = 2\ndrain_deadline_secs = 5",
        &tb,
        200,
    );
    let (agent, _pins, _state) = start_agent(&tb, &config, "scale", 9485);
    let sock = agent.socket.to_str().expect("utf-8").to_owned();
    // Below min at the start: one instance launched.
    wait_until(&agent, "kv-s0 launched to reach min", 20, || {
        launched_running(&sock) == ["kv-s0"]
    });
    assert!(std::path::Path::new("/run/netns/sl-kv-s0").exists());

    // 3,000 pps on 1,000-pps instances: saturated until there are four.
    let sender = PacedSender::spawn(
        &tb.client,
        vip,
        128,
        3000,
        Duration::from_mins(2),
        |i, s| format!("{i}:{s}").into_bytes(),
    );
    let mut seen = vec![(Instant::now(), 2usize)];
    let t = Instant::now();
    while seen.last().expect("one").1 < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "scaled out to {} instances only\n{}",
            seen.last().expect("one").1,
            agent.log()
        );
        let n = 1 + launched_running(&sock).len();
        if n != seen.last().expect("one").1 {
            seen.push((Instant::now(), n));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let steps: Vec<usize> = seen.iter().map(|s| s.1).collect();
    assert_eq!(steps, [2, 3, 4], "one launch at a time");
    let gap = seen[2].0.duration_since(seen[1].0);
    assert!(
        gap >= Duration::from_millis(1800),
        "launches {gap:?} apart, under the 2 s cooldown"
    );
    // Never above max, whatever the load.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(1 + launched_running(&sock).len(), 4, "above max");
    let list = text(&process::sluice(&[
        "instance",
        "list",
        "--api-socket",
        &sock,
    ]));
    assert!(
        list.contains("launch kv-s1: saturated") && list.contains("launch kv-s0: below_min"),
        "{list}"
    );

    // Load gone: back down to min, one stop at a time.
    sender.rate.store(100, std::sync::atomic::Ordering::Relaxed);
    wait_until(&agent, "scaled back in to min", 60, || {
        let out = text(&process::sluice(&[
            "instance",
            "list",
            "--api-socket",
            &sock,
        ]));
        launched_running(&sock).len() == 1
            && out.lines().filter(|l| l.contains(" launcher ")).count() == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(1 + launched_running(&sock).len(), 2, "below min");
    let stopped: Vec<String> = ["kv-s0", "kv-s1", "kv-s2"]
        .into_iter()
        .filter(|n| !std::path::Path::new(&format!("/run/netns/sl-{n}")).exists())
        .map(str::to_owned)
        .collect();
    assert_eq!(stopped.len(), 2, "two namespaces deleted: {stopped:?}");

    let sent = sender.finish().expect("sender");
    std::thread::sleep(Duration::from_millis(500));
    udp.wait_for(sent, Duration::from_secs(2));
    let launched: u64 = ["kv-s0", "kv-s1", "kv-s2"]
        .iter()
        .map(|n| sink_count(counts.path(), n))
        .sum();
    let mine = udp.total.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "sent {sent}; inst-0 {mine}; launched {:?}",
        ["kv-s0", "kv-s1", "kv-s2"].map(|n| sink_count(counts.path(), n))
    );
    assert!(
        ["kv-s0", "kv-s1", "kv-s2"]
            .iter()
            .all(|n| sink_count(counts.path(), n) > 0),
        "the launched servers took work"
    );
    assert_eq!(mine + launched, sent, "datagrams lost while scaling");
    let _ = udp.finish();
    let metrics = process::scrape(&tb.host, 9485).expect("scrape");
    assert!(
        process::metric(
            &metrics,
            "sluice_scale_decisions_total",
            "action=\"launch\""
        ) >= 3.0,
        "{metrics}"
    );
    let instances = process::metric(&metrics, "sluice_scale_instances", "service=\"kv\"");
    assert!((instances - 2.0).abs() < 0.5, "{instances} instances");
    drop(agent);
    drop(launched_guard);
}

/// A start command that fails leaves nothing registered: its stop command
/// cleans up after each attempt, and the attempts back off.
#[test]
fn a_failing_launch_is_retried_with_back_off_and_leaves_nothing() {
    let tb = Testbed::new("lfail", 1).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let (starts, stops) = (dir.path().join("starts"), dir.path().join("stops"));
    let config = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"lf\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\n[service.scale]\nmin_instances = 2\nmax_instances = 3\ncooldown_secs = 0.2\nlauncher = {{ kind = \"command\", start = [\"sh\", \"-c\", \"echo {{name}} >> {}; echo no image >&2; exit 125\"], stop = [\"sh\", \"-c\", \"echo {{name}} >> {}\"] }}\n\n{}",
        testbed::VIP_V4,
        starts.display(),
        stops.display(),
        tb.instances_toml(0, 1)
    );
    let (agent, _pins, _state) = start_agent(&tb, &config, "lfail", 9486);
    let sock = agent.socket.to_str().expect("utf-8").to_owned();
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Back-off 1 s, 2 s, 4 s: three attempts within ~4 s, not twenty.
    let t = Instant::now();
    while lines(&starts) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{} attempts\n{}",
            lines(&starts),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let paced = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        paced >= Duration::from_secs(2),
        "three attempts in {paced:?}: no back-off"
    );
    assert!(lines(&starts) <= 4, "{} attempts", lines(&starts));
    assert_eq!(
        lines(&stops),
        lines(&starts),
        "every failed start was cleaned up"
    );
    let list = text(&process::sluice(&[
        "instance",
        "list",
        "--api-socket",
        &sock,
    ]));
    assert!(
        !list.contains(" launcher "),
        "nothing half-registered: {list}"
    );
    assert!(
        list.contains("launch lf-s0 failed") && list.contains("exit status: 125: no image"),
        "{list}"
    );
    let metrics = process::scrape(&tb.host, 9486).expect("scrape");
    assert!(
        process::metric(
            &metrics,
            "sluice_scale_launch_failures_total",
            "service=\"lf\""
        ) >= 3.0,
        "{metrics}"
    );
    drop(agent);
}

/// A launched instance whose server and veth die is restarted through the
/// launcher; once its restarts ran out it stays failed with the alert
/// raised, and another instance is launched in its place.
#[test]
fn a_failed_launched_instance_is_restarted_then_left_failed_with_an_alert() {
    let tb = Testbed::new("frule", 1).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let launched_guard = LaunchedGuard((0..3).map(|k| format!("fr-s{k}")).collect());
    let counts = tempfile::tempdir().expect("tempdir");
    let config = sluice_tests::scale::config(
        "fr",
        counts.path(),
        "min_instances = 2\nmax_instances = 3\ncooldown_secs = 0.5\nfailure = { restarts = 1, window_secs = 600 }",
        &tb,
        200,
    );
    let (agent, _pins, _state) = start_agent(&tb, &config, "frule", 9487);
    let sock = agent.socket.to_str().expect("utf-8").to_owned();
    // The server and the veth die together, as a crashed container's do:
    // the namespace goes, and its veth pair with it.
    let kill = || drop(LaunchedGuard(vec!["fr-s0".into()]));
    wait_until(&agent, "fr-s0 launched", 30, || {
        launched_running(&sock) == ["fr-s0"]
    });
    kill();
    wait_until(&agent, "fr-s0 restarted", 30, || {
        launched_running(&sock) == ["fr-s0"]
            && std::path::Path::new("/run/netns/sl-fr-s0").exists()
            && text(&process::sluice(&[
                "instance",
                "list",
                "--api-socket",
                &sock,
            ]))
            .contains("restart fr-s0: failed")
    });
    kill();
    wait_until(
        &agent,
        "fr-s0 left failed, fr-s1 launched in its place",
        30,
        || {
            let list = text(&process::sluice(&[
                "instance",
                "list",
                "--api-socket",
                &sock,
            ]));
            list.contains("left fr-s0 failed") && launched_running(&sock) == ["fr-s1"]
        },
    );
    let metrics = process::scrape(&tb.host, 9487).expect("scrape");
    let alert = process::metric(&metrics, "sluice_scale_failed_alert", "instance=\"fr-s0\"");
    assert!((alert - 1.0).abs() < 0.5, "alert {alert}\n{metrics}");
    let list = text(&process::sluice(&[
        "instance",
        "list",
        "--api-socket",
        &sock,
    ]));
    assert!(
        list.lines()
            .any(|l| l.contains("fr-s0") && l.contains(" failed ")),
        "{list}"
    );
    drop(agent);
    drop(launched_guard);
}
