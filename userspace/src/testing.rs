//! What the unit tests share: running the embedded store's futures without
//! a runtime, and building a plan without touching the host.

use std::path::Path;

use crate::{
    config::Config,
    plan::{Plan, Resolved},
};

/// Polls `f` once: the embedded store and the fakes never wait, so their
/// futures are ready at the first poll and need no runtime.
pub(crate) fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a future that should be ready waited"),
    }
}

/// A checked config from `text`.
pub(crate) fn config(text: &str) -> Config {
    Config::parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// The plan of `config`, instance `k` (from 1) on ifindex `100 + k` with
/// MAC `02:00:00:00:00:k`.
pub(crate) fn plan(config: &Config) -> Plan {
    let mut k = 0u8;
    Plan::build(config, |_, _| {
        k += 1;
        Ok::<_, std::convert::Infallible>(Resolved {
            ifindex: 100 + u32::from(k),
            mac: [2, 0, 0, 0, 0, k],
            netns: None,
            netns_id: None,
        })
    })
    .unwrap_or_else(|e| match e {})
}
