//! The agent's TOML config: services, their tag specs and their instances.
//!
//! - [`raw`]: the file as written, deserialized into typed values with
//!   their positions (`toml::Spanned`);
//! - [`check`]: the semantic checks that turn it into the types below;
//! - [`instance`]: the rules of one instance, which an instance registered
//!   while the agent runs meets too ([`InstanceSpec::check`]), and
//!   [`live`] the checks of a registration against the running config.
//!
//! Every check runs before anything touches the kernel, so a bad config
//! changes nothing; all errors of a file are reported at once, each naming
//! the line, the field as a path (`service[1].instance[0].veth`), the
//! problem and the fix. Unknown keys are errors too.
//!
//! A leaf apart from `sluice_common`: it imports nothing from the crate.

mod check;
mod instance;
mod live;
mod raw;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

pub use self::instance::InstanceSpec;

/// Most instances, over all services (instance ids are `1..=MAX_INSTANCES`).
pub const MAX_INSTANCES: usize = sluice_common::MAX_INSTANCES as usize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}", errors.iter().map(|e| format!("{}:{e}", path.display())).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        /// Every problem found, in file order.
        errors: Vec<FieldError>,
    },
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: `{field}`: {problem}; fix: {fix}", line.map_or_else(|| "?".to_owned(), |l| l.to_string()))]
pub struct FieldError {
    /// 1-based line of the value (or of its table when it is missing).
    pub line: Option<usize>,
    /// Path of the field, e.g. `service[1].instance[0].veth`.
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    /// The field errors, if this is a check failure.
    #[must_use]
    pub fn fields(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
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
    /// `length` bytes at `offset` into a QUIC packet's destination
    /// connection id; the servers issue ids of `cid_length` bytes (a short
    /// header does not say).
    QuicCid {
        cid_length: u16,
        offset: u16,
        length: u16,
    },
}

/// Which flows of a service are pinned to their owner while units move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinMode {
    None,
    Tcp,
    TcpUdp,
}

/// How an under-loaded WLM element takes work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WlmPolicy {
    /// Take work only from a peer more loaded than itself, and only so much
    /// that it stays no more loaded than that peer: the service stays spread
    /// over all its instances.
    Spread,
    /// Take back buddy groups from other under-loaded peers: work packs onto
    /// as few instances as stay under the thresholds' midpoint, leaving the
    /// rest idle (for scale-in).
    Pack,
}

/// WLM settings of a service: capacity, thresholds and pacing.
#[derive(Clone, Debug, PartialEq)]
pub struct WlmConfig {
    /// How under-loaded elements take work.
    pub policy: WlmPolicy,
    /// Spread: an under-loaded element takes work only from a peer whose
    /// utilisation is more than this above its own.
    pub balance_band: f64,
    /// Packets per second one instance is sized for.
    pub capacity_pps: f64,
    /// Utilisation above which an instance sheds work.
    pub overload: f64,
    /// Utilisation below which an instance takes work back.
    pub underload: f64,
    /// Intervals a threshold must be crossed for before acting.
    pub sustain: u32,
    /// Least time between two moves of one element.
    pub cooldown: Duration,
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
            policy: WlmPolicy::Spread,
            balance_band: 0.1,
            capacity_pps: 100_000.0,
            overload: 0.8,
            underload: 0.3,
            sustain: 3,
            cooldown: Duration::from_secs(5),
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
    pub interval: Duration,
    /// Most group moves per second, over all elements.
    pub max_moves_per_sec: f64,
    /// Capacity of the pinned-flow LRU map.
    pub pinned_flows: u32,
    /// Punted frames waiting for a claim, at most; more are dropped and
    /// counted.
    pub punt_queue: u32,
    /// MACs besides the interface's own whose frames are steered (e.g. a
    /// VRRP virtual MAC); frames for any other MAC pass.
    pub host_macs: Vec<[u8; 6]>,
    /// Bind the punt sockets zero-copy where the driver can: on such
    /// drivers all traffic of a queue then lands in the agent's UMEM and
    /// every frame not punted is copied out of it. Off by default.
    pub punt_zero_copy: bool,
    /// How long a failed instance must look healthy again (veth back,
    /// reports resumed) before it takes work again.
    pub recovery_hold_down: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            max_moves_per_sec: 2.0,
            pinned_flows: sluice_common::DEFAULT_PINNED_FLOWS,
            punt_queue: 65_536,
            host_macs: Vec::new(),
            punt_zero_copy: false,
            recovery_hold_down: Duration::from_secs(5),
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
    /// Where the L7 distributor reaches the instance (`layer = "http"`
    /// services: a proxy, not direct server return).
    pub addr: Option<SocketAddr>,
}

