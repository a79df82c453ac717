//! The fence in the running agent: the lease keeper's renewals feed
//! [`Fence`], its deadline goes to the data path ([`Datapath::set_fence`]:
//! the XDP program stops delivering past it, even with this agent
//! stopped), and the peers are asked over the underlay when renewals fail.
//! A lease found lost fences at once; the host's tables are re-read from
//! the store after it joined again, and only then does the fence lift.
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
    datapath::Datapath as _,
    telemetry,
};

const REQUEST: &[u8; 4] = b"SLFQ";
const ANSWER: &[u8; 4] = b"SLFA";

/// What woke the fence up.
pub enum Wake {
    /// The keeper renewed, lost or replaced the lease.
    Lease,
    /// A datagram on the vouch port.
    Datagram(Vec<u8>, SocketAddr),
    /// Time to look again (every round period, `T/12`).
    Tick,
}

/// The running agent's fence.
pub struct Fencing {
    fence: Fence,
    lease: watch::Receiver<LeaseState>,
    /// The keeper's rejoins taken in (tables re-read after each).
    joins: u64,
    socket: Option<UdpSocket>,
    port: u16,
    peers: Vec<IpAddr>,
    nonce: u64,
    /// The deadline the data path has (`None`: no fence) ...
    written: Option<Instant>,
    /// ... once given.
    given: bool,
    shown: FenceState,
    tick: tokio::time::Interval,
}

impl Fencing {
    /// The fence of `cluster`'s host, if its membership has a lease.
    pub async fn new(config: &Config, cluster: &Cluster) -> Option<Self> {
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
        let mut tick = tokio::time::interval(Fence::ask_every(c.lease_ttl));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Self {
            fence: Fence::new(c.lease_ttl, renewed),
            joins,
            lease,
            socket,
            port: c.fence_port,
            peers: Vec::new(),
            nonce: 0,
            written: None,
            given: false,
            shown: FenceState::Open,
            tick,
        })
    }

    /// As [`Self::new`], for the agent's cluster if it has one.
    pub async fn of(config: &Config, cluster: Option<&Cluster>) -> Option<Self> {
        Self::new(config, cluster?).await
    }

    /// Waits for the next thing the fence acts on.
    pub async fn wait(&mut self) -> Wake {
        let mut buf = [0u8; 64];
        let recv = async {
            match &self.socket {
                Some(s) => s.recv_from(&mut buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.lease.changed() => match r {
                Ok(()) => Wake::Lease,
                // The keeper is gone (the store closed): nothing more to hear.
                Err(_) => std::future::pending().await,
            },
            r = recv => match r {
                Ok((n, from)) => Wake::Datagram(buf[..n].to_vec(), from),
                Err(_) => Wake::Tick,
            },
            _ = self.tick.tick() => Wake::Tick,
        }
    }

    /// The other hosts live at `cluster`'s last read of the store.
    pub fn set_peers(&mut self, peers: &[IpAddr]) {
        self.peers = peers.to_vec();
        self.fence.set_peers(peers.len());
    }

    /// Acts on `wake`, then gives the data path the deadline.
    pub async fn step(
        &mut self,
        wake: Wake,
        agent: &mut Agent,
        cluster: &mut Cluster,
        config: &Config,
        shared: &Shared,
    ) {
        let now = Instant::now();
        match wake {
            Wake::Lease | Wake::Tick => {
                let state = *self.lease.borrow_and_update();
                if let Some(at) = state.lost {
                    self.fence.lost(at);
                } else if state.joins != self.joins {
                    // Joined again: fenced until the tables are the store's
                    // (moves may have been missed while out).
                    self.fence.lost(now);
                    self.apply(agent, shared, now);
                    match rejoin(agent, cluster, config).await {
                        Ok(()) => {
                            self.joins = state.joins;
                            self.fence.rejoined(state.renewed);
                            telemetry::fence_rejoined();
                            tracing::info!(
                                "joined the cluster again and re-read the tables: the fence lifts"
                            );
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "re-reading the tables after joining again failed; fenced until it works");
                        }
                    }
                } else {
                    self.fence.renewed(state.renewed);
                }
                if self.fence.should_ask(now) {
                    self.ask(now).await;
                }
            }
            Wake::Datagram(d, from) => self.datagram(&d, from, now).await,
        }
        self.apply(agent, shared, now);
    }

    /// Asks every peer whether it renewed.
    async fn ask(&mut self, now: Instant) {
        let Some(socket) = &self.socket else { return };
        self.nonce = self.nonce.wrapping_add(1);
        let mut req = REQUEST.to_vec();
        req.extend_from_slice(&self.nonce.to_be_bytes());
        for p in &self.peers {
            // A peer out of reach simply does not answer.
            let _ = socket.send_to(&req, SocketAddr::new(*p, self.port)).await;
        }
        self.fence.asked(now);
        tracing::warn!(
            peers = self.peers.len(),
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
            && self.peers.contains(&from.ip())
            && rest[..8] == self.nonce.to_be_bytes()
        {
            let ago = u32::from_be_bytes(rest[8..].try_into().expect("4 bytes"));
            let ago = (ago != u32::MAX).then(|| Duration::from_millis(ago.into()));
            self.fence.answer(ago);
            tracing::info!(peer = %from.ip(), renewed_ago = ?ago, "a peer answered the fence's question");
        }
    }

    /// The deadline to the data path (when it changed), the status, the
    /// metrics and the log.
    fn apply(&mut self, agent: &mut Agent, shared: &Shared, now: Instant) {
        let deadline = self.fence.deadline();
        if !self.given || self.written != deadline {
            match agent.datapath.set_fence(deadline) {
                Ok(()) => (self.written, self.given) = (deadline, true),
                Err(e) => {
                    tracing::error!(error = %e, "giving the data path the fence deadline failed");
                }
            }
        }
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
            peers: self.peers.len(),
        };
        *shared.fence.lock().expect("fence lock") = Some(line);
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
