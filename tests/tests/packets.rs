//! Table-driven packet tests of the real XDP program in the kernel
//! (`BPF_PROG_TEST_RUN`), in the manner of Katran's fixtures: input frame ->
//! expected action, redirect target, output bytes and counters.
//!
//! The expected owner is never read back from the data path: it is what the
//! agent computes from the addresses (or the tag) with `common`'s hash and
//! the assignment in its plan.

use std::net::{IpAddr, SocketAddr};

use rand::{Rng, SeedableRng, rngs::StdRng};
use sluice::{datapath::Datapath as _, plan::Group};
use sluice_common::{counters, key, maps::NO_OWNER};
use sluice_tests::{
    harness::{Harness, XDP_PASS, XDP_REDIRECT},
    packet::{Ext, L4, Packet, icmp_error},
};

const CONFIG: &str = r#"
[[service]]
name = "udp4"
vip = "198.18.1.1"
port = 7000
protocol = "udp"
[[service.instance]]
name = "udp4-a"
veth = "t-udp4a"
[[service.instance]]
name = "udp4-b"
veth = "t-udp4b"

[[service]]
name = "tcp4"
vip = "198.18.1.1"
ports = [7000, 7443]
protocol = "tcp"
[[service.instance]]
name = "tcp4-a"
veth = "t-tcp4a"
[[service.instance]]
name = "tcp4-b"
veth = "t-tcp4b"
[[service.instance]]
name = "tcp4-c"
veth = "t-tcp4c"

[[service]]
name = "udp6"
vip = "fd00:5100::1"
port = 7000
protocol = "udp"
[[service.instance]]
name = "udp6-a"
veth = "t-udp6a"
[[service.instance]]
name = "udp6-b"
veth = "t-udp6b"

[[service]]
name = "tcp6"
vip = "fd00:5100::1"
port = 8000
protocol = "tcp"
[[service.instance]]
name = "tcp6-a"
veth = "t-tcp6a"
[[service.instance]]
name = "tcp6-b"
veth = "t-tcp6b"

[[service]]
name = "tagged4"
vip = "198.18.1.2"
port = 7100
protocol = "udp"
tag = { kind = "udp-payload", offset = 4, length = 8 }
[[service.instance]]
name = "tagged4-a"
veth = "t-tag4a"
[[service.instance]]
name = "tagged4-b"
veth = "t-tag4b"
[[service.instance]]
name = "tagged4-c"
veth = "t-tag4c"
[[service.instance]]
name = "tagged4-d"
veth = "t-tag4d"

[[service]]
name = "label6"
vip = "fd00:5100::2"
port = 7200
protocol = "udp"
tag = { kind = "ipv6-flow-label" }
[[service.instance]]
name = "label6-a"
veth = "t-lab6a"
[[service.instance]]
name = "label6-b"
veth = "t-lab6b"

[[service]]
name = "tagged6"
vip = "fd00:5100::3"
port = 7300
protocol = "udp"
tag = { kind = "udp-payload", offset = 0, length = 16 }
[[service.instance]]
name = "tagged6-a"
veth = "t-tag6a"
[[service.instance]]
name = "tagged6-b"
veth = "t-tag6b"
[[service.instance]]
name = "tagged6-c"
veth = "t-tag6c"

[[service]]
name = "orphan"
vip = "198.18.1.3"
port = 9000
protocol = "udp"
[[service.instance]]
name = "orphan-a"
veth = "t-orph-a"

[[service]]
name = "udp4-vlan42"
vip = "198.18.1.1"
port = 7000
protocol = "udp"
vlan = 42
[[service.instance]]
name = "vlan42-a"
veth = "t-v42a"
[[service.instance]]
name = "vlan42-b"
veth = "t-v42b"
"#;

/// Service ids, in config order.
const UDP4: u32 = 0;
const TCP4: u32 = 1;
const UDP6: u32 = 2;
const TCP6: u32 = 3;
const TAGGED4: u32 = 4;
const LABEL6: u32 = 5;
const TAGGED6: u32 = 6;
const ORPHAN: u32 = 7;
const VLAN42: u32 = 8;

const SYN: u8 = 0x02;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// The key the agent computes for a packet, from its fields.
#[derive(Clone, Debug)]
enum Key {
    /// Flow hash of the 5-tuple.
    Flow,
    /// Hash of these tag bytes.
    Tag(Vec<u8>),
    /// Hash of this IPv6 flow label.
    Label(u32),
}

#[derive(Clone, Debug)]
enum Expect {
    /// Redirected to the owner of the unit of this key, in this service.
    Deliver {
        service: u32,
        key: Key,
        tag_missing: bool,
    },
    /// Passed untouched, counted under this global counter.
    Pass(u32),
    /// Service packet with no live owner.
    Unowned { service: u32 },
}

fn agent_key(p: &Packet, key: &Key) -> u32 {
    let proto = match p.l4 {
        L4::Udp => 17,
        L4::Tcp(_) => 6,
        L4::Other(n) => n,
    };
    match key {
        Key::Tag(bytes) => key::tag_bytes(bytes),
        Key::Label(l) => key::host::flow_label_key(*l),
        Key::Flow => key::host::flow(p.src, p.dst, proto),
    }
}

/// Runs one case and checks action, output bytes and every counter.
fn check(h: &Harness, name: &str, p: &Packet, expect: &Expect) {
    let frame = p.build();
    check_frame(h, name, &frame, p, expect);
}

