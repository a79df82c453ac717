//! Fast-path cost per packet, beside the empty program, at several scales;
//! and owner-map write latency.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use serde::Serialize;
use sluice::{
    config::Config,
    datapath::{Datapath as _, xdp::objects},
    plan::Group,
};
use sluice_common::{
    maps::{Pin, PinKey, names},
    owner_index,
};
use sluice_tests::{
    harness::{Harness, XDP_PASS, XDP_REDIRECT},
    packet::{NIC_MAC, Packet},
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) scale: String,
    pub(crate) frame: String,
    pub(crate) repeat_ns: f64,
    pub(crate) empty_repeat_ns: f64,
    pub(crate) fresh_ns: f64,
    pub(crate) empty_fresh_ns: f64,
}

/// One packet's way through a cluster host, fresh frames only: the
/// encapsulation rewrites the frame, so repeated runs would measure another
/// path from the second on.
#[derive(Serialize)]
pub(crate) struct ClusterRow {
    pub(crate) path: String,
    pub(crate) fresh_ns: f64,
    pub(crate) empty_fresh_ns: f64,
}

#[derive(Serialize)]
pub(crate) struct WriteRow {
    pub(crate) units: u32,
    pub(crate) mmap_us: f64,
    pub(crate) syscall_us: f64,
}

struct Scale {
    name: &'static str,
    per_service: usize,
    extra_services: usize,
    pins: u32,
}

const SCALES: [Scale; 5] = [
    Scale {
        name: "2 instances, 1 service, 0 pins",
        per_service: 2,
        extra_services: 0,
        pins: 0,
    },
    Scale {
        name: "64 instances",
        per_service: 64,
        extra_services: 0,
        pins: 0,
    },
    Scale {
        name: "4,096 instances",
        per_service: 1024,
        extra_services: 0,
        pins: 0,
    },
    Scale {
        name: "256 services",
        per_service: 2,
        extra_services: 252,
        pins: 0,
    },
    Scale {
        name: "1,000,000 pinned flows",
        per_service: 2,
        extra_services: 0,
        pins: 1_000_000,
    },
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
            "[[service]]\nname = \"x{e}\"\nvip = \"198.18.{}.{}\"\nport = 9000\nprotocol = \"udp\"\n[[service.instance]]\nname = \"x{e}-0\"\nveth = \"vx{e}\"\n",
            2 + e / 250,
            1 + e % 250
        );
    }
    s
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("bench address")
}

/// A measured frame: name, bytes, and a frame to run once before (to pin
/// the flow).
type BenchFrame = (&'static str, Vec<u8>, Option<Vec<u8>>);

fn frames() -> Vec<BenchFrame> {
    const ACK: u8 = 0x10;
    const SYN: u8 = 0x02;
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
        ("IPv4 TCP, pinned flow", tcp(ACK), Some(tcp(SYN))),
        (
            "IPv6 UDP",
            Packet::udp(sa("[fd00:5100::9]:40000"), sa("[fd00:5100:1::1]:7000"))
                .payload(b"some payload".to_vec())
                .build(),
            None,
        ),
    ]
}

fn run_once(prog: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration))
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

/// Mean ns a run: one call of `repeat` runs (the kernel averages).
fn repeat_mode(prog: &Xdp, frame: &[u8], repeat: u32, want: u32) -> anyhow::Result<f64> {
    let (action, d) = run_once(prog, frame, repeat)?;
    if action != want {
        bail!("action {action}, expected {want}");
    }
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
    Ok(d.as_nanos() as f64)
}

