//! `cargo xtask setup`: installs what building the XDP program needs, and
//! only what is missing, so it is quick when everything is in place.
//!
//! - `bpf-linker` 0.13 (links the BPF object; built against LLVM 22, the
//!   LLVM of the rustc that compiles the program), which in turn needs the
//!   Debian packages `llvm-22-dev`, `libpolly-22-dev`, `zlib1g-dev` and
//!   `libzstd-dev` to build;
//! - the `rust-src` component of the toolchain that builds the program
//!   (`-Z build-std=core`): nightly when installed, else stable with
//!   `RUSTC_BOOTSTRAP=1`;
//! - bpffs mounted at /sys/fs/bpf (for pinned maps);
//! - `protoc` with the well-known protobuf types (the etcd client's build
//!   compiles etcd's API with it) and `etcd` (the cluster tests run a real
//!   one): Debian's `protobuf-compiler`, `libprotobuf-dev`, `etcd-server`;
//! - what the tests run as real parts: `curl` and `python3` (the L7
//!   tests' client and server), `nft` (the fault tests' partitions);
//! - for `cargo xtask package` (and the package test) only: `cargo-deb`,
//!   `dpkg-dev`, `systemd` and `man-db` ([`packaging`]).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13";
const CARGO_DEB_VERSION: &str = "3.8.0";
const BPF_LINKER_CRATE: &str = "bpf-linker@0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// The etcd client's build needs protoc and the well-known types; the
/// cluster tests start etcd themselves (the package's own service is not
/// used, and on hosts without an init system it does not start).
const CLUSTER_PACKAGES: [&str; 3] = ["protobuf-compiler", "libprotobuf-dev", "etcd-server"];

/// The L7 tests' real client and real server: curl, and Python's
/// `http.server` in an instance.
const HTTP_TEST_PACKAGES: [&str; 2] = ["curl", "python3"];

/// The cluster fault tests cut a host off from etcd with nftables in its
/// namespace.
const FAULT_TEST_PACKAGES: [&str; 1] = ["nftables"];

/// What the build needs to know about the eBPF toolchain.
pub(crate) struct Env {
    /// Toolchain that builds the eBPF crate (`nightly` or `stable`).
    pub(crate) toolchain: String,
    /// Stable toolchain: unlock `-Z build-std` with `RUSTC_BOOTSTRAP=1`.
    pub(crate) bootstrap: bool,
    /// Where `cargo install` puts binaries (bpf-linker).
    pub(crate) cargo_bin: PathBuf,
    /// Pieces found missing in `--check` mode.
    pub(crate) missing: Vec<String>,
}

impl Env {
    /// For tasks that build no eBPF (the fuzz target): the default
    /// toolchain, nothing checked yet.
    pub(crate) fn host_only() -> Self {
        Self {
            toolchain: String::new(),
            bootstrap: false,
            cargo_bin: cargo_bin(),
            missing: Vec::new(),
        }
    }

    pub(crate) fn complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// Sets the variables the userspace build script reads.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        cmd.env("SLUICE_EBPF_TOOLCHAIN", &self.toolchain);
        if self.bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd.env("PATH", path_with(&self.cargo_bin));
    }

    /// `cargo` of the eBPF toolchain.
    pub(crate) fn toolchain_cargo(&self) -> Command {
        let mut c = Command::new("rustup");
        c.args(["run", &self.toolchain, "cargo"]);
        c
    }
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn path_with(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_owned()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()).filter(|p| p != dir));
    env::join_paths(paths).expect("PATH entries are valid")
}

fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str, state: &str) {
    eprintln!("[setup] {what:<34} {state}");
}

/// Ensures every piece is there, installing what is missing (unless
/// `check_only`, which only records it).
pub(crate) fn ensure(check_only: bool) -> anyhow::Result<Env> {
    let mut env = Env {
        toolchain: String::new(),
        bootstrap: false,
        cargo_bin: cargo_bin(),
        missing: Vec::new(),
    };
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!(
            "rustup not found: Sluice builds its XDP program with a rustup-managed toolchain (https://rustup.rs)"
        );
    }

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        env.toolchain = "nightly".into();
        step("eBPF toolchain", "nightly");
    } else {
        env.toolchain = "stable".into();
        env.bootstrap = true;
        step(
            "eBPF toolchain",
            "stable with RUSTC_BOOTSTRAP=1 (no nightly installed)",
        );
    }

    rust_src(&mut env, check_only)?;
    bpf_linker(&mut env, check_only)?;
    bpffs(&mut env, check_only)?;
    debian(
        &mut env,
        &CLUSTER_PACKAGES,
        "protoc and etcd",
        "protoc builds the etcd client; the cluster tests run etcd",
        check_only,
    )?;
    debian(
        &mut env,
        &HTTP_TEST_PACKAGES,
        "curl and python3",
        "the L7 tests run them as a real client and a real server",
        check_only,
    )?;
    debian(
        &mut env,
        &FAULT_TEST_PACKAGES,
        "nft",
        "the cluster fault tests partition a host with it",
        check_only,
    )?;
    Ok(env)
}

fn rust_src(env: &mut Env, check_only: bool) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &env.toolchain,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src", "ok");
        return Ok(());
    }
    if check_only {
        step("rust-src", "MISSING");
        env.missing.push(format!("rust-src for {}", env.toolchain));
        return Ok(());
    }
    step(
        "rust-src",
        "installing: -Z build-std=core compiles core for the BPF target from it",
    );
    let status = Command::new("rustup")
        .args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &env.toolchain,
        ])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!(
            "installing rust-src failed; run `rustup component add rust-src --toolchain {}` and retry",
            env.toolchain
        );
    }
    Ok(())
}

