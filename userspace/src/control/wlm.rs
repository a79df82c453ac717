//! The WLM element policy: one autonomous element per instance decides,
//! from its own utilisation and what its peers publish, whether to shed
//! work (split its hottest group, give a half away) or take work back
//! (reclaim a buddy group from an under-loaded peer, merging the two).
//!
//! Pure logic: the agent feeds it samples and applies what it returns
//! through the coordination store, so it is tested without a kernel.
//!
//! Stability comes from four things: a threshold must hold for `sustain`
//! intervals (hysteresis in time); overload and under-load thresholds are
//! apart (hysteresis in level); an element moves at most once per
//! `cooldown`; and every move is projected first — a receiver must stay
//! under its overload threshold, a merge must leave the taker under the
//! midpoint of the two thresholds.

use std::time::{Duration, Instant};

use crate::{
    config::WlmConfig,
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

/// Memory of one element across intervals.
#[derive(Clone, Debug, Default)]
pub struct ElementState {
    over: u32,
    under: u32,
    last_move: Option<Instant>,
    /// Rate the instance absorbed while dropping: its real capacity when it
    /// is below the configured one (a slow container). Grows back 5% per
    /// quiet interval, so a recovered instance regains work gradually.
    ceiling_pps: Option<f64>,
}

impl ElementState {
    #[must_use]
    pub const fn ceiling_pps(&self) -> Option<f64> {
        self.ceiling_pps
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
    /// Split `group` (at `version`) and give the half `give` to `to`.
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
    pub cfg: &'a WlmConfig,
    pub now: Instant,
    pub sample: Sample,
    /// The service's whole assignment.
    pub assignment: &'a [GroupEntry],
    /// Per-bucket packet rates of the service.
    pub buckets: &'a [f64],
    /// The service's other instances.
    pub peers: &'a [Peer],
}

impl View<'_> {
    fn midpoint(&self) -> f64 {
        f64::midpoint(self.cfg.overload, self.cfg.underload)
    }

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
    // Learn the real capacity of a dropping instance; let it grow back
    // while it does not drop.
    if s.drops_ps > 0.0 {
        let absorbed = (s.rate_pps - s.drops_ps).max(1.0);
        state.ceiling_pps = Some(state.ceiling_pps.map_or(absorbed, |c| c.min(absorbed)));
    } else if let Some(c) = state.ceiling_pps {
        let grown = c.max(s.rate_pps) * 1.05;
        state.ceiling_pps = (grown < v.cfg.capacity_pps).then_some(grown);
    }

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

    if s.utilisation > v.cfg.overload {
        state.over += 1;
        state.under = 0;
    } else if s.utilisation < v.cfg.underload {
        state.under += 1;
        state.over = 0;
    } else {
        state.over = 0;
        state.under = 0;
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
        return reclaim(state, v, &mine);
    }
    None
}

fn shed(state: &ElementState, v: &View<'_>, mine: &[&GroupEntry]) -> Option<Action> {
    let s = v.sample;
    // How much to give away: down to the midpoint, or, when dropping, to
    // 70% of what the instance showed it can absorb.
    let keep = match state.ceiling_pps {
        Some(c) if s.drops_ps > 0.0 || s.rate_pps > c => 0.7 * c,
        _ => v.midpoint() * v.cfg.capacity_pps,
    };
    let want = (s.rate_pps - keep).max(0.0);
    let hottest = mine
        .iter()
        .max_by(|a, b| group_rate(a.group, v.buckets).total_cmp(&group_rate(b.group, v.buckets)))?;
    let hot_rate = group_rate(hottest.group, v.buckets);
    if hot_rate <= 0.0 {
        return None;
    }
    let (give, split) = match hottest.group.split() {
        Some((lo, hi)) if hottest.group.size() > v.cfg.min_group_units => {
            let (rl, rh) = (group_rate(lo, v.buckets), group_rate(hi, v.buckets));
            // The half whose rate is nearest what we want to shed; never an
            // idle half, which would move nothing.
            let pick_lo = if rl <= 0.0 {
                false
            } else if rh <= 0.0 {
                true
            } else {
                (rl - want).abs() <= (rh - want).abs()
            };
            if pick_lo { (lo, true) } else { (hi, true) }
        }
        _ if mine.len() > 1 => (hottest.group, false),
        _ => return None,
    };
    let give_rate = group_rate(give, v.buckets);
    let to = v
        .peers
        .iter()
        .filter(|p| v.projected(p.sample, p.ceiling_pps, give_rate) < v.cfg.overload)
        .min_by(|a, b| a.sample.utilisation.total_cmp(&b.sample.utilisation))?;
    Some(if split {
        Action::Shed {
            group: hottest.group,
            version: hottest.version,
            give,
            to: to.name.clone(),
        }
    } else {
        Action::Give {
            group: hottest.group,
            version: hottest.version,
            to: to.name.clone(),
        }
    })
}

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
        if peer.sample.utilisation >= v.cfg.underload {
            continue;
        }
        let rate = group_rate(buddy, v.buckets);
        if v.projected(v.sample, state.ceiling_pps, rate) >= v.midpoint() {
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
    /// `split`, `merge`, `give` or `reclaim`.
    pub kind: &'static str,
    /// The group whose packets now go elsewhere: (group, from, to).
    pub moved: Option<(Group, String, String)>,
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
            let halves = store.split(service, *group, *version).await?;
            let half = halves
                .iter()
                .find(|h| h.group == *give)
                .expect("give is a half");
            store
                .move_group(service, half.group, half.version, to)
                .await?;
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
#[expect(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "small test numbers, exact zeros"
)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        coord::{EmbeddedStore, check_partition},
        plan::group as assign,
        testing::ready,
    };

    const BUCKETS: usize = sluice_common::HIT_BUCKETS_PER_SERVICE as usize;

    fn cfg() -> WlmConfig {
        WlmConfig {
            capacity_pps: 1000.0,
            overload: 0.8,
            underload: 0.3,
            sustain: 2,
            cooldown: Duration::from_secs(3),
            min_group_units: 256,
            ..WlmConfig::default()
        }
    }

    /// A service in simulation: per-bucket load, per-instance real
    /// capacity (drain rate), the real store, the real policy.
    struct Sim {
        cfg: WlmConfig,
        names: Vec<String>,
        drain: Vec<f64>,
        buckets: Vec<f64>,
        store: EmbeddedStore,
        states: Vec<ElementState>,
        limiter: MoveLimiter,
        now: Instant,
        /// (interval, instance index) of every traffic move.
        moves: Vec<(usize, usize)>,
        interval: usize,
    }

    impl Sim {
        fn new(cfg: WlmConfig, drain: Vec<f64>, buckets: Vec<f64>) -> Self {
            let names: Vec<String> = (0..drain.len()).map(|i| format!("i{i}")).collect();
            let store = EmbeddedStore::in_memory();
            let groups: Vec<(Group, String)> = assign::even(names.len())
                .into_iter()
                .zip(&names)
                .flat_map(|(gs, n)| gs.into_iter().map(move |g| (g, n.clone())))
                .collect();
            ready(store.init("svc", &groups)).unwrap();
            let now = Instant::now();
            Self {
                cfg,
                states: vec![ElementState::default(); names.len()],
                names,
                drain,
                buckets,
                store,
                limiter: MoveLimiter::new(2.0, now),
                now,
                moves: Vec::new(),
                interval: 0,
            }
        }

        fn samples(&self) -> Vec<Sample> {
            let a = ready(self.store.groups("svc")).unwrap();
            self.names
                .iter()
                .zip(&self.drain)
                .map(|(n, &drain)| {
                    let rate: f64 = a
                        .iter()
                        .filter(|e| &e.owner == n)
                        .map(|e| group_rate(e.group, &self.buckets))
                        .sum();
                    let drops = (rate - drain).max(0.0);
                    let mut u = rate / self.cfg.capacity_pps;
                    if drops > 0.0 {
                        u = u.max(1.0 + drops / rate.max(1.0));
                    }
                    Sample {
                        rate_pps: rate,
                        drops_ps: drops,
                        utilisation: u,
                    }
                })
                .collect()
        }

        fn step(&mut self) {
            self.interval += 1;
            self.now += Duration::from_secs(1);
            let samples = self.samples();
            for i in 0..self.names.len() {
                let assignment = ready(self.store.groups("svc")).unwrap();
                let peers: Vec<Peer> = (0..self.names.len())
                    .filter(|&j| j != i)
                    .map(|j| Peer {
                        name: self.names[j].clone(),
                        sample: samples[j],
                        ceiling_pps: self.states[j].ceiling_pps(),
                    })
                    .collect();
                let view = View {
                    me: &self.names[i],
                    cfg: &self.cfg,
                    now: self.now,
                    sample: samples[i],
                    assignment: &assignment,
                    buckets: &self.buckets,
                    peers: &peers,
                };
                let Some(action) = decide(&mut self.states[i], &view) else {
                    continue;
                };
                let moves_traffic = !matches!(action, Action::Coalesce { .. });
                if moves_traffic && !self.limiter.try_take(self.now) {
                    continue;
                }
                let applied = ready(apply(&self.store, "svc", &self.names[i], &action)).unwrap();
                if applied.moved.is_some() {
                    self.states[i].moved(self.now);
                    self.moves.push((self.interval, i));
                }
                check_partition(
                    ready(self.store.groups("svc"))
                        .unwrap()
                        .iter()
                        .map(|e| &e.group),
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn group_rate_sums_and_shares_buckets() {
        let buckets = vec![1.0; BUCKETS];
        assert!((group_rate(Group::ALL, &buckets) - BUCKETS as f64).abs() < 1e-9);
        let tiny: Group = "0x0000/12".parse().unwrap(); // 16 units of a 256-unit bucket
        assert!((group_rate(tiny, &buckets) - 1.0 / 16.0).abs() < 1e-9);
    }

    #[test]
    fn slow_instance_sheds_until_it_stops_dropping() {
        // Four instances; instance 1 drains only 150 pps of its ~250.
        let mut sim = Sim::new(
            cfg(),
            vec![1e9, 150.0, 1e9, 1e9],
            vec![1000.0 / BUCKETS as f64; BUCKETS],
        );
        for _ in 0..60 {
            sim.step();
        }
        let s = sim.samples();
        assert_eq!(s[1].drops_ps, 0.0, "the slow instance still drops: {s:?}");
        assert!(
            s.iter().all(|x| x.utilisation <= 0.8),
            "someone is overloaded: {s:?}"
        );
        assert!(
            sim.moves.iter().any(|&(_, i)| i == 1),
            "the slow instance shed work"
        );
        let last = sim.moves.iter().map(|m| m.0).max().unwrap();
        assert!(
            last < 40,
            "still moving at interval {last}: {:?}",
            sim.moves
        );
    }

    #[test]
    fn idle_service_merges_back() {
        let mut sim = Sim::new(cfg(), vec![1e9; 4], vec![10.0 / BUCKETS as f64; BUCKETS]);
        // Fragment the table first, as a busy period would have.
        for e in ready(sim.store.groups("svc")).unwrap() {
            if e.group.size() > 1024 {
                ready(sim.store.split("svc", e.group, e.version)).unwrap();
            }
        }
        let before = ready(sim.store.groups("svc")).unwrap().len();
        for _ in 0..120 {
            sim.step();
        }
        let after = ready(sim.store.groups("svc")).unwrap().len();
        assert!(after < before / 2, "groups {before} -> {after}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Under constant load: moves of one element are a cooldown apart,
        /// the groups always partition the units (checked each step), and
        /// the loop settles.
        #[test]
        fn no_oscillation_under_constant_load(
            n in 2usize..6,
            load in 0.05f64..0.55,
            skew in proptest::collection::vec(0.0f64..2.0, BUCKETS),
            slow in proptest::option::of((0usize..6, 50.0f64..400.0)),
        ) {
            let total = load * 1000.0 * n as f64;
            let sum: f64 = skew.iter().sum::<f64>().max(1e-9);
            let buckets: Vec<f64> = skew.iter().map(|w| total * w / sum).collect();
            let mut drain = vec![1e9; n];
            if let Some((i, d)) = slow { drain[i % n] = d; }
            let mut sim = Sim::new(cfg(), drain, buckets);
            for _ in 0..200 {
                sim.step();
            }
            let mut last: HashMap<usize, usize> = HashMap::new();
            for &(t, i) in &sim.moves {
                if let Some(prev) = last.insert(i, t) {
                    prop_assert!(t - prev >= 3, "instance {} moved at {} and {}", i, prev, t);
                }
            }
            let late: Vec<_> = sim.moves.iter().filter(|m| m.0 > 150).collect();
            prop_assert!(late.is_empty(), "still moving after 150 intervals: {:?}", late);
        }
    }
}
