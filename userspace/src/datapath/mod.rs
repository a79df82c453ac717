//! The data path as the control loop sees it: the [`Datapath`] trait (write
//! owners, set an instance live, read counters), and its implementations.
//!
//! - [`xdp`]: the real one: loads the XDP program, sizes and writes its maps,
//!   attaches, pins and adopts across agent restarts;
//! - [`punt`]: the agent's end of the punt path (`AF_XDP` sockets, re-injection);
//! - `fake` (tests and the simulation only): an in-memory data path, and a
//!   wrapper that makes a chosen write fail once.
//!
//! May import `plan` (what to program), `sys` and `telemetry`; nothing
//! above it (`control`, `agent`) is known here.

#[cfg(any(test, feature = "sim"))]
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the simulation uses only part of the unit tests' fakes"
    )
)]
pub(crate) mod fake;
mod owners;
pub mod punt;
pub mod service_table;
pub mod xdp;

use std::path::PathBuf;

use ::aya::{maps::MapError, programs::ProgramError};
use sluice_common::{
    counters,
    maps::{InstanceCounters, MemberKey, PROGRAM_NAME, RemoteHost, ServiceCounters, Tier},
};

use crate::plan::Group;

/// Global counters, indexed as in [`sluice_common::counters`].
pub type GlobalCounters = [u64; counters::COUNT as usize];

/// The cluster tables an agent writes each interval (`agent::cluster`):
/// the other hosts, whose encapsulated packets to take, and where each
/// other host's instance is. The XDP data path's maps, or the
/// simulation's in-memory ones.
pub trait ClusterTables {
    /// Another host of the cluster, at `index` (`1..=MAX_HOSTS`).
    fn set_remote_host(&mut self, index: u32, host: RemoteHost) -> Result<(), DatapathError>;
    /// The underlay addresses encapsulated packets are taken from: exactly
    /// `members` from now on.
    fn set_members(&mut self, members: &[MemberKey]) -> Result<(), DatapathError>;
    /// Instance `id` of service `service_id` runs on the host in slot
    /// `host`, live or not.
    fn set_remote_instance(
        &mut self,
        id: u32,
        service_id: u32,
        host: u32,
        live: bool,
    ) -> Result<(), DatapathError>;
}

impl ClusterTables for xdp::XdpDatapath {
    fn set_remote_host(&mut self, index: u32, host: RemoteHost) -> Result<(), DatapathError> {
        xdp::XdpDatapath::set_remote_host(self, index, host)
    }

    fn set_members(&mut self, members: &[MemberKey]) -> Result<(), DatapathError> {
        xdp::XdpDatapath::set_members(self, members)
    }

    fn set_remote_instance(
        &mut self,
        id: u32,
        service_id: u32,
        host: u32,
        live: bool,
    ) -> Result<(), DatapathError> {
        xdp::XdpDatapath::set_remote_instance(self, id, service_id, host, live)
    }
}

/// What the control loop needs of a data path. Ids are the plan's: services
/// from 0, instances from 1 (`NO_OWNER` is 0).
pub trait Datapath {
    /// Points every unit of `group` of service `service_id` at instance
    /// `owner` (`NO_OWNER`: the group is unowned and its packets are punted).
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError>;
    /// The owner the data path has for `unit` of service `service_id`.
    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32;
    /// Marks instance `id` live or not: the packets of a dead instance are
    /// unowned and its pinned flows no longer hold.
    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError>;
    /// Points instance `id` at host-side veth `ifindex` and container MAC
    /// `mac` (its container was re-created).
    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError>;
    /// Global counters summed over CPUs.
    fn global_counters(&self) -> Result<GlobalCounters, DatapathError>;
    /// Counters of service `id`, summed over CPUs.
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError>;
    /// What was delivered to instance `id`, summed over CPUs.
    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError>;
    /// Hit counts of service `id`'s unit buckets
    /// (`HIT_BUCKETS_PER_SERVICE` of them), summed over CPUs.
    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError>;
    /// The tier of origin rule `rule` (its index in the config) of service
    /// `service_id`: which instance each slot sends the rule's packets to.
    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError>;
    /// Rewrites that tier's slots (one map update: a packet sees the old
    /// tier or the new one).
    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError>;
    /// Stops this host delivering as an owner after `until` (`CLOCK_MONOTONIC`, as `Instant`):
    /// packets it would deliver or encapsulate are dropped and counted `fenced`. `None`: no fence.
    fn set_fence(&mut self, until: Option<std::time::Instant>) -> Result<(), DatapathError> {
        let _ = until;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this build carries no XDP program (it was built without bpf-linker); run `cargo xtask setup`, then rebuild"
    )]
    ObjectMissing,
    #[error("loading the XDP object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {what} `{name}`")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("bpffs directory {dir} ({})", crate::sys::BPFFS_HINT)]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "map `{map}` pinned in {dir} has {pinned} entries, this config needs {wanted}; run `sluice detach --pin-dir {dir}` (it drops pinned flows) and start again"
    )]
    PinMismatch {
        dir: PathBuf,
        map: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error(
        "the data path pinned in {dir} was made by another Sluice version: {problem}. This agent cannot adopt it without misreading it; run `sluice detach --pin-dir {dir}` (traffic passes to the kernel until this agent attaches; pinned flows are dropped) and start again"
    )]
    PinLayout { dir: PathBuf, problem: String },
    #[error(transparent)]
    Locked(#[from] crate::sys::lock::LockError),
    #[error("adopting the data path pinned in {dir}: {problem}")]
    Adopt { dir: PathBuf, problem: String },
    #[error("mapping the owner array into memory")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
    #[error("program `{PROGRAM_NAME}`")]
    Program(#[source] ProgramError),
    #[error(transparent)]
    ServiceTable(#[from] service_table::TableFull),
    #[error("service {service_id} has no origin rule {rule} in the programmed data path")]
    UnknownTier { service_id: u32, rule: u32 },
    #[error("attaching to `{iface}` failed")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP).
    Native,
    /// In the generic kernel path (slower; for drivers without XDP).
    Generic,
}

impl AttachMode {
    /// `native` or `generic`, as logs and metrics say it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}
