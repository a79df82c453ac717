//! `sluice run`: start the agent, then its event loop — the control
//! interval, the punt path, the local API's commands, periodic stats — until
//! SIGINT or SIGTERM; SIGHUP reloads the config, whole or not at all.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use sluice_common::counters;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt as _;

mod scaling;

use scaling::Scaler;

use super::{
    Agent,
    cluster::{Cluster, Registry},
    fence::{Fencing, StartFence},
    lifecycle::{self, Lifecycle, Registered, Removal, RemovalStep, Source},
};
use crate::{
    api::{self, InstanceLine, InstanceSpec},
    config::{Config, StoreKind, format_mac},
    control::{InstanceState, InstanceStatus},
    coord::{CoordStore, EmbeddedStore, Event},
    datapath::{AttachMode, Datapath as _, xdp},
    sys::{self, lock::AgentLock, rlimit},
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
    // First: every client connection of the L7 distributor is a descriptor,
    // and at the usual soft limit (1,024) a thousand clients would leave
    // none for the state file, etcd or a namespace.
    match rlimit::raise_nofile() {
        Ok(n) => tracing::info!(before = n.before, now = n.now, "open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, limit = rlimit::nofile(), "cannot raise the open-file limit; going on with it");
        }
    }
    let base = Config::load(&a.config)?;
    // Before anything of the running data path or the store is read or
    // written: a second agent started by mistake touches nothing.
    let lock = AgentLock::acquire(&a.pin_dir, &a.state)?;
    let life = Lifecycle::open(&a.state)?;
    let config = effective(&life, &base);
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
    // Before the program loads: a restart within the lease keeps the
    // running data path delivering (see `StartFence`).
    let start_fence = {
        let _rt = rt.enter();
        StartFence::hold(cluster.as_ref(), &config, &a.pin_dir)
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
    let agent = rt.block_on(event_loop(
        a,
        agent,
        &store,
        cluster.as_mut(),
        (base, config, life),
        start_fence,
    ))?;
    let _ = std::fs::remove_file(&a.api_socket);
    report(&agent, true);
    let pinned = agent.datapath.is_pinned();
    agent.stop()?;
    let iface = &a.iface;
    if a.cleanup {
        // Leaving for good: the other hosts take this one's groups now,
        // not when its lease runs out.
        if let Some(c) = &cluster
            && let Err(e) = rt.block_on(c.membership.leave())
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

/// The running agent and what its event loop keeps beside it.
struct Serving<'a> {
    a: &'a RunOptions,
    agent: Agent,
    store: &'a Arc<dyn CoordStore>,
    cluster: Option<&'a mut Cluster>,
    shared: api::Shared,
    report_sockets: api::ReportSockets,
    control: tokio::time::Interval,
    /// The config file as last loaded.
    base: Config,
    /// What runs: `base` with the registered instances whose veth is there.
    running: Config,
    life: Lifecycle,
    scaler: Scaler,
    /// The fence (a cluster's, see `control::fence`).
    fencing: Option<Fencing>,
}

/// Until a rejoin wants the tables re-read; never without a fence.
async fn fence_wait(f: Option<&mut Fencing>) {
    match f {
        Some(f) => f.wait().await,
        None => std::future::pending().await,
    }
}

/// Serves the agent until SIGINT or SIGTERM; returns it for shutdown.
async fn event_loop(
    a: &RunOptions,
    agent: Agent,
    store: &Arc<dyn CoordStore>,
    cluster: Option<&mut Cluster>,
    (base, running, life): (Config, Config, Lifecycle),
    start_fence: StartFence,
) -> anyhow::Result<Agent> {
    let shared = api::Shared::new(agent.control.reports.clone(), instance_names(&agent));
    let mut jobs = shared.take_jobs().expect("a new API's job queue");
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
    let control = control_interval(&agent);
    // Punted frames wait for a claim: serve them every 2 ms.
    let mut punts = tokio::time::interval(Duration::from_millis(2));
    punts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stats = tokio::time::interval(Duration::from_secs(a.stats_interval.max(1)));
    stats.tick().await;
    // Other writers (hosts of a cluster, the CLI) change the assignment
    // too: the data path follows the store.
    let mut changes = store.watch();
    let writer = agent.datapath.fence_writer();
    drop(start_fence);
    let fencing = Fencing::of(&running, cluster.as_deref(), &shared, writer).await;
    let mut r = Serving {
        a,
        agent,
        store,
        cluster,
        shared,
        report_sockets,
        control,
        base,
        running,
        life,
        scaler: Scaler::new(
            a.state
                .parent()
                .unwrap_or_else(|| std::path::Path::new("."))
                .join("launch"),
        ),
        fencing,
    };
    let owned = r.owned_groups().await;
    r.publish_lifecycle(&owned);
    sys::notify::ready(&format!("steering on {}", a.iface));
    loop {
        tokio::select! {
            Some(change) = changes.next() => {
                let service = match &change {
                    Event::Assignment { service } => Some(service.as_str()),
                    Event::Lagged => None,
                };
                if let Err(e) = r.agent.control.follow(&mut r.agent.datapath, service).await {
                    tracing::warn!(error = %e, "following the store's change failed; the next interval tries again");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => r.reload().await,
            Some(job) = jobs.recv() => r.job(job).await,
            Some(outcome) = r.scaler.outcomes.recv() => r.launched(outcome).await,
            () = fence_wait(r.fencing.as_mut()) => r.fence_step().await,
            _ = r.control.tick() => {
                if let Some(c) = r.cluster.as_deref_mut()
                    && let Err(e) = c.sync(&mut r.agent).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "reading the cluster failed; the data path keeps the last assignment");
                }
                r.fence_peers();
                apply_commands(&mut r.agent, &r.shared);
                if let Err(e) = r.agent.tick().await {
                    tracing::warn!(error = %e, "control interval failed");
                }
                // The store's assignment and the status, read once for what
                // follows (again only if a removal or a join rewrote them):
                // one status a tick serves the scaler, the API and the
                // metrics.
                let mut owned = r.owned_groups().await;
                let mut instances = r.agent.control.status().await.ok();
                if r.lifecycle_step(&owned).await {
                    owned = r.owned_groups().await;
                    instances = r.agent.control.status().await.ok();
                }
                r.scale_step(&owned, instances.as_deref().unwrap_or_default());
                publish_status(&r.agent, instances.as_deref(), &r.shared).await;
                r.agent.publish(instances.as_deref().unwrap_or_default());
                r.publish_lifecycle(&owned);
            }
            _ = punts.tick(), if r.agent.punt.is_some() => {
                r.agent.process_punts().await;
            }
            _ = stats.tick(), if a.stats_interval > 0 => report(&r.agent, false),
        }
    }
    sys::notify::stopping();
    Ok(r.agent)
}

impl Serving<'_> {
    /// After a rejoin, the tables re-read (the fence's task gives the data
    /// path its deadlines itself).
    async fn fence_step(&mut self) {
        if let (Some(f), Some(c)) = (self.fencing.as_mut(), self.cluster.as_deref_mut()) {
            f.step(&mut self.agent, c, &self.running).await;
        }
    }

    /// The fence asks the hosts the last look at the cluster found.
    fn fence_peers(&mut self) {
        if let (Some(f), Some(c)) = (self.fencing.as_mut(), self.cluster.as_deref()) {
            f.set_peers(c.peers());
        }
    }

    /// Applies `config` through the agent's whole-or-nothing reload; on
    /// success it is the running config, and the API's instances, the
    /// report sockets and the control interval follow it.
    async fn apply(&mut self, config: Config) -> anyhow::Result<()> {
        if config.cluster != self.agent.cluster {
            anyhow::bail!(
                "the [cluster] table changed: a reload keeps the store and the cluster membership it started with; restart the agent to change them (a restart keeps the data path running)"
            );
        }
        let registry = match self.cluster.as_deref() {
            Some(c) => {
                c.check(&config).await?;
                Some(c.registry(&config).await?)
            }
            None => None,
        };
        self.agent
            .reload(
                &config,
                self.store.clone(),
                &self.a.pin_dir,
                self.a.generic,
                registry.as_ref(),
                self.fencing.as_mut(),
            )
            .await?;
        if let Some(c) = self.cluster.as_deref_mut() {
            c.forget_written();
            if let Err(e) = c.settled(&config).await {
                tracing::warn!(error = %e, "updating this host's cluster records after the reload failed; the next reload tries again");
            }
        }
        *self.shared.instances.lock().expect("instances lock") = instance_names(&self.agent);
        if let Err(e) = self.report_sockets.sync(&report_targets(&self.agent)) {
            tracing::error!(error = %e, dir = %self.a.report_dir.display(), "report sockets not all open after the reload");
        }
        self.control = control_interval(&self.agent);
        self.running = config;
        Ok(())
    }

    /// SIGHUP, as the service manager sees it too: reloading, then ready
    /// again whether the new config was applied or refused.
    async fn reload(&mut self) {
        sys::notify::reloading();
        match self.reload_file().await {
            Ok(()) => tracing::info!(config = %self.a.config.display(), "config reloaded"),
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "config reload refused; the running config stays in force"
            ),
        }
        sys::notify::ready(&format!("steering on {}", self.a.iface));
    }

    /// SIGHUP: the config file again, with the registrations, applied whole
    /// or not at all (see [`Agent::reload`]).
    async fn reload_file(&mut self) -> anyhow::Result<()> {
        let base = Config::load(&self.a.config)?;
        let config = effective(&self.life, &base);
        self.apply(config).await?;
        self.base = base;
        Ok(())
    }

    /// Carries out a lifecycle request and answers it.
    async fn job(&mut self, job: api::Job) {
        match job {
            api::Job::Add { spec, reply } => {
                let answer = match self.add(spec, Source::Api).await {
                    Ok(done) => api::Response {
                        ok: true,
                        done: Some(done),
                        ..api::Response::default()
                    },
                    Err(e) => refused(format!("{e:#}")),
                };
                let _ = reply.send(answer);
            }
            api::Job::Remove {
                instance,
                deadline,
                reply,
            } => {
                let answer = match self.remove(&instance, deadline) {
                    Ok(done) => api::Response {
                        ok: true,
                        done: Some(done),
                        ..api::Response::default()
                    },
                    Err(e) => refused(e),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Registers `spec`: the running config with it, applied; then saved.
    async fn add(&mut self, spec: InstanceSpec, source: Source) -> anyhow::Result<String> {
        if self.life.get(&spec.name).is_some() {
            anyhow::bail!(
                "`{}` is registered already (see `sluice instance list`)",
                spec.name
            );
        }
        let mut config = self.running.clone();
        config
            .add_instance(&spec)
            .map_err(|e| anyhow::anyhow!("{}", lifecycle::refusal(&e)))?;
        self.apply(config)
            .await
            .with_context(|| format!("`{}` not added; nothing changed", spec.name))?;
        let name = spec.name.clone();
        let id = self
            .agent
            .plan
            .instances
            .iter()
            .find(|i| i.name == name)
            .map_or(0, |i| i.id);
        tracing::info!(instance = %name, service = %spec.service, veth = %spec.veth, id, source = source.name(), "instance registered; it takes work as its element decides");
        if let Err(e) = self.life.insert(Registered { spec, source }) {
            tracing::error!(instance = %name, error = %e, "the registration is not saved: a restarted agent will not have it");
            return Ok(format!(
                "{name} added (id {id}), but not saved ({e}): a restarted agent will not have it"
            ));
        }
        Ok(format!("{name} added (id {id})"))
    }

    /// Starts removing registered instance `name`: drained now, taken out
    /// once its flows are done (see [`lifecycle::Removal`]).
    fn remove(&mut self, name: &str, deadline: Option<Duration>) -> Result<String, String> {
        if self.life.get(name).is_none() {
            return Err(if self.base.has_instance(name) {
                format!(
                    "`{name}` is in the config file: remove it there and reload (SIGHUP), or `sluice drain` it"
                )
            } else {
                format!("no registered instance `{name}` (see `sluice instance list`)")
            });
        }
        let deadline = deadline.unwrap_or(DEFAULT_REMOVAL_DEADLINE);
        if self.running.has_instance(name) {
            self.agent
                .control
                .set_drained(name, true)
                .map_err(|e| e.to_string())?;
        }
        self.life
            .removing
            .insert(name.to_owned(), Removal::new(Instant::now(), deadline));
        tracing::info!(instance = %name, deadline = ?deadline, "removing: draining first");
        Ok(format!(
            "{name}: draining; it is taken out once its flows are done, at most {} s from now",
            deadline.as_secs()
        ))
    }

    /// One look at the removals under way and at the registrations waiting
    /// for their veth, with the groups each instance owns (`owned`).
    /// Returns whether it applied a change (the assignment may differ).
    async fn lifecycle_step(&mut self, owned: &HashMap<String, usize>) -> bool {
        let now = Instant::now();
        let mut applied = false;
        let mut done = Vec::new();
        let names: Vec<String> = self.life.removing.keys().cloned().collect();
        for name in names {
            let Some(inst) = self.agent.plan.instances.iter().find(|i| i.name == name) else {
                // Not running (its veth never came): nothing to drain.
                done.push((name, RemovalStep::Done));
                continue;
            };
            let packets = self
                .agent
                .datapath
                .instance_counters(inst.id)
                .map_or(0, |c| c.packets);
            let groups = owned.get(&name).copied().unwrap_or(0);
            let removal = self.life.removing.get_mut(&name).expect("listed");
            match removal.step(groups, packets, now) {
                RemovalStep::Wait => {}
                step => done.push((name, step)),
            }
        }
        for (name, step) in done {
            if self.running.has_instance(&name) {
                let mut config = self.running.clone();
                config.remove_instance(&name);
                if let Err(e) = self.apply(config).await {
                    let why = format!("{e:#}");
                    tracing::error!(instance = %name, error = %why, "taking the instance out failed; trying again next interval");
                    if let Some(r) = self.life.removing.get_mut(&name) {
                        r.detail = format!("taking it out failed: {why}");
                    }
                    continue;
                }
                applied = true;
            }
            let service = self
                .life
                .get(&name)
                .map(|r| (r.spec.service.clone(), r.source));
            if let Err(e) = self.life.forget(&name) {
                tracing::error!(instance = %name, error = %e, "the registrations file is not updated: a restarted agent will register it again");
            }
            if let Some((service, Source::Launcher)) = service {
                self.removed(&name, &service);
            }
            if step == RemovalStep::Deadline {
                tracing::warn!(instance = %name, "removed at its deadline: what still flowed to it goes to its units' owners");
            } else {
                tracing::info!(instance = %name, "removed: drained and quiet");
            }
        }
        if self
            .life
            .waiting(&self.running)
            .any(|r| lifecycle::veth_present(&r.spec))
        {
            let config = effective(&self.life, &self.base);
            match self.apply(config).await {
                Ok(()) => applied = true,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "registered instances whose veth appeared could not join; trying again next interval");
                }
            }
        }
        applied
    }

    /// Groups each local instance owns, from the store.
    async fn owned_groups(&self) -> HashMap<String, usize> {
        let mut owned = HashMap::new();
        if let Ok(all) = self.agent.control.assignments().await {
            for (_, groups) in all {
                for g in groups {
                    *owned.entry(g.owner).or_insert(0) += 1;
                }
            }
        }
        owned
    }

    /// Refreshes what `instances` answers, with the groups each instance
    /// owns (`owned`).
    fn publish_lifecycle(&self, owned: &HashMap<String, usize>) {
        let lines = self.life.lines(
            &self.running,
            |n| owned.get(n).copied().unwrap_or(0),
            |n| self.agent.control.is_failed(n),
        );
        *self.shared.registered.lock().expect("registered lock") = lines;
    }
}

/// How long a removed instance's flows get by default.
const DEFAULT_REMOVAL_DEADLINE: Duration = Duration::from_secs(30);

fn refused(error: String) -> api::Response {
    api::Response {
        ok: false,
        error: Some(error),
        ..api::Response::default()
    }
}

/// The file's config with the registrations whose veth is there; the ones
/// it refuses now are logged and left out.
fn effective(life: &Lifecycle, base: &Config) -> Config {
    let (config, refused) = life.effective(base, lifecycle::veth_present);
    for (name, e) in refused {
        tracing::error!(instance = %name, error = %lifecycle::refusal(&e), "a registered instance is refused by the running config and left out; `sluice instance remove` it, or fix the config");
    }
    config
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

/// Refreshes what the API answers `status` (when the control loop could
/// say it) and `groups` with.
async fn publish_status(agent: &Agent, status: Option<&[InstanceStatus]>, shared: &api::Shared) {
    // In a cluster, every instance's host: this one's, and the others'.
    let me = &agent.cluster.host;
    let remote = agent.control.remote_status();
    // Every instance's state: this host's, and what the others publish.
    let state_of = |owner: &str| -> InstanceState {
        remote.iter().find(|r| r.name == owner).map_or_else(
            || {
                status
                    .and_then(|st| st.iter().find(|s| s.name == owner))
                    .map_or_else(InstanceState::default, |s| s.state)
            },
            |r| r.state,
        )
    };
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
                        state: state_of(&e.owner),
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
            state: s.state,
            failure: agent.control.failure_reason(&s.name).map(str::to_owned),
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
            drained: r.state == InstanceState::Drained,
            service: r.service,
            name: r.name,
            utilisation: r.sample.utilisation,
            rate_pps: r.sample.rate_pps,
            drops_ps: r.sample.drops_ps,
            groups: owned,
            host: r.host,
            live: r.live,
            state: r.state,
            failure: None,
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
