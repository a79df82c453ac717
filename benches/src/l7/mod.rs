//! L7: HTTP/1.1 requests a second through a reverse proxy on the host, and
//! what each request costs the proxy, for Sluice's HTTP distributor (a
//! `layer = "http"` service, terminated by `sluice run` on the host) beside
//! `HAProxy` and nginx doing the same job on the same testbed:
//!
//! - the namespace testbed with two instances, each running the same
//!   backend: nginx with one worker answering `200 ok` from memory;
//! - the proxy in the host namespace on the VIP's port 80, kept-alive
//!   pooled connections to both backends, in four [`Scenario`]s: one
//!   worker (thread or process) pinned to CPU 0 with `wrk` on CPU 1, or
//!   two workers on CPUs 0 and 1 (with `wrk` and the backends floating);
//!   each unkeyed (round robin, or Sluice's flow hash) and keyed by an
//!   `X-User` header over 1,000 users (consistent hashing on it, or
//!   Sluice's key through its units and owners);
//! - `wrk` in the client namespace: one thread, kept-alive connections,
//!   a warm-up run, then the measured run;
//! - a fresh testbed (namespaces, backends, proxy) for every run, so that
//!   no run inherits another's state; proxies interleaved over the rounds
//!   (A, B, C, A, B, C, ...), medians reported.
//!
//! CPU: the proxy's utime + stime over the measured run, all its threads
//! and child processes (nginx's worker), from /proc. With tick accounting
//! (this kernel) that includes the softirq work run in the proxy's context:
//! part of the network stack's cost for what it sends. The machine's busy
//! time a request (/proc/stat, every CPU: `wrk` and the backends included)
//! is given too.
//!
//! A proxy that does not come up (or fails during a run) is left out with
//! the reason, and the others are measured.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::e2e::median;

const INSTANCES: usize = 2;
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// Rounds of each proxy, interleaved.
const ROUNDS: usize = 3;
/// `wrk`'s kept-alive connections (one thread).
const CONNECTIONS: u32 = 32;
/// Kept-alive connections a proxy keeps to the backends.
const POOL: u32 = 64;
/// Seconds of load before the measured run (pools filled, caches warm).
const WARM_UP_SECS: u32 = 2;
/// How long a backend, `HAProxy` or nginx may take to answer its first
/// request.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent loads and attaches the XDP program before it listens.
const SLUICE_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: Scenario,
    pub(crate) proxy: String,
    /// How it is set up.
    pub(crate) setup: String,
    /// Why the proxy was not measured (then every figure is 0).
    pub(crate) unavailable: Option<String>,
    pub(crate) rounds: usize,
    /// Medians over the rounds, with the rounds' range for the rate.
    pub(crate) requests_per_sec: f64,
    pub(crate) requests_per_sec_min: f64,
    pub(crate) requests_per_sec_max: f64,
    /// The proxy's CPU seconds a second of the run.
    pub(crate) proxy_cores: f64,
    pub(crate) requests_per_proxy_core_second: f64,
    /// Every CPU's busy time a request (µs), `wrk` and backends included.
    pub(crate) machine_us_per_request: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// Socket errors and answers other than 2xx/3xx, all rounds.
    pub(crate) errors: u64,
    /// Connections the backends accepted during the measured run (median):
    /// how well the proxy pools (a connection a request would be millions).
    pub(crate) backend_connections: f64,
}

/// A reverse proxy under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Sluice,
    Haproxy,
    Nginx,
    /// Another build of the agent (`--l7-baseline`), measured beside this
    /// one in the same rounds.
    SluiceBaseline,
}