fn check_frame(h: &Harness, name: &str, frame: &[u8], p: &Packet, expect: &Expect) {
    let service = match expect {
        Expect::Deliver { service, .. } | Expect::Unowned { service } => Some(*service),
        Expect::Pass(_) => None,
    };
    let svc0 = service.map(|s| h.service(s));
    let g0 = h.global();
    let inst0: Vec<_> = h.plan.instances.iter().map(|i| h.instance(i.id)).collect();
    let run = h.run(frame);
    let g1 = h.global();
    let inst1: Vec<_> = h.plan.instances.iter().map(|i| h.instance(i.id)).collect();

    let mut want_global = [0u64; counters::COUNT as usize];
    let mut want_instance = None;
    match expect {
        Expect::Deliver {
            service,
            key,
            tag_missing,
        } => {
            let owner = h.plan.owner_of_key(*service, agent_key(p, key));
            assert_ne!(owner, NO_OWNER, "{name}: agent's plan owns every unit");
            let mac = h.plan.instance(owner).expect("owner is planned").mac;
            assert_eq!(run.action, XDP_REDIRECT, "{name}: action");
            let mut want = frame.to_vec();
            if p.vlans.len() == 1 {
                // The instance's veth is untagged: the tag is popped.
                want.drain(12..16);
            }
            want[..6].copy_from_slice(&mac);
            assert_eq!(
                run.frame, want,
                "{name}: output must be the input, untagged, with the destination MAC of instance {owner}"
            );
            want_global[counters::DELIVERED as usize] = 1;
            want_global[counters::TAG_MISSING as usize] = u64::from(*tag_missing);
            want_instance = Some(owner);
        }
        Expect::Pass(counter) => {
            assert_eq!(run.action, XDP_PASS, "{name}: action");
            assert_eq!(run.frame, frame, "{name}: a passed frame must be untouched");
            want_global[*counter as usize] = 1;
        }
        Expect::Unowned { .. } => {
            assert_eq!(run.action, XDP_PASS, "{name}: action");
            assert_eq!(
                run.frame, frame,
                "{name}: an unowned frame must be untouched"
            );
            want_global[counters::UNOWNED as usize] = 1;
        }
    }
    if let (Some(s), Some(before)) = (service, svc0) {
        let after = h.service(s);
        let unowned = u64::from(matches!(expect, Expect::Unowned { .. }));
        assert_eq!(
            after.packets - before.packets,
            1,
            "{name}: service {s} packets"
        );
        assert_eq!(
            after.delivered - before.delivered,
            1 - unowned,
            "{name}: service {s} delivered"
        );
        assert_eq!(
            after.unowned - before.unowned,
            unowned,
            "{name}: service {s} unowned"
        );
    }
    let got_global: Vec<u64> = g1.iter().zip(g0).map(|(a, b)| a - b).collect();
    assert_eq!(
        got_global,
        want_global,
        "{name}: global counter deltas, in order {:?}",
        counters::NAMES
    );
    for (i, (a, b)) in h.plan.instances.iter().zip(inst1.iter().zip(&inst0)) {
        let want = u64::from(want_instance == Some(i.id));
        assert_eq!(
            a.packets - b.packets,
            want,
            "{name}: packets delivered to {}",
            i.name
        );
        assert_eq!(
            a.bytes - b.bytes,
            want * frame.len() as u64,
            "{name}: bytes delivered to {}",
            i.name
        );
    }
}

fn harness() -> Harness {
    let mut h = Harness::new(CONFIG);
    // The orphan service's only group loses its owner: every unit unowned.
    h.dp.set_group_owner(ORPHAN, Group::ALL, NO_OWNER)
        .expect("clear owners");
    h
}

