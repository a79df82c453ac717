//! The frame under direct packet access: loads and stores at an offset,
//! each bounds check beside the access it guards, and the head moves
//! (VLAN pop, encapsulation room, decapsulation).

use aya_ebpf::{
    helpers::generated::{
        bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie, bpf_xdp_adjust_head,
        bpf_xdp_load_bytes,
    },
    programs::XdpContext,
};
use sluice_common::{
    maps::{FAMILY_V4, HostEntry, mac_word},
    parse::{ETH_HLEN, Flow, Frame, FromBytes, VLAN_TAG_LEN},
};

use crate::maps::{HEADERS, HEADERS_TCP_AT, SCRATCH};

/// `VLAN_TAG_LEN` as the head adjustment that drops a tag.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "4 fits in an i32"
)]
const VLAN_POP: i32 = VLAN_TAG_LEN as i32;

/// The frame under direct packet access.
pub(crate) struct XdpFrame {
    ctx: *mut aya_ebpf::bindings::xdp_md,
    data: usize,
    end: usize,
    pub(crate) rx_queue: u32,
}

impl XdpFrame {
    #[inline(always)]
    pub(crate) fn new(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx,
            data: ctx.data(),
            end: ctx.data_end(),
            rx_queue: ctx.rx_queue_index(),
        }
    }

    /// Whether the destination MAC is one of the host's.
    #[inline(always)]
    pub(crate) fn for_host(&self, host: &HostEntry) -> bool {
        let Some(dst) = self.load::<[u8; 6]>(0) else {
            return false;
        };
        let dst = mac_word(dst);
        // Zero marks an unused slot, and no frame is for MAC 0.
        dst != 0 && host.macs.contains(&dst)
    }

    /// Removes the frame's one VLAN tag: the frame starts `VLAN_TAG_LEN`
    /// bytes later, with the source MAC written back in front of the inner
    /// ethertype (the caller writes the destination MAC). On failure the
    /// frame is unchanged.
    #[inline(always)]
    pub(crate) fn pop_vlan(&mut self) -> bool {
        let Some(src) = self.load::<[u8; 6]>(6) else {
            return false;
        };
        if !self.adjust(VLAN_POP) {
            return false;
        }
        if self.data + 12 > self.end {
            return false;
        }
        // SAFETY: the 12 bytes at `data` were just checked to be in the frame.
        unsafe { write_mac(self.data + 6, src) };
        true
    }

    /// Moves the frame's start by `delta` bytes (positive: drops bytes at
    /// the front) and reloads the packet pointers.
    #[inline(always)]
    fn adjust(&mut self, delta: i32) -> bool {
        // SAFETY: `ctx` is this run's context.
        if unsafe { bpf_xdp_adjust_head(self.ctx, delta) } != 0 {
            return false;
        }
        // The helper invalidates every packet pointer: reload them.
        // SAFETY: `ctx` is this run's context.
        unsafe {
            self.data = (*self.ctx).data as usize;
            self.end = (*self.ctx).data_end as usize;
        }
        true
    }

    /// Drops `n` bytes (< 256) at the front.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "n < 256"
    )]
    pub(crate) fn strip(&mut self, n: usize) -> bool {
        n < 256 && self.adjust(n as i32)
    }

    /// Makes room for `n` bytes (< 256) at the front.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "n < 256"
    )]
    pub(crate) fn grow(&mut self, n: usize) -> bool {
        n < 256 && self.adjust(-(n as i32))
    }

    /// Writes `bytes` (a multiple of 4 bytes long) at `off`, if the frame
    /// holds them: in 4-byte stores, as a copy of the array would be a call
    /// to a byte-wise `memmove` in BPF.
    #[inline(always)]
    pub(crate) fn write_at<const N: usize>(&self, off: usize, bytes: &[u8; N]) -> bool {
        const { assert!(N.is_multiple_of(4)) };
        let start = self.data + off;
        if start + N > self.end {
            return false;
        }
        let mut at = 0;
        while at < N {
            let w = u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            // SAFETY: the N bytes at `start` were just checked to be in the
            // frame, and `at + 4 <= N`.
            unsafe { ((start + at) as *mut u32).write_unaligned(w) };
            at += 4;
        }
        true
    }

    /// Whether a socket other than a listener, in network namespace
    /// `netns_id` (relative to the NIC's; `u32::MAX`: the NIC's own),
    /// would take this TCP packet: an established connection, or one being
    /// set up or closed.
    #[inline(always)]
    pub(crate) fn has_connection(&self, flow: &Flow, netns_id: u32) -> bool {
        const TCP_LISTEN: u32 = 10;
        let Some(tuple) = SCRATCH.get_ptr_mut(0) else {
            // Cannot look: assume the owner has it, as without a cluster.
            return true;
        };
        #[expect(clippy::cast_possible_truncation, reason = "the port halves")]
        let (sport, dport) = (flow.ports as u16, (flow.ports >> 16) as u16);
        let size = if flow.family == FAMILY_V4 {
            // SAFETY: this CPU's scratch slot; writing the union's IPv4
            // member whole.
            unsafe {
                (*tuple).__bindgen_anon_1.ipv4 =
                    aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                        saddr: flow.src[0],
                        daddr: flow.dst[0],
                        sport,
                        dport,
                    };
            }
            12
        } else {
            // SAFETY: as above, the IPv6 member.
            unsafe {
                (*tuple).__bindgen_anon_1.ipv6 =
                    aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                        saddr: flow.src,
                        daddr: flow.dst,
                        sport,
                        dport,
                    };
            }
            36
        };
        // A negative id (as i32) means the context's own namespace.
        let netns = u64::from(netns_id) | if netns_id == u32::MAX { !0u64 << 32 } else { 0 };
        // SAFETY: `ctx` is this run's context and `tuple` holds `size`
        // bytes of the tuple's member for the family.
        let sk = unsafe { bpf_skc_lookup_tcp(self.ctx.cast(), tuple, size, netns, 0) };
        if sk.is_null() {
            return false;
        }
        // SAFETY: a socket the helper returned, read then released.
        let state = unsafe { (*sk).state };
        // Only a listener: the ACK of a handshake it answered with a SYN
        // cookie is its connection too (no request socket is left to find).
        let cookie = state == TCP_LISTEN && self.completes_syn_cookie(flow, sk.cast());
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
        state != TCP_LISTEN || cookie
    }

    /// Whether this TCP packet is the ACK completing a handshake that
    /// listener `sk` answered with a SYN cookie: the kernel checks the
    /// cookie (`bpf_tcp_check_syncookie`, as Cilium and Katran-like load
    /// balancers do) on copies of the IP and TCP headers, in a per-CPU
    /// slot as the stack is spoken for.
    #[inline(always)]
    fn completes_syn_cookie(&self, flow: &Flow, sk: *mut core::ffi::c_void) -> bool {
        const TCP_SYN_RST_ACK: u8 = 0x16;
        const TCP_ACK: u8 = 0x10;
        if flow.tcp_flags & TCP_SYN_RST_ACK != TCP_ACK {
            return false;
        }
        let Some(slot) = HEADERS.get_ptr_mut(0) else {
            return false;
        };
        let ip = slot.cast::<u8>();
        // The IP header right after the Ethernet header (and its one VLAN
        // tag, still on the frame here).
        let l3 = ETH_HLEN + if flow.vlan_tagged { VLAN_TAG_LEN } else { 0 };
        let ip_len: u32 = if flow.family == FAMILY_V4 { 20 } else { 40 };
        #[expect(clippy::cast_possible_truncation, reason = "offsets within a frame")]
        let (l3, l4) = (l3 as u32, flow.l4_off as u32);
        // SAFETY: the slot holds 40 bytes of IP header room then 20 of TCP
        // header; the helpers write and read within them.
        unsafe {
            let th = ip.add(HEADERS_TCP_AT);
            bpf_xdp_load_bytes(self.ctx, l3, ip.cast(), ip_len) == 0
                && bpf_xdp_load_bytes(self.ctx, l4, th.cast(), 20) == 0
                && bpf_tcp_check_syncookie(sk, ip.cast(), ip_len, th.cast(), 20) == 0
        }
    }

    /// Writes an Ethernet header at the front.
    #[inline(always)]
    pub(crate) fn write_eth(&self, dst: [u8; 6], src: [u8; 6], ethertype: u16) -> bool {
        if self.data + ETH_HLEN > self.end {
            return false;
        }
        // SAFETY: the 14 bytes at `data` were just checked to be in the frame.
        unsafe {
            write_mac(self.data, dst);
            write_mac(self.data + 6, src);
            ((self.data + 12) as *mut u16).write_unaligned(ethertype.to_be());
        }
        true
    }

    #[inline(always)]
    pub(crate) fn set_dst_mac(&self, mac: [u8; 6]) -> bool {
        if self.data + 6 > self.end {
            return false;
        }
        // SAFETY: the 6 bytes at `data` were just checked to be in the frame.
        unsafe { write_mac(self.data, mac) };
        true
    }
}

