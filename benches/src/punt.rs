//! The punt path: how fast the agent resolves punted frames — taken off
//! its `AF_XDP` socket, unit claimed through the store, frame re-injected
//! on the owner's veth — with a backlog waiting.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice::{config::Config, coord::EmbeddedStore, datapath::Datapath as _};
use sluice_common::counters;
use sluice_tests::{
    block_on,
    testbed::{self, Testbed},
    traffic::{self, UdpLoad, UdpServers},
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) case: String,
    pub(crate) frames: u64,
    pub(crate) claims: usize,
    pub(crate) seconds: f64,
    pub(crate) frames_per_second: f64,
}

fn case(name: &str, min_group_units: u32) -> anyhow::Result<Row> {
    let tb = Testbed::new("puntb", 2)?;
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\nassign = \"on-demand\"\n\
         wlm = {{ min_group_units = {min_group_units}, underload = 0.0 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let config = Config::parse(&toml, Path::new("bench.toml"))?;
    let mut agent = tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))?;
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start(&ns, dst);
    // A backlog: 6,000 new flows, the agent not serving punts meanwhile.
    let load = UdpLoad {
        client_ns: &tb.client,
        dst,
        sockets: 6_000,
        per_socket: 1,
        window: u64::MAX,
        deadline: Duration::from_secs(30),
    };
    let _ = traffic::send_udp(&load, &servers.total, |_| Vec::new());
    let punted = agent.datapath.global_counters()?[counters::PUNTED as usize];
    let q = agent.punt.as_ref().context("no punt socket")?.queue.clone();
    let settle = Instant::now() + Duration::from_secs(10);
    while q.received.load(Ordering::Relaxed) + q.kernel_dropped.load(Ordering::Relaxed) < punted {
        if Instant::now() > settle {
            bail!("the punt socket did not take the backlog");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let owned = |agent: &sluice::agent::Agent| -> anyhow::Result<usize> {
        Ok(block_on(agent.control.assignments())?
            .iter()
            .flat_map(|(_, g)| g)
            .filter(|e| !e.owner.is_empty())
            .count())
    };
    let claims0 = owned(&agent)?;
    let t = Instant::now();
    let frames = block_on(agent.process_punts());
    let seconds = t.elapsed().as_secs_f64();
    // Claimed groups (the move history is bounded; the store is not).
    let claims = owned(&agent)? - claims0;
    servers.wait_for(u64::try_from(frames)?, Duration::from_secs(3));
    let got: usize = servers.finish().iter().map(Vec::len).sum();
    if got != frames {
        bail!("{name}: {frames} frames resolved, {got} received");
    }
    agent.stop()?;
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let fps = frames as f64 / seconds;
    Ok(Row {
        case: name.to_owned(),
        frames: u64::try_from(frames)?,
        claims,
        seconds,
        frames_per_second: fps,
    })
}

pub(crate) fn run() -> anyhow::Result<Vec<Row>> {
    Ok(vec![
        case("a claim per frame (groups of 1 unit)", 1)?,
        case(
            "one claim, then re-injection only (groups of 65,536 units)",
            65_536,
        )?,
    ])
}
