//! Interface facts over rtnetlink: a host-side veth's ifindex, the MAC of
//! its peer inside the instance's network namespace, and whether an
//! interface still exists.

use std::{
    collections::HashSet,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("interface `{name}` does not exist in the agent's network namespace")]
    NoSuchInterface { name: String },
    #[error("interface `{name}` is not a veth (it has no peer)")]
    NotVeth { name: String },
    #[error("cannot enter network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "peer of veth `{veth}` (ifindex {peer}) not found in {searched}; set `mac` (or `netns`) for this instance in the config"
    )]
    PeerNotFound {
        veth: String,
        peer: u32,
        searched: String,
    },
    #[error(
        "peer of veth `{veth}` (ifindex {peer}) is ambiguous: it matches interfaces in {candidates}; set `netns` or `mac` for this instance in the config"
    )]
    PeerAmbiguous {
        veth: String,
        peer: u32,
        candidates: String,
    },
}

/// Ifindex of `name` in the agent's namespace.
pub fn ifindex(name: &str) -> Result<u32, LinkError> {
    let missing = || LinkError::NoSuchInterface {
        name: name.to_owned(),
    };
    let c = CString::new(name).map_err(|_| missing())?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(missing()) } else { Ok(idx) }
}

/// What rtnetlink says of interface `name` in the calling thread's
/// namespace, with its ifindex.
fn link_info(name: &str) -> Result<(u32, LinkInfo), LinkError> {
    let own = ifindex(name)?;
    let info = query_link(own).ok_or_else(|| LinkError::NoSuchInterface {
        name: name.to_owned(),
    })?;
    Ok((own, info))
}

/// For veth `name`: the id, relative to the calling thread's namespace, of
/// the namespace its peer is in; `None` when the peer is in this one.
pub fn peer_netns_id(name: &str) -> Result<Option<u32>, LinkError> {
    Ok(link_info(name)?
        .1
        .link_netnsid
        .and_then(|id| u32::try_from(id).ok()))
}

/// MAC of interface `name` in the calling thread's namespace (asked over
/// rtnetlink); `None` for an interface without one (loopback, tun).
pub fn mac(name: &str) -> Result<Option<[u8; 6]>, LinkError> {
    Ok(link_info(name)?.1.mac.filter(|m| *m != [0; 6]))
}

/// Id of the XDP program attached to interface `name`, if any.
pub fn xdp_program(name: &str) -> Result<Option<u32>, LinkError> {
    Ok(link_info(name)?.1.xdp_prog.filter(|id| *id != 0))
}

/// Ifindex of the peer of veth `name` (its `iflink`), in the calling
/// thread's namespace (asked over rtnetlink: /sys shows the namespace it was
/// mounted in, not the thread's).
pub fn veth_peer_ifindex(name: &str) -> Result<u32, LinkError> {
    let (own, info) = link_info(name)?;
    match info.link {
        Some(peer) if peer != own && peer != 0 => Ok(peer),
        _ => Err(LinkError::NotVeth {
            name: name.to_owned(),
        }),
    }
}

