//! The agent's TOML config: services, their tag specs and their instances.
//!
//! Parsing is strict (unknown keys are errors) and every check runs before
//! anything touches the kernel, so a bad config changes nothing. Errors name
//! the field as a path (`service[1].instance[0].veth`) and say how to fix it.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sluice_common::{MAX_SERVICES, MAX_TAG_LEN};

/// Most instances, over all services (instance ids are `1..=MAX_INSTANCES`).
pub const MAX_INSTANCES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{}: `{field}`: {problem}; fix: {fix}", line.map_or_else(|| "?".to_owned(), |l| l.to_string()))]
    Invalid {
        path: PathBuf,
        /// 1-based line of the field (or of its table) in the file.
        line: Option<usize>,
        field: String,
        problem: String,
        fix: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Udp => sluice_common::maps::PROTO_UDP,
            Self::Tcp => sluice_common::maps::PROTO_TCP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// Where a service's packets carry their workload tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagSpec {
    /// No tag: the flow hash of the 5-tuple.
    None,
    /// `length` bytes at `offset` into the UDP payload.
    UdpPayload { offset: u16, length: u16 },
    /// The IPv6 flow label (a zero label counts as missing).
    Ipv6FlowLabel,
}

/// Which flows of a service are pinned to their owner while units move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinMode {
    None,
    Tcp,
    TcpUdp,
}

/// WLM settings of a service: capacity, thresholds and pacing.
#[derive(Clone, Debug, PartialEq)]
pub struct WlmConfig {
    /// Packets per second one instance is sized for.
    pub capacity_pps: f64,
    /// Utilisation above which an instance sheds work.
    pub overload: f64,
    /// Utilisation below which an instance takes work back.
    pub underload: f64,
    /// Intervals a threshold must be crossed for before acting.
    pub sustain: u32,
    /// Least time between two moves of one element.
    pub cooldown: std::time::Duration,
    /// Groups of this many units or fewer are not split.
    pub min_group_units: u32,
    /// Application QoS targets: a report at the target is utilisation 1.
    pub latency_target_ms: Option<f64>,
    pub queue_target: Option<f64>,
    pub in_flight_target: Option<f64>,
}

impl Default for WlmConfig {
    fn default() -> Self {
        Self {
            capacity_pps: 100_000.0,
            overload: 0.8,
            underload: 0.3,
            sustain: 3,
            cooldown: std::time::Duration::from_secs(5),
            min_group_units: 256,
            latency_target_ms: None,
            queue_target: None,
            in_flight_target: None,
        }
    }
}

/// Agent-wide settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// QoS sampling and WLM decision interval.
    pub interval: std::time::Duration,
    /// Most group moves per second, over all elements.
    pub max_moves_per_sec: f64,
    /// Capacity of the pinned-flow LRU map.
    pub pinned_flows: u32,
    /// Punted frames waiting for a claim, at most; more are dropped and
    /// counted.
    pub punt_queue: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interval: std::time::Duration::from_secs(1),
            max_moves_per_sec: 2.0,
            pinned_flows: 1 << 20,
            punt_queue: 65_536,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub name: String,
    /// Host-side veth of the instance's container.
    pub veth: String,
    /// MAC of the container-side interface; discovered when absent.
    pub mac: Option<[u8; 6]>,
    /// Named network namespace (`ip netns`) to look the MAC up in, and to
    /// read the instance's socket statistics from.
    pub netns: Option<String>,
    /// cgroup v2 directory of the container, for CPU usage.
    pub cgroup: Option<PathBuf>,
    /// CPUs the container may use; with `cgroup`, CPU utilisation is
    /// usage / limit.
    pub cpu_limit: Option<f64>,
    /// `health = "reports"`: the instance has failed when its application
    /// stops reporting QoS (3 intervals); its veth disappearing always
    /// counts.
    pub health_reports: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    pub tag: TagSpec,
    pub pin: PinMode,
    /// A pinned flow idle this long loses its pin.
    pub pin_idle_secs: u32,
    /// `assign = "on-demand"`: no unit is owned at start; units are claimed
    /// by their first packets (punted to the agent).
    pub on_demand: bool,
    pub wlm: WlmConfig,
    pub instances: Vec<Instance>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub services: Vec<Service>,
}

