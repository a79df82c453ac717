//! The real `sluice` binary as a process: a network namespace of the
//! test's own with veths in it, the agent started there (stopped by its pid
//! on drop), and the CLI run against it.
//!
//! The binary is `target/<profile>/sluice` next to the test's own
//! directory (`cargo xtask test` builds it first), or `$SLUICE_BIN`.

use std::{
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A network namespace of this test, deleted on drop (with its links).
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The agent a test started, stopped by its pid on drop.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Only while it runs: a reaped child's pid may be someone else's.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling the child this test started, still running.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// A namespace with the "NIC" veth `nic0` and `n` instance veths `v<i>`
/// (peers `p<i>` with MAC `02:5c:00:00:00:<i+1>`), all up.
#[must_use]
pub fn netns(tag: &str, n: usize) -> Netns {
    assert!(crate::is_root(), "run as root: the agent attaches XDP");
    let ns = Netns(format!("sl-{tag}-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // No IPv6 autoconfiguration chatter: tests count the frames on links.
    for key in ["all", "default"] {
        ip(&[
            "netns",
            "exec",
            &ns.0,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
        ]);
    }
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ns.0, "link", "add", "nic0", "type", "veth", "peer", "name", "wire0",
    ]);
    let mut devs = vec!["nic0".to_owned(), "wire0".to_owned()];
    for i in 0..n {
        let mac = format!("02:5c:00:00:00:{:02x}", i + 1);
        ip(&[
            "-n",
            &ns.0,
            "link",
            "add",
            &format!("v{i}"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("p{i}"),
            "address",
            &mac,
        ]);
        devs.extend([format!("v{i}"), format!("p{i}")]);
    }
    for d in &devs {
        ip(&["-n", &ns.0, "link", "set", d, "up"]);
    }
    ns
}

/// Config instance tables for the namespace's `n` instance veths.
#[must_use]
pub fn instances_toml(service: &str, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "[[service.instance]]\nname = \"{service}-{i}\"\nveth = \"v{i}\"\nmac = \"02:5c:00:00:00:{:02x}\"\n",
            i + 1
        );
    }
    out
}

/// How to start an agent.
pub struct Start<'a> {
    pub config: &'a str,
    /// bpffs directory to pin in.
    pub pin_dir: &'a Path,
    /// Coordination store file (kept across restarts).
    pub state: &'a Path,
    /// Remove the pins when the agent exits.
    pub cleanup: bool,
    pub metrics_port: u16,
}

/// A bpffs directory for this test's pins, removed (with what is pinned in
/// it) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    #[must_use]
    pub fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/sluice-test-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = sluice::datapath::xdp::XdpDatapath::remove_pins(&self.0);
    }
}

/// The `sluice run` command for `s` in `ns`, its files in `dir`.
fn run_command(ns: &str, iface: &str, s: &Start<'_>, dir: &Path) -> Command {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, s.config).expect("config");
    let socket = dir.join("agent.sock");
    // Instances' reporters run as other users: they must reach the report
    // sockets inside (the control socket's own mode keeps them out of it).
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    // nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args([
            sluice_bin().to_str().expect("utf-8 path"),
            "run",
            "--iface",
            iface,
            "--stats-interval",
            "0",
        ])
        .arg("--config")
        .arg(&path)
        .arg("--state")
        .arg(s.state)
        .arg("--api-socket")
        .arg(&socket)
        .arg("--report-dir")
        .arg(dir.join("report"))
        .arg("--pin-dir")
        .arg(s.pin_dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{}", s.metrics_port)])
        .stdout(Stdio::null())
        // To a file: a pipe nobody reads would fill and stall the agent,
        // and the log tells what went wrong when a test fails.
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("agent log"));
    if s.cleanup {
        cmd.arg("--cleanup");
    }
    cmd
}

/// Starts `sluice run` in `ns` on `nic0` and waits until its API answers.
#[must_use]
pub fn start(ns: &Netns, s: &Start<'_>) -> Agent {
    start_on(&ns.0, "nic0", s)
}

