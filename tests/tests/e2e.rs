//! End to end: the real XDP program attached by the agent to the host's
//! "NIC" veth, real sockets in client and instance namespaces.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::Arc,
    time::Duration,
};

use sluice::{
    agent::Agent, config::Config, coord::EmbeddedStore, datapath::Datapath as _, plan::Plan,
};
use sluice_common::key;
use sluice_tests::{
    netns,
    packet::Packet,
    testbed::{self, Testbed},
    traffic::{self, TcpServers, UdpLoad, UdpServers},
};

fn testbed(tag: &str, n: usize) -> Testbed {
    Testbed::new(tag, n).unwrap_or_else(|e| panic!("building the testbed: {e}"))
}

fn service_toml(
    tb: &Testbed,
    name: &str,
    vip: IpAddr,
    port: u16,
    proto: &str,
    tag: &str,
) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n{tag}\n{}",
        tb.instances_toml(0, tb.instances.len())
    )
}

/// Starts the agent inside the host namespace, as `sluice run` would.
fn start_agent(tb: &Testbed, toml: &str) -> Agent {
    let config =
        Config::parse(toml, Path::new("e2e.toml")).unwrap_or_else(|e| panic!("config: {e}"));
    tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| {
            panic!(
                "starting the agent: {:#}",
                sluice_tests::harness::error_chain(&e)
            )
        })
}

/// Testbed instance index of each plan instance id (names are `inst-<k>`).
fn index_of(plan: &Plan) -> HashMap<u32, usize> {
    plan.instances
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
        .collect()
}

fn namespaces(tb: &Testbed) -> Vec<String> {
    tb.instances.iter().map(|i| i.netns.clone()).collect()
}

/// 50,000+ untagged datagrams from many source ports: every instance gets
/// exactly the datagrams of the units it owns, and none is lost.
fn untagged_udp(vip: IpAddr, tag: &str) {
    let tb = testbed(tag, 4);
    let port = 7000;
    let dst = SocketAddr::new(vip, port);
    let agent = start_agent(&tb, &service_toml(&tb, "kv", vip, port, "udp", ""));
    let servers = UdpServers::start(&namespaces(&tb), dst);
    let load = UdpLoad {
        client_ns: &tb.client,
        dst,
        sockets: 500,
        per_socket: 104,
        window: 512,
        deadline: Duration::from_mins(1),
    };
    let (sent, _) = traffic::send_udp(&load, &servers.total, |_| Vec::new());
    // Let the last datagrams land.
    servers.wait_for(sent, Duration::from_secs(2));
    let got = servers.finish();
    let idx = index_of(&agent.plan);
    let mut seen = HashSet::new();
    let mut per_instance = vec![0u64; tb.instances.len()];
    for (k, datagrams) in got.iter().enumerate() {
        for d in datagrams {
            let want = idx[&agent.plan.owner_of_key(0, key::host::flow(d.from, dst, 17))];
            assert_eq!(
                k, want,
                "datagram from {} reached instance {k}, but its unit belongs to instance {want}",
                d.from
            );
            assert!(
                seen.insert((d.from, d.payload.clone())),
                "duplicate datagram from {}",
                d.from
            );
            per_instance[k] += 1;
        }
    }
    let delivered: u64 = per_instance.iter().sum();
    let counters: Vec<u64> = agent
        .plan
        .instances
        .iter()
        .map(|i| {
            agent
                .datapath
                .instance_counters(i.id)
                .expect("counters")
                .packets
        })
        .collect();
    eprintln!(
        "{vip}: sent {sent}, received per instance {per_instance:?}, data path delivered {counters:?}"
    );
    assert!(
        sent >= 50_000,
        "sent only {sent} datagrams before the deadline"
    );
    assert_eq!(
        delivered, sent,
        "datagrams lost: sent {sent}, received {delivered}"
    );
    assert!(
        per_instance.iter().all(|&n| n > sent / 8),
        "every instance owns a quarter of the units: {per_instance:?}"
    );
    agent.stop().expect("detach");
}

#[test]
fn untagged_udp_v4() {
    untagged_udp(testbed::VIP_V4.into(), "u4");
}

#[test]
fn untagged_udp_v6() {
    untagged_udp(testbed::VIP_V6.into(), "u6");
}

