//! What the kernel says of an instance's sockets, read inside its network
//! namespace from `/proc/net`: the QoS figures (receive-buffer drops,
//! queued bytes) and the application's liveness (is anything bound to the
//! service's ports; how much traffic found no socket).

use std::{fs, io, path::Path};

/// Socket statistics read inside an instance's namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsStats {
    /// UDP + UDP6 `RcvbufErrors`, since the namespace was made.
    pub rcvbuf_errors: u64,
    /// Bytes queued for reading on UDP sockets bound to the given ports.
    pub queue_bytes: u64,
    /// Sockets on the given ports: UDP sockets bound to one, TCP sockets
    /// listening on one. `None` without ports (nothing to look for).
    pub listeners: Option<u32>,
    /// Traffic the namespace's stack refused since it was made: datagrams
    /// to a port with no socket (UDP and UDP6 `NoPorts`) and TCP resets
    /// sent (`OutRsts`). A dead application's traffic turns into these.
    pub refused: u64,
}

/// Reads [`NetnsStats`] in the namespace at `netns` (a thread of our own
/// enters it; `/proc/thread-self/net` then shows that namespace).
pub fn netns_stats(netns: &Path, ports: &[u16]) -> io::Result<NetnsStats> {
    crate::sys::netns::run_in(netns, || {
        let read = |file: &str| fs::read_to_string(format!("/proc/thread-self/net/{file}"));
        let mut udp = UdpSockets::default();
        for file in ["udp", "udp6"] {
            udp.add(&udp_sockets(&read(file).unwrap_or_default(), ports));
        }
        // sock_diag walks the listening sockets only; /proc/net/tcp every
        // established bucket too (see `sys::sockdiag`), so it is the
        // fallback, for a kernel without `inet_diag`.
        let tcp = match ports {
            [] => 0,
            _ => crate::sys::sockdiag::tcp_listeners(ports).unwrap_or_else(|_| {
                ["tcp", "tcp6"]
                    .iter()
                    .map(|f| tcp_listeners(&read(f).unwrap_or_default(), ports))
                    .sum()
            }),
        };
        let snmp = read("snmp")?;
        let snmp6 = read("snmp6").unwrap_or_default();
        let field = |prefix, name| snmp_field(&snmp, prefix, name).unwrap_or(0);
        let field6 = |name| snmp6_field(&snmp6, name).unwrap_or(0);
        // With the service's ports known, count its own sockets' drops: a
        // container may serve several services (instances), and the
        // namespace-wide counter would charge each with all of them.
        let rcvbuf_errors = if ports.is_empty() {
            field("Udp:", "RcvbufErrors") + field6("Udp6RcvbufErrors")
        } else {
            udp.drops
        };
        Ok(NetnsStats {
            rcvbuf_errors,
            queue_bytes: udp.queue,
            listeners: (!ports.is_empty()).then_some(udp.sockets + tcp),
            refused: field("Udp:", "NoPorts") + field6("Udp6NoPorts") + field("Tcp:", "OutRsts"),
        })
    })?
}

/// A field of a `/proc/net/snmp` table: a header line names the fields, the
/// next line with the same prefix holds the values.
fn snmp_field(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

fn snmp6_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(field))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

/// The sockets of a `/proc/net/udp` table on some ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct UdpSockets {
    sockets: u32,
    /// Their `rx_queue` bytes.
    queue: u64,
    /// Their `drops` (the last column).
    drops: u64,
}

impl UdpSockets {
    const fn add(&mut self, o: &Self) {
        self.sockets += o.sockets;
        self.queue += o.queue;
        self.drops += o.drops;
    }
}

/// The local port of a `/proc/net/{udp,tcp}` line's `local_address`
/// (`ADDR:PORT`, hex).
fn local_port(local: &str) -> Option<u16> {
    u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
}

/// The sockets of a `/proc/net/udp` table whose local port is one of
/// `ports`.
fn udp_sockets(table: &str, ports: &[u16]) -> UdpSockets {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let port = local_port(cols.nth(1)?)?;
            let queues = cols.nth(2)?;
            let rx = u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()?;
            let drops = cols.last()?.parse::<u64>().ok()?;
            ports.contains(&port).then_some(UdpSockets {
                sockets: 1,
                queue: rx,
                drops,
            })
        })
        .fold(UdpSockets::default(), |mut sum, s| {
            sum.add(&s);
            sum
        })
}

/// `TCP_LISTEN` in the `st` column.
const TCP_LISTEN: &str = "0A";

/// How many sockets of a `/proc/net/tcp` table listen on one of `ports`.
fn tcp_listeners(table: &str, ports: &[u16]) -> u32 {
    let n = table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut cols = l.split_whitespace();
            let port = cols.nth(1).and_then(local_port);
            let state = cols.nth(1);
            state == Some(TCP_LISTEN) && port.is_some_and(|p| ports.contains(&p))
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_tables_parse() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 10 4 7 3 5 0\n";
        assert_eq!(snmp_field(snmp, "Udp:", "RcvbufErrors"), Some(5));
        assert_eq!(snmp_field(snmp, "Udp:", "NoPorts"), Some(4));
        assert_eq!(snmp_field(snmp, "Tcp:", "OutRsts"), None);
        assert_eq!(
            snmp6_field(
                "Udp6InDatagrams 4\nUdp6RcvbufErrors 2\n",
                "Udp6RcvbufErrors"
            ),
            Some(2)
        );
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   0: 0101A8C6:1B58 00000000:0000 07 00000000:00000400 00:00000000 00000000     0        0 1 2 0 17\n\
                   1: 0101A8C6:1B59 00000000:0000 07 00000000:00000100 00:00000000 00000000     0        0 1 2 0 5\n";
        // Queue and drops are the sockets' own: another service's socket in
        // the same container (port 7001) is not charged to port 7000's.
        let one = UdpSockets {
            sockets: 1,
            queue: 0x400,
            drops: 17,
        };
        assert_eq!(udp_sockets(udp, &[7000]), one);
        let both = UdpSockets {
            sockets: 2,
            queue: 0x500,
            drops: 22,
        };
        assert_eq!(udp_sockets(udp, &[7000, 7001]), both);
        assert_eq!(udp_sockets(udp, &[53]), UdpSockets::default());
    }

    #[test]
    fn only_listening_tcp_sockets_on_the_ports_count() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1 0\n\
                   1: 0201A8C6:1F90 0301A8C6:C350 01 00000000:00000000 00:00000000 00000000     0        0 12 1 0\n\
                   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13 1 0\n";
        // Port 8080: one listener; the established connection on it is not
        // one (it outlives a dead server until it closes).
        assert_eq!(tcp_listeners(tcp, &[8080]), 1);
        assert_eq!(tcp_listeners(tcp, &[8080, 8081]), 2);
        assert_eq!(tcp_listeners(tcp, &[9000]), 0);
        assert_eq!(tcp_listeners("", &[8080]), 0);
    }
}
