//! One active probe of an application, blocking and bounded in time: a
//! datagram and its answer, a TCP connection, an HTTP GET and its status,
//! or a command, each from inside a given network namespace (the
//! instance's) or from the agent's own.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// What to ask, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Udp {
        addr: SocketAddr,
        send: Vec<u8>,
        expect: Vec<u8>,
    },
    Tcp {
        addr: SocketAddr,
    },
    Http {
        addr: SocketAddr,
        /// The `Host` header.
        host: String,
        path: String,
        /// The status wanted; `None`: any 2xx or 3xx.
        status: Option<u16>,
    },
    /// argv, already filled in.
    Exec {
        argv: Vec<String>,
    },
}

/// A check and the namespace it runs in (`None`: the agent's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub netns: Option<PathBuf>,
    pub check: Check,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.check {
            Check::Udp { addr, .. } => write!(f, "udp {addr}")?,
            Check::Tcp { addr } => write!(f, "tcp {addr}")?,
            Check::Http { addr, path, .. } => write!(f, "http {addr}{path}")?,
            Check::Exec { argv } => write!(f, "exec {}", argv.join(" "))?,
        }
        if let Some(ns) = &self.netns {
            write!(f, " in {}", ns.display())?;
        }
        Ok(())
    }
}

/// Runs `target` once; `Err` says why it failed. Never takes much longer
/// than `timeout`.
pub fn run(target: &Target, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    match &target.check {
        Check::Exec { argv } => exec(target.netns.as_deref(), argv, deadline),
        check => {
            let check = check.clone();
            let run = move || socket_check(&check, deadline);
            match &target.netns {
                None => run(),
                Some(ns) => super::netns::run_in(ns, run)
                    .map_err(|e| format!("entering {}: {e}", ns.display()))?,
            }
        }
    }
}

fn left(deadline: Instant) -> Result<Duration, String> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err("timed out".into())
    } else {
        Ok(d)
    }
}

fn io_error(what: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{what}: timed out")
        }
        _ => format!("{what}: {e}"),
    }
}

fn socket_check(check: &Check, deadline: Instant) -> Result<(), String> {
    match check {
        Check::Udp { addr, send, expect } => {
            let bind: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind).map_err(|e| io_error("bind", &e))?;
            // Connected: an ICMP port unreachable comes back as an error,
            // and datagrams from anyone else are not taken for the answer.
            sock.connect(addr).map_err(|e| io_error("connect", &e))?;
            sock.send(send).map_err(|e| io_error("send", &e))?;
            let mut buf = vec![0u8; expect.len().max(512)];
            sock.set_read_timeout(Some(left(deadline)?))
                .map_err(|e| io_error("timeout", &e))?;
            let n = sock.recv(&mut buf).map_err(|e| io_error("answer", &e))?;
            if buf[..n].starts_with(expect) {
                Ok(())
            } else {
                Err(format!(
                    "the answer ({n} bytes) does not start with what `expect` says"
                ))
            }
        }
        Check::Tcp { addr } => TcpStream::connect_timeout(addr, left(deadline)?)
            .map(drop)
            .map_err(|e| io_error("connect", &e)),
        Check::Http {
            addr,
            host,
            path,
            status,
        } => {
            let mut conn = TcpStream::connect_timeout(addr, left(deadline)?)
                .map_err(|e| io_error("connect", &e))?;
            conn.set_write_timeout(Some(left(deadline)?))
                .map_err(|e| io_error("timeout", &e))?;
            // One write: one segment for the request head.
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-probe\r\nConnection: close\r\n\r\n"
            );
            conn.write_all(request.as_bytes())
                .map_err(|e| io_error("request", &e))?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            loop {
                conn.set_read_timeout(Some(left(deadline)?))
                    .map_err(|e| io_error("timeout", &e))?;
                let n = conn.read(&mut buf).map_err(|e| io_error("response", &e))?;
                if n == 0 {
                    return Err("the connection closed before a status line".into());
                }
                head.extend_from_slice(&buf[..n]);
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&head) {
                    // The status line is all that counts: a head longer than
                    // the header array still has one.
                    Ok(_) | Err(httparse::Error::TooManyHeaders) if resp.code.is_some() => {
                        let code = resp.code.unwrap_or_default();
                        let good = status.map_or((200..400).contains(&code), |s| s == code);
                        return if good {
                            Ok(())
                        } else {
                            Err(format!("status {code}"))
                        };
                    }
                    Ok(_) if head.len() < 8192 => {}
                    Ok(_) => return Err("no status line in 8 KiB".into()),
                    Err(e) => return Err(format!("not an HTTP response: {e}")),
                }
            }
        }
        Check::Exec { .. } => unreachable!("run() runs commands"),
    }
}

