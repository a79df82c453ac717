//! The agent's control loop: each interval, measure every instance's QoS,
//! publish it, let each instance's WLM element decide, and carry the moves
//! out — in the coordination store first (compare-and-swap), then in the
//! data path.
//!
//! - [`wlm`]: the element policy (pure: samples in, a move out);
//! - [`qos`]: the utilisation formula, its sources, application reports;
//! - [`origin`]: SLA origin rules' tiers (pure: subset in, slots out).
//!
//! The loop reaches the data path only through the [`Datapath`] trait and
//! the host only through [`Probe`], so claim, drain, failover and error
//! paths are unit-tested with in-memory fakes. May import `config`,
//! `plan`, `coord`, `datapath` (the trait), `sys` and `telemetry`.

pub mod origin;
pub mod qos;
pub mod scale;
pub mod wlm;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_common::{HIT_BUCKETS_PER_SERVICE, maps::NO_OWNER, unit_of};

use self::{
    qos::{HostProbe, Inputs, Probe, Rate, Report, Reports, Thresholds},
    wlm::{Action, ElementState, MoveLimiter, Peer, Sample, View},
};
use crate::{
    config::{Config, WlmConfig},
    coord::{CoordError, CoordStore, GroupEntry, Load, check_partition},
    datapath::{Datapath, DatapathError},
    plan::{Group, Plan},
};

/// Owner name of a group nobody owns (on-demand services, failed instances).
pub const UNOWNED: &str = "";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("service `{service}` has no instance `{instance}`")]
    UnknownInstance { service: String, instance: String },
    #[error("no service `{service}`")]
    UnknownService { service: String },
}

/// What a claim for a punted frame's unit came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The unit's owner, by instance id.
    Owner(u32),
    /// Nobody to give it to (every instance drained or failed, or its
    /// owner failed and its failover is pending).
    NoOwner,
    /// The store failed before the unit was resolved.
    Failed,
}

/// One move, as it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveEvent {
    pub at: Instant,
    pub service: String,
    /// `split`, `give`, `reclaim`, `merge` (bookkeeping only), `drain` or
    /// `manual`.
    pub kind: &'static str,
    /// The group whose traffic changed owner (none for a bookkeeping merge).
    pub group: Option<Group>,
    pub from: String,
    pub to: String,
}

struct InstCtl {
    name: String,
    id: u32,
    /// Host-side veth: the instance has failed when it disappears.
    ifindex: u32,
    /// As configured: its cgroup, CPU limit and health source, and how to
    /// find its veth and MAC again after a failure.
    config: crate::config::Instance,
    /// A failed instance found back (veth there, reports coming): since
    /// when, for the hold-down.
    recovering_since: Option<Instant>,
    netns: Option<PathBuf>,
    packets: Rate,
    bytes: Rate,
    drops: Rate,
    cpu: Rate,
    state: ElementState,
    sample: Sample,
    inputs: Inputs,
}

/// An instance on another host: a peer of this host's elements, measured
/// by its own host (the load it publishes in the store).
#[derive(Clone, Debug)]
struct RemoteCtl {
    name: String,
    id: u32,
    host: String,
    /// Its host holds its lease.
    live: bool,
    sample: Sample,
}

struct ServiceCtl {
    name: String,
    id: u32,
    cfg: WlmConfig,
    /// What counts as overloaded: `cfg`'s thresholds, or with the SLA
    /// window's overload the agent set ([`Controller::set_overload`]).
    thresholds: Thresholds,
    ports: Vec<u16>,
    hits: Vec<Rate>,
    buckets: Vec<f64>,
    instances: Vec<InstCtl>,
    /// The same service's instances on other hosts (a cluster's).
    remote: Vec<RemoteCtl>,
    /// SLA origin rules, in config order.
    origins: Vec<origin::RuleCtl>,
}

impl ServiceCtl {
    /// Counts a move of `group` from `from` to `to` in `samples` (one per
    /// instance, local ones first, then remote ones), as the next
    /// measurement will show it.
    fn account(&self, samples: &mut [Sample], group: Group, from: &str, to: &str) {
        let pps = wlm::group_rate(group, &self.buckets);
        for (sample, name) in samples.iter_mut().zip(self.names()) {
            if name == from {
                *sample = sample.shifted(-pps, self.cfg.capacity_pps);
            } else if name == to {
                *sample = sample.shifted(pps, self.cfg.capacity_pps);
            }
        }
    }

    /// The peers local instance `ii`'s element weighs itself against:
    /// the other local instances not `out` (drained, failed) and the live
    /// remote ones, each with its sample in `samples` (local ones first).
    fn peers(&self, ii: usize, samples: &[Sample], out: impl Fn(&str) -> bool) -> Vec<Peer> {
        let local = self.instances.len();
        self.instances
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != ii && !out(&p.name))
            .map(|(j, p)| Peer {
                name: p.name.clone(),
                sample: samples[j],
                ceiling_pps: p.state.ceiling_pps(),
            })
            // Other hosts' instances, as their hosts measure them.
            .chain(
                self.remote
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.live)
                    .map(|(j, r)| Peer {
                        name: r.name.clone(),
                        sample: samples[local + j],
                        ceiling_pps: None,
                    }),
            )
            .collect()
    }

    /// Every instance's name: local ones, then remote ones.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.instances
            .iter()
            .map(|i| i.name.as_str())
            .chain(self.remote.iter().map(|r| r.name.as_str()))
    }

    /// The data path id of instance `name`, local or remote.
    fn id_of(&self, name: &str) -> Option<u32> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.id)
            .or_else(|| self.remote.iter().find(|r| r.name == name).map(|r| r.id))
    }
}

/// What `status` shows of an instance on another host: its host's view.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteStatus {
    pub service: String,
    pub name: String,
    pub host: String,
    /// Its host holds its lease.
    pub live: bool,
    /// As its host published it.
    pub sample: Sample,
}

