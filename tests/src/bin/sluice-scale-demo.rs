//! `cargo xtask demo --scenario scale`: the application loader at work on
//! a built-in testbed, no NIC or config needed.
//!
//! One configured instance, `min_instances = 2`, `max_instances = 4`, and
//! the built-in netns launcher running a small UDP server per instance.
//! The real `sluice run` starts; it launches one instance to reach min.
//! A fifth of the way in, the load steps up past what two instances
//! absorb: the scaler launches instances one at a time, a cooldown apart.
//! Past the middle, the load falls: it stops them again, down to min.
//! `sluice status` is shown live. Ends after `--seconds` or on Ctrl-C, and
//! removes every namespace and link it made.

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
        "Sluice scale demo  {:>5.1}s  service `kv` udp {vip}, {rate} datagrams/s, 1,000 an instance\n{phase}\n\n{}",
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
    let _launched = LaunchedGuard((0..4).map(|k| format!("kv-s{k}")).collect());
    let counts = tempfile::tempdir()?;
    let config = scale::config(
        "kv",
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
    let start = Instant::now();
    let (up, down) = (
        Duration::from_secs(args.seconds / 5),
        Duration::from_secs(args.seconds * 11 / 20),
    );
    let tty = std::io::stdout().is_terminal();
    let mut last_print = start;
    while start.elapsed() < Duration::from_secs(args.seconds) && !demo::stopping() {
        let t = start.elapsed();
        let (rate, phase) = if t < up {
            (
                low,
                "low load: one instance launched to reach min_instances = 2",
            )
        } else if t < down {
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
            show(&sock, t, vip, rate, phase, tty);
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sent = sender
        .finish()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    std::thread::sleep(Duration::from_millis(500));
    let launched: u64 = (0..4)
        .map(|k| scale::sink_count(counts.path(), &format!("kv-s{k}")))
        .sum();
    let configured = udp.total.load(Ordering::Relaxed);
    let _ = udp.finish();
    let decisions = process::sluice(&["instance", "list", "--api-socket", &sock]);
    println!("{}", String::from_utf8_lossy(&decisions.stdout));
    println!(
        "sent {sent}; received by the configured instance {configured}, by the launched ones {launched}"
    );
    drop(agent);
    eprintln!("[demo] stopped the agent, removed the launched instances and the testbed");
    Ok(())
}
