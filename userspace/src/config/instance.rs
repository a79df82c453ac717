//! One instance, checked alike whether it is written in the file
//! (`[[service.instance]]`) or registered while the agent runs (`sluice
//! instance add`, a launcher): [`InstanceSpec::check`] holds every rule
//! about an instance's own fields, with one message each. The file's
//! checker adds the lines; [`super::live`] adds the checks against the
//! running config (uniqueness, shared veths, limits).

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{FieldError, HealthCheck, Instance, check::name_problem, parse_mac};

/// An instance as `sluice instance add` (or a launcher) registers it: the
/// fields of a `[[service.instance]]` table, and its service. The API's
/// request and the CLI's arguments both.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Service it is an instance of, as in the config.
    #[arg(long)]
    pub service: String,
    /// Its name (letters, digits, `.`, `_`, `-`), unique on the host.
    #[arg(long)]
    pub name: String,
    /// Host-side veth of its container.
    #[arg(long)]
    pub veth: String,
    /// Named network namespace (`ip netns`) of its container.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// MAC of the container-side interface (discovered when absent).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `layer = "http"` services: the address and port the L7
    /// distributor reaches it at.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// cgroup v2 directory of its container, for CPU usage.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// CPUs the container may use (with --cgroup).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// `sockets` (the default: failed when its veth disappears or its
    /// application's sockets on the service's ports go), `veth` (its veth
    /// only) or `reports` (also when its QoS reports stop).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// What is wrong with a value, and the fix.
pub(super) type Problem = (String, String);

/// The fields in the order their errors are given (the config reference's).
pub(super) const FIELDS: [&str; 8] = [
    "name",
    "veth",
    "mac",
    "netns",
    "cgroup",
    "cpu_limit",
    "health",
    "addr",
];

/// The fix for a bad interface name.
const VETH_FIX: &str =
    "use the host-side interface name as `ip link` shows it (1 to 15 characters, no '/' or spaces)";

/// CPU limits the agent takes, in CPUs.
pub(super) const CPU_LIMIT: (f64, f64) = (0.01, 4096.0);

/// Whether `v` can be an interface name (what `ip link` accepts).
fn is_ifname(v: &str) -> bool {
    !v.is_empty() && v.len() <= 15 && !v.contains(['/', ' '])
}

/// `name`: a plain, non-empty name.
fn name(n: &str) -> Result<(), Problem> {
    if n.is_empty() {
        return Err(("empty".into(), "give the instance a name".into()));
    }
    name_problem(n, "instance").map_or(Ok(()), Err)
}

/// `veth`, or a value that cannot be one as written.
pub(super) fn bad_veth(written: &str) -> Problem {
    (
        format!("`{written}` is not a valid interface name"),
        VETH_FIX.into(),
    )
}

fn veth(v: &str) -> Result<(), Problem> {
    if is_ifname(v) {
        Ok(())
    } else {
        Err(bad_veth(v))
    }
}

/// `mac`: a unicast MAC address.
fn mac(m: &str) -> Result<[u8; 6], Problem> {
    parse_mac(m).ok_or_else(|| {
        (
            format!("`{m}` is not a unicast MAC address"),
            "write six hex bytes like 02:00:5e:10:00:01, or leave mac out to discover it".into(),
        )
    })
}

/// `addr`: an address and port.
fn addr(a: &str) -> Result<SocketAddr, Problem> {
    a.parse().map_err(|_| {
        (
            format!("`{a}` is not an address and port"),
            "write addr = \"198.18.16.2:8080\" or \"[fd00:5100::2]:8080\"".into(),
        )
    })
}

/// `health`: what fails the instance besides its veth disappearing.
fn health(h: &str) -> Result<HealthCheck, Problem> {
    match h {
        "veth" => Ok(HealthCheck::Veth),
        "sockets" => Ok(HealthCheck::Sockets),
        "reports" => Ok(HealthCheck::Reports),
        _ => Err((
            format!("unknown health check `{h}`"),
            "use \"sockets\" (the default: failed when its veth disappears or its application's sockets on the service's ports go), \"veth\" (its veth only) or \"reports\" (also when its QoS reports stop)".into(),
        )),
    }
}

/// The fix for a CPU limit that is not one.
pub(super) fn cpu_limit_fix() -> String {
    let (lo, hi) = CPU_LIMIT;
    format!("use a number from {lo} to {hi}")
}

/// `cpu_limit`: CPUs, in range, and a cgroup to read the usage from.
fn cpu_limit(c: f64, cgroup: bool) -> Vec<Problem> {
    let (lo, hi) = CPU_LIMIT;
    let mut out = Vec::new();
    if !(c.is_finite() && (lo..=hi).contains(&c)) {
        out.push((format!("{c} is out of range"), cpu_limit_fix()));
    }
    if !cgroup {
        out.push((
            "cpu_limit without cgroup".into(),
            "add cgroup = \"/sys/fs/cgroup/<container>\" so CPU usage can be read".into(),
        ));
    }
    out
}

impl InstanceSpec {
    /// The config's instance, or every field that is wrong (each error's
    /// `field` is the key, `mac`; no line). The service is not looked at:
    /// that is a check against the running config.
    pub fn check(&self) -> Result<Instance, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut said = |field: &str, (problem, fix): Problem| {
            errors.push(FieldError {
                line: None,
                field: field.into(),
                problem,
                fix,
            });
        };
        if let Err(p) = name(&self.name) {
            said("name", p);
        }
        if let Err(p) = veth(&self.veth) {
            said("veth", p);
        }
        let mac = match self.mac.as_deref().map(mac).transpose() {
            Ok(m) => m,
            Err(p) => {
                said("mac", p);
                None
            }
        };
        if let Some(c) = self.cpu_limit {
            for p in cpu_limit(c, self.cgroup.is_some()) {
                said("cpu_limit", p);
            }
        }
        let health = match self.health.as_deref().map(health).transpose() {
            Ok(h) => h.unwrap_or_default(),
            Err(p) => {
                said("health", p);
                HealthCheck::default()
            }
        };
        let addr = match self.addr.as_deref().map(addr).transpose() {
            Ok(a) => a,
            Err(p) => {
                said("addr", p);
                None
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Instance {
            name: self.name.clone(),
            veth: self.veth.clone(),
            mac,
            netns: self.netns.clone(),
            cgroup: self.cgroup.as_ref().map(PathBuf::from),
            cpu_limit: self.cpu_limit,
            health,
            addr,
        })
    }
}

#[cfg(test)]
mod tests;
