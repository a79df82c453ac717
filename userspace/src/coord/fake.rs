//! A store for unit tests whose next write of one kind fails once, the way
//! a full disk fails the embedded store's persist (`ENOSPC`): nothing of
//! that write is applied.

use std::{
    collections::HashMap,
    io,
    path::PathBuf,
    sync::atomic::{AtomicU8, Ordering},
};

use super::{ClaimBatch, CoordError, CoordStore, EmbeddedStore, Events, GroupEntry, Load, Version};
use crate::plan::Group;

/// Which write of a [`FaultyStore`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StoreFault {
    None = 0,
    Move = 1,
    Split = 2,
    Merge = 3,
    /// A punt claim batch.
    Claim = 4,
}

/// An in-memory [`EmbeddedStore`] with one armed fault.
pub(crate) struct FaultyStore {
    inner: EmbeddedStore,
    armed: AtomicU8,
}

impl FaultyStore {
    pub(crate) fn new() -> Self {
        Self {
            inner: EmbeddedStore::in_memory(),
            armed: AtomicU8::new(StoreFault::None as u8),
        }
    }

    /// The next write of kind `f` fails.
    pub(crate) fn fail_once(&self, f: StoreFault) {
        self.armed.store(f as u8, Ordering::SeqCst);
    }

    fn trip(&self, f: StoreFault) -> Result<(), CoordError> {
        if self
            .armed
            .compare_exchange(
                f as u8,
                StoreFault::None as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return Err(CoordError::Io {
                path: PathBuf::from("fault-injected"),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl CoordStore for FaultyStore {
    async fn groups(&self, service: &str) -> Result<Vec<GroupEntry>, CoordError> {
        self.inner.groups(service).await
    }

    async fn group_of(&self, service: &str, unit: u32) -> Result<GroupEntry, CoordError> {
        self.inner.group_of(service, unit).await
    }

    async fn init(&self, service: &str, groups: &[(Group, String)]) -> Result<bool, CoordError> {
        self.inner.init(service, groups).await
    }

    async fn reset(&self, service: &str, groups: &[(Group, String)]) -> Result<(), CoordError> {
        self.inner.reset(service, groups).await
    }

    async fn move_group(
        &self,
        service: &str,
        group: Group,
        version: Version,
        to: &str,
    ) -> Result<Version, CoordError> {
        self.trip(StoreFault::Move)?;
        self.inner.move_group(service, group, version, to).await
    }

    async fn split(
        &self,
        service: &str,
        group: Group,
        version: Version,
    ) -> Result<[GroupEntry; 2], CoordError> {
        self.trip(StoreFault::Split)?;
        self.inner.split(service, group, version).await
    }

    async fn merge(
        &self,
        service: &str,
        a: (Group, Version),
        b: (Group, Version),
    ) -> Result<GroupEntry, CoordError> {
        self.trip(StoreFault::Merge)?;
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
        self.trip(StoreFault::Claim)?;
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

#[cfg(test)]
mod tests;