/// What `status` shows of an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceStatus {
    pub service: String,
    pub name: String,
    pub sample: Sample,
    pub inputs: Inputs,
    pub groups: Vec<Group>,
    pub ceiling_pps: Option<f64>,
}

pub struct Controller {
    store: Arc<dyn CoordStore>,
    services: Vec<ServiceCtl>,
    limiter: MoveLimiter,
    /// Application QoS reports, filled by the local API.
    pub reports: Arc<Mutex<Reports>>,
    interval: Duration,
    /// How long a failed instance must look healthy again before it is
    /// taken back.
    hold_down: Duration,
    history: Vec<MoveEvent>,
    /// Instances being drained: they give their groups away, one move at a
    /// time within the move limit, and take none.
    drained: std::collections::HashSet<String>,
    /// Instances in an http service's priority subset: like drained ones,
    /// they own no units (they take only the requests their rules send).
    reserved: std::collections::HashSet<String>,
    /// Instances found failed (their veth is gone): out of the data path,
    /// their groups unowned, claimed again by the survivors.
    failed: std::collections::HashSet<String>,
    /// Failed instances not yet wholly out (a write failed half-way): taken
    /// out again each interval until it all lands.
    failing: std::collections::HashSet<String>,
    /// What the host says of instances (veths, namespaces, cgroups).
    probe: Box<dyn Probe>,
    /// A data path write failed: the data path may disagree with the store
    /// until every group is written again (next interval).
    resync: bool,
    /// Whose turn it is among equally loaded claimants.
    claim_turn: usize,
    /// When this controller started (reports get a grace period).
    started: Instant,
}

/// What [`Controller::settle`] decided for each service, to be stored by
/// [`Controller::commit`].
pub struct Settled {
    steps: Vec<(String, StoreStep)>,
}

/// How a service's starting assignment gets into the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreStep {
    /// The store's, as it is.
    Resume(Vec<(Group, String)>),
    /// The store has none: this one.
    Init(Vec<(Group, String)>),
    /// The store's no longer fits: this one replaces it, for the reason
    /// given.
    Reset(Vec<(Group, String)>, String),
}

impl StoreStep {
    /// The assignment the service starts with.
    #[must_use]
    pub fn groups(&self) -> &[(Group, String)] {
        match self {
            Self::Resume(g) | Self::Init(g) | Self::Reset(g, _) => g,
        }
    }
}

/// Settles one service's starting assignment from what the store holds
/// (`None`: nothing), the configured instance names and the plan's
/// assignment (`wanted`). A stored assignment is kept as far as it can be:
/// only the groups of instances no longer configured change hands — round
/// robin over the configured ones, or unowned (claimed by the next packet)
/// for an on-demand service — so every other flow stays where it is.
#[must_use]
pub fn settle_service(
    stored: Option<&[GroupEntry]>,
    configured: &[&str],
    wanted: Vec<(Group, String)>,
    on_demand: bool,
) -> StoreStep {
    let Some(stored) = stored else {
        return StoreStep::Init(wanted);
    };
    if let Err(why) = check_partition(stored.iter().map(|e| &e.group)) {
        return StoreStep::Reset(
            wanted,
            format!("the stored groups are not a partition: {why}"),
        );
    }
    let known = |o: &str| o == UNOWNED || configured.contains(&o);
    if stored.iter().all(|e| known(&e.owner)) {
        return StoreStep::Resume(stored.iter().map(|e| (e.group, e.owner.clone())).collect());
    }
    let mut gone: Vec<&str> = stored
        .iter()
        .filter(|e| !known(&e.owner))
        .map(|e| e.owner.as_str())
        .collect();
    gone.dedup();
    let mut next = configured.iter().cycle();
    let groups = stored
        .iter()
        .map(|e| {
            let owner = if known(&e.owner) {
                e.owner.clone()
            } else if on_demand {
                UNOWNED.to_owned()
            } else {
                (*next.next().unwrap_or(&UNOWNED)).to_owned()
            };
            (e.group, owner)
        })
        .collect();
    StoreStep::Reset(
        groups,
        format!(
            "it names instances no longer configured ({}); their groups go to the others",
            gone.join(", ")
        ),
    )
}

/// Most move events kept for `history`.
const HISTORY: usize = 4096;

impl Controller {
    /// Builds the controller and settles the starting assignment (see
    /// [`Self::settle`]), storing it at once.
    pub async fn new(
        config: &Config,
        plan: &mut Plan,
        store: Arc<dyn CoordStore>,
    ) -> Result<Self, ControlError> {
        let settled = Self::settle(config, plan, &*store).await?;
        Self::commit(settled, config, plan, store).await
    }

