//! End to end on the namespace testbed: packets per second delivered to
//! four instances through Sluice, against the kernel stack doing the same
//! distribution with nftables (DNAT by jhash), with the same generator, in
//! the same run.
//!
//! Two generators drive both paths. `BPF_PROG_TEST_RUN` in live-frames mode
//! on the client's veth: a small XDP program writes each frame's headers
//! from a template, gives it a new source port (4,096 flows) and transmits
//! it — this one saturates. And `sendmmsg` from two threads over 128 UDP
//! sockets, for reference. Each instance's veth runs a sink program that
//! counts and drops the datagrams, so the figure is the distributor's, not
//! the instances' stacks'. Everything shares the machine's cores; "pps per
//! core" divides by all the CPU time the run used, generator included.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode},
};
use serde::Serialize;
use sluice::{config::Config, coord::EmbeddedStore, datapath::xdp::objects};
use sluice_tests::{
    netns,
    packet::Packet,
    testbed::{self, Testbed},
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) generator: String,
    pub(crate) generated_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) cores_busy: f64,
    pub(crate) pps_per_core: f64,
}

const INSTANCES: usize = 4;

/// Busy and total jiffies over all CPUs, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn mac_of(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", dev])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .nth(2)
        .and_then(sluice::config::parse_mac)
        .with_context(|| format!("MAC of {dev} in {ns}: {text:?}"))?;
    Ok(mac)
}

fn sink_total(bench: &Ebpf) -> anyhow::Result<u64> {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(bench.map("SINK_COUNT").context("SINK_COUNT")?)?;
    Ok(map.get(&0, 0)?.iter().sum())
}

/// How frames are made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Generator {
    /// `BPF_PROG_TEST_RUN` live frames, `XDP_TX` on the client's veth.
    LiveFrames,
    /// `sendmmsg` from 2 threads × 64 UDP sockets in the client namespace.
    Sendmmsg,
}

impl Generator {
    const fn name(self) -> &'static str {
        match self {
            Self::LiveFrames => "live-frames XDP_TX",
            Self::Sendmmsg => "sendmmsg, 2 threads",
        }
    }
}

fn generate(
    g: Generator,
    tb: &Testbed,
    bench: &Ebpf,
    frame: &[u8],
    secs: f64,
) -> anyhow::Result<(u64, Duration)> {
    match g {
        Generator::LiveFrames => live_frames(tb, bench, frame, secs),
        Generator::Sendmmsg => sendmmsg(tb, secs),
    }
}

