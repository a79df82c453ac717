//! The agent's control loop: each interval, measure every instance's QoS,
//! publish it, let each instance's WLM element decide, and carry the moves
//! out — in the coordination store first (compare-and-swap), then in the
//! data path.
//!
//! [`Controller`] calls its parts phase by phase from [`Controller::tick`]
//! and hands each what it needs (the data path, the store, the service
//! views); a part that keeps state between intervals owns it:
//!
//! - [`settle`]: a start's or reload's assignment, decided then stored;
//! - [`measure`]: counters to rates, rates to utilisation ([`qos`]);
//! - [`health`]: failed instances, failover and recovery, gone hosts;
//! - [`drain`]: drained and reserved instances giving their groups away;
//! - [`elements`]: every element's decision, applied as it is made;
//! - [`claims`]: punted units nobody owns, and whose turn it is;
//! - [`reconcile`]: the data path kept in step with the store;
//! - [`moves`]: how a move is carried out, and the history of moves;
//! - [`services`]: what the loop knows of each service's instances;
//! - [`wlm`]: the element policy (pure: samples in, a move out);
//! - [`qos`]: the utilisation formula, its sources, application reports;
//! - [`origin`]: SLA origin rules' tiers (pure: subset in, slots out).
//!
//! The loop reaches the data path only through the [`Datapath`] trait and
//! the host only through [`Probe`], so claim, drain, failover and error
//! paths are unit-tested with in-memory fakes. May import `config`,
//! `plan`, `coord`, `datapath` (the trait), `sys` and `telemetry`.

mod active;
mod claims;
mod drain;
mod elements;
pub mod fence;
mod health;
mod measure;
mod moves;
pub mod origin;
pub mod qos;
mod reconcile;
pub mod scale;
mod services;
mod settle;
pub mod wlm;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_common::unit_of;

use self::{
    claims::Claims,
    drain::Drains,
    health::Health,
    moves::{History, Mover},
    qos::{HostProbe, Probe, Report, Reports},
    reconcile::Reconciler,
    services::ServiceCtl,
    wlm::MoveLimiter,
};
pub use self::{
    health::UNKNOWN_OWNER_INTERVALS,
    services::{InstanceStatus, RemoteStatus},
    settle::{Settled, StoreStep, settle_service},
};
pub use crate::coord::InstanceState;
use crate::{
    config::Config,
    coord::{CoordError, CoordStore, GroupEntry, Load},
    datapath::{Datapath, DatapathError},
    plan::{Group, Plan, RemotePlan},
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
    /// The unit's owner is an instance on another (live) host, by its
    /// cluster-wide id: the frame is encapsulated to that host.
    Remote(u32),
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

/// Who may own no units: drained and reserved instances ([`Drains`]) and
/// failed ones ([`Health`]).
#[derive(Clone, Copy)]
struct Out<'a> {
    drains: &'a Drains,
    health: &'a Health,
}

impl<'a> Out<'a> {
    fn new(drains: &'a Drains, health: &'a Health) -> Self {
        Self { drains, health }
    }

    fn contains(self, instance: &str) -> bool {
        self.drains.gives_away(instance) || self.health.is_failed(instance)
    }

    /// Failed: its failover may still be pending.
    fn failed(self, instance: &str) -> bool {
        self.health.is_failed(instance)
    }

    /// What this host publishes of local `instance` (and `status` shows).
    fn state(self, instance: &str) -> InstanceState {
        if self.health.is_failed(instance) {
            InstanceState::Failed
        } else if self.drains.is_drained(instance) {
            InstanceState::Drained
        } else if self.drains.gives_away(instance) {
            InstanceState::Reserved
        } else {
            InstanceState::Ok
        }
    }
}

/// Where the controller reads the time when it is not handed it (its
/// start, the move limiter's first token): the host's clock, or a
/// simulation's, so a simulated run is the same every time.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<dyn Fn() -> Instant + Send + Sync>>);

impl Clock {
    /// The host's monotonic clock.
    #[must_use]
    pub fn real() -> Self {
        Self(None)
    }

