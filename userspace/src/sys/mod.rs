//! What the agent asks of the host, below any Sluice concept: network
//! namespaces, interfaces over rtnetlink, ethtool settings, and the lock a
//! running agent holds.
//!
//! A leaf: it imports nothing from the rest of the crate.

pub mod ethtool;
pub mod link;
pub mod lock;
pub mod netns;