impl Proxy {
    const ALL: [Self; 4] = [
        Self::Sluice,
        Self::Haproxy,
        Self::Nginx,
        Self::SluiceBaseline,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::Sluice => "Sluice",
            Self::SluiceBaseline => "Sluice (baseline)",
            Self::Haproxy => "HAProxy",
            Self::Nginx => "nginx",
        }
    }

    fn setup(self, sc: Scenario) -> String {
        let n = sc.workers;
        match (self, sc.keyed) {
            (Self::SluiceBaseline, _) => format!(
                "the `--l7-baseline` build, as Sluice's row, {}",
                if sc.keyed { "keyed" } else { "flow hash" }
            ),
            (Self::Sluice, false) => format!(
                "`sluice run`, `layer = \"http\"`, `pool_size = {POOL}`, {n} worker(s), flow hash"
            ),
            (Self::Sluice, true) => format!(
                "`sluice run`, `pool_size = {POOL}`, {n} worker(s), `key = {{ header = \"X-User\" }}`"
            ),
            (Self::Haproxy, false) => format!("`nbthread {n}`, `http-reuse always`, round robin"),
            (Self::Haproxy, true) => format!(
                "`nbthread {n}`, `http-reuse always`, `balance hdr(X-User)`, `hash-type consistent`"
            ),
            (Self::Nginx, false) => {
                format!("{n} worker(s), upstream `keepalive {POOL}`, round robin")
            }
            (Self::Nginx, true) => format!(
                "{n} worker(s), upstream `keepalive {POOL}`, `hash $http_x_user consistent`"
            ),
        }
    }
}

mod bed;
mod daemon;
mod profile;
mod report;

use bed::Bed;
use report::latency;
pub(crate) use report::table;

/// What the proxies are asked to do in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Scenario {
    /// Worker threads (or processes): the CPUs the proxy may run on.
    pub(crate) workers: usize,
    /// Requests keyed by `X-User` over [`USERS`] users.
    pub(crate) keyed: bool,
}

/// Users a keyed run's requests cycle through.
const USERS: u32 = 1000;

impl Scenario {
    const ALL: [Self; 4] = [
        Self {
            workers: 1,
            keyed: false,
        },
        Self {
            workers: 1,
            keyed: true,
        },
        Self {
            workers: 2,
            keyed: false,
        },
        Self {
            workers: 2,
            keyed: true,
        },
    ];

    /// The proxy's CPUs and `wrk`'s (None: anywhere).
    fn cpus(self, cores: usize) -> (Option<String>, Option<String>) {
        match (self.workers, cores) {
            (_, 1) => (None, None),
            (1, _) => (Some("0".into()), Some("1".into())),
            _ => (
                Some(
                    (0..self.workers)
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                None,
            ),
        }
    }

    pub(crate) fn label(self) -> String {
        format!(
            "{} worker{}, {}",
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            if self.keyed {
                "keyed (`X-User`, 1,000 users)"
            } else {
                "unkeyed"
            }
        )
    }
}

/// One measured run of a proxy, before the medians.
struct Sample {
    requests_per_sec: f64,
    proxy_cores: f64,
    requests_per_core_second: f64,
    machine_us: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    backend_connections: f64,
}

fn summarise(sc: Scenario, p: Proxy, samples: &[Sample]) -> Row {
    let med = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    let rate = samples.iter().map(|s| s.requests_per_sec);
    Row {
        scenario: sc,
        proxy: p.name().to_owned(),
        setup: p.setup(sc),
        unavailable: None,
        rounds: samples.len(),
        requests_per_sec: med(|s| s.requests_per_sec),
        requests_per_sec_min: rate.clone().fold(f64::INFINITY, f64::min),
        requests_per_sec_max: rate.fold(0.0, f64::max),
        proxy_cores: med(|s| s.proxy_cores),
        requests_per_proxy_core_second: med(|s| s.requests_per_core_second),
        machine_us_per_request: med(|s| s.machine_us),
        p50_us: med(|s| s.p50_us),
        p99_us: med(|s| s.p99_us),
        errors: samples.iter().map(|s| s.errors).sum(),
        backend_connections: med(|s| s.backend_connections),
    }
}

fn unavailable(sc: Scenario, p: Proxy, why: String) -> Row {
    Row {
        scenario: sc,
        proxy: p.name().to_owned(),
        setup: p.setup(sc),
        unavailable: Some(why),
        rounds: 0,
        requests_per_sec: 0.0,
        requests_per_sec_min: 0.0,
        requests_per_sec_max: 0.0,
        proxy_cores: 0.0,
        requests_per_proxy_core_second: 0.0,
        machine_us_per_request: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        errors: 0,
        backend_connections: 0.0,
    }
}

/// The programs every run needs, with what to do if one is missing.
fn check_programs() -> anyhow::Result<()> {
    for (bin, arg) in [("nginx", "-v"), ("haproxy", "-v"), ("wrk", "-v")] {
        let found = Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!(
                "`{bin}` not found: the L7 bench needs haproxy, nginx and wrk (`cargo xtask bench` installs them; \
                 or `apt-get install haproxy nginx wrk`)"
            );
        }
    }
    Ok(())
}

