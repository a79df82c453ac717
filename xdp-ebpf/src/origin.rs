//! SLA origin rules: the tier slot a client of a rule is steered to.

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use sluice_common::{
    counters,
    encap::Gue,
    maps::{NO_OWNER, ORIGIN_RULES, OriginKey, SPILL, ServiceEntry, origin_key, tier_slot},
    parse::Flow,
};

use crate::{
    count::bump,
    maps::{GLOBAL_COUNTERS, ORIGIN, TIERS},
};

/// The owner an SLA origin rule gives a packet of `svc`: `None` when the
/// service has no rules, the source is in no rule's prefix, or its tier
/// slot spills over (the unit's owner takes it); else the slot's instance,
/// or `NO_OWNER` (punted). A cluster member's packet (`peer`) carries its
/// target already.
#[inline(always)]
pub(crate) fn tier_owner(
    flow: &Flow,
    svc: &ServiceEntry,
    unit: u32,
    peer: Option<Gue>,
) -> Option<u32> {
    if svc.flags & ORIGIN_RULES == 0 || peer.is_some() {
        return None;
    }
    // Every bit of the key: the longest prefix of the service's rules
    // holding the source matches.
    let key = LpmKey::new(
        u32::try_from(size_of::<OriginKey>() * 8).unwrap_or(0),
        origin_key(svc.id, flow.family, flow.src),
    );
    let tier = *ORIGIN.get(&key)?;
    let slot = TIERS
        .get(tier)
        .and_then(|t| t.slots.get(tier_slot(unit) as usize).copied())
        .unwrap_or(NO_OWNER);
    if slot == SPILL {
        bump(&GLOBAL_COUNTERS, counters::ORIGIN_SPILLED);
        return None;
    }
    bump(&GLOBAL_COUNTERS, counters::ORIGIN);
    Some(slot)
}
