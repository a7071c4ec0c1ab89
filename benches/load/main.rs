//! `load`: one flash-sale workload after another against this cluster
//! (three durable members over QUIC with mutual TLS, from `cluster.toml`)
//! and against Redis with Lua scripts that do the same job (`appendfsync
//! always`, then `everysec`), and a table of both side by side with the
//! ratios.
//!
//! Workloads (each operation is a reserve of one unit and its commit):
//! - `hot`: every buyer wants the same SKU;
//! - `zipf`: 10,000 SKUs, demand on a Zipf curve (exponent 1.1);
//! - `sellout`: one SKU of 10,000 units and buyers without end: pairs per
//!   second until it sells out, then how fast `SoldOut` answers come;
//! - `spanning` (this cluster only): orders of two lines on two members,
//!   the path of the two-phase commit, next to `zipf` for comparison.
//!
//! Closed loop with N buyers in flight (each waits for its answer before
//! the next), then an open loop at half the closed loop's peak for `hot`
//! and `zipf`, whose latencies are measured from each operation's scheduled
//! start (so a stall counts against every operation it delays).
//!
//! Server CPU per request: the CPU time (user + system, from `/proc`) of
//! the processes this one started — the members, or Redis — over a closed
//! loop, divided by the requests answered in it (a pair is two: reserve
//! and commit; a `SoldOut` is one). It counts everything the server does
//! for a request (transport, TLS, tasks, engine, log), nothing the client
//! does. Beside it, the busiest process's share: were each member on
//! cores of its own (here they share the machine's), the busiest would
//! bound the throughput, so replicated against single copy is also given
//! as the ratio of their busiest members' CPU per request (a model, not a
//! run).
//!
//! Build the member binary first: it is started from next to this one.
//! `cargo build --release -p flashstock-node && cargo run --release -p flashstock-benches --bin load`

mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flashstock_node::sale::{Choices, Zipf};
use hdrhistogram::Histogram;
use targets::{Cluster, Redis, Reserved, Target};

#[derive(Debug, Parser)]
#[command(name = "load", about = "Flash-sale load: this cluster side by side with Redis + Lua")]
struct Arguments {
    /// The cluster to start (its data directories are emptied first).
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// Length of each closed-loop and open-loop run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, value_delimiter = ',', default_value = "hot,zipf,sellout,spanning")]
    workloads: Vec<WorkloadName>,
    /// Buyers in flight in the closed loop.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    in_flight: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "flashstock,redis-always,redis-everysec")]
    targets: Vec<TargetName>,
    /// Members of `config` to start (the first N); all when absent. One
    /// member is the like-for-like comparison with one Redis process.
    #[arg(long)]
    members: Option<usize>,
    /// Port of the Redis servers the run starts.
    #[arg(long, default_value_t = 6390)]
    redis_port: u16,
    /// Skip the open-loop runs at half of the peak.
    #[arg(long)]
    no_open_loop: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadName {
    Hot,
    Zipf,
    Sellout,
    Spanning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetName {
    Flashstock,
    /// The same cluster with every partition on three members
    /// (`replication_factor = 3`), side by side with the single copy.
    FlashstockReplicated,
    RedisAlways,
    RedisEverysec,
}

/// SKUs of the Zipf workload.
const ZIPF_SKUS: u32 = 10_000;
const ZIPF_EXPONENT: f64 = 1.1;
/// Units of the sell-out SKU.
const SELLOUT_UNITS: u64 = 10_000;
/// Units of SKUs that must not sell out during a run.
const UNITS_PLENTY: u64 = 1_000_000_000;
/// SKU creations in flight while setting up.
const SETUP_IN_FLIGHT: usize = 64;
/// Open-loop operations in flight at most; beyond, an operation is counted
/// as dropped rather than queued without bound.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 8_192;
/// A run stops early after this many errors (anything but held or sold out).
const ERRORS_MAX: u64 = 1_000;
/// Latencies are recorded in microseconds, up to a minute.
const LATENCY_US_MAX: u64 = 60_000_000;

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    pairs: u64,
    sold_out: u64,
    errors: u64,
    /// The errors by kind (their message, cut short), so a run with errors
    /// says what went wrong.
    error_kinds: BTreeMap<String, u64>,
    elapsed: Duration,
    pair_latency: Histogram<u64>,
    sold_out_latency: Histogram<u64>,
    /// When the first `SoldOut` came, from the start.
    sold_out_from: Option<Duration>,
    /// `SoldOut` answers after that moment.
    sold_out_after: u64,
    /// Open loop only: operations not started because too many were in flight.
    dropped: u64,
    /// Closed loop only: CPU time the servers (this process's children)
    /// spent during the run.
    server_cpu: Option<Duration>,
    /// Closed loop only: CPU time of the busiest server process (the
    /// member that would bound throughput if each had cores of its own).
    busiest_server_cpu: Option<Duration>,
}

impl Outcome {
    /// Pairs per second while there was stock: until the first `SoldOut`
    /// if there was one, else over the whole run.
    fn pairs_per_second(&self) -> f64 {
        let selling = self.sold_out_from.unwrap_or(self.elapsed);
        self.pairs as f64 / selling.as_secs_f64().max(1e-9)
    }

