//! Fast-path cost per packet under `BPF_PROG_TEST_RUN`, always beside the
//! empty program: every measured call of Sluice's program alternates with a
//! call of the empty one on the same frame, on one pinned CPU, so both see
//! the same machine state and the floor is subtracted call for call.
//! Reported: median, p99 and mean of the kernel's per-run durations.
//!
//! - Packet kinds, at a small scale, in both modes: one run per fresh copy
//!   of the frame (the kernel's per-run durations, one a call), and many
//!   runs of one frame a call (the kernel averages them).
//! - Scale rows that touch memory: rings of many different frames over
//!   every service, unit and instance of a large config, and a million
//!   pinned flows hit at random (and missed), fresh frames only.
//! - The cluster paths: delivered here, encapsulated, decapsulated.
//! - Experiments (`--experiments DIR`, built by `cargo xtask bench
//!   --experiments`): builds of the program with one part of the work taken
//!   out, to show what each part costs.
//!
//! And the owner-map write latency.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::Serialize;
use sluice::{
    config::Config,
    datapath::{Datapath as _, xdp::objects},
    plan::Group,
};
use sluice_common::{
    maps::{Pin, PinKey, names},
    owner_index, parse,
};
use sluice_tests::{
    harness::{Harness, XDP_PASS, XDP_REDIRECT, XDP_TX},
    packet::{NIC_MAC, Packet},
};

/// Median, 99th percentile and mean of a sample, in ns.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) mean: f64,
    /// The mean of the values up to the p99: finer than the median (the
    /// kernel reports a run's time in steps of about 10 ns here), without
    /// the outliers (interrupts, the hypervisor) that pull the mean.
    pub(crate) trimmed: f64,
}

impl Stats {
    fn of(mut v: Vec<u32>) -> Self {
        v.sort_unstable();
        let at = |q: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into the sample"
            )]
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            f64::from(v[i])
        };
        #[expect(clippy::cast_precision_loss, reason = "a mean")]
        let mean_of = |v: &[u32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let p99 = at(0.99);
        let kept = v.partition_point(|&x| f64::from(x) <= p99);
        Self {
            median: at(0.5),
            p99,
            mean: mean_of(&v),
            trimmed: mean_of(&v[..kept]),
        }
    }
}

/// Sluice and the empty program, measured interleaved on the same frames.
#[derive(Serialize, Clone, Copy)]
pub(crate) struct Pair {
    pub(crate) sluice: Stats,
    pub(crate) empty: Stats,
}

impl Pair {
    /// Sluice's own work: its median minus the empty program's.
    pub(crate) fn own(&self) -> f64 {
        self.sluice.median - self.empty.median
    }

    pub(crate) fn ratio(&self) -> f64 {
        self.sluice.median / self.empty.median
    }
}

/// One packet kind at the small scale, both modes.
#[derive(Serialize)]
pub(crate) struct KindRow {
    pub(crate) frame: String,
    pub(crate) fresh: Pair,
    /// Over rounds of `repeat` runs a call: each round's mean.
    pub(crate) repeat: Pair,
}

/// A large config and a ring of many frames, fresh frames only.
#[derive(Serialize)]
pub(crate) struct ScaleRow {
    pub(crate) scale: String,
    pub(crate) frames: String,
    /// Distinct instances the ring's frames were delivered to.
    pub(crate) instances_reached: usize,
    pub(crate) fresh: Pair,
}

/// One packet's way through a cluster host, fresh frames only: the
/// encapsulation rewrites the frame, so repeated runs would measure another
/// path from the second on.
#[derive(Serialize)]
pub(crate) struct ClusterRow {
    pub(crate) path: String,
    pub(crate) fresh: Pair,
}

/// An experiment build beside the full program, same frame, same run.
#[derive(Serialize)]
pub(crate) struct ExperimentRow {
    pub(crate) experiment: String,
    pub(crate) removes: String,
    pub(crate) frame: String,
    /// The full program's own work (trimmed means, ns).
    pub(crate) full_own: f64,
    /// The experiment's own work (trimmed means, ns).
    pub(crate) experiment_own: f64,
    /// The same two in the repeat mode.
    pub(crate) full_repeat_own: f64,
    pub(crate) experiment_repeat_own: f64,
}

#[derive(Serialize)]
pub(crate) struct WriteRow {
    pub(crate) units: u32,
    pub(crate) mmap_us: f64,
    pub(crate) syscall_us: f64,
}

/// The program as the kernel holds it.
#[derive(Serialize, Default)]
pub(crate) struct ProgramSize {
    /// eBPF instructions after the verifier's rewrites.
    pub(crate) instructions: u32,
    /// Bytes of x86 (or the host's) machine code from the JIT.
    pub(crate) jited_bytes: u32,
}