/// Starts `sluice run` in namespace `ns` on interface `iface` (a
/// [`crate::testbed::Testbed`]'s host and `nic`) and waits until its API
/// answers.
#[must_use]
pub fn start_on(ns: &str, iface: &str, s: &Start<'_>) -> Agent {
    start_limited(ns, iface, s, None, &[])
}

/// As [`start`], with `env` added to the agent's environment (e.g.
/// `NOTIFY_SOCKET`, as systemd sets it).
#[must_use]
pub fn start_with_env(ns: &Netns, s: &Start<'_>, env: &[(&str, &Path)]) -> Agent {
    start_limited(&ns.0, "nic0", s, None, env)
}

/// As [`start_on`], the agent started with the open-file limits `soft` and
/// `hard` (e.g. the usual soft limit, 1,024), whatever this process has.
#[must_use]
pub fn start_on_with_nofile(ns: &str, iface: &str, s: &Start<'_>, soft: u64, hard: u64) -> Agent {
    start_limited(ns, iface, s, Some((soft, hard)), &[])
}

fn start_limited(
    ns: &str,
    iface: &str,
    s: &Start<'_>,
    nofile: Option<(u64, u64)>,
    env: &[(&str, &Path)],
) -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let mut cmd = run_command(ns, iface, s, dir.path());
    cmd.envs(env.iter().copied());
    if let Some((soft, hard)) = nofile {
        use std::os::unix::process::CommandExt as _;
        let limit = rustix::process::Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        };
        // SAFETY: between fork and exec only setrlimit runs, a plain
        // system call (async-signal-safe), on a value made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                    .map_err(Into::into)
            });
        }
    }
    let child = cmd.spawn().expect("start sluice");
    let mut agent = Agent { child, socket, dir };
    let t = Instant::now();
    while sluice::api::call(&agent.socket, &sluice::api::Request::Status {}).is_err() {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            let err = agent.log();
            panic!("the agent exited ({status}): {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// Runs `sluice run` in `ns` expecting it to fail at start: returns its
/// exit status and what it wrote to stderr. Panics if it is still running
/// after 30 s (and ends it).
#[must_use]
pub fn start_failing(ns: &Netns, s: &Start<'_>) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = run_command(&ns.0, "nic0", s, dir.path())
        .spawn()
        .expect("start sluice");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent was expected to fail at start, but it runs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    (status, err)
}

impl Agent {
    /// What the agent has logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The report socket of `instance`.
    #[must_use]
    pub fn report_socket(&self, instance: &str) -> PathBuf {
        self.dir
            .path()
            .join("report")
            .join(format!("{instance}.sock"))
    }

    /// The config file the agent was started with.
    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sluice.toml")
    }

    /// Sends SIGHUP: reload the config.
    pub fn hup(&self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGHUP) };
    }

    /// Whether the agent still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Kills the agent (SIGKILL: it cleans nothing up) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the agent to exit.
    #[must_use]
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGTERM) };
        self.child.wait().expect("wait for the agent")
    }
}

/// The `sluice` binary under test.
#[must_use]
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    // Test binaries live in target/<profile>/deps.
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("sluice")))
        .expect("the test binary has a target directory");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p sluice`; `cargo xtask test` does) or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// Runs a `sluice` CLI command.
#[must_use]
pub fn sluice(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .args(args)
        .output()
        .expect("run sluice")
}

/// The `sluice` CLI as user and group `uid` (e.g. 65534, nobody), in the
/// network namespace `netns` when given (else this process's).
#[must_use]
pub fn sluice_as(uid: u32, netns: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("nsenter");
    if let Some(ns) = netns {
        cmd.arg(format!("--net=/run/netns/{ns}"));
    }
    cmd.args(["--setuid", &uid.to_string(), "--setgid", &uid.to_string()])
        .arg(sluice_bin())
        .args(args)
        .output()
        .expect("run sluice")
}

/// GET /metrics of an agent, from inside its namespace `ns`.
pub fn scrape(ns: &str, port: u16) -> std::io::Result<String> {
    use std::io::Write as _;
    crate::netns::run_in(ns, || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    })
}

/// The value of the sample `name{labels}` (labels as written in the
/// exposition, e.g. `action="delivered"`) in a scrape, or 0.
#[must_use]
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
