//! The workload manager at work on the namespace testbed: real program,
//! real sockets, the real control loop.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use sluice::{
    agent::Agent,
    config::Config,
    control::qos,
    coord::{CoordStore, EmbeddedStore},
    datapath::Datapath as _,
    plan::Group,
};
use sluice_common::{key, unit_of};
use sluice_tests::{
    block_on, netns,
    testbed::{self, Testbed},
    traffic::{PacedSender, TcpServers, UdpServers, tcp_echo},
};

fn testbed(tag: &str, n: usize) -> Testbed {
    Testbed::new(tag, n).unwrap_or_else(|e| panic!("building the testbed: {e}"))
}

fn start(tb: &Testbed, toml: &str, store: Arc<dyn CoordStore>) -> Agent {
    let config =
        Config::parse(toml, Path::new("wlm.toml")).unwrap_or_else(|e| panic!("config: {e}"));
    tb.start_agent(&config, store)
        .unwrap_or_else(|e| panic!("starting the agent: {e:?}"))
}

/// The instance made slow.
const SLOW: usize = 1;

fn drops(tb: &Testbed, k: usize) -> u64 {
    qos::netns_stats(
        Path::new("/run/netns")
            .join(&tb.instances[k].netns)
            .as_path(),
        &[],
    )
    .expect("netns stats")
    .rcvbuf_errors
}

