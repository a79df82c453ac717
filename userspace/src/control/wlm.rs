//! The WLM element policy: one autonomous element per instance decides,
//! from its own utilisation and what its peers publish, whether to shed
//! work (split its hottest group, give a half away) or take work. How an
//! under-loaded element takes work is the service's [`WlmPolicy`]:
//! - spread (the default) takes a group, or half of one, only from a peer
//!   more than `balance_band` more loaded than itself, and only so much that
//!   it ends no more loaded than that peer. Every such move lowers the sum
//!   of squared utilisations, so under steady load the loop comes to rest,
//!   with the work spread over every instance;
//! - pack reclaims a buddy group from another under-loaded peer, merging
//!   the two, so work gathers onto few instances and the rest go idle.
//!
//! A joining element — under spread, one whose first decision comes at an
//! interval that started with no instance of the service on its host
//! owning a unit: a host joining the cluster, or back after the others took
//! its groups — first takes its share by unit count ([`join`]): each interval
//! while it is under-loaded, before cooldown and sustain, one aligned part
//! (a power of two of units, split off as needed) from the peer holding
//! the most units, as much as the peer holds above the share and the
//! element lacks below it (the share: the owned units over the element and
//! its peers). It stops for good once either gap is under
//! `min_group_units` (the element is then short of its share by less than
//! that times the number of peers), or the part would overload it; from
//! then on load alone moves work. Each element makes at most one move an
//! interval and every move takes a token of the agent's move limit, so a
//! join is not a storm. An instance added to a host that owns units, or
//! restarted beside one, takes work by load only, as does every instance
//! with `underload = 0`.
//!
//! Pure logic: the agent feeds it samples and applies what it returns
//! through the coordination store, so it is tested without a kernel.
//!
//! Stability comes from four things: a threshold must hold for `sustain`
//! intervals (hysteresis in time); overload and under-load thresholds are
//! apart (hysteresis in level); an element moves at most once per
//! `cooldown`; and every move is projected first — a receiver must stay
//! under its overload threshold, a merge must leave the taker under the
//! midpoint of the two thresholds. The thresholds are judged by
//! [`Thresholds`], with an SLA window's overload if one is in force.

use std::time::{Duration, Instant};

use super::qos::Thresholds;
use crate::{
    config::{WlmConfig, WlmPolicy},
    coord::{CoordError, CoordStore, GroupEntry, Version},
    plan::Group,
};

/// What an element measured over the last interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Packets per second the data path delivered to the instance.
    pub rate_pps: f64,
    /// Receive-buffer drops per second inside the instance.
    pub drops_ps: f64,
    /// The combined utilisation (see [`super::qos::utilisation`]).
    pub utilisation: f64,
}

/// A peer as an element sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub name: String,
    pub sample: Sample,
    /// Highest rate the peer has shown it can absorb without drops, if it
    /// has ever dropped (see [`ElementState::ceiling_pps`]).
    pub ceiling_pps: Option<f64>,
}

impl Sample {
    /// The sample as it would read with `pps` more (or, negative, less)
    /// traffic: how the loop accounts a move it made earlier in the same
    /// interval, before the next measurement shows it.
    #[must_use]
    pub fn shifted(self, pps: f64, capacity_pps: f64) -> Self {
        Self {
            rate_pps: (self.rate_pps + pps).max(0.0),
            utilisation: (self.utilisation + pps / capacity_pps).max(0.0),
            ..self
        }
    }
}

/// Quiet intervals before a learned ceiling starts to relax; doubled each
/// time the instance drops again after a relaxation, up to [`MAX_HOLD`].
const FIRST_HOLD: u32 = 100;
const MAX_HOLD: u32 = 6400;

/// Memory of one element across intervals.
#[derive(Clone, Debug, Default)]
pub struct ElementState {
    over: u32,
    under: u32,
    last_move: Option<Instant>,
    /// Rate the instance absorbed while dropping: its real capacity when it
    /// is below the configured one (a slow container). After `hold` quiet
    /// intervals it grows back 5% per quiet interval, so a recovered
    /// instance regains work gradually, while one that is really slow is
    /// probed ever more rarely (each probe costs a few drops).
    ceiling_pps: Option<f64>,
    quiet: u32,
    hold: u32,
    relaxed: bool,
    /// Whether the element is taking its share by unit count (see the
    /// module); `None` until its first decision.
    joining: Option<bool>,
}

