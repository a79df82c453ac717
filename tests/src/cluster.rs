//! A cluster in network namespaces: a client, a router in front of `H`
//! hosts with an ECMP route (L4 hash) to the VIPs, each host with its own
//! "NIC" veth (`nic0`, where its agent attaches) and `N` instance
//! namespaces, and a real etcd on the router. Every name is unique to the
//! test; dropping the bed (also on panic) stops the agents and etcd by
//! their pids and deletes every namespace.
//!
//! Addresses (no default route anywhere):
//! - client `eth0` `198.18.0.2/24`, `fd00:5100::2/64`; router `.1`/`::1`;
//! - host k: `nic0` `198.18.(2+k).1/24`, `fd00:5100:0:(2+k)::1/64` (its
//!   underlay), router side `.254`/`::fe`;
//! - etcd: `198.18.250.1` on the router's loopback;
//! - instance j of host k: `eth0` `198.19.(16k+j).2/24`,
//!   `fd00:5100:2:(16k+j)::2/64`, host side `.1`/`::1`; VIPs
//!   `198.18.1.0/24` and `fd00:5100:1::1` on `lo` (direct server return).
//!
//! Replies go from the instance through its host and the router back to
//! the client, never through the XDP programs (which see only the NICs'
//! receive side).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    etcd::Etcd,
    netns::{self, Offload},
    process::{self, Netns},
};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5100, 0, 0, 0, 0, 0, 2);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5100, 1, 0, 0, 0, 0, 1);
pub const ETCD: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    netns::run_in(ns, || std::fs::write(&path, value))
        .unwrap_or_else(|e| panic!("sysctl {key}={value} in {ns}: {e}"));
}

fn offload(ns: &str, dev: &str, o: Offload, on: bool) {
    netns::run_in(ns, || netns::set_offload(dev, o, on))
        .unwrap_or_else(|e| panic!("setting an offload on {dev} in {ns}: {e}"));
}

/// One host of the bed.
pub struct Host {
    pub name: String,
    pub ns: Netns,
    pub underlay: Ipv4Addr,
    /// Its instances' namespaces (deleted on drop).
    pub instances: Vec<Netns>,
    pub agent: Option<process::Agent>,
    pins: process::PinDir,
    state: tempfile::TempDir,
}

impl Host {
    /// The instance namespaces' names.
    #[must_use]
    pub fn instance_names(&self) -> Vec<String> {
        self.instances.iter().map(|n| n.0.clone()).collect()
    }
}

/// The cluster's namespaces, etcd and agents.
pub struct ClusterBed {
    pub prefix: String,
    pub client: Netns,
    pub router: Netns,
    pub hosts: Vec<Host>,
    pub etcd: Etcd,
    /// The hosts' `cluster.lease_ttl_secs` ([`Self::cluster_toml`]); 2
    /// unless a test sets it before starting the agents.
    pub lease_secs: u32,
    /// `XDP_PASS` programs on the router's host-facing veths (see
    /// [`pass_program`]); detached on drop.
    passes: Vec<aya::Ebpf>,
}

