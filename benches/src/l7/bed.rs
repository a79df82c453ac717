//! One run's testbed: namespaces, backends, the proxy under test.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sluice_tests::{
    netns,
    testbed::{self, Testbed},
};

use super::{
    BACKEND_PORT, CONNECTIONS, INSTANCES, POOL, Proxy, SLUICE_START_TIMEOUT, START_TIMEOUT, Sample,
    Scenario, USERS, VIP_PORT, WARM_UP_SECS,
    daemon::{Daemon, Pins, get, tree, wait_ready},
    report::{Wrk, parse_wrk},
};
use crate::e2e::{self, pids_ns, system_cpu};

/// An nginx config: `workers` worker processes in the foreground, every file of its own
/// under `dir`, no access log, long kept-alive client connections, and
/// `servers` in the `http` block.
fn nginx_conf(dir: &Path, workers: usize, servers: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
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
    cpu: Option<&str>,
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
pub(super) struct Bed {
    scenario: Scenario,
    proxy: Option<Daemon>,
    pins: Option<Pins>,
    backends: Vec<Daemon>,
    dir: tempfile::TempDir,
    tb: Testbed,
}

impl Bed {
    /// A fresh testbed with both backends answering.
    pub(super) fn new(scenario: Scenario) -> anyhow::Result<Self> {
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
                1,
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
            scenario,
            proxy: None,
            pins: None,
            backends,
            dir,
            tb,
        })
    }

    /// The proxy's pid, once started.
    pub(super) fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(Daemon::pid)
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
    pub(super) fn start(
        &mut self,
        p: Proxy,
        cpu: Option<&str>,
        sluice: &Path,
    ) -> anyhow::Result<()> {
        let (proxy, limit) = match p {
            Proxy::Haproxy => (self.haproxy(cpu)?, START_TIMEOUT),
            Proxy::Nginx => (self.nginx(cpu)?, START_TIMEOUT),
            Proxy::Sluice | Proxy::SluiceBaseline => {
                (self.sluice(cpu, sluice)?, SLUICE_START_TIMEOUT)
            }
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

    fn haproxy(&self, cpu: Option<&str>) -> anyhow::Result<Daemon> {
        self.vip_local()?;
        let mut servers = String::new();
        for (k, a) in self.backend_addrs() {
            let _ = writeln!(servers, "    server web-{k} {a}");
        }
        let balance = if self.scenario.keyed {
            "balance hdr(X-User)\n    hash-type consistent"
        } else {
            "balance roundrobin"
        };
        let conf = format!(
            "global\n    nbthread {}\n    maxconn 4096\n\
             defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    \
             timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    timeout http-keep-alive 60s\n\
             frontend web\n    bind {}:{VIP_PORT}\n    default_backend instances\n\
             backend instances\n    {balance}\n{servers}",
            self.scenario.workers,
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

    fn nginx(&self, cpu: Option<&str>) -> anyhow::Result<Daemon> {
        self.vip_local()?;
        let mut upstream = String::new();
        for (_, a) in self.backend_addrs() {
            let _ = writeln!(upstream, "    server {a};");
        }
        if self.scenario.keyed {
            upstream.push_str("    hash $http_x_user consistent;\n");
        }
        let d = self.dir.path().join("proxy");
        let conf = nginx_conf(
            &d,
            self.scenario.workers,
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
    fn sluice(&mut self, cpu: Option<&str>, bin: &Path) -> anyhow::Result<Daemon> {
        if !bin.exists() {
            bail!(
                "{} not found: build it (`cargo build --release -p sluice`; `cargo xtask bench` does) or pass --sluice",
                bin.display()
            );
        }
        let dir = self.dir.path();
        let config = dir.join("sluice.toml");
        std::fs::write(&config, sluice_toml(&self.tb, self.scenario.keyed))?;
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
    pub(super) fn wrk(&self, cpu: Option<&str>, secs: u32) -> anyhow::Result<Wrk> {
        let url = format!("http://{}:{VIP_PORT}/", testbed::VIP_V4);
        let mut cmd = Command::new("wrk");
        cmd.arg("-t1")
            .arg(format!("-c{CONNECTIONS}"))
            .arg(format!("-d{secs}s"))
            .args(["--timeout", "2s", "--latency"]);
        if self.scenario.keyed {
            // Each request a user of its own, cycling: every user's unit
            // (or hash) is hit as often.
            let script = self.dir.path().join("keyed.lua");
            std::fs::write(
                &script,
                format!(
                    "local n = 0\nrequest = function()\n  n = (n + 1) % {USERS}\n  \
                     return wrk.format(nil, nil, {{ [\"X-User\"] = \"user-\" .. n }})\nend\n"
                ),
            )?;
            cmd.arg("-s").arg(script);
        }
        let mut w = Daemon::start(
            "wrk",
            &self.tb.client,
            cpu,
            self.dir.path().join("wrk.out"),
            cmd.arg(&url),
        )?;
        let status = w.wait(Duration::from_secs(u64::from(secs) + 20))?;
        if !status.success() {
            bail!("wrk failed ({status}): {}", w.tail());
        }
        let out = std::fs::read_to_string(&w.log)?;
        parse_wrk(&out).with_context(|| format!("reading wrk's output:\n{out}"))
    }

    /// A warm-up run, then the measured one with the proxy's CPU around it.
    pub(super) fn measure(&self, wrk_cpu: Option<&str>, secs: u32) -> anyhow::Result<Sample> {
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
fn sluice_toml(tb: &Testbed, keyed: bool) -> String {
    let mut s = format!(
        "[agent]\ninterval_ms = 1000\n\n[[service]]\nname = \"web\"\nvip = \"{}\"\nport = {VIP_PORT}\n\
         protocol = \"tcp\"\nlayer = \"http\"\n\n[service.http]\npool_size = {POOL}\n{}",
        testbed::VIP_V4,
        if keyed {
            "key = { header = \"X-User\" }\n"
        } else {
            ""
        }
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
