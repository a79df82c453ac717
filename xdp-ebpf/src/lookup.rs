//! Lookups in the tables the agent writes: the service a key names, the
//! owner of a unit, and whether an instance is live.

use sluice_common::{
    maps::{
        HostEntry, INSTANCE_LIVE, INSTANCE_REMOTE, InstanceEntry, NO_OWNER, ServiceEntry,
        ServiceKey,
    },
    owner_index,
};

use crate::maps::{INSTANCES, OWNERS, SERVICE_TABLE};

/// The service `key` names, from the live half of the service table.
#[inline(always)]
pub(crate) fn find_service(host: &HostEntry, key: &ServiceKey) -> Option<&'static ServiceEntry> {
    let (a, b) = key.slots(host.service_mask);
    let base = (host.service_half & 1) * (host.service_mask + 1);
    let want = key.words();
    // Word by word: comparing the arrays would call a byte-wise memcmp.
    let same = |w: [u64; 3]| w[0] == want[0] && w[1] == want[1] && w[2] == want[2];
    for slot in [a, b] {
        if let Some(s) = SERVICE_TABLE.get(base + slot)
            && same(s.key.words())
        {
            return Some(&s.entry);
        }
    }
    None
}

#[inline(always)]
pub(crate) fn unit_owner(service_id: u32, unit: u32) -> u32 {
    OWNERS
        .get(owner_index(service_id, unit))
        .copied()
        .unwrap_or(NO_OWNER)
}

/// The instance entry of `owner` if it is live and serves `service_id`.
#[inline(always)]
pub(crate) fn live_instance(owner: u32, service_id: u32) -> Option<&'static InstanceEntry> {
    if owner == NO_OWNER {
        return None;
    }
    INSTANCES
        .get(owner)
        .filter(|i| i.flags & INSTANCE_LIVE != 0 && i.service_id == service_id)
}

/// As [`live_instance`], and on this host.
#[inline(always)]
pub(crate) fn local_live(id: u32, service_id: u32) -> Option<&'static InstanceEntry> {
    live_instance(id, service_id).filter(|i| i.flags & INSTANCE_REMOTE == 0)
}
