//! Programs for the end-to-end benchmark (not part of the data path):
//!
//! - `generate`: a packet generator for `BPF_PROG_TEST_RUN` in live-frames
//!   mode. Each run writes the headers afresh from `TEMPLATE` (live mode
//!   recycles pages that whoever received them may have rewritten: Sluice
//!   sets the MAC, a router the MACs, TTL and, under NAT, the address), gives
//!   the frame a new source port (so flows spread over the work units) and
//!   transmits it (`XDP_TX`) on the client's veth.
//! - `sink`: on an instance's veth, counts and drops IPv4 UDP (so the
//!   benchmark measures distribution, not the instance's stack), passes
//!   the rest (ARP).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Per-CPU sequence of the generator.
#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The first `TEMPLATE_LEN` bytes of the frame: Ethernet, IPv4, UDP.
#[map]
static TEMPLATE: Array<[u64; TEMPLATE_WORDS]> = Array::with_max_entries(1, 0);

const TEMPLATE_WORDS: usize = 6;
const TEMPLATE_LEN: usize = TEMPLATE_WORDS * 8;

/// Per-CPU count of datagrams the sink dropped.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet + IPv4 without options: the UDP source port is at 34.
const UDP_SPORT: usize = 14 + 20;

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
fn generate(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + TEMPLATE_LEN > end {
        return XDP_PASS;
    }
    let (Some(seq), Some(template)) = (GEN_SEQ.get_ptr_mut(0), TEMPLATE.get(0)) else {
        return XDP_PASS;
    };
    // SAFETY: per-CPU slot; the first TEMPLATE_LEN bytes, which hold the
    // UDP header, were checked to be in the frame.
    unsafe {
        (data as *mut [u64; TEMPLATE_WORDS]).write_unaligned(*template);
        *seq = (*seq).wrapping_add(1);
        let port = 1024 + u16::try_from(*seq & 0x0fff).unwrap_or(0);
        ((data + UDP_SPORT) as *mut [u8; 2]).write_unaligned(port.to_be_bytes());
        // IPv4 UDP may carry no checksum: zero stays valid whatever the port.
        ((data + UDP_SPORT + 6) as *mut [u8; 2]).write_unaligned([0, 0]);
    }
    XDP_TX
}

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
fn sink(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + UDP_SPORT > end {
        return XDP_PASS;
    }
    // SAFETY: the first 34 bytes were checked to be in the frame.
    let (ethertype, proto) = unsafe {
        (
            ((data + 12) as *const [u8; 2]).read_unaligned(),
            *((data + 23) as *const u8),
        )
    };
    if ethertype != [0x08, 0x00] || proto != 17 {
        return XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