    /// A clock that reads `now` (a simulation's).
    #[must_use]
    pub fn from_fn(now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(now)))
    }

    #[must_use]
    pub fn now(&self) -> Instant {
        self.0.as_ref().map_or_else(Instant::now, |f| f())
    }
}

pub struct Controller {
    store: Arc<dyn CoordStore>,
    services: Vec<ServiceCtl>,
    /// Moves a second, the drains' and the elements' together.
    limiter: MoveLimiter,
    /// Application QoS reports, filled by the local API.
    pub reports: Arc<Mutex<Reports>>,
    interval: Duration,
    history: History,
    /// What the host says of instances (veths, namespaces, cgroups).
    probe: Box<dyn Probe>,
    health: Health,
    drains: Drains,
    claims: Claims,
    reconciler: Reconciler,
    /// Group owners unknown here, for how long ([`health::remote_fail_step`]).
    orphans: health::Orphans,
    /// What the commit that built this controller changed in the store.
    undo: Option<settle::Undo>,
    /// When [`Self::tick`] last measured every instance: the loop's
    /// progress, as the simulation checks it.
    measured: Option<Instant>,
    /// Whether this host was live (its lease held) at the last look at the
    /// cluster ([`Self::set_host_live`]); always in a single host.
    host_live: bool,
}

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
        Settled::decide(config, plan, store).await
    }

    /// Stores what [`Self::settle`] decided — the same rule applied again
    /// to the store as it is now, by compare-and-swap, so other hosts'
    /// moves since stand — and builds the controller; `plan`'s groups
    /// become what the store holds. If a write fails, what the services
    /// already written changed is given back, and the error is returned.
    pub async fn commit(
        settled: Settled,
        config: &Config,
        plan: &mut Plan,
        store: Arc<dyn CoordStore>,
    ) -> Result<Self, ControlError> {
        Self::commit_with_clock(settled, config, plan, store, &Clock::real()).await
    }

    /// The start or reload that committed this controller failed after
    /// the commit: each group the commit changed gets its owner back if
    /// nobody changed it since (once; later calls do nothing).
    pub async fn undo_commit(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo.apply(&*self.store).await;
        }
    }

    /// As [`Self::commit`], reading the time from `clock`.
    pub async fn commit_with_clock(
        settled: Settled,
        config: &Config,
        plan: &mut Plan,
        store: Arc<dyn CoordStore>,
        clock: &Clock,
    ) -> Result<Self, ControlError> {
        let undo = settled.store(&*store, plan).await?;
        let mut ctl = Self::build(config, plan, store, clock.now());
        ctl.undo = Some(undo);
        Ok(ctl)
    }

    fn build(config: &Config, plan: &Plan, store: Arc<dyn CoordStore>, now: Instant) -> Self {
        let mut ctl = Self {
            store,
            services: services::views(config, plan),
            limiter: MoveLimiter::new(config.agent.max_moves_per_sec, now),
            reports: Arc::new(Mutex::new(Reports::default())),
            interval: config.agent.interval,
            history: History::default(),
            probe: Box::new(HostProbe::new()),
            health: Health::new(config.agent.recovery_hold_down, now),
            drains: Drains::new(config),
            claims: Claims::default(),
            // Only etcd has other writers a stalled watch could hide; every
            // interval, so that a stall costs at most one.
            reconciler: Reconciler::every(
                (config.cluster.store == crate::config::StoreKind::Etcd)
                    .then_some(config.agent.interval),
            ),
            orphans: health::Orphans::default(),
            undo: None,
            measured: None,
            host_live: true,
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
        let services = &self.services;
        let configured = |name: &String| {
            services
                .iter()
                .any(|s| s.instances.iter().any(|i| &i.name == name))
        };
        self.drains.carry_over(old.drains, configured);
        self.health.carry_over(old.health, configured);
        services::carry_over(&mut self.services, old.services);
        self.reports = old.reports;
        self.history = old.history;
        self.limiter = old.limiter;
        self.claims = old.claims;
        self.probe = old.probe;
    }

    /// Reads the host through `probe` (unit tests hand in their own).
    #[must_use]
    pub fn with_probe(mut self, probe: Box<dyn Probe>) -> Self {
        self.probe = probe;
        self
    }

    /// When an interval last measured every instance (`None`: never yet).
    #[must_use]
    pub fn last_measured(&self) -> Option<Instant> {
        self.measured
    }

    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Every move so far (the last few thousand).
    #[must_use]
    pub fn history(&self) -> &[MoveEvent] {
        self.history.events()
    }

    /// How long an application report counts: three intervals. Older ones
    /// are ignored, and an instance with `health = "reports"` whose last
    /// report is older has failed.
    fn report_life(&self) -> Duration {
        self.interval * 3
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
        self.drains.set(&self.services, instance, drained)
    }

    #[must_use]
    pub fn is_drained(&self, instance: &str) -> bool {
        self.drains.is_drained(instance)
    }

    #[must_use]
    pub fn is_failed(&self, instance: &str) -> bool {
        self.health.is_failed(instance)
    }

    /// Whether this host's lease was live at the last look at the cluster.
    /// A host without one moves no group onto its own instances (no
    /// element's take, no remote failover, no drain): the others may
    /// already have taken its instances' groups, and its instances are no
    /// owners anyone else would accept. Found by the simulation: a host
    /// back from a partition took groups for its lease-less instances
    /// before its keeper had joined again.
    pub fn set_host_live(&mut self, live: bool) {
        self.host_live = live;
    }

    /// The cluster as this host last read it: the other hosts' instances
    /// (`remote`, for every service), which hosts are live, and every
    /// instance's published load. Instances registered since the start
    /// join; an instance whose host is not live is failed, and this host's
    /// elements take its groups ([`health::remote_fail_step`]).
    pub fn set_remote(
        &mut self,
        remote: &[RemotePlan],
        live_hosts: &HashSet<String>,
        loads: &HashMap<String, Load>,
    ) {
        for s in &mut self.services {
            s.set_remote(remote, live_hosts, loads);
        }
    }

    /// Every service's instances on other hosts.
    #[must_use]
    pub fn remote_status(&self) -> Vec<RemoteStatus> {
        self.services
            .iter()
            .flat_map(ServiceCtl::remote_status)
            .collect()
    }

    /// One interval, phase by phase: measure every instance, then its
    /// health, then the decisions, each applied as it is made: in the
    /// store, then the data path. Returns the moves made.
    pub async fn tick(
        &mut self,
        dp: &mut dyn Datapath,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        // An earlier write that failed is made good first: every phase
        // below writes the data path as if it said what the store says.
        (self.reconciler)
            .catch_up(dp, &*self.store, &self.services, now)
            .await?;
        let reports = self.measure(dp, now).await?;
        let mut made = self.health_step(dp, &reports, now).await?;
        made.extend(self.decide(dp, now).await?);
        Ok(made)
    }

    /// Every instance measured over the interval that just ended; returns
    /// the fresh application reports it used.
    async fn measure(
        &mut self,
        dp: &dyn Datapath,
        now: Instant,
    ) -> Result<HashMap<String, Report>, ControlError> {
        let life = self.report_life();
        let reports = measure::fresh_reports(&self.reports, &self.services, now, life);
        let (store, probe) = (&*self.store, &*self.probe);
        let out = Out::new(&self.drains, &self.health);
        let state = |name: &str| out.state(name);
        measure::measure(&mut self.services, dp, store, probe, &reports, &state, now).await?;
        self.measured = Some(now);
        Ok(reports.apps)
    }

    /// Failover of instances found failed here and of other hosts' gone
    /// instances, and recovery (see [`health`]).
    async fn health_step(
        &mut self,
        dp: &mut dyn Datapath,
        reports: &HashMap<String, Report>,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let (life, probe) = (self.report_life(), &*self.probe);
        let mut mv = Mover::new(&*self.store, dp, &mut self.reconciler, &mut self.history);
        let mut made = (self.health)
            .fail_step(&mut mv, &self.services, probe, reports, life, now)
            .await?;
        let out = Out::new(&self.drains, &self.health);
        let orphans = &mut self.orphans;
        if self.host_live {
            made.extend(
                health::remote_fail_step(&mut mv, &self.services, out, orphans, now).await?,
            );
        }
        (self.health).recover_step(dp, &mut self.services, probe, reports, now)?;
        Ok(made)
    }

    /// The decisions, each applied as it is made: origin tiers on their
    /// live subsets, one move of each drained instance, every element's.
    async fn decide(
        &mut self,
        dp: &mut dyn Datapath,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        self.origin_step(dp)?;
        if !self.host_live {
            return Ok(Vec::new());
        }
        let mut mv = Mover::new(&*self.store, dp, &mut self.reconciler, &mut self.history);
        let out = Out::new(&self.drains, &self.health);
        let limiter = &mut self.limiter;
        let mut made = (self.drains)
            .step(&mut mv, &self.services, limiter, out, now)
            .await?;
        made.extend(elements::step(&mut mv, &mut self.services, limiter, out, now).await?);
        Ok(made)
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
        let si = self.instance_of(service, to)?;
        let mut mv = Mover::new(&*self.store, dp, &mut self.reconciler, &mut self.history);
        mv.move_group(&self.services[si], group, to, "manual").await
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

    /// Every group of every service written into `dp` again from the store.
    pub async fn resync_now(&mut self, dp: &mut dyn Datapath) -> Result<(), ControlError> {
        (self.reconciler)
            .resync(dp, &*self.store, &self.services)
            .await
    }

    /// Another writer changed the store (`service`'s assignment, or, with
    /// `None`, maybe anything): the data path follows. If that fails, the
    /// next interval writes every group again.
    pub async fn follow(
        &mut self,
        dp: &mut dyn Datapath,
        service: Option<&str>,
    ) -> Result<(), ControlError> {
        (self.reconciler)
            .follow(dp, &*self.store, &self.services, service)
            .await
    }

    /// The owner of `unit` of service `service_id`, claiming its group for
    /// the least-utilised instance (not drained) if nobody owns it (see
    /// [`claims`]). Returns the owner's instance id, or `None` if the
    /// service has no instance to give it to.
    pub async fn claim(
        &mut self,
        dp: &mut dyn Datapath,
        service_id: u32,
        unit: u32,
        now: Instant,
    ) -> Result<Option<u32>, ControlError> {
        let Some(svc) = self.services.iter().find(|s| s.id == service_id) else {
            return Ok(None);
        };
        let mut mv = Mover::new(&*self.store, dp, &mut self.reconciler, &mut self.history);
        let out = Out::new(&self.drains, &self.health);
        self.claims.claim(&mut mv, svc, out, unit, now).await
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
        let Some(svc) = self.services.iter().find(|s| s.id == service_id) else {
            return (vec![Claimed::NoOwner; units.len()], None);
        };
        let mut mv = Mover::new(&*self.store, dp, &mut self.reconciler, &mut self.history);
        let out = Out::new(&self.drains, &self.health);
        self.claims.claim_batch(&mut mv, svc, out, units, now).await
    }

    /// Every service's assignment, from the store.
    pub async fn assignments(&self) -> Result<Vec<(String, Vec<GroupEntry>)>, ControlError> {
        let mut out = Vec::with_capacity(self.services.len());
        for s in &self.services {
            out.push((s.name.clone(), self.store.groups(&s.name).await?));
        }
        Ok(out)
    }

    /// Why a failed instance of this host failed (`probe`, `unbound`,
    /// `veth_gone`, ...); `None` for one that has not.
    #[must_use]
    pub fn failure_reason(&self, instance: &str) -> Option<&'static str> {
        self.health.failure_reason(instance)
    }

    /// Current state of every instance.
    pub async fn status(&self) -> Result<Vec<InstanceStatus>, ControlError> {
        let mut out = Vec::new();
        let state = Out::new(&self.drains, &self.health);
        for s in &self.services {
            let groups = self.store.groups(&s.name).await?;
            out.extend(s.status(&groups, |name| state.state(name)));
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
