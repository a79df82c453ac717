//! `cargo xtask demo`: Sluice on a built-in testbed, no NIC or config needed.
//!
//! Builds a client namespace, a host whose "NIC" veth gets the XDP program,
//! and four instance namespaces with UDP servers; starts the agent (the same
//! start-up and control loop as `sluice run`, in-process) with one tagged
//! service; sends tagged and untagged datagrams at a steady rate; and shows
//! a live per-instance table. After a few seconds of steady load, one
//! instance's server is throttled: it drops, its element learns the rate it
//! absorbs (its ceiling) and splits its hottest group, handing halves to its
//! peers. Then the server recovers while the load stays: the element keeps
//! its ceiling for 100 quiet intervals (10 s here), lets it grow back, and
//! takes work back from its busier peers (the spread policy's own decision:
//! a peer more than `balance_band` more loaded). Ends after `--seconds` or on
//! Ctrl-C, removes every namespace and link it made, and fails if a phase
//! did not show its moves.

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
use sluice::{
    agent::Agent, config::Config, control::MoveEvent, coord::EmbeddedStore, datapath::Datapath as _,
};
use sluice_tests::{
    block_on, demo,
    testbed::{self, Testbed},
    traffic::{self, UdpServers},
};

/// Sluice on a built-in testbed: four instances, tagged and untagged UDP
/// flows, a throttled instance shedding load and taking it back once it
/// recovers, with a live per-instance table.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// How long to run, in seconds (at least 30: the recovered instance
    /// takes work back some 20 s in).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(30..=3600))]
    seconds: u64,
    /// Datagrams per second the generator sends.
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
/// The control interval. Short, so that the ceiling a throttled element
/// learns, held for 100 quiet intervals before it relaxes, holds 10 s.
const INTERVAL_MS: u64 = 100;
/// When inst-2's server is throttled, and when it recovers.
const THROTTLE_AT: Duration = Duration::from_secs(3);
const RELEASE_AT: Duration = Duration::from_secs(9);

/// The demo's phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Steady,
    Throttled,
    Recovered,
}

impl Phase {
    fn at(t: Duration) -> Self {
        if t < THROTTLE_AT {
            Self::Steady
        } else if t < RELEASE_AT {
            Self::Throttled
        } else {
            Self::Recovered
        }
    }

    const fn announce(self) -> &'static str {
        match self {
            Self::Steady => {
                "steady load, about half of every instance: the elements even out what the tags make uneven"
            }
            Self::Throttled => {
                "inst-2 throttled: it drops, learns what it absorbs (its ceiling), and sheds work to its peers"
            }
            Self::Recovered => {
                "inst-2 recovered, same load: it keeps its ceiling 10 s, then lets it grow back and takes work back from its busier peers"
            }
        }
    }
}

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
    let generator = spawn_generator(&tb, dst, rate, args.seconds);

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let throttled = agent.plan.instances[THROTTLED].name.clone();
    let mut story = Story::default();
    let mut phase = Phase::Steady;
    let mut last_print = start;
    // Intervals a fixed period apart, however long a tick takes (missed
    // ones are skipped, not made up in a burst).
    let mut next = start;
    while Instant::now() < end && !demo::stopping() {
        next = (next + agent.control.interval()).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let t = start.elapsed();
        let now = Phase::at(t);
        let changed = now != phase;
        if changed {
            phase = now;
            let limit = if phase == Phase::Throttled {
                args.rate / 16
            } else {
                0
            };
            servers.throttle[THROTTLED].store(limit, Ordering::Relaxed);
            if phase == Phase::Recovered {
                story.at_release = load_of(&agent, THROTTLED);
            }
        }
        match block_on(agent.tick()) {
            Ok(made) => story.record(phase, &throttled, &made),
            Err(e) => eprintln!("[demo] control interval failed: {e}"),
        }
        if tty || changed || last_print.elapsed() >= Duration::from_secs(5) {
            show(&agent, &tb, start, phase.announce(), tty);
            last_print = Instant::now();
        }
    }
    // Ctrl-C: the story is cut short, nothing to check.
    let interrupted = demo::stopping();
    demo::STOP.store(true, Ordering::Relaxed);
    let sent = generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"));
    std::thread::sleep(Duration::from_millis(300));
    let received: usize = servers.finish().iter().map(Vec::len).sum();
    show(&agent, &tb, start, "done", false);
    story.at_end = load_of(&agent, THROTTLED);
    // Merges move no traffic: they are in the history, not among the moves.
    story.merges = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "merge")
        .count();
    println!(
        "sent {}, received by the servers {received}",
        sent.as_ref().unwrap_or(&0)
    );
    for line in story.lines(&throttled) {
        println!("{line}");
    }
    let stop = agent.stop();
    drop(tb);
    eprintln!("[demo] detached and removed the testbed");
    sent?;
    stop?;
    if interrupted {
        return Ok(());
    }
    story.check(&throttled)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn moves(n: usize) -> String {
    plural(n, "move")
}