/// Datagrams with the same tag reach the same instance, whatever their
/// source port; and it is the instance the agent assigned the tag's unit.
fn tagged_udp(vip: IpAddr, tag: &str) {
    let tb = testbed(tag, 3);
    let dst = SocketAddr::new(vip, 7100);
    let agent = start_agent(
        &tb,
        &service_toml(
            &tb,
            "sessions",
            vip,
            7100,
            "udp",
            "tag = { kind = \"udp-payload\", offset = 0, length = 8 }",
        ),
    );
    let servers = UdpServers::start(&namespaces(&tb), dst);
    let tags: Vec<[u8; 8]> = (0..24u8)
        .map(|t| b"tenant-\0".map(|b| if b == 0 { b'a' + t } else { b }))
        .collect();
    let load = UdpLoad {
        client_ns: &tb.client,
        dst,
        sockets: 240,
        per_socket: 25,
        window: 256,
        deadline: Duration::from_mins(1),
    };
    let (sent, _) = traffic::send_udp(&load, &servers.total, |i| tags[i % tags.len()].to_vec());
    servers.wait_for(sent, Duration::from_secs(2));
    let got = servers.finish();
    let idx = index_of(&agent.plan);
    let mut where_tag: HashMap<Vec<u8>, HashSet<usize>> = HashMap::new();
    let mut ports: HashMap<Vec<u8>, HashSet<u16>> = HashMap::new();
    let mut total = 0;
    for (k, datagrams) in got.iter().enumerate() {
        for d in datagrams {
            let t = d.payload[..8].to_vec();
            let want = idx[&agent.plan.owner_of_key(0, key::tag_bytes(&t))];
            assert_eq!(
                k,
                want,
                "tag {:?} reached instance {k}, the agent assigned it to {want}",
                String::from_utf8_lossy(&t)
            );
            where_tag.entry(t.clone()).or_default().insert(k);
            ports.entry(t).or_default().insert(d.from.port());
            total += 1;
        }
    }
    assert_eq!(total, sent, "datagrams lost");
    assert_eq!(where_tag.len(), tags.len());
    for (t, at) in &where_tag {
        assert_eq!(at.len(), 1, "tag {t:?} reached instances {at:?}");
        assert!(
            ports[t].len() >= 10,
            "tag {t:?} came from {} source ports only",
            ports[t].len()
        );
    }
    let used: HashSet<usize> = where_tag.values().flatten().copied().collect();
    assert!(
        used.len() > 1,
        "24 tags should spread over more than one instance"
    );
    agent.stop().expect("detach");
}

#[test]
fn tagged_udp_v4() {
    tagged_udp(testbed::VIP_V4.into(), "t4");
}

#[test]
fn tagged_udp_v6() {
    tagged_udp(testbed::VIP_V6.into(), "t6");
}

/// TCP connections complete, SYN to FIN, with the instance that owns the
/// flow, and the replies reach the client.
fn tcp(vip: IpAddr, tag: &str) {
    let tb = testbed(tag, 3);
    let dst = SocketAddr::new(vip, 8080);
    let agent = start_agent(&tb, &service_toml(&tb, "web", vip, 8080, "tcp", ""));
    let names: Vec<String> = (0..tb.instances.len())
        .map(|k| format!("inst-{k}"))
        .collect();
    let servers = TcpServers::start(&namespaces(&tb), dst, &names);
    let idx = index_of(&agent.plan);
    let mut per = vec![0; tb.instances.len()];
    for c in 0..150 {
        let msg = format!("hello {c}");
        let (local, name, echoed) = traffic::tcp_exchange(&tb.client, dst, msg.as_bytes())
            .unwrap_or_else(|e| panic!("connection {c} to {dst}: {e}"));
        assert_eq!(echoed, msg.as_bytes(), "connection {c}: echo");
        let k: usize = name
            .trim_start_matches("inst-")
            .parse()
            .expect("server name");
        let want = idx[&agent.plan.owner_of_key(0, key::host::flow(local, dst, 6))];
        assert_eq!(
            k, want,
            "connection from {local} served by {name}, the agent assigned its unit to inst-{want}"
        );
        per[k] += 1;
    }
    let errors = servers.finish();
    assert!(errors.is_empty(), "server side errors: {errors:?}");
    eprintln!("{vip}: connections per instance {per:?}");
    assert!(
        per.iter().all(|&n| n > 10),
        "connections spread over all instances: {per:?}"
    );
    agent.stop().expect("detach");
}

#[test]
fn tcp_v4() {
    tcp(testbed::VIP_V4.into(), "p4");
}

#[test]
fn tcp_v6() {
    tcp(testbed::VIP_V6.into(), "p6");
}

