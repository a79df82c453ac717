//! Memory: what the kernel charges for the BPF maps (`memlock` in fdinfo),
//! and the agent's resident memory.

use std::{
    collections::HashSet,
    fmt::Write as _,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapInfo, loaded_maps};
use serde::Serialize;
use sluice::config::Config;
use sluice_tests::{harness::Harness, testbed::Testbed};

#[derive(Serialize)]
pub(crate) struct Figures {
    pub(crate) per_service_bytes: u64,
    pub(crate) per_pinned_flow_bytes: f64,
    pub maps_1_service_bytes: u64,
    /// Resident memory of the agent: (all, anonymous). "All" counts the
    /// owner array's pages, which the agent maps and which are the kernel
    /// map's own memory, not a copy.
    pub agent_rss_1_service: (u64, u64),
    pub agent_rss_256_services: (u64, u64),
    pub syn_pins: SynPins,
}

/// Pins made by SYNs of new TCP flows, as fast as the fast path makes
/// them: `BPF_PROG_TEST_RUN`, one SYN of a distinct 5-tuple a run, into
/// the default-sized LRU map.
#[derive(Serialize)]
pub(crate) struct SynPins {
    pub syns: u32,
    pub capacity: u32,
    /// Runs that redirected (pinned and delivered) the SYN.
    pub redirected: u32,
    /// The program's own time a SYN (the kernel's durations, summed).
    pub program_ns_per_syn: f64,
    /// SYNs a second through the whole loop (frame, syscall, program).
    pub wall_syns_per_sec: f64,
    /// The program's time a SYN, per tenth of the run: whether a filling
    /// map slows the inserts.
    pub tenths_ns: Vec<f64>,
    /// Entries in the map after the run: fewer than `syns` means the LRU
    /// evicted before it was full.
    pub entries_after: u32,
}

/// Drives `syns` SYNs of distinct 5-tuples at a pinning TCP service.
fn syn_pins(syns: u32) -> anyhow::Result<SynPins> {
    const SYN: u8 = 0x02;
    let toml = "[[service]]\nname = \"web\"\nvip = \"198.18.1.1\"\nport = 443\nprotocol = \"tcp\"\n\
                [[service.instance]]\nname = \"web-0\"\nveth = \"v0\"\n\
                [[service.instance]]\nname = \"web-1\"\nveth = \"v1\"\n";
    let cfg = Config::parse(toml, Path::new("bench.toml"))?;
    let mut h = Harness::from_config(&cfg);
    let (mut redirected, mut kernel_ns) = (0u32, 0u128);
    let mut tenths = Vec::new();
    let mut tenth_ns = 0u128;
    let tenth = (syns / 10).max(1);
    let t = Instant::now();
    for i in 0..syns {
        // Distinct 5-tuples: source addresses over 198.18.0.0/15 and
        // ports from 1024.
        let b = i.to_be_bytes();
        let src = std::net::SocketAddr::from((
            [198, 0x12 | (b[0] & 1), b[1], b[2]],
            1024 + u16::from(b[3]),
        ));
        let frame = sluice_tests::packet::Packet::tcp(
            src,
            std::net::SocketAddr::from(([198, 18, 1, 1], 443)),
            SYN,
        )
        .build();
        let r = h.run(&frame);
        if r.action == sluice_tests::harness::XDP_REDIRECT {
            redirected += 1;
        }
        kernel_ns += r.duration_ns;
        tenth_ns += r.duration_ns;
        if (i + 1) % tenth == 0 {
            #[expect(clippy::cast_precision_loss, reason = "a mean")]
            tenths.push(tenth_ns as f64 / f64::from(tenth));
            tenth_ns = 0;
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let capacity = h.plan.pinned_flows;
    let map =
        h.dp.ebpf_mut()
            .map_mut(sluice_common::maps::names::PINNED)
            .context("PINNED map")?;
    let pins: aya::maps::HashMap<
        &mut aya::maps::MapData,
        sluice_common::maps::PinKey,
        sluice_common::maps::Pin,
    > = aya::maps::HashMap::try_from(map)?;
    let entries_after = u32::try_from(pins.keys().flatten().count())?;
    #[expect(clippy::cast_precision_loss, reason = "means")]
    Ok(SynPins {
        syns,
        capacity,
        redirected,
        program_ns_per_syn: kernel_ns as f64 / f64::from(syns.max(1)),
        wall_syns_per_sec: f64::from(syns) / wall,
        tenths_ns: tenths,
        entries_after,
    })
}

fn memlock(info: &MapInfo) -> anyhow::Result<u64> {
    let fd = info.fd()?;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("memlock:")
                .and_then(|v| v.trim().parse().ok())
        })
        .context("no memlock in fdinfo")
}

