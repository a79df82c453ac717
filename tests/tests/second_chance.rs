//! The second chance, in the kernel (`BPF_PROG_TEST_RUN`, run inside a
//! namespace of the test's own so the program's socket lookup sees real
//! sockets there): after a unit moves, a TCP packet of a connection the new
//! owner has a socket for stays with it; one it has none for (only its
//! listener) goes to the previous owner; a SYN starts a new connection at
//! the new owner; after the service's pin idle time, no second chance.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use sluice::{datapath::Datapath as _, plan::Group};
use sluice_common::counters;
use sluice_tests::{
    harness::{Harness, XDP_REDIRECT, instance_mac},
    netns,
    packet::Packet,
    process::{Netns, ip},
};

const CONFIG: &str = r#"
[[service]]
name = "web"
vips = ["198.18.1.1", "fd00:5100:1::1"]
port = 7443
protocol = "tcp"
pin = "none"
pin_idle_secs = 2
[[service.instance]]
name = "web-a"
veth = "t-weba"
[[service.instance]]
name = "web-b"
veth = "t-webb"
"#;

const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// A namespace with the VIPs and a client address on its loopback.
fn namespace(tag: &str) -> Netns {
    let ns = Netns(format!("sl-second-{tag}-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    for a in ["198.18.1.1/32", "198.18.0.9/32"] {
        ip(&["-n", &ns.0, "addr", "add", a, "dev", "lo"]);
    }
    for a in ["fd00:5100:1::1/128", "fd00:5100::9/128"] {
        ip(&["-n", &ns.0, "addr", "add", a, "dev", "lo", "nodad"]);
    }
    ns
}

/// A connection from `client` to `vip`, established in the calling
/// thread's namespace; the listener stays open too.
fn connect(client: SocketAddr, vip: SocketAddr) -> (TcpListener, TcpStream, TcpStream) {
    {
        let l = TcpListener::bind(vip).expect("listen");
        let s = socket2::Socket::new(
            socket2::Domain::for_address(client),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        s.bind(&client.into()).expect("bind the client");
        s.connect(&vip.into()).expect("connect");
        let (server, _) = l.accept().expect("accept");
        (l, s.into(), server)
    }
}

fn second_chance_for(tag: &str, client_ip: IpAddr, vip_ip: IpAddr) {
    let ns = namespace(tag);
    // Everything on one thread inside the namespace: the sockets, and the
    // program runs, whose lookups search the namespace they run in.
    netns::run_in(&ns.0, || in_namespace(client_ip, vip_ip));
}

fn in_namespace(client_ip: IpAddr, vip_ip: IpAddr) {
    let vip = SocketAddr::new(vip_ip, 7443);
    let connected = SocketAddr::new(client_ip, 40000);
    let _sockets = connect(connected, vip);
    let mut h = Harness::new(CONFIG);
    // web-b (id 2) is this namespace's sockets; the unit moves a -> b.
    h.dp.set_instance_netns(2, Some(u32::MAX)).unwrap();
    h.dp.set_group_owner(0, Group::ALL, 1).unwrap();
    h.dp.set_group_owner(0, Group::ALL, 2).unwrap();
    let run =
        |h: &Harness, src: SocketAddr, flags: u8| h.run(&Packet::tcp(src, vip, flags).build());
    let chances = |h: &Harness| h.global()[counters::SECOND_CHANCE as usize];

    let r = run(&h, connected, TCP_ACK);
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(
        &r.frame[..6],
        &instance_mac(2),
        "b has the connection: it keeps it"
    );
    assert_eq!(chances(&h), 0);

    let stranger = SocketAddr::new(client_ip, 40001);
    let r = run(&h, stranger, TCP_ACK);
    assert_eq!(
        &r.frame[..6],
        &instance_mac(1),
        "b has only its listener: to a"
    );
    assert_eq!(chances(&h), 1);

    let r = run(&h, stranger, TCP_SYN);
    assert_eq!(
        &r.frame[..6],
        &instance_mac(2),
        "a SYN opens a new connection at b"
    );
    assert_eq!(chances(&h), 1);

    // The previous owner gone: nowhere else to go, b it is.
    h.dp.set_instance_live(1, false).unwrap();
    let r = run(&h, stranger, TCP_ACK);
    assert_eq!(&r.frame[..6], &instance_mac(2));
    h.dp.set_instance_live(1, true).unwrap();

    // Past the service's pin idle time (2 s), the move is old news.
    std::thread::sleep(Duration::from_millis(3100));
    let r = run(&h, stranger, TCP_ACK);
    assert_eq!(
        &r.frame[..6],
        &instance_mac(2),
        "no second chance after the window"
    );
    assert_eq!(chances(&h), 1);
}

#[test]
fn a_connection_the_new_owner_lacks_goes_to_the_previous_one_v4() {
    second_chance_for(
        "v4",
        "198.18.0.9".parse().unwrap(),
        "198.18.1.1".parse().unwrap(),
    );
}

#[test]
fn a_connection_the_new_owner_lacks_goes_to_the_previous_one_v6() {
    second_chance_for(
        "v6",
        "fd00:5100::9".parse().unwrap(),
        "fd00:5100:1::1".parse().unwrap(),
    );
}
