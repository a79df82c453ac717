//! `cargo xtask bench`: Sluice against its baselines, measured in one run
//! on one machine, written as a Markdown table and JSON.
//!
//! - fast path: ns per packet under `BPF_PROG_TEST_RUN` for representative
//!   frames, beside the empty XDP program (the harness floor), in both the
//!   repeat mode (10 million runs a call) and the one-run-per-fresh-frame
//!   mode; at 2, 64 and 4,096 instances, 1 and 256 services, 0 and 1,000,000
//!   pinned flows;
//! - owner-map writes: the mmapped owner array against one `bpf()` syscall
//!   a unit, for groups of 1 to 65,536 units;
//! - the control loop on the namespace testbed: a step change (one instance
//!   throttled) to detection, first move and balance; and a drain;
//! - memory: BPF map memory per service and per pinned flow, and the
//!   agent's resident memory at 1 and 256 services;
//! - L7: HTTP/1.1 requests a second, proxy CPU and latency through Sluice's
//!   HTTP distributor beside `HAProxy` and nginx as reverse proxies, with the
//!   same nginx backends and `wrk` as the client.
//!
//! Benchmarks are not tests: nothing here passes or fails on a number.

mod cluster;
mod control;
mod e2e;
mod fastpath;
mod l7;
mod memory;
mod punt;

use std::{fmt::Write as _, path::PathBuf};

use clap::Parser;
use serde::Serialize;

/// Benchmarks of Sluice against its baselines.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Where to write bench.md and bench.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Runs per call in the repeat mode.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Calls (one run each, on a fresh copy of the frame) in the fresh-frame mode.
    #[arg(long, default_value_t = 100_000)]
    fresh: u32,
    /// Seconds each end-to-end path is driven.
    #[arg(long, default_value_t = 3.0)]
    e2e_seconds: f64,
    /// Seconds of each measured L7 run (`wrk -d`).
    #[arg(long, default_value_t = 10)]
    l7_seconds: u32,
    /// Another `sluice` binary (a build of another commit), measured in
    /// the L7 table beside this one, in the same interleaved rounds.
    #[arg(long)]
    l7_baseline: Option<PathBuf>,
    /// Also profile Sluice's HTTP distributor (`perf record`, one more run
    /// a scenario) and write its flame graphs (SVG) and folded stacks here.
    #[arg(long)]
    l7_profile: Option<PathBuf>,
    /// With `--l7-profile`: only the profiles, no measured rounds (the
    /// table stays empty).
    #[arg(long, requires = "l7_profile")]
    l7_profile_only: bool,
    /// Run only these parts (default: all): fast-path, e2e, cluster, punt,
    /// control, memory, l7.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Experiment builds of the XDP program (`<feature>.o`), measured
    /// beside the full one: `cargo xtask bench --experiments` builds them
    /// and passes this.
    #[arg(long)]
    experiments: Option<PathBuf>,
    /// The program built from another commit (`sluice-xdp` object), measured
    /// beside this build on every packet kind with the same interleaving:
    /// `cargo xtask bench --baseline REV` builds it and passes this.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// With `--experiments` or `--baseline`: measure only those, not the
    /// rest of the fast-path tables.
    #[arg(long, alias = "experiments-only")]
    variants_only: bool,
    /// The `sluice` binary whose resident memory and HTTP distributor are
    /// measured (default: `$SLUICE_BIN`, else next to this one).
    #[arg(long)]
    sluice: Option<PathBuf>,
}

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    fast_path: Option<fastpath::Figures>,
    e2e: Vec<e2e::Row>,
    /// The e2e generators' own CPU per frame (ns), as subtracted.
    e2e_generator_alone_ns: e2e::Calibration,
    e2e_seconds: f64,
    cross_host: Vec<cluster::Row>,
    punt: Vec<punt::Row>,
    control: Option<control::Figures>,
    memory: Option<memory::Figures>,
    l7: Vec<l7::Row>,
    l7_seconds: u32,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        kernel,
    }
}

