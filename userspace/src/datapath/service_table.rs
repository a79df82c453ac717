//! Where each service key sits in the data path's service table: two-choice
//! cuckoo hashing over an array, so the data path finds a service with at
//! most two array loads and a three-word compare, where a BPF hash map
//! hashes the whole key and walks a bucket on every packet.
//!
//! The table has two halves of [`slots_for`] slots. The agent writes a
//! whole new layout into the half the data path does not read, then flips
//! `HostEntry::service_half`: a packet sees the old services or the new
//! ones, never a half-written slot.

use sluice_common::maps::{ServiceEntry, ServiceKey, ServiceSlot};

/// Largest half: `ServiceKey::slots` draws each slot from 16 bits.
pub const MAX_SLOTS: u32 = 1 << 16;
const _: () = assert!(sluice_common::MAX_ENDPOINTS * 4 <= MAX_SLOTS as usize);

/// Evictions tried before a key is declared unplaceable. With the table at
/// most a quarter full, cuckoo insertion needs a handful; this only stops
/// a pathological input from spinning.
const MAX_KICKS: usize = 1024;

/// Slots in each half of the table for `keys` service keys: a power of two
/// at least four times the keys (so placement succeeds at once in
/// practice), at least 64, at most [`MAX_SLOTS`].
#[must_use]
pub fn slots_for(keys: usize) -> u32 {
    let want = u32::try_from(keys.saturating_mul(4)).unwrap_or(u32::MAX);
    want.max(64)
        .checked_next_power_of_two()
        .unwrap_or(MAX_SLOTS)
        .min(MAX_SLOTS)
}

/// No layout puts every key in one of its two slots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{keys} service endpoints (VIP, port, protocol, VLAN) do not fit the data path's service table of {slots} slots; configure fewer endpoints (at most {} per host)",
    sluice_common::MAX_ENDPOINTS
)]
pub struct TableFull {
    pub keys: usize,
    pub slots: u32,
}

/// A layout of `services` in a half of `slots` slots (a power of two):
/// every key in one of its two candidate slots, the rest empty.
pub fn place(
    services: &[(ServiceKey, ServiceEntry)],
    slots: u32,
) -> Result<Vec<ServiceSlot>, TableFull> {
    debug_assert!(slots.is_power_of_two() && slots <= MAX_SLOTS);
    let full = || TableFull {
        keys: services.len(),
        slots,
    };
    let mask = slots - 1;
    let mut table = vec![ServiceSlot::default(); slots as usize];
    let empty = |s: &ServiceSlot| s.key.family == 0;
    for &(key, entry) in services {
        let mut moving = ServiceSlot { key, entry };
        let (a, _) = key.slots(mask);
        let mut at = a;
        let mut placed = false;
        for _ in 0..MAX_KICKS {
            let (a, b) = moving.key.slots(mask);
            if let Some(free) = [a, b].into_iter().find(|&s| empty(&table[s as usize])) {
                table[free as usize] = moving;
                placed = true;
                break;
            }
            // Both taken: take the slot other than the one this key was
            // just pushed out of, and move its occupant on.
            at = if at == a { b } else { a };
            std::mem::swap(&mut table[at as usize], &mut moving);
        }
        if !placed {
            return Err(full());
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use sluice_common::maps::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

    use super::*;

    fn key(i: u32) -> ServiceKey {
        ServiceKey {
            addr: [0xc612_0000 | (i >> 4), 0, 0, 0],
            port_be: u16::try_from(7000 + (i & 15)).unwrap().to_be(),
            proto: if i.is_multiple_of(3) {
                PROTO_TCP
            } else {
                PROTO_UDP
            },
            family: FAMILY_V4,
            vlan: 0,
            pad: 0,
        }
    }

    fn entry(i: u32) -> ServiceEntry {
        ServiceEntry {
            id: i,
            ..ServiceEntry::default()
        }
    }

    /// What the data path does: the live half, two slots, a full compare.
    fn find(table: &[ServiceSlot], k: &ServiceKey) -> Option<ServiceEntry> {
        let mask = u32::try_from(table.len()).unwrap() - 1;
        let (a, b) = k.slots(mask);
        [a, b]
            .into_iter()
            .map(|s| table[s as usize])
            .find(|s| s.key.words() == k.words())
            .map(|s| s.entry)
    }

    #[test]
    fn every_key_is_found_in_one_of_its_two_slots() {
        for n in [0, 1, 2, 16, 255, 1000, 4096, 16_384] {
            let services: Vec<_> = (0..n).map(|i| (key(i), entry(i))).collect();
            let slots = slots_for(services.len());
            let table = place(&services, slots).unwrap_or_else(|e| panic!("{n} keys: {e}"));
            for (k, e) in &services {
                assert_eq!(find(&table, k), Some(*e), "{n} keys: key {k:?} not found");
            }
            let used = table.iter().filter(|s| s.key.family != 0).count();
            assert_eq!(used, services.len(), "{n} keys: {used} slots used");
        }
    }

    #[test]
    fn keys_that_are_not_there_are_not_found() {
        let services: Vec<_> = (0..300).map(|i| (key(i), entry(i))).collect();
        let table = place(&services, slots_for(300)).unwrap();
        for i in 300..3000 {
            assert_eq!(
                find(&table, &key(i)),
                None,
                "key {i} found but never placed"
            );
        }
        // Another family, VLAN or protocol is another key.
        let mut k = key(5);
        k.vlan = 7;
        assert_eq!(find(&table, &k), None);
        k = key(5);
        k.family = FAMILY_V6;
        assert_eq!(find(&table, &k), None);
    }

    #[test]
    fn a_table_too_small_is_refused_not_overfilled() {
        let services: Vec<_> = (0..100).map(|i| (key(i), entry(i))).collect();
        let err = place(&services, 64).unwrap_err();
        assert_eq!(
            err,
            TableFull {
                keys: 100,
                slots: 64
            }
        );
        assert!(
            err.to_string().contains("configure fewer endpoints"),
            "{err}"
        );
    }

    #[test]
    fn table_sizes_are_powers_of_two_with_room() {
        assert_eq!(slots_for(0), 64);
        assert_eq!(slots_for(16), 64);
        assert_eq!(slots_for(17), 128);
        assert_eq!(slots_for(256), 1024);
        assert_eq!(slots_for(1 << 20), MAX_SLOTS);
    }
}