fn map_ids() -> HashSet<u32> {
    loaded_maps()
        .filter_map(Result::ok)
        .map(|m| m.id())
        .collect()
}

/// Memory of every map a harness loaded for `toml`, and of its PINNED map
/// with its capacity.
fn maps_of(toml: &str) -> anyhow::Result<(u64, u64, u32)> {
    let before = map_ids();
    let cfg = Config::parse(toml, Path::new("bench.toml"))?;
    let h = Harness::from_config(&cfg);
    let (mut total, mut pinned, mut cap) = (0, 0, 0);
    // Only this harness's maps: the program's names, the newest of each
    // (another part of the run may still be releasing its own).
    let mut newest: std::collections::HashMap<String, MapInfo> = std::collections::HashMap::new();
    for m in loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| !before.contains(&m.id()))
    {
        let Some(name) = m.name_as_str().map(str::to_owned) else {
            continue;
        };
        // The kernel keeps 15 characters of a map's name.
        if !sluice_common::maps::names::ALL
            .iter()
            .any(|n| n.get(..15).unwrap_or(n) == name)
        {
            continue;
        }
        if newest.get(&name).is_none_or(|o| o.id() < m.id()) {
            newest.insert(name, m);
        }
    }
    for m in newest.into_values() {
        let bytes = memlock(&m)?;
        total += bytes;
        if m.name_as_str() == Some("PINNED") {
            pinned = bytes;
            cap = m.max_entries();
        }
    }
    drop(h);
    Ok((total, pinned, cap))
}

fn services_toml(n: usize, veths: &[(String, [u8; 6])]) -> String {
    let mut s = String::new();
    for (i, (veth, mac)) in veths.iter().enumerate().take(n) {
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let _ = write!(
            s,
            "[[service]]\nname = \"s{i}\"\nvip = \"198.18.{}.{}\"\nport = 9000\nprotocol = \"udp\"\n\
             [[service.instance]]\nname = \"s{i}-0\"\nveth = \"{veth}\"\nmac = \"{mac}\"\n",
            2 + i / 250,
            1 + i % 250
        );
    }
    s
}

/// Starts the real `sluice run` in the testbed's host namespace, waits for
/// its API to answer, reads its resident memory, and stops it.
fn agent_rss(sluice: &Path, tb: &Testbed, toml: &str) -> anyhow::Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, toml)?;
    let sock = dir.path().join("agent.sock");
    let pins = format!("/sys/fs/bpf/sluice-bench-{}", std::process::id());
    // nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs.
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.host))
        .arg(sluice)
        .args([
            "run",
            "--iface",
            sluice_tests::testbed::NIC,
            "--stats-interval",
            "0",
            "--cleanup",
        ])
        .args([
            "--pin-dir",
            &pins,
            "--metrics-addr",
            "127.0.0.1:9477",
            "--config",
        ])
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("state.json"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--report-dir")
        .arg(dir.path().join("report"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", sluice.display()))?;
    let t = Instant::now();
    let ready = loop {
        if sluice::api::call(&sock, &sluice::api::Request::Status {}).is_ok() {
            break true;
        }
        if t.elapsed() > Duration::from_secs(30) || child.try_wait()?.is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = child.id();
    // nsenter execs the agent, so the child's pid is the agent's.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // SAFETY: signalling the child we started, by its pid.
    unsafe { libc::kill(i32::try_from(pid)?, libc::SIGTERM) };
    let _ = child.wait();
    if !ready {
        bail!("the agent did not come up");
    }
    let field = |name: &str| -> anyhow::Result<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

pub(crate) fn run(sluice: &Path) -> anyhow::Result<Figures> {
    let veths_for = |n: usize| -> Vec<(String, [u8; 6])> {
        (0..n)
            .map(|i| {
                let b = u16::try_from(i).expect("few").to_be_bytes();
                (format!("v{i}"), [2, 0x5c, 0, 0, b[0], b[1]])
            })
            .collect()
    };
    let (one, pinned, cap) = maps_of(&services_toml(1, &veths_for(1)))?;
    let (many, _, _) = maps_of(&services_toml(256, &veths_for(256)))?;
    let tb = Testbed::new("mem", 0)?;
    let veths = tb.local_veths(256)?;
    let rss1 = agent_rss(sluice, &tb, &services_toml(1, &veths))?;
    let rss256 = agent_rss(sluice, &tb, &services_toml(256, &veths))?;
    drop(tb);
    let syn_pins = syn_pins(1_000_000)?;
    Ok(Figures {
        per_service_bytes: (many - one) / 255,
        #[expect(clippy::cast_precision_loss, reason = "bytes")]
        per_pinned_flow_bytes: pinned as f64 / f64::from(cap.max(1)),
        maps_1_service_bytes: one,
        agent_rss_1_service: rss1,
        agent_rss_256_services: rss256,
        syn_pins,
    })
}
