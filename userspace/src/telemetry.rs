//! Prometheus metrics: names start with `sluice_`, units are in the names,
//! labels are bounded (service, instance, action, reason, kind — never a
//! unit or a flow). The Grafana dashboard in `dashboards/` uses exactly
//! these names; a test checks it.

use std::net::SocketAddr;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use sluice_common::counters;

use crate::{agent::Agent, dataplane::AttachMode};

/// Kinds of move, as `sluice_moves_total{kind}` counts them.
pub const MOVE_KINDS: [&str; 7] = [
    "split", "give", "reclaim", "merge", "drain", "manual", "claim",
];

/// Serves `/metrics` on `addr` (from the current tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
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
        "Packets the XDP program handled, by action or pass reason"
    );
    describe_counter!("sluice_service_packets_total", "Packets of a service");
    describe_counter!("sluice_service_bytes_total", "Bytes of a service");
    describe_counter!(
        "sluice_service_actions_total",
        "Packets of a service by outcome (delivered, unowned, redirect_failed, tagged, tag_missing)"
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
    describe_gauge!(
        "sluice_punt_queue_depth",
        "Punted frames waiting for a claim"
    );
    describe_counter!(
        "sluice_punt_frames_total",
        "Punted frames by outcome (received, reinjected, failed, overflow)"
    );
    describe_gauge!(
        "sluice_pinned_flows",
        "Flows in the pinned-flow map (counted by a walk every 30 s)"
    );
}

/// Counts the pinned-flow map pinned at `path` every `every`, on a thread
/// of its own: a walk of a full map is a million `bpf()` calls, which the
/// control loop should not wait for.
pub fn count_pinned_flows(path: std::path::PathBuf, every: std::time::Duration) {
    use sluice_common::maps::{Pin, PinKey};
    let spawned = std::thread::Builder::new()
        .name("sluice-pin-count".into())
        .spawn(move || {
            loop {
                match aya::maps::MapData::from_pin(&path) {
                    Ok(data) => {
                        let map: Result<aya::maps::HashMap<_, PinKey, Pin>, _> =
                            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data));
                        if let Ok(map) = map {
                            #[expect(clippy::cast_precision_loss, reason = "a gauge")]
                            let n = map.keys().map_while(Result::ok).count() as f64;
                            gauge!("sluice_pinned_flows").set(n);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, path = %path.display(), "pinned-flow map not readable");
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to count pinned flows");
    }
}

/// Records a map write of `seconds`.
pub fn map_write(seconds: f64) {
    histogram!("sluice_map_write_seconds").record(seconds);
}

/// Why a kind of move happens.
const fn reason(kind: &str) -> &'static str {
    match kind.as_bytes() {
        b"split" | b"give" => "overload",
        b"reclaim" => "underload",
        b"merge" => "defragment",
        b"drain" => "drain",
        b"claim" => "punt",
        b"failover" => "instance_failed",
        _ => "operator",
    }
}

/// Counts a move.
pub fn moved(service: &str, kind: &'static str) {
    counter!("sluice_moves_total", "service" => service.to_owned(), "kind" => kind, "reason" => reason(kind)).increment(1);
}

/// Publishes everything the agent knows, once an interval.
pub fn publish(agent: &Agent) {
    let dp = &agent.dataplane;
    if let Ok(g) = dp.global_counters() {
        for (name, v) in counters::NAMES.iter().zip(g) {
            counter!("sluice_datapath_packets_total", "action" => *name).absolute(v);
        }
    }
    for s in &agent.plan.services {
        let name = s.name.clone();
        if let Ok(c) = dp.service_counters(s.id) {
            counter!("sluice_service_packets_total", "service" => name.clone()).absolute(c.packets);
            counter!("sluice_service_bytes_total", "service" => name.clone()).absolute(c.bytes);
            for (action, v) in [
                ("delivered", c.delivered),
                ("unowned", c.unowned),
                ("redirect_failed", c.redirect_failed),
                ("tagged", c.tagged),
                ("tag_missing", c.tag_missing),
            ] {
                counter!("sluice_service_actions_total", "service" => name.clone(), "action" => action).absolute(v);
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
        }
        for kind in MOVE_KINDS {
            // Registers every kind, so a dashboard sees zeros, not gaps.
            counter!("sluice_moves_total", "service" => name.clone(), "kind" => kind, "reason" => reason(kind))
                .increment(0);
        }
    }
    for i in &agent.plan.instances {
        if let Ok(c) = dp.instance_counters(i.id) {
            let service = agent.plan.services[i.service_id as usize].name.clone();
            let labels = [("service", service), ("instance", i.name.clone())];
            counter!("sluice_instance_packets_total", &labels).absolute(c.packets);
            counter!("sluice_instance_bytes_total", &labels).absolute(c.bytes);
        }
    }
    if let Ok(status) = agent.control.status() {
        for st in status {
            let labels = [
                ("service", st.service.clone()),
                ("instance", st.name.clone()),
            ];
            gauge!("sluice_instance_utilisation_ratio", &labels).set(st.sample.utilisation);
            gauge!("sluice_instance_rate_packets_per_second", &labels).set(st.inputs.rate_pps);
            gauge!("sluice_instance_drops_per_second", &labels).set(st.inputs.drops_ps);
            gauge!("sluice_instance_socket_queue_bytes", &labels).set(st.inputs.queue_bytes);
            gauge!("sluice_instance_cpu_cores", &labels).set(st.inputs.cpu_cores.unwrap_or(0.0));
            let r = st.inputs.report.clone().unwrap_or_default();
            gauge!("sluice_instance_reported_latency_p99_seconds", &labels)
                .set(r.latency_p99_ms.unwrap_or(0.0) / 1e3);
            gauge!("sluice_instance_reported_queue_depth", &labels)
                .set(r.queue_depth.unwrap_or(0.0));
            gauge!("sluice_instance_reported_in_flight", &labels).set(r.in_flight.unwrap_or(0.0));
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let groups = st.groups.len() as f64;
            gauge!("sluice_instance_groups", &labels).set(groups);
            gauge!("sluice_instance_units", &labels)
                .set(f64::from(st.groups.iter().map(|g| g.size()).sum::<u32>()));
        }
    }
    if let Some(p) = &agent.punt {
        #[expect(clippy::cast_precision_loss, reason = "a gauge")]
        let depth = p.queue.depth() as f64;
        gauge!("sluice_punt_queue_depth").set(depth);
        for (outcome, v) in [
            (
                "received",
                p.queue.received.load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "overflow",
                p.queue.overflow.load(std::sync::atomic::Ordering::Relaxed),
            ),
            ("reinjected", p.delivered),
            ("failed", p.failed),
        ] {
            counter!("sluice_punt_frames_total", "outcome" => outcome).absolute(v);
        }
    }
    let mode = match agent.mode {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
    };
    gauge!("sluice_attach_info", "iface" => agent.iface.clone(), "mode" => mode).set(1.0);
}
