//! `cargo xtask demo`: Sluice on a built-in testbed, no NIC or config needed.
//!
//! Builds a client namespace, a host whose "NIC" veth gets the XDP program,
//! and four instance namespaces with UDP servers; starts the agent (the same
//! start-up code as `sluice run`, in-process) with one tagged service;
//! sends tagged and untagged datagrams at a bounded rate; and shows a live
//! per-instance table. Ends after `--seconds` or on Ctrl-C, and removes
//! every namespace and link it made.

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use sluice::{agent::Agent, config::Config, coord::EmbeddedStore};
use sluice_tests::{
    netns,
    testbed::{self, Testbed},
    traffic::UdpServers,
};

/// Sluice on a built-in testbed: four instances, tagged and untagged UDP
/// flows, a live per-instance table.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Datagrams per second the generator sends.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const INSTANCES: usize = 4;
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
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-demo: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!("[demo] building the testbed: client, host, {INSTANCES} instance namespaces");
    let tb = Testbed::new("demo", INSTANCES)?;
    let toml = format!(
        "[[service]]\nname = \"sessions\"\nvip = \"{}\"\nport = {PORT}\nprotocol = \"udp\"\n\
         tag = {{ kind = \"udp-payload\", offset = 0, length = 8 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, INSTANCES)
    );
    let config = Config::parse(&toml, Path::new("demo.toml"))?;
    eprintln!("[demo] starting the agent on {}/{}", tb.host, testbed::NIC);
    let agent = netns::run_in(&tb.host, || {
        Agent::start(
            &config,
            testbed::NIC,
            false,
            Arc::new(EmbeddedStore::in_memory()),
        )
    })?;
    let dst = SocketAddr::new(testbed::VIP_V4.into(), PORT);
    let servers = UdpServers::start(
        &tb.instances
            .iter()
            .map(|i| i.netns.clone())
            .collect::<Vec<_>>(),
        dst,
    );

    let sent = Arc::new(AtomicU64::new(0));
    let generator = {
        let (client, sent, rate) = (tb.client.clone(), sent.clone(), args.rate);
        let socks: Vec<UdpSocket> = netns::run_in(&client, || {
            (0..256)
                .map(|_| UdpSocket::bind("0.0.0.0:0"))
                .collect::<Result<_, _>>()
        })?;
        let end = Instant::now() + Duration::from_secs(args.seconds);
        std::thread::spawn(move || generate(&socks, dst, rate, end, &sent))
    };

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let mut last_print = start;
    while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if tty || last_print.elapsed() >= Duration::from_secs(5) {
            show(
                &agent,
                &tb,
                start.elapsed(),
                sent.load(Ordering::Relaxed),
                tty,
            );
            last_print = Instant::now();
        }
    }
    STOP.store(true, Ordering::Relaxed);
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    std::thread::sleep(Duration::from_millis(200));
    let received: Vec<usize> = servers.finish().iter().map(Vec::len).collect();
    show(
        &agent,
        &tb,
        start.elapsed(),
        sent.load(Ordering::Relaxed),
        false,
    );
    println!(
        "received by the servers: {} of {} sent",
        received.iter().sum::<usize>(),
        sent.load(Ordering::Relaxed)
    );
    agent.stop()?;
    drop(tb);
    eprintln!("[demo] detached and removed the testbed");
    Ok(())
}

/// Sends at `rate` datagrams a second from rotating sockets: even sockets
/// carry one of six tags, odd ones a short payload without the tag (keyed by
/// flow hash).
fn generate(socks: &[UdpSocket], dst: SocketAddr, rate: u64, end: Instant, sent: &AtomicU64) {
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
        // Pace in 1 ms slices.
        let due = rate * u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) / 1000;
        while n < due {
            let i = usize::try_from(n % socks.len() as u64).expect("fits");
            let payload: &[u8] = if i % 2 == 0 {
                TAGS[(i / 2) % TAGS.len()]
            } else {
                b"hi"
            };
            if socks[i].send_to(payload, dst).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn show(agent: &Agent, tb: &Testbed, elapsed: Duration, sent: u64, redraw: bool) {
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[2J\x1b[H");
    }
    let svc = agent.dataplane.service_counters(0).unwrap_or_default();
    let _ = write!(
        out,
        "Sluice demo  {:>5.1}s  service `sessions` udp {}:{PORT}  sent {sent}  tagged {}  untagged (flow hash) {}\n\n",
        elapsed.as_secs_f64(),
        testbed::VIP_V4,
        svc.tagged,
        svc.tag_missing
    );
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:>10} {:>7} {:>7}  groups",
        "instance", "netns", "packets", "share", "units"
    );
    let total: u64 = agent
        .plan
        .instances
        .iter()
        .map(|i| {
            agent
                .dataplane
                .instance_counters(i.id)
                .map_or(0, |c| c.packets)
        })
        .sum();
    for (i, ti) in agent.plan.instances.iter().zip(&tb.instances) {
        let c = agent.dataplane.instance_counters(i.id).unwrap_or_default();
        let groups: Vec<_> = agent.plan.services[0]
            .groups
            .iter()
            .filter(|(_, o)| *o == i.id)
            .collect();
        let units: u32 = groups.iter().map(|(g, _)| g.size()).sum();
        let shown: Vec<String> = groups.iter().take(3).map(|(g, _)| g.to_string()).collect();
        let more = if groups.len() > 3 {
            format!(" +{}", groups.len() - 3)
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
            "{:<8} {:<22} {:>10} {:>6.1}% {:>7}  {}{more}",
            i.name,
            ti.netns,
            c.packets,
            share,
            units,
            shown.join(" ")
        );
    }
    if let Ok(g) = agent.dataplane.global_counters() {
        let line: Vec<String> = sluice_common::counters::NAMES
            .iter()
            .zip(g)
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let _ = write!(out, "\ndata path: {}\n", line.join(" "));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}
