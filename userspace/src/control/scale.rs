//! The scaling policy of a service with `[service.scale]`: when to launch
//! one more instance, when to stop one, how often a failed one may be
//! restarted, and which bounds the SLA windows put in force.
//!
//! Pure logic: no I/O and no clock reads (time comes in as arguments; the
//! one exception is [`WallTime::now_local`], which tests do not use). The
//! agent builds a [`ScaleView`] each control interval, calls
//! [`ScaleState::decide`], carries the decision out, and tells the state
//! with [`ScaleState::changed`].
//!
//! # Rules, in the order they are tried
//!
//! `count` is the live members plus the launches under way (`pending`);
//! members that are not live (failed, drained, being removed) do not
//! count: a failed instance is replaced by the failure rule or, failing
//! that, by `BelowMin`. The bounds and the thresholds are the
//! [`Effective`] ones: the first matching SLA window's, else the
//! service's; above `overload`, below `underload` and below the midpoint
//! are as [`Thresholds`] judges them.
//!
//! 1. Nothing is decided within `cooldown` of the last change (a launch,
//!    a failed launch, a stop), so changes come one at a time. The
//!    counters below still run during the cooldown.
//! 2. `count < min` (and `< max`): launch (`BelowMin`).
//! 3. `count > max`: stop the least-utilised removable live member
//!    (`AboveMax`).
//! 4. Saturated: an interval is saturated when at least one live member
//!    is above `overload` and none is below the midpoint (the WLM cannot
//!    relieve it by moving work). After `out_intervals` consecutive
//!    saturated intervals, with no launch under way and `count < max`:
//!    launch (`Saturated`), and count again from zero. While a launch is
//!    under way the count stays at zero: the newcomer must land and take
//!    work before saturation is judged again.
//! 5. Idle: a live removable member that has owned no group for
//!    `in_intervals` consecutive intervals is stopped (`Idle`); the one
//!    idle longest first.
//! 6. Under-loaded: every live member below `underload` for
//!    `in_intervals` consecutive intervals, and the load spread over one
//!    member fewer (sum of utilisations / (live - 1)) still below the
//!    midpoint: stop the least-utilised removable live member
//!    (`Underloaded`). The projection is what keeps scaling from
//!    flapping: right after a `Saturated` launch every member was at or
//!    above the midpoint, so the same load over one fewer is too.
//!
//! Stops (5, 6) need `count > min`, no launch under way, and never take
//! the last live member (nor does 3). Only removable members (launched by
//! the scaler) are ever stopped; the least-utilised one is picked by
//! utilisation, then fewer groups, then the later in `members`.
//!
//! Failures: [`FailureBudget`] allows `restarts` restarts of an instance
//! within any `window`; [`launch_backoff`] paces retries of failed
//! launches.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::qos::Thresholds;
use crate::config::{FailureRule, ScaleConfig, SlaWindow, WlmConfig};

/// Local wall-clock time as the SLA windows see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallTime {
    /// 0 is Monday.
    pub weekday: u8,
    /// Minute of the day, `0..1440`.
    pub minute: u16,
}

impl WallTime {
    const MINUTES_A_DAY: u32 = 24 * 60;

    /// The host's local time now (the time zone as the C library sees it:
    /// `TZ`, else /etc/localtime). The only impure function here.
    #[must_use]
    pub fn now_local() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX);
        // SAFETY: `tm` is plain integers (and a pointer glibc sets), for
        // which all zeros is a valid value.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live locals; localtime_r is the
        // thread-safe form and writes only `tm`.
        if unsafe { libc::localtime_r(&raw const t, &raw mut tm) }.is_null() {
            // No local time to be had: UTC (1970-01-01 was a Thursday).
            let days = secs / 86_400;
            let minute = u16::try_from(secs % 86_400 / 60).expect("under 1440");
            let weekday = u8::try_from((days + 3) % 7).expect("under 7");
            return Self { weekday, minute };
        }
        Self {
            weekday: u8::try_from((tm.tm_wday + 6) % 7).unwrap_or(0),
            minute: u16::try_from(tm.tm_hour * 60 + tm.tm_min).unwrap_or(0),
        }
    }

    /// This time `minutes` later (for simulated clocks).
    #[must_use]
    pub fn advanced(self, minutes: u32) -> Self {
        let total = u32::from(self.minute) + minutes;
        let days = total / Self::MINUTES_A_DAY;
        Self {
            weekday: u8::try_from((u32::from(self.weekday) + days) % 7).expect("under 7"),
            minute: u16::try_from(total % Self::MINUTES_A_DAY).expect("under 1440"),
        }
    }
}

