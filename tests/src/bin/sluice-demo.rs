//! `cargo xtask demo`: Sluice on a built-in testbed, no NIC or config needed.
//!
//! Builds a client namespace, a host whose "NIC" veth gets the XDP program,
//! and four instance namespaces with UDP servers; starts the agent (the same
//! start-up and control loop as `sluice run`, in-process) with one tagged
//! service; sends tagged and untagged datagrams at a steady rate; and shows
//! a live per-instance table. A quarter of the way in, one instance's server
//! is throttled: it drops, and its element splits its hottest group and
//! hands halves to its peers. Halfway, the server recovers and the load
//! falls: elements take their buddies back and the groups merge. Ends after
//! `--seconds` or on Ctrl-C, and removes every namespace and link it made.

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use sluice::{agent::Agent, config::Config, coord::EmbeddedStore, datapath::Datapath as _};
use sluice_tests::{
    block_on, demo,
    testbed::{self, Testbed},
    traffic::{self, UdpServers},
};

/// Sluice on a built-in testbed: four instances, tagged and untagged UDP
/// flows, a throttled instance shedding load and a live per-instance table.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(8..=3600))]
    seconds: u64,
    /// Datagrams per second the generator sends while the load is high.
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    rate: u64,
}

const INSTANCES: usize = 4;
const THROTTLED: usize = 2;
const PORT: u16 = 7100;
const TAGS: [&[u8; 8]; 6] = [
    b"tenant-a",
    b"tenant-b",
    b"tenant-c",
    b"tenant-d",
    b"tenant-e",
    b"tenant-f",
];

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    demo::exit("sluice-demo", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    demo::stop_on_signals();
    eprintln!("[demo] building the testbed: client, host, {INSTANCES} instance namespaces");
    let tb = Testbed::new("demo", INSTANCES)?;
    let toml = demo_config(&tb, args.rate);
    let config = Config::parse(&toml, Path::new("demo.toml"))?;
    eprintln!("[demo] starting the agent on {}/{}", tb.host, testbed::NIC);
    let mut agent = tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))?;
    let dst = std::net::SocketAddr::new(testbed::VIP_V4.into(), PORT);
    let namespaces: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start_with(&namespaces, dst, 256 << 10);

    let rate = Arc::new(AtomicU64::new(args.rate));
    let generator = spawn_generator(&tb, dst, rate.clone(), args.seconds);

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let (throttle_at, release_at) = (
        Duration::from_secs(args.seconds / 4),
        Duration::from_secs(args.seconds / 2),
    );
    let mut phase = "steady load";
    let mut last_print = start;
    while Instant::now() < end && !demo::stopping() {
        std::thread::sleep(agent.control.interval());
        let t = start.elapsed();
        if t >= throttle_at && t < release_at && phase == "steady load" {
            servers.throttle[THROTTLED].store(args.rate / 16, Ordering::Relaxed);
            phase = "inst-2 throttled: it drops, and sheds work";
        } else if t >= release_at && phase != "released" {
            servers.throttle[THROTTLED].store(0, Ordering::Relaxed);
            rate.store(args.rate / 4, Ordering::Relaxed);
            phase = "released";
        }
        if let Err(e) = block_on(agent.tick()) {
            eprintln!("[demo] control interval failed: {e}");
        }
        if tty || last_print.elapsed() >= Duration::from_secs(5) {
            let label = if phase == "released" {
                "inst-2 recovered, load fell: groups merge back"
            } else {
                phase
            };
            show(&agent, &tb, start, label, tty);
            last_print = Instant::now();
        }
    }
    demo::STOP.store(true, Ordering::Relaxed);
    let sent = generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    std::thread::sleep(Duration::from_millis(300));
    let received: usize = servers.finish().iter().map(Vec::len).sum();
    show(&agent, &tb, start, "done", false);
    let splits = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "split")
        .count();
    let takes = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "take")
        .count();
    let merges = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "merge" || e.kind == "reclaim")
        .count();
    println!(
        "sent {sent}, received by the servers {received}; {splits} splits, {takes} takes, {merges} merges and reclaims"
    );
    agent.stop()?;
    drop(tb);
    eprintln!("[demo] detached and removed the testbed");
    Ok(())
}