#[derive(Serialize, Default)]
pub(crate) struct Figures {
    pub(crate) cpu: usize,
    pub(crate) program: ProgramSize,
    pub(crate) kinds: Vec<KindRow>,
    pub(crate) scale: Vec<ScaleRow>,
    pub(crate) cluster: Vec<ClusterRow>,
    pub(crate) experiments: Vec<ExperimentRow>,
    pub(crate) map_write: Vec<WriteRow>,
}

/// What each experiment build (a feature of `xdp-ebpf`) takes out.
const EXPERIMENTS: [(&str, &str); 7] = [
    (
        "exp-parse-only",
        "everything after the parser (returns at once)",
    ),
    ("exp-no-mac-check", "the host-MAC check"),
    (
        "exp-service-twice",
        "nothing: looks the service up twice (the second lookup's cost)",
    ),
    (
        "exp-no-key-hash",
        "the key: flow hash or tag (key = the ports word)",
    ),
    ("exp-no-pins", "the pinned-flow lookup and update"),
    ("exp-no-counters", "every counter (all four per-CPU slots)"),
    ("exp-no-redirect", "the DEVMAP redirect helper"),
];

/// Four services the frames go to (each with `per_service` instances),
/// then `extra` one-instance services on other VIPs.
fn config(per_service: usize, extra: usize) -> String {
    let mut s = String::new();
    let services = [
        ("kv", "198.18.1.1", 7000, "udp", ""),
        (
            "sessions",
            "198.18.1.2",
            7100,
            "udp",
            "tag = { kind = \"udp-payload\", offset = 0, length = 8 }\n",
        ),
        ("web", "198.18.1.1", 443, "tcp", ""),
        ("kv6", "fd00:5100:1::1", 7000, "udp", ""),
        (
            "quic",
            "198.18.1.3",
            443,
            "udp",
            "tag = { kind = \"quic-cid\", cid_length = 8, offset = 0, length = 8 }\n",
        ),
    ];
    for (k, (name, vip, port, proto, tag)) in services.into_iter().enumerate() {
        let _ = write!(
            s,
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n{tag}"
        );
        for i in 0..per_service {
            let _ = write!(
                s,
                "[[service.instance]]\nname = \"{name}-{i}\"\nveth = \"v{k}-{i}\"\n"
            );
        }
    }
    for e in 0..extra {
        let _ = write!(
            s,
            "[[service]]\nname = \"x{e}\"\nvip = \"{}\"\nport = 9000\nprotocol = \"udp\"\n[[service.instance]]\nname = \"x{e}-0\"\nveth = \"vx{e}\"\n",
            extra_vip(e)
        );
    }
    s
}

fn extra_vip(e: usize) -> Ipv4Addr {
    let e = u8::try_from(e).expect("fewer than 256 extra services");
    Ipv4Addr::new(198, 18, 2 + e / 250, 1 + e % 250)
}

/// 256 UDP services on their own VIPs, 16 instances each: 4,096 instances.
fn wide_config() -> String {
    let mut s = String::new();
    for e in 0..256 {
        let _ = write!(
            s,
            "[[service]]\nname = \"w{e}\"\nvip = \"{}\"\nport = 9000\nprotocol = \"udp\"\n",
            extra_vip(e)
        );
        for i in 0..16 {
            let _ = write!(
                s,
                "[[service.instance]]\nname = \"w{e}-{i}\"\nveth = \"vw{e}-{i}\"\n"
            );
        }
    }
    s
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("bench address")
}

/// A client address in 198.19.0.0/16 and a port, drawn from `rng`.
fn client(draw: &mut StdRng) -> SocketAddr {
    let a: u16 = draw.random();
    let [hi, lo] = a.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(198, 19, hi, lo),
        draw.random_range(1024..=65535),
    ))
}

