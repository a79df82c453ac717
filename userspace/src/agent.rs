//! Agent start-up: config -> plan -> starting assignment (from the
//! coordination store) -> loaded, programmed and attached data path. Every
//! step that can fail on bad input runs before the kernel is touched, so a
//! failed start leaves nothing behind.

use std::{sync::Arc, time::Instant};

use crate::{
    config::Config,
    control::{ControlError, Controller, MoveEvent},
    coord::CoordStore,
    dataplane::{AttachMode, Dataplane, DataplaneError},
    netdev::{self, NetdevError},
    plan::{Plan, ResolveError, resolve_instance},
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--iface {iface}")]
    Iface {
        iface: String,
        #[source]
        source: NetdevError,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// A running data path, the plan it was programmed with, and the control
/// loop that moves work between its instances.
pub struct Agent {
    pub dataplane: Dataplane,
    pub plan: Plan,
    pub control: Controller,
    pub iface: String,
    pub mode: AttachMode,
    /// The punt path, when its socket could be opened.
    pub punt: Option<Punt>,
}

/// The agent's end of the punt path.
pub struct Punt {
    pub queue: Arc<crate::punt::PuntQueue>,
    /// One socket per receive queue of the interface.
    pub receivers: Vec<crate::punt::PuntReceiver>,
    reinject: crate::punt::Reinjector,
    /// Punted frames sent on to their (new) owner.
    pub delivered: u64,
    /// Punted frames that could not be: not a service packet, no instance
    /// to claim for, or the send failed.
    pub failed: u64,
}

impl Agent {
    /// Resolves the config's instances on this host, settles the starting
    /// assignment with `store`, loads and programs the XDP program, and
    /// attaches it to `iface`.
    pub fn start(
        config: &Config,
        iface: &str,
        force_generic: bool,
        store: Arc<dyn CoordStore>,
    ) -> Result<Self, StartError> {
        Self::start_pinned(config, iface, force_generic, store, None)
    }

    /// As [`Self::start`]; with `pin_dir`, the data path is pinned there and
    /// outlives this agent (or, left by a previous one, is adopted: counters,
    /// pinned flows and owners carry over, and the new program is swapped
    /// in atomically).
    pub fn start_pinned(
        config: &Config,
        iface: &str,
        force_generic: bool,
        store: Arc<dyn CoordStore>,
        pin_dir: Option<&std::path::Path>,
    ) -> Result<Self, StartError> {
        netdev::ifindex(iface).map_err(|source| StartError::Iface {
            iface: iface.to_owned(),
            source,
        })?;
        let mut plan = Plan::build(config, resolve_instance)?;
        let control = Controller::new(config, &mut plan, store)?;
        let mut dataplane = Dataplane::load_with(&plan, pin_dir)?;
        dataplane.program(&plan)?;
        let ifindex = netdev::ifindex(iface).map_err(|source| StartError::Iface {
            iface: iface.to_owned(),
            source,
        })?;
        // The socket must exist before the program can punt to it.
        let punt = match Self::open_punt(
            &mut dataplane,
            iface,
            ifindex,
            config.agent.punt_queue as usize,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(iface, error = %e, "no AF_XDP socket: packets of unowned units pass to the kernel");
                None
            }
        };
        let mode = dataplane.attach(iface, force_generic)?;
        Ok(Self {
            dataplane,
            plan,
            control,
            iface: iface.to_owned(),
            mode,
            punt,
        })
    }

    fn open_punt(
        dataplane: &mut Dataplane,
        iface: &str,
        ifindex: u32,
        cap: usize,
    ) -> Result<Punt, Box<dyn std::error::Error>> {
        let queue = crate::punt::PuntQueue::new(cap);
        // A socket on every receive queue, all feeding one queue.
        let mut receivers = Vec::new();
        for q in 0..netdev::rx_queues(iface) {
            let r = crate::punt::PuntReceiver::start(ifindex, q, queue.clone())?;
            dataplane.set_punt_socket(q, r.fd)?;
            tracing::info!(
                iface,
                queue = q,
                zero_copy = r.zero_copy,
                "AF_XDP punt socket bound"
            );
            receivers.push(r);
        }
        Ok(Punt {
            queue,
            receivers,
            reinject: crate::punt::Reinjector::new()?,
            delivered: 0,
            failed: 0,
        })
    }

    /// Resolves every punted frame waiting: claims its unit if nobody owns
    /// it, and sends it to the owner with the owner's MAC. Returns how many
    /// frames it handled.
    pub fn process_punts(&mut self) -> Result<usize, ControlError> {
        let Some(punt) = self.punt.as_mut() else {
            return Ok(0);
        };
        let frames = punt.queue.drain();
        let now = Instant::now();
        for mut frame in frames.iter().cloned() {
            let target = (|| {
                let flow = sluice_common::parse::parse(frame.as_slice()).ok()?;
                let key = flow.service_key();
                let svc = self.plan.services.iter().find(|s| s.keys.contains(&key))?;
                let keyed = sluice_common::parse::key_for(frame.as_slice(), &flow, &svc.entry);
                Some((svc.id, sluice_common::unit_of(keyed.key)))
            })();
            let Some((service_id, unit)) = target else {
                punt.failed += 1;
                continue;
            };
            let owner = self
                .control
                .claim(&mut self.dataplane, service_id, unit, now)?;
            let Some(inst) = owner.and_then(|o| self.plan.instance(o)) else {
                punt.failed += 1;
                continue;
            };
            frame[..6].copy_from_slice(&inst.mac);
            match punt.reinject.send(inst.ifindex, &frame) {
                Ok(()) => punt.delivered += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "re-injecting a punted frame failed");
                    punt.failed += 1;
                }
            }
        }
        Ok(frames.len())
    }

    /// One control interval: measure, decide, move.
    pub fn tick(&mut self) -> Result<Vec<MoveEvent>, ControlError> {
        self.control.tick(&mut self.dataplane, Instant::now())
    }

    /// Detaches the program from the interface, unless it is pinned: then
    /// it stays attached for the next agent.
    pub fn stop(mut self) -> Result<(), DataplaneError> {
        self.dataplane.detach()
    }
}