#[expect(
    clippy::too_many_lines,
    reason = "a table of cases reads best as one list"
)]
fn cases() -> Vec<(&'static str, Packet, Expect)> {
    let deliver = |service, key| Expect::Deliver {
        service,
        key,
        tag_missing: false,
    };
    let udp4 =
        || Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.1:7000")).payload(b"hello".to_vec());
    let tcp4 = || Packet::tcp(sa("198.18.0.10:40001"), sa("198.18.1.1:7443"), SYN);
    let udp6 = || {
        Packet::udp(sa("[fd00:5100::10]:40000"), sa("[fd00:5100::1]:7000"))
            .payload(b"hello".to_vec())
    };
    let tcp6 = || Packet::tcp(sa("[fd00:5100::10]:40001"), sa("[fd00:5100::1]:8000"), SYN);
    let tagged4 = |payload: &[u8]| {
        Packet::udp(sa("198.18.0.11:5555"), sa("198.18.1.2:7100")).payload(payload.to_vec())
    };
    let label6 = |label| {
        Packet::udp(sa("[fd00:5100::11]:5555"), sa("[fd00:5100::2]:7200")).flow_label(label)
    };
    let pass = Expect::Pass;
    vec![
        ("ipv4 udp", udp4(), deliver(UDP4, Key::Flow)),
        (
            "ipv4 tcp syn, second port",
            tcp4(),
            deliver(TCP4, Key::Flow),
        ),
        (
            "ipv4 tcp first port",
            Packet::tcp(sa("198.18.0.10:1"), sa("198.18.1.1:7000"), 0x10),
            deliver(TCP4, Key::Flow),
        ),
        ("ipv6 udp", udp6(), deliver(UDP6, Key::Flow)),
        ("ipv6 tcp", tcp6(), deliver(TCP6, Key::Flow)),
        (
            "802.1Q vlan 42: the vlan's own service, tag popped",
            udp4().vlan(0x8100, 42),
            deliver(VLAN42, Key::Flow),
        ),
        (
            "802.1ad single tag, vlan 42",
            udp4().vlan(0x88a8, 42),
            deliver(VLAN42, Key::Flow),
        ),
        (
            "priority tag (vlan 0): the untagged service, tag popped",
            tcp6().vlan(0x8100, 0),
            deliver(TCP6, Key::Flow),
        ),
        (
            "vlan 43: no service on that vlan",
            udp4().vlan(0x8100, 43),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "untagged service seen on vlan 42 only where configured",
            tcp6().vlan(0x8100, 42),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "802.1ad+802.1Q qinq: stacked tags pass",
            udp4().vlan(0x88a8, 7).vlan(0x8100, 42),
            pass(counters::PASS_STACKED_VLAN),
        ),
        (
            "three vlan tags",
            udp4().vlan(0x88a8, 1).vlan(0x8100, 2).vlan(0x8100, 3),
            pass(counters::PASS_STACKED_VLAN),
        ),
        (
            "broadcast destination MAC",
            udp4().dst_mac([0xff; 6]),
            pass(counters::PASS_NOT_FOR_HOST),
        ),
        (
            "multicast destination MAC",
            tcp4().dst_mac([0x01, 0x00, 0x5e, 0, 0, 1]),
            pass(counters::PASS_NOT_FOR_HOST),
        ),
        (
            "another host's MAC (promiscuous)",
            udp6().dst_mac([0x02, 0x51, 0, 0, 0, 0x99]),
            pass(counters::PASS_NOT_FOR_HOST),
        ),
        (
            "ipv4 options",
            udp4().ipv4_options([0x94, 0x04, 0, 0, 1, 1, 1, 0]),
            deliver(UDP4, Key::Flow),
        ),
        (
            "ipv4 max options (ihl 15)",
            tcp4().ipv4_options(vec![1u8; 40]),
            deliver(TCP4, Key::Flow),
        ),
        (
            "ipv6 hop-by-hop, dest opts, routing",
            udp6()
                .ext(Ext::HopByHop { len: 0 })
                .ext(Ext::DestOpts { len: 1 })
                .ext(Ext::Routing { len: 2 }),
            deliver(UDP6, Key::Flow),
        ),
        (
            "ipv6 atomic fragment",
            tcp6().ext(Ext::Fragment {
                offset: 0,
                more: false,
            }),
            deliver(TCP6, Key::Flow),
        ),
        (
            "ipv6 six extension headers",
            udp6()
                .ext(Ext::HopByHop { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::Routing { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::DestOpts { len: 0 }),
            deliver(UDP6, Key::Flow),
        ),
        (
            "ipv6 seven extension headers",
            udp6()
                .ext(Ext::HopByHop { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::Routing { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::DestOpts { len: 0 })
                .ext(Ext::DestOpts { len: 0 }),
            pass(counters::PASS_MALFORMED),
        ),
        (
            "udp payload tag",
            tagged4(b"....tenant-7...."),
            deliver(TAGGED4, Key::Tag(b"tenant-7".to_vec())),
        ),
        (
            "udp payload tag exactly fits",
            tagged4(b"....ABCDEFGH"),
            deliver(TAGGED4, Key::Tag(b"ABCDEFGH".to_vec())),
        ),
        (
            "udp payload tag missing (payload too short)",
            tagged4(b"....ABCDEFG"),
            Expect::Deliver {
                service: TAGGED4,
                key: Key::Flow,
                tag_missing: true,
            },
        ),
        (
            "udp payload tag, 16 bytes, ipv6",
            Packet::udp(sa("[fd00:5100::12]:1"), sa("[fd00:5100::3]:7300"))
                .payload(b"0123456789abcdefXYZ".to_vec()),
            deliver(TAGGED6, Key::Tag(b"0123456789abcdef".to_vec())),
        ),
        (
            "ipv6 flow label tag",
            label6(0xabcde),
            deliver(LABEL6, Key::Label(0xabcde)),
        ),
        (
            "ipv6 flow label zero: missing",
            label6(0),
            Expect::Deliver {
                service: LABEL6,
                key: Key::Flow,
                tag_missing: true,
            },
        ),
        (
            "ipv4 non-first fragment",
            udp4().ipv4_fragment(185, false),
            pass(counters::PASS_FRAGMENT),
        ),
        (
            "ipv4 first fragment (MF)",
            udp4().ipv4_fragment(0, true),
            pass(counters::PASS_FRAGMENT),
        ),
        (
            "ipv6 non-first fragment",
            udp6().ext(Ext::Fragment {
                offset: 185,
                more: false,
            }),
            pass(counters::PASS_FRAGMENT),
        ),
        (
            "ipv6 first fragment (M)",
            udp6().ext(Ext::Fragment {
                offset: 0,
                more: true,
            }),
            pass(counters::PASS_FRAGMENT),
        ),
        (
            "ipv4 udp wrong port",
            Packet::udp(sa("198.18.0.10:1"), sa("198.18.1.1:7001")),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "ipv4 udp wrong vip",
            Packet::udp(sa("198.18.0.10:1"), sa("198.18.1.9:7000")),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "tcp to udp-only port",
            Packet::tcp(sa("198.18.0.10:1"), sa("198.18.1.2:7100"), SYN),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "ipv6 wrong vip",
            Packet::udp(sa("[fd00:5100::10]:1"), sa("[fd00:5100::9]:7000")),
            pass(counters::PASS_NO_SERVICE),
        ),
        (
            "icmp echo",
            Packet::new(sa("198.18.0.10:0"), sa("198.18.1.1:0"), L4::Other(1))
                .payload(vec![8, 0, 0, 0, 0, 1, 0, 1]),
            pass(counters::PASS_NOT_L4),
        ),
        (
            "unowned unit",
            Packet::udp(sa("198.18.0.10:1"), sa("198.18.1.3:9000")),
            Expect::Unowned { service: ORPHAN },
        ),
    ]
}

#[test]
fn packet_table() {
    let h = harness();
    for (name, p, expect) in cases() {
        check(&h, name, &p, &expect);
    }
}

type Mangle = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn malformed_headers() {
    let h = harness();
    let udp4 =
        Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.1:7000")).payload(b"hello".to_vec());
    let tcp6 = Packet::tcp(sa("[fd00:5100::10]:40001"), sa("[fd00:5100::1]:8000"), SYN);
    let hop6 = Packet::tcp(sa("[fd00:5100::10]:40001"), sa("[fd00:5100::1]:8000"), SYN)
        .ext(Ext::HopByHop { len: 0 });
    let cases: Vec<(&str, &Packet, Mangle, u32)> = vec![
        (
            "ipv6 payload length ends inside an extension header",
            &hop6,
            Box::new(|f: &mut Vec<u8>| f[18..20].copy_from_slice(&[0, 4])),
            counters::PASS_TRUNCATED,
        ),
        (
            "ipv4 ihl 4",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[14] = 0x44),
            counters::PASS_MALFORMED,
        ),
        (
            "ipv4 ihl 0",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[14] = 0x40),
            counters::PASS_MALFORMED,
        ),
        (
            "ipv4 header says version 6",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[14] = 0x65),
            counters::PASS_MALFORMED,
        ),
        (
            "ipv4 total length < header",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[16..18].copy_from_slice(&[0, 19])),
            counters::PASS_MALFORMED,
        ),
        (
            "ipv4 total length > frame",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[16..18].copy_from_slice(&[0x05, 0xdc])),
            counters::PASS_TRUNCATED,
        ),
        (
            "ipv4 ihl beyond frame",
            &udp4,
            Box::new(|f: &mut Vec<u8>| {
                f[14] = 0x4f;
                f.truncate(14 + 40);
            }),
            counters::PASS_TRUNCATED,
        ),
        (
            "udp length < 8",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[38..40].copy_from_slice(&[0, 7])),
            counters::PASS_MALFORMED,
        ),
        (
            "tcp data offset < 5",
            &tcp6,
            Box::new(|f: &mut Vec<u8>| f[54 + 12] = 0x40),
            counters::PASS_MALFORMED,
        ),
        (
            "ipv6 payload length > frame",
            &tcp6,
            Box::new(|f: &mut Vec<u8>| f[18..20].copy_from_slice(&[0x05, 0xdc])),
            counters::PASS_TRUNCATED,
        ),
        (
            "udp length past the ip packet",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[38..40].copy_from_slice(&[0, 14])),
            counters::PASS_MALFORMED,
        ),
        (
            "tcp data offset past the ip packet",
            &tcp6,
            Box::new(|f: &mut Vec<u8>| f[54 + 12] = 0x60),
            counters::PASS_MALFORMED,
        ),
        (
            // The frame holds everything; the IP length ends mid-header.
            "ipv4 total length ends inside the udp header",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[16..18].copy_from_slice(&[0, 24])),
            counters::PASS_TRUNCATED,
        ),
        (
            "ipv6 payload length ends inside the tcp header",
            &tcp6,
            Box::new(|f: &mut Vec<u8>| f[18..20].copy_from_slice(&[0, 12])),
            counters::PASS_TRUNCATED,
        ),
        (
            "ethertype arp",
            &udp4,
            Box::new(|f: &mut Vec<u8>| f[12..14].copy_from_slice(&[0x08, 0x06])),
            counters::PASS_NOT_IP,
        ),
    ];
    for (name, p, mangle, counter) in cases {
        let mut f = p.build();
        mangle(&mut f);
        check_frame(&h, name, &f, p, &Expect::Pass(counter));
    }
}