/// A measured packet kind: name, frame, and a frame to run once before (to
/// pin the flow).
type Kind = (&'static str, Vec<u8>, Option<Vec<u8>>);

const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

fn kinds() -> Vec<Kind> {
    let tcp = |flags| Packet::tcp(sa("198.18.0.9:40000"), sa("198.18.1.1:443"), flags).build();
    vec![
        (
            "IPv4 UDP, tagged",
            Packet::udp(sa("198.18.0.9:40000"), sa("198.18.1.2:7100"))
                .payload(b"tenant-7 and some payload".to_vec())
                .build(),
            None,
        ),
        (
            "IPv4 UDP, untagged",
            Packet::udp(sa("198.18.0.9:40000"), sa("198.18.1.1:7000"))
                .payload(b"some payload".to_vec())
                .build(),
            None,
        ),
        // The SYN runs once first and pins the flow; the ACKs are measured.
        ("IPv4 TCP, pinned flow", tcp(TCP_ACK), Some(tcp(TCP_SYN))),
        (
            "IPv6 UDP",
            Packet::udp(sa("[fd00:5100::9]:40000"), sa("[fd00:5100:1::1]:7000"))
                .payload(b"some payload".to_vec())
                .build(),
            None,
        ),
        (
            "IPv4 UDP, QUIC short header (quic-cid)",
            Packet::udp(sa("198.18.0.9:40000"), sa("198.18.1.3:443"))
                .payload(b"\x41cid-0007 and a protected payload".to_vec())
                .build(),
            None,
        ),
    ]
}

/// One call of `repeat` runs: the action and the kernel's mean ns a run.
fn run_once(prog: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let ns = u32::try_from(r.duration.as_nanos()).unwrap_or(u32::MAX);
    Ok((r.return_value, ns))
}

/// The destination MAC the program writes into `frame`.
fn rewritten_dst(prog: &Xdp, frame: &[u8]) -> anyhow::Result<[u8; 6]> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..TestRunOptions::default()
    };
    prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(out[..6].try_into().expect("six bytes"))
}

/// Sluice's program beside the empty one, taking turns (see
/// [`interleave`]): `calls` calls of one run each on fresh copies of the
/// ring's frames. Sluice's action is checked, unless `want` is `None`.
fn fresh_pair(
    prog: &Xdp,
    empty: &Xdp,
    ring: &[Vec<u8>],
    calls: usize,
    want: Option<u32>,
) -> anyhow::Result<Pair> {
    pair(prog, empty, ring, calls, 1, want)
}

/// As [`fresh_pair`], `repeat` runs a call: the statistics are over the
/// calls' means.
fn pair(
    prog: &Xdp,
    empty: &Xdp,
    ring: &[Vec<u8>],
    calls: usize,
    repeat: u32,
    want: Option<u32>,
) -> anyhow::Result<Pair> {
    let [sluice, empty] = interleave(
        &[(prog, want), (empty, Some(XDP_PASS))],
        ring,
        calls,
        repeat,
    )?
    .try_into()
    .map_err(|_| anyhow::anyhow!("two programs, two statistics"))?;
    Ok(Pair { sluice, empty })
}

/// `calls` turns of each program (`repeat` runs a call, on the ring's
/// frames in turn), the programs taking turns call by call, the first to go
/// rotating; each program's action checked where given.
fn interleave(
    progs: &[(&Xdp, Option<u32>)],
    ring: &[Vec<u8>],
    calls: usize,
    repeat: u32,
) -> anyhow::Result<Vec<Stats>> {
    let mut times = vec![Vec::with_capacity(calls); progs.len()];
    for i in 0..calls {
        let f = &ring[i % ring.len()];
        for k in 0..progs.len() {
            let which = (i + k) % progs.len();
            let (prog, want) = progs[which];
            let (action, ns) = run_once(prog, f, repeat)?;
            if want.is_some_and(|w| w != action) {
                bail!("program {which}: action {action}, expected {want:?} (call {i})");
            }
            times[which].push(ns);
        }
    }
    Ok(times.into_iter().map(Stats::of).collect())
}

fn empty_program(ebpf: &mut Ebpf) -> anyhow::Result<&Xdp> {
    if objects::EMPTY_XDP.is_empty() {
        bail!("built without bpf-linker: run `cargo xtask bench`, which sets it up");
    }
    {
        let prog: &mut Xdp = ebpf
            .program_mut("empty")
            .context("program `empty`")?
            .try_into()?;
        prog.load()?;
    }
    Ok(ebpf
        .program("empty")
        .context("program `empty`")?
        .try_into()?)
}

