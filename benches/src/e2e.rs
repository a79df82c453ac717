//! End to end on the namespace testbed: datagrams a second that reach
//! four instances' UDP sockets — read by a real socket in each instance's
//! namespace — through Sluice and through the kernel doing the same
//! distribution without it, with the same generators, paths interleaved
//! (A, B, C, A, B, C, ...) so that the machine's drift (other work on a
//! shared VM) falls on all of them alike.
//!
//! Paths:
//! - Sluice: the agent's XDP program on the host's NIC veth rewrites the
//!   destination MAC and redirects to the instance's veth;
//! - IPVS, direct routing (`ipvsadm -s sh -g`): the kernel's own
//!   MAC-rewriting balancer, where the kernel has it (`CONFIG_IP_VS`);
//! - nftables in the netdev family on the NIC's ingress: the instance by
//!   `jhash` of the 5-tuple, `ether daddr set`, `fwd to` its veth — the
//!   same MAC rewrite and forward Sluice does, in the kernel, without XDP
//!   (the stand-in for IPVS-DR where that is missing);
//! - nftables DNAT by `jhash`, routed by the kernel's stack.
//!
//! Generators: `BPF_PROG_TEST_RUN` in live-frames mode on the client's
//! veth (a small XDP program writes each frame from a template with a new
//! source port and transmits it), which runs the whole chain inline and
//! saturates; and `sendmmsg` from two threads over 128 UDP sockets.
//!
//! CPU: the kernel here accounts by tick, without `IRQ_TIME_ACCOUNTING`, so
//! softirq work that runs in a thread's context (as the whole receive
//! chain does behind the live-frames generator) is charged to that thread.
//! The figures, each per delivered datagram:
//! - system busy: user + nice + system + irq + softirq of /proc/stat, all
//!   CPUs (idle, iowait and steal are not work); includes anything else
//!   the machine runs;
//! - busy less generator thread: the same minus the generator threads' own
//!   CPU clocks (which include the inline softirq work: with live frames
//!   that is most of the chain);
//! - ours less generator alone: this process's CPU (generator, socket
//!   readers, the idle agent, and softirq work run in their context) plus
//!   the ksoftirqd threads', minus what the generator costs by itself per
//!   frame (measured with the frames dropped by an XDP program on the
//!   NIC veth, the cheapest receive there is) — distribution, delivery and
//!   the socket reads, without the machine's other work;
//! - socket readers: the reading threads' CPU clocks.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::thread::JoinHandleExt as _},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::MapData,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode},
};
use serde::Serialize;
use sluice::{config::Config, coord::EmbeddedStore, datapath::xdp::objects};
use sluice_tests::{
    netns,
    packet::Packet,
    testbed::{self, Testbed},
};

#[derive(Serialize)]
pub(crate) struct Row {
    pub(crate) path: String,
    pub(crate) generator: String,
    /// Why the path was not measured (then every figure is 0).
    pub(crate) unavailable: Option<String>,
    pub(crate) rounds: usize,
    pub(crate) generated_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) delivered_pps_min: f64,
    pub(crate) delivered_pps_max: f64,
    /// Medians over the rounds, ns of CPU per delivered datagram.
    pub(crate) busy_ns: f64,
    pub(crate) busy_less_generator_ns: f64,
    pub(crate) ours_less_generator_ns: f64,
    pub(crate) readers_ns: f64,
    pub(crate) softirq_ns: f64,
}

const INSTANCES: usize = 4;
const PORT: u16 = 7000;
/// Rounds of each path, interleaved.
const ROUNDS: usize = 3;

/// CPU time of the whole system from /proc/stat, in ns: (busy, softirq).
/// Busy is user + nice + system + irq + softirq; steal is the hypervisor's.
pub(crate) fn system_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal ...
    let busy = f(0) + f(1) + f(2) + f(5) + f(6);
    (ticks_ns(busy), ticks_ns(f(6)))
}

fn ticks_ns(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "CPU times")]
    let ns = ticks as f64 * 1e9 / hz as f64;
    ns
}

fn clock_ns(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    #[expect(clippy::cast_precision_loss, reason = "CPU times")]
    let ns = ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64;
    ns
}

