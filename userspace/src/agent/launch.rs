//! The application loader: starts and stops instances of a service for the
//! scaler and the failure rules.
//!
//! - **command**: the configured `start` and `stop` argv templates, with
//!   `{service}`, `{name}`, `{vip}`, `{port}` and `{index}` filled in. The
//!   start command must exit 0 within `start_timeout_secs` and print, as
//!   its last JSON line on stdout, where the new instance is:
//!   `{"veth": "vethab12", "netns": "cni-1234", "mac": "..", "addr": "..",
//!   "cgroup": ".."}` (`veth` required; `netns` a name under /run/netns or
//!   a path there). Docker, Podman, systemd or Kubernetes plug in through a
//!   small script. A failed start is followed by the stop command, so
//!   nothing is left half-made.
//! - **netns** (built in): a fresh network namespace `sl-NAME` joined to the
//!   host by a veth pair (`sl` + a hash of the name on the host, `eth0`
//!   inside), a /30 of the configured `subnet` on it, the service's VIPs on
//!   its loopback (direct server return), routes to the given client
//!   prefixes via the host, GRO on (so redirected frames are taken), and
//!   the configured command run inside. The host must forward IP between
//!   its interfaces for the replies. Stopping ends the command's processes
//!   and deletes the namespace (and so its veth).
//!
//! Every start and stop runs on a task of its own, bounded in time; the
//! outcome comes back to the event loop as a message.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use tokio::{io::AsyncReadExt as _, process::Command};

use crate::{
    api::InstanceSpec,
    config::{Launcher, Service, TemplateVars, expand},
    sys::{ethtool, netns},
};

/// What a start or stop knows of the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vars {
    pub service: String,
    pub name: String,
    /// The service's first VIP and port.
    pub vip: IpAddr,
    pub port: u16,
    /// The instance's slot among the service's launched instances (its
    /// subnet slot for the netns launcher).
    pub index: u32,
}

impl Vars {
    #[must_use]
    pub fn new(service: &Service, name: &str, index: u32) -> Self {
        Self {
            service: service.name.clone(),
            name: name.to_owned(),
            vip: service.vips[0],
            port: service.ports[0],
            index,
        }
    }

    /// `template` with the placeholders filled in.
    #[must_use]
    pub fn fill(&self, template: &str) -> String {
        expand(
            template,
            &TemplateVars {
                service: &self.service,
                name: &self.name,
                vip: self.vip,
                port: self.port,
                index: self.index,
            },
        )
    }
}

