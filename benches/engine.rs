//! Criterion benchmarks of the engine:
//! - `state_machine/reserve`: reserves per second on one SKU, no actors;
//! - `actors/reserve_commit`: reserve + commit through the actors with 256
//!   orders in flight, on one hot SKU and on 10,000 SKUs with Zipf demand;
//! - `batch/reserve_commit`: the same pairs handed to the engine in frames
//!   of 256 (`Engine::submit_batch`, answers through a sink), in memory:
//!   the engine's side of a member's session, against the awaited path of
//!   `actors/.../memory`;
//! - `sold_out_hint`: `SoldOut` answers per second for a sold-out SKU.
//!
//! Run: `cargo bench -p flashstock-benches --bench engine`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flashstock_engine::log::segments::LogConfig;
use flashstock_engine::log::storage::FileStorage;
use flashstock_engine::log::writer::WriterConfig;
use flashstock_engine::sku::ReserveLine;
use flashstock_engine::{
    BatchAnswer, BatchRequest, BatchSink, BuyerId, Durability, Engine, EngineConfig, Limits, Line, LogStats,
    OperationId, OrderId, OrderRequest, Quantity, SkuCommand, SkuId, SkuSettings, SkuState, SystemClock,
};

const IN_FLIGHT: usize = 256;

fn order_ids(prefix: &str, count: usize) -> Vec<OrderId> {
    (0..count).map(|index| OrderId::new(format!("{prefix}-{index}")).expect("valid id")).collect()
}

fn sku_ids(count: usize) -> Vec<SkuId> {
    (0..count).map(|index| SkuId::new(format!("sku-{index}")).expect("valid id")).collect()
}

/// The engine of the actor benchmarks: a SKU remembers every order of a run.
fn sale_config() -> EngineConfig {
    EngineConfig { limits: Limits { finished_per_sku_max: 100_000, ..Limits::default() }, ..EngineConfig::default() }
}

fn state_machine(criterion: &mut Criterion) {
    const BATCH: usize = 10_000;
    let limits = Limits { finished_per_sku_max: 100_000, ..Limits::default() };
    let orders = order_ids("order", BATCH);
    let buyer = BuyerId::new("buyer").expect("valid id");
    let commands: Vec<SkuCommand> = orders
        .iter()
        .map(|order| {
            SkuCommand::Reserve(ReserveLine {
                order: order.clone(),
                buyer: buyer.clone(),
                quantity: Quantity::Exactly(1),
                ttl_ms: 60_000,
            })
        })
        .collect();
    let mut group = criterion.benchmark_group("state_machine");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("reserve", |bencher| {
        bencher.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let settings = SkuSettings { initial_units: BATCH as u64, ..SkuSettings::default() };
                let mut state = SkuState::new(settings, limits.clone()).expect("valid");
                let started = Instant::now();
                for (step, command) in commands.iter().enumerate() {
                    let answer = state.apply(1_000 + step as u64 / 64, command);
                    debug_assert!(answer.result.is_ok());
                    std::hint::black_box(answer);
                }
                total += started.elapsed();
            }
            total
        });
    });
    group.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// `counts[i]` SKUs get demand proportional to 1 / (i + 1)^1.1.
fn zipf_picks(sku_count: usize, picks: usize) -> Vec<usize> {
    let weights: Vec<f64> = (1..=sku_count).map(|rank| 1.0 / (rank as f64).powf(1.1)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(sku_count);
    let mut running = 0.0;
    for weight in &weights {
        running += weight / total;
        cumulative.push(running);
    }
    let mut seed: u64 = 0x1234_5678;
    (0..picks)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
            cumulative.partition_point(|&edge| edge <= unit).min(sku_count - 1)
        })
        .collect()
}

