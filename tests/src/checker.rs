//! A tag checker for a [`ClusterBed`]: a fixed set of workload tags sent
//! through every host every 100 ms, each datagram recorded by the instance
//! that gets it. From the records: split sessions (a tag answered by two
//! instances within one second, or within one round through different
//! hosts), and queries lost after a given time.
//!
//! "Through every host": the router sends a datagram from client port
//! `PORT_BASE + k` to host `k` (a policy rule on the source port), whatever
//! its ECMP hash says, so each tag enters every host each round.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{cluster::ClusterBed, netns, process};

/// Client port of the datagrams sent through host `k`: `PORT_BASE + k`.
pub const PORT_BASE: u16 = 45_000;
/// Time between rounds.
pub const ROUND: Duration = Duration::from_millis(100);
/// Rounds per split-session window (1 s).
pub const ROUNDS_PER_WINDOW: u32 = 10;
/// Bytes of tag at the start of each datagram (the service's
/// `tag = { kind = "udp-payload", offset = 0, length = 8 }`).
pub const TAG_LEN: usize = 8;

/// The tag bytes of tag number `t`.
#[must_use]
pub fn tag(t: u16) -> [u8; TAG_LEN] {
    let mut b = *b"tag00000";
    for (i, d) in format!("{t:05}").bytes().enumerate() {
        b[3 + i] = d;
    }
    b
}

/// One datagram as an instance got it.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub round: u32,
    /// The host it was sent through.
    pub host: u8,
    pub tag: u16,
    /// Index of the instance in `bed.all_instances()`.
    pub instance: usize,
}

/// Routes client port `PORT_BASE + k` to host `k` on the bed's router
/// (tables `100 + k`), for the IPv4 VIPs.
pub fn route_by_port(bed: &ClusterBed, hosts: usize) {
    let r = &bed.router.0;
    for k in 0..hosts {
        let table = (100 + k).to_string();
        let port = (PORT_BASE + u16::try_from(k).expect("few hosts")).to_string();
        let via = format!("198.18.{}.1", 2 + k);
        let dev = format!("rh{k}");
        process::ip(&[
            "-n",
            r,
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            &via,
            "dev",
            &dev,
            "table",
            &table,
        ]);
        process::ip(&[
            "-n", r, "rule", "add", "sport", &port, "lookup", &table, "priority", &table,
        ]);
    }
}

/// The servers (one per instance, bound to the VIP) and the sender.
pub struct TagChecker {
    stop: Arc<AtomicBool>,
    start: Instant,
    rounds_sent: Arc<AtomicU64>,
    /// Per instance: most datagrams a second its server reads (0: all).
    pub throttle: Vec<Arc<AtomicU64>>,
    sender: JoinHandle<()>,
    servers: Vec<JoinHandle<()>>,
    records: Arc<Mutex<Vec<Record>>>,
    serving: Arc<AtomicBool>,
    tags: u16,
    hosts: usize,
}

fn parse(b: &[u8]) -> Option<(u16, u8, u32)> {
    let t = std::str::from_utf8(b.get(3..TAG_LEN)?).ok()?.parse().ok()?;
    let host = *b.get(TAG_LEN)?;
    let round = u32::from_be_bytes(b.get(TAG_LEN + 1..TAG_LEN + 5)?.try_into().ok()?);
    Some((t, host, round))
}