/// MAC of the peer of host-side veth `veth`: looked up in the named netns
/// when given, else in every namespace under /run/netns and of every
/// process. The peer is the interface there whose ifindex is our veth's
/// `iflink` and whose own link is our veth; it must be unique.
pub fn discover_peer_mac(veth: &str, netns: Option<&str>) -> Result<([u8; 6], PathBuf), LinkError> {
    if let Some(name) = netns {
        let path = super::netns::named(name);
        if !path.exists() {
            return Err(LinkError::Netns {
                path,
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no network namespace `{name}` (see `ip netns list`)"),
                ),
            });
        }
    }
    let own = ifindex(veth)?;
    let peer = veth_peer_ifindex(veth)?;
    let candidates: Vec<PathBuf> = match netns {
        Some(name) => vec![super::netns::named(name)],
        None => namespace_files(),
    };
    let mut found = Vec::new();
    for path in &candidates {
        match veth_mac_in(path, peer, own) {
            Ok(Some(mac)) => found.push((path.clone(), mac)),
            Err(e) if netns.is_some() => return Err(e),
            // Not there, or a process exited while we scanned: the other
            // namespaces still count.
            Ok(None) | Err(_) => {}
        }
    }
    match found.as_slice() {
        [(path, mac)] => Ok((*mac, path.clone())),
        [] => Err(LinkError::PeerNotFound {
            veth: veth.to_owned(),
            peer,
            searched: netns.map_or_else(
                || format!("{} network namespaces", candidates.len()),
                |n| format!("netns `{n}`"),
            ),
        }),
        many => Err(LinkError::PeerAmbiguous {
            veth: veth.to_owned(),
            peer,
            candidates: many
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Network namespace files other than our own, one per namespace.
fn namespace_files() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    if let Ok(m) = fs::metadata("/proc/self/ns/net") {
        seen.insert(m.ino());
    }
    let named = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let procs = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("ns/net"));
    named
        .chain(procs)
        .filter(|p| fs::metadata(p).is_ok_and(|m| seen.insert(m.ino())))
        .collect()
}

/// In the namespace at `path`: the MAC of interface `ifindex` if it is the
/// peer of our interface `link`.
fn veth_mac_in(path: &Path, ifindex: u32, link: u32) -> Result<Option<[u8; 6]>, LinkError> {
    super::netns::run_in(path, || {
        query_link(ifindex)
            .filter(|l| l.link == Some(link))
            .and_then(|l| l.mac)
    })
    .map_err(|source| LinkError::Netns {
        path: path.to_owned(),
        source,
    })
}

/// What rtnetlink says of an interface.
struct LinkInfo {
    mac: Option<[u8; 6]>,
    /// Id of the XDP program attached, if any (`IFLA_XDP_PROG_ID`).
    xdp_prog: Option<u32>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex.
    link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: for a veth whose peer is in another network
    /// namespace, that namespace's id relative to this one.
    link_netnsid: Option<i32>,
}

/// Asks rtnetlink, in the current thread's namespace, about `ifindex`.
fn query_link(ifindex: u32) -> Option<LinkInfo> {
    query_link_on(&netlink_socket()?, ifindex)
}

/// An rtnetlink socket in the calling thread's namespace.
fn netlink_socket() -> Option<OwnedFd> {
    super::netlink_socket(libc::SOCK_RAW, libc::NETLINK_ROUTE).ok()
}

/// Answers whether an interface still exists, in the namespace the probe
/// was made in, from any thread.
pub struct LinkProbe(OwnedFd);

impl LinkProbe {
    /// A probe of the calling thread's namespace.
    pub fn new() -> io::Result<Self> {
        netlink_socket()
            .map(Self)
            .ok_or_else(io::Error::last_os_error)
    }

    /// Whether interface `ifindex` exists.
    #[must_use]
    pub fn exists(&self, ifindex: u32) -> bool {
        query_link_on(&self.0, ifindex).is_some()
    }
}

/// The `u32` attribute `want` among the nested attributes in `body`.
fn nested_u32(body: &[u8], want: u16) -> Option<u32> {
    let mut at = 0;
    while at + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[at], body[at + 1]]));
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]) & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == want && len == 8 {
            return Some(u32::from_ne_bytes(body[at + 4..at + 8].try_into().ok()?));
        }
        at += (len + 3) & !3;
    }
    None
}

fn query_link_on(sock: &OwnedFd, ifindex: u32) -> Option<LinkInfo> {
    const IFLA_ADDRESS: u16 = 1;
    const IFLA_LINK: u16 = 5;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_PROG_ID: u16 = 4;
    const IFLA_LINK_NETNSID: u16 = 37;
    const NLMSG_HDR: usize = 16;
    const IFINFO: usize = 16;
    // nlmsghdr + ifinfomsg, RTM_GETLINK for one ifindex.
    let mut req = [0u8; NLMSG_HDR + IFINFO];
    let len = u32::try_from(req.len()).expect("small");
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(
        &u16::try_from(libc::NLM_F_REQUEST)
            .expect("flag fits")
            .to_ne_bytes(),
    );
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = u8::try_from(libc::AF_UNSPEC).expect("fits");
    req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&i32::try_from(ifindex).ok()?.to_ne_bytes());
    // SAFETY: `req` is a valid buffer of `req.len()` bytes.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return None;
    }
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).ok()?;
    let msg = buf.get(..n)?;
    let msg_type = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    if msg_type != libc::RTM_NEWLINK {
        return None; // NLMSG_ERROR: no such interface here
    }
    let mut mac = None;
    let mut peer_link = None;
    let mut xdp_prog = None;
    let mut link_netnsid = None;
    let mut at = NLMSG_HDR + IFINFO;
    while at + 4 <= msg.len() {
        let alen = usize::from(u16::from_ne_bytes([msg[at], msg[at + 1]]));
        let atype = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if alen < 4 || at + alen > msg.len() {
            break;
        }
        let body = &msg[at + 4..at + alen];
        match atype {
            IFLA_ADDRESS if body.len() == 6 => mac = <[u8; 6]>::try_from(body).ok(),
            IFLA_LINK if body.len() == 4 => {
                peer_link = Some(u32::from_ne_bytes(body.try_into().ok()?));
            }
            IFLA_XDP => xdp_prog = nested_u32(body, IFLA_XDP_PROG_ID),
            IFLA_LINK_NETNSID if body.len() == 4 => {
                link_netnsid = Some(i32::from_ne_bytes(body.try_into().ok()?));
            }
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Some(LinkInfo {
        mac,
        xdp_prog,
        link: peer_link,
        link_netnsid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_ifindex_and_no_peer() {
        assert!(ifindex("lo").unwrap() > 0);
        assert!(matches!(
            veth_peer_ifindex("lo"),
            Err(LinkError::NotVeth { .. })
        ));
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(LinkError::NoSuchInterface { .. })
        ));
    }
}
