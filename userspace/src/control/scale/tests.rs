//! The scaling policy's unit tests: each rule on hand-made views, the SLA
//! windows, the failure budget and the launch backoff.

#![expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "small test numbers"
)]

use proptest::prelude::*;

use super::*;

const SEC: Duration = Duration::from_secs(1);

/// min 2, max 5, saturated for 3 intervals, idle for 4, cooldown 2 s;
/// the WLM's thresholds are 0.8 and 0.3 (midpoint 0.55).
fn cfg() -> ScaleConfig {
    ScaleConfig {
        min_instances: 2,
        max_instances: 5,
        out_intervals: 3,
        in_intervals: 4,
        cooldown: 2 * SEC,
        drain_deadline: 30 * SEC,
        launcher: None,
        failure: FailureRule::default(),
        windows: Vec::new(),
    }
}

fn eff(cfg: &ScaleConfig) -> Effective {
    Effective {
        min_instances: cfg.min_instances,
        max_instances: cfg.max_instances,
        thresholds: Thresholds::new(0.8, 0.3),
        window: None,
    }
}

/// A live removable member.
fn member(name: &str, utilisation: f64, groups: usize) -> Member<'_> {
    Member {
        name,
        utilisation,
        groups,
        live: true,
        removable: true,
    }
}

/// One decision at `now`, thresholds 0.8 and 0.3.
fn step(
    state: &mut ScaleState,
    cfg: &ScaleConfig,
    members: &[Member<'_>],
    pending: u32,
    now: Instant,
) -> Option<Decision> {
    let eff = eff(cfg);
    state.decide(&ScaleView {
        eff: &eff,
        cfg,
        members,
        pending,
        now,
    })
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "compared with what `decide` returns"
)]
fn launch(reason: Reason) -> Option<Decision> {
    Some(Decision::Launch { reason })
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "compared with what `decide` returns"
)]
fn stop(name: &str, reason: Reason) -> Option<Decision> {
    Some(Decision::Stop {
        name: name.into(),
        reason,
    })
}

#[test]
fn below_min_launches_and_counts_launches_under_way() {
    let cfg = cfg();
    let now = Instant::now();
    let one = [member("a", 0.5, 4)];
    assert_eq!(
        step(&mut ScaleState::default(), &cfg, &one, 0, now),
        launch(Reason::BelowMin)
    );
    assert_eq!(step(&mut ScaleState::default(), &cfg, &one, 1, now), None);
    // A failed member does not count.
    let failed = [
        member("a", 0.5, 4),
        Member {
            live: false,
            ..member("b", 0.0, 0)
        },
    ];
    assert_eq!(
        step(&mut ScaleState::default(), &cfg, &failed, 0, now),
        launch(Reason::BelowMin)
    );
    // min = max = count: nothing.
    let cfg = ScaleConfig {
        max_instances: 2,
        ..cfg
    };
    let two = [member("a", 0.5, 4), member("b", 0.5, 4)];
    assert_eq!(step(&mut ScaleState::default(), &cfg, &two, 0, now), None);
}

#[test]
fn above_max_stops_the_least_utilised_removable_member_never_the_last() {
    let cfg = ScaleConfig {
        max_instances: 2,
        ..cfg()
    };
    let now = Instant::now();
    let three = [
        Member {
            removable: false,
            ..member("configured", 0.1, 1)
        },
        member("b", 0.4, 3),
        member("c", 0.2, 2),
    ];
    assert_eq!(
        step(&mut ScaleState::default(), &cfg, &three, 0, now),
        stop("c", Reason::AboveMax)
    );
    // Ties: fewer groups, then the later.
    let tied = [
        member("a", 0.2, 1),
        member("b", 0.2, 1),
        member("c", 0.2, 2),
    ];
    assert_eq!(
        step(&mut ScaleState::default(), &cfg, &tied, 0, now),
        stop("b", Reason::AboveMax)
    );
    // One live member and launches under way above max: it stays.
    let last = [member("a", 0.9, 1)];
    assert_eq!(step(&mut ScaleState::default(), &cfg, &last, 3, now), None);
    // Only configured (non-removable) members: none is stopped.
    let fixed: Vec<Member<'_>> = three
        .iter()
        .map(|m| Member {
            removable: false,
            ..*m
        })
        .collect();
    assert_eq!(step(&mut ScaleState::default(), &cfg, &fixed, 0, now), None);
}

