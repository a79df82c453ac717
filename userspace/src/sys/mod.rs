//! What the agent asks of the host, below any Sluice concept: network
//! namespaces, interfaces over rtnetlink, listening sockets over
//! `sock_diag`, ethtool settings, the lock a running agent holds, and its
//! open-file limit.
//!
//! A leaf: it imports nothing from the rest of the crate.

pub mod ethtool;
pub mod link;
pub mod lock;
pub mod neigh;
pub mod netns;
pub mod rlimit;
pub mod route;
pub mod sockdiag;

/// What to check when a bpffs path cannot be made or read.
pub const BPFFS_HINT: &str = "is bpffs mounted at /sys/fs/bpf? `ip netns exec` remounts /sys and hides it: enter the namespace with `nsenter --net=/run/netns/NAME` instead, or give --pin-dir on a mounted bpffs";
