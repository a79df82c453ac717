//! Start and reload, the store's part: every service's starting
//! assignment is decided from what the store holds and the plan, writing
//! nothing ([`Settled::decide`]), and stored only once everything else that
//! can refuse has said yes ([`Settled::store`]).
//!
//! Other hosts keep changing the store in between, so the store step does
//! not write what was decided: it applies the same rule again to the
//! assignment as it is then, as one compare-and-swap
//! ([`CoordStore::rewrite`]), so a move made meanwhile stands; only the
//! owners the decision found no longer configured lose their groups (an
//! owner named since is another host's newer instance). A host whose init
//! lost the race takes the winner's assignment. The plan (and so the
//! data path) is then given what the store holds. Undoing a store step
//! ([`Undo`]) gives back only the groups it changed, each only if nobody
//! changed it since.

use std::collections::{BTreeMap, HashMap};

use sluice_common::maps::NO_OWNER;

use super::{ControlError, UNOWNED};
use crate::{
    config::Config,
    coord::{CoordError, CoordStore, GroupEntry, Version, check_partition},
    plan::{Group, Plan},
};

/// What [`Controller::settle`](super::Controller::settle) decided for each
/// service, to be stored by [`Controller::commit`](super::Controller::commit).
pub struct Settled {
    steps: Vec<Step>,
}

/// One service's decision and what is needed to take it again.
struct Step {
    service: String,
    /// Index of the service in the plan.
    index: usize,
    decided: StoreStep,
    /// The plan's assignment, for a service the store has none of.
    wanted: Vec<(Group, String)>,
    /// Every instance that may own a group (this host's and the others').
    configured: Vec<String>,
    /// This host's instances that take a dropped instance's groups first.
    preferred: Vec<String>,
    /// The stored owners the decision found no longer configured: only
    /// they lose their groups. An owner the store names later (another
    /// host's instance registered since this host read the cluster, or
    /// named by the init that beat this host's) keeps its groups.
    gone: Vec<String>,
    on_demand: bool,
    /// Instance name to id (the unowned name to `NO_OWNER`).
    ids: HashMap<String, u32>,
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

/// Who takes a dropped instance's groups: this host's live instances that
/// are not reserved, or, if there is none, the other hosts' (never this
/// host's failed or reserved ones: found by the simulation, a reload
/// dropping an instance beside a failed one dealt groups to the failed
/// one).
fn takers<'a>(
    sc: &'a crate::config::Service,
    configured: &[&'a str],
    live: impl Fn(&str) -> bool,
) -> Vec<&'a str> {
    let own: Vec<&str> = sc
        .instances
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !sc.is_reserved(n) && live(n))
        .collect();
    if !own.is_empty() {
        return own;
    }
    configured
        .iter()
        .copied()
        .filter(|n| !sc.instances.iter().any(|i| i.name == *n))
        .collect()
}

