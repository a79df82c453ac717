//! The coordination store's backends against a real etcd server: the same
//! contract as the embedded store, contention between clients, host leases,
//! cluster-wide instance ids, service definitions that must match, and an
//! etcd outage.
//!
//! Each test makes a namespace of its own with one address on its
//! loopback, runs etcd there, and runs its clients on a thread inside it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice::{
    control::fence::{Fence, FenceState},
    coord::{
        CoordError, CoordStore, EmbeddedStore, EtcdOptions, EtcdStore, Event, HostRecord, Load,
        Membership as _, check_partition,
    },
    plan::Group,
};
use sluice_tests::{etcd::Etcd, netns};
use tokio_stream::StreamExt as _;

/// A namespace with etcd in it; `run` runs a test body inside it.
struct Site {
    etcd: Etcd,
    ns: sluice_tests::process::Netns,
}

fn site(tag: &str, last_octet: u8) -> Site {
    let addr: IpAddr = format!("198.18.250.{last_octet}").parse().unwrap();
    let ns = sluice_tests::etcd::netns_with(tag, addr);
    let etcd = Etcd::start(&ns.0, addr);
    Site { etcd, ns }
}

impl Site {
    /// Client options; a generous timeout: a loaded CI machine's etcd
    /// (fsync on every write) can take over a second to answer.
    fn options(&self, cluster: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![self.etcd.endpoint()],
            cluster: cluster.to_owned(),
            timeout: Duration::from_secs(5),
        }
    }

    /// Runs `f` on a runtime of its own on a thread inside the namespace:
    /// every connection the clients make (also reconnections) is made there.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::spawn_in(&self.ns.0, f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` instances' share of the units, as a config's start gives them.
fn even(n: usize) -> Vec<(Group, String)> {
    sluice::plan::group::even(n)
        .into_iter()
        .enumerate()
        .flat_map(|(i, gs)| gs.into_iter().map(move |g| (g, format!("i{i}"))))
        .collect()
}

/// What every backend must do: the embedded store's behaviour is the
/// reference.
async fn contract(s: &dyn CoordStore) {
    let mut events = s.watch();
    assert!(matches!(
        s.groups("kv").await,
        Err(CoordError::UnknownService { .. })
    ));
    assert!(s.init("kv", &even(2)).await.unwrap());
    assert!(
        !s.init("kv", &even(3)).await.unwrap(),
        "init keeps an existing assignment"
    );
    let heard = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5 s");
    assert_eq!(
        heard,
        Some(Event::Assignment {
            service: "kv".into()
        })
    );

    let gs = s.groups("kv").await.unwrap();
    assert_eq!(gs.len(), 2);
    assert!(gs.windows(2).all(|w| w[0].group.base() < w[1].group.base()));
    let g = gs[0].clone();
    let v = s.move_group("kv", g.group, g.version, "i1").await.unwrap();
    let stale = s.move_group("kv", g.group, g.version, "i0").await;
    assert!(
        matches!(stale, Err(CoordError::Conflict { found: Some(f), .. }) if f == v),
        "{stale:?}"
    );
    assert_eq!(s.group_of("kv", 5).await.unwrap().owner, "i1");

    let [lo, hi] = s.split("kv", g.group, v).await.unwrap();
    assert!(matches!(
        s.split("kv", g.group, v).await,
        Err(CoordError::Conflict { found: None, .. })
    ));
    check_partition(s.groups("kv").await.unwrap().iter().map(|e| &e.group)).unwrap();
    let hi_v = s
        .move_group("kv", hi.group, hi.version, "i0")
        .await
        .unwrap();
    assert!(matches!(
        s.merge("kv", (lo.group, lo.version), (hi.group, hi_v))
            .await,
        Err(CoordError::DifferentOwners { .. })
    ));
    let far = s.groups("kv").await.unwrap()[2].clone();
    assert!(matches!(
        s.merge("kv", (lo.group, lo.version), (far.group, far.version))
            .await,
        Err(CoordError::NotBuddies { .. })
    ));
    let hi_v = s.move_group("kv", hi.group, hi_v, "i1").await.unwrap();
    let m = s
        .merge("kv", (lo.group, lo.version), (hi.group, hi_v))
        .await
        .unwrap();
    assert_eq!(m.group, g.group);
    assert_eq!(m.owner, "i1");
    // Every version handed out is new: none of the earlier ones matches.
    assert!(
        [g.version, v, lo.version, hi.version, hi_v]
            .iter()
            .all(|&old| old < m.version)
    );

    contract_limits(s, m.version).await;
}

