//! The fence: a host that cannot renew its lease stops acting as an owner
//! before its lease can expire elsewhere, so no unit has two deliverers.
//!
//! With `T` the lease's time, renewals go out every `T/10`. Let `t_s` be
//! when the last *acknowledged* renewal was *sent*: etcd cannot expire the
//! lease before `t_s + T` (it counts from receiving that renewal), and the
//! other hosts take over only after they saw it expire. The fence deadline
//! is `F = t_s + T - M`, with the margin `M = T/10`; past it the data path
//! delivers and encapsulates nothing (the kernel checks it per packet, so a
//! stopped or dead agent is fenced too). `M` covers what could make `F`
//! late against etcd's expiry: clock rates (the kernel and the agent read
//! the same `CLOCK_MONOTONIC`; etcd's differs by parts per million) and a
//! deadline written a moment after it was computed. It is small so that an
//! agent killed and started again within about `8T/10` of its death (4 s
//! at the default lease, less its start-up) loses nothing: the new agent
//! takes the lease over and renews before `F`.
//!
//! A full etcd outage must not fence every host: nobody can take over
//! then. So a host whose renewals go unacknowledged for `T/3` asks its
//! peers (the other hosts live at its last read of the store) whether
//! *they* renewed within the last `T/4`, every `T/24`. A peer that reaches
//! the store renews every `T/10`, so it says yes; in an outage that began
//! at most `T/10` after this host's last acknowledged renewal (its next
//! one failed), every peer's last renewal is at least `T/4` old by any
//! round asked from `t_s + 7T/20` on, and rounds come every `T/24` until
//! `F = t_s + 9T/10`: several have their answers back in time.
//! - a peer says it did: the store is reachable, this host is the one cut
//!   off; any vouch is dropped and the host fences at `F` (or at once if
//!   `F` is past);
//! - every peer that answered a round says it did not: etcd is out of
//!   everybody's reach, so `F` is extended to `q + T/2` (`q` when the
//!   round was asked): the host is *vouched*;
//! - no answer: no extension (an isolated host cannot tell a dead cluster
//!   from a partition, and fencing is the side that keeps sessions whole);
//! - no peers at all (a single host): never fenced, as nobody could take
//!   its units.
//!
//! A lease found lost (etcd said so) fences at once, until the host has
//! joined again and re-read its tables from the store.
//!
//! Pure: time comes in as arguments, so tests and the simulation drive it.

use std::time::{Duration, Instant};

/// The fence's state; see the module's text for the rule.
#[derive(Clone, Debug)]
pub struct Fence {
    ttl: Duration,
    /// When the last acknowledged renewal was sent (`t_s`).
    renewed: Instant,
    /// The deadline the last vouch gave.
    vouched: Option<Instant>,
    /// Since when the lease is known lost (etcd said so).
    lost: Option<Instant>,
    /// Peers known live at the last read of the store.
    peers: usize,
    round: Option<Round>,
}

/// One request to the peers and what came back.
#[derive(Clone, Copy, Debug)]
struct Round {
    asked: Instant,
    answers: usize,
    /// Some peer renewed within `T/4`: no vouch this round.
    renewed: bool,
    /// The vouch earlier rounds gave, which a peer's renewal in this one
    /// does not take back.
    prior: Option<Instant>,
}

/// How the fence stands, for the status and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceState {
    /// No fence: a single host, or not in a cluster.
    Open,
    /// Renewing: the deadline moves with each renewal.
    Renewing,
    /// Renewals fail but every peer that answered cannot renew either.
    Vouched,
    /// Past the deadline: this host delivers nothing as an owner.
    Fenced,
    /// The lease is lost: fenced until the host joined again.
    Lost,
}

impl FenceState {
    /// As the status and the log say it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Renewing => "renewing",
            Self::Vouched => "vouched",
            Self::Fenced => "fenced",
            Self::Lost => "lost",
        }
    }
}

impl Fence {
    /// A fence for a lease of `ttl` whose last acknowledged renewal (or
    /// grant) was sent at `renewed`.
    #[must_use]
    pub const fn new(ttl: Duration, renewed: Instant) -> Self {
        Self {
            ttl,
            renewed,
            vouched: None,
            lost: None,
            peers: 0,
            round: None,
        }
    }

    /// How often the lease is renewed: `T/10`, so that a dead agent's last
    /// renewal is recent when it dies (the fence counts from it), and three
    /// renewals can be lost before the peers are asked.
    #[must_use]
    pub fn renew_every(ttl: Duration) -> Duration {
        crate::coord::renew_every(ttl)
    }

    /// `T - M`: the fence's distance from the last acknowledged renewal
    /// (`M = T/10`, see the module's text).
    #[must_use]
    pub fn reach(ttl: Duration) -> Duration {
        ttl.saturating_sub(ttl / 10)
    }

    /// `T/2`: how long past its round a vouch holds.
    fn vouch_for(&self) -> Duration {
        self.ttl / 2
    }