/// Where a request's key is found (`[service.http] key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKey {
    /// The value of a header (case-insensitive name).
    Header(String),
    /// The value of a cookie.
    Cookie(String),
    /// The n-th segment of the path, from 1 (`/users/alice/cart`: 2 is
    /// `alice`).
    PathSegment(u32),
    /// The value of a query parameter.
    Query(String),
}

/// What a request must carry to match a priority rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestMatch {
    /// A header with this value (name case-insensitive, value exact).
    Header { name: String, value: String },
    /// A cookie with this value.
    Cookie { name: String, value: String },
    /// A path starting with this prefix.
    PathPrefix(String),
}

/// `[[service.http.priority]]`: matching requests go to the least-loaded
/// instance of a reserved subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityRule {
    pub name: String,
    pub when: RequestMatch,
    /// Names of the subset's instances (of the same service).
    pub instances: Vec<String>,
}

/// Limits on what a client may send the L7 distributor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Request line and headers together, in bytes (431 beyond).
    pub max_header_bytes: u32,
    /// Headers in one request (431 beyond).
    pub max_headers: u32,
    /// Length of the request target, in bytes (414 beyond).
    pub max_request_line: u32,
    /// A request head must arrive whole within this (slowloris: 408 and
    /// closed).
    pub header_timeout: Duration,
    /// A kept-alive client connection idle this long is closed.
    pub idle_timeout: Duration,
}

/// `[service.http]`: how a `layer = "http"` service's requests are routed
/// and proxied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where a request's key is; without one (or when a request lacks it),
    /// the client connection's flow hash keeps its requests together.
    pub key: Option<RequestKey>,
    pub priority: Vec<PriorityRule>,
    /// Requests matching no rule may go to reserved instances when no
    /// other instance can take them.
    pub spill: bool,
    /// Most kept-alive connections to one instance.
    pub pool_size: u32,
    /// An idle pooled connection is closed after this.
    pub pool_idle: Duration,
    pub limits: HttpLimits,
    pub connect_timeout: Duration,
    /// Longest wait for a response's head from an instance.
    pub response_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            key: None,
            priority: Vec::new(),
            spill: false,
            pool_size: 64,
            pool_idle: Duration::from_secs(30),
            limits: HttpLimits {
                max_header_bytes: 16 * 1024,
                max_headers: 100,
                max_request_line: 8192,
                header_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_mins(1),
            },
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(30),
        }
    }
}

impl HttpConfig {
    /// Whether instance `name` is in a priority subset (it owns no work
    /// units: it takes only the requests its rules send it).
    #[must_use]
    pub fn is_reserved(&self, name: &str) -> bool {
        self.priority
            .iter()
            .any(|r| r.instances.iter().any(|i| i == name))
    }
}

/// `[service.scale]`: how many instances the service runs, and when the
/// agent starts or stops one (see `control::scale` for the rules).
///
/// `min_instances` and `max_instances` count all the service's instances,
/// the configured ones too. Without a `launcher` the table is still
/// accepted: the agent then only detects failures and reports the bounds
/// and what it would do, it starts and stops nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleConfig {
    pub min_instances: u32,
    pub max_instances: u32,
    /// Control intervals the service must stay saturated before one
    /// launch.
    pub out_intervals: u32,
    /// Control intervals of idleness before one stop.
    pub in_intervals: u32,
    /// Least time between two scaling changes of the service.
    pub cooldown: Duration,
    /// A stopped instance's pinned flows get this long to finish.
    pub drain_deadline: Duration,
    pub launcher: Option<Launcher>,
    pub failure: FailureRule,
    /// SLA windows, in config order: the first matching one applies.
    pub windows: Vec<SlaWindow>,
}

