//! Claims: a punted frame's unit nobody owns goes, with the
//! `min_group_units`-sized group holding it, to the least utilised
//! instance; equally loaded ones take turns, so a burst of claims spreads
//! evenly. A concurrent claim is settled by the store's compare-and-swap.

use std::time::Instant;

use super::{Claimed, ControlError, MoveEvent, Out, UNOWNED, moves::Mover, services::ServiceCtl};
use crate::coord::CoordError;

/// Whose turn it is among equally loaded claimants.
#[derive(Default)]
pub(super) struct Claims {
    turn: usize,
}

impl Claims {
    /// The owner of `unit` of `svc`, claiming its group for the
    /// least-utilised instance not `out` if nobody owns it. The claimed
    /// group is the `min_group_units`-sized one holding the unit; a
    /// concurrent claim is settled by the store's compare-and-swap (the
    /// loser takes the winner's answer). Returns the owner's instance id,
    /// or `None` if the service has no instance to give it to.
    pub(super) async fn claim(
        &mut self,
        mv: &mut Mover<'_>,
        svc: &ServiceCtl,
        out: Out<'_>,
        unit: u32,
        now: Instant,
    ) -> Result<Option<u32>, ControlError> {
        let name = svc.name.clone();
        let size = svc.cfg.min_group_units;
        let id_of = |owner: &str| svc.instances.iter().find(|i| i.name == owner).map(|i| i.id);
        loop {
            let e = mv.store.group_of(&name, unit).await?;
            if e.owner != UNOWNED {
                // A failed owner's failover is pending (its store write
                // failed): frames for it would go into a dead veth.
                if out.failed(&e.owner) {
                    return Ok(None);
                }
                return Ok(id_of(&e.owner));
            }
            if e.group.size() > size {
                match mv.store.split(&name, e.group, e.version).await {
                    Ok(_) | Err(CoordError::Conflict { .. }) => continue,
                    Err(err) => return Err(err.into()),
                }
            }
            let equals = candidates(svc, out);
            if equals.is_empty() {
                return Ok(None);
            }
            self.turn = self.turn.wrapping_add(1);
            let to = equals[self.turn % equals.len()].clone();
            match mv.store.move_group(&name, e.group, e.version, &to).await {
                Ok(_) => {
                    mv.write(svc, e.group, &to)?;
                    mv.record(MoveEvent {
                        at: now,
                        service: name,
                        kind: "claim",
                        group: Some(e.group),
                        from: UNOWNED.to_owned(),
                        to: to.clone(),
                    });
                    return Ok(id_of(&to));
                }
                Err(CoordError::Conflict { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The owners of `units` of `svc`, as [`Self::claim`] gives them, for a
    /// batch of punted frames: every unowned unit's group is claimed in one
    /// store write for the whole batch
    /// ([`CoordStore::claim_units`](crate::coord::CoordStore::claim_units)),
    /// then written into the data path. Returns each unit's outcome, in order,
    /// and the first failure (the store's, which leaves the units it did
    /// not reach `Failed`, or a data path write's, which the next interval
    /// repairs from the store).
    pub(super) async fn claim_batch(
        &mut self,
        mv: &mut Mover<'_>,
        svc: &ServiceCtl,
        out: Out<'_>,
        units: &[u32],
        now: Instant,
    ) -> (Vec<Claimed>, Option<ControlError>) {
        let size = svc.cfg.min_group_units;
        let equals = candidates(svc, out);
        let turn = self.turn.wrapping_add(1);
        let batch = match mv
            .store
            .claim_units(&svc.name, units, size, &equals, turn)
            .await
        {
            Ok(b) => b,
            Err(e) => return (vec![Claimed::Failed; units.len()], Some(e.into())),
        };
        self.turn = self.turn.wrapping_add(batch.claimed.len());
        let mut error = batch.error.map(ControlError::from);
        for (group, to) in batch.claimed {
            if let Err(e) = mv.write(svc, group, &to) {
                error.get_or_insert(e);
            }
            mv.record(MoveEvent {
                at: now,
                service: svc.name.clone(),
                kind: "claim",
                group: Some(group),
                from: UNOWNED.to_owned(),
                to,
            });
        }
        let outcomes = batch
            .owners
            .iter()
            .map(|o| match o {
                None => Claimed::Failed,
                // A failed owner's failover is pending (its store write
                // failed): frames for it would go into a dead veth.
                Some(o) if o == UNOWNED || out.failed(o) => Claimed::NoOwner,
                Some(o) => owner_claimed(svc, o),
            })
            .collect();
        (outcomes, error)
    }
}

/// A unit's owner `name` as a claim's outcome: a local instance; or one
/// on another host, whose frames are encapsulated there, while its host is
/// live (once it is not, this host's elements take its groups).
fn owner_claimed(svc: &ServiceCtl, name: &str) -> Claimed {
    if let Some(i) = svc.instances.iter().find(|i| i.name == name) {
        return Claimed::Owner(i.id);
    }
    svc.remote
        .iter()
        .find(|r| r.name == name && r.live)
        .map_or(Claimed::NoOwner, |r| Claimed::Remote(r.id))
}

/// Who a claim of `svc` may go to: the least utilised instances (to a
/// twentieth) not `out`, which take turns so that a burst of claims
/// spreads evenly.
fn candidates(svc: &ServiceCtl, out: Out<'_>) -> Vec<String> {
    let candidates: Vec<(u64, &str)> = svc
        .instances
        .iter()
        .filter(|i| !out.contains(&i.name))
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
