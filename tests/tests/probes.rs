//! Active probes (`[service.probe]`) on the namespace testbed: an
//! application that hangs with its socket still bound — which no passive
//! signal sees (something is bound, nothing is refused) — is failed by its
//! probe and its groups re-owned, and it comes back once it answers again.

use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sluice::{config::Config, coord::EmbeddedStore};
use sluice_tests::{
    block_on, netns,
    testbed::{self, Testbed},
    traffic::PacedSender,
};

const RATE: u64 = 2000;
const PORT: u16 = 7000;

/// An application in each instance's namespace on one UDP socket: it
/// answers `PING` with `PONG` and records every other datagram's sequence
/// number. Hung, it stops reading (its socket stays bound and fills), as a
/// process stuck in a deadlock.
struct Apps {
    stop: Arc<AtomicBool>,
    hung: Vec<Arc<AtomicBool>>,
    seqs: Arc<Mutex<HashSet<u64>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Apps {
    fn start(namespaces: &[String], addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seqs = Arc::new(Mutex::new(HashSet::new()));
        let mut hung = Vec::new();
        let handles = namespaces
            .iter()
            .map(|ns| {
                let sock = netns::run_in(ns, || UdpSocket::bind(addr))
                    .unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"));
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let h = Arc::new(AtomicBool::new(false));
                hung.push(h.clone());
                let (stop, seqs) = (stop.clone(), seqs.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if h.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        let Ok((n, from)) = sock.recv_from(&mut buf) else {
                            continue;
                        };
                        if &buf[..n] == b"PING" {
                            let _ = sock.send_to(b"PONG", from);
                        } else if n >= 8 {
                            let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                            seqs.lock().expect("seqs").insert(seq);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            hung,
            seqs,
            handles,
        }
    }
}

impl Drop for Apps {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// With the default passive health (`sockets`), a hung application keeps
/// its share of the traffic for good: something is bound, nothing is
/// refused. Its UDP probe fails `fall` times in a row, the instance is
/// failed and its groups re-owned; once it answers `rise` times it is
/// taken back after the hold-down.
#[test]
fn a_hung_application_is_failed_by_its_probe_and_taken_back() {
    let tb = Testbed::new("probe", 3).unwrap_or_else(|e| panic!("building the testbed: {e}"));
    let toml = format!(
        "[agent]\ninterval_ms = 200\nrecovery_hold_down_ms = 600\n\n\
         [[service]]\nname = \"kv\"\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"udp\"\n\
         wlm = {{ min_group_units = 256, underload = 0.0 }}\n\
         probe = {{ kind = \"udp\", send = \"PING\", expect = \"PONG\", interval_ms = 200, timeout_ms = 100, rise = 2, fall = 2 }}\n\n{}",
        tb.instances_toml(0, 3),
        vip = testbed::VIP_V4,
    );
    let config = Config::parse(&toml, Path::new("probe.toml")).expect("config");
    let mut agent = tb
        .start_agent(&config, Arc::new(EmbeddedStore::in_memory()))
        .unwrap_or_else(|e| panic!("starting the agent: {e:?}"));
    let dst = SocketAddr::new(testbed::VIP_V4.into(), PORT);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let apps = Apps::start(&ns, dst);
    let t0 = Instant::now();
    let sender = PacedSender::spawn(
        &tb.client,
        dst,
        300,
        RATE,
        Duration::from_secs(6),
        |_, seq| seq.to_be_bytes().to_vec(),
    );
    let (hang_at, answer_at) = (Duration::from_millis(1500), Duration::from_millis(3500));
    let (mut hung, mut answering) = (None, None);
    let mut last_tick = Instant::now();
    let mut failed_at = None;
    let mut recovered_at = None;
    let mut reason = None;
    while !sender.is_finished() {
        block_on(agent.process_punts());
        if last_tick.elapsed() >= agent.control.interval() {
            block_on(agent.tick()).expect("tick");
            last_tick = Instant::now();
            let failed = agent.control.is_failed("inst-1");
            if failed && failed_at.is_none() {
                failed_at = Some(t0.elapsed());
                reason = agent.control.failure_reason("inst-1");
            }
            if !failed && failed_at.is_some() && recovered_at.is_none() {
                recovered_at = Some(t0.elapsed());
            }
        }
        if hung.is_none() && t0.elapsed() >= hang_at {
            apps.hung[1].store(true, Ordering::Relaxed);
            hung = Some(t0.elapsed());
        }
        if answering.is_none() && t0.elapsed() >= answer_at {
            apps.hung[1].store(false, Ordering::Relaxed);
            answering = Some(t0.elapsed());
        }
        // Asleep in the runtime, not the thread: the probe tasks run on it
        // (the test's runtime has one thread, driven only in block_on).
        block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
    }
    let sent = sender.finish().expect("sender");
    std::thread::sleep(Duration::from_millis(300));
    let seqs = apps.seqs.lock().expect("seqs").clone();
    let lost: Vec<u64> = (0..sent).filter(|s| !seqs.contains(s)).collect();
    #[expect(clippy::cast_precision_loss, reason = "times")]
    let sent_at = |seq: u64| Duration::from_secs_f64(seq as f64 / RATE as f64);
    let (hung, answering) = (hung.expect("hung"), answering.expect("answering"));
    eprintln!(
        "inst-1 hung at {hung:?}, failed at {failed_at:?}; answering again at {answering:?}, taken back at {recovered_at:?}; sent {sent}, lost {} between {:?} and {:?}",
        lost.len(),
        lost.first().map(|s| sent_at(*s)),
        lost.last().map(|s| sent_at(*s)),
    );
    // As configured: a probe round (interval, then at most the timeout),
    // the control interval, the hold-down; and slack for a loaded machine.
    let round = Duration::from_millis(200 + 100);
    let (control, hold_down) = (Duration::from_millis(200), Duration::from_millis(600));
    let slack = Duration::from_millis(400);
    let failed = failed_at.expect("the hung application's instance was failed by its probe");
    assert_eq!(
        reason,
        Some("probe"),
        "failed for its probe (`sluice status` says why)"
    );
    let after = failed.checked_sub(hung).expect("failed after it hung");
    // `fall` (2) failed rounds, then the next control interval.
    assert!(
        after <= 2 * round + control + slack,
        "failed {after:?} after it hung"
    );
    let back = recovered_at.expect("taken back once it answered again");
    let after = back.checked_sub(answering).expect("back after it answered");
    assert!(
        after >= hold_down,
        "taken back {after:?} after it answered: before the hold-down"
    );
    // `rise` (2) good rounds, the hold-down, the next control interval.
    assert!(
        after <= 2 * round + hold_down + control + slack,
        "taken back {after:?} after it answered"
    );
    assert!(!agent.control.is_failed("inst-1"));
    assert_eq!(agent.control.failure_reason("inst-1"), None);
    agent.stop().expect("detach");
}
