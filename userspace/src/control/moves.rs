//! Carrying moves out and keeping their record: a move goes into the store
//! first (compare-and-swap), then into the data path (through the
//! [`Reconciler`]), then into the [`History`].

use std::time::Instant;

use super::{ControlError, MoveEvent, reconcile::Reconciler, services::ServiceCtl};
use crate::{
    coord::{CoordStore, GroupEntry},
    datapath::Datapath,
    plan::Group,
};

/// Most move events kept for `history`.
const HISTORY: usize = 4096;

/// Every move so far (the last [`HISTORY`]).
#[derive(Default)]
pub(super) struct History {
    events: Vec<MoveEvent>,
}

impl History {
    pub(super) fn events(&self) -> &[MoveEvent] {
        &self.events
    }

    /// Logs and counts `e`, and keeps it.
    pub(super) fn record(&mut self, e: MoveEvent) {
        crate::telemetry::moved(&e.service, e.kind);
        tracing::info!(service = %e.service, kind = e.kind, group = ?e.group.map(|g| g.to_string()), from = %e.from, to = %e.to, "move");
        if self.events.len() == HISTORY {
            self.events.remove(0);
        }
        self.events.push(e);
    }
}

/// What a part of the loop moves groups through.
pub(super) struct Mover<'a> {
    pub(super) store: &'a dyn CoordStore,
    pub(super) dp: &'a mut dyn Datapath,
    pub(super) reconciler: &'a mut Reconciler,
    pub(super) history: &'a mut History,
}

impl<'a> Mover<'a> {
    pub(super) fn new(
        store: &'a dyn CoordStore,
        dp: &'a mut dyn Datapath,
        reconciler: &'a mut Reconciler,
        history: &'a mut History,
    ) -> Self {
        Self {
            store,
            dp,
            reconciler,
            history,
        }
    }

    /// Points `group` of `svc` at `to` in the data path (see
    /// [`Reconciler::write`]).
    pub(super) fn write(
        &mut self,
        svc: &ServiceCtl,
        group: Group,
        to: &str,
    ) -> Result<(), ControlError> {
        self.reconciler.write(self.dp, svc, group, to)
    }

    pub(super) fn record(&mut self, e: MoveEvent) {
        self.history.record(e);
    }

    /// Gives every unit of `group` of `svc` to its instance `to`, through
    /// the store and then the data path, as the elements do: a larger
    /// group holding it is split down to it first; smaller groups inside it
    /// move one by one. Each move is recorded as a `kind`.
    pub(super) async fn move_group(
        &mut self,
        svc: &ServiceCtl,
        group: Group,
        to: &str,
        kind: &'static str,
    ) -> Result<Vec<MoveEvent>, ControlError> {
        let service = svc.name.as_str();
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
            self.write(svc, e.group, to)?;
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
}
