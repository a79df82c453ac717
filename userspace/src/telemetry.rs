//! Prometheus metrics: names start with `sluice_`, units are in the names,
//! labels are bounded (service, instance, action, reason, kind — never a
//! unit or a flow). The Grafana dashboard in `dashboards/` uses exactly
//! these names; a test checks it.
//!
//! A leaf: it imports nothing from the rest of the crate. Callers hand in
//! plain values (counters from `sluice_common`, names, numbers), so every
//! metric name is written here and nowhere else.

use std::net::SocketAddr;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use sluice_common::{
    counters,
    maps::{InstanceCounters, ServiceCounters},
};

/// Kinds of move, as `sluice_moves_total{kind}` counts them.
pub const MOVE_KINDS: [&str; 9] = [
    "split", "give", "take", "reclaim", "merge", "drain", "manual", "claim", "failover",
];

/// Serves `/metrics` on `addr` (from the current tokio runtime).
pub fn install(addr: SocketAddr, host: &str) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        // Dashboards over a cluster tell the hosts apart by it.
        .add_global_label("host", host)
        .set_buckets_for_metric(
            Matcher::Full("sluice_map_write_seconds".into()),
            &[1e-6, 4e-6, 16e-6, 64e-6, 256e-6, 1e-3, 4e-3, 16e-3, 64e-3],
        )?
        .install()?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(
        "sluice_datapath_packets_total",
        "Packets the XDP program handled, by action or pass reason: each packet under exactly one label, so the sum over labels is every packet"
    );
    describe_counter!(
        "sluice_datapath_tag_missing_total",
        "Packets of tagged services that lacked the tag and were keyed by flow hash (also counted under their action)"
    );
    describe_counter!(
        "sluice_service_keys_total",
        "Packets of a service by how they were keyed: tag, or flow hash because the tag was missing"
    );
    describe_counter!("sluice_service_packets_total", "Packets of a service");
    describe_counter!("sluice_service_bytes_total", "Bytes of a service");
    describe_counter!(
        "sluice_service_actions_total",
        "Packets of a service by outcome (delivered, unowned, redirect_failed)"
    );
    describe_counter!(
        "sluice_pinned_flows_total",
        "Pinned-flow events by kind (hit, created, lost, expired)"
    );
    describe_counter!(
        "sluice_instance_packets_total",
        "Packets delivered to an instance"
    );
    describe_counter!(
        "sluice_instance_bytes_total",
        "Bytes delivered to an instance"
    );
    describe_gauge!(
        "sluice_instance_utilisation_ratio",
        "Utilisation of an instance (1 = at capacity)"
    );
    describe_gauge!(
        "sluice_instance_rate_packets_per_second",
        "Packets per second delivered to an instance"
    );
    describe_gauge!(
        "sluice_instance_drops_per_second",
        "UDP receive-buffer drops per second inside an instance"
    );
    describe_gauge!(
        "sluice_instance_socket_queue_bytes",
        "Bytes queued on the service's sockets inside an instance"
    );
    describe_gauge!(
        "sluice_instance_cpu_cores",
        "CPUs used by an instance's cgroup"
    );
    describe_gauge!(
        "sluice_instance_reported_latency_p99_seconds",
        "Latency p99 the application reported"
    );
    describe_gauge!(
        "sluice_instance_reported_queue_depth",
        "Queue depth the application reported"
    );
    describe_gauge!(
        "sluice_instance_reported_in_flight",
        "Requests in flight the application reported"
    );
    describe_gauge!(
        "sluice_instance_observed_latency_p99_seconds",
        "Latency p99 the L7 distributor measured of an instance over the interval"
    );
    describe_gauge!(
        "sluice_instance_observed_in_flight",
        "Requests in flight to an instance, as the L7 distributor counts them"
    );
    describe_gauge!(
        "sluice_instance_groups",
        "Work unit groups an instance owns"
    );
    describe_gauge!("sluice_instance_units", "Work units an instance owns");
    describe_counter!("sluice_moves_total", "Group moves by kind");
    describe_histogram!(
        "sluice_map_write_seconds",
        "Time to rewrite a group's owners in the data path"
    );
    describe_gauge!(
        "sluice_attach_info",
        "How the XDP program is attached (mode label)"
    );
    describe_fence();
    describe_gauge!(
        "sluice_punt_queue_depth",
        "Punted frames waiting for a claim"
    );
    describe_counter!(
        "sluice_punt_frames_total",
        "Punted frames by outcome (received, reinjected, failed, overflow, kernel_dropped)"
    );
    describe_gauge!(
        "sluice_pinned_flows",
        "Flows in the pinned-flow map (counted by a walk every 30 s)"
    );
    describe_origin();
    describe_http();
    describe_health();
}