/// Runs this thread (and the programs it runs: `BPF_PROG_TEST_RUN` runs on
/// the caller's CPU) on the machine's last CPU only; returns that CPU.
fn pin_to_last_cpu() -> anyhow::Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let cpu = cpus - 1;
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity only read and write that set.
    let ret = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if ret != 0 {
        bail!(
            "pinning the bench to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(cpu)
}

/// The packet kinds, both modes, on `h` (`config(2, 0)`).
fn kind_rows(
    h: &mut Harness,
    empty: &Xdp,
    repeat: u32,
    fresh: usize,
) -> anyhow::Result<Vec<KindRow>> {
    let mut rows = Vec::new();
    for (name, f, warm) in kinds() {
        if let Some(w) = &warm {
            let (a, _) = run_once(h.dp.program_ref()?, w, 1)?;
            if a != XDP_REDIRECT {
                bail!("{name}: the SYN was not delivered (action {a})");
            }
        }
        // Repeated runs see the frame as the previous run left it: sent on
        // to the instance's MAC. Accept that MAC too, so every run takes
        // the path the first one did.
        let delivered_to = rewritten_dst(h.dp.program_ref()?, &f)?;
        h.dp.set_host_macs(&[NIC_MAC, delivered_to])?;
        let prog = h.dp.program_ref()?;
        let ring = [f];
        let fresh_p = fresh_pair(prog, empty, &ring, fresh, Some(XDP_REDIRECT))
            .with_context(|| format!("{name}, fresh frames"))?;
        let repeat_p = pair(prog, empty, &ring, 21, repeat, Some(XDP_REDIRECT))
            .with_context(|| format!("{name}, repeat"))?;
        rows.push(KindRow {
            frame: name.to_owned(),
            fresh: fresh_p,
            repeat: repeat_p,
        });
    }
    h.dp.set_host_macs(&[NIC_MAC])?;
    // The tagged kinds were keyed by their tags, not the flow hash.
    for (id, name) in [(1, "sessions"), (4, "quic")] {
        let c = h.dp.service_counters(id)?;
        if c.tagged == 0 || c.tag_missing != 0 {
            bail!(
                "{name}: {} packets tagged, {} without their tag",
                c.tagged,
                c.tag_missing
            );
        }
    }
    Ok(rows)
}

/// Distinct destination MACs the program writes into the ring's frames
/// (up to 4,096 of them looked at).
fn reached(prog: &Xdp, ring: &[Vec<u8>]) -> anyhow::Result<usize> {
    let mut macs = std::collections::HashSet::new();
    for f in ring.iter().take(4096) {
        macs.insert(rewritten_dst(prog, f)?);
    }
    Ok(macs.len())
}

/// 4,096 instances over 256 services, rings of 1, 1,024 and 65,536 frames
/// over every service and unit.
fn wide_rows(empty: &Xdp, fresh: usize) -> anyhow::Result<Vec<ScaleRow>> {
    let cfg = Config::parse(&wide_config(), Path::new("bench.toml"))?;
    let h = Harness::from_config(&cfg);
    let prog = h.dp.program_ref()?;
    let mut draw = StdRng::seed_from_u64(7);
    let ring: Vec<Vec<u8>> = (0..65_536)
        .map(|j| {
            let dst = SocketAddr::V4(SocketAddrV4::new(extra_vip(j % 256), 9000));
            Packet::udp(client(&mut draw), dst)
                .payload(b"some payload".to_vec())
                .build()
        })
        .collect();
    let mut rows = Vec::new();
    for n in [1, 1024, 65_536] {
        let r = &ring[..n];
        rows.push(ScaleRow {
            scale: "4,096 instances, 256 services".into(),
            frames: format!("IPv4 UDP, untagged; ring of {n} frame(s) over every service"),
            instances_reached: reached(prog, r)?,
            fresh: fresh_pair(prog, empty, r, fresh, Some(XDP_REDIRECT))
                .with_context(|| format!("4,096 instances, ring of {n}"))?,
        });
    }
    Ok(rows)
}

/// A million pinned TCP flows (`web`), ACKs hitting random pins through
/// rings of 1, 1,024 and 65,536 frames; and ACKs of flows without a pin,
/// each a miss that pins its flow (the LRU evicting the oldest).
fn pin_rows(empty: &Xdp, fresh: usize) -> anyhow::Result<Vec<ScaleRow>> {
    const PINS: usize = 1_000_000;
    let cfg = Config::parse(&config(2, 0), Path::new("bench.toml"))?;
    let mut h = Harness::from_config(&cfg);
    let vip = sa("198.18.1.1:443");
    let mut draw = StdRng::seed_from_u64(11);
    let flows: Vec<SocketAddr> = {
        let mut seen = std::collections::HashSet::new();
        std::iter::from_fn(|| Some(client(&mut draw)))
            .filter(|c| seen.insert(*c))
            .take(PINS)
            .collect()
    };
    let ack = |c: SocketAddr| Packet::tcp(c, vip, TCP_ACK).build();
    // A SYN pins the first flow; its pin is the template for the others
    // (a live owner of `web`, its generation, a fresh timestamp).
    let (a, _) = run_once(
        h.dp.program_ref()?,
        &Packet::tcp(flows[0], vip, TCP_SYN).build(),
        1,
    )?;
    if a != XDP_REDIRECT {
        bail!("the SYN was not delivered (action {a})");
    }
    pin_all(&mut h, &flows, vip)?;
    let prog = h.dp.program_ref()?;
    let ring: Vec<Vec<u8>> = (0..65_536)
        .map(|_| ack(flows[draw.random_range(0..PINS)]))
        .collect();
    let web = |h: &Harness| h.dp.service_counters(2);
    let mut rows = Vec::new();
    for n in [1, 1024, 65_536] {
        let before = web(&h)?;
        let fresh_p = fresh_pair(prog, empty, &ring[..n], fresh, Some(XDP_REDIRECT))
            .with_context(|| format!("1,000,000 pins, ring of {n}"))?;
        let after = web(&h)?;
        let hits = after.pin_hits - before.pin_hits;
        if hits < fresh as u64 * 99 / 100 {
            bail!("1,000,000 pins, ring of {n}: only {hits} of {fresh} ACKs hit their pin");
        }
        rows.push(ScaleRow {
            scale: "1,000,000 pinned flows".into(),
            frames: format!("IPv4 TCP ACK; ring of {n} frame(s), random pins, all hits"),
            instances_reached: reached(prog, &ring[..n])?,
            fresh: fresh_p,
        });
    }
    // Misses: flows from 198.18.128.0/17, never pinned, each ACK once.
    let misses: Vec<Vec<u8>> = (0..fresh)
        .map(|_| {
            let a: u16 = draw.random();
            let [hi, lo] = a.to_be_bytes();
            let c = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(198, 18, 128 | hi, lo),
                draw.random_range(1024..=65535),
            ));
            ack(c)
        })
        .collect();
    let before = web(&h)?;
    let fresh_p = fresh_pair(prog, empty, &misses, fresh, Some(XDP_REDIRECT))
        .context("1,000,000 pins, misses")?;
    let lost = web(&h)?.pins_lost - before.pins_lost;
    if lost < fresh as u64 * 99 / 100 {
        bail!("1,000,000 pins, misses: only {lost} of {fresh} ACKs missed");
    }
    rows.push(ScaleRow {
        scale: "1,000,000 pinned flows".into(),
        frames: format!(
            "IPv4 TCP ACK of a flow without a pin ({fresh} flows, each once: a miss, then a new pin, the LRU evicting)"
        ),
        instances_reached: 2,
        fresh: fresh_p,
    });
    Ok(rows)
}