// The raw, as-written form: everything optional or stringly, so that the
// checks below can name the field and the fix instead of serde's generic
// "invalid type".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<RawAgent>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interval_ms: Option<i64>,
    max_moves_per_sec: Option<f64>,
    pinned_flows: Option<i64>,
    punt_queue: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWlm {
    capacity_pps: Option<f64>,
    overload: Option<f64>,
    underload: Option<f64>,
    sustain: Option<i64>,
    cooldown_ms: Option<i64>,
    min_group_units: Option<i64>,
    latency_target_ms: Option<f64>,
    queue_target: Option<f64>,
    in_flight_target: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    port: Option<i64>,
    ports: Option<Vec<i64>>,
    protocol: Option<String>,
    tag: Option<RawTag>,
    pin: Option<String>,
    pin_idle_secs: Option<i64>,
    assign: Option<String>,
    wlm: Option<RawWlm>,
    #[serde(default)]
    instance: Vec<RawInstance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    kind: Option<String>,
    offset: Option<i64>,
    length: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Option<String>,
    veth: Option<String>,
    mac: Option<String>,
    netns: Option<String>,
    cgroup: Option<String>,
    cpu_limit: Option<f64>,
    health: Option<String>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` only labels the errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Checker { path }.config(raw).map_err(|e| match e {
            ConfigError::Invalid {
                path,
                line: None,
                field,
                problem,
                fix,
            } => ConfigError::Invalid {
                line: locate(text, &field),
                path,
                field,
                problem,
                fix,
            },
            e => e,
        })
    }

    /// Total number of instances over all services.
    #[must_use]
    pub fn instance_count(&self) -> usize {
        self.services.iter().map(|s| s.instances.len()).sum()
    }
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn err(
        &self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: None,
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn config(&self, mut raw: RawConfig) -> Result<Config, ConfigError> {
        let raw_agent = raw.agent.take();
        if raw.service.is_empty() {
            return Err(self.err(
                "service",
                "no service is configured",
                "add at least one [[service]] table with name, vip, ports, protocol and [[service.instance]] entries",
            ));
        }
        if raw.service.len() > MAX_SERVICES as usize {
            return Err(self.err(
                "service",
                format!(
                    "{} services configured, at most {MAX_SERVICES} are supported",
                    raw.service.len()
                ),
                "split the services over several hosts",
            ));
        }
        let mut services = Vec::with_capacity(raw.service.len());
        for (i, s) in raw.service.into_iter().enumerate() {
            services.push(self.service(&format!("service[{i}]"), s)?);
        }
        self.unique(&services)?;
        let agent = self.agent(raw_agent)?;
        let count: usize = services.iter().map(|s| s.instances.len()).sum();
        if count > MAX_INSTANCES {
            return Err(self.err(
                "service[].instance",
                format!("{count} instances configured, at most {MAX_INSTANCES} are supported"),
                "spread the instances over several hosts",
            ));
        }
        Ok(Config { agent, services })
    }

    fn unique(&self, services: &[Service]) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut endpoints = HashMap::new();
        let mut instances = HashSet::new();
        let mut veths = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            if !names.insert(&s.name) {
                return Err(self.err(
                    format!("service[{i}].name"),
                    format!("service name `{}` is used twice", s.name),
                    "give every service its own name",
                ));
            }
            for p in &s.ports {
                if let Some(other) = endpoints.insert((s.vip, *p, s.protocol), &s.name) {
                    return Err(self.err(
                        format!("service[{i}].ports"),
                        format!(
                            "{} {}:{p} already belongs to service `{other}`",
                            s.protocol, s.vip
                        ),
                        "use a different vip or port for one of the two services",
                    ));
                }
            }
            for (j, inst) in s.instances.iter().enumerate() {
                if !instances.insert(&inst.name) {
                    return Err(self.err(
                        format!("service[{i}].instance[{j}].name"),
                        format!("instance name `{}` is used twice", inst.name),
                        "give every instance its own name",
                    ));
                }
                if let Some(other) = veths.insert(&inst.veth, &inst.name) {
                    return Err(self.err(
                        format!("service[{i}].instance[{j}].veth"),
                        format!("veth `{}` is already the veth of instance `{other}`", inst.veth),
                        "each instance has its own veth pair; name the host side of this instance's pair",
                    ));
                }
            }
        }
        Ok(())
    }

    fn service(&self, at: &str, raw: RawService) -> Result<Service, ConfigError> {
        let name = required(raw.name, || {
            self.err(format!("{at}.name"), "missing", "add name = \"my-service\"")
        })?;
        if name.is_empty() {
            return Err(self.err(format!("{at}.name"), "empty", "give the service a name"));
        }
        let vip_text = required(raw.vip, || {
            self.err(
                format!("{at}.vip"),
                "missing",
                "add vip = \"198.18.0.100\" (IPv4 or IPv6)",
            )
        })?;
        let vip: IpAddr = vip_text.parse().map_err(|_| {
            self.err(
                format!("{at}.vip"),
                format!("`{vip_text}` is not an IP address"),
                "write an IPv4 (198.18.0.100) or IPv6 (fd00:5100::100) address, without port or prefix length",
            )
        })?;
        let ports = self.ports(at, raw.port, raw.ports)?;
        let protocol = match raw.protocol.as_deref() {
            Some("udp") => Protocol::Udp,
            Some("tcp") => Protocol::Tcp,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.protocol"),
                    format!("unknown protocol `{other}`"),
                    "use \"udp\" or \"tcp\"",
                ));
            }
            None => {
                return Err(self.err(
                    format!("{at}.protocol"),
                    "missing",
                    "add protocol = \"udp\" or \"tcp\"",
                ));
            }
        };
        let tag = self.tag(at, raw.tag, protocol, vip)?;
        if raw.instance.is_empty() {
            return Err(self.err(
                format!("{at}.instance"),
                format!("service `{name}` has no instance"),
                "add a [[service.instance]] table with name and veth",
            ));
        }
        let mut instances = Vec::with_capacity(raw.instance.len());
        for (j, inst) in raw.instance.into_iter().enumerate() {
            instances.push(self.instance(&format!("{at}.instance[{j}]"), inst)?);
        }
        let pin = match raw.pin.as_deref() {
            None if protocol == Protocol::Tcp => PinMode::Tcp,
            None | Some("none") => PinMode::None,
            Some("tcp") => PinMode::Tcp,
            Some("tcp+udp") => PinMode::TcpUdp,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.pin"),
                    format!("unknown pin mode `{other}`"),
                    "use \"none\", \"tcp\" or \"tcp+udp\"",
                ));
            }
        };
        let pin_idle_secs = self.int(
            &format!("{at}.pin_idle_secs"),
            raw.pin_idle_secs,
            300,
            1,
            86_400,
        )?;
        let wlm = self.wlm(&format!("{at}.wlm"), raw.wlm)?;
        let on_demand = match raw.assign.as_deref() {
            None | Some("even") => false,
            Some("on-demand") => true,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.assign"),
                    format!("unknown assignment `{other}`"),
                    "use \"even\" (units split over the instances at start) or \"on-demand\" (claimed by first packets)",
                ));
            }
        };
        Ok(Service {
            name,
            vip,
            ports,
            protocol,
            tag,
            pin,
            pin_idle_secs,
            on_demand,
            wlm,
            instances,
        })
    }

    /// An optional integer in `lo..=hi`, or `default`.
    fn int(
        &self,
        field: &str,
        v: Option<i64>,
        default: u32,
        lo: u32,
        hi: u32,
    ) -> Result<u32, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        u32::try_from(v)
            .ok()
            .filter(|v| (lo..=hi).contains(v))
            .ok_or_else(|| {
                self.err(
                    field,
                    format!("{v} is out of range"),
                    format!("use a whole number from {lo} to {hi}"),
                )
            })
    }

    /// An optional number in `lo..=hi`, or `default`.
    fn num(
        &self,
        field: &str,
        v: Option<f64>,
        default: f64,
        lo: f64,
        hi: f64,
    ) -> Result<f64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(self.err(
                field,
                format!("{v} is out of range"),
                format!("use a number from {lo} to {hi}"),
            ))
        }
    }

    fn agent(&self, raw: Option<RawAgent>) -> Result<AgentConfig, ConfigError> {
        let d = AgentConfig::default();
        let Some(raw) = raw else { return Ok(d) };
        let interval_ms = self.int("agent.interval_ms", raw.interval_ms, 1000, 50, 60_000)?;
        Ok(AgentConfig {
            interval: std::time::Duration::from_millis(interval_ms.into()),
            max_moves_per_sec: self.num(
                "agent.max_moves_per_sec",
                raw.max_moves_per_sec,
                d.max_moves_per_sec,
                0.01,
                1000.0,
            )?,
            pinned_flows: self.int(
                "agent.pinned_flows",
                raw.pinned_flows,
                d.pinned_flows,
                1024,
                1 << 26,
            )?,
            punt_queue: self.int(
                "agent.punt_queue",
                raw.punt_queue,
                d.punt_queue,
                16,
                1 << 24,
            )?,
        })
    }

    fn wlm(&self, at: &str, raw: Option<RawWlm>) -> Result<WlmConfig, ConfigError> {
        let d = WlmConfig::default();
        let Some(raw) = raw else { return Ok(d) };
        let overload = self.num(
            &format!("{at}.overload"),
            raw.overload,
            d.overload,
            0.05,
            10.0,
        )?;
        let underload = self.num(
            &format!("{at}.underload"),
            raw.underload,
            d.underload,
            0.0,
            10.0,
        )?;
        if underload >= overload {
            return Err(self.err(
                format!("{at}.underload"),
                format!("underload {underload} is not below overload {overload}"),
                "keep a gap between the two (e.g. underload = 0.3, overload = 0.8), or the loop would move groups back and forth",
            ));
        }
        let target = |name: &str, v: Option<f64>| -> Result<Option<f64>, ConfigError> {
            v.map(|v| self.num(&format!("{at}.{name}"), Some(v), 0.0, 1e-6, 1e12))
                .transpose()
        };
        let min_group_units = self.int(
            &format!("{at}.min_group_units"),
            raw.min_group_units,
            d.min_group_units,
            1,
            sluice_common::UNITS_PER_SERVICE,
        )?;
        if !min_group_units.is_power_of_two() {
            return Err(self.err(
                format!("{at}.min_group_units"),
                format!("{min_group_units} is not a power of two"),
                "groups are aligned powers of two: use 1, 2, 4, ... 65536",
            ));
        }
        Ok(WlmConfig {
            capacity_pps: self.num(
                &format!("{at}.capacity_pps"),
                raw.capacity_pps,
                d.capacity_pps,
                1.0,
                1e10,
            )?,
            overload,
            underload,
            sustain: self.int(&format!("{at}.sustain"), raw.sustain, d.sustain, 1, 1000)?,
            cooldown: std::time::Duration::from_millis(
                self.int(
                    &format!("{at}.cooldown_ms"),
                    raw.cooldown_ms,
                    5000,
                    0,
                    3_600_000,
                )?
                .into(),
            ),
            min_group_units,
            latency_target_ms: target("latency_target_ms", raw.latency_target_ms)?,
            queue_target: target("queue_target", raw.queue_target)?,
            in_flight_target: target("in_flight_target", raw.in_flight_target)?,
        })
    }

    fn ports(
        &self,
        at: &str,
        port: Option<i64>,
        ports: Option<Vec<i64>>,
    ) -> Result<Vec<u16>, ConfigError> {
        let (field, list) = match (port, ports) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{at}.port"),
                    "both `port` and `ports` are set",
                    "keep one: port = 7000 or ports = [7000, 7001]",
                ));
            }
            (Some(p), None) => (format!("{at}.port"), vec![p]),
            (None, Some(ps)) => (format!("{at}.ports"), ps),
            (None, None) => {
                return Err(self.err(
                    format!("{at}.ports"),
                    "missing",
                    "add port = 7000 or ports = [7000, 7001]",
                ));
            }
        };
        if list.is_empty() {
            return Err(self.err(field, "empty list", "list at least one port"));
        }
        let mut out = Vec::with_capacity(list.len());
        for p in list {
            let port = u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| {
                self.err(
                    &field,
                    format!("{p} is not a port"),
                    "use a number from 1 to 65535",
                )
            })?;
            if out.contains(&port) {
                return Err(self.err(
                    &field,
                    format!("port {port} is listed twice"),
                    "list each port once",
                ));
            }
            out.push(port);
        }
        Ok(out)
    }

    fn tag(
        &self,
        at: &str,
        raw: Option<RawTag>,
        protocol: Protocol,
        vip: IpAddr,
    ) -> Result<TagSpec, ConfigError> {
        let Some(raw) = raw else {
            return Ok(TagSpec::None);
        };
        let field = format!("{at}.tag.kind");
        let kind = required(raw.kind, || {
            self.err(
                &field,
                "missing",
                "set kind = \"none\", \"udp-payload\" or \"ipv6-flow-label\"",
            )
        })?;
        let no_extra = |kind: &str| -> Result<(), ConfigError> {
            if raw.offset.is_some() || raw.length.is_some() {
                return Err(self.err(
                    format!("{at}.tag"),
                    format!("offset and length do not apply to tag kind `{kind}`"),
                    "remove them, or use kind = \"udp-payload\"",
                ));
            }
            Ok(())
        };
        match kind.as_str() {
            "none" => {
                no_extra("none")?;
                Ok(TagSpec::None)
            }
            "ipv6-flow-label" => {
                no_extra("ipv6-flow-label")?;
                if !vip.is_ipv6() {
                    return Err(self.err(
                        &field,
                        format!("the flow label is an IPv6 field but vip {vip} is IPv4"),
                        "use an IPv6 vip, or kind = \"none\" / \"udp-payload\"",
                    ));
                }
                Ok(TagSpec::Ipv6FlowLabel)
            }
            "udp-payload" => {
                if protocol != Protocol::Udp {
                    return Err(self.err(
                        &field,
                        "a udp-payload tag needs protocol = \"udp\"",
                        "set protocol = \"udp\", or use kind = \"none\"",
                    ));
                }
                let length = raw.length.ok_or_else(|| {
                    self.err(
                        format!("{at}.tag.length"),
                        "missing",
                        format!("set length = 1..{MAX_TAG_LEN} (tag bytes)"),
                    )
                })?;
                let length = u16::try_from(length)
                    .ok()
                    .filter(|&l| l >= 1 && u32::from(l) <= MAX_TAG_LEN)
                    .ok_or_else(|| {
                        self.err(
                            format!("{at}.tag.length"),
                            format!("{length} bytes is not a supported tag length"),
                            format!("use 1 to {MAX_TAG_LEN}; longer tags can be shortened to a prefix that still names the unit of work"),
                        )
                    })?;
                let offset = raw.offset.unwrap_or(0);
                let offset = u16::try_from(offset)
                    .ok()
                    .filter(|&o| o <= 9000)
                    .ok_or_else(|| {
                        self.err(
                            format!("{at}.tag.offset"),
                            format!("offset {offset} is outside any datagram"),
                            "use a byte offset from 0 to 9000 into the UDP payload",
                        )
                    })?;
                Ok(TagSpec::UdpPayload { offset, length })
            }
            other => Err(self.err(
                &field,
                format!("unknown tag kind `{other}`"),
                "use \"none\", \"udp-payload\" or \"ipv6-flow-label\"",
            )),
        }
    }

    fn instance(&self, at: &str, raw: RawInstance) -> Result<Instance, ConfigError> {
        let name = required(raw.name, || {
            self.err(
                format!("{at}.name"),
                "missing",
                "add name = \"my-instance\"",
            )
        })?;
        if name.is_empty() {
            return Err(self.err(format!("{at}.name"), "empty", "give the instance a name"));
        }
        let veth = required(raw.veth, || {
            self.err(
                format!("{at}.veth"),
                "missing",
                "add veth = \"<host-side veth of the instance's container>\"",
            )
        })?;
        if veth.is_empty() || veth.len() > 15 || veth.contains(['/', ' ']) {
            return Err(self.err(
                format!("{at}.veth"),
                format!("`{veth}` is not a valid interface name"),
                "use the host-side interface name as `ip link` shows it (1 to 15 characters, no '/' or spaces)",
            ));
        }
        let mac = raw
            .mac
            .map(|m| {
                parse_mac(&m).ok_or_else(|| {
                    self.err(
                        format!("{at}.mac"),
                        format!("`{m}` is not a unicast MAC address"),
                        "write six hex bytes like 02:00:5e:10:00:01, or leave mac out to discover it",
                    )
                })
            })
            .transpose()?;
        let cpu_limit = raw
            .cpu_limit
            .map(|v| self.num(&format!("{at}.cpu_limit"), Some(v), 0.0, 0.01, 4096.0))
            .transpose()?;
        if cpu_limit.is_some() && raw.cgroup.is_none() {
            return Err(self.err(
                format!("{at}.cpu_limit"),
                "cpu_limit without cgroup",
                "add cgroup = \"/sys/fs/cgroup/<container>\" so CPU usage can be read",
            ));
        }
        let health_reports = match raw.health.as_deref() {
            None | Some("veth") => false,
            Some("reports") => true,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.health"),
                    format!("unknown health check `{other}`"),
                    "use \"veth\" (failed when its veth disappears) or \"reports\" (also when its QoS reports stop)",
                ));
            }
        };
        Ok(Instance {
            name,
            veth,
            mac,
            netns: raw.netns,
            cgroup: raw.cgroup.map(PathBuf::from),
            cpu_limit,
            health_reports,
        })
    }
}

/// The 1-based line of `field` (`service[1].instance[0].veth`,
/// `service[0].tag.length`, `agent.interval_ms`) in the config text: the
/// key's line if it is there, else the line of the table it belongs in.
fn locate(text: &str, field: &str) -> Option<usize> {
    // Which table each line is in: (service index, instance index, sub-table).
    let mut service: Option<usize> = None;
    let mut instance: Option<usize> = None;
    let mut table = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        match t {
            "[[service]]" => {
                service = Some(service.map_or(0, |s| s + 1));
                instance = None;
                table = "service".into();
            }
            "[[service.instance]]" => {
                instance = Some(instance.map_or(0, |i| i + 1));
                table = "service.instance".into();
            }
            _ if t.starts_with('[') => t.trim_matches(['[', ']']).trim().clone_into(&mut table),
            _ => {}
        }
        rows.push((service, instance, table.clone(), t.to_owned()));
    }
    // Parse the path into (service, instance, key segments).
    let index = |seg: &str, name: &str| -> Option<Option<usize>> {
        let rest = seg.strip_prefix(name)?;
        Some(
            rest.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok()),
        )
    };
    let mut segs = field.split('.').peekable();
    let (mut want_s, mut want_i, mut prefix) = (None, None, String::new());
    if let Some(Some(si)) = segs.peek().and_then(|s| index(s, "service")) {
        want_s = Some(si);
        prefix = "service".into();
        segs.next();
        if let Some(Some(ii)) = segs.peek().and_then(|s| index(s, "instance")) {
            want_i = Some(ii);
            prefix = "service.instance".into();
            segs.next();
        }
    } else if segs.peek() == Some(&"agent") {
        prefix = "agent".into();
        segs.next();
    }
    let keys: Vec<&str> = segs.collect();
    let in_block = |r: &(Option<usize>, Option<usize>, String, String)| {
        r.0 == want_s && (want_i.is_none() || r.1 == want_i) && r.2.starts_with(&prefix)
    };
    let header = rows
        .iter()
        .position(|r| in_block(r) && r.3.starts_with('['));
    // The deepest key written as `key =` in the block, or as a sub-table.
    for depth in (1..=keys.len()).rev() {
        let table = if depth > 1 {
            format!("{prefix}.{}", keys[..depth - 1].join("."))
        } else {
            prefix.clone()
        };
        let key = keys[depth - 1];
        if let Some(n) = rows.iter().position(|r| {
            in_block(r) && r.2 == table && r.3.split('=').next().is_some_and(|k| k.trim() == key)
        }) {
            return Some(n + 1);
        }
        if let Some(n) = rows
            .iter()
            .position(|r| in_block(r) && r.3 == format!("[{table}.{key}]"))
        {
            return Some(n + 1);
        }
    }
    header.map(|n| n + 1)
}

fn required<T>(v: Option<T>, err: impl FnOnce() -> ConfigError) -> Result<T, ConfigError> {
    v.ok_or_else(err)
}

/// Parses `aa:bb:cc:dd:ee:ff`; rejects multicast/broadcast and all-zero.
#[must_use]
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
name = "kv"
vip = "198.18.0.100"
ports = [7000, 7001]
protocol = "udp"
tag = { kind = "udp-payload", offset = 2, length = 8 }

[[service.instance]]
name = "kv-0"
veth = "slc-kv0"
mac = "02:00:5e:10:00:01"

[[service.instance]]
name = "kv-1"
veth = "slc-kv1"
netns = "kv1"

[[service]]
name = "web"
vip = "fd00:5100::100"
port = 443
protocol = "tcp"

[[service.instance]]
name = "web-0"
veth = "slc-web0"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn field_of(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].ports, vec![7000, 7001]);
        assert_eq!(
            c.services[0].tag,
            TagSpec::UdpPayload {
                offset: 2,
                length: 8
            }
        );
        assert_eq!(
            c.services[0].instances[0].mac,
            Some([2, 0, 0x5e, 0x10, 0, 1])
        );
        assert_eq!(c.services[0].instances[1].netns.as_deref(), Some("kv1"));
        assert_eq!(c.services[1].tag, TagSpec::None);
        assert_eq!(c.services[1].protocol, Protocol::Tcp);
        assert_eq!(c.instance_count(), 3);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("198.18.0.100", "198.18.0.300"),
                "service[0].vip",
            ),
            (
                GOOD.replace("[7000, 7001]", "[7000, 70000]"),
                "service[0].ports",
            ),
            (
                GOOD.replace("[7000, 7001]", "[7000, 7000]"),
                "service[0].ports",
            ),
            (GOOD.replace("\"tcp\"", "\"sctp\""), "service[1].protocol"),
            (
                GOOD.replace("length = 8", "length = 17"),
                "service[0].tag.length",
            ),
            (GOOD.replace("udp-payload", "quic"), "service[0].tag.kind"),
            (
                GOOD.replace("02:00:5e:10:00:01", "01:00:5e:10:00:01"),
                "service[0].instance[0].mac",
            ),
            (
                GOOD.replace("slc-kv1", "slc-kv0"),
                "service[0].instance[1].veth",
            ),
            (
                GOOD.replace("slc-web0", "a-name-longer-than-15"),
                "service[1].instance[0].veth",
            ),
            (
                GOOD.replace("name = \"web\"", "name = \"kv\""),
                "service[1].name",
            ),
            (
                GOOD.replace("name = \"web-0\"", "name = \"kv-0\""),
                "service[1].instance[0].name",
            ),
            (
                GOOD.replace("port = 443", "port = 443\nports = [1]"),
                "service[1].port",
            ),
            (
                GOOD.replace(
                    "\"tcp\"",
                    "\"tcp\"\ntag = { kind = \"udp-payload\", length = 4 }",
                ),
                "service[1].tag.kind",
            ),
            (
                GOOD.replace(
                    "kind = \"udp-payload\", offset = 2, length = 8",
                    "kind = \"ipv6-flow-label\"",
                ),
                "service[0].tag.kind",
            ),
            (
                GOOD.replace("\"fd00:5100::100\"", "\"fd00:5100::100\"\nvip2 = 1"),
                "",
            ),
        ];
        for (text, want) in cases {
            if want.is_empty() {
                assert!(
                    matches!(parse(&text), Err(ConfigError::Syntax { .. })),
                    "unknown key must be rejected"
                );
                continue;
            }
            assert_eq!(field_of(&text), want);
        }
    }

    #[test]
    fn errors_carry_the_line() {
        let line_of = |text: &str| match parse(text) {
            Err(ConfigError::Invalid { line, .. }) => line,
            other => panic!("expected a field error, got {other:?}"),
        };
        // GOOD starts with an empty line: `vip` of service 0 is line 4.
        assert_eq!(line_of(&GOOD.replace("198.18.0.100", "nope")), Some(4));
        assert_eq!(line_of(&GOOD.replace("slc-kv1", "slc-kv0")), Some(16));
        assert_eq!(line_of(&GOOD.replace("length = 8", "length = 99")), Some(7));
        assert_eq!(
            line_of(&GOOD.replace("name = \"web-0\"", "name = \"kv-0\"")),
            Some(26)
        );
        let e = parse(&GOOD.replace("\"tcp\"", "\"sctp\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:23: `service[1].protocol`"), "{e}");
    }

    #[test]
    fn error_message_says_how_to_fix() {
        let e = parse(&GOOD.replace("198.18.0.100", "nope"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:4: `service[0].vip`"), "{e}");
        assert!(e.contains("fix: write an IPv4"), "{e}");
    }

    #[test]
    fn same_port_on_two_services_is_rejected() {
        let text = GOOD
            .replace("fd00:5100::100", "198.18.0.100")
            .replace("port = 443", "port = 7001")
            .replace("\"tcp\"", "\"udp\"");
        assert_eq!(field_of(&text), "service[1].ports");
    }

    #[test]
    fn empty_config_is_rejected() {
        assert_eq!(field_of(""), "service");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:5e:10:00:01"),
            Some([2, 0, 0x5e, 0x10, 0, 1])
        );
        assert_eq!(parse_mac("02:00:5e:10:00"), None);
        assert_eq!(parse_mac("02:00:5e:10:00:01:02"), None);
        assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), None);
        assert_eq!(format_mac(&[2, 0, 0x5e, 0x10, 0, 1]), "02:00:5e:10:00:01");
    }
}
