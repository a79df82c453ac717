//! Running code inside a named network namespace (`/run/netns/NAME`) of a
//! test's own, on a thread of its own (see `sluice::sys::netns`). Sockets
//! keep the namespace they were created in, so a socket made in there can
//! be used from any thread afterwards.

use std::thread;

pub use sluice::sys::ethtool::{Offload, set_offload};
use sluice::sys::netns::{enter, named};

/// Runs `f` inside namespace `ns` and returns its result.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    sluice::sys::netns::run_in(&named(ns), f).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"))
}

/// Spawns a thread that lives inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = named(ns);
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter(&path).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
        f()
    })
}
