//! `cargo xtask demo --scenario scale`: the application loader at work on
//! a built-in testbed, no NIC or config needed.
//!
//! One configured instance, `min_instances = 2`, `max_instances = 4`, and
//! the built-in netns launcher running a small UDP server per instance.
//! The real `sluice run` starts; it launches one instance to reach min.
//! A fifth of the way in, the load steps up past what two instances
//! absorb: the scaler launches instances one at a time, a cooldown apart.
//! Past the middle, the load falls: it stops them again, down to min.
//! `sluice status` is shown live. Ends after `--seconds` or on Ctrl-C,
//! removes every namespace and link it made, and fails if a phase did not
//! show what it announces (a launch to reach min, more under load, a stop
//! once the load fell).

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use clap::Parser;
use sluice_tests::{
    demo, process,
    scale::{self, LaunchedGuard},
    testbed::{self, Testbed},
    traffic::{PacedSender, UdpServers},
};

/// The application loader: instances launched under load and stopped when
/// it falls, with a live `sluice status`.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(30..=3600))]
    seconds: u64,
    /// Datagrams per second at high load (instances take 1,000 each).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1000..=20_000))]
    rate: u64,
}

/// The scaled service; its launched instances are `demo-s0`.. (namespaces
/// `sl-demo-s0`..), apart from the tests' `kv-s0`..
const SERVICE: &str = "demo";

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    demo::exit("sluice-scale-demo", run(&args))
}

/// `sluice status` under a line saying where the demo is.
fn show(sock: &str, t: Duration, vip: SocketAddr, rate: u64, phase: &str, redraw: bool) {
    let status = process::sluice(&["status", "--api-socket", sock]);
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[2J\x1b[H");
    }
    let _ = write!(
        out,
        "Sluice scale demo  {:>5.1}s  service `{SERVICE}` udp {vip}, {rate} datagrams/s, 1,000 an instance\n{phase}\n\n{}",
        t.as_secs_f64(),
        String::from_utf8_lossy(&status.stdout)
    );
    print!("{out}");
    let _ = std::io::stdout().flush();
}

fn run(args: &Args) -> anyhow::Result<()> {
    demo::stop_on_signals();
    eprintln!("[demo] building the testbed: client, host, one configured instance");
    let tb = Testbed::new("sdemo", 1)?;
    let _launched = LaunchedGuard((0..4).map(|k| format!("{SERVICE}-s{k}")).collect());
    let counts = tempfile::tempdir()?;
    let config = scale::config(
        SERVICE,
        counts.path(),
        "min_instances = 2\nmax_instances = 4\nout_intervals = 4\nin_intervals = 12\ncooldown_secs = 3\ndrain_deadline_secs = 5",
        &tb,
        250,
    );
    let vip = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let udp = UdpServers::start(std::slice::from_ref(&tb.instances[0].netns), vip);
    let pins = process::PinDir::new("sdemo");
    let state = tempfile::tempdir()?;
    eprintln!(
        "[demo] starting `sluice run` on {}/{}",
        tb.host,
        testbed::NIC
    );
    let agent = process::start_on(
        &tb.host,
        testbed::NIC,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9477,
        },
    );
    let sock = agent.socket.to_str().unwrap_or_default().to_owned();
    let low = args.rate / 15;
    let sender = PacedSender::spawn(
        &tb.client,
        vip,
        128,
        low,
        Duration::from_secs(args.seconds + 5),
        |i, s| format!("{i}:{s}").into_bytes(),
    );
    let launched_running = drive(args, &sender, &sock, vip, low);
    let sent = sender
        .finish()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    std::thread::sleep(Duration::from_millis(500));
    let launched: u64 = (0..4)
        .map(|k| scale::sink_count(counts.path(), &format!("{SERVICE}-s{k}")))
        .sum();
    let configured = udp.total.load(Ordering::Relaxed);
    let _ = udp.finish();
    let decisions = process::sluice(&["instance", "list", "--api-socket", &sock]);
    println!("{}", String::from_utf8_lossy(&decisions.stdout));
    println!(
        "sent {sent}; received by the configured instance {configured}, by the launched ones {launched}"
    );
    println!("{launched_running}");
    drop(agent);
    eprintln!("[demo] stopped the agent, removed the launched instances and the testbed");
    if demo::stopping() {
        return Ok(());
    }
    launched_running.check()?;
    Ok(())
}

/// Launched instances running: most while the load was low, most while it
/// was high, and at the end.
struct Launched {
    at_low: usize,
    peak: usize,
    at_end: usize,
}

impl std::fmt::Display for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "launched instances running: {} at low load, {} at most under load, {} once the load fell",
            self.at_low, self.peak, self.at_end
        )
    }
}

impl Launched {
    /// Whether the launched instances followed the load.
    fn check(&self) -> anyhow::Result<()> {
        if self.at_low == 0 || self.peak <= self.at_low || self.at_end >= self.peak {
            anyhow::bail!(
                "the launched instances did not follow the load ({self}): one expected at low load (min_instances = 2), more under load, fewer at the end"
            );
        }
        Ok(())
    }
}

/// Steps the load low, high, low over `--seconds`, shows `sluice status`,
/// and counts the launched instances running in each phase.
fn drive(args: &Args, sender: &PacedSender, sock: &str, vip: SocketAddr, low: u64) -> Launched {
    let start = Instant::now();
    let (up, down) = (
        Duration::from_secs(args.seconds / 5),
        Duration::from_secs(args.seconds * 11 / 20),
    );
    let tty = std::io::stdout().is_terminal();
    let mut last_print = start;
    let mut n = Launched {
        at_low: 0,
        peak: 0,
        at_end: 0,
    };
    while start.elapsed() < Duration::from_secs(args.seconds) && !demo::stopping() {
        let t = start.elapsed();
        n.at_end = scale::launched_running(sock).len();
        let (rate, phase) = if t < up {
            n.at_low = n.at_low.max(n.at_end);
            (
                low,
                "low load: one instance launched to reach min_instances = 2",
            )
        } else if t < down {
            n.peak = n.peak.max(n.at_end);
            (
                args.rate,
                "load stepped up: saturated instances, launches a cooldown apart (max 4)",
            )
        } else {
            (
                low,
                "load fell: under-loaded, launched instances stopped down to min",
            )
        };
        sender.rate.store(rate, Ordering::Relaxed);
        if tty || last_print.elapsed() >= Duration::from_secs(5) {
            show(sock, t, vip, rate, phase, tty);
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    n
}
