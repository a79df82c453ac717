//! Active probes (`[service.probe]`): a task per probed instance of this
//! host asks its application every probe interval, off the control loop;
//! `fall` failures in a row mark it down, `rise` successes up. Health reads
//! the verdicts each control interval ([`super::health`]).
//!
//! An L4 service's instance is probed from inside its network namespace at
//! the service's first VIP (the instance holds it, for direct server
//! return), so the probe reaches this instance's application and no other;
//! one whose namespace is unknown is not probed (said once in the log). An
//! http service's instance is probed at its `addr`, as the L7 distributor
//! reaches it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::services::{InstCtl, ServiceCtl};
use crate::{
    config::{Probe, ProbeKind, TemplateVars, expand},
    sys::probe::{Check, Target},
};

/// The last verdict on an instance's application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// `rise` successes in a row (and none failed since).
    Up,
    /// `fall` failures in a row: the last one's reason.
    Down(String),
}

/// Successes and failures in a row, and the verdict they add up to (none
/// until `rise` or `fall` is reached the first time).
#[derive(Debug, Default)]
struct Streak {
    ok: u32,
    bad: u32,
    verdict: Option<Verdict>,
}

impl Streak {
    /// Counts one probe's outcome; returns the verdict if it changed.
    fn record(&mut self, outcome: Result<(), String>, rise: u32, fall: u32) -> Option<Verdict> {
        let next = match outcome {
            Ok(()) => {
                self.ok += 1;
                self.bad = 0;
                (self.ok >= rise).then_some(Verdict::Up)
            }
            Err(why) => {
                self.bad += 1;
                self.ok = 0;
                (self.bad >= fall).then_some(Verdict::Down(why))
            }
        };
        let next = next?;
        let same = matches!(
            (&self.verdict, &next),
            (Some(Verdict::Up), Verdict::Up) | (Some(Verdict::Down(_)), Verdict::Down(_))
        );
        if same {
            return None;
        }
        self.verdict = Some(next.clone());
        Some(next)
    }
}

/// What a task probes; a change restarts it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Spec {
    target: Target,
    probe: Probe,
}

struct Task {
    spec: Spec,
    handle: tokio::task::JoinHandle<()>,
}

/// The probe tasks of this host's instances, and their verdicts.
#[derive(Default)]
pub(super) struct ActiveProbes {
    tasks: HashMap<String, Task>,
    verdicts: Arc<Mutex<HashMap<String, Verdict>>>,
    /// Instances said in the log to be unprobed (no namespace known).
    unprobed: std::collections::HashSet<String>,
}

impl Drop for ActiveProbes {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}

impl ActiveProbes {
    /// Whether `instance`'s application is probed and `fall` probes in a
    /// row failed (not yet `rise` succeeded since).
    pub(super) fn is_down(&self, instance: &str) -> bool {
        matches!(
            self.verdicts.lock().expect("verdicts lock").get(instance),
            Some(Verdict::Down(_))
        )
    }

    /// Starts a task for every probed instance that has none or whose
    /// target changed (a reload, a new namespace), and ends the tasks of
    /// instances no longer probed.
    pub(super) fn sync(&mut self, services: &[ServiceCtl]) {
        let mut wanted = HashMap::new();
        for s in services {
            let Some(probe) = &s.probe else { continue };
            for i in &s.instances {
                match target(s, i, probe) {
                    Some(target) => {
                        wanted.insert(
                            i.name.clone(),
                            Spec {
                                target,
                                probe: probe.clone(),
                            },
                        );
                    }
                    None => {
                        if self.unprobed.insert(i.name.clone()) {
                            tracing::warn!(instance = %i.name, service = %s.name, "not probed: its network namespace is unknown (give the instance's netns in the config)");
                        }
                    }
                }
            }
        }
        let verdicts = &self.verdicts;
        self.tasks.retain(|name, t| {
            let keep = wanted.get(name) == Some(&t.spec);
            if !keep {
                t.handle.abort();
                verdicts.lock().expect("verdicts lock").remove(name);
            }
            keep
        });
        for (name, spec) in wanted {
            if self.tasks.contains_key(&name) {
                continue;
            }
            self.unprobed.remove(&name);
            let handle = tokio::spawn(prober(
                name.clone(),
                spec.clone(),
                Arc::clone(&self.verdicts),
            ));
            self.tasks.insert(name, Task { spec, handle });
        }
    }
}

/// Where and how `i` is probed; `None` when an L4 instance's namespace is
/// unknown.
fn target(s: &ServiceCtl, i: &InstCtl, probe: &Probe) -> Option<Target> {
    let first_port = s.ports.first().copied().unwrap_or_default();
    // http services: the instance's own address, from the agent's
    // namespace; L4 services: the VIP, from inside the instance's.
    let (ip, default_port, netns) = match i.config.addr {
        Some(addr) if s.http => (addr.ip(), addr.port(), None),
        _ => (s.vip, first_port, Some(i.netns.clone()?)),
    };
    let at = |port: Option<u16>| std::net::SocketAddr::new(ip, port.unwrap_or(default_port));
    let check = match &probe.kind {
        ProbeKind::Udp { port, send, expect } => Check::Udp {
            addr: at(*port),
            send: send.clone(),
            expect: expect.clone(),
        },
        ProbeKind::Tcp { port } => Check::Tcp { addr: at(*port) },
        ProbeKind::Http { port, path, status } => Check::Http {
            addr: at(*port),
            host: s.vip.to_string(),
            path: path.clone(),
            status: *status,
        },
        ProbeKind::Exec { command } => {
            let vars = TemplateVars {
                service: &s.name,
                name: &i.name,
                vip: s.vip,
                port: first_port,
                index: i.id,
            };
            return Some(Target {
                netns: i.netns.clone(),
                check: Check::Exec {
                    argv: command.iter().map(|a| expand(a, &vars)).collect(),
                },
            });
        }
    };
    Some(Target { netns, check })
}

