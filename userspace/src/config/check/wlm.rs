//! A service's `wlm`: the element policy (spread or pack) and its
//! thresholds and QoS targets.

use std::time::Duration;

use sluice_common::UNITS_PER_SERVICE;
use toml::Spanned;

use super::{Checker, Got};
use crate::config::{
    WlmConfig, WlmPolicy,
    raw::{Field, RawWlm, RawWlmPolicy},
};

impl Checker<'_> {
    fn wlm_policy(&mut self, at: &str, raw: Option<Field<RawWlmPolicy>>) -> Option<WlmPolicy> {
        let bad = |v: &str| {
            (
                format!("unknown policy `{v}`"),
                "use \"spread\" (take work only from more loaded peers) or \"pack\" (gather work onto few instances)".into(),
            )
        };
        match self.typed(raw, &format!("{at}.policy"), bad) {
            Got::Absent => Some(WlmConfig::default().policy),
            Got::Value(RawWlmPolicy::Spread, _) => Some(WlmPolicy::Spread),
            Got::Value(RawWlmPolicy::Pack, _) => Some(WlmPolicy::Pack),
            Got::Bad => None,
        }
    }

    pub(super) fn wlm(&mut self, at: &str, raw: Option<Spanned<RawWlm>>) -> Option<WlmConfig> {
        let d = WlmConfig::default();
        let Some(raw) = raw else { return Some(d) };
        let raw = raw.into_inner();
        let underload_span = raw.underload.as_ref().map(|f| f.span.clone());
        let overload = self.num(
            raw.overload,
            &format!("{at}.overload"),
            d.overload,
            0.05,
            10.0,
        );
        let underload = self.num(
            raw.underload,
            &format!("{at}.underload"),
            d.underload,
            0.0,
            10.0,
        );
        if let (Some(o), Some(u)) = (overload, underload)
            && u >= o
        {
            self.report(
                underload_span.as_ref(),
                format!("{at}.underload"),
                format!("underload {u} is not below overload {o}"),
                "keep a gap between the two (e.g. underload = 0.3, overload = 0.8), or the loop would move groups back and forth",
            );
        }
        let mut target = |name: &str, v: Option<Field<f64>>| match v {
            None => Some(None),
            v => self
                .num(v, &format!("{at}.{name}"), 0.0, 1e-6, 1e12)
                .map(Some),
        };
        let latency_target_ms = target("latency_target_ms", raw.latency_target_ms);
        let queue_target = target("queue_target", raw.queue_target);
        let in_flight_target = target("in_flight_target", raw.in_flight_target);
        let min_span = raw.min_group_units.as_ref().map(|f| f.span.clone());
        let min_group_units = self.int(
            raw.min_group_units,
            &format!("{at}.min_group_units"),
            d.min_group_units,
            1,
            UNITS_PER_SERVICE,
        );
        let min_group_units = match min_group_units {
            Some(m) if !m.is_power_of_two() => {
                self.report(
                    min_span.as_ref(),
                    format!("{at}.min_group_units"),
                    format!("{m} is not a power of two"),
                    "groups are aligned powers of two: use 1, 2, 4, ... 65536",
                );
                None
            }
            m => m,
        };
        let capacity_pps = self.num(
            raw.capacity_pps,
            &format!("{at}.capacity_pps"),
            d.capacity_pps,
            1.0,
            1e10,
        );
        let sustain = self.int(raw.sustain, &format!("{at}.sustain"), d.sustain, 1, 1000);
        let policy = self.wlm_policy(at, raw.policy);
        let balance_band = self.num(
            raw.balance_band,
            &format!("{at}.balance_band"),
            d.balance_band,
            0.01,
            1.0,
        );
        let cooldown_ms = self.int(
            raw.cooldown_ms,
            &format!("{at}.cooldown_ms"),
            5000,
            0,
            3_600_000,
        );
        Some(WlmConfig {
            policy: policy?,
            balance_band: balance_band?,
            capacity_pps: capacity_pps?,
            overload: overload?,
            underload: underload.filter(|u| overload.is_some_and(|o| *u < o))?,
            sustain: sustain?,
            cooldown: Duration::from_millis(cooldown_ms?.into()),
            min_group_units: min_group_units?,
            latency_target_ms: latency_target_ms?,
            queue_target: queue_target?,
            in_flight_target: in_flight_target?,
        })
    }
}