/// The contract's edges: a single unit, a non-partition, a reset, loads.
async fn contract_limits(s: &dyn CoordStore, last_version: u64) {
    let unit: Group = "0x0000/16".parse().unwrap();
    let mut at = s.groups("kv").await.unwrap()[0].clone();
    while at.group.prefix_len() < 16 {
        at = s.split("kv", at.group, at.version).await.unwrap()[0].clone();
    }
    assert_eq!(at.group, unit);
    assert!(matches!(
        s.split("kv", at.group, at.version).await,
        Err(CoordError::Indivisible { .. })
    ));

    let half: Group = "0x8000/1".parse().unwrap();
    assert!(matches!(
        s.init("other", &[(half, "a".into())]).await,
        Err(CoordError::NotAPartition { .. })
    ));
    s.reset("kv", &even(4)).await.unwrap();
    let after = s.groups("kv").await.unwrap();
    assert_eq!(after.len(), 4);
    assert!(
        after.iter().all(|e| e.version > last_version),
        "a reset does not reuse versions"
    );

    s.publish_load(
        "i0",
        Load {
            utilisation: 0.5,
            rate_pps: 10.0,
            ..Load::default()
        },
    )
    .await
    .unwrap();
    s.publish_load(
        "i1",
        Load {
            utilisation: 0.25,
            rate_pps: 5.0,
            ..Load::default()
        },
    )
    .await
    .unwrap();
    let loads = s.loads().await.unwrap();
    assert_eq!(loads.len(), 2);
    assert!((loads["i0"].utilisation - 0.5).abs() < f64::EPSILON);
}

#[test]
fn both_backends_keep_the_store_contract() {
    rt().block_on(contract(&EmbeddedStore::in_memory()));
    let site = site("coord-contract", 1);
    let opts = site.options("contract");
    site.run(move || {
        rt().block_on(async {
            let s = EtcdStore::connect(&opts).await.unwrap();
            contract(&s).await;
        });
    });
}

/// Three clients (as three hosts' agents), each with four tasks moving,
/// splitting and merging random groups of one service at once. Every
/// change either lands whole or is refused; afterwards the groups still
/// partition the units, and each client reads the same assignment.
#[test]
fn concurrent_changes_from_three_hosts_keep_one_owner_per_unit() {
    let site = site("coord-contend", 2);
    let opts = site.options("contend");
    let (landed, refused) = site.run(move || {
        rt().block_on(async {
            let first = EtcdStore::connect(&opts).await.unwrap();
            first.init("kv", &even(4)).await.unwrap();
            let mut clients = vec![Arc::new(first)];
            for _ in 0..2 {
                clients.push(Arc::new(EtcdStore::connect(&opts).await.unwrap()));
            }
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut tasks = Vec::new();
            for (c, client) in clients.iter().enumerate() {
                for t in 0..4u64 {
                    let s = client.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut seed = (c as u64 + 1) * 1000 + t;
                        let mut rand = move || {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            usize::try_from(seed % 1_000_003).expect("small")
                        };
                        let (mut landed, mut refused) = (0u32, 0u32);
                        while Instant::now() < deadline {
                            let gs = s.groups("kv").await.unwrap();
                            let e = &gs[rand() % gs.len()];
                            let r = match rand() % 3 {
                                0 if e.group.prefix_len() < 6 => {
                                    s.split("kv", e.group, e.version).await.map(|_| ())
                                }
                                1 => {
                                    let buddy = e
                                        .group
                                        .buddy()
                                        .and_then(|b| gs.iter().find(|x| x.group == b));
                                    match buddy {
                                        Some(b) if b.owner == e.owner => s
                                            .merge("kv", (e.group, e.version), (b.group, b.version))
                                            .await
                                            .map(|_| ()),
                                        _ => continue,
                                    }
                                }
                                _ => {
                                    let to = format!("i{}", rand() % 4);
                                    s.move_group("kv", e.group, e.version, &to)
                                        .await
                                        .map(|_| ())
                                }
                            };
                            match r {
                                Ok(()) => landed += 1,
                                Err(CoordError::Conflict { .. } | CoordError::Contended { .. }) => {
                                    refused += 1;
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                        (landed, refused)
                    }));
                }
            }
            let (mut landed, mut refused) = (0, 0);
            for t in tasks {
                let (l, r) = t.await.unwrap();
                landed += l;
                refused += r;
            }
            let seen: Vec<_> = futures_all(&clients).await;
            check_partition(seen[0].iter().map(|e| &e.group)).unwrap();
            assert!(
                seen.iter().all(|s| *s == seen[0]),
                "every client reads the same assignment"
            );
            (landed, refused)
        })
    });
    eprintln!("concurrent changes: {landed} landed, {refused} refused as stale");
    assert!(landed > 20, "the clients made progress: {landed}");
    assert!(refused > 0, "the clients contended: nothing was refused");
}

