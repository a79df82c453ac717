//! The data path between cluster hosts, in the kernel (`BPF_PROG_TEST_RUN`):
//! a packet whose owner runs on another host leaves encapsulated (GUE over
//! UDP) towards that host's next hop; the owner's host takes it out of its
//! outer headers and delivers it to the instance, but only from a cluster
//! member; what cannot be sent (too big, no next hop) or taken (not a
//! member, not our header, a target that is not ours) is dropped and
//! counted. Expected bytes are built here from the packet, never read
//! back from the data path.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use sluice::{datapath::Datapath as _, plan::Group};
use sluice_common::{
    counters,
    encap::{self, GUE_LEN, Gue},
    key,
    maps::{ClusterEntry, FAMILY_V4, FAMILY_V6, MemberKey, PROTO_UDP, RemoteHost},
};
use sluice_tests::{
    harness::{Harness, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, instance_mac, run_on},
    packet::{NIC_MAC, Packet},
};

/// kv-a and kv-b on host A (ids 1, 2), kv-c on host B (id 3); the same
/// config on both hosts, each marking the other's instance remote.
const CONFIG: &str = r#"
[[service]]
name = "kv"
vips = ["198.18.1.1", "fd00:5100::1"]
port = 7000
protocol = "udp"
[[service.instance]]
name = "kv-a"
veth = "t-kva"
[[service.instance]]
name = "kv-b"
veth = "t-kvb"
[[service.instance]]
name = "kv-c"
veth = "t-kvc"

[[service]]
name = "tagged"
vip = "198.18.1.1"
port = 7100
vlan = 100
protocol = "udp"
[[service.instance]]
name = "tagged-a"
veth = "t-tga"
"#;

const A_UNDERLAY: [u8; 4] = [198, 18, 10, 1];
const B_UNDERLAY: [u8; 4] = [198, 18, 10, 2];
/// The MAC of host B's NIC, A's next hop to it.
const B_MAC: [u8; 6] = [0x02, 0x51, 0x00, 0x00, 0x00, 0x22];
const PORT: u16 = encap::DEFAULT_ENCAP_PORT;
const KV: u32 = 0;

fn v4(a: [u8; 4]) -> [u32; 4] {
    [key::host::v4(a), 0, 0, 0]
}

fn cluster(underlay: [u8; 4], mac: [u8; 6], mtu: u16) -> ClusterEntry {
    ClusterEntry {
        underlay: v4(underlay),
        mac,
        family: FAMILY_V4,
        pad: 0,
        port_be: PORT.to_be(),
        mtu,
        pad2: 0,
        fence_ns: 0,
    }
}

fn member(a: [u8; 4]) -> MemberKey {
    MemberKey {
        addr: v4(a),
        family: FAMILY_V4,
        pad: [0; 3],
    }
}

/// Host A: every unit of `kv` owned by kv-c (id 3), on host B.
fn host_a(mtu: u16) -> Harness {
    let mut h = Harness::new(CONFIG);
    h.dp.set_cluster(cluster(A_UNDERLAY, NIC_MAC, mtu)).unwrap();
    h.dp.set_remote_host(
        1,
        RemoteHost {
            underlay: v4(B_UNDERLAY),
            next_hop: B_MAC,
            pad: 0,
        },
    )
    .unwrap();
    h.dp.set_members(&[member(B_UNDERLAY)]).unwrap();
    h.dp.set_remote_instance(3, KV, 1, true).unwrap();
    h.dp.set_group_owner(KV, Group::ALL, 3).unwrap();
    h.dp.set_group_owner(1, Group::ALL, 4).unwrap();
    h
}

