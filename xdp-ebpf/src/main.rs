//! The Sluice XDP program: steer each packet of a service to the instance
//! that owns its work unit. Every step is O(1): one hash lookup for the
//! service, one array load for the owner, one for the instance, and per-CPU
//! counters. Anything that is not a well-formed packet of a service passes to
//! the kernel untouched and is counted by reason.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "BPF-to-BPF calls cost more than inlining, and the verifier tracks packet bounds best within one function"
)]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::generated::bpf_xdp_load_bytes,
    macros::{map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::XdpContext,
};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE, MAX_SERVICES, UNITS_PER_SERVICE, counters, hit_index,
    maps::{
        INSTANCE_LIVE, InstanceCounters, InstanceEntry, NO_OWNER, ServiceCounters, ServiceEntry,
        ServiceKey,
    },
    owner_index,
    parse::{self, Frame, Pass},
    unit_of,
};

// Sizes here are upper bounds for the object file; the agent sets the real
// ones at load time from its config, so a small deployment stays small.

/// (VIP, port, protocol) -> service.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// (service, unit) -> owning instance id, or `NO_OWNER`.
#[map]
static OWNERS: Array<u32> = Array::with_max_entries(MAX_SERVICES * UNITS_PER_SERVICE, 0);

/// Instance id -> MAC and liveness.
#[map]
static INSTANCES: Array<InstanceEntry> = Array::with_max_entries(4096, 0);

/// Instance id -> host-side veth of the instance.
#[map]
static DELIVER: DevMap = DevMap::with_max_entries(4096, 0);

#[map]
static GLOBAL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
static SERVICE_COUNTERS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static INSTANCE_COUNTERS: PerCpuArray<InstanceCounters> = PerCpuArray::with_max_entries(4096, 0);

/// Per-unit hit counts, `HIT_BUCKETS_PER_SERVICE` coarse buckets a service.
#[map]
static UNIT_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * HIT_BUCKETS_PER_SERVICE, 0);

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let (action, counter) = match try_sluice_xdp(&frame) {
        Ok(outcome) => outcome,
        Err(pass) => (XDP_PASS, pass.counter()),
    };
    bump(&GLOBAL_COUNTERS, counter);
    action
}

/// Returns the action and the global counter it is counted under.
#[inline(always)]
fn try_sluice_xdp(frame: &XdpFrame) -> Result<(u32, u32), Pass> {
    let flow = parse::parse(frame)?;
    // SAFETY: the value is only read, and the agent replaces entries whole.
    let svc = unsafe { SERVICES.get(flow.service_key()) }.ok_or(Pass::NoService)?;
    let keyed = parse::key_for(frame, &flow, svc);
    let unit = unit_of(keyed.key);
    let bytes = frame.size() as u64;

    let sc = SERVICE_COUNTERS.get_ptr_mut(svc.id);
    if let Some(sc) = sc {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        let sc = unsafe { &mut *sc };
        sc.packets += 1;
        sc.bytes += bytes;
        sc.tagged += u64::from(keyed.tagged);
        sc.tag_missing += u64::from(keyed.tag_missing);
    }
    if keyed.tag_missing {
        bump(&GLOBAL_COUNTERS, counters::TAG_MISSING);
    }
    bump(&UNIT_HITS, hit_index(svc.id, unit));

    // Pinned flows (established connections that stay with an old owner
    // while their unit moves) are looked up here, before the owner array.

    let owner = OWNERS
        .get(owner_index(svc.id, unit))
        .copied()
        .unwrap_or(NO_OWNER);
    let Some(instance) = INSTANCES
        .get(owner)
        .filter(|i| owner != NO_OWNER && i.flags & INSTANCE_LIVE != 0 && i.service_id == svc.id)
    else {
        return Ok(unowned(sc));
    };

    // Lookup failure returns the low bits of the flags: XDP_PASS.
    let Ok(action) = DELIVER.redirect(owner, u64::from(XDP_PASS)) else {
        if let Some(sc) = sc {
            // SAFETY: as above.
            unsafe { (*sc).redirect_failed += 1 };
        }
        if let Some(ic) = INSTANCE_COUNTERS.get_ptr_mut(owner) {
            // SAFETY: as above.
            unsafe { (*ic).redirect_failed += 1 };
        }
        return Ok((XDP_PASS, counters::REDIRECT_FAILED));
    };
    // The redirect happens after we return, so the frame may still change.
    if !frame.set_dst_mac(&instance.mac) {
        return Ok((XDP_PASS, counters::PASS_TRUNCATED));
    }
    if let Some(sc) = sc {
        // SAFETY: as above.
        unsafe { (*sc).delivered += 1 };
    }
    if let Some(ic) = INSTANCE_COUNTERS.get_ptr_mut(owner) {
        // SAFETY: as above.
        let ic = unsafe { &mut *ic };
        ic.packets += 1;
        ic.bytes += bytes;
    }
    Ok((action, counters::DELIVERED))
}

/// No live owner. The `AF_XDP` punt to the agent goes here; until it exists
/// the packet passes to the kernel, counted.
#[inline(always)]
fn unowned(sc: Option<*mut ServiceCounters>) -> (u32, u32) {
    if let Some(sc) = sc {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        unsafe { (*sc).unowned += 1 };
    }
    (XDP_PASS, counters::UNOWNED)
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled.
        unsafe { *c += 1 };
    }
}

/// The frame under direct packet access.
struct XdpFrame {
    ctx: *mut aya_ebpf::bindings::xdp_md,
    data: usize,
    end: usize,
}

impl XdpFrame {
    #[inline(always)]
    fn new(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx,
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    #[inline(always)]
    fn set_dst_mac(&self, mac: &[u8; 6]) -> bool {
        if self.data + 6 > self.end {
            return false;
        }
        // SAFETY: the 6 bytes at `data` were just checked to be in the frame.
        unsafe { (self.data as *mut [u8; 6]).write_unaligned(*mac) };
        true
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn size(&self) -> usize {
        self.end - self.data
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: the bytes were just checked to be in the frame; `T` is an
        // integer or byte array.
        Some(unsafe { (start as *const T).read_unaligned() })
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offsets are within a frame (< 64 KiB) and len <= 16"
    )]
    fn load_tag(&self, off: usize, len: usize, out: &mut [u8; 16]) -> bool {
        if len == 0 || len > out.len() {
            return false;
        }
        // The helper copies across fragments of multi-buffer frames too, and
        // keeps the variable length out of the verifier's packet-range logic.
        // SAFETY: `out` holds at least `len` bytes.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.ctx, off as u32, out.as_mut_ptr().cast(), len as u32)
        };
        ret == 0
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
