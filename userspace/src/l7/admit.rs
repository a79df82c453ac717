//! How many client connections each http service may hold open, so that
//! clients can never take the agent's last descriptor: each service's
//! `max_connections` (or an even share of what is left), and beside them
//! every pool's connections, every listener and a reserve for the agent's
//! own files, all within the open-file limit. A configuration that does not
//! fit is refused before anything changes.
//!
//! At its cap a service stops accepting, as `HAProxy`'s `maxconn` does, until
//! one of its connections closes: new clients wait in the listen backlog
//! (and, past it, retry their SYN) instead of being cut. Envoy's overload
//! manager accepts and closes instead; that costs the very descriptor the
//! cap protects, and turns a burst into errors rather than a delay.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use super::{
    L7Error,
    limit::{Lease, Limit},
};
use crate::config::Config;

/// Descriptors kept for the agent's own files: state file, etcd, the API
/// and metrics sockets, namespaces, BPF maps and links, the runtimes'.
pub(super) const RESERVE: u64 = 256;

/// Least connections a service's even share may come to before the
/// configuration is refused: fewer would be a cap in name only.
const MIN_SHARE: u64 = 64;

/// Most client connections of one service.
const MAX: u64 = 1_000_000;

/// One service's client connections: its cap, and what the cap did.
pub(super) struct Gate {
    service: String,
    open: Arc<Limit>,
    /// Connections that waited in the backlog for the cap.
    capped: AtomicU64,
    /// At the cap since a connection was last let in under 90 % of it
    /// (the log says so once a transition).
    full: AtomicBool,
}

impl Gate {
    pub(super) fn new(service: &str, max: u32) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_owned(),
            open: Limit::new(max),
            capped: AtomicU64::new(0),
            full: AtomicBool::new(false),
        })
    }

    pub(super) fn resize(&self, max: u32) {
        if max != self.open.size() {
            tracing::info!(service = %self.service, max_connections = max, "client connection cap");
            self.open.resize(max);
        }
    }

    /// A place for a client connection waiting to be accepted, once there
    /// is one; hold it until the connection closes.
    pub(super) async fn admit(&self) -> Lease {
        if let Some(l) = self.open.try_take() {
            // Left once under 90 %: a cap reached over and over while
            // clients come and go says so once.
            let (open, max) = (u64::from(self.open.held()), u64::from(self.open.size()));
            if open * 10 < max * 9 && self.full.swap(false, Relaxed) {
                tracing::info!(service = %self.service, open, max_connections = max, "under 90 % of max_connections again: accepting client connections at once");
            }
            return l;
        }
        self.capped.fetch_add(1, Relaxed);
        if !self.full.swap(true, Relaxed) {
            tracing::warn!(
                service = %self.service,
                max_connections = self.open.size(),
                "client connections at max_connections: new ones wait in the listen backlog until one closes"
            );
        }
        self.open.take().await
    }

    /// Client connections open, the cap, and how often it was reached.
    pub(super) fn counts(&self) -> (u32, u32, u64) {
        (
            self.open.held(),
            self.open.size(),
            self.capped.load(Relaxed),
        )
    }
}