/// The parser's pinned-flow key of a frame.
fn key_of(f: &[u8]) -> anyhow::Result<PinKey> {
    Ok(parse::parse(f)
        .map_err(|p| anyhow::anyhow!("bench frame does not parse: {p:?}"))?
        .pin_key())
}

/// Pins every flow of `flows` (the first is pinned already, by its SYN)
/// with a copy of the first one's pin.
fn pin_all(h: &mut Harness, flows: &[SocketAddr], vip: SocketAddr) -> anyhow::Result<()> {
    let ack = |c: SocketAddr| Packet::tcp(c, vip, TCP_ACK).build();
    let template = {
        let map = h.dp.ebpf().map(names::PINNED).context("PINNED map")?;
        let pins: HashMap<&MapData, PinKey, Pin> = HashMap::try_from(map)?;
        pins.get(&key_of(&ack(flows[0]))?, 0)?
    };
    let map =
        h.dp.ebpf_mut()
            .map_mut(names::PINNED)
            .context("PINNED map")?;
    let mut pins: HashMap<&mut MapData, PinKey, Pin> = HashMap::try_from(map)?;
    eprintln!("[bench]     pinning {} flows", flows.len());
    let mut key = key_of(&ack(flows[0]))?;
    for c in &flows[1..] {
        let SocketAddr::V4(v4) = c else {
            unreachable!("IPv4 clients")
        };
        key.src[0] = sluice_common::key::host::v4(v4.ip().octets());
        key.ports = sluice_common::key::host::ports(v4.port(), vip.port());
        pins.insert(key, template, 0)?;
    }
    // The keys written by hand are the parser's, checked on a sample.
    for c in flows.iter().step_by(flows.len() / 64) {
        if pins.get(&key_of(&ack(*c))?, 0).is_err() {
            bail!("the pin of {c} is not under the parser's key");
        }
    }
    Ok(())
}

