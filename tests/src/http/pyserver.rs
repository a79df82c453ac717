//! Python's `http.server` in an instance namespace: a server the tests did
//! not write, with its own idea of HTTP. It speaks HTTP/1.0 and closes the
//! connection after every response, so the distributor must not count on
//! keeping it alive. It serves a directory holding one file, `whoami`, with
//! the instance name (`GET /` lists the directory).

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns;

/// How long Python may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A running `python3 -m http.server`, killed by its pid on drop.
pub struct PyServer {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    /// The served directory and Python's log.
    _dir: tempfile::TempDir,
}

impl PyServer {
    /// Starts `python3 -m http.server` on `addr` inside namespace `netns`
    /// and waits until it accepts connections.
    #[must_use]
    pub fn start(netns: &str, addr: SocketAddr, name: &str) -> Self {
        let accepts = || {
            netns::run_in(netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        };
        // Readiness is "something accepts on addr": make sure it is not
        // something else.
        assert!(
            !accepts(),
            "python http.server for {name}: something already listens on {addr} in {netns}"
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let www = dir.path().join("www");
        fs::create_dir(&www).expect("creating the served directory");
        fs::write(www.join("whoami"), name).expect("writing whoami");
        let log_path = dir.path().join("stderr.log");
        let log = File::create(&log_path).expect("creating Python's log");
        // nsenter execs python (no fork for a network namespace alone): the
        // child's pid is the server's.
        let child = Command::new("nsenter")
            .arg(format!(
                "--net={}",
                sluice::sys::netns::named(netns).display()
            ))
            .args(["python3", "-u", "-m", "http.server"])
            .arg(addr.port().to_string())
            .arg("--bind")
            .arg(addr.ip().to_string())
            .arg("--directory")
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("running nsenter python3 (are util-linux and python3 installed?)");
        let mut server = Self {
            name: name.to_owned(),
            addr,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!(
                    "python http.server for {name} on {addr} in {netns} exited ({status}): {log}"
                );
            }
            if accepts() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "python http.server for {name} not listening on {addr} in {netns} after {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        // Only while it runs: a reaped child's pid may be someone else's.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