/// Whether `w` holds at `at`. A window crossing midnight (`to < from`) on
/// day d covers d from `from` to 24:00 and d + 1 from 00:00 to `to`.
#[must_use]
pub fn window_covers(w: &SlaWindow, at: WallTime) -> bool {
    let day = usize::from(at.weekday % 7);
    let m = at.minute;
    if w.from < w.to {
        w.days[day] && (w.from..w.to).contains(&m)
    } else {
        let yesterday = (day + 6) % 7;
        (w.days[day] && m >= w.from) || (w.days[yesterday] && m < w.to)
    }
}

/// The bounds and thresholds in force at some time: the first matching
/// window's overrides, else the service's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Effective {
    pub min_instances: u32,
    pub max_instances: u32,
    /// The WLM thresholds, with the window's overload if it sets one.
    pub thresholds: Thresholds,
    /// Index of the window in force, if any.
    pub window: Option<usize>,
}

/// The bounds and thresholds in force at `at`.
#[must_use]
pub fn effective(scale: &ScaleConfig, wlm: &WlmConfig, at: WallTime) -> Effective {
    let window = scale.windows.iter().position(|w| window_covers(w, at));
    let w = window.map(|i| &scale.windows[i]);
    let own = Thresholds::from(wlm);
    Effective {
        min_instances: w
            .and_then(|w| w.min_instances)
            .unwrap_or(scale.min_instances)
            .min(scale.max_instances),
        max_instances: scale.max_instances,
        thresholds: w
            .and_then(|w| w.overload)
            .map_or(own, |o| own.with_overload(o)),
        window,
    }
}

/// One instance as the scaler sees it this interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub utilisation: f64,
    /// Work unit groups it owns.
    pub groups: usize,
    /// Not failed, not drained, not being removed.
    pub live: bool,
    /// Launched by the scaler: it can stop it.
    pub removable: bool,
}

/// Everything one decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct ScaleView<'a> {
    pub eff: &'a Effective,
    pub cfg: &'a ScaleConfig,
    pub members: &'a [Member<'a>],
    /// Launches under way.
    pub pending: u32,
    pub now: Instant,
}

/// A scaling change to make.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Launch { reason: Reason },
    Stop { name: String, reason: Reason },
}

impl Decision {
    #[must_use]
    pub const fn reason(&self) -> Reason {
        match self {
            Self::Launch { reason } | Self::Stop { reason, .. } => *reason,
        }
    }
}

/// Why a change is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    BelowMin,
    Saturated,
    AboveMax,
    Idle,
    Underloaded,
}

impl Reason {
    /// As a metric label.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::BelowMin => "below_min",
            Self::Saturated => "saturated",
            Self::AboveMax => "above_max",
            Self::Idle => "idle",
            Self::Underloaded => "underloaded",
        }
    }
}

/// Memory of one service's scaler across intervals.
#[derive(Clone, Debug, Default)]
pub struct ScaleState {
    /// Consecutive saturated intervals (since the last launch).
    saturated: u32,
    /// Consecutive intervals every live member was under-loaded.
    under: u32,
    /// Per live member: consecutive intervals it owned no group.
    idle: HashMap<String, u32>,
    last_change: Option<Instant>,
}

