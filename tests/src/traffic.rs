//! Real-socket servers and clients for end-to-end tests, each bounded in
//! count and time.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns;

/// A datagram as a server saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// UDP servers, one per namespace, all bound to the same VIP and port.
pub struct UdpServers {
    stop: Arc<AtomicBool>,
    /// Datagrams received, summed over the servers.
    pub total: Arc<AtomicU64>,
    /// Per server: most datagrams a second it reads (0: as fast as it can).
    /// A throttled server lets its socket queue fill and drop: a slow
    /// instance.
    pub throttle: Vec<Arc<AtomicU64>>,
    /// Per server: set, it closes its socket at once and receives no more,
    /// as a server process killed in its container.
    crashed: Vec<Arc<AtomicBool>>,
    handles: Vec<JoinHandle<Vec<Received>>>,
}

/// A server's receive loop: reads at most `limit` datagrams a second when
/// `limit` is set, until `stop`, then drains what is queued.
fn receive(
    sock: &UdpSocket,
    (stop, crashed): (&AtomicBool, &AtomicBool),
    total: &AtomicU64,
    limit: &AtomicU64,
) -> Vec<Received> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut next = Instant::now();
    let take = |got: &mut Vec<Received>, payload: &[u8], from| {
        got.push(Received {
            from,
            payload: payload.to_vec(),
        });
        total.fetch_add(1, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        if crashed.load(Ordering::Relaxed) {
            return got;
        }
        let pps = limit.load(Ordering::Relaxed);
        if pps > 0 {
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            #[expect(clippy::cast_precision_loss, reason = "a rate")]
            let gap = Duration::from_secs_f64(1.0 / pps as f64);
            next = next.max(now) + gap;
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            take(&mut got, &buf[..n], from);
        }
    }
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        take(&mut got, &buf[..n], from);
    }
    got
}

fn set_rcvbuf(sock: &impl AsRawFd, bytes: i32) {
    // SO_RCVBUFFORCE: as root, beyond rmem_max, so a burst is not dropped
    // for want of buffer.
    // SAFETY: setsockopt with a valid int option.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            u32::try_from(size_of::<i32>()).expect("small"),
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

impl UdpServers {
    /// Binds `addr` in each namespace and starts receiving, with 16 MiB of
    /// receive buffer each.
    #[must_use]
    pub fn start(namespaces: &[String], addr: SocketAddr) -> Self {
        Self::start_with(namespaces, addr, 16 << 20)
    }

    /// As [`Self::start`], with `rcvbuf` bytes of receive buffer.
    #[must_use]
    pub fn start_with(namespaces: &[String], addr: SocketAddr, rcvbuf: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let mut throttle = Vec::new();
        let mut crashed = Vec::new();
        let handles = namespaces
            .iter()
            .map(|ns| {
                let sock = netns::run_in(ns, || UdpSocket::bind(addr))
                    .unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"));
                set_rcvbuf(&sock, rcvbuf);
                sock.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let limit = Arc::new(AtomicU64::new(0));
                throttle.push(limit.clone());
                let crash = Arc::new(AtomicBool::new(false));
                crashed.push(crash.clone());
                let (stop, total) = (stop.clone(), total.clone());
                // The socket is the thread's: it closes when the thread ends.
                std::thread::spawn(move || receive(&sock, (&stop, &crash), &total, &limit))
            })
            .collect();
        Self {
            stop,
            total,
            throttle,
            crashed,
            handles,
        }
    }

    /// Server `k` closes its socket within its read timeout (20 ms) and
    /// receives nothing more, as if its process were killed.
    pub fn crash(&self, k: usize) {
        self.crashed[k].store(true, Ordering::Relaxed);
    }

    /// Waits until the servers have received `n` datagrams, or `timeout`.
    pub fn wait_for(&self, n: u64, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.total.load(Ordering::Relaxed) < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the servers and returns what each received, in namespace order.
    #[must_use]
    pub fn finish(self) -> Vec<Vec<Received>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("server thread"))
            .collect()
    }
}

/// `n` UDP sockets in the client namespace, each on its own ephemeral port,
/// of `dst`'s family.
fn client_sockets(client_ns: &str, dst: SocketAddr, n: usize) -> Vec<UdpSocket> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    netns::run_in(client_ns, || {
        (0..n)
            .map(|_| UdpSocket::bind(bind).expect("client socket"))
            .collect()
    })
}

/// Sends `rate` datagrams a second to `dst` from `sockets` client sockets in
/// turn, until `stop` is set or `deadline` passes; `rate` may change while
/// it runs. Datagram `seq` from socket `i` carries `payload(i, seq)`.
/// Returns the count sent.
pub fn paced_udp(
    client_ns: &str,
    dst: SocketAddr,
    sockets: usize,
    rate: &AtomicU64,
    stop: &AtomicBool,
    deadline: Duration,
    payload: impl Fn(usize, u64) -> Vec<u8>,
) -> u64 {
    let socks = client_sockets(client_ns, dst, sockets);
    let end = Instant::now() + deadline;
    let mut sent = 0u64;
    let mut budget = 0.0f64;
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
        let now = Instant::now();
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let r = rate.load(Ordering::Relaxed) as f64;
        budget += r * now.duration_since(last).as_secs_f64();
        last = now;
        while budget >= 1.0 {
            let i = usize::try_from(sent % socks.len() as u64).expect("fits");
            if socks[i].send_to(&payload(i, sent), dst).is_ok() {
                sent += 1;
            }
            budget -= 1.0;
        }
    }
    sent
}

