//! Instances that come and go while the real agent runs: registered and
//! removed through the CLI under traffic on the namespace testbed.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_tests::{
    netns, process,
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