/// Writes a MAC at `at` as a word and a half-word: a 6-byte array copy
/// would be a call to a byte-wise `memmove` in BPF.
///
/// # Safety
///
/// The 6 bytes at `at` must be in the frame.
#[inline(always)]
unsafe fn write_mac(at: usize, mac: [u8; 6]) {
    // SAFETY: the caller's promise.
    unsafe {
        (at as *mut u32).write_unaligned(u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]));
        ((at + 4) as *mut u16).write_unaligned(u16::from_ne_bytes([mac[4], mac[5]]));
    }
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn size(&self) -> usize {
        self.end - self.data
    }

    #[inline(always)]
    fn load<T: FromBytes>(&self, off: usize) -> Option<T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: the bytes were just checked to be in the frame, and `T:
        // FromBytes` is valid for any bit pattern.
        Some(unsafe { (start as *const T).read_unaligned() })
    }

    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offsets are within a frame (< 64 KiB) and len <= 16"
    )]
    fn load_tag(&self, off: usize, len: usize) -> Option<[u32; 4]> {
        if len == 0 || len > 16 {
            return None;
        }
        // Fast case: 16 bytes readable in the linear frame. Read them all
        // and keep the first `len`: two loads and two masks, no helper call.
        // (The caller has checked the tag lies inside the datagram.)
        if off <= 4096 {
            let start = self.data + off;
            if start + 16 <= self.end {
                // SAFETY: the 16 bytes were just checked to be in the frame.
                let (lo, hi) = unsafe {
                    (
                        (start as *const u64).read_unaligned(),
                        ((start + 8) as *const u64).read_unaligned(),
                    )
                };
                let bits = (len as u64) * 8;
                let lo_mask = if bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                let hi_mask = if bits >= 128 {
                    u64::MAX
                } else if bits <= 64 {
                    0
                } else {
                    (1u64 << (bits - 64)) - 1
                };
                let (lo, hi) = (lo & lo_mask, hi & hi_mask);
                return Some([lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32]);
            }
        }
        // Near the end of the frame, or in a fragment of a multi-buffer
        // frame: the helper copies exactly `len` bytes.
        let mut words = [0u32; 4];
        // SAFETY: `words` holds 16 >= `len` bytes.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.ctx, off as u32, words.as_mut_ptr().cast(), len as u32)
        };
        (ret == 0).then_some(words)
    }
}