impl ElementState {
    #[must_use]
    pub const fn ceiling_pps(&self) -> Option<f64> {
        self.ceiling_pps
    }

    /// Whether the element has not decided yet (whether it joins is judged
    /// at its first decision).
    #[must_use]
    pub const fn is_new(&self) -> bool {
        self.joining.is_none()
    }

    /// Records that this element made a move at `now` (starts the cooldown).
    pub fn moved(&mut self, now: Instant) {
        self.last_move = Some(now);
        self.over = 0;
        self.under = 0;
    }
}

/// A move an element wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Split `group` (at `version`), and the part holding `give` again
    /// until `give` is a group of its own, and give that to `to`.
    Shed {
        group: Group,
        version: Version,
        give: Group,
        to: String,
    },
    /// Give the whole `group` to `to` (it is at the minimum size).
    Give {
        group: Group,
        version: Version,
        to: String,
    },
    /// Take `part` of `group` (all of it, or a piece split off as for
    /// `Shed`) from the more loaded `from`.
    Take {
        group: Group,
        version: Version,
        part: Group,
        from: String,
    },
    /// Take `buddy` back from `from` and merge it with `mine`.
    Reclaim {
        mine: (Group, Version),
        buddy: (Group, Version),
        from: String,
    },
    /// Merge two buddies this element already owns (bookkeeping only).
    Coalesce {
        a: (Group, Version),
        b: (Group, Version),
    },
}

/// Rate of `group` from per-bucket rates (`buckets[i]` covers units
/// `i*size .. (i+1)*size`); a group smaller than a bucket gets its share.
#[must_use]
pub fn group_rate(group: Group, buckets: &[f64]) -> f64 {
    if buckets.is_empty() {
        return 0.0;
    }
    let bucket_units =
        sluice_common::UNITS_PER_SERVICE / u32::try_from(buckets.len()).expect("few buckets");
    let first = group.base() / bucket_units;
    if group.size() <= bucket_units {
        return buckets[first as usize] * f64::from(group.size()) / f64::from(bucket_units);
    }
    let n = group.size() / bucket_units;
    buckets[first as usize..(first + n) as usize].iter().sum()
}

/// Everything one decision looks at.
pub struct View<'a> {
    pub me: &'a str,
    /// The service's WLM settings; its load is judged by `thresholds`,
    /// not by the overload and under-load here.
    pub cfg: &'a WlmConfig,
    /// The thresholds in force (an SLA window may have set the overload).
    pub thresholds: Thresholds,
    pub now: Instant,
    pub sample: Sample,
    /// The service's whole assignment.
    pub assignment: &'a [GroupEntry],
    /// Per-bucket packet rates of the service.
    pub buckets: &'a [f64],
    /// The service's other instances.
    pub peers: &'a [Peer],
    /// Whether no instance of the service on this host owned a unit at
    /// the start of the interval (its elements then join; see the module).
    pub host_idle: bool,
}

impl View<'_> {
    /// Utilisation `peer` would have with `extra_pps` more.
    fn projected(&self, sample: Sample, ceiling: Option<f64>, extra_pps: f64) -> f64 {
        let rate = sample.rate_pps + extra_pps;
        let by_rate = rate / self.cfg.capacity_pps;
        let by_ceiling = ceiling.map_or(0.0, |c| rate / c.max(1.0));
        (sample.utilisation + extra_pps / self.cfg.capacity_pps)
            .max(by_rate)
            .max(by_ceiling)
    }
}