async fn futures_all(clients: &[Arc<EtcdStore>]) -> Vec<Vec<sluice::coord::GroupEntry>> {
    let mut out = Vec::new();
    for c in clients {
        out.push(c.groups("kv").await.unwrap());
    }
    out
}

fn host(name: &str, last: u8) -> HostRecord {
    HostRecord {
        name: name.to_owned(),
        underlay: format!("198.18.1.{last}").parse().unwrap(),
        instances: vec![format!("{name}-a")],
    }
}

/// A host is live while its agent renews its lease: a second agent with the
/// same host name is refused, a restarted one takes the lease over, and a
/// host whose agent stopped renewing vanishes (with its loads) after the
/// lease's time.
#[test]
fn a_host_lives_by_its_lease() {
    let site = site("coord-lease", 3);
    let opts = site.options("lease");
    let dir = tempfile::tempdir().unwrap();
    let lease_file = dir.path().join("a.lease");
    let other_file = dir.path().join("other.lease");
    let gone_after = site.run(move || {
        rt().block_on(async {
            let ttl = Duration::from_secs(2);
            let a = EtcdStore::connect(&opts).await.unwrap();
            a.join(&host("a", 1), ttl, &lease_file).await.unwrap();
            a.publish_load(
                "a-a",
                Load {
                    utilisation: 0.1,
                    rate_pps: 1.0,
                    ..Load::default()
                },
            )
            .await
            .unwrap();
            let b = EtcdStore::connect(&opts).await.unwrap();
            b.join(&host("b", 2), ttl, &dir.path().join("b.lease"))
                .await
                .unwrap();

            // Another agent calling itself `a` is refused.
            let twin = EtcdStore::connect(&opts).await.unwrap();
            let e = twin
                .join(&host("a", 9), ttl, &other_file)
                .await
                .unwrap_err();
            assert!(matches!(e, CoordError::HostTaken { .. }), "{e}");
            assert!(e.to_string().contains("cluster.host"), "{e}");

            // Held alive past its time by the renewals.
            tokio::time::sleep(ttl * 2).await;
            let hosts = b.hosts().await.unwrap();
            assert_eq!(hosts.keys().collect::<Vec<_>>(), ["a", "b"]);
            assert_eq!(hosts["a"], host("a", 1));

            // A restart: the new agent of `a` takes the lease over.
            drop(a);
            let a = EtcdStore::connect(&opts).await.unwrap();
            a.join(&host("a", 1), ttl, &lease_file).await.unwrap();
            tokio::time::sleep(ttl * 2).await;
            assert!(
                b.hosts().await.unwrap().contains_key("a"),
                "the restarted agent kept `a` live"
            );

            // The lease ends under a running agent (as when etcd lost it
            // for longer than its time): the agent joins again, anew.
            let id: i64 = std::fs::read_to_string(&lease_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let mut raw = etcd_client::Client::connect(&opts.endpoints, None)
                .await
                .unwrap();
            raw.lease_revoke(id).await.unwrap();
            assert!(!b.hosts().await.unwrap().contains_key("a"), "revoked: gone");
            let t = Instant::now();
            while !b.hosts().await.unwrap().contains_key("a") {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "`a` never joined again"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let new_id: i64 = std::fs::read_to_string(&lease_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_ne!(new_id, id, "under a new lease");

            // `a` stops renewing: gone within the lease's time (and etcd's
            // expiry sweep), its load with it.
            drop(a);
            let t = Instant::now();
            while b.hosts().await.unwrap().contains_key("a") {
                assert!(t.elapsed() < Duration::from_secs(10), "`a` never expired");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let gone_after = t.elapsed();
            assert!(!b.loads().await.unwrap().contains_key("a-a"));
            assert!(b.hosts().await.unwrap().contains_key("b"));

            // Leaving revokes at once.
            b.leave().await.unwrap();
            assert!(!twin.hosts().await.unwrap().contains_key("b"));
            gone_after
        })
    });
    eprintln!("a host whose agent stopped was gone after {gone_after:?} (lease 2 s)");
}

/// Defect: a restarted agent whose host's lease was in its last second
/// (etcd gives the time left in whole seconds, rounded down: 0) took it
/// for gone, asked for a new lease, and was refused as a second agent of
/// its host, since the old lease still held the host's record. Found by
/// the fault test restarting an agent 3.5 s into a 5 s lease on a loaded
/// machine. The restart takes the lease over, as in any other second.
#[test]
fn a_restart_in_the_leases_last_second_takes_it_over() {
    let site = site("coord-last", 43);
    let opts = site.options("last");
    let dir = tempfile::tempdir().unwrap();
    let lease_file = dir.path().join("a.lease");
    site.run(move || {
        rt().block_on(async {
            let ttl = Duration::from_secs(2);
            let a = EtcdStore::connect(&opts).await.unwrap();
            a.join(&host("a", 1), ttl, &lease_file).await.unwrap();
            let id: i64 = std::fs::read_to_string(&lease_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // The agent dies: nothing renews the lease from here.
            drop(a);
            let mut raw = etcd_client::Client::connect(&opts.endpoints, None)
                .await
                .unwrap();
            let t = Instant::now();
            while raw.lease_time_to_live(id, None).await.unwrap().ttl() > 0 {
                assert!(
                    t.elapsed() < ttl * 2,
                    "the lease never got to its last second"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let a = EtcdStore::connect(&opts).await.unwrap();
            a.join(&host("a", 1), ttl, &lease_file)
                .await
                .expect("a restart in the lease's last second joins");
            let again: i64 = std::fs::read_to_string(&lease_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(again, id, "the lease was taken over, not replaced");
            tokio::time::sleep(ttl * 2).await;
            assert!(
                a.hosts().await.unwrap().contains_key("a"),
                "the restarted agent kept `a` live"
            );
        });
    });
}

/// Ids are the cluster's: two hosts registering at once never share one,
/// and a name keeps its id when it registers again (also from another host).
#[test]
fn instance_ids_are_cluster_wide_and_stable() {
    let site = site("coord-ids", 4);
    let opts = site.options("ids");
    site.run(move || {
        rt().block_on(async {
            let a = Arc::new(EtcdStore::connect(&opts).await.unwrap());
            let b = Arc::new(EtcdStore::connect(&opts).await.unwrap());
            let names_a: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
            let names_b: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
            let (ra, rb) = tokio::join!(
                {
                    let a = a.clone();
                    let n = names_a.clone();
                    async move {
                        let refs: Vec<(&str, &str)> =
                            n.iter().map(|n| (n.as_str(), "kv")).collect();
                        a.register_instances("ha", &refs).await.unwrap()
                    }
                },
                {
                    let b = b.clone();
                    let n = names_b.clone();
                    async move {
                        let refs: Vec<(&str, &str)> =
                            n.iter().map(|n| (n.as_str(), "kv")).collect();
                        b.register_instances("hb", &refs).await.unwrap()
                    }
                }
            );
            let mut all: Vec<u32> = ra.iter().chain(&rb).copied().collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(
                all,
                (1..=40).collect::<Vec<_>>(),
                "40 distinct ids, the lowest free"
            );
            let again = b
                .register_instances("hb", &[("a3", "kv"), ("b7", "kv")])
                .await
                .unwrap();
            assert_eq!(again, vec![ra[3], rb[7]]);
            let reg = a.instances().await.unwrap();
            assert_eq!(reg["a3"].host, "hb", "a3 now runs on hb");
            assert_eq!(reg["a3"].id, ra[3]);
        });
    });
}

/// The first host stores a service's definition; a host that defines it
/// differently is refused, with the fields that differ.
#[test]
fn a_service_defined_differently_on_another_host_is_refused() {
    let site = site("coord-spec", 5);
    let opts = site.options("spec");
    site.run(move || {
        rt().block_on(async {
            let s = EtcdStore::connect(&opts).await.unwrap();
            let spec = |port: u16| {
                serde_json::json!({"vips": ["198.18.0.1"], "ports": [port], "protocols": ["udp"]})
            };
            s.check_services("a", &[("kv".into(), spec(7000))]).await.unwrap();
            s.check_services("b", &[("kv".into(), spec(7000))]).await.unwrap();
            let e = s
                .check_services("c", &[("kv".into(), spec(7001))])
                .await
                .unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, CoordError::ServiceMismatch { .. }), "{text}");
            assert!(
                text.contains("ports: cluster has [7000], this host [7001]") && text.contains("host `a`"),
                "{text}"
            );
        });
    });
}

/// etcd out of reach: every call fails within the timeout with an error
/// that names etcd (the control loop then skips the interval), and the
/// watch says changes may have been missed; etcd back: calls work again
/// and the watch hears changes.
#[test]
fn an_etcd_outage_fails_calls_quickly_and_the_store_recovers() {
    let mut site = site("coord-outage", 6);
    // The agent's default: an unreachable etcd fails calls this fast.
    let opts = EtcdOptions {
        timeout: Duration::from_secs(1),
        ..site.options("outage")
    };
    let rt_thread = {
        let (to_test, from_store) = std::sync::mpsc::channel::<&'static str>();
        let (to_store, from_test) = std::sync::mpsc::channel::<()>();
        let handle = netns::spawn_in(&site.ns.0, move || {
            rt().block_on(async {
                let s = EtcdStore::connect(&opts).await.unwrap();
                s.init("kv", &even(2)).await.unwrap();
                let mut events = s.watch();
                to_test.send("ready").unwrap();
                from_test.recv().unwrap(); // etcd is down now
                let t = Instant::now();
                let e = s.groups("kv").await.unwrap_err();
                let took = t.elapsed();
                assert!(matches!(e, CoordError::Etcd { .. }), "{e}");
                assert!(e.to_string().contains("cluster.etcd_endpoints"), "{e}");
                assert!(
                    took < Duration::from_secs(3),
                    "a call took {took:?} to fail"
                );
                to_test.send("failed").unwrap();
                from_test.recv().unwrap(); // etcd is back
                let t = Instant::now();
                let gs = loop {
                    match s.groups("kv").await {
                        Ok(gs) => break gs,
                        Err(_) if t.elapsed() < Duration::from_secs(15) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("etcd back, but: {e}"),
                    }
                };
                let mut heard = HashMap::new();
                s.move_group("kv", gs[0].group, gs[0].version, "i1")
                    .await
                    .unwrap();
                let t = Instant::now();
                while !heard.contains_key("assignment") {
                    assert!(
                        t.elapsed() < Duration::from_secs(10),
                        "the watch never came back: {heard:?}"
                    );
                    if let Ok(Some(ev)) =
                        tokio::time::timeout(Duration::from_secs(1), events.next()).await
                    {
                        let k = match ev {
                            Event::Lagged => "lagged",
                            Event::Assignment { .. } => "assignment",
                        };
                        *heard.entry(k).or_insert(0) += 1;
                    } else if !heard.contains_key("assignment") {
                        // The watch may be re-established after the move:
                        // move again so it has something to hear.
                        let gs = s.groups("kv").await.unwrap();
                        s.move_group("kv", gs[0].group, gs[0].version, "i0")
                            .await
                            .unwrap();
                    }
                }
                assert!(
                    heard.contains_key("lagged"),
                    "watchers were told to read again: {heard:?}"
                );
            });
        });
        assert_eq!(from_store.recv().unwrap(), "ready");
        site.etcd.stop();
        to_store.send(()).unwrap();
        assert_eq!(from_store.recv().unwrap(), "failed");
        site.etcd.restart();
        to_store.send(()).unwrap();
        handle
    };
    rt_thread
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
}

/// A TCP relay to etcd that can be cut (every connection closed, new ones
/// refused at once) and healed: a partition between one client and etcd,
/// while other clients reach etcd directly.
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    /// Listens on `addr` (a free port) and relays to `to`. Its threads are
    /// made by the calling thread, so they share its network namespace.
    fn start(addr: IpAddr, to: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((addr, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            // Ends with the test process; every stream it holds is closed
            // on a cut.
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let mut held = o.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A host cut off from etcd for longer than its lease: its fence (fed by
/// the keeper's renewals) closes before the lease expires, then the host
/// vanishes; once etcd is back in reach, the agent finds its lease gone
/// (the keep-alive call itself fails with "lease not found"), takes a new
/// one, is live again, and its fence hears of the rejoin.
#[test]
fn a_host_cut_off_past_its_lease_joins_again_once_healed() {
    let site = site("coord-rejoin", 7);
    let opts = site.options("rejoin");
    let etcd_addr: std::net::SocketAddr = opts.endpoints[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lease_file = dir.path().join("a.lease");
    let back_after = site.run(move || {
        let relay = Relay::start(etcd_addr.ip(), etcd_addr);
        let relayed = EtcdOptions {
            endpoints: vec![format!("http://{}:{}", etcd_addr.ip(), relay.port)],
            timeout: Duration::from_secs(1),
            ..opts.clone()
        };
        rt().block_on(async {
            let ttl = Duration::from_secs(2);
            let a = EtcdStore::connect(&relayed).await.unwrap();
            a.join(&host("a", 1), ttl, &lease_file).await.unwrap();
            let b = EtcdStore::connect(&opts).await.unwrap();
            assert!(b.hosts().await.unwrap().contains_key("a"));
            // The keeper's renewals, as the agent's fence hears them.
            let lease = a.lease_state().expect("etcd has a lease to watch");
            let first = lease.borrow().renewed;
            tokio::time::sleep(ttl / 2).await;
            assert!(
                lease.borrow().renewed > first,
                "renewed within T/2 (every T/10)"
            );

            relay.cut();
            let cut = Instant::now();
            let mut fence = Fence::new(ttl, lease.borrow().renewed);
            fence.set_peers(1);
            let t = Instant::now();
            while b.hosts().await.unwrap().contains_key("a") {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "`a` cut off, but its lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Fenced before the others could see its lease gone: no unit
            // had two deliverers.
            let expired = Instant::now();
            fence.renewed(lease.borrow().renewed);
            let deadline = fence.deadline().expect("a peer: a deadline");
            assert!(
                deadline < expired && deadline <= cut + Fence::reach(ttl),
                "fence at {:?} after the cut, lease gone by {:?}",
                deadline - cut,
                expired - cut
            );
            assert_eq!(fence.state(expired), FenceState::Fenced);
            // Past its lease, out of reach a while longer.
            tokio::time::sleep(ttl).await;
            relay.heal();
            let t = Instant::now();
            while !b.hosts().await.unwrap().contains_key("a") {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "`a` never joined again after the partition healed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let back = t.elapsed();
            // The agent hears of the new lease (it re-reads its tables,
            // then lifts the fence).
            let state = *lease.borrow();
            assert_eq!(state.joins, 1, "one rejoin: {state:?}");
            assert_eq!(state.lost, None);
            fence.rejoined(state.renewed);
            assert_eq!(fence.state(Instant::now()), FenceState::Renewing);
            back
        })
    });
    eprintln!("a host cut off past its lease (2 s) was live again {back_after:?} after the heal");
}

/// D4: an instance name registered to another live host is refused, naming
/// that host, and nothing of the refused registration stays; once that
/// host is gone, the instance moves over with its id.
#[test]
fn an_instance_name_live_on_another_host_is_refused() {
    let site = site("coord-dup", 7);
    let opts = site.options("dup");
    let dir = tempfile::tempdir().unwrap();
    site.run(move || {
        rt().block_on(async {
            let ttl = Duration::from_secs(2);
            let a = EtcdStore::connect(&opts).await.unwrap();
            a.join(&host("a", 1), ttl, &dir.path().join("a.lease"))
                .await
                .unwrap();
            let ids_a = a.register_instances("a", &[("a0", "kv")]).await.unwrap();
            let b = EtcdStore::connect(&opts).await.unwrap();
            b.join(&host("b", 2), ttl, &dir.path().join("b.lease"))
                .await
                .unwrap();
            let e = b
                .register_instances("b", &[("b0", "kv"), ("a0", "kv")])
                .await
                .unwrap_err();
            assert!(
                matches!(e, CoordError::InstanceTaken { ref instance, ref host } if instance == "a0" && host == "a"),
                "{e}"
            );
            let reg = b.instances().await.unwrap();
            assert_eq!(reg["a0"].host, "a", "a's instance stays a's");
            assert!(!reg.contains_key("b0"), "nothing half-applied: {reg:?}");

            // `a` is gone: a0 moves to b, keeping its id.
            a.leave().await.unwrap();
            let ids_b = b
                .register_instances("b", &[("b0", "kv"), ("a0", "kv")])
                .await
                .unwrap();
            assert_eq!(ids_b[1], ids_a[0]);
            assert_eq!(b.instances().await.unwrap()["a0"].host, "b");
        });
    });
}

/// The keys under `prefix` of the cluster `cluster` (raw, as etcd has them).
async fn raw_keys(endpoint: &str, cluster: &str, prefix: &str) -> Vec<String> {
    let mut raw = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let full = format!("/sluice/{cluster}/{prefix}");
    let resp = raw
        .get(
            full.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key())[full.len()..].to_owned())
        .collect()
}

/// D5: a host deletes the records (name, id, load) of the instances it
/// dropped, so a cluster registering and dropping instances for ever never
/// runs out of ids; a dead host's records are collected by the live hosts,
/// two collectors at once deleting each record once; the host record
/// follows the host's instances.
#[test]
fn records_of_dropped_instances_and_dead_hosts_are_deleted() {
    let site = site("coord-gc", 8);
    let opts = site.options("gc");
    let endpoint = site.etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    site.run(move || {
        rt().block_on(async {
            let ttl = Duration::from_secs(2);
            let a = Arc::new(EtcdStore::connect(&opts).await.unwrap());
            a.join(&host("a", 1), ttl, &dir.path().join("a.lease"))
                .await
                .unwrap();
            a.register_instances("a", &[("keep", "kv"), ("x", "kv")])
                .await
                .unwrap();
            a.publish_load("x", Load::default()).await.unwrap();
            assert_eq!(a.retire_instances("a", &["keep"]).await.unwrap(), ["x"]);
            assert_eq!(raw_keys(&endpoint, "gc", "instances/").await, ["keep"]);
            assert_eq!(raw_keys(&endpoint, "gc", "ids/").await, ["1"]);
            assert!(raw_keys(&endpoint, "gc", "load/").await.is_empty());

            // More instances over time than there are ids.
            for n in 0..=sluice_common::MAX_INSTANCES {
                let name = format!("x{n}");
                let ids = a
                    .register_instances("a", &[("keep", "kv"), (&name, "kv")])
                    .await
                    .unwrap_or_else(|e| panic!("instance {n}: {e}"));
                assert_eq!(ids, [1, 2], "instance {n}");
                a.retire_instances("a", &["keep"]).await.unwrap();
            }

            // The host record follows the host's instances.
            let mut rec = host("a", 1);
            rec.instances = vec!["keep".into()];
            a.update_host(&rec).await.unwrap();
            assert_eq!(a.hosts().await.unwrap()["a"], rec);

            // A dead host's records: not while it is live; then by two
            // collectors at once, each record deleted once.
            let c = EtcdStore::connect(&opts).await.unwrap();
            c.join(&host("c", 3), ttl, &dir.path().join("c.lease"))
                .await
                .unwrap();
            let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
            let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "kv")).collect();
            c.register_instances("c", &pairs).await.unwrap();
            assert!(a.collect_host("c").await.unwrap().is_empty(), "c is live");
            c.leave().await.unwrap();
            let b = Arc::new(EtcdStore::connect(&opts).await.unwrap());
            let (ga, gb) = tokio::join!(a.collect_host("c"), b.collect_host("c"));
            let mut all: Vec<String> = ga.unwrap().into_iter().chain(gb.unwrap()).collect();
            all.sort();
            let mut want = names.clone();
            want.sort();
            assert_eq!(all, want, "each record collected exactly once");
            assert_eq!(raw_keys(&endpoint, "gc", "instances/").await, ["keep"]);
            assert_eq!(raw_keys(&endpoint, "gc", "ids/").await, ["1"]);
        });
    });
}

/// Config of one UDP service `kv` with instances `kv-0..n`.
fn kv_config(n: usize) -> sluice::config::Config {
    use std::fmt::Write as _;
    let mut t = String::from(
        "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n",
    );
    for i in 0..n {
        let _ = write!(
            t,
            "\n[[service.instance]]\nname = \"kv-{i}\"\nveth = \"v{i}\"\n"
        );
    }
    sluice::config::Config::parse(&t, std::path::Path::new("test.toml")).unwrap()
}

/// The plan of `config`, without the host: instance `k` on ifindex `100 + k`.
fn kv_plan(config: &sluice::config::Config) -> sluice::plan::Plan {
    let mut k = 0u8;
    sluice::plan::Plan::build(config, |_, _| {
        k += 1;
        Ok::<_, std::convert::Infallible>(sluice::plan::Resolved {
            ifindex: 100 + u32::from(k),
            mac: [2, 0, 0, 0, 0, k],
            netns: None,
            netns_id: None,
        })
    })
    .unwrap_or_else(|e| match e {})
}

/// Defect D3 with etcd: a reload dropping an instance wrote the whole
/// assignment back with a plain put, reverting what another host moved
/// between the reload's settle and its commit.
#[test]
fn a_reload_keeps_another_host_s_move() {
    use sluice::control::Controller;
    let site = site("coord-settle", 41);
    let opts = site.options("settle");
    site.run(move || {
        rt().block_on(async {
            let a: Arc<dyn CoordStore> = Arc::new(EtcdStore::connect(&opts).await.unwrap());
            let b = EtcdStore::connect(&opts).await.unwrap();
            let cfg3 = kv_config(3);
            Controller::new(&cfg3, &mut kv_plan(&cfg3), a.clone())
                .await
                .unwrap();
            let cfg2 = kv_config(2);
            let mut two = kv_plan(&cfg2);
            let settled = Controller::settle(&cfg2, &mut two, &*a).await.unwrap();
            let g = b
                .groups("kv")
                .await
                .unwrap()
                .into_iter()
                .find(|e| e.owner == "kv-0")
                .unwrap();
            b.move_group("kv", g.group, g.version, "kv-1")
                .await
                .unwrap();
            Controller::commit(settled, &cfg2, &mut two, a.clone())
                .await
                .unwrap();
            let after = b.groups("kv").await.unwrap();
            assert_eq!(
                after.iter().find(|e| e.group == g.group).unwrap().owner,
                "kv-1",
                "the other host's move was reverted"
            );
            assert!(after.iter().all(|e| e.owner != "kv-2"));
        });
    });
}

/// Defect D3, versions: a key made anew (deleted by an operator) counted
/// versions from zero again, so a version an element still held could
/// match a new entry.
#[test]
fn versions_never_repeat_after_the_key_is_made_anew() {
    let site = site("coord-versions", 42);
    let opts = site.options("versions");
    site.run(move || {
        rt().block_on(async {
            let b = EtcdStore::connect(&opts).await.unwrap();
            assert!(b.init("kv", &even(2)).await.unwrap());
            let g = b.groups("kv").await.unwrap()[0].clone();
            b.split("kv", g.group, g.version).await.unwrap();
            let last = b
                .groups("kv")
                .await
                .unwrap()
                .iter()
                .map(|e| e.version)
                .max()
                .unwrap();
            let mut raw = etcd_client::Client::connect(&opts.endpoints, None)
                .await
                .unwrap();
            raw.delete("/sluice/versions/assign/kv", None)
                .await
                .unwrap();
            assert!(b.init("kv", &even(2)).await.unwrap());
            let fresh = b.groups("kv").await.unwrap();
            assert!(
                fresh.iter().all(|e| e.version > last),
                "versions repeat after the key was made anew: {fresh:?}, last {last}"
            );
        });
    });
}
