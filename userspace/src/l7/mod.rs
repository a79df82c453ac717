//! The L7 distributor: `layer = "http"` services' connections end here,
//! and each HTTP/1.1 request goes to an instance on its own.
//!
//! The XDP program has no service-table entry for these services, so their
//! packets pass to the host's TCP stack (a userspace TCP stack behind
//! AF_XDP would be a second TCP to trust, for no gain: the request must be
//! parsed in userspace anyway). The distributor listens on each VIP and
//! port; where a VIP is not a local address, it adds a `local` route for
//! it (and removes it when it stops).
//!
//! A request's key (a header, cookie, path segment or query parameter;
//! else the client connection's flow hash) is hashed as the data path
//! hashes tags, its unit's owner read from the same owner array the XDP
//! program reads, so a group moved by a WLM element moves its requests
//! too, on connections already open. Priority requests go to the
//! least-loaded instance of their rule's subset. All of that (and where a
//! request goes when its owner cannot take it) is decided in [`route`]; this
//! module gives it the instances' state. Requests are forwarded over
//! [`pool`]ed kept-alive connections; what the distributor measures of each
//! instance ([`stats`]) is what its WLM element hears.
//!
//! May import `config`, `sys` and `telemetry`.

mod admit;
mod chunked;
mod forwarded;
mod hop;
mod limit;
mod pool;
mod proxy;
mod pump;
mod relay;
pub mod route;
pub mod stats;
mod upload;
mod upstream;
mod workers;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hyper::{HeaderMap, Uri};
use sluice_common::{HIT_BUCKETS_PER_SERVICE, hit_index};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    config::{Config, HttpConfig, Service},
    sys::route::LocalRoute,
};

/// The owner of a unit, as the data path has it (instance id, or
/// `NO_OWNER`).
pub trait Owners: Send + Sync {
    fn owner(&self, service_id: u32, unit: u32) -> u32;
}

/// Why the distributor refused or failed a request, as
/// `sluice_http_refused_total{reason}` counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed request (400, from the parser).
    BadRequest,
    /// Head over `max_header_bytes` or `max_headers` (431).
    HeaderTooLarge,
    /// Request target over `max_request_line` (414).
    UriTooLong,
    /// The head did not arrive within `header_timeout_ms` (closed).
    HeaderTimeout,
    /// No bytes either way for `idle_timeout_secs` (closed).
    Idle,
    /// No instance could take it (503).
    NoInstance,
    /// The instance failed, and the request could not be retried (502).
    InstanceFailed,
    /// No response head within `response_timeout_ms` (504).
    InstanceTimeout,
}

