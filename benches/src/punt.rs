//! The punt path: how fast the agent resolves punted frames — taken off
//! its `AF_XDP` socket, unit claimed through the store, frame re-injected
//! on the owner's veth — with a backlog waiting, with each coordination
//! store the agent runs with: in memory (tests), the embedded store
//! persisted to a file (one host: every write rewrites the file and
//! fsyncs it and its directory), and etcd (a real server, here in the
//! host's namespace, so the round trip is local).
//!
//! `Agent::process_punts` is what the agent's event loop awaits every 2 ms
//! (`agent::run`), and the loop serves nothing else (control interval,
//! store watch, signals) until it returns: the time one call takes is how
//! long the loop is blocked.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice::{
    config::Config,
    coord::{
        ClaimBatch, CoordError, CoordStore, EmbeddedStore, EtcdOptions, EtcdStore, Events,
        GroupEntry, Load, Version,
    },
    datapath::Datapath as _,
    plan::Group,
};
use sluice_common::counters;
use sluice_tests::{
    block_on,
    etcd::Etcd,
    netns,
    testbed::{self, Testbed},
    traffic::{self, UdpLoad, UdpServers},
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) case: String,
    pub(crate) store: String,
    pub(crate) frames: u64,
    pub(crate) claims: usize,
    /// Store calls that write (split, move, claim batch, ...).
    pub(crate) store_writes: u64,
    /// The one `process_punts` call that resolved the backlog: the agent's
    /// loop is blocked for this long.
    pub(crate) seconds: f64,
    pub(crate) frames_per_second: f64,
    /// Seconds over claims: what a claim costs, writes included.
    pub(crate) ms_per_claim: f64,
}

/// Which store the agent runs with.
#[derive(Clone, Copy)]
enum Store {
    Memory,
    File,
    Etcd,
}

impl Store {
    const fn name(self) -> &'static str {
        match self {
            Self::Memory => "in memory",
            Self::File => "embedded, file (fsync)",
            Self::Etcd => "etcd (local server)",
        }
    }
}

/// A store that counts the calls that write, around the real one.
struct Counting {
    inner: Arc<dyn CoordStore>,
    writes: AtomicU64,
}

impl Counting {
    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl CoordStore for Counting {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        self.inner.groups(service).await
    }
    async fn group_of(&self, service: &str, unit: u32) -> Result<GroupEntry, CoordError> {
        self.inner.group_of(service, unit).await
    }
    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        self.wrote();
        self.inner.init(service, groups).await
    }
    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        self.wrote();
        self.inner.reset(service, groups).await
    }
    async fn rewrite(
        &self,
        service: &str,
        f: &sluice::coord::Rewrite<'_>,
    ) -> Result<sluice::coord::Rewritten, CoordError> {
        self.wrote();
        self.inner.rewrite(service, f).await
    }
    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.wrote();
        self.inner.move_group(service, group, version, to).await
    }
    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.wrote();
        self.inner.split(service, group, version).await
    }
    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.wrote();
        self.inner.merge(service, a, b).await
    }
    async fn claim_units(
        &self,
        service: &str,
        units: &[u32],
        size: u32,
        owners: &[String],
        turn: usize,
    ) -> Result<ClaimBatch, CoordError> {
        self.wrote();
        self.inner
            .claim_units(service, units, size, owners, turn)
            .await
    }
    async fn publish_load(&self, instance: &str, load: Load) -> Result<(), CoordError> {
        self.inner.publish_load(instance, load).await
    }
    async fn loads(&self) -> Result<HashMap<String, Load>, CoordError> {
        self.inner.loads().await
    }
    fn watch(&self) -> Events {
        self.inner.watch()
    }
}