    /// How often the peers are asked while renewals fail: `T/24`, so that
    /// several rounds fall between `t_s + 7T/20` and the deadline, in time
    /// for their answers to come back.
    #[must_use]
    pub fn ask_every(ttl: Duration) -> Duration {
        (ttl / 24).max(Duration::from_millis(25))
    }

    /// A peer whose last acknowledged renewal is younger than this (`T/4`)
    /// reaches the store: it renews every `T/10`.
    fn renewing(&self) -> Duration {
        self.ttl / 4
    }

    /// A renewal sent at `sent` was acknowledged (one no later than the
    /// last counted changes nothing).
    pub fn renewed(&mut self, sent: Instant) {
        if sent <= self.renewed {
            return;
        }
        self.renewed = sent;
        // Renewing again: the store is in reach, a vouch is moot.
        self.vouched = None;
        self.round = None;
    }

    /// etcd says the lease is gone: fenced from `now` until [`Self::rejoined`].
    pub fn lost(&mut self, now: Instant) {
        self.lost.get_or_insert(now);
        self.vouched = None;
        self.round = None;
    }

    /// Joined again under a new lease granted by a request sent at `sent`,
    /// and the tables re-read from the store: the fence lifts.
    pub fn rejoined(&mut self, sent: Instant) {
        self.lost = None;
        // A new lease: its grant is the renewal to count from.
        self.renewed = sent;
        self.vouched = None;
        self.round = None;
    }

    /// The number of other hosts live at the last read of the store.
    pub const fn set_peers(&mut self, peers: usize) {
        self.peers = peers;
    }

    /// Whether to ask the peers now: renewals have gone unacknowledged for
    /// `T/3`, there are peers, and the last round is half a round period
    /// old (a timer of the period drives the rounds: a wake less late than
    /// the one before still asks, rather than skipping a whole period).
    #[must_use]
    pub fn should_ask(&self, now: Instant) -> bool {
        let overdue = now.saturating_duration_since(self.renewed) >= self.ttl / 3;
        self.peers > 0
            && self.lost.is_none()
            && overdue
            && self.round.is_none_or(|r| {
                now.saturating_duration_since(r.asked) >= Self::ask_every(self.ttl) / 2
            })
    }

    /// The peers were asked at `now`.
    pub const fn asked(&mut self, now: Instant) {
        self.round = Some(Round {
            asked: now,
            answers: 0,
            renewed: false,
            prior: self.vouched,
        });
    }

    /// A peer answered the current round: its last acknowledged renewal was
    /// sent `renewed_ago` before it answered (`None`: it has none).
    pub fn answer(&mut self, renewed_ago: Option<Duration>) {
        let (vouch_for, renewing) = (self.vouch_for(), self.renewing());
        let Some(round) = self.round.as_mut() else {
            // No round open (a late answer after a renewal): nothing to decide.
            return;
        };
        round.answers += 1;
        if renewed_ago.is_some_and(|d| d < renewing) {
            // The store is in the peer's reach: this host is the one cut
            // off, or etcd is just back and its own renewal not through
            // yet. This round vouches nothing; what an earlier round (all
            // peers out of reach) gave stands until its end, at most T/2
            // after that round: the bound on two deliverers when etcd
            // comes back to some hosts first (found by the outage test:
            // fencing the moment peers renew cost ~300 ms of traffic).
            round.renewed = true;
            self.vouched = round.prior;
        } else if !round.renewed {
            let until = round.asked + vouch_for;
            self.vouched = Some(self.vouched.map_or(until, |v| v.max(until)));
        }
    }

    /// The deadline its renewals alone give: `t_s + T - M`.
    fn own(&self) -> Instant {
        self.renewed + Self::reach(self.ttl)
    }

    /// The deadline after which this host delivers nothing as an owner;
    /// `None`: no fence (no peers could take its units).
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        let own = self.own();
        let f = self.vouched.map_or(own, |v| v.max(own));
        if let Some(lost) = self.lost {
            return Some(f.min(lost));
        }
        (self.peers > 0).then_some(f)
    }

    /// How the fence stands at `now`.
    #[must_use]
    pub fn state(&self, now: Instant) -> FenceState {
        if self.lost.is_some() {
            return FenceState::Lost;
        }
        let Some(f) = self.deadline() else {
            return FenceState::Open;
        };
        if f <= now {
            FenceState::Fenced
        } else if self.vouched.is_some_and(|v| v > self.own()) {
            FenceState::Vouched
        } else {
            FenceState::Renewing
        }
    }

    /// What this host answers a peer that asks: how long before `now` its
    /// last acknowledged renewal was sent.
    #[must_use]
    pub fn renewed_ago(&self, now: Instant) -> Option<Duration> {
        // Lost: nothing to vouch with.
        self.lost
            .is_none()
            .then(|| now.saturating_duration_since(self.renewed))
    }

    /// When the last acknowledged renewal was sent.
    #[must_use]
    pub const fn last_renewal(&self) -> Instant {
        self.renewed
    }
}

#[cfg(test)]
mod tests;
