//! `cargo xtask`: set up the eBPF toolchain, build, lint and test Sluice.
//!
//! Every command that builds first runs `setup`, which installs what a fresh
//! machine lacks and is quick when everything is already there.

mod demo;
mod fuzz;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set-up, lint and test tasks for Sluice", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the XDP program needs (LLVM 22 dev packages,
    /// bpf-linker 0.13, rust-src); only what is missing.
    Setup {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Build the workspace, the XDP program included.
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Check formatting and run clippy in two passes (userspace crates, then
    /// the eBPF crate with `-C panic=abort`).
    Lint {
        /// Reformat instead of checking.
        #[arg(long)]
        fix: bool,
    },
    /// Lint, then run every test: unit tests, and the kernel tests that load
    /// the real XDP program (needs root: BPF and network namespaces).
    Test {
        /// Skip the lint step.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run Sluice on a built-in testbed (namespaces, 4 instances, tagged and
    /// untagged flows) with a live per-instance table: one instance is
    /// throttled and sheds work, then recovers and takes work back from its
    /// busier peers. With `--hosts N`: a cluster of N hosts behind an ECMP
    /// router with etcd, load spreading across hosts. With `--scenario
    /// scale`: the application loader launching instances as the load
    /// steps up and stopping them as it falls. Needs root, no NIC or
    /// config; leaves nothing behind (checked after it); fails if the demo
    /// did not show what it announced.
    Demo {
        /// How long to run, in seconds (at least 30 for the one-host
        /// demos, 8 for a cluster).
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Datagrams per second the traffic generator sends at high load
        /// (default: 8000 on one host, 6000 for a cluster).
        #[arg(long)]
        rate: Option<u64>,
        /// Hosts: 1 (one host, in-process agent) or 2..=6 (a cluster of
        /// real `sluice run` agents and etcd).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=6))]
        hosts: u64,
        /// What the one-host demo shows: `shed` (a throttled instance sheds
        /// work and takes it back) or `scale` (instances launched and stopped with the load;
        /// rate 3000 by default).
        #[arg(long, value_enum, default_value_t = demo::Scenario::Shed)]
        scenario: demo::Scenario,
    },
    /// Benchmarks against their baselines in one run (fast path vs the empty
    /// program, owner-map writes, control loop, memory, the L7 distributor
    /// vs `HAProxy` and nginx); writes
    /// target/bench/bench.md and bench.json. Needs root.
    Bench {
        /// Also build the experiment variants of the XDP program (the
        /// `exp-*` features of `xdp-ebpf`, each taking one part of the
        /// per-packet work out) and measure what each part costs.
        #[arg(long)]
        experiments: bool,
        /// Also build the XDP program of another commit (any git revision,
        /// e.g. `HEAD~1` or `main`) and measure it beside this build on every
        /// packet kind, call by call: a before/after comparison in one run.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        /// Arguments for `sluice-bench` (e.g. `--repeat 1000000`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz the packet parser and key path (`common/fuzz`) with libFuzzer,
    /// one job a core, checking the parser's invariants on every input;
    /// prints executions and crashes, and fails on a crash.
    Fuzz {
        /// How long each job runs, in seconds.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Parallel jobs (default: one a core).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// The deterministic simulation of the control plane: N hosts' real
    /// control loops against a simulated etcd, one seed a run, with faults
    /// the seed picks; checks the invariants I1..I6 after every step. A
    /// failing seed prints the line that replays it and its trace's tail.
    Sim {
        /// How many seeds to run, from --seed on.
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// The first seed (with --seeds 1: replay that run exactly).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Hosts in the simulated cluster.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Each run's length in control intervals (faults heal at 60% of it).
        #[arg(long, default_value_t = 40)]
        intervals: u32,
        /// Fault kinds to choose from, comma-separated, or `all`: crash,
        /// partition, pause, lease, watch, reload, instance, drain, load.
        #[arg(long, default_value = "all")]
        faults: String,
        /// Simulate the lease keeper before its fix: an expired lease is
        /// retried forever instead of replaced (to replay old findings).
        #[arg(long)]
        old_keeper: bool,
        /// Run every seed twice and fail if the two traces differ.
        #[arg(long)]
        check_determinism: bool,
        /// A debug build (slower runs, quicker to build).
        #[arg(long)]
        debug: bool,
    },
    /// Build the Debian package (`target/debian/sluice_VERSION_ARCH.deb`):
    /// /usr/bin/sluice, the systemd unit (Type=notify; not enabled until
    /// the interface is set in /etc/default/sluice), the config under
    /// /etc/sluice, the dashboard, man pages and completions. Installs
    /// cargo-deb first if missing.
    Package {
        /// From a debug build, compressed fast (what the tests install).
        #[arg(long)]
        debug: bool,
    },
    /// Build and run the agent: `cargo xtask run -- run --iface IF --config FILE`.
    Run {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
        /// Arguments for `sluice`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[expect(clippy::too_many_lines, reason = "one match arm per command")]
fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.command {
        Cmd::Setup { check } => {
            let env = setup::ensure(check)?;
            if check && !env.complete() {
                bail!("missing: {}", env.missing.join(", "));
            }
            Ok(())
        }
        Cmd::Build { release } => {
            let env = setup::ensure(false)?;
            cargo(
                &env,
                &["build", "--workspace", "--exclude", "sluice-ebpf"],
                release,
            )
        }
        Cmd::Lint { fix } => {
            let env = setup::ensure(false)?;
            lint(&env, fix)
        }
        Cmd::Test { no_lint, args } => {
            let mut env = setup::ensure(false)?;
            if !no_lint {
                lint(&env, false)?;
            }
            test(&mut env, &root, &args)
        }
        Cmd::Demo {
            seconds,
            rate,
            hosts,
            scenario,
        } => demo::demo(&root, seconds, rate, hosts, scenario),
        Cmd::Bench {
            experiments,
            baseline,
            args,
        } => {
            let mut env = setup::ensure(false)?;
            setup::debian(
                &mut env,
                &["nftables"],
                "nftables",
                "for the end-to-end baselines",
                false,
            )?;
            // IPVS is the closest kernel baseline; where the kernel lacks
            // it (CONFIG_IP_VS), the bench says so instead of measuring.
            if setup::kernel_has_ipvs() {
                setup::debian(
                    &mut env,
                    &["ipvsadm"],
                    "ipvsadm",
                    "for the IPVS end-to-end baseline",
                    false,
                )?;
            } else {
                eprintln!(
                    "[setup] ipvsadm                            not needed: this kernel lacks IPVS"
                );
            }
            // The L7 bench starts its own HAProxy and nginx processes with
            // configs of its own; the packages' services are not used.
            setup::debian(
                &mut env,
                &["haproxy", "nginx", "wrk"],
                "haproxy, nginx and wrk",
                "for the L7 baselines (HAProxy and nginx as reverse proxies, nginx as the backends, wrk as the client)",
                false,
            )?;
            require_root("the benchmarks load XDP programs and create network namespaces")?;
            eprintln!("[bench] building (release)");
            cargo(
                &env,
                &[
                    "build",
                    "--quiet",
                    "--package",
                    "sluice",
                    "--package",
                    "sluice-benches",
                ],
                true,
            )?;
            let mut bench = Command::new(root.join("target/release/sluice-bench"));
            if experiments {
                let dir = build_experiments(&env, &root)?;
                bench.arg("--experiments").arg(dir);
            }
            if let Some(rev) = baseline {
                let object = build_baseline(&env, &root, &rev)?;
                bench.arg("--baseline").arg(object);
            }
            // The cluster benchmark starts real agents: this build's.
            run(bench
                .args(&args)
                .env("SLUICE_BIN", root.join("target/release/sluice")))
        }
        Cmd::Fuzz { secs, jobs } => {
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            });
            fuzz::fuzz(&root, secs, jobs.max(1))
        }
        Cmd::Sim {
            seeds,
            seed,
            hosts,
            intervals,
            faults,
            old_keeper,
            check_determinism,
            debug,
        } => {
            let mut a = vec![
                "--seeds".to_owned(),
                seeds.to_string(),
                "--seed".into(),
                seed.to_string(),
                "--hosts".into(),
                hosts.to_string(),
                "--intervals".into(),
                intervals.to_string(),
                "--faults".into(),
                faults,
            ];
            if old_keeper {
                a.push("--old-keeper".into());
            }
            if check_determinism {
                a.push("--check-determinism".into());
            }
            sim(&a, !debug)
        }
        Cmd::Package { debug } => {
            let mut env = setup::ensure(false)?;
            package::package(&mut env, &root, debug).map(drop)
        }
        Cmd::Run { release, args } => {
            let env = setup::ensure(false)?;
            let mut a = vec!["run", "--package", "sluice", "--"];
            a.extend(args.iter().map(String::as_str));
            cargo(&env, &a, release)
        }
    }
}

/// The tests that need root: the kernel and end-to-end tests of the
/// `sluice-tests` package (`BPF_PROG_TEST_RUN`, network namespaces, the
/// agent as a process). Everything else runs as any user.
const ROOT_TESTS: &str = "sluice-tests";

/// Every test as root; as another user, the unprivileged ones, then an
/// error naming what was left out and why.
fn test(env: &mut setup::Env, root: &Path, args: &[String]) -> anyhow::Result<()> {
    // `cargo test <base> [-- <args>]`.
    let run_tests = |env: &setup::Env, base: &[&str]| {
        let mut a = base.to_vec();
        if !args.is_empty() {
            a.push("--");
            a.extend(args.iter().map(String::as_str));
        }
        cargo(env, &a, false)
    };
    eprintln!("[test] simulation: 3000 seeds of 20 intervals, faults {SIM_SUITE_FAULTS}");
    sim(
        &[
            "--seeds",
            "3000",
            "--intervals",
            "20",
            "--faults",
            SIM_SUITE_FAULTS,
        ]
        .map(String::from),
        true,
    )?;
    if !setup::is_root() {
        eprintln!("[test] not root: running the tests that need no privileges");
        run_tests(env, &["test", "--no-fail-fast"])?;
        bail!(
            "ran only the unprivileged tests; the kernel and end-to-end tests (package {ROOT_TESTS}: \
             BPF_PROG_TEST_RUN, network namespaces, XDP on veths, the agent as a process) need root: \
             run `sudo cargo xtask test`"
        );
    }
    // The process tests run the `sluice` binary itself, and the package
    // test installs the package made of it.
    cargo(env, &["build", "--package", "sluice", "--bins"], false)?;
    let deb = package::package(env, root, true)?;
    // SAFETY: xtask runs no other thread that could read the environment.
    unsafe { std::env::set_var("SLUICE_DEB", &deb) };
    run_tests(
        env,
        &[
            "test",
            "--workspace",
            "--exclude",
            "sluice-ebpf",
            "--no-fail-fast",
        ],
    )
}

/// The simulation's fault kinds the test suite runs: those the code passes
/// today (`sluice::sim::SUITE_FAULTS`); widen as issue 27's fixes land.
const SIM_SUITE_FAULTS: &str = "all";

/// Runs `sluice-sim` with `args`: needs no XDP object, so it builds with
/// the empty stand-in (`AYA_BUILD_SKIP`); optimised, a seed takes ~10x
/// less time than in a debug build.
fn sim(args: &[String], release: bool) -> anyhow::Result<()> {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args([
        "run",
        "--quiet",
        "--package",
        "sluice",
        "--features",
        "sim",
        "--bin",
        "sluice-sim",
    ]);
    if release {
        c.arg("--release");
    }
    c.arg("--").args(args).env("AYA_BUILD_SKIP", "1");
    run(&mut c)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn require_root(why: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Runs cargo with the eBPF toolchain's environment.
pub(crate) fn cargo(env: &setup::Env, args: &[&str], release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args);
    if release {
        // `--release` must come before a `--` separator.
        let at = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(&args[..at]).arg("--release").args(&args[at..]);
    }
    env.apply(&mut cmd);
    run(&mut cmd)
}

/// Builds the XDP program once per `exp-*` feature of `xdp-ebpf` into
/// `target/experiments/<feature>.o`; returns that directory.
fn build_experiments(env: &setup::Env, root: &Path) -> anyhow::Result<PathBuf> {
    let manifest = std::fs::read_to_string(root.join("xdp-ebpf/Cargo.toml"))
        .context("reading xdp-ebpf/Cargo.toml")?;
    let features: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.split_once(" = []").map(|(name, _)| name.trim()))
        .filter(|name| name.starts_with("exp-"))
        .collect();
    let dir = root.join("target/experiments");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (k, feature) in features.iter().enumerate() {
        eprintln!(
            "[bench] experiment build {}/{}: {feature}",
            k + 1,
            features.len()
        );
        build_xdp(
            env,
            root,
            &dir.join("build"),
            Some(feature),
            &dir.join(format!("{feature}.o")),
        )?;
    }
    Ok(dir)
}

/// Builds the XDP program of git revision `rev` (from a temporary worktree
/// of this repository, removed afterwards) into
/// `target/baseline/<commit>.o`; returns that path.
fn build_baseline(env: &setup::Env, root: &Path, rev: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "--verify", "--short=12"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .context("running git rev-parse")?;
    if !out.status.success() {
        bail!(
            "--baseline {rev}: not a commit of this repository ({}); give a revision such as `HEAD~1` or a commit hash",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dir = root.join("target/baseline");
    let object = dir.join(format!("{commit}.o"));
    if object.exists() {
        eprintln!(
            "[bench] baseline {commit}: built before, {}",
            object.display()
        );
        return Ok(object);
    }
    let tree = dir.join(format!("tree-{commit}"));
    if tree.exists() {
        // Left by an interrupted run.
        let _ = Command::new("git")
            .current_dir(root)
            .args(["worktree", "remove", "--force"])
            .arg(&tree)
            .status();
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("[bench] baseline build: {rev} ({commit})");
    run(Command::new("git")
        .current_dir(root)
        .args(["worktree", "add", "--quiet", "--detach"])
        .arg(&tree)
        .arg(&commit))?;
    let built = build_xdp(env, &tree, &dir.join("build"), None, &object);
    // The worktree goes whether or not the build worked.
    let removed = run(Command::new("git")
        .current_dir(root)
        .args(["worktree", "remove", "--force"])
        .arg(&tree));
    built?;
    removed?;
    Ok(object)
}

/// Builds `sluice-xdp` of the workspace at `workspace` (as aya-build builds
/// the real one: release, BTF, `build-std=core`), with an optional feature,
/// in `build_dir`, and copies the object to `to`.
fn build_xdp(
    env: &setup::Env,
    workspace: &Path,
    build_dir: &Path,
    feature: Option<&str>,
    to: &Path,
) -> anyhow::Result<()> {
    let mut c = env.toolchain_cargo();
    c.current_dir(workspace).args([
        "build",
        "--quiet",
        "--package",
        "sluice-ebpf",
        "--bin",
        "sluice-xdp",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    if let Some(f) = feature {
        c.args(["--features", f]);
    }
    c.arg("--target-dir")
        .arg(build_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                std::env::consts::ARCH
            ),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    env.apply(&mut c);
    run(&mut c)?;
    let built = build_dir.join("bpfel-unknown-none/release/sluice-xdp");
    std::fs::copy(&built, to)
        .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let status = cmd
        .status()
        .with_context(|| format!("spawning `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

fn lint(env: &setup::Env, fix: bool) -> anyhow::Result<()> {
    eprintln!("[lint] rustfmt");
    let mut fmt = env.toolchain_cargo();
    fmt.args(["fmt", "--all"]);
    if !fix {
        fmt.args(["--", "--check"]);
    }
    run(&mut fmt).context("formatting differs: run `cargo xtask lint --fix`")?;

    eprintln!("[lint] clippy, userspace crates");
    let mut c = Command::new("cargo");
    c.args([
        "clippy",
        "--workspace",
        "--exclude",
        "sluice-ebpf",
        "--all-targets",
        "--",
        "--deny",
        "warnings",
    ]);
    env.apply(&mut c);
    run(&mut c)?;

    // The eBPF crate is no_std with its own panic handler: lint it for the
    // host with panic=abort, as aya-template does.
    eprintln!("[lint] clippy, eBPF crate");
    let mut c = env.toolchain_cargo();
    c.args([
        "clippy",
        "--package",
        "sluice-ebpf",
        "--all-targets",
        "--",
        "--deny",
        "warnings",
        "-C",
        "panic=abort",
        "-Zpanic_abort_tests",
    ]);
    env.apply(&mut c);
    run(&mut c)
}