/// One decision of one element. Updates `state`; returns the move to make,
/// if any. The caller applies it and then calls [`ElementState::moved`].
pub fn decide(state: &mut ElementState, v: &View<'_>) -> Option<Action> {
    let s = v.sample;
    learn_ceiling(state, s, v.cfg.capacity_pps);

    let mine: Vec<&GroupEntry> = v.assignment.iter().filter(|e| e.owner == v.me).collect();
    // Buddies both owned here merge at once: no traffic moves.
    if let Some(a) = mine.iter().find_map(|a| {
        let b = a.group.buddy()?;
        mine.iter()
            .find(|e| e.group == b)
            .map(|b| Action::Coalesce {
                a: (a.group, a.version),
                b: (b.group, b.version),
            })
    }) {
        return Some(a);
    }

    if v.thresholds.is_overloaded(s.utilisation) {
        state.over += 1;
        state.under = 0;
    } else if v.thresholds.is_underloaded(s.utilisation) {
        state.under += 1;
        state.over = 0;
    } else {
        state.over = 0;
        state.under = 0;
    }
    if v.cfg.policy != WlmPolicy::Spread {
        state.joining = Some(false);
    }
    if *state.joining.get_or_insert(v.host_idle) && v.thresholds.is_underloaded(s.utilisation) {
        if let Some(a) = join(state, v) {
            return Some(a);
        }
        state.joining = Some(false);
    }
    if state
        .last_move
        .is_some_and(|t| v.now.duration_since(t) < v.cfg.cooldown)
    {
        return None;
    }
    if state.over >= v.cfg.sustain {
        return shed(state, v, &mine);
    }
    if state.under >= v.cfg.sustain {
        return match v.cfg.policy {
            WlmPolicy::Spread => take(state, v),
            WlmPolicy::Pack => reclaim(state, v, &mine),
        };
    }
    None
}

/// Learns the real capacity of a dropping instance, and lets it grow back
/// once the instance has been quiet for the hold.
fn learn_ceiling(state: &mut ElementState, s: Sample, capacity_pps: f64) {
    if s.drops_ps > 0.0 {
        let absorbed = (s.rate_pps - s.drops_ps).max(1.0);
        state.ceiling_pps = Some(state.ceiling_pps.map_or(absorbed, |c| c.min(absorbed)));
        // Dropping again after the ceiling relaxed: it is really slow.
        state.hold = if state.relaxed {
            (state.hold * 2).min(MAX_HOLD)
        } else {
            state.hold.max(FIRST_HOLD)
        };
        state.relaxed = false;
        state.quiet = 0;
    } else if let Some(c) = state.ceiling_pps {
        state.quiet = state.quiet.saturating_add(1);
        if state.quiet > state.hold {
            state.relaxed = true;
            let grown = c.max(s.rate_pps) * 1.05;
            state.ceiling_pps = (grown < capacity_pps).then_some(grown);
        }
    }
}

fn shed(state: &ElementState, v: &View<'_>, mine: &[&GroupEntry]) -> Option<Action> {
    let s = v.sample;
    // How much to give away: down to the midpoint, or, when dropping, to
    // 70% of what the instance showed it can absorb.
    let keep = match state.ceiling_pps {
        Some(c) if s.drops_ps > 0.0 || s.rate_pps > c => 0.7 * c,
        _ => v.thresholds.midpoint() * v.cfg.capacity_pps,
    };
    let want = (s.rate_pps - keep).max(0.0);
    let hottest = mine
        .iter()
        .max_by(|a, b| group_rate(a.group, v.buckets).total_cmp(&group_rate(b.group, v.buckets)))?;
    if group_rate(hottest.group, v.buckets) <= 0.0 {
        return None;
    }
    // The least utilised peer that stays under overload with `rate` more.
    let receiver = |rate: f64| {
        v.peers
            .iter()
            .filter(|p| {
                v.thresholds
                    .is_below_overload(v.projected(p.sample, p.ceiling_pps, rate))
            })
            .min_by(|a, b| a.sample.utilisation.total_cmp(&b.sample.utilisation))
    };
    // Halve the hottest group, and keep halving the half nearest what we
    // want to shed while no peer has room for it (a hot range then leaves
    // in pieces); never an idle half, which would move nothing.
    let mut part = hottest.group;
    while part.size() > v.cfg.min_group_units {
        let (lo, hi) = part.split()?;
        let (rl, rh) = (group_rate(lo, v.buckets), group_rate(hi, v.buckets));
        let pick_lo = if rl <= 0.0 {
            false
        } else if rh <= 0.0 {
            true
        } else {
            (rl - want).abs() <= (rh - want).abs()
        };
        part = if pick_lo { lo } else { hi };
        if let Some(to) = receiver(group_rate(part, v.buckets)) {
            return Some(Action::Shed {
                group: hottest.group,
                version: hottest.version,
                give: part,
                to: to.name.clone(),
            });
        }
    }
    if hottest.group.size() > v.cfg.min_group_units || mine.len() < 2 {
        return None;
    }
    let to = receiver(group_rate(hottest.group, v.buckets))?;
    Some(Action::Give {
        group: hottest.group,
        version: hottest.version,
        to: to.name.clone(),
    })
}