/// The CPU clock of this process, all threads, in ns.
fn process_ns() -> f64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The CPU clock of the calling thread, in ns.
fn thread_ns() -> f64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The CPU clock of another thread of this process, in ns.
fn pthread_ns(t: libc::pthread_t) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `t` is a live thread of this process (its handle is held).
    if unsafe { libc::pthread_getcpuclockid(t, &raw mut clock) } != 0 {
        return 0.0;
    }
    clock_ns(clock)
}

/// The pids of the ksoftirqd threads, where softirq work goes when it is
/// too much to run inline.
fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// utime + stime of `pids`, in ns.
pub(crate) fn pids_ns(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command (which may hold spaces), from field 3.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks_ns(ticks)
}

/// A snapshot of every CPU figure, in ns.
#[derive(Clone, Copy)]
struct Cpu {
    busy: f64,
    softirq: f64,
    ours: f64,
    readers: f64,
}

fn snapshot(ksoftirqd: &[u32], readers: &Readers) -> Cpu {
    let (busy, softirq) = system_cpu();
    Cpu {
        busy,
        softirq,
        ours: process_ns() + pids_ns(ksoftirqd),
        readers: readers.cpu_ns(),
    }
}

fn mac_of(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", dev])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .nth(2)
        .and_then(sluice::config::parse_mac)
        .with_context(|| format!("MAC of {dev} in {ns}: {text:?}"))?;
    Ok(mac)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One UDP socket a instance, bound to port 7000 on every address (the
/// VIP for the MAC-rewriting paths, the instance's own address after
/// DNAT), each read by a thread of its own with `recvmmsg`, until stopped
/// or a deadline.
struct Readers {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(tb: &Testbed, deadline: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in &tb.instances {
            let sock = netns::run_in(&i.netns, || {
                std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], PORT)))
            })
            .with_context(|| format!("binding port {PORT} in {}", i.netns))?;
            sock.set_read_timeout(Some(Duration::from_millis(20)))?;
            let bytes: i32 = 4 << 20;
            // SAFETY: setsockopt with a valid int option. SO_RCVBUFFORCE:
            // as root, beyond rmem_max.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const bytes).cast(),
                    u32::try_from(size_of::<i32>()).expect("small"),
                );
            }
            let (stop, count) = (stop.clone(), count.clone());
            threads.push(std::thread::spawn(move || {
                read_loop(&sock, &stop, &count, deadline);
            }));
        }
        Ok(Self {
            stop,
            count,
            threads,
        })
    }

    fn read(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The readers' CPU clocks, summed.
    fn cpu_ns(&self) -> f64 {
        self.threads
            .iter()
            .filter(|t| !t.is_finished())
            .map(|t| pthread_ns(t.as_pthread_t()))
            .sum()
    }

    /// Waits until nothing more arrives (at most 1 s): what the generator
    /// sent last is still in the queues when it stops.
    fn settle(&self) {
        let end = Instant::now() + Duration::from_secs(1);
        let mut last = self.read();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.read();
            if now == last {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_loop(sock: &std::net::UdpSocket, stop: &AtomicBool, count: &AtomicU64, deadline: Duration) {
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 64]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero mmsghdr is valid; each points at its own iovec.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(&mut iovs) {
        m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
        m.msg_hdr.msg_iovlen = 1;
    }
    let end = Instant::now() + deadline;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        // SAFETY: `msgs` holds BATCH headers pointing at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                u32::try_from(BATCH).expect("small"),
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            count.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// How frames are made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Generator {
    /// `BPF_PROG_TEST_RUN` live frames, `XDP_TX` on the client's veth.
    LiveFrames,
    /// `sendmmsg` from 2 threads × 64 UDP sockets in the client namespace.
    Sendmmsg,
}

impl Generator {
    const fn name(self) -> &'static str {
        match self {
            Self::LiveFrames => "live-frames XDP_TX",
            Self::Sendmmsg => "sendmmsg, 2 threads",
        }
    }
}

/// What a generator run did: frames, elapsed time, its threads' CPU (ns).
struct Generated {
    frames: u64,
    elapsed: Duration,
    cpu_ns: f64,
}

fn generate(
    g: Generator,
    tb: &Testbed,
    bench: &Ebpf,
    frame: &[u8],
    secs: f64,
) -> anyhow::Result<Generated> {
    match g {
        Generator::LiveFrames => live_frames(tb, bench, frame, secs),
        Generator::Sendmmsg => sendmmsg(tb, secs),
    }
}

/// `sendmmsg` batches of 64 datagrams from 2 threads, each rotating over 64
/// sockets (64 × 2 flows).
fn sendmmsg(tb: &Testbed, secs: f64) -> anyhow::Result<Generated> {
    let dst = SocketAddr::new(testbed::VIP_V4.into(), PORT);
    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let socks: Vec<std::net::UdpSocket> = netns::run_in(&tb.client, || {
                (0..64)
                    .map(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
                    .collect::<Result<_, _>>()
            })?;
            for s in &socks {
                s.connect(dst)?;
            }
            anyhow::Ok(std::thread::spawn(move || {
                let cpu0 = thread_ns();
                let payload = [0u8; 18];
                let mut iov = libc::iovec {
                    iov_base: payload.as_ptr().cast_mut().cast(),
                    iov_len: payload.len(),
                };
                // SAFETY: all-zero mmsghdr is valid; each points at `iov`.
                let mut msgs: Vec<libc::mmsghdr> =
                    (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
                for m in &mut msgs {
                    m.msg_hdr.msg_iov = &raw mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                }
                let (mut n, mut i) = (0u64, 0usize);
                let end = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < end {
                    let fd = socks[i % socks.len()].as_raw_fd();
                    i += 1;
                    // SAFETY: `msgs` holds 64 valid headers for connected sockets.
                    let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), 64, 0) };
                    n += u64::try_from(sent.max(0)).unwrap_or(0);
                }
                (n, thread_ns() - cpu0)
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let (mut frames, mut cpu_ns) = (0, 0.0);
    for h in threads {
        let (n, cpu) = h
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
        frames += n;
        cpu_ns += cpu;
    }
    Ok(Generated {
        frames,
        elapsed: t.elapsed(),
        cpu_ns,
    })
}

/// Runs the live-frames generator for `secs` from the client namespace.
fn live_frames(tb: &Testbed, bench: &Ebpf, frame: &[u8], secs: f64) -> anyhow::Result<Generated> {
    let prog: &Xdp = bench
        .program("generate")
        .context("program `generate`")?
        .try_into()?;
    let frame_len = u32::try_from(frame.len())?;
    netns::run_in(&tb.client, || {
        let ifindex = sluice::sys::link::ifindex("eth0")?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame_len, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let cpu0 = thread_ns();
        let t = Instant::now();
        let mut n = 0u64;
        let chunk = 100_000u32;
        while t.elapsed().as_secs_f64() < secs {
            let opts = TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::default()
            };
            prog.test_run(opts)
                .context("live-frames BPF_PROG_TEST_RUN")?;
            n += u64::from(chunk);
        }
        anyhow::Ok(Generated {
            frames: n,
            elapsed: t.elapsed(),
            cpu_ns: thread_ns() - cpu0,
        })
    })
}

/// A distribution path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Sluice,
    Ipvs,
    NftFwd,
    NftDnat,
}

impl PathKind {
    const fn name(self) -> &'static str {
        match self {
            Self::Sluice => "Sluice (XDP: MAC rewrite, redirect)",
            Self::Ipvs => "IPVS direct routing (`-s sh -g`)",
            Self::NftFwd => "nftables netdev ingress (jhash: MAC rewrite, `fwd`)",
            Self::NftDnat => "nftables DNAT (jhash), kernel stack",
        }
    }
}