#[test]
fn saturation_needs_out_intervals_in_a_row() {
    let cfg = cfg();
    let t0 = Instant::now();
    let hot = [member("a", 0.9, 4), member("b", 0.6, 4)];
    let dip = [member("a", 0.9, 4), member("b", 0.5, 4)];
    let mut s = ScaleState::default();
    let mut got = Vec::new();
    for (t, members) in [&hot, &hot, &dip, &hot, &hot, &hot].iter().enumerate() {
        got.push(step(&mut s, &cfg, *members, 0, t0 + SEC * t as u32));
    }
    assert_eq!(
        got,
        [None, None, None, None, None, launch(Reason::Saturated)],
        "one member below the midpoint (0.55) is a dip that resets the count"
    );
    // Nobody above overload is not saturated either.
    let warm = [member("a", 0.7, 4), member("b", 0.7, 4)];
    let mut s = ScaleState::default();
    assert!((0..10).all(|t| step(&mut s, &cfg, &warm, 0, t0 + SEC * t).is_none()));
}

#[test]
fn a_launch_under_way_blocks_the_next_saturated_launch() {
    let cfg = cfg();
    let t0 = Instant::now();
    let hot = [member("a", 0.9, 4), member("b", 0.9, 4)];
    let mut s = ScaleState::default();
    for t in 0..10 {
        assert_eq!(step(&mut s, &cfg, &hot, 1, t0 + SEC * t), None, "{t}");
    }
    // Landed: three saturated intervals more are needed.
    let got: Vec<_> = (10..13)
        .map(|t| step(&mut s, &cfg, &hot, 0, t0 + SEC * t))
        .collect();
    assert_eq!(got, [None, None, launch(Reason::Saturated)]);
}

/// 20 intervals of saturation, cooldown 3 intervals, `out_intervals` 2,
/// each launch under way for one interval: launches one at a time, at
/// intervals 1, 4 and 7, and never above max.
#[test]
fn the_cooldown_paces_launches_one_at_a_time() {
    let cfg = ScaleConfig {
        min_instances: 1,
        max_instances: 4,
        out_intervals: 2,
        cooldown: 3 * SEC,
        ..cfg()
    };
    let names = ["i0", "i1", "i2", "i3", "i4", "i5"];
    let t0 = Instant::now();
    let mut s = ScaleState::default();
    let (mut live, mut pending) = (1usize, 0u32);
    let mut launches = Vec::new();
    for t in 0..20 {
        // A launch lands one interval after it is decided.
        live += pending as usize;
        pending = 0;
        let members: Vec<Member<'_>> = names[..live].iter().map(|n| member(n, 0.95, 4)).collect();
        let now = t0 + SEC * t;
        match step(&mut s, &cfg, &members, pending, now) {
            Some(Decision::Launch { reason }) => {
                assert_eq!(reason, Reason::Saturated);
                launches.push(t);
                pending = 1;
                s.changed(now);
            }
            None => {}
            other => panic!("{t}: {other:?}"),
        }
        assert!(live + pending as usize <= 4, "{t}: above max");
    }
    assert_eq!(launches, [1, 4, 7]);
}

#[test]
fn scale_in_goes_down_to_min_and_never_below() {
    let cfg = cfg();
    let names = ["a", "b", "c", "d", "e"];
    let mut live: Vec<&str> = names.to_vec();
    let t0 = Instant::now();
    let mut s = ScaleState::default();
    let mut stops = Vec::new();
    for t in 0..60 {
        let members: Vec<Member<'_>> = live.iter().map(|n| member(n, 0.0, 0)).collect();
        let now = t0 + SEC * t;
        if let Some(d) = step(&mut s, &cfg, &members, 0, now) {
            let Decision::Stop { name, reason } = d else {
                panic!("{t}: {d:?}");
            };
            assert_eq!(reason, Reason::Idle);
            live.retain(|n| *n != name);
            stops.push(t);
            s.changed(now);
        }
        assert!(live.len() >= 2, "{t}: below min");
    }
    assert_eq!(live.len(), 2);
    // The first after in_intervals (4) idle intervals, then a cooldown
    // (2 s) apart.
    assert_eq!(stops, [3, 5, 7]);
}

#[test]
fn idle_needs_in_intervals_in_a_row_and_only_removable_members_are_stopped() {
    let cfg = ScaleConfig {
        min_instances: 1,
        ..cfg()
    };
    let t0 = Instant::now();
    let mut s = ScaleState::default();
    // `b` takes a group at interval 2: its idle count starts over.
    for t in 0..9 {
        let groups = usize::from(t == 2);
        let members = [member("a", 0.6, 4), member("b", 0.0, groups)];
        let d = step(&mut s, &cfg, &members, 0, t0 + SEC * t);
        let want = if t == 6 {
            stop("b", Reason::Idle)
        } else {
            None
        };
        assert_eq!(d, want, "{t}");
        if d.is_some() {
            break;
        }
    }
    // Configured members are never stopped, however idle.
    let mut s = ScaleState::default();
    let members = [
        member("busy", 0.6, 4),
        Member {
            removable: false,
            ..member("x", 0.0, 0)
        },
        Member {
            removable: false,
            ..member("y", 0.0, 0)
        },
    ];
    for t in 0..100 {
        assert_eq!(step(&mut s, &cfg, &members, 0, t0 + SEC * t), None, "{t}");
    }
}