fn main() -> std::process::ExitCode {
    match run(&Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The `sluice` binary to measure: `--sluice`, else `$SLUICE_BIN` (as
/// `cargo xtask bench` sets it), else next to this one.
fn sluice_bin(args: &Args) -> PathBuf {
    args.sluice
        .clone()
        .or_else(|| std::env::var_os("SLUICE_BIN").map(PathBuf::from))
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("sluice")))
                .unwrap_or_else(|| PathBuf::from("sluice"))
        })
}

fn run(args: &Args) -> anyhow::Result<()> {
    let m = machine();
    eprintln!("[bench] {} — {} cores — Linux {}", m.cpu, m.cores, m.kernel);
    let want = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    let fast_path = if want("fast-path") {
        eprintln!(
            "[bench] fast path ({} runs a call in the repeat mode; {} fresh frames a row)",
            args.repeat, args.fresh
        );
        Some(fastpath::run(
            args.repeat,
            args.fresh,
            args.experiments.as_deref(),
            args.baseline.as_deref(),
            args.variants_only,
        )?)
    } else {
        None
    };
    let (e2e, e2e_generator_alone_ns) = if want("e2e") {
        eprintln!("[bench] end to end: Sluice against IPVS and nftables on the namespace testbed");
        e2e::run_all(args.e2e_seconds)?
    } else {
        (Vec::new(), Vec::new())
    };
    let cross_host = if want("cluster") {
        eprintln!("[bench] cross-host delivery on the namespace cluster");
        cluster::run(args.e2e_seconds)?
    } else {
        Vec::new()
    };
    let punt = if want("punt") {
        eprintln!("[bench] punt path");
        punt::run()?
    } else {
        Vec::new()
    };
    let control = if want("control") {
        eprintln!("[bench] control loop on the namespace testbed");
        Some(control::run()?)
    } else {
        None
    };
    let memory = if want("memory") {
        eprintln!("[bench] memory");
        Some(memory::run(&sluice_bin(args))?)
    } else {
        None
    };
    let l7 = if want("l7") {
        eprintln!(
            "[bench] L7: HTTP/1.1 through Sluice, HAProxy and nginx on the namespace testbed"
        );
        l7::run(
            &sluice_bin(args),
            args.l7_seconds,
            args.l7_baseline.as_deref(),
            args.l7_profile.as_deref(),
            args.l7_profile_only,
        )?
    } else {
        Vec::new()
    };
    let report = Report {
        machine: m,
        fast_path,
        e2e,
        e2e_generator_alone_ns,
        e2e_seconds: args.e2e_seconds,
        cross_host,
        punt,
        control,
        memory,
        l7,
        l7_seconds: args.l7_seconds,
    };
    let md = markdown(&report);
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("bench.md"), &md)?;
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    println!("{md}");
    eprintln!(
        "[bench] wrote {}/bench.md and bench.json",
        args.out.display()
    );
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}, {} cores, Linux {}. Command: `cargo xtask bench`.\n",
        r.machine.cpu, r.machine.cores, r.machine.kernel
    );
    if let Some(f) = &r.fast_path {
        fastpath::markdown(&mut s, f);
    }
    e2e::table(&mut s, &r.e2e, &r.e2e_generator_alone_ns, r.e2e_seconds);
    cross_host_table(&mut s, &r.cross_host);
    punt_table(&mut s, &r.punt);
    if let Some(c) = &r.control {
        control_table(&mut s, c);
    }
    if let Some(mm) = &r.memory {
        memory_table(&mut s, mm, r.machine.cores);
    }
    l7::table(&mut s, &r.l7, r.l7_seconds);
    s
}

