//! What an operator deploys with: the Debian package (`cargo xtask
//! package`) installed, upgraded and purged with dpkg on this machine, its
//! systemd unit checked by `systemd-analyze`, its binary run on its own
//! config; and the readiness the unit waits for (`Type=notify`), sent by
//! the real agent to a socket of the test's own.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sluice_tests::{netns, process};

/// The package under test: `$SLUICE_DEB` (`cargo xtask test` builds it
/// first), or the newest in target/debian.
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_DEB") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no package in {}: run `cargo xtask package --debug` first (`cargo xtask test` does), or set SLUICE_DEB",
                dir.display()
            )
        })
}

/// Runs `program args`, panicking with its output unless it succeeds;
/// returns stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "sluice"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Purges the package on drop, so a failed test leaves nothing installed.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "sluice"]).output();
    }
}

/// Installed with dpkg: every file where the unit, man and the shells look
/// for it, the binary checks the shipped config, `systemd-analyze verify`
/// accepts the unit; reinstalled over itself (the upgrade path) keeping an
/// edited conffile; purged, nothing of it is left, the state directory
/// included.
#[test]
fn the_package_installs_upgrades_and_purges_cleanly() {
    assert!(sluice_tests::is_root(), "run as root: dpkg installs");
    let deb = deb();
    assert!(
        !installed(),
        "a `sluice` package is installed on this machine: the test installs and purges its own; remove it first (`dpkg --purge sluice`)"
    );
    // /var/lib/sluice is the purge's to remove; an agent run by hand may
    // keep its state there, which this test must not take.
    let state_dir = Path::new("/var/lib/sluice");
    let check_state_purge = !state_dir.exists();
    let _purge = Purge;
    ok("dpkg", &["-i", deb.to_str().expect("utf-8 path")]);
    assert!(installed());

    let files: Vec<String> = ok("dpkg", &["-L", "sluice"])
        .lines()
        .map(str::to_owned)
        .collect();
    for want in [
        "/usr/bin/sluice",
        "/usr/lib/systemd/system/sluice.service",
        "/etc/sluice/sluice.toml",
        "/etc/default/sluice",
        "/usr/share/sluice/dashboards/sluice.json",
        "/usr/share/man/man1/sluice.1.gz",
        "/usr/share/man/man1/sluice-run.1.gz",
        "/usr/share/man/man1/sluice-instance-add.1.gz",
        "/usr/share/bash-completion/completions/sluice",
        "/usr/share/zsh/vendor-completions/_sluice",
        "/usr/share/fish/vendor_completions.d/sluice.fish",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in the package");
        assert!(Path::new(want).exists(), "{want} not installed");
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "sluice"]);
    for c in ["/etc/sluice/sluice.toml", "/etc/default/sluice"] {
        assert!(conffiles.contains(c), "{c} is not a conffile: {conffiles}");
    }

    // The installed binary, on the config it ships with.
    let version = ok("/usr/bin/sluice", &["--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let checked = ok(
        "/usr/bin/sluice",
        &["check-config", "/etc/sluice/sluice.toml"],
    );
    assert!(checked.contains(": ok"), "{checked}");

    // The unit as systemd reads it: a misspelt key, a missing binary or a
    // man page its Documentation= names that `man` cannot find is a line on
    // stderr, even where it exits 0.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/usr/lib/systemd/system/sluice.service"])
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("sluice.service"),
        "systemd-analyze verify: {}\n{said}",
        verify.status
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/sluice.service").expect("unit");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} not in the unit");
    }

    // Man pages are roff, gzipped; bash completes `sluice`.
    let page = ok("zcat", &["/usr/share/man/man1/sluice-run.1.gz"]);
    assert!(
        page.contains("\n.TH sluice-run 1"),
        "not a man page: {}",
        &page[..page.len().min(200)]
    );
    assert!(page.contains(r"\-\-iface"), "sluice-run(1) lacks --iface");
    let complete = ok(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/sluice && complete -p sluice",
        ],
    );
    assert!(complete.contains("sluice"), "{complete}");

    // An upgrade (here: the same version over itself) keeps what the
    // operator edited.
    let edited = "SLUICE_IFACE=sl-test0\nSLUICE_OPTS=\n";
    std::fs::write("/etc/default/sluice", edited).expect("edit");
    ok("dpkg", &["-i", deb.to_str().expect("utf-8 path")]);
    assert_eq!(
        std::fs::read_to_string("/etc/default/sluice").expect("read"),
        edited,
        "the upgrade replaced an edited conffile"
    );

    if check_state_purge {
        std::fs::create_dir_all(state_dir).expect("state dir");
        std::fs::write(state_dir.join("state.json"), "{}").expect("state");
    }
    ok("dpkg", &["--purge", "sluice"]);
    assert!(!installed());
    for f in &files {
        let p = Path::new(f);
        // Directories are shared (/usr/bin); files are the package's.
        assert!(p.is_dir() || !p.exists(), "{f} is left after the purge");
    }
    assert!(!Path::new("/etc/sluice").exists(), "/etc/sluice is left");
    if check_state_purge {
        assert!(
            !state_dir.exists(),
            "/var/lib/sluice is left after the purge"
        );
    }
}

/// Reads the next notification within `within`, or `None`.
fn next_notification(socket: &UnixDatagram, within: Duration) -> Option<String> {
    socket.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The agent as systemd's `Type=notify` service sees it: READY=1 only once
/// the XDP program is attached and the API answers; a reload is bracketed
/// by RELOADING=1 and READY=1; SIGTERM says STOPPING=1.
#[test]
fn readiness_is_sent_once_the_data_path_is_attached() {
    let ns = process::netns("ntfy", 2);
    let config = format!(
        "[agent]\ninterval_ms = 200\n\n[[service]]\nname = \"kv\"\nvip = \"198.18.1.1\"\nport = 7000\nprotocol = \"udp\"\n{}",
        process::instances_toml("kv", 2)
    );
    let pins = process::PinDir::new("ntfy");
    let state = tempfile::tempdir().expect("tempdir");
    let notify_path = state.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    let agent = process::start_with_env(
        &ns,
        &process::Start {
            config: &config,
            pin_dir: &pins.0,
            state: &state.path().join("state.json"),
            cleanup: true,
            metrics_port: 9490,
        },
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    // `start` returns once the API answers; readiness may come a moment
    // later, never before the program is attached.
    let ready =
        next_notification(&notify, Duration::from_secs(30)).expect("no READY=1 within 30 s");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.lines().any(|l| l == "STATUS=steering on nic0"),
        "{ready}"
    );
    let attached = netns::run_in(&ns.0, || sluice::sys::link::xdp_program("nic0")).expect("nic0");
    assert!(
        attached.is_some(),
        "READY=1 before the program was attached"
    );
    assert!(
        sluice::api::call(&agent.socket, &sluice::api::Request::Status {}).is_ok(),
        "READY=1 while the API does not answer"
    );
    assert!(
        next_notification(&notify, Duration::from_millis(300)).is_none(),
        "a second notification with nothing changed"
    );

    agent.hup();
    let reloading = next_notification(&notify, Duration::from_secs(10)).expect("no RELOADING=1");
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let again =
        next_notification(&notify, Duration::from_secs(10)).expect("no READY=1 after the reload");
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");

    let status = agent.stop();
    assert!(status.success(), "{status}");
    let mut stopping = false;
    while let Some(n) = next_notification(&notify, Duration::from_millis(200)) {
        stopping |= n.lines().any(|l| l == "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 at SIGTERM");
}
