//! Test hosts in network namespaces: a client, the host whose "NIC" veth the
//! XDP program attaches to, and N instance namespaces joined to the host by
//! veth pairs, with the service VIPs on each instance's loopback (direct
//! server return). Every name is unique to the testbed, so tests run in
//! parallel; dropping the testbed (also on panic) deletes every namespace,
//! and with them every link.
//!
//! Addresses (no default route anywhere):
//! - client `eth0` `198.18.0.2/24`, `fd00:5100::2/64`; host `nic` `.1`/`::1`;
//! - instance k: `eth0` `198.18.(16+k).2/24`, `fd00:5100:0:(16+k)::2/64`,
//!   host side `i<k>` `.1`/`::1`; VIPs `198.18.1.0/24` and `fd00:5100:1::1`
//!   on `lo`.
//!
//! Replies from instances go back through the host (forwarding on), not
//! through the XDP program, which only sees the NIC's receive side.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netns::{self, Offload};

/// Where the client reaches the host.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5100, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5100, 0, 0, 0, 0, 0, 2);
/// Default VIPs (every instance carries the whole VIP ranges on `lo`).
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5100, 1, 0, 0, 0, 0, 1);
/// Name of the host's "NIC" veth, inside the host namespace.
pub const NIC: &str = "nic";

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, veths, XDP); run the tests as root")]
    NotRoot,
    #[error("`ip` (iproute2) not found: the testbed needs it to create namespaces")]
    NoIproute,
    #[error(
        "cannot create network namespaces (are you root, with CAP_NET_ADMIN and CAP_SYS_ADMIN?): `{command}` said: {stderr}"
    )]
    NoNamespaces { command: String, stderr: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One instance of the testbed.
#[derive(Clone, Debug)]
pub struct TestInstance {
    /// Namespace name.
    pub netns: String,
    /// Host-side veth (in the host namespace).
    pub veth: String,
    pub addr_v4: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
}

/// The namespaces and links of one test; deleted on drop.
pub struct Testbed {
    pub prefix: String,
    pub client: String,
    pub host: String,
    pub instances: Vec<TestInstance>,
    created: Vec<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), TestbedError> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            TestbedError::NoIproute
        } else {
            TestbedError::Io {
                what: "running ip".into(),
                source: e,
            }
        }
    })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

