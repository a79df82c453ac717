//! The simulation's steps: faults starting and healing, traffic through
//! the hosts' data paths, one host action, and the invariants.

use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use super::{
    CAPACITY, FaultKind, INTERVAL, Invariant, K_INTERVALS, LEASE_TTL, NO_OWNER, NOBODY,
    P_INTERVALS, QUANTUM, Route, SAMPLES, Sim, Violation, check_partition, owner_in, ready,
    w_window,
};
use crate::{
    control::fence::Fence,
    datapath::{Datapath as _, fake::MemDatapath},
};

/// One thing a host's agent does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Tick,
    Renew,
    Follow,
    Punts,
    Reload,
}

impl Sim {
    /// Starts the faults due now and heals those that end now.
    pub(super) fn faults_at(&mut self) {
        let now = self.now;
        let faults = self.faults.clone();
        for f in &faults {
            if f.start >= now && f.start < now + QUANTUM {
                self.begin(f.kind, f.host, &f.also);
            }
            if f.end >= now && f.end < now + QUANTUM {
                self.heal(f.kind, f.host);
            }
        }
        if now >= self.heal_at && now < self.heal_at + QUANTUM {
            for h in 0..self.hosts.len() {
                for k in FaultKind::ALL {
                    self.heal(k, h);
                }
            }
            self.log("all faults healed");
        }
    }

    fn begin(&mut self, kind: FaultKind, h: usize, also: &[usize]) {
        self.log(format!("fault {} h{h} {also:?}", kind.name()));
        match kind {
            FaultKind::Crash => {
                if self.hosts[h].agent.take().is_some() {
                    // A kill -9: the lease stays until it expires or the
                    // next agent takes it over.
                    self.hosts[h].punted.clear();
                }
            }
            FaultKind::Partition => {
                self.hosts[h].cut = true;
                self.store.set_cut(h, true);
            }
            FaultKind::Pause => self.hosts[h].paused = true,
            FaultKind::Lease => self.store.expire_lease(h),
            FaultKind::Watch => {
                if self.rng.chance(2) {
                    self.store.drop_watch(h);
                } else {
                    self.hosts[h].watch_held = true;
                }
            }
            FaultKind::Reload => {
                for &o in std::iter::once(&h).chain(also) {
                    let host = &mut self.hosts[o];
                    if host.instances.len() > 1 && self.rng.chance(2) {
                        let k = self.rng.pick(host.instances.len());
                        // Removed once a reload with it gone succeeds.
                        host.instances.remove(k);
                    } else {
                        host.extras += 1;
                        host.instances.push(format!("h{o}x{}", host.extras));
                    }
                    host.reload_due = true;
                }
            }
            FaultKind::Instance => {
                let host = &self.hosts[h];
                let name = host.instances[self.rng.pick(host.instances.len())].clone();
                host.veths.gone.lock().expect("veths").insert(name.clone());
                self.bad_since.entry(name).or_insert(self.now);
            }
            FaultKind::Drain => {
                let host = &mut self.hosts[h];
                if host.drained.is_none() && host.instances.len() > 1 {
                    let name = host.instances[0].clone();
                    if let Some(a) = &mut host.agent
                        && a.control.set_drained(&name, true).is_ok()
                    {
                        host.drained = Some(name.clone());
                        self.bad_since.entry(name).or_insert(self.now);
                    }
                }
            }
            FaultKind::Load => self.hot = 4,
        }
    }

    fn heal(&mut self, kind: FaultKind, h: usize) {
        let now = self.now;
        let host = &mut self.hosts[h];
        let healed = match kind {
            FaultKind::Crash if host.agent.is_none() => {
                self.start_agent(h);
                return;
            }
            FaultKind::Partition if host.cut => {
                host.cut = false;
                self.store.set_cut(h, false);
                true
            }
            FaultKind::Pause if host.paused => {
                host.paused = false;
                true
            }
            FaultKind::Watch if host.watch_held => {
                host.watch_held = false;
                true
            }
            FaultKind::Instance => {
                let back: Vec<String> =
                    std::mem::take(&mut *host.veths.gone.lock().expect("veths"))
                        .into_iter()
                        .collect();
                for n in &back {
                    self.bad_since.remove(n);
                }
                !back.is_empty()
            }
            FaultKind::Drain => match host.drained.take() {
                Some(n) => {
                    if let Some(a) = &mut host.agent {
                        let _ = a.control.set_drained(&n, false);
                    }
                    self.drain_progress.remove(&n);
                    self.bad_since.remove(&n);
                    true
                }
                None => false,
            },
            FaultKind::Load if self.hot != 1 => {
                self.hot = 1;
                true
            }
            _ => false,
        };
        if healed {
            if matches!(kind, FaultKind::Partition | FaultKind::Pause) {
                self.hosts[h].able_since = now;
            }
            self.log(format!("heal {} h{h}", kind.name()));
        }
    }

