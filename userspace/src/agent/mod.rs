//! The agent: start-up (config -> plan -> starting assignment from the
//! coordination store -> loaded, programmed and attached data path), the
//! punt path's resolution, metrics, and ([`run`]) the event loop with its
//! signals and reload.
//!
//! Every step that can fail on bad input runs before the kernel is touched,
//! so a failed start leaves nothing behind. The top of the crate: it may
//! import every other module.

pub mod cluster;
pub mod fence;
mod http;
pub mod launch;
pub mod lifecycle;
pub mod run;

use std::{path::Path, sync::Arc, time::Instant};

use cluster::Registry;
use fence::Fencing;

use crate::{
    config::{ClusterConfig, Config},
    control::{Claimed, ControlError, Controller, InstanceStatus, MoveEvent, Settled},
    coord::CoordStore,
    datapath::{AttachMode, Datapath as _, DatapathError, punt::Punt, xdp::XdpDatapath},
    l7::{Distributor, L7Error},
    plan::{Plan, RemotePlan, ResolveError, Resolved, resolve_instance},
    sys::link::{self, LinkError},
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--iface {iface}")]
    Iface {
        iface: String,
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "`{iface}` already has an XDP program attached (id {id}{}): Sluice attaches only to an interface without one. If it is a Sluice data path left pinned, adopt it by starting with its --pin-dir, or take it down with `sluice detach --pin-dir <dir>`; otherwise see whose it is with `bpftool net show dev {iface}`",
        name.as_ref().map(|n| format!(", `{n}`")).unwrap_or_default()
    )]
    Occupied {
        iface: String,
        id: u32,
        name: Option<String>,
        #[source]
        source: Box<DatapathError>,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    L7(#[from] L7Error),
    #[error("{0}")]
    Reload(String),
}

/// What every start and reload checks and loads before it changes anything.
struct Prepared {
    plan: Plan,
    settled: Settled,
    datapath: XdpDatapath,
}

/// Builds the plan (ids from the cluster's or the pinned registry, owners from the pinned
/// data path where the store has none), settles the starting assignment
/// and loads the program against the pins — writing nothing. `running`:
/// a reload's running data path and its fence, kept meanwhile (see
/// [`load_beside`]).
#[expect(
    clippy::too_many_arguments,
    reason = "one private step shared by start and reload"
)]
async fn prepare(
    config: &Config,
    iface: &str,
    store: &dyn CoordStore,
    pin_dir: Option<&Path>,
    registry: Option<&Registry>,
    resolve: impl FnMut(&crate::config::Instance, &str) -> Result<Resolved, ResolveError>,
    failed: impl Fn(&str) -> bool,
    running: Option<(&mut XdpDatapath, &mut Fencing)>,
) -> Result<Prepared, StartError> {
    let iface_err = |source| StartError::Iface {
        iface: iface.to_owned(),
        source,
    };
    link::ifindex(iface).map_err(iface_err)?;
    // A cluster's ids are the cluster's (owner entries mean the same on
    // every host); one host's are the pinned registry's.
    let registered = match (registry, pin_dir) {
        (Some(r), _) => r.local.clone(),
        (None, Some(d)) => XdpDatapath::registered_instances(d)?,
        (None, None) => Vec::new(),
    };
    let mut plan = Plan::build_with_ids(config, &registered, resolve)?;
    if let Some(r) = registry {
        plan.remote = r
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
    }
    if let Some(mac) = link::mac(iface).map_err(iface_err)? {
        plan.add_host_mac(mac);
    }
    if let Some(d) = pin_dir {
        let services = u32::try_from(plan.services.len()).expect("bounded");
        for (sid, owners) in (0..).zip(XdpDatapath::pinned_owners(d, services)?) {
            plan.take_pinned_owners(sid, &owners);
        }
    }
    // Before settling: a failed instance takes no removed instance's groups.
    for i in &mut plan.instances {
        i.live = !failed(&i.name);
    }
    let settled = Controller::settle(config, &mut plan, store).await?;
    let datapath = match running {
        Some(_) => load_beside(&plan, pin_dir).await?,
        None => XdpDatapath::load_with(&plan, pin_dir)?,
    };
    datapath.check_adoptable(iface)?;
    Ok(Prepared {
        plan,
        settled,
        datapath,
    })
}