/// Traffic that is not for a service (ARP/NDP, and UDP to the host itself)
/// passes through the attached program to the host's own stack.
#[test]
fn non_service_traffic_still_works() {
    let tb = testbed("ns", 2);
    let agent = start_agent(
        &tb,
        &service_toml(&tb, "kv", testbed::VIP_V4.into(), 7000, "udp", ""),
    );
    for host in [
        IpAddr::from(testbed::HOST_V4),
        IpAddr::from(testbed::HOST_V6),
    ] {
        let addr = SocketAddr::new(host, 9999);
        let server = netns::run_in(&tb.host, || UdpSocket::bind(addr)).expect("host server");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).expect("host server receives");
            server
                .send_to(&buf[..n], from)
                .expect("host server replies");
        });
        let bind: SocketAddr = if host.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let client = netns::run_in(&tb.client, || UdpSocket::bind(bind)).expect("client");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client.send_to(b"ping", addr).expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no reply from the host at {addr}: {e}"));
        assert_eq!(&buf[..n], b"ping");
        echo.join().expect("echo thread");
    }
    let g = agent.datapath.global_counters().expect("counters");
    assert!(
        g[sluice_common::counters::PASS_NO_SERVICE as usize] >= 2,
        "the UDP pings passed as non-service: {g:?}"
    );
    assert!(
        g[sluice_common::counters::PASS_NOT_IP as usize]
            + g[sluice_common::counters::PASS_NOT_L4 as usize]
            >= 2,
        "ARP and NDP passed too: {g:?}"
    );
    agent.stop().expect("detach");
}

fn xdp_attached(tb: &Testbed) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", &tb.host, "-d", "link", "show", testbed::NIC])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// A config naming a veth that does not exist: a clear error, and nothing
/// attached.
#[test]
fn missing_veth_fails_cleanly() {
    let tb = testbed("mv", 1);
    let toml = format!(
        "{}[[service.instance]]\nname = \"ghost\"\nveth = \"nope0\"\n",
        service_toml(&tb, "kv", testbed::VIP_V4.into(), 7000, "udp", "")
    );
    let config = Config::parse(&toml, Path::new("e2e.toml")).expect("valid syntax");
    let err = tb
        .start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .err()
        .expect("start must fail");
    let msg = sluice_tests::harness::error_chain(&err);
    assert!(
        msg.contains("instance `ghost`")
            && msg.contains("service[0].instance[1].veth")
            && msg.contains("nope0"),
        "{msg}"
    );
    assert!(
        !xdp_attached(&tb),
        "a failed start must leave nothing attached"
    );
    // And a good start does attach: the check above can fail.
    let agent = start_agent(
        &tb,
        &service_toml(&tb, "kv", testbed::VIP_V4.into(), 7000, "udp", ""),
    );
    assert!(xdp_attached(&tb));
    agent.stop().expect("detach");
    assert!(!xdp_attached(&tb), "stop detaches");
}

/// Sends `frames` out of the client's `eth0` as they are (this kernel may
/// have no VLAN interfaces: the tagged frames are built by hand).
fn send_raw(tb: &Testbed, frames: &[Vec<u8>]) {
    netns::run_in(&tb.client, || {
        let out = sluice::datapath::punt::Reinjector::new().expect("AF_PACKET socket");
        let eth0 = sluice::sys::link::ifindex("eth0").expect("client eth0");
        for f in frames {
            out.send(eth0, f).expect("send a raw frame");
        }
    });
}

/// `n` UDP datagrams from the client to `dst` on VLAN `vid`, from `n`
/// source ports, addressed to the host's NIC MAC.
fn vlan_frames(tb: &Testbed, vid: u16, dst: SocketAddr, n: u16) -> Vec<Vec<u8>> {
    let nic_mac = netns::run_in(&tb.host, || sluice::sys::link::mac(testbed::NIC))
        .expect("NIC veth")
        .expect("NIC MAC");
    let client_mac = netns::run_in(&tb.client, || sluice::sys::link::mac("eth0"))
        .expect("client eth0")
        .expect("client MAC");
    (0..n)
        .map(|i| {
            let src = SocketAddr::new(testbed::CLIENT_V4.into(), 20_000 + i);
            let mut p = Packet::udp(src, dst)
                .vlan(0x8100, vid)
                .dst_mac(nic_mac)
                .payload(format!("vlan {vid} #{i}").into_bytes());
            p.src_mac = client_mac;
            p.build()
        })
        .collect()
}

/// Defect: VLAN-tagged frames were redirected with their tag on, so the
/// instance's veth dropped them, and the VLAN was not part of the service.
/// Now a service names its VLAN, the tag is popped before delivery, and a
/// frame on another VLAN is not the service's.
#[test]
fn tagged_frames_reach_the_vlans_service_untagged() {
    let tb = testbed("vl", 2);
    let vip: IpAddr = "198.18.1.42".parse().unwrap();
    let dst = SocketAddr::new(vip, 7000);
    let agent = start_agent(
        &tb,
        &service_toml(&tb, "on-vlan-42", vip, 7000, "udp", "vlan = 42"),
    );
    let servers = UdpServers::start(&namespaces(&tb), dst);
    send_raw(&tb, &vlan_frames(&tb, 42, dst, 100));
    servers.wait_for(100, Duration::from_secs(3));
    let g0 = agent.datapath.global_counters().expect("counters");

    // The same VIP on VLAN 43: not the service's, passed to the host.
    send_raw(&tb, &vlan_frames(&tb, 43, dst, 100));
    std::thread::sleep(Duration::from_millis(300));
    let g1 = agent.datapath.global_counters().expect("counters");
    let got = servers.finish();
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        100,
        "every datagram on VLAN 42 reached an instance's socket, none on VLAN 43: {counts:?}"
    );
    assert!(
        got.iter()
            .flatten()
            .all(|d| d.payload.starts_with(b"vlan 42 ")),
        "only VLAN 42's datagrams were delivered"
    );
    assert!(
        counts.iter().all(|&n| n > 0),
        "both instances served: {counts:?}"
    );
    let no_service = sluice_common::counters::PASS_NO_SERVICE as usize;
    assert_eq!(
        g1[no_service] - g0[no_service],
        100,
        "the VLAN 43 datagrams passed as no service"
    );
    agent.stop().expect("detach");
}