/// Host B: kv-c (id 3) local and owning every unit; kv-a and kv-b on A.
fn host_b() -> Harness {
    let mut h = Harness::new(CONFIG);
    h.dp.set_cluster(cluster(B_UNDERLAY, B_MAC, 1500)).unwrap();
    h.dp.set_remote_host(
        1,
        RemoteHost {
            underlay: v4(A_UNDERLAY),
            next_hop: NIC_MAC,
            pad: 0,
        },
    )
    .unwrap();
    h.dp.set_members(&[member(A_UNDERLAY)]).unwrap();
    for id in [1, 2] {
        h.dp.set_remote_instance(id, KV, 1, true).unwrap();
    }
    h.dp.set_group_owner(KV, Group::ALL, 3).unwrap();
    h.dp.set_group_owner(1, Group::ALL, 4).unwrap();
    // B's NIC is not the harness's NIC_MAC: frames for B_MAC are B's.
    h.plan.add_host_mac(B_MAC);
    h.dp.set_host_macs(&h.plan.host_macs).unwrap();
    h
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)), port)
}

fn kv4() -> SocketAddr {
    "198.18.1.1:7000".parse().unwrap()
}

/// The encapsulated frame A sends for `p` (owner `target`), built here.
fn expected_encap(p: &Packet, target: u16, vlan: u16) -> Vec<u8> {
    let frame = p.build();
    let inner = &frame[p.l3_offset()..];
    let k = key::host::flow(p.src, p.dst, PROTO_UDP);
    let outer = encap::outer_v4(
        &encap::Tunnel {
            src: v4(A_UNDERLAY),
            dst: v4(B_UNDERLAY),
            sport: encap::source_port(k),
            dport: PORT,
        },
        u16::try_from(inner.len()).unwrap(),
        &Gue {
            inner_family: if p.dst.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            target,
            vlan,
            previous: 0,
        },
    );
    let mut out = Vec::new();
    out.extend_from_slice(&B_MAC);
    out.extend_from_slice(&NIC_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&outer);
    out.extend_from_slice(inner);
    out
}

#[test]
fn a_packet_for_a_remote_owner_leaves_encapsulated_to_its_host() {
    let a = host_a(1500);
    let cases = [
        Packet::udp(client(40000), kv4()).payload(vec![7u8; 100]),
        Packet::udp(
            "[fd00:5100::9]:40001".parse().unwrap(),
            "[fd00:5100::1]:7000".parse().unwrap(),
        )
        .payload(vec![8u8; 64]),
    ];
    for p in &cases {
        let r = a.run(&p.build());
        assert_eq!(r.action, XDP_TX, "{p:?}");
        assert_eq!(r.frame, expected_encap(p, 3, 0), "{p:?}");
    }
    let g = a.global();
    assert_eq!(g[counters::ENCAPSULATED as usize], 2);
    assert_eq!(a.service(KV).packets, 2, "counted where it entered");
    assert_eq!(a.service(KV).delivered, 0, "delivered elsewhere");
    // Its hits are counted where it is delivered.
    assert_eq!(a.dp.unit_hits(KV).unwrap().iter().sum::<u64>(), 0);
}

#[test]
fn a_vlan_packet_travels_untagged_with_its_vlan_in_the_header() {
    let mut a = host_a(1500);
    a.dp.set_remote_instance(4, 1, 1, true).unwrap();
    let p = Packet::udp(client(40002), "198.18.1.1:7100".parse().unwrap())
        .vlan(0x8100, 100)
        .payload(vec![1u8; 32]);
    let r = a.run(&p.build());
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.frame, expected_encap(&p, 4, 100));
}

