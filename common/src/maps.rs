//! Map keys and values shared with the XDP program. Every type is `repr(C)`
//! with its padding written out, and its size asserted, so the two sides can
//! never disagree on a layout.

/// Map names, as the XDP program declares them.
pub mod names {
    pub const SERVICES: &str = "SERVICES";
    pub const OWNERS: &str = "OWNERS";
    pub const INSTANCES: &str = "INSTANCES";
    pub const DELIVER: &str = "DELIVER";
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    pub const SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
    pub const INSTANCE_COUNTERS: &str = "INSTANCE_COUNTERS";
    pub const UNIT_HITS: &str = "UNIT_HITS";
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "sluice_xdp";

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of the service map: (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP as words (see [`crate::key`]); an IPv4 VIP fills word 0 only.
    pub addr: [u32; 4],
    /// Destination port in wire order (the raw 2 bytes as a `u16`).
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// No tag: the key is the flow hash of the 5-tuple.
pub const TAG_NONE: u32 = 0;
/// Tag bytes at a fixed offset into the UDP payload.
pub const TAG_UDP_PAYLOAD: u32 = 1;
/// Tag is the IPv6 flow label (a zero label counts as missing).
pub const TAG_IPV6_FLOW_LABEL: u32 = 2;

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    /// Dense service id, `0..MAX_SERVICES`: row of the owner array and of
    /// the counters.
    pub id: u32,
    /// One of the `TAG_*` kinds.
    pub tag_kind: u32,
    /// Offset of the tag from the start of the UDP payload.
    pub tag_offset: u16,
    /// Tag length in bytes, `1..=MAX_TAG_LEN` for `TAG_UDP_PAYLOAD`.
    pub tag_len: u16,
    pub reserved: u32,
}
const _: () = assert!(size_of::<ServiceEntry>() == 16);

/// No owner in the owner array: the unit is unowned.
pub const NO_OWNER: u32 = 0;

/// Instance is live: its packets may be delivered.
pub const INSTANCE_LIVE: u32 = 1;

/// Value of the instance array, indexed by instance id (ids start at 1; 0 is
/// [`NO_OWNER`]). The DEVMAP `DELIVER` holds the matching host-side veth at
/// the same index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InstanceEntry {
    /// MAC of the instance's own (container-side) interface.
    pub mac: [u8; 6],
    pub pad: u16,
    /// `INSTANCE_LIVE` or 0.
    pub flags: u32,
    /// Service id the instance serves (to catch a stale owner entry).
    pub service_id: u32,
}
const _: () = assert!(size_of::<InstanceEntry>() == 16);

/// Per-CPU counters of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Packets that matched the service.
    pub packets: u64,
    pub bytes: u64,
    /// Redirected to an owner.
    pub delivered: u64,
    /// No live owner for the unit.
    pub unowned: u64,
    /// The owner's DEVMAP slot was empty.
    pub redirect_failed: u64,
    /// Keyed by the workload tag.
    pub tagged: u64,
    /// Tagged service, but the packet lacked the tag: keyed by flow hash.
    pub tag_missing: u64,
    pub reserved: u64,
}
const _: () = assert!(size_of::<ServiceCounters>() == 64);

/// Per-CPU counters of one instance: what the data path delivered to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InstanceCounters {
    pub packets: u64,
    pub bytes: u64,
    pub redirect_failed: u64,
    pub reserved: u64,
}
const _: () = assert!(size_of::<InstanceCounters>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made of integers and byte arrays,
    // with every padding byte written out as a named field.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::InstanceEntry {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::InstanceCounters {}
}

#[cfg(feature = "user")]
mod ops {
    use core::ops::AddAssign;

    use super::{InstanceCounters, ServiceCounters};

    impl AddAssign for ServiceCounters {
        fn add_assign(&mut self, o: Self) {
            self.packets += o.packets;
            self.bytes += o.bytes;
            self.delivered += o.delivered;
            self.unowned += o.unowned;
            self.redirect_failed += o.redirect_failed;
            self.tagged += o.tagged;
            self.tag_missing += o.tag_missing;
        }
    }

    impl AddAssign for InstanceCounters {
        fn add_assign(&mut self, o: Self) {
            self.packets += o.packets;
            self.bytes += o.bytes;
            self.redirect_failed += o.redirect_failed;
        }
    }
}
