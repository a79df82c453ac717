//! Measuring: each interval, every instance's counters become rates, the
//! rates and the host's figures (socket statistics, cgroup CPU) and fresh
//! application reports become [`Inputs`], and the inputs one utilisation
//! ([`qos::utilisation`]); every service's per-unit hit rates too. Loads
//! and hit rates are published in the store for the other hosts.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sluice_common::maps::InstanceCounters;

use super::{
    ControlError,
    qos::{self, Inputs, Probe, Rate, Report, Reports},
    services::{InstCtl, ServiceCtl},
    wlm::Sample,
};
use crate::{
    coord::{CoordStore, InstanceState, Load},
    datapath::Datapath,
};

/// One instance's counters, kept from one interval to the next to give
/// rates.
#[derive(Default)]
pub(super) struct Meter {
    packets: Rate,
    bytes: Rate,
    drops: Rate,
    refused: Rate,
    cpu: Rate,
}

/// Measures every instance over the interval that just ended, and
/// publishes each one's load with its `state`.
pub(super) async fn measure(
    services: &mut [ServiceCtl],
    dp: &dyn Datapath,
    store: &dyn CoordStore,
    probe: &dyn Probe,
    reports: &Fresh,
    state: &dyn Fn(&str) -> InstanceState,
    now: Instant,
) -> Result<(), ControlError> {
    let mut loads = Vec::new();
    for s in services {
        let hits = dp.unit_hits(s.id)?;
        for ((rate, h), b) in s.hits.iter_mut().zip(hits).zip(s.buckets.iter_mut()) {
            *b = rate.update(h, now);
        }
        // In a cluster, this host sees only what it delivers: the other
        // hosts' deliveries complete the service's per-unit rates.
        store.publish_hits(&s.name, &s.buckets).await?;
        if let Some(others) = store.others_hits(&s.name).await? {
            for (b, o) in s.buckets.iter_mut().zip(others) {
                *b += o;
            }
        }
        for i in &mut s.instances {
            let c = dp.instance_counters(i.id)?;
            // An http instance is reached at its own address's port.
            let own;
            let ports: &[u16] = match i.config.addr {
                Some(a) => {
                    own = [a.port()];
                    &own
                }
                None => &s.ports,
            };
            let inputs = instance(i, &c, probe, ports, reports.of(&i.name), now);
            i.sample = Sample {
                rate_pps: inputs.rate_pps,
                drops_ps: inputs.drops_ps,
                utilisation: qos::utilisation(&inputs, &s.cfg),
            };
            i.inputs = inputs;
            loads.push((
                i.name.clone(),
                Load {
                    utilisation: i.sample.utilisation,
                    rate_pps: i.sample.rate_pps,
                    // Other hosts give work only to `ok` ones.
                    state: state(&i.name),
                },
            ));
        }
    }
    // Best effort: a store that refuses loads (unreachable, or this host's
    // lease gone until the keeper joins again) must not stop this
    // interval's failover and drains, which need only local figures.
    for (name, load) in loads {
        if let Err(e) = store.publish_load(&name, load).await {
            tracing::warn!(error = %e, "publishing this host's loads failed; the next interval publishes again");
            break;
        }
    }
    Ok(())
}

/// Instance `i`'s inputs: its counters `c` as rates, what the host says
/// of its namespace (`ports`' sockets) and cgroup, and its application's
/// `report` and the distributor's `observed` figures.
fn instance(
    i: &mut InstCtl,
    c: &InstanceCounters,
    probe: &dyn Probe,
    ports: &[u16],
    (report, observed): (Option<Report>, Option<Report>),
    now: Instant,
) -> Inputs {
    let m = &mut i.meter;
    let mut inputs = Inputs {
        rate_pps: m.packets.update(c.packets, now),
        bytes_ps: m.bytes.update(c.bytes, now),
        report,
        observed,
        cpu_limit: i.config.cpu_limit,
        ..Inputs::default()
    };
    if let Some(ns) = &i.netns {
        match probe.netns_stats(ns, ports) {
            Ok(st) => {
                inputs.drops_ps = m.drops.update(st.rcvbuf_errors, now);
                #[expect(clippy::cast_precision_loss, reason = "an estimate")]
                let q = st.queue_bytes as f64;
                inputs.queue_bytes = q;
                inputs.listeners = st.listeners;
                inputs.refused_ps = m.refused.update(st.refused, now);
            }
            Err(e) => {
                tracing::debug!(instance = %i.name, error = %e, "netns stats unavailable");
            }
        }
    }
    if let Some(cg) = &i.config.cgroup {
        match probe.cgroup_usage_usec(cg) {
            Ok(usec) => inputs.cpu_cores = Some(m.cpu.update(usec, now) / 1e6),
            Err(e) => {
                tracing::debug!(instance = %i.name, error = %e, "cgroup CPU unavailable");
            }
        }
    }
    inputs
}

/// The fresh reports of an interval, by instance name: the applications'
/// (what `health = "reports"` hears) and the L7 distributor's figures.
#[derive(Debug, Default)]
pub(super) struct Fresh {
    pub(super) apps: HashMap<String, Report>,
    pub(super) observed: HashMap<String, Report>,
}

impl Fresh {
    fn of(&self, instance: &str) -> (Option<Report>, Option<Report>) {
        (
            self.apps.get(instance).cloned(),
            self.observed.get(instance).cloned(),
        )
    }
}

/// Every instance's reports fresher than `max_age`, taken out from under
/// the API's lock at once.
pub(super) fn fresh_reports(
    reports: &Mutex<Reports>,
    services: &[ServiceCtl],
    now: Instant,
    max_age: Duration,
) -> Fresh {
    let reports = reports.lock().expect("reports lock");
    let mut fresh = Fresh::default();
    for i in services.iter().flat_map(|s| &s.instances) {
        if let Some(r) = reports.fresh(&i.name, now, max_age) {
            fresh.apps.insert(i.name.clone(), r);
        }
        if let Some(r) = reports.fresh_observed(&i.name, now, max_age) {
            fresh.observed.insert(i.name.clone(), r);
        }
    }
    fresh
}
