//! `sluice-sim`: runs the deterministic simulation of the control plane
//! over many seeds (`cargo xtask sim`); a failing seed prints the line
//! that replays it and the tail of its trace.

use std::{collections::BTreeMap, io::Write as _, process::ExitCode, time::Instant};

use clap::Parser;
use sluice::{
    coord::sim_store::Rejoin,
    sim::{self, FaultKind, Invariant, Options},
};

#[derive(Parser)]
#[command(about = "Deterministic simulation of Sluice's control plane: N hosts, one seed a run")]
struct Args {
    /// How many seeds to run (from --seed on).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed (alone: replays that run, trace tail printed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hosts in the simulated cluster.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Each run's length in control intervals (faults heal at 60% of it).
    #[arg(long, default_value_t = 40)]
    intervals: u32,
    /// Fault kinds the seeds choose from, comma-separated, or `all`:
    /// crash, partition, pause, lease, watch, reload, instance, drain, load.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Simulate the lease keeper before its fix: an expired lease is
    /// retried forever instead of replaced (to replay old findings).
    #[arg(long)]
    old_keeper: bool,
    /// Run each seed twice and fail if the traces differ.
    #[arg(long)]
    check_determinism: bool,
    /// Print every failing seed's trace tail, not only the first's.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let faults = match FaultKind::parse_list(&a.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("--faults: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut failures: BTreeMap<Invariant, Vec<String>> = BTreeMap::new();
    let mut printed = false;
    let mut steps = 0;
    for (i, seed) in (a.seed..a.seed + a.seeds).enumerate() {
        let opts = Options {
            seed,
            hosts: a.hosts,
            faults: faults.clone(),
            intervals: a.intervals,
            rejoin: if a.old_keeper {
                Rejoin::Never
            } else {
                Rejoin::Fixed
            },
        };
        let out = sim::run(&opts);
        steps += out.steps;
        if a.check_determinism && sim::run(&opts).trace_hash != out.trace_hash {
            eprintln!(
                "\nseed {seed}: two runs gave different traces: {}",
                opts.replay_line()
            );
            return ExitCode::FAILURE;
        }
        if let Some(v) = &out.violation {
            let line = opts.replay_line();
            if !printed || a.verbose || a.seeds == 1 {
                eprintln!(
                    "\nFAILED {} at {:.1}s: {}\n  replay: {line}\n  trace tail:",
                    v.invariant.name(),
                    v.at.as_secs_f64(),
                    v.detail
                );
                for l in &out.tail {
                    eprintln!("    {l}");
                }
                printed = true;
            }
            failures.entry(v.invariant).or_default().push(line);
        } else if a.seeds == 1 {
            for l in &out.tail {
                eprintln!("    {l}");
            }
        }
        let done = i + 1;
        if done.is_multiple_of(10) || done as u64 == a.seeds {
            let width = 30;
            let filled = done * width / usize::try_from(a.seeds).unwrap_or(usize::MAX).max(1);
            eprint!(
                "\r[{}{}] {done}/{} seeds, {} failed, {:.0}s",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width)),
                a.seeds,
                failures.values().map(Vec::len).sum::<usize>(),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    println!(
        "{} seeds, {} hosts, faults {}, {} steps in {:.1}s",
        a.seeds,
        a.hosts,
        a.faults,
        steps,
        started.elapsed().as_secs_f64()
    );
    for (inv, lines) in &failures {
        println!(
            "{}: {} seeds failed; first replays:",
            inv.name(),
            lines.len()
        );
        for l in lines.iter().take(3) {
            println!("  {l}");
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