fn bpf_linker_ok(env: &Env) -> bool {
    let mut c = Command::new("bpf-linker");
    c.arg("--version").env("PATH", path_with(&env.cargo_bin));
    output(&mut c).is_some_and(|v| {
        v.split_whitespace().nth(1).is_some_and(|ver| {
            ver == BPF_LINKER_VERSION || ver.starts_with(&format!("{BPF_LINKER_VERSION}."))
        })
    })
}

fn bpf_linker(env: &mut Env, check_only: bool) -> anyhow::Result<()> {
    if bpf_linker_ok(env) {
        step("bpf-linker", &format!("ok ({BPF_LINKER_VERSION})"));
        return Ok(());
    }
    // LLVM's dev files are needed only to build bpf-linker.
    debian_packages(env, check_only)?;
    if check_only {
        step("bpf-linker", "MISSING");
        env.missing.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        return Ok(());
    }
    step(
        "bpf-linker",
        "building 0.13 against LLVM 22 (links the XDP program; takes a few minutes)",
    );
    let status = Command::new("cargo")
        .args([
            "install",
            BPF_LINKER_CRATE,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // Point both bpf-linker's and llvm-sys's build scripts at LLVM 22,
        // not at whatever llvm-config is first on PATH.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path_with(&Path::new(LLVM_PREFIX).join("bin")))
        .status()
        .context("running cargo install")?;
    if !status.success() || !bpf_linker_ok(env) {
        bail!(
            "building bpf-linker failed; with LLVM 22 dev files in {LLVM_PREFIX}, run \
             `LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install {BPF_LINKER_CRATE} \
             --locked --no-default-features --features llvm-22`"
        );
    }
    Ok(())
}

fn debian_packages(env: &mut Env, check_only: bool) -> anyhow::Result<()> {
    debian(
        env,
        &DEBIAN_PACKAGES,
        "LLVM 22 dev packages",
        "to build bpf-linker",
        check_only,
    )
}

/// Installs the Debian packages among `pkgs` that are missing.
pub(crate) fn debian(
    env: &mut Env,
    pkgs: &[&str],
    what: &str,
    why: &str,
    check_only: bool,
) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(what, "ok");
        return Ok(());
    }
    let list = missing.join(" ");
    if check_only {
        step(what, &format!("MISSING: {list}"));
        env.missing.extend(missing.iter().map(ToString::to_string));
        return Ok(());
    }
    let has_apt = output(Command::new("apt-get").arg("--version")).is_some();
    if !has_apt {
        bail!(
            "{what} missing ({list}), needed {why}; this is not a Debian system: install their equivalents \
             (for LLVM: version 22 with its dev files and Polly under {LLVM_PREFIX}), then retry"
        );
    }
    if !is_root() {
        bail!(
            "missing Debian packages {list} (needed {why}); run `sudo apt-get install -y {list}` and retry"
        );
    }
    step(what, &format!("installing {list} ({why})"));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed; install {list} by hand and retry",
                args.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)
}

/// Whether the kernel has IPVS: built in or loaded (`/proc/net/ip_vs`), or
/// a module that loads.
pub(crate) fn kernel_has_ipvs() -> bool {
    let present = || Path::new("/proc/net/ip_vs").exists();
    if !present() && is_root() {
        let _ = Command::new("modprobe")
            .args(["-q", "ip_vs"])
            .stderr(Stdio::null())
            .status();
    }
    present()
}

fn bpffs(env: &mut Env, check_only: bool) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.next() == Some("bpf") || (f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf"))
    }) {
        step("bpffs at /sys/fs/bpf", "ok");
        return Ok(());
    }
    if check_only || !is_root() {
        step(
            "bpffs at /sys/fs/bpf",
            "not mounted (`mount -t bpf bpf /sys/fs/bpf` as root)",
        );
        if check_only {
            env.missing.push("bpffs at /sys/fs/bpf".into());
        }
        return Ok(());
    }
    step("bpffs at /sys/fs/bpf", "mounting (pinned maps live there)");
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting bpffs failed; run `mount -t bpf bpf /sys/fs/bpf` as root");
    }
    Ok(())
}

/// cargo-deb, which `cargo xtask package` builds the Debian package with
/// (chosen over a hand-written `dpkg-deb` tree: it writes the systemd
/// maintainer scripts as debhelper does, the conffiles and the shared
/// library dependencies). Its `$auto` dependencies need `dpkg-shlibdeps`
/// (dpkg-dev); the package test verifies the unit with `systemd-analyze`
/// (systemd), which looks up the unit's man pages (man-db).
pub(crate) fn packaging(env: &mut Env) -> anyhow::Result<()> {
    debian(
        env,
        &["dpkg-dev", "systemd", "man-db"],
        "dpkg-dev, systemd and man-db",
        "dpkg-shlibdeps finds the package's dependencies; systemd-analyze checks its unit and the man pages it names",
        false,
    )?;
    let ok = |env: &Env| {
        let mut c = Command::new("cargo-deb");
        c.arg("--version").env("PATH", path_with(&env.cargo_bin));
        output(&mut c).is_some_and(|v| v.split_whitespace().nth(1) == Some(CARGO_DEB_VERSION))
    };
    if ok(env) {
        step("cargo-deb", &format!("ok ({CARGO_DEB_VERSION})"));
        return Ok(());
    }
    step(
        "cargo-deb",
        &format!("installing {CARGO_DEB_VERSION} (builds the Debian package; a minute or two)"),
    );
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("cargo-deb@{CARGO_DEB_VERSION}"),
            "--locked",
        ])
        .status()
        .context("running cargo install")?;
    if !status.success() || !ok(env) {
        bail!(
            "installing cargo-deb failed; run `cargo install cargo-deb@{CARGO_DEB_VERSION} --locked` and retry"
        );
    }
    Ok(())
}