/// Each http service's cap (by name), within `limit` descriptors; the
/// distributor runs `workers` threads, each with a listener on every
/// endpoint.
pub(super) fn caps(
    config: &Config,
    workers: usize,
    limit: u64,
) -> Result<HashMap<String, u32>, L7Error> {
    let http: Vec<(usize, &crate::config::Service, &crate::config::HttpConfig)> = config
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s, s.http.as_ref()?)))
        .collect();
    if http.is_empty() {
        return Ok(HashMap::new());
    }
    let pools: u64 = http
        .iter()
        .map(|(_, s, h)| u64::from(h.pool_size) * s.instances.len() as u64)
        .sum();
    let listeners: u64 = http
        .iter()
        .map(|(_, s, _)| (s.vips.len() * s.ports.len() * workers) as u64)
        .sum();
    let fixed = RESERVE + pools + listeners;
    let explicit: u64 = http
        .iter()
        .filter_map(|(_, _, h)| h.limits.max_connections.map(u64::from))
        .sum();
    let derived = http
        .iter()
        .filter(|(_, _, h)| h.limits.max_connections.is_none())
        .count() as u64;
    let raise = "raise the agent's open-file limit (LimitNOFILE= in its systemd unit, `ulimit -n` where it is started: the agent raises its soft limit to the hard one)";
    let too_many =
        |i: usize, field: &'static str, clients: u64, fix: String| L7Error::Descriptors {
            field: format!("service[{i}].http.{field}"),
            clients,
            pools,
            listeners,
            limit,
            fix,
        };
    if fixed + explicit > limit {
        let room = limit.saturating_sub(fixed);
        // The field to change: a cap if one is written, else the pools.
        if let Some((i, ..)) = http
            .iter()
            .find(|(_, _, h)| h.limits.max_connections.is_some())
        {
            return Err(too_many(
                *i,
                "max_connections",
                explicit,
                format!(
                    "lower max_connections (the http services' together: {room} at most), or {raise}"
                ),
            ));
        }
        let (i, ..) = http
            .iter()
            .max_by_key(|(_, s, h)| u64::from(h.pool_size) * s.instances.len() as u64)
            .expect("pools need a service");
        return Err(too_many(
            *i,
            "pool_size",
            0,
            format!("lower pool_size, or {raise}"),
        ));
    }
    let share = (limit - fixed - explicit)
        .checked_div(derived)
        .unwrap_or(MAX)
        .min(MAX);
    if derived > 0 && share < MIN_SHARE {
        let (i, ..) = http
            .iter()
            .find(|(_, _, h)| h.limits.max_connections.is_none())
            .expect("derived > 0");
        return Err(too_many(
            *i,
            "max_connections",
            explicit + share * derived,
            format!(
                "only {share} client connections a service are left (at least {MIN_SHARE} wanted): set max_connections on the http services, lower pool_size, or {raise}"
            ),
        ));
    }
    Ok(http
        .iter()
        .map(|(_, s, h)| {
            let cap = h
                .limits
                .max_connections
                .unwrap_or(u32::try_from(share).expect("at most MAX"));
            (s.name.clone(), cap)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, path::Path};

    use super::*;

    /// `n` http services of 2 instances each, `pool_size` 10; `caps[k]` the
    /// k-th's `max_connections`, if any.
    fn config(caps: &[Option<u32>]) -> Config {
        let mut text = String::new();
        for (k, cap) in caps.iter().enumerate() {
            let _ = write!(
                text,
                "[[service]]\nname = \"s{k}\"\nvip = \"198.18.1.{}\"\nport = 80\nprotocol = \"tcp\"\nlayer = \"http\"\n\n[service.http]\npool_size = 10\n",
                k + 1
            );
            if let Some(c) = cap {
                let _ = writeln!(text, "max_connections = {c}");
            }
            for i in 0..2 {
                let _ = write!(
                    text,
                    "\n[[service.instance]]\nname = \"s{k}-{i}\"\nveth = \"v{k}{i}\"\naddr = \"198.18.{}.2:8080\"\n",
                    16 + 2 * k + i
                );
            }
            text.push('\n');
        }
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn services_without_a_cap_share_what_the_others_leave() {
        // 2 workers, 1 endpoint: 2 listeners a service, 20 pooled
        // connections a service.
        let fixed = RESERVE + 3 * (20 + 2);
        let c = caps(&config(&[Some(1000), None, None]), 2, fixed + 1000 + 2001).unwrap();
        assert_eq!(c["s0"], 1000);
        assert_eq!(c["s1"], 1000, "2001 / 2");
        assert_eq!(c["s2"], 1000);
        let all = caps(&config(&[None]), 2, 1 << 40).unwrap();
        assert_eq!(u64::from(all["s0"]), MAX);
        // No http service: nothing to fit, whatever the limit.
        let l4 = "[[service]]\nname = \"dns\"\nvip = \"198.18.1.9\"\nport = 53\nprotocol = \"udp\"\n\n[[service.instance]]\nname = \"d0\"\nveth = \"vd0\"\n";
        let l4 = Config::parse(l4, Path::new("t.toml")).unwrap();
        assert!(caps(&l4, 2, 10).unwrap().is_empty());
    }

    #[test]
    fn caps_beyond_the_limit_are_refused_naming_the_field() {
        let fixed = RESERVE + 22;
        let e = caps(&config(&[Some(1000)]), 2, fixed + 999).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("service[0].http.max_connections") && text.contains("999 at most"),
            "{text}"
        );
        assert!(caps(&config(&[Some(1000)]), 2, fixed + 1000).is_ok());
        // Pools alone too many: pool_size is what to change.
        let e = caps(&config(&[None]), 2, RESERVE + 10).unwrap_err();
        assert!(e.to_string().contains("service[0].http.pool_size"), "{e}");
        // The even share too small to be a cap.
        let e = caps(&config(&[None, None]), 2, RESERVE + 44 + 100).unwrap_err();
        assert!(
            e.to_string().contains("service[0].http.max_connections")
                && e.to_string().contains("only 50"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_full_gate_waits_for_a_close_and_counts_it() {
        let g = Gate::new("web", 2);
        let a = g.admit().await;
        let _b = g.admit().await;
        assert_eq!(g.counts(), (2, 2, 0));
        let waiting = g.admit();
        tokio::pin!(waiting);
        assert!(
            futures_poll_once(waiting.as_mut()).await.is_none(),
            "a third waits"
        );
        drop(a);
        let _c = waiting.await;
        assert_eq!(g.counts(), (2, 2, 1));
        g.resize(3);
        let _d = g.admit().await;
        assert_eq!(g.counts(), (3, 3, 1));
    }

    /// Polls `f` once.
    async fn futures_poll_once<F: Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
