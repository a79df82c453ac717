//! The commands that are not the agent itself: checking a config, taking
//! down a pinned data path, and the local API's clients (`status`,
//! `groups`, `drain`, `undrain`, `report`) with their tables.
//!
//! May import `api` (the client), `config`, `control` (the report type)
//! and `datapath` (pins).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    api::{self, InstanceLine, Request},
    config::Config,
    control::qos::Report,
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

fn instances(api_socket: &Path) -> anyhow::Result<Vec<InstanceLine>> {
    Ok(api::call(api_socket, &Request::Status {})?
        .instances
        .unwrap_or_default())
}

/// `sluice status`: one line per instance.
pub fn status(api_socket: &Path) -> anyhow::Result<()> {
    // Ask first: no table header above an error.
    let instances = instances(api_socket)?;
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
    println!(
        "{}{:<16} {:<16} {:>6} {:>10} {:>8}  groups",
        if cluster {
            format!("{:<12} ", "host")
        } else {
            String::new()
        },
        "service",
        "instance",
        "util",
        "pps",
        "drops/s"
    );
    for i in instances {
        println!(
            "{}{:<16} {:<16} {:>6.2} {:>10.0} {:>8.0}  {}{}",
            host(&i),
            i.service,
            i.name,
            i.utilisation,
            i.rate_pps,
            i.drops_ps,
            i.groups.join(" "),
            if i.drained { "  (drained)" } else { "" }
        );
    }
    Ok(())
}

/// `sluice groups SERVICE`: the service's groups and owners.
pub fn groups(api_socket: &Path, service: String) -> anyhow::Result<()> {
    let answer = api::call(api_socket, &Request::Groups { service })?;
    let groups = answer.groups.unwrap_or_default();
    if groups.iter().any(|g| !g.host.is_empty()) {
        println!(
            "{:<12} {:<16} {:<12} {:>8}",
            "group", "owner", "host", "version"
        );
        for g in groups {
            println!(
                "{:<12} {:<16} {:<12} {:>8}",
                g.group, g.owner, g.host, g.version
            );
        }
    } else {
        println!("{:<12} {:<16} {:>8}", "group", "owner", "version");
        for g in groups {
            println!("{:<12} {:<16} {:>8}", g.group, g.owner, g.version);
        }
    }
    Ok(())
}

/// `sluice drain INSTANCE`: asks the agent to drain, then shows progress
/// until no group is left or `timeout` seconds passed.
pub fn drain(api_socket: &Path, instance: &str, timeout: u64) -> anyhow::Result<()> {
    let left = |list: &[InstanceLine]| {
        list.iter()
            .find(|i| i.name == instance)
            .map_or(0, |i| i.groups.len())
    };
    let total = left(&instances(api_socket)?);
    api::call(
        api_socket,
        &Request::Drain {
            instance: instance.to_owned(),
        },
    )?;
    let start = Instant::now();
    let mut last = usize::MAX;
    loop {
        let now = left(&instances(api_socket)?);
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