#[test]
fn underloaded_stops_only_when_one_fewer_stays_under_the_midpoint() {
    let cfg = ScaleConfig {
        min_instances: 1,
        ..cfg()
    };
    let t0 = Instant::now();
    let run = |members: &[Member<'_>]| {
        let mut s = ScaleState::default();
        (0..10)
            .map(|t| step(&mut s, &cfg, members, 0, t0 + SEC * t))
            .find_map(|d| d)
    };
    let light = [
        member("a", 0.12, 3),
        member("b", 0.1, 3),
        member("c", 0.14, 3),
    ];
    assert_eq!(run(&light), stop("b", Reason::Underloaded));
    // 0.29 + 0.29 on one would be 0.58, above the midpoint 0.55.
    let near = [member("a", 0.29, 3), member("b", 0.29, 3)];
    assert_eq!(run(&near), None);
    // One member above underload: not under-loaded.
    let mixed = [member("a", 0.35, 3), member("b", 0.05, 3)];
    assert_eq!(run(&mixed), None);
    // At min: nothing.
    let cfg = ScaleConfig {
        min_instances: 3,
        ..cfg
    };
    let mut s = ScaleState::default();
    assert!((0..10).all(|t| step(&mut s, &cfg, &light, 0, t0 + SEC * t).is_none()));
}

/// A launch for saturation, the load then spread over one more: the
/// same load is never judged light enough to stop one again, even
/// with thresholds close together (0.5 and 0.45, where one instance
/// fewer would be under-loaded without the projection).
#[test]
fn no_flapping_after_a_saturated_launch() {
    let cfg = ScaleConfig {
        min_instances: 1,
        out_intervals: 1,
        in_intervals: 1,
        ..cfg()
    };
    let eff = Effective {
        thresholds: Thresholds::new(0.5, 0.45),
        ..eff(&cfg)
    };
    let names = ["a", "b", "c", "d", "e"];
    let t0 = Instant::now();
    let mut launches = 0;
    for total in (51..=240).map(|c| f64::from(c) / 100.0) {
        let mut s = ScaleState::default();
        let mut n = 1usize;
        for t in 0..30 {
            let each = total / n as f64;
            let members: Vec<Member<'_>> = names[..n].iter().map(|x| member(x, each, 4)).collect();
            let now = t0 + SEC * t;
            let d = s.decide(&ScaleView {
                eff: &eff,
                cfg: &cfg,
                members: &members,
                pending: 0,
                now,
            });
            match d {
                Some(Decision::Launch { .. }) => {
                    n += 1;
                    launches += 1;
                    s.changed(now);
                }
                None => {}
                Some(d) => panic!("{total}: {t}: {d:?}"),
            }
        }
    }
    assert!(launches > 100, "{launches}");
}

fn window(days: [bool; 7], from: u16, to: u16, min: Option<u32>) -> SlaWindow {
    SlaWindow {
        days,
        from,
        to,
        min_instances: min,
        overload: None,
    }
}

const WEEKDAYS: [bool; 7] = [true, true, true, true, true, false, false];

fn at(weekday: u8, h: u16, m: u16) -> WallTime {
    WallTime {
        weekday,
        minute: h * 60 + m,
    }
}

#[test]
fn windows_set_the_effective_bounds_as_the_clock_moves() {
    let wlm = WlmConfig::default();
    let mut scale = cfg();
    scale.windows = vec![
        SlaWindow {
            overload: Some(0.6),
            ..window(WEEKDAYS, 8 * 60, 18 * 60, Some(4))
        },
        window([true; 7], 0, 24 * 60, Some(3)),
    ];
    let min_at = |t: WallTime| effective(&scale, &wlm, t).min_instances;
    // Monday, a minute at a time across 08:00 and 18:00.
    let mut t = at(0, 7, 59);
    assert_eq!((min_at(t), effective(&scale, &wlm, t).window), (3, Some(1)));
    t = t.advanced(1);
    assert_eq!(t, at(0, 8, 0));
    let e = effective(&scale, &wlm, t);
    assert_eq!(
        (e.min_instances, e.window, e.thresholds),
        (4, Some(0), Thresholds::new(0.6, wlm.underload))
    );
    assert_eq!(min_at(at(0, 17, 59)), 4);
    let e = effective(&scale, &wlm, at(0, 18, 0));
    assert_eq!((e.min_instances, e.thresholds), (3, Thresholds::from(&wlm)));
    // Saturday: the weekday window does not hold.
    assert_eq!(min_at(at(5, 10, 0)), 3);
    // Without windows: the service's own.
    scale.windows.clear();
    let e = effective(&scale, &wlm, at(0, 10, 0));
    assert_eq!(
        e,
        Effective {
            min_instances: 2,
            max_instances: 5,
            thresholds: Thresholds::from(&wlm),
            window: None
        }
    );
}

