//! The Sluice agent and its CLI: turns a config into the XDP program's maps
//! and moves work units between instances as their load changes.
//!
//! Modules by concern, each importing only those below it (no cycles):
//!
//! ```text
//! main.rs ─┬─ cli ──────┬─ api ─── control ─┬─ coord ─── plan ─┬─ config
//!          └─ agent ────┘          │        ├─ datapath ──────┤
//!                                  │        │                 └─ sys
//!                                  └────────┴─ telemetry (leaf)
//! ```
//!
//! - [`config`]: the TOML config, parsed with positions and checked whole;
//! - [`plan`]: dense ids, service keys, resolved interfaces, work unit
//!   groups and the initial assignment;
//! - [`coord`]: the coordination store (async trait; embedded backend);
//! - [`datapath`]: the `Datapath` trait and the XDP implementation, the
//!   punt sockets;
//! - [`control`]: the control loop, the WLM element policy, QoS;
//! - [`l7`]: the L7 distributor of `layer = "http"` services (beside
//!   `datapath`: it imports `config`, `sys` and `telemetry`);
//! - [`api`]: the local API's protocol, server and client;
//! - [`agent`]: start-up, the event loop, signals and reload;
//! - [`cli`]: the client-side commands and their tables;
//! - [`sys`] and [`telemetry`]: leaves (host facts; metric names);
//! - `sim` (tests and the `sim` feature): the deterministic simulation of
//!   the control plane, at the top beside `agent` (it runs the agent's
//!   cluster glue).

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod coord;
pub mod datapath;
pub mod l7;
pub mod plan;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sys;
pub mod telemetry;
#[cfg(test)]
mod testing;
