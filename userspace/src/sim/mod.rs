//! The deterministic simulation of the control plane (issue 27): N hosts'
//! real control code — `agent::cluster::Cluster` (join, registry, the
//! cluster tables each interval), `Controller` (settle, commit, tick,
//! follow, claims), the WLM and health logic, `coord::ops` — against a
//! store with etcd's semantics ([`SimCluster`]) and an in-memory data path
//! per host, driven by one seeded scheduler and clock. A seed decides the
//! whole run: the faults, the order in which hosts act, the load. Every
//! future is polled once with a no-op waker: nothing here waits.
//!
//! Invariants, checked after every step ([`Invariant`]); `K`, `P` and `W`
//! are [`K_INTERVALS`], [`P_INTERVALS`] and [`w_window`]:
//!
//! - I1: every service's groups partition the units in the store, and each
//!   owner is unowned or a registered instance;
//! - I2: no unit stays with a failed, drained or removed instance (or one
//!   of a host whose lease is gone) longer than K intervals once its host
//!   can act (agent running, not paused, not cut off); a drained one gives
//!   a group away at least every 2K intervals (drains share the move limit);
//! - I3: every host that can act measures at least every P intervals;
//! - I4: once every fault has healed, every running host's data path says
//!   what the store says within K intervals (and stays so);
//! - I5: no sampled unit is delivered to two different instances, by way
//!   of two hosts, for longer than W;
//! - I6: no panic.
//!
//! A failing run names its invariant, prints its replay line
//! ([`Options::replay_line`]) and the trace's tail.

mod host;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_common::maps::NO_OWNER;

use self::host::{Agent, NOBODY, Veths, owner_in};
use crate::{
    config::Config,
    control::Clock,
    coord::{
        check_partition,
        sim_store::{Rejoin, SimCluster},
    },
    datapath::fake::MemDatapath,
};

/// How many intervals a unit may stay with a failed, drained or removed
/// instance (I2), and a healed cluster's tables may differ from the store
/// (I4): one interval to notice, one to move, one for the interleaving.
pub const K_INTERVALS: u32 = 3;
/// Most intervals a host that can act may go without measuring (I3).
pub const P_INTERVALS: u32 = 3;
/// The simulated cluster's control interval.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The simulated hosts' lease time.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// The scheduler's time step.
const QUANTUM: Duration = Duration::from_millis(100);
/// Units sampled for traffic and for I5 (every 2048th, offset 5).
const SAMPLES: u32 = 32;
/// Each instance's capacity (`wlm.capacity_pps`).
const CAPACITY: f64 = 1000.0;

/// The window W of I5: 9/10 of a host's lease time plus one interval. A
/// host whose table is old delivers by it for at most that long: a host
/// that cannot renew (cut off, paused, crashed) fences itself 9/10 of a
/// lease after its last renewal, and a running host writes every group
/// again from the store each interval, whatever its watch says.
#[must_use]
pub fn w_window() -> Duration {
    crate::control::fence::Fence::reach(LEASE_TTL) + INTERVAL
}

/// Polls `f` once: the simulated store and data path never wait.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a simulated future waited"),
    }
}

/// The seeded generator (SplitMix64): the same seed, the same run, on
/// every platform and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `0..n` (`n > 0`), as an index.
    fn pick(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).expect("below n")
    }

    /// Uniform in `0..max`.
    fn millis(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.below(u64::try_from(max.as_millis()).expect("short").max(1)))
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// A kind of fault the seed may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// An agent killed and restarted (a new `Controller` from the store).
    Crash,
    /// A host cut off from the store.
    Partition,
    /// An agent not scheduled for longer than its lease (SIGSTOP).
    Pause,
    /// A host's lease ends under a running agent.
    Lease,
    /// A host's watch drops its events (it reads a lag), or lags.
    Watch,
    /// Reloads on several hosts at once, each adding or dropping an
    /// instance.
    Reload,
    /// An instance fails (its veth goes) and recovers.
    Instance,
    /// An instance drained, then undrained.
    Drain,
    /// A load step: a quarter of the units four times as busy.
    Load,
}

