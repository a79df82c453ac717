//! SLA origin rules in the kernel (`BPF_PROG_TEST_RUN`): packets from a
//! rule's source prefixes reach only its subset, others never do; a
//! spilled slot sends to the unit's owner; services without rules are
//! unaffected. The expected instance is computed from the plan (tier and
//! owner table) and `common`'s hash, never read back from the program.

use std::net::SocketAddr;

use sluice::datapath::Datapath as _;
use sluice_common::{
    counters, key,
    maps::{NO_OWNER, SPILL, Tier, tier_slot},
    unit_of,
};
use sluice_tests::{
    harness::{Harness, XDP_PASS, XDP_REDIRECT},
    packet::{L4, Packet},
};

const CONFIG: &str = r#"
[[service]]
name = "kv"
vips = ["198.18.1.1", "fd00:5100::1"]
ports = [7000]
protocols = ["udp", "tcp"]
pin = "tcp"

[[service.origin]]
name = "gold"
prefixes = ["198.18.5.0/24", "fd00:5100:5::/48"]
instances = ["kv-2", "kv-3"]

[[service.origin]]
name = "vip-host"
prefixes = ["198.18.5.128/25"]
instances = ["kv-4"]

[[service.instance]]
name = "kv-0"
veth = "t-kv0"
[[service.instance]]
name = "kv-1"
veth = "t-kv1"
[[service.instance]]
name = "kv-2"
veth = "t-kv2"
[[service.instance]]
name = "kv-3"
veth = "t-kv3"
[[service.instance]]
name = "kv-4"
veth = "t-kv4"

[[service]]
name = "plain"
vip = "198.18.1.2"
port = 7000
protocol = "udp"
[[service.instance]]
name = "plain-0"
veth = "t-plain0"
[[service.instance]]
name = "plain-1"
veth = "t-plain1"
"#;

const KV: u32 = 0;
const PLAIN: u32 = 1;
/// Instance ids (config order, from 1).
const GOLD: [u32; 2] = [3, 4];
const VIP_HOST: u32 = 5;
const ORDINARY: [u32; 2] = [1, 2];

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// The instance the frame was redirected to, or the action if it was not.
fn target(h: &Harness, p: &Packet) -> Result<u32, u32> {
    let run = h.run(&p.build());
    if run.action != XDP_REDIRECT {
        return Err(run.action);
    }
    Ok(h.instance_by_mac(&run.frame[..6])
        .expect("an instance's MAC"))
}

fn key_of(p: &Packet) -> u32 {
    let proto = if matches!(p.l4, L4::Tcp(_)) { 6 } else { 17 };
    key::host::flow(p.src, p.dst, proto)
}

/// What the plan says a packet of `service` from a rule's tier `tier`
/// (`None`: no rule) goes to.
fn expected(h: &Harness, service: u32, p: &Packet, tier: Option<&Tier>) -> u32 {
    let k = key_of(p);
    match tier.map(|t| t.slots[tier_slot(unit_of(k)) as usize]) {
        Some(SPILL) | None => h.plan.owner_of_key(service, k),
        Some(slot) => slot,
    }
}

fn global_delta(h: &Harness, f: impl FnOnce()) -> Vec<u64> {
    let g0 = h.global();
    f();
    h.global().iter().zip(g0).map(|(a, b)| a - b).collect()
}

fn udp(src: &str, dst: &str) -> Packet {
    Packet::udp(sa(src), sa(dst)).payload(b"hello".to_vec())
}

/// Sources from `net` (a format with `{}` for the host part), many ports.
fn sources(net: &str, n: u16) -> Vec<String> {
    (0..n)
        .map(|i| net.replace("{h}", &(1 + i % 100).to_string()) + &format!(":{}", 20_000 + i))
        .collect()
}

#[test]
fn a_reserved_prefix_reaches_only_its_subset_and_others_never_do() {
    let h = Harness::new(CONFIG);
    let gold = h.dp.tier(KV, 0).expect("gold's tier");
    assert!(
        gold.slots.iter().all(|s| GOLD.contains(s)),
        "gold's tier is its live subset round robin: {:?}",
        gold.slots
    );
    for (family, net, other, vip) in [
        ("IPv4", "198.18.5.{h}", "198.18.6.{h}", "198.18.1.1:7000"),
        (
            "IPv6",
            "[fd00:5100:5:1::{h}]",
            "[fd00:5100:6::{h}]",
            "[fd00:5100::1]:7000",
        ),
    ] {
        let mut seen = std::collections::HashSet::new();
        let delta = global_delta(&h, || {
            for src in sources(net, 200) {
                let p = udp(&src, vip);
                let got = target(&h, &p).unwrap_or_else(|a| panic!("{family} {src}: action {a}"));
                assert!(
                    GOLD.contains(&got),
                    "{family}: {src} reached instance {got}, outside gold's subset {GOLD:?}"
                );
                assert_eq!(got, expected(&h, KV, &p, Some(&gold)), "{family} {src}");
                seen.insert(got);
            }
        });
        assert_eq!(seen.len(), 2, "{family}: both subset instances take part");
        assert_eq!(delta[counters::ORIGIN as usize], 200, "{family}: origin");
        assert_eq!(delta[counters::ORIGIN_SPILLED as usize], 0, "{family}");
        let delta = global_delta(&h, || {
            for src in sources(other, 200) {
                let p = udp(&src, vip);
                let got = target(&h, &p).unwrap_or_else(|a| panic!("{family} {src}: action {a}"));
                assert!(
                    ORDINARY.contains(&got),
                    "{family}: {src} (no rule) reached reserved instance {got}"
                );
                assert_eq!(got, expected(&h, KV, &p, None), "{family} {src}");
            }
        });
        assert_eq!(delta[counters::ORIGIN as usize], 0, "{family}: no rule");
    }
}

