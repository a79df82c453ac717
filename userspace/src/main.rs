//! `sluice`: the agent (`sluice run`) and its CLI. Arguments and dispatch
//! only; the work is in the library's `agent` and `cli` modules.

/// The L7 distributor allocates and frees many small blocks a request;
/// mimalloc's per-thread free lists serve them without glibc's locks and
/// consolidation (measured: `cargo xtask bench`, README's L7 table).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use sluice::{
    agent::run::RunOptions, api::InstanceSpec, cli, control::qos::Report,
    datapath::xdp::default_pin_dir,
};

const DEFAULT_API_SOCKET: &str = "/run/sluice/agent.sock";
const DEFAULT_REPORT_DIR: &str = "/run/sluice/report";
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
    /// Load the XDP program on an interface, program it from the config, and
    /// run the workload manager until SIGINT/SIGTERM. The data path stays
    /// attached and pinned on exit, so traffic keeps flowing while the
    /// agent restarts; `--cleanup` or `sluice detach` takes it down.
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
        /// Unix socket of the local control API (status, groups, drain),
        /// mode 0600: root only.
        #[arg(long, default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
        /// Directory of the per-instance report sockets, INSTANCE.sock, mode
        /// 0666: bind-mount an instance's socket into its container; it
        /// takes that instance's reports only, from its network namespace.
        #[arg(long, default_value = DEFAULT_REPORT_DIR)]
        report_dir: PathBuf,
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
    /// Attach an XDP program that passes every frame (`XDP_PASS`) to each
    /// interface until SIGINT/SIGTERM, then detach it. For test networks of
    /// veth pairs: a frame a host's Sluice sends back out of its NIC
    /// (`XDP_TX`, encapsulated to another host) reaches the veth's peer only
    /// if the peer has an XDP program of its own; run this on the router's
    /// (or switch's) side of each host's veth. Real NICs need nothing.
    XdpPass {
        /// Interfaces to attach to (in this network namespace; use `ip netns
        /// exec NS sluice xdp-pass ...` for another).
        #[arg(long, short, required = true)]
        iface: Vec<String>,
        /// Attach in generic (skb) mode instead of native.
        #[arg(long)]
        generic: bool,
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
    /// Add or remove instances of the running agent (no restart, no
    /// reload), and list the ones registered this way or by a launcher.
    Instance {
        #[command(subcommand)]
        command: InstanceCommand,
        /// Unix socket of the agent's local API.
        #[arg(long, default_value = DEFAULT_API_SOCKET, global = true)]
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
        /// The instance's report socket (default
        /// /run/sluice/report/INSTANCE.sock); root may also use the control
        /// socket.
        #[arg(long, alias = "api-socket")]
        socket: Option<PathBuf>,
    },
    /// Print a shell completion script, e.g. `sluice completions bash >
    /// /etc/bash_completion.d/sluice` (the Debian package installs them).
    Completions {
        /// Shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write the man pages, sluice.1 and one for each command
    /// (sluice-run.1, ...), into a directory (the package's build does).
    #[command(hide = true)]
    Man {
        /// Directory to write them in (created if missing).
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum InstanceCommand {
    /// Register an instance: it joins the data path at once with no groups
    /// and takes work as its WLM element decides (or by on-demand claims).
    /// Kept across agent restarts.
    Add(InstanceSpec),
    /// Remove a registered instance: drained first, its pinned flows given
    /// until they go quiet or the deadline passes, then out of the data
    /// path. Shows progress until it is gone.
    Remove {
        /// Instance name.
        instance: String,
        /// Seconds its flows get before what still flows to it is moved
        /// to the units' owners (default 30).
        #[arg(long)]
        deadline: Option<f64>,
        /// Stop showing progress after this many seconds (the removal goes
        /// on).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Show the registered instances, and each scaled service's instance
    /// count, target and last decisions.
    List,
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
            report_dir,
            metrics_addr,
            pin_dir,
            cleanup,
        } => sluice::agent::run::run(&RunOptions {
            pin_dir: pin_dir.unwrap_or_else(|| default_pin_dir(&iface)),
            cleanup,
            iface,
            config,
            generic,
            stats_interval,
            state,
            api_socket,
            report_dir,
            metrics_addr,
        }),
        Command::CheckConfig { config } => cli::check_config(&config),
        Command::Detach { iface, pin_dir } => cli::detach(iface.as_deref(), pin_dir),
        Command::XdpPass { iface, generic } => cli::xdp_pass(&iface, generic),
        Command::Status { api_socket } => cli::status(&api_socket),
        Command::Groups {
            service,
            api_socket,
        } => cli::groups(&api_socket, service),
        Command::Drain {
            instance,
            timeout,
            api_socket,
        } => cli::drain(&api_socket, &instance, timeout),
        Command::Undrain {
            instance,
            api_socket,
        } => cli::undrain(&api_socket, &instance),
        Command::Instance {
            command,
            api_socket,
        } => instance(command, &api_socket),
        Command::Report {
            instance,
            latency_p99_ms,
            queue_depth,
            in_flight,
            socket,
        } => cli::report(
            &socket
                .unwrap_or_else(|| Path::new(DEFAULT_REPORT_DIR).join(format!("{instance}.sock"))),
            Report {
                instance,
                latency_p99_ms,
                queue_depth,
                in_flight,
            },
        ),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => man_pages(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn instance(command: InstanceCommand, api_socket: &Path) -> anyhow::Result<()> {
    match command {
        InstanceCommand::Add(spec) => cli::instance_add(api_socket, spec),
        InstanceCommand::Remove {
            instance,
            deadline,
            timeout,
        } => cli::instance_remove(api_socket, &instance, deadline, timeout),
        InstanceCommand::List => cli::instance_list(api_socket),
    }
}

/// sluice.1, then a page per command, nested ones too (sluice-instance-add.1),
/// named as `man` looks them up.
fn man_pages(out: &Path) -> anyhow::Result<()> {
    fn write(cmd: &clap::Command, name: &str, out: &Path) -> anyhow::Result<()> {
        let path = out.join(format!("{name}.1"));
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
        clap_mangen::Man::new(cmd.clone().name(name.to_owned()))
            .render(&mut file)
            .with_context(|| format!("{}", path.display()))?;
        for sub in cmd
            .get_subcommands()
            .filter(|c| !c.is_hide_set() && c.get_name() != "help")
        {
            write(sub, &format!("{name}-{}", sub.get_name()), out)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write(&cmd, "sluice", out)
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
