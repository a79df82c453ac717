//! Local routes for addresses the host answers on without having them on
//! an interface (the L7 distributor's VIPs): `ip route add local VIP dev
//! lo` makes the kernel accept their packets, as any local address.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
};

/// A local route this process added; deleted on drop.
#[derive(Debug)]
pub struct LocalRoute {
    vip: IpAddr,
}

fn ip_route(verb: &str, vip: IpAddr) -> io::Result<()> {
    let prefix = if vip.is_ipv4() {
        format!("{vip}/32")
    } else {
        format!("{vip}/128")
    };
    let out = Command::new("ip")
        .args([
            "route", verb, "local", &prefix, "dev", "lo", "table", "local",
        ])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip route {verb} local {prefix} dev lo table local`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl LocalRoute {
    /// Makes `vip` local if it is not: `Some` if this added a route (it is
    /// removed when the value drops), `None` if the host had it already.
    pub fn ensure(vip: IpAddr) -> io::Result<Option<Self>> {
        // Binding succeeds only for an address the host already has.
        if UdpSocket::bind(SocketAddr::new(vip, 0)).is_ok() {
            return Ok(None);
        }
        ip_route("add", vip)?;
        Ok(Some(Self { vip }))
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        if let Err(e) = ip_route("del", self.vip) {
            tracing::warn!(vip = %self.vip, error = %e, "removing the VIP's local route");
        }
    }
}
