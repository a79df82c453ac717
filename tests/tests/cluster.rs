//! `sluice run` with `cluster.store = "etcd"`: a real etcd started by the
//! test in the agent's namespace, on an address of the test's own. The
//! assignment lives in etcd (the CLI and etcd agree, a drain's moves land
//! there), a restarted agent takes its host's lease over and keeps its
//! instances' ids, and bad starts are refused with the reason: a service
//! defined differently in the cluster, an etcd that does not answer.

use std::{net::IpAddr, sync::Arc, time::Duration};

use sluice::coord::{CoordStore as _, EtcdOptions, EtcdStore, Membership as _};
use sluice_tests::{
    etcd::{ClientFuture, Etcd},
    process,
};

const ETCD_ADDR: &str = "198.18.250.20";

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(endpoint: &str, port: u16) -> String {
    format!(
        "[agent]\ninterval_ms = 200\nmax_moves_per_sec = 20\n\n\
         [cluster]\nstore = \"etcd\"\nhost = \"host-a\"\nunderlay = \"198.18.1.1\"\n\
         etcd_endpoints = [\"{endpoint}\"]\nname = \"t\"\nlease_ttl_secs = 2\n\n\
         [[service]]\nname = \"kv\"\nvip = \"198.18.1.100\"\nport = {port}\nprotocol = \"udp\"\n\
         wlm = {{ underload = 0.0 }}\n{}",
        process::instances_toml("kv", 2)
    )
}

/// Runs `f` with a client of the test's etcd, on a thread inside `ns`.
fn with_store<T: Send + 'static>(
    ns: &str,
    endpoint: &str,
    f: impl FnOnce(Arc<EtcdStore>) -> ClientFuture<T> + Send + 'static,
) -> T {
    let opts = EtcdOptions {
        endpoints: vec![endpoint.to_owned()],
        cluster: "t".into(),
        // Generous: a loaded CI machine's etcd can be slow to answer.
        timeout: Duration::from_secs(5),
    };
    sluice_tests::etcd::with_client(ns, opts, f)
}

/// (group, owner) lines of `sluice groups kv`.
fn cli_groups(sock: &str) -> Vec<(String, String)> {
    let out = process::sluice(&["groups", "kv", "--api-socket", sock]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

fn etcd_groups(ns: &str, endpoint: &str) -> Vec<(String, String)> {
    with_store(ns, endpoint, |s| {
        Box::pin(async move {
            s.groups("kv")
                .await
                .expect("kv in etcd")
                .into_iter()
                .map(|e| (e.group.to_string(), e.owner))
                .collect()
        })
    })
}

#[test]
fn an_agent_keeps_its_assignment_in_etcd() {
    let ns = process::netns("etcd-agent", 2);
    let addr: IpAddr = ETCD_ADDR.parse().unwrap();
    process::ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ]);
    let etcd = Etcd::start(&ns.0, addr);
    let endpoint = etcd.endpoint();
    let config = config(&endpoint, 7000);
    let pins = process::PinDir::new("etcd-agent");
    let state = tempfile::tempdir().expect("tempdir");
    let start = || {
        process::start(
            &ns,
            &process::Start {
                config: &config,
                pin_dir: &pins.0,
                state: &state.path().join("state.json"),
                cleanup: false,
                metrics_port: 9481,
            },
        )
    };
    let agent = start();
    let sock = agent.socket.to_str().expect("utf-8 path").to_owned();
    std::thread::sleep(Duration::from_millis(500));
    let before = cli_groups(&sock);
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(
        etcd_groups(&ns.0, &endpoint),
        before,
        "the CLI shows etcd's assignment"
    );

    let drain = process::sluice(&["drain", "kv-0", "--timeout", "30", "--api-socket", &sock]);
    assert!(drain.status.success(), "{}", text(&drain));
    let drained = etcd_groups(&ns.0, &endpoint);
    assert!(
        drained.iter().all(|(_, o)| o == "kv-1"),
        "the moves landed in etcd: {drained:?}"
    );

    let (hosts, ids) = with_store(&ns.0, &endpoint, |s| {
        Box::pin(async move { (s.hosts().await.unwrap(), s.instances().await.unwrap()) })
    });
    assert_eq!(
        hosts.get("host-a").map(|h| h.instances.clone()),
        Some(vec!["kv-0".to_owned(), "kv-1".to_owned()])
    );
    // A restart: the new agent takes the host's lease over at once (no
    // "host already live"), and the instances keep their ids.
    drop(agent);
    let agent = start();
    let sock = agent.socket.to_str().expect("utf-8 path").to_owned();
    assert_eq!(
        cli_groups(&sock),
        drained,
        "the restarted agent resumed etcd's assignment"
    );
    let ids_after = with_store(&ns.0, &endpoint, |s| {
        Box::pin(async move { s.instances().await.unwrap() })
    });
    for n in ["kv-0", "kv-1"] {
        assert_eq!(ids[n].id, ids_after[n].id, "{n} kept its id");
    }

    drop(agent);
    drop(etcd);
}

#[test]
fn bad_cluster_starts_are_refused_with_the_reason() {
    let ns = process::netns("etcd-refuse", 2);
    let addr: IpAddr = "198.18.250.21".parse().unwrap();
    process::ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ]);
    let pins = process::PinDir::new("etcd-refuse");
    let state = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://{addr}:{}", sluice_tests::etcd::CLIENT_PORT);
    let try_start = |config: &str| {
        process::start_failing(
            &ns,
            &process::Start {
                config,
                pin_dir: &pins.0,
                state: &state.path().join("state.json"),
                cleanup: true,
                metrics_port: 9482,
            },
        )
    };

    // No etcd yet: refused, naming the endpoint and the setting.
    let (status, err) = try_start(&config(&endpoint, 7000));
    assert!(!status.success());
    assert!(
        err.contains(&format!("etcd at {endpoint}")) && err.contains("cluster.etcd_endpoints"),
        "{err}"
    );

    // Another host defined `kv` on port 7000; this one says 7001.
    let etcd = Etcd::start(&ns.0, addr);
    let theirs = sluice::config::Config::parse(&config(&endpoint, 7000), std::path::Path::new("b"))
        .expect("valid");
    let spec = sluice::agent::cluster::service_spec(&theirs.services[0]);
    with_store(&ns.0, &etcd.endpoint(), |s| {
        Box::pin(async move {
            s.check_services("host-z", &[("kv".into(), spec)])
                .await
                .unwrap();
        })
    });
    let (status, err) = try_start(&config(&etcd.endpoint(), 7001));
    assert!(!status.success());
    assert!(
        err.contains("service `kv` is configured differently")
            && err.contains("ports: cluster has [7000], this host [7001]")
            && err.contains("host `host-z`"),
        "{err}"
    );
    // Nothing was left attached by the refused starts.
    assert!(!pins.0.join("link").exists());
}
