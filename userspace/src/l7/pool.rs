//! Kept-alive connections to one instance: at most `size` open, idle ones
//! reused newest first and closed after `idle`. A connection goes back to
//! the pool only when its response has been relayed whole, so a slow
//! client never holds up another request on it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};

use super::Body;

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
    #[error("HTTP handshake with {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
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
    pub(super) sender: SendRequest<Body>,
    permit: OwnedSemaphorePermit,
}

pub(super) struct Pool {
    addr: SocketAddr,
    size: u32,
    idle_for: Duration,
    connect_timeout: Duration,
    /// One permit per open connection, busy or idle.
    open: Arc<Semaphore>,
    idle: Mutex<Vec<(SendRequest<Body>, OwnedSemaphorePermit, Instant)>>,
    returned: Notify,
    /// Connections ever opened (a fresh connection per request would show).
    pub(super) opened: AtomicU64,
}

impl Pool {
    #[must_use]
    pub(super) fn new(
        addr: SocketAddr,
        size: u32,
        idle_for: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            addr,
            size,
            idle_for,
            connect_timeout,
            open: Arc::new(Semaphore::new(size as usize)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            opened: AtomicU64::new(0),
        }
    }

    #[must_use]
    pub(super) const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open connections, and how many of them are idle.
    #[must_use]
    pub(super) fn connections(&self) -> (u32, u32) {
        let idle = u32::try_from(self.idle.lock().expect("pool lock").len()).unwrap_or(u32::MAX);
        let free = u32::try_from(self.open.available_permits()).unwrap_or(u32::MAX);
        (self.size.saturating_sub(free), idle)
    }

    /// An idle connection still open, newest first; stale ones are closed.
    fn pop_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((sender, permit, since)) = idle.pop() {
            if since.elapsed() < self.idle_for && sender.is_ready() {
                return Some(Conn { sender, permit });
            }
        }
        None
    }

    /// A connection to the instance: idle, new, or (all `size` busy) the
    /// first one put back within `wait`.
    pub(super) async fn get(&self, wait: Duration) -> Result<Conn, PoolError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(c) = self.pop_idle() {
                return Ok(c);
            }
            let permit = if let Ok(p) = self.open.clone().try_acquire_owned() {
                p
            } else {
                let returned = self.returned.notified();
                tokio::select! {
                    p = self.open.clone().acquire_owned() => p.expect("never closed"),
                    () = returned => continue,
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(PoolError::Busy { addr: self.addr, size: self.size, timeout: wait });
                    }
                }
            };
            return self.connect(permit).await;
        }
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Conn, PoolError> {
        let addr = self.addr;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| PoolError::Connect { addr, source })?;
        // Requests are small writes that must not wait for an ACK.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        self.opened.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            // Ends when the instance closes it or every sender is gone.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "instance connection ended");
            }
        });
        Ok(Conn { sender, permit })
    }

    /// Puts a connection whose exchange is complete back, if it is still
    /// open.
    pub(super) fn put(&self, c: Conn) {
        if c.sender.is_closed() {
            return;
        }
        let Conn { sender, permit } = c;
        self.idle
            .lock()
            .expect("pool lock")
            .push((sender, permit, Instant::now()));
        self.returned.notify_one();
    }

    /// Closes idle connections past their time.
    pub(super) fn sweep(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|(s, _, since)| since.elapsed() < self.idle_for && !s.is_closed());
    }
}
