//! What the agent asks of the host, below any Sluice concept: network
//! namespaces, interfaces over rtnetlink, listening sockets over
//! `sock_diag`, ethtool settings, the lock a running agent holds, its
//! open-file limit, readiness for the service manager, and active probes
//! of applications.
//!
//! A leaf: it imports nothing from the rest of the crate.

pub mod ethtool;
pub mod link;
pub mod lock;
pub mod neigh;
pub mod netns;
pub mod notify;
pub mod probe;
pub mod rlimit;
pub mod route;
pub mod sockdiag;

/// What to check when a bpffs path cannot be made or read.
pub const BPFFS_HINT: &str = "is bpffs mounted at /sys/fs/bpf? `ip netns exec` remounts /sys and hides it: enter the namespace with `nsenter --net=/run/netns/NAME` instead, or give --pin-dir on a mounted bpffs";

/// A netlink socket (`kind` `SOCK_RAW` or `SOCK_DGRAM`, of `protocol`:
/// `NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`) in the calling thread's namespace.
pub(crate) fn netlink_socket(kind: i32, protocol: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned right after.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, kind | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
}
