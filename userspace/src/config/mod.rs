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
    /// What fails the instance besides its veth disappearing.
    pub health: HealthCheck,
    /// Where the L7 distributor reaches the instance (`layer = "http"`
    /// services: a proxy, not direct server return).
    pub addr: Option<SocketAddr>,
}

/// `health`: what fails an instance besides its veth disappearing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthCheck {
    /// `"veth"`: nothing else.
    Veth,
    /// `"sockets"` (the default): its application's sockets, read in its
    /// namespace (`netns`). Once something was seen bound to the service's
    /// ports, nothing bound there any more fails it at the next interval
    /// (the process died, the container did not), and so does most of
    /// what it was sent being refused for two intervals in a row.
    #[default]
    Sockets,
    /// `"reports"`: also its application's QoS reports stopping (none for
    /// 3 intervals).
    Reports,
}

impl HealthCheck {
    /// Whether the application's sockets are watched.
    #[must_use]
    pub fn sockets(self) -> bool {
        self != Self::Veth
    }

    /// Whether the application's reports must keep coming.
    #[must_use]
    pub fn reports(self) -> bool {
        self == Self::Reports
    }
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
    /// A kept-alive client connection idle this long is closed (never
    /// shorter than `response_timeout`: a client waiting for a slow answer
    /// is idle meanwhile).
    pub idle_timeout: Duration,
    /// Most client connections open at once (further ones wait in the
    /// listen backlog); `None`: an even share of what the open-file limit
    /// leaves (see `l7::admit`).
    pub max_connections: Option<u32>,
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
    /// Most connections open to one instance, busy or idle, over all the
    /// distributor's threads.
    pub pool_size: u32,
    /// An idle pooled connection is closed after this.
    pub pool_idle: Duration,
    pub limits: HttpLimits,
    pub connect_timeout: Duration,
    /// Longest wait for a response's head from an instance, once the
    /// request has been sent whole.
    pub response_timeout: Duration,
    /// A request body up to this size is read whole before an instance is
    /// picked (a slow or broken upload then holds none of its
    /// connections, and can go elsewhere if the instance fails).
    pub body_buffer_bytes: u32,
    /// Failures of an instance's own in a row (refused or reset
    /// connections, response timeouts) that eject it for a second; a
    /// client's malformed or aborted request is never one.
    pub eject_after_failures: u32,
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
                max_connections: None,
            },
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(30),
            body_buffer_bytes: 16 * 1024,
            eject_after_failures: 5,
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
    /// `[service.probe]`: an active check of every instance's application;
    /// `None`: passive signals only (`health`).
    pub probe: Option<Probe>,
}

/// `[service.probe]`: what the agent asks each instance's application, how
/// often, and how many answers in a row change its mind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub interval: Duration,
    /// Longest wait for one probe's answer (at most `interval`).
    pub timeout: Duration,
    /// Successes in a row that bring a failed instance back (after the
    /// hold-down).
    pub rise: u32,
    /// Failures in a row that fail it.
    pub fall: u32,
}

/// How an instance is probed. `port` defaults to the service's first.
/// L4 services are probed from inside the instance's network namespace at
/// the service's first VIP (which the instance holds, for direct server
/// return); http services at the instance's `addr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A datagram `send`; the answer must start with `expect` (any answer
    /// when empty).
    Udp {
        port: Option<u16>,
        send: Vec<u8>,
        expect: Vec<u8>,
    },
    /// A TCP connection accepted.
    Tcp { port: Option<u16> },
    /// `GET path`; the status must be `status`, or any 2xx or 3xx.
    Http {
        port: Option<u16>,
        path: String,
        status: Option<u16>,
    },
    /// A command run in the instance's network namespace that must exit
    /// 0; `{name}`, `{service}`, `{vip}` and `{port}` filled in.
    Exec { command: Vec<String> },
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
    /// UDP port, on each host's underlay address, a host that cannot renew
    /// its lease asks its peers on whether they can (the fence's vouch).
    pub fence_port: u16,
}

/// The fence's vouch port unless `cluster.fence_port` says otherwise: the
/// one after the encapsulation port's default.
pub const DEFAULT_FENCE_PORT: u16 = 6081;

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
            fence_port: DEFAULT_FENCE_PORT,
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
pub(crate) mod tests;
