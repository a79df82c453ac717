//! Stable instance ids. The data path knows instances by id (owner array,
//! pinned flows), so an id must mean the same instance for as long as its
//! pins may live: across reloads and restarts, whatever the config's order.
//! The registry of ids (id -> name) is pinned with the data path; each
//! start or reload gives every configured name its registered id, and a
//! name seen for the first time the lowest id no configured name holds.

use std::collections::{HashMap, HashSet};

use sluice_common::MAX_INSTANCES;

/// Ids for `names` (in the same order): a registered name keeps its id; a
/// new one takes the lowest id in `1..=MAX_INSTANCES` that no name of
/// `names` holds. `registered` is (id, name) as the pinned registry has it.
///
/// An id freed by a removed instance may go to a newcomer: the data path
/// bumps the id's generation then, so the pins of the instance that had it
/// no longer hold.
///
/// # Panics
/// If there are more names than ids (the config check allows at most
/// `MAX_INSTANCES`).
#[must_use]
pub fn assign(registered: &[(u32, String)], names: &[&str]) -> Vec<u32> {
    let by_name: HashMap<&str, u32> = registered
        .iter()
        .filter(|(id, _)| (1..=MAX_INSTANCES).contains(id))
        .map(|(id, n)| (n.as_str(), *id))
        .collect();
    let kept: HashSet<u32> = names
        .iter()
        .filter_map(|n| by_name.get(n))
        .copied()
        .collect();
    let mut free = (1..=MAX_INSTANCES).filter(|id| !kept.contains(id));
    let mut seen = HashSet::new();
    names
        .iter()
        .map(|n| match by_name.get(n) {
            // A name twice (the config check refuses it) takes two ids.
            Some(&id) if seen.insert(id) => id,
            _ => free.next().expect("at most MAX_INSTANCES instances"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(entries: &[(u32, &str)]) -> Vec<(u32, String)> {
        entries.iter().map(|(i, n)| (*i, (*n).to_owned())).collect()
    }

    #[test]
    fn without_a_registry_ids_follow_the_config_order() {
        assert_eq!(assign(&[], &["a", "b", "c"]), vec![1, 2, 3]);
    }

    #[test]
    fn a_reorder_keeps_every_id() {
        let r = reg(&[(1, "a"), (2, "b"), (3, "c")]);
        assert_eq!(assign(&r, &["c", "a", "b"]), vec![3, 1, 2]);
    }

    #[test]
    fn a_newcomer_takes_the_lowest_free_id_and_the_others_keep_theirs() {
        // b removed, d added in front: d gets b's old id 2, a and c keep
        // theirs (the data path bumps id 2's generation).
        let r = reg(&[(1, "a"), (2, "b"), (3, "c")]);
        assert_eq!(assign(&r, &["d", "c", "a"]), vec![2, 3, 1]);
        // Two newcomers: 2, then past the held ids.
        assert_eq!(assign(&r, &["e", "a", "c", "f"]), vec![2, 1, 3, 4]);
    }

    #[test]
    fn ids_out_of_range_in_the_registry_are_ignored() {
        let r = reg(&[(0, "a"), (MAX_INSTANCES + 1, "b"), (5, "c")]);
        assert_eq!(assign(&r, &["a", "b", "c"]), vec![1, 2, 5]);
    }

    #[test]
    fn every_id_is_distinct_and_in_range_for_any_registry() {
        // A small exhaustive sweep: registries of up to 4 of 6 names over
        // ids 1..=6, configs of up to 4 names.
        let all = ["a", "b", "c", "d", "e", "f"];
        for mask in 0u32..(1 << 6) {
            let r: Vec<(u32, String)> = (0..6u32)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| (6 - i, all[i as usize].to_owned()))
                .collect();
            for start in 0..3 {
                let names = &all[start..start + 4];
                let ids = assign(&r, names);
                let distinct: HashSet<u32> = ids.iter().copied().collect();
                assert_eq!(distinct.len(), names.len(), "{r:?} {names:?} -> {ids:?}");
                assert!(ids.iter().all(|i| (1..=MAX_INSTANCES).contains(i)));
                for (n, id) in names.iter().zip(&ids) {
                    if let Some((rid, _)) = r.iter().find(|(_, rn)| rn == n) {
                        assert_eq!(rid, id, "{n} kept its id");
                    }
                }
            }
        }
    }
}