/// One container serving several services behind one veth: `dns` (UDP
/// 5300) and `web` (TCP and UDP 8000), each on an IPv4 and an IPv6 VIP,
/// with an instance of each in each of two containers. Every datagram and
/// connection reaches the container of the instance that owns its unit in
/// its own service, and nothing is lost.
#[test]
fn one_container_serves_several_services_and_vips_behind_one_veth() {
    let tb = testbed("multi", 2);
    let mut toml = String::new();
    for (name, port, protocols) in [
        ("dns", 5300, "[\"udp\"]"),
        ("web", 8000, "[\"tcp\", \"udp\"]"),
    ] {
        let _ = write!(
            toml,
            "[[service]]\nname = \"{name}\"\nvips = [\"{}\", \"{}\"]\nport = {port}\nprotocols = {protocols}\n\n",
            testbed::VIP_V4,
            testbed::VIP_V6
        );
        for (k, i) in tb.instances.iter().enumerate() {
            let _ = write!(
                toml,
                "[[service.instance]]\nname = \"{name}-{k}\"\nveth = \"{}\"\nnetns = \"{}\"\n\n",
                i.veth, i.netns
            );
        }
    }
    let agent = start_agent(&tb, &toml);
    // The container (testbed instance) of each plan instance: `<svc>-<k>`.
    let container: HashMap<u32, usize> = agent
        .plan
        .instances
        .iter()
        .map(|i| (i.id, i.name.rsplit('-').next().unwrap().parse().unwrap()))
        .collect();
    let ns = namespaces(&tb);
    let vips: [IpAddr; 2] = [testbed::VIP_V4.into(), testbed::VIP_V6.into()];
    let mut per_container = vec![0u64; 2];
    for (service, port) in [(0u32, 5300), (1, 8000)] {
        assert_eq!(
            agent.plan.services[service as usize].keys.len(),
            2 * (service as usize + 1)
        );
        for vip in vips {
            let dst = SocketAddr::new(vip, port);
            let servers = UdpServers::start(&ns, dst);
            let load = UdpLoad {
                client_ns: &tb.client,
                dst,
                sockets: 200,
                per_socket: 10,
                window: 256,
                deadline: Duration::from_secs(30),
            };
            let (sent, _) = traffic::send_udp(&load, &servers.total, |_| Vec::new());
            servers.wait_for(sent, Duration::from_secs(2));
            let mut received = 0;
            for (k, datagrams) in servers.finish().iter().enumerate() {
                for d in datagrams {
                    let owner = agent
                        .plan
                        .owner_of_key(service, key::host::flow(d.from, dst, 17));
                    assert_eq!(
                        k, container[&owner],
                        "udp {dst} from {} reached container {k}",
                        d.from
                    );
                    per_container[k] += 1;
                }
                received += datagrams.len() as u64;
            }
            assert_eq!(received, sent, "udp {dst}: datagrams lost");
        }
    }
    for vip in vips {
        let dst = SocketAddr::new(vip, 8000);
        let names = ["c0".to_owned(), "c1".to_owned()];
        let servers = TcpServers::start(&ns, dst, &names);
        for c in 0..40 {
            let msg = format!("hello {c}");
            let (local, name, echoed) = traffic::tcp_exchange(&tb.client, dst, msg.as_bytes())
                .unwrap_or_else(|e| panic!("connection {c} to {dst}: {e}"));
            assert_eq!(echoed, msg.as_bytes());
            let owner = agent.plan.owner_of_key(1, key::host::flow(local, dst, 6));
            assert_eq!(
                name, names[container[&owner]],
                "tcp {dst} from {local}: wrong container"
            );
        }
        let errors = servers.finish();
        assert!(errors.is_empty(), "{errors:?}");
    }
    eprintln!("datagrams per container over both services and VIPs: {per_container:?}");
    assert!(per_container.iter().all(|&n| n > 1000), "{per_container:?}");
    agent.stop().expect("detach");
}
