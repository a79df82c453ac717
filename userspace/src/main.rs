//! `sluice`: the agent (`sluice run`) and its CLI.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use sluice::{
    agent::Agent,
    api::{self, InstanceLine, Request},
    config::{Config, format_mac},
    coord::EmbeddedStore,
    dataplane::{AttachMode, Dataplane},
    plan::Plan,
    qos::Report,
};
use sluice_common::counters;
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_API_SOCKET: &str = "/run/sluice/agent.sock";
const DEFAULT_STATE: &str = "/var/lib/sluice/state.json";

/// Sluice: steer each packet of a service to the container instance that owns
/// its work unit, in XDP, and move work between instances as their load
/// changes.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program on an interface, program it from the config, run
    /// the workload manager until SIGINT/SIGTERM, then detach.
    Run {
        /// Interface to attach to: the NIC (or the veth) traffic arrives on.
        #[arg(long, short)]
        iface: String,
        /// TOML config with the services and their instances.
        #[arg(long, short)]
        config: PathBuf,
        /// Attach in generic (skb) mode even if the driver supports native XDP.
        #[arg(long)]
        generic: bool,
        /// Seconds between per-instance counter reports in the log (0: off).
        #[arg(long, default_value_t = 10)]
        stats_interval: u64,
        /// File the coordination store persists the assignment in; a
        /// restarted agent resumes it.
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Unix socket of the local API (QoS reports, status).
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
        /// Where Prometheus scrapes `/metrics`.
        #[arg(long, default_value = "127.0.0.1:9477")]
        metrics_addr: std::net::SocketAddr,
        /// bpffs directory the program and maps are pinned in, so traffic
        /// keeps flowing while the agent restarts or upgrades (default
        /// /sys/fs/bpf/sluice/IFACE).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// On exit, detach and remove the pins instead of leaving the data
        /// path running for the next agent.
        #[arg(long)]
        cleanup: bool,
    },
    /// Take down a data path a stopped agent left pinned (detaches the
    /// program, drops its maps and pinned flows).
    Detach {
        /// Interface the agent ran on (for the default pin directory).
        #[arg(long, short)]
        iface: Option<String>,
        /// bpffs directory the data path is pinned in.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Check a config file and print what it would program; changes nothing.
    CheckConfig {
        /// TOML config to check.
        config: PathBuf,
    },
    /// Show every instance of the running agent: utilisation, rate, drops,
    /// groups.
    Status {
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Show the groups of a service and their owners.
    Groups {
        /// Service name, as in the config.
        service: String,
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Move every group of an instance to its peers (rate-limited), showing
    /// progress; it then takes no work until `undrain`.
    Drain {
        /// Instance name, as in the config.
        instance: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Let a drained instance take work again.
    Undrain {
        /// Instance name, as in the config.
        instance: String,
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Report an instance's own QoS to the running agent.
    Report {
        /// Instance name, as in the config.
        #[arg(long)]
        instance: String,
        /// 99th percentile latency, in milliseconds.
        #[arg(long)]
        latency_p99_ms: Option<f64>,
        /// Requests waiting in the application's queue.
        #[arg(long)]
        queue_depth: Option<f64>,
        /// Requests being worked on.
        #[arg(long)]
        in_flight: Option<f64>,
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            iface,
            config,
            generic,
            stats_interval,
            state,
            api_socket,
            metrics_addr,
            pin_dir,
            cleanup,
        } => run(&RunArgs {
            pin_dir: pin_dir.unwrap_or_else(|| default_pin_dir(&iface)),
            cleanup,
            iface: &iface,
            config: &config,
            generic,
            stats_interval,
            state: &state,
            api_socket: &api_socket,
            metrics_addr,
        }),
        Command::CheckConfig { config } => check_config(&config),
        Command::Detach { iface, pin_dir } => detach(iface.as_deref(), pin_dir),
        Command::Status { api_socket } => status(&api_socket),
        Command::Groups {
            service,
            api_socket,
        } => groups(&api_socket, service),
        Command::Drain {
            instance,
            timeout,
            api_socket,
        } => drain(&api_socket, &instance, timeout),
        Command::Undrain {
            instance,
            api_socket,
        } => api::call(
            &api_socket,
            &Request::Undrain {
                instance: instance.clone(),
            },
        )
        .map(|_| println!("{instance}: undrained; it may take work again"))
        .map_err(Into::into),
        Command::Report {
            instance,
            latency_p99_ms,
            queue_depth,
            in_flight,
            api_socket,
        } => api::call(
            &api_socket,
            &Request::Report(Report {
                instance,
                latency_p99_ms,
                queue_depth,
                in_flight,
            }),
        )
        .map(|_| ())
        .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for s in &config.services {
        let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
        println!(
            "service {}: {} {} port {} tag {:?} pin {:?}, {} instance(s)",
            s.name,
            s.protocol,
            s.vip,
            ports.join(","),
            s.tag,
            s.pin,
            s.instances.len()
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn instances(api_socket: &Path) -> anyhow::Result<Vec<InstanceLine>> {
    Ok(api::call(api_socket, &Request::Status {})?
        .instances
        .unwrap_or_default())
}

fn status(api_socket: &Path) -> anyhow::Result<()> {
    println!(
        "{:<16} {:<16} {:>6} {:>10} {:>8}  groups",
        "service", "instance", "util", "pps", "drops/s"
    );
    for i in instances(api_socket)? {
        println!(
            "{:<16} {:<16} {:>6.2} {:>10.0} {:>8.0}  {}{}",
            i.service,
            i.name,
            i.utilisation,
            i.rate_pps,
            i.drops_ps,
            i.groups.join(" "),
            if i.drained { "  (drained)" } else { "" }
        );
    }
    Ok(())
}

fn groups(api_socket: &Path, service: String) -> anyhow::Result<()> {
    let answer = api::call(api_socket, &Request::Groups { service })?;
    println!("{:<12} {:<16} {:>8}", "group", "owner", "version");
    for g in answer.groups.unwrap_or_default() {
        println!("{:<12} {:<16} {:>8}", g.group, g.owner, g.version);
    }
    Ok(())
}

fn drain(api_socket: &Path, instance: &str, timeout: u64) -> anyhow::Result<()> {
    let left = |list: &[InstanceLine]| {
        list.iter()
            .find(|i| i.name == instance)
            .map_or(0, |i| i.groups.len())
    };
    let total = left(&instances(api_socket)?);
    api::call(
        api_socket,
        &Request::Drain {
            instance: instance.to_owned(),
        },
    )?;
    let start = std::time::Instant::now();
    let mut last = usize::MAX;
    loop {
        let now = left(&instances(api_socket)?);
        if now != last {
            println!(
                "{instance}: {}/{total} groups moved",
                total.saturating_sub(now)
            );
            last = now;
        }
        if now == 0 {
            println!("{instance}: drained");
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            anyhow::bail!(
                "{instance}: {now} groups left after {timeout} s; the drain goes on in the agent"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn default_pin_dir(iface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/sluice").join(iface)
}

fn detach(iface: Option<&str>, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match (pin_dir, iface) {
        (Some(d), _) => d,
        (None, Some(i)) => default_pin_dir(i),
        (None, None) => anyhow::bail!("say which data path: --iface IFACE or --pin-dir DIR"),
    };
    if Dataplane::remove_pins(&dir)? {
        println!("{}: detached and removed", dir.display());
    } else {
        println!("{}: nothing pinned there", dir.display());
    }
    Ok(())
}

struct RunArgs<'a> {
    iface: &'a str,
    config: &'a Path,
    generic: bool,
    stats_interval: u64,
    state: &'a Path,
    api_socket: &'a Path,
    metrics_addr: std::net::SocketAddr,
    pin_dir: PathBuf,
    cleanup: bool,
}

fn run(a: &RunArgs<'_>) -> anyhow::Result<()> {
    let config = Config::load(a.config)?;
    let store = Arc::new(EmbeddedStore::open(a.state)?);
    // Before start-up, so the first map writes are measured too. Without a
    // runtime yet, the exporter serves from a thread of its own.
    sluice::telemetry::install(a.metrics_addr)
        .map_err(|e| anyhow::anyhow!("--metrics-addr {}: {e}", a.metrics_addr))?;
    tracing::info!(addr = %a.metrics_addr, "serving /metrics");
    let mut agent =
        Agent::start_pinned(&config, a.iface, a.generic, store.clone(), Some(&a.pin_dir))?;
    if agent.dataplane.is_pinned() {
        tracing::info!(dir = %a.pin_dir.display(), "data path pinned: it keeps running across agent restarts");
    }
    sluice::telemetry::count_pinned_flows(
        a.pin_dir.join(sluice_common::maps::names::PINNED),
        Duration::from_secs(30),
    );
    let iface = a.iface;
    for i in &agent.plan.instances {
        tracing::info!(instance = %i.name, id = i.id, ifindex = i.ifindex, mac = %format_mac(&i.mac), "instance resolved");
    }
    for s in &agent.plan.services {
        let groups: Vec<String> = s.groups.iter().map(|(g, o)| format!("{g}->{o}")).collect();
        tracing::info!(service = %s.name, groups = %groups.join(" "), "assignment");
    }
    tracing::info!(iface, mode = ?agent.mode, "attached");
    if agent.mode == AttachMode::Generic && !a.generic {
        tracing::warn!("generic mode: expect a fraction of native throughput");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shared = api::Shared {
            reports: agent.control.reports.clone(),
            instances: Arc::new(Mutex::new(instance_names(&agent))),
            status: Arc::new(Mutex::new(Vec::new())),
            groups: Arc::default(),
            commands: Arc::default(),
        };
        let _api = api::serve(a.api_socket, shared.clone())?;
        sluice::telemetry::publish(&agent);
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut control = tokio::time::interval(agent.control.interval());
        // Punted frames wait for a claim: serve them every 2 ms.
        let mut punts = tokio::time::interval(Duration::from_millis(2));
        punts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stats = tokio::time::interval(Duration::from_secs(a.stats_interval.max(1)));
        stats.tick().await;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => {
                    match reload(a, &store) {
                        Ok(mut new) => {
                            new.control.reports = shared.reports.clone();
                            *shared.instances.lock().expect("instances lock") = instance_names(&new);
                            control = tokio::time::interval(new.control.interval());
                            // The old agent's program is already swapped out
                            // of the pinned link; dropping it closes its fds.
                            drop(std::mem::replace(&mut agent, new));
                            tracing::info!(config = %a.config.display(), "config reloaded");
                        }
                        Err(e) => tracing::error!(
                            error = %format!("{e:#}"),
                            "config reload refused; the running config stays in force"
                        ),
                    }
                }
                _ = control.tick() => {
                    apply_commands(&mut agent, &shared);
                    if let Err(e) = agent.tick() {
                        tracing::warn!(error = %e, "control interval failed");
                    }
                    publish_status(&agent, &shared);
                    sluice::telemetry::publish(&agent);
                }
                _ = punts.tick(), if agent.punt.is_some() => {
                    if let Err(e) = agent.process_punts() {
                        tracing::warn!(error = %e, "resolving punted packets failed");
                    }
                }
                _ = stats.tick(), if a.stats_interval > 0 => report(&agent.dataplane, &agent.plan, false),
            }
        }
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_file(a.api_socket);
    report(&agent.dataplane, &agent.plan, true);
    let pinned = agent.dataplane.is_pinned();
    agent.stop()?;
    if a.cleanup {
        Dataplane::remove_pins(&a.pin_dir)?;
        tracing::info!(iface, "detached and removed the pins");
    } else if pinned {
        tracing::info!(iface, dir = %a.pin_dir.display(), "left attached for the next agent; `sluice detach` takes it down");
    } else {
        tracing::info!(iface, "detached");
    }
    Ok(())
}

/// Drains and undrains the API queued for the control loop.
fn apply_commands(agent: &mut Agent, shared: &api::Shared) {
    for c in std::mem::take(&mut *shared.commands.lock().expect("commands lock")) {
        let (name, drained) = match &c {
            api::Command::Drain(n) => (n, true),
            api::Command::Undrain(n) => (n, false),
        };
        match agent.control.set_drained(name, drained) {
            Ok(()) => tracing::info!(instance = %name, drained, "drain state changed"),
            Err(e) => tracing::warn!(error = %e, "drain request refused"),
        }
    }
}

fn instance_names(agent: &Agent) -> Vec<String> {
    agent
        .plan
        .instances
        .iter()
        .map(|i| i.name.clone())
        .collect()
}

/// SIGHUP: the config file again, applied whole or not at all. Everything
/// that can fail on bad input fails before a map is written; the new
/// program adopts the pinned maps and takes the link over atomically.
fn reload(a: &RunArgs<'_>, store: &Arc<EmbeddedStore>) -> anyhow::Result<Agent> {
    let config = Config::load(a.config)?;
    let agent = Agent::start_pinned(&config, a.iface, a.generic, store.clone(), Some(&a.pin_dir))?;
    if !agent.dataplane.is_pinned() {
        anyhow::bail!(
            "the data path is not pinned, so it cannot be swapped in place; restart the agent"
        );
    }
    Ok(agent)
}

fn publish_status(agent: &Agent, shared: &api::Shared) {
    if let Ok(groups) = agent.control.assignments() {
        *shared.groups.lock().expect("groups lock") = groups
            .into_iter()
            .map(|(service, entries)| {
                let lines = entries
                    .into_iter()
                    .map(|e| api::GroupLine {
                        group: e.group.to_string(),
                        owner: e.owner,
                        version: e.version,
                    })
                    .collect();
                (service, lines)
            })
            .collect();
    }
    let Ok(status) = agent.control.status() else {
        return;
    };
    *shared.status.lock().expect("status lock") = status
        .into_iter()
        .map(|s| InstanceLine {
            drained: agent.control.is_drained(&s.name),
            service: s.service,
            name: s.name,
            utilisation: s.sample.utilisation,
            rate_pps: s.sample.rate_pps,
            drops_ps: s.sample.drops_ps,
            groups: s.groups.iter().map(ToString::to_string).collect(),
        })
        .collect();
}

/// Per-instance delivery counts: to the log, or as a table on stdout at exit.
fn report(dp: &Dataplane, plan: &Plan, table: bool) {
    let global = match dp.global_counters() {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "reading counters failed");
            return;
        }
    };
    if table {
        println!("{:<20} {:>12} {:>14}", "instance", "packets", "bytes");
    }
    for i in &plan.instances {
        let c = dp.instance_counters(i.id).unwrap_or_default();
        if table {
            println!("{:<20} {:>12} {:>14}", i.name, c.packets, c.bytes);
        } else {
            tracing::info!(instance = %i.name, packets = c.packets, bytes = c.bytes, "delivered");
        }
    }
    let summary: Vec<String> = counters::NAMES
        .iter()
        .zip(global)
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    if table {
        println!("totals: {}", summary.join(" "));
    } else {
        tracing::info!(totals = %summary.join(" "), "data path");
    }
}
