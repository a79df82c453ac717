//! Work unit groups and the initial assignment of a service's units.
//!
//! A group is an aligned power-of-two range of units written like a CIDR
//! prefix: `0x8000/1` is the upper half of the 16-bit unit space. Splitting
//! gives the two halves, merging joins two buddies back.

use std::{fmt, ops::Range, str::FromStr};

use sluice_common::{UNIT_BITS, UNITS_PER_SERVICE};

/// An aligned power-of-two range of work units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    base: u32,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("prefix length {prefix_len} is longer than the unit width {UNIT_BITS}")]
    PrefixTooLong { prefix_len: u32 },
    #[error("base {base:#x} is outside the {UNITS_PER_SERVICE} units of a service")]
    BaseOutOfRange { base: u32 },
    #[error("base {base:#x} is not aligned to a /{prefix_len} group (low bits must be zero)")]
    Unaligned { base: u32, prefix_len: u32 },
    #[error("`{text}` is not a group; write it as BASE/PREFIX_LEN, e.g. 0x8000/1")]
    Syntax { text: String },
}

impl Group {
    /// The whole unit space of a service.
    pub const ALL: Self = Self {
        base: 0,
        prefix_len: 0,
    };

    pub fn new(base: u32, prefix_len: u32) -> Result<Self, GroupError> {
        if prefix_len > UNIT_BITS {
            return Err(GroupError::PrefixTooLong { prefix_len });
        }
        if base >= UNITS_PER_SERVICE {
            return Err(GroupError::BaseOutOfRange { base });
        }
        let size = 1u32 << (UNIT_BITS - prefix_len);
        if base & (size - 1) != 0 {
            return Err(GroupError::Unaligned { base, prefix_len });
        }
        Ok(Self {
            base,
            prefix_len: u8::try_from(prefix_len).expect("checked against UNIT_BITS"),
        })
    }

    #[must_use]
    pub const fn base(self) -> u32 {
        self.base
    }

    #[must_use]
    pub const fn prefix_len(self) -> u32 {
        self.prefix_len as u32
    }

    /// Number of units in the group.
    #[must_use]
    pub const fn size(self) -> u32 {
        1 << (UNIT_BITS - self.prefix_len as u32)
    }

    #[must_use]
    pub const fn units(self) -> Range<u32> {
        self.base..self.base + self.size()
    }

    #[must_use]
    pub const fn contains(self, unit: u32) -> bool {
        unit >= self.base && unit < self.base + self.size()
    }

    /// The two halves, or `None` for a single unit.
    #[must_use]
    pub fn split(self) -> Option<(Self, Self)> {
        if self.prefix_len() == UNIT_BITS {
            return None;
        }
        let half = self.size() / 2;
        let p = self.prefix_len + 1;
        Some((
            Self {
                base: self.base,
                prefix_len: p,
            },
            Self {
                base: self.base + half,
                prefix_len: p,
            },
        ))
    }

    /// The other half of the group this one was split from.
    #[must_use]
    pub const fn buddy(self) -> Option<Self> {
        if self.prefix_len == 0 {
            return None;
        }
        Some(Self {
            base: self.base ^ self.size(),
            prefix_len: self.prefix_len,
        })
    }

    /// The group two buddies merge into.
    #[must_use]
    pub fn merge(self, other: Self) -> Option<Self> {
        (self.buddy() == Some(other)).then(|| Self {
            base: self.base.min(other.base),
            prefix_len: self.prefix_len - 1,
        })
    }
}