/// Every scenario; in each, every proxy interleaved over the rounds, each
/// run on a fresh testbed; `secs` a measured run. `sluice` is the agent's
/// binary. With `profile`, one more run of Sluice a scenario under `perf`,
/// its flame graph written there.
pub(crate) fn run(
    sluice: &Path,
    secs: u32,
    baseline: Option<&Path>,
    profile: Option<&Path>,
    profile_only: bool,
) -> anyhow::Result<Vec<Row>> {
    check_programs()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut rows = Vec::new();
    for sc in Scenario::ALL {
        if sc.workers > cores {
            eprintln!(
                "[bench] L7, {}: this machine has {cores} CPU(s); skipped",
                sc.label()
            );
            continue;
        }
        eprintln!("[bench] L7, {}", sc.label());
        if !profile_only {
            rows.extend(scenario(sc, cores, (sluice, baseline), secs)?);
        }
        if let Some(dir) = profile {
            let (proxy_cpu, wrk_cpu) = sc.cpus(cores);
            for p in [Proxy::Sluice, Proxy::Haproxy] {
                let mut bed = Bed::new(sc)?;
                bed.start(p, proxy_cpu.as_deref(), sluice)
                    .with_context(|| format!("{} did not come up for profiling", p.name()))?;
                let (syscalls, switches) = profile::per_request(&bed, wrk_cpu.as_deref(), secs)?;
                eprintln!(
                    "[bench]   {}: {syscalls:.2} system calls and {switches:.3} context switches a request",
                    p.name()
                );
                if p == Proxy::Sluice {
                    let svg = profile::record(&bed, wrk_cpu.as_deref(), secs, dir, sc)?;
                    eprintln!("[bench]   flame graph: {}", svg.display());
                }
            }
        }
    }
    Ok(rows)
}

fn scenario(
    sc: Scenario,
    cores: usize,
    (sluice, baseline): (&Path, Option<&Path>),
    secs: u32,
) -> anyhow::Result<Vec<Row>> {
    let (proxy_cpu, wrk_cpu) = sc.cpus(cores);
    let proxies: Vec<Proxy> = Proxy::ALL
        .into_iter()
        .filter(|p| *p != Proxy::SluiceBaseline || baseline.is_some())
        .collect();
    let mut samples: Vec<Vec<Sample>> = proxies.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = proxies.iter().map(|_| None).collect();
    for round in 1..=ROUNDS {
        for (k, &p) in proxies.iter().enumerate() {
            if failed[k].is_some() {
                continue;
            }
            let bin = match (p, baseline) {
                (Proxy::SluiceBaseline, Some(b)) => b,
                _ => sluice,
            };
            let mut bed = Bed::new(sc)?;
            let measured = bed
                .start(p, proxy_cpu.as_deref(), bin)
                .context("did not come up")
                .and_then(|()| bed.measure(wrk_cpu.as_deref(), secs));
            drop(bed);
            match measured {
                Ok(s) => {
                    eprintln!(
                        "[bench]   round {round}: {} — {:.0} requests/s, {:.2} proxy cores, {:.0} per proxy core-second, {:.0} backend connections opened, p50 {}, p99 {}{}",
                        p.name(),
                        s.requests_per_sec,
                        s.proxy_cores,
                        s.requests_per_core_second,
                        s.backend_connections,
                        latency(s.p50_us),
                        latency(s.p99_us),
                        if s.errors > 0 {
                            format!(", {} errors", s.errors)
                        } else {
                            String::new()
                        }
                    );
                    samples[k].push(s);
                }
                Err(e) => {
                    let why = format!("not measured (round {round}): {e:#}");
                    eprintln!("[bench]   {}: {why}; left out", p.name());
                    failed[k] = Some(why);
                }
            }
        }
    }
    Ok(proxies
        .iter()
        .zip(failed)
        .zip(&samples)
        .map(|((&p, failed), s)| match failed {
            Some(why) => unavailable(sc, p, why),
            None => summarise(sc, p, s),
        })
        .collect())
}