fn groups(n: usize) -> String {
    plural(n, "group")
}

/// Units instance `k` owns, and the packets a second it was delivered.
fn load_of(agent: &Agent, k: usize) -> (u32, f64) {
    block_on(agent.control.status())
        .unwrap_or_default()
        .get(k)
        .map_or((0, 0.0), |st| {
            (st.groups.iter().map(|g| g.size()).sum(), st.sample.rate_pps)
        })
}

/// The moves of each phase, to tell the story at the end and check it.
#[derive(Default)]
struct Story {
    /// Moves during the steady load.
    steady: usize,
    /// Throttled: groups the throttled instance shed (splits and gives),
    /// and moves among the others.
    shed: usize,
    throttled_other: usize,
    /// Recovered: groups the recovered instance took back, and other
    /// moves.
    taken_back: usize,
    recovered_other: usize,
    /// The throttled instance's units and packets a second at the release
    /// and at the end.
    at_release: (u32, f64),
    at_end: (u32, f64),
    /// Buddies merged back into one group, in all.
    merges: usize,
}

impl Story {
    fn record(&mut self, phase: Phase, throttled: &str, made: &[MoveEvent]) {
        for e in made {
            let counter = match (phase, e.kind) {
                (Phase::Steady, _) => &mut self.steady,
                (Phase::Throttled, "split" | "give") if e.from == throttled => &mut self.shed,
                (Phase::Throttled, _) => &mut self.throttled_other,
                (Phase::Recovered, "take") if e.to == throttled => &mut self.taken_back,
                (Phase::Recovered, _) => &mut self.recovered_other,
            };
            *counter += 1;
        }
    }

    fn lines(&self, throttled: &str) -> [String; 3] {
        [
            format!("steady load: {} to even it out", moves(self.steady)),
            format!(
                "{throttled} throttled: {} shed by {throttled}, {} among the others",
                groups(self.shed),
                moves(self.throttled_other)
            ),
            format!(
                "{throttled} recovered: {} taken back by {throttled} ({} units, {:.0} pps at the release; {} units, {:.0} pps at the end), {} among the others; {} of buddies in all",
                groups(self.taken_back),
                self.at_release.0,
                self.at_release.1,
                self.at_end.0,
                self.at_end.1,
                moves(self.recovered_other),
                plural(self.merges, "merge")
            ),
        ]
    }

    /// Whether the throttled instance shed work and took work back.
    fn check(&self, throttled: &str) -> anyhow::Result<()> {
        if self.shed == 0 {
            anyhow::bail!("{throttled} was throttled but shed no work");
        }
        if self.taken_back == 0 || self.at_end.0 <= self.at_release.0 {
            anyhow::bail!(
                "{throttled} recovered but took no work back ({} takes; {} units at the release, {} at the end)",
                self.taken_back,
                self.at_release.0,
                self.at_end.0
            );
        }
        Ok(())
    }
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
/// half.
fn demo_config(tb: &Testbed, rate: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let capacity = rate as f64 / INSTANCES as f64 * 2.0;
    format!(
        "[agent]\ninterval_ms = {INTERVAL_MS}\nmax_moves_per_sec = 4\n\n\
         [[service]]\nname = \"sessions\"\nvip = \"{}\"\nport = {PORT}\nprotocol = \"udp\"\n\
         tag = {{ kind = \"udp-payload\", offset = 0, length = 8 }}\n\
         wlm = {{ capacity_pps = {capacity}, overload = 0.8, underload = 0.3, sustain = 4, cooldown_ms = 1000, min_group_units = 64 }}\n\n{}",
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