/// Local delivery, encapsulation to another host, and decapsulation at the
/// owner's host, beside the empty program: an untagged IPv4 UDP packet of
/// `kv`, whose owner is `kv-1` (id 2) — here, or on the other host.
fn cluster_rows(fresh: usize, empty: &Xdp) -> anyhow::Result<Vec<ClusterRow>> {
    use sluice_common::{
        encap::DEFAULT_ENCAP_PORT,
        key,
        maps::{ClusterEntry, FAMILY_V4, MemberKey, RemoteHost},
    };
    let cfg = Config::parse(&config(2, 0), Path::new("bench.toml"))?;
    let v4 = |a: [u8; 4]| [key::host::v4(a), 0, 0, 0];
    let (a_ip, b_ip) = ([198, 18, 10, 1], [198, 18, 10, 2]);
    let a_mac = [0x02, 0x51, 0, 0, 0, 0x11];
    let cluster = |ip: [u8; 4], mac| ClusterEntry {
        underlay: v4(ip),
        mac,
        family: FAMILY_V4,
        pad: 0,
        port_be: DEFAULT_ENCAP_PORT.to_be(),
        mtu: 1500,
        pad2: 0,
        fence_ns: 0,
    };
    let member = |ip| MemberKey {
        addr: v4(ip),
        family: FAMILY_V4,
        pad: [0; 3],
    };
    let frame = Packet::udp(sa("198.18.0.9:40000"), sa("198.18.1.1:7000"))
        .payload(b"some payload".to_vec())
        .build();
    // Host B: kv-1 here, every unit its.
    let mut b = Harness::from_config(&cfg);
    b.dp.set_cluster(cluster(b_ip, NIC_MAC))?;
    b.dp.set_members(&[member(a_ip)])?;
    b.dp.set_group_owner(0, Group::ALL, 2)?;
    // Host A: kv-1 is on B, whose next hop is B's NIC.
    let mut a = Harness::from_config(&cfg);
    a.dp.set_cluster(cluster(a_ip, a_mac))?;
    a.dp.set_remote_host(
        1,
        RemoteHost {
            underlay: v4(b_ip),
            next_hop: NIC_MAC,
            pad: 0,
        },
    )?;
    a.dp.set_members(&[member(b_ip)])?;
    a.dp.set_remote_instance(2, 0, 1, true)?;
    a.dp.set_group_owner(0, Group::ALL, 2)?;
    let sent = a.run(&frame);
    if sent.action != XDP_TX {
        bail!("host A did not encapsulate (action {})", sent.action);
    }
    let plain = [frame];
    let encapsulated = [sent.frame];
    Ok(vec![
        ClusterRow {
            path: "owner here: delivered".into(),
            fresh: fresh_pair(
                b.dp.program_ref()?,
                empty,
                &plain,
                fresh,
                Some(XDP_REDIRECT),
            )?,
        },
        ClusterRow {
            path: "owner on another host: encapsulated (GUE), XDP_TX".into(),
            fresh: fresh_pair(a.dp.program_ref()?, empty, &plain, fresh, Some(XDP_TX))?,
        },
        ClusterRow {
            path: "from another host: decapsulated, delivered".into(),
            fresh: fresh_pair(
                b.dp.program_ref()?,
                empty,
                &encapsulated,
                fresh,
                Some(XDP_REDIRECT),
            )?,
        },
    ])
}

/// A build of the program measured beside the full one: an experiment
/// (one part of the work taken out) or a baseline (the program of another
/// commit, for a before/after comparison in one run).
pub(crate) struct Variant {
    pub(crate) name: String,
    pub(crate) removes: String,
    pub(crate) object: PathBuf,
    /// The action every run must return; an experiment may steer wrongly,
    /// a baseline must steer as the full program does.
    pub(crate) want: Option<u32>,
}

impl Variant {
    /// The experiment builds `cargo xtask bench --experiments` leaves in `dir`.
    fn experiments(dir: &Path) -> Vec<Self> {
        EXPERIMENTS
            .iter()
            .map(|(feature, removes)| Self {
                name: (*feature).to_owned(),
                removes: (*removes).to_owned(),
                object: dir.join(format!("{feature}.o")),
                want: None,
            })
            .collect()
    }

    /// A baseline build (`cargo xtask bench --baseline REV`).
    pub(crate) fn baseline(object: &Path) -> Self {
        Self {
            name: "baseline".to_owned(),
            removes: format!("nothing: the program built from {}", object.display()),
            object: object.to_owned(),
            want: Some(XDP_REDIRECT),
        }
    }
}

