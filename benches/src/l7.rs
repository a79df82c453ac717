//! L7: HTTP/1.1 requests a second through a reverse proxy on the host, and
//! what each request costs the proxy, for Sluice's HTTP distributor (a
//! `layer = "http"` service, terminated by `sluice run` on the host) beside
//! `HAProxy` and nginx doing the same job on the same testbed:
//!
//! - the namespace testbed with two instances, each running the same
//!   backend: nginx with one worker answering `200 ok` from memory;
//! - the proxy in the host namespace on the VIP's port 80: one worker
//!   (thread or process), kept-alive pooled connections to both backends;
//! - `wrk` in the client namespace: one thread, kept-alive connections,
//!   a warm-up run, then the measured run;
//! - with two CPUs or more, the proxy pinned to CPU 0 and `wrk` to CPU 1
//!   (the backends float);
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
    fmt::Write as _,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice_tests::{
    netns,
    testbed::{self, Testbed},
};

use crate::e2e::{self, median, pids_ns, system_cpu};

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

#[derive(Serialize, Default)]
pub(crate) struct Row {
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
}

impl Proxy {
    const ALL: [Self; 3] = [Self::Sluice, Self::Haproxy, Self::Nginx];

    const fn name(self) -> &'static str {
        match self {
            Self::Sluice => "Sluice",
            Self::Haproxy => "HAProxy",
            Self::Nginx => "nginx",
        }
    }

    const fn setup(self) -> &'static str {
        match self {
            Self::Sluice => "`sluice run`, `layer = \"http\"`, `pool_size = 64`",
            Self::Haproxy => "`nbthread 1`, `http-reuse always`, round robin",
            Self::Nginx => "1 worker, upstream `keepalive 64`, round robin",
        }
    }
}

