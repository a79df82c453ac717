//! The elements' decisions: each interval, every local instance's WLM
//! element ([`wlm::decide`]) weighs itself against its peers, most loaded
//! first, and its move is applied at once ([`wlm::apply`]: the store, then
//! the data path), so the elements after it see it.

use std::time::Instant;

use super::{
    ControlError, MoveEvent, Out,
    moves::Mover,
    services::ServiceCtl,
    wlm::{self, Action, MoveLimiter, Sample, View},
};
use crate::coord::CoordError;

/// Every element's decision, most loaded first, each applied as it is
/// made (within the move `limiter`): an element of an instance not `out`
/// weighs itself against its peers and may split, give, reclaim or merge.
pub(super) async fn step(
    mv: &mut Mover<'_>,
    services: &mut [ServiceCtl],
    limiter: &mut MoveLimiter,
    out: Out<'_>,
    now: Instant,
) -> Result<Vec<MoveEvent>, ControlError> {
    let mut made = Vec::new();
    for svc in services {
        // Most loaded elements act first.
        let mut order: Vec<usize> = (0..svc.instances.len()).collect();
        order.sort_by(|&a, &b| {
            let s = &svc.instances;
            s[b].sample.utilisation.total_cmp(&s[a].sample.utilisation)
        });
        // The samples as later elements of this interval see them: a
        // move made earlier in the interval is counted at once, so two
        // elements do not both act on the same imbalance.
        let mut samples: Vec<Sample> = svc
            .instances
            .iter()
            .map(|i| i.sample)
            .chain(svc.remote.iter().map(|r| r.sample))
            .collect();
        // Whether this host joins (see `wlm`): judged once, for every
        // element at its first decision, from the interval's start.
        let host_idle = if svc.instances.iter().any(|i| i.state.is_new()) {
            let a = mv.store.groups(&svc.name).await?;
            a.iter()
                .all(|e| !svc.instances.iter().any(|i| i.name == e.owner))
        } else {
            false
        };
        for ii in order {
            if out.contains(&svc.instances[ii].name) {
                continue;
            }
            let assignment = mv.store.groups(&svc.name).await?;
            let peers = svc.peers(ii, &samples, |n| out.contains(n));
            let me = &svc.instances[ii];
            let view = View {
                me: &me.name,
                cfg: &svc.cfg,
                thresholds: svc.thresholds,
                now,
                sample: samples[ii],
                assignment: &assignment,
                buckets: &svc.buckets,
                peers: &peers,
                host_idle,
            };
            let mut state = me.state.clone();
            let action = wlm::decide(&mut state, &view);
            svc.instances[ii].state = state;
            let Some(action) = action else { continue };
            if !matches!(action, Action::Coalesce { .. }) && !limiter.try_take(now) {
                continue;
            }
            let (name, me_name) = (svc.name.clone(), svc.instances[ii].name.clone());
            match wlm::apply(mv.store, &name, &me_name, &action).await {
                Ok(applied) => {
                    if let Some((g, from, to)) = &applied.moved {
                        svc.account(&mut samples, *g, from, to);
                        mv.write(svc, *g, to)?;
                        svc.instances[ii].state.moved(now);
                        let e = MoveEvent {
                            at: now,
                            service: name,
                            kind: applied.kind,
                            group: Some(*g),
                            from: from.clone(),
                            to: to.clone(),
                        };
                        made.push(e.clone());
                        mv.record(e);
                    } else {
                        mv.record(MoveEvent {
                            at: now,
                            service: name,
                            kind: applied.kind,
                            group: None,
                            from: me_name.clone(),
                            to: me_name,
                        });
                    }
                }
                Err(CoordError::Conflict { .. }) => {
                    tracing::debug!(service = %name, ?action, "lost a race; deciding again next interval");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(made)
}