/// How the agent starts and stops a service's instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// argv templates; placeholders `{service}` `{name}` `{vip}` `{port}`
    /// `{index}` (see [`expand`]).
    Command {
        start: Vec<String>,
        stop: Vec<String>,
        start_timeout: Duration,
    },
    /// Built in: the server command run in a fresh network namespace, its
    /// addresses from `subnet`, `routes` reached through the host.
    Netns {
        command: Vec<String>,
        subnet: (std::net::Ipv4Addr, u8),
        routes: Vec<(IpAddr, u8)>,
        start_timeout: Duration,
    },
}

/// `[service.scale.failure]`: a failed launched instance is restarted at
/// most `restarts` times within any `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureRule {
    pub restarts: u32,
    pub window: Duration,
}

impl Default for FailureRule {
    fn default() -> Self {
        Self {
            restarts: 3,
            window: Duration::from_mins(10),
        }
    }
}

/// `[[service.scale.window]]`: an SLA time window, in local time.
///
/// It covers the minutes `from..to` of each of its days; when `to < from`
/// it crosses midnight, covering `from..24:00` of a day and `00:00..to` of
/// the next. `to` may be 1440 (written `24:00`).
#[derive(Clone, Debug, PartialEq)]
pub struct SlaWindow {
    /// Index 0 is Monday.
    pub days: [bool; 7],
    /// Minute of the day, inclusive.
    pub from: u16,
    /// Minute of the day, exclusive.
    pub to: u16,
    /// `min_instances` while the window holds.
    pub min_instances: Option<u32>,
    /// The WLM overload threshold while the window holds.
    pub overload: Option<f64>,
}

/// The placeholders a launcher's templates may use.
pub const PLACEHOLDERS: [&str; 5] = ["service", "name", "vip", "port", "index"];

/// What a launcher's placeholders stand for, for one instance.
#[derive(Clone, Copy, Debug)]
pub struct TemplateVars<'a> {
    pub service: &'a str,
    pub name: &'a str,
    pub vip: IpAddr,
    pub port: u16,
    pub index: u32,
}

/// A template's pieces: literal text and placeholder names. `{{` and `}}`
/// are literal braces (container tools' own templates use them).
fn template_parts(t: &str) -> Result<Vec<TemplatePart<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        let Some(at) = rest.find(['{', '}']) else {
            out.push(TemplatePart::Text(rest));
            break;
        };
        if at > 0 {
            out.push(TemplatePart::Text(&rest[..at]));
        }
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push(TemplatePart::Text("{"));
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push(TemplatePart::Text("}"));
            rest = after;
        } else if tail.starts_with('}') {
            return Err("a `}` that closes nothing".into());
        } else {
            let Some(end) = tail.find('}') else {
                return Err("a `{` that is never closed".into());
            };
            out.push(TemplatePart::Placeholder(&tail[1..end]));
            rest = &tail[end + 1..];
        }
    }
    Ok(out)
}

enum TemplatePart<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// A checked template (a launcher argument) with its placeholders filled
/// in; an unknown placeholder (the check refuses them) is kept as written.
#[must_use]
pub fn expand(template: &str, vars: &TemplateVars<'_>) -> String {
    let Ok(parts) = template_parts(template) else {
        return template.to_owned();
    };
    let mut out = String::with_capacity(template.len());
    for p in parts {
        match p {
            TemplatePart::Text(t) => out.push_str(t),
            TemplatePart::Placeholder("service") => out.push_str(vars.service),
            TemplatePart::Placeholder("name") => out.push_str(vars.name),
            TemplatePart::Placeholder("vip") => out.push_str(&vars.vip.to_string()),
            TemplatePart::Placeholder("port") => out.push_str(&vars.port.to_string()),
            TemplatePart::Placeholder("index") => out.push_str(&vars.index.to_string()),
            TemplatePart::Placeholder(other) => {
                out.push('{');
                out.push_str(other);
                out.push('}');
            }
        }
    }
    out
}