#[test]
fn truncated_at_every_byte() {
    let h = harness();
    let frames = [
        Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.1:7000"))
            .vlan(0x8100, 42)
            .ipv4_options([1, 1, 1, 1])
            .payload(b"x".to_vec()),
        Packet::tcp(sa("[fd00:5100::10]:40001"), sa("[fd00:5100::1]:8000"), SYN)
            .vlan(0x8100, 0)
            .ext(Ext::HopByHop { len: 0 })
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
            }),
        Packet::udp(sa("198.18.0.11:5555"), sa("198.18.1.2:7100"))
            .payload(b"....tenant-7".to_vec()),
    ];
    for p in &frames {
        let full = p.build();
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header;
        // the host parser's unit tests cover those cuts.
        for cut in 14..full.len() {
            check_frame(
                &h,
                &format!("{} bytes of {}", cut, full.len()),
                &full[..cut],
                p,
                &Expect::Pass(counters::PASS_TRUNCATED),
            );
        }
        // And the whole frame is delivered.
        let service = if p.dst.is_ipv4() && p.dst.port() == 7000 {
            VLAN42
        } else if p.dst.port() == 7100 {
            TAGGED4
        } else {
            TCP6
        };
        let key = if service == TAGGED4 {
            Key::Tag(b"tenant-7".to_vec())
        } else {
            Key::Flow
        };
        check_frame(
            &h,
            "whole frame",
            &full,
            p,
            &Expect::Deliver {
                service,
                key,
                tag_missing: false,
            },
        );
    }
}

#[test]
fn service_counters_add_up() {
    let h = harness();
    let before = h.service(TAGGED4);
    for i in 0..10u16 {
        let payload = if i % 2 == 0 {
            b"....tenant-7....".to_vec()
        } else {
            b"..".to_vec()
        };
        let f = Packet::udp(sa("198.18.0.11:5555"), sa("198.18.1.2:7100"))
            .payload(payload)
            .build();
        assert_eq!(h.run(&f).action, XDP_REDIRECT);
    }
    let after = h.service(TAGGED4);
    assert_eq!(after.packets - before.packets, 10);
    assert_eq!(after.delivered - before.delivered, 10);
    assert_eq!(after.tagged - before.tagged, 5);
    assert_eq!(after.tag_missing - before.tag_missing, 5);
    assert_eq!(after.unowned - before.unowned, 0);
    let orphan = h.service(ORPHAN);
    let f = Packet::udp(sa("198.18.0.10:1"), sa("198.18.1.3:9000")).build();
    assert_eq!(h.run(&f).action, XDP_PASS);
    assert_eq!(h.service(ORPHAN).unowned - orphan.unowned, 1);
}

#[test]
fn unit_hits_land_in_the_packets_bucket() {
    let h = harness();
    let p = Packet::udp(sa("198.18.0.77:4242"), sa("198.18.1.1:7000"));
    let unit = sluice_common::unit_of(agent_key(&p, &Key::Flow));
    let bucket = (unit >> (sluice_common::UNIT_BITS - sluice_common::HIT_BITS)) as usize;
    let before = h.dp.unit_hits(UDP4).expect("hits");
    for _ in 0..3 {
        assert_eq!(h.run(&p.build()).action, XDP_REDIRECT);
    }
    let after = h.dp.unit_hits(UDP4).expect("hits");
    for (b, (x, y)) in after.iter().zip(&before).enumerate() {
        let want = if b == bucket { 3 } else { 0 };
        assert_eq!(
            x - y,
            want,
            "bucket {b} (packet's unit {unit:#06x} is in bucket {bucket})"
        );
    }
}

