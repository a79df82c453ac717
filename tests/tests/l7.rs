//! The L7 distributor end to end: the real `sluice run` in a testbed's host
//! namespace, real HTTP servers in the instances, real clients in the
//! client namespace, requests to the VIP.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    process::{self, Agent, PinDir},
    testbed::{NIC, Testbed},
};

/// Port the instances' servers listen on.
const PORT: u16 = 8080;

struct Running {
    agent: Agent,
    _pins: PinDir,
    _state: tempfile::TempDir,
}

fn testbed(tag: &str, n: usize) -> Testbed {
    Testbed::new(tag, n).unwrap_or_else(|e| panic!("building the testbed: {e}"))
}

/// An http service `web` on 198.18.1.1:80 over the testbed's instances
/// (`web-<k>`), `http` being the body of its `[service.http]` table and
/// `extra` more TOML at the end (priority rules).
fn config(tb: &Testbed, http: &str, extra: &str) -> String {
    let mut c = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"web\"\nvip = \"198.18.1.1\"\nport = 80\nprotocol = \"tcp\"\nlayer = \"http\"\n\
         # Idle instances would merge their groups while the test looks.\n\
         wlm = {{ underload = 0.0 }}\n\n[service.http]\n{http}\n\n{extra}\n"
    );
    for (k, i) in tb.instances.iter().enumerate() {
        let _ = write!(
            c,
            "[[service.instance]]\nname = \"web-{k}\"\nveth = \"{}\"\nnetns = \"{}\"\naddr = \"{}:{PORT}\"\n\n",
            i.veth, i.netns, i.addr_v4
        );
    }
    c
}

fn start(tb: &Testbed, tag: &str, config: &str) -> Running {
    let pins = PinDir::new(tag);
    let state = tempfile::tempdir().expect("tempdir");
    let agent = process::start_on(
        &tb.host,
        NIC,
        &process::Start {
            config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9480,
        },
    );
    Running {
        agent,
        _pins: pins,
        _state: state,
    }
}

/// Python's `http.server` in an instance, serving `whoami` (its name);
/// stopped by its pid on drop.
struct PyServer(std::process::Child, tempfile::TempDir);

impl PyServer {
    fn start(netns: &str, addr: std::net::Ipv4Addr, name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("whoami"), name).expect("whoami");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["python3", "-m", "http.server", &PORT.to_string(), "--bind"])
            .arg(addr.to_string())
            .arg("--directory")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3");
        let s = Self(child, dir);
        let t = Instant::now();
        while sluice_tests::netns::run_in(netns, || {
            std::net::TcpStream::connect((addr, PORT)).is_err()
        }) {
            assert!(t.elapsed() < Duration::from_secs(10), "python http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` in the client namespace: (status, body).
fn curl(tb: &Testbed, args: &[&str]) -> (u16, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.client))
        .args(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn curl_through_python_servers_keeps_each_user_on_one_instance() {
    let tb = testbed("l7py", 2);
    let _servers: Vec<PyServer> = tb
        .instances
        .iter()
        .enumerate()
        .map(|(k, i)| PyServer::start(&i.netns, i.addr_v4, &format!("web-{k}")))
        .collect();
    let c = config(&tb, "key = { header = \"X-User\" }", "");
    let run = start(&tb, "l7py", &c);
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..2 {
        for u in 0..20 {
            let user = format!("X-User: user-{u}");
            let (code, body) = curl(&tb, &["-H", &user, "http://198.18.1.1/whoami"]);
            assert_eq!(code, 200, "round {round} {user}: {body}\n{}", run.agent.log());
            seen.entry(user).or_default().insert(body);
        }
    }
    for (user, on) in &seen {
        assert_eq!(on.len(), 1, "{user} went to {on:?}");
    }
    let used: HashSet<&String> = seen.values().flatten().collect();
    assert_eq!(used.len(), 2, "20 users all on {used:?}");
}
