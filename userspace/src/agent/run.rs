//! `sluice run`: start the agent, then its event loop — the control
//! interval, the punt path, the local API's commands, periodic stats — until
//! SIGINT or SIGTERM; SIGHUP reloads the config, whole or not at all.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use sluice_common::counters;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt as _;

use super::{
    Agent,
    cluster::{Cluster, Registry},
};
use crate::{
    api::{self, InstanceLine},
    config::{Config, StoreKind, format_mac},
    control::InstanceStatus,
    coord::{CoordStore, EmbeddedStore, Event},
    datapath::{AttachMode, Datapath as _, xdp},
    sys::lock::AgentLock,
    telemetry,
};

/// How `sluice run` was asked to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Interface traffic arrives on.
    pub iface: String,
    pub config: PathBuf,
    /// Attach in generic mode even where native XDP works.
    pub generic: bool,
    /// Seconds between per-instance counter lines in the log (0: none).
    pub stats_interval: u64,
    /// File the embedded coordination store persists in.
    pub state: PathBuf,
    /// The control socket (root only).
    pub api_socket: PathBuf,
    /// Directory of the per-instance report sockets.
    pub report_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    /// bpffs directory the data path is pinned in.
    pub pin_dir: PathBuf,
    /// Detach and remove the pins on exit.
    pub cleanup: bool,
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(a: &RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&a.config)?;
    // Before anything of the running data path or the store is read or
    // written: a second agent started by mistake touches nothing.
    let lock = AgentLock::acquire(&a.pin_dir, &a.state)?;
    // A data path already pinned belongs to a previous agent: a failed
    // start must leave it be. Anything else it creates, it removes.
    let adopting = a.pin_dir.join("link").exists();
    let remove_created = || {
        if !adopting && let Err(e) = xdp::XdpDatapath::remove_pins(&a.pin_dir) {
            tracing::warn!(error = %e, dir = %a.pin_dir.display(), "removing what the failed start pinned");
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (store, cluster, registry) = match rt.block_on(open_store(a, &config)) {
        Ok(s) => s,
        Err(e) => {
            remove_created();
            return Err(e);
        }
    };
    // Before start-up, so the first map writes are measured too. Without a
    // runtime serving yet, the exporter serves from a thread of its own.
    telemetry::install(a.metrics_addr, &host_label(&config))
        .map_err(|e| anyhow::anyhow!("--metrics-addr {}: {e}", a.metrics_addr))?;
    tracing::info!(addr = %a.metrics_addr, "serving /metrics");
    let agent = match rt.block_on(Agent::start_pinned(
        &config,
        &a.iface,
        a.generic,
        store.clone(),
        Some(&a.pin_dir),
        registry.as_ref(),
    )) {
        Ok(agent) => agent,
        Err(e) => {
            remove_created();
            return Err(e.into());
        }
    };
    if agent.datapath.is_pinned() {
        tracing::info!(dir = %a.pin_dir.display(), "data path pinned: it keeps running across agent restarts");
    }
    xdp::count_pinned_flows(
        a.pin_dir.join(sluice_common::maps::names::PINNED),
        Duration::from_secs(30),
    );
    for i in &agent.plan.instances {
        tracing::info!(instance = %i.name, id = i.id, ifindex = i.ifindex, mac = %format_mac(&i.mac), "instance resolved");
    }
    for s in &agent.plan.services {
        let groups: Vec<String> = s.groups.iter().map(|(g, o)| format!("{g}->{o}")).collect();
        tracing::info!(service = %s.name, groups = %groups.join(" "), "assignment");
    }
    tracing::info!(iface = %a.iface, mode = agent.mode.name(), "attached");
    if agent.mode == AttachMode::Generic && !a.generic {
        tracing::warn!("generic mode: expect a fraction of native throughput");
    }
    let mut cluster = cluster;
    let mut agent = agent;
    if let Some(c) = &mut cluster {
        rt.block_on(c.start(&mut agent, &config))?;
    }
    let agent = rt.block_on(event_loop(a, agent, &store, cluster.as_mut()))?;
    let _ = std::fs::remove_file(&a.api_socket);
    report(&agent, true);
    let pinned = agent.datapath.is_pinned();
    agent.stop()?;
    let iface = &a.iface;
    if a.cleanup {
        // Leaving for good: the other hosts take this one's groups now,
        // not when its lease runs out.
        if let Some(c) = &cluster
            && let Err(e) = rt.block_on(c.store.leave())
        {
            tracing::warn!(error = %e, "leaving the cluster failed: the other hosts take over when this host's lease expires");
        }
        xdp::XdpDatapath::remove_pins(&a.pin_dir)?;
        tracing::info!(iface, "detached and removed the pins");
    } else if pinned {
        tracing::info!(iface, dir = %a.pin_dir.display(), "left attached for the next agent; `sluice detach` takes it down");
    } else {
        tracing::info!(iface, "detached");
    }
    drop(lock);
    Ok(())
}

/// The `host` label of every metric: the cluster's name for this host, or
/// the machine's host name.
fn host_label(config: &Config) -> String {
    if !config.cluster.host.is_empty() {
        return config.cluster.host.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    }
}

/// The store, and with etcd this host's membership and its instances'
/// cluster-wide ids.
type Opened = (Arc<dyn CoordStore>, Option<Cluster>, Option<Registry>);

/// Opens the coordination store the config names. The embedded one: a
/// corrupt state file is moved aside (the pinned data path's owners are
/// the better record of where flows go). etcd: joins the cluster.
async fn open_store(a: &RunOptions, config: &Config) -> anyhow::Result<Opened> {
    match config.cluster.store {
        StoreKind::Embedded => {
            let (s, _) = EmbeddedStore::open_or_recover(&a.state)?;
            Ok((Arc::new(s), None, None))
        }
        StoreKind::Etcd => {
            let c = Cluster::join(config, &a.state).await?;
            let registry = c.registry(config).await?;
            tracing::info!(host = %c.host, endpoints = %config.cluster.etcd_endpoints.join(","), cluster = %config.cluster.name, "joined the cluster");
            Ok((c.store.clone(), Some(c), Some(registry)))
        }
    }
}

/// Serves the agent until SIGINT or SIGTERM; returns it for shutdown.
async fn event_loop(
    a: &RunOptions,
    mut agent: Agent,
    store: &Arc<dyn CoordStore>,
    mut cluster: Option<&mut Cluster>,
) -> anyhow::Result<Agent> {
    let shared = api::Shared::new(agent.control.reports.clone(), instance_names(&agent));
    // The API answers from its first request on, not from the first tick.
    let first = agent.control.status().await.ok();
    publish_status(&agent, first.as_deref(), &shared).await;
    agent.publish(first.as_deref().unwrap_or_default());
    let _api = api::serve(&a.api_socket, shared.clone())
        .with_context(|| format!("--api-socket {}", a.api_socket.display()))?;
    let mut report_sockets = api::ReportSockets::new(&a.report_dir, shared.clone())
        .with_context(|| format!("--report-dir {}", a.report_dir.display()))?;
    report_sockets
        .sync(&report_targets(&agent))
        .with_context(|| format!("--report-dir {}", a.report_dir.display()))?;
    tracing::info!(control = %a.api_socket.display(), reports = %a.report_dir.display(), "local API: control socket root only; one report socket per instance");
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut control = control_interval(&agent);
    // Punted frames wait for a claim: serve them every 2 ms.
    let mut punts = tokio::time::interval(Duration::from_millis(2));
    punts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stats = tokio::time::interval(Duration::from_secs(a.stats_interval.max(1)));
    stats.tick().await;
    // Other writers (hosts of a cluster, the CLI) change the assignment
    // too: the data path follows the store.
    let mut changes = store.watch();
    loop {
        tokio::select! {
            Some(change) = changes.next() => {
                let service = match &change {
                    Event::Assignment { service } => Some(service.as_str()),
                    Event::Lagged => None,
                };
                if let Err(e) = agent.control.follow(&mut agent.datapath, service).await {
                    tracing::warn!(error = %e, "following the store's change failed; the next interval tries again");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                match reload(a, &mut agent, store, cluster.as_deref()).await {
                    Ok(()) => {
                        if let Some(c) = cluster.as_deref_mut() {
                            c.forget_written();
                        }
                        *shared.instances.lock().expect("instances lock") = instance_names(&agent);
                        if let Err(e) = report_sockets.sync(&report_targets(&agent)) {
                            tracing::error!(error = %e, dir = %a.report_dir.display(), "report sockets not all open after the reload");
                        }
                        control = control_interval(&agent);
                        tracing::info!(config = %a.config.display(), "config reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "config reload refused; the running config stays in force"
                    ),
                }
            }
            _ = control.tick() => {
                if let Some(c) = cluster.as_deref_mut()
                    && let Err(e) = c.sync(&mut agent).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "reading the cluster failed; the data path keeps the last assignment");
                }
                apply_commands(&mut agent, &shared);
                if let Err(e) = agent.tick().await {
                    tracing::warn!(error = %e, "control interval failed");
                }
                // One status a tick serves both the API and the metrics.
                let instances = agent.control.status().await.ok();
                publish_status(&agent, instances.as_deref(), &shared).await;
                agent.publish(instances.as_deref().unwrap_or_default());
            }
            _ = punts.tick(), if agent.punt.is_some() => {
                agent.process_punts().await;
            }
            _ = stats.tick(), if a.stats_interval > 0 => report(&agent, false),
        }
    }
    Ok(agent)
}

/// The control loop's clock. An interval that overran (an unreachable
/// store makes one wait its timeout) is not made up for with a burst:
/// the punt path and the API are served in between.
fn control_interval(agent: &Agent) -> tokio::time::Interval {
    let mut i = tokio::time::interval(agent.control.interval());
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
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

/// Each instance's name and network namespace, for its report socket.
fn report_targets(agent: &Agent) -> Vec<(String, Option<PathBuf>)> {
    agent
        .plan
        .instances
        .iter()
        .map(|i| (i.name.clone(), i.netns.clone()))
        .collect()
}

/// SIGHUP: the config file again, applied whole or not at all (see
/// [`Agent::reload`]).
async fn reload(
    a: &RunOptions,
    agent: &mut Agent,
    store: &Arc<dyn CoordStore>,
    cluster: Option<&Cluster>,
) -> anyhow::Result<()> {
    let config = Config::load(&a.config)?;
    if config.cluster != agent.cluster {
        anyhow::bail!(
            "the [cluster] table changed: a reload keeps the store and the cluster membership it started with; restart the agent to change them (a restart keeps the data path running)"
        );
    }
    let registry = match cluster {
        Some(c) => {
            c.check(&config).await?;
            Some(c.registry(&config).await?)
        }
        None => None,
    };
    agent
        .reload(
            &config,
            store.clone(),
            &a.pin_dir,
            a.generic,
            registry.as_ref(),
        )
        .await?;
    Ok(())
}

/// Refreshes what the API answers `status` (when the control loop could
/// say it) and `groups` with.
async fn publish_status(agent: &Agent, status: Option<&[InstanceStatus]>, shared: &api::Shared) {
    // In a cluster, every instance's host: this one's, and the others'.
    let me = &agent.cluster.host;
    let remote = agent.control.remote_status();
    let host_of = |owner: &str| -> String {
        remote.iter().find(|r| r.name == owner).map_or_else(
            || {
                if owner.is_empty() {
                    String::new()
                } else {
                    me.clone()
                }
            },
            |r| r.host.clone(),
        )
    };
    if let Ok(groups) = agent.control.assignments().await {
        *shared.groups.lock().expect("groups lock") = groups
            .into_iter()
            .map(|(service, entries)| {
                let lines = entries
                    .into_iter()
                    .map(|e| api::GroupLine {
                        host: host_of(&e.owner),
                        group: e.group.to_string(),
                        owner: e.owner,
                        version: e.version,
                    })
                    .collect();
                (service, lines)
            })
            .collect();
    }
    let Some(status) = status else {
        return;
    };
    let groups = shared.groups.lock().expect("groups lock").clone();
    let mut lines: Vec<InstanceLine> = status
        .iter()
        .map(|s| InstanceLine {
            drained: agent.control.is_drained(&s.name),
            service: s.service.clone(),
            name: s.name.clone(),
            utilisation: s.sample.utilisation,
            rate_pps: s.sample.rate_pps,
            drops_ps: s.sample.drops_ps,
            groups: s.groups.iter().map(ToString::to_string).collect(),
            host: me.clone(),
            live: true,
        })
        .collect();
    lines.extend(remote.into_iter().map(|r| {
        let owned = groups
            .get(&r.service)
            .map(|gs| {
                gs.iter()
                    .filter(|g| g.owner == r.name)
                    .map(|g| g.group.clone())
                    .collect()
            })
            .unwrap_or_default();
        InstanceLine {
            drained: false,
            service: r.service,
            name: r.name,
            utilisation: r.sample.utilisation,
            rate_pps: r.sample.rate_pps,
            drops_ps: r.sample.drops_ps,
            groups: owned,
            host: r.host,
            live: r.live,
        }
    }));
    *shared.status.lock().expect("status lock") = lines;
}

/// Per-instance delivery counts: to the log, or as a table on stdout at exit.
fn report(agent: &Agent, table: bool) {
    let dp = &agent.datapath;
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
    for i in &agent.plan.instances {
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
