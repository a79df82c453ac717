//! What counts as overloaded and under-loaded: the one judgement of a
//! utilisation (see [`super::utilisation`]) against the service's WLM
//! thresholds, which the WLM elements, the scaler and the origin tiers all
//! ask.
//!
//! Every comparison is strict: a utilisation exactly at a threshold is
//! neither above nor below it, so exactly at `overload` is not overloaded,
//! and does not leave room under `overload` either.

use crate::config::WlmConfig;

/// A service's overload and under-load thresholds as they are in force:
/// the service's own, or with an SLA window's overload
/// ([`Self::with_overload`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    overload: f64,
    underload: f64,
}

impl Thresholds {
    #[must_use]
    pub const fn new(overload: f64, underload: f64) -> Self {
        Self {
            overload,
            underload,
        }
    }

    /// These thresholds with `overload` in force instead (an SLA window's);
    /// the under-load threshold stays the service's.
    #[must_use]
    pub const fn with_overload(self, overload: f64) -> Self {
        Self { overload, ..self }
    }

    /// Utilisation above which an instance is overloaded.
    #[must_use]
    pub const fn overload(self) -> f64 {
        self.overload
    }

    /// Utilisation below which an instance is under-loaded.
    #[must_use]
    pub const fn underload(self) -> f64 {
        self.underload
    }

    /// Halfway between the two: where a shedding instance aims to end, and
    /// what a merge or a scale-in must leave the rest under.
    #[must_use]
    pub const fn midpoint(self) -> f64 {
        f64::midpoint(self.overload, self.underload)
    }

    /// `u` is above the overload threshold.
    #[must_use]
    pub fn is_overloaded(self, u: f64) -> bool {
        u > self.overload
    }

    /// `u` is below the under-load threshold.
    #[must_use]
    pub fn is_underloaded(self, u: f64) -> bool {
        u < self.underload
    }

    /// `u` is below the overload threshold: an instance that would end at
    /// `u` after taking work stays under it.
    #[must_use]
    pub fn is_below_overload(self, u: f64) -> bool {
        u < self.overload
    }

    /// `u` is below the midpoint.
    #[must_use]
    pub fn is_below_midpoint(self, u: f64) -> bool {
        u < self.midpoint()
    }
}

impl From<&WlmConfig> for Thresholds {
    /// The service's own thresholds.
    fn from(cfg: &WlmConfig) -> Self {
        Self::new(cfg.overload, cfg.underload)
    }
}

#[cfg(test)]
#[expect(clippy::float_cmp, reason = "exact values set in the test")]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds::new(0.8, 0.3);

    #[test]
    fn exactly_at_a_threshold_is_neither_above_nor_below_it() {
        assert!(!T.is_overloaded(0.8), "at overload is not overloaded");
        assert!(!T.is_below_overload(0.8), "at overload leaves no room");
        assert!(!T.is_underloaded(0.3), "at underload is not under-loaded");
        assert!(
            !T.is_below_midpoint(0.55),
            "at the midpoint is not below it"
        );
    }

    #[test]
    fn either_side_of_each_threshold() {
        let e = 1e-9;
        assert!(T.is_overloaded(0.8 + e) && !T.is_below_overload(0.8 + e));
        assert!(T.is_below_overload(0.8 - e) && !T.is_overloaded(0.8 - e));
        assert!(T.is_underloaded(0.3 - e) && !T.is_underloaded(0.3 + e));
        assert!(T.is_below_midpoint(0.55 - e) && !T.is_below_midpoint(0.55 + e));
        // Between the thresholds: neither over- nor under-loaded.
        assert!(!T.is_overloaded(0.5) && !T.is_underloaded(0.5));
    }

    #[test]
    fn the_midpoint_is_halfway() {
        assert_eq!(T.midpoint(), 0.55);
        assert_eq!(Thresholds::new(1.0, 0.0).midpoint(), 0.5);
    }

    #[test]
    fn a_window_sets_the_overload_and_keeps_the_underload() {
        let w = T.with_overload(0.6);
        assert_eq!((w.overload(), w.underload()), (0.6, 0.3));
        assert!(w.is_below_midpoint(0.44) && !w.is_below_midpoint(0.46));
        assert!(w.is_overloaded(0.7) && !T.is_overloaded(0.7));
        assert_eq!(
            T,
            Thresholds::new(0.8, 0.3),
            "the service's stay as they were"
        );
    }

    #[test]
    fn from_the_wlm_config() {
        let cfg = WlmConfig {
            overload: 0.9,
            underload: 0.2,
            ..WlmConfig::default()
        };
        assert_eq!(Thresholds::from(&cfg), Thresholds::new(0.9, 0.2));
    }
}
