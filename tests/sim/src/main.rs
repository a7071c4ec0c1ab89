//! `flashstock-sim --seeds N`: runs N seeds and ends with `N seeds passed`,
//! or with the first failing seed, the command that reproduces it and the
//! last steps of its trace.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use flashstock_sim::{run, SimConfig};

#[derive(Debug, Parser)]
#[command(about = "Runs the deterministic cluster simulation over many seeds")]
struct Arguments {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    start: u64,
    /// Run this one seed and print its trace tail whatever the result.
    #[arg(long)]
    seed: Option<u64>,
    /// Trace lines printed for a failure.
    #[arg(long, default_value_t = 80)]
    trace_lines: usize,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let (first, count) = match arguments.seed {
        Some(seed) => (seed, 1),
        None => (arguments.start, arguments.seeds),
    };
    let started = Instant::now();
    let (mut requests, mut events, mut simulated_ms) = (0u64, 0u64, 0u64);
    let mut tally = std::collections::BTreeMap::new();
    for seed in first..first.saturating_add(count) {
        let outcome = std::panic::catch_unwind(|| {
            run(SimConfig { trace_lines_kept: arguments.trace_lines, ..SimConfig::new(seed) })
        });
        let report = match outcome {
            Ok(report) => report,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                println!("seed {seed} failed: panicked: {message}");
                println!("reproduce: cargo run --release -p flashstock-sim -- --seed {seed}");
                return ExitCode::FAILURE;
            }
        };
        requests += report.requests;
        events += report.events;
        simulated_ms += report.simulated_ms;
        for (kind, count) in &report.tally {
            *tally.entry(*kind).or_insert(0u64) += count;
        }
        if arguments.seed.is_some() || !report.violations.is_empty() {
            for line in &report.trace_tail {
                println!("  {line}");
            }
            println!(
                "seed {seed}: {} requests, {} answers, {} events, {} simulated ms, trace {:016x}",
                report.requests, report.answers, report.events, report.simulated_ms, report.trace_hash
            );
        }
        if !report.violations.is_empty() {
            for violation in report.violations.iter().take(20) {
                println!("violation: {violation}");
            }
            println!("seed {seed} failed");
            println!("reproduce: cargo run --release -p flashstock-sim -- --seed {seed}");
            return ExitCode::FAILURE;
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "{requests} requests, {events} events, {:.0} simulated s in {seconds:.1} s ({:.0} simulated requests/s)",
        simulated_ms as f64 / 1000.0,
        requests as f64 / seconds
    );
    eprintln!("{tally:?}");
    println!("{count} seeds passed");
    ExitCode::SUCCESS
}
