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
    let l = TcpListener::bind(vip).expect("listen");
    // An IPv6 address's local route is added by the kernel's address work
    // a moment after `ip addr add` returns, even with `nodad`: until then
    // a connect finds no route (seen: ENETUNREACH, 1 run in ~20).
    let mut tries = 0;
    let s = loop {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(client),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        s.bind(&client.into()).expect("bind the client");
        match s.connect(&vip.into()) {
            Ok(()) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::NetworkUnreachable && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let (server, _) = l.accept().expect("accept");
    (l, s.into(), server)
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

/// The ACK completing a SYN-cookie handshake: the new owner has no socket
/// for it (a cookie leaves no request socket behind), only its listener,
/// which will take it. It stays with the new owner rather than going to
/// the previous one, which would reset it; an ACK whose cookie does not
/// check out still gets its second chance.
fn syn_cookie_for(tag: &str, client_ip: IpAddr, vip_ip: IpAddr) {
    let ns = namespace(&format!("ck{tag}"));
    netns::run_in(&ns.0, || {
        // Cookies for every SYN, as under SYN-queue overflow.
        std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2").expect("tcp_syncookies");
        let vip = SocketAddr::new(vip_ip, 7443);
        let client = SocketAddr::new(client_ip, 40100);
        let (_listener, seq, ack) = cookie_handshake(client, vip);
        let mut h = Harness::new(CONFIG);
        h.dp.set_instance_netns(2, Some(u32::MAX)).unwrap();
        h.dp.set_group_owner(0, Group::ALL, 1).unwrap();
        h.dp.set_group_owner(0, Group::ALL, 2).unwrap();
        let p = Packet::tcp(client, vip, TCP_ACK);
        let at = p.build().len() - 20;
        let completing = |seq: u32, ack: u32| {
            let mut f = p.build();
            f[at + 4..at + 8].copy_from_slice(&seq.to_be_bytes());
            f[at + 8..at + 12].copy_from_slice(&ack.to_be_bytes());
            f
        };
        let r = h.run(&completing(seq, ack));
        assert_eq!(r.action, XDP_REDIRECT);
        assert_eq!(
            &r.frame[..6],
            &instance_mac(2),
            "a valid cookie's ACK is the new owner's connection"
        );
        let r = h.run(&completing(seq, ack ^ 0x0100_0000));
        assert_eq!(&r.frame[..6], &instance_mac(1), "a bad cookie: to a");
        assert_eq!(h.global()[counters::SECOND_CHANCE as usize], 1);
    });
}

/// A handshake from `client` to a listener on `vip` answered with a SYN
/// cookie, both ends then closed by reset (no socket of it is left):
/// the listener, kept open, and the sequence and acknowledgement numbers
/// of the ACK that completed it, read from the SYN-ACK on the loopback.
fn cookie_handshake(client: SocketAddr, vip: SocketAddr) -> (TcpListener, u32, u32) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let listener = TcpListener::bind(vip).expect("listen");
    // SAFETY: plain socket call; the fd is owned right after.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(u16::try_from(libc::ETH_P_ALL).unwrap().to_be()),
        )
    };
    assert!(raw >= 0, "AF_PACKET socket");
    // SAFETY: a fresh fd of ours.
    let cap = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a timeval of the size given.
    unsafe {
        libc::setsockopt(
            cap.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            u32::try_from(size_of::<libc::timeval>()).unwrap(),
        )
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(client),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    s.set_linger(Some(Duration::ZERO)).unwrap();
    s.bind(&client.into()).expect("bind the client");
    s.connect(&vip.into()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop((s, server));
    let v4 = vip.is_ipv4();
    let (ip_len, src_at) = if v4 { (20, 12) } else { (40, 8) };
    let mut buf = [0u8; 2048];
    for _ in 0..64 {
        // SAFETY: `buf` holds the length given.
        let n = unsafe { libc::recv(cap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0, "no SYN-ACK seen on the loopback");
        let f = &buf[14..usize::try_from(n).unwrap()];
        let (tcp, proto) = (ip_len, if v4 { f[9] } else { f[6] });
        if f.len() < ip_len + 20 || proto != 6 || f[tcp + 13] != 0x12 {
            continue;
        }
        let sport = u16::from_be_bytes([f[tcp], f[tcp + 1]]);
        let src_len = if v4 { 4 } else { 16 };
        let from_vip = match vip.ip() {
            IpAddr::V4(a) => f[src_at..src_at + src_len] == a.octets(),
            IpAddr::V6(a) => f[src_at..src_at + src_len] == a.octets(),
        };
        if sport != vip.port() || !from_vip {
            continue;
        }
        let word = |at: usize| u32::from_be_bytes(f[at..at + 4].try_into().unwrap());
        // The ACK's sequence is the SYN-ACK's acknowledgement; its
        // acknowledgement, the cookie + 1.
        return (listener, word(tcp + 8), word(tcp + 4).wrapping_add(1));
    }
    panic!("no SYN-ACK from {vip} among 64 frames");
}

#[test]
fn the_ack_completing_a_syn_cookie_stays_with_the_new_owner_v4() {
    syn_cookie_for(
        "v4",
        "198.18.0.9".parse().unwrap(),
        "198.18.1.1".parse().unwrap(),
    );
}

#[test]
fn the_ack_completing_a_syn_cookie_stays_with_the_new_owner_v6() {
    syn_cookie_for(
        "v6",
        "fd00:5100::9".parse().unwrap(),
        "fd00:5100:1::1".parse().unwrap(),
    );
}

/// A move long past (18.2 h, 2^16 s, ago) is old news too: its time is
/// not compared modulo 2^16 s, where it would look recent again.
#[test]
fn a_move_two_to_the_sixteen_seconds_ago_gives_no_second_chance() {
    let ns = namespace("wrap");
    netns::run_in(&ns.0, || {
        let vip: SocketAddr = "198.18.1.1:7443".parse().unwrap();
        let _listener = TcpListener::bind(vip).expect("listen");
        let mut h = Harness::new(CONFIG);
        h.dp.set_instance_netns(2, Some(u32::MAX)).unwrap();
        h.dp.set_group_owner(0, Group::ALL, 2).unwrap();
        let stranger: SocketAddr = "198.18.0.9:40200".parse().unwrap();
        let ack = Packet::tcp(stranger, vip, TCP_ACK).build();
        h.dp.set_previous(0, Group::ALL, 1, Duration::ZERO);
        assert_eq!(&h.run(&ack).frame[..6], &instance_mac(1), "a recent move");
        h.dp.set_previous(0, Group::ALL, 1, Duration::from_secs(1 << 16));
        assert_eq!(
            &h.run(&ack).frame[..6],
            &instance_mac(2),
            "a move 2^16 s ago: no second chance"
        );
    });
}
