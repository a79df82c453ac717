//! The punt path: packets of units with no live owner reach the agent over
//! an `AF_XDP` socket, the agent claims the unit for an instance and sends the packet on to
//! it, once.
//!
//! A receiver thread copies frames off the socket into a bounded queue
//! (overflow counted, never silent); the control loop drains the queue,
//! claims through the coordination store and re-injects each frame on the
//! owner's host-side veth with an `AF_PACKET` socket.
//!
//! Sockets bind in copy mode unless `agent.punt_zero_copy` is set. A
//! zero-copy socket makes the driver receive every frame of its queue into
//! the socket's UMEM — the fast path's too — so each frame the program
//! redirects to an instance or passes to the kernel is then copied out of
//! it: the punt path, which carries a packet or so per new unit, would tax
//! every packet. Copy mode touches only the punted frames.

use std::{
    collections::VecDeque,
    io,
    num::NonZeroU32,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use xdpilone::{BufIdx, IfInfo, Socket, SocketConfig, Umem, UmemConfig};

/// Frames waiting for the control loop, bounded.
pub struct PuntQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    cap: usize,
    /// Frames dropped because the queue was full.
    pub overflow: AtomicU64,
    /// Frames taken off the socket.
    pub received: AtomicU64,
    /// Frames the kernel could not put on the socket's ring (ring full,
    /// no buffer to fill): dropped before the agent saw them, counted.
    pub kernel_dropped: AtomicU64,
}

impl PuntQueue {
    #[must_use]
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            frames: Mutex::new(VecDeque::with_capacity(cap.min(4096))),
            cap,
            overflow: AtomicU64::new(0),
            received: AtomicU64::new(0),
            kernel_dropped: AtomicU64::new(0),
        })
    }

    fn push(&self, frame: Vec<u8>) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut q = self.frames.lock().expect("punt queue lock");
        if q.len() >= self.cap {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back(frame);
        }
    }

    /// Takes everything queued.
    pub fn drain(&self) -> Vec<Vec<u8>> {
        self.frames
            .lock()
            .expect("punt queue lock")
            .drain(..)
            .collect()
    }

    #[must_use]
    pub fn depth(&self) -> usize {
        self.frames.lock().expect("punt queue lock").len()
    }
}

const FRAMES: u32 = 2048;
const FRAME_SIZE: u32 = 4096;

#[repr(C, align(4096))]
struct Page([u8; FRAME_SIZE as usize]);

/// The receiver: an `AF_XDP` socket on one queue of the interface, served
/// by a thread of its own until dropped.
pub struct PuntReceiver {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The socket, for the XSKMAP (kept open by the thread).
    pub fd: RawFd,
    /// Bound in zero-copy mode (asked for, and the driver supports it),
    /// else copy mode.
    pub zero_copy: bool,
}

impl Drop for PuntReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[expect(clippy::needless_pass_by_value, reason = "used as map_err(errno)")]
fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw())
}

/// The parts of a bound socket the receive loop works with.
type Bound = (
    Umem,
    xdpilone::DeviceQueue,
    xdpilone::User,
    xdpilone::RingRx,
    NonNull<[u8]>,
);

/// Sets up a socket on (`ifindex`, `queue`) with a UMEM of its own.
fn bind_socket(ifindex: u32, queue: u32, zero_copy: bool, mem: NonNull<[u8]>) -> io::Result<Bound> {
    let config = UmemConfig {
        fill_size: FRAMES,
        complete_size: FRAMES,
        frame_size: FRAME_SIZE,
        headroom: 0,
        flags: 0,
    };
    // SAFETY: `mem` is a page-aligned allocation used by this socket only,
    // which the receiver thread frees only after the socket is closed.
    let umem = unsafe { Umem::new(config, mem) }.map_err(errno)?;
    let mut info = IfInfo::invalid();
    info.from_ifindex(ifindex).map_err(errno)?;
    info.set_queue(queue);
    let sock = Socket::with_shared(&info, &umem).map_err(errno)?;
    let device = umem.fq_cq(&sock).map_err(errno)?;
    let mode = if zero_copy {
        SocketConfig::XDP_BIND_ZEROCOPY
    } else {
        SocketConfig::XDP_BIND_COPY
    };
    let user = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(FRAMES),
                tx_size: None,
                bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP | mode,
            },
        )
        .map_err(errno)?;
    let rx_ring = user.map_rx().map_err(errno)?;
    umem.bind(&user).map_err(errno)?;
    Ok((umem, device, user, rx_ring, mem))
}

