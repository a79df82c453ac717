//! Path MTU discovery through Sluice (issue 29, part 2): a router between
//! the host and a client has a smaller MTU than the instances' links; its
//! ICMP "fragmentation needed" goes to the VIP, and the data path must
//! hand it to the instance that holds the connection, or that instance
//! keeps sending segments the path drops (a black hole).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice::{config::Config, coord::EmbeddedStore, datapath::Datapath as _};
use sluice_common::counters;
use sluice_tests::{
    block_on, netns,
    testbed::{self, Testbed},
};

const PORT: u16 = 7000;
/// What each instance sends a client: far more than fits in segments of
/// the narrow link's size.
const REPLY: usize = 1 << 20;

/// `Icmp: InDestUnreachs` of a namespace's stack: `/proc/thread-self/net`
/// (`/proc/net` is the process's namespace, not the thread's).
fn dest_unreachs(ns: &str) -> u64 {
    let snmp =
        netns::run_in(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp")).expect("snmp");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().expect("names"), icmp.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InDestUnreachs")
        .and_then(|(_, v)| v.parse().ok())
        .expect("InDestUnreachs")
}

/// Each instance serves one reply to every connection, its bytes saying
/// which instance it is (`#`, then its index as a digit).
fn serve(
    tb: &Testbed,
    vip: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    tb.instances
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let l = netns::run_in(&i.netns, || TcpListener::bind(vip)).expect("listen");
            l.set_nonblocking(true).expect("nonblocking");
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            c.set_nonblocking(false).expect("blocking");
                            c.set_write_timeout(Some(Duration::from_secs(15)))
                                .expect("timeout");
                            let mut body = vec![b'0' + u8::try_from(k).expect("few"); REPLY];
                            body[0] = b'#';
                            let _ = c.write_all(&body);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        })
        .collect()
}

/// The whole reply from `vip`, within 10 s (in the calling thread's
/// namespace).
fn fetch(vip: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
    let end = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::with_capacity(REPLY);
    let mut buf = vec![0u8; 65536];
    while got.len() < REPLY {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        c.set_read_timeout(Some(left))?;
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}

/// A TCP transfer of 1 MiB from an instance to a client behind a router
/// with MTU 1280 on its client side completes: the router's ICMP reaches
/// the instance serving the connection (its stack counts it), which sends
/// smaller segments from then on. Without the ICMP delivered, the transfer
/// stalls (seen failing with the data path passing ICMP to the host as
/// before: the read timed out, nothing steered, the instance learned
/// nothing).
#[test]
fn a_tcp_transfer_through_a_narrower_path_completes() {
    let mut tb = Testbed::new("pmtu", 2).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let far = tb.far_client(1280).expect("far client");
    let toml = format!(
        "[[service]]\nname = \"bulk\"\nvip = \"{}\"\nport = {PORT}\nprotocol = \"tcp\"\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let config = Config::parse(&toml, Path::new("pmtu.toml")).expect("config");
    let agent = tb
        .start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| panic!("starting the agent: {e:?}"));
    let vip = SocketAddr::new(testbed::VIP_V4.into(), PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = serve(&tb, vip, &stop);
    let before: Vec<u64> = tb
        .instances
        .iter()
        .map(|i| dest_unreachs(&i.netns))
        .collect();
    let t = Instant::now();
    let got = netns::run_in(&far, || fetch(vip));
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().expect("server");
    }
    let icmp = agent.datapath.global_counters().expect("counters")[counters::ICMP_ERROR as usize];
    let after: Vec<u64> = tb
        .instances
        .iter()
        .map(|i| dest_unreachs(&i.netns))
        .collect();
    eprintln!(
        "transfer: {:?} in {:?}; ICMP errors steered {icmp}; instances' InDestUnreachs before {before:?}, after {after:?}",
        got.as_ref().map(Vec::len),
        t.elapsed()
    );
    let got = got.unwrap_or_else(|e| panic!("the transfer failed: {e} (a PMTU black hole?)"));
    assert_eq!(got.len(), REPLY, "the whole reply arrived");
    let served = usize::from(got[1] - b'0');
    assert!(icmp >= 1, "the router's ICMP error was steered");
    assert!(
        after[served] > before[served],
        "the ICMP reached the instance that served the connection ({served})"
    );
    let other = 1 - served;
    assert_eq!(after[other], before[other], "and not the other one");
    // What it learned: the path's MTU, towards the client.
    let route = std::process::Command::new("ip")
        .args([
            "-n",
            &tb.instances[served].netns,
            "route",
            "get",
            "198.18.3.2",
        ])
        .output()
        .expect("ip");
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains("mtu 1280"), "no path MTU learned: {route}");
    block_on(async {});
    agent.stop().expect("detach");
}
