//! The L7 distributor joined to the rest: it reads owners from the data
//! path's owner array, its request counts join the data path's packet
//! counts in what the WLM elements measure, and its latency and in-flight
//! figures reach them as application reports.

use std::{collections::HashMap, sync::Arc, time::Instant};

use sluice_common::maps::{InstanceCounters, ServiceCounters, Tier};

use crate::{
    control::{Controller, qos::Report},
    datapath::{Datapath, DatapathError, GlobalCounters, xdp::OwnerView},
    l7::{Distributor, Ids, Owners},
    plan::{Group, Plan},
};

impl Owners for OwnerView {
    fn owner(&self, service_id: u32, unit: u32) -> u32 {
        Self::owner(self, service_id, unit)
    }
}

/// The plan's ids, by name.
pub(super) fn ids(plan: &Plan) -> Ids {
    Ids {
        services: plan
            .services
            .iter()
            .map(|s| (s.name.clone(), s.id))
            .collect(),
        instances: plan
            .instances
            .iter()
            .map(|i| (i.name.clone(), i.id))
            .collect(),
    }
}

/// What the WLM hears of the distributor, once an interval: each
/// instance's latency p99 and requests in flight (as an application
/// would report them), and which instances the control loop has failed.
pub(super) fn feed(l7: &Distributor, control: &Controller, now: Instant) {
    l7.mark_failed(|name| control.is_failed(name));
    let mut reports = control.reports.lock().expect("reports lock");
    for (instance, i) in l7.intervals() {
        #[expect(clippy::cast_precision_loss, reason = "a count as a load figure")]
        let in_flight = Some(i.in_flight as f64);
        reports.put(
            Report {
                instance,
                latency_p99_ms: i.latency_p99_ms,
                queue_depth: None,
                in_flight,
            },
            now,
        );
    }
}

/// The data path as the control loop measures it: an http service's
/// requests count as its instances' packets and its units' hits.
pub(super) struct WithRequests<'a> {
    dp: &'a mut dyn Datapath,
    l7: &'a Distributor,
    /// Requests and bytes by instance id, read once for the interval.
    requests: HashMap<u32, (u64, u64)>,
}

impl<'a> WithRequests<'a> {
    pub(super) fn new(dp: &'a mut dyn Datapath, l7: &'a Distributor) -> Self {
        Self {
            dp,
            l7,
            requests: l7.instance_counts(),
        }
    }
}

impl Datapath for WithRequests<'_> {
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError> {
        self.dp.set_group_owner(service_id, group, owner)
    }

    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.dp.owner_of_unit(service_id, unit)
    }

    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError> {
        self.dp.set_instance_live(id, live)
    }

    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.dp.set_instance_target(id, ifindex, mac)
    }

    fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        self.dp.global_counters()
    }

    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        self.dp.service_counters(id)
    }

    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        let mut c = self.dp.instance_counters(id)?;
        if let Some((requests, bytes)) = self.requests.get(&id) {
            c.packets += requests;
            c.bytes += bytes;
        }
        Ok(c)
    }

    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError> {
        self.dp.tier(service_id, rule)
    }

    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError> {
        self.dp.set_tier(service_id, rule, tier)
    }

    fn set_fence(&mut self, until: Option<Instant>) -> Result<(), DatapathError> {
        self.dp.set_fence(until)
    }

    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        let mut hits = self.dp.unit_hits(id)?;
        if let Some(requests) = self.l7.unit_hits(id) {
            for (h, r) in hits.iter_mut().zip(requests) {
                *h += r;
            }
        }
        Ok(hits)
    }
}

/// Requests ride on the owner array of a data path that may be swapped on
/// reload; the distributor reads the current one.
pub(super) fn owners(view: OwnerView) -> Arc<dyn Owners> {
    Arc::new(view)
}
