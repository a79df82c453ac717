//! Start and reload, the store's part: every service's starting
//! assignment is decided from what the store holds and the plan, writing
//! nothing ([`Settled::decide`]), and stored only once everything else that
//! can refuse has said yes ([`Settled::store`]).

use std::collections::{BTreeMap, HashMap};

use sluice_common::maps::NO_OWNER;

use super::{ControlError, UNOWNED};
use crate::{
    config::Config,
    coord::{CoordError, CoordStore, GroupEntry, check_partition},
    plan::{Group, Plan},
};

/// What [`Controller::settle`](super::Controller::settle) decided for each
/// service, to be stored by [`Controller::commit`](super::Controller::commit).
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

impl Settled {
    /// Decides the starting assignment of every service without writing
    /// anything: the store's, if it has one that partitions the units (a
    /// restarted agent resumes it; groups of instances no longer configured
    /// go to the others, or unowned for on-demand services), else the
    /// plan's (even, or what the pinned data path held). `plan`'s groups
    /// are replaced by it, so the data path is programmed with it.
    pub(super) async fn decide(
        config: &Config,
        plan: &mut Plan,
        store: &dyn CoordStore,
    ) -> Result<Self, ControlError> {
        let mut steps = Vec::with_capacity(plan.services.len());
        for (sp, sc) in plan.services.iter_mut().zip(&config.services) {
            // An unowned group has the empty owner name. Ordered: with a
            // name under two ids (D4), which id wins must not depend on
            // hashing (the simulation replays runs exactly).
            let mut names: BTreeMap<u32, &str> = plan
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
        Ok(Self { steps })
    }

    /// Stores the decided assignments. If a write fails, the services
    /// already written get their previous assignment back, and the error
    /// is returned.
    pub(super) async fn store(self, store: &dyn CoordStore) -> Result<(), ControlError> {
        let mut undo: Vec<(String, Vec<(Group, String)>)> = Vec::new();
        for (service, step) in &self.steps {
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
        Ok(())
    }
}