/// Mean ns a run over `calls` calls of one run each, each on a fresh copy of
/// the frame; every action checked.
fn fresh_mode(prog: &Xdp, frame: &[u8], calls: u32, want: u32) -> anyhow::Result<f64> {
    let mut total = 0u128;
    for _ in 0..calls {
        let (action, d) = run_once(prog, frame, 1)?;
        if action != want {
            bail!("action {action}, expected {want}");
        }
        total += d.as_nanos();
    }
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
    Ok(total as f64 / f64::from(calls))
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

/// Fills the pinned-flow map with `n` flows that are not the measured one.
fn prefill_pins(h: &mut Harness, n: u32) -> anyhow::Result<()> {
    let map =
        h.dp.ebpf_mut()
            .map_mut(names::PINNED)
            .context("PINNED map")?;
    let mut pins: HashMap<&mut MapData, PinKey, Pin> = HashMap::try_from(map)?;
    for i in 0..n {
        let key = PinKey {
            src: [i, 0x5eed, 0, 0],
            dst: [1, 0, 0, 0],
            ports: i.rotate_left(16),
            proto: 6,
            family: 4,
            pad: 0,
        };
        pins.insert(
            key,
            Pin {
                owner: 1,
                generation: 0,
                pad: 0,
                last_seen_ns: u64::MAX / 2,
            },
            0,
        )?;
    }
    Ok(())
}

/// Local delivery, encapsulation to another host, and decapsulation at the
/// owner's host, beside the empty program: an untagged IPv4 UDP packet of
/// `kv`, whose owner is `kv-1` (id 2) — here, or on the other host.
fn cluster_rows(fresh: u32, empty: &Xdp) -> anyhow::Result<Vec<ClusterRow>> {
    use sluice_common::{
        encap::DEFAULT_ENCAP_PORT,
        key,
        maps::{ClusterEntry, FAMILY_V4, MemberKey, RemoteHost},
    };
    let cfg = Config::parse(&config(2, 0), std::path::Path::new("bench.toml"))?;
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
        reserved: 0,
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
    if sent.action != sluice_tests::harness::XDP_TX {
        bail!("host A did not encapsulate (action {})", sent.action);
    }
    let floor = fresh_mode(empty, &frame, fresh, XDP_PASS)?;
    let encapsulated_floor = fresh_mode(empty, &sent.frame, fresh, XDP_PASS)?;
    let local = fresh_mode(b.dp.program_ref()?, &frame, fresh, XDP_REDIRECT)?;
    let encap = fresh_mode(
        a.dp.program_ref()?,
        &frame,
        fresh,
        sluice_tests::harness::XDP_TX,
    )?;
    let decap = fresh_mode(b.dp.program_ref()?, &sent.frame, fresh, XDP_REDIRECT)?;
    Ok(vec![
        ClusterRow {
            path: "owner here: delivered".into(),
            fresh_ns: local,
            empty_fresh_ns: floor,
        },
        ClusterRow {
            path: "owner on another host: encapsulated (GUE), XDP_TX".into(),
            fresh_ns: encap,
            empty_fresh_ns: floor,
        },
        ClusterRow {
            path: "from another host: decapsulated, delivered".into(),
            fresh_ns: decap,
            empty_fresh_ns: encapsulated_floor,
        },
    ])
}

pub(crate) fn run(
    repeat: u32,
    fresh: u32,
) -> anyhow::Result<(Vec<Row>, Vec<WriteRow>, Vec<ClusterRow>)> {
    let mut empty_obj = Ebpf::load(objects::EMPTY_XDP).context("loading the empty program")?;
    let empty = empty_program(&mut empty_obj)?;
    let frames = frames();
    // The floor, once per frame: it does not depend on Sluice's scale.
    let mut floor = Vec::new();
    for (name, f, _) in &frames {
        let r = repeat_mode(empty, f, repeat, XDP_PASS)
            .with_context(|| format!("empty program, {name}"))?;
        let fr = fresh_mode(empty, f, fresh, XDP_PASS)
            .with_context(|| format!("empty program, {name}"))?;
        floor.push((r, fr));
    }
    let mut rows = Vec::new();
    let mut writes = Vec::new();
    for scale in &SCALES {
        eprintln!("[bench]   {}", scale.name);
        let cfg = Config::parse(
            &config(scale.per_service, scale.extra_services),
            std::path::Path::new("bench.toml"),
        )?;
        let mut h = Harness::from_config(&cfg);
        if scale.pins > 0 {
            prefill_pins(&mut h, scale.pins)?;
        }
        for ((name, f, warm), (er, ef)) in frames.iter().zip(&floor) {
            let prog = h.dp.program_ref()?;
            if let Some(w) = warm {
                let (a, _) = run_once(prog, w, 1)?;
                if a != XDP_REDIRECT {
                    bail!("{name}: the SYN was not delivered (action {a})");
                }
            }
            // Repeated runs see the frame as the previous run left it: sent
            // on to the instance's MAC. Accept that MAC too, so every run
            // takes the path the first one did.
            let delivered_to = rewritten_dst(prog, f)?;
            h.dp.set_host_macs(&[NIC_MAC, delivered_to])?;
            let prog = h.dp.program_ref()?;
            let r = repeat_mode(prog, f, repeat, XDP_REDIRECT)
                .with_context(|| format!("{}, {name}", scale.name))?;
            let fr = fresh_mode(prog, f, fresh, XDP_REDIRECT)
                .with_context(|| format!("{}, {name}", scale.name))?;
            rows.push(Row {
                scale: scale.name.to_owned(),
                frame: (*name).to_owned(),
                repeat_ns: r,
                empty_repeat_ns: *er,
                fresh_ns: fr,
                empty_fresh_ns: *ef,
            });
        }
        if scale.extra_services == 0 && scale.per_service == 2 && scale.pins == 0 {
            writes = map_writes(&mut h)?;
        }
    }
    eprintln!("[bench]   cluster paths");
    let cluster = cluster_rows(fresh, empty)?;
    Ok((rows, writes, cluster))
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
