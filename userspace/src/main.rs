//! `sluice`: the agent (`sluice run`) and its CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use sluice::{
    agent::Agent,
    config::{Config, format_mac},
    dataplane::{AttachMode, Dataplane},
    plan::Plan,
};
use sluice_common::counters;
use tokio::signal::unix::{SignalKind, signal};

/// Sluice: steer each packet of a service to the container instance that owns
/// its work unit, in XDP.
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
    /// Load the XDP program on an interface, program it from the config, and
    /// steer until SIGINT/SIGTERM, then detach.
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
    },
    /// Check a config file and print what it would program; changes nothing.
    CheckConfig {
        /// TOML config to check.
        config: PathBuf,
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
        } => run(&iface, &config, generic, stats_interval),
        Command::CheckConfig { config } => check_config(&config),
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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for s in &config.services {
        let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
        println!(
            "service {}: {} {} port {} tag {:?}, {} instance(s)",
            s.name,
            s.protocol,
            s.vip,
            ports.join(","),
            s.tag,
            s.instances.len()
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn run(
    iface: &str,
    config_path: &std::path::Path,
    generic: bool,
    stats_interval: u64,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let agent = Agent::start(&config, iface, generic)?;
    let plan = &agent.plan;
    for i in &plan.instances {
        tracing::info!(instance = %i.name, id = i.id, ifindex = i.ifindex, mac = %format_mac(&i.mac), "instance resolved");
    }
    for s in &plan.services {
        let groups: Vec<String> = s.groups.iter().map(|(g, o)| format!("{g}->{o}")).collect();
        tracing::info!(service = %s.name, groups = %groups.join(" "), "initial assignment");
    }
    tracing::info!(iface, mode = ?agent.mode, "attached");
    if agent.mode == AttachMode::Generic && !generic {
        tracing::warn!("generic mode: expect a fraction of native throughput");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut ticker = tokio::time::interval(Duration::from_secs(stats_interval.max(1)));
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = ticker.tick(), if stats_interval > 0 => report(&agent.dataplane, plan, false),
            }
        }
        anyhow::Ok(())
    })?;
    report(&agent.dataplane, plan, true);
    agent.stop()?;
    tracing::info!(iface, "detached");
    Ok(())
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