impl FaultKind {
    pub const ALL: [Self; 9] = [
        Self::Crash,
        Self::Partition,
        Self::Pause,
        Self::Lease,
        Self::Watch,
        Self::Reload,
        Self::Instance,
        Self::Drain,
        Self::Load,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::Partition => "partition",
            Self::Pause => "pause",
            Self::Lease => "lease",
            Self::Watch => "watch",
            Self::Reload => "reload",
            Self::Instance => "instance",
            Self::Drain => "drain",
            Self::Load => "load",
        }
    }

    /// Parses a comma-separated list (`all` for every kind).
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        if text == "all" {
            return Ok(Self::ALL.to_vec());
        }
        let mut out = Vec::new();
        for w in text.split(',').filter(|w| !w.is_empty()) {
            let k = Self::ALL
                .into_iter()
                .find(|k| k.name() == w)
                .ok_or_else(|| {
                    format!(
                        "unknown fault `{w}`; known: {}",
                        Self::ALL.map(Self::name).join(",")
                    )
                })?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The invariants (see the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    I1Partition,
    I2BadOwner,
    I3Progress,
    I4Converged,
    I5SplitDelivery,
    I6Panic,
}

impl Invariant {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::I1Partition => "I1 one registered owner",
            Self::I2BadOwner => "I2 no unit with a failed/drained/removed instance",
            Self::I3Progress => "I3 every control loop measures",
            Self::I4Converged => "I4 tables equal the store after healing",
            Self::I5SplitDelivery => "I5 no split delivery beyond W",
            Self::I6Panic => "I6 no panic",
        }
    }
}

/// One run's settings; the seed decides everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub seed: u64,
    pub hosts: usize,
    /// The fault kinds the seed chooses from.
    pub faults: Vec<FaultKind>,
    /// The run's length in intervals (faults heal at 60% of it).
    pub intervals: u32,
    /// What renewing an expired lease does.
    pub rejoin: Rejoin,
}

impl Options {
    /// The command that replays this run exactly.
    #[must_use]
    pub fn replay_line(&self) -> String {
        let mut line = format!(
            "cargo xtask sim --seed {} --hosts {} --intervals {} --faults {}",
            self.seed,
            self.hosts,
            self.intervals,
            self.faults
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(",")
        );
        if self.rejoin == Rejoin::Never {
            line.push_str(" --old-keeper");
        }
        line
    }
}

/// A broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: Invariant,
    pub at: Duration,
    pub detail: String,
}

/// What a run came to.
#[derive(Debug)]
pub struct Outcome {
    /// A hash of the whole trace: the same seed gives the same hash.
    pub trace_hash: u64,
    pub violation: Option<Violation>,
    /// The trace's last lines.
    pub tail: Vec<String>,
    /// Steps (host actions) taken.
    pub steps: u64,
}

/// One fault of the run's schedule.
#[derive(Clone, Debug)]
struct Fault {
    kind: FaultKind,
    host: usize,
    /// Hosts of a reload, beside `host`.
    also: Vec<usize>,
    start: Duration,
    end: Duration,
}

#[expect(
    clippy::struct_excessive_bools,
    reason = "independent fault states of one host"
)]
struct Host {
    name: String,
    underlay_last: u8,
    /// Configured instances.
    instances: Vec<String>,
    /// Extra instances made so far (for names).
    extras: u32,
    dp: MemDatapath,
    veths: Veths,
    agent: Option<Agent>,
    paused: bool,
    cut: bool,
    watch_held: bool,
    punted: BTreeSet<u32>,
    reload_due: bool,
    /// A refused reload, sent again after the host's next interval.
    reload_retry: bool,
    /// Drained instance, if any.
    drained: Option<String>,
    /// From when the host could act last (I2, I3).
    able_since: Duration,
}

