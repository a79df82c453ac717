//! The agent's local API: a unix socket speaking JSON lines, one request a
//! line, one response a line.
//!
//! ```text
//! -> {"report": {"instance": "kv-0", "latency_p99_ms": 12.5, "queue_depth": 40}}
//! <- {"ok": true}
//! -> {"status": {}}
//! <- {"ok": true, "instances": [{"service": "kv", "name": "kv-0", "utilisation": 0.42, ...}]}
//! ```
//!
//! Errors come back as `{"ok": false, "error": "..."}`. `sluice report` is
//! a client of the first request; applications may speak it directly.
//!
//! This module holds the protocol's types; [`serve`] answers it in the
//! agent, [`call`] speaks it for the CLI. May import `control` (for QoS
//! reports) and `config` (an instance registration is the config's
//! [`InstanceSpec`], checked by the config's own rules).

mod budget;
mod client;
mod server;

use serde::{Deserialize, Serialize};

pub use self::{
    client::{ClientError, call, call_waiting},
    server::{Job, MAX_LINE, ReportSockets, Shared, serve},
};
pub use crate::config::InstanceSpec;
use crate::control::{InstanceState, qos::Report};

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Report(Report),
    Status {},
    Groups {
        service: String,
    },
    Drain {
        instance: String,
    },
    Undrain {
        instance: String,
    },
    /// Registers an instance with the running agent (answered once it is
    /// in the data path, or refused with the reason).
    InstanceAdd(InstanceSpec),
    /// Drains a registered instance, lets its pinned flows finish (up to
    /// `deadline_secs`), then takes it out; answered at once, progress in
    /// `instances`.
    InstanceRemove {
        instance: String,
        #[serde(default)]
        deadline_secs: Option<f64>,
    },
    /// The registered instances and each scaled service's state.
    Instances {},
}

/// One registered instance in an `instances` answer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RegisteredLine {
    pub service: String,
    pub name: String,
    pub veth: String,
    #[serde(default)]
    pub netns: Option<String>,
    /// `api` (`sluice instance add`) or `launcher`.
    pub source: String,
    /// `running`, `waiting` (its veth is not there yet), `removing`,
    /// `failed`.
    pub state: String,
    /// What a removal waits for, or why it is failed.
    #[serde(default)]
    pub detail: String,
    /// Groups it owns now.
    #[serde(default)]
    pub groups: usize,
}

/// One scaled service in an `instances` (and `status`) answer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ScaleLine {
    pub service: String,
    /// Instances in the data path, and of those live (not failed, drained
    /// or being removed).
    pub instances: u32,
    pub live: u32,
    /// Where the scaler is heading: live (removals are not) + launches
    /// under way.
    pub target: u32,
    pub min: u32,
    pub max: u32,
    /// The SLA window in force, if any (its index in the config).
    #[serde(default)]
    pub window: Option<usize>,
    /// The latest scaling decisions, newest last (`launch kv-3: saturated`).
    #[serde(default)]
    pub last: Vec<String>,
}

/// A drain or undrain for the control loop to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Drain(String),
    Undrain(String),
}

/// One group in a `groups` answer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GroupLine {
    pub group: String,
    pub owner: String,
    pub version: u64,
    /// The owner's host (a cluster's; empty on one host).
    #[serde(default)]
    pub host: String,
    /// The owner's state (`ok` for an unowned group, and from an older
    /// agent).
    #[serde(default)]
    pub state: InstanceState,
}

/// This host's fence in a status answer (a cluster's; see
/// `control::fence`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct FenceLine {
    /// `open`, `renewing`, `vouched`, `fenced` or `lost`.
    pub state: String,
    /// Milliseconds to the deadline (negative: past it); `None`: no fence.
    pub deadline_in_ms: Option<i64>,
    /// Milliseconds since the last acknowledged renewal was sent.
    pub renewed_ago_ms: u64,
    /// Other hosts live at the last read of the store.
    pub peers: usize,
}

/// One instance in a status answer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct InstanceLine {
    pub service: String,
    pub name: String,
    pub utilisation: f64,
    pub rate_pps: f64,
    pub drops_ps: f64,
    pub groups: Vec<String>,
    #[serde(default)]
    pub drained: bool,
    /// The host it runs on (a cluster's; empty on one host).
    #[serde(default)]
    pub host: String,
    /// Its host holds its lease (always, for this host's own).
    #[serde(default = "yes")]
    pub live: bool,
    /// Failed, drained, reserved or ok, as its host publishes it (`ok`
    /// from an older agent, which shows only `drained`).
    #[serde(default)]
    pub state: InstanceState,
    /// Why it failed, when it has (this host's instances): the `reason` of
    /// `sluice_instance_failures_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

const fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceLine>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupLine>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<Vec<RegisteredLine>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Vec<ScaleLine>>,
    /// This host's fence (in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceLine>,
    /// What a lifecycle request did (`kv-3 added, id 4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
}