fn describe_health() {
    describe_counter!(
        "sluice_instance_failures_total",
        "Instances found failed, by reason: veth_gone, reports_stopped, unbound (nothing bound to the service's ports any more), refusing (most of its traffic refused), probe (its active probe failed `fall` times in a row)"
    );
    describe_gauge!(
        "sluice_probe_up",
        "Active probe verdict per instance ([service.probe]): 1 up (rise successes in a row), 0 down (fall failures in a row)"
    );
}

fn describe_origin() {
    describe_counter!(
        "sluice_datapath_origin_total",
        "Packets from an SLA origin rule's source prefixes, steered by its tier (also counted under their action)"
    );
    describe_counter!(
        "sluice_datapath_icmp_errors_total",
        "ICMP errors about a flow of a service (destination unreachable, packet too big) steered to the flow's instance (also counted under their action)"
    );
    describe_counter!(
        "sluice_datapath_origin_spilled_total",
        "Packets of an origin rule sent to the unit's own owner by a spilled tier slot (also counted under their action)"
    );
    describe_gauge!(
        "sluice_origin_spilled_slots",
        "Slots of an origin rule's tier (of 64) that spill over to the service's other instances"
    );
    describe_counter!(
        "sluice_origin_spill_changes_total",
        "Changes to how many of an origin rule's tier slots spill over"
    );
}

fn describe_http() {
    describe_counter!(
        "sluice_http_requests_total",
        "HTTP requests the L7 distributor sent an instance, by status class of the answer (failed: none came)"
    );
    describe_counter!(
        "sluice_http_request_duration_seconds_bucket",
        "HTTP requests by time to the instance's response head (a histogram: le is the bucket bound)"
    );
    describe_gauge!(
        "sluice_http_in_flight",
        "HTTP requests sent to an instance and not answered whole yet"
    );
    describe_gauge!(
        "sluice_http_pool_connections",
        "Kept-alive connections to an instance, idle or busy"
    );
    describe_counter!(
        "sluice_http_pool_opened_total",
        "Connections the L7 distributor opened to an instance"
    );
    describe_counter!(
        "sluice_http_refused_total",
        "HTTP requests the L7 distributor refused or failed itself, by reason"
    );
    describe_counter!(
        "sluice_http_routed_total",
        "HTTP requests by how their instance was chosen (key, flow, priority, fallback)"
    );
    describe_counter!(
        "sluice_http_retries_total",
        "HTTP requests sent again to another instance after the first failed"
    );
    describe_gauge!(
        "sluice_http_connections",
        "Client connections open to an http service"
    );
    describe_gauge!(
        "sluice_http_connections_max",
        "Most client connections an http service holds open (max_connections, or its share of the open-file limit)"
    );
    describe_counter!(
        "sluice_http_connections_capped_total",
        "Client connections of an http service kept waiting in the listen backlog because max_connections were open"
    );
    describe_gauge!(
        "sluice_scale_instances",
        "Instances of a scaled service in the data path"
    );
    describe_gauge!(
        "sluice_scale_live_instances",
        "Instances of a scaled service that take work (not failed, drained or being removed)"
    );
    describe_gauge!(
        "sluice_scale_target_instances",
        "Where the scaler is heading: live instances (removals are not) plus launches under way"
    );
    describe_gauge!(
        "sluice_scale_min_instances",
        "Least instances of a service now (its SLA window's, else its own)"
    );
    describe_gauge!(
        "sluice_scale_max_instances",
        "Most instances of a service now"
    );
    describe_counter!(
        "sluice_scale_decisions_total",
        "Scaling decisions by action (launch, stop, restart) and reason"
    );
    describe_counter!(
        "sluice_scale_launch_failures_total",
        "Launches that failed (the start command failed or never reported, or the instance could not join)"
    );
    describe_gauge!(
        "sluice_scale_failed_instances",
        "Launched instances of a service left failed after their restarts ran out (alert when above 0)"
    );
    describe_gauge!(
        "sluice_scale_failed_alert",
        "1 while a launched instance stays failed after its failure rule's restarts ran out"
    );
}