impl Host {
    fn config(&self) -> Config {
        let mut t = format!(
            "[agent]\ninterval_ms = {}\nmax_moves_per_sec = 4.0\nrecovery_hold_down_ms = 2000\n\n\
             [cluster]\nstore = \"etcd\"\nhost = \"{}\"\nunderlay = \"198.18.1.{}\"\n\
             etcd_endpoints = [\"http://198.18.0.1:2379\"]\nlease_ttl_secs = {}\n\n\
             [[service]]\nname = \"kv\"\nvip = \"198.18.0.100\"\nport = 7000\nprotocol = \"udp\"\n\
             wlm = {{ capacity_pps = {CAPACITY}, min_group_units = 2048 }}\n",
            INTERVAL.as_millis(),
            self.name,
            self.underlay_last,
            LEASE_TTL.as_secs(),
        );
        for n in &self.instances {
            let _ = write!(
                t,
                "\n[[service.instance]]\nname = \"{n}\"\nveth = \"v{n}\"\n"
            );
        }
        Config::parse(&t, std::path::Path::new("sim.toml"))
            .unwrap_or_else(|e| panic!("the sim's config: {e}"))
    }

    fn can_act(&self) -> bool {
        self.agent.is_some() && !self.paused && !self.cut
    }
}

/// Where a packet of `unit` entering one host ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Delivered to instance `id` on host `host`.
    Delivered {
        host: usize,
        id: u32,
    },
    Punted,
    Dropped,
}

struct Sim {
    opts: Options,
    rng: Rng,
    store: SimCluster,
    hosts: Vec<Host>,
    now: Duration,
    clock_nanos: Arc<AtomicU64>,
    base: Instant,
    clock: Clock,
    faults: Vec<Fault>,
    heal_at: Duration,
    /// Load multiplier of the hot quarter of the units.
    hot: u64,
    trace: Vec<String>,
    hash: u64,
    steps: u64,
    /// Instance -> when it became failed/drained/removed/hostless (I2).
    bad_since: BTreeMap<String, Duration>,
    /// Host -> since when its record is gone from the store (I2).
    gone_since: BTreeMap<String, Duration>,
    /// Drained instance -> (groups it owned at the last look, since when):
    /// a drain gives away one group an interval within the move limit it
    /// shares with the elements, so I2 asks that it keeps giving (a group
    /// at least every 2K intervals), not that it is done.
    drain_progress: BTreeMap<String, (usize, Duration)>,
    /// Host -> since when its data path differs from the store (I4).
    differ_since: BTreeMap<usize, Duration>,
    /// Sampled unit -> since when it has had two deliverers (I5).
    split_since: BTreeMap<u32, Duration>,
}

/// Runs one seed.
#[must_use]
pub fn run(opts: &Options) -> Outcome {
    let mut sim = Sim::new(opts.clone());
    let violation = match std::panic::catch_unwind(AssertUnwindSafe(|| sim.run())) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Some(Violation {
                invariant: Invariant::I6Panic,
                at: sim.now,
                detail: msg,
            })
        }
    };
    let tail = sim.trace.iter().rev().take(60).rev().cloned().collect();
    Outcome {
        trace_hash: sim.hash,
        violation,
        tail,
        steps: sim.steps,
    }
}