/// One instance made slow under steady load: its group is split and part
/// moved until nobody is overloaded and it stops dropping; nothing is lost
/// beyond what the slow server dropped; when the load falls, groups merge
/// back. The service packs (`policy = "pack"`): merging work back onto few
/// instances is what that policy is for.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, phase after phase")]
fn slow_instance_sheds_then_groups_merge_back() {
    let tb = testbed("slow", 3);
    let toml = format!(
        "[agent]\ninterval_ms = 250\nmax_moves_per_sec = 4\n\n\
         [[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\
         wlm = {{ policy = \"pack\", capacity_pps = 3000, overload = 0.8, underload = 0.3, sustain = 2, cooldown_ms = 1000, min_group_units = 64 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 3)
    );
    let mut agent = start(&tb, &toml, Arc::new(EmbeddedStore::in_memory()));
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    // Small buffers: a slow server drops within a fraction of a second.
    let servers = UdpServers::start_with(&ns, dst, 64 << 10);
    servers.throttle[SLOW].store(150, Ordering::Relaxed);
    let drops0: Vec<u64> = (0..3).map(|k| drops(&tb, k)).collect();

    let sender = PacedSender::spawn(
        &tb.client,
        dst,
        600,
        1500,
        Duration::from_mins(2),
        |i, seq| {
            let mut p = u32::try_from(i).unwrap().to_be_bytes().to_vec();
            p.extend_from_slice(&seq.to_be_bytes());
            p
        },
    );

    // Phase 1: steady load until balanced — nobody over the overload
    // threshold and the slow instance not dropping, for 8 intervals (2 s).
    let t0 = Instant::now();
    let mut first_overload = None;
    let mut balanced_since: Option<Instant> = None;
    let mut before = None;
    let phase1 = loop {
        std::thread::sleep(agent.control.interval());
        block_on(agent.tick()).expect("tick");
        let st = block_on(agent.control.status()).expect("status");
        let slow = &st[SLOW];
        if first_overload.is_none() && slow.sample.utilisation > 0.8 {
            first_overload = Some(Instant::now());
            before = Some(st.clone());
        }
        let calm = st
            .iter()
            .all(|s| s.sample.utilisation <= 0.8 && s.sample.drops_ps == 0.0);
        let moved = agent
            .control
            .history()
            .iter()
            .any(|e| e.from == "inst-1" && e.group.is_some());
        balanced_since = if calm && moved {
            balanced_since.or(Some(Instant::now()))
        } else {
            None
        };
        if balanced_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_mins(1),
            "not balanced after 60 s: {st:#?}\nmoves: {:#?}",
            agent.control.history()
        );
    };
    let overload_at = first_overload.expect("the slow instance was overloaded");
    let balanced_at = balanced_since.expect("balanced");
    let before = before.expect("loads before");
    let fmt = |st: &[sluice::control::InstanceStatus]| {
        st.iter()
            .map(|s| {
                format!(
                    "{}: {:.0} pps u={:.2} drops/s={:.0} groups={}",
                    s.name,
                    s.sample.rate_pps,
                    s.sample.utilisation,
                    s.sample.drops_ps,
                    s.groups.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    eprintln!(
        "overload -> balanced in {:.1} s ({} moves)\n  before: {}\n  after:  {}",
        balanced_at.duration_since(overload_at).as_secs_f64(),
        agent
            .control
            .history()
            .iter()
            .filter(|e| e.group.is_some())
            .count(),
        fmt(&before),
        fmt(&phase1)
    );
    // Tolerance: every instance between 0 and the overload threshold, and
    // the slow one taking no more than it drains (150 pps) plus 20%.
    assert!(phase1.iter().all(|s| s.sample.utilisation <= 0.8));
    assert!(
        phase1[SLOW].sample.rate_pps <= 180.0,
        "slow instance still gets {:.0} pps",
        phase1[SLOW].sample.rate_pps
    );
    let slow_drops_at_balance = drops(&tb, SLOW);

    // Phase 2: the load falls and the slow server recovers: groups merge.
    let groups_at_peak = phase1.iter().map(|s| s.groups.len()).sum::<usize>();
    sender.rate.store(150, Ordering::Relaxed);
    servers.throttle[SLOW].store(0, Ordering::Relaxed);
    let t1 = Instant::now();
    let merged = loop {
        std::thread::sleep(agent.control.interval());
        block_on(agent.tick()).expect("tick");
        let st = block_on(agent.control.status()).expect("status");
        let groups = st.iter().map(|s| s.groups.len()).sum::<usize>();
        if groups * 2 <= groups_at_peak {
            break st;
        }
        assert!(
            t1.elapsed() < Duration::from_mins(1),
            "groups did not merge back: {groups} of {groups_at_peak}: {}",
            fmt(&st)
        );
    };
    eprintln!(
        "load fell: groups {groups_at_peak} -> {} in {:.1} s: {}",
        merged.iter().map(|s| s.groups.len()).sum::<usize>(),
        t1.elapsed().as_secs_f64(),
        fmt(&merged)
    );
    assert!(
        agent.control.history().iter().any(|e| e.kind == "reclaim"),
        "a buddy was taken back"
    );

    let sent = sender.finish().expect("sender");
    std::thread::sleep(Duration::from_millis(500));
    let received: usize = servers.finish().iter().map(Vec::len).sum();
    let dropped: Vec<u64> = (0..3).map(|k| drops(&tb, k) - drops0[k]).collect();
    eprintln!("sent {sent}, received {received}, dropped by receive buffers {dropped:?}");
    assert_eq!(
        dropped[0] + dropped[2],
        0,
        "only the slow instance may drop: {dropped:?}"
    );
    assert_eq!(
        drops(&tb, SLOW),
        slow_drops_at_balance,
        "the slow instance dropped after the load was balanced"
    );
    assert_eq!(
        u64::try_from(received).unwrap() + dropped[SLOW],
        sent,
        "datagrams lost beyond the slow server's own drops"
    );
    agent.stop().expect("detach");
}

/// Spread, the default policy: an instance with no work, beside two that
/// carry the whole service, takes work from them until the three are
/// within the balance band, and then the loop rests; nothing is lost.
#[test]
fn an_instance_without_work_takes_a_share() {
    let tb = testbed("spread", 3);
    let toml = format!(
        "[agent]\ninterval_ms = 250\nmax_moves_per_sec = 4\n\n\
         [[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\
         wlm = {{ capacity_pps = 3000, sustain = 2, cooldown_ms = 1000, min_group_units = 64 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 3)
    );
    // The store starts with every unit on inst-0 and inst-1.
    let store = Arc::new(EmbeddedStore::in_memory());
    let (lo, hi) = Group::ALL.split().unwrap();
    block_on(store.init("kv", &[(lo, "inst-0".into()), (hi, "inst-1".into())])).unwrap();
    let mut agent = start(&tb, &toml, store);
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start(&ns, dst);
    let sender = PacedSender::spawn(
        &tb.client,
        dst,
        600,
        1500,
        Duration::from_mins(2),
        |_, seq| seq.to_be_bytes().to_vec(),
    );
    let t0 = Instant::now();
    let mut rest_since: Option<Instant> = None;
    let rested = loop {
        std::thread::sleep(agent.control.interval());
        let made = block_on(agent.tick()).expect("tick");
        let st = block_on(agent.control.status()).expect("status");
        let working = st.iter().all(|s| s.sample.rate_pps > 0.0);
        rest_since = if working && made.is_empty() {
            rest_since.or(Some(Instant::now()))
        } else {
            None
        };
        if rest_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(3)) {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_mins(1),
            "not at rest after 60 s: {st:#?}\nmoves: {:#?}",
            agent.control.history()
        );
    };
    let u: Vec<f64> = rested.iter().map(|s| s.sample.utilisation).collect();
    let takes = agent
        .control
        .history()
        .iter()
        .filter(|e| e.kind == "take")
        .count();
    eprintln!(
        "at rest after {:.1} s and {takes} takes: utilisation {u:.3?}",
        t0.elapsed().as_secs_f64() - 3.0
    );
    let (min, max) = (
        u.iter().copied().fold(f64::MAX, f64::min),
        u.iter().copied().fold(0.0, f64::max),
    );
    // The band (0.1) plus the measurement noise of 600 flows at 1,500 pps.
    assert!(max - min <= 0.15, "not spread: {u:.3?}");
    let sent = sender.finish().expect("sender");
    std::thread::sleep(Duration::from_millis(500));
    let received: usize = servers.finish().iter().map(Vec::len).sum();
    eprintln!("sent {sent}, received {received}");
    assert_eq!(u64::try_from(received).unwrap(), sent, "datagrams lost");
    agent.stop().expect("detach");
}

/// A TCP connection from the client, bound to `port` (0: any).
fn connect_from(tb: &Testbed, port: u16, dst: SocketAddr) -> std::io::Result<TcpStream> {
    netns::run_in(&tb.client, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(testbed::CLIENT_V4.into(), port).into())?;
        s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
        Ok(s.into())
    })
}