/// `[[service.origin]]`: packets from `prefixes` go only to the
/// `instances` subset (they own no units: other traffic never reaches
/// them), spilling over to the service's other instances when the subset
/// is saturated or gone only with `spill`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginRule {
    pub name: String,
    /// Source prefixes (network address, length), host bits clear.
    pub prefixes: Vec<(IpAddr, u8)>,
    /// Names of the subset's instances (of the same service).
    pub instances: Vec<String>,
    pub spill: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    /// Addresses the service answers on (IPv4 and IPv6 may mix).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
    /// VLAN id the service's packets arrive on; 0 for untagged.
    pub vlan: u16,
    pub tag: TagSpec,
    pub pin: PinMode,
    /// A pinned flow idle this long loses its pin.
    pub pin_idle_secs: u32,
    /// `assign = "on-demand"`: no unit is owned at start; units are claimed
    /// by their first packets (punted to the agent).
    pub on_demand: bool,
    pub wlm: WlmConfig,
    pub instances: Vec<Instance>,
    /// `layer = "http"`: requests are distributed one by one by the L7
    /// distributor; `None` for L4 services.
    pub http: Option<HttpConfig>,
    /// `[service.scale]`: scale-out and scale-in; `None`: the configured
    /// instances only.
    pub scale: Option<ScaleConfig>,
    /// SLA origin rules (L4 services only): clients by source prefix to
    /// reserved subsets.
    pub origins: Vec<OriginRule>,
}

impl Service {
    /// Whether instance `name` owns no units because it is reserved: in an
    /// http priority subset (see [`HttpConfig::is_reserved`]) or an origin
    /// rule's subset. It takes only what its rules send it.
    #[must_use]
    pub fn is_reserved(&self, name: &str) -> bool {
        self.http.as_ref().is_some_and(|h| h.is_reserved(name))
            || self
                .origins
                .iter()
                .any(|r| r.instances.iter().any(|i| i == name))
    }

    /// Every (vip, port, protocol) the service answers on.
    pub fn endpoints(&self) -> impl Iterator<Item = (IpAddr, u16, Protocol)> + '_ {
        self.vips.iter().flat_map(move |&vip| {
            self.protocols
                .iter()
                .flat_map(move |&proto| self.ports.iter().map(move |&port| (vip, port, proto)))
        })
    }
}

/// Where the coordination store lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// In the agent, persisted to its state file: one host.
    #[default]
    Embedded,
    /// In etcd, shared by every host of the cluster.
    Etcd,
}

/// This host's place in a cluster (`[cluster]`); without the table, one
/// host with the embedded store.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub store: StoreKind,
    /// This host's name, unique in the cluster.
    pub host: String,
    /// Where the other hosts send the packets of this host's instances.
    pub underlay: Option<IpAddr>,
    /// `http://address:port` of each etcd member.
    pub etcd_endpoints: Vec<String>,
    /// Keys live under `/sluice/<name>/`: clusters may share one etcd.
    pub name: String,
    /// A host whose agent stops renewing its lease this long counts as
    /// failed, and its instances' groups are claimed by the others.
    pub lease_ttl: Duration,
    /// Longest wait for one etcd request.
    pub etcd_timeout: Duration,
    /// UDP port packets between hosts are encapsulated to (GUE).
    pub encap_port: u16,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Embedded,
            host: String::new(),
            underlay: None,
            etcd_endpoints: Vec::new(),
            name: "default".into(),
            lease_ttl: Duration::from_secs(5),
            etcd_timeout: Duration::from_secs(1),
            encap_port: sluice_common::encap::DEFAULT_ENCAP_PORT,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub cluster: ClusterConfig,
    pub services: Vec<Service>,
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
        check::parse(text, path)
    }

    /// Total number of instances over all services.
    #[must_use]
    pub fn instance_count(&self) -> usize {
        self.services.iter().map(|s| s.instances.len()).sum()
    }
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
pub(crate) mod tests {
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

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    /// The one field error of `text`.
    pub(crate) fn only_error(text: &str) -> FieldError {
        match parse(text) {
            Err(ConfigError::Invalid { errors, .. }) if errors.len() == 1 => errors[0].clone(),
            other => panic!("expected one field error, got {other:?}"),
        }
    }

    fn field_of(text: &str) -> String {
        only_error(text).field
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
        assert_eq!(c.services[1].protocols, vec![Protocol::Tcp]);
        assert_eq!(c.instance_count(), 3);
    }

    const CLUSTER: &str = r#"
[cluster]
store = "etcd"
host = "host-a"
underlay = "198.18.1.1"
etcd_endpoints = ["http://198.18.0.1:2379"]
"#;

