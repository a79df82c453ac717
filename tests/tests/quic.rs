//! The `quic-cid` tag kind: kernel tests of the real XDP program under
//! `BPF_PROG_TEST_RUN`, and one end-to-end test through the namespace
//! testbed with a QUIC-shaped client that changes its source port and
//! address mid-connection.
//!
//! The expected owner is what the agent computes: `common`'s tag hash of
//! the connection id's tag bytes (or the flow hash when the header does not
//! parse) and the assignment in its plan.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use sluice::{config::Config, coord::EmbeddedStore, datapath::Datapath as _};
use sluice_common::{counters, key, maps::NO_OWNER};
use sluice_tests::{
    harness::{Harness, XDP_REDIRECT},
    netns,
    packet::Packet,
    testbed::{self, Testbed},
};

const CONFIG: &str = r#"
[[service]]
name = "quic4"
vip = "198.18.1.4"
port = 443
protocol = "udp"
tag = { kind = "quic-cid", cid_length = 8, offset = 1, length = 4 }
[[service.instance]]
name = "quic4-a"
veth = "t-q4a"
[[service.instance]]
name = "quic4-b"
veth = "t-q4b"
[[service.instance]]
name = "quic4-c"
veth = "t-q4c"
[[service.instance]]
name = "quic4-d"
veth = "t-q4d"

[[service]]
name = "quic6"
vip = "fd00:5100::4"
port = 443
protocol = "udp"
tag = { kind = "quic-cid", cid_length = 20, offset = 4, length = 16 }
[[service.instance]]
name = "quic6-a"
veth = "t-q6a"
[[service.instance]]
name = "quic6-b"
veth = "t-q6b"
[[service.instance]]
name = "quic6-c"
veth = "t-q6c"
"#;

/// Service ids, in config order.
const QUIC4: u32 = 0;
const QUIC6: u32 = 1;

/// Where each service's tag sits in its connection ids.
const TAG4: std::ops::Range<usize> = 1..5;
const TAG6: std::ops::Range<usize> = 4..20;

