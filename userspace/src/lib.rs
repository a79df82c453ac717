//! The Sluice agent: turns a config into the XDP program's maps.
//!
//! - [`agent`]: start-up, from config to an attached data path;
//! - [`config`]: the TOML config, checked before anything is applied;
//! - [`plan`]: ids, keys, interfaces and the initial work unit groups;
//! - [`assign`]: work unit groups (split, merge, even assignment);
//! - [`dataplane`]: load, program, attach, read counters;
//! - [`netdev`]: ifindex and peer-MAC discovery.

pub mod agent;
pub mod api;
pub mod assign;
pub mod config;
pub mod control;
pub mod coord;
pub mod dataplane;
pub mod netdev;
pub mod plan;
pub mod punt;
pub mod qos;
pub mod telemetry;
pub mod wlm;
