//! The program's counters read back, summed over CPUs: global, per
//! service, per instance, unit hits, and the pinned flows counted on a
//! thread of their own.

use std::{path::PathBuf, time::Duration};

use aya::maps::{HashMap, MapData, PerCpuArray};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE, counters,
    maps::{InstanceCounters, Pin, PinKey, ServiceCounters, names},
};

use super::{XdpDatapath, map_err};
use crate::datapath::{DatapathError, GlobalCounters};

impl XdpDatapath {
    /// Global counters summed over CPUs (`delivered` from the services').
    pub(super) fn sum_global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::GLOBAL_COUNTERS)?;
        let mut out = [0u64; counters::COUNT as usize];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            *slot = map
                .get(&i, 0)
                .map_err(map_err(names::GLOBAL_COUNTERS))?
                .iter()
                .sum();
        }
        // The data path counts a delivered packet in its service only.
        let services: PerCpuArray<&MapData, ServiceCounters> = self.map(names::SERVICE_COUNTERS)?;
        for id in 0..services.len() {
            out[counters::DELIVERED as usize] += self.sum_service_counters(id)?.delivered;
        }
        Ok(out)
    }

    /// Counters of service `id`, summed over CPUs.
    pub(super) fn sum_service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        self.per_cpu_sum(names::SERVICE_COUNTERS, id)
    }

    /// What was delivered to instance `id`, summed over CPUs.
    pub(super) fn sum_instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        self.per_cpu_sum(names::INSTANCE_COUNTERS, id)
    }

    /// Hit counts of service `id`'s unit buckets, summed over CPUs.
    pub(super) fn sum_unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::UNIT_HITS)?;
        (0..HIT_BUCKETS_PER_SERVICE)
            .map(|b| {
                map.get(&(id * HIT_BUCKETS_PER_SERVICE + b), 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_err(names::UNIT_HITS))
            })
            .collect()
    }

    /// Entry `id` of per-CPU map `name`, summed over CPUs.
    fn per_cpu_sum<T>(&self, name: &'static str, id: u32) -> Result<T, DatapathError>
    where
        T: aya::Pod + Default + std::ops::AddAssign,
    {
        let map: PerCpuArray<&MapData, T> = self.map(name)?;
        let mut sum = T::default();
        for c in map.get(&id, 0).map_err(map_err(name))?.iter() {
            sum += *c;
        }
        Ok(sum)
    }
}

/// Counts the pinned-flow map pinned at `path` every `every`, on a thread
/// of its own, into `sluice_pinned_flows`: a walk of a full map is a
/// million `bpf()` calls, which the control loop should not wait for.
pub fn count_pinned_flows(path: PathBuf, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("sluice-pin-count".into())
        .spawn(move || {
            loop {
                match MapData::from_pin(&path) {
                    Ok(data) => {
                        let map: Result<HashMap<_, PinKey, Pin>, _> =
                            HashMap::try_from(aya::maps::Map::LruHashMap(data));
                        if let Ok(map) = map {
                            let n = map.keys().map_while(Result::ok).count();
                            crate::telemetry::pinned_flows(n as u64);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, path = %path.display(), "pinned-flow map not readable");
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to count pinned flows");
    }
}