/// The bind modes to try, in order (`true`: zero-copy): copy mode only
/// unless zero-copy is asked for, and then copy mode as the fallback.
#[must_use]
pub fn bind_modes(zero_copy: bool) -> &'static [bool] {
    if zero_copy { &[true, false] } else { &[false] }
}

impl PuntReceiver {
    /// Opens the socket on `ifindex`, queue `queue`, in the calling
    /// thread's network namespace — in copy mode, or zero-copy first when
    /// `zero_copy` (see the module doc for its cost) — and starts receiving
    /// into `queue_out`.
    pub fn start(
        ifindex: u32,
        queue: u32,
        zero_copy: bool,
        queue_out: Arc<PuntQueue>,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<(RawFd, bool)>>();
        let stop2 = stop.clone();
        // The thread inherits the caller's network namespace.
        let thread = std::thread::Builder::new()
            .name("sluice-punt".into())
            .spawn(move || {
                // The frames' memory: the kernel writes into it for as long
                // as the socket lives, so it is dropped last, when this
                // thread ends (shared by every bind attempt).
                let mut area: Box<[Page]> = (0..FRAMES)
                    .map(|_| Page([0; FRAME_SIZE as usize]))
                    .collect();
                let len = area.len() * FRAME_SIZE as usize;
                let mem = NonNull::slice_from_raw_parts(
                    NonNull::new(area.as_mut_ptr().cast::<u8>()).expect("heap"),
                    len,
                );
                let mut last = io::Error::other("no bind mode to try");
                let mut bound = None;
                for &zc in bind_modes(zero_copy) {
                    match bind_socket(ifindex, queue, zc, mem) {
                        Ok(b) => {
                            bound = Some((b, zc));
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let Some((bound, zero_copy)) = bound else {
                    let _ = tx.send(Err(last));
                    return;
                };
                let (umem, mut device, user, mut rx_ring, mem) = bound;
                // Give every frame to the kernel to fill.
                {
                    let mut fill = device.fill(FRAMES);
                    fill.insert(
                        (0..FRAMES).filter_map(|i| umem.frame(BufIdx(i)).map(|f| f.offset)),
                    );
                    fill.commit();
                }
                let _ = tx.send(Ok((user.as_raw_fd(), zero_copy)));
                let base = mem.as_ptr().cast::<u8>();
                let mut dropped = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: user.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&raw mut pfd, 1, 20) };
                    let mut done = Vec::new();
                    {
                        let mut reader = rx_ring.receive(FRAMES);
                        while let Some(desc) = reader.read() {
                            // SAFETY: the kernel wrote `len` bytes at `addr`
                            // within our UMEM.
                            let bytes = unsafe {
                                std::slice::from_raw_parts(
                                    base.add(usize::try_from(desc.addr).expect("UMEM offsets fit")),
                                    usize::try_from(desc.len).expect("fits"),
                                )
                            };
                            queue_out.push(bytes.to_vec());
                            // The frame's start, to give back to the fill ring.
                            done.push(desc.addr - desc.addr % u64::from(FRAME_SIZE));
                        }
                        reader.release();
                    }
                    if !done.is_empty() {
                        let mut fill = device.fill(u32::try_from(done.len()).unwrap_or(FRAMES));
                        fill.insert(done.into_iter());
                        fill.commit();
                    }
                    if device.needs_wakeup() {
                        device.wake();
                    }
                    if let Ok(st) = user.statistics_v2() {
                        // Several sockets share the queue: add this one's growth.
                        // rx_dropped counts frames lost for want of a buffer (an empty fill
                        // ring, which rx_fill_ring_empty_descs counts again), rx_ring_full
                        // those lost to a full rx ring.
                        let now = st.rx_dropped + st.rx_ring_full;
                        queue_out
                            .kernel_dropped
                            .fetch_add(now.saturating_sub(dropped), Ordering::Relaxed);
                        dropped = now;
                    }
                }
                // The socket and its rings before the memory they point into.
                drop((user, rx_ring, device, umem));
                drop(area);
            })?;
        let (fd, zero_copy) = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| io::Error::other("the punt socket thread did not start"))??;
        Ok(Self {
            stop,
            thread: Some(thread),
            fd,
            zero_copy,
        })
    }
}

