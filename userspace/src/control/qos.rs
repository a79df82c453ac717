//! QoS inputs of an instance and the one utilisation figure they make.
//!
//! Utilisation is the most constrained of the instance's resources, each
//! as a fraction of what it can take (1.0 = at capacity):
//!
//! ```text
//! u = max( rate_pps / capacity_pps,
//!          1 + drops_ps / rate_pps          if the instance drops (> 0 drops/s),
//!          cpu_cores / cpu_limit            with a cgroup and cpu_limit,
//!          latency_p99_ms / latency_target_ms,
//!          queue_depth / queue_target,
//!          in_flight / in_flight_target     from fresh application reports )
//! ```
//!
//! A receive-buffer drop means the instance is past capacity whatever its
//! rate, hence the term above 1. Socket queue occupancy is measured and
//! exported but does not enter `u`: /proc does not tell the buffer size it
//! would be a fraction of.
//!
//! Whether a utilisation is overloaded or under-loaded is for
//! [`Thresholds`] to say.

use std::{
    collections::HashMap,
    fs, io,
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub use self::{
    netns::{NetnsStats, netns_stats},
    thresholds::Thresholds,
};
use crate::{config::WlmConfig, sys::link::LinkProbe};

mod netns;
mod thresholds;

/// QoS an application reports about itself over the agent's local API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub instance: String,
    #[serde(default)]
    pub latency_p99_ms: Option<f64>,
    #[serde(default)]
    pub queue_depth: Option<f64>,
    #[serde(default)]
    pub in_flight: Option<f64>,
}

/// Everything measured about one instance over one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    pub rate_pps: f64,
    pub bytes_ps: f64,
    /// UDP receive-buffer drops per second in the instance's namespace.
    pub drops_ps: f64,
    /// Bytes queued on the service's sockets in the instance.
    pub queue_bytes: f64,
    /// Sockets bound or listening on the service's ports in the
    /// instance's namespace (`None`: not known).
    pub listeners: Option<u32>,
    /// Traffic the instance's stack refused, per second (datagrams to no
    /// socket, TCP resets sent).
    pub refused_ps: f64,
    /// CPUs in use by the instance's cgroup.
    pub cpu_cores: Option<f64>,
    pub cpu_limit: Option<f64>,
    /// The application's last report, if fresh.
    pub report: Option<Report>,
    /// What the L7 distributor measured of the instance (http services),
    /// if fresh: a source of its own, never taken for the application's
    /// report (`health = "reports"` hears the application only).
    pub observed: Option<Report>,
}

/// The utilisation of an instance (see the module docs).
#[must_use]
pub fn utilisation(i: &Inputs, cfg: &WlmConfig) -> f64 {
    let mut u = i.rate_pps / cfg.capacity_pps;
    if i.drops_ps > 0.0 {
        u = u.max(1.0 + i.drops_ps / i.rate_pps.max(1.0));
    }
    if let (Some(c), Some(l)) = (i.cpu_cores, i.cpu_limit) {
        u = u.max(c / l);
    }
    for r in i.report.iter().chain(&i.observed) {
        for (v, t) in [
            (r.latency_p99_ms, cfg.latency_target_ms),
            (r.queue_depth, cfg.queue_target),
            (r.in_flight, cfg.in_flight_target),
        ] {
            if let (Some(v), Some(t)) = (v, t) {
                u = u.max(v / t);
            }
        }
    }
    u
}

/// CPU time used by a cgroup v2, in microseconds.
pub fn cgroup_usage_usec(cgroup: &Path) -> io::Result<u64> {
    let stat = fs::read_to_string(cgroup.join("cpu.stat"))?;
    stat.lines()
        .find_map(|l| {
            l.strip_prefix("usage_usec ")
                .and_then(|v| v.trim().parse().ok())
        })
        .ok_or_else(|| io::Error::other(format!("no usage_usec in {}/cpu.stat", cgroup.display())))
}

/// Application reports, newest per instance, and apart from them what the
/// L7 distributor measured of each instance: the distributor's figures
/// keep neither an application's report fresh nor replace its figures.
#[derive(Debug, Default)]
pub struct Reports {
    latest: HashMap<String, (Report, Instant)>,
    observed: HashMap<String, (Report, Instant)>,
}

impl Reports {
    /// An application's report (local API, `sluice report`).
    pub fn put(&mut self, r: Report, now: Instant) {
        self.latest.insert(r.instance.clone(), (r, now));
    }

    /// The L7 distributor's figures of an instance, for one interval.
    pub fn observe(&mut self, r: Report, now: Instant) {
        self.observed.insert(r.instance.clone(), (r, now));
    }

    /// The application's report of `instance` if it is younger than
    /// `max_age`.
    #[must_use]
    pub fn fresh(&self, instance: &str, now: Instant, max_age: Duration) -> Option<Report> {
        young(&self.latest, instance, now, max_age)
    }

    /// The distributor's figures of `instance` if younger than `max_age`.
    #[must_use]
    pub fn fresh_observed(
        &self,
        instance: &str,
        now: Instant,
        max_age: Duration,
    ) -> Option<Report> {
        young(&self.observed, instance, now, max_age)
    }
}

fn young(
    from: &HashMap<String, (Report, Instant)>,
    instance: &str,
    now: Instant,
    max_age: Duration,
) -> Option<Report> {
    from.get(instance)
        .filter(|(_, at)| now.saturating_duration_since(*at) <= max_age)
        .map(|(r, _)| r.clone())
}

