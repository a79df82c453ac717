//! SLA origin rules' tiers: which of a rule's subset instances each of the
//! tier's `TIER_SLOTS` slots sends the rule's packets to.
//!
//! [`next_tier`] is pure: the subset (who is live, how loaded), the rule's
//! `spill` and the service's thresholds, and the tier as it is, in; the
//! tier as it should be, out. Changes are as small as they can be (as
//! Maglev's table): a failed or drained instance's slots go to the others,
//! which keep theirs; one that comes back takes slots from the busiest
//! holders only. With `spill`, a saturated subset turns one more slot a
//! control interval into [`SPILL`] (the service's other instances take
//! those packets), and an idle one turns one back.
//!
//! [`Controller::origin_step`] applies it to every rule each interval.

use sluice_common::maps::{NO_OWNER, SPILL, TIER_SLOTS, Tier};

use super::{ControlError, Controller, qos::Thresholds};
use crate::{datapath::Datapath, plan::Plan};

/// A subset instance as one interval sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Member {
    pub id: u32,
    /// Neither failed nor drained: it may hold slots.
    pub live: bool,
    pub utilisation: f64,
}

/// Slots of `tier` that spill over.
#[must_use]
pub fn spilled(tier: &Tier) -> u32 {
    let n = tier.slots.iter().filter(|s| **s == SPILL).count();
    u32::try_from(n).expect("at most TIER_SLOTS")
}

/// The tier a rule should have, from the one it has (see the module
/// doc). Without a live member every slot spills (with `spill`) or has
/// nobody. Every live member overloaded by `t`: one more slot spills
/// over; every one under-loaded: one spilled slot comes back.
#[must_use]
pub fn next_tier(members: &[Member], spill: bool, t: Thresholds, current: &Tier) -> Tier {
    let live: Vec<&Member> = members.iter().filter(|m| m.live).collect();
    let mut next = Tier::default();
    if live.is_empty() {
        next.slots = [if spill { SPILL } else { NO_OWNER }; TIER_SLOTS as usize];
        return next;
    }
    let is_live = |s: u32| live.iter().any(|m| m.id == s);
    // Spilled slots are kept only while the subset holds some slots: a
    // tier that spilled whole because nobody was live is refilled whole.
    let keep_spill = spill && current.slots.iter().any(|s| is_live(*s));
    let mut slots = current.slots;
    for s in &mut slots {
        if !(is_live(*s) || (*s == SPILL && keep_spill)) {
            *s = NO_OWNER;
        }
    }
    let count = |slots: &[u32], id: u32| slots.iter().filter(|s| **s == id).count();
    // The live member with the fewest (`most` false) or most slots; ties
    // go to the first in config order (fewest) or the last (most).
    let pick = |slots: &[u32], most: bool| -> u32 {
        let by = |m: &&&Member| count(slots, m.id);
        if most {
            live.iter().max_by_key(by).map(|m| m.id)
        } else {
            live.iter().min_by_key(by).map(|m| m.id)
        }
        .expect("some member is live")
    };
    // Orphaned slots (their instance failed or was drained) to the live
    // members with the fewest.
    for k in 0..slots.len() {
        if slots[k] == NO_OWNER {
            slots[k] = pick(&slots, false);
        }
    }
    // A member back from failure or drain takes slots from the busiest,
    // one at a time, the busiest's last slot first.
    loop {
        let (lo, hi) = (pick(&slots, false), pick(&slots, true));
        if count(&slots, hi) <= count(&slots, lo) + 1 {
            break;
        }
        let k = slots
            .iter()
            .rposition(|s| *s == hi)
            .expect("hi holds slots");
        slots[k] = lo;
    }
    if spill {
        let held = slots.iter().filter(|s| **s != SPILL).count();
        if live.iter().all(|m| t.is_overloaded(m.utilisation)) && held > 1 {
            let hi = pick(&slots, true);
            let k = slots
                .iter()
                .rposition(|s| *s == hi)
                .expect("hi holds slots");
            slots[k] = SPILL;
        } else if live.iter().all(|m| t.is_underloaded(m.utilisation))
            && let Some(k) = slots.iter().position(|s| *s == SPILL)
        {
            slots[k] = pick(&slots, false);
        }
    }
    next.slots = slots;
    next
}

