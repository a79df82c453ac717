//! Health: which instances have failed (their veth is gone, their
//! application's sockets went, its active probe fails, or its reports
//! stopped), taking them out of the data path and the store, and
//! taking them back after a hold-down; and the groups of other hosts'
//! instances whose host is gone, or that are no longer registered.
//!
//! Bounds (in control intervals) for a group left with an instance that
//! takes no work: a failed local instance's groups are unowned at the next
//! interval of its host, however they got there (every interval looks
//! again); a removed instance's are taken after
//! [`UNKNOWN_OWNER_INTERVALS`]; a dead host's once its lease has expired.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::{
    ControlError, MoveEvent, Out, UNOWNED,
    active::ActiveProbes,
    moves::Mover,
    qos::{Probe, Report},
    services::{InstCtl, ServiceCtl},
    wlm::ElementState,
};
use crate::{
    coord::{CoordError, GroupEntry, InstanceState, Load},
    datapath::Datapath,
};

/// A share of what an instance was sent that, refused by its stack
/// (no socket, or reset) for [`REFUSING_INTERVALS`] in a row, fails it.
const REFUSED_SHARE: f64 = 0.5;

/// Intervals in a row of refusing before the instance fails: one could be
/// an application restarting.
const REFUSING_INTERVALS: u32 = 2;

/// Below this many packets a second delivered, refusals say nothing (a
/// few stray datagrams to a closed port).
const REFUSING_MIN_PPS: f64 = 5.0;

/// An instance that fails again within this many hold-downs of coming
/// back is flapping: each such failure doubles its next hold-down ...
const FLAP_WINDOW_HOLD_DOWNS: u32 = 10;

/// ... up to this many times the configured one.
const MAX_HOLD_DOWN_FACTOR: u32 = 8;

/// An instance's failures close together (flap damping: a server that
/// crashes under load, restarts and crashes again, or one refusing every
/// other interval, is not given work back at every hold-down). As Envoy
/// lengthens an outlier's ejection each time it is ejected again.
#[derive(Clone, Copy, Debug, Default)]
struct Flaps {
    /// Failures in a row, each within the window of the last recovery.
    strikes: u32,
    /// When it last came back.
    recovered: Option<Instant>,
}

impl Flaps {
    /// Counts a failure at `now`; returns the hold-down it must wait out.
    fn fail(&mut self, hold_down: Duration, now: Instant) -> Duration {
        let window = hold_down * FLAP_WINDOW_HOLD_DOWNS;
        let again = self
            .recovered
            .is_some_and(|t| now.saturating_duration_since(t) < window);
        self.strikes = if again { self.strikes + 1 } else { 1 };
        self.hold_down(hold_down)
    }

    fn hold_down(self, hold_down: Duration) -> Duration {
        let factor = 1u32
            .checked_shl(self.strikes.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(MAX_HOLD_DOWN_FACTOR);
        hold_down * factor
    }
}

/// Why an instance failed: the log's words, and the `reason` of
/// `sluice_instance_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Veth,
    Reports,
    Unbound,
    Refusing,
    Probe,
}

impl Cause {
    const fn reason(self) -> &'static str {
        match self {
            Self::Veth => "veth_gone",
            Self::Reports => "reports_stopped",
            Self::Unbound => "unbound",
            Self::Refusing => "refusing",
            Self::Probe => "probe",
        }
    }

    const fn why(self) -> &'static str {
        match self {
            Self::Veth => "its veth is gone",
            Self::Reports => "its application's reports stopped",
            Self::Unbound => "nothing is bound to the service's ports in its namespace any more",
            Self::Refusing => "its stack refuses most of what it is sent (no socket, or resets)",
            Self::Probe => "its active probe failed `fall` times in a row",
        }
    }
}

/// What the loop saw of an instance's application sockets
/// (`health = "sockets"`).
#[derive(Clone, Copy, Debug, Default)]
struct Sockets {
    /// Something was seen bound to the service's ports. Only from then on
    /// does nothing bound there mean the application is gone: one that
    /// serves from raw or AF_XDP sockets never binds, and is never judged
    /// by its sockets.
    armed: bool,
    /// Intervals in a row most of what it was sent was refused.
    refusing: u32,
}