fn case(name: &str, store: Store, min_group_units: u32, flows: usize) -> anyhow::Result<Row> {
    let tb = Testbed::new("puntb", 2)?;
    let state = tempfile::tempdir()?;
    // etcd listens on the host's NIC address, in the host's namespace,
    // where the agent (and its client) run.
    let etcd = matches!(store, Store::Etcd).then(|| Etcd::start(&tb.host, testbed::HOST_V4.into()));
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = 7000\nprotocol = \"udp\"\nassign = \"on-demand\"\n\
         wlm = {{ min_group_units = {min_group_units}, underload = 0.0 }}\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, 2)
    );
    let config = Config::parse(&toml, Path::new("bench.toml"))?;
    // Everything that talks to the store runs on one thread in the host's
    // namespace, on that thread's runtime: the etcd client's connection
    // and its background tasks live there.
    netns::run_in(&tb.host, || {
        let inner: Arc<dyn CoordStore> = match store {
            Store::Memory => Arc::new(EmbeddedStore::in_memory()),
            Store::File => Arc::new(EmbeddedStore::open(&state.path().join("state.json"))?),
            Store::Etcd => Arc::new(block_on(EtcdStore::connect(&EtcdOptions {
                endpoints: vec![etcd.as_ref().context("etcd")?.endpoint()],
                cluster: "puntbench".into(),
                timeout: Duration::from_secs(5),
            }))?),
        };
        let counting = Arc::new(Counting {
            inner,
            writes: AtomicU64::new(0),
        });
        let mut agent = block_on(sluice::agent::Agent::start(
            &config,
            testbed::NIC,
            false,
            counting.clone(),
        ))?;
        let dst = SocketAddr::new(testbed::VIP_V4.into(), 7000);
        let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
        let servers = UdpServers::start(&ns, dst);
        // A backlog: new flows, the agent not serving punts meanwhile.
        let load = UdpLoad {
            client_ns: &tb.client,
            dst,
            sockets: flows,
            per_socket: 1,
            window: u64::MAX,
            deadline: Duration::from_secs(30),
        };
        let _ = traffic::send_udp(&load, &servers.total, |_| Vec::new());
        let punted = agent.datapath.global_counters()?[counters::PUNTED as usize];
        let q = agent.punt.as_ref().context("no punt socket")?.queue.clone();
        let settle = Instant::now() + Duration::from_secs(10);
        while q.received.load(Ordering::Relaxed) + q.kernel_dropped.load(Ordering::Relaxed) < punted
        {
            if Instant::now() > settle {
                bail!("the punt socket did not take the backlog");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let owned = |agent: &sluice::agent::Agent| -> anyhow::Result<usize> {
            Ok(block_on(agent.control.assignments())?
                .iter()
                .flat_map(|(_, g)| g)
                .filter(|e| !e.owner.is_empty())
                .count())
        };
        let claims0 = owned(&agent)?;
        let writes0 = counting.writes.load(Ordering::Relaxed);
        let t = Instant::now();
        let frames = block_on(agent.process_punts());
        let seconds = t.elapsed().as_secs_f64();
        let store_writes = counting.writes.load(Ordering::Relaxed) - writes0;
        // Claimed groups (the move history is bounded; the store is not).
        let claims = owned(&agent)? - claims0;
        servers.wait_for(u64::try_from(frames)?, Duration::from_secs(3));
        let got: usize = servers.finish().iter().map(Vec::len).sum();
        if got != frames {
            bail!("{name}: {frames} frames resolved, {got} received");
        }
        agent.stop()?;
        #[expect(clippy::cast_precision_loss, reason = "rates")]
        Ok(Row {
            case: name.to_owned(),
            store: store.name().to_owned(),
            frames: u64::try_from(frames)?,
            claims,
            store_writes,
            seconds,
            frames_per_second: frames as f64 / seconds,
            ms_per_claim: seconds * 1e3 / claims.max(1) as f64,
        })
    })
}

pub(crate) fn run() -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![
        case(
            "6,000 new flows, a claim per frame (groups of 1 unit)",
            Store::Memory,
            1,
            6_000,
        )?,
        case(
            "6,000 new flows, one claim, then re-injection only (groups of 65,536 units)",
            Store::Memory,
            65_536,
            6_000,
        )?,
    ];
    // Fewer flows with a real store: before claims were batched, each
    // claim was several writes of the whole assignment.
    for store in [Store::File, Store::Etcd] {
        rows.push(case("1,000 new flows, groups of 1 unit", store, 1, 1_000)?);
        rows.push(case(
            "1,000 new flows, groups of 256 units",
            store,
            256,
            1_000,
        )?);
    }
    Ok(rows)
}