/// 10,000+ random flows and tags: the instance the data path redirects to
/// is the one the agent computes.
#[test]
fn data_path_agrees_with_agent_on_random_flows() {
    let h = harness();
    let mut rng = StdRng::seed_from_u64(0x5_1ce);
    let mut per_instance = std::collections::HashMap::<u32, u32>::new();
    for i in 0..12_000u32 {
        let (p, service, key) = match i % 6 {
            0 | 1 => {
                let src = SocketAddr::new(
                    IpAddr::from([198, 18, rng.random_range(0..=255), rng.random()]),
                    rng.random_range(1..=65535),
                );
                if rng.random_bool(0.5) {
                    (Packet::udp(src, sa("198.18.1.1:7000")), UDP4, Key::Flow)
                } else {
                    (
                        Packet::tcp(src, sa("198.18.1.1:7443"), SYN),
                        TCP4,
                        Key::Flow,
                    )
                }
            }
            2 | 3 => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[0xfd, 0x00, 0x51, 0x00]);
                rng.fill(&mut a[4..]);
                let src = SocketAddr::new(IpAddr::from(a), rng.random_range(1..=65535));
                if rng.random_bool(0.5) {
                    (Packet::udp(src, sa("[fd00:5100::1]:7000")), UDP6, Key::Flow)
                } else {
                    (
                        Packet::tcp(src, sa("[fd00:5100::1]:8000"), SYN),
                        TCP6,
                        Key::Flow,
                    )
                }
            }
            4 => {
                let mut tag = [0u8; 8];
                rng.fill(&mut tag);
                let src = SocketAddr::new(
                    IpAddr::from([198, 18, 0, rng.random()]),
                    rng.random_range(1..=65535),
                );
                let mut payload = vec![0xee; 4];
                payload.extend_from_slice(&tag);
                (
                    Packet::udp(src, sa("198.18.1.2:7100")).payload(payload),
                    TAGGED4,
                    Key::Tag(tag.to_vec()),
                )
            }
            _ => {
                let label = rng.random_range(1..=0xf_ffff);
                let src = SocketAddr::new(
                    IpAddr::from([0xfd00, 0x5100, 0, 0, 0, 0, 0, rng.random()]),
                    rng.random_range(1..=65535),
                );
                (
                    Packet::udp(src, sa("[fd00:5100::2]:7200")).flow_label(label),
                    LABEL6,
                    Key::Label(label),
                )
            }
        };
        let want = h.plan.owner_of_key(service, agent_key(&p, &key));
        let run = h.run(&p.build());
        assert_eq!(run.action, XDP_REDIRECT, "flow {i}: {p:?}");
        let got = h
            .instance_by_mac(&run.frame[..6])
            .unwrap_or_else(|| panic!("flow {i}: unknown MAC {:02x?}", &run.frame[..6]));
        assert_eq!(
            got, want,
            "flow {i}: data path chose instance {got}, agent computed {want}: {p:?}"
        );
        *per_instance.entry(got).or_default() += 1;
    }
    // Every instance of every service exercised got some of the flows.
    for i in &h.plan.instances {
        if [TAGGED6, ORPHAN, VLAN42].contains(&i.service_id) {
            continue;
        }
        assert!(
            per_instance.get(&i.id).copied().unwrap_or(0) > 100,
            "instance {} got {:?} flows",
            i.name,
            per_instance.get(&i.id)
        );
    }
}

#[test]
fn same_tag_same_instance_whatever_the_source() {
    let h = harness();
    for tag in [&b"tenant-1"[..], b"tenant-2", b"\0\0\0\0\0\0\0\x01"] {
        let mut payload = b"hdr:".to_vec();
        payload.extend_from_slice(tag);
        let mut seen = std::collections::HashSet::new();
        for port in (1000..60000).step_by(997) {
            let src = SocketAddr::new(IpAddr::from([198, 18, 0, (port % 250) as u8]), port);
            let run = h.run(
                &Packet::udp(src, sa("198.18.1.2:7100"))
                    .payload(payload.clone())
                    .build(),
            );
            assert_eq!(run.action, XDP_REDIRECT);
            seen.insert(run.frame[..6].to_vec());
        }
        assert_eq!(
            seen.len(),
            1,
            "tag {tag:?} reached {} instances",
            seen.len()
        );
    }
}

const PIN_CONFIG: &str = r#"
[[service]]
name = "tcp"
vip = "198.18.1.1"
port = 443
protocol = "tcp"
pin_idle_secs = 1
[[service.instance]]
name = "a"
veth = "t-a"
[[service.instance]]
name = "b"
veth = "t-b"

[[service]]
name = "udp-pinned"
vip = "198.18.1.1"
port = 4000
protocol = "udp"
pin = "tcp+udp"
[[service.instance]]
name = "c"
veth = "t-c"
[[service.instance]]
name = "d"
veth = "t-d"
"#;

const ACK: u8 = 0x10;

/// Moves one unit of service `service` to instance `to`.
fn move_unit(h: &mut Harness, service: u32, unit: u32, to: u32) {
    h.dp.set_group_owner(
        service,
        Group::new(unit, sluice_common::UNIT_BITS).expect("a unit is a group"),
        to,
    )
    .expect("move");
}

/// A pinned TCP connection from `src` to the `PIN_CONFIG` service: its SYN
/// and ACK, the instance its SYN reached, the other instance, and its unit.
fn connection(h: &Harness, src: &str) -> (Packet, Packet, u32, u32, u32) {
    let (src, dst) = (sa(src), sa("198.18.1.1:443"));
    let syn = Packet::tcp(src, dst, SYN);
    let ack = Packet::tcp(src, dst, ACK);
    let first = target(h, &syn);
    let other = if first == 1 { 2 } else { 1 };
    let unit = sluice_common::unit_of(agent_key(&syn, &Key::Flow));
    (syn, ack, first, other, unit)
}

/// Instance id a frame was redirected to.
fn target(h: &Harness, p: &Packet) -> u32 {
    let run = h.run(&p.build());
    assert_eq!(run.action, XDP_REDIRECT, "{p:?}");
    h.instance_by_mac(&run.frame[..6]).expect("known MAC")
}

