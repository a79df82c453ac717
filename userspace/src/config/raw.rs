//! The config as written: serde types with the position of every value.
//!
//! Scalars are [`Field`]s: typed (`IpAddr`, `u16`, the enums below) when
//! the value deserializes as that type, else the value as written, so one
//! wrong value is reported with its field's own fix while the rest of the
//! file is still checked. Unknown keys are collected, not fatal, for the
//! same reason (see [`super::parse`]).

use std::{net::IpAddr, ops::Range};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use toml::Spanned;

/// A scalar value with its byte range in the file.
#[derive(Debug)]
pub(super) struct Field<T> {
    pub(super) span: Range<usize>,
    /// The typed value, or the value as written when it is not a `T`.
    pub(super) value: Result<T, toml::Value>,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = Spanned::<toml::Value>::deserialize(d)?;
        let span = written.span();
        let raw = written.into_inner();
        let value = T::deserialize(raw.clone()).map_err(|_: toml::de::Error| raw);
        Ok(Self { span, value })
    }
}

/// A value as a user would recognise it in their file: strings without
/// quotes, anything else as TOML.
pub(super) fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    pub(super) agent: Option<Spanned<RawAgent>>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawAgent {
    pub(super) interval_ms: Option<Field<u32>>,
    pub(super) max_moves_per_sec: Option<Field<f64>>,
    pub(super) pinned_flows: Option<Field<u32>>,
    pub(super) punt_queue: Option<Field<u32>>,
    pub(super) host_macs: Option<Spanned<Vec<Field<Mac>>>>,
    pub(super) punt_zero_copy: Option<Field<bool>>,
    pub(super) recovery_hold_down_ms: Option<Field<u32>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawCluster {
    pub(super) store: Option<Field<RawStore>>,
    pub(super) host: Option<Field<String>>,
    pub(super) underlay: Option<Field<IpAddr>>,
    pub(super) etcd_endpoints: Option<Spanned<Vec<Field<String>>>>,
    pub(super) name: Option<Field<String>>,
    pub(super) lease_ttl_secs: Option<Field<u32>>,
    pub(super) etcd_timeout_ms: Option<Field<u32>>,
    pub(super) encap_port: Option<Field<u32>>,
    pub(super) fence_port: Option<Field<u32>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawStore {
    #[serde(rename = "embedded")]
    Embedded,
    #[serde(rename = "etcd")]
    Etcd,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawWlm {
    pub(super) policy: Option<Field<RawWlmPolicy>>,
    pub(super) balance_band: Option<Field<f64>>,
    pub(super) capacity_pps: Option<Field<f64>>,
    pub(super) overload: Option<Field<f64>>,
    pub(super) underload: Option<Field<f64>>,
    pub(super) sustain: Option<Field<u32>>,
    pub(super) cooldown_ms: Option<Field<u32>>,
    pub(super) min_group_units: Option<Field<u32>>,
    pub(super) latency_target_ms: Option<Field<f64>>,
    pub(super) queue_target: Option<Field<f64>>,
    pub(super) in_flight_target: Option<Field<f64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawWlmPolicy {
    #[serde(rename = "spread")]
    Spread,
    #[serde(rename = "pack")]
    Pack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawProtocol {
    #[serde(rename = "udp")]
    Udp,
    #[serde(rename = "tcp")]
    Tcp,
}

impl std::fmt::Display for RawProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawPin {
    #[serde(rename = "none")]
    None,
    #[serde(rename = "tcp")]
    Tcp,
    #[serde(rename = "tcp+udp")]
    TcpUdp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawAssign {
    #[serde(rename = "even")]
    Even,
    #[serde(rename = "on-demand")]
    OnDemand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawTagKind {
    #[serde(rename = "none")]
    None,
    #[serde(rename = "udp-payload")]
    UdpPayload,
    #[serde(rename = "ipv6-flow-label")]
    Ipv6FlowLabel,
    #[serde(rename = "quic-cid")]
    QuicCid,
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`, unicast and not all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mac(pub(super) [u8; 6]);

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_mac(&text)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("not a unicast MAC address"))
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawService {
    pub(super) name: Option<Field<String>>,
    pub(super) vip: Option<Field<IpAddr>>,
    pub(super) vips: Option<Spanned<Vec<Field<IpAddr>>>>,
    pub(super) port: Option<Field<u16>>,
    pub(super) ports: Option<Spanned<Vec<Field<u16>>>>,
    pub(super) protocol: Option<Field<RawProtocol>>,
    pub(super) protocols: Option<Spanned<Vec<Field<RawProtocol>>>>,
    pub(super) vlan: Option<Field<u32>>,
    pub(super) tag: Option<Spanned<RawTag>>,
    pub(super) pin: Option<Field<RawPin>>,
    pub(super) pin_idle_secs: Option<Field<u32>>,
    pub(super) assign: Option<Field<RawAssign>>,
    pub(super) wlm: Option<Spanned<RawWlm>>,
    pub(super) layer: Option<Field<RawLayer>>,
    pub(super) http: Option<Spanned<RawHttp>>,
    pub(super) scale: Option<Spanned<RawScale>>,
    pub(super) probe: Option<Spanned<RawProbe>>,
    #[serde(default)]
    pub(super) origin: Vec<Spanned<RawOrigin>>,
    #[serde(default)]
    pub(super) instance: Vec<Spanned<RawInstance>>,
}

/// `[service.probe]`: every kind's keys in one table; a key of another
/// kind is reported as not applying.
#[derive(Debug, Deserialize)]
pub(super) struct RawProbe {
    pub(super) kind: Option<Field<RawProbeKind>>,
    pub(super) port: Option<Field<u16>>,
    pub(super) send: Option<Field<String>>,
    pub(super) expect: Option<Field<String>>,
    pub(super) path: Option<Field<String>>,
    pub(super) status: Option<Field<u16>>,
    pub(super) command: Option<Spanned<Vec<Field<String>>>>,
    pub(super) interval_ms: Option<Field<u32>>,
    pub(super) timeout_ms: Option<Field<u32>>,
    pub(super) rise: Option<Field<u32>>,
    pub(super) fall: Option<Field<u32>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawProbeKind {
    #[serde(rename = "udp")]
    Udp,
    #[serde(rename = "tcp")]
    Tcp,
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "exec")]
    Exec,
}

/// `[[service.origin]]`: packets from these source prefixes go to a
/// reserved subset of the service's instances.
#[derive(Debug, Deserialize)]
pub(super) struct RawOrigin {
    pub(super) name: Option<Field<String>>,
    pub(super) prefixes: Option<Spanned<Vec<Field<String>>>>,
    pub(super) instances: Option<Spanned<Vec<Field<String>>>>,
    pub(super) spill: Option<Field<bool>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawLayer {
    #[serde(rename = "l4")]
    L4,
    #[serde(rename = "http")]
    Http,
}

/// `[service.http]`: how the L7 distributor routes and proxies requests.
#[derive(Debug, Deserialize)]
pub(super) struct RawHttp {
    pub(super) key: Option<Spanned<RawRequestKey>>,
    pub(super) spill: Option<Field<bool>>,
    pub(super) pool_size: Option<Field<u32>>,
    pub(super) pool_idle_secs: Option<Field<u32>>,
    pub(super) max_header_bytes: Option<Field<u32>>,
    pub(super) max_headers: Option<Field<u32>>,
    pub(super) max_request_line: Option<Field<u32>>,
    pub(super) header_timeout_ms: Option<Field<u32>>,
    pub(super) idle_timeout_secs: Option<Field<u32>>,
    pub(super) connect_timeout_ms: Option<Field<u32>>,
    pub(super) response_timeout_ms: Option<Field<u32>>,
    pub(super) body_buffer_bytes: Option<Field<u32>>,
    pub(super) eject_after_failures: Option<Field<u32>>,
    pub(super) max_connections: Option<Field<u32>>,
    #[serde(default)]
    pub(super) priority: Vec<Spanned<RawPriority>>,
}

/// Where a request's key is: exactly one of these.
#[derive(Debug, Deserialize)]
pub(super) struct RawRequestKey {
    pub(super) header: Option<Field<String>>,
    pub(super) cookie: Option<Field<String>>,
    pub(super) path_segment: Option<Field<u32>>,
    pub(super) query: Option<Field<String>>,
}

/// `[[service.http.priority]]`: requests that match go to a reserved
/// subset of the instances.
#[derive(Debug, Deserialize)]
pub(super) struct RawPriority {
    pub(super) name: Option<Field<String>>,
    pub(super) header: Option<Field<String>>,
    pub(super) cookie: Option<Field<String>>,
    pub(super) value: Option<Field<String>>,
    pub(super) path_prefix: Option<Field<String>>,
    pub(super) instances: Option<Spanned<Vec<Field<String>>>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawTag {
    pub(super) kind: Option<Field<RawTagKind>>,
    pub(super) offset: Option<Field<u16>>,
    pub(super) length: Option<Field<u16>>,
    pub(super) cid_length: Option<Field<u16>>,
}

/// An instance's values are judged by [`super::InstanceSpec::check`], the
/// rules a registration meets: strings here, as a registration gives them.
#[derive(Debug, Deserialize)]
pub(super) struct RawInstance {
    pub(super) name: Option<Field<String>>,
    pub(super) veth: Option<Field<String>>,
    pub(super) mac: Option<Field<String>>,
    pub(super) netns: Option<Field<String>>,
    pub(super) cgroup: Option<Field<String>>,
    pub(super) cpu_limit: Option<Field<f64>>,
    pub(super) health: Option<Field<String>>,
    pub(super) addr: Option<Field<String>>,
}

/// `[service.scale]`: instance bounds, pacing, launcher, failure rule and
/// SLA windows.
#[derive(Debug, Deserialize)]
pub(super) struct RawScale {
    pub(super) min_instances: Option<Field<u32>>,
    pub(super) max_instances: Option<Field<u32>>,
    pub(super) out_intervals: Option<Field<u32>>,
    pub(super) in_intervals: Option<Field<u32>>,
    pub(super) cooldown_secs: Option<Field<f64>>,
    pub(super) drain_deadline_secs: Option<Field<f64>>,
    pub(super) launcher: Option<Spanned<RawLauncher>>,
    pub(super) failure: Option<Spanned<RawFailure>>,
    #[serde(default)]
    pub(super) window: Vec<Spanned<RawWindow>>,
}

/// Every launcher kind's keys in one table: a key of the other kind is
/// reported as not applying (as the tag's are).
#[derive(Debug, Deserialize)]
pub(super) struct RawLauncher {
    pub(super) kind: Option<Field<RawLauncherKind>>,
    pub(super) start: Option<Spanned<Vec<Field<String>>>>,
    pub(super) stop: Option<Spanned<Vec<Field<String>>>>,
    pub(super) command: Option<Spanned<Vec<Field<String>>>>,
    pub(super) subnet: Option<Field<String>>,
    pub(super) routes: Option<Spanned<Vec<Field<String>>>>,
    pub(super) start_timeout_secs: Option<Field<f64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub(super) enum RawLauncherKind {
    #[serde(rename = "command")]
    Command,
    #[serde(rename = "netns")]
    Netns,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawFailure {
    pub(super) restarts: Option<Field<u32>>,
    pub(super) window_secs: Option<Field<f64>>,
}

/// `[[service.scale.window]]`: days, times of day and overrides.
#[derive(Debug, Deserialize)]
pub(super) struct RawWindow {
    pub(super) days: Option<Spanned<Vec<Field<String>>>>,
    pub(super) from: Option<Field<String>>,
    pub(super) to: Option<Field<String>>,
    pub(super) min_instances: Option<Field<u32>>,
    pub(super) overload: Option<Field<f64>>,
}
