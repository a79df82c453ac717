//! `cargo xtask demo --hosts N`: Sluice as a cluster on a built-in testbed.
//!
//! Builds a router with an ECMP route to the VIP over `N` hosts, each with
//! two instance namespaces, and a real etcd; starts the real `sluice run`
//! on every host (host 0 first: it takes the whole service). A steady UDP
//! load overloads host 0's instances: their elements shed groups to the
//! idle instances of the other hosts, whatever host a packet enters by
//! (packets for an owner elsewhere travel encapsulated). Halfway, one
//! instance of host 1 is throttled: it drops and sheds in turn. A live
//! table shows every instance of every host, from the cluster's store,
//! and each host's data path counters. Ends after `--seconds` or on
//! Ctrl-C, removes everything it made, and fails if a phase did not show
//! what it announces (work on the other hosts' instances; the throttled
//! instance giving work away).

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use sluice::coord::CoordStore as _;
use sluice_tests::{
    cluster::{ClusterBed, VIP_V4},
    demo, process,
    traffic::{self, UdpServers},
};

/// Sluice as a cluster on a built-in testbed: hosts behind an ECMP router,
/// etcd, load spreading across hosts, a live table.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Hosts behind the router.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=6))]
    hosts: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(8..=3600))]
    seconds: u64,
    /// Datagrams per second the generator sends.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    rate: u64,
}

const PER_HOST: usize = 2;
const PORT: u16 = 7000;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    demo::exit("sluice-cluster-demo", run(&args))
}

/// Host `k`'s config: the cluster table, the service, its two instances.
/// Each instance is sized for a third of the load: host 0's two alone are
/// overloaded.
fn config(bed: &ClusterBed, k: usize, rate: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let capacity = rate as f64 / 3.0;
    format!(
        "{}[[service]]\nname = \"kv\"\nvip = \"{VIP_V4}\"\nport = {PORT}\nprotocol = \"udp\"\n\
         wlm = {{ capacity_pps = {capacity}, overload = 0.8, underload = 0.3, sustain = 2, cooldown_ms = 1000, min_group_units = 64 }}\n{}",
        bed.cluster_toml(k, "interval_ms = 250\nmax_moves_per_sec = 4"),
        bed.instances_toml("kv", k)
    )
}

fn run(args: &Args) -> anyhow::Result<()> {
    demo::stop_on_signals();
    let hosts = usize::try_from(args.hosts)?;
    eprintln!("[demo] building the cluster: a router, etcd, {hosts} hosts of {PER_HOST} instances");
    let mut bed = ClusterBed::new("demo", hosts, PER_HOST);
    for k in 0..hosts {
        eprintln!("[demo] starting sluice run on h{k}");
        let c = config(&bed, k, args.rate);
        bed.start_agent(k, &c);
    }
    let dst = SocketAddr::new(IpAddr::V4(VIP_V4), PORT);
    let servers = UdpServers::start_with(&bed.all_instances(), dst, 256 << 10);
    let rate = std::sync::Arc::new(AtomicU64::new(args.rate));
    let generator = {
        let (client, rate, seconds) = (bed.client.0.clone(), rate.clone(), args.seconds);
        std::thread::spawn(move || {
            traffic::paced_udp(
                &client,
                dst,
                512,
                &rate,
                &demo::STOP,
                Duration::from_secs(seconds),
                |_, seq| seq.to_be_bytes().to_vec(),
            )
        })
    };
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let throttle_at = Duration::from_secs(args.seconds / 2);
    let mut phase =
        "host 0's instances take everything and are overloaded: they shed to the other hosts";
    let mut last_print = start;
    // Units on the other hosts' instances, and the throttled instance's,
    // when it is throttled.
    let mut at_throttle = None;
    while Instant::now() < end && !demo::stopping() {
        std::thread::sleep(Duration::from_millis(500));
        if start.elapsed() >= throttle_at && at_throttle.is_none() {
            at_throttle = Some((elsewhere(&bed), units_of(&bed, THROTTLED)));
            servers.throttle[PER_HOST].store(args.rate / 20, Ordering::Relaxed);
            phase = "kv-h1-0 throttled: it drops, and sheds to instances on any host";
        }
        if tty || last_print.elapsed() >= Duration::from_secs(5) {
            show(&bed, start, phase, tty);
            last_print = Instant::now();
        }
    }
    // Ctrl-C: the story is cut short, nothing to check.
    let interrupted = demo::stopping();
    demo::STOP.store(true, Ordering::Relaxed);
    let sent = generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    std::thread::sleep(Duration::from_millis(300));
    let received: usize = servers.finish().iter().map(Vec::len).sum();
    show(&bed, start, "done", false);
    let at_end = units_of(&bed, THROTTLED);
    println!(
        "sent {sent}, received by the servers {received} (a throttled server drops by design)"
    );
    let verdict = match at_throttle {
        _ if interrupted => Ok(()),
        Some((0, _)) => Err(anyhow::anyhow!(
            "host 0 shed no work to the other hosts before {THROTTLED} was throttled"
        )),
        Some((elsewhere, before)) if at_end >= before => {
            println!("units on the other hosts before the throttle: {elsewhere}");
            Err(anyhow::anyhow!(
                "{THROTTLED} was throttled but shed no work ({before} units then, {at_end} at the end)"
            ))
        }
        Some((elsewhere, before)) => {
            println!(
                "units on the other hosts before the throttle: {elsewhere}; {THROTTLED}'s: {before} then, {at_end} at the end"
            );
            Ok(())
        }
        None => Err(anyhow::anyhow!("ended before the throttle")),
    };
    drop(bed);
    eprintln!("[demo] stopped the agents and etcd, removed the cluster");
    verdict
}