#[test]
fn what_does_not_fit_the_mtu_or_has_no_next_hop_is_dropped_and_counted() {
    // 1,460 bytes of inner IP + 40 of outer = 1,500: fits; one more does not.
    let a = host_a(1500);
    let sized = |ip_len: usize| Packet::udp(client(40003), kv4()).payload(vec![0u8; ip_len - 28]);
    assert_eq!(a.run(&sized(1460).build()).action, XDP_TX);
    let r = a.run(&sized(1461).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(a.global()[counters::ENCAP_TOO_BIG as usize], 1);

    let mut a = host_a(1500);
    a.dp.set_remote_host(1, RemoteHost::default()).unwrap();
    let r = a.run(&Packet::udp(client(40004), kv4()).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(a.global()[counters::ENCAP_NO_ROUTE as usize], 1);
}

#[test]
fn the_owners_host_takes_it_out_and_delivers_it_byte_for_byte() {
    let a = host_a(1500);
    let b = host_b();
    for p in [
        Packet::udp(client(40010), kv4()).payload(vec![3u8; 200]),
        Packet::udp(
            "[fd00:5100::9]:40011".parse().unwrap(),
            "[fd00:5100::1]:7000".parse().unwrap(),
        ),
    ] {
        let sent = a.run(&p.build());
        assert_eq!(sent.action, XDP_TX);
        let got = b.run(&sent.frame);
        assert_eq!(got.action, XDP_REDIRECT, "{p:?}");
        // The client's frame, as the instance gets it from a local
        // delivery: its MAC in front, the rest untouched.
        let mut want = p.build();
        want[..6].copy_from_slice(&instance_mac(3));
        want[6..12].copy_from_slice(&NIC_MAC);
        assert_eq!(got.frame, want, "{p:?}");
    }
    assert_eq!(b.global()[counters::DECAP_DELIVERED as usize], 2);
    assert_eq!(b.instance(3).packets, 2);
    assert_eq!(b.service(KV).packets, 0, "counted once, where it entered");
    assert_eq!(b.dp.unit_hits(KV).unwrap().iter().sum::<u64>(), 2);
}

/// The frame A sends for a plain `kv` packet, with `edit` applied.
fn from_a(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = host_a(1500)
        .run(&Packet::udp(client(40020), kv4()).build())
        .frame;
    edit(&mut f);
    f
}

/// Rewrites the outer IPv4 source (and its header checksum).
fn outer_src(f: &mut [u8], src: [u8; 4]) {
    f[26..30].copy_from_slice(&src);
    f[24..26].copy_from_slice(&[0, 0]);
    let c = sluice_tests::packet::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn only_members_packets_are_taken_and_only_our_header() {
    let b = host_b();
    let stranger = from_a(|f| outer_src(f, [198, 18, 10, 99]));
    assert_eq!(b.run(&stranger).action, XDP_DROP);
    assert_eq!(b.global()[counters::DECAP_REFUSED as usize], 1);

    let gue_at = 14 + 20 + 8;
    let bad_version = from_a(|f| f[gue_at] |= 0x40);
    // An inner "IPv4" header of length 0.
    let bad_inner = from_a(|f| f[gue_at + GUE_LEN] = 0x40);
    for f in [bad_version, bad_inner] {
        assert_eq!(b.run(&f).action, XDP_DROP);
    }
    assert_eq!(b.global()[counters::DECAP_MALFORMED as usize], 2);

    // To another port of ours: not the tunnel, passes to the kernel.
    let other_port = from_a(|f| f[36..38].copy_from_slice(&6081u16.to_be_bytes()));
    assert_eq!(b.run(&other_port).action, XDP_PASS);
    assert_eq!(b.global()[counters::PASS_NO_SERVICE as usize], 1);
}

#[test]
fn a_target_that_is_not_ours_goes_to_our_owner_or_nowhere() {
    let mut b = host_b();
    // Target kv-a (remote to B): B's own owner of the unit, kv-c, takes it.
    let to_a = from_a(|f| f[14 + 20 + 8 + 5] = 1);
    let got = b.run(&to_a);
    assert_eq!(got.action, XDP_REDIRECT);
    assert_eq!(&got.frame[..6], &instance_mac(3));
    // B's table says host A owns the unit too: dropped, never sent back.
    b.dp.set_group_owner(KV, Group::ALL, 1).unwrap();
    assert_eq!(b.run(&to_a).action, XDP_DROP);
    assert_eq!(b.global()[counters::DECAP_STALE as usize], 1);
    assert_eq!(b.global()[counters::ENCAPSULATED as usize], 0);
}

/// Host B's instances before a reload: kv-c (owning every unit) and kv-d.
const B_BEFORE: &str = r#"
[[service]]
name = "kv"
vips = ["198.18.1.1", "fd00:5100::1"]
port = 7000
protocol = "udp"
[[service.instance]]
name = "kv-c"
veth = "t-kvc"
[[service.instance]]
name = "kv-d"
veth = "t-kvd"
"#;

/// B after the reload: kv-c dropped, its units kv-d's.
const B_AFTER: &str = r#"
[[service]]
name = "kv"
vips = ["198.18.1.1", "fd00:5100::1"]
port = 7000
protocol = "udp"
[[service.instance]]
name = "kv-d"
veth = "t-kvd"
"#;

/// A reload on B drops kv-c, the owner of every unit, for kv-d. The old
/// program runs while the maps are written: after every step, a packet A
/// still sends to kv-c (A's table follows the store a moment later), and
/// one entering B, must find a deliverer. Taken out before its units had
/// their new owner, kv-c left A's packets nobody (`decap_stale`; B never
/// sends a decapsulated packet on).
#[test]
fn a_reload_dropping_an_owner_leaves_no_step_without_a_deliverer() {
    let mut b = Harness::new(B_BEFORE);
    b.dp.set_cluster(cluster(B_UNDERLAY, B_MAC, 1500)).unwrap();
    b.dp.set_members(&[member(A_UNDERLAY)]).unwrap();
    b.plan.add_host_mac(B_MAC);
    b.dp.set_host_macs(&b.plan.host_macs).unwrap();
    let id = |n: &str| b.plan.instances.iter().find(|i| i.name == n).unwrap().id;
    let (c, d) = (id("kv-c"), id("kv-d"));
    b.dp.set_group_owner(KV, Group::ALL, c).unwrap();
    let for_c = from_a(|f| f[14 + 20 + 8 + 5] = u8::try_from(c).unwrap());
    let direct = Packet::udp(client(40020), kv4()).build();
    for f in [&for_c, &direct] {
        assert_eq!(b.run(f).action, XDP_REDIRECT);
    }
    let mut plan = b.plan_for(B_AFTER);
    plan.add_host_mac(B_MAC);
    plan.services[KV as usize].groups = vec![(Group::ALL, d)];
    let mut gaps = Vec::new();
    b.dp.program_observed(&plan, |dp, step| {
        for (what, f) in [
            ("A's packet for kv-c", &for_c),
            ("a packet entering B", &direct),
        ] {
            let got = run_on(dp, f);
            if got.action != XDP_REDIRECT {
                gaps.push(format!("{what} after step {step:?}: action {}", got.action));
            }
        }
    })
    .unwrap();
    let g = b.global();
    assert!(
        gaps.is_empty(),
        "{}; decap_stale {}, punted or unowned {}",
        gaps.join("; "),
        g[counters::DECAP_STALE as usize],
        g[counters::PUNTED as usize] + g[counters::UNOWNED as usize]
    );
    // Done: kv-d takes both.
    let d_mac = plan.instances.iter().find(|i| i.id == d).unwrap().mac;
    for f in [&for_c, &direct] {
        let got = b.run(f);
        assert_eq!(got.action, XDP_REDIRECT);
        assert_eq!(got.frame[..6], d_mac);
    }
}

/// The same round trip over an IPv6 underlay: 60 bytes of outer headers,
/// and what fits the MTU with them.
#[test]
fn an_ipv6_underlay_carries_the_packets_too() {
    let (a6, b6) = (
        key::host::v6(
            "fd00:5100:10::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        ),
        key::host::v6(
            "fd00:5100:10::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        ),
    );
    let entry = |underlay, mac| ClusterEntry {
        underlay,
        mac,
        family: FAMILY_V6,
        pad: 0,
        port_be: PORT.to_be(),
        mtu: 1500,
        pad2: 0,
        fence_ns: 0,
    };
    let member6 = |addr| MemberKey {
        addr,
        family: FAMILY_V6,
        pad: [0; 3],
    };
    let mut a = Harness::new(CONFIG);
    a.dp.set_cluster(entry(a6, NIC_MAC)).unwrap();
    a.dp.set_remote_host(
        1,
        RemoteHost {
            underlay: b6,
            next_hop: B_MAC,
            pad: 0,
        },
    )
    .unwrap();
    a.dp.set_members(&[member6(b6)]).unwrap();
    a.dp.set_remote_instance(3, KV, 1, true).unwrap();
    a.dp.set_group_owner(KV, Group::ALL, 3).unwrap();
    let mut b = host_b();
    b.dp.set_cluster(entry(b6, B_MAC)).unwrap();
    b.dp.set_members(&[member6(a6)]).unwrap();

    let p = Packet::udp(client(40030), kv4()).payload(vec![5u8; 64]);
    let sent = a.run(&p.build());
    assert_eq!(sent.action, XDP_TX);
    assert_eq!(&sent.frame[12..14], &0x86DDu16.to_be_bytes());
    assert_eq!(sent.frame.len(), p.build().len() + encap::OUTER_V6_LEN);
    let got = b.run(&sent.frame);
    assert_eq!(got.action, XDP_REDIRECT);
    let mut want = p.build();
    want[..6].copy_from_slice(&instance_mac(3));
    want[6..12].copy_from_slice(&NIC_MAC);
    assert_eq!(got.frame, want);

    // 1,440 bytes of inner IP + 60 = 1,500: fits; one more does not.
    let sized = |ip_len: usize| Packet::udp(client(40031), kv4()).payload(vec![0u8; ip_len - 28]);
    assert_eq!(a.run(&sized(1440).build()).action, XDP_TX);
    assert_eq!(a.run(&sized(1441).build()).action, XDP_DROP);
    assert_eq!(a.global()[counters::ENCAP_TOO_BIG as usize], 1);
}

/// A fenced host (its lease not renewed in time) delivers nothing as an
/// owner: past the deadline, what it would encapsulate to another host,
/// deliver to its own instance, or deliver from another host (its table is
/// stale, the sender's choice may be too) is dropped and counted
/// `fenced`. Before the deadline, or with none, it delivers.
#[test]
fn a_fenced_host_delivers_nothing_past_its_deadline() {
    use std::time::{Duration, Instant};
    let past = Instant::now()
        .checked_sub(Duration::from_millis(10))
        .unwrap();
    let future = Instant::now() + Duration::from_hours(1);
    let p = Packet::udp(client(40030), kv4()).payload(vec![5u8; 64]);

    let mut a = host_a(1500);
    let sent = a.run(&p.build());
    a.dp.set_fence(Some(past)).unwrap();
    assert_eq!(a.run(&p.build()).action, XDP_DROP, "to another host");
    assert_eq!(a.global()[counters::FENCED as usize], 1);
    assert_eq!(
        a.global()[counters::ENCAPSULATED as usize],
        1,
        "before the fence"
    );
    a.dp.set_fence(Some(future)).unwrap();
    assert_eq!(a.run(&p.build()).action, XDP_TX, "deadline ahead");
    a.dp.set_fence(None).unwrap();
    assert_eq!(a.run(&p.build()).action, XDP_TX, "no fence");
    // A cluster entry written again keeps the fence.
    a.dp.set_fence(Some(past)).unwrap();
    a.dp.set_cluster(cluster(A_UNDERLAY, NIC_MAC, 1500))
        .unwrap();
    assert_eq!(a.run(&p.build()).action, XDP_DROP, "fence kept");

    let mut b = host_b();
    b.dp.set_fence(Some(past)).unwrap();
    assert_eq!(b.run(&p.build()).action, XDP_DROP, "to its own instance");
    assert_eq!(b.run(&sent.frame).action, XDP_DROP, "from another host");
    assert_eq!(b.global()[counters::FENCED as usize], 2);
    assert_eq!(b.instance(3).packets, 0);
    b.dp.set_fence(Some(future)).unwrap();
    assert_eq!(b.run(&p.build()).action, XDP_REDIRECT);
    assert_eq!(b.run(&sent.frame).action, XDP_REDIRECT);
}

/// Without a cluster there is no lease to lose: a fence is not enforced.
#[test]
fn a_single_host_ignores_the_fence() {
    let mut h = Harness::new(CONFIG);
    h.dp.set_group_owner(KV, Group::ALL, 1).unwrap();
    let past = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_millis(10))
        .unwrap();
    h.dp.set_fence(Some(past)).unwrap();
    let r = h.run(&Packet::udp(client(40031), kv4()).build());
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(h.global()[counters::FENCED as usize], 0);
}

/// A punted frame whose unit the store gives to an instance on another
/// host (issue 27, defect 7): the agent sends it there itself, encapsulated
/// byte for byte as the program encapsulates one; not where the program
/// would drop it (fenced, an instance that is not remote).
#[test]
fn the_agent_encapsulates_a_punted_frame_as_the_program_does() {
    use sluice_common::parse;
    let mut a = host_a(1500);
    for p in [
        Packet::udp(client(40040), kv4()).payload(vec![6u8; 80]),
        Packet::udp(
            "[fd00:5100::9]:40041".parse().unwrap(),
            "[fd00:5100::1]:7000".parse().unwrap(),
        ),
    ] {
        let frame = p.build();
        let sent = a.run(&frame);
        assert_eq!(sent.action, XDP_TX);
        let flow = parse::parse(frame.as_slice()).unwrap();
        let key = parse::key_for(frame.as_slice(), &flow, &a.plan.services[0].entry).key;
        let got = a.dp.encapsulate(&frame, 3, key, flow.family, 0).unwrap();
        assert_eq!(got.as_deref(), Some(sent.frame.as_slice()), "{p:?}");
    }
    let frame = Packet::udp(client(40042), kv4()).build();
    assert_eq!(
        a.dp.encapsulate(&frame, 1, 0, FAMILY_V4, 0).unwrap(),
        None,
        "kv-a is local"
    );
    let past = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_millis(10))
        .unwrap();
    a.dp.set_fence(Some(past)).unwrap();
    assert_eq!(
        a.dp.encapsulate(&frame, 3, 0, FAMILY_V4, 0).unwrap(),
        None,
        "fenced"
    );
}

/// An ICMP error about a flow whose owner is on another host goes there,
/// encapsulated as the flow's own packets are, and is delivered to the
/// owner byte for byte (issue 29, part 2).
#[test]
fn an_icmp_error_goes_to_the_host_of_the_flows_owner() {
    let a = host_a(1500);
    let b = host_b();
    for client in [
        Packet::udp(client(40030), kv4()),
        Packet::udp(
            "[fd00:5100::9]:40031".parse().unwrap(),
            "[fd00:5100::1]:7000".parse().unwrap(),
        ),
    ] {
        let error = sluice_tests::packet::icmp_error(&client, 1000);
        let own = a.run(&client.build());
        let sent = a.run(&error);
        assert_eq!(sent.action, XDP_TX, "{client:?}");
        // To the same host as the flow's own packets, in the same tunnel.
        assert_eq!(sent.frame[..14], own.frame[..14]);
        let got = b.run(&sent.frame);
        assert_eq!(got.action, XDP_REDIRECT, "{client:?}");
        let mut want = error.clone();
        want[..6].copy_from_slice(&instance_mac(3));
        want[6..12].copy_from_slice(&NIC_MAC);
        assert_eq!(got.frame, want, "{client:?}");
    }
    assert_eq!(a.global()[counters::ICMP_ERROR as usize], 2);
    assert_eq!(b.global()[counters::DECAP_DELIVERED as usize], 2);
    assert_eq!(b.instance(3).packets, 2);
}