#[test]
fn a_window_crossing_midnight_holds_into_the_next_day() {
    // Fridays 22:00 to 06:00.
    let fri = [false, false, false, false, true, false, false];
    let w = window(fri, 22 * 60, 6 * 60, Some(4));
    let cases = [
        (at(4, 21, 59), false),
        (at(4, 22, 0), true),
        (at(4, 23, 59), true),
        (at(5, 0, 0), true),
        (at(5, 5, 59), true),
        (at(5, 6, 0), false),
        (at(4, 5, 0), false),
        (at(5, 23, 0), false),
    ];
    for (t, want) in cases {
        assert_eq!(window_covers(&w, t), want, "{t:?}");
    }
    // Sunday night into Monday morning.
    let sun = [false, false, false, false, false, false, true];
    let w = window(sun, 23 * 60, 60, None);
    let t = at(6, 23, 30);
    assert!(window_covers(&w, t));
    let t = t.advanced(60);
    assert_eq!(t, at(0, 0, 30), "Sunday rolls over into Monday");
    assert!(window_covers(&w, t));
    assert!(!window_covers(&w, t.advanced(30)));
    // The first matching window wins.
    let mut scale = cfg();
    scale.windows = vec![w.clone(), window([true; 7], 0, 1440, Some(5))];
    let wlm = WlmConfig::default();
    let e = effective(&scale, &wlm, at(0, 0, 30));
    assert_eq!((e.window, e.min_instances), (Some(0), 2), "w has no min");
    assert_eq!(effective(&scale, &wlm, at(0, 2, 0)).min_instances, 5);
}

/// The window raises min at 08:00: the next decision after the
/// cooldown launches.
#[test]
fn the_policy_follows_the_windows() {
    let wlm = WlmConfig::default();
    let mut scale = cfg();
    scale.cooldown = Duration::from_mins(5);
    scale.windows = vec![window(WEEKDAYS, 8 * 60, 18 * 60, Some(3))];
    let members = [member("a", 0.5, 4), member("b", 0.5, 4)];
    let t0 = Instant::now();
    let mut s = ScaleState::default();
    // A change at 07:57 starts a 5-minute cooldown.
    s.changed(t0);
    let mut clock = at(2, 7, 57);
    let mut got = Vec::new();
    for minute in 0..10u32 {
        let eff = effective(&scale, &wlm, clock);
        let d = s.decide(&ScaleView {
            eff: &eff,
            cfg: &scale,
            members: &members,
            pending: 0,
            now: t0 + Duration::from_mins(minute.into()),
        });
        if let Some(d) = d {
            got.push((clock, d));
            break;
        }
        clock = clock.advanced(1);
    }
    assert_eq!(
        got,
        [(
            at(2, 8, 2),
            Decision::Launch {
                reason: Reason::BelowMin
            }
        )]
    );
}

#[test]
fn the_failure_budget_allows_restarts_per_window() {
    let rule = FailureRule {
        restarts: 3,
        window: Duration::from_mins(10),
    };
    let t0 = Instant::now();
    let min = |m: u64| t0 + Duration::from_mins(m);
    let mut b = FailureBudget::default();
    assert!(!b.exhausted("a", &rule, t0));
    assert!(b.try_restart("a", &rule, min(0)));
    assert!(b.try_restart("a", &rule, min(1)));
    assert!(b.try_restart("a", &rule, min(2)));
    assert!(b.exhausted("a", &rule, min(3)));
    assert!(!b.try_restart("a", &rule, min(3)));
    assert!(b.try_restart("b", &rule, min(3)), "per instance");
    // The first restart leaves the window at minute 10.
    assert!(b.exhausted("a", &rule, min(9)));
    assert!(!b.exhausted("a", &rule, min(10)));
    assert!(b.try_restart("a", &rule, min(10)));
    assert!(!b.try_restart("a", &rule, min(10)));
    b.forget("a");
    assert!(!b.exhausted("a", &rule, min(10)));
    let never = FailureRule {
        restarts: 0,
        ..rule
    };
    assert!(b.exhausted("c", &never, t0));
    assert!(!b.try_restart("c", &never, t0));
}

