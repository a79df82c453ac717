//! Agent start-up: config -> plan -> loaded, programmed and attached data
//! path. Every step that can fail on bad input runs before the kernel is
//! touched, so a failed start leaves nothing behind.

use crate::{
    config::Config,
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
    Dataplane(#[from] DataplaneError),
}

/// A running data path and the plan it was programmed with.
pub struct Agent {
    pub dataplane: Dataplane,
    pub plan: Plan,
    pub iface: String,
    pub mode: AttachMode,
}

impl Agent {
    /// Resolves the config's instances on this host, loads and programs the
    /// XDP program, and attaches it to `iface`.
    pub fn start(config: &Config, iface: &str, force_generic: bool) -> Result<Self, StartError> {
        netdev::ifindex(iface).map_err(|source| StartError::Iface {
            iface: iface.to_owned(),
            source,
        })?;
        let plan = Plan::build(config, resolve_instance)?;
        let mut dataplane = Dataplane::load(&plan)?;
        dataplane.program(&plan)?;
        let mode = dataplane.attach(iface, force_generic)?;
        Ok(Self {
            dataplane,
            plan,
            iface: iface.to_owned(),
            mode,
        })
    }

    /// Detaches the program from the interface.
    pub fn stop(mut self) -> Result<(), DataplaneError> {
        self.dataplane.detach()
    }
}