/// What the scaler sees of a service this interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScaleGauges {
    pub instances: u32,
    pub live: u32,
    pub target: u32,
    pub min: u32,
    pub max: u32,
    /// Launched instances left failed (their restarts ran out).
    pub failed: u32,
}

/// Sets a scaled service's gauges.
pub fn scale(service: &str, g: &ScaleGauges) {
    let s = || service.to_owned();
    gauge!("sluice_scale_instances", "service" => s()).set(f64::from(g.instances));
    gauge!("sluice_scale_live_instances", "service" => s()).set(f64::from(g.live));
    gauge!("sluice_scale_target_instances", "service" => s()).set(f64::from(g.target));
    gauge!("sluice_scale_min_instances", "service" => s()).set(f64::from(g.min));
    gauge!("sluice_scale_max_instances", "service" => s()).set(f64::from(g.max));
    gauge!("sluice_scale_failed_instances", "service" => s()).set(f64::from(g.failed));
    // Every series a dashboard rates, there from the start at 0.
    for (action, reason) in SCALE_DECISIONS {
        counter!("sluice_scale_decisions_total", "service" => s(), "action" => action, "reason" => reason)
            .increment(0);
    }
    counter!("sluice_scale_launch_failures_total", "service" => s()).increment(0);
}

/// The (action, reason) pairs of `sluice_scale_decisions_total`.
pub const SCALE_DECISIONS: [(&str, &str); 6] = [
    ("launch", "below_min"),
    ("launch", "saturated"),
    ("stop", "above_max"),
    ("stop", "idle"),
    ("stop", "underloaded"),
    ("restart", "failed"),
];

/// Counts a scaling decision.
pub fn scale_decision(service: &str, action: &'static str, reason: &'static str) {
    counter!("sluice_scale_decisions_total", "service" => service.to_owned(), "action" => action, "reason" => reason).increment(1);
}

/// Counts a failed launch.
pub fn scale_launch_failed(service: &str) {
    counter!("sluice_scale_launch_failures_total", "service" => service.to_owned()).increment(1);
}

/// Raises (or clears) the alert of an instance left failed.
pub fn scale_failed_alert(service: &str, instance: &str, on: bool) {
    gauge!("sluice_scale_failed_alert", "service" => service.to_owned(), "instance" => instance.to_owned())
        .set(if on { 1.0 } else { 0.0 });
}

/// Sets the number of flows in the pinned-flow map.
pub fn pinned_flows(n: u64) {
    #[expect(clippy::cast_precision_loss, reason = "a gauge")]
    gauge!("sluice_pinned_flows").set(n as f64);
}

/// Records a map write of `seconds`.
pub fn map_write(seconds: f64) {
    histogram!("sluice_map_write_seconds").record(seconds);
}

/// Why a kind of move happens.
const fn reason(kind: &str) -> &'static str {
    match kind.as_bytes() {
        b"split" | b"give" => "overload",
        b"take" | b"reclaim" => "underload",
        b"merge" => "defragment",
        b"drain" => "drain",
        b"claim" => "punt",
        b"failover" => "instance_failed",
        _ => "operator",
    }
}

/// Counts an instance found failed, by why (`veth_gone`,
/// `reports_stopped`, `unbound`, `refusing`).
pub fn instance_failed(service: &str, instance: &str, reason: &'static str) {
    counter!("sluice_instance_failures_total", "service" => service.to_owned(), "instance" => instance.to_owned(), "reason" => reason).increment(1);
}