/// Settles one service's starting assignment from what the store holds
/// (`None`: nothing), the instance names that may own groups
/// (`configured`: this host's and the other hosts'), the ones that take a
/// dropped instance's groups (`preferred`) and the plan's assignment
/// (`wanted`). A stored assignment is kept as far as it can be: only the
/// groups of instances no longer configured change hands, so every other
/// flow stays where it is. They go round robin over `preferred` (this
/// host's live instances that are not reserved: when every host reloads at
/// once, another host's instance may be being dropped too), over every
/// configured instance if there is none, or unowned (claimed by the next
/// packet) for an on-demand service.
#[must_use]
pub fn settle_service(
    stored: Option<&[GroupEntry]>,
    configured: &[&str],
    preferred: &[&str],
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
    let takers = if preferred.is_empty() {
        configured
    } else {
        preferred
    };
    let mut next = takers.iter().cycle();
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

impl Step {
    /// The rule again, on the assignment as the store has it at the write:
    /// the owners to write, or `None` to leave it.
    fn again(&self, stored: Option<&[GroupEntry]>) -> Option<Vec<(Group, String)>> {
        let new_owners = stored
            .into_iter()
            .flatten()
            .map(|e| e.owner.as_str())
            .filter(|o| !self.gone.iter().any(|g| g == o));
        let configured: Vec<&str> = self
            .configured
            .iter()
            .map(String::as_str)
            .chain(new_owners)
            .collect();
        let preferred: Vec<&str> = self.preferred.iter().map(String::as_str).collect();
        match settle_service(
            stored,
            &configured,
            &preferred,
            self.wanted.clone(),
            self.on_demand,
        ) {
            StoreStep::Resume(_) => None,
            StoreStep::Init(g) | StoreStep::Reset(g, _) => Some(g),
        }
    }
}

/// A group a store step changed: the version it wrote and the owner the
/// group had before.
type Changed = (Group, Version, String);

/// What a store step changed, to be given back if the start or reload
/// fails after it.
#[derive(Debug, Default)]
pub(super) struct Undo {
    /// Per service, the groups the step changed.
    services: Vec<(String, Vec<Changed>)>,
}

impl Undo {
    /// Gives back what the step changed: each changed group still at the
    /// version the step wrote gets its owner back, by compare-and-swap; a
    /// group someone changed since is left as it is. Failures are logged.
    pub(super) async fn apply(self, store: &dyn CoordStore) {
        for (service, changed) in self.services.iter().rev() {
            let back = |now: Option<&[GroupEntry]>| {
                let now = now?;
                let mut any = false;
                let groups = now
                    .iter()
                    .map(|e| {
                        let before = changed
                            .iter()
                            .find(|(g, v, _)| *g == e.group && *v == e.version)
                            .map(|(_, _, o)| o.clone());
                        any |= before.is_some();
                        (e.group, before.unwrap_or_else(|| e.owner.clone()))
                    })
                    .collect();
                any.then_some(groups)
            };
            if let Err(e) = store.rewrite(service, &back).await {
                tracing::error!(service = %service, error = %e, "restoring the previous assignment failed");
            }
        }
    }
}

/// The groups `written` changed from `found`, with their earlier owners
/// (groups whose extent is new have none to go back to, and stay).
fn changes(found: &[GroupEntry], written: &[GroupEntry]) -> Vec<Changed> {
    written
        .iter()
        .filter_map(|w| {
            let before = found.iter().find(|f| f.group == w.group)?;
            (before.owner != w.owner).then(|| (w.group, w.version, before.owner.clone()))
        })
        .collect()
}

impl Settled {
    /// Decides the starting assignment of every service without writing
    /// anything: the store's, if it has one that partitions the units (a
    /// restarted agent resumes it; groups of instances no longer configured
    /// go to this host's live, unreserved instances, or unowned for
    /// on-demand services), else the plan's (even, or what the pinned data
    /// path held). `plan`'s groups are replaced by it, so the data path is
    /// programmed with it.
    pub(super) async fn decide(
        config: &Config,
        plan: &mut Plan,
        store: &dyn CoordStore,
    ) -> Result<Self, ControlError> {
        let mut steps = Vec::with_capacity(plan.services.len());
        for (index, (sp, sc)) in plan.services.iter_mut().zip(&config.services).enumerate() {
            // An unowned group has the empty owner name. Ordered: with a
            // name under two ids, which id wins must not depend on hashing
            // (the simulation replays runs exactly).
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
            let ids: HashMap<String, u32> =
                names.iter().map(|(id, n)| ((*n).to_owned(), *id)).collect();
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
            let live = |name: &str| {
                plan.instances
                    .iter()
                    .any(|i| i.service_id == sp.id && i.name == name && i.live)
            };
            let preferred = takers(sc, &configured, live);
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
            let gone: Vec<String> = stored
                .iter()
                .flatten()
                .filter(|e| e.owner != UNOWNED && !configured.contains(&e.owner.as_str()))
                .map(|e| e.owner.clone())
                .collect();
            let step = settle_service(
                stored.as_deref(),
                &configured,
                &preferred,
                wanted.clone(),
                sc.on_demand,
            );
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
            steps.push(Step {
                service: sp.name.clone(),
                index,
                decided: step,
                wanted,
                configured: configured.iter().map(|n| (*n).to_owned()).collect(),
                preferred: preferred.iter().map(|n| (*n).to_owned()).collect(),
                gone,
                on_demand: sc.on_demand,
                ids,
            });
        }
        Ok(Self { steps })
    }

    /// Stores the decided assignments, each by the rule applied again to
    /// the store as it is at the write (see the module), and gives `plan`
    /// the groups the store then holds. If a write fails, what the
    /// services already written changed is given back ([`Undo::apply`]),
    /// and the error is returned; else what to give back if the start or
    /// reload fails later.
    pub(super) async fn store(
        self,
        store: &dyn CoordStore,
        plan: &mut Plan,
    ) -> Result<Undo, ControlError> {
        let mut undo = Undo::default();
        for step in &self.steps {
            let again = |stored: Option<&[GroupEntry]>| step.again(stored);
            let r = match store.rewrite(&step.service, &again).await {
                Ok(r) => r,
                Err(e) => {
                    undo.apply(store).await;
                    return Err(e.into());
                }
            };
            if r.written
                && let Some(found) = &r.found
            {
                undo.services
                    .push((step.service.clone(), changes(found, &r.entries)));
            }
            let decided = step.decided.groups();
            let now: Vec<(Group, String)> = r
                .entries
                .iter()
                .map(|e| (e.group, e.owner.clone()))
                .collect();
            if now != decided {
                tracing::info!(service = %step.service, "the store changed since the start was decided; following it");
            }
            plan.services[step.index].groups = now
                .iter()
                .map(|(g, o)| {
                    let id = step.ids.get(o.as_str()).copied().unwrap_or_else(|| {
                        // An instance registered after this host read the
                        // cluster: unowned here until the next look.
                        tracing::warn!(service = %step.service, group = %g, owner = %o, "the store names an instance this host does not know yet");
                        NO_OWNER
                    });
                    (*g, id)
                })
                .collect();
        }
        Ok(undo)
    }
}

#[cfg(test)]
mod tests;