/// [`paced_udp`] on a thread of its own, with its rate and stop flag at hand.
pub struct PacedSender {
    /// Datagrams a second; may be changed while it runs.
    pub rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl PacedSender {
    /// Starts sending `rate` datagrams a second, as [`paced_udp`] does.
    pub fn spawn(
        client_ns: &str,
        dst: SocketAddr,
        sockets: usize,
        rate: u64,
        deadline: Duration,
        payload: impl Fn(usize, u64) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let rate = Arc::new(AtomicU64::new(rate));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, rate, stop) = (client_ns.to_owned(), rate.clone(), stop.clone());
            std::thread::spawn(move || {
                paced_udp(&client, dst, sockets, &rate, &stop, deadline, payload)
            })
        };
        Self { rate, stop, thread }
    }

    /// Whether it has stopped on its own (its deadline passed).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops it and returns how many datagrams it sent; `Err` if the
    /// sending thread panicked.
    pub fn finish(self) -> std::thread::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join()
    }
}

/// A bounded UDP load from the client namespace.
pub struct UdpLoad<'a> {
    pub client_ns: &'a str,
    pub dst: SocketAddr,
    /// Client sockets, each with its own source port.
    pub sockets: usize,
    /// Datagrams each socket sends.
    pub per_socket: u32,
    /// Most datagrams sent but not yet received (counted by `received`), so
    /// that no queue on the way overflows.
    pub window: u64,
    /// Stop sending at this time from the start, whatever is left.
    pub deadline: Duration,
}

/// Sends the load. Each payload is `prefix(socket)`, then the socket index
/// and the sequence number. Returns (datagrams sent, the sockets' local
/// addresses).
pub fn send_udp(
    load: &UdpLoad<'_>,
    received: &AtomicU64,
    prefix: impl Fn(usize) -> Vec<u8>,
) -> (u64, Vec<SocketAddr>) {
    let UdpLoad {
        client_ns,
        dst,
        sockets,
        per_socket,
        window,
        deadline,
    } = *load;
    let socks = client_sockets(client_ns, dst, sockets);
    let locals = socks
        .iter()
        .map(|s| s.local_addr().expect("local addr"))
        .collect();
    let end = Instant::now() + deadline;
    let mut sent = 0u64;
    'rounds: for seq in 0..per_socket {
        for (i, s) in socks.iter().enumerate() {
            while sent - received.load(Ordering::Relaxed) >= window {
                if Instant::now() > end {
                    break 'rounds;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            let mut payload = prefix(i);
            payload.extend_from_slice(&u32::try_from(i).expect("fits").to_be_bytes());
            payload.extend_from_slice(&seq.to_be_bytes());
            s.send_to(&payload, dst).expect("send");
            sent += 1;
        }
    }
    (sent, locals)
}

/// TCP echo servers that prefix each reply with their name.
pub struct TcpServers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    /// Connections accepted, per server.
    pub accepted: Vec<Arc<AtomicU64>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl TcpServers {
    /// Listens on `addr` in each namespace; server `k` answers `name(k)|data`.
    #[must_use]
    pub fn start(namespaces: &[String], addr: SocketAddr, names: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut accepted = Vec::new();
        let handles = namespaces
            .iter()
            .zip(names)
            .map(|(ns, name)| {
                let l = netns::run_in(ns, || TcpListener::bind(addr))
                    .unwrap_or_else(|e| panic!("listening on {addr} in {ns}: {e}"));
                l.set_nonblocking(true).expect("nonblocking");
                let count = Arc::new(AtomicU64::new(0));
                accepted.push(count.clone());
                let (stop, errors, name) = (stop.clone(), errors.clone(), name.clone());
                std::thread::spawn(move || {
                    let mut conns = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((s, _)) => {
                                count.fetch_add(1, Ordering::Relaxed);
                                let (name, errors) = (name.clone(), errors.clone());
                                conns.push(std::thread::spawn(move || {
                                    if let Err(e) = echo(s, &name) {
                                        errors.lock().expect("lock").push(format!("{name}: {e}"));
                                    }
                                }));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                    for c in conns {
                        let _ = c.join();
                    }
                })
            })
            .collect();
        Self {
            stop,
            handles,
            accepted,
            errors,
        }
    }

    /// Stops the servers; returns the errors connections hit.
    #[must_use]
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
        std::mem::take(&mut *self.errors.lock().expect("lock"))
    }
}

fn echo(mut s: TcpStream, name: &str) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let mut reply = format!("{name}|").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        s.write_all(&reply)?;
    }
}

/// Sends `msg` on an open connection to a [`TcpServers`] server and reads
/// the echo; returns the serving instance's name.
pub fn tcp_echo(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(msg.as_bytes()) {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    Ok(text
        .split_once('|')
        .map(|(n, _)| n.to_owned())
        .unwrap_or_default())
}

/// Opens a connection from the client namespace, sends `msg`, reads the
/// reply and closes (FIN). Returns (local address, server name, echoed
/// bytes).
pub fn tcp_exchange(
    client_ns: &str,
    dst: SocketAddr,
    msg: &[u8],
) -> std::io::Result<(SocketAddr, String, Vec<u8>)> {
    let mut s = netns::run_in(client_ns, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !got.ends_with(msg) {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let local = s.local_addr()?;
    s.shutdown(std::net::Shutdown::Write)?;
    // Wait for the server's FIN: the connection completes both ways.
    let n = s.read(&mut buf)?;
    if n != 0 {
        return Err(std::io::Error::other("unexpected data after echo"));
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (name, rest) = text
        .split_once('|')
        .ok_or_else(|| std::io::Error::other(format!("reply without a server name: {text:?}")))?;
    Ok((local, name.to_owned(), rest.as_bytes().to_vec()))
}