/// A process this bench started, stopped by its own pid on drop (also on
/// panic): SIGTERM, then SIGKILL to it and to the children it had if it
/// has not exited within 5 s. Started through `nsenter` and `taskset`,
/// which both exec, so the child's pid is the program's own.
struct Daemon {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` (its program and arguments) in namespace `ns` (not
    /// `ip netns exec`: that remounts /sys, hiding bpffs from the agent), on
    /// CPU `cpu` if given, its stdout and stderr to `log`.
    fn start(
        what: &str,
        ns: &str,
        cpu: Option<usize>,
        log: PathBuf,
        program: &Command,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"));
        if let Some(cpu) = cpu {
            cmd.args(["taskset", "-c", &cpu.to_string()]);
        }
        let child = cmd
            .arg(program.get_program())
            .args(program.get_args())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self {
            what: what.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why it no longer runs, with the end of its log, if it exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(format!("{} exited ({status}): {}", self.what, self.tail())),
            Err(e) => Some(format!("{}: {e}", self.what)),
        }
    }

    /// The last lines of its log, on one line.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        if tail.is_empty() {
            "(nothing logged)".into()
        } else {
            tail
        }
    }

    /// Waits for it to exit by itself, at most `limit` (past that, drop
    /// ends it).
    fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if t.elapsed() > limit {
                bail!("{} still running after {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only while it runs: a reaped child's pid may be someone else's.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = self.pid();
        let children: Vec<(u32, u64)> = tree(pid)
            .into_iter()
            .filter(|&p| p != pid)
            .filter_map(|p| Some((p, stat_field(p, 19)?)))
            .collect();
        signal(pid, libc::SIGTERM);
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Children it left behind (an nginx worker whose master was
        // killed): the same pid with the same start time is the same
        // process.
        for (p, started) in children {
            if stat_field(p, 19) == Some(started) {
                signal(p, libc::SIGKILL);
            }
        }
    }
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: signalling a process this bench started (or its child,
        // checked by start time), by its pid.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Field `i` of /proc/PID/stat, counted from the state (field 3) as 0:
/// 1 is the parent's pid, 19 the start time.
fn stat_field(pid: u32, i: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(i)?.parse().ok()
}

/// `pid` and every process descended from it.
fn tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, u32::try_from(stat_field(p, 1)?).ok()?)))
        .collect();
    let mut out = vec![pid];
    let mut k = 0;
    while let Some(&p) = out.get(k) {
        out.extend(
            parents
                .iter()
                .filter(|&&(_, parent)| parent == p)
                .map(|&(c, _)| c),
        );
        k += 1;
    }
    out
}

/// A bpffs directory the agent pins in, removed on drop if the agent left
/// anything there (it removes its pins itself on a clean exit).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = sluice::datapath::xdp::XdpDatapath::remove_pins(&self.0);
    }
}

/// `GET path` over a new connection from namespace `ns`: the status code
/// and the body (with whatever framing the server chose).
fn get(ns: &str, addr: SocketAddrV4, path: &str) -> anyhow::Result<(u16, String)> {
    let mut c = netns::run_in(ns, || {
        TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1))
    })?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut bytes = Vec::new();
    if let Err(e) = c.read_to_end(&mut bytes) {
        // A server that keeps the connection open all the same: what came
        // before the timeout is the answer.
        let timeout = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        if bytes.is_empty() || !timeout {
            return Err(e.into());
        }
    }
    let answer = String::from_utf8_lossy(&bytes);
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {answer:?}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// Waits until `GET /` at `addr` from `ns` answers 200 with the backends'
/// `ok`, while every one of `procs` runs; at most `limit`.
fn wait_ready(
    ns: &str,
    addr: SocketAddrV4,
    procs: &mut [&mut Daemon],
    limit: Duration,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let last = match get(ns, addr, "/") {
            Ok((200, body)) if body.contains("ok") => return Ok(()),
            Ok((code, body)) => format!("it answered {code}: {body:?}"),
            Err(e) => format!("{e:#}"),
        };
        for p in procs.iter_mut() {
            if let Some(why) = p.exited() {
                bail!(why);
            }
        }
        if t.elapsed() > limit {
            bail!("no `200 ok` from http://{addr}/ within {limit:?}; last try: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An nginx config: one worker in the foreground, every file of its own
/// under `dir`, no access log, long kept-alive client connections, and
/// `servers` in the `http` block.
fn nginx_conf(dir: &Path, servers: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{servers}}}\n"
    )
}

/// Starts nginx with `conf` in `ns`, its files in `dir`.
fn nginx(
    what: &str,
    dir: &Path,
    ns: &str,
    cpu: Option<usize>,
    conf: &str,
) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf)?;
    Daemon::start(
        what,
        ns,
        cpu,
        dir.join("log"),
        // `-e`: errors before the config is read go there too.
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&file)
            .args(["-e", "stderr"]),
    )
}

/// One run's testbed: the namespaces, the two backends and (once started)
/// the proxy. Fields drop in order: the proxy first, then its pins, the
/// backends, their files, and last the namespaces.
struct Bed {
    proxy: Option<Daemon>,
    pins: Option<Pins>,
    backends: Vec<Daemon>,
    dir: tempfile::TempDir,
    tb: Testbed,
}

impl Bed {
    /// A fresh testbed with both backends answering.
    fn new() -> anyhow::Result<Self> {
        let tb = Testbed::new("l7", INSTANCES)?;
        // NAPI and GRO on the NIC veth for every proxy, as Sluice's XDP
        // program gives it (the e2e bench does the same).
        netns::run_in(&tb.host, || {
            netns::set_offload(testbed::NIC, netns::Offload::Gro, true)
        })?;
        let dir = tempfile::tempdir()?;
        // nginx's workers run as nobody.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let mut backends = Vec::new();
        for (k, i) in tb.instances.iter().enumerate() {
            let d = dir.path().join(format!("backend-{k}"));
            let conf = nginx_conf(
                &d,
                &format!(
                    "  server {{\n    listen {}:{BACKEND_PORT};\n    location / {{ return 200 \"ok\\n\"; }}\n    \
                     location = /status {{ stub_status; }}\n  }}\n",
                    i.addr_v4
                ),
            );
            backends.push(nginx(
                &format!("backend nginx in {}", i.netns),
                &d,
                &i.netns,
                None,
                &conf,
            )?);
        }
        for (i, b) in tb.instances.iter().zip(&mut backends) {
            wait_ready(
                &tb.host,
                SocketAddrV4::new(i.addr_v4, BACKEND_PORT),
                &mut [b],
                START_TIMEOUT,
            )
            .context("a backend did not come up")?;
        }
        Ok(Self {
            proxy: None,
            pins: None,
            backends,
            dir,
            tb,
        })
    }

    /// Connections the backends have accepted so far, this query's own
    /// included (nginx's `stub_status`: `server accepts handled requests`).
    fn backend_accepts(&self) -> anyhow::Result<Vec<u64>> {
        self.backend_addrs()
            .map(|(_, a)| {
                let (code, body) = get(&self.tb.host, a, "/status")?;
                body.lines()
                    .skip_while(|l| !l.starts_with("server accepts"))
                    .nth(1)
                    .and_then(|l| l.split_whitespace().next()?.parse().ok())
                    .filter(|_| code == 200)
                    .with_context(|| format!("stub_status of {a} answered {code}: {body:?}"))
            })
            .collect()
    }

    fn backend_addrs(&self) -> impl Iterator<Item = (usize, SocketAddrV4)> {
        self.tb
            .instances
            .iter()
            .map(|i| SocketAddrV4::new(i.addr_v4, BACKEND_PORT))
            .enumerate()
    }

    /// The VIP local in the host namespace, for the proxies that bind it
    /// (the agent adds its own local route).
    fn vip_local(&self) -> anyhow::Result<()> {
        e2e::run(Command::new("ip").args([
            "-n",
            &self.tb.host,
            "addr",
            "add",
            &format!("{}/32", testbed::VIP_V4),
            "dev",
            "lo",
        ]))
    }

    /// Starts `p` on CPU `cpu` and waits until it answers through the VIP
    /// from the client namespace.
    fn start(&mut self, p: Proxy, cpu: Option<usize>, sluice: &Path) -> anyhow::Result<()> {
        let (proxy, limit) = match p {
            Proxy::Haproxy => (self.haproxy(cpu)?, START_TIMEOUT),
            Proxy::Nginx => (self.nginx(cpu)?, START_TIMEOUT),
            Proxy::Sluice => (self.sluice(cpu, sluice)?, SLUICE_START_TIMEOUT),
        };
        let proxy = self.proxy.insert(proxy);
        let mut procs: Vec<&mut Daemon> = vec![proxy];
        procs.extend(&mut self.backends);
        wait_ready(
            &self.tb.client,
            SocketAddrV4::new(testbed::VIP_V4, VIP_PORT),
            &mut procs,
            limit,
        )
    }

    fn haproxy(&self, cpu: Option<usize>) -> anyhow::Result<Daemon> {
        self.vip_local()?;
        let mut servers = String::new();
        for (k, a) in self.backend_addrs() {
            let _ = writeln!(servers, "    server web-{k} {a}");
        }
        let conf = format!(
            "global\n    nbthread 1\n    maxconn 4096\n\
             defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    \
             timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    timeout http-keep-alive 60s\n\
             frontend web\n    bind {}:{VIP_PORT}\n    default_backend instances\n\
             backend instances\n    balance roundrobin\n{servers}",
            testbed::VIP_V4
        );
        let file = self.dir.path().join("haproxy.cfg");
        std::fs::write(&file, conf)?;
        Daemon::start(
            "haproxy",
            &self.tb.host,
            cpu,
            self.dir.path().join("haproxy.log"),
            // In the foreground, one process.
            Command::new("haproxy").arg("-db").arg("-f").arg(&file),
        )
    }

    fn nginx(&self, cpu: Option<usize>) -> anyhow::Result<Daemon> {
        self.vip_local()?;
        let mut upstream = String::new();
        for (_, a) in self.backend_addrs() {
            let _ = writeln!(upstream, "    server {a};");
        }
        let d = self.dir.path().join("proxy");
        let conf = nginx_conf(
            &d,
            &format!(
                "  upstream instances {{\n{upstream}    keepalive {POOL};\n    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n  }}\n  \
                 server {{\n    listen {}:{VIP_PORT};\n    location / {{\n      proxy_pass http://instances;\n      \
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n",
                testbed::VIP_V4
            ),
        );
        nginx("nginx (proxy)", &d, &self.tb.host, cpu, &conf)
    }

    /// The agent on the NIC veth with the `web` service at layer `http`.
    fn sluice(&mut self, cpu: Option<usize>, bin: &Path) -> anyhow::Result<Daemon> {
        if !bin.exists() {
            bail!(
                "{} not found: build it (`cargo build --release -p sluice`; `cargo xtask bench` does) or pass --sluice",
                bin.display()
            );
        }
        let dir = self.dir.path();
        let config = dir.join("sluice.toml");
        std::fs::write(&config, sluice_toml(&self.tb))?;
        let pins = self.pins.insert(Pins(PathBuf::from(format!(
            "/sys/fs/bpf/sluice-bench-l7-{}",
            std::process::id()
        ))));
        Daemon::start(
            "sluice run",
            &self.tb.host,
            cpu,
            dir.join("sluice.log"),
            Command::new(bin)
                .args(["run", "--iface", testbed::NIC, "--stats-interval", "0"])
                .arg("--cleanup")
                .arg("--pin-dir")
                .arg(&pins.0)
                .args(["--metrics-addr", "127.0.0.1:9477"])
                .arg("--config")
                .arg(&config)
                .arg("--state")
                .arg(dir.join("state.json"))
                .arg("--api-socket")
                .arg(dir.join("agent.sock"))
                .arg("--report-dir")
                .arg(dir.join("report")),
        )
    }

    /// Runs `wrk` from the client namespace against the VIP for `secs`.
    fn wrk(&self, cpu: Option<usize>, secs: u32) -> anyhow::Result<Wrk> {
        let url = format!("http://{}:{VIP_PORT}/", testbed::VIP_V4);
        let mut w = Daemon::start(
            "wrk",
            &self.tb.client,
            cpu,
            self.dir.path().join("wrk.out"),
            Command::new("wrk")
                .arg("-t1")
                .arg(format!("-c{CONNECTIONS}"))
                .arg(format!("-d{secs}s"))
                .args(["--timeout", "2s", "--latency"])
                .arg(&url),
        )?;
        let status = w.wait(Duration::from_secs(u64::from(secs) + 20))?;
        if !status.success() {
            bail!("wrk failed ({status}): {}", w.tail());
        }
        let out = std::fs::read_to_string(&w.log)?;
        parse_wrk(&out).with_context(|| format!("reading wrk's output:\n{out}"))
    }

    /// A warm-up run, then the measured one with the proxy's CPU around it.
    fn measure(&self, wrk_cpu: Option<usize>, secs: u32) -> anyhow::Result<Sample> {
        let proxy = self.proxy.as_ref().context("no proxy started")?.pid();
        self.wrk(wrk_cpu, WARM_UP_SECS)?;
        let accepts0 = self.backend_accepts()?;
        let proxy0 = pids_ns(&tree(proxy));
        let (busy0, _) = system_cpu();
        let t = Instant::now();
        let w = self.wrk(wrk_cpu, secs)?;
        let wall = t.elapsed().as_secs_f64();
        let proxy1 = pids_ns(&tree(proxy));
        let (busy1, _) = system_cpu();
        // Less the query that read the first count, on each backend.
        let opened: u64 = self
            .backend_accepts()?
            .iter()
            .zip(&accepts0)
            .map(|(after, before)| after.saturating_sub(*before).saturating_sub(1))
            .sum();
        if w.requests == 0 {
            bail!("wrk completed no request");
        }
        let proxy_s = ((proxy1 - proxy0) / 1e9).max(1e-3);
        #[expect(clippy::cast_precision_loss, reason = "request counts")]
        let requests = w.requests as f64;
        Ok(Sample {
            requests_per_sec: requests / w.secs,
            proxy_cores: proxy_s / wall,
            requests_per_core_second: requests / proxy_s,
            machine_us: (busy1 - busy0) / 1e3 / requests,
            p50_us: w.p50_us,
            p99_us: w.p99_us,
            errors: w.errors,
            #[expect(clippy::cast_precision_loss, reason = "a count")]
            backend_connections: opened as f64,
        })
    }
}

/// The agent's config: the `web` service at layer `http` on the VIP's port
/// 80, one instance a testbed instance with its backend's address (and its
/// namespace, where the agent looks its MAC up).
fn sluice_toml(tb: &Testbed) -> String {
    let mut s = format!(
        "[agent]\ninterval_ms = 1000\n\n[[service]]\nname = \"web\"\nvip = \"{}\"\nport = {VIP_PORT}\n\
         protocol = \"tcp\"\nlayer = \"http\"\n\n[service.http]\npool_size = {POOL}\n",
        testbed::VIP_V4
    );
    for (k, i) in tb.instances.iter().enumerate() {
        let _ = write!(
            s,
            "\n[[service.instance]]\nname = \"web-{k}\"\nveth = \"{}\"\nnetns = \"{}\"\naddr = \"{}:{BACKEND_PORT}\"\n",
            i.veth, i.netns, i.addr_v4
        );
    }
    s
}

/// What one `wrk` run reported.
#[derive(Debug, PartialEq)]
struct Wrk {
    requests: u64,
    /// How long it ran, by its own clock.
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    /// Socket errors (connect, read, write, timeout) and answers other
    /// than 2xx/3xx.
    errors: u64,
}

/// A duration as `wrk` prints it (`290.00us`, `1.23ms`, `2.00s`, `1.00m`),
/// in µs.
fn wrk_duration_us(t: &str) -> Option<f64> {
    for (unit, us) in [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ] {
        if let Some(v) = t.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * us);
        }
    }
    None
}

fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let percentile = |p: &str| {
        out.lines()
            .find_map(|l| wrk_duration_us(l.trim().strip_prefix(p)?.trim()))
            .with_context(|| format!("no {p} latency (was --latency given?)"))
    };
    // "  1002345 requests in 10.00s, 150.34MB read"
    let (requests, secs) = out
        .lines()
        .find_map(|l| {
            let (n, rest) = l.split_once(" requests in ")?;
            let took = rest.split(',').next()?.trim();
            Some((n.trim().parse().ok()?, wrk_duration_us(took)? / 1e6))
        })
        .context("no `N requests in T` line")?;
    let count = |prefix: &str| -> u64 {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .flat_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
            })
            .sum()
    };
    Ok(Wrk {
        requests,
        secs,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
        errors: count("Socket errors:") + count("Non-2xx or 3xx responses:"),
    })
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

fn summarise(p: Proxy, samples: &[Sample]) -> Row {
    let med = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    let rate = samples.iter().map(|s| s.requests_per_sec);
    Row {
        proxy: p.name().to_owned(),
        setup: p.setup().to_owned(),
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

fn unavailable(p: Proxy, why: String) -> Row {
    Row {
        proxy: p.name().to_owned(),
        setup: p.setup().to_owned(),
        unavailable: Some(why),
        ..Row::default()
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

/// Every proxy, interleaved over the rounds, each run on a fresh testbed;
/// `secs` a measured run. `sluice` is the agent's binary.
pub(crate) fn run(sluice: &Path, secs: u32) -> anyhow::Result<Vec<Row>> {
    check_programs()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // (the proxy's CPU, wrk's CPU)
    let cpus = (cores >= 2).then_some((0, 1));
    let mut samples: Vec<Vec<Sample>> = Proxy::ALL.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = Proxy::ALL.iter().map(|_| None).collect();
    for round in 1..=ROUNDS {
        for (k, &p) in Proxy::ALL.iter().enumerate() {
            if failed[k].is_some() {
                continue;
            }
            let mut bed = Bed::new()?;
            let measured = bed
                .start(p, cpus.map(|(c, _)| c), sluice)
                .context("did not come up")
                .and_then(|()| bed.measure(cpus.map(|(_, w)| w), secs));
            drop(bed);
            match measured {
                Ok(s) => {
                    eprintln!(
                        "[bench]   round {round}: {} — {:.0} requests/s, {:.2} proxy cores, {:.0} backend connections opened, p50 {}, p99 {}{}",
                        p.name(),
                        s.requests_per_sec,
                        s.proxy_cores,
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
    Ok(Proxy::ALL
        .iter()
        .zip(failed)
        .zip(&samples)
        .map(|((&p, failed), s)| match failed {
            Some(why) => unavailable(p, why),
            None => summarise(p, s),
        })
        .collect())
}

/// `why` for a table cell: its first line, at most 200 characters (the
/// whole of it is in bench.json and was printed as the run went).
fn cell(why: &str) -> String {
    let line = why.lines().next().unwrap_or_default().replace('|', "/");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1e3)
    }
}

/// "`a` against `b`": which leads on rate and on requests per core-second,
/// by how much (bold where `b` leads), and both p99s.
fn reading(a: &Row, b: &Row) -> String {
    let lead = |what: &str, av: f64, bv: f64| {
        let (win, lose, x) = if av >= bv {
            (a, b, av / bv.max(1e-9))
        } else {
            (b, a, bv / av.max(1e-9))
        };
        let text = format!("{} leads on {what}: {x:.2}× {}'s", win.proxy, lose.proxy);
        if std::ptr::eq(win, a) {
            text
        } else {
            format!("**{text}**")
        }
    };
    // Rounds whose ranges overlap cannot tell the two apart.
    let noise = if a.requests_per_sec_min <= b.requests_per_sec_max
        && b.requests_per_sec_min <= a.requests_per_sec_max
    {
        " The rounds' rate ranges overlap: the rate difference is within this run's noise."
    } else {
        ""
    };
    format!(
        "- {} against {}: {}; {}; p99 {} against {}.{noise}",
        a.proxy,
        b.proxy,
        lead("requests a second", a.requests_per_sec, b.requests_per_sec),
        lead(
            "requests per proxy core-second",
            a.requests_per_proxy_core_second,
            b.requests_per_proxy_core_second
        ),
        latency(a.p99_us),
        latency(b.p99_us),
    )
}

/// The L7 table, with a plain reading of Sluice against each baseline.
pub(crate) fn table(s: &mut String, rows: &[Row], secs: u32) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### L7: HTTP/1.1 reverse proxies (namespace testbed, 2 nginx backends; `wrk -t1 -c{CONNECTIONS}`, kept alive; \
         proxies interleaved, {ROUNDS} rounds of {secs} s, a fresh testbed each)\n"
    );
    let _ = writeln!(
        s,
        "| proxy | requests/s, median (min–max) | proxy CPU (cores) | requests per proxy core-second | machine CPU a request | p50 | p99 | backend connections opened | errors |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        if let Some(why) = &r.unavailable {
            let _ = writeln!(
                s,
                "| {} ({}) | {} | | | | | | | |",
                r.proxy,
                r.setup,
                cell(why)
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} ({}) | {:.0} ({:.0}–{:.0}) | {:.2} | {:.0} | {:.1} µs | {} | {} | {:.0} | {} |",
            r.proxy,
            r.setup,
            r.requests_per_sec,
            r.requests_per_sec_min,
            r.requests_per_sec_max,
            r.proxy_cores,
            r.requests_per_proxy_core_second,
            r.machine_us_per_request,
            latency(r.p50_us),
            latency(r.p99_us),
            r.backend_connections,
            r.errors
        );
    }
    let _ = writeln!(
        s,
        "\nEach proxy in the host namespace on the VIP's port 80 with one worker (HAProxy `nbthread 1`, nginx \
         `worker_processes 1`, the agent pinned to one CPU, so its runtime has one worker thread), forwarding \
         every request to the same two backends over pooled kept-alive connections; with two CPUs or more the \
         proxy runs on CPU 0 and `wrk` on CPU 1, the backends anywhere. Backends: nginx, one worker each, \
         `return 200 \"ok\\n\"`. Medians over the rounds. *Proxy CPU*: utime + stime of the proxy's processes \
         and threads over the measured run (tick accounting: includes softirq work run in their context), in \
         CPU seconds a second. *Machine CPU a request*: every CPU's busy time (/proc/stat) over the requests, \
         `wrk`, the backends and anything else the machine runs included. Latency: `wrk --latency` \
         percentiles. *Backend connections opened*: what the two backends accepted during the measured run \
         (nginx `stub_status`); with pooling at work, at most about the pool's size. *Errors*: socket errors \
         and answers other than 2xx/3xx, all rounds.\n"
    );
    let of = |p: Proxy| {
        rows.iter()
            .find(|r| r.proxy == p.name() && r.unavailable.is_none())
    };
    match of(Proxy::Sluice) {
        Some(sl) => {
            for b in [Proxy::Haproxy, Proxy::Nginx] {
                if let Some(b) = of(b) {
                    let _ = writeln!(s, "{}", reading(sl, b));
                }
            }
        }
        None => {
            let _ = writeln!(
                s,
                "- Sluice was not measured (the reason is in its row): no comparison with it."
            );
        }
    }
    if let (Some(h), Some(n)) = (of(Proxy::Haproxy), of(Proxy::Nginx)) {
        let _ = writeln!(s, "{}", reading(h, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let out = "Running 10s test @ http://198.18.1.1:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   305.19us  100.53us   3.68ms   83.70%
    Req/Sec   100.71k     3.12k  105.00k    83.00%
  Latency Distribution
     50%  290.00us
     75%  340.00us
     90%  410.00us
     99%    1.25ms
  1002345 requests in 10.00s, 150.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec: 100134.12
Transfer/sec:     15.03MB
";
        let w = parse_wrk(out).expect("parses");
        assert_eq!(
            w,
            Wrk {
                requests: 1_002_345,
                secs: 10.0,
                p50_us: 290.0,
                p99_us: 1250.0,
                errors: 15,
            }
        );
        let clean = out
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_wrk(&clean).expect("parses").errors, 0);
        assert!(
            parse_wrk(&out.replace("99%", "98%")).is_err(),
            "a missing percentile is an error"
        );
    }
}