impl Refusal {
    pub const ALL: [Self; 8] = [
        Self::BadRequest,
        Self::HeaderTooLarge,
        Self::UriTooLong,
        Self::HeaderTimeout,
        Self::Idle,
        Self::NoInstance,
        Self::InstanceFailed,
        Self::InstanceTimeout,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::HeaderTooLarge => "header_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::HeaderTimeout => "header_timeout",
            Self::Idle => "idle",
            Self::NoInstance => "no_instance",
            Self::InstanceFailed => "instance_failed",
            Self::InstanceTimeout => "instance_timeout",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error(
        "service `{service}`: cannot listen on {addr} for its HTTP requests; is another server listening there? (`ss -ltnp 'sport = :{}'`)",
        addr.port()
    )]
    Listen {
        service: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{field}`: {clients} client connections, {pools} connections to instances, {listeners} listeners and {} descriptors kept for the agent's own files exceed the open-file limit of {limit}; fix: {fix}",
        admit::RESERVE
    )]
    Descriptors {
        /// The field to change, e.g. `service[0].http.max_connections`.
        field: String,
        clients: u64,
        pools: u64,
        listeners: u64,
        limit: u64,
        fix: String,
    },
    #[error("starting the L7 distributor's threads")]
    Runtime(#[source] std::io::Error),
    #[error(
        "service `{service}`: making {vip} a local address (`ip route add local {vip} dev lo`)"
    )]
    Route {
        service: String,
        vip: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

/// An instance as the distributor sees it.
pub struct Backend {
    pub name: String,
    pub id: u32,
    /// In a priority subset: only its rules' requests (or spill-over).
    pub reserved: bool,
    /// Its connections, `pool_size` at most over all worker threads.
    pool: pool::Pool,
    pub stats: stats::InstanceStats,
    /// Failed, as the control loop says (veth gone, reports stopped).
    failed: AtomicBool,
    /// Until when (ms on the distributor's clock) it is skipped after
    /// `eject_after_failures` failures in a row: requests go straight
    /// elsewhere meanwhile.
    down_until: AtomicU64,
    /// Its own failures since its last answer.
    failures: AtomicU32,
}

impl Backend {
    /// Its pool (the calling worker's idle connections in it).
    fn pool(&self) -> &pool::Pool {
        &self.pool
    }

    /// Open connections and idle ones, over every worker; and how many
    /// were ever opened.
    fn connections(&self) -> (u32, u32, u64) {
        let (open, idle) = self.pool.connections();
        (open, idle, self.pool.opened.load(Relaxed))
    }
}

/// Milliseconds on the coarse monotonic clock (a tick's resolution, read
/// without a system call or a TSC read): for the distributor's timeouts and
/// ejections, which count in tens of milliseconds and more, read several
/// times a request.
fn coarse_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000
}

/// How long an ejected instance is skipped.
const EJECT: Duration = Duration::from_secs(1);

/// One http service, as one configuration of it is applied.
pub struct ServiceL7 {
    pub id: u32,
    pub name: String,
    pub cfg: HttpConfig,
    pub backends: Vec<Arc<Backend>>,
    by_id: HashMap<u32, usize>,
    router: route::Router,
    counts: Arc<ServiceCounts>,
    owners: Arc<dyn Owners>,
}

/// What a service's requests add up to; kept across reloads.
pub struct ServiceCounts {
    /// Requests per unit hit bucket (as the data path's `UNIT_HITS`).
    pub hits: Vec<AtomicU64>,
    pub refused: [AtomicU64; Refusal::ALL.len()],
    pub retries: AtomicU64,
    /// Requests by how they were routed, in [`route::Routed::ALL`] order.
    pub routed: [AtomicU64; route::Routed::ALL.len()],
}

impl Default for ServiceCounts {
    fn default() -> Self {
        Self {
            hits: (0..HIT_BUCKETS_PER_SERVICE)
                .map(|_| AtomicU64::new(0))
                .collect(),
            refused: Default::default(),
            retries: AtomicU64::new(0),
            routed: Default::default(),
        }
    }
}

impl ServiceCounts {
    pub fn refuse(&self, r: Refusal) {
        let i = Refusal::ALL.iter().position(|x| *x == r).expect("listed");
        self.refused[i].fetch_add(1, Relaxed);
    }

    fn route(&self, how: route::Routed) {
        self.routed[how.index()].fetch_add(1, Relaxed);
    }
}

impl ServiceL7 {
    /// Instance `i` failed on its own (refused, reset, timed out): past
    /// `eject_after_failures` in a row, skip it for a while (Envoy's
    /// consecutive gateway failures). One request never ejects it.
    fn failed(&self, i: usize) {
        let b = &self.backends[i];
        let n = b.failures.fetch_add(1, Relaxed) + 1;
        if n >= self.cfg.eject_after_failures {
            b.failures.store(0, Relaxed);
            let until = coarse_ms() + u64::try_from(EJECT.as_millis()).expect("small");
            b.down_until.store(until, Relaxed);
            tracing::info!(service = %self.name, instance = %b.name, failures = n, "instance ejected for {EJECT:?}");
        }
    }

    /// Instance `i` answered: its failures in a row start again.
    fn answered(&self, i: usize) {
        let f = &self.backends[i].failures;
        // Read first: a store on every request would bounce the line
        // between workers.
        if f.load(Relaxed) != 0 {
            f.store(0, Relaxed);
        }
    }

    /// Where a request goes, in the order to try (see [`route`]); counted
    /// as routed, and in its unit's hits.
    fn route(&self, uri: &Uri, headers: &HeaderMap, flow: u32) -> route::Candidates<'_, Self> {
        let r = self.router.route(&self.cfg, self, uri, headers, flow);
        self.counts.route(r.how);
        if let Some(unit) = r.unit {
            // The service's own row of buckets: index as service 0's.
            self.counts.hits[hit_index(0, unit) as usize].fetch_add(1, Relaxed);
        }
        if r.fell_back {
            self.counts.route(route::Routed::Fallback);
        }
        r.candidates
    }
}

impl route::Instances for ServiceL7 {
    fn owner(&self, unit: u32) -> Option<usize> {
        self.by_id.get(&self.owners.owner(self.id, unit)).copied()
    }

    fn available(&self, i: usize) -> bool {
        let b = &self.backends[i];
        !b.failed.load(Relaxed) && b.down_until.load(Relaxed) <= coarse_ms()
    }

    fn load(&self, i: usize) -> route::Load {
        self.backends[i].stats.load()
    }
}

/// The service a listener serves, swapped whole on reload.
pub(crate) struct Slot(RwLock<Arc<ServiceL7>>);

impl Slot {
    fn current(&self) -> Arc<ServiceL7> {
        self.0.read().expect("slot lock").clone()
    }
}

struct Listening {
    addrs: Vec<SocketAddr>,
    slot: Arc<Slot>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A service's endpoints and each one's listeners, one a worker.
type Bound = Vec<(SocketAddr, Vec<TcpListener>)>;

/// Listeners bound for a configuration, not serving yet: see
/// [`Distributor::stage`].
pub struct Staged {
    /// Each new service's endpoints, one listener a worker on each.
    new: Vec<(String, Bound)>,
    /// Local routes added for VIPs new to the distributor.
    routes: Vec<(IpAddr, LocalRoute)>,
    /// Each service's cap on client connections.
    caps: HashMap<String, u32>,
}

/// Ids the plan gave services and instances.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    pub services: HashMap<String, u32>,
    pub instances: HashMap<String, u32>,
}

/// Every http service's listeners and state.
pub struct Distributor {
    /// The distributor's own threads (one a CPU), made with the first http
    /// service: requests never wait behind the control loop, and the
    /// control loop never behind requests.
    workers: Option<workers::Workers>,
    owners: Arc<dyn Owners>,
    services: HashMap<String, Listening>,
    counts: HashMap<String, Arc<ServiceCounts>>,
    /// Each service's client connections; kept across reloads.
    gates: HashMap<String, Arc<admit::Gate>>,
    /// Local routes the distributor added, by VIP (removed on drop).
    routes: HashMap<IpAddr, LocalRoute>,
}

fn endpoints(s: &Service) -> Vec<SocketAddr> {
    s.vips
        .iter()
        .flat_map(|v| s.ports.iter().map(|p| SocketAddr::new(*v, *p)))
        .collect()
}

/// A listening socket on `addr`, with `SO_REUSEADDR` (a restarted agent
/// binds while old connections linger), `SO_REUSEPORT` (one a worker) and
/// freebind (a VIP whose local route is not there yet).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    // One socket a worker on the same endpoint.
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

impl Distributor {
    #[must_use]
    pub fn new(owners: Arc<dyn Owners>) -> Self {
        Self {
            workers: None,
            owners,
            services: HashMap::new(),
            counts: HashMap::new(),
            gates: HashMap::new(),
            routes: HashMap::new(),
        }
    }

    /// Binds what `config` needs and is not bound yet, changing nothing
    /// that serves: a failure leaves the running services as they are.
    pub fn stage(&mut self, config: &Config) -> Result<Staged, L7Error> {
        let mut new = Vec::new();
        if self.workers.is_none() && config.services.iter().any(|s| s.http.is_some()) {
            self.workers = Some(workers::Workers::start().map_err(L7Error::Runtime)?);
        }
        // Before anything is bound: a configuration whose connections
        // cannot all have a descriptor is refused whole.
        let caps = admit::caps(
            config,
            self.workers.as_ref().map_or(1, workers::Workers::len),
            crate::sys::rlimit::nofile(),
        )?;
        let mut routes: Vec<(IpAddr, LocalRoute)> = Vec::new();
        for s in config.services.iter().filter(|s| s.http.is_some()) {
            for vip in &s.vips {
                if self.routes.contains_key(vip) || routes.iter().any(|(v, _)| v == vip) {
                    continue;
                }
                let added = LocalRoute::ensure(*vip).map_err(|source| L7Error::Route {
                    service: s.name.clone(),
                    vip: *vip,
                    source,
                })?;
                routes.extend(added.map(|r| (*vip, r)));
            }
            let addrs = endpoints(s);
            if self.services.get(&s.name).is_some_and(|l| l.addrs == addrs) {
                continue;
            }
            let workers = self.workers.as_ref().expect("started above");
            let mut bound = Vec::new();
            for addr in addrs {
                let listeners = (0..workers.len())
                    .map(|k| {
                        let _context = workers.handle(k).enter();
                        listen(addr)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| L7Error::Listen {
                        service: s.name.clone(),
                        addr,
                        source,
                    })?;
                bound.push((addr, listeners));
            }
            new.push((s.name.clone(), bound));
        }
        Ok(Staged { new, routes, caps })
    }

    /// Serves `config`'s http services with what [`Self::stage`] bound:
    /// services still configured keep their listeners, pools and counts
    /// and take the new settings at their next request; the others stop
    /// listening (their open connections finish as they are).
    pub fn commit(&mut self, staged: Staged, config: &Config, ids: &Ids, owners: Arc<dyn Owners>) {
        self.owners = owners;
        let mut built: HashMap<String, Arc<ServiceL7>> = config
            .services
            .iter()
            .filter(|s| s.http.is_some())
            .filter_map(|s| Some((s.name.clone(), Arc::new(self.build(s, ids)?))))
            .collect();
        self.services.retain(|name, _| built.contains_key(name));
        self.gates.retain(|name, _| built.contains_key(name));
        for (name, cap) in &staged.caps {
            self.gates
                .entry(name.clone())
                .or_insert_with(|| admit::Gate::new(name, *cap))
                .resize(*cap);
        }
        for (name, l) in &self.services {
            if let Some(svc) = built.get(name) {
                *l.slot.0.write().expect("slot lock") = svc.clone();
            }
        }
        for (name, bound) in staged.new {
            let Some(svc) = built.remove(&name) else {
                continue;
            };
            let slot = Arc::new(Slot(RwLock::new(svc)));
            let gate = self.gates.get(&name).expect("made above").clone();
            let addrs = bound.iter().map(|(a, _)| *a).collect();
            let workers = self.workers.as_ref().expect("made by stage");
            let tasks = bound
                .into_iter()
                .flat_map(|(addr, listeners)| {
                    tracing::info!(service = %name, %addr, workers = listeners.len(), "listening for HTTP requests");
                    listeners.into_iter().enumerate().map(|(k, l)| {
                        workers.handle(k).spawn(proxy::accept(l, slot.clone(), gate.clone()))
                    })
                })
                .collect();
            // Replaces (and so stops) the old listeners if the endpoints
            // changed.
            self.services.insert(name, Listening { addrs, slot, tasks });
        }
        self.counts
            .retain(|name, _| self.services.contains_key(name));
        self.routes.extend(staged.routes);
        let vips: std::collections::HashSet<IpAddr> = config
            .services
            .iter()
            .filter(|s| s.http.is_some())
            .flat_map(|s| s.vips.iter().copied())
            .collect();
        self.routes.retain(|vip, _| vips.contains(vip));
    }

    /// `s` as configured now; instances keep their pools and measurements
    /// while their address stays.
    fn build(&mut self, s: &Service, ids: &Ids) -> Option<ServiceL7> {
        let cfg = s.http.clone()?;
        let workers = self.workers.as_ref().map_or(1, workers::Workers::len);
        let id = *ids.services.get(&s.name)?;
        let old: HashMap<String, Arc<Backend>> = self
            .services
            .get(&s.name)
            .map(|l| {
                l.slot
                    .current()
                    .backends
                    .iter()
                    .map(|b| (b.name.clone(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let backends: Vec<Arc<Backend>> = s
            .instances
            .iter()
            .filter_map(|i| {
                let addr = i.addr?;
                let inst_id = *ids.instances.get(&i.name)?;
                let reserved = cfg.is_reserved(&i.name);
                match old.get(&i.name) {
                    Some(b)
                        if b.pool.addr() == addr && b.id == inst_id && b.reserved == reserved =>
                    {
                        // Kept with its connections, under the new settings.
                        b.pool
                            .configure(cfg.pool_size, cfg.pool_idle, cfg.connect_timeout);
                        Some(b.clone())
                    }
                    _ => Some(Arc::new(Backend {
                        name: i.name.clone(),
                        id: inst_id,
                        reserved,
                        pool: pool::Pool::new(
                            addr,
                            cfg.pool_size,
                            cfg.pool_idle,
                            cfg.connect_timeout,
                            workers,
                        ),
                        stats: stats::InstanceStats::default(),
                        failed: AtomicBool::new(false),
                        down_until: AtomicU64::new(0),
                        failures: AtomicU32::new(0),
                    })),
                }
            })
            .collect();
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let router = route::Router::new(&cfg.priority, &names);
        let counts = self.counts.entry(s.name.clone()).or_default().clone();
        Some(ServiceL7 {
            id,
            name: s.name.clone(),
            by_id: backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.id, i))
                .collect(),
            backends,
            router,
            counts,
            owners: self.owners.clone(),
            cfg,
        })
    }

    fn each_backend(&self) -> impl Iterator<Item = Arc<Backend>> + '_ {
        self.services
            .values()
            .flat_map(|l| l.slot.current().backends.clone())
    }

    /// Marks each instance failed or not, as `failed` (the control loop)
    /// says.
    pub fn mark_failed(&self, failed: impl Fn(&str) -> bool) {
        for b in self.each_backend() {
            b.failed.store(failed(&b.name), Relaxed);
        }
    }

    /// Every instance's measurements since the last call, by instance name.
    #[must_use]
    pub fn intervals(&self) -> Vec<(String, stats::Interval)> {
        self.each_backend()
            .map(|b| (b.name.clone(), b.stats.interval()))
            .collect()
    }

    /// Requests of service `service_id` per hit bucket, ever (as the data
    /// path's `UNIT_HITS`), if it is an http service.
    #[must_use]
    pub fn unit_hits(&self, service_id: u32) -> Option<Vec<u64>> {
        self.services
            .values()
            .map(|l| l.slot.current())
            .find(|s| s.id == service_id)
            .map(|s| s.counts.hits.iter().map(|h| h.load(Relaxed)).collect())
    }

    /// Requests and bytes relayed, ever, by instance id.
    #[must_use]
    pub fn instance_counts(&self) -> HashMap<u32, (u64, u64)> {
        self.each_backend()
            .map(|b| (b.id, (b.stats.requests(), b.stats.bytes.load(Relaxed))))
            .collect()
    }

    /// Closes idle connections past their time.
    pub fn sweep(&self) {
        for b in self.each_backend() {
            b.pool.sweep();
        }
    }

    /// Publishes the `sluice_http_*` metrics.
    pub fn publish(&self) {
        for l in self.services.values() {
            let svc = l.slot.current();
            let c = &svc.counts;
            for (r, n) in Refusal::ALL.iter().zip(&c.refused) {
                crate::telemetry::http_refused(&svc.name, r.name(), n.load(Relaxed));
            }
            for (how, n) in route::Routed::ALL.iter().zip(&c.routed) {
                crate::telemetry::http_routed(&svc.name, how.label(), n.load(Relaxed));
            }
            crate::telemetry::http_retries(&svc.name, c.retries.load(Relaxed));
            if let Some(g) = self.gates.get(&svc.name) {
                let (open, max, capped) = g.counts();
                crate::telemetry::http_connections(&svc.name, open, max, capped);
            }
            for b in &svc.backends {
                let s = &b.stats;
                let classes: Vec<(&str, u64)> = stats::CLASSES
                    .iter()
                    .zip(&s.by_class)
                    .map(|(k, n)| (*k, n.load(Relaxed)))
                    .collect();
                let (open, idle, opened) = b.connections();
                let (buckets, sum) = s.latency.snapshot();
                crate::telemetry::http_instance(
                    &svc.name,
                    &b.name,
                    &crate::telemetry::HttpInstance {
                        by_class: &classes,
                        in_flight: s.in_flight.load(Relaxed),
                        pool_open: open,
                        pool_idle: idle,
                        pool_opened: opened,
                        latency_bounds: &stats::BUCKETS,
                        latency_buckets: &buckets,
                        latency_sum: sum,
                    },
                );
            }
        }
    }
}

impl Drop for Distributor {
    fn drop(&mut self) {
        // Listeners first; then the workers end, their connections with
        // them (without waiting: an agent may stop from inside a runtime).
        self.services.clear();
        self.workers = None;
    }
}

#[cfg(test)]
mod tests;