impl Testbed {
    /// Builds a testbed with `n` instances. `tag` names the test in the
    /// namespace names (`sl-<tag>-<pid>-<n>-...`).
    pub fn new(tag: &str, n: usize) -> Result<Self, TestbedError> {
        if !crate::is_root() {
            return Err(TestbedError::NotRoot);
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sl-{tag}-{}-{id}", std::process::id());
        let mut tb = Self {
            client: format!("{prefix}-c"),
            host: format!("{prefix}-h"),
            prefix,
            instances: Vec::new(),
            created: Vec::new(),
        };
        tb.add_netns(&tb.host.clone()).map_err(|e| match e {
            TestbedError::Command { command, stderr } => {
                TestbedError::NoNamespaces { command, stderr }
            }
            e => e,
        })?;
        tb.add_netns(&tb.client.clone())?;
        tb.build_client()?;
        for k in 0..n {
            tb.add_instance(k)?;
        }
        Ok(tb)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), TestbedError> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), TestbedError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        netns::run_in(ns, || std::fs::write(&path, value)).map_err(|source| TestbedError::Io {
            what: format!("sysctl {key}={value} in {ns}"),
            source,
        })
    }

    /// A veth pair: `host_dev` in the host namespace, `eth0` in `peer_ns`,
    /// both up, with `<v4>.1/24`, `<v6>::1/64` on the host side and `.2`,
    /// `::2` on the peer side.
    fn pair(&self, host_dev: &str, peer_ns: &str, v4: &str, v6: &str) -> Result<(), TestbedError> {
        let h = &self.host;
        ip(&[
            "link", "add", "name", host_dev, "netns", h, "type", "veth", "peer", "name", "eth0",
            "netns", peer_ns,
        ])?;
        for (ns, dev, end) in [(h.as_str(), host_dev, "1"), (peer_ns, "eth0", "2")] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}.{end}/24"),
                "dev",
                dev,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}::{end}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    fn build_client(&mut self) -> Result<(), TestbedError> {
        let (h, c) = (self.host.clone(), self.client.clone());
        self.pair(NIC, &c, "198.18.0", "fd00:5100:0:0")?;
        ip(&[
            "-n",
            &c,
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            "198.18.0.1",
        ])?;
        ip(&[
            "-n",
            &c,
            "-6",
            "route",
            "add",
            "fd00:5100:1::/64",
            "via",
            "fd00:5100::1",
        ])?;
        // A veth leaves checksums partial (offload); after an XDP redirect
        // the instance would drop them as checksum errors. Real NICs deliver
        // full checksums: make the client's veth do the same.
        netns::run_in(&c, || {
            netns::set_offload("eth0", Offload::TxChecksum, false)
        })
        .map_err(|source| TestbedError::Io {
            what: "turning tx checksum offload off on the client veth".into(),
            source,
        })?;
        Self::sysctl(&h, "net.ipv4.ip_forward", "1")?;
        Self::sysctl(&h, "net.ipv6.conf.all.forwarding", "1")
    }

    fn add_instance(&mut self, k: usize) -> Result<(), TestbedError> {
        let ns = format!("{}-i{k}", self.prefix);
        self.add_netns(&ns)?;
        let veth = format!("i{k}");
        let net = 16 + u8::try_from(k).expect("at most 200 instances");
        // VIPs on loopback (direct server return). IPv4 loopback answers for
        // a whole prefix; IPv6 needs the address itself (to bind) and a
        // local route (to receive the rest).
        ip(&["-n", &ns, "addr", "add", "198.18.1.0/24", "dev", "lo"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{VIP_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        ip(&[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "local",
            "fd00:5100:1::/64",
            "dev",
            "lo",
        ])?;
        self.wire(&ns, &veth, net)?;
        self.instances.push(TestInstance {
            netns: ns,
            veth,
            addr_v4: Ipv4Addr::new(198, 18, net, 2),
            addr_v6: Ipv6Addr::new(0xfd00, 0x5100, 0, u16::from(net), 0, 0, 0, 2),
        });
        Ok(())
    }

    /// Plugs instance `k` in again: a new veth pair under the old name (so a
    /// new ifindex, and a new MAC on the instance side), addressed and
    /// routed as before. Its namespace, VIPs and sockets stay.
    pub fn replug(&self, k: usize) -> Result<(), TestbedError> {
        let i = &self.instances[k];
        let net = 16 + u8::try_from(k).expect("at most 200 instances");
        // Gone already if the test deleted it; that is the point.
        let _ = ip(&["-n", &self.host, "link", "del", &i.veth]);
        self.wire(&i.netns, &i.veth, net)
    }

    /// The veth pair of an instance, its addresses, routes back to the
    /// client, and GRO.
    fn wire(&self, ns: &str, veth: &str, net: u8) -> Result<(), TestbedError> {
        self.pair(
            veth,
            ns,
            &format!("198.18.{net}"),
            &format!("fd00:5100:0:{net:x}"),
        )?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            &format!("198.18.{net}.1"),
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "fd00:5100::/64",
            "via",
            &format!("fd00:5100:0:{net:x}::1"),
        ])?;
        // A frame redirected into a veth is dropped unless the receiving
        // side runs NAPI: GRO on gives it one.
        netns::run_in(ns, || netns::set_offload("eth0", Offload::Gro, true)).map_err(|source| {
            TestbedError::Io {
                what: format!("turning GRO on in {ns}"),
                source,
            }
        })
    }

    /// A client behind a router: a namespace `far` (`198.18.3.2/24`) whose
    /// way to the host goes through the client namespace, which forwards;
    /// the router's link towards `far` has MTU `mtu` (`far`'s own side
    /// 1500), so what an instance sends `far` in full-size segments does not
    /// fit there and the router answers the VIP with ICMP "fragmentation
    /// needed", as a router on the Internet would. The host and every
    /// instance route `198.18.3.0/24` back through the router. Returns the
    /// namespace's name (deleted with the testbed).
    pub fn far_client(&mut self, mtu: u32) -> Result<String, TestbedError> {
        let (c, far) = (self.client.clone(), format!("{}-f", self.prefix));
        self.add_netns(&far)?;
        ip(&[
            "link",
            "add",
            "name",
            "far0",
            "netns",
            &c,
            "mtu",
            &mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &far,
        ])?;
        for (ns, dev, addr) in [
            (&c, "far0", "198.18.3.1/24"),
            (&far, "eth0", "198.18.3.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &far, "link", "set", "eth0", "mtu", "1500"])?;
        ip(&[
            "-n",
            &far,
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            "198.18.3.1",
        ])?;
        Self::sysctl(&c, "net.ipv4.ip_forward", "1")?;
        // Forwarded through the router to the NIC: full checksums, as the
        // client's own (see `build_client`).
        netns::run_in(&far, || {
            netns::set_offload("eth0", Offload::TxChecksum, false)
        })
        .map_err(|source| TestbedError::Io {
            what: "turning tx checksum offload off on the far client's veth".into(),
            source,
        })?;
        ip(&[
            "-n",
            &self.host,
            "route",
            "add",
            "198.18.3.0/24",
            "via",
            "198.18.0.2",
        ])?;
        for (k, i) in self.instances.iter().enumerate() {
            let net = 16 + u8::try_from(k).expect("at most 200 instances");
            ip(&[
                "-n",
                &i.netns,
                "route",
                "add",
                "198.18.3.0/24",
                "via",
                &format!("198.18.{net}.1"),
            ])?;
        }
        Ok(far)
    }

    /// Adds `n` veth pairs with both ends in the host namespace (`lv<i>`,
    /// peer `lp<i>`): stand-in instances for tests and benchmarks that need
    /// many interfaces but no traffic. Returns (veth, peer MAC) pairs.
    pub fn local_veths(&self, n: usize) -> Result<Vec<(String, [u8; 6])>, TestbedError> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (a, b) = (format!("lv{i}"), format!("lp{i}"));
            let b2 = u8::try_from(i >> 8).expect("fewer than 65536");
            let b3 = u8::try_from(i & 0xff).expect("masked");
            let mac = [0x02, 0x5c, 0x00, 0x00, b2, b3];
            let mac_text = mac
                .iter()
                .map(|m| format!("{m:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ip(&[
                "-n", &self.host, "link", "add", &a, "type", "veth", "peer", "name", &b, "address",
                &mac_text,
            ])?;
            ip(&["-n", &self.host, "link", "set", &a, "up"])?;
            ip(&["-n", &self.host, "link", "set", &b, "up"])?;
            out.push((a, mac));
        }
        Ok(out)
    }

    /// Starts the agent in the host namespace on the NIC veth, as `sluice
    /// run` would (unpinned: it detaches when stopped).
    pub fn start_agent(
        &self,
        config: &sluice::config::Config,
        store: std::sync::Arc<dyn sluice::coord::CoordStore>,
    ) -> Result<sluice::agent::Agent, sluice::agent::StartError> {
        netns::run_in(&self.host, || {
            crate::block_on(sluice::agent::Agent::start(config, NIC, false, store))
        })
    }

    /// Starts the agent as [`Self::start_agent`], its data path pinned in
    /// `pin_dir` (adopted if one is pinned there): it stays attached when
    /// the agent stops.
    pub fn start_pinned_agent(
        &self,
        config: &sluice::config::Config,
        store: std::sync::Arc<dyn sluice::coord::CoordStore>,
        pin_dir: &std::path::Path,
    ) -> Result<sluice::agent::Agent, sluice::agent::StartError> {
        netns::run_in(&self.host, || {
            crate::block_on(sluice::agent::Agent::start_pinned(
                config,
                NIC,
                false,
                store,
                Some(pin_dir),
                None,
            ))
        })
    }

    /// One control interval of `agent`, run in the host namespace as the
    /// agent's own loop is: a map write naming an interface (a recovered
    /// instance's new veth) resolves it there.
    pub fn tick(
        &self,
        agent: &mut sluice::agent::Agent,
    ) -> Result<Vec<sluice::control::MoveEvent>, sluice::control::ControlError> {
        netns::run_in(&self.host, || crate::block_on(agent.tick()))
    }

    /// Reloads a pinned agent with `config`, as SIGHUP does.
    pub fn reload_agent(
        &self,
        agent: &mut sluice::agent::Agent,
        config: &sluice::config::Config,
        store: std::sync::Arc<dyn sluice::coord::CoordStore>,
        pin_dir: &std::path::Path,
    ) -> Result<(), sluice::agent::StartError> {
        netns::run_in(&self.host, || {
            crate::block_on(agent.reload(config, store, pin_dir, false, None, None))
        })
    }

    /// Gives the client's `eth0` one more address, `addr` (in the client
    /// subnet, `198.18.0.0/24` or `fd00:5100::/64`, so the instances' routes
    /// back reach it): a second client, for tests that tell clients apart
    /// by source address. It goes with the namespace.
    pub fn add_client_addr(&self, addr: IpAddr) -> Result<(), TestbedError> {
        // IPv6: no duplicate address detection, so it is usable at once.
        let (with_len, flag) = match addr {
            IpAddr::V4(a) => (format!("{a}/24"), None),
            IpAddr::V6(a) => (format!("{a}/64"), Some("nodad")),
        };
        let mut args = vec!["-n", &self.client, "addr", "add", &with_len, "dev", "eth0"];
        args.extend(flag);
        ip(&args)
    }

    /// Source address of the client for `vip`'s family.
    #[must_use]
    pub fn client_addr(vip: IpAddr) -> IpAddr {
        if vip.is_ipv4() {
            CLIENT_V4.into()
        } else {
            CLIENT_V6.into()
        }
    }

    /// A config TOML block with one `[[service.instance]]` per instance,
    /// `first..first+count`, each naming its netns so discovery is direct.
    #[must_use]
    pub fn instances_toml(&self, first: usize, count: usize) -> String {
        let mut out = String::new();
        for (j, i) in self.instances[first..first + count].iter().enumerate() {
            let _ = write!(
                out,
                "[[service.instance]]\nname = \"inst-{}\"\nveth = \"{}\"\nnetns = \"{}\"\n\n",
                first + j,
                i.veth,
                i.netns
            );
        }
        out
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links, and their veth peers.
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
