//! The L7 distributor joined to the rest: it reads owners from the data
//! path's owner array, its request counts join the data path's packet
//! counts in what the WLM elements measure, and its latency and in-flight
//! figures reach them as a source of their own, next to (never in place
//! of) the applications' reports.

use std::{collections::HashMap, sync::Arc, time::Instant};

use sluice_common::maps::{InstanceCounters, ServiceCounters, Tier};

use crate::{
    control::{
        Controller,
        qos::{Report, Reports},
    },
    datapath::{Datapath, DatapathError, GlobalCounters, xdp::OwnerView},
    l7::{Distributor, Ids, Owners, stats::Interval},
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
/// instance's latency p99 and requests in flight (in the shape of an
/// application's report, kept apart from those), and which instances the
/// control loop has failed.
pub(super) fn feed(l7: &Distributor, control: &Controller, now: Instant) {
    l7.mark_failed(|name| control.is_failed(name));
    let mut reports = control.reports.lock().expect("reports lock");
    record(&mut reports, l7.intervals(), now);
}

/// The distributor's figures of one interval, `intervals` by instance
/// name, into `reports` as observed figures: were they an application's
/// report, a distributor serving an instance would keep its report fresh
/// (`health = "reports"` would never fire) and replace what the
/// application said (its `queue_depth`).
fn record(reports: &mut Reports, intervals: Vec<(String, Interval)>, now: Instant) {
    for (instance, i) in intervals {
        #[expect(clippy::cast_precision_loss, reason = "a count as a load figure")]
        let in_flight = Some(i.in_flight as f64);
        reports.observe(
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

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::record;
    use crate::{
        control::{
            Controller,
            qos::{NetnsStats, Probe, Report},
        },
        coord::EmbeddedStore,
        datapath::fake::MemDatapath,
        l7::stats::Interval,
        plan::Resolved,
        testing::{config, plan, ready},
    };

    /// An http service whose two instances are failed when their
    /// application stops reporting.
    const WEB: &str = r#"
[agent]
interval_ms = 1000

[[service]]
name = "web"
vip = "198.18.0.101"
port = 80
protocol = "tcp"
layer = "http"

[[service.instance]]
name = "web-0"
veth = "v0"
addr = "198.18.16.2:8080"
health = "reports"

[[service.instance]]
name = "web-1"
veth = "v1"
addr = "198.18.16.3:8080"
"#;

    /// A host whose veths are always there: only reports can fail an
    /// instance.
    struct Host;

    impl Probe for Host {
        fn link_exists(&self, _: u32) -> bool {
            true
        }

        fn netns_stats(&self, _: &std::path::Path, _: &[u16]) -> std::io::Result<NetnsStats> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        fn cgroup_usage_usec(&self, _: &std::path::Path) -> std::io::Result<u64> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        fn resolve(&self, _: &crate::config::Instance) -> Option<Resolved> {
            None
        }
    }

    #[test]
    fn the_distributors_figures_neither_refresh_nor_overwrite_an_application_report() {
        let cfg = config(WEB);
        let mut plan = plan(&cfg);
        let store = Arc::new(EmbeddedStore::in_memory());
        let mut ctl = ready(Controller::new(&cfg, &mut plan, store))
            .expect("controller")
            .with_probe(Box::new(Host));
        let mut dp = MemDatapath::default();
        let t0 = Instant::now();
        let app = Report {
            instance: "web-0".into(),
            latency_p99_ms: Some(3.0),
            queue_depth: Some(7.0),
            in_flight: None,
        };
        ctl.reports.lock().unwrap().put(app.clone(), t0);
        // The distributor keeps serving web-0 every interval; its
        // application said nothing after its first report.
        for k in 1..=10 {
            let now = t0 + Duration::from_secs(k);
            let served = Interval {
                requests: 100,
                latency_p99_ms: Some(1.0),
                in_flight: 2,
                ..Interval::default()
            };
            record(
                &mut ctl.reports.lock().unwrap(),
                vec![("web-0".into(), served), ("web-1".into(), served)],
                now,
            );
            ready(ctl.tick(&mut dp, now)).expect("tick");
            if k == 1 {
                let status = ready(ctl.status()).expect("status");
                let web0 = status.iter().find(|s| s.name == "web-0").expect("web-0");
                assert_eq!(
                    web0.inputs.report.as_ref(),
                    Some(&app),
                    "the application's report as it sent it"
                );
            }
        }
        assert!(
            ctl.is_failed("web-0"),
            "web-0's application stopped reporting 10 s ago (reports count 3 s), yet it is not failed"
        );
        assert!(
            !ctl.is_failed("web-1"),
            "web-1 has no health = \"reports\": it never fails for want of reports"
        );
    }
}