/// Another client (198.18.0.x, any port) whose TCP flow to `dst` falls in
/// the same unit as `of`'s.
fn same_unit_client(of: SocketAddr, dst: SocketAddr) -> SocketAddr {
    let unit = |src: SocketAddr| {
        sluice_common::unit_of(agent_key(&Packet::tcp(src, dst, SYN), &Key::Flow))
    };
    let want = unit(of);
    (1..=254u8)
        .flat_map(|host| {
            (1024..=65535u16)
                .map(move |port| SocketAddr::new(IpAddr::from([198, 18, 0, host]), port))
        })
        .find(|&src| src != of && unit(src) == want)
        .unwrap_or_else(|| panic!("no other client in unit {want:#06x}"))
}

#[test]
fn pinned_tcp_flow_stays_while_its_unit_moves() {
    let mut h = Harness::new(PIN_CONFIG);
    let client = IpAddr::from([198, 18, 0, 20]);
    let dst = sa("198.18.1.1:443");
    let p = Packet::tcp(SocketAddr::new(client, 50000), dst, SYN);
    let first = target(&h, &p);
    let other = if first == 1 { 2 } else { 1 };
    let unit = sluice_common::unit_of(agent_key(&p, &Key::Flow));
    let s0 = h.service(0);

    // Move the flow's unit to the other instance.
    move_unit(&mut h, 0, unit, other);
    let established = Packet::tcp(SocketAddr::new(client, 50000), dst, ACK);
    for _ in 0..3 {
        assert_eq!(
            target(&h, &established),
            first,
            "an established flow stays with its pinned owner"
        );
    }
    // A new connection in the same unit goes to the new owner.
    let newcomer = same_unit_client(SocketAddr::new(client, 50000), dst);
    assert_eq!(target(&h, &Packet::tcp(newcomer, dst, SYN)), other);
    let s1 = h.service(0);
    assert_eq!(s1.pin_hits - s0.pin_hits, 3);
    assert_eq!(s1.pins_created - s0.pins_created, 1);
    assert_eq!(s1.pins_lost - s0.pins_lost, 0);

    // A mid-connection packet of a flow never seen: counted as a lost pin.
    let stray = Packet::tcp(SocketAddr::new(client, 50001), dst, ACK);
    let _ = target(&h, &stray);
    assert_eq!(h.service(0).pins_lost - s1.pins_lost, 1);

    // The pinned owner dies: the pin is ignored, the flow goes to the unit's
    // owner and is pinned there.
    h.dp.set_instance_live(first, false).expect("mark dead");
    assert_eq!(target(&h, &established), other);
    assert_eq!(h.service(0).pins_expired - s1.pins_expired, 1);
    h.dp.set_instance_live(first, true).expect("mark live");
    assert_eq!(
        target(&h, &established),
        other,
        "re-pinned to the new owner"
    );
}

/// Defect: a SYN on a reused 5-tuple followed the stale pin of an earlier
/// connection, so after a move (or a drain) new connections kept landing on
/// the old owner.
#[test]
fn a_syn_follows_the_units_owner_and_replaces_the_pin() {
    let mut h = Harness::new(PIN_CONFIG);
    let (syn, ack, first, other, unit) = connection(&h, "198.18.0.23:41000");
    move_unit(&mut h, 0, unit, other);
    assert_eq!(target(&h, &ack), first, "the established connection stays");
    // The client closes and opens a new connection from the same port.
    assert_eq!(
        target(&h, &syn),
        other,
        "a new connection follows the unit's owner, not the old pin"
    );
    assert_eq!(
        target(&h, &ack),
        other,
        "and the rest of the new connection follows its SYN"
    );
    // A SYN-ACK (simultaneous open) is not a new connection.
    move_unit(&mut h, 0, unit, first);
    let mut syn_ack = syn;
    syn_ack.l4 = L4::Tcp(SYN | ACK);
    assert_eq!(target(&h, &syn_ack), other);
}

/// Defect: ids followed the config's order and a pin held whatever
/// instance had its id now, so the id of a removed instance given to a
/// newcomer took the removed one's established flows along.
#[test]
fn a_removed_instances_pins_are_not_inherited_by_the_newcomer_on_its_id() {
    let mut h = Harness::new(PIN_CONFIG);
    let (syn, ack, _, _, unit) = connection(&h, "198.18.0.25:43000");
    // Make it b's connection: the unit is b's when the SYN comes.
    move_unit(&mut h, 0, unit, 2);
    assert_eq!(target(&h, &syn), 2);
    move_unit(&mut h, 0, unit, 1);
    assert_eq!(target(&h, &ack), 2, "b's connection stays with b");
    // b is removed and e added: e takes b's id, a keeps its own.
    h.reprogram(&PIN_CONFIG.replacen(
        "name = \"b\"\nveth = \"t-b\"",
        "name = \"e\"\nveth = \"t-e\"",
        1,
    ));
    let id = |n: &str| h.plan.instances.iter().find(|i| i.name == n).map(|i| i.id);
    assert_eq!((id("a"), id("e")), (Some(1), Some(2)), "e on b's old id");
    let expired = h.service(0).pins_expired;
    assert_eq!(
        target(&h, &ack),
        1,
        "b's connection goes where its unit goes, not to e"
    );
    assert_eq!(
        h.service(0).pins_expired,
        expired + 1,
        "b's pin no longer holds"
    );
    // e's own connections pin to it as usual.
    move_unit(&mut h, 0, unit, 2);
    assert_eq!(target(&h, &syn), 2);
    move_unit(&mut h, 0, unit, 1);
    assert_eq!(target(&h, &ack), 2, "a pin to e holds");
}

