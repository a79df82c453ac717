//! Interface facts the agent needs: a host-side veth's ifindex, and the MAC
//! of its peer inside the instance's network namespace.

use std::{
    collections::HashSet,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("interface `{name}` does not exist in the agent's network namespace")]
    NoSuchInterface { name: String },
    #[error("interface `{name}` is not a veth (it has no peer)")]
    NotVeth { name: String },
    #[error("cannot enter network namespace {path}: {source}")]
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
        "peer of veth `{veth}` (ifindex {peer}) is ambiguous: veths with that ifindex exist in {candidates}; set `netns` or `mac` for this instance in the config"
    )]
    PeerAmbiguous {
        veth: String,
        peer: u32,
        candidates: String,
    },
}

/// Ifindex of `name` in the agent's namespace.
pub fn ifindex(name: &str) -> Result<u32, NetdevError> {
    let missing = || NetdevError::NoSuchInterface {
        name: name.to_owned(),
    };
    let c = CString::new(name).map_err(|_| missing())?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(missing()) } else { Ok(idx) }
}

/// Ifindex of the peer of veth `name` (its `iflink`).
pub fn veth_peer_ifindex(name: &str) -> Result<u32, NetdevError> {
    let own = ifindex(name)?;
    let path = format!("/sys/class/net/{name}/iflink");
    let peer = fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| NetdevError::NoSuchInterface {
            name: name.to_owned(),
        })?;
    if peer == own || peer == 0 {
        return Err(NetdevError::NotVeth {
            name: name.to_owned(),
        });
    }
    Ok(peer)
}

/// MAC of the peer of host-side veth `veth`: looked up in the named netns
/// when given, else in every namespace under /run/netns and of every
/// process, where it must be the only veth with that ifindex.
pub fn discover_peer_mac(veth: &str, netns: Option<&str>) -> Result<[u8; 6], NetdevError> {
    let peer = veth_peer_ifindex(veth)?;
    let candidates: Vec<PathBuf> = match netns {
        Some(name) => vec![Path::new("/run/netns").join(name)],
        None => namespace_files(),
    };
    let mut found = Vec::new();
    for path in &candidates {
        match veth_mac_in(path, peer) {
            Ok(Some(mac)) => found.push((path.clone(), mac)),
            Err(e) if netns.is_some() => return Err(e),
            // Not there, or a process exited while we scanned: the other
            // namespaces still count.
            Ok(None) | Err(_) => {}
        }
    }
    match found.as_slice() {
        [(_, mac)] => Ok(*mac),
        [] => Err(NetdevError::PeerNotFound {
            veth: veth.to_owned(),
            peer,
            searched: netns.map_or_else(
                || format!("{} network namespaces", candidates.len()),
                |n| format!("netns `{n}`"),
            ),
        }),
        many => Err(NetdevError::PeerAmbiguous {
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

/// In the namespace at `path`: the MAC of interface `ifindex` if it is a veth.
fn veth_mac_in(path: &Path, ifindex: u32) -> Result<Option<[u8; 6]>, NetdevError> {
    let ns_err = |source| NetdevError::Netns {
        path: path.to_owned(),
        source,
    };
    let ns = fs::File::open(path).map_err(ns_err)?;
    // setns changes only the calling thread: do it on a thread of our own
    // that ends right after, so the agent's threads stay where they are.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open namespace file.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(ns_err(io::Error::last_os_error()));
            }
            Ok(query_veth_mac(ifindex))
        })
        .join()
        .expect("netns thread does not panic")
    })
}

/// MAC of `ifindex` in the current thread's namespace, if it is a veth.
fn query_veth_mac(ifindex: u32) -> Option<[u8; 6]> {
    // SAFETY: plain socket creation; the fd is owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_ifru.ifru_ifindex = i32::try_from(ifindex).ok()?;
    // SAFETY: SIOCGIFNAME fills ifr_name for the ifindex.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFNAME, &raw mut ifr) } != 0 {
        return None;
    }
    if driver_of(&sock, &ifr).as_deref() != Some("veth") {
        return None;
    }
    // SAFETY: SIOCGIFHWADDR reads the MAC of ifr_name.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut ifr) } != 0 {
        return None;
    }
    // SAFETY: the ioctl above filled the hwaddr member.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = b.to_ne_bytes()[0];
    }
    Some(mac)
}

/// Driver name of `ifr.ifr_name`, through `ETHTOOL_GDRVINFO`.
fn driver_of(sock: &OwnedFd, ifr: &libc::ifreq) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = *ifr;
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with GDRVINFO writes into `info`, which is large
    // enough for struct ethtool_drvinfo (196 bytes).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) } != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    String::from_utf8(info.driver[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_ifindex_and_no_peer() {
        assert!(ifindex("lo").unwrap() > 0);
        assert!(matches!(
            veth_peer_ifindex("lo"),
            Err(NetdevError::NotVeth { .. })
        ));
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(NetdevError::NoSuchInterface { .. })
        ));
    }
}