/// Sends frames out of a given interface, whole, as they are.
pub struct Reinjector {
    fd: OwnedFd,
}

impl Reinjector {
    /// An `AF_PACKET` socket in the calling thread's namespace.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket creation; protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a fresh fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends `frame` on interface `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
        addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("ifindex"))?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` is valid for its length; `addr` is a sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits"),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The agent's end of the punt path: a socket per receive queue of the
/// interface, all feeding one bounded queue, and the re-injecting socket.
pub struct Punt {
    pub queue: Arc<PuntQueue>,
    /// One socket per receive queue of the interface.
    pub receivers: Vec<PuntReceiver>,
    reinject: Reinjector,
    /// What it was opened with (`agent.punt_queue`, `agent.punt_zero_copy`):
    /// a reload hands the sockets over only to the same settings.
    pub settings: (usize, bool),
    /// Punted frames sent on to their (new) owner.
    pub delivered: u64,
    /// Punted frames that could not be, by reason: every frame taken off
    /// the sockets is reinjected or counted in one of these.
    pub not_service: u64,
    pub no_owner: u64,
    pub claim_failed: u64,
    pub send_failed: u64,
}

impl Punt {
    /// Binds a socket on every receive queue of `iface` (in the calling
    /// thread's namespace) and registers each in the data path's `PUNT`
    /// map: the socket must exist before the program can punt to it.
    pub fn open(
        dp: &mut super::xdp::XdpDatapath,
        iface: &str,
        ifindex: u32,
        cap: usize,
        zero_copy: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let queue = PuntQueue::new(cap);
        let mut receivers = Vec::new();
        // Queues past the `PUNT` map's slots are not served (see README).
        let queues = crate::sys::ethtool::rx_queues(iface).min(sluice_common::MAX_PUNT_QUEUES);
        for q in 0..queues {
            let r = PuntReceiver::start(ifindex, q, zero_copy, queue.clone())?;
            dp.set_punt_socket(q, r.fd)?;
            tracing::info!(
                iface,
                queue = q,
                zero_copy = r.zero_copy,
                "AF_XDP punt socket bound"
            );
            receivers.push(r);
        }
        Ok(Self {
            queue,
            receivers,
            reinject: Reinjector::new()?,
            settings: (cap, zero_copy),
            delivered: 0,
            not_service: 0,
            no_owner: 0,
            claim_failed: 0,
            send_failed: 0,
        })
    }

    /// Sends `frame` on instance interface `ifindex`, counting the outcome.
    pub fn reinject(&mut self, ifindex: u32, frame: &[u8]) {
        match self.reinject.send(ifindex, frame) {
            Ok(()) => self.delivered += 1,
            Err(e) => {
                tracing::debug!(error = %e, "re-injecting a punted frame failed");
                self.send_failed += 1;
            }
        }
    }

    /// The punt path's counts, for metrics.
    #[must_use]
    pub fn counts(&self) -> crate::telemetry::PuntCounts {
        crate::telemetry::PuntCounts {
            depth: self.queue.depth(),
            received: self.queue.received.load(Ordering::Relaxed),
            overflow: self.queue.overflow.load(Ordering::Relaxed),
            reinjected: self.delivered,
            not_service: self.not_service,
            no_owner: self.no_owner,
            claim_failed: self.claim_failed,
            send_failed: self.send_failed,
            kernel_dropped: self.queue.kernel_dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_mode_unless_zero_copy_is_asked_for() {
        // Defect: every queue was bound zero-copy first, which on such
        // drivers moves all fast-path traffic through the agent's UMEM.
        assert_eq!(super::bind_modes(false), &[false]);
        assert_eq!(super::bind_modes(true), &[true, false]);
    }
}