/// A 20-byte connection id.
const ID20: &[u8; 20] = b"0123456789abcdefghij";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A QUIC v1 long header: flags (`0xc0 | type << 4`, packet number length
/// 4), version 1, the DCID with its length, a 0-byte SCID, then `rest`.
fn long_header(packet_type: u8, dcid: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = vec![0xc3 | (packet_type << 4), 0, 0, 0, 1];
    v.push(u8::try_from(dcid.len()).expect("short id"));
    v.extend_from_slice(dcid);
    v.push(0);
    v.extend_from_slice(rest);
    v
}

/// A QUIC 1-RTT short header: flags (fixed bit, packet number length 4),
/// the DCID (no length on the wire), then `rest`.
fn short_header(dcid: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = vec![0x43];
    v.extend_from_slice(dcid);
    v.extend_from_slice(rest);
    v
}

/// What a frame's key should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// The hash of these tag bytes.
    Tag(&'static [u8]),
    /// The flow hash, the tag counted as missing.
    Missing,
}

/// Runs `p` once and checks it is redirected to the owner of `key` in
/// `service`, with the tagged/tag-missing counters as `tagged` says.
/// Returns the instance it reached.
fn check(h: &Harness, name: &str, service: u32, p: &Packet, key: u32, tagged: bool) -> u32 {
    let frame = p.build();
    let (g0, s0) = (h.global(), h.service(service));
    let run = h.run(&frame);
    let (g1, s1) = (h.global(), h.service(service));
    assert_eq!(
        run.action, XDP_REDIRECT,
        "{name}: never dropped nor passed, whatever its QUIC header"
    );
    let owner = h.plan.owner_of_key(service, key);
    assert_ne!(owner, NO_OWNER, "{name}: the plan owns every unit");
    let got = h
        .instance_by_mac(&run.frame[..6])
        .unwrap_or_else(|| panic!("{name}: unknown MAC {:02x?}", &run.frame[..6]));
    assert_eq!(
        got, owner,
        "{name}: reached instance {got}, the agent computed {owner}"
    );
    let mut want = [0u64; counters::COUNT as usize];
    want[counters::DELIVERED as usize] = 1;
    want[counters::TAG_MISSING as usize] = u64::from(!tagged);
    let deltas: Vec<u64> = g1.iter().zip(g0).map(|(a, b)| a - b).collect();
    assert_eq!(
        deltas,
        want,
        "{name}: global counter deltas, in order {:?}",
        counters::NAMES
    );
    assert_eq!(
        (
            s1.packets - s0.packets,
            s1.delivered - s0.delivered,
            s1.tagged - s0.tagged,
            s1.tag_missing - s0.tag_missing
        ),
        (1, 1, u64::from(tagged), u64::from(!tagged)),
        "{name}: service packets, delivered, tagged, tag_missing"
    );
    got
}

fn check_want(h: &Harness, name: &str, service: u32, p: &Packet, want: Want) -> u32 {
    match want {
        Want::Tag(tag) => check(h, name, service, p, key::tag_bytes(tag), true),
        Want::Missing => check(
            h,
            name,
            service,
            p,
            key::host::flow(p.src, p.dst, 17),
            false,
        ),
    }
}

/// Long and short headers carrying one connection id reach the same
/// instance from any source address and port; the ids spread over the
/// instances as their keys say.
#[test]
fn a_connection_id_reaches_its_owner_from_any_source() {
    let h = Harness::new(CONFIG);
    let mut rng = StdRng::seed_from_u64(0x0051_c1d0);
    let mut per_instance: HashMap<u32, u32> = HashMap::new();
    for conn in 0..64 {
        let (service, dst, dcid, tag) = if conn % 2 == 0 {
            let mut id = [0u8; 8];
            rng.fill(&mut id);
            (QUIC4, sa("198.18.1.4:443"), id.to_vec(), TAG4)
        } else {
            let mut id = [0u8; 20];
            rng.fill(&mut id);
            (QUIC6, sa("[fd00:5100::4]:443"), id.to_vec(), TAG6)
        };
        let want = key::tag_bytes(&dcid[tag]);
        let mut seen = HashSet::new();
        for hop in 0..8u16 {
            let port = rng.random_range(1024..=65535);
            let src = if dst.is_ipv4() {
                SocketAddr::new(IpAddr::from([198, 18, 0, rng.random()]), port)
            } else {
                SocketAddr::new(
                    IpAddr::from([0xfd00, 0x5100, 0, 0, 0, 0, rng.random(), rng.random()]),
                    port,
                )
            };
            // The server's id in a Handshake packet, then 1-RTT packets.
            let payload = if hop == 0 {
                long_header(2, &dcid, b"handshake")
            } else {
                short_header(&dcid, &[0, 0, 0, u8::try_from(hop).expect("small"), 0xaa])
            };
            let p = Packet::udp(src, dst).payload(payload);
            seen.insert(check(
                &h,
                &format!("connection {conn}, packet {hop} from {src}"),
                service,
                &p,
                want,
                true,
            ));
        }
        assert_eq!(
            seen.len(),
            1,
            "connection {conn}: its packets reached instances {seen:?}"
        );
        *per_instance
            .entry(*seen.iter().next().expect("one"))
            .or_default() += 1;
    }
    for i in &h.plan.instances {
        assert!(
            per_instance.get(&i.id).copied().unwrap_or(0) >= 2,
            "instance {} got {:?} of 64 connections: the ids should spread",
            i.name,
            per_instance.get(&i.id)
        );
    }
}

/// The tag is exactly the configured bytes of the id, at the odd lengths
/// too: 4 bytes at 1 of 8-byte ids, 16 at 4 of 20-byte ids.
#[test]
fn the_tag_is_the_configured_bytes_of_the_id() {
    let h = Harness::new(CONFIG);
    let v4 = |payload: Vec<u8>| {
        Packet::udp(sa("198.18.0.10:50000"), sa("198.18.1.4:443")).payload(payload)
    };
    let v6 = |payload: Vec<u8>| {
        Packet::udp(sa("[fd00:5100::10]:50000"), sa("[fd00:5100::4]:443")).payload(payload)
    };
    let cases: Vec<(&str, u32, Packet, Want)> = vec![
        (
            "short header, 8-byte id",
            QUIC4,
            v4(short_header(b"xTAG4yyy", b"pn..")),
            Want::Tag(b"TAG4"),
        ),
        (
            "Initial with the client's 8-byte id",
            QUIC4,
            v4(long_header(0, b"xTAG4yyy", &[0; 40])),
            Want::Tag(b"TAG4"),
        ),
        (
            "Initial with a 5-byte id: just holds the tag",
            QUIC4,
            v4(long_header(0, b"xTAG4", &[0; 40])),
            Want::Tag(b"TAG4"),
        ),
        (
            "0-RTT with a 20-byte id",
            QUIC4,
            v4(long_header(1, ID20, b"early data")),
            Want::Tag(b"1234"),
        ),
        (
            "short header ending with its id",
            QUIC4,
            v4(short_header(b"xTAG4yyy", b"")),
            Want::Tag(b"TAG4"),
        ),
        (
            "v6 short header, 20-byte id, tag 16 at 4",
            QUIC6,
            v6(short_header(ID20, b"pn..")),
            Want::Tag(b"456789abcdefghij"),
        ),
        (
            "v6 Handshake, 20-byte id",
            QUIC6,
            v6(long_header(2, ID20, b"")),
            Want::Tag(b"456789abcdefghij"),
        ),
    ];
    for (name, service, p, want) in &cases {
        check_want(&h, name, *service, p, *want);
    }
}

/// Headers that do not parse, or ids too short for the tag: keyed by the
/// flow hash, counted as tag-missing, delivered all the same.
#[test]
fn bad_quic_headers_fall_back_to_the_flow_hash_and_are_counted() {
    let h = Harness::new(CONFIG);
    let v4 = |payload: Vec<u8>| {
        Packet::udp(sa("198.18.0.10:50001"), sa("198.18.1.4:443")).payload(payload)
    };
    let v6 = |payload: Vec<u8>| {
        Packet::udp(sa("[fd00:5100::10]:50001"), sa("[fd00:5100::4]:443")).payload(payload)
    };
    let id = b"xTAG4yyy";
    let mut no_fixed_bit = short_header(id, b"pn..");
    no_fixed_bit[0] = 0x03;
    let mut long_21 = long_header(0, &[7; 20], &[7; 40]);
    long_21[5] = 21;
    let mut long_255 = long_header(0, &[7; 20], &[7; 300]);
    long_255[5] = 255;
    let short_header_cut = short_header(id, b"")[..8].to_vec();
    let long_cut = long_header(0, id, b"")[..12].to_vec();
    let cases: Vec<(String, u32, Packet)> = vec![
        ("empty datagram".into(), QUIC4, v4(Vec::new())),
        ("flags byte only".into(), QUIC4, v4(vec![0x43])),
        (
            "short header cut inside its id".into(),
            QUIC4,
            v4(short_header_cut),
        ),
        (
            "short header without the fixed bit".into(),
            QUIC4,
            v4(no_fixed_bit),
        ),
        (
            "long header cut before its id length".into(),
            QUIC4,
            v4(vec![0xc3, 0, 0, 0]),
        ),
        ("long header cut inside its id".into(), QUIC4, v4(long_cut)),
        ("DCID length 21".into(), QUIC4, v4(long_21)),
        ("DCID length 255".into(), QUIC6, v6(long_255)),
        (
            "4-byte id, tag needs 5".into(),
            QUIC4,
            v4(long_header(0, b"xTAG", &[0; 40])),
        ),
        ("0-byte id".into(), QUIC4, v4(long_header(0, b"", &[0; 40]))),
        (
            "v6 Initial with an 8-byte id, tag needs 20".into(),
            QUIC6,
            v6(long_header(0, id, &[0; 40])),
        ),
        (
            "v6 short header cut at 19 bytes of id".into(),
            QUIC6,
            v6(short_header(&[9; 19], b"")),
        ),
    ];
    for (name, service, p) in &cases {
        check_want(&h, name, *service, p, Want::Missing);
    }
    // Ethernet padding after a short datagram holds the rest of the id:
    // the datagram still lacks it.
    let p = v4(short_header(id, b"")[..4].to_vec());
    let mut frame = p.build();
    frame.extend_from_slice(b"4yyy pad");
    let (s0, g0) = (h.service(QUIC4), h.global());
    let run = h.run(&frame);
    assert_eq!(run.action, XDP_REDIRECT, "padded frame");
    assert_eq!(
        h.instance_by_mac(&run.frame[..6]),
        Some(
            h.plan
                .owner_of_key(QUIC4, key::host::flow(p.src, p.dst, 17))
        ),
        "padded frame: the flow hash's owner"
    );
    assert_eq!(h.service(QUIC4).tag_missing - s0.tag_missing, 1, "padded");
    assert_eq!(
        h.global()[counters::TAG_MISSING as usize] - g0[counters::TAG_MISSING as usize],
        1,
        "padded"
    );
}

/// Random datagrams, QUIC-like and not: each is delivered, to the tag's
/// owner or the flow hash's, never dropped; tagged and tag-missing add up
/// to the packets.
#[test]
fn random_datagrams_are_never_dropped() {
    let h = Harness::new(CONFIG);
    let mut rng = StdRng::seed_from_u64(0x0051_dead);
    let s0 = h.service(QUIC4);
    let n = 2_000u64;
    for i in 0..n {
        let len = rng.random_range(0..48);
        let mut payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if let Some(b) = payload.get_mut(5).filter(|_| i % 2 == 0) {
            // Half of them with plausible long-header id lengths.
            *b = rng.random_range(0..24);
        }
        let src = SocketAddr::new(
            IpAddr::from([198, 18, 0, rng.random()]),
            rng.random_range(1..=65535),
        );
        let p = Packet::udp(src, sa("198.18.1.4:443")).payload(payload.clone());
        let run = h.run(&p.build());
        assert_eq!(run.action, XDP_REDIRECT, "datagram {i}: {payload:02x?}");
        let got = h.instance_by_mac(&run.frame[..6]).expect("known MAC");
        let flow_owner = h.plan.owner_of_key(QUIC4, key::host::flow(src, p.dst, 17));
        // The tag's owner under either header form, where it could apply.
        let tag_owner = |at: usize| {
            payload
                .get(at + TAG4.start..at + TAG4.end)
                .map(|t| h.plan.owner_of_key(QUIC4, key::tag_bytes(t)))
        };
        let allowed = [Some(flow_owner), tag_owner(1), tag_owner(6)];
        assert!(
            allowed.contains(&Some(got)),
            "datagram {i} reached {got}, neither its flow's owner nor a tag's: {payload:02x?}"
        );
    }
    let s1 = h.service(QUIC4);
    assert_eq!(s1.packets - s0.packets, n);
    assert_eq!(s1.delivered - s0.delivered, n);
    assert_eq!(
        (s1.tagged - s0.tagged) + (s1.tag_missing - s0.tag_missing),
        n,
        "every packet of a tagged service is tagged or tag-missing"
    );
    assert!(
        s1.tagged - s0.tagged > 100 && s1.tag_missing - s0.tag_missing > 100,
        "both outcomes exercised: tagged {}, missing {}",
        s1.tagged - s0.tagged,
        s1.tag_missing - s0.tag_missing
    );
}

/// Waits for the next datagram at any of `servers`: the server's index, the
/// sender and the bytes.
fn receive_one(servers: &[UdpSocket], timeout: Duration) -> Option<(usize, SocketAddr, Vec<u8>)> {
    let end = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        for (k, s) in servers.iter().enumerate() {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return Some((k, from, buf[..n].to_vec()));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// A UDP socket in namespace `ns`, bound to `addr`.
fn socket_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = netns::run_in(ns, || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"));
    s.set_nonblocking(true).expect("non-blocking");
    s
}

/// Adds `cidr` to the client's interface (deleted with its namespace).
fn add_client_address(tb: &Testbed, cidr: &str) {
    let out = Command::new("ip")
        .args(["-n", &tb.client, "addr", "add", cidr, "dev", "eth0"])
        .output()
        .expect("running ip");
    assert!(out.status.success(), "adding {cidr} to the client: {out:?}");
}

/// Starts the agent in the testbed's host namespace, as `sluice run` would.
fn start_agent(tb: &Testbed, toml: &str) -> sluice::agent::Agent {
    let config = Config::parse(toml, Path::new("quic.toml")).unwrap_or_else(|e| panic!("{e}"));
    tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| {
            panic!(
                "starting the agent: {}",
                sluice_tests::harness::error_chain(&e)
            )
        })
}

/// The rest of connection `conn` after its Initial reached instance `k`:
/// a Handshake and 1-RTT packets with the server's id `server_id`, three
/// from each of `sockets` in turn (the client moving from one to the
/// next). Checks each reaches `k`; returns how many were sent.
fn migrate(
    conn: u8,
    servers: &[UdpSocket],
    sockets: [&UdpSocket; 3],
    dst: SocketAddr,
    server_id: &[u8],
    k: usize,
) -> u64 {
    let mut sources = HashSet::new();
    let mut n = 0u8;
    for s in sockets {
        for _ in 0..3 {
            let packet = if n == 0 {
                long_header(2, server_id, b"handshake")
            } else {
                short_header(server_id, &[0, 0, conn, n, 0x5a, 0x5a])
            };
            s.send_to(&packet, dst).expect("send");
            let (at, from, got) = receive_one(servers, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("connection {conn}, packet {n}: nothing arrived"));
            assert_eq!(
                got, packet,
                "connection {conn}, packet {n}: another datagram arrived"
            );
            assert_eq!(
                at, k,
                "connection {conn}, packet {n} from {from}: reached instance {at}, its connection is at {k}"
            );
            sources.insert(from);
            n += 1;
        }
    }
    let addresses: HashSet<IpAddr> = sources.iter().map(SocketAddr::ip).collect();
    assert_eq!(
        (sources.len(), addresses.len()),
        (3, 2),
        "connection {conn}: the client changed port, then address: {sources:?}"
    );
    u64::from(n)
}

/// End to end: a QUIC-shaped client whose first Initial (its own random
/// connection id) lands on some instance; that instance "chooses" a
/// connection id whose tag falls in a unit it owns, as the README tells
/// servers to; the client then sends 1-RTT packets with it from one
/// socket, from a second socket (another source port), and from another
/// address. Every packet of a connection reaches the instance that took
/// its Initial, over several connections spread over the instances.
#[test]
fn a_migrating_quic_client_stays_with_its_instance() {
    let tb = Testbed::new("quic", 3).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    // The address the client moves to mid-connection.
    let moved = sa("198.18.0.3:0");
    add_client_address(&tb, "198.18.0.3/24");
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 4433);
    let toml = format!(
        "[[service]]\nname = \"quic\"\nvip = \"{}\"\nport = 4433\nprotocol = \"udp\"\n\
         tag = {{ kind = \"quic-cid\", cid_length = 8, offset = 2, length = 4 }}\n{}",
        dst.ip(),
        tb.instances_toml(0, tb.instances.len())
    );
    let agent = start_agent(&tb, &toml);
    let servers: Vec<UdpSocket> = tb
        .instances
        .iter()
        .map(|i| socket_in(&i.netns, dst))
        .collect();
    // Testbed index of each plan instance (names are `inst-<k>`).
    let index: HashMap<u32, usize> = agent
        .plan
        .instances
        .iter()
        .map(|i| {
            (
                i.id,
                i.name
                    .trim_start_matches("inst-")
                    .parse()
                    .expect("inst-<k>"),
            )
        })
        .collect();
    let instance_of = |id: &[u8]| index[&agent.plan.owner_of_key(0, key::tag_bytes(&id[2..6]))];

    let mut rng = StdRng::seed_from_u64(0x0051_9c1d);
    let mut took = vec![0u32; servers.len()];
    let mut datagrams = 0u64;
    let connections = 12;
    for conn in 0..connections {
        let a = socket_in(&tb.client, sa("198.18.0.2:0"));
        let b = socket_in(&tb.client, sa("198.18.0.2:0"));
        let c = socket_in(&tb.client, moved);
        // The client's first Initial: an id of its own, padded to 1200
        // bytes as QUIC requires.
        let mut client_id = [0u8; 8];
        rng.fill(&mut client_id);
        let mut initial = long_header(0, &client_id, &[0; 8]);
        initial.resize(1200, 0);
        a.send_to(&initial, dst).expect("send");
        let (k, _, got) = receive_one(&servers, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("connection {conn}: the Initial did not arrive"));
        assert_eq!(got, initial, "connection {conn}: another datagram arrived");
        assert_eq!(
            k,
            instance_of(&client_id),
            "connection {conn}: the Initial reached instance {k}, not its id's owner"
        );
        took[k] += 1;
        // Instance k picks its id: random bytes until the tag's unit is one
        // of its own.
        let server_id = (0..100_000)
            .map(|_| {
                let mut id = [0u8; 8];
                rng.fill(&mut id);
                id
            })
            .find(|id| instance_of(id) == k)
            .expect("an id in instance k's units");
        datagrams += 1 + migrate(conn, &servers, [&a, &b, &c], dst, &server_id, k);
    }
    assert!(
        receive_one(&servers, Duration::from_millis(200)).is_none(),
        "a datagram arrived twice"
    );
    let svc = agent.datapath.service_counters(0).expect("counters");
    eprintln!("connections per instance {took:?}; service counters {svc:?}");
    assert!(
        took.iter().filter(|&&n| n > 0).count() >= 2,
        "{connections} connections should spread over more than one instance: {took:?}"
    );
    assert_eq!(
        (svc.tagged, svc.tag_missing, svc.delivered),
        (datagrams, 0, datagrams),
        "every datagram keyed by its connection id and delivered"
    );
    agent.stop().expect("detach");
}
