//! The changes every backend makes, on one service's groups (sorted by
//! base): each checks the versions it was given first and changes nothing
//! when one is stale. `next` is the backend's version counter.

use super::{ClaimBatch, CoordError, GroupEntry, Version, check_partition};
use crate::plan::Group;

fn fresh(next: &mut Version) -> Version {
    *next += 1;
    *next
}

/// Index of `group` at `version`, or the conflict.
fn find(
    entries: &[GroupEntry],
    service: &str,
    group: Group,
    version: Version,
) -> Result<usize, CoordError> {
    match entries.iter().position(|e| e.group == group) {
        Some(i) if entries[i].version == version => Ok(i),
        found => Err(CoordError::Conflict {
            service: service.to_owned(),
            group,
            expected: version,
            found: found.map(|i| entries[i].version),
        }),
    }
}

/// The assignment `groups` (any order, a partition of the units) as it
/// replaces `found`: a group of `found` with the same extent and owner
/// keeps its version (nothing changed for it), every other is fresh.
pub(super) fn rewrite(
    found: Option<&[GroupEntry]>,
    next: &mut Version,
    service: &str,
    groups: &[(Group, String)],
) -> Result<Vec<GroupEntry>, CoordError> {
    check_partition(groups.iter().map(|(g, _)| g)).map_err(|reason| CoordError::NotAPartition {
        service: service.to_owned(),
        reason,
    })?;
    let kept = |g: Group, o: &str| {
        found?
            .iter()
            .find(|e| e.group == g && e.owner == o)
            .map(|e| e.version)
    };
    let mut out: Vec<GroupEntry> = groups
        .iter()
        .map(|(g, o)| GroupEntry {
            group: *g,
            owner: o.clone(),
            version: kept(*g, o).unwrap_or_else(|| fresh(next)),
        })
        .collect();
    out.sort_by_key(|e| e.group.base());
    Ok(out)
}

pub(super) fn move_group(
    entries: &mut [GroupEntry],
    next: &mut Version,
    service: &str,
    group: Group,
    version: Version,
    to: &str,
) -> Result<Version, CoordError> {
    let i = find(entries, service, group, version)?;
    let v = fresh(next);
    to.clone_into(&mut entries[i].owner);
    entries[i].version = v;
    Ok(v)
}

pub(super) fn split(
    entries: &mut Vec<GroupEntry>,
    next: &mut Version,
    service: &str,
    group: Group,
    version: Version,
) -> Result<[GroupEntry; 2], CoordError> {
    let i = find(entries, service, group, version)?;
    let (lo, hi) = group.split().ok_or(CoordError::Indivisible { group })?;
    let owner = entries[i].owner.clone();
    let halves = [
        GroupEntry {
            group: lo,
            owner: owner.clone(),
            version: fresh(next),
        },
        GroupEntry {
            group: hi,
            owner,
            version: fresh(next),
        },
    ];
    entries.splice(i..=i, halves.clone());
    Ok(halves)
}

pub(super) fn merge(
    entries: &mut Vec<GroupEntry>,
    next: &mut Version,
    service: &str,
    a: (Group, Version),
    b: (Group, Version),
) -> Result<GroupEntry, CoordError> {
    let merged =
        a.0.merge(b.0)
            .ok_or(CoordError::NotBuddies { a: a.0, b: b.0 })?;
    let ia = find(entries, service, a.0, a.1)?;
    let ib = find(entries, service, b.0, b.1)?;
    if entries[ia].owner != entries[ib].owner {
        return Err(CoordError::DifferentOwners { a: a.0, b: b.0 });
    }
    let entry = GroupEntry {
        group: merged,
        owner: entries[ia].owner.clone(),
        version: fresh(next),
    };
    let (first, second) = (ia.min(ib), ia.max(ib));
    entries.remove(second);
    entries[first] = entry.clone();
    Ok(entry)
}

/// The punt path's claims of a batch, as one change (see
/// `CoordStore::claim_units`): each unit of an unowned group splits that
/// group down to `size` units around it and gives the part to the next of
/// `owners` in turn. Cannot conflict: it works on the entries as they are.
pub(super) fn claim_units(
    entries: &mut Vec<GroupEntry>,
    next: &mut Version,
    service: &str,
    units: &[u32],
    size: u32,
    owners: &[String],
    turn: usize,
) -> Result<ClaimBatch, CoordError> {
    let mut out = ClaimBatch::default();
    for &unit in units {
        // At most 16 splits: each halves the group.
        loop {
            let e = group_of(entries, unit).clone();
            if !e.owner.is_empty() || owners.is_empty() {
                out.owners.push(Some(e.owner));
                break;
            }
            if e.group.size() > size.max(1) {
                split(entries, next, service, e.group, e.version)?;
                continue;
            }
            let to = &owners[(turn + out.claimed.len()) % owners.len()];
            move_group(entries, next, service, e.group, e.version, to)?;
            out.claimed.push((e.group, to.clone()));
            out.owners.push(Some(to.clone()));
            break;
        }
    }
    Ok(out)
}

/// Whether a claim batch would change nothing: every unit owned, or no
/// owner to give one to.
pub(super) fn nothing_to_claim(entries: &[GroupEntry], units: &[u32], owners: &[String]) -> bool {
    owners.is_empty()
        || units
            .iter()
            .all(|&u| !group_of(entries, u).owner.is_empty())
}

/// Each unit's owner as `entries` have it.
pub(super) fn owners_of(entries: &[GroupEntry], units: &[u32]) -> ClaimBatch {
    ClaimBatch {
        owners: units
            .iter()
            .map(|&u| Some(group_of(entries, u).owner.clone()))
            .collect(),
        ..ClaimBatch::default()
    }
}

/// The group of sorted, partitioning `entries` that holds `unit`.
pub(super) fn group_of(entries: &[GroupEntry], unit: u32) -> &GroupEntry {
    // A partition sorted by base: the last group starting at or below the
    // unit holds it.
    let i = entries.partition_point(|e| e.group.base() <= unit);
    &entries[i.checked_sub(1).expect("the first group starts at 0")]
}
