//! One simulated host: its data path (kept across agent crashes, as the
//! pinned XDP maps are), the instances its host has (veths that can go),
//! and the agent when it runs: the real `Cluster` glue and `Controller`
//! against the host's [`SimStore`] handle, driven one action at a time
//! the way `agent::run`'s event loop drives them.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use sluice_common::maps::NO_OWNER;

use super::ready;
use crate::{
    agent::cluster::Cluster,
    config::Config,
    control::{
        Clock, Controller,
        fence::Fence,
        qos::{NetnsStats, Probe},
    },
    coord::{Event, sim_store::SimStore},
    datapath::{Datapath as _, fake::MemDatapath},
    plan::{Plan, RemotePlan, Resolved},
};

/// The host's veths as the probe sees them: an instance whose name is in
/// `gone` has failed.
#[derive(Clone, Default)]
pub(super) struct Veths {
    pub(super) gone: Arc<Mutex<BTreeSet<String>>>,
}

/// The sim's instances are named `h<host>i<k>`; instance `h2i1`'s veth is
/// on ifindex `1000 + 100 * 2 + 1`.
pub(super) fn ifindex_of(name: &str) -> u32 {
    let (h, k) = name[1..].split_once(['i', 'x']).expect("sim instance name");
    let extra = if name.contains('x') { 50 } else { 0 };
    1000 + 100 * h.parse::<u32>().expect("host") + extra + k.parse::<u32>().expect("k")
}

impl Probe for Veths {
    fn link_exists(&self, ifindex: u32) -> bool {
        !self
            .gone
            .lock()
            .expect("veths")
            .iter()
            .any(|n| ifindex_of(n) == ifindex)
    }

    fn netns_stats(&self, _: &Path, _: &[u16]) -> std::io::Result<NetnsStats> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    fn cgroup_usage_usec(&self, _: &Path) -> std::io::Result<u64> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    fn resolve(&self, inst: &crate::config::Instance) -> Option<Resolved> {
        (!self.gone.lock().expect("veths").contains(&inst.name)).then(|| resolved(&inst.name))
    }
}

fn resolved(name: &str) -> Resolved {
    let ix = ifindex_of(name);
    Resolved {
        ifindex: ix,
        mac: [2, 0, 0, 0, ix.to_be_bytes()[2], ix.to_be_bytes()[3]],
        netns: None,
        netns_id: None,
    }
}

/// The sim's next hops: every host is one hop away.
#[expect(
    clippy::unnecessary_wraps,
    reason = "the shape of `neigh::next_hop_mac`"
)]
fn next_hop(_: std::net::IpAddr) -> std::io::Result<Option<[u8; 6]>> {
    Ok(Some([2, 0, 0, 0, 0, 1]))
}

/// A running agent.
pub(super) struct Agent {
    pub(super) store: Arc<SimStore>,
    pub(super) cluster: Cluster,
    pub(super) control: Controller,
    pub(super) plan: Plan,
    /// When the agent started or last reloaded (progress is counted from
    /// then).
    pub(super) since: Instant,
    pub(super) next_tick: Instant,
    pub(super) next_renew: Instant,
    /// The real fence, fed as `agent::fence` feeds it: renewals, the
    /// peers' answers, a lost lease and the rejoin.
    pub(super) fence: Fence,
}

/// Programs `dp` with `plan` as `XdpDatapath::program` does: the local
/// instances (live or not) and every group's owner.
fn program(dp: &mut MemDatapath, plan: &Plan) -> Result<(), crate::datapath::DatapathError> {
    for i in &plan.instances {
        dp.remote_instances.remove(&i.id);
        dp.set_instance_live(i.id, i.live)?;
        dp.set_instance_target(i.id, i.ifindex, i.mac)?;
    }
    for s in &plan.services {
        for (g, owner) in &s.groups {
            dp.set_group_owner(s.id, *g, *owner)?;
        }
    }
    Ok(())
}

/// Builds the plan for `config` against the cluster's registry, as
/// `agent::prepare` does.
async fn prepare(
    config: &Config,
    cluster: &Cluster,
    store: &SimStore,
    veths: &Veths,
    failed: impl Fn(&str) -> bool,
) -> anyhow::Result<(Plan, crate::control::Settled)> {
    cluster.check(config).await?;
    let registry = cluster.registry(config).await?;
    let gone = veths.gone.lock().expect("veths").clone();
    let mut plan = Plan::build_with_ids(config, &registry.local, |inst, _| {
        // A failed instance keeps its last interface (as a reload does).
        if gone.contains(&inst.name) && !failed(&inst.name) {
            anyhow::bail!("no veth for `{}`", inst.name);
        }
        Ok(resolved(&inst.name))
    })?;
    plan.remote = registry
        .remote
        .iter()
        .filter_map(|(name, rec)| {
            Some(RemotePlan {
                id: rec.id,
                name: name.clone(),
                service_id: plan.service_id(&rec.service)?,
                host: rec.host.clone(),
            })
        })
        .collect();
    // Before the settle, as `agent::prepare`: a failed instance is dealt
    // no dropped instance's groups.
    for i in &mut plan.instances {
        i.live = !failed(&i.name);
    }
    let settled = Controller::settle(config, &mut plan, store).await?;
    Ok((plan, settled))
}