/// Long-lived TCP connections whose unit moves keep exchanging data with
/// their old instance, without a reset; new connections of that unit reach
/// the new owner.
#[test]
fn tcp_connections_survive_a_move() {
    let tb = testbed("mv", 2);
    let toml = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nport = 8080\nprotocol = \"tcp\"\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let mut agent = start(&tb, &toml, Arc::new(EmbeddedStore::in_memory()));
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 8080);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = TcpServers::start(&ns, dst, &["inst-0".into(), "inst-1".into()]);

    let mut conns: Vec<(TcpStream, String)> = (0..16)
        .map(|c| {
            let mut s = connect_from(&tb, 0, dst).unwrap_or_else(|e| panic!("connection {c}: {e}"));
            let who = tcp_echo(&mut s, &format!("hello {c}")).expect("first exchange");
            (s, who)
        })
        .collect();
    // Move the /4 group (4096 units) holding connection 0's unit to the
    // other instance.
    let local0 = conns[0].0.local_addr().unwrap();
    let unit = unit_of(key::host::flow(local0, dst, 6));
    let group = Group::new(unit & !0x0fff, 4).unwrap();
    let from = conns[0].1.clone();
    let to = if from == "inst-0" { "inst-1" } else { "inst-0" };
    let events = block_on(
        agent
            .control
            .move_group(&mut agent.datapath, "web", group, to),
    )
    .expect("move");
    assert!(!events.is_empty());
    let moved: Vec<usize> = (0..conns.len())
        .filter(|&c| {
            group.contains(unit_of(key::host::flow(
                conns[c].0.local_addr().unwrap(),
                dst,
                6,
            )))
        })
        .collect();
    assert!(moved.contains(&0));

    for round in 0..3 {
        for (c, (s, who)) in conns.iter_mut().enumerate() {
            let now = tcp_echo(s, &format!("round {round} of {c}")).unwrap_or_else(|e| {
                panic!(
                    "connection {c} broke after the move (moved: {}): {e}",
                    moved.contains(&c)
                )
            });
            assert_eq!(&now, who, "connection {c} changed instance");
        }
    }
    // New connections whose flow falls in the moved group reach `to`.
    let mut fresh = 0;
    for port in 20000..60000u16 {
        let src = SocketAddr::new(testbed::CLIENT_V4.into(), port);
        if !group.contains(unit_of(key::host::flow(src, dst, 6))) {
            continue;
        }
        let Ok(mut s) = connect_from(&tb, port, dst) else {
            continue;
        };
        assert_eq!(
            tcp_echo(&mut s, "new").expect("new connection"),
            to,
            "a new flow of the moved group"
        );
        fresh += 1;
        if fresh == 5 {
            break;
        }
    }
    assert_eq!(fresh, 5);
    let svc = agent.datapath.service_counters(0).expect("counters");
    eprintln!(
        "moved connections {moved:?}; pins: hits {} created {} lost {}",
        svc.pin_hits, svc.pins_created, svc.pins_lost
    );
    assert_eq!(svc.pins_lost, 0, "no established flow lost its pin");
    for (s, _) in &conns {
        s.shutdown(std::net::Shutdown::Both).ok();
    }
    drop(conns);
    let errors = servers.finish();
    assert!(errors.iter().all(|e| !e.contains("reset")), "{errors:?}");
    agent.stop().expect("detach");
}

