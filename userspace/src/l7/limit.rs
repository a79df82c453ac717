//! A count of open things (client connections, a pool's connections to an
//! instance) with a most, which a reload may change while they are open:
//! a tokio semaphore, one permit an open thing, shrunk by forgetting
//! permits as they come back.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, Ordering::Relaxed},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(super) struct Limit {
    permits: Arc<Semaphore>,
    /// The most, as last set.
    size: Mutex<u32>,
    /// Permits still to forget after a shrink (they were in use).
    debt: AtomicU32,
    /// Leases held now.
    held: AtomicU32,
}

/// One open thing's place under the limit, given back on drop.
pub(super) struct Lease {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
}

impl Limit {
    pub(super) fn new(size: u32) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(size as usize)),
            size: Mutex::new(size),
            debt: AtomicU32::new(0),
            held: AtomicU32::new(0),
        })
    }

    pub(super) fn size(&self) -> u32 {
        *self.size.lock().expect("limit lock")
    }

    /// Leases held now (at most [`Self::size`] once a shrink is paid).
    pub(super) fn held(&self) -> u32 {
        self.held.load(Relaxed)
    }

    /// Whether a shrink still waits for leases to come back.
    pub(super) fn shrinking(&self) -> bool {
        self.debt.load(Relaxed) > 0
    }

    /// Sets the most: more permits at once, or fewer as soon as enough
    /// leases are given back (the open things are not cut).
    pub(super) fn resize(&self, to: u32) {
        let mut size = self.size.lock().expect("limit lock");
        if to > *size {
            let grow = to - *size;
            let paid = self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(grow)))
                .expect("always Some");
            self.permits.add_permits((grow - paid.min(grow)) as usize);
        } else if to < *size {
            let shrink = *size - to;
            let forgotten = u32::try_from(self.permits.forget_permits(shrink as usize))
                .expect("at most shrink");
            self.debt.fetch_add(shrink - forgotten, Relaxed);
        }
        *size = to;
    }

    fn lease(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Lease {
        self.held.fetch_add(1, Relaxed);
        Lease {
            permit: Some(permit),
            limit: self.clone(),
        }
    }

    /// A lease if one is free now.
    pub(super) fn try_take(self: &Arc<Self>) -> Option<Lease> {
        let p = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.lease(p))
    }

    /// A lease, once one is free (first come, first served).
    pub(super) async fn take(self: &Arc<Self>) -> Lease {
        let p = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        self.lease(p)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let limit = &self.limit;
        limit.held.fetch_sub(1, Relaxed);
        let owed = limit
            .debt
            .fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1))
            .is_ok();
        if owed && let Some(p) = self.permit.take() {
            p.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrink_waits_for_leases_and_a_grow_pays_it_first() {
        let l = Limit::new(3);
        let held: Vec<Lease> = (0..3).map(|_| l.try_take().unwrap()).collect();
        assert!(l.try_take().is_none());
        assert_eq!(l.held(), 3);
        l.resize(1);
        assert!(l.shrinking());
        let mut held = held.into_iter();
        drop(held.next());
        assert!(l.try_take().is_none(), "2 open, most 1");
        drop(held.next());
        assert!(l.try_take().is_none(), "1 open, most 1");
        assert!(!l.shrinking());
        drop(held.next());
        let one = l.try_take().expect("none open, most 1");
        assert!(l.try_take().is_none());
        // Shrunk to 0 with one open, then grown to 2: the debt is paid
        // from the grow, one more free.
        l.resize(0);
        l.resize(2);
        assert!(!l.shrinking());
        let two = l.try_take().expect("1 open, most 2");
        assert!(l.try_take().is_none());
        drop((one, two));
        assert_eq!(l.held(), 0);
        assert_eq!(l.size(), 2);
        let _a = l.try_take().unwrap();
        let _b = l.try_take().unwrap();
        assert!(l.try_take().is_none());
    }
}
