//! Interface settings through the legacy ethtool ioctls, so neither the
//! agent nor the tests need an `ethtool` binary.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

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
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut val = EthtoolValue {
        cmd: cmd as u32,
        data: u32::from(on),
    };
    let mut ifr = ifreq_named(dev)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"))?;
    ifr.ifr_ifru.ifru_data = (&raw mut val).cast();
    // SAFETY: SIOCETHTOOL with a set-value command reads `val`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An `ifreq` naming `dev`, or `None` if the name is too long for one.
fn ifreq_named(dev: &str) -> Option<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    Some(ifr)
}

/// Receive queues of `dev` in the calling thread's namespace (ethtool
/// channels; 1 when the driver does not say).
#[must_use]
pub fn rx_queues(dev: &str) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct Channels {
        cmd: u32,
        max_rx: u32,
        max_tx: u32,
        max_other: u32,
        max_combined: u32,
        rx_count: u32,
        tx_count: u32,
        other_count: u32,
        combined_count: u32,
    }
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return 1;
    };
    let mut ch = Channels {
        cmd: ETHTOOL_GCHANNELS,
        ..Channels::default()
    };
    let Some(mut ifr) = ifreq_named(dev) else {
        return 1;
    };
    ifr.ifr_ifru.ifru_data = (&raw mut ch).cast();
    // SAFETY: SIOCETHTOOL with GCHANNELS writes into `ch`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) } != 0 {
        return 1;
    }
    ch.rx_count.max(ch.combined_count).max(1)
}

/// The MTU of `dev` in the calling thread's namespace (`SIOCGIFMTU`: sysfs
/// shows the namespace it was mounted in, which under `nsenter --net` is
/// not this one).
pub fn mtu(dev: &str) -> io::Result<u16> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut ifr = ifreq_named(dev)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"))?;
    // SAFETY: SIOCGIFMTU writes the MTU into `ifr`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &raw mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    Ok(u16::try_from(mtu.max(0)).unwrap_or(u16::MAX))
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
