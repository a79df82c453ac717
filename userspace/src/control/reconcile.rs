//! Keeping the data path in step with the store: every owner the loop
//! writes goes through [`Reconciler::write`], which notes a failed write;
//! the data path is then behind the store until every group is written
//! again from it ([`Reconciler::catch_up`], at the next interval). Another
//! writer's change to the store is followed the same way
//! ([`Reconciler::follow`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use sluice_common::maps::NO_OWNER;

use super::{ControlError, UNOWNED, services::ServiceCtl};
use crate::{coord::CoordStore, datapath::Datapath, plan::Group};

/// Whether the data path may disagree with the store.
#[derive(Default)]
pub(super) struct Reconciler {
    /// A data path write failed, or a group's owner is unknown here: the
    /// data path may disagree with the store until every group is written
    /// again (next interval).
    resync: bool,
    /// Each service's group owners unknown here at the last write, whose
    /// groups are written unowned.
    unknown: BTreeMap<String, BTreeSet<String>>,
    /// With a store other hosts write (etcd), every group is written again
    /// this often (each interval) whatever the watch said: a watch that
    /// stalls without an error (a half-open connection) would otherwise
    /// leave this host's data path on an old owner for as long as it
    /// stalls, the unit delivered by two hosts to two instances. Found by
    /// the simulation.
    every: Option<Duration>,
    /// When every group was last written from the store at an interval.
    full: Option<Instant>,
}

impl Reconciler {
    /// A reconciler that writes every group again at least `every`.
    pub(super) fn every(every: Option<Duration>) -> Self {
        Self {
            every,
            ..Self::default()
        }
    }

    /// Points `group` of `svc` at instance `to` in the data path. A failed
    /// write leaves the data path behind the store: every group is written
    /// again at the next interval.
    pub(super) fn write(
        &mut self,
        dp: &mut dyn Datapath,
        svc: &ServiceCtl,
        group: Group,
        to: &str,
    ) -> Result<(), ControlError> {
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

    /// Every group written again if an earlier write failed, while a
    /// group's owner is unknown here, or when the last full write is
    /// [`Self::every`] old at `now`. Only the first two fail the interval:
    /// a periodic write that fails (the store out of reach) is tried again
    /// at the next one.
    pub(super) async fn catch_up(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        services: &[ServiceCtl],
        now: Instant,
    ) -> Result<(), ControlError> {
        if self.resync {
            self.resync(dp, store, services).await?;
            self.full = Some(now);
            return Ok(());
        }
        let due = self.every.is_some_and(|e| {
            self.full
                .is_none_or(|f| now.saturating_duration_since(f) >= e)
        });
        if due {
            match self.resync(dp, store, services).await {
                Ok(()) => self.full = Some(now),
                Err(ControlError::Coord(e)) => {
                    // The store out of reach: nothing was wrong with the
                    // data path, which keeps the last assignment.
                    self.resync = false;
                    tracing::debug!(error = %e, "the periodic write from the store could not read it; trying again next interval");
                }
                // A data path write failed: that does fail the interval.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Another writer changed the store (`service`'s assignment, or, with
    /// `None`, maybe anything): the data path follows. If that fails, the
    /// next interval writes every group again.
    pub(super) async fn follow(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        services: &[ServiceCtl],
        service: Option<&str>,
    ) -> Result<(), ControlError> {
        let r = match service {
            None => self.resync(dp, store, services).await,
            Some(name) => match services.iter().find(|s| s.name == name) {
                Some(svc) => match self.rewrite(dp, store, svc).await {
                    Ok(unknown) => {
                        self.note_unknown(&svc.name, unknown);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                // Not one of ours (another cluster's service shares etcd).
                None => Ok(()),
            },
        };
        if r.is_err() {
            self.resync = true;
        }
        r
    }

    /// `svc`'s groups written into `dp` again from the store. A group whose
    /// owner this host does not know (registered since this host last read
    /// the cluster, or removed with its records while it still owned it)
    /// is written unowned: its packets are punted and counted, nothing
    /// stops here. Returns those owners.
    async fn rewrite(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        svc: &ServiceCtl,
    ) -> Result<BTreeSet<String>, ControlError> {
        let mut unknown = BTreeSet::new();
        for e in store.groups(&svc.name).await? {
            let owner = if e.owner == UNOWNED || svc.id_of(&e.owner).is_some() {
                e.owner.as_str()
            } else {
                unknown.insert(e.owner.clone());
                UNOWNED
            };
            self.write(dp, svc, e.group, owner)?;
        }
        Ok(unknown)
    }

    /// Owners of `service`'s groups unknown here: while there are any,
    /// every interval writes the groups again (the owner may be known by
    /// then, or its groups taken, see [`super::health::remote_fail_step`]).
    fn note_unknown(&mut self, service: &str, owners: BTreeSet<String>) {
        let before = self.unknown.get(service);
        if !owners.is_empty() && before != Some(&owners) {
            tracing::warn!(service, owners = ?owners, "groups owned by instances this host does not know are punted until the owner is known or its groups are taken");
        }
        if owners.is_empty() {
            self.unknown.remove(service);
        } else {
            self.unknown.insert(service.to_owned(), owners);
            self.resync = true;
        }
    }

    /// Every group of every service written into `dp` again from the
    /// store, so the data path converges to it.
    pub(super) async fn resync(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        services: &[ServiceCtl],
    ) -> Result<(), ControlError> {
        self.resync = true;
        let mut unknown = Vec::new();
        for svc in services {
            unknown.push((svc.name.as_str(), self.rewrite(dp, store, svc).await?));
        }
        self.resync = false;
        for (service, owners) in unknown {
            self.note_unknown(service, owners);
        }
        tracing::debug!("data path written again from the store");
        Ok(())
    }
}
