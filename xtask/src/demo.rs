//! `cargo xtask demo`: builds the demo and the agent, runs the demo, and
//! then checks that it left nothing behind — no process, network namespace
//! or pinned map of its own — removing and naming what it finds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, require_root, setup};

/// What the one-host demo shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// A throttled instance sheds work, and takes work back once it
    /// recovers.
    Shed,
    /// Instances launched as the load steps up, stopped as it falls.
    Scale,
}

/// Builds and runs the demo for `hosts` and `scenario`; fails when the demo
/// fails (it checks its own story) or leaves anything behind.
pub(crate) fn demo(
    root: &Path,
    seconds: u64,
    rate: Option<u64>,
    hosts: u64,
    scenario: Scenario,
) -> anyhow::Result<()> {
    if scenario == Scenario::Scale && hosts > 1 {
        bail!("--scenario scale runs on one host: leave out --hosts");
    }
    let env = setup::ensure(false)?;
    require_root("the demo creates network namespaces and attaches an XDP program")?;
    eprintln!("[demo] building");
    let (bin, default_rate) = match (hosts, scenario) {
        (1, Scenario::Shed) => ("sluice-demo", 8000),
        (1, Scenario::Scale) => ("sluice-scale-demo", 3000),
        _ => ("sluice-cluster-demo", 6000),
    };
    // The agent too: the cluster and scale demos run it as a process. (A
    // `--bin` names a target of every `--package` given, so each package
    // names its own.)
    cargo(
        &env,
        &[
            "build",
            "--quiet",
            "--package",
            "sluice-tests",
            "--bin",
            bin,
            "--package",
            "sluice",
            "--bin",
            "sluice",
        ],
        false,
    )?;
    let mut cmd = Command::new(root.join("target/debug").join(bin));
    cmd.args([
        "--seconds",
        &seconds.to_string(),
        "--rate",
        &rate.unwrap_or(default_rate).to_string(),
    ]);
    if hosts > 1 {
        cmd.args(["--hosts", &hosts.to_string()]);
    }
    if hosts > 1 || scenario == Scenario::Scale {
        cmd.env("SLUICE_BIN", root.join("target/debug/sluice"));
    }
    // Processes the demo leaves running become our children, so they can
    // be found below.
    // SAFETY: prctl with an integer argument; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "[demo] cannot watch for processes left behind: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", root.join("target/debug").join(bin).display()))?;
    let pid = child.id();
    // Ctrl-C reaches the demo too (same process group): it cleans up and
    // exits, and we check after it.
    // SAFETY: ignoring a signal installs no handler.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait().context("waiting for the demo")?;
    let left = sweep(pid);
    if !status.success() {
        if !left.is_empty() {
            eprintln!("[demo] it also left behind: {}", left.join(", "));
        }
        bail!("{bin} failed: {status}");
    }
    if !left.is_empty() {
        bail!("{bin} left behind (now removed): {}", left.join(", "));
    }
    Ok(())
}

/// Removes what the demo of process `pid` left: its processes (reparented
/// to us), its network namespaces (the testbed's `sl-demo-PID-…` or
/// `sl-sdemo-PID-…`, the scale demo's launched `sl-demo-s…`) and its pinned
/// maps (`/sys/fs/bpf/sluice-test-…-PID`). Returns what it found.
fn sweep(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    // What the demo killed on its way out may still be exiting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut running = children();
    while !running.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        running = children();
    }
    // A killed process's own children become ours in turn: a few rounds.
    for _ in 0..5 {
        if running.is_empty() {
            break;
        }
        for p in running {
            left.push(format!("process {p} ({})", comm(p)));
            kill(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        running = children();
    }
    let ours = |name: &str| {
        name.starts_with(&format!("sl-demo-{pid}-"))
            || name.starts_with(&format!("sl-sdemo-{pid}-"))
            || name.starts_with("sl-demo-s")
    };
    for ns in entries("/run/netns").into_iter().filter(|n| ours(n)) {
        left.push(format!("network namespace {ns}"));
        let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
        for p in pids
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            left.push(format!("process {p} ({}) in {ns}", comm(p)));
            kill(p);
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    for pins in entries("/sys/fs/bpf")
        .into_iter()
        .filter(|n| n.starts_with("sluice-test-") && n.ends_with(&format!("-{pid}")))
    {
        left.push(format!("pinned maps /sys/fs/bpf/{pins}"));
        let _ = std::fs::remove_dir_all(PathBuf::from("/sys/fs/bpf").join(&pins));
    }
    left
}

/// Our children still running (what the demo left behind, reparented to
/// us); the ones that have exited are reaped on the way.
fn children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut running = Vec::new();
    for p in entries("/proc")
        .into_iter()
        .filter_map(|d| d.parse::<i32>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the fields after the last `)`.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid != Some(me.as_str()) {
            continue;
        }
        if state == Some("Z") {
            // SAFETY: reaps our own exited child.
            unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG) };
        } else {
            running.push(p);
        }
    }
    running
}

/// Kills process `p` (one the demo started) and reaps it if it is ours.
fn kill(p: i32) {
    // SAFETY: a process the demo started, by pid.
    unsafe {
        libc::kill(p, libc::SIGKILL);
        libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG);
    }
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn entries(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
