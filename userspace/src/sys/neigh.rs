//! The next hop towards an address and its MAC, from the kernel's routing
//! and neighbour tables (through iproute2's JSON output: the agent asks
//! every few seconds, never per packet).

use std::{
    io,
    net::{IpAddr, UdpSocket},
    process::Command,
};

use serde::Deserialize;

#[derive(Deserialize)]
struct Route {
    dev: Option<String>,
    gateway: Option<IpAddr>,
}

#[derive(Deserialize)]
struct Neighbour {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> io::Result<T> {
    let out = Command::new("ip").arg("-j").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip -j {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(io::Error::other)
}

/// Where packets to `dst` go: the interface and the next hop (the gateway,
/// or `dst` itself when it is on the link).
pub fn route(dst: IpAddr) -> io::Result<(String, IpAddr)> {
    let routes: Vec<Route> = ip_json(&["route", "get", &dst.to_string()])?;
    let r = routes
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::other(format!("no route to {dst}")))?;
    let dev = r
        .dev
        .ok_or_else(|| io::Error::other(format!("the route to {dst} names no interface")))?;
    Ok((dev, r.gateway.unwrap_or(dst)))
}

/// The MAC of the next hop towards `dst`, if the neighbour table has a
/// usable entry; if not, one datagram to `dst`'s discard port makes the
/// kernel resolve it (the caller asks again later).
pub fn next_hop_mac(dst: IpAddr) -> io::Result<Option<[u8; 6]>> {
    let (dev, hop) = route(dst)?;
    let entries: Vec<Neighbour> = ip_json(&["neigh", "show", "to", &hop.to_string(), "dev", &dev])?;
    let usable = entries.iter().find_map(|n| {
        let bad = n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE");
        if bad {
            return None;
        }
        n.lladdr.as_deref().and_then(parse_mac)
    });
    if usable.is_none() {
        let bind: IpAddr = if dst.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            [0u16; 8].into()
        };
        let s = UdpSocket::bind((bind, 0))?;
        // The discard port: nothing answers, but the neighbour is resolved.
        let _ = s.send_to(&[], (dst, 9));
    }
    Ok(usable)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_do_not() {
        assert_eq!(parse_mac("02:fc:00:00:00:05"), Some([2, 0xfc, 0, 0, 0, 5]));
        assert_eq!(parse_mac("02:fc:00:00:00"), None);
        assert_eq!(parse_mac("02:fc:00:00:00:05:06"), None);
        assert_eq!(parse_mac("zz:fc:00:00:00:05"), None);
    }

    #[test]
    fn the_loopback_route_is_found() {
        let (dev, hop) = route("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(dev, "lo");
        assert_eq!(hop, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(crate::sys::ethtool::mtu("lo").unwrap() > 0);
    }
}