#[test]
fn the_longest_prefix_wins_and_tcp_follows_the_tier_through_its_pin() {
    let h = Harness::new(CONFIG);
    // Hosts 1..=100 of 198.18.5.0/24 are gold's.
    for src in sources("198.18.5.{h}", 100) {
        let p = Packet::tcp(sa(&src), sa("198.18.1.1:7000"), 0x02);
        let got = target(&h, &p).expect("a SYN is delivered");
        assert!(GOLD.contains(&got), "{src}: {got}");
        // The connection's next packet keeps its instance (its pin).
        let ack = Packet::tcp(sa(&src), sa("198.18.1.1:7000"), 0x10);
        assert_eq!(target(&h, &ack), Ok(got), "{src}: pinned");
    }
    // 198.18.5.128/25, inside gold's /24, is vip-host's.
    for host in 128..=255 {
        let src = format!("198.18.5.{host}:{}", 30_000 + host);
        let p = udp(&src, "198.18.1.1:7000");
        assert_eq!(target(&h, &p), Ok(VIP_HOST), "{src}");
    }
}

#[test]
fn a_spilled_slot_goes_to_the_units_owner_and_an_empty_one_is_punted() {
    let mut h = Harness::new(CONFIG);
    let mut tier = h.dp.tier(KV, 0).expect("gold's tier");
    // Even slots spill, odd ones have nobody.
    for (k, s) in tier.slots.iter_mut().enumerate() {
        *s = if k % 2 == 0 { SPILL } else { NO_OWNER };
    }
    h.dp.set_tier(KV, 0, &tier).expect("set tier");
    let (mut spilled, mut punted) = (0, 0);
    let delta = global_delta(&h, || {
        for src in sources("198.18.5.{h}", 200) {
            let p = udp(&src, "198.18.1.1:7000");
            let slot = tier.slots[tier_slot(unit_of(key_of(&p))) as usize];
            match target(&h, &p) {
                Ok(got) => {
                    assert_eq!(slot, SPILL, "{src}: delivered from a slot with nobody");
                    assert_eq!(got, h.plan.owner_of_key(KV, key_of(&p)), "{src}");
                    assert!(ORDINARY.contains(&got), "{src}: {got}");
                    spilled += 1;
                }
                Err(action) => {
                    assert_eq!(slot, NO_OWNER, "{src}: action {action} from a spilled slot");
                    assert_eq!(action, XDP_PASS, "{src}: no punt socket: passed");
                    punted += 1;
                }
            }
        }
    });
    assert!(
        spilled > 50 && punted > 50,
        "{spilled} spilled, {punted} punted"
    );
    assert_eq!(delta[counters::ORIGIN_SPILLED as usize], spilled);
    assert_eq!(delta[counters::ORIGIN as usize], punted);
    assert_eq!(delta[counters::UNOWNED as usize], punted);
    // Gold's tier only: vip-host's packets still reach its instance.
    let p = udp("198.18.5.200:1000", "198.18.1.1:7000");
    assert_eq!(target(&h, &p), Ok(VIP_HOST));
}

#[test]
fn a_service_without_rules_is_unaffected() {
    let h = Harness::new(CONFIG);
    let delta = global_delta(&h, || {
        for src in sources("198.18.5.{h}", 100) {
            let p = udp(&src, "198.18.1.2:7000");
            let got = target(&h, &p).expect("delivered");
            assert_eq!(got, expected(&h, PLAIN, &p, None), "{src}");
        }
    });
    assert_eq!(delta[counters::ORIGIN as usize], 0);
    assert_eq!(delta[counters::ORIGIN_SPILLED as usize], 0);
}

