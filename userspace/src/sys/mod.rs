//! What the agent asks of the host, below any Sluice concept: network
//! namespaces, interfaces over rtnetlink, and ethtool settings.
//!
//! A leaf: it imports nothing from the rest of the crate.

pub mod ethtool;
pub mod link;
pub mod netns;