/// Why a start or stop failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("`{program}` could not be run: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` exited with {status}{}", tail(.stderr))]
    Exit {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{program}` did not finish within {} s; it was killed", .after.as_secs())]
    Timeout { program: String, after: Duration },
    #[error(
        "the start command printed no JSON line with a \"veth\" (print e.g. {{\"veth\": \"veth12\", \"netns\": \"cni-1\"}} as its last line){}",
        tail(.stdout)
    )]
    NoReport { stdout: String },
    #[error("`{command}`: {stderr}")]
    Ip { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server command exited at once ({status}){}", tail(.log))]
    ServerExited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the netns launcher's subnet has no free /30 for slot {index}")]
    NoAddress { index: u32 },
}

/// `: <last line of out>`, if there is one.
fn tail(out: &str) -> String {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default()
}

/// Runs `argv` (already filled in) to its end within `timeout`; returns
/// its stdout.
async fn run(argv: &[String], timeout: Duration) -> Result<String, LaunchError> {
    let program = argv.join(" ");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let finished = tokio::time::timeout(timeout, async {
        // Both pipes read while it runs: a full pipe would stall it.
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e)?;
        child.wait().await
    })
    .await;
    let status = match finished {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(LaunchError::Io {
                what: format!("waiting for `{program}`"),
                source,
            });
        }
        // Dropping the child kills it.
        Err(_) => {
            return Err(LaunchError::Timeout {
                program,
                after: timeout,
            });
        }
    };
    let out = String::from_utf8_lossy(&out).into_owned();
    if !status.success() {
        return Err(LaunchError::Exit {
            program,
            status,
            stderr: String::from_utf8_lossy(&err).into_owned(),
        });
    }
    Ok(out)
}

/// What a start command says of the new instance: its last stdout line
/// that is a JSON object with a `veth`.
fn report(stdout: &str, vars: &Vars) -> Result<InstanceSpec, LaunchError> {
    #[derive(serde::Deserialize)]
    struct Reported {
        veth: String,
        netns: Option<String>,
        mac: Option<String>,
        addr: Option<String>,
        cgroup: Option<String>,
    }
    let r: Reported = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| LaunchError::NoReport {
            stdout: stdout.to_owned(),
        })?;
    Ok(InstanceSpec {
        service: vars.service.clone(),
        name: vars.name.clone(),
        veth: r.veth,
        // A path under /run/netns names the same namespace.
        netns: r.netns.map(|n| {
            n.strip_prefix("/run/netns/")
                .map_or_else(|| n.clone(), str::to_owned)
        }),
        mac: r.mac,
        addr: r.addr,
        cgroup: r.cgroup,
        ..InstanceSpec::default()
    })
}

/// Starts an instance with `launcher`; on success, what to register.
pub async fn start(
    launcher: &Launcher,
    service: &Service,
    vars: &Vars,
    log_dir: &std::path::Path,
) -> Result<InstanceSpec, LaunchError> {
    match launcher {
        Launcher::Command {
            start,
            stop,
            start_timeout,
        } => {
            let argv: Vec<String> = start.iter().map(|a| vars.fill(a)).collect();
            let outcome = match run(&argv, *start_timeout).await {
                Ok(out) => report(&out, vars),
                Err(e) => Err(e),
            };
            if outcome.is_err() {
                // Whatever the start made, gone again.
                let argv: Vec<String> = stop.iter().map(|a| vars.fill(a)).collect();
                if let Err(e) = run(&argv, *start_timeout).await {
                    tracing::warn!(instance = %vars.name, error = %e, "cleaning up after a failed start failed");
                }
            }
            outcome
        }
        Launcher::Netns {
            command,
            subnet,
            routes,
            start_timeout,
        } => {
            let made = tokio::time::timeout(
                *start_timeout,
                netns_start(command, *subnet, routes, service, vars, log_dir),
            )
            .await
            .unwrap_or_else(|_| {
                Err(LaunchError::Timeout {
                    program: "the netns launcher".into(),
                    after: *start_timeout,
                })
            });
            if made.is_err() {
                netns_stop(&vars.name).await;
            }
            made
        }
    }
}

/// Stops an instance `launcher` started.
pub async fn stop(launcher: &Launcher, vars: &Vars) -> Result<(), LaunchError> {
    match launcher {
        Launcher::Command {
            stop,
            start_timeout,
            ..
        } => {
            let argv: Vec<String> = stop.iter().map(|a| vars.fill(a)).collect();
            run(&argv, *start_timeout).await.map(drop)
        }
        Launcher::Netns { .. } => {
            netns_stop(&vars.name).await;
            Ok(())
        }
    }
}

/// The netns launcher's namespace for instance `name`.
#[must_use]
pub fn netns_name(name: &str) -> String {
    format!("sl-{name}")
}

/// The netns launcher's host-side veth for instance `name`: `sl` and 8 hex
/// digits of a hash of the name (interface names are at most 15 bytes).
#[must_use]
pub fn veth_name(name: &str) -> String {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("sl{h:08x}")
}

/// The /30 of slot `index` in `subnet`: (host side, instance side).
#[must_use]
pub fn slot_addrs(subnet: (Ipv4Addr, u8), index: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (base, len) = subnet;
    let slots = 1u64 << (32 - u32::from(len)).saturating_sub(2);
    if u64::from(index) >= slots {
        return None;
    }
    let first = u32::from(base) + index * 4;
    Some((Ipv4Addr::from(first + 1), Ipv4Addr::from(first + 2)))
}

async fn ip(args: &[String]) -> Result<(), LaunchError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| LaunchError::Io {
            what: "running ip (iproute2)".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(LaunchError::Ip {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// `ip` with string-slice arguments.
async fn ip_s(args: &[&str]) -> Result<(), LaunchError> {
    ip(&args.iter().map(|&a| a.to_owned()).collect::<Vec<_>>()).await
}

async fn netns_start(
    command: &[String],
    subnet: (Ipv4Addr, u8),
    routes: &[(IpAddr, u8)],
    service: &Service,
    vars: &Vars,
    log_dir: &std::path::Path,
) -> Result<InstanceSpec, LaunchError> {
    let ns = netns_name(&vars.name);
    let veth = veth_name(&vars.name);
    let (host_addr, inst_addr) =
        slot_addrs(subnet, vars.index).ok_or(LaunchError::NoAddress { index: vars.index })?;
    netns_wire(&ns, &veth, (host_addr, inst_addr), service, routes).await?;
    netns_run(&ns, command, vars, log_dir).await?;
    Ok(InstanceSpec {
        service: vars.service.clone(),
        name: vars.name.clone(),
        veth,
        netns: Some(ns),
        ..InstanceSpec::default()
    })
}

/// The namespace `ns`, its veth pair (`veth` on the host) with `addrs`
/// (host side, instance side), the service's VIPs on its loopback, its
/// routes back through the host, and GRO on its side.
async fn netns_wire(
    ns: &str,
    veth: &str,
    (host_addr, inst_addr): (Ipv4Addr, Ipv4Addr),
    service: &Service,
    routes: &[(IpAddr, u8)],
) -> Result<(), LaunchError> {
    let (ns, veth) = (ns.to_owned(), veth.to_owned());
    ip_s(&["netns", "add", &ns]).await?;
    ip_s(&["-n", &ns, "link", "set", "lo", "up"]).await?;
    ip_s(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])
    .await?;
    ip(&[
        "addr".into(),
        "add".into(),
        format!("{host_addr}/30"),
        "dev".into(),
        veth.clone(),
    ])
    .await?;
    ip(&[
        "-n".into(),
        ns.clone(),
        "addr".into(),
        "add".into(),
        format!("{inst_addr}/30"),
        "dev".into(),
        "eth0".into(),
    ])
    .await?;
    ip_s(&["link", "set", &veth, "up"]).await?;
    ip_s(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
    for vip in &service.vips {
        let (len, extra): (u8, &[&str]) = if vip.is_ipv4() {
            (32, &[])
        } else {
            (128, &["nodad"])
        };
        let mut args = vec![
            "-n".to_owned(),
            ns.clone(),
            "addr".into(),
            "add".into(),
            format!("{vip}/{len}"),
            "dev".into(),
            "lo".into(),
        ];
        args.extend(extra.iter().map(|&e| e.to_owned()));
        ip(&args).await?;
    }
    for (prefix, len) in routes.iter().filter(|(p, _)| p.is_ipv4()) {
        ip(&[
            "-n".into(),
            ns.clone(),
            "route".into(),
            "add".into(),
            format!("{prefix}/{len}"),
            "via".into(),
            host_addr.to_string(),
        ])
        .await?;
    }
    // A frame redirected into a veth is dropped unless the receiving side
    // runs NAPI: GRO on gives it one.
    let path = netns::named(&ns);
    netns::run_in(&path, || {
        ethtool::set_offload("eth0", ethtool::Offload::Gro, true)
    })
    .and_then(|r| r)
    .map_err(|source| LaunchError::Io {
        what: format!("turning GRO on in {ns}"),
        source,
    })
}

/// Runs the server `command` in `ns`, its output to a log in `log_dir`;
/// fails if it exits at once.
async fn netns_run(
    ns: &str,
    command: &[String],
    vars: &Vars,
    log_dir: &std::path::Path,
) -> Result<(), LaunchError> {
    // The server, inside: its output to a log of its own.
    std::fs::create_dir_all(log_dir).map_err(|source| LaunchError::Io {
        what: format!("creating {}", log_dir.display()),
        source,
    })?;
    let log_path = log_dir.join(format!("{}.log", vars.name));
    let log = std::fs::File::create(&log_path).map_err(|source| LaunchError::Io {
        what: format!("creating {}", log_path.display()),
        source,
    })?;
    let argv: Vec<String> = command.iter().map(|a| vars.fill(a)).collect();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|source| LaunchError::Io {
            what: "the server's log".into(),
            source,
        })?)
        .stderr(log)
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            program: argv.join(" "),
            source,
        })?;
    // A server that cannot start (bad command, port taken) says so at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(Some(status)) = child.try_wait() {
        return Err(LaunchError::ServerExited {
            status,
            log: std::fs::read_to_string(&log_path).unwrap_or_default(),
        });
    }
    // It lives on in its namespace; the stop ends it by the namespace's
    // processes. Reaped by a thread, so no zombie stays behind.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// Whether the netns launcher's server of `name` still runs (a process in
/// its namespace).
#[must_use]
pub fn netns_alive(name: &str) -> bool {
    !netns_pids(&netns_name(name)).is_empty()
}

/// The processes in namespace `ns` (`ip netns pids`).
fn netns_pids(ns: &str) -> Vec<i32> {
    std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Ends the processes the netns launcher started in `name`'s namespace
/// (SIGTERM, then SIGKILL after 3 s) and deletes the namespace.
async fn netns_stop(name: &str) {
    let ns = netns_name(name);
    // Only a namespace this launcher made holds them.
    if !PathBuf::from(format!("/run/netns/{ns}")).exists() {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let pids = netns_pids(&ns);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: signalling a process of the namespace this launcher
            // created for this instance.
            unsafe { libc::kill(pid, sig) };
        }
        for _ in 0..30 {
            if netns_pids(&ns).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if let Err(e) = ip_s(&["netns", "del", &ns]).await {
        tracing::warn!(instance = name, error = %e, "deleting the launcher's namespace failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars {
            service: "kv".into(),
            name: "kv-s1".into(),
            vip: "198.18.1.1".parse().unwrap(),
            port: 7000,
            index: 1,
        }
    }

    #[test]
    fn templates_are_filled() {
        assert_eq!(
            vars().fill("--name={name} {service}:{vip}:{port}#{index} {{}}"),
            "--name=kv-s1 kv:198.18.1.1:7000#1 {}"
        );
    }

    #[test]
    fn the_last_json_line_with_a_veth_is_the_report() {
        let out = "pulling\n{\"veth\": \"old\"}\nstarted\n{\"veth\": \"veth9\", \"netns\": \"/run/netns/cni-7\", \"mac\": \"02:00:00:00:00:09\"}\n\n";
        let s = report(out, &vars()).unwrap();
        assert_eq!(
            (s.veth.as_str(), s.netns.as_deref(), s.name.as_str()),
            ("veth9", Some("cni-7"), "kv-s1")
        );
        assert!(matches!(
            report("started\n{\"netns\": \"x\"}", &vars()),
            Err(LaunchError::NoReport { .. })
        ));
    }

    #[test]
    fn names_and_slots() {
        let v = veth_name("a-rather-long-instance-name-0001");
        assert!(v.len() <= 15 && v.starts_with("sl"), "{v}");
        assert_ne!(veth_name("kv-s1"), veth_name("kv-s2"));
        let net = (Ipv4Addr::new(198, 18, 96, 0), 28);
        assert_eq!(
            slot_addrs(net, 0),
            Some((Ipv4Addr::new(198, 18, 96, 1), Ipv4Addr::new(198, 18, 96, 2)))
        );
        assert_eq!(
            slot_addrs(net, 3),
            Some((
                Ipv4Addr::new(198, 18, 96, 13),
                Ipv4Addr::new(198, 18, 96, 14)
            ))
        );
        assert_eq!(slot_addrs(net, 4), None);
    }

    #[tokio::test]
    async fn a_start_command_that_fails_or_hangs_is_reported_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("stopped");
        let stop = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo {{name}} >> {}", marker.display()),
        ];
        let svc = crate::config::Config::parse(
            "[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n[[service.instance]]\nname = \"kv-0\"\nveth = \"v0\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap()
        .services
        .remove(0);
        let launcher = |start: &str, secs: u64| Launcher::Command {
            start: vec!["sh".into(), "-c".into(), start.into()],
            stop: stop.clone(),
            start_timeout: Duration::from_secs(secs),
        };
        let e = start(
            &launcher("echo no >&2; exit 3", 5),
            &svc,
            &vars(),
            dir.path(),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("exit status: 3") && e.to_string().contains(": no"),
            "{e}"
        );
        let e = start(&launcher("sleep 10", 1), &svc, &vars(), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(e, LaunchError::Timeout { .. }), "{e}");
        let e = start(&launcher("echo started", 5), &svc, &vars(), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(e, LaunchError::NoReport { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "kv-s1\nkv-s1\nkv-s1\n",
            "every failed start was cleaned up by the stop command"
        );
        let ok = start(
            &launcher("echo '{{\"veth\": \"v{index}\"}}'", 5),
            &svc,
            &vars(),
            dir.path(),
        )
        .await
        .unwrap();
        assert_eq!(ok.veth, "v1");
    }
}