#[test]
fn a_reload_replaces_the_rules_whole() {
    let mut h = Harness::new(CONFIG);
    let p = udp("198.18.5.7:4000", "198.18.1.1:7000");
    let q = udp("[fd00:5100:5::7]:4000", "[fd00:5100::1]:7000");
    assert!(GOLD.contains(&target(&h, &p).unwrap()));
    // Gold's subset shrinks to kv-3 and loses its IPv6 prefix; vip-host
    // goes.
    let fewer = CONFIG
        .replace(", \"fd00:5100:5::/48\"", "")
        .replace("instances = [\"kv-2\", \"kv-3\"]", "instances = [\"kv-3\"]")
        .replace(
            "[[service.origin]]\nname = \"vip-host\"\nprefixes = [\"198.18.5.128/25\"]\ninstances = [\"kv-4\"]\n",
            "",
        );
    assert_ne!(fewer, CONFIG);
    h.reprogram(&fewer);
    assert_eq!(target(&h, &p), Ok(GOLD[1]), "only kv-3 is gold's now");
    let got = target(&h, &q).unwrap();
    assert_eq!(got, h.plan.owner_of_key(KV, key_of(&q)), "no rule for IPv6");
    let r = udp("198.18.5.200:4000", "198.18.1.1:7000");
    assert_eq!(
        target(&h, &r),
        Ok(GOLD[1]),
        "vip-host's /25 is gone: gold's /24 holds it"
    );
    // And back: the tiers swap halves again.
    h.reprogram(CONFIG);
    assert!(GOLD.contains(&target(&h, &q).unwrap()));
    assert_eq!(target(&h, &r), Ok(VIP_HOST));
}

/// End to end: the agent on the testbed's NIC, UDP servers in four
/// instance namespaces, and two clients in the client namespace: one
/// inside gold's prefixes (`198.18.0.5`, `fd00:5100::5`), one outside
/// (`198.18.0.2`, `fd00:5100::2`). Gold's datagrams arrive only at its
/// subset (`inst-2`, `inst-3`), the other client's never do, none is lost.
#[test]
fn end_to_end_a_reserved_prefixs_datagrams_arrive_only_at_its_subset() {
    use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

    use sluice::{config::Config, coord::EmbeddedStore};
    use sluice_tests::{
        netns,
        testbed::{self, Testbed},
        traffic::UdpServers,
    };

    let tb = Testbed::new("origin", 4).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let gold: [IpAddr; 2] = [
        "198.18.0.5".parse().unwrap(),
        "fd00:5100::5".parse().unwrap(),
    ];
    for a in gold {
        tb.add_client_addr(a)
            .unwrap_or_else(|e| panic!("adding {a} to the client: {e}"));
    }
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvips = [\"{}\", \"{}\"]\nport = 7000\nprotocol = \"udp\"\n\n\
         [[service.origin]]\nname = \"gold\"\nprefixes = [\"198.18.0.4/30\", \"fd00:5100::4/126\"]\n\
         instances = [\"inst-2\", \"inst-3\"]\n\n{}",
        testbed::VIP_V4,
        testbed::VIP_V6,
        tb.instances_toml(0, 4)
    );
    let config = Config::parse(&toml, Path::new("origin.toml")).unwrap_or_else(|e| panic!("{e}"));
    let _agent = tb
        .start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| {
            panic!(
                "starting the agent: {}",
                sluice_tests::harness::error_chain(&e)
            )
        });
    let namespaces: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    for (vip, gold, other) in [
        (
            IpAddr::from(testbed::VIP_V4),
            gold[0],
            IpAddr::from(testbed::CLIENT_V4),
        ),
        (
            IpAddr::from(testbed::VIP_V6),
            gold[1],
            IpAddr::from(testbed::CLIENT_V6),
        ),
    ] {
        let dst = SocketAddr::new(vip, 7000);
        let servers = UdpServers::start(&namespaces, dst);
        // 100 sockets (source ports) a client, 5 datagrams each: every
        // subset instance and every other one gets some.
        let mut sent = 0u64;
        for src in [gold, other] {
            let socks: Vec<std::net::UdpSocket> = (0..100)
                .map(|_| {
                    netns::run_in(&tb.client, || std::net::UdpSocket::bind((src, 0)))
                        .unwrap_or_else(|e| panic!("binding {src} in the client: {e}"))
                })
                .collect();
            for seq in 0..5u8 {
                for s in &socks {
                    s.send_to(&[seq], dst).expect("send");
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        servers.wait_for(sent, Duration::from_secs(5));
        let got = servers.finish();
        let per: Vec<(usize, usize)> = got
            .iter()
            .map(|d| {
                let g = d.iter().filter(|r| r.from.ip() == gold).count();
                (g, d.len() - g)
            })
            .collect();
        eprintln!("{vip}: sent {sent}; (gold, other) per instance {per:?}");
        for (k, d) in got.iter().enumerate() {
            for r in d {
                let reserved = k >= 2;
                assert_eq!(
                    r.from.ip() == gold,
                    reserved,
                    "a datagram from {} reached inst-{k}: gold's go to inst-2 and inst-3 only, the others' never",
                    r.from
                );
            }
        }
        let total: usize = got.iter().map(Vec::len).sum();
        assert_eq!(total as u64, sent, "{vip}: datagrams lost");
        assert!(
            per.iter().all(|(g, o)| g + o > 0),
            "{vip}: every instance takes part: {per:?}"
        );
    }
}
