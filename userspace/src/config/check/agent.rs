//! `[agent]`: the control loop's pacing, the pinned-flow and punt sizes,
//! the host's extra MACs.

use std::time::Duration;

use sluice_common::MAX_PINNED_FLOWS;
use toml::Spanned;

use super::{Checker, Got};
use crate::config::{
    AgentConfig,
    raw::{Field, Mac, RawAgent},
};

impl Checker<'_> {
    pub(super) fn agent(&mut self, raw: Option<Spanned<RawAgent>>) -> Option<AgentConfig> {
        let d = AgentConfig::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Some(d);
        };
        let interval_ms = self.int(raw.interval_ms, "agent.interval_ms", 1000, 50, 60_000);
        let max_moves_per_sec = self.num(
            raw.max_moves_per_sec,
            "agent.max_moves_per_sec",
            d.max_moves_per_sec,
            0.01,
            1000.0,
        );
        let pinned_flows = self.int(
            raw.pinned_flows,
            "agent.pinned_flows",
            d.pinned_flows,
            1024,
            MAX_PINNED_FLOWS,
        );
        let punt_queue = self.int(
            raw.punt_queue,
            "agent.punt_queue",
            d.punt_queue,
            16,
            1 << 24,
        );
        let host_macs = self.host_macs(raw.host_macs);
        let hold_down_ms = self.int(
            raw.recovery_hold_down_ms,
            "agent.recovery_hold_down_ms",
            u32::try_from(d.recovery_hold_down.as_millis()).expect("small"),
            0,
            600_000,
        );
        let punt_zero_copy = match self.typed(raw.punt_zero_copy, "agent.punt_zero_copy", |v| {
            (
                format!("`{v}` is not true or false"),
                "write punt_zero_copy = true or false (without quotes)".into(),
            )
        }) {
            Got::Absent => Some(false),
            Got::Value(v, _) => Some(v),
            Got::Bad => None,
        };
        Some(AgentConfig {
            interval: Duration::from_millis(interval_ms?.into()),
            max_moves_per_sec: max_moves_per_sec?,
            pinned_flows: pinned_flows?,
            punt_queue: punt_queue?,
            host_macs: host_macs?,
            punt_zero_copy: punt_zero_copy?,
            recovery_hold_down: Duration::from_millis(hold_down_ms?.into()),
        })
    }

    /// `agent.host_macs`: unicast MACs, at most `MAX_HOST_MACS - 1` (the
    /// interface's own MAC takes one slot).
    fn host_macs(&mut self, raw: Option<Spanned<Vec<Field<Mac>>>>) -> Option<Vec<[u8; 6]>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let most = sluice_common::MAX_HOST_MACS - 1;
        let list_span = raw.span();
        let items = raw.into_inner();
        if items.len() > most {
            self.report(
                Some(&list_span),
                "agent.host_macs",
                format!("{} MACs given, at most {most} are supported", items.len()),
                "list only the MACs this host receives service traffic on besides the interface's own",
            );
            return None;
        }
        let mut out = Some(Vec::new());
        for (i, f) in items.into_iter().enumerate() {
            let got = self.typed(Some(f), &format!("agent.host_macs[{i}]"), |v| {
                (
                    format!("`{v}` is not a unicast MAC address"),
                    "write it as aa:bb:cc:dd:ee:ff, with the multicast bit clear".into(),
                )
            });
            match got {
                Got::Value(Mac(m), _) => {
                    if let Some(v) = &mut out {
                        v.push(m);
                    }
                }
                Got::Bad => out = None,
                Got::Absent => {}
            }
        }
        out
    }
}
