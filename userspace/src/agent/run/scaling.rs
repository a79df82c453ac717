//! The scaler in the event loop: each control interval, for every service
//! with a `[service.scale]` table, the SLA window in force, the failure
//! rules for launched instances, and one decision of the scale policy
//! ([`crate::control::scale`]) — carried out through the launcher and the
//! lifecycle (a launched instance registers like `sluice instance add`; a
//! stopped one is removed the safe way first, then stopped).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::Serving;
use crate::{
    agent::{
        launch::{self, Vars},
        lifecycle::{Removal, Source},
    },
    api::{InstanceSpec, ScaleLine},
    config::{Launcher, Service},
    control::{
        InstanceStatus,
        scale::{Decision, Effective, FailureBudget, Member, ScaleState, ScaleView, WallTime},
    },
    telemetry,
};

/// Decisions kept per service for `status`.
const LAST: usize = 8;

/// What to do once a launched instance is out of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum After {
    /// Stop it through the launcher.
    Stop,
    /// Stop it, then start it again under the same name (failure rule).
    Restart,
}

/// The scaler's state of one service.
#[derive(Default)]
pub(super) struct ScaleCtl {
    state: ScaleState,
    budget: FailureBudget,
    /// Launches under way.
    pending: BTreeSet<String>,
    /// Failed launches in a row, and no launch before `retry_at`.
    failures: u32,
    retry_at: Option<Instant>,
    last: VecDeque<String>,
    /// Launched instances left failed (their restarts ran out).
    alerted: BTreeSet<String>,
    /// The bounds in force, as last computed.
    eff: Option<Effective>,
}

impl ScaleCtl {
    fn note(&mut self, service: &str, line: String) {
        tracing::info!(service, decision = %line, "scale");
        if self.last.len() == LAST {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }
}

/// A start or stop that finished on its task.
#[derive(Debug)]
pub(super) enum Outcome {
    Started {
        service: String,
        name: String,
        result: Result<Box<InstanceSpec>, String>,
    },
    Stopped {
        name: String,
        result: Result<(), String>,
    },
}

/// Every scaled service's state, and where finished launches report.
pub(super) struct Scaler {
    pub(super) services: BTreeMap<String, ScaleCtl>,
    /// Launched instances under removal, and what follows.
    pub(super) after: BTreeMap<String, After>,
    tx: mpsc::UnboundedSender<Outcome>,
    pub(super) outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// The netns launcher's servers log here.
    log_dir: PathBuf,
}

impl Scaler {
    pub(super) fn new(log_dir: PathBuf) -> Self {
        let (tx, outcomes) = mpsc::unbounded_channel();
        Self {
            services: BTreeMap::new(),
            after: BTreeMap::new(),
            tx,
            outcomes,
            log_dir,
        }
    }

    /// Starts `name` of `service` on a task of its own.
    fn start(&self, launcher: &Launcher, service: &Service, name: &str, index: u32) {
        let (launcher, service, vars) = (
            launcher.clone(),
            service.clone(),
            Vars::new(service, name, index),
        );
        let (tx, dir) = (self.tx.clone(), self.log_dir.clone());
        tokio::spawn(async move {
            let result = launch::start(&launcher, &service, &vars, &dir)
                .await
                .map(Box::new)
                .map_err(|e| e.to_string());
            let _ = tx.send(Outcome::Started {
                service: vars.service.clone(),
                name: vars.name,
                result,
            });
        });
    }

    /// Stops `name` of `service` on a task of its own.
    pub(super) fn stop(&self, launcher: &Launcher, service: &Service, name: &str) {
        let (launcher, vars) = (
            launcher.clone(),
            Vars::new(service, name, index_of(&service.name, name).unwrap_or(0)),
        );
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = launch::stop(&launcher, &vars)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Outcome::Stopped {
                name: vars.name,
                result,
            });
        });
    }
}