/// The fewest groups whose units share an owner: `owners[u]` is unit `u`'s
/// owner, for every unit of a service. Groups are as large as the owners
/// allow, so a table written from groups comes back as those groups (or
/// larger ones, where buddies had one owner).
///
/// # Panics
/// If `owners` does not hold exactly one owner per unit.
#[must_use]
pub fn coalesce(owners: &[u32]) -> Vec<(Group, u32)> {
    assert_eq!(owners.len(), UNITS_PER_SERVICE as usize, "one owner a unit");
    let mut out = Vec::new();
    let mut todo = vec![Group::ALL];
    while let Some(g) = todo.pop() {
        let first = owners[g.base as usize];
        if g.units().all(|u| owners[u as usize] == first) {
            out.push((g, first));
        } else if let Some((lo, hi)) = g.split() {
            // Upper half first, so the lower comes out first.
            todo.push(hi);
            todo.push(lo);
        }
    }
    out
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}/{}", self.base, self.prefix_len)
    }
}

impl FromStr for Group {
    type Err = GroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || GroupError::Syntax { text: s.to_owned() };
        let (base, len) = s.split_once('/').ok_or_else(syntax)?;
        let base = match base.strip_prefix("0x").or_else(|| base.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => base.parse(),
        }
        .map_err(|_| syntax())?;
        let len = len.parse().map_err(|_| syntax())?;
        Self::new(base, len)
    }
}

/// The fewest aligned groups that exactly cover units `start..end`.
#[must_use]
pub fn cover(start: u32, end: u32) -> Vec<Group> {
    let mut groups = Vec::new();
    let mut at = start;
    while at < end {
        // Largest aligned block starting at `at` that fits before `end`.
        let align = if at == 0 {
            UNITS_PER_SERVICE
        } else {
            1 << at.trailing_zeros()
        };
        let mut size = align.min(UNITS_PER_SERVICE);
        while at + size > end {
            size /= 2;
        }
        let prefix_len = UNIT_BITS - size.trailing_zeros();
        groups.push(Group::new(at, prefix_len).expect("aligned by construction"));
        at += size;
    }
    groups
}

/// Splits a service's units evenly over `n` instances: instance `i` gets
/// units `i*U/n .. (i+1)*U/n` as aligned groups. Shares differ by at most
/// one unit.
#[must_use]
pub fn even(n: usize) -> Vec<Vec<Group>> {
    let n = u64::try_from(n).expect("usize fits u64");
    let u = u64::from(UNITS_PER_SERVICE);
    let bound = |i: u64| u32::try_from(i * u / n).expect("at most UNITS_PER_SERVICE");
    (0..n).map(|i| cover(bound(i), bound(i + 1))).collect()
}

/// Owner of every unit of one service, as the agent computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitTable {
    owners: Vec<u32>,
}

