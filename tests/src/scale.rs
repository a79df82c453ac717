//! What the scaling tests and `cargo xtask demo --scenario scale` share: a
//! UDP sink for the netns launcher to run, a scaled service's config, and
//! a guard that takes down what the launcher made.

use std::path::Path;

use crate::testbed::{self, Testbed};

/// A UDP sink for the netns launcher: counts what arrives on `vip:port`
/// and keeps the count in a file (rewritten every 100 ms, and on SIGTERM).
pub const SINK: &str = r"
import os, signal, socket, sys
vip, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((vip, port))
s.settimeout(0.1)
n, stop = 0, False
def term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, term)
def save():
    with open(out + '.tmp', 'w') as f:
        f.write(str(n))
    os.rename(out + '.tmp', out)
save()
while not stop:
    try:
        while True:
            s.recv(2048)
            n += 1
    except socket.timeout:
        pass
    save()
save()
";

/// The count a [`SINK`] of instance `name` keeps in `dir`.
#[must_use]
pub fn sink_count(dir: &Path, name: &str) -> u64 {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A scaled UDP service `service` on port 7000 of the testbed's instance 0
/// (1,000 pps an instance), with `[service.scale]` lines `scale` and the
/// netns launcher running [`SINK`]s that count into `dir`.
#[must_use]
pub fn config(service: &str, dir: &Path, scale: &str, tb: &Testbed, interval_ms: u32) -> String {
    format!(
        "[agent]\ninterval_ms = {interval_ms}\nmax_moves_per_sec = 20\n\n[[service]]\nname = \"{service}\"\nvip = \"{vip}\"\nport = 7000\nprotocol = \"udp\"\nwlm = {{ capacity_pps = 1000, sustain = 2, cooldown_ms = 400, min_group_units = 1024 }}\n\n[service.scale]\n{scale}\nlauncher = {{ kind = \"netns\", command = [\"python3\", \"-c\", {script:?}, \"{{vip}}\", \"{{port}}\", \"{dir}/{{name}}\"], subnet = \"198.18.96.0/24\", routes = [\"198.18.0.0/24\"] }}\n\n{inst}",
        vip = testbed::VIP_V4,
        script = SINK,
        dir = dir.display(),
        inst = tb.instances_toml(0, 1),
    )
}

/// What the netns launcher makes for instances `names` (`sl-NAME`
/// namespaces and the servers in them), taken down on drop, even on panic:
/// a stopped agent leaves its launched instances running for the next one.
pub struct LaunchedGuard(pub Vec<String>);

impl Drop for LaunchedGuard {
    fn drop(&mut self) {
        for n in &self.0 {
            let ns = format!("sl-{n}");
            if !Path::new("/run/netns").join(&ns).exists() {
                continue;
            }
            if let Ok(o) = std::process::Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
            {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: a server the agent started for this test
                        // or demo, in the namespace made for its instance.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .status();
        }
    }
}

/// The launched instances `sluice instance list` shows running, by name.
#[must_use]
pub fn launched_running(sock: &str) -> Vec<String> {
    let out = crate::process::sluice(&["instance", "list", "--api-socket", sock]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" launcher ") && l.contains(" running "))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}