/// The instance throttled halfway (instance `PER_HOST` in host-major
/// order: host 1's first).
const THROTTLED: &str = "kv-h1-0";

/// Units of the service's groups owned by `name`, as the store has them.
fn units_of(bed: &ClusterBed, name: &str) -> u32 {
    groups(bed)
        .iter()
        .filter(|e| e.owner == name)
        .map(|e| e.group.size())
        .sum()
}

/// Units owned by instances of hosts other than host 0.
fn elsewhere(bed: &ClusterBed) -> u32 {
    groups(bed)
        .iter()
        .filter(|e| !e.owner.starts_with("kv-h0-"))
        .map(|e| e.group.size())
        .sum()
}

fn groups(bed: &ClusterBed) -> Vec<sluice::coord::GroupEntry> {
    bed.with_store(|s| Box::pin(async move { s.groups("kv").await.unwrap_or_default() }))
}

fn show(bed: &ClusterBed, start: Instant, phase: &str, redraw: bool) {
    let (loads, groups) = bed.with_store(|s| {
        Box::pin(async move {
            (
                s.loads().await.unwrap_or_default(),
                s.groups("kv").await.unwrap_or_default(),
            )
        })
    });
    let mut units: HashMap<&str, u32> = HashMap::new();
    for e in &groups {
        *units.entry(e.owner.as_str()).or_default() += e.group.size();
    }
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[2J\x1b[H");
    }
    let _ = writeln!(
        out,
        "Sluice cluster demo  {:>5.1}s  service `kv` udp {VIP_V4}:{PORT} over {} hosts  {} groups\n{phase}\n",
        start.elapsed().as_secs_f64(),
        bed.hosts.len(),
        groups.len()
    );
    let _ = writeln!(
        out,
        "{:<5} {:<10} {:>8} {:>6} {:>7}   {:>10} {:>12} {:>12}",
        "host", "instance", "pps", "util", "units", "delivered", "encapsulated", "taken in"
    );
    for (k, h) in bed.hosts.iter().enumerate() {
        let text =
            process::scrape(&h.ns.0, 9600 + u16::try_from(k).unwrap_or(0)).unwrap_or_default();
        let count = |action: &str| {
            process::metric(
                &text,
                "sluice_datapath_packets_total",
                &format!("action=\"{action}\""),
            )
        };
        for j in 0..PER_HOST {
            let name = format!("kv-h{k}-{j}");
            let load = loads.get(&name).cloned().unwrap_or_default();
            let counters = if j == 0 {
                format!(
                    "{:>10} {:>12} {:>12}",
                    count("delivered"),
                    count("encapsulated"),
                    count("decap_delivered")
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<5} {:<10} {:>8.0} {:>6.2} {:>7}   {counters}",
                if j == 0 { h.name.as_str() } else { "" },
                name,
                load.rate_pps,
                load.utilisation,
                units.get(name.as_str()).copied().unwrap_or(0),
            );
        }
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}
