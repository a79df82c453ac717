//! The punt path on the namespace testbed: units nobody owns are claimed by
//! their first packets, which reach the claiming instance exactly once.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use sluice::{config::Config, coord::EmbeddedStore};
use sluice_common::{counters, key};
use sluice_tests::{
    testbed::{self, Testbed},
    traffic::{self, UdpLoad, UdpServers},
};

#[test]
fn on_demand_units_are_claimed_and_every_datagram_arrives_once() {
    let tb = Testbed::new("punt", 3).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\nassign = \"on-demand\"\n\
         wlm = {{ min_group_units = 256, underload = 0.0 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 3)
    );
    let config = Config::parse(&toml, Path::new("punt.toml")).expect("config");
    let mut agent = tb
        .start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| panic!("starting the agent: {e:?}"));
    assert!(agent.punt.is_some(), "the AF_XDP punt socket opened");
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start(&ns, dst);
    let total = servers.total.clone();
    let client = tb.client.clone();
    // 1,500 sockets × 2 datagrams: hundreds of units, each first seen
    // unowned.
    let sender = std::thread::spawn(move || {
        let load = UdpLoad {
            client_ns: &client,
            dst,
            sockets: 1500,
            per_socket: 2,
            window: 256,
            deadline: Duration::from_mins(1),
        };
        traffic::send_udp(&load, &total, |_| Vec::new())
    });
    let t = Instant::now();
    let mut last_tick = Instant::now();
    while !sender.is_finished() {
        agent.process_punts().expect("punts");
        if last_tick.elapsed() > Duration::from_millis(250) {
            agent.tick().expect("tick");
            last_tick = Instant::now();
        }
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "sending did not finish"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (sent, _) = sender.join().expect("sender");
    let end = Instant::now() + Duration::from_secs(3);
    while servers.total.load(Ordering::Relaxed) < sent && Instant::now() < end {
        agent.process_punts().expect("punts");
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = servers.finish();
    let mut seen = HashSet::new();
    let mut received = 0u64;
    for (k, datagrams) in got.iter().enumerate() {
        for d in datagrams {
            assert!(
                seen.insert((d.from, d.payload.clone())),
                "datagram from {} arrived twice",
                d.from
            );
            let owner = agent
                .control
                .owner_of_key("kv", key::host::flow(d.from, dst, 17))
                .expect("owner");
            assert_eq!(
                owner,
                format!("inst-{k}"),
                "datagram from {} reached inst-{k}, its unit is {owner}'s",
                d.from
            );
            received += 1;
        }
    }
    let g = agent.dataplane.global_counters().expect("counters");
    let punt = agent.punt.as_ref().expect("punt");
    let claims = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "claim")
        .count();
    eprintln!(
        "sent {sent}, received {received}, punted {} (re-injected {}, failed {}, overflow {}), {claims} claims",
        g[counters::PUNTED as usize],
        punt.delivered,
        punt.failed,
        punt.queue.overflow.load(Ordering::Relaxed)
    );
    assert_eq!(received, sent, "every datagram arrives exactly once");
    assert!(
        g[counters::PUNTED as usize] > 0 && claims > 10,
        "units were claimed by punted packets"
    );
    assert_eq!(punt.failed, 0);
    assert_eq!(
        g[counters::UNOWNED as usize],
        0,
        "nothing passed to the kernel unowned"
    );
    agent.stop().expect("detach");
}