/// An origin rule as the control loop keeps it.
#[derive(Clone, Debug)]
pub(super) struct RuleCtl {
    name: String,
    /// The subset: (name, instance id).
    members: Vec<(String, u32)>,
    spill: bool,
}

/// The origin rules of service `service_id` in `plan`, in config order.
pub(super) fn rules(plan: &Plan, service_id: u32) -> Vec<RuleCtl> {
    plan.services[service_id as usize]
        .origins
        .iter()
        .map(|r| RuleCtl {
            name: r.name.clone(),
            members: r
                .instances
                .iter()
                .filter_map(|id| Some((plan.instance(*id)?.name.clone(), *id)))
                .collect(),
            spill: r.spill,
        })
        .collect()
}

impl Controller {
    /// Brings every origin rule's tier in line with its subset: slots of
    /// failed or drained instances to the others, and, with `spill`, one
    /// slot a step more or less spilled as the subset is saturated or
    /// idle.
    pub(super) fn origin_step(&self, dp: &mut dyn Datapath) -> Result<(), ControlError> {
        for s in &self.services {
            let t = s.thresholds;
            for (k, rule) in (0..).zip(&s.origins) {
                let members: Vec<Member> = rule
                    .members
                    .iter()
                    .map(|(name, id)| Member {
                        id: *id,
                        live: !self.health.is_failed(name) && !self.drains.is_drained(name),
                        utilisation: s
                            .instances
                            .iter()
                            .find(|i| &i.name == name)
                            .map_or(0.0, |i| i.sample.utilisation),
                    })
                    .collect();
                let current = dp.tier(s.id, k)?;
                let next = next_tier(&members, rule.spill, t, &current);
                if next == current {
                    continue;
                }
                dp.set_tier(s.id, k, &next)?;
                let (before, after) = (spilled(&current), spilled(&next));
                if before == after {
                    tracing::debug!(service = %s.name, rule = %rule.name, "origin tier's slots moved within its subset");
                } else {
                    tracing::info!(service = %s.name, rule = %rule.name, before, after, of = TIER_SLOTS, "origin tier: slots spilling over to the service's other instances");
                    crate::telemetry::origin_spill(&s.name, &rule.name, after);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds::new(0.8, 0.3);

    fn members(live: &[(u32, bool)], utilisation: f64) -> Vec<Member> {
        live.iter()
            .map(|&(id, live)| Member {
                id,
                live,
                utilisation,
            })
            .collect()
    }

    fn count(t: &Tier, id: u32) -> usize {
        t.slots.iter().filter(|s| **s == id).count()
    }

    /// The tier of a fresh rule of subset `ids`, all live and idle-ish.
    fn fresh(ids: &[u32]) -> Tier {
        let m: Vec<(u32, bool)> = ids.iter().map(|i| (*i, true)).collect();
        next_tier(&members(&m, 0.5), false, T, &Tier::default())
    }

    #[test]
    fn a_fresh_tier_is_the_subset_round_robin() {
        let t = fresh(&[3, 4, 5]);
        for (k, s) in t.slots.iter().enumerate() {
            assert_eq!(*s, [3, 4, 5][k % 3], "slot {k}");
        }
    }

    #[test]
    fn a_failed_instances_slots_go_to_the_others_and_only_its() {
        let before = fresh(&[3, 4, 5]);
        let after = next_tier(
            &members(&[(3, true), (4, false), (5, true)], 0.5),
            false,
            T,
            &before,
        );
        for (k, (b, a)) in before.slots.iter().zip(after.slots).enumerate() {
            if *b == 4 {
                assert!(a == 3 || a == 5, "slot {k}: {a}");
            } else {
                assert_eq!(a, *b, "slot {k} kept its instance");
            }
        }
        assert!(
            count(&after, 3).abs_diff(count(&after, 5)) <= 1,
            "{after:?}"
        );
        // Back again: it takes slots from the others, which keep the rest.
        let back = next_tier(
            &members(&[(3, true), (4, true), (5, true)], 0.5),
            false,
            T,
            &after,
        );
        for id in [3, 4, 5] {
            assert!((21..=22).contains(&count(&back, id)), "{id}: {back:?}");
        }
        let moved = after
            .slots
            .iter()
            .zip(back.slots)
            .filter(|(a, b)| **a != *b)
            .count();
        assert_eq!(
            moved,
            count(&back, 4),
            "only the returning one's slots moved"
        );
    }

    #[test]
    fn nobody_live_is_nobody_or_spill() {
        let before = fresh(&[3, 4]);
        let dead = members(&[(3, false), (4, false)], 0.5);
        let none = next_tier(&dead, false, T, &before);
        assert!(none.slots.iter().all(|s| *s == NO_OWNER), "{none:?}");
        let spill = next_tier(&dead, true, T, &before);
        assert!(spill.slots.iter().all(|s| *s == SPILL), "{spill:?}");
        // One back: the whole tier is its again, at once.
        let back = next_tier(&members(&[(3, true), (4, false)], 0.5), true, T, &spill);
        assert!(back.slots.iter().all(|s| *s == 3), "{back:?}");
    }

    #[test]
    fn a_saturated_subset_spills_one_slot_an_interval_and_takes_them_back_when_idle() {
        let mut tier = fresh(&[3, 4]);
        let hot = members(&[(3, true), (4, true)], 0.9);
        for step in 1..=5 {
            tier = next_tier(&hot, true, T, &tier);
            assert_eq!(spilled(&tier), step, "{tier:?}");
            assert!(count(&tier, 3).abs_diff(count(&tier, 4)) <= 1);
        }
        // One member not saturated: nothing changes.
        let mixed = vec![
            Member {
                id: 3,
                live: true,
                utilisation: 0.9,
            },
            Member {
                id: 4,
                live: true,
                utilisation: 0.5,
            },
        ];
        assert_eq!(next_tier(&mixed, true, T, &tier), tier);
        let idle = members(&[(3, true), (4, true)], 0.1);
        for step in (0..5).rev() {
            tier = next_tier(&idle, true, T, &tier);
            assert_eq!(spilled(&tier), step, "{tier:?}");
        }
        assert_eq!(tier, fresh(&[3, 4]), "back where it started");
        // Never beyond one slot left to the subset.
        let mut tier = fresh(&[3]);
        for _ in 0..2 * TIER_SLOTS {
            tier = next_tier(&members(&[(3, true)], 5.0), true, T, &tier);
        }
        assert_eq!(spilled(&tier), TIER_SLOTS - 1);
    }

    /// A host where veths `gone` have disappeared.
    struct Host {
        gone: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    }

    impl crate::control::qos::Probe for Host {
        fn link_exists(&self, ifindex: u32) -> bool {
            !self.gone.lock().unwrap().contains(&ifindex)
        }

        fn netns_stats(
            &self,
            _: &std::path::Path,
            _: &[u16],
        ) -> std::io::Result<crate::control::qos::NetnsStats> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        fn cgroup_usage_usec(&self, _: &std::path::Path) -> std::io::Result<u64> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        fn resolve(&self, _: &crate::config::Instance) -> Option<crate::plan::Resolved> {
            None
        }
    }

    #[test]
    fn the_control_loop_keeps_tiers_on_live_subset_instances_which_own_no_units() {
        use std::{
            sync::{Arc, Mutex},
            time::{Duration, Instant},
        };

        use crate::{
            coord::EmbeddedStore,
            datapath::{
                Datapath,
                fake::{Fault, Faulty, MemDatapath},
            },
            testing::{config, plan, ready},
        };
        let mut text = String::from(
            "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n\
             assign = \"on-demand\"\n\n[[service.origin]]\nname = \"gold\"\n\
             prefixes = [\"198.18.5.0/24\"]\ninstances = [\"kv-2\", \"kv-3\"]\n",
        );
        text.extend(
            (0..4).map(|i| format!("\n[[service.instance]]\nname = \"kv-{i}\"\nveth = \"v{i}\"\n")),
        );
        let cfg = config(&text);
        let mut plan = plan(&cfg);
        let gone = Arc::new(Mutex::new(Vec::new()));
        let mut ctl = ready(Controller::new(
            &cfg,
            &mut plan,
            Arc::new(EmbeddedStore::in_memory()),
        ))
        .expect("controller")
        .with_probe(Box::new(Host { gone: gone.clone() }));
        let mut dp = Faulty::new(MemDatapath::default());
        let start = Instant::now();
        let mut n = 0;
        let mut tick = |ctl: &mut Controller, dp: &mut Faulty<MemDatapath>| {
            n += 1;
            ready(ctl.tick(dp, start + Duration::from_secs(n)))
        };
        // kv-2 and kv-3 are ids 3 and 4 (veths on ifindex 103 and 104).
        tick(&mut ctl, &mut dp).expect("tick");
        let tier = dp.tier(0, 0).unwrap();
        assert_eq!(tier, fresh(&[3, 4]), "filled round robin");
        // Claims of punted units go to the others only.
        for unit in (0..sluice_common::UNITS_PER_SERVICE).step_by(4096) {
            let owner = ready(ctl.claim(&mut dp, 0, unit, start)).unwrap();
            assert!(matches!(owner, Some(1 | 2)), "unit {unit}: {owner:?}");
        }
        // Drained: its slots go to kv-2, which keeps its own.
        ctl.set_drained("kv-3", true).unwrap();
        tick(&mut ctl, &mut dp).expect("tick");
        assert!(dp.tier(0, 0).unwrap().slots.iter().all(|s| *s == 3));
        ctl.set_drained("kv-3", false).unwrap();
        // A failed tier write is made again at the next interval.
        dp.fail_once(Fault::SetTier);
        assert!(tick(&mut ctl, &mut dp).is_err(), "the write failed");
        assert!(dp.tier(0, 0).unwrap().slots.iter().all(|s| *s == 3));
        tick(&mut ctl, &mut dp).expect("tick");
        assert_eq!(count(&dp.tier(0, 0).unwrap(), 4), 32);
        // Both gone, without spill: nobody (punted).
        gone.lock().unwrap().extend([103, 104]);
        tick(&mut ctl, &mut dp).expect("tick");
        assert!(dp.tier(0, 0).unwrap().slots.iter().all(|s| *s == NO_OWNER));
        for unit in 0..sluice_common::UNITS_PER_SERVICE {
            assert!(!matches!(dp.owner_of_unit(0, unit), 3 | 4), "unit {unit}");
        }
    }

    #[test]
    fn without_spill_saturation_changes_nothing_and_old_spills_are_refilled() {
        let tier = fresh(&[3, 4]);
        let hot = members(&[(3, true), (4, true)], 0.9);
        assert_eq!(next_tier(&hot, false, T, &tier), tier);
        // The rule lost `spill` on a reload: its spilled slots come back.
        let mut spilt = tier;
        spilt.slots[7] = SPILL;
        spilt.slots[8] = SPILL;
        let refilled = next_tier(&hot, false, T, &spilt);
        assert_eq!(spilled(&refilled), 0);
        assert!(count(&refilled, 3).abs_diff(count(&refilled, 4)) <= 1);
    }
}