/// Spread: the move from a more loaded peer that narrows the gap most
/// without reversing it. Candidates are each of the peers' groups and
/// every aligned part of them down to the minimum size (at most two per
/// unit group of that size, so a few hundred per service).
fn take(state: &ElementState, v: &View<'_>) -> Option<Action> {
    let me_now = v.projected(v.sample, state.ceiling_pps, 0.0);
    let mut best: Option<(f64, Action)> = None;
    for peer in v.peers {
        let peer_now = v.projected(peer.sample, peer.ceiling_pps, 0.0);
        if peer_now - me_now <= v.cfg.balance_band {
            continue;
        }
        for e in v.assignment.iter().filter(|e| e.owner == peer.name) {
            let mut parts = vec![e.group];
            while let Some(part) = parts.pop() {
                // An idle part has only idle parts: none would move load.
                let rate = group_rate(part, v.buckets);
                if rate <= 0.0 {
                    continue;
                }
                if part.size() > v.cfg.min_group_units
                    && let Some((lo, hi)) = part.split()
                {
                    parts.extend([lo, hi]);
                }
                let me_after = v.projected(v.sample, state.ceiling_pps, rate);
                let peer_after = v.projected(peer.sample, peer.ceiling_pps, -rate);
                if !v.thresholds.is_below_overload(me_after) || me_after > peer_after {
                    continue;
                }
                let gain =
                    me_now.powi(2) + peer_now.powi(2) - me_after.powi(2) - peer_after.powi(2);
                if best.as_ref().is_none_or(|(g, _)| gain > *g) {
                    best = Some((
                        gain,
                        Action::Take {
                            group: e.group,
                            version: e.version,
                            part,
                            from: peer.name.clone(),
                        },
                    ));
                }
            }
        }
    }
    best.map(|(_, a)| a)
}

/// A joining element's next part of its share by unit count (see the
/// module), or `None` when it has its share or there is nothing to take.
fn join(state: &ElementState, v: &View<'_>) -> Option<Action> {
    let units = |name: &str| -> u32 {
        v.assignment
            .iter()
            .filter(|e| e.owner == name)
            .map(|e| e.group.size())
            .sum()
    };
    // Unowned units (an on-demand service's) are nobody's share.
    let owned: u32 = v
        .assignment
        .iter()
        .filter(|e| !e.owner.is_empty())
        .map(|e| e.group.size())
        .sum();
    let members = u32::try_from(v.peers.len() + 1).unwrap_or(u32::MAX);
    let share = owned / members;
    let (donor, held) = v
        .peers
        .iter()
        .map(|p| (p, units(&p.name)))
        .max_by_key(|(p, held)| (*held, std::cmp::Reverse(p.name.clone())))?;
    let want = share
        .saturating_sub(units(v.me))
        .min(held.saturating_sub(share));
    if want < v.cfg.min_group_units.max(1) {
        return None;
    }
    let e = v
        .assignment
        .iter()
        .filter(|e| e.owner == donor.name)
        .max_by_key(|e| (e.group.size(), std::cmp::Reverse(e.group.base())))?;
    // The largest power of two of units the gaps allow, from the start of
    // the donor's largest group.
    let size = (1u32 << want.ilog2()).min(e.group.size());
    let part = Group::new(
        e.group.base(),
        e.group.prefix_len() + (e.group.size() / size).ilog2(),
    )
    .expect("an aligned part of the group");
    let rate = group_rate(part, v.buckets);
    if !v
        .thresholds
        .is_below_overload(v.projected(v.sample, state.ceiling_pps, rate))
    {
        return None;
    }
    Some(Action::Take {
        group: e.group,
        version: e.version,
        part,
        from: donor.name.clone(),
    })
}