/// A counter sampled at intervals, giving per-second rates.
#[derive(Clone, Debug, Default)]
pub struct Rate {
    last: Option<(u64, Instant)>,
}

impl Rate {
    /// Rate since the previous call (0 on the first).
    pub fn update(&mut self, value: u64, now: Instant) -> f64 {
        let rate = match self.last {
            Some((v, t)) if now > t => {
                #[expect(clippy::cast_precision_loss, reason = "rates are estimates")]
                let d = value.saturating_sub(v) as f64;
                d / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        self.last = Some((value, now));
        rate
    }
}

/// What the control loop reads of the host about an instance: whether its
/// veth still exists, and its namespace and cgroup QoS sources. The agent
/// uses [`HostProbe`]; unit tests hand in their own.
pub trait Probe: Send {
    /// Whether interface `ifindex` exists in the agent's namespace.
    fn link_exists(&self, ifindex: u32) -> bool;
    /// Socket statistics inside the instance's namespace.
    fn netns_stats(&self, netns: &Path, ports: &[u16]) -> io::Result<NetnsStats>;
    /// CPU time of the instance's cgroup, in microseconds.
    fn cgroup_usage_usec(&self, cgroup: &Path) -> io::Result<u64>;
    /// The instance's veth and MAC as the host has them now, if it can be
    /// found (a failed instance is looked for each interval).
    fn resolve(&self, instance: &crate::config::Instance) -> Option<crate::plan::Resolved>;
}

/// The host as it is, seen from the namespace the probe was made in.
pub struct HostProbe {
    /// `None` when no netlink socket could be opened: every link then
    /// counts as present (failures are found by reports only).
    links: Option<LinkProbe>,
    /// That namespace, for looking veths up by name from any thread.
    netns: Option<fs::File>,
}

impl HostProbe {
    /// A probe of the calling thread's network namespace.
    #[must_use]
    pub fn new() -> Self {
        let links = LinkProbe::new()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no netlink socket: a vanished veth will not be noticed");
            })
            .ok();
        let netns = fs::File::open("/proc/thread-self/ns/net").ok();
        Self { links, netns }
    }
}

impl Default for HostProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe for HostProbe {
    fn link_exists(&self, ifindex: u32) -> bool {
        self.links.as_ref().is_none_or(|l| l.exists(ifindex))
    }

    fn netns_stats(&self, netns: &Path, ports: &[u16]) -> io::Result<NetnsStats> {
        netns_stats(netns, ports)
    }

    fn cgroup_usage_usec(&self, cgroup: &Path) -> io::Result<u64> {
        cgroup_usage_usec(cgroup)
    }

    fn resolve(&self, instance: &crate::config::Instance) -> Option<crate::plan::Resolved> {
        let resolve = || crate::plan::resolve_instance(instance, &instance.name).ok();
        // Interface names mean something in the probe's namespace only (the
        // agent's), whichever thread asks.
        match &self.netns {
            Some(ns) => {
                let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(ns));
                crate::sys::netns::run_in(Path::new(&path), resolve)
                    .ok()
                    .flatten()
            }
            None => resolve(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_mean_overload_whatever_the_rate() {
        let cfg = WlmConfig::default();
        let quiet = Inputs {
            rate_pps: 100.0,
            ..Inputs::default()
        };
        assert!(utilisation(&quiet, &cfg) < 0.01);
        let dropping = Inputs {
            drops_ps: 10.0,
            ..quiet.clone()
        };
        assert!((utilisation(&dropping, &cfg) - 1.1).abs() < 1e-9);
    }

    #[test]
    fn the_most_constrained_input_wins() {
        let cfg = WlmConfig {
            latency_target_ms: Some(20.0),
            queue_target: Some(100.0),
            ..WlmConfig::default()
        };
        let i = Inputs {
            rate_pps: 10_000.0,
            cpu_cores: Some(1.5),
            cpu_limit: Some(2.0),
            report: Some(Report {
                instance: "a".into(),
                latency_p99_ms: Some(18.0),
                queue_depth: Some(50.0),
                in_flight: Some(1e9),
            }),
            ..Inputs::default()
        };
        // in_flight has no target, so it does not count.
        assert!((utilisation(&i, &cfg) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn the_distributors_figures_count_beside_the_applications() {
        let cfg = WlmConfig {
            latency_target_ms: Some(20.0),
            queue_target: Some(100.0),
            ..WlmConfig::default()
        };
        let report = |latency, queue| Report {
            instance: "a".into(),
            latency_p99_ms: latency,
            queue_depth: queue,
            in_flight: None,
        };
        let i = Inputs {
            report: Some(report(Some(4.0), Some(50.0))),
            observed: Some(report(Some(16.0), None)),
            ..Inputs::default()
        };
        // The most constrained figure of either source: 16 / 20.
        assert!((utilisation(&i, &cfg) - 0.8).abs() < 1e-9);
        let i = Inputs {
            observed: Some(report(Some(4.0), None)),
            ..i
        };
        assert!((utilisation(&i, &cfg) - 0.5).abs() < 1e-9, "50 / 100");
    }

    #[test]
    fn stale_reports_are_ignored() {
        let mut r = Reports::default();
        let t0 = Instant::now();
        r.put(
            Report {
                instance: "a".into(),
                queue_depth: Some(3.0),
                ..Report::default()
            },
            t0,
        );
        assert!(
            r.fresh("a", t0 + Duration::from_secs(1), Duration::from_secs(2))
                .is_some()
        );
        assert!(
            r.fresh("a", t0 + Duration::from_secs(3), Duration::from_secs(2))
                .is_none()
        );
    }
}
