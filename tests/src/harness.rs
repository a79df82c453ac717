//! Loads the real XDP program with a test config and runs frames through it
//! in the kernel with `BPF_PROG_TEST_RUN`.

use std::path::Path;

use aya::programs::{TestRun as _, TestRunOptions};
use sluice::{
    config::Config,
    datapath::{Datapath as _, xdp::XdpDatapath},
    plan::{Plan, Resolved},
};
use sluice_common::{
    counters,
    maps::{InstanceCounters, ServiceCounters},
};

/// XDP return codes.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// An error with its sources (the verifier's log among them).
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The MAC the harness gives instance `id`.
#[must_use]
pub fn instance_mac(id: u32) -> [u8; 6] {
    let b = id.to_be_bytes();
    [0x02, 0x5e, 0x00, b[1], b[2], b[3]]
}

/// The program loaded and programmed from a config, every instance's DEVMAP
/// slot pointing at `lo` (`BPF_PROG_TEST_RUN` only records the redirect).
pub struct Harness {
    pub dp: XdpDatapath,
    pub plan: Plan,
}

/// One run of the program on one frame.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    pub duration_ns: u128,
}

/// The plan of `config` with ids from `registered`: instance `k` (config
/// order, from 1) has MAC [`instance_mac`]`(k)`; frames for the NIC's MAC
/// are steered.
fn test_plan(config: &Config, registered: &[(u32, String)]) -> Plan {
    let mut next = 0u32;
    let mut plan = Plan::build_with_ids(config, registered, |_, _| {
        next += 1;
        Ok::<_, std::convert::Infallible>(Resolved {
            ifindex: 1,
            mac: instance_mac(next),
            netns: None,
            netns_id: None,
        })
    })
    .expect("infallible");
    // The frames the tests build are addressed to the NIC's MAC.
    plan.add_host_mac(crate::packet::NIC_MAC);
    plan
}

impl Harness {
    /// Panics with the reason if the config is bad or the program does not
    /// load: a test that cannot load the program must fail, not skip.
    #[must_use]
    pub fn new(config: &str) -> Self {
        let config =
            Config::parse(config, Path::new("test-config.toml")).expect("test config is valid");
        Self::from_config(&config)
    }

    #[must_use]
    pub fn from_config(config: &Config) -> Self {
        Self::with_object(config, sluice::datapath::xdp::objects::SLUICE_XDP)
    }

    /// As [`Self::from_config`], with another build of the program (the
    /// benchmark's experiment builds).
    #[must_use]
    pub fn with_object(config: &Config, object: &[u8]) -> Self {
        assert!(
            crate::is_root(),
            "the kernel tests load an XDP program: run them as root (or with CAP_BPF and CAP_NET_ADMIN)"
        );
        let plan = test_plan(config, &[]);
        let mut dp = XdpDatapath::load_object(&plan, None, object)
            .unwrap_or_else(|e| panic!("loading the XDP program: {}", error_chain(&e)));
        dp.program(&plan)
            .unwrap_or_else(|e| panic!("programming the maps: {}", error_chain(&e)));
        Self { dp, plan }
    }

    /// Programs the loaded data path again for `config`, as a reload does:
    /// ids from the data path's registry (a name keeps its id, a newcomer
    /// takes the lowest free one); MACs by config order as in [`Self::new`].
    pub fn reprogram(&mut self, config: &str) {
        let plan = self.plan_for(config);
        self.dp
            .program(&plan)
            .unwrap_or_else(|e| panic!("programming the maps: {}", error_chain(&e)));
        self.plan = plan;
    }

    /// The plan a reload with `config` programs (see [`Self::reprogram`]),
    /// not written yet.
    #[must_use]
    pub fn plan_for(&self, config: &str) -> Plan {
        let config =
            Config::parse(config, Path::new("test-config.toml")).expect("test config is valid");
        test_plan(&config, &self.dp.registered().expect("registry"))
    }

    /// Runs the program once on `frame`.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> Run {
        run_on(&self.dp, frame)
    }

    #[must_use]
    pub fn global(&self) -> [u64; counters::COUNT as usize] {
        self.dp.global_counters().expect("global counters")
    }

    #[must_use]
    pub fn service(&self, id: u32) -> ServiceCounters {
        self.dp.service_counters(id).expect("service counters")
    }

    #[must_use]
    pub fn instance(&self, id: u32) -> InstanceCounters {
        self.dp.instance_counters(id).expect("instance counters")
    }

    /// Instance id whose MAC is `mac`.
    #[must_use]
    pub fn instance_by_mac(&self, mac: &[u8]) -> Option<u32> {
        self.plan
            .instances
            .iter()
            .find(|i| i.mac == mac)
            .map(|i| i.id)
    }
}

/// Runs `dp`'s program once on `frame` (also midway through programming
/// it, see [`XdpDatapath::program_observed`]).
#[must_use]
pub fn run_on(dp: &XdpDatapath, frame: &[u8]) -> Run {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let r = dp
        .program_ref()
        .expect("program loaded")
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed: {e}"));
    out.truncate(r.data_size_out as usize);
    Run {
        action: r.return_value,
        frame: out,
        duration_ns: r.duration.as_nanos(),
    }
}
