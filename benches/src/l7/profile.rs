//! Where Sluice's HTTP distributor spends its CPU: `perf record` on the
//! agent (all its threads, DWARF call graphs: the release build keeps no
//! frame pointers) during a `wrk` run, folded and drawn as a flame graph
//! with `inferno`, and the heaviest functions printed.

use std::{
    collections::HashMap,
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use inferno::collapse::Collapse as _;

use super::{Scenario, WARM_UP_SECS, bed::Bed};

/// Samples a second; odd, so as not to beat with a periodic timer.
const FREQUENCY: u32 = 499;

/// Profiles the proxy `bed` runs (Sluice) under `wrk` for `secs`; writes
/// `l7-<scenario>.folded` and `.svg` in `dir` and returns the SVG's path.
pub(crate) fn record(
    bed: &Bed,
    wrk_cpu: Option<&str>,
    secs: u32,
    dir: &Path,
    sc: Scenario,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!(
        "l7-{}w-{}",
        sc.workers,
        if sc.keyed { "keyed" } else { "unkeyed" }
    );
    let data = dir.join(format!("{name}.perf.data"));
    let pid = bed.proxy_pid().context("no proxy started")?;
    bed.wrk(wrk_cpu, WARM_UP_SECS)?;
    let perf = Command::new("perf")
        .args(["record", "--quiet", "-F", &FREQUENCY.to_string()])
        .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `perf record` (`apt-get install linux-perf`)")?;
    let run = bed.wrk(wrk_cpu, secs);
    let out = perf.wait_with_output()?;
    run?;
    if !out.status.success() {
        bail!(
            "perf record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let script = Command::new("perf")
        .args(["script", "--no-inline", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    if !script.status.success() {
        bail!("perf script failed ({})", script.status);
    }
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(BufReader::new(&script.stdout[..]), &mut folded)
        .context("folding perf's stacks")?;
    std::fs::write(dir.join(format!("{name}.folded")), &folded)?;
    let text = String::from_utf8_lossy(&folded);
    let svg = dir.join(format!("{name}.svg"));
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = format!("Sluice's HTTP distributor, {}", sc.label());
    inferno::flamegraph::from_lines(
        &mut opt,
        text.lines(),
        std::fs::File::create(&svg).with_context(|| format!("creating {}", svg.display()))?,
    )
    .context("drawing the flame graph")?;
    eprintln!("[bench]   most samples under (inclusive):");
    for (share, what) in heaviest(&text, 25, false) {
        eprintln!("[bench]     {:5.1}%  {what}", share * 100.0);
    }
    eprintln!("[bench]   most samples in (self):");
    for (share, what) in heaviest(&text, 25, true) {
        eprintln!("[bench]     {:5.1}%  {what}", share * 100.0);
    }
    std::fs::remove_file(&data).ok();
    Ok(svg)
}

/// System calls and context switches a request, of the proxy `bed` runs,
/// over a `wrk` run of `secs` (after a warm-up).
pub(crate) fn per_request(
    bed: &Bed,
    wrk_cpu: Option<&str>,
    secs: u32,
) -> anyhow::Result<(f64, f64)> {
    let pid = bed.proxy_pid().context("no proxy started")?;
    bed.wrk(wrk_cpu, WARM_UP_SECS)?;
    let stat = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches",
        ])
        .args(["-p", &pid.to_string(), "--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `perf stat`")?;
    let w = bed.wrk(wrk_cpu, secs)?;
    let out = stat.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let count = |event: &str| -> anyhow::Result<f64> {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
            .with_context(|| format!("no {event} count in perf stat's output: {text}"))
    };
    #[expect(clippy::cast_precision_loss, reason = "a request count")]
    let requests = w.requests.max(1) as f64;
    Ok((
        count("raw_syscalls:sys_enter")? / requests,
        count("context-switches")? / requests,
    ))
}

/// The `n` functions with the most samples under them (each counted once a
/// stack), or in them (`own`: the stack's last frame), as shares of all
/// samples.
fn heaviest(folded: &str, n: usize, own: bool) -> Vec<(f64, String)> {
    let mut total = 0u64;
    let mut under: HashMap<&str, u64> = HashMap::new();
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        total += count;
        let mut seen: Vec<&str> = if own {
            stack.rsplit(';').take(1).collect()
        } else {
            stack.split(';').collect()
        };
        seen.sort_unstable();
        seen.dedup();
        for f in seen {
            *under.entry(f).or_default() += count;
        }
    }
    let mut v: Vec<(u64, &str)> = under.into_iter().map(|(f, c)| (c, f)).collect();
    v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    #[expect(clippy::cast_precision_loss, reason = "sample counts")]
    v.into_iter()
        .take(n)
        .map(|(c, f)| (c as f64 / total.max(1) as f64, f.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heaviest_counts_a_function_once_a_stack() {
        let folded = "main;a;b;a 3\nmain;c 1\n";
        let h = heaviest(folded, 3, false);
        assert_eq!(h[0], (1.0, "main".to_owned()));
        assert_eq!(h[1], (0.75, "a".to_owned()), "a twice in one stack: once");
        assert_eq!(h[2], (0.75, "b".to_owned()));
        let own = heaviest(folded, 2, true);
        assert_eq!(own, [(0.75, "a".to_owned()), (0.25, "c".to_owned())]);
    }
}
