//! The commands that are not the agent itself: checking a config, taking
//! down a pinned data path, an `XDP_PASS` program for test veths, and the
//! local API's clients (`status`,
//! `groups`, `drain`, `undrain`, `report`) with their tables.
//!
//! May import `api` (the client), `config`, `control` (the report type)
//! and `datapath` (pins).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    api::{
        self, FenceLine, GroupLine, InstanceLine, InstanceSpec, RegisteredLine, Request, ScaleLine,
    },
    config::Config,
    control::{InstanceState, qos::Report},
    datapath::xdp::{XdpDatapath, default_pin_dir},
};

/// `sluice check-config`: checks a file and prints what it would program.
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for s in &config.services {
        let list = |items: Vec<String>| items.join(",");
        println!(
            "service {}: {} {} port {} tag {:?} pin {:?}, {} instance(s)",
            s.name,
            list(s.protocols.iter().map(ToString::to_string).collect()),
            list(s.vips.iter().map(ToString::to_string).collect()),
            list(s.ports.iter().map(ToString::to_string).collect()),
            s.tag,
            s.pin,
            s.instances.len()
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn instances(api_socket: &Path) -> anyhow::Result<(Vec<InstanceLine>, Option<FenceLine>)> {
    let answer = api::call(api_socket, &Request::Status {})?;
    Ok((answer.instances.unwrap_or_default(), answer.fence))
}

/// The fence's line under the status table: how this host's lease stands.
fn fence_line(f: &FenceLine) -> String {
    let secs = |ms: u64| format!("{:.1} s", Duration::from_millis(ms).as_secs_f64());
    let deadline = match f.deadline_in_ms {
        None => "none".to_owned(),
        Some(ms) if ms <= 0 => format!("passed {} ago", secs(ms.unsigned_abs())),
        Some(ms) => format!("in {}", secs(ms.unsigned_abs())),
    };
    format!(
        "fence: {}, deadline {deadline}, last renewal sent {} ago, {} peers",
        f.state,
        secs(f.renewed_ago_ms),
        f.peers
    )
}

/// `sluice status`: one line per instance, and the fence's (a cluster's).
pub fn status(api_socket: &Path) -> anyhow::Result<()> {
    // Ask first: no table header above an error.
    let (instances, fence) = instances(api_socket)?;
    print!("{}", status_table(&instances));
    if let Some(f) = &fence {
        println!("{}", fence_line(f));
    }
    // An older agent has no `instances` request: the table above is all.
    if let Ok((_, scale)) = registered(api_socket) {
        print_scale(&scale);
    }
    Ok(())
}

/// The `status` table: one line per instance.
fn status_table(instances: &[InstanceLine]) -> String {
    let mut out = String::new();
    let cluster = instances.iter().any(|i| !i.host.is_empty());
    let host = |i: &InstanceLine| {
        if cluster {
            format!(
                "{:<12} ",
                if i.live {
                    i.host.clone()
                } else {
                    format!("{} (gone)", i.host)
                }
            )
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        out,
        "{}{:<16} {:<16} {:<8} {:>6} {:>10} {:>8}  groups",
        if cluster {
            format!("{:<12} ", "host")
        } else {
            String::new()
        },
        "service",
        "instance",
        "state",
        "util",
        "pps",
        "drops/s"
    );
    for i in instances {
        // An older agent says only `drained`.
        let state = if i.drained && i.state == InstanceState::Ok {
            InstanceState::Drained
        } else {
            i.state
        };
        // A failed instance is not idle: its figure says nothing.
        let util = if state == InstanceState::Failed {
            "-".to_owned()
        } else {
            format!("{:.2}", i.utilisation)
        };
        let mut groups = i.groups.join(" ");
        if let Some(why) = &i.failure {
            if !groups.is_empty() {
                groups.push(' ');
            }
            let _ = write!(groups, "(failed: {why})");
        }
        let _ = writeln!(
            out,
            "{}{:<16} {:<16} {:<8} {:>6} {:>10.0} {:>8.0}  {}",
            host(i),
            i.service,
            i.name,
            state.as_str(),
            util,
            i.rate_pps,
            i.drops_ps,
            groups,
        );
    }
    out
}

/// `sluice groups SERVICE`: the service's groups and owners.
pub fn groups(api_socket: &Path, service: String) -> anyhow::Result<()> {
    let answer = api::call(api_socket, &Request::Groups { service })?;
    let groups = answer.groups.unwrap_or_default();
    print!("{}", groups_table(&groups));
    Ok(())
}

/// The `groups` table: one line per group, with its owner's host (in a
/// cluster) and state (`-`: unowned).
fn groups_table(groups: &[GroupLine]) -> String {
    let mut out = String::new();
    let cluster = groups.iter().any(|g| !g.host.is_empty());
    let host = |h: &str| {
        if cluster {
            format!("{h:<12} ")
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        out,
        "{:<12} {:<16} {}{:>8}  state",
        "group",
        "owner",
        host("host"),
        "version"
    );
    for g in groups {
        let state = if g.owner.is_empty() {
            "-"
        } else {
            g.state.as_str()
        };
        let _ = writeln!(
            out,
            "{:<12} {:<16} {}{:>8}  {state}",
            g.group,
            g.owner,
            host(&g.host),
            g.version
        );
    }
    out
}

/// `sluice drain INSTANCE`: asks the agent to drain, then shows progress
/// until no group is left or `timeout` seconds passed.
pub fn drain(api_socket: &Path, instance: &str, timeout: u64) -> anyhow::Result<()> {
    let left = |list: &[InstanceLine]| {
        list.iter()
            .find(|i| i.name == instance)
            .map_or(0, |i| i.groups.len())
    };
    let total = left(&instances(api_socket)?.0);
    api::call(
        api_socket,
        &Request::Drain {
            instance: instance.to_owned(),
        },
    )?;
    let start = Instant::now();
    let mut last = usize::MAX;
    loop {
        let now = left(&instances(api_socket)?.0);
        if now != last {
            println!(
                "{instance}: {}/{total} groups moved",
                total.saturating_sub(now)
            );
            last = now;
        }
        if now == 0 {
            println!("{instance}: drained");
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            anyhow::bail!(
                "{instance}: {now} groups left after {timeout} s; the drain goes on in the agent"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn registered(api_socket: &Path) -> anyhow::Result<(Vec<RegisteredLine>, Vec<ScaleLine>)> {
    let r = api::call(api_socket, &Request::Instances {})?;
    Ok((
        r.registered.unwrap_or_default(),
        r.scale.unwrap_or_default(),
    ))
}

/// `sluice instance add`: registers an instance with the running agent;
/// returns once it is in the data path (or says why not).
pub fn instance_add(api_socket: &Path, spec: InstanceSpec) -> anyhow::Result<()> {
    let r = api::call_waiting(api_socket, &Request::InstanceAdd(spec))?;
    println!("{}", r.done.unwrap_or_default());
    Ok(())
}

/// `sluice instance remove`: asks the agent to remove a registered
/// instance, then shows progress (drain, then its flows) until it is gone
/// or `timeout` seconds passed.
pub fn instance_remove(
    api_socket: &Path,
    instance: &str,
    deadline: Option<f64>,
    timeout: u64,
) -> anyhow::Result<()> {
    let r = api::call(
        api_socket,
        &Request::InstanceRemove {
            instance: instance.to_owned(),
            deadline_secs: deadline,
        },
    )?;
    println!("{}", r.done.unwrap_or_default());
    let start = Instant::now();
    let mut shown = String::new();
    loop {
        let (list, _) = registered(api_socket)?;
        let Some(line) = list.iter().find(|l| l.name == instance) else {
            println!("{instance}: removed");
            return Ok(());
        };
        if line.detail != shown {
            println!("{instance}: {}", line.detail);
            shown.clone_from(&line.detail);
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            anyhow::bail!(
                "{instance}: still {} after {timeout} s ({}); the removal goes on in the agent",
                line.state,
                line.detail
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `sluice instance list`: the registered instances and the scaled
/// services.
pub fn instance_list(api_socket: &Path) -> anyhow::Result<()> {
    let (list, scale) = registered(api_socket)?;
    println!(
        "{:<16} {:<16} {:<16} {:<9} {:<9} {:>6}  detail",
        "service", "instance", "veth", "source", "state", "groups"
    );
    for l in list {
        println!(
            "{:<16} {:<16} {:<16} {:<9} {:<9} {:>6}  {}",
            l.service, l.name, l.veth, l.source, l.state, l.groups, l.detail
        );
    }
    print_scale(&scale);
    Ok(())
}

/// The scaled services' lines, under the instance tables.
fn print_scale(scale: &[ScaleLine]) {
    if scale.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<16} {:>9} {:>5} {:>6} {:>4} {:>4} {:>7}  last decisions",
        "service", "instances", "live", "target", "min", "max", "window"
    );
    for s in scale {
        println!(
            "{:<16} {:>9} {:>5} {:>6} {:>4} {:>4} {:>7}  {}",
            s.service,
            s.instances,
            s.live,
            s.target,
            s.min,
            s.max,
            s.window.map_or_else(|| "-".to_owned(), |w| w.to_string()),
            s.last.join("; ")
        );
    }
}

/// `sluice undrain INSTANCE`.
pub fn undrain(api_socket: &Path, instance: &str) -> anyhow::Result<()> {
    api::call(
        api_socket,
        &Request::Undrain {
            instance: instance.to_owned(),
        },
    )?;
    println!("{instance}: undrained; it may take work again");
    Ok(())
}

/// `sluice report`: an instance's own QoS, to the agent.
pub fn report(api_socket: &Path, report: Report) -> anyhow::Result<()> {
    api::call(api_socket, &Request::Report(report))?;
    Ok(())
}

/// `sluice detach`: takes down a data path a stopped agent left pinned.
pub fn detach(iface: Option<&str>, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match (pin_dir, iface) {
        (Some(d), _) => d,
        (None, Some(i)) => default_pin_dir(i),
        (None, None) => anyhow::bail!("say which data path: --iface IFACE or --pin-dir DIR"),
    };
    if XdpDatapath::remove_unattended_pins(&dir)? {
        println!("{}: detached and removed", dir.display());
    } else {
        println!("{}: nothing pinned there", dir.display());
    }
    Ok(())
}

/// `sluice xdp-pass`: attaches the `XDP_PASS` program to every one of
/// `ifaces`, waits for SIGINT or SIGTERM, and detaches (its links are
/// dropped with the program; a killed process's links go with it too).
pub fn xdp_pass(ifaces: &[String], generic: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use aya::programs::{Xdp, xdp::XdpMode};

    let object = crate::datapath::xdp::objects::EMPTY_XDP;
    anyhow::ensure!(
        !object.is_empty(),
        "this sluice was built without its XDP programs (bpf-linker missing): `cargo xtask build`"
    );
    // Blocked before anything is attached, so a signal that comes early
    // waits for `sigwait` instead of killing the process mid-way.
    let signals = block_term_signals()?;
    let mut ebpf = aya::Ebpf::load(object).context("loading the pass program")?;
    let prog: &mut Xdp = ebpf
        .program_mut("empty")
        .context("program `empty`")?
        .try_into()?;
    prog.load().context("loading the pass program")?;
    let mode = if generic {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    for iface in ifaces {
        prog.attach(iface, mode)
            .with_context(|| format!("attaching XDP_PASS to {iface}"))?;
        println!("{iface}: XDP_PASS attached");
    }
    println!("until SIGINT or SIGTERM");
    let mut sig = 0;
    // SAFETY: waiting on a set built by `block_term_signals`.
    let r = unsafe { libc::sigwait(&raw const signals, &raw mut sig) };
    anyhow::ensure!(r == 0, "sigwait: {}", std::io::Error::from_raw_os_error(r));
    drop(ebpf);
    println!("detached from {}", ifaces.join(", "));
    Ok(())
}

/// Blocks SIGINT and SIGTERM for this thread (the only one) and returns
/// the set, for `sigwait`.
fn block_term_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: a zeroed sigset_t is valid input to sigemptyset, which
    // initialises it; the calls only touch the set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        anyhow::ensure!(
            r == 0,
            "blocking signals: {}",
            std::io::Error::from_raw_os_error(r)
        );
        Ok(set)
    }
}

#[cfg(test)]
mod tests;
