//! Cross-host delivery on the namespace cluster: two hosts behind the
//! router, the VIP routed to host 0 only, and one instance each. The same
//! UDP load is sent twice in one run: once with every unit owned by host
//! 0's instance (delivered where it enters), once owned by host 1's
//! (encapsulated by host 0, decapsulated and delivered by host 1). Delivered
//! packets per second are read from the data paths' own counters.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use sluice::coord::{CoordStore as _, Membership as _};
use sluice_tests::{
    cluster::{ClusterBed, VIP_V4},
    netns, process,
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) generated_pps: f64,
    pub(crate) delivered_pps: f64,
}

/// Host `k`'s count of packets under `action`.
fn outcome(bed: &ClusterBed, k: usize, action: &str) -> anyhow::Result<f64> {
    let text = process::scrape(&bed.hosts[k].ns.0, 9600 + u16::try_from(k)?)?;
    Ok(process::metric(
        &text,
        "sluice_datapath_packets_total",
        &format!("action=\"{action}\""),
    ))
}

/// Packets delivered to an instance anywhere in the cluster.
fn delivered(bed: &ClusterBed) -> anyhow::Result<f64> {
    Ok(outcome(bed, 0, "delivered")? + outcome(bed, 1, "decap_delivered")?)
}

/// Sends as fast as two threads can for `secs`, from 64 sockets each;
/// returns the datagrams sent.
fn blast(client: &str, dst: SocketAddr, secs: f64) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (stop, sent) = (stop.clone(), sent.clone());
            netns::spawn_in(client, move || {
                let socks: Vec<UdpSocket> = (0..64)
                    .filter_map(|_| UdpSocket::bind("0.0.0.0:0").ok())
                    .collect();
                let payload = [0u8; 32];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for s in &socks {
                        if s.send_to(&payload, dst).is_ok() {
                            n += 1;
                        }
                    }
                }
                sent.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    sent.load(Ordering::Relaxed)
}

pub(crate) fn run(secs: f64) -> anyhow::Result<Vec<Row>> {
    let mut bed = ClusterBed::new("bench", 2, 1);
    bed.set_ecmp_hosts(1);
    for k in 0..2 {
        // Sized so that nothing moves by itself during the run.
        let c = format!(
            "{}[[service]]\nname = \"kv\"\nvip = \"{VIP_V4}\"\nport = 7000\nprotocol = \"udp\"\n\
             wlm = {{ capacity_pps = 100000000 }}\n{}",
            bed.cluster_toml(k, "interval_ms = 200"),
            bed.instances_toml("kv", k)
        );
        bed.start_agent(k, &c);
    }
    let dst = SocketAddr::new(IpAddr::V4(VIP_V4), 7000);
    let mut rows = Vec::new();
    for (path, owner) in [
        ("owner on the entry host: delivered", "kv-h0-0"),
        (
            "owner on the other host: encapsulated, decapsulated, delivered",
            "kv-h1-0",
        ),
    ] {
        let groups = vec![(sluice::plan::Group::ALL, owner.to_owned())];
        bed.with_store(move |s| {
            Box::pin(async move {
                let t = Instant::now();
                while s.hosts().await.map_or(0, |h| h.len()) < 2
                    && t.elapsed() < Duration::from_secs(20)
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                s.reset("kv", &groups).await
            })
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let before = delivered(&bed)?;
        let t = Instant::now();
        let sent = blast(&bed.client.0, dst, secs);
        let took = t.elapsed().as_secs_f64();
        // The agents publish their counters each interval.
        std::thread::sleep(Duration::from_millis(600));
        let after = delivered(&bed)?;
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let generated = sent as f64 / took;
        rows.push(Row {
            path: path.to_owned(),
            generated_pps: generated,
            delivered_pps: (after - before) / took,
        });
        eprintln!(
            "[bench]   {path}: {generated:.0} sent/s, {:.0} delivered/s",
            (after - before) / took
        );
    }
    Ok(rows)
}