fn serve(
    sock: &UdpSocket,
    instance: usize,
    until: Instant,
    serving: &AtomicBool,
    limit: &AtomicU64,
    records: &Mutex<Vec<Record>>,
) {
    let mut buf = [0u8; 256];
    let mut next = Instant::now();
    while serving.load(Ordering::Relaxed) && Instant::now() < until {
        let pps = limit.load(Ordering::Relaxed);
        if pps > 0 {
            // A slow instance: its socket queue fills and drops.
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            #[expect(clippy::cast_precision_loss, reason = "a rate")]
            let gap = Duration::from_secs_f64(1.0 / pps as f64);
            next = next.max(now) + gap;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && let Some((tag, host, round)) = parse(&buf[..n])
        {
            records.lock().expect("records").push(Record {
                round,
                host,
                tag,
                instance,
            });
        }
    }
}

/// A small receive buffer: a throttled server drops within a second, and
/// its agent sees it overloaded.
fn set_rcvbuf(sock: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt with a valid int option on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            u32::try_from(size_of::<i32>()).expect("small"),
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

impl TagChecker {
    /// Binds a server for `vip:port` in every instance of the bed, then
    /// sends tags `0..tags` through each of `hosts` hosts every
    /// [`ROUND`], for at most `max_rounds` rounds or until
    /// [`Self::finish`]. Call [`route_by_port`] first.
    #[must_use]
    pub fn start(bed: &ClusterBed, hosts: usize, tags: u16, vip: IpAddr, max_rounds: u32) -> Self {
        let dst = SocketAddr::new(vip, 7000);
        let records = Arc::new(Mutex::new(Vec::new()));
        let serving = Arc::new(AtomicBool::new(true));
        // Servers stop on their own a while after the last round, should
        // the test panic before `finish`.
        let until = Instant::now() + ROUND * max_rounds + Duration::from_secs(10);
        let mut throttle = Vec::new();
        let servers = bed
            .all_instances()
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let sock = netns::run_in(ns, || UdpSocket::bind(dst))
                    .unwrap_or_else(|e| panic!("binding {dst} in {ns}: {e}"));
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                set_rcvbuf(&sock, 64 << 10);
                let limit = Arc::new(AtomicU64::new(0));
                throttle.push(limit.clone());
                let (serving, records) = (serving.clone(), records.clone());
                std::thread::spawn(move || serve(&sock, i, until, &serving, &limit, &records))
            })
            .collect();
        let socks: Vec<UdpSocket> = netns::run_in(&bed.client.0, || {
            (0..hosts)
                .map(|k| {
                    let port = PORT_BASE + u16::try_from(k).expect("few hosts");
                    UdpSocket::bind(("0.0.0.0", port)).expect("client socket")
                })
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let rounds_sent = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let sender = {
            let (stop, rounds_sent) = (stop.clone(), rounds_sent.clone());
            std::thread::spawn(move || {
                for round in 0..max_rounds {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let at = start + ROUND * round;
                    if let Some(d) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    for (k, s) in socks.iter().enumerate() {
                        for t in 0..tags {
                            let mut p = tag(t).to_vec();
                            p.push(u8::try_from(k).expect("few hosts"));
                            p.extend_from_slice(&round.to_be_bytes());
                            // A send error is a lost query, as a drop is.
                            let _ = s.send_to(&p, dst);
                        }
                    }
                    rounds_sent.store(u64::from(round) + 1, Ordering::Relaxed);
                }
            })
        };
        Self {
            stop,
            start,
            rounds_sent,
            throttle,
            sender,
            servers,
            records,
            serving,
            tags,
            hosts,
        }
    }

    /// The round being sent now (rounds are [`ROUND`] apart from the
    /// start).
    #[must_use]
    pub fn round_now(&self) -> u32 {
        u32::try_from(self.start.elapsed().as_millis() / ROUND.as_millis()).expect("short test")
    }

    /// Stops sending, gives the last datagrams half a second to arrive,
    /// stops the servers and analyses what they got; queries sent from
    /// round `after` on count as "after healing".
    #[must_use]
    pub fn finish(self, after: u32) -> Figures {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.join().expect("sender");
        std::thread::sleep(Duration::from_millis(500));
        self.serving.store(false, Ordering::Relaxed);
        for s in self.servers {
            s.join().expect("server");
        }
        let rounds = u32::try_from(self.rounds_sent.load(Ordering::Relaxed)).expect("few");
        let records = std::mem::take(&mut *self.records.lock().expect("records"));
        Figures::of(&records, self.tags, self.hosts, rounds, after)
    }
}

/// What the checker measured.
#[derive(Debug)]
pub struct Figures {
    pub sent: u64,
    pub received: u64,
    /// (tag, 1 s window) pairs in which the tag reached two or more
    /// instances: split-session tag-seconds, coarse (a legitimate move
    /// inside a window counts one).
    pub split_tag_seconds: u32,
    /// Tags that were split in some window.
    pub split_tags: u32,
    /// (tag, round) pairs in which the tag reached two or more instances
    /// through different hosts in the same round: two deliverers at once,
    /// to the round (a move, which every host follows within
    /// milliseconds, makes at most one).
    pub split_rounds: u32,
    /// The longest run of consecutive split rounds of one tag.
    pub longest_split_rounds: u32,
    /// Queries sent from round `after` on that no instance got.
    pub lost_after: u64,
    /// Of those, per host they were sent through.
    pub lost_after_by_host: Vec<u64>,
    /// Queries sent from round `after` on.
    pub sent_after: u64,
    /// Queries lost before round `after` (during the fault).
    pub lost_before: u64,
}

/// Per tag, the count of keys in `sets` (by (tag, bucket)) with two or
/// more instances, and the longest run of consecutive such buckets.
fn splits(sets: &BTreeMap<(u16, u32), BTreeSet<usize>>, tag: u16, buckets: u32) -> (u32, u32) {
    let (mut count, mut run, mut longest) = (0, 0, 0);
    for b in 0..buckets {
        if sets.get(&(tag, b)).is_some_and(|s| s.len() > 1) {
            count += 1;
            run += 1;
            longest = u32::max(longest, run);
        } else {
            run = 0;
        }
    }
    (count, longest)
}

impl Figures {
    fn of(records: &[Record], tags: u16, hosts: usize, rounds: u32, after: u32) -> Self {
        let mut by_window: BTreeMap<(u16, u32), BTreeSet<usize>> = BTreeMap::new();
        let mut by_round: BTreeMap<(u16, u32), BTreeSet<usize>> = BTreeMap::new();
        let mut got = HashSet::new();
        for r in records {
            by_window
                .entry((r.tag, r.round / ROUNDS_PER_WINDOW))
                .or_default()
                .insert(r.instance);
            by_round
                .entry((r.tag, r.round))
                .or_default()
                .insert(r.instance);
            got.insert((r.round, r.host, r.tag));
        }
        let (mut split_tag_seconds, mut split_tags) = (0, 0);
        let (mut split_rounds, mut longest_split_rounds) = (0, 0);
        for t in 0..tags {
            let (n, _) = splits(&by_window, t, rounds.div_ceil(ROUNDS_PER_WINDOW));
            split_tag_seconds += n;
            split_tags += u32::from(n > 0);
            let (n, longest) = splits(&by_round, t, rounds);
            split_rounds += n;
            longest_split_rounds = longest_split_rounds.max(longest);
        }
        let mut lost_after_by_host = vec![0; hosts];
        let (mut lost_before, mut sent_after) = (0, 0);
        for round in 0..rounds {
            for (k, lost) in lost_after_by_host.iter_mut().enumerate() {
                let host = u8::try_from(k).expect("few hosts");
                for t in 0..tags {
                    let missing = !got.contains(&(round, host, t));
                    if round >= after {
                        sent_after += 1;
                        *lost += u64::from(missing);
                    } else {
                        lost_before += u64::from(missing);
                    }
                }
            }
        }
        Self {
            sent: u64::from(rounds) * u64::from(tags) * hosts as u64,
            received: got.len() as u64,
            split_tag_seconds,
            split_tags,
            split_rounds,
            longest_split_rounds,
            lost_after: lost_after_by_host.iter().sum(),
            lost_after_by_host,
            sent_after,
            lost_before,
        }
    }
}