    #[test]
    fn a_cluster_table_parses_and_its_absence_means_one_host() {
        assert_eq!(parse(GOOD).unwrap().cluster, ClusterConfig::default());
        let c = parse(&format!("{CLUSTER}{GOOD}")).unwrap().cluster;
        assert_eq!(c.store, StoreKind::Etcd);
        assert_eq!(c.host, "host-a");
        assert_eq!(c.underlay, Some("198.18.1.1".parse().unwrap()));
        assert_eq!(c.etcd_endpoints, ["http://198.18.0.1:2379"]);
        assert_eq!(c.name, "default");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
    }

    #[test]
    fn cluster_errors_name_the_field_and_the_fix() {
        let with = |a: &str, b: &str| format!("{}{GOOD}", CLUSTER.replace(a, b));
        let cases = [
            (
                with("\"etcd\"", "\"zookeeper\""),
                "cluster.store",
                "embedded",
            ),
            (
                with("host = \"host-a\"\n", ""),
                "cluster.host",
                "name this host",
            ),
            (with("host-a", "host a"), "cluster.host", "letters, digits"),
            (
                with("underlay = \"198.18.1.1\"\n", ""),
                "cluster.underlay",
                "underlay =",
            ),
            (
                with("198.18.1.1", "127.0.0.1"),
                "cluster.underlay",
                "unicast",
            ),
            (
                with("198.18.1.1", "198.18.1"),
                "cluster.underlay",
                "unicast",
            ),
            (
                with("[\"http://198.18.0.1:2379\"]", "[]"),
                "cluster.etcd_endpoints",
                "list the etcd members",
            ),
            (
                with("http://", "https://"),
                "cluster.etcd_endpoints[0]",
                "http://address:port",
            ),
            (
                with(":2379", ""),
                "cluster.etcd_endpoints[0]",
                "http://address:port",
            ),
            (
                with("[\"http://198.18.0.1:2379\"]", "\"http://198.18.0.1:2379\""),
                "cluster.etcd_endpoints",
                "etcd_endpoints = [",
            ),
            (
                with("\"etcd\"", "\"embedded\""),
                "cluster.etcd_endpoints",
                "store = \"etcd\"",
            ),
            (
                format!("{CLUSTER}lease_ttl_secs = 0\n{GOOD}"),
                "cluster.lease_ttl_secs",
                "from 1 to 600",
            ),
            (
                format!("{CLUSTER}hots = \"x\"\n{GOOD}"),
                "cluster.hots",
                "spelling",
            ),
        ];
        for (text, field, fix) in cases {
            let e = only_error(&text);
            assert_eq!(e.field, field, "{e:?}");
            assert!(e.fix.contains(fix), "{field}: {e:?}");
        }
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
                "service[1].vip2",
            ),
            (
                GOOD.replace("ports = [7000, 7001]", "ports = [7000, \"x\"]"),
                "service[0].ports",
            ),
            (
                GOOD.replace("length = 8", "length = -1"),
                "service[0].tag.length",
            ),
            (
                GOOD.replace(
                    "name = \"web-0\"",
                    &format!("name = \"{}\"", "w".repeat(65)),
                ),
                "service[1].instance[0].name",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(field_of(&text), want, "{text}");
        }
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "a table of cases")]
    fn a_quic_cid_tag_parses_and_its_errors_name_the_field_and_the_fix() {
        let udp_payload = "kind = \"udp-payload\", offset = 2, length = 8";
        let quic = |spec: &str| GOOD.replace(udp_payload, spec);
        let c = parse(&quic(
            "kind = \"quic-cid\", cid_length = 8, offset = 2, length = 4",
        ))
        .unwrap();
        assert_eq!(
            c.services[0].tag,
            TagSpec::QuicCid {
                cid_length: 8,
                offset: 2,
                length: 4
            }
        );
        let c = parse(&quic("kind = \"quic-cid\", cid_length = 20, length = 16")).unwrap();
        assert_eq!(
            c.services[0].tag,
            TagSpec::QuicCid {
                cid_length: 20,
                offset: 0,
                length: 16
            },
            "offset defaults to 0"
        );
        let cases = [
            (
                quic("kind = \"quic-cid\", length = 4"),
                "service[0].tag.cid_length",
                "missing",
                "set cid_length = 1..20",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 0, length = 4"),
                "service[0].tag.cid_length",
                "0 bytes is not a QUIC connection id length",
                "use 1 to 20",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 21, length = 4"),
                "service[0].tag.cid_length",
                "21 bytes",
                "at most 20",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = \"8\", length = 4"),
                "service[0].tag.cid_length",
                "8 bytes",
                "use 1 to 20",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 8"),
                "service[0].tag.length",
                "missing",
                "set length = 1..16",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 20, length = 17"),
                "service[0].tag.length",
                "17 bytes is not a supported tag length",
                "use 1 to 16",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 20, offset = 20, length = 1"),
                "service[0].tag.offset",
                "offset 20 is outside any QUIC connection id",
                "from 0 to 19",
            ),
            (
                quic("kind = \"quic-cid\", cid_length = 8, offset = 2, length = 8"),
                "service[0].tag.length",
                "offset 2 + length 8 reaches past the 8-byte connection id",
                "at most cid_length (8)",
            ),
            (
                GOOD.replace(
                    udp_payload,
                    "kind = \"quic-cid\", cid_length = 8, length = 4",
                )
                .replace("protocol = \"udp\"", "protocols = [\"udp\", \"tcp\"]"),
                "service[0].tag.kind",
                "a quic-cid tag needs the service to be UDP only",
                "protocol = \"udp\"",
            ),
            (
                quic("kind = \"udp-payload\", cid_length = 8, length = 4"),
                "service[0].tag.cid_length",
                "does not apply to tag kind `udp-payload`",
                "kind = \"quic-cid\"",
            ),
            (
                quic("kind = \"none\", cid_length = 8"),
                "service[0].tag.cid_length",
                "does not apply to tag kind `none`",
                "remove it",
            ),
            (
                quic("kind = \"quic\", cid_length = 8, length = 4"),
                "service[0].tag.kind",
                "unknown tag kind `quic`",
                "\"quic-cid\"",
            ),
        ];
        for (text, field, problem, fix) in cases {
            let e = only_error(&text);
            assert_eq!(e.field, field, "{text}: {e:?}");
            assert!(e.problem.contains(problem), "{field}: {e:?}");
            assert!(e.fix.contains(fix), "{field}: {e:?}");
            assert_eq!(e.line, Some(7), "{field}: the tag's line: {e:?}");
        }
    }

    #[test]
    fn wlm_policy_band_and_plain_names() {
        for (text, want) in [
            (
                GOOD.replace(
                    "name = \"web\"",
                    "name = \"web\"\nwlm = { policy = \"even\" }",
                ),
                "service[1].wlm.policy",
            ),
            (
                GOOD.replace(
                    "name = \"web\"",
                    "name = \"web\"\nwlm = { balance_band = 0 }",
                ),
                "service[1].wlm.balance_band",
            ),
            (
                GOOD.replace("name = \"web-0\"", "name = \"../web-0\""),
                "service[1].instance[0].name",
            ),
        ] {
            assert_eq!(field_of(&text), want, "{text}");
        }
        let packed = parse(&GOOD.replace(
            "name = \"web\"",
            "name = \"web\"\nwlm = { policy = \"pack\", balance_band = 0.2 }",
        ))
        .unwrap();
        assert_eq!(packed.services[1].wlm.policy, WlmPolicy::Pack);
        assert!((packed.services[1].wlm.balance_band - 0.2).abs() < 1e-12);
    }

    /// One container serving several services: a service with several
    /// VIPs (v4 and v6) and protocols, and instances of different services
    /// behind one veth.
    #[test]
    fn several_vips_protocols_and_a_shared_container() {
        let web = GOOD
            .replace(
                "vip = \"fd00:5100::100\"",
                "vips = [\"198.18.0.101\", \"fd00:5100::100\"]",
            )
            .replace("protocol = \"tcp\"", "protocols = [\"tcp\", \"udp\"]");
        let c = parse(&web).unwrap();
        assert_eq!(c.services[1].vips.len(), 2);
        assert_eq!(c.services[1].protocols, vec![Protocol::Tcp, Protocol::Udp]);
        assert_eq!(c.services[1].pin, PinMode::Tcp, "TCP among them: pin TCP");
        assert_eq!(c.services[1].endpoints().count(), 4);
        // web-0 in kv-0's container.
        let shared = web.replace(
            "veth = \"slc-web0\"",
            "veth = \"slc-kv0\"\nmac = \"02:00:5e:10:00:01\"",
        );
        assert!(parse(&shared).is_ok(), "{:?}", parse(&shared).err());
        for (text, want, says) in [
            (
                web.replace(
                    "veth = \"slc-web0\"",
                    "veth = \"slc-kv0\"\nmac = \"02:00:5e:10:00:09\"",
                ),
                "service[1].instance[0].veth",
                "differ",
            ),
            (
                GOOD.replace("slc-kv1", "slc-kv0"),
                "service[0].instance[1].veth",
                "of this service",
            ),
            (
                web.replace("198.18.0.101", "198.18.0.100")
                    .replace("port = 443", "port = 7001"),
                "service[1].port",
                "udp 198.18.0.100:7001 already belongs to service `kv`",
            ),
            (
                web.replace("\"tcp\", \"udp\"", "\"tcp\", \"tcp\""),
                "service[1].protocols",
                "listed twice",
            ),
            (
                web.replace("protocols = [\"tcp\", \"udp\"]", "protocols = []"),
                "service[1].protocols",
                "empty list",
            ),
            (
                GOOD.replace("protocol = \"udp\"", "protocols = [\"udp\", \"tcp\"]"),
                "service[0].tag.kind",
                "UDP only",
            ),
            (
                web.replace(
                    "protocols = [\"tcp\", \"udp\"]",
                    "protocols = [\"tcp\", \"udp\"]\ntag = { kind = \"ipv6-flow-label\" }",
                ),
                "service[1].tag.kind",
                "vip 198.18.0.101 is IPv4",
            ),
            (
                GOOD.replace("port = 443", "port = 443\nvip2 = 1").replace(
                    "vip = \"fd00:5100::100\"",
                    "vip = \"fd00:5100::100\"\nvips = [\"fd00:5100::101\"]",
                ),
                "service[1].vip",
                "both `vip` and `vips`",
            ),
        ] {
            let e = match parse(&text) {
                Err(ConfigError::Invalid { errors, .. }) => errors[0].clone(),
                other => panic!("expected an error for {want}, got {other:?}"),
            };
            assert_eq!(e.field, want, "{text}");
            assert!(
                e.to_string().contains(says),
                "{want}: `{e}` does not say `{says}`"
            );
        }
    }

    /// A scalar where a list or table belongs is an error of its field,
    /// not a syntax error that hides the rest of the file.
    #[test]
    fn wrong_shapes_are_errors_of_their_field_and_the_rest_is_still_checked() {
        let text = GOOD
            .replace("ports = [7000, 7001]", "ports = 7000")
            .replace(
                "tag = { kind = \"udp-payload\", offset = 2, length = 8 }",
                "tag = \"udp-payload\"",
            )
            .replace("port = 443", "port = 443\nwlm = 0.8")
            .replace("02:00:5e:10:00:01", "not-a-mac");
        let Err(ConfigError::Invalid { errors, .. }) = parse(&text) else {
            panic!("expected field errors");
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "service[0].ports",
                "service[0].tag",
                "service[0].instance[0].mac",
                "service[1].wlm"
            ],
            "{errors:#?}"
        );
        assert!(
            errors[0].problem.contains("`7000` is not a list"),
            "{}",
            errors[0]
        );
        assert!(errors[0].fix.contains("port = 7000"), "{}", errors[0]);
    }

    #[test]
    fn vlan_and_host_macs() {
        let text = format!(
            "[agent]\nhost_macs = [\"02:00:5e:00:01:01\"]\n{}",
            GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nvlan = 42")
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.agent.host_macs, vec![[2, 0, 0x5e, 0, 1, 1]]);
        assert_eq!((c.services[0].vlan, c.services[1].vlan), (0, 42));

        let bad = GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nvlan = 4095");
        assert_eq!(field_of(&bad), "service[1].vlan");
        let bad = format!("[agent]\nhost_macs = [\"01:00:5e:00:00:01\"]\n{GOOD}");
        assert_eq!(field_of(&bad), "agent.host_macs[0]");
        let bad = format!(
            "[agent]\nhost_macs = [\"02:00:00:00:00:01\", \"02:00:00:00:00:02\", \"02:00:00:00:00:03\", \"02:00:00:00:00:04\"]\n{GOOD}"
        );
        assert_eq!(field_of(&bad), "agent.host_macs");
        // The same endpoint on two VLANs is two services.
        let two = GOOD.replace("fd00:5100::100", "198.18.0.100").replace(
            "port = 443\nprotocol = \"tcp\"",
            "port = 7000\nprotocol = \"udp\"\nvlan = 7",
        );
        assert!(parse(&two).is_ok());
    }

    #[test]
    fn errors_carry_the_line() {
        let line_of = |text: &str| only_error(text).line;
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
    fn too_many_endpoints_are_refused_naming_the_limit() {
        // 2 VIPs × 4,097 ports × 2 protocols = 16,388 endpoints, and `web`.
        let ports: Vec<String> = (10_000..14_097).map(|p| p.to_string()).collect();
        let text = GOOD
            .replace(
                "vip = \"198.18.0.100\"",
                "vips = [\"198.18.0.100\", \"198.18.0.101\"]",
            )
            .replace(
                "ports = [7000, 7001]",
                &format!("ports = [{}]", ports.join(", ")),
            )
            .replace(
                "protocol = \"udp\"\ntag",
                "protocols = [\"udp\", \"tcp\"]\n#tag",
            );
        let e = only_error(&text);
        assert_eq!(e.field, "service[].ports", "{e:?}");
        assert!(e.to_string().contains("16389 endpoints"), "{e}");
        assert!(e.to_string().contains("at most 16384"), "{e}");
        // At the limit it is accepted.
        let ok: Vec<String> = (10_000..14_095).map(|p| p.to_string()).collect();
        let text = text.replace(&ports.join(", "), &ok.join(", "));
        assert!(parse(&text).is_ok(), "{:?}", parse(&text).err());
    }

    #[test]
    fn same_port_on_two_services_is_rejected() {
        let text = GOOD
            .replace("fd00:5100::100", "198.18.0.100")
            .replace("port = 443", "port = 7001")
            .replace("\"tcp\"", "\"udp\"");
        let e = only_error(&text);
        assert_eq!((e.field.as_str(), e.line), ("service[1].port", Some(22)));
    }

    #[test]
    fn every_error_of_a_file_is_reported_at_once() {
        let text = format!(
            "[agent]\ninterval_ms = 10\nspeed = 3\n{}",
            GOOD.replace("198.18.0.100", "nope")
                .replace("\"tcp\"", "\"sctp\"")
                .replace("02:00:5e:10:00:01", "zz:00:5e:10:00:01")
        );
        let e = parse(&text).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = e
            .fields()
            .iter()
            .map(|f| (f.line, f.field.as_str()))
            .collect();
        // Three agent lines come before GOOD (which starts with an empty
        // line), in file order.
        assert_eq!(
            got,
            vec![
                (Some(2), "agent.interval_ms"),
                (Some(3), "agent.speed"),
                (Some(7), "service[0].vip"),
                (Some(15), "service[0].instance[0].mac"),
                (Some(26), "service[1].protocol"),
            ],
            "{e}"
        );
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), 5, "{shown}");
        assert!(
            shown.lines().all(|l| l.starts_with("test.toml:")),
            "{shown}"
        );
        assert!(
            shown.contains("test.toml:3: `agent.speed`: unknown key `speed` in `agent`"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_point_at_their_own_line() {
        let text = GOOD.replace("veth = \"slc-kv1\"", "veth = \"slc-kv1\"\nnetnss = \"kv1\"");
        let e = only_error(&text);
        assert_eq!(
            (e.field.as_str(), e.line),
            ("service[0].instance[1].netnss", Some(17))
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse(&GOOD.replace("port = 443", "port = = 443")).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 22, .. }), "{e:?}");
        assert!(e.to_string().starts_with("test.toml:22: "), "{e}");
    }

    #[test]
    fn values_are_typed_and_defaults_apply() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.services[1].vips,
            vec!["fd00:5100::100".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.services[1].pin, PinMode::Tcp, "TCP services pin TCP");
        assert_eq!(c.services[0].pin, PinMode::None);
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.services[0].wlm, WlmConfig::default());
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