#[test]
fn launch_backoff_doubles_up_to_a_minute() {
    let got: Vec<u64> = (0..10).map(|n| launch_backoff(n).as_secs()).collect();
    assert_eq!(got, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(launch_backoff(u32::MAX), Duration::from_mins(1));
}

#[test]
fn reasons_are_metric_labels() {
    let all = [
        Reason::BelowMin,
        Reason::Saturated,
        Reason::AboveMax,
        Reason::Idle,
        Reason::Underloaded,
    ];
    let labels: Vec<&str> = all.iter().map(Reason::as_str).collect();
    assert_eq!(
        labels,
        ["below_min", "saturated", "above_max", "idle", "underloaded"]
    );
    assert_eq!(
        Decision::Stop {
            name: "x".into(),
            reason: Reason::Idle
        }
        .reason(),
        Reason::Idle
    );
}

#[test]
fn wall_time_now_is_in_range_and_advances_over_the_week() {
    let now = WallTime::now_local();
    assert!(now.weekday < 7 && now.minute < 1440, "{now:?}");
    assert_eq!(at(6, 23, 59).advanced(1), at(0, 0, 0));
    assert_eq!(at(0, 0, 0).advanced(7 * 1440 + 61), at(0, 1, 1));
}

/// One interval of a random run: every member's figures and whether
/// it is live.
fn interval() -> impl Strategy<Value = (Vec<(f64, usize, bool)>, u32, u32)> {
    (
        proptest::collection::vec((0.0f64..1.2, 0usize..3, proptest::bool::weighted(0.9)), 6),
        0u32..3,
        // Members present this interval (1 to 6).
        1u32..7,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the load, pending launches and bounds: a launch keeps
    /// count within max (and BelowMin only below min); a stop names a
    /// live removable member, never the last one, and leaves count at
    /// least min (AboveMax: only above max); and changes are a
    /// cooldown apart.
    #[test]
    fn decisions_keep_the_bounds_and_the_pacing(
        removable in proptest::collection::vec(any::<bool>(), 6),
        bounds in (1u32..4, 0u32..4),
        cooldown in 0u64..4,
        steps in proptest::collection::vec(interval(), 1..80),
    ) {
        let names = ["a", "b", "c", "d", "e", "f"];
        let cfg = ScaleConfig {
            min_instances: bounds.0,
            max_instances: bounds.0 + bounds.1,
            out_intervals: 2,
            in_intervals: 2,
            cooldown: SEC * u32::try_from(cooldown).unwrap(),
            ..cfg()
        };
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        let mut last: Option<u64> = None;
        for (t, (figures, pending, present)) in steps.iter().enumerate() {
            let t = t as u64;
            let members: Vec<Member<'_>> = figures
                .iter()
                .zip(&removable)
                .zip(names)
                .take(*present as usize)
                .map(|(((u, g, live), r), name)| Member {
                    name,
                    utilisation: *u,
                    groups: *g,
                    live: *live,
                    removable: *r,
                })
                .collect();
            let live = members.iter().filter(|m| m.live).count() as u32;
            let count = live + pending;
            let now = t0 + Duration::from_secs(t);
            let Some(d) = step(&mut s, &cfg, &members, *pending, now) else {
                continue;
            };
            if let Some(l) = last {
                prop_assert!(t - l >= cooldown, "{:?} at {} after a change at {}", d, t, l);
            }
            match &d {
                Decision::Launch { reason } => {
                    prop_assert!(count < cfg.max_instances, "{:?} at count {}", d, count);
                    match reason {
                        Reason::BelowMin => prop_assert!(count < cfg.min_instances),
                        Reason::Saturated => prop_assert_eq!(*pending, 0),
                        other => prop_assert!(false, "launch for {:?}", other),
                    }
                }
                Decision::Stop { name, reason } => {
                    let m = members.iter().find(|m| m.name == name);
                    prop_assert!(m.is_some_and(|m| m.live && m.removable), "{:?}", d);
                    prop_assert!(live >= 2, "{:?} stops the last live member", d);
                    if *reason == Reason::AboveMax {
                        prop_assert!(count > cfg.max_instances);
                    } else {
                        prop_assert!(count > cfg.min_instances && *pending == 0, "{:?}", d);
                    }
                }
            }
            s.changed(now);
            last = Some(t);
        }
    }
}