/// An instance's active probe verdict changed.
pub fn probe_verdict(instance: &str, up: bool) {
    gauge!("sluice_probe_up", "instance" => instance.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// Counts a move.
pub fn moved(service: &str, kind: &'static str) {
    counter!("sluice_moves_total", "service" => service.to_owned(), "kind" => kind, "reason" => reason(kind)).increment(1);
}

/// The data path's global counters, indexed as in [`counters`].
pub fn datapath(global: &[u64; counters::COUNT as usize]) {
    for ((i, name), v) in (0u32..).zip(counters::NAMES).zip(global) {
        if counters::is_outcome(i) {
            counter!("sluice_datapath_packets_total", "action" => name).absolute(*v);
        }
    }
    counter!("sluice_datapath_tag_missing_total").absolute(global[counters::TAG_MISSING as usize]);
    counter!("sluice_datapath_second_chance_total")
        .absolute(global[counters::SECOND_CHANCE as usize]);
    counter!("sluice_datapath_origin_total").absolute(global[counters::ORIGIN as usize]);
    counter!("sluice_datapath_origin_spilled_total")
        .absolute(global[counters::ORIGIN_SPILLED as usize]);
    counter!("sluice_datapath_icmp_errors_total").absolute(global[counters::ICMP_ERROR as usize]);
}

/// An origin rule's tier changed how many of its slots spill over to the
/// service's other instances (`spilled` of `slots` now).
pub fn origin_spill(service: &str, rule: &str, spilled: u32) {
    gauge!("sluice_origin_spilled_slots", "service" => service.to_owned(), "rule" => rule.to_owned())
        .set(f64::from(spilled));
    counter!("sluice_origin_spill_changes_total", "service" => service.to_owned(), "rule" => rule.to_owned())
        .increment(1);
}

/// A service's data path counters; also registers every move kind of the
/// service, so a dashboard sees zeros, not gaps.
pub fn service(name: &str, c: &ServiceCounters) {
    let name = name.to_owned();
    counter!("sluice_service_packets_total", "service" => name.clone()).absolute(c.packets);
    counter!("sluice_service_bytes_total", "service" => name.clone()).absolute(c.bytes);
    for (action, v) in [
        ("delivered", c.delivered),
        ("unowned", c.unowned),
        ("redirect_failed", c.redirect_failed),
    ] {
        counter!("sluice_service_actions_total", "service" => name.clone(), "action" => action)
            .absolute(v);
    }
    for (key, v) in [("tag", c.tagged), ("tag_missing", c.tag_missing)] {
        counter!("sluice_service_keys_total", "service" => name.clone(), "key" => key).absolute(v);
    }
    for (event, v) in [
        ("hit", c.pin_hits),
        ("created", c.pins_created),
        ("lost", c.pins_lost),
        ("expired", c.pins_expired),
    ] {
        counter!("sluice_pinned_flows_total", "service" => name.clone(), "event" => event)
            .absolute(v);
    }
    for kind in MOVE_KINDS {
        counter!("sluice_moves_total", "service" => name.clone(), "kind" => kind, "reason" => reason(kind))
            .increment(0);
    }
}

/// What the data path delivered to an instance.
pub fn instance_delivered(service: &str, instance: &str, c: &InstanceCounters) {
    let labels = [
        ("service", service.to_owned()),
        ("instance", instance.to_owned()),
    ];
    counter!("sluice_instance_packets_total", &labels).absolute(c.packets);
    counter!("sluice_instance_bytes_total", &labels).absolute(c.bytes);
}

/// An instance's QoS inputs and the utilisation they make, as the control
/// loop measured them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceGauges {
    pub utilisation: f64,
    pub rate_pps: f64,
    pub drops_ps: f64,
    pub queue_bytes: f64,
    pub cpu_cores: f64,
    pub reported_latency_p99_ms: f64,
    pub reported_queue_depth: f64,
    pub reported_in_flight: f64,
    /// The L7 distributor's figures (http services), apart from the
    /// application's.
    pub observed_latency_p99_ms: f64,
    pub observed_in_flight: f64,
    pub groups: u32,
    pub units: u32,
}

/// Sets an instance's gauges.
pub fn instance(service: &str, instance: &str, g: &InstanceGauges) {
    let labels = [
        ("service", service.to_owned()),
        ("instance", instance.to_owned()),
    ];
    gauge!("sluice_instance_utilisation_ratio", &labels).set(g.utilisation);
    gauge!("sluice_instance_rate_packets_per_second", &labels).set(g.rate_pps);
    gauge!("sluice_instance_drops_per_second", &labels).set(g.drops_ps);
    gauge!("sluice_instance_socket_queue_bytes", &labels).set(g.queue_bytes);
    gauge!("sluice_instance_cpu_cores", &labels).set(g.cpu_cores);
    gauge!("sluice_instance_reported_latency_p99_seconds", &labels)
        .set(g.reported_latency_p99_ms / 1e3);
    gauge!("sluice_instance_reported_queue_depth", &labels).set(g.reported_queue_depth);
    gauge!("sluice_instance_reported_in_flight", &labels).set(g.reported_in_flight);
    gauge!("sluice_instance_observed_latency_p99_seconds", &labels)
        .set(g.observed_latency_p99_ms / 1e3);
    gauge!("sluice_instance_observed_in_flight", &labels).set(g.observed_in_flight);
    gauge!("sluice_instance_groups", &labels).set(f64::from(g.groups));
    gauge!("sluice_instance_units", &labels).set(f64::from(g.units));
}

/// The punt path's queue and frame counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PuntCounts {
    pub depth: usize,
    pub received: u64,
    pub overflow: u64,
    pub reinjected: u64,
    /// Not a packet of a configured service (e.g. the config changed).
    pub not_service: u64,
    /// No live instance to claim for (all drained or failed, or the unit's
    /// owner has failed and its failover is pending).
    pub no_owner: u64,
    /// The claim's store write failed (retried with the next frame).
    pub claim_failed: u64,
    /// Sending to the owner's veth failed.
    pub send_failed: u64,
    /// Dropped by the kernel before the agent saw them (socket ring full).
    pub kernel_dropped: u64,
}

