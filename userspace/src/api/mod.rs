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
//! reports).

mod client;
mod server;

use serde::{Deserialize, Serialize};

pub use self::{
    client::{ClientError, call},
    server::{MAX_LINE, ReportSockets, Shared, serve},
};
use crate::control::qos::Report;

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Report(Report),
    Status {},
    Groups { service: String },
    Drain { instance: String },
    Undrain { instance: String },
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
}
