//! The punt path: packets of units with no live owner reach the agent over
//! an `AF_XDP` socket (zero-copy where the driver allows, else copy mode),
//! the agent claims the unit for an instance and sends the packet on to
//! it, once.
//!
//! A receiver thread copies frames off the socket into a bounded queue
//! (overflow counted, never silent); the control loop drains the queue,
//! claims through the coordination store and re-injects each frame on the
//! owner's host-side veth with an `AF_PACKET` socket.

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
    /// Bound in zero-copy mode (the driver supports it), else copy mode.
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
    // SAFETY: `mem` is a leaked, page-aligned allocation used by this
    // socket only, for the life of the process.
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

impl PuntReceiver {
    /// Opens the socket on `ifindex`, queue `queue`, in the calling
    /// thread's network namespace — zero-copy where the driver can, copy
    /// mode otherwise — and starts receiving into `queue_out`.
    pub fn start(ifindex: u32, queue: u32, queue_out: Arc<PuntQueue>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<(RawFd, bool)>>();
        let stop2 = stop.clone();
        // The thread inherits the caller's network namespace.
        let thread = std::thread::Builder::new()
            .name("sluice-punt".into())
            .spawn(move || {
                // The frames' memory: the kernel writes into it for as long as the
                // socket lives, so it lives as long as the process (one per socket,
                // shared by the zero-copy attempt and the copy-mode fallback).
                let area: Box<[Page]> = (0..FRAMES)
                    .map(|_| Page([0; FRAME_SIZE as usize]))
                    .collect();
                let area = Box::leak(area);
                let len = area.len() * FRAME_SIZE as usize;
                let mem = NonNull::slice_from_raw_parts(
                    NonNull::new(area.as_mut_ptr().cast::<u8>()).expect("heap"),
                    len,
                );
                let (bound, zero_copy) = match bind_socket(ifindex, queue, true, mem) {
                    Ok(b) => (b, true),
                    Err(_) => match bind_socket(ifindex, queue, false, mem) {
                        Ok(b) => (b, false),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    },
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
                drop(user);
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
    /// Punted frames sent on to their (new) owner.
    pub delivered: u64,
    /// Punted frames that could not be: not a service packet, no instance
    /// to claim for, or the send failed.
    pub failed: u64,
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
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let queue = PuntQueue::new(cap);
        let mut receivers = Vec::new();
        // Queues past the `PUNT` map's slots are not served (see README).
        let queues = crate::sys::ethtool::rx_queues(iface).min(sluice_common::MAX_PUNT_QUEUES);
        for q in 0..queues {
            let r = PuntReceiver::start(ifindex, q, queue.clone())?;
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
            delivered: 0,
            failed: 0,
        })
    }

    /// Sends `frame` on instance interface `ifindex`, counting the outcome.
    pub fn reinject(&mut self, ifindex: u32, frame: &[u8]) {
        match self.reinject.send(ifindex, frame) {
            Ok(()) => self.delivered += 1,
            Err(e) => {
                tracing::debug!(error = %e, "re-injecting a punted frame failed");
                self.failed += 1;
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
            failed: self.failed,
            kernel_dropped: self.queue.kernel_dropped.load(Ordering::Relaxed),
        }
    }
}
