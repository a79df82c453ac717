//! Processes the L7 bench starts, and how it waits for them.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sluice_tests::netns;

/// A process this bench started, stopped by its own pid on drop (also on
/// panic): SIGTERM, then SIGKILL to it and to the children it had if it
/// has not exited within 5 s. Started through `nsenter` and `taskset`,
/// which both exec, so the child's pid is the program's own.
pub(super) struct Daemon {
    what: String,
    child: Child,
    pub(super) log: PathBuf,
}

impl Daemon {
    /// Starts `program` (its program and arguments) in namespace `ns` (not
    /// `ip netns exec`: that remounts /sys, hiding bpffs from the agent), on
    /// CPUs `cpu` (a `taskset -c` list) if given, its stdout and stderr to `log`.
    pub(super) fn start(
        what: &str,
        ns: &str,
        cpu: Option<&str>,
        log: PathBuf,
        program: &Command,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"));
        if let Some(cpu) = cpu {
            cmd.args(["taskset", "-c", cpu]);
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why it no longer runs, with the end of its log, if it exited.
    pub(super) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(format!("{} exited ({status}): {}", self.what, self.tail())),
            Err(e) => Some(format!("{}: {e}", self.what)),
        }
    }

    /// The last lines of its log, on one line.
    pub(super) fn tail(&self) -> String {
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
    pub(super) fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
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

pub(super) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: signalling a process this bench started (or its child,
        // checked by start time), by its pid.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Field `i` of /proc/PID/stat, counted from the state (field 3) as 0:
/// 1 is the parent's pid, 19 the start time.
pub(super) fn stat_field(pid: u32, i: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(i)?.parse().ok()
}

/// `pid` and every process descended from it.
pub(super) fn tree(pid: u32) -> Vec<u32> {
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
pub(super) struct Pins(pub(super) PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = sluice::datapath::xdp::XdpDatapath::remove_pins(&self.0);
    }
}

/// `GET path` over a new connection from namespace `ns`: the status code
/// and the body (with whatever framing the server chose).
pub(super) fn get(ns: &str, addr: SocketAddrV4, path: &str) -> anyhow::Result<(u16, String)> {
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
pub(super) fn wait_ready(
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