/// Runs `argv` in `netns` (entered between fork and exec), killed at the
/// deadline.
fn exec(netns: Option<&Path>, argv: &[String], deadline: Instant) -> Result<(), String> {
    let Some((program, rest)) = argv.split_first() else {
        return Err("no command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let ns = netns
        .map(std::fs::File::open)
        .transpose()
        .map_err(|e| format!("opening the namespace: {e}"))?;
    if let Some(ns) = &ns {
        let fd = ns.as_raw_fd();
        // SAFETY: between fork and exec only setns runs, a plain system
        // call (async-signal-safe), on a descriptor opened before the fork
        // and open until the spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
    drop(ns);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{program}: {st}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program}: timed out"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{program}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, UdpSocket},
        time::Duration,
    };

    use super::{Check, Target, run};

    const T: Duration = Duration::from_millis(500);

    fn here(check: Check) -> Target {
        Target { netns: None, check }
    }

    #[test]
    fn udp_wants_an_answer_with_the_expected_start() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = server.local_addr().expect("addr");
        let answer = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for reply in [&b"PONG ok"[..], b"nope"] {
                let (n, from) = server.recv_from(&mut buf).expect("recv");
                assert_eq!(&buf[..n], b"PING");
                server.send_to(reply, from).expect("send");
            }
            server
        });
        let check = |expect: &[u8]| {
            run(
                &here(Check::Udp {
                    addr,
                    send: b"PING".to_vec(),
                    expect: expect.to_vec(),
                }),
                T,
            )
        };
        assert_eq!(check(b"PONG"), Ok(()));
        assert!(check(b"PONG").unwrap_err().contains("does not start"));
        // Bound but silent: a hung application.
        let _server = answer.join().expect("server");
        assert!(check(b"PONG").unwrap_err().contains("timed out"));
    }

    #[test]
    fn udp_to_a_closed_port_fails_at_once() {
        let addr = UdpSocket::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let t = std::time::Instant::now();
        let got = run(
            &here(Check::Udp {
                addr,
                send: b"x".to_vec(),
                expect: Vec::new(),
            }),
            Duration::from_secs(5),
        );
        assert!(got.is_err());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "waited for the timeout"
        );
    }

    #[test]
    fn tcp_wants_a_connection() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(run(&here(Check::Tcp { addr }), T), Ok(()));
        drop(l);
        assert!(run(&here(Check::Tcp { addr }), T).is_err());
    }

    #[test]
    fn http_wants_the_status() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for status in ["200 OK", "503 Service Unavailable", "204 No Content"] {
                let (mut c, _) = l.accept().expect("accept");
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut buf).expect("read");
                    assert!(n > 0, "closed mid-request");
                    req.extend_from_slice(&buf[..n]);
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
                assert!(req.contains("\r\nHost: svc\r\n"), "{req}");
                write!(c, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").expect("write");
            }
            // Accepts, never answers.
            let (c, _) = l.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(700));
            drop(c);
        });
        let get = |status| {
            run(
                &here(Check::Http {
                    addr,
                    host: "svc".into(),
                    path: "/healthz".into(),
                    status,
                }),
                T,
            )
        };
        assert_eq!(get(None), Ok(()));
        assert_eq!(get(None), Err("status 503".into()));
        assert_eq!(get(Some(200)), Err("status 204".into()));
        assert!(get(None).unwrap_err().contains("timed out"));
        server.join().expect("server");
    }

    #[test]
    fn exec_wants_exit_0_within_the_timeout() {
        let sh = |script: &str| {
            run(
                &here(Check::Exec {
                    argv: vec!["sh".into(), "-c".into(), script.into()],
                }),
                T,
            )
        };
        assert_eq!(sh("exit 0"), Ok(()));
        assert!(sh("exit 3").unwrap_err().contains("exit status: 3"));
        let t = std::time::Instant::now();
        assert!(sh("sleep 5").unwrap_err().contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(
            run(
                &here(Check::Exec {
                    argv: vec!["/nonexistent/probe".into()]
                }),
                T
            )
            .is_err()
        );
    }
}