/// One measured run of a path, before the medians.
struct Sample {
    generated_pps: f64,
    delivered_pps: f64,
    busy_ns: f64,
    busy_less_generator_ns: f64,
    ours_less_generator_ns: f64,
    readers_ns: f64,
    softirq_ns: f64,
}

/// What the test bed and the programs are, for every path.
struct Bed {
    tb: Testbed,
    bench: Ebpf,
    frame: Vec<u8>,
    ksoftirqd: Vec<u32>,
    macs: Vec<[u8; 6]>,
    secs: f64,
}

impl Bed {
    /// Drives `g` for `secs` with the path in place; `gen_ns_per_frame` is
    /// the generator's own cost (0 while calibrating it).
    fn measure(&self, g: Generator, gen_ns_per_frame: f64) -> anyhow::Result<(Sample, Generated)> {
        let readers = Readers::start(&self.tb, Duration::from_secs_f64(self.secs + 10.0))?;
        // Warm up (caches, conntrack) before the measured run.
        let _ = generate(g, &self.tb, &self.bench, &self.frame, 0.3)?;
        readers.settle();
        let read0 = readers.read();
        let c0 = snapshot(&self.ksoftirqd, &readers);
        let made = generate(g, &self.tb, &self.bench, &self.frame, self.secs)?;
        readers.settle();
        let c1 = snapshot(&self.ksoftirqd, &readers);
        let delivered = readers.read() - read0;
        drop(readers);
        #[expect(clippy::cast_precision_loss, reason = "rates")]
        let (secs, frames, per) = (
            made.elapsed.as_secs_f64(),
            made.frames as f64,
            delivered.max(1) as f64,
        );
        let busy = c1.busy - c0.busy;
        Ok((
            Sample {
                generated_pps: frames / secs,
                delivered_pps: per / secs,
                busy_ns: busy / per,
                busy_less_generator_ns: (busy - made.cpu_ns) / per,
                ours_less_generator_ns: (c1.ours - c0.ours - gen_ns_per_frame * frames) / per,
                readers_ns: (c1.readers - c0.readers) / per,
                softirq_ns: (c1.softirq - c0.softirq) / per,
            },
            made,
        ))
    }