/// Loads the program for `plan` against the pins on a thread of its own,
/// while the running data path keeps serving: the verifier may take a
/// second or more on a busy host, and the agent's runtime has one thread.
/// Blocking it that long starved the lease keeper and the fence task, and
/// the data path's fence deadline ran out: a reload fenced its host, which
/// then dropped every packet it would deliver. Meanwhile the fence task
/// writes each deadline to the running data path itself ([`FenceWriter`]),
/// so a host cut off from etcd still fences on time.
///
/// [`FenceWriter`]: crate::datapath::xdp::FenceWriter
async fn load_beside(plan: &Plan, pin_dir: Option<&Path>) -> Result<XdpDatapath, DatapathError> {
    let (plan, pins) = (plan.clone(), pin_dir.map(Path::to_path_buf));
    tokio::task::spawn_blocking(move || XdpDatapath::load_with(&plan, pins.as_deref()))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Attaches, saying what holds the interface when something does.
fn attach(
    datapath: &mut XdpDatapath,
    iface: &str,
    force_generic: bool,
) -> Result<AttachMode, StartError> {
    datapath
        .attach(iface, force_generic)
        .map_err(|e| match (&e, link::xdp_program(iface)) {
            (DatapathError::Attach { .. }, Ok(Some(id))) => StartError::Occupied {
                iface: iface.to_owned(),
                id,
                name: crate::datapath::xdp::program_name(id),
                source: Box::new(e),
            },
            _ => StartError::Datapath(e),
        })
}

/// A running data path, the plan it was programmed with, and the control
/// loop that moves work between its instances.
pub struct Agent {
    pub datapath: XdpDatapath,
    pub plan: Plan,
    pub control: Controller,
    pub iface: String,
    pub mode: AttachMode,
    /// The punt path, when its sockets could be opened.
    pub punt: Option<Punt>,
    /// The store and cluster settings it started with (a reload keeps them).
    pub cluster: ClusterConfig,
    /// The L7 distributor of the `layer = "http"` services.
    pub l7: Distributor,
}

impl Agent {
    /// Resolves the config's instances on this host, settles the starting
    /// assignment with `store`, loads and programs the XDP program, and
    /// attaches it to `iface`.
    pub async fn start(
        config: &Config,
        iface: &str,
        force_generic: bool,
        store: Arc<dyn CoordStore>,
    ) -> Result<Self, StartError> {
        Self::start_pinned(config, iface, force_generic, store, None, None).await
    }

    /// As [`Self::start`]; with `pin_dir`, the data path is pinned there and
    /// outlives this agent (or, left by a previous one, is adopted: counters,
    /// pinned flows and owners carry over, and the new program is swapped
    /// in atomically). `registry` gives the instances' ids (a cluster's);
    /// without it, the pinned registry does.
    pub async fn start_pinned(
        config: &Config,
        iface: &str,
        force_generic: bool,
        store: Arc<dyn CoordStore>,
        pin_dir: Option<&Path>,
        registry: Option<&Registry>,
    ) -> Result<Self, StartError> {
        let prepared = prepare(
            config,
            iface,
            &*store,
            pin_dir,
            registry,
            resolve_instance,
            |_| false,
            None,
        )
        .await?;
        let Prepared {
            mut plan,
            settled,
            mut datapath,
        } = prepared;
        let mut l7 = Distributor::new(http::owners(datapath.owner_view()));
        let staged = l7.stage(config)?;
        // The plan gets the store's assignment as the commit left it.
        let control = Controller::commit(settled, config, &mut plan, store).await?;
        datapath.program(&plan)?;
        let punt = Self::open_punt(&mut datapath, config, iface);
        let mode = attach(&mut datapath, iface, force_generic)?;
        l7.commit(
            staged,
            config,
            &http::ids(&plan),
            http::owners(datapath.owner_view()),
        );
        Ok(Self {
            datapath,
            plan,
            control,
            iface: iface.to_owned(),
            mode,
            punt,
            cluster: config.cluster.clone(),
            l7,
        })
    }

    fn open_punt(datapath: &mut XdpDatapath, config: &Config, iface: &str) -> Option<Punt> {
        let ifindex = link::ifindex(iface).ok()?;
        match Punt::open(
            datapath,
            iface,
            ifindex,
            config.agent.punt_queue as usize,
            config.agent.punt_zero_copy,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(iface, error = %e, "no AF_XDP socket: packets of unowned units pass to the kernel");
                None
            }
        }
    }

    /// Applies `config` to the running agent, whole or not at all (SIGHUP).
    /// Everything that can refuse runs first, with nothing written: the
    /// config, the instances' interfaces, the starting assignment, the
    /// pinned maps' layout and sizes, loading the new program. Then the
    /// switch: the store, the maps, the new program swapped into the
    /// pinned link; if any of it fails, the store and the maps get the
    /// running assignment back and the running program stays.
    ///
    /// With `fence` (a cluster's), the new program is loaded on a thread of
    /// its own while the fence's deadlines keep reaching the running data
    /// path (see [`load_beside`]).
    ///
    /// What the running agent holds carries over: the punt sockets (they
    /// keep their queues: binding new ones would find the queues busy),
    /// drained and failed instances, the elements' measurements.
    pub async fn reload(
        &mut self,
        config: &Config,
        store: Arc<dyn CoordStore>,
        pin_dir: &Path,
        force_generic: bool,
        registry: Option<&Registry>,
        fence: Option<&mut Fencing>,
    ) -> Result<(), StartError> {
        if !self.datapath.is_pinned() {
            return Err(StartError::Reload(
                "the data path is not pinned, so it cannot be swapped in place; restart the agent"
                    .into(),
            ));
        }
        let wanted = (
            config.agent.punt_queue as usize,
            config.agent.punt_zero_copy,
        );
        if let Some(p) = &self.punt
            && p.settings != wanted
        {
            return Err(StartError::Reload(format!(
                "`agent.punt_queue` or `agent.punt_zero_copy` changed ({:?} -> {wanted:?}): a reload hands the running punt sockets over as they are; restart the agent to change them (a restart keeps the data path running)",
                p.settings
            )));
        }
        // A failed instance whose veth is gone keeps its last interface:
        // it stays out of the data path until it recovers.
        let old = &self.plan;
        let failed = |name: &str| self.control.is_failed(name);
        let resolve =
            |inst: &crate::config::Instance, field: &str| match resolve_instance(inst, field) {
                Ok(r) => Ok(r),
                Err(e) => old
                    .instances
                    .iter()
                    .find(|i| i.name == inst.name && failed(&i.name))
                    .map(|i| Resolved {
                        ifindex: i.ifindex,
                        mac: i.mac,
                        netns: i.netns.clone(),
                        netns_id: i.netns_id,
                    })
                    .ok_or(e),
            };
        let Prepared {
            mut plan,
            settled,
            mut datapath,
        } = prepare(
            config,
            &self.iface,
            &*store,
            Some(pin_dir),
            registry,
            resolve,
            failed,
            fence.map(|f| (&mut self.datapath, f)),
        )
        .await?;
        // New listeners bound before the switch; dropped (closed) if it
        // fails.
        let staged = self.l7.stage(config)?;
        // The switch; the plan gets the store's assignment as the commit
        // left it.
        let mut control = Controller::commit(settled, config, &mut plan, store.clone()).await?;
        let switched = match datapath.program(&plan) {
            Ok(()) => attach(&mut datapath, &self.iface, force_generic),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = switched {
            // What the commit changed goes back, group by group, unless
            // another host changed that group since.
            control.undo_commit().await;
            self.roll_back().await;
            return Err(e);
        }
        let old_control = std::mem::replace(&mut self.control, control);
        self.control.carry_over(old_control);
        if self.punt.is_none() {
            self.punt = Self::open_punt(&mut datapath, config, &self.iface);
        }
        self.l7.commit(
            staged,
            config,
            &http::ids(&plan),
            http::owners(datapath.owner_view()),
        );
        // The fence's task keeps writing the (pinned, adopted) cluster
        // entry; this data path takes turns with it as the old one did.
        datapath.keep_fence_writers(&self.datapath);
        // The old program is already swapped out of the pinned link;
        // dropping it closes its fds.
        drop(std::mem::replace(&mut self.datapath, datapath));
        self.plan = plan;
        Ok(())
    }

    /// After a failed switch (its store changes given back): the maps as
    /// they were.
    async fn roll_back(&mut self) {
        if let Err(e) = self.datapath.program(&self.plan) {
            tracing::error!(error = %e, "rolling back: rewriting the maps failed");
        }
        // The owners as the store has them now (the plan's may be older).
        if let Err(e) = self.control.resync_now(&mut self.datapath).await {
            tracing::error!(error = %e, "rolling back: rewriting the owners failed");
        }
    }

    /// Resolves every punted frame waiting: claims its unit if nobody owns
    /// it, and sends it to the owner with the owner's MAC, or, an owner on
    /// another host, encapsulated to that host. The claims of
    /// the whole batch are one store write a service (the embedded store
    /// rewrites and fsyncs its file per write, etcd makes a round trip):
    /// claimed one by one, a backlog of new units held the agent's loop
    /// for seconds. Every frame is reinjected once or counted by reason; a
    /// failed claim (the store refused the write) is logged and retried by
    /// the next frame of the unit. Returns how many frames it handled.
    pub async fn process_punts(&mut self) -> usize {
        let Some(punt) = self.punt.as_mut() else {
            return 0;
        };
        let mut frames = punt.queue.drain();
        // A fenced host acts as no unit's owner (as its data path does):
        // it claims nothing and sends nothing on.
        if self.datapath.is_fenced().unwrap_or(false) {
            punt.no_owner += frames.len() as u64;
            return frames.len();
        }
        let now = Instant::now();
        // Each frame's (service, unit), and each service's units in the
        // order they first appear.
        let mut targets = Vec::with_capacity(frames.len());
        // Each frame's key, family and VLAN: what its GUE header carries if
        // its owner is on another host.
        let mut wire = Vec::with_capacity(frames.len());
        let mut units: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for frame in &mut frames {
            let target = (|| {
                let flow = sluice_common::parse::parse(frame.as_slice()).ok()?;
                let key = flow.service_key();
                let svc = self.plan.services.iter().find(|s| s.keys.contains(&key))?;
                let keyed = sluice_common::parse::key_for(frame.as_slice(), &flow, &svc.entry);
                let unit = sluice_common::unit_of(keyed.key);
                Some((
                    svc.id,
                    unit,
                    flow.vlan_tagged,
                    (keyed.key, flow.family, flow.vlan),
                ))
            })();
            let Some((service_id, unit, vlan_tagged, w)) = target else {
                targets.push(None);
                wire.push((0, 0, 0));
                continue;
            };
            wire.push(w);
            // As the data path does: the instance's veth is untagged.
            if vlan_tagged {
                frame.drain(12..12 + sluice_common::parse::VLAN_TAG_LEN);
            }
            targets.push(Some((service_id, unit)));
            if seen.insert((service_id, unit)) {
                match units.iter_mut().find(|(s, _)| *s == service_id) {
                    Some((_, u)) => u.push(unit),
                    None => units.push((service_id, vec![unit])),
                }
            }
        }
        let mut outcome = std::collections::HashMap::with_capacity(seen.len());
        let mut claim_error = None;
        for (service_id, units) in units {
            let (claimed, error) = self
                .control
                .claim_batch(&mut self.datapath, service_id, &units, now)
                .await;
            if let Some(e) = error {
                claim_error.get_or_insert(e);
            }
            outcome.extend(units.into_iter().map(|u| (service_id, u)).zip(claimed));
        }
        for ((frame, target), &(key, family, vlan)) in frames.iter_mut().zip(&targets).zip(&wire) {
            let Some(target) = target else {
                punt.not_service += 1;
                continue;
            };
            let inst = match outcome.get(target) {
                Some(Claimed::Owner(id)) => self.plan.instance(*id),
                // Sent to its host, as the data path would have (where it
                // would drop it, say fenced or without a next hop, so do we).
                Some(Claimed::Remote(id)) => {
                    let nic = link::ifindex(&self.iface).ok();
                    match (
                        nic,
                        self.datapath.encapsulate(frame, *id, key, family, vlan),
                    ) {
                        (Some(nic), Ok(Some(out))) => punt.reinject(nic, &out),
                        _ => punt.send_failed += 1,
                    }
                    continue;
                }
                Some(Claimed::Failed) | None => {
                    punt.claim_failed += 1;
                    continue;
                }
                Some(Claimed::NoOwner) => None,
            };
            let Some(inst) = inst else {
                punt.no_owner += 1;
                continue;
            };
            frame[..6].copy_from_slice(&inst.mac);
            punt.reinject(inst.ifindex, frame);
        }
        if let Some(e) = claim_error {
            // Once a batch: a store that refuses writes would flood the log.
            tracing::warn!(error = %e, claim_failed = punt.claim_failed, "claiming units for punted packets failed; their frames are counted as claim_failed");
        }
        frames.len()
    }

    /// One control interval: measure (packets, and the L7 distributor's
    /// requests), decide, move.
    pub async fn tick(&mut self) -> Result<Vec<MoveEvent>, ControlError> {
        let now = Instant::now();
        http::feed(&self.l7, &self.control, now);
        self.l7.sweep();
        let mut dp = http::WithRequests::new(&mut self.datapath, &self.l7);
        self.control.tick(&mut dp, now).await
    }

    /// Publishes everything the agent knows as metrics; `status` is the
    /// control loop's latest (see [`Controller::status`]).
    pub fn publish(&self, status: &[InstanceStatus]) {
        let dp = &self.datapath;
        if let Ok(g) = dp.global_counters() {
            telemetry::datapath(&g);
        }
        for s in &self.plan.services {
            if let Ok(c) = dp.service_counters(s.id) {
                telemetry::service(&s.name, &c);
            }
        }
        for i in &self.plan.instances {
            if let Ok(c) = dp.instance_counters(i.id) {
                let service = &self.plan.services[i.service_id as usize].name;
                telemetry::instance_delivered(service, &i.name, &c);
            }
        }
        for st in status {
            let r = st.inputs.report.clone().unwrap_or_default();
            let o = st.inputs.observed.clone().unwrap_or_default();
            telemetry::instance(
                &st.service,
                &st.name,
                &telemetry::InstanceGauges {
                    utilisation: st.sample.utilisation,
                    rate_pps: st.inputs.rate_pps,
                    drops_ps: st.inputs.drops_ps,
                    queue_bytes: st.inputs.queue_bytes,
                    cpu_cores: st.inputs.cpu_cores.unwrap_or(0.0),
                    reported_latency_p99_ms: r.latency_p99_ms.unwrap_or(0.0),
                    reported_queue_depth: r.queue_depth.unwrap_or(0.0),
                    reported_in_flight: r.in_flight.unwrap_or(0.0),
                    observed_latency_p99_ms: o.latency_p99_ms.unwrap_or(0.0),
                    observed_in_flight: o.in_flight.unwrap_or(0.0),
                    groups: u32::try_from(st.groups.len()).unwrap_or(u32::MAX),
                    units: st.groups.iter().map(|g| g.size()).sum(),
                },
            );
        }
        if let Some(p) = &self.punt {
            telemetry::punt(&p.counts());
        }
        self.l7.publish();
        telemetry::attached(&self.iface, self.mode.name());
    }

    /// Detaches the program from the interface, unless it is pinned: then
    /// it stays attached for the next agent.
    pub fn stop(mut self) -> Result<(), DatapathError> {
        self.datapath.detach()
    }
}