/// Sets the punt path's metrics.
pub fn punt(p: &PuntCounts) {
    #[expect(clippy::cast_precision_loss, reason = "a gauge")]
    gauge!("sluice_punt_queue_depth").set(p.depth as f64);
    for (outcome, v) in [
        ("received", p.received),
        ("overflow", p.overflow),
        ("reinjected", p.reinjected),
        ("not_service", p.not_service),
        ("no_owner", p.no_owner),
        ("claim_failed", p.claim_failed),
        ("send_failed", p.send_failed),
        ("kernel_dropped", p.kernel_dropped),
    ] {
        counter!("sluice_punt_frames_total", "outcome" => outcome).absolute(v);
    }
}

/// One instance of an http service, as the L7 distributor measured it
/// (counts since the agent started).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpInstance<'a> {
    /// Requests by status class (`2xx`, ..., `failed`).
    pub by_class: &'a [(&'a str, u64)],
    pub in_flight: u64,
    /// Pooled connections open (busy or idle), and idle.
    pub pool_open: u32,
    pub pool_idle: u32,
    /// Connections ever opened to the instance.
    pub pool_opened: u64,
    /// Latency histogram: bucket upper bounds (seconds), per-bucket counts
    /// (one more than bounds: the open last bucket), and the sum.
    pub latency_bounds: &'a [f64],
    pub latency_buckets: &'a [u64],
    pub latency_sum: f64,
}