    /// The generator's own CPU per frame: its frames dropped by an XDP
    /// program on the NIC veth, the cheapest receive there is.
    fn calibrate(&mut self, g: Generator) -> anyhow::Result<f64> {
        let host = self.tb.host.clone();
        let sink: &mut Xdp = self.bench.program_mut("sink").context("sink")?.try_into()?;
        let link = netns::run_in(&host, || sink.attach(testbed::NIC, XdpMode::Driver))?;
        let measured = self.measure(g, 0.0);
        let sink: &mut Xdp = self.bench.program_mut("sink").context("sink")?.try_into()?;
        sink.detach(link)?;
        let (_, made) = measured?;
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        Ok(made.cpu_ns / made.frames.max(1) as f64)
    }

    fn nft(&self, rules: &str) -> anyhow::Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), rules)?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.tb.host, "nft", "-f"])
            .arg(file.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "loading nftables rules: {}\n{rules}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn nft_delete(&self, table: &str) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.tb.host, "nft", "delete", "table"])
            .args(table.split_whitespace())
            .output();
    }

    /// Netdev ingress on the NIC: the instance by a jhash of the 5-tuple
    /// (into the mark, so the MAC and the veth agree), its MAC written,
    /// forwarded out of its host-side veth.
    fn nft_fwd(&self) -> anyhow::Result<()> {
        let (mut macs, mut devs) = (String::new(), String::new());
        for (k, (i, mac)) in self.tb.instances.iter().zip(&self.macs).enumerate() {
            let sep = if k == 0 { "" } else { ", " };
            let _ = write!(macs, "{sep}{k} : {}", mac_text(*mac));
            let _ = write!(devs, "{sep}{k} : \"{}\"", i.veth);
        }
        self.nft(&format!(
            "table netdev sluicebench_fwd {{\n chain ingress {{\n  type filter hook ingress device \"{nic}\" priority 0; policy accept;\n  \
             ip daddr {vip} udp dport {PORT} meta mark set jhash ip saddr . ip daddr . ip protocol . udp sport . udp dport mod {INSTANCES} seed 0x5c \
             ether daddr set meta mark map {{ {macs} }} fwd to meta mark map {{ {devs} }}\n }}\n}}\n",
            nic = testbed::NIC,
            vip = testbed::VIP_V4,
        ))
    }

    /// DNAT in prerouting by a jhash of the 5-tuple; the kernel routes.
    fn nft_dnat(&self) -> anyhow::Result<()> {
        let mut map = String::new();
        for (k, (i, mac)) in self.tb.instances.iter().zip(&self.macs).enumerate() {
            let addr = i.addr_v4.to_string();
            // Static neighbours: no ARP in the measured path.
            let status = Command::new("ip")
                .args(["-n", &self.tb.host, "neigh", "replace", &addr, "lladdr"])
                .arg(mac_text(*mac))
                .args(["dev", &i.veth])
                .status()?;
            if !status.success() {
                bail!("static neighbour for {addr}");
            }
            let _ = write!(map, "{}{k} : {addr}", if k == 0 { "" } else { ", " });
        }
        self.nft(&format!(
            "table ip sluicebench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {} udp dport {PORT} dnat to jhash ip saddr . ip daddr . ip protocol . udp sport . udp dport mod {INSTANCES} seed 0x5c map {{ {map} }}\n }}\n}}\n",
            testbed::VIP_V4
        ))
    }

    /// IPVS direct routing: the VIP local on the host (IPVS takes packets
    /// at local delivery), source hashing over the 5-tuple's ports too,
    /// the instances as real servers reached by MAC rewrite (`-g`).
    fn ipvs(&self) -> anyhow::Result<()> {
        let vip = format!("{}:{PORT}", testbed::VIP_V4);
        let h = &self.tb.host;
        run(Command::new("ip").args([
            "-n",
            h,
            "addr",
            "add",
            &format!("{}/32", testbed::VIP_V4),
            "dev",
            "lo",
        ]))?;
        let ipvsadm = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", h, "ipvsadm"])
                .args(args))
        };
        ipvsadm(&["-A", "-u", &vip, "-s", "sh", "-b", "sh-port"])?;
        for i in &self.tb.instances {
            ipvsadm(&[
                "-a",
                "-u",
                &vip,
                "-r",
                &format!("{}:{PORT}", i.addr_v4),
                "-g",
            ])?;
        }
        Ok(())
    }

    fn ipvs_off(&self) {
        let h = &self.tb.host;
        let _ = Command::new("ip")
            .args(["netns", "exec", h, "ipvsadm", "-C"])
            .output();
        let _ = Command::new("ip")
            .args(["-n", h, "addr", "del"])
            .arg(format!("{}/32", testbed::VIP_V4))
            .args(["dev", "lo"])
            .output();
    }
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Why IPVS cannot be measured here, if it cannot.
fn ipvs_unavailable() -> Option<String> {
    let loaded = || Path::new("/proc/net/ip_vs").exists();
    if !loaded() {
        // A module kernel may have it unloaded.
        let _ = Command::new("modprobe").args(["-q", "ip_vs"]).status();
    }
    if !loaded() {
        return Some("not available: this kernel lacks IPVS (CONFIG_IP_VS)".into());
    }
    if Command::new("ipvsadm").arg("--version").output().is_err() {
        return Some(
            "not available: `ipvsadm` not installed (`cargo xtask bench` installs it where the kernel has IPVS)"
                .into(),
        );
    }
    None
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

fn summarise(path: PathKind, g: Generator, samples: &[Sample]) -> Row {
    let med = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    let delivered = samples.iter().map(|s| s.delivered_pps);
    Row {
        path: path.name().to_owned(),
        generator: g.name().to_owned(),
        unavailable: None,
        rounds: samples.len(),
        generated_pps: med(|s| s.generated_pps),
        delivered_pps: med(|s| s.delivered_pps),
        delivered_pps_min: delivered.clone().fold(f64::INFINITY, f64::min),
        delivered_pps_max: delivered.fold(0.0, f64::max),
        busy_ns: med(|s| s.busy_ns),
        busy_less_generator_ns: med(|s| s.busy_less_generator_ns),
        ours_less_generator_ns: med(|s| s.ours_less_generator_ns),
        readers_ns: med(|s| s.readers_ns),
        softirq_ns: med(|s| s.softirq_ns),
    }
}

/// Each generator's own CPU per frame, in ns.
pub(crate) type Calibration = Vec<(String, f64)>;

/// The testbed, the generator and Sluice loaded (detached).
fn setup(secs: f64) -> anyhow::Result<(Bed, sluice::agent::Agent)> {
    if Command::new("nft").arg("--version").output().is_err() {
        bail!("`nft` not found: the nftables baselines need it (`cargo xtask bench` installs it)");
    }
    let tb = Testbed::new("pps", INSTANCES)?;
    let mut bench = Ebpf::load(objects::BENCH_XDP).context("loading the bench programs")?;
    for name in ["generate", "sink"] {
        let p: &mut Xdp = bench.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    // GRO on gives the NIC veth NAPI when no XDP program is attached (the
    // kernel paths), as Sluice's program does; the same for every path.
    netns::run_in(&tb.host, || {
        netns::set_offload(testbed::NIC, netns::Offload::Gro, true)
    })?;
    let nic_mac = mac_of(&tb.host, testbed::NIC)?;
    let mut packet = Packet::udp(
        SocketAddr::new(testbed::CLIENT_V4.into(), 1024),
        SocketAddr::new(testbed::VIP_V4.into(), PORT),
    )
    .payload(vec![0u8; 18]);
    packet.dst_mac = nic_mac;
    packet.src_mac = mac_of(&tb.client, "eth0")?;
    let frame = packet.build();
    {
        let mut template: aya::maps::Array<&mut MapData, [u64; 6]> =
            aya::maps::Array::try_from(bench.map_mut("TEMPLATE").context("TEMPLATE")?)?;
        let mut words = [0u64; 6];
        for (w, c) in words.iter_mut().zip(frame.chunks_exact(8)) {
            *w = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        }
        template.set(0, words, 0)?;
    }
    let macs = tb
        .instances
        .iter()
        .map(|i| mac_of(&i.netns, "eth0"))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Sluice, loaded once and attached only for its turns.
    let toml = format!(
        "[[service]]\nname = \"kv\"\nvip = \"{}\"\nport = {PORT}\nprotocol = \"udp\"\n\n{}",
        testbed::VIP_V4,
        tb.instances_toml(0, INSTANCES)
    );
    let config = Config::parse(&toml, Path::new("bench.toml"))?;
    let mut agent = tb.start_agent(&config, Arc::new(EmbeddedStore::in_memory()))?;
    agent.datapath.detach()?;
    let bed = Bed {
        tb,
        bench,
        frame,
        ksoftirqd: ksoftirqd_pids(),
        macs,
        secs,
    };
    Ok((bed, agent))
}

pub(crate) fn run_all(secs: f64) -> anyhow::Result<(Vec<Row>, Calibration)> {
    let (mut bed, mut agent) = setup(secs)?;
    let ipvs_missing = ipvs_unavailable();
    let mut paths = vec![PathKind::Sluice];
    if ipvs_missing.is_none() {
        paths.push(PathKind::Ipvs);
    }
    paths.extend([PathKind::NftFwd, PathKind::NftDnat]);

    let mut rows = Vec::new();
    let mut calibration = Vec::new();
    for g in [Generator::LiveFrames, Generator::Sendmmsg] {
        let own = bed.calibrate(g)?;
        eprintln!(
            "[bench]   {}: the generator alone costs {own:.0} ns a frame",
            g.name()
        );
        calibration.push((g.name().to_owned(), own));
        let mut samples: Vec<Vec<Sample>> = paths.iter().map(|_| Vec::new()).collect();
        for round in 0..ROUNDS {
            for (k, &p) in paths.iter().enumerate() {
                let host = bed.tb.host.clone();
                match p {
                    PathKind::Sluice => {
                        netns::run_in(&host, || agent.datapath.attach(testbed::NIC, false))?;
                    }
                    PathKind::Ipvs => bed.ipvs()?,
                    PathKind::NftFwd => bed.nft_fwd()?,
                    PathKind::NftDnat => bed.nft_dnat()?,
                }
                let measured = bed.measure(g, own);
                match p {
                    PathKind::Sluice => agent.datapath.detach()?,
                    PathKind::Ipvs => bed.ipvs_off(),
                    PathKind::NftFwd => bed.nft_delete("netdev sluicebench_fwd"),
                    PathKind::NftDnat => bed.nft_delete("ip sluicebench"),
                }
                let (s, _) = measured?;
                eprintln!(
                    "[bench]   round {}: {} — {:.0} delivered pps",
                    round + 1,
                    p.name(),
                    s.delivered_pps
                );
                samples[k].push(s);
            }
        }
        for (k, &p) in paths.iter().enumerate() {
            if p == PathKind::NftFwd
                && let Some(why) = &ipvs_missing
            {
                rows.push(Row {
                    path: PathKind::Ipvs.name().to_owned(),
                    generator: g.name().to_owned(),
                    unavailable: Some(why.clone()),
                    rounds: 0,
                    generated_pps: 0.0,
                    delivered_pps: 0.0,
                    delivered_pps_min: 0.0,
                    delivered_pps_max: 0.0,
                    busy_ns: 0.0,
                    busy_less_generator_ns: 0.0,
                    ours_less_generator_ns: 0.0,
                    readers_ns: 0.0,
                    softirq_ns: 0.0,
                });
            }
            rows.push(summarise(p, g, &samples[k]));
        }
    }
    agent.stop()?;
    Ok((rows, calibration))
}

/// The e2e table, with a plain comparison of Sluice against each baseline.
pub(crate) fn table(s: &mut String, rows: &[Row], calibration: &Calibration, secs: f64) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### End to end (namespace testbed, 4 instances, UDP read by a socket in each instance; paths interleaved, {ROUNDS} rounds of {secs} s)\n"
    );
    let _ = writeln!(
        s,
        "| path | generator | delivered pps, median (min–max) | generated pps | system busy | busy − generator thread | ours − generator alone | socket readers | softirq (system) |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for e in rows {
        if let Some(why) = &e.unavailable {
            let _ = writeln!(s, "| {} | {} | {why} | | | | | | |", e.path, e.generator);
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            e.path,
            e.generator,
            e.delivered_pps,
            e.delivered_pps_min,
            e.delivered_pps_max,
            e.generated_pps,
            e.busy_ns,
            e.busy_less_generator_ns,
            e.ours_less_generator_ns,
            e.readers_ns,
            e.softirq_ns
        );
    }
    let _ = writeln!(
        s,
        "\nCPU columns: ns of CPU per delivered datagram, medians over the rounds. \
         *System busy*: user + nice + system + irq + softirq of all CPUs (/proc/stat; steal, idle and iowait not counted; \
         includes anything else the machine runs). *Busy − generator thread*: minus the generating threads' CPU clocks, \
         which on this kernel (tick accounting, no IRQ time accounting) include the softirq work run inline in them — \
         with live frames, most of the chain. *Ours − generator alone*: this process's CPU (generator, socket readers, \
         the idle agent, softirq run in their context) plus ksoftirqd's, minus the generator's own cost per frame \
         measured with its frames dropped by XDP on the NIC ({}). *Socket readers*: the four reading threads.",
        calibration
            .iter()
            .map(|(g, ns)| format!("{g}: {ns:.0} ns a frame"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(s);
    for g in [Generator::LiveFrames, Generator::Sendmmsg] {
        let of = |p: PathKind| {
            rows.iter()
                .find(|r| r.generator == g.name() && r.path == p.name() && r.unavailable.is_none())
        };
        let Some(sl) = of(PathKind::Sluice) else {
            continue;
        };
        for p in [PathKind::Ipvs, PathKind::NftFwd, PathKind::NftDnat] {
            let Some(b) = of(p) else { continue };
            let pps = sl.delivered_pps / b.delivered_pps.max(1.0);
            let cpu = b.ours_less_generator_ns / sl.ours_less_generator_ns.max(1.0);
            let rate = if pps >= 1.0 {
                format!("Sluice delivers {pps:.2}× its rate")
            } else {
                format!("**the baseline wins on rate**: {:.2}× Sluice's", 1.0 / pps)
            };
            let work = if cpu >= 1.0 {
                format!("it uses {cpu:.2}× Sluice's CPU a datagram")
            } else {
                format!(
                    "**the baseline wins on CPU**: {:.2}× less a datagram than Sluice",
                    1.0 / cpu
                )
            };
            // Rounds whose ranges overlap cannot tell the two apart.
            let noise = if sl.delivered_pps_min <= b.delivered_pps_max
                && b.delivered_pps_min <= sl.delivered_pps_max
            {
                " The rounds' delivered-rate ranges overlap: the rate difference is within this run's noise."
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "- {}, against {}: {rate}; {work} (ours − generator alone).{noise}",
                g.name(),
                p.name()
            );
        }
    }
}
