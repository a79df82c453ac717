//! Keeping the data path in step with the store: every owner the loop
//! writes goes through [`Reconciler::write`], which notes a failed write;
//! the data path is then behind the store until every group is written
//! again from it ([`Reconciler::catch_up`], at the next interval). Another
//! writer's change to the store is followed the same way
//! ([`Reconciler::follow`]).

use sluice_common::maps::NO_OWNER;

use super::{ControlError, UNOWNED, services::ServiceCtl};
use crate::{coord::CoordStore, datapath::Datapath, plan::Group};

/// Whether the data path may disagree with the store.
#[derive(Default)]
pub(super) struct Reconciler {
    /// A data path write failed: the data path may disagree with the store
    /// until every group is written again (next interval).
    resync: bool,
}

impl Reconciler {
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

    /// Every group written again if an earlier write failed.
    pub(super) async fn catch_up(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        services: &[ServiceCtl],
    ) -> Result<(), ControlError> {
        if self.resync {
            self.resync(dp, store, services).await?;
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
                Some(svc) => self.rewrite(dp, store, svc).await,
                // Not one of ours (another cluster's service shares etcd).
                None => Ok(()),
            },
        };
        if r.is_err() {
            self.resync = true;
        }
        r
    }

    /// `svc`'s groups written into `dp` again from the store. An owner this
    /// host does not know yet (an instance another host registered since
    /// this one last read the cluster) is reported after the rest is
    /// written.
    async fn rewrite(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        svc: &ServiceCtl,
    ) -> Result<(), ControlError> {
        let mut unknown = None;
        for e in store.groups(&svc.name).await? {
            match self.write(dp, svc, e.group, &e.owner) {
                Ok(()) => {}
                Err(err @ ControlError::UnknownInstance { .. }) => unknown = Some(err),
                Err(err) => return Err(err),
            }
        }
        unknown.map_or(Ok(()), Err)
    }

    /// Every group of every service written into `dp` again from the
    /// store, so the data path converges to it.
    pub(super) async fn resync(
        &mut self,
        dp: &mut dyn Datapath,
        store: &dyn CoordStore,
        services: &[ServiceCtl],
    ) -> Result<(), ControlError> {
        let mut unknown = None;
        for svc in services {
            match self.rewrite(dp, store, svc).await {
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
}
