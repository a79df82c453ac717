//! `cargo xtask fuzz`: the parser's fuzz target (`common/fuzz`) under
//! libFuzzer, one job a core, starting from `common/fuzz/seeds.txt`.
//!
//! The target is built the way cargo-fuzz builds one (coverage counters
//! and comparison tracing, debug assertions and overflow checks on, for
//! the host target only so build scripts stay uninstrumented), without
//! needing cargo-fuzz itself.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup;

const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// Longest input: a spec and a jumbo-less Ethernet frame.
const MAX_LEN: &str = "1600";

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host")
}

/// Builds the target, runs `jobs` fuzzers for `secs` seconds, and reports
/// executions and crashes; fails if anything crashed.
pub(crate) fn fuzz(root: &Path, secs: u64, jobs: usize) -> anyhow::Result<()> {
    let mut env = setup::Env::host_only();
    setup::debian(
        &mut env,
        &["g++"],
        "C++ compiler",
        "to build libFuzzer",
        false,
    )?;
    let triple = host_triple()?;
    let dir = root.join("target/fuzz");
    let bin = build(root, &dir, &triple)?;
    let corpus = dir.join("corpus");
    let artifacts = dir.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    seed(root, &corpus)?;
    let before: Vec<_> = std::fs::read_dir(&artifacts)?
        .flatten()
        .map(|e| e.path())
        .collect();
    eprintln!(
        "[fuzz] {jobs} jobs for {secs} s, corpus {}",
        corpus.display()
    );
    let start = Instant::now();
    let statuses = run_jobs(&bin, &dir, secs, jobs)?;
    let mut runs = 0u64;
    for j in 0..jobs {
        let log = std::fs::read_to_string(dir.join(format!("job-{j}.log")))?;
        runs += log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    let crashes: Vec<_> = std::fs::read_dir(&artifacts)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| !before.contains(p))
        .collect();
    let failed = statuses.iter().filter(|s| !s.success()).count();
    println!(
        "fuzzed the parser and key path: {runs} executions in {} s over {jobs} jobs, {} crashes",
        start.elapsed().as_secs(),
        crashes.len()
    );
    if !crashes.is_empty() || failed > 0 {
        bail!(
            "{} crash inputs ({}), {failed} jobs failed; logs in {}",
            crashes.len(),
            crashes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// Builds the instrumented target; returns the binary.
fn build(root: &Path, dir: &Path, triple: &str) -> anyhow::Result<PathBuf> {
    eprintln!("[fuzz] building common/fuzz (release, instrumented)");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("common/fuzz/Cargo.toml"))
        .args(["--target", triple, "--target-dir"])
        .arg(dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the fuzz target failed: {status}");
    }
    Ok(dir.join(triple).join("release/parse"))
}

/// Writes the seeds of `common/fuzz/seeds.txt` into `corpus`.
fn seed(root: &Path, corpus: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(corpus)?;
    let seeds = std::fs::read_to_string(root.join("common/fuzz/seeds.txt"))?;
    for (i, line) in seeds
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .enumerate()
    {
        let bytes = hex(line.trim()).with_context(|| format!("seeds.txt: seed {i}"))?;
        std::fs::write(corpus.join(format!("seed-{i}")), bytes)?;
    }
    Ok(())
}

/// Runs `jobs` fuzzers over the corpus in `dir` for `secs` seconds, each
/// logging to `dir/job-J.log`, showing progress; returns how each ended.
fn run_jobs(bin: &Path, dir: &Path, secs: u64, jobs: usize) -> anyhow::Result<Vec<ExitStatus>> {
    let mut children = Vec::new();
    for j in 0..jobs {
        let log = std::fs::File::create(dir.join(format!("job-{j}.log")))?;
        let mut prefix = std::ffi::OsString::from("-artifact_prefix=");
        prefix.push(dir.join("artifacts"));
        prefix.push("/");
        let child = Command::new(bin)
            .arg(dir.join("corpus"))
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg("-print_final_stats=1")
            .arg(format!("-seed={}", j + 1))
            .arg(prefix)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        children.push(child);
    }
    let start = Instant::now();
    let mut statuses = vec![None; jobs];
    while statuses.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_secs(1));
        for (c, s) in children.iter_mut().zip(&mut statuses) {
            if s.is_none() {
                *s = c.try_wait()?;
            }
        }
        let t = start.elapsed().as_secs();
        if t.is_multiple_of(10) && t > 0 {
            eprintln!("[fuzz] {t}/{secs} s");
        }
    }
    Ok(statuses.into_iter().flatten().collect())
}

fn hex(s: &str) -> anyhow::Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex"))
        .collect()
}
