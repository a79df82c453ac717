//! Drains: instances that give their groups away, one move at a time
//! within the move limit, and take none — those an operator drained, and
//! those of an http service's priority subset (reserved: they take only
//! the requests their rules send).

use std::{collections::HashSet, time::Instant};

use super::{ControlError, MoveEvent, Out, moves::Mover, services::ServiceCtl, wlm::MoveLimiter};
use crate::config::Config;

/// Drained and reserved instances.
pub(super) struct Drains {
    /// Instances being drained: they give their groups away, one move at a
    /// time within the move limit, and take none.
    drained: HashSet<String>,
    /// Instances in an http service's priority subset: like drained ones,
    /// they own no units (they take only the requests their rules send).
    reserved: HashSet<String>,
}

impl Drains {
    /// Nothing drained; the reserved instances as `config` has them.
    pub(super) fn new(config: &Config) -> Self {
        Self {
            drained: HashSet::new(),
            reserved: config
                .services
                .iter()
                .flat_map(|s| s.instances.iter().filter(|i| s.is_reserved(&i.name)))
                .map(|i| i.name.clone())
                .collect(),
        }
    }

    /// Marks `instance` (one of `services`') drained or not.
    pub(super) fn set(
        &mut self,
        services: &[ServiceCtl],
        instance: &str,
        drained: bool,
    ) -> Result<(), ControlError> {
        if !services
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

    pub(super) fn is_drained(&self, instance: &str) -> bool {
        self.drained.contains(instance)
    }

    /// Whether `instance` gives its groups away: drained or reserved.
    pub(super) fn gives_away(&self, instance: &str) -> bool {
        self.drained.contains(instance) || self.reserved.contains(instance)
    }

    /// Takes over `old`'s drained instances that are still `configured`.
    pub(super) fn carry_over(&mut self, old: Self, configured: impl Fn(&String) -> bool) {
        self.drained = old.drained.into_iter().filter(configured).collect();
    }

    /// One move of each drained instance that still owns groups, within the
    /// move limit: its largest group goes to the least-utilised peer that is
    /// not `out`.
    pub(super) async fn step(
        &self,
        mv: &mut Mover<'_>,
        services: &[ServiceCtl],
        limiter: &mut MoveLimiter,
        out: Out<'_>,
        now: Instant,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let mut made = Vec::new();
        for svc in services {
            let assignment = mv.store.groups(&svc.name).await?;
            let draining: Vec<String> = svc
                .instances
                .iter()
                .filter(|i| self.gives_away(&i.name))
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
                let Some(to) = svc
                    .instances
                    .iter()
                    .filter(|i| !out.contains(&i.name))
                    .map(|i| (i.sample.utilisation, &i.name))
                    .chain(
                        svc.remote
                            .iter()
                            .filter(|r| r.takes_work())
                            .map(|r| (r.sample.utilisation, &r.name)),
                    )
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| n.clone())
                else {
                    continue;
                };
                if !limiter.try_take(now) {
                    return Ok(made);
                }
                made.extend(mv.move_group(svc, e.group, &to, "drain").await?);
            }
        }
        Ok(made)
    }
}
