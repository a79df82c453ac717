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
        let mode = dataplane.attach(iface, force_generic)?;
        Ok(Self {
            dataplane,
            plan,
            control,
            iface: iface.to_owned(),
            mode,
        })
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