/// Each variant beside the full program, per packet kind, fresh frames;
/// the full program is measured again in each pair so both share the
/// machine's state of the moment.
fn variant_rows(
    variants: &[Variant],
    empty: &Xdp,
    repeat: u32,
    fresh: usize,
) -> anyhow::Result<Vec<ExperimentRow>> {
    let cfg = Config::parse(&config(2, 0), Path::new("bench.toml"))?;
    let mut rows = Vec::new();
    for v in variants {
        let object = std::fs::read(&v.object).with_context(|| {
            format!(
                "{}: build it with `cargo xtask bench --experiments` or `--baseline REV`",
                v.object.display()
            )
        })?;
        eprintln!("[bench]   {} beside the full program", v.name);
        let mut full = Harness::from_config(&cfg);
        let mut other = Harness::with_object(&cfg, &object);
        for (name, f, warm) in kinds() {
            if let Some(w) = &warm {
                run_once(full.dp.program_ref()?, w, 1)?;
                run_once(other.dp.program_ref()?, w, 1)?;
            }
            // As for the kinds: repeated runs see the rewritten MAC.
            let delivered_to = rewritten_dst(full.dp.program_ref()?, &f)?;
            full.dp.set_host_macs(&[NIC_MAC, delivered_to])?;
            other.dp.set_host_macs(&[NIC_MAC, delivered_to])?;
            let ring = [f];
            // The three programs take turns call by call, so a drift of the
            // machine's speed (a shared VM's) falls on all three alike.
            let progs = [
                (empty, Some(XDP_PASS)),
                (full.dp.program_ref()?, Some(XDP_REDIRECT)),
                (other.dp.program_ref()?, v.want),
            ];
            let fr = interleave(&progs, &ring, fresh, 1)?;
            let rp = interleave(&progs, &ring, 11, repeat)?;
            let own = |st: &[Stats], k: usize| st[k].trimmed - st[0].trimmed;
            rows.push(ExperimentRow {
                experiment: v.name.clone(),
                removes: v.removes.clone(),
                frame: name.to_owned(),
                full_own: own(&fr, 1),
                experiment_own: own(&fr, 2),
                full_repeat_own: own(&rp, 1),
                experiment_repeat_own: own(&rp, 2),
            });
        }
    }
    Ok(rows)
}

pub(crate) fn run(
    repeat: u32,
    fresh: u32,
    experiments: Option<&Path>,
    baseline: Option<&Path>,
    variants_only: bool,
) -> anyhow::Result<Figures> {
    let mut variants = experiments.map(Variant::experiments).unwrap_or_default();
    variants.extend(baseline.map(Variant::baseline));
    let cpu = pin_to_last_cpu()?;
    let fresh = usize::try_from(fresh)?;
    let mut empty_obj = Ebpf::load(objects::EMPTY_XDP).context("loading the empty program")?;
    let empty = empty_program(&mut empty_obj)?;
    if variants_only && !variants.is_empty() {
        return Ok(Figures {
            cpu,
            experiments: variant_rows(&variants, empty, repeat / 5, fresh)?,
            ..Figures::default()
        });
    }
    eprintln!("[bench]   packet kinds (CPU {cpu})");
    let cfg = Config::parse(&config(2, 0), Path::new("bench.toml"))?;
    let mut h = Harness::from_config(&cfg);
    let info = h.dp.program_ref()?.info()?;
    let program = ProgramSize {
        instructions: info.size_translated().unwrap_or(0) / 8,
        jited_bytes: info.size_jitted(),
    };
    let kinds = kind_rows(&mut h, empty, repeat, fresh)?;
    let map_write = map_writes(&mut h)?;
    drop(h);
    eprintln!("[bench]   4,096 instances, 256 services");
    let mut scale = wide_rows(empty, fresh)?;
    eprintln!("[bench]   1,000,000 pinned flows");
    scale.extend(pin_rows(empty, fresh)?);
    eprintln!("[bench]   cluster paths");
    let cluster = cluster_rows(fresh, empty)?;
    let experiments = variant_rows(&variants, empty, repeat / 5, fresh)?;
    Ok(Figures {
        cpu,
        program,
        kinds,
        scale,
        cluster,
        experiments,
        map_write,
    })
}

/// Writes groups of several sizes both ways and times them (median of 5).
fn map_writes(h: &mut Harness) -> anyhow::Result<Vec<WriteRow>> {
    let mut rows = Vec::new();
    for prefix in [16, 8, 4, 0] {
        let g = Group::new(0, prefix)?;
        let mut mmap = Vec::new();
        let mut sys = Vec::new();
        for round in 0..5u32 {
            let owner = 1 + round % 2;
            let t = Instant::now();
            h.dp.set_group_owner(0, g, owner)?;
            mmap.push(t.elapsed());
            let owners_map =
                h.dp.ebpf_mut()
                    .map_mut(names::OWNERS)
                    .context("OWNERS map")?;
            let mut owners: Array<&mut MapData, u32> = Array::try_from(owners_map)?;
            let t = Instant::now();
            for u in g.units() {
                owners.set(owner_index(0, u), owner, 0)?;
            }
            sys.push(t.elapsed());
        }
        mmap.sort();
        sys.sort();
        rows.push(WriteRow {
            units: g.size(),
            mmap_us: mmap[2].as_secs_f64() * 1e6,
            syscall_us: sys[2].as_secs_f64() * 1e6,
        });
    }
    Ok(rows)
}