/// `sendmmsg` batches of 64 datagrams from 2 threads, each rotating over 64
/// sockets (64 × 2 flows).
fn sendmmsg(tb: &Testbed, secs: f64) -> anyhow::Result<(u64, Duration)> {
    use std::os::fd::AsRawFd as _;
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let socks: Vec<std::net::UdpSocket> = netns::run_in(&tb.client, || {
                (0..64)
                    .map(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
                    .collect::<Result<_, _>>()
            })?;
            for s in &socks {
                s.connect(dst)?;
            }
            anyhow::Ok(std::thread::spawn(move || {
                let payload = [0u8; 18];
                let mut iov = libc::iovec {
                    iov_base: payload.as_ptr().cast_mut().cast(),
                    iov_len: payload.len(),
                };
                // SAFETY: all-zero mmsghdr is valid; each points at `iov`.
                let mut msgs: Vec<libc::mmsghdr> =
                    (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
                for m in &mut msgs {
                    m.msg_hdr.msg_iov = &raw mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                }
                let (mut n, mut i) = (0u64, 0usize);
                let end = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < end {
                    let fd = socks[i % socks.len()].as_raw_fd();
                    i += 1;
                    // SAFETY: `msgs` holds 64 valid headers for connected sockets.
                    let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), 64, 0) };
                    n += u64::try_from(sent.max(0)).unwrap_or(0);
                }
                n
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut total = 0;
    for h in threads {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    }
    Ok((total, t.elapsed()))
}

/// Runs the live-frames generator for `secs` from the client namespace;
/// returns frames generated and the elapsed time.
fn live_frames(
    tb: &Testbed,
    bench: &Ebpf,
    frame: &[u8],
    secs: f64,
) -> anyhow::Result<(u64, Duration)> {
    let prog: &Xdp = bench
        .program("generate")
        .context("program `generate`")?
        .try_into()?;
    let frame_len = u32::try_from(frame.len())?;
    netns::run_in(&tb.client, || {
        let ifindex = sluice::sys::link::ifindex("eth0")?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame_len, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let t = Instant::now();
        let mut n = 0u64;
        let chunk = 200_000u32;
        while t.elapsed().as_secs_f64() < secs {
            let opts = TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::default()
            };
            prog.test_run(opts)
                .context("live-frames BPF_PROG_TEST_RUN")?;
            n += u64::from(chunk);
        }
        anyhow::Ok((n, t.elapsed()))
    })
}

fn measure(
    path: &str,
    g: Generator,
    tb: &Testbed,
    bench: &Ebpf,
    frame: &[u8],
    secs: f64,
) -> anyhow::Result<Row> {
    // Warm up (ARP, conntrack, caches) before the measured run.
    let _ = generate(g, tb, bench, frame, 0.3)?;
    std::thread::sleep(Duration::from_millis(200));
    let before = sink_total(bench)?;
    let (busy0, total0) = cpu_jiffies();
    let (generated, elapsed) = generate(g, tb, bench, frame, secs)?;
    std::thread::sleep(Duration::from_millis(100));
    let (busy1, total1) = cpu_jiffies();
    let delivered = sink_total(bench)? - before;
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    let (gen_pps, del_pps, busy_share) = (
        generated as f64 / elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
    );
    #[expect(clippy::cast_precision_loss, reason = "a core count")]
    let cores =
        busy_share * std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    Ok(Row {
        path: path.to_owned(),
        generator: g.name().to_owned(),
        generated_pps: gen_pps,
        delivered_pps: del_pps,
        cores_busy: cores,
        pps_per_core: del_pps / cores.max(1e-3),
    })
}

pub(crate) fn run(secs: f64) -> anyhow::Result<Vec<Row>> {
    if Command::new("nft").arg("--version").output().is_err() {
        bail!("`nft` not found: the nftables baseline needs it (`cargo xtask bench` installs it)");
    }
    let tb = Testbed::new("pps", INSTANCES)?;
    let mut bench = Ebpf::load(objects::BENCH_XDP).context("loading the bench programs")?;
    for name in ["generate", "sink"] {
        let p: &mut Xdp = bench.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    {
        let sink: &mut Xdp = bench.program_mut("sink").context("sink")?.try_into()?;
        for i in &tb.instances {
            netns::run_in(&i.netns, || sink.attach("eth0", XdpMode::Driver))?;
        }
    }
    let nic_mac = mac_of(&tb.host, testbed::NIC)?;
    let mut packet = Packet::udp(
        SocketAddr::new(testbed::CLIENT_V4.into(), 1024),
        SocketAddr::new(testbed::VIP_V4.into(), 7000),
    )
    .payload(vec![0u8; 18]);
    packet.dst_mac = nic_mac;
    packet.src_mac = mac_of(&tb.client, "eth0")?;
    let frame = packet.build();
    {
        let mut template: aya::maps::Array<&mut MapData, [u64; 6]> =
            aya::maps::Array::try_from(bench.map_mut("TEMPLATE").context("TEMPLATE")?)?;
        let mut words = [0u64; 6];
        for (w, c) in words.iter_mut().zip(frame.chunks_exact(8)) {
            *w = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        }
        template.set(0, words, 0)?;
    }

    // Sluice.
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, INSTANCES)
    );
    let config = Config::parse(&toml, Path::new("bench.toml"))?;
    let agent = tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))?;
    let mut rows = Vec::new();
    for g in [Generator::LiveFrames, Generator::Sendmmsg] {
        rows.push(measure(
            "Sluice (XDP redirect)",
            g,
            &tb,
            &bench,
            &frame,
            secs,
        )?);
    }
    agent.stop()?;

    nftables_dnat(&tb)?;
    for g in [Generator::LiveFrames, Generator::Sendmmsg] {
        rows.push(measure(
            "nftables DNAT (jhash), kernel stack",
            g,
            &tb,
            &bench,
            &frame,
            secs,
        )?);
    }
    Ok(rows)
}

/// The baseline: the host's stack distributes by DNAT to the instances,
/// chosen by jhash of the source address and port.
fn nftables_dnat(tb: &Testbed) -> anyhow::Result<()> {
    // GRO on gives the NIC veth NAPI, as Sluice's program does.
    netns::run_in(&tb.host, || {
        netns::set_offload(testbed::NIC, netns::Offload::Gro, true)
    })?;
    let mut map = String::new();
    for (k, i) in tb.instances.iter().enumerate() {
        let mac = mac_of(&i.netns, "eth0")?;
        let mac_text = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let addr = i.addr_v4.to_string();
        let status = Command::new("ip")
            .args([
                "-n", &tb.host, "neigh", "replace", &addr, "lladdr", &mac_text, "dev", &i.veth,
            ])
            .status()?;
        if !status.success() {
            bail!("static neighbour for {addr}");
        }
        let _ = write!(map, "{}{k} : {addr}", if k == 0 { "" } else { ", " });
    }
    let rules = format!(
        "table ip sluicebench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
         ip daddr {} udp dport 7000 dnat to jhash ip saddr . udp sport mod {INSTANCES} map {{ {map} }}\n }}\n}}\n",
        testbed::VIP_V4
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), rules)?;
    let status = Command::new("ip")
        .args(["netns", "exec", &tb.host, "nft", "-f"])
        .arg(file.path())
        .status()?;
    if !status.success() {
        bail!("loading the nftables rules");
    }
    Ok(())
}
