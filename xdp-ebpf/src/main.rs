//! The Sluice XDP program: steer each packet of a service to the instance
//! that owns its work unit. Every step is O(1): two array loads at most for
//! the service, one for the owner, one for the instance, and per-CPU
//! counters. Anything that is not a well-formed packet of a service passes to
//! the kernel untouched and is counted by reason.
//!
//! Here are the entry and the top-level flow (parse, find the service or
//! decapsulate, steer); the parts live beside it, as Katran keeps
//! `balancer_maps.h`, `pckt_parsing.h` and `pckt_encap.h` beside
//! `balancer.bpf.c`:
//!
//! - `maps`: every map;
//! - `frame`: the frame accessor (loads, stores, head moves, bounds checks);
//! - `lookup`: the service table, a unit's owner, a live instance;
//! - `steer`: from a packet of a service to its action;
//! - `origin`: SLA origin rules' tiers;
//! - `pins`: pinned flows and the second chance;
//! - `cluster`: decapsulation from and encapsulation to the other hosts;
//! - `count`: per-CPU counters.
//!
//! Their functions are `#[inline(always)]`, as they were in one file: the
//! program stays one BPF function.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "BPF-to-BPF calls cost more than inlining, and the verifier tracks packet bounds best within one function"
)]

mod cluster;
mod count;
mod frame;
mod lookup;
mod maps;
mod origin;
mod pins;
mod steer;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use sluice_common::{
    counters,
    parse::{self, Pass},
};

use crate::{
    cluster::decapsulate,
    count::bump,
    frame::XdpFrame,
    lookup::find_service,
    maps::{GLOBAL_COUNTERS, HOST},
    steer::steer,
};

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
// The macro's entry calls this body: inlined, or past LLVM's size threshold
// it stays a BPF-to-BPF call, ~10 ns a packet (measured when the ICMP
// parsing grew the program).
#[inline(always)]
fn sluice_xdp(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame::new(&ctx);
    let (action, counter) = match try_sluice_xdp(&mut frame) {
        Ok(outcome) => outcome,
        Err(pass) => (XDP_PASS, pass.counter()),
    };
    // A delivered packet is counted once, in its service's `delivered`:
    // the agent sums those into the global figure.
    if counter != counters::DELIVERED {
        bump(&GLOBAL_COUNTERS, counter);
    }
    action
}

/// Returns the action and the global counter it is counted under.
#[inline(always)]
fn try_sluice_xdp(frame: &mut XdpFrame) -> Result<(u32, u32), Pass> {
    let mut flow = parse::parse(&*frame)?;
    if cfg!(feature = "exp-parse-only") {
        return Ok((XDP_REDIRECT_ACTION, counters::DELIVERED));
    }
    let Some(host) = HOST.get(0) else {
        return Err(Pass::NoService);
    };
    let mut peer = None;
    if cfg!(feature = "exp-service-twice") {
        core::hint::black_box(find_service(
            host,
            &core::hint::black_box(flow.service_key()),
        ));
    }
    let svc = if let Some(svc) = find_service(host, &flow.service_key()) {
        if !cfg!(feature = "exp-no-mac-check") && !frame.for_host(host) {
            return Ok((XDP_PASS, counters::PASS_NOT_FOR_HOST));
        }
        svc
    } else {
        // An error about a flow of no service is the host's (one about
        // our own encapsulated packets included: never decapsulated).
        if flow.icmp {
            return Err(Pass::NoService);
        }
        // Not a service's: perhaps a cluster member's encapsulated packet.
        let g = match decapsulate(frame, &flow, host)? {
            Ok(g) => g,
            Err(outcome) => return Ok(outcome),
        };
        // The inner packet's headers take the outer's place (one steer, one
        // set of parsed headers on the 512-byte stack).
        let Ok(inner) = parse::parse(&*frame) else {
            return Ok((XDP_DROP, counters::DECAP_MALFORMED));
        };
        flow = inner;
        peer = Some(g);
        // The inner packet travels untagged; its service's VLAN came along.
        let mut key = flow.service_key();
        key.vlan = g.vlan;
        let Some(svc) = find_service(host, &key) else {
            return Ok((XDP_DROP, counters::DECAP_STALE));
        };
        svc
    };
    Ok(steer(frame, &flow, svc, peer))
}

/// What an experiment build returns where it skips the redirect.
const XDP_REDIRECT_ACTION: u32 = aya_ebpf::bindings::xdp_action::XDP_REDIRECT;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