/// Defect: pinned packets were counted in their unit's hits, so after a
/// move the old owner's pinned load was charged to the unit's new owner.
#[test]
fn pinned_packets_are_not_charged_to_the_unit() {
    let mut h = Harness::new(PIN_CONFIG);
    let (_, ack, first, other, unit) = connection(&h, "198.18.0.24:42000");
    let bucket = (unit >> (sluice_common::UNIT_BITS - sluice_common::HIT_BITS)) as usize;
    let hits = |h: &Harness| h.dp.unit_hits(0).expect("unit hits")[bucket];
    let i0 = h.instance(first).packets;
    let h0 = hits(&h);
    for _ in 0..5 {
        assert_eq!(target(&h, &ack), first);
    }
    assert_eq!(hits(&h) - h0, 5, "packets to the unit's owner are its hits");
    move_unit(&mut h, 0, unit, other);
    let h1 = hits(&h);
    for _ in 0..7 {
        assert_eq!(target(&h, &ack), first);
    }
    assert_eq!(
        hits(&h) - h1,
        0,
        "pinned packets to the old owner are not the unit's load"
    );
    assert_eq!(
        h.instance(first).packets - i0,
        12,
        "they are the old owner's"
    );
}

#[test]
fn idle_pin_expires() {
    let mut h = Harness::new(PIN_CONFIG);
    let client = IpAddr::from([198, 18, 0, 21]);
    let dst = sa("198.18.1.1:443");
    let p = Packet::tcp(SocketAddr::new(client, 40000), dst, SYN);
    let first = target(&h, &p);
    let other = if first == 1 { 2 } else { 1 };
    let unit = sluice_common::unit_of(agent_key(&p, &Key::Flow));
    move_unit(&mut h, 0, unit, other);
    let ack = Packet::tcp(SocketAddr::new(client, 40000), dst, ACK);
    assert_eq!(target(&h, &ack), first);
    // pin_idle_secs = 1; the coarse clock ticks every few ms.
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let before = h.service(0).pins_expired;
    assert_eq!(
        target(&h, &ack),
        other,
        "an idle pin no longer holds the flow"
    );
    assert_eq!(h.service(0).pins_expired - before, 1);
}

#[test]
fn udp_pinned_only_where_configured() {
    let mut h = Harness::new(PIN_CONFIG);
    let client = IpAddr::from([198, 18, 0, 22]);
    // Pinned UDP service: the flow stays.
    let dst = sa("198.18.1.1:4000");
    let p = Packet::udp(SocketAddr::new(client, 30000), dst);
    let first = target(&h, &p);
    let other = if first == 3 { 4 } else { 3 };
    let unit = sluice_common::unit_of(agent_key(&p, &Key::Flow));
    move_unit(&mut h, 1, unit, other);
    assert_eq!(target(&h, &p), first);
    // Unpinned UDP (the default): the flow follows its unit at once.
    let h2 = harness();
    let p = Packet::udp(SocketAddr::new(client, 30000), sa("198.18.1.1:7000"));
    let first = target(&h2, &p);
    let unit = sluice_common::unit_of(agent_key(&p, &Key::Flow));
    let other = if first == 1 { 2 } else { 1 };
    let mut h2 = h2;
    move_unit(&mut h2, UDP4, unit, other);
    assert_eq!(target(&h2, &p), other);
    assert_eq!(h2.service(UDP4).pin_hits, 0);
}

/// A reload writes the whole service table into the half the data path
/// does not read, then flips to it: the new services are all there at
/// once, the removed ones gone, and the old half is what the next reload
/// overwrites.
#[test]
fn a_reload_swaps_the_whole_service_table() {
    const ONE: &str = r#"
[[service]]
name = "a"
vip = "198.18.1.1"
port = 7000
protocol = "udp"
[[service.instance]]
name = "a-0"
veth = "t-a0"

[[service]]
name = "d"
vip = "198.18.1.4"
port = 7000
protocol = "udp"
[[service.instance]]
name = "d-0"
veth = "t-d0"
"#;
    // Services `a` and `d` gone, `b` on another VIP and two ports, `c`
    // tagged on `a`'s old endpoint. (As many services: the harness keeps
    // the maps, sized by the first config.)
    const TWO: &str = r#"
[[service]]
name = "b"
vip = "198.18.1.2"
ports = [7000, 7001]
protocol = "udp"
[[service.instance]]
name = "b-0"
veth = "t-b0"

[[service]]
name = "c"
vip = "198.18.1.1"
port = 7000
protocol = "udp"
tag = { kind = "udp-payload", offset = 0, length = 4 }
[[service.instance]]
name = "c-0"
veth = "t-c0"
"#;
    let mut h = Harness::new(ONE);
    let client = sa("198.18.0.5:4000");
    let to = |dst: &str| Packet::udp(client, sa(dst)).payload(b"abcd-payload".to_vec());
    assert_eq!(h.run(&to("198.18.1.1:7000").build()).action, XDP_REDIRECT);
    assert_eq!(h.run(&to("198.18.1.2:7000").build()).action, XDP_PASS);
    for round in 0..3 {
        h.reprogram(TWO);
        for dst in ["198.18.1.2:7000", "198.18.1.2:7001", "198.18.1.1:7000"] {
            assert_eq!(
                h.run(&to(dst).build()).action,
                XDP_REDIRECT,
                "round {round}: {dst} is a service after the reload"
            );
        }
        assert_eq!(
            h.run(&to("198.18.1.4:7000").build()).action,
            XDP_PASS,
            "round {round}: `d` is gone after the reload"
        );
        // `c` took `a`'s endpoint with its own tag spec: keyed by the tag.
        let c = h.dp.service_counters(1).expect("counters of c");
        assert!(c.tagged > 0, "round {round}: `c`'s packets were not tagged");
        h.reprogram(ONE);
        assert_eq!(
            h.run(&to("198.18.1.2:7001").build()).action,
            XDP_PASS,
            "round {round}: `b` is gone after the reload back"
        );
        assert_eq!(h.run(&to("198.18.1.1:7000").build()).action, XDP_REDIRECT);
        assert_eq!(h.run(&to("198.18.1.4:7000").build()).action, XDP_REDIRECT);
    }
}