/// Pack: a buddy of one of my groups from another under-loaded peer, if I
/// stay under the thresholds' midpoint.
fn reclaim(state: &ElementState, v: &View<'_>, mine: &[&GroupEntry]) -> Option<Action> {
    let mut by_size: Vec<&&GroupEntry> = mine.iter().collect();
    by_size.sort_by_key(|e| std::cmp::Reverse(e.group.size()));
    for m in by_size {
        let Some(buddy) = m.group.buddy() else {
            continue;
        };
        let Some(b) = v.assignment.iter().find(|e| e.group == buddy) else {
            continue;
        };
        let Some(peer) = v.peers.iter().find(|p| p.name == b.owner) else {
            continue;
        };
        if !v.thresholds.is_underloaded(peer.sample.utilisation) {
            continue;
        }
        let rate = group_rate(buddy, v.buckets);
        if !v
            .thresholds
            .is_below_midpoint(v.projected(v.sample, state.ceiling_pps, rate))
        {
            continue;
        }
        return Some(Action::Reclaim {
            mine: (m.group, m.version),
            buddy: (b.group, b.version),
            from: b.owner.clone(),
        });
    }
    None
}

/// A token bucket over all elements: at most `rate` moves a second, with
/// bursts of one.
#[derive(Debug)]
pub struct MoveLimiter {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl MoveLimiter {
    #[must_use]
    pub fn new(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            tokens: 1.0,
            at: now,
        }
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(1.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until the next token.
    #[must_use]
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }
}

/// What applying an action changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `split`, `merge`, `give`, `take` or `reclaim`.
    pub kind: &'static str,
    /// The group whose packets now go elsewhere: (group, from, to).
    pub moved: Option<(Group, String, String)>,
}

/// Splits `group` and then the half holding `part`, until `part` is a
/// group of its own; returns its version. If a later step loses a race,
/// the groups split so far stay split (same owner, nothing moved).
async fn split_down(
    store: &dyn CoordStore,
    service: &str,
    (mut group, mut version): (Group, Version),
    part: Group,
) -> Result<Version, CoordError> {
    while group != part {
        let halves = store.split(service, group, version).await?;
        let next = halves
            .iter()
            .find(|h| h.group.contains(part.base()))
            .expect("part lies in group");
        (group, version) = (next.group, next.version);
    }
    Ok(version)
}

/// Carries out `action` of element `me` in the store. Every step is a
/// compare-and-swap: if anything changed since the decision, it fails with
/// a conflict and the next interval decides again.
pub async fn apply(
    store: &dyn CoordStore,
    service: &str,
    me: &str,
    action: &Action,
) -> Result<Applied, CoordError> {
    match action {
        Action::Shed {
            group,
            version,
            give,
            to,
        } => {
            let at = split_down(store, service, (*group, *version), *give).await?;
            store.move_group(service, *give, at, to).await?;
            Ok(Applied {
                kind: "split",
                moved: Some((*give, me.to_owned(), to.clone())),
            })
        }
        Action::Give { group, version, to } => {
            store.move_group(service, *group, *version, to).await?;
            Ok(Applied {
                kind: "give",
                moved: Some((*group, me.to_owned(), to.clone())),
            })
        }
        Action::Take {
            group,
            version,
            part,
            from,
        } => {
            let at = split_down(store, service, (*group, *version), *part).await?;
            store.move_group(service, *part, at, me).await?;
            Ok(Applied {
                kind: "take",
                moved: Some((*part, from.clone(), me.to_owned())),
            })
        }
        Action::Reclaim { mine, buddy, from } => {
            let v = store.move_group(service, buddy.0, buddy.1, me).await?;
            // The move is what matters to traffic; the merge is bookkeeping
            // and, if it loses a race, the next interval coalesces.
            let _ = store.merge(service, *mine, (buddy.0, v)).await;
            Ok(Applied {
                kind: "reclaim",
                moved: Some((buddy.0, from.clone(), me.to_owned())),
            })
        }
        Action::Coalesce { a, b } => {
            store.merge(service, *a, *b).await?;
            Ok(Applied {
                kind: "merge",
                moved: None,
            })
        }
    }
}

#[cfg(test)]
mod tests;
