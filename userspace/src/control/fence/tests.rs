use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::{Fence, FenceState};

const T: Duration = Duration::from_secs(6);
/// The fence's distance from the last acknowledged renewal: `T - T/10`.
const R: Duration = Duration::from_millis(5400);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A fence of a host with `peers` peers whose lease was granted at `t0`.
fn fence(t0: Instant, peers: usize) -> Fence {
    let mut f = Fence::new(T, t0);
    f.set_peers(peers);
    f
}

#[test]
fn each_acknowledged_renewal_moves_the_deadline_to_nine_tenths_of_the_lease_past_its_sending() {
    let t0 = Instant::now();
    let mut f = fence(t0, 2);
    assert_eq!(Fence::reach(T), R);
    assert_eq!(f.deadline(), Some(t0 + R));
    f.renewed(t0 + ms(1000));
    assert_eq!(f.deadline(), Some(t0 + ms(1000) + R));
    // An old renewal acknowledged late does not move it back or forth.
    f.renewed(t0 + ms(500));
    assert_eq!(f.deadline(), Some(t0 + ms(1000) + R));
    assert_eq!(f.state(t0 + ms(1100)), FenceState::Renewing);
    assert_eq!(f.state(t0 + ms(1000) + R), FenceState::Fenced);
    assert_eq!(Fence::renew_every(T), ms(600));
}

#[test]
fn a_single_host_is_never_fenced() {
    let t0 = Instant::now();
    let f = fence(t0, 0);
    assert_eq!(f.deadline(), None);
    assert_eq!(f.state(t0 + T * 10), FenceState::Open);
    assert!(!f.should_ask(t0 + T * 10), "nobody to ask");
}

#[test]
fn a_host_cut_off_while_a_peer_renews_stays_fenced() {
    let t0 = Instant::now();
    let mut f = fence(t0, 2);
    assert!(
        !f.should_ask(t0 + ms(1900)),
        "renewals are only T/3 late at 2 s"
    );
    let q = t0 + T / 3;
    assert!(f.should_ask(q));
    f.asked(q);
    assert!(!f.should_ask(q + ms(10)), "one round a period (T/24)");
    // One peer cannot renew either, the other can: this host is cut off.
    f.answer(Some(T));
    f.answer(Some(ms(1499)));
    assert_eq!(f.deadline(), Some(t0 + R));
    // Answers after that in the same round change nothing.
    f.answer(None);
    assert_eq!(f.deadline(), Some(t0 + R));
    assert_eq!(f.state(t0 + R), FenceState::Fenced);
    assert!(f.should_ask(q + T / 12), "asks again");
}

#[test]
fn an_outage_of_the_store_for_everybody_is_vouched_for() {
    let t0 = Instant::now();
    let mut f = fence(t0, 2);
    let mut q = t0 + T / 3;
    for _ in 0..20 {
        assert!(f.should_ask(q));
        f.asked(q);
        f.answer(Some(T));
        f.answer(None);
        assert_eq!(f.deadline(), Some((t0 + R).max(q + T / 2)));
        assert_ne!(f.state(q + ms(1)), FenceState::Fenced);
        q += T / 12;
    }
    assert_eq!(f.state(q), FenceState::Vouched);
    // The store back: renewals rule again.
    f.renewed(q);
    assert_eq!(f.deadline(), Some(q + R));
    assert_eq!(f.state(q), FenceState::Renewing);
}

#[test]
fn no_answer_is_no_vouch() {
    let t0 = Instant::now();
    let mut f = fence(t0, 3);
    f.asked(t0 + T / 3);
    assert_eq!(f.deadline(), Some(t0 + R));
    assert_eq!(f.state(t0 + R + ms(1)), FenceState::Fenced);
}

