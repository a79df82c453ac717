//! What the loop knows of each service: its instances here (as measured,
//! with each element's state) and on other hosts (as their hosts publish
//! them), and what `status` shows of them. The parts of the loop read and
//! update these views; none keeps a copy.

use std::{collections::HashMap, path::PathBuf, time::Instant};

use sluice_common::HIT_BUCKETS_PER_SERVICE;

use super::{
    measure::Meter,
    origin,
    qos::{Inputs, Rate, Thresholds},
    wlm::{self, ElementState, Peer, Sample},
};
use crate::{
    config::{Config, WlmConfig},
    coord::{GroupEntry, InstanceState, Load},
    plan::{Group, Plan, RemotePlan},
};

/// What `status` shows of an instance on another host: its host's view.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteStatus {
    pub service: String,
    pub name: String,
    pub host: String,
    /// Its host holds its lease.
    pub live: bool,
    /// As its host published it.
    pub sample: Sample,
    /// As its host published it.
    pub state: InstanceState,
}

/// What `status` shows of an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceStatus {
    pub service: String,
    pub name: String,
    pub sample: Sample,
    pub inputs: Inputs,
    pub groups: Vec<Group>,
    pub ceiling_pps: Option<f64>,
    /// Failed, drained, reserved or ok, as this host publishes it.
    pub state: InstanceState,
}

/// An instance on this host, as the loop knows it.
pub(super) struct InstCtl {
    pub(super) name: String,
    pub(super) id: u32,
    /// Host-side veth: the instance has failed when it disappears.
    pub(super) ifindex: u32,
    /// As configured: its cgroup, CPU limit and health source, and how to
    /// find its veth and MAC again after a failure.
    pub(super) config: crate::config::Instance,
    /// A failed instance found back (veth there, reports coming): since
    /// when, for the hold-down.
    pub(super) recovering_since: Option<Instant>,
    pub(super) netns: Option<PathBuf>,
    pub(super) meter: Meter,
    pub(super) state: ElementState,
    pub(super) sample: Sample,
    pub(super) inputs: Inputs,
}

/// An instance on another host: a peer of this host's elements, measured
/// by its own host (the load it publishes in the store).
#[derive(Clone, Debug)]
pub(super) struct RemoteCtl {
    pub(super) name: String,
    pub(super) id: u32,
    pub(super) host: String,
    /// Its host holds its lease.
    pub(super) live: bool,
    pub(super) sample: Sample,
    /// As its host published it with its load.
    pub(super) state: InstanceState,
}

impl RemoteCtl {
    /// Whether it may be given work: its host is live and publishes it
    /// `ok` (not failed, drained or reserved).
    pub(super) fn takes_work(&self) -> bool {
        self.live && self.state == InstanceState::Ok
    }
}

/// A service as the loop knows it.
pub(super) struct ServiceCtl {
    pub(super) name: String,
    pub(super) id: u32,
    pub(super) cfg: WlmConfig,
    /// What counts as overloaded: `cfg`'s thresholds, or with the SLA
    /// window's overload the agent set ([`super::Controller::set_overload`]).
    pub(super) thresholds: Thresholds,
    pub(super) ports: Vec<u16>,
    pub(super) hits: Vec<Rate>,
    pub(super) buckets: Vec<f64>,
    pub(super) instances: Vec<InstCtl>,
    /// The same service's instances on other hosts (a cluster's).
    pub(super) remote: Vec<RemoteCtl>,
    /// SLA origin rules, in config order.
    pub(super) origins: Vec<origin::RuleCtl>,
    /// `[service.probe]`, and what it needs: the first VIP (L4 instances
    /// are probed there, inside their namespace) and whether instances are
    /// reached at their `addr` (http).
    pub(super) probe: Option<crate::config::Probe>,
    pub(super) vip: std::net::IpAddr,
    pub(super) http: bool,
}

impl ServiceCtl {
    /// Counts a move of `group` from `from` to `to` in `samples` (one per
    /// instance, local ones first, then remote ones), as the next
    /// measurement will show it.
    pub(super) fn account(&self, samples: &mut [Sample], group: Group, from: &str, to: &str) {
        let pps = wlm::group_rate(group, &self.buckets);
        for (sample, name) in samples.iter_mut().zip(self.names()) {
            if name == from {
                *sample = sample.shifted(-pps, self.cfg.capacity_pps);
            } else if name == to {
                *sample = sample.shifted(pps, self.cfg.capacity_pps);
            }
        }
    }

