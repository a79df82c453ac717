//! Control-loop timings on the namespace testbed, with the real program,
//! sockets and loop: a step change (one instance throttled) until the loads
//! are within tolerance again, and a drain.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice::{config::Config, coord::EmbeddedStore};
use sluice_tests::{
    block_on,
    testbed::{self, Testbed},
    traffic::{PacedSender, UdpServers},
};

#[derive(Serialize)]
pub(crate) struct Figures {
    pub(crate) interval_ms: u64,
    pub(crate) sustain: u32,
    /// Step change to the first interval that sees the overload.
    pub(crate) detect_s: f64,
    /// Overload seen to the first split written to the owner map.
    pub(crate) decide_s: f64,
    /// Step change to balanced (nobody over 0.8, no drops, then 2 s calm).
    pub(crate) balance_s: f64,
    pub(crate) moves: usize,
    pub(crate) drain_groups: usize,
    pub(crate) drain_rate: f64,
    pub(crate) drain_s: f64,
}

const INTERVAL_MS: u64 = 250;
const SUSTAIN: u32 = 2;
const MOVES_PER_SEC: f64 = 4.0;

pub(crate) fn run() -> anyhow::Result<Figures> {
    let tb = Testbed::new("bench", 3)?;
    let toml = format!(
        "[agent]\ninterval_ms = {INTERVAL_MS}\nmax_moves_per_sec = {MOVES_PER_SEC}\n\n\
         [[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\
         wlm = {{ capacity_pps = 1000, overload = 0.8, underload = 0.3, sustain = {SUSTAIN}, cooldown_ms = 1000, min_group_units = 64 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 3)
    );
    let config = Config::parse(&toml, Path::new("bench.toml"))?;
    let mut agent = tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))?;
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start_with(&ns, dst, 64 << 10);
    let sender = PacedSender::spawn(
        &tb.client,
        dst,
        600,
        1500,
        Duration::from_mins(2),
        |_, seq| seq.to_be_bytes().to_vec(),
    );
    let interval = agent.control.interval();
    // Settle for 2 s so the rates are measured before the step.
    for _ in 0..8 {
        std::thread::sleep(interval);
        block_on(agent.tick())?;
    }
    let step = Instant::now();
    servers.throttle[1].store(150, Ordering::Relaxed);
    let (mut seen, mut first_move, mut calm_since) = (None, None, None);
    let moves_before = agent.control.history().len();
    loop {
        std::thread::sleep(interval);
        let made = block_on(agent.tick())?;
        let now = Instant::now();
        let st = block_on(agent.control.status())?;
        if seen.is_none() && st[1].sample.utilisation > 0.8 {
            seen = Some(now);
        }
        // The slow instance's own first move (others may take work
        // among themselves meanwhile).
        if first_move.is_none()
            && let Some(e) = made.iter().find(|e| e.from == "inst-1")
        {
            first_move = Some(e.at);
        }
        let calm = first_move.is_some()
            && st
                .iter()
                .all(|s| s.sample.utilisation <= 0.8 && s.sample.drops_ps == 0.0);
        calm_since = if calm { calm_since.or(Some(now)) } else { None };
        if calm_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
            break;
        }
        if step.elapsed() > Duration::from_mins(1) {
            bail!("the loop did not balance within 60 s");
        }
    }
    let seen = seen.context("overload never seen")?;
    let first_move = first_move.context("no move")?;
    let balanced = calm_since.context("not balanced")?;
    let moves = agent.control.history()[moves_before..]
        .iter()
        .filter(|e| e.group.is_some())
        .count();

    // Drain inst-0 to its peers.
    let drain_groups = block_on(agent.control.status())?[0].groups.len();
    // As `sluice drain` does it: mark it drained; the control loop moves
    // its groups away within the move limit.
    let t = Instant::now();
    agent.control.set_drained("inst-0", true)?;
    while !block_on(agent.control.status())?[0].groups.is_empty() {
        if t.elapsed() > Duration::from_mins(1) {
            bail!("inst-0 still owns groups after a minute of draining");
        }
        block_on(agent.tick())?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let drain_s = t.elapsed().as_secs_f64();

    sender
        .finish()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let _ = servers.finish();
    agent.stop()?;
    Ok(Figures {
        interval_ms: INTERVAL_MS,
        sustain: SUSTAIN,
        detect_s: seen.duration_since(step).as_secs_f64(),
        decide_s: first_move.saturating_duration_since(seen).as_secs_f64(),
        balance_s: balanced.duration_since(step).as_secs_f64(),
        moves,
        drain_groups,
        drain_rate: MOVES_PER_SEC,
        drain_s,
    })
}