fn show(agent: &Agent, tb: &Testbed, start: Instant, phase: &str, redraw: bool) {
    let elapsed = start.elapsed();
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[2J\x1b[H");
    }
    let svc = agent.datapath.service_counters(0).unwrap_or_default();
    let _ = writeln!(
        out,
        "Sluice demo  {:>5.1}s  service `sessions` udp {}:{PORT}  tagged {}  untagged (flow hash) {}\n{phase}\n",
        elapsed.as_secs_f64(),
        testbed::VIP_V4,
        svc.tagged,
        svc.tag_missing
    );
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:>10} {:>7} {:>8} {:>6} {:>7} {:>7}  groups",
        "instance", "netns", "packets", "share", "pps", "util", "drops/s", "units"
    );
    let status = block_on(agent.control.status()).unwrap_or_default();
    let total: u64 = agent
        .plan
        .instances
        .iter()
        .map(|i| {
            agent
                .datapath
                .instance_counters(i.id)
                .map_or(0, |c| c.packets)
        })
        .sum();
    for ((i, ti), st) in agent.plan.instances.iter().zip(&tb.instances).zip(&status) {
        let c = agent.datapath.instance_counters(i.id).unwrap_or_default();
        let units: u32 = st.groups.iter().map(|g| g.size()).sum();
        let shown: Vec<String> = st.groups.iter().take(3).map(ToString::to_string).collect();
        let more = if st.groups.len() > 3 {
            format!(" +{}", st.groups.len() - 3)
        } else {
            String::new()
        };
        #[expect(clippy::cast_precision_loss, reason = "a percentage for display")]
        let share = if total == 0 {
            0.0
        } else {
            100.0 * c.packets as f64 / total as f64
        };
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:>10} {:>6.1}% {:>8.0} {:>6.2} {:>7.0} {:>7}  {}{more}",
            i.name,
            ti.netns,
            c.packets,
            share,
            st.sample.rate_pps,
            st.sample.utilisation,
            st.sample.drops_ps,
            units,
            shown.join(" ")
        );
    }
    let _ = writeln!(out, "\nlast moves:");
    let history = agent.control.history();
    for e in history.iter().rev().take(6).rev() {
        let _ = writeln!(
            out,
            "  {:>5.1}s {:<8} {:<16} {} -> {}",
            e.at.saturating_duration_since(start).as_secs_f64(),
            e.kind,
            e.group.map_or_else(|| "-".to_owned(), |g| g.to_string()),
            e.from,
            e.to
        );
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// The demo's config: one tagged UDP service over the testbed's instances,
/// a fast control loop, and a capacity that puts each instance at about
/// half at the high rate.
fn demo_config(tb: &Testbed, rate: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let capacity = rate as f64 / INSTANCES as f64 * 2.0;
    format!(
        "[agent]\ninterval_ms = 250\nmax_moves_per_sec = 4\n\n\
         [[service]]\nname = \"sessions\"\nvip = \"{}\"\nport = {PORT}\nprotocol = \"udp\"\n\
         tag = {{ kind = \"udp-payload\", offset = 0, length = 8 }}\n\
         wlm = {{ capacity_pps = {capacity}, overload = 0.8, underload = 0.3, sustain = 2, cooldown_ms = 1000, min_group_units = 64 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, INSTANCES)
    )
}

/// The traffic generator: even sockets carry one of six tags; odd ones a
/// 4-byte payload without the tag (keyed by flow hash).
fn spawn_generator(
    tb: &Testbed,
    dst: std::net::SocketAddr,
    rate: Arc<AtomicU64>,
    seconds: u64,
) -> std::thread::JoinHandle<u64> {
    let client = tb.client.clone();
    std::thread::spawn(move || {
        traffic::paced_udp(
            &client,
            dst,
            256,
            &rate,
            &demo::STOP,
            Duration::from_secs(seconds),
            |i, _| {
                if i % 2 == 0 {
                    TAGS[(i / 2) % TAGS.len()].to_vec()
                } else {
                    b"hi!!".to_vec()
                }
            },
        )
    })
}