/// One instance's probe loop: a probe every interval (each on a blocking
/// thread, bounded by the timeout), its verdict kept in `verdicts`.
async fn prober(name: String, spec: Spec, verdicts: Arc<Mutex<HashMap<String, Verdict>>>) {
    let Spec { target, probe } = spec;
    let mut every = tokio::time::interval(probe.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = Streak::default();
    loop {
        every.tick().await;
        let t = target.clone();
        let timeout = probe.timeout;
        let outcome = tokio::task::spawn_blocking(move || crate::sys::probe::run(&t, timeout))
            .await
            .unwrap_or_else(|e| Err(format!("the probe panicked: {e}")));
        if let Some(v) = streak.record(outcome, probe.rise, probe.fall) {
            match &v {
                Verdict::Up => {
                    tracing::info!(instance = %name, probe = %target, rise = probe.rise, "probe: up");
                }
                Verdict::Down(why) => {
                    tracing::warn!(instance = %name, probe = %target, fall = probe.fall, why = %why, "probe: down");
                }
            }
            crate::telemetry::probe_verdict(&name, v == Verdict::Up);
            verdicts
                .lock()
                .expect("verdicts lock")
                .insert(name.clone(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Streak, Verdict, target};
    use crate::{
        config::tests::BASE,
        control::services::views,
        sys::probe::Check,
        testing::{config, plan},
    };

    #[test]
    fn l4_instances_are_probed_in_their_namespace_at_the_vip_and_http_ones_at_their_addr() {
        let text = BASE
            .replacen(
                "protocol = \"udp\"\n",
                "protocol = \"udp\"\nprobe = { kind = \"udp\", send = \"ping\" }\n",
                1,
            )
            .replacen(
                "layer = \"http\"\n",
                "layer = \"http\"\nprobe = { kind = \"http\", path = \"/healthz\" }\n",
                1,
            );
        let cfg = config(&text);
        let mut services = views(&cfg, &plan(&cfg));
        let (kv, web) = (&services[0], &services[1]);
        let probe = |s: &crate::control::services::ServiceCtl| s.probe.clone().expect("probe");
        assert_eq!(
            target(kv, &kv.instances[0], &probe(kv)),
            None,
            "no namespace known: not probed (through the data path it could reach another instance)"
        );
        let t = target(web, &web.instances[0], &probe(web)).expect("target");
        assert_eq!(t.netns, None, "http instances: from the agent's namespace");
        assert_eq!(
            t.check,
            Check::Http {
                addr: "198.18.16.2:8080".parse().unwrap(),
                host: "198.18.0.101".into(),
                path: "/healthz".into(),
                status: None,
            }
        );
        services[0].instances[0].netns = Some(PathBuf::from("/run/netns/kv0"));
        let kv = &services[0];
        let t = target(kv, &kv.instances[0], &probe(kv)).expect("target");
        assert_eq!(t.netns, Some(PathBuf::from("/run/netns/kv0")));
        assert_eq!(
            t.check,
            Check::Udp {
                addr: "198.18.0.100:7000".parse().unwrap(),
                send: b"ping".to_vec(),
                expect: Vec::new(),
            }
        );
        let exec = crate::config::Probe {
            kind: crate::config::ProbeKind::Exec {
                command: vec!["check".into(), "{name}@{vip}:{port}".into()],
            },
            ..probe(kv)
        };
        let t = target(kv, &kv.instances[0], &exec).expect("target");
        assert_eq!(
            t.check,
            Check::Exec {
                argv: vec!["check".into(), "kv-0@198.18.0.100:7000".into()]
            }
        );
    }

    const OK: Result<(), String> = Ok(());

    fn bad() -> Result<(), String> {
        Err("timed out".into())
    }

    #[test]
    fn fall_failures_in_a_row_mark_down_and_rise_successes_up() {
        let mut s = Streak::default();
        // Nothing until one count is reached.
        assert_eq!(s.record(bad(), 2, 3), None);
        assert_eq!(s.record(bad(), 2, 3), None);
        assert_eq!(s.record(OK, 2, 3), None, "a success resets the failures");
        assert_eq!(s.record(bad(), 2, 3), None);
        assert_eq!(s.record(bad(), 2, 3), None);
        assert_eq!(
            s.record(bad(), 2, 3),
            Some(Verdict::Down("timed out".into()))
        );
        assert_eq!(s.record(bad(), 2, 3), None, "said once");
        assert_eq!(s.record(OK, 2, 3), None);
        assert_eq!(
            s.record(bad(), 2, 3),
            None,
            "a failure resets the successes"
        );
        assert_eq!(s.record(OK, 2, 3), None);
        assert_eq!(s.record(OK, 2, 3), Some(Verdict::Up));
        assert_eq!(s.record(OK, 2, 3), None);
    }

    #[test]
    fn a_first_success_with_rise_1_is_up_at_once() {
        let mut s = Streak::default();
        assert_eq!(s.record(OK, 1, 1), Some(Verdict::Up));
        assert_eq!(
            s.record(bad(), 1, 1),
            Some(Verdict::Down("timed out".into()))
        );
    }
}