fn control_table(s: &mut String, c: &control::Figures) {
    let _ = writeln!(
        s,
        "\n#### Control loop (namespace testbed, {} ms intervals, sustain {})\n",
        c.interval_ms, c.sustain
    );
    let _ = writeln!(s, "| what | time |");
    let _ = writeln!(s, "| --- | ---: |");
    let _ = writeln!(
        s,
        "| step change (one of 3 instances throttled) → overload seen | {:.2} s |",
        c.detect_s
    );
    let _ = writeln!(
        s,
        "| overload seen → first split written to the map | {:.2} s |",
        c.decide_s
    );
    let _ = writeln!(
        s,
        "| step change → loads within tolerance (nobody over 0.8, no drops, 2 s calm) | {:.2} s ({} moves) |",
        c.balance_s, c.moves
    );
    let _ = writeln!(
        s,
        "| drain an instance through the control loop, as `sluice drain` ({} groups, {} moves/s limit) | {:.2} s |",
        c.drain_groups, c.drain_rate, c.drain_s
    );
}

fn memory_table(s: &mut String, mm: &memory::Figures, cores: usize) {
    let _ = writeln!(s, "\n#### Memory\n");
    let _ = writeln!(s, "| what | bytes |");
    let _ = writeln!(s, "| --- | ---: |");
    let _ = writeln!(
        s,
        "| BPF maps per service (owner array, counters, unit hits; {} CPUs) | {} |",
        cores, mm.per_service_bytes
    );
    let _ = writeln!(
        s,
        "| BPF map per pinned flow (LRU, preallocated) | {:.0} |",
        mm.per_pinned_flow_bytes
    );
    let _ = writeln!(
        s,
        "| all BPF maps, 1 service, 1,048,576 pinned flows | {} |",
        mm.maps_1_service_bytes
    );
    for (n, (all, anon)) in [
        (1, mm.agent_rss_1_service),
        (256, mm.agent_rss_256_services),
    ] {
        let _ = writeln!(
            s,
            "| agent resident memory, {n} service(s): all (with the mapped owner array) / anonymous | {all} / {anon} |"
        );
    }
    let p = &mm.syn_pins;
    let _ = writeln!(
        s,
        "\n#### Pins made by SYNs (`BPF_PROG_TEST_RUN`, one SYN of a new 5-tuple a run, pinning TCP service, LRU of {} flows)\n",
        p.capacity
    );
    let _ = writeln!(s, "| what | figure |");
    let _ = writeln!(s, "| --- | ---: |");
    let _ = writeln!(
        s,
        "| SYNs run / redirected (pinned) | {} / {} |",
        p.syns, p.redirected
    );
    let _ = writeln!(
        s,
        "| the program's time a SYN (pin created) | {:.0} ns: {:.2} million pins a second on one core |",
        p.program_ns_per_syn,
        1e3 / p.program_ns_per_syn.max(1e-3)
    );
    let _ = writeln!(
        s,
        "| SYNs a second through the whole loop (frame built, syscall, program) | {:.0} |",
        p.wall_syns_per_sec
    );
    let _ = writeln!(
        s,
        "| the program's time a SYN, by tenth of the run (ns) | {} |",
        p.tenths_ns
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "| pins in the map after the run (fewer than the SYNs: the LRU evicted early) | {} ({} evicted) |",
        p.entries_after,
        p.redirected.saturating_sub(p.entries_after)
    );
}

/// Cross-host delivery beside local delivery.
fn cross_host_table(s: &mut String, rows: &[cluster::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Cross-host delivery (namespace cluster: router, 2 hosts, the VIP routed to host 0; UDP from 128 sockets)\n"
    );
    let _ = writeln!(s, "| path | generated pps | delivered pps |");
    let _ = writeln!(s, "| --- | ---: | ---: |");
    for c in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} |",
            c.path, c.generated_pps, c.delivered_pps
        );
    }
}

/// The punt path, one row per case and store.
fn punt_table(s: &mut String, rows: &[punt::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Punt path (a backlog of punted frames: off the AF_XDP socket, claimed, re-injected, in one `process_punts` call; the agent's loop serves nothing else meanwhile)\n"
    );
    let _ = writeln!(
        s,
        "| case | store | frames | claims | store writes | seconds (loop blocked) | frames per second | ms per claim |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for p in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.3} |",
            p.case,
            p.store,
            p.frames,
            p.claims,
            p.store_writes,
            p.seconds,
            p.frames_per_second,
            p.ms_per_claim
        );
    }
}
