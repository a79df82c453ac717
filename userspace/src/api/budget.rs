//! How many connections a local API socket serves at once. Each socket
//! has a budget of its own: the report sockets are mode 0666 (containers
//! bind-mount them, any local user can open them), so a flood on one must
//! take neither the root-only control socket's answers nor another
//! instance's reports. On a report socket one peer (a user id) holds a few
//! of the budget at most, so one user cannot take it from the instance's
//! own reporter either.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A refusal is logged the first time, then at most once in this long (a
/// flood logs a line now and then, not one a connection).
const LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Budget {
    slots: Arc<Semaphore>,
    size: usize,
    per_peer: Option<usize>,
    /// Connections held, by peer user id.
    peers: Mutex<HashMap<u32, usize>>,
    /// When a refusal was last logged, and how many since.
    logged: Mutex<(Option<Instant>, u64)>,
}

/// A connection's place in its socket's budget, given back on drop.
pub(super) struct Held {
    _slot: OwnedSemaphorePermit,
    budget: Arc<Budget>,
    uid: u32,
}

impl Budget {
    /// `size` connections at once, at most `per_peer` of them by one user.
    pub(super) fn new(size: usize, per_peer: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(size)),
            size,
            per_peer,
            peers: Mutex::default(),
            logged: Mutex::default(),
        })
    }

    /// A place for a connection of user `uid`, or why there is none.
    pub(super) fn take(self: &Arc<Self>, uid: u32) -> Result<Held, String> {
        let mut peers = self.peers.lock().expect("budget lock");
        let mine = peers.get(&uid).copied().unwrap_or(0);
        if let Some(most) = self.per_peer
            && mine >= most
        {
            return Err(format!(
                "user {uid} already has {most} connections to this socket; close one and try again"
            ));
        }
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            format!(
                "this socket serves {} connections at once and all are taken; try again",
                self.size
            )
        })?;
        peers.insert(uid, mine + 1);
        Ok(Held {
            _slot: slot,
            budget: self.clone(),
            uid,
        })
    }

    /// Whether to log a refusal now, and how many went unlogged before it.
    pub(super) fn log_refusal(&self, now: Instant) -> Option<u64> {
        let mut logged = self.logged.lock().expect("budget lock");
        if logged.0.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            logged.1 += 1;
            return None;
        }
        let unlogged = logged.1;
        *logged = (Some(now), 0);
        Some(unlogged)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut peers = self.budget.peers.lock().expect("budget lock");
        if let Some(n) = peers.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_its_share_and_gives_it_back() {
        let b = Budget::new(3, Some(2));
        let first = b.take(1000).unwrap();
        let _second = b.take(1000).unwrap();
        assert!(
            b.take(1000)
                .err()
                .expect("refused")
                .contains("already has 2")
        );
        let other = b.take(0).unwrap();
        assert!(
            b.take(7)
                .err()
                .expect("refused")
                .contains("3 connections at once")
        );
        drop(first);
        let _again = b.take(1000).unwrap();
        drop(other);
        let _seven = b.take(7).unwrap();
        assert_eq!(b.peers.lock().unwrap().get(&0), None, "no count left at 0");
    }

    #[test]
    fn refusals_are_logged_now_and_then_with_a_count() {
        let b = Budget::new(1, None);
        let t = Instant::now();
        assert_eq!(b.log_refusal(t), Some(0));
        assert_eq!(b.log_refusal(t + Duration::from_secs(1)), None);
        assert_eq!(b.log_refusal(t + Duration::from_secs(2)), None);
        assert_eq!(
            b.log_refusal(t + LOG_EVERY + Duration::from_secs(1)),
            Some(2)
        );
    }
}
