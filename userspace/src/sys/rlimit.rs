//! The agent's open-file limit: every client connection of the L7
//! distributor is a descriptor, and so are the state file, the etcd
//! connections and the namespaces it opens.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft open-file limit, before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub now: u64,
}

/// The soft open-file limit now (`u64::MAX`: none).
#[must_use]
pub fn nofile() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Raises the soft open-file limit to the hard one (systemd's default soft
/// limit, 1,024, is kept for `select()`'s sake: a program that does not
/// use `select()` is expected to raise it itself).
pub fn raise_nofile() -> io::Result<NoFile> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let before = current.unwrap_or(u64::MAX);
    if current == maximum {
        return Ok(NoFile {
            before,
            now: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: maximum,
            maximum,
        },
    )?;
    Ok(NoFile {
        before,
        now: nofile(),
    })
}