/// Sets an http instance's metrics. The latency histogram is written as
/// Prometheus' `_bucket{le}`, `_sum` and `_count` series, from the
/// distributor's own lock-free buckets.
pub fn http_instance(service: &str, instance: &str, h: &HttpInstance<'_>) {
    let labels = [
        ("service", service.to_owned()),
        ("instance", instance.to_owned()),
    ];
    for (class, n) in h.by_class {
        counter!("sluice_http_requests_total", "service" => service.to_owned(), "instance" => instance.to_owned(), "class" => (*class).to_owned()).absolute(*n);
    }
    #[expect(clippy::cast_precision_loss, reason = "gauges")]
    {
        gauge!("sluice_http_in_flight", &labels).set(h.in_flight as f64);
        gauge!("sluice_http_pool_connections", "service" => service.to_owned(), "instance" => instance.to_owned(), "state" => "idle").set(f64::from(h.pool_idle));
        gauge!("sluice_http_pool_connections", "service" => service.to_owned(), "instance" => instance.to_owned(), "state" => "busy").set(f64::from(h.pool_open.saturating_sub(h.pool_idle)));
        gauge!("sluice_http_request_duration_seconds_sum", &labels).set(h.latency_sum);
    }
    counter!("sluice_http_pool_opened_total", &labels).absolute(h.pool_opened);
    let mut cumulative = 0;
    for (i, n) in h.latency_buckets.iter().enumerate() {
        cumulative += n;
        let le = h
            .latency_bounds
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
        counter!("sluice_http_request_duration_seconds_bucket", "service" => service.to_owned(), "instance" => instance.to_owned(), "le" => le).absolute(cumulative);
    }
    counter!("sluice_http_request_duration_seconds_count", &labels).absolute(cumulative);
}

/// Requests the distributor refused or failed itself, by reason.
pub fn http_refused(service: &str, reason: &'static str, n: u64) {
    counter!("sluice_http_refused_total", "service" => service.to_owned(), "reason" => reason)
        .absolute(n);
}

/// Requests by how they were routed (`key`, `flow`, `priority`,
/// `fallback`).
pub fn http_routed(service: &str, how: &'static str, n: u64) {
    counter!("sluice_http_routed_total", "service" => service.to_owned(), "how" => how).absolute(n);
}

/// Requests sent again to another instance.
pub fn http_retries(service: &str, n: u64) {
    counter!("sluice_http_retries_total", "service" => service.to_owned()).absolute(n);
}

/// A service's client connections: open now, its cap, and how often the
/// cap stopped its listeners.
pub fn http_connections(service: &str, open: u32, max: u32, capped: u64) {
    gauge!("sluice_http_connections", "service" => service.to_owned()).set(f64::from(open));
    gauge!("sluice_http_connections_max", "service" => service.to_owned()).set(f64::from(max));
    counter!("sluice_http_connections_capped_total", "service" => service.to_owned())
        .absolute(capped);
}

/// How the program is attached to `iface` (`native` or `generic`).
pub fn attached(iface: &str, mode: &'static str) {
    gauge!("sluice_attach_info", "iface" => iface.to_owned(), "mode" => mode).set(1.0);
}

/// This host's fence (see `control::fence`): whether it is past its
/// deadline, the time to it, whether a vouch holds it open.
pub fn fence(fenced: bool, deadline_in: Option<f64>, vouched: bool) {
    gauge!("sluice_fenced").set(if fenced { 1.0 } else { 0.0 });
    if let Some(d) = deadline_in {
        gauge!("sluice_fence_deadline_seconds").set(d);
    }
    gauge!("sluice_fence_vouched").set(if vouched { 1.0 } else { 0.0 });
}

/// The host found its lease lost and joined again.
pub fn fence_rejoined() {
    counter!("sluice_fence_rejoins_total").increment(1);
}

/// The fence's metrics (see [`fence`]).
fn describe_fence() {
    describe_gauge!(
        "sluice_fenced",
        "1 while this host is fenced (past its lease's fence deadline: it delivers nothing as an owner)"
    );
    describe_gauge!(
        "sluice_fence_deadline_seconds",
        "Seconds to this host's fence deadline (negative: past it)"
    );
    describe_gauge!(
        "sluice_fence_vouched",
        "1 while the fence is extended because every peer that answered cannot renew either"
    );
    describe_counter!(
        "sluice_fence_rejoins_total",
        "Times this host found its lease lost and joined the cluster again"
    );
}