fn actors(criterion: &mut Criterion) {
    const ORDERS_PER_RUN: usize = 51_200;
    let runtime = runtime();
    let mut group = criterion.benchmark_group("actors");
    group.throughput(Throughput::Elements(ORDERS_PER_RUN as u64));
    group.sample_size(10);
    let cases = [
        ("reserve_commit/hot_sku/memory", 1usize, false),
        ("reserve_commit/hot_sku/durable", 1, true),
        ("reserve_commit/10k_zipf/memory", 10_000, false),
        ("reserve_commit/10k_zipf/durable", 10_000, true),
    ];
    for (name, sku_count, durable) in cases {
        let skus = sku_ids(sku_count);
        let picks = Arc::new(zipf_picks(sku_count, ORDERS_PER_RUN));
        let mut run = 0u64;
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    run += 1;
                    let config = sale_config();
                    let data = std::env::temp_dir().join(format!("flashstock-bench-{}-{run}", std::process::id()));
                    let engine = if durable {
                        let durability = Durability {
                            storage: Arc::new(FileStorage),
                            data_directory: data.clone(),
                            log: LogConfig::default(),
                            writer: WriterConfig::default(),
                        };
                        Engine::open(config, Arc::new(SystemClock), durability).expect("opens").0
                    } else {
                        Engine::new(config, Arc::new(SystemClock)).expect("valid config")
                    };
                    runtime.block_on(async {
                        let creations: Vec<_> = skus
                            .iter()
                            .map(|sku| {
                                let (engine, sku) = (engine.clone(), sku.clone());
                                let settings = SkuSettings { initial_units: 1_000_000, ..SkuSettings::default() };
                                let operation = OperationId::new(format!("create-{sku}")).expect("valid id");
                                tokio::spawn(async move {
                                    engine.create_sku(sku, settings, operation).await.expect("created")
                                })
                            })
                            .collect();
                        for creation in creations {
                            creation.await.expect("created");
                        }
                    });
                    let orders = Arc::new(order_ids(&format!("run{run}"), ORDERS_PER_RUN));
                    let buyer = BuyerId::new("buyer").expect("valid id");
                    total += runtime.block_on(async {
                        // Untimed: start every SKU's actor, as a running sale has them.
                        for sku in skus.iter() {
                            let operation = OperationId::new(format!("warm-up-{sku}-run{run}")).expect("valid id");
                            engine.add_stock(sku, 1, operation).await.expect("warm-up");
                        }
                        let log_before = engine.log_stats();
                        let started = Instant::now();
                        let tasks: Vec<_> = (0..IN_FLIGHT)
                            .map(|worker| {
                                let (engine, orders, picks, skus, buyer) =
                                    (engine.clone(), orders.clone(), picks.clone(), skus.clone(), buyer.clone());
                                tokio::spawn(async move {
                                    let mut latencies_us = Vec::with_capacity(ORDERS_PER_RUN / IN_FLIGHT + 1);
                                    for index in (worker..ORDERS_PER_RUN).step_by(IN_FLIGHT) {
                                        let pair_started = Instant::now();
                                        let request = OrderRequest {
                                            order: orders[index].clone(),
                                            buyer: buyer.clone(),
                                            lines: vec![Line {
                                                sku: skus[picks[index]].clone(),
                                                quantity: Quantity::Exactly(1),
                                            }],
                                            ttl_ms: 60_000,
                                        };
                                        engine.reserve(request).await.expect("held");
                                        engine.commit(&orders[index]).await.expect("committed");
                                        latencies_us.push(pair_started.elapsed().as_micros() as u64);
                                    }
                                    latencies_us
                                })
                            })
                            .collect();
                        let mut latencies_us = Vec::with_capacity(ORDERS_PER_RUN);
                        for task in tasks {
                            latencies_us.extend(task.await.expect("task ran"));
                        }
                        let elapsed = started.elapsed();
                        latencies_us.sort_unstable();
                        let percentile = |fraction: f64| latencies_us[(latencies_us.len() as f64 * fraction) as usize];
                        // Only the timed part: the untimed warm-up syncs once per SKU.
                        let syncs = match (log_before, engine.log_stats()) {
                            (Some(before), Some(LogStats { syncs, records, .. })) => {
                                let (syncs, records) = (syncs - before.syncs, records - before.records);
                                format!(", {:.1} records per fdatasync", records as f64 / syncs.max(1) as f64)
                            }
                            _ => String::new(),
                        };
                        eprintln!(
                            "  {name}: {:.0} pairs/s, reserve+commit p50 {} us, p99 {} us{syncs}",
                            ORDERS_PER_RUN as f64 / elapsed.as_secs_f64(),
                            percentile(0.50),
                            percentile(0.99),
                        );
                        engine.shutdown().await;
                        elapsed
                    });
                    drop(engine);
                    let _ = std::fs::remove_dir_all(&data);
                }
                total
            });
        });
    }
    group.finish();
}