impl Sockets {
    /// This interval's look at `i`'s sockets: why its application is down,
    /// if it is.
    fn look(&mut self, i: &InstCtl) -> Option<Cause> {
        let inputs = &i.inputs;
        match inputs.listeners {
            Some(0) if self.armed => return Some(Cause::Unbound),
            Some(0) | None => {}
            Some(_) => self.armed = true,
        }
        let refused = self.armed
            && inputs.rate_pps >= REFUSING_MIN_PPS
            && inputs.refused_ps >= REFUSED_SHARE * inputs.rate_pps;
        self.refusing = if refused { self.refusing + 1 } else { 0 };
        (self.refusing >= REFUSING_INTERVALS).then_some(Cause::Refusing)
    }

    /// Whether the application looks up again: bound to the ports, if it
    /// ever was.
    fn up(self, i: &InstCtl) -> bool {
        !(self.armed && i.inputs.listeners == Some(0))
    }
}

/// Failed instances, and those whose failover has not wholly landed yet.
pub(super) struct Health {
    /// Instances found failed, and why (`sluice status` says it): out of
    /// the data path, their groups unowned, claimed again by the survivors.
    failed: HashMap<String, Cause>,
    /// Failed instances not yet out of the data path (a write failed
    /// half-way): marked not live again each interval until it lands.
    failing: HashSet<String>,
    /// How long a failed instance must look healthy again before it is
    /// taken back.
    hold_down: Duration,
    /// When the controller started (reports get a grace period).
    started: Instant,
    /// Each instance's application sockets, as last seen.
    sockets: HashMap<String, Sockets>,
    /// `[service.probe]`: the probe tasks and their verdicts.
    active: ActiveProbes,
    /// Each instance's recent failures, for its hold-down.
    flaps: HashMap<String, Flaps>,
}

impl Health {
    pub(super) fn new(hold_down: Duration, now: Instant) -> Self {
        Self {
            failed: HashMap::new(),
            failing: HashSet::new(),
            hold_down,
            started: now,
            sockets: HashMap::new(),
            active: ActiveProbes::default(),
            flaps: HashMap::new(),
        }
    }

    pub(super) fn is_failed(&self, instance: &str) -> bool {
        self.failed.contains_key(instance)
    }

