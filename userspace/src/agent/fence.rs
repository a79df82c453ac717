//! The fence in the running agent. A task of its own ([`FenceTask`]) feeds
//! the lease keeper's renewals to [`Fence`], asks and answers the peers
//! over the underlay, and keeps the status and metrics: it runs while the
//! event loop waits on an unreachable etcd (a peer's question must be
//! answered then). The task also gives the data path each deadline as it
//! changes, from its start on ([`FenceWriter`]: the XDP program stops
//! delivering past it, even with this agent stopped): through the event
//! loop, a vouched deadline came late, past the old one, whenever the loop
//! waited on etcd calls timing out one after another. The event loop
//! ([`Fencing`]), after the host joined again under a new lease, re-reads
//! its tables from the store; only then does the fence lift.
//!
//! The vouch protocol, UDP on `cluster.fence_port` (default
//! [`crate::config::DEFAULT_FENCE_PORT`]) of each host's underlay address:
//! a request is `SLFQ` and a nonce (u64, big-endian); the answer is `SLFA`,
//! the nonce, and how many milliseconds before answering the peer's last
//! acknowledged renewal was sent (u32, big-endian; `u32::MAX`: none, as
//! for a peer whose lease is lost). Answers count only from a host live
//! at the last read of the store, with the current round's nonce.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::watch};

use super::{Agent, cluster::Cluster};
use crate::{
    api::{FenceLine, Shared},
    config::Config,
    control::fence::{Fence, FenceState},
    coord::LeaseState,
    datapath::xdp::FenceWriter,
    telemetry,
};

const REQUEST: &[u8; 4] = b"SLFQ";
const ANSWER: &[u8; 4] = b"SLFA";

/// What woke the fence's task up.
enum Wake {
    /// The keeper renewed, lost or replaced the lease; the peers or the
    /// resyncs changed.
    Changed,
    /// A datagram on the vouch port.
    Datagram(Vec<u8>, SocketAddr),
    /// Time to look again (every round period, `T/24`).
    Tick,
}

/// The event loop's end of the fence.
pub struct Fencing {
    /// Joins the task waits on a resync for.
    rejoin: watch::Receiver<u64>,
    /// Joins resynced.
    resynced: watch::Sender<u64>,
    peers: watch::Sender<Vec<IpAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fencing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fence while the agent starts, before [`Fencing`] runs. A previous
/// agent's data path fences `T - M` after that agent's last renewal; an
/// agent started within the lease took the lease over and renewed it as it
/// joined ([`LeaseState::resumed`]), but loads its program, settles with
/// the store and looks at the other hosts before its fence task runs: a
/// start slower than the dead agent's remaining reach (a second or so)
/// fenced a host whose lease was live, dropping what it delivers. So this
/// writes the renewed deadline to the pinned data path at once, and each
/// later renewal's while the runtime turns, until dropped.
pub struct StartFence(Option<tokio::task::JoinHandle<()>>);

impl Drop for StartFence {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

impl StartFence {
    /// Holds the fence of the data path pinned in `pin_dir` for `cluster`'s
    /// resumed lease; does nothing for a new lease (a host whose lease
    /// expired stays fenced until its tables are read again) or without a
    /// pinned data path. Must run in the agent's runtime.
    pub fn hold(cluster: Option<&Cluster>, config: &Config, pin_dir: &std::path::Path) -> Self {
        let Some(mut lease) = cluster.and_then(|c| c.membership.lease_state()) else {
            return Self(None);
        };
        let state = *lease.borrow_and_update();
        if !state.resumed {
            return Self(None);
        }
        let writer = match FenceWriter::pinned(pin_dir) {
            Ok(Some(w)) => w,
            Ok(None) => return Self(None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the pinned data path's fence before the start: its deadline stands until the agent runs");
                return Self(None);
            }
        };
        let mut fence = Fence::new(config.cluster.lease_ttl, state.renewed);
        // Whether there are peers is known after the first look at the
        // hosts; a resumed lease is a cluster's, so keep a deadline.
        fence.set_peers(1);
        let write = move |fence: &Fence| {
            if let Err(e) = writer.set(fence.deadline()) {
                tracing::warn!(error = %e, "giving the data path the fence deadline failed");
            }
        };
        write(&fence);
        Self(Some(tokio::spawn(async move {
            while lease.changed().await.is_ok() {
                let s = *lease.borrow_and_update();
                match s.lost {
                    Some(at) => fence.lost(at),
                    // A new lease: fenced until the tables are read again.
                    None if s.joins > 0 => fence.lost(Instant::now()),
                    None => fence.renewed(s.renewed),
                }
                write(&fence);
            }
        })))
    }
}

/// The fence's own task.
struct FenceTask {
    fence: Fence,
    lease: watch::Receiver<LeaseState>,
    /// The keeper's rejoins taken in (tables re-read after each).
    joins: u64,
    rejoin: watch::Sender<u64>,
    resynced: watch::Receiver<u64>,
    peers: watch::Receiver<Vec<IpAddr>>,
    /// The data path's fence.
    writer: FenceWriter,
    /// The deadline the data path has (`None`: no fence) ...
    written: Option<Instant>,
    /// ... once given.
    given: bool,
    socket: Option<UdpSocket>,
    port: u16,
    nonce: u64,
    shown: FenceState,
    shared: Shared,
}

impl Fencing {
    /// The fence of `cluster`'s host, if its membership has a lease, over
    /// the data path's fence `writer`; its task starts at once, and gives
    /// the data path its first deadline (one a previous agent left, maybe
    /// past, is replaced).
    pub async fn new(
        config: &Config,
        cluster: &Cluster,
        shared: &Shared,
        writer: FenceWriter,
    ) -> Option<Self> {
        let lease = cluster.membership.lease_state()?;
        let c = &config.cluster;
        let bind = SocketAddr::new(cluster.underlay(), c.fence_port);
        let socket = match UdpSocket::bind(bind).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(addr = %bind, error = %e, "no fence vouch port: cut off from etcd, this host fences itself even when etcd is out of every host's reach, and answers no peer");
                None
            }
        };
        let LeaseState { renewed, joins, .. } = *lease.borrow();
        let mut fence = Fence::new(c.lease_ttl, renewed);
        // The peers of the start's look at the cluster: the first deadline
        // is the lease's, not "no fence".
        fence.set_peers(cluster.peers().len());
        let (rejoin_tx, rejoin) = watch::channel(joins);
        let (resynced, resynced_rx) = watch::channel(joins);
        let (peers, peers_rx) = watch::channel(cluster.peers().to_vec());
        let task = FenceTask {
            fence,
            lease,
            joins,
            rejoin: rejoin_tx,
            resynced: resynced_rx,
            peers: peers_rx,
            writer,
            written: None,
            given: false,
            socket,
            port: c.fence_port,
            nonce: 0,
            shown: FenceState::Open,
            shared: shared.clone(),
        };
        let every = Fence::ask_every(c.lease_ttl);
        Some(Self {
            rejoin,
            resynced,
            peers,
            task: tokio::spawn(task.run(every)),
        })
    }