fn sold_out_hint(criterion: &mut Criterion) {
    const REQUESTS_PER_TASK: usize = 10_000;
    const TASKS: usize = 2;
    let runtime = runtime();
    let engine = Engine::new(EngineConfig::default(), Arc::new(SystemClock)).expect("valid config");
    let sku = SkuId::new("gone").expect("valid id");
    runtime
        .block_on(engine.create_sku(
            sku.clone(),
            SkuSettings { initial_units: 0, ..SkuSettings::default() },
            OperationId::new("create-gone").expect("valid id"),
        ))
        .expect("created");
    let orders = Arc::new(order_ids("late", REQUESTS_PER_TASK * TASKS));
    let buyer = BuyerId::new("buyer").expect("valid id");
    let mut group = criterion.benchmark_group("sold_out_hint");
    group.throughput(Throughput::Elements((REQUESTS_PER_TASK * TASKS) as u64));
    group.bench_function("reserve_answered_sold_out", |bencher| {
        bencher.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|task| {
                            let (engine, orders, sku, buyer) =
                                (engine.clone(), orders.clone(), sku.clone(), buyer.clone());
                            tokio::spawn(async move {
                                for index in (task..REQUESTS_PER_TASK * TASKS).step_by(TASKS) {
                                    let request = OrderRequest {
                                        order: orders[index].clone(),
                                        buyer: buyer.clone(),
                                        lines: vec![Line { sku: sku.clone(), quantity: Quantity::Exactly(1) }],
                                        ttl_ms: 60_000,
                                    };
                                    let answer = engine.reserve(request).await;
                                    debug_assert!(answer.is_err());
                                    std::hint::black_box(answer).ok();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("task ran");
                    }
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

/// Hands each answer's tag, and whether it was refused, to the loop.
struct ForwardingSink(tokio::sync::mpsc::UnboundedSender<(u64, bool)>);

impl BatchSink for ForwardingSink {
    fn answer(&self, tag: u64, answer: BatchAnswer) {
        let refused = match answer {
            BatchAnswer::Reserved(outcome) => outcome.is_err(),
            BatchAnswer::Committed(outcome) | BatchAnswer::Released(outcome) => outcome.is_err(),
        };
        let _ = self.0.send((tag, refused));
    }
}

fn batch(criterion: &mut Criterion) {
    const ORDERS_PER_RUN: usize = 51_200;
    let runtime = runtime();
    let mut group = criterion.benchmark_group("batch");
    group.throughput(Throughput::Elements(ORDERS_PER_RUN as u64));
    group.sample_size(10);
    for (name, sku_count) in [("reserve_commit/hot_sku/memory", 1usize), ("reserve_commit/10k_zipf/memory", 10_000)] {
        let skus = sku_ids(sku_count);
        let picks = zipf_picks(sku_count, ORDERS_PER_RUN);
        let mut run = 0u64;
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    run += 1;
                    let config = sale_config();
                    let engine = Engine::new(config, Arc::new(SystemClock)).expect("valid config");
                    let orders = order_ids(&format!("run{run}"), ORDERS_PER_RUN);
                    let buyer = BuyerId::new("buyer").expect("valid id");
                    total += runtime.block_on(async {
                        for sku in &skus {
                            let settings = SkuSettings { initial_units: 1_000_000, ..SkuSettings::default() };
                            let operation = OperationId::new(format!("create-{sku}")).expect("valid id");
                            engine.create_sku(sku.clone(), settings, operation).await.expect("created");
                            // Untimed: start every SKU's actor, as a running sale has them.
                            let operation = OperationId::new(format!("warm-up-{sku}")).expect("valid id");
                            engine.add_stock(sku, 1, operation).await.expect("warm-up");
                        }
                        // As a member's session does: whatever was answered
                        // while a frame was being handled makes the next
                        // frame (a reserve's commit, or the next order's
                        // reserve), 256 orders in flight throughout.
                        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
                        let sink: Arc<dyn BatchSink> = Arc::new(ForwardingSink(answers));
                        let reserve = |index: usize| {
                            let line = Line { sku: skus[picks[index]].clone(), quantity: Quantity::Exactly(1) };
                            let order = orders[index].clone();
                            let request =
                                OrderRequest { order, buyer: buyer.clone(), lines: vec![line], ttl_ms: 60_000 };
                            // Even tags: reserves; odd: commits.
                            (2 * index as u64, BatchRequest::Reserve(request))
                        };
                        let started = Instant::now();
                        let mut next_order = IN_FLIGHT;
                        let (mut committed, mut refused) = (0, 0);
                        let mut frame: Vec<_> = (0..IN_FLIGHT).map(reserve).collect();
                        while committed < ORDERS_PER_RUN {
                            if !frame.is_empty() {
                                let given_back = engine.submit_batch(std::mem::take(&mut frame), &sink);
                                assert!(given_back.is_empty(), "single lines of orders it holds are never given back");
                            }
                            let Some(first) = answered.recv().await else { break };
                            let mut next = Some(first);
                            while let Some((tag, was_refused)) = next.take().or_else(|| answered.try_recv().ok()) {
                                refused += usize::from(was_refused);
                                let index = (tag / 2) as usize;
                                if tag % 2 == 0 {
                                    let commit =
                                        BatchRequest::Commit { order: orders[index].clone(), fewer: Vec::new() };
                                    frame.push((tag + 1, commit));
                                } else {
                                    committed += 1;
                                    if next_order < ORDERS_PER_RUN {
                                        frame.push(reserve(next_order));
                                        next_order += 1;
                                    }
                                }
                            }
                        }
                        let elapsed = started.elapsed();
                        assert_eq!(refused, 0, "every reserve and commit succeeds");
                        eprintln!("  batch/{name}: {:.0} pairs/s", ORDERS_PER_RUN as f64 / elapsed.as_secs_f64());
                        engine.shutdown().await;
                        elapsed
                    });
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = state_machine, actors, batch, sold_out_hint
}
criterion_main!(benches);
