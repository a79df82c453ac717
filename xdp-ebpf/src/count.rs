//! Per-CPU counters: every packet is counted under one reason, its
//! service, its instance and its unit's hit bucket.

use aya_ebpf::maps::PerCpuArray;

/// Updates a per-CPU counter slot, if the lookup found one.
#[inline(always)]
pub(crate) fn count<T>(slot: Option<*mut T>, f: impl FnOnce(&mut T)) {
    if cfg!(feature = "exp-no-counters") {
        return;
    }
    if let Some(p) = slot {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        f(unsafe { &mut *p });
    }
}

/// Adds one to a per-CPU counter, if `index` is in the map.
#[inline(always)]
pub(crate) fn bump(map: &PerCpuArray<u64>, index: u32) {
    if cfg!(feature = "exp-no-counters") {
        return;
    }
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        unsafe { *c += 1 };
    }
}