/// Attaches an XDP program that passes everything to `dev` in `ns`. A frame
/// a host's XDP program sends back out of its NIC (`XDP_TX`) lands in the
/// veth peer's ring, and the peer's NAPI is kicked for it only when the
/// peer has an XDP program of its own (GRO alone, enough for redirects,
/// leaves such frames waiting). Real NICs need nothing of the kind.
fn pass_program(ns: &str, dev: &str) -> aya::Ebpf {
    let object = sluice::datapath::xdp::objects::EMPTY_XDP;
    assert!(
        !object.is_empty(),
        "built without bpf-linker: run `cargo xtask test`"
    );
    netns::run_in(ns, || {
        let mut ebpf = aya::Ebpf::load(object).expect("load the pass program");
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("empty")
            .expect("program `empty`")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("load");
        prog.attach(dev, aya::programs::xdp::XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching XDP_PASS to {dev} in {ns}: {e}"));
        ebpf
    })
}

impl Drop for ClusterBed {
    fn drop(&mut self) {
        // Agents first (by pid, in `process::Agent`'s drop), while their
        // namespaces still exist; then etcd; then the namespaces.
        for h in &mut self.hosts {
            h.agent.take();
        }
        self.passes.clear();
    }
}

/// A veth pair `a` in `ns_a`, `b` in `ns_b`, both up.
fn pair(ns_a: &str, a: &str, ns_b: &str, b: &str) {
    ip(&[
        "link", "add", "name", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ]);
    ip(&["-n", ns_a, "link", "set", a, "up"]);
    ip(&["-n", ns_b, "link", "set", b, "up"]);
}

fn addr(ns: &str, dev: &str, a: &str) {
    if a.contains(':') {
        ip(&["-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
    } else {
        ip(&["-n", ns, "addr", "add", a, "dev", dev]);
    }
}

/// `ip route add args` in `ns`; `args` may start with `-6`.
fn route(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    let rest = match args.split_first() {
        Some((&"-6", rest)) => {
            all.push("-6");
            rest
        }
        _ => args,
    };
    all.extend(["route", "add"]);
    all.extend_from_slice(rest);
    ip(&all);
}

fn netns(name: String) -> Netns {
    ip(&["netns", "add", &name]);
    let ns = Netns(name);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ns
}

impl ClusterBed {
    /// `hosts` hosts of `per_host` instances each, etcd running, no agents
    /// yet. `tag` names the test in the namespace names.
    #[must_use]
    pub fn new(tag: &str, hosts: usize, per_host: usize) -> Self {
        assert!(crate::is_root(), "the cluster bed needs root");
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sl-{tag}-{}-{id}", std::process::id());
        let client = netns(format!("{prefix}-c"));
        let router = netns(format!("{prefix}-r"));
        pair(&client.0, "eth0", &router.0, "rc");
        addr(&client.0, "eth0", "198.18.0.2/24");
        addr(&client.0, "eth0", "fd00:5100::2/64");
        addr(&router.0, "rc", "198.18.0.1/24");
        addr(&router.0, "rc", "fd00:5100::1/64");
        route(&client.0, &["198.18.1.0/24", "via", "198.18.0.1"]);
        route(
            &client.0,
            &["-6", "fd00:5100:1::/64", "via", "fd00:5100::1"],
        );
        // Real NICs deliver full checksums; a veth leaves them partial.
        offload(&client.0, "eth0", Offload::TxChecksum, false);
        addr(&router.0, "lo", &format!("{ETCD}/32"));
        sysctl(&router.0, "net.ipv4.ip_forward", "1");
        sysctl(&router.0, "net.ipv6.conf.all.forwarding", "1");
        // ECMP by the 5-tuple, as a data-centre router spreads a VIP.
        sysctl(&router.0, "net.ipv4.fib_multipath_hash_policy", "1");
        sysctl(&router.0, "net.ipv6.fib_multipath_hash_policy", "1");
        let etcd = Etcd::start(&router.0, ETCD.into());
        let mut bed = Self {
            prefix,
            client,
            router,
            hosts: Vec::new(),
            etcd,
            lease_secs: 2,
            passes: Vec::new(),
        };
        for k in 0..hosts {
            bed.add_host(k, per_host);
        }
        bed.route_vips(hosts);
        bed
    }

    fn add_host(&mut self, k: usize, per_host: usize) {
        let net = 2 + u8::try_from(k).expect("few hosts");
        let name = format!("h{k}");
        let ns = netns(format!("{}-{name}", self.prefix));
        let r = &self.router.0;
        let rdev = format!("r{name}");
        pair(&ns.0, "nic0", r, &rdev);
        addr(&ns.0, "nic0", &format!("198.18.{net}.1/24"));
        addr(&ns.0, "nic0", &format!("fd00:5100:0:{net:x}::1/64"));
        addr(r, &rdev, &format!("198.18.{net}.254/24"));
        addr(r, &rdev, &format!("fd00:5100:0:{net:x}::fe/64"));
        self.passes.push(pass_program(r, &rdev));
        // The client, etcd and the other hosts' underlays, via the router.
        let via4 = format!("198.18.{net}.254");
        let via6 = format!("fd00:5100:0:{net:x}::fe");
        // (The host's own underlay net, inside these, stays on the link.)
        for dst in [
            "198.18.0.0/24",
            "198.18.250.0/24",
            "198.18.2.0/23",
            "198.18.4.0/22",
        ] {
            route(&ns.0, &[dst, "via", &via4]);
        }
        route(&ns.0, &["-6", "fd00:5100::/56", "via", &via6]);
        sysctl(&ns.0, "net.ipv4.ip_forward", "1");
        sysctl(&ns.0, "net.ipv6.conf.all.forwarding", "1");
        let mut instances = Vec::new();
        for j in 0..per_host {
            instances.push(Self::add_instance(&ns.0, k, j));
        }
        self.hosts.push(Host {
            name,
            underlay: Ipv4Addr::new(198, 18, net, 1),
            ns,
            instances,
            agent: None,
            pins: process::PinDir::new(&format!("{}-h{k}", self.prefix)),
            state: tempfile::tempdir().expect("tempdir"),
        });
    }

    fn add_instance(host_ns: &str, k: usize, j: usize) -> Netns {
        let ns = netns(format!("{host_ns}i{j}"));
        let net = u8::try_from(16 * k + j).expect("few instances");
        let veth = format!("i{j}");
        pair(host_ns, &veth, &ns.0, "eth0");
        addr(host_ns, &veth, &format!("198.19.{net}.1/24"));
        addr(host_ns, &veth, &format!("fd00:5100:2:{net:x}::1/64"));
        addr(&ns.0, "eth0", &format!("198.19.{net}.2/24"));
        addr(&ns.0, "eth0", &format!("fd00:5100:2:{net:x}::2/64"));
        addr(&ns.0, "lo", "198.18.1.0/24");
        addr(&ns.0, "lo", &format!("{VIP_V6}/128"));
        route(&ns.0, &["-6", "local", "fd00:5100:1::/64", "dev", "lo"]);
        route(&ns.0, &["198.18.0.0/24", "via", &format!("198.19.{net}.1")]);
        route(
            &ns.0,
            &[
                "-6",
                "fd00:5100::/64",
                "via",
                &format!("fd00:5100:2:{net:x}::1"),
            ],
        );
        // A frame redirected into a veth needs NAPI on the receiving side.
        offload(&ns.0, "eth0", Offload::Gro, true);
        ns
    }

    /// The router's multipath routes to the VIPs, one next hop a host.
    fn route_vips(&self, hosts: usize) {
        let r = &self.router.0;
        let mut v4 = vec!["-n", r, "route", "replace", "198.18.1.0/24"];
        let mut v6 = vec!["-n", r, "-6", "route", "replace", "fd00:5100:1::/64"];
        let hops: Vec<(String, String, String)> = (0..hosts)
            .map(|k| {
                let net = 2 + k;
                (
                    format!("198.18.{net}.1"),
                    format!("fd00:5100:0:{net:x}::1"),
                    format!("rh{k}"),
                )
            })
            .collect();
        for (a4, a6, dev) in &hops {
            v4.extend(["nexthop", "via", a4, "dev", dev]);
            v6.extend(["nexthop", "via", a6, "dev", dev]);
        }
        ip(&v4);
        ip(&v6);
    }

    /// Sends the VIPs over the first `hosts` hosts only (a host added to,
    /// or taken out of, the router's multipath route).
    pub fn set_ecmp_hosts(&self, hosts: usize) {
        self.route_vips(hosts);
    }

    /// Runs `f` with an etcd client of the cluster's keys, on a thread of
    /// its own inside the router's namespace (where etcd listens).
    pub fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(std::sync::Arc<sluice::coord::EtcdStore>) -> crate::etcd::ClientFuture<T>
        + Send
        + 'static,
    ) -> T {
        let opts = sluice::coord::EtcdOptions {
            endpoints: vec![self.etcd_endpoint()],
            cluster: self.prefix.clone(),
            // Generous: a loaded CI machine's etcd can be slow to answer.
            timeout: std::time::Duration::from_secs(5),
        };
        crate::etcd::with_client(&self.router.0, opts, f)
    }

    /// `http://198.18.250.1:2379`.
    #[must_use]
    pub fn etcd_endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// The config of host `k`: the cluster table, then `services` (TOML,
    /// the same on every host) with `instances(service, k)` appended to
    /// each `[[service]]` by the caller.
    #[must_use]
    pub fn cluster_toml(&self, k: usize, agent: &str) -> String {
        let h = &self.hosts[k];
        format!(
            "[agent]\n{agent}\n\n[cluster]\nstore = \"etcd\"\nhost = \"{}\"\nunderlay = \"{}\"\n\
             etcd_endpoints = [\"{}\"]\nname = \"{}\"\nlease_ttl_secs = {}\n\n",
            h.name,
            h.underlay,
            self.etcd_endpoint(),
            self.prefix,
            self.lease_secs
        )
    }

    /// `[[service.instance]]` tables for host `k`'s instances, named
    /// `<service>-h<k>-<j>`.
    #[must_use]
    pub fn instances_toml(&self, service: &str, k: usize) -> String {
        let h = &self.hosts[k];
        let mut out = String::new();
        for (j, ns) in h.instances.iter().enumerate() {
            let _ = write!(
                out,
                "[[service.instance]]\nname = \"{service}-h{k}-{j}\"\nveth = \"i{j}\"\nnetns = \"{}\"\n",
                ns.0
            );
        }
        out
    }

    /// Starts host `k`'s agent with `config`.
    pub fn start_agent(&mut self, k: usize, config: &str) {
        let h = &mut self.hosts[k];
        let agent = process::start(
            &h.ns,
            &process::Start {
                config,
                pin_dir: &h.pins.0,
                state: &h.state.path().join("state.json"),
                // Stopped agents leave their data path running (a restart
                // adopts it); the pin directory is removed on drop.
                cleanup: false,
                metrics_port: 9600 + u16::try_from(k).expect("few hosts"),
            },
        );
        h.agent = Some(agent);
    }

    /// Stops host `k`'s agent (SIGTERM) and returns its exit status.
    pub fn stop_agent(&mut self, k: usize) -> Option<std::process::ExitStatus> {
        self.hosts[k].agent.take().map(process::Agent::stop)
    }

    /// Kills host `k`'s agent (SIGKILL: no cleanup, its lease runs out).
    pub fn kill_agent(&mut self, k: usize) {
        if let Some(a) = self.hosts[k].agent.take() {
            a.kill();
        }
    }

    /// Host `k`'s pin directory (its data path's maps).
    #[must_use]
    pub fn pin_dir(&self, k: usize) -> &std::path::Path {
        &self.hosts[k].pins.0
    }

    /// Takes host `k` off the network, as when the machine dies: its NIC
    /// goes down.
    pub fn host_down(&self, k: usize) {
        ip(&["-n", &self.hosts[k].ns.0, "link", "set", "nic0", "down"]);
    }

    /// Host `k`'s control socket.
    #[must_use]
    pub fn socket(&self, k: usize) -> PathBuf {
        self.hosts[k]
            .agent
            .as_ref()
            .expect("the agent runs")
            .socket
            .clone()
    }

    /// Every running agent's log, host by host (for a failing test's
    /// message).
    #[must_use]
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                let _ = write!(out, "--- {} ---\n{}", h.name, a.log());
            }
        }
        out
    }

    /// Every instance namespace, host by host.
    #[must_use]
    pub fn all_instances(&self) -> Vec<String> {
        self.hosts.iter().flat_map(Host::instance_names).collect()
    }

    /// The client's address of `vip`'s family.
    #[must_use]
    pub const fn client_addr(vip: IpAddr) -> IpAddr {
        match vip {
            IpAddr::V4(_) => IpAddr::V4(CLIENT_V4),
            IpAddr::V6(_) => IpAddr::V6(CLIENT_V6),
        }
    }
}
