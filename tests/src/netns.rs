//! Running code inside a named network namespace (`/run/netns/NAME`).
//!
//! `setns` changes only the calling thread, so each helper runs its closure
//! on a thread of its own. Sockets keep the namespace they were created in,
//! so a socket made in there can be used from any thread afterwards.

use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf, thread};

fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

fn enter(ns: &str) -> io::Result<()> {
    let f = File::open(path(ns))?;
    // SAFETY: `f` is an open namespace file.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` inside namespace `ns` and returns its result.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            enter(ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Spawns a thread that lives inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter(&ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
        f()
    })
}

/// Sets a boolean offload of `dev` (in the current thread's namespace)
/// through the legacy ethtool ioctls, so tests need no `ethtool` binary.
pub fn set_offload(dev: &str, cmd: Offload, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut val = EthtoolValue {
        cmd: cmd as u32,
        data: u32::from(on),
    };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    ifr.ifr_ifru.ifru_data = (&raw mut val).cast();
    // SAFETY: SIOCETHTOOL with a set-value command reads `val`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Legacy ethtool set commands.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Offload {
    /// Transmit checksum offload (`ethtool -K DEV tx`).
    TxChecksum = 0x17,
    /// Generic receive offload (`ethtool -K DEV gro`).
    Gro = 0x2c,
}