impl ScaleState {
    /// Called once per control interval; returns at most one change (see
    /// the module doc for the rules).
    pub fn decide(&mut self, v: &ScaleView<'_>) -> Option<Decision> {
        let live: Vec<&Member<'_>> = v.members.iter().filter(|m| m.live).collect();
        let count = u32::try_from(live.len())
            .unwrap_or(u32::MAX)
            .saturating_add(v.pending);
        self.observe(v, &live);
        if self
            .last_change
            .is_some_and(|t| v.now.saturating_duration_since(t) < v.cfg.cooldown)
        {
            return None;
        }
        let (min, max) = (v.eff.min_instances, v.eff.max_instances);
        if count < min && count < max {
            return Some(Decision::Launch {
                reason: Reason::BelowMin,
            });
        }
        let stop = |m: &Member<'_>, reason| Decision::Stop {
            name: m.name.to_owned(),
            reason,
        };
        if count > max {
            if live.len() > 1
                && let Some(m) = least_utilised(&live)
            {
                return Some(stop(m, Reason::AboveMax));
            }
            return None;
        }
        if v.pending == 0 && self.saturated >= v.cfg.out_intervals && count < max {
            self.saturated = 0;
            return Some(Decision::Launch {
                reason: Reason::Saturated,
            });
        }
        if v.pending > 0 || count <= min || live.len() < 2 {
            return None;
        }
        // The one idle longest; on a tie the later.
        let idlest = live
            .iter()
            .filter(|m| m.removable)
            .filter_map(|m| Some((*m, *self.idle.get(m.name)?)))
            .filter(|(_, n)| *n >= v.cfg.in_intervals)
            .max_by_key(|(_, n)| *n);
        if let Some((m, _)) = idlest {
            self.idle.remove(m.name);
            return Some(stop(m, Reason::Idle));
        }
        if self.under >= v.cfg.in_intervals {
            let sum: f64 = live.iter().map(|m| m.utilisation).sum();
            #[expect(clippy::cast_precision_loss, reason = "a handful of instances")]
            let projected = sum / (live.len() - 1) as f64;
            if v.eff.thresholds.is_below_midpoint(projected)
                && let Some(m) = least_utilised(&live)
            {
                self.under = 0;
                return Some(stop(m, Reason::Underloaded));
            }
        }
        None
    }

    /// The agent carried a change out (or a launch failed) at `now`:
    /// starts the cooldown.
    pub fn changed(&mut self, now: Instant) {
        self.last_change = Some(now);
    }

    /// Runs the interval counters.
    fn observe(&mut self, v: &ScaleView<'_>, live: &[&Member<'_>]) {
        let t = v.eff.thresholds;
        let saturated = live.iter().any(|m| t.is_overloaded(m.utilisation))
            && !live.iter().any(|m| t.is_below_midpoint(m.utilisation));
        self.saturated = if v.pending == 0 && saturated {
            self.saturated.saturating_add(1)
        } else {
            0
        };
        let under = !live.is_empty() && live.iter().all(|m| t.is_underloaded(m.utilisation));
        self.under = if under {
            self.under.saturating_add(1)
        } else {
            0
        };
        self.idle
            .retain(|name, _| live.iter().any(|m| m.name == name && m.groups == 0));
        for m in live.iter().filter(|m| m.groups == 0) {
            let n = self.idle.entry(m.name.to_owned()).or_default();
            *n = n.saturating_add(1);
        }
    }
}

/// The removable member with the least utilisation; ties go to fewer
/// groups, then to the later one.
fn least_utilised<'m, 'a>(live: &[&'m Member<'a>]) -> Option<&'m Member<'a>> {
    live.iter()
        .rev()
        .filter(|m| m.removable)
        .min_by(|a, b| {
            a.utilisation
                .total_cmp(&b.utilisation)
                .then(a.groups.cmp(&b.groups))
        })
        .copied()
}

/// Restarts of failed instances, per instance name, within the failure
/// rule's window.
#[derive(Clone, Debug, Default)]
pub struct FailureBudget {
    restarts: HashMap<String, VecDeque<Instant>>,
}

impl FailureBudget {
    /// Whether `name` may be restarted once more at `now` under `rule`
    /// (records it when yes).
    pub fn try_restart(&mut self, name: &str, rule: &FailureRule, now: Instant) -> bool {
        let times = self.restarts.entry(name.to_owned()).or_default();
        times.retain(|t| now.saturating_duration_since(*t) < rule.window);
        if times.len() < usize::try_from(rule.restarts).unwrap_or(usize::MAX) {
            times.push_back(now);
            true
        } else {
            false
        }
    }

    /// Whether `name` has used all its restarts within the window ending
    /// at `now`.
    #[must_use]
    pub fn exhausted(&self, name: &str, rule: &FailureRule, now: Instant) -> bool {
        let used = self.restarts.get(name).map_or(0, |times| {
            times
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < rule.window)
                .count()
        });
        used >= usize::try_from(rule.restarts).unwrap_or(usize::MAX)
    }

    /// Drops `name`'s history (it was removed).
    pub fn forget(&mut self, name: &str) {
        self.restarts.remove(name);
    }
}

/// How long to wait before the next launch after `failures` failed ones
/// in a row: none after none, then 1 s doubling up to 60 s.
#[must_use]
pub fn launch_backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_secs((1u64 << (n - 1).min(6)).min(60)),
    }
}

#[cfg(test)]
mod tests;
