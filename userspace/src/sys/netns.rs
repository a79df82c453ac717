//! Running code inside another network namespace.
//!
//! `setns` changes only the calling thread, so the closure runs on a thread
//! of its own that ends right after: the agent's threads stay where they
//! are. Sockets keep the namespace they were made in, so one made in there
//! can be used from any thread afterwards.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// Path of the named namespace `name` (`ip netns add NAME`).
#[must_use]
pub fn named(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: `f` is an open file; setns checks it is a namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside the network namespace at `path` and returns
/// what it returns; a panic in `f` is resumed in the caller.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