/// A restarted agent resumes the stored assignment, and the data path
/// follows it.
#[test]
fn restarted_agent_resumes_the_assignment() {
    let tb = testbed("rs", 2);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let group: Group = "0x0000/3".parse().unwrap(); // inst-0's to begin with
    let mut agent = start(&tb, &toml, Arc::new(EmbeddedStore::open(&state).unwrap()));
    block_on(
        agent
            .control
            .move_group(&mut agent.datapath, "kv", group, "inst-1"),
    )
    .expect("move");
    let before = agent.plan.services[0].groups.clone();
    agent.stop().expect("detach");

    let agent = start(&tb, &toml, Arc::new(EmbeddedStore::open(&state).unwrap()));
    let groups = &agent.plan.services[0].groups;
    assert_ne!(groups, &before, "the plan reflects the move");
    assert!(
        groups.iter().any(|(g, o)| *g == group && *o == 2),
        "resumed: {groups:?}"
    );
    // A datagram of a flow in the moved group reaches inst-1.
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let servers = UdpServers::start(&ns, dst);
    let port = (20000..60000u16)
        .find(|&p| {
            group.contains(unit_of(key::host::flow(
                SocketAddr::new(testbed::CLIENT_V4.into(), p),
                dst,
                17,
            )))
        })
        .unwrap();
    let sock = netns::run_in(&tb.client, || {
        std::net::UdpSocket::bind(SocketAddr::new(testbed::CLIENT_V4.into(), port))
    })
    .unwrap();
    sock.send_to(b"x", dst).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let got = servers.finish();
    assert_eq!(
        (got[0].len(), got[1].len()),
        (0, 1),
        "the datagram follows the resumed assignment"
    );
    agent.stop().expect("detach");
}
