//! A real etcd server (Debian's `etcd-server`, installed by `cargo xtask
//! setup`) for the cluster tests: started inside a network namespace of the
//! test's own, on an address of the test's own, its data in a temporary
//! directory; stopped by its pid on drop.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::{Netns, ip};

/// Client port; the peer port is the next one.
pub const CLIENT_PORT: u16 = 2379;

/// An etcd server a test started.
pub struct Etcd {
    child: Option<Child>,
    ns: String,
    addr: IpAddr,
    dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `etcd` binary: `$SLUICE_ETCD`, else the one on PATH.
fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_ETCD") {
        return PathBuf::from(p);
    }
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("etcd"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("etcd not found: `cargo xtask setup` installs it (Debian's etcd-server), or set SLUICE_ETCD")
    })
}

/// A future an etcd client's user returns (see [`with_client`]).
pub type ClientFuture<T> = std::pin::Pin<Box<dyn Future<Output = T>>>;

/// Runs `f` with an etcd client made with `opts`, on a runtime of its own
/// on a thread inside namespace `ns`: every connection the client makes
/// (reconnections too) is made there.
pub fn with_client<T: Send + 'static>(
    ns: &str,
    opts: sluice::coord::EtcdOptions,
    f: impl FnOnce(std::sync::Arc<sluice::coord::EtcdStore>) -> ClientFuture<T> + Send + 'static,
) -> T {
    crate::netns::spawn_in(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async move {
                let s = std::sync::Arc::new(
                    sluice::coord::EtcdStore::connect(&opts)
                        .await
                        .expect("etcd client"),
                );
                f(s).await
            })
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A namespace of its own with `addr` on its loopback, for tests that need
/// only the store.
#[must_use]
pub fn netns_with(tag: &str, addr: IpAddr) -> Netns {
    assert!(crate::is_root(), "run as root: the test creates namespaces");
    let ns = Netns(format!("sl-{tag}-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    let plen = if addr.is_ipv4() { 32 } else { 128 };
    ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{addr}/{plen}"),
        "dev",
        "lo",
    ]);
    ns
}

impl Etcd {
    /// Starts etcd in namespace `ns` on `addr` (an address of `ns`) and
    /// waits until it accepts connections.
    #[must_use]
    pub fn start(ns: &str, addr: IpAddr) -> Self {
        let mut e = Self {
            child: None,
            ns: ns.to_owned(),
            addr,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        e.restart();
        e
    }

    /// `http://addr:port`, as `cluster.etcd_endpoints` names it.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", SocketAddr::new(self.addr, CLIENT_PORT))
    }

    /// Stops the server (SIGTERM, by its pid); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the child this test started.
            unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts the server again on its data (or the first time).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd already runs");
        let url = |port: u16| format!("http://{}", SocketAddr::new(self.addr, port));
        let client = url(CLIENT_PORT);
        let peer = url(CLIENT_PORT + 1);
        // nsenter keeps this process's mounts; etcd needs nothing else.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(etcd_bin())
            .args(["--name", "sluice-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sluice-test={peer}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let target = SocketAddr::new(self.addr, CLIENT_PORT);
        let t = Instant::now();
        let up = || {
            crate::netns::run_in(&self.ns, || {
                TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })
        };
        while !up() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("etcd exited at start ({st})");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "etcd did not come up on {target}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