/// ICMP errors about a flow (issue 29, part 2) reach the instance its own
/// packets reach, so the instance that holds the connection learns its
/// path MTU: IPv4 "fragmentation needed" quoting 28 bytes (the minimum a
/// router must) or the whole segment, IPv6 "packet too big". Counted as
/// delivered and as `icmp_error`; a tagged service's by the flow hash (the
/// quote is the server's packet, not the client's tag), counted as
/// `tag_missing`. Before, all were passed to the host's stack (`pass_not_l4`).
#[test]
fn icmp_errors_reach_the_instance_of_the_flow_they_quote() {
    let h = harness();
    let tagged = Packet::udp(sa("198.18.0.11:5555"), sa("198.18.1.2:7100"))
        .payload(b"....tag-0001rest".to_vec());
    for (name, client, service, quoted, tag_missing) in [
        (
            "ipv4 tcp, 28 bytes quoted",
            Packet::tcp(sa("198.18.0.10:40001"), sa("198.18.1.1:7443"), ACK),
            TCP4,
            28,
            false,
        ),
        (
            "ipv4 tcp, all quoted",
            Packet::tcp(sa("198.18.0.12:40009"), sa("198.18.1.1:7000"), ACK),
            TCP4,
            576,
            false,
        ),
        (
            "ipv4 udp",
            Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.1:7000")),
            UDP4,
            1232,
            false,
        ),
        (
            "ipv6 udp, packet too big",
            Packet::udp(sa("[fd00:5100::10]:40000"), sa("[fd00:5100::1]:7000")),
            UDP6,
            1232,
            false,
        ),
        (
            "ipv6 tcp, packet too big",
            Packet::tcp(sa("[fd00:5100::10]:40001"), sa("[fd00:5100::1]:8000"), ACK),
            TCP6,
            1232,
            false,
        ),
        (
            "ipv4 tagged udp: by the flow hash",
            tagged,
            TAGGED4,
            1232,
            true,
        ),
    ] {
        let frame = icmp_error(&client, quoted);
        let owner = h.plan.owner_of_key(service, agent_key(&client, &Key::Flow));
        if !tag_missing {
            assert_eq!(target(&h, &client), owner, "{name}: the flow's own packets");
        }
        let g0 = h.global();
        let s0 = h.service(service);
        let run = h.run(&frame);
        assert_eq!(run.action, XDP_REDIRECT, "{name}: action");
        let mut want = frame.clone();
        want[..6].copy_from_slice(&h.plan.instance(owner).expect("planned").mac);
        assert_eq!(
            run.frame, want,
            "{name}: the error as it came, to instance {owner}"
        );
        let mut want_global = [0u64; counters::COUNT as usize];
        want_global[counters::DELIVERED as usize] = 1;
        want_global[counters::ICMP_ERROR as usize] = 1;
        want_global[counters::TAG_MISSING as usize] = u64::from(tag_missing);
        let got: Vec<u64> = h.global().iter().zip(g0).map(|(a, b)| a - b).collect();
        assert_eq!(
            got,
            want_global,
            "{name}: global counters, in order {:?}",
            counters::NAMES
        );
        let s1 = h.service(service);
        assert_eq!(
            (s1.packets - s0.packets, s1.delivered - s0.delivered),
            (1, 1),
            "{name}"
        );
    }
}

/// An error about a flow of a unit nobody owns claims nothing (it is not
/// punted): to the host's stack, counted `unowned` and `icmp_error`. Other
/// ICMP, and errors about flows of no service, pass as before.
#[test]
fn icmp_errors_about_unowned_or_unknown_flows_pass() {
    let h = harness();
    let orphan = Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.3:9000"));
    let stranger = Packet::udp(sa("198.18.0.10:40000"), sa("198.18.1.1:9999"));
    let mut echo = icmp_error(&orphan, 64);
    echo[34] = 8;
    for (name, frame, counter, icmp) in [
        ("unowned", icmp_error(&orphan, 64), counters::UNOWNED, true),
        (
            "no service",
            icmp_error(&stranger, 64),
            counters::PASS_NO_SERVICE,
            true,
        ),
        ("echo request", echo, counters::PASS_NOT_L4, false),
    ] {
        let g0 = h.global();
        let run = h.run(&frame);
        assert_eq!(
            (run.action, &run.frame),
            (XDP_PASS, &frame),
            "{name}: passed untouched"
        );
        let mut want = [0u64; counters::COUNT as usize];
        want[counter as usize] = 1;
        // Counted as an error of its service only when it has one.
        want[counters::ICMP_ERROR as usize] = u64::from(icmp && counter == counters::UNOWNED);
        let got: Vec<u64> = h.global().iter().zip(g0).map(|(a, b)| a - b).collect();
        assert_eq!(
            got,
            want,
            "{name}: global counters, in order {:?}",
            counters::NAMES
        );
    }
}

/// An error about a pinned connection whose unit moved goes where the
/// connection lives (the pin), and makes no pin of its own for a flow
/// never seen, nor counts one lost.
#[test]
fn an_icmp_error_follows_the_pin_and_makes_none() {
    let mut h = Harness::new(PIN_CONFIG);
    let (syn, ack, first, other, unit) = connection(&h, "198.18.0.30:50000");
    assert_eq!(target(&h, &syn), first);
    move_unit(&mut h, 0, unit, other);
    assert_eq!(target(&h, &ack), first, "pinned");
    let s0 = h.service(0);
    let error = icmp_error(&ack, 28);
    let run = h.run(&error);
    assert_eq!(run.action, XDP_REDIRECT);
    assert_eq!(
        h.instance_by_mac(&run.frame[..6]),
        Some(first),
        "to the connection's instance"
    );
    // A flow never seen, in the moved unit: the unit's owner, no pin.
    let newcomer = Packet::tcp(same_unit_client(syn.src, syn.dst), syn.dst, ACK);
    let run = h.run(&icmp_error(&newcomer, 28));
    assert_eq!(h.instance_by_mac(&run.frame[..6]), Some(other));
    let s1 = h.service(0);
    assert_eq!(s1.pins_created - s0.pins_created, 0, "no pin made");
    assert_eq!(s1.pins_lost - s0.pins_lost, 0, "no pin counted lost");
    assert_eq!(
        target(&h, &Packet::tcp(newcomer.src, newcomer.dst, SYN)),
        other,
        "the newcomer's own SYN is not held by anything the error left"
    );
}
