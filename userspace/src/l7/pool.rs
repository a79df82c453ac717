//! Kept-alive connections to one instance: at most `size` open over all
//! the distributor's threads, idle ones kept by thread, reused newest first
//! and closed after `idle`. A connection goes back to
//! the pool only when its response has been relayed whole, so a slow
//! client never holds up another request on it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{net::TcpStream, sync::Notify};

use super::{
    limit::{Lease, Limit},
    upstream::Upstream,
};

#[derive(Debug, thiserror::Error)]
pub(super) enum PoolError {
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("all {size} connections to {addr} stayed busy for {timeout:?}")]
    Busy {
        addr: SocketAddr,
        size: u32,
        timeout: Duration,
    },
}

/// A connection taken from the pool; dropped, it closes (put it back with
/// [`Pool::put`]).
pub(super) struct Conn {
    pub(super) up: Upstream,
    lease: Lease,
    /// Taken idle from the pool (else opened for this request): an
    /// instance may close it just as a request goes out.
    pub(super) reused: bool,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An idle connection, and since when (coarse ms).
type Idle = (Upstream, Lease, u64);

/// One instance's pool: at most `size` connections open over all the
/// distributor's threads (one [`Limit`]), the idle ones kept per thread,
/// so a request uses a connection its own thread drives where it can.
pub(super) struct Pool {
    addr: SocketAddr,
    /// Settings a reload may change while it runs, in milliseconds
    /// (atomics: read on every request, no lock).
    idle_for_ms: AtomicU64,
    connect_timeout_ms: AtomicU64,
    /// One lease per open connection, busy or idle, on any thread.
    open: Arc<Limit>,
    /// Idle connections, by worker.
    idle: Vec<Mutex<Vec<Idle>>>,
    /// A connection was put back (on any worker).
    returned: Notify,
    /// Connections ever opened (a fresh connection per request would show).
    pub(super) opened: AtomicU64,
}

impl Pool {
    /// A pool for `workers` threads.
    #[must_use]
    pub(super) fn new(
        addr: SocketAddr,
        size: u32,
        idle_for: Duration,
        connect_timeout: Duration,
        workers: usize,
    ) -> Self {
        let workers = workers.max(1);
        Self {
            addr,
            idle_for_ms: AtomicU64::new(ms(idle_for)),
            connect_timeout_ms: AtomicU64::new(ms(connect_timeout)),
            open: Limit::new(size),
            idle: (0..workers).map(|_| Mutex::default()).collect(),
            returned: Notify::new(),
            opened: AtomicU64::new(0),
        }
    }

    /// Takes a reload's settings: a smaller `size` closes idle connections
    /// at once and busy ones as they come back.
    pub(super) fn configure(&self, size: u32, idle_for: Duration, connect_timeout: Duration) {
        self.idle_for_ms.store(ms(idle_for), Relaxed);
        self.connect_timeout_ms.store(ms(connect_timeout), Relaxed);
        self.open.resize(size);
        for idle in &self.idle {
            let mut idle = idle.lock().expect("pool lock");
            while self.open.shrinking() && idle.pop().is_some() {}
        }
        self.sweep();
    }

    #[must_use]
    pub(super) const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The calling thread's worker index.
    fn mine(&self) -> usize {
        super::workers::current() % self.idle.len()
    }

    /// Open connections, and how many of them are idle.
    #[must_use]
    pub(super) fn connections(&self) -> (u32, u32) {
        let idle: usize = self
            .idle
            .iter()
            .map(|i| i.lock().expect("pool lock").len())
            .sum();
        (self.open.held(), u32::try_from(idle).unwrap_or(u32::MAX))
    }

    /// An idle connection of worker `k` still open, newest first; stale
    /// ones are closed.
    fn pop_idle(&self, k: usize) -> Option<Conn> {
        let idle_for = self.idle_for_ms.load(Relaxed);
        let now = super::coarse_ms();
        let mut idle = self.idle[k].lock().expect("pool lock");
        while let Some((up, lease, since)) = idle.pop() {
            if now.saturating_sub(since) < idle_for && up.is_reusable() {
                return Some(Conn {
                    up,
                    lease,
                    reused: true,
                });
            }
        }
        None
    }

    /// A connection to the instance: this worker's idle one, a new one,
    /// another worker's idle one, or (all `size` open and busy) the first
    /// one put back or closed within `wait`.
    pub(super) async fn get(&self, wait: Duration) -> Result<Conn, PoolError> {
        let me = self.mine();
        // Most requests: no waiter registered, no clock read.
        if let Some(c) = self.pop_idle(me) {
            return Ok(c);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(c) = self.pop_idle(me) {
                return Ok(c);
            }
            if let Some(lease) = self.open.try_take() {
                return self.connect(lease).await;
            }
            // All open: another worker's idle one (registered with that
            // worker's reactor, so this request takes cross-thread wakeups;
            // better than waiting while it idles, or closing it to open
            // another).
            if let Some(c) = (0..self.idle.len())
                .filter(|k| *k != me)
                .find_map(|k| self.pop_idle(k))
            {
                return Ok(c);
            }
            tokio::select! {
                lease = self.open.take() => return self.connect(lease).await,
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(PoolError::Busy { addr: self.addr, size: self.open.size(), timeout: wait });
                }
            }
        }
    }

    async fn connect(&self, lease: Lease) -> Result<Conn, PoolError> {
        let addr = self.addr;
        let timeout = Duration::from_millis(self.connect_timeout_ms.load(Relaxed));
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimeout { addr, timeout })?
            .map_err(|source| PoolError::Connect { addr, source })?;
        // Requests are small writes that must not wait for an ACK.
        let _ = stream.set_nodelay(true);
        self.opened.fetch_add(1, Relaxed);
        Ok(Conn {
            up: Upstream::new(stream),
            lease,
            reused: false,
        })
    }

    /// Puts a connection whose exchange ended cleanly back, if it is
    /// still open (and the pool is not shrinking: then it closes).
    pub(super) fn put(&self, c: Conn) {
        if !c.up.is_reusable() || self.open.shrinking() {
            return;
        }
        let Conn { up, lease, .. } = c;
        self.idle[self.mine()]
            .lock()
            .expect("pool lock")
            .push((up, lease, super::coarse_ms()));
        self.returned.notify_one();
    }

    /// Closes idle connections past their time.
    pub(super) fn sweep(&self) {
        let idle_for = self.idle_for_ms.load(Relaxed);
        let now = super::coarse_ms();
        for idle in &self.idle {
            idle.lock()
                .expect("pool lock")
                .retain(|(up, _, since)| now.saturating_sub(*since) < idle_for && up.is_reusable());
        }
    }
}