/// The slot of a launched instance named `<service>-s<k>`.
fn index_of(service: &str, name: &str) -> Option<u32> {
    name.strip_prefix(service)?.strip_prefix("-s")?.parse().ok()
}

impl Serving<'_> {
    /// The service's launcher, if it has a scale table with one.
    fn launcher(&self, service: &str) -> Option<(Service, Launcher)> {
        let svc = self.running.services.iter().find(|s| s.name == service)?;
        let launcher = svc.scale.as_ref()?.launcher.clone()?;
        Some((svc.clone(), launcher))
    }

    /// One interval of the scaler (after the control loop's), with the
    /// groups each instance owns (`owned`) and the instances' `status`.
    pub(super) fn scale_step(&mut self, owned: &HashMap<String, usize>, status: &[InstanceStatus]) {
        let now = Instant::now();
        let at = WallTime::now_local();
        let scaled: Vec<Service> = self
            .running
            .services
            .iter()
            .filter(|s| s.scale.is_some())
            .cloned()
            .collect();
        self.scaler
            .services
            .retain(|name, _| scaled.iter().any(|s| &s.name == name));
        let mut lines = Vec::new();
        for svc in scaled {
            let scale = svc.scale.clone().expect("filtered");
            let eff = crate::control::scale::effective(&scale, &svc.wlm, at);
            let overload = eff.thresholds.overload();
            if self.agent.control.set_overload(&svc.name, overload) {
                tracing::info!(service = %svc.name, overload, window = ?eff.window, "overload threshold set by the SLA window");
            }
            self.failure_rules(&svc, now);
            let ctl = self.scaler.services.entry(svc.name.clone()).or_default();
            let launched = |n: &str| {
                self.life
                    .get(n)
                    .is_some_and(|r| r.source == Source::Launcher)
            };
            let members: Vec<Member<'_>> = svc
                .instances
                .iter()
                .map(|i| {
                    let n = i.name.as_str();
                    let live = !self.agent.control.is_failed(n)
                        && !self.agent.control.is_drained(n)
                        && !self.life.removing.contains_key(n);
                    Member {
                        name: n,
                        utilisation: status
                            .iter()
                            .find(|s| s.name == n)
                            .map_or(0.0, |s| s.sample.utilisation),
                        groups: owned.get(n).copied().unwrap_or(0),
                        live,
                        removable: launched(n) && !ctl.alerted.contains(n),
                    }
                })
                .collect();
            for m in members.iter().filter(|m| launched(m.name)) {
                telemetry::scale_failed_alert(&svc.name, m.name, ctl.alerted.contains(m.name));
            }
            let live = u32::try_from(members.iter().filter(|m| m.live).count()).unwrap_or(0);
            let pending = u32::try_from(ctl.pending.len()).unwrap_or(0);
            let decision = ctl.state.decide(&ScaleView {
                eff: &eff,
                cfg: &scale,
                members: &members,
                pending,
                now,
            });
            drop(members);
            if let Some(d) = decision {
                self.carry_out(&svc, d, now);
            }
            let ctl = self.scaler.services.get_mut(&svc.name).expect("entered");
            let gauges = telemetry::ScaleGauges {
                instances: u32::try_from(svc.instances.len()).unwrap_or(0),
                live,
                // Being removed is not live already.
                target: live + u32::try_from(ctl.pending.len()).unwrap_or(0),
                min: eff.min_instances,
                max: eff.max_instances,
                failed: u32::try_from(ctl.alerted.len()).unwrap_or(u32::MAX),
            };
            telemetry::scale(&svc.name, &gauges);
            lines.push(ScaleLine {
                service: svc.name.clone(),
                instances: gauges.instances,
                live: gauges.live,
                target: gauges.target,
                min: gauges.min,
                max: gauges.max,
                window: eff.window,
                last: ctl.last.iter().cloned().collect(),
            });
            ctl.eff = Some(eff);
        }
        *self.shared.scale.lock().expect("scale lock") = lines;
    }

    /// A decision of the policy, carried out.
    fn carry_out(&mut self, svc: &Service, d: Decision, now: Instant) {
        let ctl = self.scaler.services.get_mut(&svc.name).expect("entered");
        match d {
            Decision::Launch { reason } => {
                let Some(launcher) = svc.scale.as_ref().and_then(|s| s.launcher.clone()) else {
                    // Said once a cooldown: the policy paces itself.
                    ctl.state.changed(now);
                    ctl.note(
                        &svc.name,
                        format!("launch wanted ({}), but no launcher", reason.as_str()),
                    );
                    return;
                };
                if ctl.retry_at.is_some_and(|t| now < t) {
                    return;
                }
                // Fewer instances than ids: one of these is free.
                let slots = u32::try_from(crate::config::MAX_INSTANCES).expect("small");
                let name = (0..=slots)
                    .map(|k| format!("{}-s{k}", svc.name))
                    .find(|n| {
                        !self.running.has_instance(n)
                            && self.life.get(n).is_none()
                            && !ctl.pending.contains(n)
                    })
                    .expect("a free name");
                let index = index_of(&svc.name, &name).expect("named so");
                ctl.pending.insert(name.clone());
                ctl.state.changed(now);
                ctl.note(&svc.name, format!("launch {name}: {}", reason.as_str()));
                telemetry::scale_decision(&svc.name, "launch", reason.as_str());
                self.scaler.start(&launcher, svc, &name, index);
            }
            Decision::Stop { name, reason } => {
                ctl.state.changed(now);
                ctl.note(&svc.name, format!("stop {name}: {}", reason.as_str()));
                telemetry::scale_decision(&svc.name, "stop", reason.as_str());
                let deadline = svc
                    .scale
                    .as_ref()
                    .map_or(Duration::from_secs(30), |s| s.drain_deadline);
                self.begin_removal(&name, deadline, After::Stop);
            }
        }
    }

    /// Drains `name` and removes it; `after` follows once it is out.
    fn begin_removal(&mut self, name: &str, deadline: Duration, after: After) {
        if self.running.has_instance(name)
            && let Err(e) = self.agent.control.set_drained(name, true)
        {
            tracing::warn!(instance = name, error = %e, "draining before the removal");
        }
        self.life
            .removing
            .insert(name.to_owned(), Removal::new(Instant::now(), deadline));
        self.scaler.after.insert(name.to_owned(), after);
    }

    /// Failed launched instances: restarted while the failure rule allows,
    /// then left failed with the alert raised.
    fn failure_rules(&mut self, svc: &Service, now: Instant) {
        let Some(scale) = svc.scale.as_ref() else {
            return;
        };
        let netns_launcher = matches!(scale.launcher, Some(Launcher::Netns { .. }));
        let failed: Vec<String> = svc
            .instances
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| {
                self.life
                    .get(n)
                    .is_some_and(|r| r.source == Source::Launcher)
                    && !self.life.removing.contains_key(*n)
                    && (self.agent.control.is_failed(n)
                        || (netns_launcher && !launch::netns_alive(n)))
            })
            .map(str::to_owned)
            .collect();
        let ctl = self.scaler.services.entry(svc.name.clone()).or_default();
        let mut restart = Vec::new();
        for name in failed {
            if ctl.alerted.contains(&name) {
                continue;
            }
            if ctl.budget.try_restart(&name, &scale.failure, now) {
                // Counted as a launch under way from now: no replacement
                // is launched beside it.
                ctl.pending.insert(name.clone());
                ctl.note(&svc.name, format!("restart {name}: failed"));
                telemetry::scale_decision(&svc.name, "restart", "failed");
                restart.push(name);
            } else {
                tracing::warn!(service = %svc.name, instance = %name, restarts = scale.failure.restarts, window = ?scale.failure.window, "instance failed again: its restarts ran out; left failed (alert raised)");
                ctl.note(
                    &svc.name,
                    format!(
                        "left {name} failed: {} restarts ran out",
                        scale.failure.restarts
                    ),
                );
                telemetry::scale_failed_alert(&svc.name, &name, true);
                ctl.alerted.insert(name);
            }
        }
        // Its groups went to the survivors when it failed: out at once.
        for name in restart {
            self.begin_removal(&name, Duration::ZERO, After::Restart);
        }
    }

    /// A launched instance is out of the data path: stop it, and start it
    /// again if a failure rule said so.
    pub(super) fn removed(&mut self, name: &str, service: &str) {
        let after = self.scaler.after.remove(name);
        let Some((svc, launcher)) = self.launcher(service) else {
            return;
        };
        if let Some(ctl) = self.scaler.services.get_mut(service)
            && ctl.alerted.remove(name)
        {
            telemetry::scale_failed_alert(service, name, false);
        }
        match after {
            Some(After::Restart) => {
                // Stop and start in one task, in order.
                let (l, s, vars) = (
                    launcher.clone(),
                    svc.clone(),
                    Vars::new(&svc, name, index_of(service, name).unwrap_or(0)),
                );
                if let Some(ctl) = self.scaler.services.get_mut(service) {
                    ctl.pending.insert(name.to_owned());
                }
                let (tx, dir) = (self.scaler.tx.clone(), self.scaler.log_dir.clone());
                tokio::spawn(async move {
                    if let Err(e) = launch::stop(&l, &vars).await {
                        tracing::warn!(instance = %vars.name, error = %e, "stopping the failed instance before its restart");
                    }
                    let result = launch::start(&l, &s, &vars, &dir)
                        .await
                        .map(Box::new)
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Outcome::Started {
                        service: vars.service.clone(),
                        name: vars.name,
                        result,
                    });
                });
            }
            Some(After::Stop) | None => self.scaler.stop(&launcher, &svc, name),
        }
    }

    /// A start or stop finished.
    pub(super) async fn launched(&mut self, outcome: Outcome) {
        let now = Instant::now();
        match outcome {
            Outcome::Started {
                service,
                name,
                result,
            } => {
                if let Some(ctl) = self.scaler.services.get_mut(&service) {
                    ctl.pending.remove(&name);
                }
                // A failed start cleaned up after itself; a started
                // instance that could not join is stopped here.
                let (joined, stop) = match result {
                    Ok(spec) => match self.add(*spec, Source::Launcher).await {
                        Ok(done) => (Ok(done), false),
                        Err(e) => (Err(format!("{e:#}")), true),
                    },
                    Err(e) => (Err(e), false),
                };
                let Some(ctl) = self.scaler.services.get_mut(&service) else {
                    return;
                };
                match joined {
                    Ok(done) => {
                        ctl.failures = 0;
                        ctl.retry_at = None;
                        ctl.note(&service, format!("launched {name}"));
                        tracing::info!(service, instance = %name, %done, "launched");
                    }
                    Err(why) => {
                        ctl.failures += 1;
                        let wait = crate::control::scale::launch_backoff(ctl.failures);
                        ctl.retry_at = Some(now + wait);
                        ctl.state.changed(now);
                        ctl.note(&service, format!("launch {name} failed: {why}"));
                        telemetry::scale_launch_failed(&service);
                        tracing::warn!(service, instance = %name, error = %why, retry_in = ?wait, "launch failed; nothing of it stays registered");
                        if stop && let Some((svc, launcher)) = self.launcher(&service) {
                            self.scaler.stop(&launcher, &svc, &name);
                        }
                    }
                }
            }
            Outcome::Stopped { name, result } => match result {
                Ok(()) => tracing::info!(instance = %name, "stopped by the launcher"),
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e, "the launcher's stop failed");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launched_names_carry_their_slot() {
        assert_eq!(index_of("kv", "kv-s3"), Some(3));
        assert_eq!(index_of("kv", "kv-3"), None);
        assert_eq!(index_of("kv", "kvx-s3"), None);
    }
}