    /// Where a packet of `unit` entering host `e` ends, by the data paths
    /// as they are (the XDP program's steer and decapsulate, reduced).
    fn route(&self, e: usize, unit: u32) -> Route {
        let dp = &self.hosts[e].dp;
        // Past its fence deadline a host delivers, encapsulates and takes
        // in nothing (the XDP program drops it; the agent claims nothing).
        let now = self.instant();
        let fenced = |dp: &MemDatapath| dp.fence().is_some_and(|f| now >= f);
        if fenced(dp) {
            return Route::Dropped;
        }
        let owner = owner_in(dp, unit);
        if owner == NOBODY {
            return Route::Punted;
        }
        let Some(&(_, slot, live)) = dp.remote_instances.get(&owner) else {
            return if dp.is_live(owner) {
                Route::Delivered { host: e, id: owner }
            } else {
                Route::Punted
            };
        };
        if !live {
            return Route::Dropped;
        }
        let Some(rh) = dp.remote_hosts.get(&slot) else {
            return Route::Dropped;
        };
        let Some(t) = self.hosts.iter().position(|h| {
            rh.underlay[0] == u32::from_be_bytes([198, 18, 1, h.underlay_last]).to_be()
        }) else {
            return Route::Dropped;
        };
        // The receiver takes it only from a member.
        let from = u32::from_be_bytes([198, 18, 1, self.hosts[e].underlay_last]).to_be();
        let tdp = &self.hosts[t].dp;
        if fenced(tdp) {
            return Route::Dropped;
        }
        if !tdp.members.iter().any(|m| m.addr[0] == from) {
            return Route::Dropped;
        }
        let local =
            |id: u32| id != NO_OWNER && !tdp.remote_instances.contains_key(&id) && tdp.is_live(id);
        if local(owner) {
            return Route::Delivered { host: t, id: owner };
        }
        let o2 = owner_in(tdp, unit);
        if local(o2) {
            Route::Delivered { host: t, id: o2 }
        } else {
            Route::Dropped
        }
    }

    fn sample_units() -> impl Iterator<Item = u32> {
        (0..SAMPLES).map(|k| k * (sluice_common::UNITS_PER_SERVICE / SAMPLES) + 5)
    }