impl UnitTable {
    /// Table from (group, owner) pairs; units no group covers have no owner.
    #[must_use]
    pub fn from_groups<'a>(groups: impl IntoIterator<Item = (&'a Group, u32)>) -> Self {
        let mut owners = vec![sluice_common::maps::NO_OWNER; UNITS_PER_SERVICE as usize];
        for (g, owner) in groups {
            for u in g.units() {
                owners[u as usize] = owner;
            }
        }
        Self { owners }
    }

    /// Owner of `unit`.
    #[must_use]
    pub fn owner(&self, unit: u32) -> u32 {
        self.owners[unit as usize]
    }

    /// All owners, indexed by unit.
    #[must_use]
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_gives_back_the_groups_a_table_was_written_from() {
        let groups: Vec<(Group, u32)> = vec![
            ("0x0000/2".parse().unwrap(), 1),
            ("0x4000/3".parse().unwrap(), 2),
            ("0x6000/3".parse().unwrap(), 2),
            ("0x8000/16".parse().unwrap(), 3),
            ("0x8001/16".parse().unwrap(), 1),
            ("0x8002/15".parse().unwrap(), 2),
            ("0x8004/14".parse().unwrap(), 2),
        ];
        let mut rest = cover(0x8008, UNITS_PER_SERVICE)
            .into_iter()
            .map(|g| (g, 3))
            .collect();
        let mut all = groups.clone();
        all.append(&mut rest);
        let table = UnitTable::from_groups(all.iter().map(|(g, o)| (g, *o)));
        let back = coalesce(table.owners());
        // Same owner of every unit, and buddies of one owner joined.
        assert_eq!(
            UnitTable::from_groups(back.iter().map(|(g, o)| (g, *o))).owners(),
            table.owners()
        );
        assert!(back.contains(&("0x4000/2".parse().unwrap(), 2)));
        assert!(back.contains(&("0x8002/15".parse().unwrap(), 2)));
        assert!(back.contains(&("0x8004/14".parse().unwrap(), 2)));
        assert!(back.contains(&("0x0000/2".parse().unwrap(), 1)));
        // A partition: sizes add up to the units (and the table matched).
        assert_eq!(
            back.iter().map(|(g, _)| g.size()).sum::<u32>(),
            UNITS_PER_SERVICE
        );
        assert_eq!(
            coalesce(&vec![7; UNITS_PER_SERVICE as usize]),
            vec![(Group::ALL, 7)]
        );
    }

    #[test]
    fn display_and_parse_round_trip() {
        let g: Group = "0x8000/1".parse().unwrap();
        assert_eq!(g.units(), 0x8000..0x10000);
        assert_eq!(g.to_string(), "0x8000/1");
        assert_eq!("0x0000/0".parse::<Group>().unwrap(), Group::ALL);
        assert_eq!(
            "0x8001/1".parse::<Group>(),
            Err(GroupError::Unaligned {
                base: 0x8001,
                prefix_len: 1
            })
        );
        assert!(matches!(
            "0x8000".parse::<Group>(),
            Err(GroupError::Syntax { .. })
        ));
        assert!(matches!(
            "0x0/17".parse::<Group>(),
            Err(GroupError::PrefixTooLong { .. })
        ));
    }

    #[test]
    fn split_and_merge_are_inverses() {
        let mut g = Group::ALL;
        for _ in 0..UNIT_BITS {
            let (lo, hi) = g.split().unwrap();
            assert_eq!(lo.buddy(), Some(hi));
            assert_eq!(lo.merge(hi), Some(g));
            assert_eq!(hi.merge(lo), Some(g));
            assert_eq!(lo.size() + hi.size(), g.size());
            g = hi;
        }
        assert_eq!(g.size(), 1);
        assert_eq!(g.split(), None);
        assert_eq!(Group::ALL.buddy(), None);
    }

    #[test]
    fn non_buddies_do_not_merge() {
        let a: Group = "0x4000/2".parse().unwrap();
        let b: Group = "0x8000/2".parse().unwrap();
        assert_eq!(a.merge(b), None, "adjacent but not buddies");
    }

    #[test]
    fn cover_is_exact_and_aligned() {
        for (start, end) in [
            (0, 65536),
            (0, 21845),
            (21845, 43690),
            (43690, 65536),
            (7, 8),
            (1, 65535),
        ] {
            let gs = cover(start, end);
            let mut at = start;
            for g in &gs {
                assert_eq!(g.base(), at, "groups of {start}..{end} must be contiguous");
                at += g.size();
            }
            assert_eq!(at, end);
        }
        assert_eq!(cover(0, 65536), vec![Group::ALL]);
    }

    #[test]
    fn even_partitions_the_key_space() {
        for n in 1..=64 {
            let per = even(n);
            assert_eq!(per.len(), n);
            let sizes: Vec<u32> = per
                .iter()
                .map(|gs| gs.iter().map(|g| g.size()).sum())
                .collect();
            assert_eq!(sizes.iter().sum::<u32>(), UNITS_PER_SERVICE, "n={n}");
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: shares {min}..{max}");
            let owners: Vec<(&Group, u32)> = per
                .iter()
                .enumerate()
                .flat_map(|(i, gs)| gs.iter().map(move |g| (g, u32::try_from(i).unwrap() + 1)))
                .collect();
            let table = UnitTable::from_groups(owners);
            assert!(
                table.owners().iter().all(|&o| o != 0),
                "n={n}: every unit owned"
            );
        }
    }
}