#[test]
fn a_lost_lease_fences_at_once_until_the_host_joined_again() {
    let t0 = Instant::now();
    let mut f = fence(t0, 0);
    let at = t0 + ms(200);
    f.lost(at);
    assert_eq!(f.deadline(), Some(at), "even a single host");
    assert_eq!(f.state(at), FenceState::Lost);
    assert!(!f.should_ask(at + T), "nothing to vouch for");
    assert_eq!(f.renewed_ago(at), None, "a lost host vouches for nobody");
    f.rejoined(at + ms(500));
    assert_eq!(f.deadline(), None);
    f.set_peers(1);
    assert_eq!(f.deadline(), Some(at + ms(500) + R));
}

/// A full outage: every host's renewals stop within `T/10` of this host's
/// last; a round from `t_s + 7T/20` on hears every peer's renewal at least
/// `T/4` old and vouches well before the deadline.
#[test]
fn in_a_full_outage_a_round_before_the_deadline_vouches() {
    let t0 = Instant::now();
    let mut f = fence(t0, 2);
    // The peers renewed as late as a renewal period after this host's last.
    let peer_last = t0 + Fence::renew_every(T);
    let mut q = t0 + T / 3;
    let mut vouched_at = None;
    while q < t0 + R {
        if f.should_ask(q) {
            f.asked(q);
            f.answer(Some(q - peer_last));
            f.answer(Some(q - peer_last));
            if f.state(q) == FenceState::Vouched {
                vouched_at.get_or_insert(q);
            }
        }
        q += ms(50);
    }
    let at = vouched_at.expect("vouched before the deadline");
    // The first round whose vouch passes t_s + 9T/10 (from t_s + 2T/5 on).
    assert!(at <= t0 + T * 2 / 5 + ms(50), "vouched at {:?}", at - t0);
    assert!(f.deadline().unwrap() > t0 + R);
}

/// As the agent's task drives it: a round on each tick of a timer of the
/// round period, every wake a little late (1 or 3 ms, by turns), the
/// answers back 5 ms after; the peers renewed as late as `T/10` after this
/// host. Whatever the timer's phase, a round vouches with its answers in
/// before the deadline (a wake less late than the one before must not
/// skip its round).
#[test]
fn rounds_on_late_ticks_still_vouch_before_the_deadline() {
    let t0 = Instant::now();
    let peer_last = t0 + Fence::renew_every(T);
    let every = Fence::ask_every(T);
    for phase in 0..12u32 {
        let mut f = fence(t0, 2);
        let mut vouched_at = None;
        for k in 0u32.. {
            let due = t0 + every * phase / 12 + every * k;
            if due >= t0 + R {
                break;
            }
            let wake = due + ms(if k % 2 == 0 { 3 } else { 1 });
            if !f.should_ask(wake) {
                continue;
            }
            f.asked(wake);
            let back = wake + ms(5);
            f.answer(Some(back - peer_last));
            f.answer(Some(back - peer_last));
            if f.state(back) == FenceState::Vouched {
                vouched_at = Some(back);
                break;
            }
        }
        let at = vouched_at.unwrap_or_else(|| panic!("phase {phase}: no round vouched"));
        // A vouch (the round + T/2) passes the renewals' deadline (t_s +
        // 9T/10) from rounds past t_s + 2T/5 on: the first of them vouches,
        // many rounds before that deadline.
        assert!(
            at <= t0 + T * 2 / 5 + every + ms(10),
            "phase {phase}: vouched at {:?}, later than the first round that could",
            at - t0
        );
    }
}

