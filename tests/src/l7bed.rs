//! The L7 distributor's end-to-end testbed: an http service `web` on
//! 198.18.1.1:80 over a [`Testbed`]'s instances, the real agent serving it,
//! the tests' own servers in the instances, clients in the client namespace.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use bytes::Bytes;

use crate::{
    http::{self, Backend, KeptAlive},
    netns,
    process::{self, Agent, PinDir},
    testbed::{NIC, Testbed},
};

/// Port the instances' servers listen on.
pub const PORT: u16 = 8080;
pub const METRICS: u16 = 9480;

#[must_use]
pub fn vip() -> SocketAddr {
    "198.18.1.1:80".parse().expect("addr")
}

pub struct Running {
    pub agent: Agent,
    _pins: PinDir,
    _state: tempfile::TempDir,
}

#[must_use]
pub fn testbed(tag: &str, n: usize) -> Testbed {
    Testbed::new(tag, n).unwrap_or_else(|e| panic!("building the testbed: {e}"))
}

/// An http service `web` on 198.18.1.1:80 over the testbed's instances
/// (`web-<k>`), `http` being the body of its `[service.http]` table and
/// `extra` more TOML after it (priority rules).
#[must_use]
pub fn config(tb: &Testbed, http: &str, extra: &str) -> String {
    // Idle instances would merge their groups while the test looks.
    config_wlm(tb, "underload = 0.0", http, extra)
}

/// As [`config`], with the service's `wlm` table given.
#[must_use]
pub fn config_wlm(tb: &Testbed, wlm: &str, http: &str, extra: &str) -> String {
    let mut c = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"web\"\nvip = \"198.18.1.1\"\nport = 80\nprotocol = \"tcp\"\nlayer = \"http\"\n\
         wlm = {{ {wlm} }}\n\n[service.http]\n{http}\n\n{extra}\n"
    );
    for (k, i) in tb.instances.iter().enumerate() {
        let _ = write!(
            c,
            "[[service.instance]]\nname = \"web-{k}\"\nveth = \"{}\"\nnetns = \"{}\"\naddr = \"{}:{PORT}\"\n\n",
            i.veth, i.netns, i.addr_v4
        );
    }
    c
}

#[must_use]
pub fn start(tb: &Testbed, tag: &str, config: &str) -> Running {
    start_with(tb, tag, config, None)
}

/// As [`start`], the agent started with open-file limits `(soft, hard)`
/// (as a service manager starts it: soft 1,024), whatever this process has.
#[must_use]
pub fn start_with_nofile(tb: &Testbed, tag: &str, config: &str, soft: u64, hard: u64) -> Running {
    start_with(tb, tag, config, Some((soft, hard)))
}

fn start_with(tb: &Testbed, tag: &str, config: &str, nofile: Option<(u64, u64)>) -> Running {
    let pins = PinDir::new(tag);
    let state = tempfile::tempdir().expect("tempdir");
    let s = process::Start {
        config,
        pin_dir: &pins.0,
        state: &state.path().join("state.json"),
        cleanup: true,
        metrics_port: METRICS,
    };
    let agent = match nofile {
        None => process::start_on(&tb.host, NIC, &s),
        Some((soft, hard)) => process::start_on_with_nofile(&tb.host, NIC, &s, soft, hard),
    };
    Running {
        agent,
        _pins: pins,
        _state: state,
    }
}

/// The tests' own server in every instance, named `web-<k>`.
#[must_use]
pub fn backends(tb: &Testbed) -> Vec<Backend> {
    tb.instances
        .iter()
        .enumerate()
        .map(|(k, i)| {
            Backend::start(
                &i.netns,
                SocketAddr::new(i.addr_v4.into(), PORT),
                &format!("web-{k}"),
            )
        })
        .collect()
}

#[must_use]
pub fn connect(tb: &Testbed) -> KeptAlive {
    netns::run_in(&tb.client, || {
        KeptAlive::connect(vip(), Duration::from_secs(5))
    })
    .expect("connecting to the VIP")
}

#[must_use]
pub fn get_as(c: &mut KeptAlive, path: &str, headers: &[(&str, &str)]) -> http::Reply {
    let mut b = hyper::Request::get(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(b.body(Bytes::new()).expect("request"))
        .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e}"))
}

/// The agent's Prometheus text, once the control loop has published what
/// came before (it does every interval, 200 ms).
#[must_use]
pub fn metrics(tb: &Testbed) -> String {
    std::thread::sleep(Duration::from_millis(500));
    http::curl(&tb.host, &[&format!("http://127.0.0.1:{METRICS}/metrics")])
        .expect("metrics")
        .1
}

/// The value of the series `name{labels...}` that has every label given.
#[must_use]
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