    /// Decides the starting assignment of every service without writing
    /// anything: the store's, if it has one that partitions the units (a
    /// restarted agent resumes it; groups of instances no longer configured
    /// go to the others, or unowned for on-demand services), else the
    /// plan's (even, or what the pinned data path held). `plan`'s groups
    /// are replaced by it, so the data path is programmed with it.
    pub async fn settle(
        config: &Config,
        plan: &mut Plan,
        store: &dyn CoordStore,
    ) -> Result<Settled, ControlError> {
        let mut steps = Vec::with_capacity(plan.services.len());
        for (sp, sc) in plan.services.iter_mut().zip(&config.services) {
            // An unowned group has the empty owner name.
            let mut names: HashMap<u32, &str> = plan
                .instances
                .iter()
                .filter(|i| i.service_id == sp.id)
                .map(|i| (i.id, i.name.as_str()))
                .collect();
            // A cluster's other hosts' instances own groups too.
            names.extend(
                plan.remote
                    .iter()
                    .filter(|r| r.service_id == sp.id)
                    .map(|r| (r.id, r.name.as_str())),
            );
            names.insert(NO_OWNER, UNOWNED);
            let ids: HashMap<&str, u32> = names.iter().map(|(id, n)| (*n, *id)).collect();
            let configured: Vec<&str> = sc
                .instances
                .iter()
                .map(|i| i.name.as_str())
                .chain(
                    plan.remote
                        .iter()
                        .filter(|r| r.service_id == sp.id)
                        .map(|r| r.name.as_str()),
                )
                .collect();
            let wanted: Vec<(Group, String)> = sp
                .groups
                .iter()
                .map(|(g, o)| (*g, names[o].to_owned()))
                .collect();
            let stored = match store.groups(&sp.name).await {
                Ok(stored) => Some(stored),
                Err(CoordError::UnknownService { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let step = settle_service(stored.as_deref(), &configured, wanted, sc.on_demand);
            match &step {
                StoreStep::Resume(_) => {
                    tracing::info!(service = %sp.name, "resuming the stored assignment");
                }
                StoreStep::Init(_) if sp.groups_from_pins => {
                    tracing::warn!(service = %sp.name, "no stored assignment: rebuilt from the owners the pinned data path holds");
                }
                StoreStep::Init(_) => {}
                StoreStep::Reset(_, why) => {
                    tracing::warn!(service = %sp.name, reason = %why, "the stored assignment is replaced");
                }
            }
            sp.groups = step
                .groups()
                .iter()
                .map(|(g, o)| (*g, ids[o.as_str()]))
                .collect();
            steps.push((sp.name.clone(), step));
        }
        Ok(Settled { steps })
    }

    /// Stores what [`Self::settle`] decided and builds the controller. If a
    /// write fails, the services already written get their previous
    /// assignment back, and the error is returned.
    pub async fn commit(
        settled: Settled,
        config: &Config,
        plan: &Plan,
        store: Arc<dyn CoordStore>,
    ) -> Result<Self, ControlError> {
        let mut undo: Vec<(String, Vec<(Group, String)>)> = Vec::new();
        for (service, step) in &settled.steps {
            let written = match step {
                StoreStep::Resume(_) => Ok(()),
                StoreStep::Init(groups) => store.init(service, groups).await.map(|_| ()),
                StoreStep::Reset(groups, _) => {
                    let before = store.groups(service).await?;
                    let r = store.reset(service, groups).await;
                    if r.is_ok() {
                        undo.push((
                            service.clone(),
                            before.into_iter().map(|e| (e.group, e.owner)).collect(),
                        ));
                    }
                    r
                }
            };
            if let Err(e) = written {
                for (s, groups) in &undo {
                    if let Err(e) = store.reset(s, groups).await {
                        tracing::error!(service = %s, error = %e, "restoring the previous assignment failed");
                    }
                }
                return Err(e.into());
            }
        }
        Ok(Self::build(config, plan, store))
    }

    fn build(config: &Config, plan: &Plan, store: Arc<dyn CoordStore>) -> Self {
        let services = plan
            .services
            .iter()
            .zip(&config.services)
            .map(|(sp, sc)| ServiceCtl {
                name: sp.name.clone(),
                id: sp.id,
                cfg: sc.wlm.clone(),
                thresholds: Thresholds::from(&sc.wlm),
                ports: sc.ports.clone(),
                hits: vec![Rate::default(); HIT_BUCKETS_PER_SERVICE as usize],
                buckets: vec![0.0; HIT_BUCKETS_PER_SERVICE as usize],
                instances: plan
                    .instances
                    .iter()
                    .filter(|i| i.service_id == sp.id)
                    .zip(&sc.instances)
                    .map(|(ip, ic)| InstCtl {
                        name: ip.name.clone(),
                        id: ip.id,
                        ifindex: ip.ifindex,
                        config: ic.clone(),
                        netns: ip.netns.clone(),
                        packets: Rate::default(),
                        bytes: Rate::default(),
                        drops: Rate::default(),
                        cpu: Rate::default(),
                        state: ElementState::default(),
                        sample: Sample::default(),
                        inputs: Inputs::default(),
                        recovering_since: None,
                    })
                    .collect(),
                remote: Vec::new(),
                origins: origin::rules(plan, sp.id),
            })
            .collect();
        let mut ctl = Self {
            store,
            services,
            limiter: MoveLimiter::new(config.agent.max_moves_per_sec, Instant::now()),
            reports: Arc::new(Mutex::new(Reports::default())),
            interval: config.agent.interval,
            hold_down: config.agent.recovery_hold_down,
            history: Vec::new(),
            drained: std::collections::HashSet::new(),
            reserved: config
                .services
                .iter()
                .flat_map(|s| s.instances.iter().filter(|i| s.is_reserved(&i.name)))
                .map(|i| i.name.clone())
                .collect(),
            failed: std::collections::HashSet::new(),
            failing: std::collections::HashSet::new(),
            probe: Box::new(HostProbe::new()),
            resync: false,
            claim_turn: 0,
            started: Instant::now(),
        };
        // Other hosts' instances as the start saw them: live, no load yet.
        let hosts = plan.remote.iter().map(|r| r.host.clone()).collect();
        ctl.set_remote(&plan.remote, &hosts, &HashMap::new());
        ctl
    }

    /// Takes over what the running controller `old` knows and a reload
    /// must not lose: drained and failed instances (those still
    /// configured), each element's measurements and cooldowns, the move
    /// history and limit, and the application reports.
    pub fn carry_over(&mut self, old: Self) {
        let configured = |name: &String| {
            self.services
                .iter()
                .any(|s| s.instances.iter().any(|i| &i.name == name))
        };
        let drained = old.drained.into_iter().filter(configured).collect();
        let failed = old.failed.into_iter().filter(configured).collect();
        let failing = old.failing.into_iter().filter(configured).collect();
        self.drained = drained;
        self.failed = failed;
        self.failing = failing;
        let remote_before: HashMap<String, Vec<RemoteCtl>> = old
            .services
            .iter()
            .map(|s| (s.name.clone(), s.remote.clone()))
            .collect();
        for s in &mut self.services {
            if let Some(old) = remote_before.get(&s.name) {
                for r in &mut s.remote {
                    if let Some(o) = old.iter().find(|o| o.name == r.name) {
                        r.live = o.live;
                        r.sample = o.sample;
                    }
                }
            }
        }
        let mut before: HashMap<(String, String), InstCtl> = old
            .services
            .into_iter()
            .flat_map(|s| {
                let name = s.name;
                s.instances
                    .into_iter()
                    .map(move |i| ((name.clone(), i.name.clone()), i))
            })
            .collect();
        for s in &mut self.services {
            for i in &mut s.instances {
                if let Some(o) = before.remove(&(s.name.clone(), i.name.clone())) {
                    i.packets = o.packets;
                    i.bytes = o.bytes;
                    i.drops = o.drops;
                    i.cpu = o.cpu;
                    i.state = o.state;
                    i.sample = o.sample;
                    i.inputs = o.inputs;
                    i.recovering_since = o.recovering_since;
                }
            }
        }
        self.reports = old.reports;
        self.history = old.history;
        self.limiter = old.limiter;
        self.started = old.started;
        self.claim_turn = old.claim_turn;
        self.probe = old.probe;
    }

    /// Reads the host through `probe` (unit tests hand in their own).
    #[must_use]
    pub fn with_probe(mut self, probe: Box<dyn Probe>) -> Self {
        self.probe = probe;
        self
    }

    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Every move so far (the last few thousand).
    #[must_use]
    pub fn history(&self) -> &[MoveEvent] {
        &self.history
    }

    fn record(&mut self, e: MoveEvent) {
        crate::telemetry::moved(&e.service, e.kind);
        tracing::info!(service = %e.service, kind = e.kind, group = ?e.group.map(|g| g.to_string()), from = %e.from, to = %e.to, "move");
        if self.history.len() == HISTORY {
            self.history.remove(0);
        }
        self.history.push(e);
    }

    /// Measures every instance over the interval that just ended.
    async fn measure(
        &mut self,
        dp: &dyn Datapath,
        reports: &HashMap<String, Report>,
        now: Instant,
    ) -> Result<(), ControlError> {
        let mut loads = Vec::new();
        for s in &mut self.services {
            let hits = dp.unit_hits(s.id)?;
            for ((rate, h), b) in s.hits.iter_mut().zip(hits).zip(s.buckets.iter_mut()) {
                *b = rate.update(h, now);
            }
            // In a cluster, this host sees only what it delivers: the other
            // hosts' deliveries complete the service's per-unit rates.
            self.store.publish_hits(&s.name, &s.buckets).await?;
            if let Some(others) = self.store.others_hits(&s.name).await? {
                for (b, o) in s.buckets.iter_mut().zip(others) {
                    *b += o;
                }
            }
            for i in &mut s.instances {
                let c = dp.instance_counters(i.id)?;
                let mut inputs = Inputs {
                    rate_pps: i.packets.update(c.packets, now),
                    bytes_ps: i.bytes.update(c.bytes, now),
                    report: reports.get(&i.name).cloned(),
                    cpu_limit: i.config.cpu_limit,
                    ..Inputs::default()
                };
                if let Some(ns) = &i.netns {
                    match self.probe.netns_stats(ns, &s.ports) {
                        Ok(st) => {
                            inputs.drops_ps = i.drops.update(st.rcvbuf_errors, now);
                            #[expect(clippy::cast_precision_loss, reason = "an estimate")]
                            let q = st.queue_bytes as f64;
                            inputs.queue_bytes = q;
                        }
                        Err(e) => {
                            tracing::debug!(instance = %i.name, error = %e, "netns stats unavailable");
                        }
                    }
                }
                if let Some(cg) = &i.config.cgroup {
                    match self.probe.cgroup_usage_usec(cg) {
                        Ok(usec) => inputs.cpu_cores = Some(i.cpu.update(usec, now) / 1e6),
                        Err(e) => {
                            tracing::debug!(instance = %i.name, error = %e, "cgroup CPU unavailable");
                        }
                    }
                }
                i.sample = Sample {
                    rate_pps: inputs.rate_pps,
                    drops_ps: inputs.drops_ps,
                    utilisation: qos::utilisation(&inputs, &s.cfg),
                };
                i.inputs = inputs;
                loads.push((
                    i.name.clone(),
                    Load {
                        utilisation: i.sample.utilisation,
                        rate_pps: i.sample.rate_pps,
                    },
                ));
            }
        }
        for (name, load) in loads {
            self.store.publish_load(&name, load).await?;
        }
        Ok(())
    }

    /// How long an application report counts: three intervals. Older ones
    /// are ignored, and an instance with `health = "reports"` whose last
    /// report is older has failed.
    fn report_life(&self) -> Duration {
        self.interval * 3
    }

    /// Every instance's fresh report (see [`Self::report_life`]), taken out
    /// from under the API's lock at once.
    fn fresh_reports(&self, now: Instant) -> HashMap<String, Report> {
        let max_age = self.report_life();
        let reports = self.reports.lock().expect("reports lock");
        self.services
            .iter()
            .flat_map(|s| &s.instances)
            .filter_map(|i| Some((i.name.clone(), reports.fresh(&i.name, now, max_age)?)))
            .collect()
    }

    /// Sets service `service`'s overload threshold (an SLA window's); the
    /// service's own comes back with the next reload. Returns whether it
    /// changed.
    pub fn set_overload(&mut self, service: &str, overload: f64) -> bool {
        match self.services.iter_mut().find(|s| s.name == service) {
            #[expect(clippy::float_cmp, reason = "set from the same config values")]
            Some(s) if s.thresholds.overload() != overload => {
                s.thresholds = s.thresholds.with_overload(overload);
                true
            }
            _ => false,
        }
    }

    /// Marks `instance` drained (it gives all its groups away and takes
    /// none) or not.
    pub fn set_drained(&mut self, instance: &str, drained: bool) -> Result<(), ControlError> {
        if !self
            .services
            .iter()
            .any(|s| s.instances.iter().any(|i| i.name == instance))
        {
            return Err(ControlError::UnknownInstance {
                service: "*".into(),
                instance: instance.to_owned(),
            });
        }
        if drained {
            self.drained.insert(instance.to_owned());
        } else {
            self.drained.remove(instance);
        }
        Ok(())
    }

    #[must_use]
    pub fn is_drained(&self, instance: &str) -> bool {
        self.drained.contains(instance)
    }

    /// Finds instances whose veth is gone (or came back with another
    /// ifindex: a new container), or whose application stopped reporting
    /// (`health = "reports"`). Each is taken out of the data path at once
    /// (its packets are punted, its pinned flows no longer hold) and its
    /// groups become unowned in the store, to be claimed by the survivors
    /// as their packets arrive.
    async fn fail_step(
        &mut self,
        dp: &mut dyn Datapath,
        reporting: &HashMap<String, Report>,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let mut made = Vec::new();
        let grace_over = now.saturating_duration_since(self.started) > self.report_life();
        let gone: Vec<String> = self
            .services
            .iter()
            .flat_map(|s| &s.instances)
            .filter(|i| {
                !self.failed.contains(&i.name)
                    && (!self.probe.link_exists(i.ifindex)
                        || (i.config.health_reports
                            && grace_over
                            && !reporting.contains_key(&i.name)))
            })
            .map(|i| i.name.clone())
            .collect();
        for name in gone {
            tracing::warn!(instance = %name, "instance failed (veth gone or reports stopped); its groups are unowned until claimed");
            // Failed at once: no claim gives it work from here on.
            self.failed.insert(name.clone());
            self.failing.insert(name);
        }
        let mut failing: Vec<String> = self.failing.iter().cloned().collect();
        failing.sort();
        for name in failing {
            let (si, id) = self
                .services
                .iter()
                .enumerate()
                .find_map(|(si, s)| {
                    s.instances
                        .iter()
                        .find(|i| i.name == name)
                        .map(|i| (si, i.id))
                })
                .expect("a configured instance");
            dp.set_instance_live(id, false)?;
            let service = self.services[si].name.clone();
            for e in self
                .store
                .groups(&service)
                .await?
                .into_iter()
                .filter(|e| e.owner == name)
            {
                self.store
                    .move_group(&service, e.group, e.version, UNOWNED)
                    .await?;
                self.write(dp, si, e.group, UNOWNED)?;
                let ev = MoveEvent {
                    at: now,
                    service: service.clone(),
                    kind: "failover",
                    group: Some(e.group),
                    from: name.clone(),
                    to: UNOWNED.to_owned(),
                };
                self.record(ev.clone());
                made.push(ev);
            }
            self.failing.remove(&name);
        }
        Ok(made)
    }

    /// Takes failed instances back: one is back when its veth resolves
    /// again (the interface may be a new one, with a new ifindex and MAC:
    /// the data path is pointed at it) and, with `health = "reports"`, its
    /// reports are fresh — continuously for the hold-down. It then takes
    /// work the way any element does.
    fn recover_step(
        &mut self,
        dp: &mut dyn Datapath,
        reporting: &HashMap<String, Report>,
        now: Instant,
    ) -> Result<(), ControlError> {
        for s in &mut self.services {
            for i in &mut s.instances {
                if !self.failed.contains(&i.name) || self.failing.contains(&i.name) {
                    continue;
                }
                let back = self
                    .probe
                    .resolve(&i.config)
                    .filter(|_| !i.config.health_reports || reporting.contains_key(&i.name));
                let Some(r) = back else {
                    i.recovering_since = None;
                    continue;
                };
                let since = *i.recovering_since.get_or_insert(now);
                if now.saturating_duration_since(since) < self.hold_down {
                    continue;
                }
                dp.set_instance_target(i.id, r.ifindex, r.mac)?;
                dp.set_instance_live(i.id, true)?;
                i.ifindex = r.ifindex;
                if r.netns.is_some() {
                    i.netns = r.netns;
                }
                i.recovering_since = None;
                i.state = ElementState::default();
                self.failed.remove(&i.name);
                tracing::info!(instance = %i.name, ifindex = r.ifindex, hold_down = ?self.hold_down, "instance recovered; it takes work as its element decides");
            }
        }
        Ok(())
    }

    /// The cluster as this host last read it: the other hosts' instances
    /// (`remote`, for every service), which hosts are live, and every
    /// instance's published load. Instances registered since the start
    /// join; an instance whose host is not live is failed, and this host's
    /// elements take its groups ([`Self::remote_fail_step`]).
    pub fn set_remote(
        &mut self,
        remote: &[crate::plan::RemotePlan],
        live_hosts: &std::collections::HashSet<String>,
        loads: &HashMap<String, Load>,
    ) {
        for s in &mut self.services {
            let list: Vec<RemoteCtl> = remote
                .iter()
                .filter(|r| r.service_id == s.id)
                .map(|r| {
                    let sample = loads.get(&r.name).map_or(Sample::default(), |l| Sample {
                        rate_pps: l.rate_pps,
                        drops_ps: 0.0,
                        utilisation: l.utilisation,
                    });
                    RemoteCtl {
                        name: r.name.clone(),
                        id: r.id,
                        host: r.host.clone(),
                        live: live_hosts.contains(&r.host),
                        sample,
                    }
                })
                .collect();
            s.remote = list;
        }
    }

    /// Groups owned by instances of hosts that are gone (their lease
    /// expired) go to this host's least utilised live instance. Every live
    /// host tries; the store's compare-and-swap lets one win each group,
    /// and the elements spread the load again from there.
    async fn remote_fail_step(
        &mut self,
        dp: &mut dyn Datapath,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let mut made = Vec::new();
        for si in 0..self.services.len() {
            let svc = &self.services[si];
            let dead: Vec<&str> = svc
                .remote
                .iter()
                .filter(|r| !r.live)
                .map(|r| r.name.as_str())
                .collect();
            if dead.is_empty() {
                continue;
            }
            let Some(to) = svc
                .instances
                .iter()
                .filter(|i| !self.out(&i.name))
                .min_by(|a, b| a.sample.utilisation.total_cmp(&b.sample.utilisation))
                .map(|i| i.name.clone())
            else {
                continue;
            };
            let name = svc.name.clone();
            let orphans: Vec<GroupEntry> = self
                .store
                .groups(&name)
                .await?
                .into_iter()
                .filter(|e| dead.contains(&e.owner.as_str()))
                .collect();
            for e in orphans {
                match self.store.move_group(&name, e.group, e.version, &to).await {
                    Ok(_) => {}
                    // Another host took it first.
                    Err(CoordError::Conflict { .. }) => continue,
                    Err(err) => return Err(err.into()),
                }
                self.write(dp, si, e.group, &to)?;
                let ev = MoveEvent {
                    at: now,
                    service: name.clone(),
                    kind: "failover",
                    group: Some(e.group),
                    from: e.owner,
                    to: to.clone(),
                };
                self.record(ev.clone());
                made.push(ev);
            }
        }
        Ok(made)
    }

    /// Every service's instances on other hosts.
    #[must_use]
    pub fn remote_status(&self) -> Vec<RemoteStatus> {
        self.services
            .iter()
            .flat_map(|s| {
                s.remote.iter().map(|r| RemoteStatus {
                    service: s.name.clone(),
                    name: r.name.clone(),
                    host: r.host.clone(),
                    live: r.live,
                    sample: r.sample,
                })
            })
            .collect()
    }

    #[must_use]
    pub fn is_failed(&self, instance: &str) -> bool {
        self.failed.contains(instance)
    }

    /// Whether `instance` may own no units: drained, failed or reserved.
    fn out(&self, instance: &str) -> bool {
        self.drained.contains(instance)
            || self.failed.contains(instance)
            || self.reserved.contains(instance)
    }

    /// One move of each drained instance that still owns groups, within the
    /// move limit: its largest group goes to the least-utilised peer that is
    /// not drained.
    async fn drain_step(
        &mut self,
        dp: &mut dyn Datapath,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let mut made = Vec::new();
        for si in 0..self.services.len() {
            let name = self.services[si].name.clone();
            let assignment = self.store.groups(&name).await?;
            let draining: Vec<String> = self.services[si]
                .instances
                .iter()
                .filter(|i| self.drained.contains(&i.name) || self.reserved.contains(&i.name))
                .map(|i| i.name.clone())
                .collect();
            for d in draining {
                let Some(e) = assignment
                    .iter()
                    .filter(|e| e.owner == d)
                    .max_by_key(|e| e.group.size())
                else {
                    continue;
                };
                let svc = &self.services[si];
                let Some(to) = svc
                    .instances
                    .iter()
                    .filter(|i| !self.out(&i.name))
                    .map(|i| (i.sample.utilisation, &i.name))
                    .chain(
                        svc.remote
                            .iter()
                            .filter(|r| r.live)
                            .map(|r| (r.sample.utilisation, &r.name)),
                    )
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| n.clone())
                else {
                    continue;
                };
                if !self.limiter.try_take(now) {
                    return Ok(made);
                }
                made.extend(self.move_group_as(dp, &name, e.group, &to, "drain").await?);
            }
        }
        Ok(made)
    }

    /// One interval: measure, move drained instances' groups, then let
    /// every element decide. Returns the moves made.
    pub async fn tick(
        &mut self,
        dp: &mut dyn Datapath,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        if self.resync {
            self.resync(dp).await?;
        }
        let reports = self.fresh_reports(now);
        self.measure(dp, &reports, now).await?;
        let mut made = self.fail_step(dp, &reports, now).await?;
        made.extend(self.remote_fail_step(dp, now).await?);
        self.recover_step(dp, &reports, now)?;
        self.origin_step(dp)?;
        made.extend(self.drain_step(dp, now).await?);
        for si in 0..self.services.len() {
            // Most loaded elements act first.
            let mut order: Vec<usize> = (0..self.services[si].instances.len()).collect();
            order.sort_by(|&a, &b| {
                let s = &self.services[si].instances;
                s[b].sample.utilisation.total_cmp(&s[a].sample.utilisation)
            });
            // The samples as later elements of this interval see them: a
            // move made earlier in the interval is counted at once, so two
            // elements do not both act on the same imbalance.
            let mut samples: Vec<Sample> = self.services[si]
                .instances
                .iter()
                .map(|i| i.sample)
                .chain(self.services[si].remote.iter().map(|r| r.sample))
                .collect();
            for ii in order {
                let svc = &self.services[si];
                if self.out(&svc.instances[ii].name) {
                    continue;
                }
                let assignment = self.store.groups(&svc.name).await?;
                let peers = svc.peers(ii, &samples, |n| self.out(n));
                let me = &svc.instances[ii];
                let view = View {
                    me: &me.name,
                    cfg: &svc.cfg,
                    thresholds: svc.thresholds,
                    now,
                    sample: samples[ii],
                    assignment: &assignment,
                    buckets: &svc.buckets,
                    peers: &peers,
                };
                let mut state = me.state.clone();
                let action = wlm::decide(&mut state, &view);
                self.services[si].instances[ii].state = state;
                let Some(action) = action else { continue };
                if !matches!(action, Action::Coalesce { .. }) && !self.limiter.try_take(now) {
                    continue;
                }
                let (name, me_name) = (
                    self.services[si].name.clone(),
                    self.services[si].instances[ii].name.clone(),
                );
                match wlm::apply(&*self.store, &name, &me_name, &action).await {
                    Ok(applied) => {
                        if let Some((g, from, to)) = &applied.moved {
                            self.services[si].account(&mut samples, *g, from, to);
                            self.write(dp, si, *g, to)?;
                            self.services[si].instances[ii].state.moved(now);
                            let e = MoveEvent {
                                at: now,
                                service: name,
                                kind: applied.kind,
                                group: Some(*g),
                                from: from.clone(),
                                to: to.clone(),
                            };
                            made.push(e.clone());
                            self.record(e);
                        } else {
                            self.record(MoveEvent {
                                at: now,
                                service: name,
                                kind: applied.kind,
                                group: None,
                                from: me_name.clone(),
                                to: me_name,
                            });
                        }
                    }
                    Err(CoordError::Conflict { .. }) => {
                        tracing::debug!(service = %name, ?action, "lost a race; deciding again next interval");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(made)
    }

    /// Points `group` of service index `si` at instance `to` in the data
    /// path. A failed write leaves the data path behind the store: every
    /// group is written again at the next interval.
    fn write(
        &mut self,
        dp: &mut dyn Datapath,
        si: usize,
        group: Group,
        to: &str,
    ) -> Result<(), ControlError> {
        let svc = &self.services[si];
        let id = if to == UNOWNED {
            NO_OWNER
        } else {
            svc.id_of(to).ok_or_else(|| ControlError::UnknownInstance {
                service: svc.name.clone(),
                instance: to.to_owned(),
            })?
        };
        if let Err(e) = dp.set_group_owner(svc.id, group, id) {
            tracing::warn!(service = %svc.name, group = %group, error = %e, "data path write failed; the next interval writes every group again");
            self.resync = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Every group of every service written into `dp` again from the store.
    pub async fn resync_now(&mut self, dp: &mut dyn Datapath) -> Result<(), ControlError> {
        self.resync(dp).await
    }

    /// Another writer changed the store (`service`'s assignment, or, with
    /// `None`, maybe anything): the data path follows. If that fails, the
    /// next interval writes every group again.
    pub async fn follow(
        &mut self,
        dp: &mut dyn Datapath,
        service: Option<&str>,
    ) -> Result<(), ControlError> {
        let r = match service {
            None => self.resync(dp).await,
            Some(name) => match self.services.iter().position(|s| s.name == name) {
                Some(si) => self.rewrite(dp, si).await,
                // Not one of ours (another cluster's service shares etcd).
                None => Ok(()),
            },
        };
        if r.is_err() {
            self.resync = true;
        }
        r
    }

    /// Service index `si`'s groups written into `dp` again from the store.
    /// An owner this host does not know yet (an instance another host
    /// registered since this one last read the cluster) is reported after
    /// the rest is written.
    async fn rewrite(&mut self, dp: &mut dyn Datapath, si: usize) -> Result<(), ControlError> {
        let name = self.services[si].name.clone();
        let mut unknown = None;
        for e in self.store.groups(&name).await? {
            match self.write(dp, si, e.group, &e.owner) {
                Ok(()) => {}
                Err(err @ ControlError::UnknownInstance { .. }) => unknown = Some(err),
                Err(err) => return Err(err),
            }
        }
        unknown.map_or(Ok(()), Err)
    }

    /// After a failed write: every group of every service written again
    /// from the store, so the data path converges to it.
    async fn resync(&mut self, dp: &mut dyn Datapath) -> Result<(), ControlError> {
        let mut unknown = None;
        for si in 0..self.services.len() {
            match self.rewrite(dp, si).await {
                Ok(()) => {}
                // Its groups wait for the next look at the cluster.
                Err(err @ ControlError::UnknownInstance { .. }) => unknown = Some(err),
                Err(err) => return Err(err),
            }
        }
        if let Some(err) = unknown {
            self.resync = true;
            return Err(err);
        }
        self.resync = false;
        tracing::debug!("data path written again from the store");
        Ok(())
    }

    /// Gives every unit of `group` of `service` to instance `to`, through
    /// the store and then the data path, as the elements do: a larger group
    /// holding it is split down to it first; smaller groups inside it move
    /// one by one.
    pub async fn move_group(
        &mut self,
        dp: &mut dyn Datapath,
        service: &str,
        group: Group,
        to: &str,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        self.move_group_as(dp, service, group, to, "manual").await
    }

    async fn move_group_as(
        &mut self,
        dp: &mut dyn Datapath,
        service: &str,
        group: Group,
        to: &str,
        kind: &'static str,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let si = self.instance_of(service, to)?;
        loop {
            let e: GroupEntry = self
                .store
                .groups(service)
                .await?
                .into_iter()
                .find(|e| e.group.contains(group.base()))
                .expect("the groups partition the units");
            if e.group.size() <= group.size() {
                break;
            }
            self.store.split(service, e.group, e.version).await?;
        }
        let inside: Vec<GroupEntry> = self
            .store
            .groups(service)
            .await?
            .into_iter()
            .filter(|e| group.contains(e.group.base()) && e.owner != to)
            .collect();
        let mut events = Vec::with_capacity(inside.len());
        for e in inside {
            self.store
                .move_group(service, e.group, e.version, to)
                .await?;
            self.write(dp, si, e.group, to)?;
            let ev = MoveEvent {
                at: Instant::now(),
                service: service.to_owned(),
                kind,
                group: Some(e.group),
                from: e.owner,
                to: to.to_owned(),
            };
            self.record(ev.clone());
            events.push(ev);
        }
        Ok(events)
    }

    /// Index of `service`, after checking it has instance `instance`.
    fn instance_of(&self, service: &str, instance: &str) -> Result<usize, ControlError> {
        let si = self
            .services
            .iter()
            .position(|s| s.name == service)
            .ok_or_else(|| ControlError::UnknownService {
                service: service.to_owned(),
            })?;
        if self.services[si].id_of(instance).is_none() {
            return Err(ControlError::UnknownInstance {
                service: service.to_owned(),
                instance: instance.to_owned(),
            });
        }
        Ok(si)
    }

    /// The owner of `unit` of service `service_id`, claiming its group for
    /// the least-utilised instance (not drained) if nobody owns it. The
    /// claimed group is the `min_group_units`-sized one holding the unit; a
    /// concurrent claim is settled by the store's compare-and-swap (the
    /// loser takes the winner's answer). Returns the owner's instance id,
    /// or `None` if the service has no instance to give it to.
    pub async fn claim(
        &mut self,
        dp: &mut dyn Datapath,
        service_id: u32,
        unit: u32,
        now: Instant,
    ) -> Result<Option<u32>, ControlError> {
        let Some(si) = self.services.iter().position(|s| s.id == service_id) else {
            return Ok(None);
        };
        let name = self.services[si].name.clone();
        let size = self.services[si].cfg.min_group_units;
        let id_of = |ctl: &Self, owner: &str| {
            ctl.services[si]
                .instances
                .iter()
                .find(|i| i.name == owner)
                .map(|i| i.id)
        };
        loop {
            let e = self.store.group_of(&name, unit).await?;
            if e.owner != UNOWNED {
                // A failed owner's failover is pending (its store write
                // failed): frames for it would go into a dead veth.
                if self.failed.contains(&e.owner) {
                    return Ok(None);
                }
                return Ok(id_of(self, &e.owner));
            }
            if e.group.size() > size {
                match self.store.split(&name, e.group, e.version).await {
                    Ok(_) | Err(CoordError::Conflict { .. }) => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            let equals = self.claim_candidates(si);
            if equals.is_empty() {
                return Ok(None);
            }
            self.claim_turn = self.claim_turn.wrapping_add(1);
            let to = equals[self.claim_turn % equals.len()].clone();
            match self.store.move_group(&name, e.group, e.version, &to).await {
                Ok(_) => {
                    self.write(dp, si, e.group, &to)?;
                    self.record(MoveEvent {
                        at: now,
                        service: name,
                        kind: "claim",
                        group: Some(e.group),
                        from: UNOWNED.to_owned(),
                        to: to.clone(),
                    });
                    return Ok(id_of(self, &to));
                }
                Err(CoordError::Conflict { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Who a claim of service index `si` may go to: the least utilised
    /// instances (to a twentieth), not drained or failed, which take turns
    /// so that a burst of claims spreads evenly.
    fn claim_candidates(&self, si: usize) -> Vec<String> {
        let candidates: Vec<(u64, &str)> = self.services[si]
            .instances
            .iter()
            .filter(|i| !self.out(&i.name))
            .map(|i| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a coarse bucket"
                )]
                let bucket = (i.sample.utilisation.max(0.0) * 20.0) as u64;
                (bucket, i.name.as_str())
            })
            .collect();
        let Some(least) = candidates.iter().map(|c| c.0).min() else {
            return Vec::new();
        };
        candidates
            .iter()
            .filter(|c| c.0 == least)
            .map(|c| c.1.to_owned())
            .collect()
    }

    /// The owners of `units` of service `service_id`, as [`Self::claim`]
    /// gives them, for a batch of punted frames: every unowned unit's
    /// group is claimed in one store write for the whole batch
    /// ([`CoordStore::claim_units`]), then written into the data path.
    /// Returns each unit's outcome, in order, and the first failure (the
    /// store's, which leaves the units it did not reach `Failed`, or a data
    /// path write's, which the next interval repairs from the store).
    pub async fn claim_batch(
        &mut self,
        dp: &mut dyn Datapath,
        service_id: u32,
        units: &[u32],
        now: Instant,
    ) -> (Vec<Claimed>, Option<ControlError>) {
        let Some(si) = self.services.iter().position(|s| s.id == service_id) else {
            return (vec![Claimed::NoOwner; units.len()], None);
        };
        let name = self.services[si].name.clone();
        let size = self.services[si].cfg.min_group_units;
        let equals = self.claim_candidates(si);
        let turn = self.claim_turn.wrapping_add(1);
        let batch = match self
            .store
            .claim_units(&name, units, size, &equals, turn)
            .await
        {
            Ok(b) => b,
            Err(e) => return (vec![Claimed::Failed; units.len()], Some(e.into())),
        };
        self.claim_turn = self.claim_turn.wrapping_add(batch.claimed.len());
        let mut error = batch.error.map(ControlError::from);
        for (group, to) in batch.claimed {
            if let Err(e) = self.write(dp, si, group, &to) {
                error.get_or_insert(e);
            }
            self.record(MoveEvent {
                at: now,
                service: name.clone(),
                kind: "claim",
                group: Some(group),
                from: UNOWNED.to_owned(),
                to,
            });
        }
        let svc = &self.services[si];
        let outcomes = batch
            .owners
            .iter()
            .map(|o| match o {
                None => Claimed::Failed,
                // A failed owner's failover is pending (its store write
                // failed): frames for it would go into a dead veth.
                Some(o) if o == UNOWNED || self.failed.contains(o) => Claimed::NoOwner,
                Some(o) => svc
                    .instances
                    .iter()
                    .find(|i| &i.name == o)
                    .map_or(Claimed::NoOwner, |i| Claimed::Owner(i.id)),
            })
            .collect();
        (outcomes, error)
    }

    /// Every service's assignment, from the store.
    pub async fn assignments(&self) -> Result<Vec<(String, Vec<GroupEntry>)>, ControlError> {
        let mut out = Vec::with_capacity(self.services.len());
        for s in &self.services {
            out.push((s.name.clone(), self.store.groups(&s.name).await?));
        }
        Ok(out)
    }

    /// Current state of every instance.
    pub async fn status(&self) -> Result<Vec<InstanceStatus>, ControlError> {
        let mut out = Vec::new();
        for s in &self.services {
            let groups = self.store.groups(&s.name).await?;
            for i in &s.instances {
                out.push(InstanceStatus {
                    service: s.name.clone(),
                    name: i.name.clone(),
                    sample: i.sample,
                    inputs: i.inputs.clone(),
                    groups: groups
                        .iter()
                        .filter(|e| e.owner == i.name)
                        .map(|e| e.group)
                        .collect(),
                    ceiling_pps: i.state.ceiling_pps(),
                });
            }
        }
        Ok(out)
    }

    /// The owner the store gives `key` of `service` (for tests and tools).
    pub async fn owner_of_key(&self, service: &str, key: u32) -> Result<String, ControlError> {
        let unit = unit_of(key);
        Ok(self
            .store
            .groups(service)
            .await?
            .into_iter()
            .find(|e| e.group.contains(unit))
            .expect("the groups partition the units")
            .owner)
    }
}

#[cfg(test)]
mod tests;