    /// Requests answered: a pair is a reserve and a commit.
    fn requests(&self) -> u64 {
        self.pairs * 2 + self.sold_out + self.errors
    }

    /// Server CPU per request answered, in microseconds.
    fn server_cpu_per_request_us(&self) -> Option<f64> {
        self.per_request_us(self.server_cpu?)
    }

    /// The busiest server's CPU per request answered, in microseconds.
    fn busiest_server_cpu_per_request_us(&self) -> Option<f64> {
        self.per_request_us(self.busiest_server_cpu?)
    }

    fn per_request_us(&self, cpu: Duration) -> Option<f64> {
        (self.requests() > 0).then(|| cpu.as_secs_f64() * 1e6 / self.requests() as f64)
    }

    /// `SoldOut` answers per second after the first one.
    fn sold_out_per_second(&self) -> Option<f64> {
        let from = self.sold_out_from?;
        Some(self.sold_out_after as f64 / self.elapsed.saturating_sub(from).as_secs_f64().max(1e-9))
    }
}

/// Clock ticks per second of `/proc`'s CPU times: the kernel reports them
/// in `USER_HZ`, which Linux fixes at 100 for user space on every
/// architecture it supports.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads) used so far by each live
/// process whose parent is this one (the servers a run started), by pid.
/// `None` where `/proc` cannot be read.
fn children_cpu() -> Option<BTreeMap<u32, Duration>> {
    let own = std::process::id();
    let mut times = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (command) state ppid ...`: the command may hold spaces and
        // parentheses, so the fields are counted from the last `)`.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state (0), ppid (1), ..., utime (11), stime (12).
        let (Some(parent), Some(user), Some(system)) = (fields.get(1), fields.get(11), fields.get(12)) else {
            continue;
        };
        if parent.parse::<u32>().ok() != Some(own) {
            continue;
        }
        let ticks = user.parse::<u64>().unwrap_or(0) + system.parse::<u64>().unwrap_or(0);
        times.insert(pid, Duration::from_secs_f64(ticks as f64 / USER_HZ));
    }
    Some(times)
}

/// The servers' CPU time between two readings of [`children_cpu`]: in
/// all, and of the busiest process.
fn cpu_spent(before: &BTreeMap<u32, Duration>, after: &BTreeMap<u32, Duration>) -> (Duration, Duration) {
    let spent = after.iter().map(|(pid, &time)| time.saturating_sub(before.get(pid).copied().unwrap_or_default()));
    spent.fold((Duration::ZERO, Duration::ZERO), |(total, busiest), time| (total + time, busiest.max(time)))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, LATENCY_US_MAX)
}

/// The SKUs a workload buys from, and how a buyer picks.
#[derive(Debug)]
struct Plan {
    skus: Vec<String>,
    zipf: Option<Zipf>,
    /// For `spanning`: pairs of SKUs owned by different members.
    pairs: Vec<(usize, usize)>,
}

impl Plan {
    fn pick(&self, choices: &mut Choices) -> Vec<&str> {
        if let Some((first, second)) = (!self.pairs.is_empty()).then(|| {
            let pair = self.pairs[choices.below(self.pairs.len() as u64) as usize];
            (pair.0, pair.1)
        }) {
            return vec![&self.skus[first], &self.skus[second]];
        }
        let index = match &self.zipf {
            Some(zipf) => zipf.sample(choices),
            None => 0,
        };
        vec![&self.skus[index]]
    }
}

/// Live counts for the progress bar.
#[derive(Debug, Default)]
struct Live {
    pairs: AtomicU64,
    sold_out: AtomicU64,
}

/// Closed loop: `in_flight` buyers, each reserving and committing one unit
/// after another until `duration` has passed.
async fn closed_loop<T: Target>(
    target: Arc<T>,
    plan: Arc<Plan>,
    label: &str,
    in_flight: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let deadline = started + duration;
    let live = Arc::new(Live::default());
    let first_sold_out_us = Arc::new(AtomicU64::new(u64::MAX));
    let progress = progress_bar(label, duration, live.clone());
    let mut buyers = tokio::task::JoinSet::new();
    for buyer in 0..in_flight {
        let (target, plan, live, first_sold_out_us) =
            (target.clone(), plan.clone(), live.clone(), first_sold_out_us.clone());
        let prefix = format!("{label}-{buyer}");
        buyers.spawn(async move {
            let mut choices = Choices::new(0x5eed ^ (buyer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (mut pair_latency, mut sold_out_latency) = (histogram(), histogram());
            let (mut pairs, mut sold_out, mut sold_out_after, mut errors) = (0u64, 0u64, 0u64, 0u64);
            let mut error_kinds = BTreeMap::new();
            let mut number = 0u64;
            while Instant::now() < deadline && errors < ERRORS_MAX {
                number += 1;
                let order = format!("{prefix}-{number}");
                let skus = plan.pick(&mut choices);
                let begun = Instant::now();
                match target.reserve(&order, &skus, 1).await {
                    Ok(Reserved::Held(token)) => match target.commit(token).await {
                        Ok(()) => {
                            pair_latency.saturating_record(micros(begun.elapsed()));
                            pairs += 1;
                            live.pairs.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            errors += 1;
                            count_kind(&mut error_kinds, &error);
                        }
                    },
                    Ok(Reserved::SoldOut) => {
                        sold_out_latency.saturating_record(micros(begun.elapsed()));
                        sold_out += 1;
                        live.sold_out.fetch_add(1, Ordering::Relaxed);
                        let at_us = micros(begun.duration_since(started));
                        let first = first_sold_out_us.fetch_min(at_us, Ordering::AcqRel).min(at_us);
                        if at_us >= first {
                            sold_out_after += 1;
                        }
                    }
                    Err(error) => {
                        errors += 1;
                        count_kind(&mut error_kinds, &error);
                    }
                }
            }
            (pairs, sold_out, sold_out_after, errors, error_kinds, pair_latency, sold_out_latency)
        });
    }
    let mut outcome = Outcome {
        pairs: 0,
        sold_out: 0,
        errors: 0,
        error_kinds: BTreeMap::new(),
        elapsed: Duration::ZERO,
        pair_latency: histogram(),
        sold_out_latency: histogram(),
        sold_out_from: None,
        sold_out_after: 0,
        dropped: 0,
        server_cpu: None,
        busiest_server_cpu: None,
    };
    while let Some(joined) = buyers.join_next().await {
        let (pairs, sold_out, sold_out_after, errors, error_kinds, pair_latency, sold_out_latency) = joined?;
        outcome.pairs += pairs;
        outcome.sold_out += sold_out;
        outcome.sold_out_after += sold_out_after;
        outcome.errors += errors;
        for (kind, count) in error_kinds {
            *outcome.error_kinds.entry(kind).or_default() += count;
        }
        outcome.pair_latency.add(pair_latency)?;
        outcome.sold_out_latency.add(sold_out_latency)?;
    }
    outcome.elapsed = started.elapsed();
    if let (Some(before), Some(after)) = (cpu_before, children_cpu()) {
        let (total, busiest) = cpu_spent(&before, &after);
        outcome.server_cpu = Some(total);
        outcome.busiest_server_cpu = Some(busiest);
    }
    let first = first_sold_out_us.load(Ordering::Acquire);
    outcome.sold_out_from = (first != u64::MAX).then(|| Duration::from_micros(first));
    progress.finish_and_clear();
    Ok(outcome)
}

/// Open loop: an operation started every `1 / rate` seconds whatever the
/// answers, its latency measured from when it was due.
async fn open_loop<T: Target>(
    target: Arc<T>,
    plan: Arc<Plan>,
    label: &str,
    rate_per_second: f64,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let started = tokio::time::Instant::now();
    let live = Arc::new(Live::default());
    let progress = progress_bar(label, duration, live.clone());
    let latencies = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(Mutex::new(BTreeMap::new()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut dropped = 0u64;
    let mut choices = Choices::new(0x0be1);
    let interval = Duration::from_secs_f64(1.0 / rate_per_second.max(1.0));
    let total = (duration.as_secs_f64() * rate_per_second) as u64;
    let mut operations = tokio::task::JoinSet::new();
    for number in 0..total {
        let due = started + interval.mul_f64(number as f64);
        tokio::time::sleep_until(due).await;
        if in_flight.load(Ordering::Acquire) >= OPEN_LOOP_IN_FLIGHT_MAX as u64 {
            dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::AcqRel);
        let skus: Vec<String> = plan.pick(&mut choices).into_iter().map(str::to_owned).collect();
        let order = format!("{label}-{number}");
        let (target, live, latencies, errors, in_flight) =
            (target.clone(), live.clone(), latencies.clone(), errors.clone(), in_flight.clone());
        operations.spawn(async move {
            let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
            let outcome = match target.reserve(&order, &skus, 1).await {
                Ok(Reserved::Held(token)) => target.commit(token).await,
                Ok(Reserved::SoldOut) => Ok(()),
                Err(error) => Err(error),
            };
            match outcome {
                Ok(()) => {
                    let latency = micros(due.elapsed());
                    latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).saturating_record(latency);
                    live.pairs.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    count_kind(&mut errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner), &error);
                }
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
        // Reap finished operations as we go, so the set stays small.
        while operations.try_join_next().is_some() {}
    }
    while operations.join_next().await.is_some() {}
    progress.finish_and_clear();
    let pair_latency =
        std::mem::replace(&mut *latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner), histogram());
    let error_kinds = std::mem::take(&mut *errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    Ok(Outcome {
        pairs: live.pairs.load(Ordering::Relaxed),
        sold_out: 0,
        errors: error_kinds.values().sum(),
        error_kinds,
        elapsed: started.elapsed(),
        pair_latency,
        sold_out_latency: histogram(),
        sold_out_from: None,
        sold_out_after: 0,
        dropped,
        server_cpu: None,
        busiest_server_cpu: None,
    })
}

fn progress_bar(label: &str, duration: Duration, live: Arc<Live>) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {prefix:32} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let ticking = bar.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        while !ticking.is_finished() {
            let elapsed = started.elapsed();
            let pairs = live.pairs.load(Ordering::Relaxed);
            let sold_out = live.sold_out.load(Ordering::Relaxed);
            ticking.set_position(elapsed.as_millis() as u64);
            ticking.set_message(format!(
                "{:>9.0} pairs/s, {sold_out} sold out",
                pairs as f64 / elapsed.as_secs_f64().max(1e-3)
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    bar
}

/// Creates `skus` with `units` each, `SETUP_IN_FLIGHT` at a time.
async fn create_all<T: Target>(target: &Arc<T>, skus: &[String], units: u64) -> anyhow::Result<()> {
    let mut creating = tokio::task::JoinSet::new();
    for sku in skus {
        if creating.len() >= SETUP_IN_FLIGHT {
            creating.join_next().await.context("a creation task")???;
        }
        let (target, sku) = (target.clone(), sku.clone());
        creating.spawn(async move { target.create(&sku, units).await });
    }
    while let Some(created) = creating.join_next().await {
        created??;
    }
    Ok(())
}

/// One row of the closed-loop table.
#[derive(Debug)]
struct Row {
    workload: WorkloadName,
    in_flight: usize,
    target: String,
    outcome: Outcome,
}

/// One row of the open-loop table.
#[derive(Debug)]
struct OpenRow {
    workload: WorkloadName,
    target: String,
    rate: f64,
    outcome: Outcome,
}

/// Runs every workload the arguments name against `target`.
async fn run_target<T: Target>(
    target: Arc<T>,
    arguments: &Arguments,
    owner_of: &dyn Fn(&str) -> Option<u32>,
    rows: &mut Vec<Row>,
    open_rows: &mut Vec<OpenRow>,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(arguments.seconds);
    let name = target.name().to_owned();
    let tag: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    println!("{name}");
    for &workload in &arguments.workloads {
        let is_cluster = owner_of("probe").is_some();
        if workload == WorkloadName::Spanning && !is_cluster {
            continue;
        }
        // SKUs that must not sell out are created once and shared by the
        // workload's runs; the sell-out SKU is new for every run.
        let shared = match workload {
            WorkloadName::Hot => {
                let skus = vec![format!("{tag}-hot")];
                create_all(&target, &skus, UNITS_PLENTY).await?;
                Some(Plan { skus, zipf: None, pairs: Vec::new() })
            }
            WorkloadName::Zipf | WorkloadName::Spanning => {
                let skus: Vec<String> =
                    (0..ZIPF_SKUS).map(|index| format!("{tag}-{workload:?}-{index}").to_lowercase()).collect();
                create_all(&target, &skus, UNITS_PLENTY).await?;
                let pairs =
                    if workload == WorkloadName::Spanning { spanning_pairs(&skus, owner_of)? } else { Vec::new() };
                let zipf = (workload == WorkloadName::Zipf).then(|| Zipf::new(ZIPF_SKUS, ZIPF_EXPONENT));
                Some(Plan { skus, zipf, pairs })
            }
            WorkloadName::Sellout => None,
        };
        let shared = shared.map(Arc::new);
        let mut peak: f64 = 0.0;
        for &in_flight in &arguments.in_flight {
            let label = format!("{tag}-{workload:?}-{in_flight}").to_lowercase();
            let plan = match &shared {
                Some(plan) => plan.clone(),
                None => {
                    let skus = vec![format!("{label}-sku")];
                    create_all(&target, &skus, SELLOUT_UNITS).await?;
                    Arc::new(Plan { skus, zipf: None, pairs: Vec::new() })
                }
            };
            let outcome = closed_loop(target.clone(), plan, &label, in_flight, duration).await?;
            println!("  {}", describe(workload, in_flight, &outcome));
            peak = peak.max(outcome.pairs_per_second());
            rows.push(Row { workload, in_flight, target: name.clone(), outcome });
        }
        if !arguments.no_open_loop && matches!(workload, WorkloadName::Hot | WorkloadName::Zipf) && peak > 0.0 {
            let plan = shared.clone().expect("hot and zipf share their SKUs");
            let label = format!("{tag}-{workload:?}-open").to_lowercase();
            let rate = peak / 2.0;
            let outcome = open_loop(target.clone(), plan, &label, rate, duration).await?;
            println!(
                "  {workload:?} open loop at {rate:.0}/s: p50 {} p99 {} p999 {} max {} ({} errors, {} dropped)",
                ms(&outcome.pair_latency, 0.5),
                ms(&outcome.pair_latency, 0.99),
                ms(&outcome.pair_latency, 0.999),
                ms_max(&outcome.pair_latency),
                outcome.errors,
                outcome.dropped
            );
            open_rows.push(OpenRow { workload, target: name.clone(), rate, outcome });
        }
    }
    Ok(())
}

/// Up to 1,000 pairs of SKUs owned by different members.
fn spanning_pairs(skus: &[String], owner_of: &dyn Fn(&str) -> Option<u32>) -> anyhow::Result<Vec<(usize, usize)>> {
    let mut pairs = Vec::new();
    for first in 0..skus.len() {
        let second = (first * 7919 + 1) % skus.len();
        if owner_of(&skus[first]) != owner_of(&skus[second]) {
            pairs.push((first, second));
        }
        if pairs.len() == 1_000 {
            break;
        }
    }
    if pairs.is_empty() {
        bail!("every SKU lives on one member: a spanning workload needs two");
    }
    Ok(pairs)
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> String {
    if histogram.is_empty() {
        return "-".to_owned();
    }
    format!("{:.2} ms", histogram.value_at_quantile(quantile) as f64 / 1000.0)
}

fn ms_max(histogram: &Histogram<u64>) -> String {
    if histogram.is_empty() {
        return "-".to_owned();
    }
    format!("{:.2} ms", histogram.max() as f64 / 1000.0)
}

fn describe(workload: WorkloadName, in_flight: usize, outcome: &Outcome) -> String {
    let mut text = format!(
        "{workload:?} x{in_flight}: {:.0} pairs/s, p50 {} p99 {} p999 {}",
        outcome.pairs_per_second(),
        ms(&outcome.pair_latency, 0.5),
        ms(&outcome.pair_latency, 0.99),
        ms(&outcome.pair_latency, 0.999)
    );
    if let (Some(from), Some(rate)) = (outcome.sold_out_from, outcome.sold_out_per_second()) {
        text.push_str(&format!(
            "; sold out after {:.2} s, then {rate:.0} sold-out answers/s (p50 {}, p99 {})",
            from.as_secs_f64(),
            ms(&outcome.sold_out_latency, 0.5),
            ms(&outcome.sold_out_latency, 0.99)
        ));
    }
    if let Some(cpu_us) = outcome.server_cpu_per_request_us() {
        text.push_str(&format!("; server CPU {cpu_us:.1} us/request"));
    }
    if let Some(cpu_us) = outcome.busiest_server_cpu_per_request_us() {
        text.push_str(&format!(" (busiest process {cpu_us:.1})"));
    }
    if outcome.errors > 0 {
        text.push_str(&format!(" ({} errors: {})", outcome.errors, kinds(&outcome.error_kinds)));
    }
    text
}

/// Kinds of error kept apart in a run's tally; the rest are counted as one.
const ERROR_KINDS_MAX: usize = 16;

fn count_kind(kinds: &mut BTreeMap<String, u64>, error: &anyhow::Error) {
    let mut kind: String = error.to_string().chars().take(80).collect();
    if !kinds.contains_key(&kind) && kinds.len() >= ERROR_KINDS_MAX {
        kind = "other".to_owned();
    }
    *kinds.entry(kind).or_default() += 1;
}

/// The commonest kinds first.
fn kinds(kinds: &BTreeMap<String, u64>) -> String {
    let mut sorted: Vec<(&String, &u64)> = kinds.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1));
    sorted.iter().take(3).map(|(kind, count)| format!("{count} x {kind}")).collect::<Vec<_>>().join("; ")
}

/// The replicated cluster's name in the tables: compared with the single
/// copy (the price of three copies), not the other way round.
const REPLICATED: &str = "flashstock-replicated";

/// The side-by-side tables, in Markdown.
fn report(rows: &[Row], open_rows: &[OpenRow]) -> String {
    let ours = "flashstock";
    let mut text = String::new();
    let targets: Vec<&str> = {
        let mut names: Vec<&str> = rows.iter().map(|row| row.target.as_str()).collect();
        names.dedup();
        names
    };
    text.push_str("| workload | in flight |");
    for target in &targets {
        text.push_str(&format!(" {target} pairs/s (p50 / p99) |"));
    }
    for target in targets.iter().filter(|target| **target != ours) {
        if *target == REPLICATED {
            text.push_str(" replicated / single copy |");
        } else {
            text.push_str(&format!(" ours / {target} |"));
        }
    }
    text.push('\n');
    text.push_str(&"|---".repeat(2 + targets.len() * 2 - 1));
    text.push_str("|\n");
    let mut keys: Vec<(WorkloadName, usize)> = rows.iter().map(|row| (row.workload, row.in_flight)).collect();
    keys.dedup();
    let mut seen = Vec::new();
    for key in keys {
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let find = |target: &str| rows.iter().find(|row| (row.workload, row.in_flight) == key && row.target == target);
        text.push_str(&format!("| {:?} | {} |", key.0, key.1).to_lowercase());
        for target in &targets {
            match find(target) {
                Some(row) => {
                    let mut cell = format!(
                        " {:.0} ({} / {})",
                        row.outcome.pairs_per_second(),
                        ms(&row.outcome.pair_latency, 0.5),
                        ms(&row.outcome.pair_latency, 0.99)
                    );
                    if let Some(rate) = row.outcome.sold_out_per_second() {
                        cell.push_str(&format!("; then {rate:.0} sold-out/s"));
                    }
                    text.push_str(&cell);
                    text.push_str(" |");
                }
                None => text.push_str(" - |"),
            }
        }
        for target in targets.iter().filter(|target| **target != ours) {
            let (numerator, denominator) =
                if *target == REPLICATED { (find(target), find(ours)) } else { (find(ours), find(target)) };
            match (numerator, denominator) {
                (Some(our_row), Some(their_row)) if their_row.outcome.pairs > 0 => text.push_str(&format!(
                    " {:.2}x |",
                    our_row.outcome.pairs_per_second() / their_row.outcome.pairs_per_second()
                )),
                _ => text.push_str(" - |"),
            }
        }
        text.push('\n');
    }
    text.push_str("\nServer CPU per request answered (user + system of the server processes, over the closed loop), in microseconds: all of them (the busiest process):\n\n");
    text.push_str("| workload | in flight |");
    for target in &targets {
        text.push_str(&format!(" {target} |"));
    }
    text.push('\n');
    text.push_str(&"|---".repeat(2 + targets.len()));
    text.push_str("|\n");
    for &key in &seen {
        text.push_str(&format!("| {:?} | {} |", key.0, key.1).to_lowercase());
        for target in &targets {
            let row = rows.iter().find(|row| (row.workload, row.in_flight) == key && row.target == *target);
            let outcome = row.map(|row| &row.outcome);
            match outcome.and_then(|outcome| {
                outcome.server_cpu_per_request_us().zip(outcome.busiest_server_cpu_per_request_us())
            }) {
                Some((cpu_us, busiest_us)) => text.push_str(&format!(" {cpu_us:.1} ({busiest_us:.1}) |")),
                None => text.push_str(" - |"),
            }
        }
        text.push('\n');
    }
    let replicated_rows: Vec<_> = seen
        .iter()
        .filter_map(|&key| {
            let find = |target: &str| {
                rows.iter()
                    .find(|row| (row.workload, row.in_flight) == key && row.target == target)
                    .and_then(|row| row.outcome.busiest_server_cpu_per_request_us())
            };
            find(REPLICATED).zip(find(ours)).map(|(replicated, single)| (key, single / replicated))
        })
        .collect();
    if !replicated_rows.is_empty() {
        text.push_str("\nReplicated / single copy were each member on cores of its own (here all share this machine's): throughput bound by the busiest member's CPU per request, single copy's over replicated's (a model, not a run):\n\n");
        text.push_str("| workload | in flight | replicated / single copy |\n|---|---|---|\n");
        for ((workload, in_flight), ratio) in replicated_rows {
            text.push_str(&format!("| {} | {in_flight} | {ratio:.2}x |\n", format!("{workload:?}").to_lowercase()));
        }
    }
    if !open_rows.is_empty() {
        text.push_str("\nOpen loop at half of each target's own peak (closed loop), latency of reserve + commit:\n\n");
        text.push_str("| workload | target | rate/s | p50 | p99 | p999 | max | errors | dropped |\n");
        text.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for row in open_rows {
            text.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
                format!("{:?}", row.workload).to_lowercase(),
                row.target,
                row.rate,
                ms(&row.outcome.pair_latency, 0.5),
                ms(&row.outcome.pair_latency, 0.99),
                ms(&row.outcome.pair_latency, 0.999),
                ms_max(&row.outcome.pair_latency),
                row.outcome.errors,
                row.outcome.dropped
            ));
        }
    }
    text
}

/// `text` with its `[cluster]` section's replication factor set.
fn with_replication_factor(text: &str, factor: u32) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut in_cluster = false;
    let mut set = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_cluster = trimmed.starts_with("[cluster]");
        }
        if in_cluster && trimmed.starts_with("replication_factor") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if trimmed.starts_with("[cluster]") && !set {
            out.push_str(&format!("replication_factor = {factor}\n"));
            set = true;
        }
    }
    anyhow::ensure!(set, "the configuration has no [cluster] section");
    Ok(out)
}

async fn start_cluster(
    arguments: &Arguments,
    replication_factor: u32,
) -> anyhow::Result<(flashstock_node::local_cluster::LocalCluster, Cluster)> {
    let mut file = flashstock_node::config::ClusterFile::load(&arguments.config)?;
    let mut config = arguments.config.clone();
    if replication_factor != file.cluster.replication_factor {
        let text = with_replication_factor(&std::fs::read_to_string(&arguments.config)?, replication_factor)?;
        config = std::env::temp_dir().join(format!("flashstock-load-replication-{replication_factor}.toml"));
        std::fs::write(&config, text)?;
        file = flashstock_node::config::ClusterFile::load(&config)?;
    }
    if let Some(count) = arguments.members.filter(|&count| count < file.members.len()) {
        anyhow::ensure!(count > 0, "--members must be at least 1");
        // A copy of the configuration with the first `count` members.
        let text = std::fs::read_to_string(&config)?;
        let mut kept = 0;
        let trimmed: Vec<&str> = text
            .split("[[members]]")
            .enumerate()
            .filter(|(index, _)| {
                let keep = *index == 0 || kept < count;
                if *index > 0 {
                    kept += 1;
                }
                keep
            })
            .map(|(_, part)| part)
            .collect();
        config =
            std::env::temp_dir().join(format!("flashstock-load-{count}-members-replication-{replication_factor}.toml"));
        std::fs::write(&config, trimmed.join("[[members]]"))?;
        file = flashstock_node::config::ClusterFile::load(&config)?;
    }
    let tls = file.tls.as_ref().context("the cluster needs [tls]")?;
    let members: Vec<u32> = file.members.iter().map(|member| member.id).collect();
    anyhow::ensure!(!members.is_empty(), "{} has no [[members]]", arguments.config.display());
    flashstock_node::tls::create_development_certificates(&tls.directory, &members)?;
    for member in &file.members {
        if member.data_directory.exists() {
            std::fs::remove_dir_all(&member.data_directory)
                .with_context(|| format!("emptying {}", member.data_directory.display()))?;
        }
    }
    let node_binary = std::env::current_exe()?.with_file_name("flashstock-node");
    if !node_binary.exists() {
        bail!("{} is missing: build it first with `cargo build --release -p flashstock-node`", node_binary.display());
    }
    let cluster =
        flashstock_node::local_cluster::LocalCluster::start_with(&node_binary, &config, &members, true).await?;
    let in_flight_max = arguments.in_flight.iter().copied().max().unwrap_or(1).max(SETUP_IN_FLIGHT) * 2;
    let connect = |identity: &str| {
        let mut builder = flashstock_client::Client::builder()
            .tls_directory(&tls.directory, identity)
            .in_flight_max(in_flight_max)
            .agent(format!("load-{identity}"));
        for member in &file.members {
            if let Ok(address) = member.address.parse() {
                builder = builder.seed(address);
            }
        }
        builder.connect()
    };
    let name = if replication_factor > 1 { "flashstock-replicated" } else { "flashstock" };
    let target =
        Cluster { name: name.to_owned(), admin: connect("admin").await?, checkout: connect("checkout").await? };
    flashstock_node::local_cluster::wait_until_linked(&target.admin, Duration::from_secs(10)).await;
    // Replicated: measure with the leaders spread as they stay, not while
    // they move to their preferred members.
    flashstock_node::local_cluster::wait_until_leaders_spread(&target.admin, &members, Duration::from_secs(10)).await;
    Ok((cluster, target))
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut rows = Vec::new();
        let mut open_rows = Vec::new();
        for &target in &arguments.targets {
            match target {
                TargetName::Flashstock | TargetName::FlashstockReplicated => {
                    let factor = if target == TargetName::Flashstock { 1 } else { 3 };
                    let (mut cluster, client) = start_cluster(&arguments, factor).await?;
                    let checkout = client.checkout.clone();
                    let owner_of = move |sku: &str| checkout.owner_of(sku);
                    let outcome = run_target(Arc::new(client), &arguments, &owner_of, &mut rows, &mut open_rows).await;
                    cluster.stop().await;
                    outcome?;
                }
                TargetName::RedisAlways | TargetName::RedisEverysec => {
                    let fsync = if target == TargetName::RedisAlways { "always" } else { "everysec" };
                    let directory = std::env::temp_dir().join(format!("flashstock-load-redis-{fsync}"));
                    let redis = Redis::start(fsync, arguments.redis_port, &directory).await?;
                    run_target(Arc::new(redis), &arguments, &|_: &str| None, &mut rows, &mut open_rows).await?;
                }
            }
        }
        println!("\n{}", report(&rows, &open_rows));
        anyhow::Ok(())
    })
}