/// Random renewals, rounds and answers: the deadline never exceeds
/// `t_s + T - T/10` unless a round since the last renewal had answers and none
/// of them renewed (a peer that renewed cancels the vouch); a vouched
/// deadline is at most the latest round's `asked + T/2`.
#[test]
fn the_deadline_passes_the_last_renewal_only_when_vouched() {
    for seed in 0..500u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut now = t0;
        let peers = rng.random_range(0..4usize);
        let mut f = fence(t0, peers);
        // The model: last acked send, current round (asked, any renewed,
        // answers), best vouch since the last renewal.
        let mut ts = t0;
        let mut round: Option<(Instant, bool, usize, Option<Instant>)> = None;
        let mut vouch: Option<Instant> = None;
        for step in 0..200 {
            now += ms(rng.random_range(0..700));
            match rng.random_range(0..10) {
                0..=2 => {
                    // A renewal acknowledged, sent a little earlier.
                    let sent = now.checked_sub(ms(rng.random_range(0..400))).unwrap_or(now);
                    f.renewed(sent);
                    if sent > ts {
                        ts = sent;
                        round = None;
                        vouch = None;
                    }
                }
                3..=5 if f.should_ask(now) => {
                    f.asked(now);
                    round = Some((now, false, 0, vouch));
                }
                6..=9 => {
                    let ago = match rng.random_range(0..3) {
                        0 => None,
                        1 => Some(ms(rng.random_range(0..1500))),
                        _ => Some(ms(rng.random_range(1500..20_000))),
                    };
                    f.answer(ago);
                    if let Some((asked, renewed, n, prior)) = round.as_mut() {
                        *n += 1;
                        if ago.is_some_and(|d| d < T / 4) {
                            *renewed = true;
                            vouch = *prior;
                        } else if !*renewed {
                            vouch = Some(vouch.map_or(*asked + T / 2, |v| v.max(*asked + T / 2)));
                        }
                    }
                }
                _ => {}
            }
            let d = f.deadline();
            if peers == 0 {
                assert_eq!(d, None, "seed {seed} step {step}: a single host");
                continue;
            }
            let d = d.expect("peers: a deadline");
            let own = ts + R;
            if d > own {
                // Vouched: by a round whose answers so far all said the
                // store is out of reach, bounded by that round's asking.
                let (asked, _, _, _) = round.unwrap_or_else(|| {
                    panic!("seed {seed} step {step}: past t_s + T - T/10 with no round")
                });
                assert!(vouch.is_some(), "seed {seed} step {step}: no vouch");
                assert!(
                    d <= asked + T / 2,
                    "seed {seed} step {step}: past asked + T/2"
                );
            }
            assert_eq!(
                d,
                vouch.map_or(own, |v| v.max(own)),
                "seed {seed} step {step}"
            );
        }
    }
}

/// What the agent does with the deadline: the data path keeps it, and a
/// single host's fence is taken off.
#[test]
fn the_data_path_is_given_the_deadline() {
    use crate::datapath::{Datapath as _, fake::MemDatapath};
    let t0 = Instant::now();
    let mut dp = MemDatapath::default();
    let mut f = fence(t0, 1);
    dp.set_fence(f.deadline()).unwrap();
    assert_eq!(dp.fence(), Some(t0 + R));
    f.set_peers(0);
    dp.set_fence(f.deadline()).unwrap();
    assert_eq!(dp.fence(), None);
}

/// etcd comes back to the peers a moment before this host's own renewal
/// gets through: the vouch an earlier round gave (every peer out of reach)
/// stands until its end, and the round where a peer renewed adds nothing.
/// Before, the vouch was dropped and the host fenced at once (~300 ms of
/// traffic lost in the outage test as etcd returned).
#[test]
fn a_vouch_given_stands_when_the_store_comes_back_to_the_peers_first() {
    let t0 = Instant::now();
    let mut f = fence(t0, 2);
    // A round late enough that its vouch passes the renewals' deadline.
    let q1 = t0 + T / 2;
    f.asked(q1);
    f.answer(Some(T));
    f.answer(None);
    assert_eq!(f.deadline(), Some(q1 + T / 2), "every peer out of reach");
    let q2 = q1 + T / 4;
    f.asked(q2);
    f.answer(None);
    f.answer(Some(ms(10)));
    assert_eq!(
        f.deadline(),
        Some(q1 + T / 2),
        "the earlier round's vouch stands, this one's does not"
    );
    assert_eq!(f.state(q1 + T / 2), FenceState::Fenced, "and ends");
}