impl Agent {
    /// Starts an agent as `agent::run` does with etcd: joins, registers,
    /// settles and commits, programs the data path, learns the cluster.
    pub(super) fn start(
        config: &Config,
        store: Arc<SimStore>,
        dp: &mut MemDatapath,
        veths: &Veths,
        clock: &Clock,
        trace: &mut String,
    ) -> anyhow::Result<Self> {
        ready(async {
            let mut cluster =
                Cluster::join_with(config, Path::new("sim.state"), store.clone(), store.clone())
                    .await?;
            let (plan, settled) = prepare(config, &cluster, &store, veths, |_| false).await?;
            let mut plan = plan;
            let mut control =
                Controller::commit_with_clock(settled, config, &mut plan, store.clone(), clock)
                    .await?
                    .with_probe(Box::new(veths.clone()));
            program(dp, &plan)?;
            if let Err(e) = cluster.settled(config).await {
                let _ = write!(trace, " settled-failed({e})");
            }
            if let Err(e) = cluster
                .sync_tables(dp, &mut plan, &mut control, next_hop)
                .await
            {
                let _ = write!(trace, " sync-failed({e})");
            }
            let now = clock.now();
            // Joined just now: the join's grant counts as a renewal.
            let mut fence = Fence::new(config.cluster.lease_ttl, now);
            fence.set_peers(cluster.peers().len());
            let _ = dp.set_fence(fence.deadline());
            Ok(Self {
                store,
                cluster,
                control,
                plan,
                since: now,
                next_tick: now + config.agent.interval,
                next_renew: now + Fence::renew_every(config.cluster.lease_ttl),
                fence,
            })
        })
    }

    /// One control interval, as the event loop's: the cluster read, then
    /// the controller's tick. Returns a line for the trace.
    pub(super) fn tick(&mut self, dp: &mut MemDatapath, now: Instant) -> String {
        let mut out = String::new();
        ready(async {
            if let Err(e) = (self.cluster)
                .sync_tables(dp, &mut self.plan, &mut self.control, next_hop)
                .await
            {
                let _ = write!(out, "sync-failed({}) ", short(&e.to_string()));
            }
            match self.control.tick(dp, now).await {
                Ok(moves) => {
                    for m in moves {
                        let g = m.group.map_or_else(String::new, |g| g.to_string());
                        let _ = write!(out, "{}:{g}:{}->{} ", m.kind, m.from, m.to);
                    }
                }
                Err(e) => {
                    let _ = write!(out, "tick-failed({})", short(&e.to_string()));
                }
            }
        });
        self.fence.set_peers(self.cluster.peers().len());
        let _ = dp.set_fence(self.fence.deadline());
        self.next_tick = now + self.control.interval();
        out
    }

    /// Follows one event of the store's watch.
    pub(super) fn follow(&mut self, dp: &mut MemDatapath, ev: &Event) -> String {
        let service = match ev {
            Event::Assignment { service } => Some(service.as_str()),
            Event::Lagged => None,
        };
        match ready(self.control.follow(dp, service)) {
            Ok(()) => String::new(),
            Err(e) => format!("follow-failed({})", short(&e.to_string())),
        }
    }

    /// Claims the punted units, as `Agent::process_punts` does.
    pub(super) fn punts(&mut self, dp: &mut MemDatapath, units: &[u32], now: Instant) -> String {
        let (claimed, err) = ready(self.control.claim_batch(dp, 0, units, now));
        let mut out = format!("claimed {} units", claimed.len());
        if let Some(e) = err {
            let _ = write!(out, " claim-failed({})", short(&e.to_string()));
        }
        out
    }

    /// A reload to `config` (SIGHUP), as `Serving::apply` and
    /// `Agent::reload` do, minus the roll-back of a failed switch.
    pub(super) fn reload(
        &mut self,
        config: &Config,
        dp: &mut MemDatapath,
        veths: &Veths,
        clock: &Clock,
    ) -> anyhow::Result<()> {
        let control = &self.control;
        let (mut plan, settled) = ready(prepare(config, &self.cluster, &self.store, veths, |n| {
            control.is_failed(n)
        }))?;
        for i in &mut plan.instances {
            i.live = !self.control.is_failed(&i.name);
        }
        let control = ready(Controller::commit_with_clock(
            settled,
            config,
            &mut plan,
            self.store.clone(),
            clock,
        ))?;
        program(dp, &plan)?;
        // As `Serving::apply`: the dropped instances' records go, and the
        // host record names the new set.
        ready(self.cluster.settled(config))?;
        let old = std::mem::replace(&mut self.control, control);
        self.control.carry_over(old);
        self.plan = plan;
        self.cluster.forget_written();
        self.since = clock.now();
        Ok(())
    }
}

/// The first words of an error, for the trace.
fn short(e: &str) -> String {
    e.chars().take(90).collect()
}

/// What the data path of host `dp` holds for `unit`: its owner id.
pub(super) fn owner_in(dp: &MemDatapath, unit: u32) -> u32 {
    dp.owner_of_unit(0, unit)
}

/// `NO_OWNER`, for the invariants.
pub(super) const NOBODY: u32 = NO_OWNER;