    /// As [`Self::new`], for the agent's cluster if it has one.
    pub async fn of(
        config: &Config,
        cluster: Option<&Cluster>,
        shared: &Shared,
        writer: FenceWriter,
    ) -> Option<Self> {
        Self::new(config, cluster?, shared, writer).await
    }

    /// Waits until a rejoin wants its resync.
    pub async fn wait(&mut self) {
        if self.rejoin.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The other hosts live at `cluster`'s last read of the store.
    pub fn set_peers(&mut self, peers: &[IpAddr]) {
        self.peers.send_if_modified(|p| {
            let changed = p != peers;
            if changed {
                *p = peers.to_vec();
            }
            changed
        });
    }

    /// Resyncs after a rejoin.
    pub async fn step(&mut self, agent: &mut Agent, cluster: &mut Cluster, config: &Config) {
        let want = *self.rejoin.borrow_and_update();
        if want > *self.resynced.borrow() {
            match rejoin(agent, cluster, config).await {
                Ok(()) => {
                    self.resynced.send_replace(want);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "re-reading the tables after joining again failed; fenced until it works");
                }
            }
        }
    }
}

impl FenceTask {
    async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.write();
        loop {
            let wake = self.wait(&mut tick).await;
            let now = Instant::now();
            match wake {
                Wake::Changed | Wake::Tick => self.update(now).await,
                Wake::Datagram(d, from) => self.datagram(&d, from, now).await,
            }
            self.write();
            self.publish(now);
        }
    }

    async fn wait(&mut self, tick: &mut tokio::time::Interval) -> Wake {
        let mut buf = [0u8; 64];
        let recv = async {
            match &self.socket {
                Some(s) => s.recv_from(&mut buf).await,
                None => std::future::pending().await,
            }
        };
        // A closed channel (the store or the event loop gone) wakes no more.
        let changed = |r: Result<(), watch::error::RecvError>| r.is_ok();
        tokio::select! {
            r = self.lease.changed() => {
                if changed(r) { Wake::Changed } else { std::future::pending().await }
            }
            r = self.peers.changed() => if changed(r) { Wake::Changed } else { std::future::pending().await },
            r = self.resynced.changed() => if changed(r) { Wake::Changed } else { std::future::pending().await },
            r = recv => match r {
                Ok((n, from)) => Wake::Datagram(buf[..n].to_vec(), from),
                Err(_) => Wake::Tick,
            },
            _ = tick.tick() => Wake::Tick,
        }
    }

    /// The lease's news, the peers, the resyncs; a round if one is due.
    async fn update(&mut self, now: Instant) {
        let peers = self.peers.borrow_and_update().len();
        self.fence.set_peers(peers);
        let state = *self.lease.borrow_and_update();
        if let Some(at) = state.lost {
            self.fence.lost(at);
        } else if state.joins != self.joins {
            // Joined again: fenced until the event loop re-read the tables
            // (moves may have been missed while out).
            self.fence.lost(now);
            self.rejoin.send_replace(state.joins);
            if *self.resynced.borrow_and_update() >= state.joins {
                self.joins = state.joins;
                self.fence.rejoined(state.renewed);
                telemetry::fence_rejoined();
                tracing::info!("joined the cluster again and re-read the tables: the fence lifts");
            }
        } else {
            self.fence.renewed(state.renewed);
        }
        if self.fence.should_ask(now) {
            self.ask(now).await;
        }
    }

    /// The deadline to the data path, when it changed (or the last write
    /// failed: tried again at the next wake, a round period at most).
    fn write(&mut self) {
        let deadline = self.fence.deadline();
        if self.given && self.written == deadline {
            return;
        }
        match self.writer.set(deadline) {
            Ok(()) => (self.written, self.given) = (deadline, true),
            Err(e) => {
                tracing::error!(error = %e, "giving the data path the fence deadline failed");
            }
        }
    }

    /// Asks every peer whether it renewed.
    async fn ask(&mut self, now: Instant) {
        let Some(socket) = &self.socket else { return };
        self.nonce = self.nonce.wrapping_add(1);
        let mut req = REQUEST.to_vec();
        req.extend_from_slice(&self.nonce.to_be_bytes());
        let peers = self.peers.borrow().clone();
        for p in &peers {
            // A peer out of reach simply does not answer.
            let _ = socket.send_to(&req, SocketAddr::new(*p, self.port)).await;
        }
        self.fence.asked(now);
        tracing::debug!(
            peers = peers.len(),
            "this host's lease renewals go unanswered: asking the other hosts whether they renew theirs"
        );
    }

    async fn datagram(&mut self, d: &[u8], from: SocketAddr, now: Instant) {
        if let Some(nonce) = d.strip_prefix(REQUEST).filter(|n| n.len() == 8) {
            let ago = self.fence.renewed_ago(now).map_or(u32::MAX, |a| {
                u32::try_from(a.as_millis()).unwrap_or(u32::MAX - 1)
            });
            let mut answer = ANSWER.to_vec();
            answer.extend_from_slice(nonce);
            answer.extend_from_slice(&ago.to_be_bytes());
            if let Some(s) = &self.socket {
                let _ = s.send_to(&answer, from).await;
            }
        } else if let Some(rest) = d.strip_prefix(ANSWER).filter(|r| r.len() == 12)
            && self.peers.borrow().contains(&from.ip())
            && rest[..8] == self.nonce.to_be_bytes()
        {
            let ago = u32::from_be_bytes(rest[8..].try_into().expect("4 bytes"));
            let ago = (ago != u32::MAX).then(|| Duration::from_millis(ago.into()));
            self.fence.answer(ago);
        }
    }

    /// The status, the metrics and the log.
    fn publish(&mut self, now: Instant) {
        let deadline = self.fence.deadline();
        let state = self.fence.state(now);
        if state != self.shown {
            let name = state.name();
            match state {
                FenceState::Fenced | FenceState::Lost => {
                    tracing::error!(
                        state = name,
                        "fenced: this host cannot renew its lease, and delivers nothing as an owner until it does"
                    );
                }
                FenceState::Vouched => {
                    tracing::warn!(
                        state = name,
                        "etcd is out of every host's reach: the fence is extended"
                    );
                }
                FenceState::Open | FenceState::Renewing => {
                    tracing::info!(state = name, "the fence is open");
                }
            }
            self.shown = state;
        }
        let deadline_in = deadline.map(|d| {
            if d >= now {
                (d - now).as_secs_f64()
            } else {
                -(now - d).as_secs_f64()
            }
        });
        telemetry::fence(
            matches!(state, FenceState::Fenced | FenceState::Lost),
            deadline_in,
            state == FenceState::Vouched,
        );
        #[expect(
            clippy::cast_possible_truncation,
            reason = "milliseconds of a lease's time fit"
        )]
        let line = FenceLine {
            state: state.name().to_owned(),
            deadline_in_ms: deadline_in.map(|s| (s * 1000.0) as i64),
            renewed_ago_ms: u64::try_from(
                now.saturating_duration_since(self.fence.last_renewal())
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
            peers: self.peers.borrow().len(),
        };
        *self.shared.fence.lock().expect("fence lock") = Some(line);
    }
}

/// After the host joined again: its instances registered again, the
/// cluster and the owners read again from the store.
async fn rejoin(agent: &mut Agent, cluster: &mut Cluster, config: &Config) -> anyhow::Result<()> {
    cluster.registry(config).await?;
    cluster.forget_written();
    cluster.sync(agent).await?;
    agent.control.resync_now(&mut agent.datapath).await?;
    Ok(())
}