    /// One quantum's traffic into every host: the sampled units, evenly
    /// over the hosts (ECMP over many flows); the hot quarter `hot` times
    /// as busy.
    pub(super) fn traffic(&mut self) {
        let hosts = self.hosts.len();
        // Half the capacity of two instances a host, a sample's share of
        // it from each host.
        let per_host = CAPACITY * QUANTUM.as_secs_f64() / f64::from(SAMPLES);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small positive packet count"
        )]
        let base = per_host.round() as u64;
        for (k, unit) in Self::sample_units().enumerate() {
            let hot = if k < SAMPLES as usize / 4 {
                self.hot
            } else {
                1
            };
            let n = base * hot;
            for e in 0..hosts {
                match self.route(e, unit) {
                    Route::Delivered { host, id } => {
                        if host == e {
                            self.hosts[e].dp.deliver(0, unit, n);
                        } else {
                            self.hosts[host].dp.deliver_to(0, unit, id, n);
                        }
                    }
                    Route::Punted => {
                        if self.hosts[e].agent.is_some() {
                            self.hosts[e].punted.insert(unit);
                        }
                    }
                    Route::Dropped => {}
                }
            }
        }
    }

    /// The actions due now.
    pub(super) fn due(&self) -> Vec<(usize, Action)> {
        let now = self.instant();
        let mut out = Vec::new();
        for (h, host) in self.hosts.iter().enumerate() {
            let Some(a) = &host.agent else { continue };
            if host.paused {
                continue;
            }
            if now >= a.next_tick {
                out.push((h, Action::Tick));
            }
            if now >= a.next_renew {
                out.push((h, Action::Renew));
            }
            if !host.watch_held && self.store.has_event(h) {
                out.push((h, Action::Follow));
            }
            if !host.punted.is_empty() {
                out.push((h, Action::Punts));
            }
            if host.reload_due {
                out.push((h, Action::Reload));
            }
        }
        out
    }

    pub(super) fn act(&mut self, h: usize, action: Action) {
        let now = self.instant();
        let clock = self.clock.clone();
        // What the peers would answer the fence's question now: how long
        // ago each running one's last acknowledged renewal was sent.
        let answers: Vec<Option<Duration>> = if action == Action::Renew {
            self.hosts
                .iter()
                .enumerate()
                .filter(|(p, o)| *p != h && !o.paused)
                .filter_map(|(_, o)| o.agent.as_ref().map(|a| a.fence.renewed_ago(now)))
                .collect()
        } else {
            Vec::new()
        };
        let host = &mut self.hosts[h];
        let config = host.reload_due.then(|| host.config());
        let Some(a) = host.agent.as_mut() else { return };
        let line = match action {
            Action::Tick => {
                if std::mem::take(&mut host.reload_retry) {
                    host.reload_due = true;
                }
                a.tick(&mut host.dp, now)
            }
            Action::Renew => {
                let mut line = match a.store.renew() {
                    Ok(false) => {
                        a.fence.renewed(now);
                        String::new()
                    }
                    Ok(true) => {
                        // The keeper found the lease gone and joined
                        // again: fenced until the tables are re-read.
                        a.fence.lost(now);
                        let r = ready(a.control.resync_now(&mut host.dp));
                        a.fence.rejoined(now);
                        match r {
                            Ok(()) => "rejoined".to_owned(),
                            Err(e) => format!("rejoined resync-failed({e})"),
                        }
                    }
                    Err(e) => {
                        if e.to_string().contains("lease not found") {
                            a.fence.lost(now);
                        }
                        format!("renew-failed({e})")
                    }
                };
                // Renewals overdue: the fence asks the peers.
                if a.fence.should_ask(now) {
                    a.fence.asked(now);
                    for answer in &answers {
                        a.fence.answer(*answer);
                    }
                    let _ = write!(
                        line,
                        " asked({} answers): {}",
                        answers.len(),
                        a.fence.state(now).name()
                    );
                }
                // Retried sooner while overdue, as the fence task asks.
                let renewed = a.fence.last_renewal() == now;
                a.next_renew = now
                    + if renewed {
                        Fence::renew_every(LEASE_TTL)
                    } else {
                        Fence::ask_every(LEASE_TTL)
                    };
                let _ = host.dp.set_fence(a.fence.deadline());
                line
            }
            Action::Follow => match self.store.next_event(h) {
                Some(ev) => format!("{ev:?} {}", a.follow(&mut host.dp, &ev)),
                None => String::new(),
            },
            Action::Punts => {
                let units: Vec<u32> = std::mem::take(&mut host.punted).into_iter().collect();
                a.punts(&mut host.dp, &units, now)
            }
            Action::Reload => {
                host.reload_due = false;
                let config = config.expect("a reload has its config");
                let before: Vec<String> = a.plan.instances.iter().map(|i| i.name.clone()).collect();
                match a.reload(&config, &mut host.dp, &host.veths, &clock) {
                    Ok(()) => {
                        for gone in before.into_iter().filter(|n| !host.instances.contains(n)) {
                            self.bad_since.entry(gone).or_insert(self.now);
                        }
                        format!("reloaded {:?}", host.instances)
                    }
                    Err(e) => {
                        // A refused reload changes nothing; the operator
                        // sends it again after an interval (e.g. once a
                        // gone veth's instance is found failed and keeps
                        // its last interface, or the store is back).
                        host.reload_retry = true;
                        format!("reload-failed({e:#})")
                    }
                }
            }
        };
        self.log(format!("h{h} {action:?} {line}"));
    }

    /// The invariants, now.
    #[expect(clippy::too_many_lines, reason = "one block an invariant, in order")]
    pub(super) fn check(&mut self) -> Option<Violation> {
        let now = self.now;
        let fail = |invariant, detail: String| {
            Some(Violation {
                invariant,
                at: now,
                detail,
            })
        };
        let k = INTERVAL * K_INTERVALS;
        let assignments = self.store.assignments();
        let registered = self.store.instances();
        let live_hosts = self.store.hosts();
        // I1.
        for (service, groups) in &assignments {
            if let Err(e) = check_partition(groups.iter().map(|g| &g.group)) {
                return fail(Invariant::I1Partition, format!("{service}: {e}"));
            }
            if let Some(g) = groups
                .iter()
                .find(|g| !g.owner.is_empty() && !registered.contains_key(&g.owner))
            {
                return fail(
                    Invariant::I1Partition,
                    format!(
                        "{service}: group {} owned by unregistered `{}`",
                        g.group, g.owner
                    ),
                );
            }
        }
        // I2: owners that are bad, counted from when their host can act.
        let configured: BTreeSet<&String> = self.hosts.iter().flat_map(|h| &h.instances).collect();
        let mut bad: Vec<(String, Duration)> = self
            .bad_since
            .iter()
            .filter(|(n, _)| {
                // A removed instance put back by a later reload is good again.
                let failed_or_drained = self.hosts.iter().any(|h| {
                    h.veths.gone.lock().expect("veths").contains(*n)
                        || h.drained.as_ref() == Some(n)
                });
                failed_or_drained || !configured.contains(n)
            })
            .map(|(n, t)| (n.clone(), *t))
            .collect();
        for h in &self.hosts {
            if live_hosts.contains_key(&h.name) {
                self.gone_since.remove(&h.name);
            } else {
                self.gone_since.entry(h.name.clone()).or_insert(now);
            }
        }
        for (name, rec) in &registered {
            if let Some(&since) = self.gone_since.get(&rec.host)
                && configured.contains(name)
            {
                bad.push((name.clone(), since));
            }
        }
        for (name, since) in bad {
            let host = registered.get(&name).map(|r| r.host.clone());
            // Who must act: the instance's own host, or (its host gone)
            // any other that can.
            let acting = self
                .hosts
                .iter()
                .filter(|h| {
                    h.can_act()
                        && (host.as_deref() == Some(&h.name)
                            || !live_hosts.contains_key(host.as_deref().unwrap_or("")))
                })
                .map(|h| h.able_since)
                .min();
            let Some(able) = acting else { continue };
            let mut from = since.max(able);
            // Its host gone, the others can act only once they see it gone.
            if let Some(h) = host.as_deref()
                && let Some(&gone) = self.gone_since.get(h)
            {
                from = from.max(gone);
            }
            let drained = self.hosts.iter().any(|h| h.drained.as_ref() == Some(&name))
                && configured.contains(&name);
            if drained {
                let owned = assignments
                    .values()
                    .flatten()
                    .filter(|g| g.owner == name)
                    .count();
                let p = self
                    .drain_progress
                    .entry(name.clone())
                    .or_insert((owned, now));
                // A reload may deal a drained instance groups (the settle
                // does not know drains); its drain moves them on.
                if owned != p.0 {
                    *p = (owned, now);
                }
                // Drains share the move limit with the elements: one may
                // wait a few intervals for a token.
                from = from.max(p.1) + k;
            }
            if now > from + k
                && let Some((service, g)) = assignments
                    .iter()
                    .find_map(|(s, gs)| gs.iter().find(|g| g.owner == name).map(|g| (s, g)))
            {
                return fail(
                    Invariant::I2BadOwner,
                    format!(
                        "{service}: group {} still with `{name}` {:.1}s after it went bad (host {host:?})",
                        g.group,
                        now.saturating_sub(from).as_secs_f64()
                    ),
                );
            }
        }
        // I3.
        for (h, host) in self.hosts.iter().enumerate() {
            let Some(a) = &host.agent else { continue };
            if !host.can_act() {
                continue;
            }
            let start = (self.base + host.able_since).max(a.since);
            let last = a.control.last_measured().map_or(start, |m| m.max(start));
            if self.instant() > last + INTERVAL * P_INTERVALS {
                return fail(
                    Invariant::I3Progress,
                    format!(
                        "h{h} has not measured for {:.1}s",
                        (self.instant() - last).as_secs_f64()
                    ),
                );
            }
        }
        // I4.
        if now > self.heal_at + k + LEASE_TTL {
            'hosts: for (h, host) in self.hosts.iter().enumerate() {
                if host.agent.is_none() {
                    continue;
                }
                for (service, groups) in &assignments {
                    for g in groups {
                        let want = if g.owner.is_empty() {
                            NO_OWNER
                        } else {
                            registered.get(&g.owner).map_or(u32::MAX, |r| r.id)
                        };
                        let have = owner_in(&host.dp, g.group.base());
                        if want == have {
                            continue;
                        }
                        // A change another host just made reaches this one
                        // by its watch: only a difference that lasts counts.
                        let since = *self.differ_since.entry(h).or_insert(now);
                        if now > since + k {
                            return fail(
                                Invariant::I4Converged,
                                format!(
                                    "h{h}: {service} group {} is {have} in the data path, `{}` ({want}) in the store",
                                    g.group, g.owner
                                ),
                            );
                        }
                        continue 'hosts;
                    }
                }
                self.differ_since.remove(&h);
            }
        }
        // I5.
        let w = w_window();
        for unit in Self::sample_units() {
            let targets: BTreeSet<(usize, u32)> = (0..self.hosts.len())
                .filter_map(|e| match self.route(e, unit) {
                    Route::Delivered { host, id } => Some((host, id)),
                    _ => None,
                })
                .collect();
            let ids: BTreeSet<u32> = targets.iter().map(|t| t.1).collect();
            if ids.len() > 1 {
                let since = *self.split_since.entry(unit).or_insert(now);
                if now > since + w {
                    return fail(
                        Invariant::I5SplitDelivery,
                        format!(
                            "unit {unit:#06x} delivered to {targets:?} (host, instance id) for {:.1}s",
                            now.saturating_sub(since).as_secs_f64()
                        ),
                    );
                }
            } else {
                self.split_since.remove(&unit);
            }
        }
        None
    }
}
