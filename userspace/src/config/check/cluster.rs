//! `[cluster]`: the coordination store and this host's place in a cluster.

use std::{net::IpAddr, time::Duration};

use toml::Spanned;

use super::{Checker, Got};
use crate::config::{
    ClusterConfig, StoreKind,
    raw::{Field, RawCluster, RawStore},
};

impl Checker<'_> {
    pub(super) fn cluster(&mut self, raw: Option<Spanned<RawCluster>>) -> Option<ClusterConfig> {
        let d = ClusterConfig::default();
        let Some(raw) = raw else {
            return Some(d);
        };
        let table = raw.span();
        let raw = raw.into_inner();
        let store = match self.typed(raw.store, "cluster.store", |v| {
            (
                format!("`{v}` is not a store"),
                "write store = \"embedded\" (one host) or \"etcd\" (a cluster)".into(),
            )
        }) {
            Got::Absent | Got::Value(RawStore::Embedded, _) => Some(StoreKind::Embedded),
            Got::Value(RawStore::Etcd, _) => Some(StoreKind::Etcd),
            Got::Bad => None,
        };
        let etcd = store == Some(StoreKind::Etcd);
        let host = self.plain(raw.host, "cluster.host", "host");
        let name = self.plain(raw.name, "cluster.name", "cluster");
        let underlay = self.underlay(raw.underlay);
        let endpoints = self.endpoints(raw.etcd_endpoints);
        let lease_secs = self.int(raw.lease_ttl_secs, "cluster.lease_ttl_secs", 5, 1, 600);
        let timeout_ms = self.int(
            raw.etcd_timeout_ms,
            "cluster.etcd_timeout_ms",
            1000,
            100,
            60_000,
        );
        let encap_port = self.int(
            raw.encap_port,
            "cluster.encap_port",
            u32::from(d.encap_port),
            1,
            65_535,
        );
        let fence_port = self.int(
            raw.fence_port,
            "cluster.fence_port",
            u32::from(d.fence_port),
            1,
            65_535,
        );
        let no_endpoints = matches!(&endpoints, Some(e) if e.is_empty());
        if etcd {
            for (missing, field, fix) in [
                (
                    matches!(host, Got::Absent),
                    "cluster.host",
                    "name this host: host = \"host-a\" (unique in the cluster)",
                ),
                (
                    matches!(underlay, Got::Absent),
                    "cluster.underlay",
                    "give the address other hosts reach this one on: underlay = \"198.18.1.1\"",
                ),
                (
                    no_endpoints,
                    "cluster.etcd_endpoints",
                    "list the etcd members: etcd_endpoints = [\"http://198.18.0.1:2379\"]",
                ),
            ] {
                if missing {
                    self.report(Some(&table), field, "missing (store = \"etcd\")", fix);
                }
            }
        } else if store.is_some() && endpoints.as_ref().is_some_and(|e| !e.is_empty()) {
            self.report(
                Some(&table),
                "cluster.etcd_endpoints",
                "set, but the store is the embedded one",
                "set store = \"etcd\" to use them, or remove etcd_endpoints",
            );
        }
        let (host, name, underlay) = (known(host)?, known(name)?, known(underlay)?);
        if etcd && (host.is_none() || underlay.is_none() || no_endpoints) {
            return None;
        }
        Some(ClusterConfig {
            store: store?,
            host: host.unwrap_or_default(),
            underlay,
            etcd_endpoints: endpoints?,
            name: name.unwrap_or(d.name),
            lease_ttl: Duration::from_secs(lease_secs?.into()),
            etcd_timeout: Duration::from_millis(timeout_ms?.into()),
            encap_port: u16::try_from(encap_port?).expect("checked to fit"),
            fence_port: u16::try_from(fence_port?).expect("checked to fit"),
        })
    }

    /// An optional plain name (a key in etcd and a metric label).
    fn plain(&mut self, f: Option<Field<String>>, field: &str, what: &str) -> Got<String> {
        let Some(span) = f.as_ref().map(|f| f.span.clone()) else {
            return Got::Absent;
        };
        match self.name(f, &span, field, what) {
            Some((n, span)) => Got::Value(n, span),
            None => Got::Bad,
        }
    }

    fn underlay(&mut self, f: Option<Field<IpAddr>>) -> Got<IpAddr> {
        let fix = "give a unicast address of this host that the other hosts route to";
        match self.typed(f, "cluster.underlay", |v| {
            (format!("`{v}` is not an IP address"), fix.into())
        }) {
            Got::Value(a, span) if a.is_unspecified() || a.is_multicast() || a.is_loopback() => {
                self.report(
                    Some(&span),
                    "cluster.underlay",
                    format!("{a} is not a unicast address other hosts can reach"),
                    fix,
                );
                Got::Bad
            }
            other => other,
        }
    }

    /// `http://host:port` each; TLS is not built in.
    fn endpoints(&mut self, raw: Option<Spanned<Vec<Field<String>>>>) -> Option<Vec<String>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let mut out = Some(Vec::new());
        for (i, f) in raw.into_inner().into_iter().enumerate() {
            let field = format!("cluster.etcd_endpoints[{i}]");
            let fix = "write it as http://address:port, e.g. http://198.18.0.1:2379";
            let got = self.typed(Some(f), &field, |v| {
                (format!("`{v}` is not a URL"), fix.into())
            });
            let ok = match got {
                Got::Value(url, span) => {
                    let problem = if url.starts_with("https://") {
                        Some("TLS to etcd is not built in".to_owned())
                    } else if let Some(rest) = url.strip_prefix("http://") {
                        let port = rest.trim_end_matches('/').rsplit_once(':');
                        match port {
                            Some((h, p))
                                if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) =>
                            {
                                None
                            }
                            _ => Some(format!("`{url}` has no host and port")),
                        }
                    } else {
                        Some(format!("`{url}` is not an http:// URL"))
                    };
                    match problem {
                        Some(p) => {
                            self.report(Some(&span), &field, p, fix);
                            None
                        }
                        None => Some(url),
                    }
                }
                Got::Bad | Got::Absent => None,
            };
            match (ok, &mut out) {
                (Some(url), Some(v)) => v.push(url),
                (None, _) => out = None,
                (Some(_), None) => {}
            }
        }
        out
    }
}

/// An optional value: absent, or given and good; `None` when given and bad
/// (already reported).
#[expect(
    clippy::option_option,
    reason = "absent and bad are different here: absent takes the default"
)]
fn known<T>(g: Got<T>) -> Option<Option<T>> {
    match g {
        Got::Absent => Some(None),
        Got::Value(v, _) => Some(Some(v)),
        Got::Bad => None,
    }
}