    /// The peers local instance `ii`'s element weighs itself against:
    /// the other local instances not `out` (drained, failed) and the
    /// remote ones that take work ([`RemoteCtl::takes_work`]: a failed or
    /// drained one publishes a load near 0 and would look the least
    /// loaded), each with its sample in `samples` (local ones first).
    pub(super) fn peers(
        &self,
        ii: usize,
        samples: &[Sample],
        out: impl Fn(&str) -> bool,
    ) -> Vec<Peer> {
        let local = self.instances.len();
        self.instances
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != ii && !out(&p.name))
            .map(|(j, p)| Peer {
                name: p.name.clone(),
                sample: samples[j],
                ceiling_pps: p.state.ceiling_pps(),
            })
            // Other hosts' instances, as their hosts measure them.
            .chain(
                self.remote
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.takes_work())
                    .map(|(j, r)| Peer {
                        name: r.name.clone(),
                        sample: samples[local + j],
                        ceiling_pps: None,
                    }),
            )
            .collect()
    }

    /// Every instance's name: local ones, then remote ones.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.instances
            .iter()
            .map(|i| i.name.as_str())
            .chain(self.remote.iter().map(|r| r.name.as_str()))
    }

    /// The data path id of instance `name`, local or remote.
    pub(super) fn id_of(&self, name: &str) -> Option<u32> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.id)
            .or_else(|| self.remote.iter().find(|r| r.name == name).map(|r| r.id))
    }

    /// What `status` shows of each local instance, with its groups in
    /// `assignment` and its `state`.
    pub(super) fn status<'a>(
        &'a self,
        assignment: &'a [GroupEntry],
        state: impl Fn(&str) -> InstanceState + 'a,
    ) -> impl Iterator<Item = InstanceStatus> + 'a {
        self.instances.iter().map(move |i| InstanceStatus {
            state: state(&i.name),
            service: self.name.clone(),
            name: i.name.clone(),
            sample: i.sample,
            inputs: i.inputs.clone(),
            groups: assignment
                .iter()
                .filter(|e| e.owner == i.name)
                .map(|e| e.group)
                .collect(),
            ceiling_pps: i.state.ceiling_pps(),
        })
    }

    /// What `status` shows of each instance on another host.
    pub(super) fn remote_status(&self) -> impl Iterator<Item = RemoteStatus> + '_ {
        self.remote.iter().map(|r| RemoteStatus {
            service: self.name.clone(),
            name: r.name.clone(),
            host: r.host.clone(),
            live: r.live,
            sample: r.sample,
            state: r.state,
        })
    }

    /// This service's instances on other hosts, as the cluster was last
    /// read: `remote` (every service's), which hosts are live, and each
    /// instance's published load.
    pub(super) fn set_remote(
        &mut self,
        remote: &[RemotePlan],
        live_hosts: &std::collections::HashSet<String>,
        loads: &HashMap<String, Load>,
    ) {
        self.remote = remote
            .iter()
            .filter(|r| r.service_id == self.id)
            .map(|r| {
                let sample = loads.get(&r.name).map_or(Sample::default(), |l| Sample {
                    rate_pps: l.rate_pps,
                    drops_ps: 0.0,
                    utilisation: l.utilisation,
                });
                RemoteCtl {
                    name: r.name.clone(),
                    id: r.id,
                    host: r.host.clone(),
                    live: live_hosts.contains(&r.host),
                    sample,
                    state: loads
                        .get(&r.name)
                        .map_or_else(InstanceState::default, |l| l.state),
                }
            })
            .collect();
    }
}

/// Every service's view as a start or reload builds it: nothing measured
/// yet, no instance on another host (see [`ServiceCtl::set_remote`]).
pub(super) fn views(config: &Config, plan: &Plan) -> Vec<ServiceCtl> {
    plan.services
        .iter()
        .zip(&config.services)
        .map(|(sp, sc)| ServiceCtl {
            name: sp.name.clone(),
            id: sp.id,
            cfg: sc.wlm.clone(),
            thresholds: Thresholds::from(&sc.wlm),
            ports: sc.ports.clone(),
            hits: vec![Rate::default(); HIT_BUCKETS_PER_SERVICE as usize],
            buckets: vec![0.0; HIT_BUCKETS_PER_SERVICE as usize],
            instances: plan
                .instances
                .iter()
                .filter(|i| i.service_id == sp.id)
                .zip(&sc.instances)
                .map(|(ip, ic)| InstCtl {
                    name: ip.name.clone(),
                    id: ip.id,
                    ifindex: ip.ifindex,
                    config: ic.clone(),
                    netns: ip.netns.clone(),
                    meter: Meter::default(),
                    state: ElementState::default(),
                    sample: Sample::default(),
                    inputs: Inputs::default(),
                    recovering_since: None,
                })
                .collect(),
            remote: Vec::new(),
            origins: origin::rules(plan, sp.id),
            probe: sc.probe.clone(),
            vip: sc.vips[0],
            http: sc.http.is_some(),
        })
        .collect()
}

/// Takes over what the running views `old` know and a reload must not
/// lose: each remote instance's liveness and load, and each local
/// instance's measurements, element state and recovery.
pub(super) fn carry_over(services: &mut [ServiceCtl], old: Vec<ServiceCtl>) {
    let remote_before: HashMap<String, Vec<RemoteCtl>> = old
        .iter()
        .map(|s| (s.name.clone(), s.remote.clone()))
        .collect();
    for s in &mut *services {
        if let Some(old) = remote_before.get(&s.name) {
            for r in &mut s.remote {
                if let Some(o) = old.iter().find(|o| o.name == r.name) {
                    r.live = o.live;
                    r.sample = o.sample;
                    r.state = o.state;
                }
            }
        }
    }
    let mut before: HashMap<(String, String), InstCtl> = old
        .into_iter()
        .flat_map(|s| {
            let name = s.name;
            s.instances
                .into_iter()
                .map(move |i| ((name.clone(), i.name.clone()), i))
        })
        .collect();
    for s in services {
        for i in &mut s.instances {
            if let Some(o) = before.remove(&(s.name.clone(), i.name.clone())) {
                i.meter = o.meter;
                i.state = o.state;
                i.sample = o.sample;
                i.inputs = o.inputs;
                i.recovering_since = o.recovering_since;
            }
        }
    }
}
