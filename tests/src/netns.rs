//! Running code inside a named network namespace (`/run/netns/NAME`).
//!
//! `setns` changes only the calling thread, so each helper runs its closure
//! on a thread of its own. Sockets keep the namespace they were created in,
//! so a socket made in there can be used from any thread afterwards.

use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf, thread};

fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

fn enter(ns: &str) -> io::Result<()> {
    let f = File::open(path(ns))?;
    // SAFETY: `f` is an open namespace file.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` inside namespace `ns` and returns its result.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            enter(ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Spawns a thread that lives inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter(&ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
        f()
    })
}

pub use sluice::netdev::{Offload, set_offload};
