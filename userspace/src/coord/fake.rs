//! Stand-ins for unit tests: a store whose next write of one kind fails
//! once, the way a full disk fails the embedded store's persist
//! (`ENOSPC`): nothing of that write is applied; and a cluster's
//! membership in memory.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use super::{
    ClaimBatch, CoordError, CoordStore, EmbeddedStore, Events, GroupEntry, HostRecord,
    InstanceRecord, Load, Membership, Rewrite, Rewritten, Version, membership::in_memory,
};
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

    async fn rewrite(&self, service: &str, f: &Rewrite<'_>) -> Result<Rewritten, CoordError> {
        self.inner.rewrite(service, f).await
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

/// A cluster's membership, in memory: one [`MemMembership`] an agent, all
/// of a test's agents sharing one cluster ([`MemMembership::another_agent`]).
/// No leases: a host is live from its join until its agent leaves.
pub(crate) struct MemMembership {
    cluster: Arc<Mutex<Members>>,
    /// The host this agent joined as.
    joined: Mutex<Option<String>>,
}

#[derive(Default)]
struct Members {
    hosts: BTreeMap<String, HostRecord>,
    instances: BTreeMap<String, InstanceRecord>,
    /// Each service's definition, and the host that stored it first.
    services: BTreeMap<String, (serde_json::Value, String)>,
}

impl MemMembership {
    /// The first agent of a new, empty cluster.
    pub(crate) fn new() -> Self {
        Self {
            cluster: Arc::default(),
            joined: Mutex::new(None),
        }
    }

    /// Another agent of the same cluster.
    pub(crate) fn another_agent(&self) -> Self {
        Self {
            cluster: self.cluster.clone(),
            joined: Mutex::new(None),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.cluster.lock().expect("members lock")
    }
}

#[async_trait::async_trait]
impl Membership for MemMembership {
    async fn join(
        &self,
        host: &HostRecord,
        ttl: Duration,
        _lease_file: &Path,
    ) -> Result<(), CoordError> {
        let mut joined = self.joined.lock().expect("joined lock");
        let mut m = self.members();
        if m.hosts.contains_key(&host.name) && joined.as_deref() != Some(&host.name) {
            return Err(CoordError::HostTaken {
                host: host.name.clone(),
                ttl,
            });
        }
        m.hosts.insert(host.name.clone(), host.clone());
        *joined = Some(host.name.clone());
        Ok(())
    }

    async fn leave(&self) -> Result<(), CoordError> {
        if let Some(name) = self.joined.lock().expect("joined lock").take() {
            self.members().hosts.remove(&name);
        }
        Ok(())
    }

    async fn hosts(&self) -> Result<BTreeMap<String, HostRecord>, CoordError> {
        Ok(self.members().hosts.clone())
    }

    async fn instances(&self) -> Result<BTreeMap<String, InstanceRecord>, CoordError> {
        Ok(self.members().instances.clone())
    }

    async fn register_instances(
        &self,
        host: &str,
        instances: &[(&str, &str)],
    ) -> Result<Vec<u32>, CoordError> {
        let m = &mut *self.members();
        in_memory::register(&mut m.instances, &m.hosts, host, instances)
    }

    async fn retire_instances(&self, host: &str, keep: &[&str]) -> Result<Vec<String>, CoordError> {
        let retired = in_memory::retire(&mut self.members().instances, host, |n| keep.contains(&n));
        Ok(retired)
    }

    async fn update_host(&self, host: &HostRecord) -> Result<(), CoordError> {
        let joined = self.joined.lock().expect("joined lock");
        if joined.as_deref() == Some(&host.name) {
            self.members().hosts.insert(host.name.clone(), host.clone());
        }
        Ok(())
    }

    async fn collect_host(&self, host: &str) -> Result<Vec<String>, CoordError> {
        let m = &mut *self.members();
        if m.hosts.contains_key(host) {
            return Ok(Vec::new());
        }
        Ok(in_memory::retire(&mut m.instances, host, |_| false))
    }

    async fn check_services(
        &self,
        host: &str,
        specs: &[(String, serde_json::Value)],
    ) -> Result<(), CoordError> {
        in_memory::check_specs(&mut self.members().services, host, specs)
    }
}

#[cfg(test)]
mod tests;