    /// Why a failed instance failed: the `reason` of
    /// `sluice_instance_failures_total` (`probe`, `unbound`, ...).
    pub(super) fn failure_reason(&self, instance: &str) -> Option<&'static str> {
        self.failed.get(instance).map(|c| c.reason())
    }

    /// Takes over what `old` knows of the instances still `configured`,
    /// and when it started.
    pub(super) fn carry_over(&mut self, mut old: Self, configured: impl Fn(&String) -> bool) {
        self.failed = old
            .failed
            .into_iter()
            .filter(|(n, _)| configured(n))
            .collect();
        self.failing = old.failing.into_iter().filter(&configured).collect();
        self.started = old.started;
        self.sockets = old
            .sockets
            .into_iter()
            .filter(|(n, _)| configured(n))
            .collect();
        // The tasks go on; the next interval's sync ends or restarts those
        // the reload changed.
        self.active = std::mem::take(&mut old.active);
        self.flaps = old
            .flaps
            .into_iter()
            .filter(|(n, _)| configured(n))
            .collect();
    }

    /// Finds instances whose veth is gone (or came back with another
    /// ifindex: a new container), whose application's sockets went
    /// (`health = "sockets"` or `"reports"`, see [`Sockets`]), or whose
    /// application stopped reporting (`health = "reports"`: no report
    /// fresher than `report_life` once the controller has run that long).
    /// Each is taken out of the data path
    /// at once (its packets are punted, its pinned flows no longer hold)
    /// and its groups become unowned in the store, to be claimed by the
    /// survivors as their packets arrive. Every interval after that, any
    /// group a failed instance owns again (another host moved it there
    /// before it read the instance's state) is unowned too.
    pub(super) async fn fail_step(
        &mut self,
        mv: &mut Mover<'_>,
        services: &[ServiceCtl],
        probe: &dyn Probe,
        reporting: &HashMap<String, Report>,
        report_life: Duration,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let mut made = Vec::new();
        self.active.sync(services);
        let grace_over = now.saturating_duration_since(self.started) > report_life;
        let mut gone: Vec<(&str, String, Load, Cause)> = Vec::new();
        for s in services {
            for i in &s.instances {
                if self.failed.contains_key(&i.name) {
                    continue;
                }
                let cause = if !probe.link_exists(i.ifindex) {
                    Some(Cause::Veth)
                } else if self.active.is_down(&i.name) {
                    Some(Cause::Probe)
                } else if i.config.health.reports()
                    && grace_over
                    && !reporting.contains_key(&i.name)
                {
                    Some(Cause::Reports)
                } else if i.config.health.sockets() {
                    self.sockets.entry(i.name.clone()).or_default().look(i)
                } else {
                    None
                };
                if let Some(cause) = cause {
                    let load = Load {
                        utilisation: i.sample.utilisation,
                        rate_pps: i.sample.rate_pps,
                        state: InstanceState::Failed,
                    };
                    gone.push((&s.name, i.name.clone(), load, cause));
                }
            }
        }
        for (service, name, load, cause) in gone {
            let flaps = self.flaps.entry(name.clone()).or_default();
            let hold_down = flaps.fail(self.hold_down, now);
            tracing::warn!(instance = %name, reason = cause.reason(), why = cause.why(), hold_down = ?hold_down, failures_in_a_row = flaps.strikes, "instance failed; its groups are unowned until claimed");
            crate::telemetry::instance_failed(service, &name, cause.reason());
            // Failed at once: no claim gives it work from here on, and no
            // other host either (this interval's load said `ok`).
            self.failed.insert(name.clone(), cause);
            mv.store.publish_load(&name, load).await?;
            self.failing.insert(name);
        }
        let mut failed: Vec<String> = self.failed.keys().cloned().collect();
        failed.sort();
        for name in failed {
            let (svc, id) = services
                .iter()
                .find_map(|s| {
                    s.instances
                        .iter()
                        .find(|i| i.name == name)
                        .map(|i| (s, i.id))
                })
                .expect("a configured instance");
            if self.failing.contains(&name) {
                mv.dp.set_instance_live(id, false)?;
            }
            for e in mv
                .store
                .groups(&svc.name)
                .await?
                .into_iter()
                .filter(|e| e.owner == name)
            {
                match mv
                    .store
                    .move_group(&svc.name, e.group, e.version, UNOWNED)
                    .await
                {
                    Ok(_) => {}
                    // Another writer moved it first: the next interval
                    // looks again.
                    Err(CoordError::Conflict { .. }) => continue,
                    Err(err) => return Err(err.into()),
                }
                mv.write(svc, e.group, UNOWNED)?;
                let ev = MoveEvent {
                    at: now,
                    service: svc.name.clone(),
                    kind: "failover",
                    group: Some(e.group),
                    from: name.clone(),
                    to: UNOWNED.to_owned(),
                };
                mv.record(ev.clone());
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
    pub(super) fn recover_step(
        &mut self,
        dp: &mut dyn Datapath,
        services: &mut [ServiceCtl],
        probe: &dyn Probe,
        reporting: &HashMap<String, Report>,
        now: Instant,
    ) -> Result<(), ControlError> {
        for s in services {
            for i in &mut s.instances {
                if !self.failed.contains_key(&i.name) || self.failing.contains(&i.name) {
                    continue;
                }
                let sockets = self.sockets.get_mut(&i.name);
                let probed_down = self.active.is_down(&i.name);
                let back = probe.resolve(&i.config).filter(|_| {
                    !probed_down
                        && (!i.config.health.reports() || reporting.contains_key(&i.name))
                        && (!i.config.health.sockets() || sockets.as_ref().is_none_or(|s| s.up(i)))
                });
                let Some(r) = back else {
                    i.recovering_since = None;
                    continue;
                };
                let since = *i.recovering_since.get_or_insert(now);
                let flaps = self.flaps.entry(i.name.clone()).or_default();
                let hold_down = flaps.hold_down(self.hold_down);
                if now.saturating_duration_since(since) < hold_down {
                    continue;
                }
                flaps.recovered = Some(now);
                dp.set_instance_target(i.id, r.ifindex, r.mac)?;
                dp.set_instance_live(i.id, true)?;
                i.ifindex = r.ifindex;
                if r.netns.is_some() {
                    i.netns = r.netns;
                }
                i.recovering_since = None;
                i.state = ElementState::default();
                if let Some(s) = sockets {
                    s.refusing = 0;
                }
                self.failed.remove(&i.name);
                tracing::info!(instance = %i.name, ifindex = r.ifindex, hold_down = ?hold_down, "instance recovered; it takes work as its element decides");
            }
        }
        Ok(())
    }
}

/// Intervals in a row a group's owner must be unknown here (not one of
/// this host's instances, nor registered by another host) before its
/// groups are taken: an instance another host registers is known here
/// from the next read of the cluster, which comes every interval, so only
/// a removed one (or one of a host whose records are gone) stays unknown.
pub const UNKNOWN_OWNER_INTERVALS: u32 = 2;

/// Owners of groups unknown here, and for how many intervals in a row.
#[derive(Default)]
pub(super) struct Orphans {
    seen: HashMap<(String, String), u32>,
}

/// Groups owned by instances of hosts that are gone (their lease expired),
/// or for [`UNKNOWN_OWNER_INTERVALS`] by instances unknown here (removed on
/// another host), go to this host's least utilised instance not `out`.
/// Every live host tries; the store's compare-and-swap lets one win each
/// group, and the elements spread the load again from there.
pub(super) async fn remote_fail_step(
    mv: &mut Mover<'_>,
    services: &[ServiceCtl],
    out: Out<'_>,
    orphans: &mut Orphans,
    now: Instant,
) -> Result<Vec<MoveEvent>, ControlError> {
    let mut made = Vec::new();
    let mut seen = HashMap::new();
    for svc in services {
        let groups = mv.store.groups(&svc.name).await?;
        let mut gone: HashSet<&str> = svc
            .remote
            .iter()
            .filter(|r| !r.live)
            .map(|r| r.name.as_str())
            .collect();
        for e in &groups {
            if e.owner == UNOWNED || svc.id_of(&e.owner).is_some() {
                continue;
            }
            let key = (svc.name.clone(), e.owner.clone());
            if seen.contains_key(&key) {
                continue;
            }
            let n = orphans.seen.get(&key).copied().unwrap_or(0) + 1;
            if n >= UNKNOWN_OWNER_INTERVALS {
                gone.insert(&e.owner);
            }
            seen.insert(key, n);
        }
        if gone.is_empty() {
            continue;
        }
        let Some(to) = svc
            .instances
            .iter()
            .filter(|i| !out.contains(&i.name))
            .min_by(|a, b| a.sample.utilisation.total_cmp(&b.sample.utilisation))
            .map(|i| i.name.clone())
        else {
            continue;
        };
        let taken: Vec<&GroupEntry> = groups
            .iter()
            .filter(|e| gone.contains(e.owner.as_str()))
            .collect();
        for e in taken {
            match mv
                .store
                .move_group(&svc.name, e.group, e.version, &to)
                .await
            {
                Ok(_) => {}
                // Another host took it first.
                Err(CoordError::Conflict { .. }) => continue,
                Err(err) => return Err(err.into()),
            }
            mv.write(svc, e.group, &to)?;
            let ev = MoveEvent {
                at: now,
                service: svc.name.clone(),
                kind: "failover",
                group: Some(e.group),
                from: e.owner.clone(),
                to: to.clone(),
            };
            mv.record(ev.clone());
            made.push(ev);
        }
    }
    orphans.seen = seen;
    Ok(made)
}