fn pair_cells(p: &Pair) -> String {
    format!(
        "{:.0} | {:.0} | **{:.0}** | **{:.2}×** | {:.0} / {:.0} | {:.1} / {:.1}",
        p.empty.median,
        p.sluice.median,
        p.own(),
        p.ratio(),
        p.sluice.p99,
        p.empty.p99,
        p.sluice.mean,
        p.empty.mean
    )
}

const PAIR_HEAD: &str =
    "empty, median | sluice, median | own work | ratio | p99 sluice / empty | mean sluice / empty";
const PAIR_RULE: &str = "---: | ---: | ---: | ---: | ---: | ---:";

/// The fast-path tables, in Markdown.
pub(crate) fn markdown(s: &mut String, f: &Figures) {
    if f.kinds.is_empty() {
        // `--variants-only`: the other builds were all that was measured.
        experiments_table(s, &f.experiments);
        return;
    }
    let _ = writeln!(
        s,
        "#### Fast path (ns per run, `BPF_PROG_TEST_RUN`, CPU {} only; each Sluice call alternates with the empty program's on the same frame)\n",
        f.cpu
    );
    let _ = writeln!(
        s,
        "The program: {} eBPF instructions after verification, {} bytes of machine code.\n",
        f.program.instructions, f.program.jited_bytes
    );
    let _ = writeln!(
        s,
        "Fresh frame (one run a call, a fresh copy of the frame each time):\n"
    );
    let _ = writeln!(
        s,
        "| frame | {PAIR_HEAD} | repeat: empty | repeat: sluice | repeat: own work | own work, fresh − repeat |"
    );
    let _ = writeln!(s, "| --- | {PAIR_RULE} | ---: | ---: | ---: | ---: |");
    for k in &f.kinds {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:+.0} |",
            k.frame,
            pair_cells(&k.fresh),
            k.repeat.empty.median,
            k.repeat.sluice.median,
            k.repeat.own(),
            k.fresh.own() - k.repeat.own()
        );
    }
    let _ = writeln!(
        s,
        "\n#### Fast path at scale (fresh frames; rings of different frames)\n"
    );
    let _ = writeln!(s, "| scale | frames | instances reached | {PAIR_HEAD} |");
    let _ = writeln!(s, "| --- | --- | ---: | {PAIR_RULE} |");
    for r in &f.scale {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.scale,
            r.frames,
            r.instances_reached,
            pair_cells(&r.fresh)
        );
    }
    let _ = writeln!(
        s,
        "\n#### Cluster paths (fresh frames; IPv4 UDP, untagged)\n"
    );
    let _ = writeln!(s, "| path | {PAIR_HEAD} |");
    let _ = writeln!(s, "| --- | {PAIR_RULE} |");
    for c in &f.cluster {
        let _ = writeln!(s, "| {} | {} |", c.path, pair_cells(&c.fresh));
    }
    experiments_table(s, &f.experiments);
    let _ = writeln!(s, "\n#### Owner-map writes (one group, µs)\n");
    let _ = writeln!(
        s,
        "| units | mmapped array | one `bpf()` syscall a unit | speed-up |"
    );
    let _ = writeln!(s, "| ---: | ---: | ---: | ---: |");
    for w in &f.map_write {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {:.0}× |",
            w.units,
            w.mmap_us,
            w.syscall_us,
            w.syscall_us / w.mmap_us.max(1e-3)
        );
    }
}

/// The experiment builds beside the full program.
fn experiments_table(s: &mut String, rows: &[ExperimentRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Other builds beside this one (experiments: where the time goes; baseline: before/after; the empty program, the full one and the other build take turns call by call; own work in ns, trimmed means)\n"
    );
    let _ = writeln!(
        s,
        "| build | takes out | frame | fresh: full | fresh: other build | fresh: difference | repeat: full | repeat: other build | repeat: difference |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for e in rows {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.0} | {:.0} | {:+.0} | {:.0} | {:.0} | {:+.0} |",
            e.experiment,
            e.removes,
            e.frame,
            e.full_own,
            e.experiment_own,
            e.experiment_own - e.full_own,
            e.full_repeat_own,
            e.experiment_repeat_own,
            e.experiment_repeat_own - e.full_repeat_own
        );
    }
}