impl Sim {
    fn new(opts: Options) -> Self {
        let mut rng = Rng(opts.seed ^ 0x5EED_0000_0000_0000);
        let store = SimCluster::new(opts.hosts, opts.rejoin);
        let hosts = (0..opts.hosts)
            .map(|h| Host {
                name: format!("host-{h}"),
                underlay_last: u8::try_from(h + 1).expect("under 255 hosts"),
                instances: (0..2).map(|k| format!("h{h}i{k}")).collect(),
                extras: 0,
                dp: MemDatapath::default(),
                veths: Veths::default(),
                agent: None,
                paused: false,
                cut: false,
                watch_held: false,
                punted: BTreeSet::new(),
                reload_due: false,
                reload_retry: false,
                drained: None,
                able_since: Duration::ZERO,
            })
            .collect();
        let total = Duration::from_secs(u64::from(opts.intervals));
        let heal_at = total * 3 / 5;
        let mut faults = Vec::new();
        if !opts.faults.is_empty() {
            let n = 1 + rng.below(3);
            for _ in 0..n {
                let kind = opts.faults[rng.pick(opts.faults.len())];
                let host = rng.pick(opts.hosts);
                let start = Duration::from_secs(2) + rng.millis(heal_at / 2);
                let len = match kind {
                    FaultKind::Pause | FaultKind::Partition => {
                        LEASE_TTL / 2 + rng.millis(LEASE_TTL * 2)
                    }
                    // A watch can stall (no error) for long: up to three
                    // lease times, well past W.
                    FaultKind::Watch => Duration::from_millis(500) + rng.millis(LEASE_TTL * 3),
                    _ => Duration::from_millis(500) + rng.millis(Duration::from_secs(5)),
                };
                let also = if kind == FaultKind::Reload {
                    (0..opts.hosts)
                        .filter(|&o| o != host && rng.chance(2))
                        .collect()
                } else {
                    Vec::new()
                };
                faults.push(Fault {
                    kind,
                    host,
                    also,
                    start,
                    end: (start + len).min(heal_at),
                });
            }
        }
        let sim_now = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let clock = {
            let n = sim_now.clone();
            Clock::from_fn(move || base + Duration::from_nanos(n.load(Ordering::Relaxed)))
        };
        let mut sim = Self {
            opts,
            rng,
            store,
            hosts,
            now: Duration::ZERO,
            clock_nanos: sim_now,
            base,
            clock,
            faults,
            heal_at,
            hot: 1,
            trace: Vec::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            steps: 0,
            bad_since: BTreeMap::new(),
            gone_since: BTreeMap::new(),
            drain_progress: BTreeMap::new(),
            differ_since: BTreeMap::new(),
            split_since: BTreeMap::new(),
        };
        let plan: Vec<String> = sim
            .faults
            .iter()
            .map(|f| {
                format!(
                    "{}@h{}{:?} {:?}..{:?}",
                    f.kind.name(),
                    f.host,
                    f.also,
                    f.start,
                    f.end
                )
            })
            .collect();
        sim.log(format!("faults: {}", plan.join("; ")));
        sim
    }

    fn log(&mut self, line: impl std::fmt::Display) {
        let line = format!("{:>6.1}s {line}", self.now.as_secs_f64());
        for b in line.bytes() {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.trace.push(line);
        if self.trace.len() > 400 {
            self.trace.drain(..200);
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn run(&mut self) -> Option<Violation> {
        let end = Duration::from_secs(u64::from(self.opts.intervals));
        // The hosts start one after another, a little apart.
        let order: Vec<usize> = (0..self.hosts.len()).collect();
        for h in order {
            self.start_agent(h);
        }
        while self.now < end {
            self.faults_at();
            self.store.advance(self.now);
            self.traffic();
            // The hosts' actions due now, in the seed's order; some may
            // wait for the next step (a lagging watch, a late tick).
            loop {
                let due = self.due();
                if due.is_empty() || self.rng.chance(12) {
                    break;
                }
                let (h, action) = due[self.rng.pick(due.len())];
                self.act(h, action);
                self.steps += 1;
                if let Some(v) = self.check() {
                    return Some(v);
                }
            }
            self.now += QUANTUM;
            self.clock_nanos.store(
                u64::try_from(self.now.as_nanos()).expect("short runs"),
                Ordering::Relaxed,
            );
            if let Some(v) = self.check() {
                return Some(v);
            }
        }
        None
    }

    fn start_agent(&mut self, h: usize) {
        let config = self.hosts[h].config();
        let store = Arc::new(self.store.handle(h));
        let mut line = String::new();
        let host = &mut self.hosts[h];
        match Agent::start(
            &config,
            store,
            &mut host.dp,
            &host.veths,
            &self.clock,
            &mut line,
        ) {
            Ok(a) => {
                host.agent = Some(a);
                host.able_since = self.now;
                self.log(format!("h{h} start{line}"));
            }
            Err(e) => self.log(format!("h{h} start-failed({e:#}){line}")),
        }
    }
}

mod steps;

/// The fault kinds every seed of the test suite may choose: all of them,
/// since issue 27's fixes (before them, every kind but `watch` and `load`
/// broke an invariant: see ARCHITECTURE.md's simulation section).
pub const SUITE_FAULTS: &str = "all";

#[cfg(test)]
mod tests;
