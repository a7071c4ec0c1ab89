//! The durable engine on an in-memory disk that crashes and fails on
//! demand: every acknowledged answer survives, nothing is acknowledged after
//! the log fails, and replay rebuilds exactly the acknowledged state.

use std::path::PathBuf;
use std::sync::Arc;

use flashstock_engine::log::compactor::replay_log;
use flashstock_engine::log::record::TransactionLine;
use flashstock_engine::log::replay::ReplayRules;
use flashstock_engine::log::segments::LogConfig;
use flashstock_engine::log::snapshot::Snapshot;
use flashstock_engine::log::storage::{MemoryStorage, UnsyncedFate};
use flashstock_engine::log::writer::WriterConfig;
use flashstock_engine::Clock;
use flashstock_engine::{
    BuyerId, Durability, Engine, EngineConfig, EngineError, Limits, Line, ManualClock, OrderError, OrderId,
    OrderRequest, OrderStatus, Quantity, SkuError, SkuId, SkuSettings, StockSnapshot,
};

fn durability(storage: &MemoryStorage) -> Durability {
    Durability {
        storage: Arc::new(storage.clone()),
        data_directory: PathBuf::from("/data"),
        log: LogConfig { segment_bytes_max: 4096, snapshot_log_bytes: 8192 },
        writer: WriterConfig { round_appends_max: 256 },
    }
}

fn config() -> EngineConfig {
    EngineConfig { partition_count: 4, ..EngineConfig::default() }
}

fn open(storage: &MemoryStorage, clock: &Arc<ManualClock>) -> (Engine, flashstock_engine::RecoveryReport) {
    Engine::open(config(), clock.clone(), durability(storage)).expect("opens")
}

/// A durable engine on a fresh in-memory disk with `skus` SKUs of `units`
/// units each (`sku-0`, `sku-1`, ...).
async fn engine_with_skus(skus: u64, units: u64) -> (MemoryStorage, Arc<ManualClock>, Engine) {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (engine, _) = open(&storage, &clock);
    for index in 0..skus {
        engine
            .create_sku(sku(index), SkuSettings { initial_units: units, ..SkuSettings::default() }, operation())
            .await
            .expect("created");
    }
    (storage, clock, engine)
}

/// A fresh operation id for each admin call (unique within the process).
fn operation() -> flashstock_engine::OperationId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    flashstock_engine::OperationId::new(format!("operation-{number}")).expect("valid")
}

fn sku(index: u64) -> SkuId {
    SkuId::new(format!("sku-{index}")).expect("valid id")
}

fn request(order: &str, lines: &[(u64, u32)]) -> OrderRequest {
    OrderRequest {
        order: OrderId::new(order).expect("valid id"),
        buyer: BuyerId::new(format!("buyer-{order}")).expect("valid id"),
        lines: lines
            .iter()
            .map(|&(index, units)| Line { sku: sku(index), quantity: Quantity::Exactly(units) })
            .collect(),
        ttl_ms: 60_000,
    }
}

async fn counts(engine: &Engine, skus: u64) -> Vec<StockSnapshot> {
    let mut all = Vec::new();
    for index in 0..skus {
        all.push(engine.availability_now(&sku(index)).await.expect("exists"));
    }
    all
}

/// A seeded run of sales, then power loss with a random torn write, then
/// recovery, several times over the same disk: every SKU's counts after
/// recovery equal the counts that were acknowledged before the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_repeated_crashes() {
    const SKUS: u64 = 6;
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut seed: u64 = 0x00c0_ffee;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.records, 0);
    for index in 0..SKUS {
        engine
            .create_sku(sku(index), SkuSettings { initial_units: 30, ..SkuSettings::default() }, operation())
            .await
            .expect("created");
    }
    let mut engine = engine;
    let mut order_number = 0;
    let mut recovered_from_snapshots = 0;
    for round in 0..5 {
        for _ in 0..40 {
            order_number += 1;
            let order = format!("o{order_number}");
            let lines = [(next(SKUS), 1 + next(2) as u32), (next(SKUS), 1)];
            match engine.reserve(request(&order, &lines)).await {
                Ok(held) => match next(3) {
                    0 => {
                        engine.commit(&held.order).await.expect("commit");
                    }
                    1 => {
                        engine.release(&held.order).await.expect("release");
                    }
                    _ => {}
                },
                Err(OrderError::Line { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
            clock.advance_ms(next(3_000));
        }
        let acknowledged = counts(&engine, SKUS).await;
        engine.shutdown().await;
        drop(engine);
        let fate =
            if next(2) == 0 { UnsyncedFate::Lost } else { UnsyncedFate::TornAfter { bytes: next(300) as usize } };
        storage.crash(fate);

        let (recovered, report) = open(&storage, &clock);
        recovered_from_snapshots += usize::from(report.from_snapshot);
        assert_eq!(report.skus, SKUS as usize, "round {round}");
        assert_eq!(counts(&recovered, SKUS).await, acknowledged, "round {round}: recovered state differs");
        for snapshot in &acknowledged {
            assert_eq!(snapshot.total(), 30);
        }
        engine = recovered;
    }
    assert!(recovered_from_snapshots > 0, "no restart began from a snapshot");
    engine.shutdown().await;
}

/// Once an fsync fails, the command waiting on it is not acknowledged, nor
/// anything after it; after a restart the state is the acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_acknowledges_nothing_more() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (engine, _) = open(&storage, &clock);
    engine
        .create_sku(sku(0), SkuSettings { initial_units: 10, ..SkuSettings::default() }, operation())
        .await
        .expect("created");
    let held = engine.reserve(request("a", &[(0, 2)])).await.expect("held");
    engine.commit(&held.order).await.expect("committed");
    let acknowledged = counts(&engine, 1).await;

    storage.fail_syncs_after(0);
    assert_eq!(engine.reserve(request("b", &[(0, 1)])).await, Err(OrderError::Unavailable));
    assert_eq!(engine.reserve(request("c", &[(0, 1)])).await, Err(OrderError::Unavailable));
    assert_eq!(engine.add_stock(&sku(0), 5, operation()).await, Err(EngineError::Unavailable));
    engine.shutdown().await;
    drop(engine);

    storage.crash(UnsyncedFate::Lost);
    let (recovered, _) = open(&storage, &clock);
    assert_eq!(counts(&recovered, 1).await, acknowledged);
    recovered.shutdown().await;
}

/// The state a restart would replay to, in canonical snapshot bytes.
fn replayed(storage: &MemoryStorage) -> Vec<u8> {
    let rules = ReplayRules { partition_count: config().partition_count, limits_unrecorded: config().limits };
    replay_log(storage, &PathBuf::from("/data/log"), &rules).expect("replays").snapshot().encode()
}

/// Replaying the same log gives the same state, byte for byte, whether it
/// is replayed twice, through a restart, or from a snapshot plus the log
/// after it; and the engine serves exactly that state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_repeatable_byte_for_byte() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (engine, _) = open(&storage, &clock);
    for index in 0..3 {
        engine
            .create_sku(sku(index), SkuSettings { initial_units: 400, ..SkuSettings::default() }, operation())
            .await
            .expect("created");
    }
    for order in 0..300u64 {
        if let Ok(held) = engine.reserve(request(&format!("o{order}"), &[(order % 3, 1 + (order % 2) as u32)])).await {
            match order % 3 {
                0 => drop(engine.commit(&held.order).await.expect("committed")),
                1 => drop(engine.release(&held.order).await.expect("released")),
                _ => {}
            }
        }
        clock.advance_ms(50);
    }
    let served = counts(&engine, 3).await;
    let stats = engine.log_stats().expect("durable");
    engine.shutdown().await;
    drop(engine);
    assert!(stats.snapshots > 0, "the run was long enough for snapshots: {stats:?}");
    assert_eq!(stats.snapshot_failures, 0);

    storage.crash(UnsyncedFate::Lost);
    let first = replayed(&storage);
    assert_eq!(replayed(&storage), first, "two replays differ");
    let (engine, report) = open(&storage, &clock);
    assert!(report.from_snapshot, "{report:?}");
    assert_eq!(counts(&engine, 3).await, served, "the engine serves what was acknowledged");
    engine.shutdown().await;
    drop(engine);
    assert_eq!(replayed(&storage), first, "a restart changed the replayed state");
}

/// Two engines never share a data directory.
#[tokio::test]
async fn a_second_engine_on_the_same_data_is_refused() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (first, _) = open(&storage, &clock);
    let refused = Engine::open(config(), clock.clone(), durability(&storage));
    assert!(matches!(refused, Err(flashstock_engine::OpenError::Locked(_))), "{refused:?}");
    first.shutdown().await;
    let (second, _) = open(&storage, &clock);
    second.shutdown().await;
}

/// Orders outlive a restart: the directory is rebuilt from the SKUs'
/// reservations, so held orders can be committed or released, settled ones
/// answer retries with their first answer, and a retried reserve (lines in
/// any order) finds its reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_outlive_a_restart() {
    let (storage, clock, engine) = engine_with_skus(3, 20).await;
    let single = engine.reserve(request("single", &[(0, 2)])).await.expect("held");
    let multi = engine.reserve(request("multi", &[(1, 1), (2, 3)])).await.expect("held");
    let paid = engine.reserve(request("paid", &[(0, 1), (1, 1)])).await.expect("held");
    engine.commit(&paid.order).await.expect("committed");
    let cancelled = engine.reserve(request("cancelled", &[(2, 2)])).await.expect("held");
    engine.release(&cancelled.order).await.expect("released");
    let before = counts(&engine, 3).await;
    engine.shutdown().await;
    drop(engine);
    storage.crash(UnsyncedFate::Lost);

    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.orders, 4);
    assert_eq!(counts(&engine, 3).await, before);
    // A retried reserve, lines in another order, is the same reservation.
    let retried = engine.reserve(request("multi", &[(2, 3), (1, 1)])).await.expect("same order");
    assert_eq!(retried.lines.iter().map(|line| line.units).sum::<u32>(), 4);
    assert_eq!(engine.reserve(request("multi", &[(2, 1)])).await, Err(OrderError::IdempotencyConflict));

    assert!(engine.commit(&paid.order).await.expect("first answer").replayed);
    assert!(engine.release(&cancelled.order).await.expect("first answer").replayed);
    assert_eq!(engine.release(&paid.order).await, Err(OrderError::AlreadyCommitted));
    let sold = engine.commit(&single.order).await.expect("commit after restart");
    assert_eq!(sold.lines[0].units, 2);
    let sold = engine.commit(&multi.order).await.expect("multi-line commit after restart");
    assert_eq!(sold.lines.iter().map(|line| line.units).sum::<u32>(), 4);
    let after = counts(&engine, 3).await;
    assert_eq!(after.iter().map(|counts| counts.held).sum::<u64>(), 0);
    assert_eq!(after.iter().map(|counts| counts.sold).sum::<u64>(), 2 + 2 + 4);
    engine.shutdown().await;
}

/// A writer bound of zero is a configuration error, not a panic.
#[tokio::test]
async fn bad_durability_settings_are_typed_errors() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(0));
    let mut settings = durability(&storage);
    settings.writer.round_appends_max = 0;
    let refused = Engine::open(config(), clock, settings);
    assert!(
        matches!(&refused, Err(flashstock_engine::OpenError::Config(invalid)) if invalid.field == "round_appends_max"),
        "{refused:?}"
    );
}

/// An answer a buyer received, in the order received.
#[derive(Debug, Clone)]
enum Acknowledged {
    Held(OrderId, u32),
    Committed(OrderId, u32),
    Released(OrderId),
}

/// Power fails in the middle of a sale, at a seeded moment, while buyers
/// are still waiting for answers: everything acknowledged before that
/// moment is in the recovered state (held orders still held, sales sold,
/// releases released), and every SKU still adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_sale_keeps_every_answer_given_before_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    const SKUS: u64 = 5;
    const BUYERS: u64 = 8;
    const UNITS: u64 = 60;
    let mut seed: u64 = 0x0bad_5eed;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    for run in 0..6 {
        let storage = MemoryStorage::new();
        let clock = Arc::new(ManualClock::new(1_000_000));
        let (engine, _) = open(&storage, &clock);
        for index in 0..SKUS {
            let settings = SkuSettings { initial_units: UNITS, ..SkuSettings::default() };
            engine.create_sku(sku(index), settings, operation()).await.expect("created");
        }
        let acknowledged: Arc<Mutex<Vec<Acknowledged>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let buyers: Vec<_> = (0..BUYERS)
            .map(|buyer| {
                let (engine, acknowledged, stop) = (engine.clone(), acknowledged.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut choice = run * 7_919 + buyer * 104_729 + 1;
                    let mut pick = move |bound: u64| {
                        choice = choice.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        (choice >> 33) % bound
                    };
                    for attempt in 0..150 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let order = format!("run{run}-buyer{buyer}-{attempt}");
                        let first = pick(SKUS);
                        let lines: Vec<(u64, u32)> = if pick(3) == 0 {
                            vec![(first, 1), ((first + 1 + pick(SKUS - 1)) % SKUS, 1)]
                        } else {
                            vec![(first, 1 + pick(2) as u32)]
                        };
                        let units: u32 = lines.iter().map(|line| line.1).sum();
                        let Ok(held) = engine.reserve(request(&order, &lines)).await else { continue };
                        let record = |answer| acknowledged.lock().expect("lock").push(answer);
                        record(Acknowledged::Held(held.order.clone(), units));
                        match pick(3) {
                            0 if engine.commit(&held.order).await.is_ok() => {
                                record(Acknowledged::Committed(held.order, units));
                            }
                            1 if engine.release(&held.order).await.is_ok() => {
                                record(Acknowledged::Released(held.order));
                            }
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        // Let the sale run until a seeded number of answers (bounded in time).
        let target = 5 + next(200) as usize;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while acknowledged.lock().expect("lock").len() < target
            && std::time::Instant::now() < deadline
            && !buyers.iter().all(|buyer| buyer.is_finished())
        {
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        let fate = match next(3) {
            0 => UnsyncedFate::Lost,
            1 => UnsyncedFate::TornAfter { bytes: next(400) as usize },
            // Pages of the last write reaching the disk in any order.
            _ => UnsyncedFate::SeededPages { seed: next(u64::MAX) },
        };
        // Every answer in the list was received before the disk is copied.
        let (disk, answers) = {
            let answers = acknowledged.lock().expect("lock");
            (storage.crashed_copy(fate), answers.clone())
        };
        stop.store(true, Ordering::Relaxed);
        for buyer in buyers {
            buyer.await.expect("buyer");
        }
        engine.shutdown().await;
        drop(engine);

        let (recovered, _) = open(&disk, &clock);
        let mut sold_at_least = 0;
        for answer in &answers {
            let status_of = |order: &OrderId| recovered.order_status(order);
            match answer {
                Acknowledged::Held(order, units) => {
                    let status = status_of(order).unwrap_or_else(|| panic!("run {run}: held order {order} lost"));
                    if let OrderStatus::Held(reservation) = &status {
                        assert_eq!(reservation.lines.iter().map(|line| line.units).sum::<u32>(), *units);
                    }
                    assert!(!matches!(status, OrderStatus::Expired { .. }), "run {run}: {order} {status:?}");
                }
                Acknowledged::Committed(order, units) => {
                    match status_of(order) {
                        Some(OrderStatus::Committed(settlement)) => {
                            assert_eq!(settlement.lines.iter().map(|line| line.units).sum::<u32>(), *units);
                        }
                        other => panic!("run {run}: acknowledged commit of {order} is {other:?}"),
                    }
                    sold_at_least += u64::from(*units);
                }
                Acknowledged::Released(order) => {
                    let status = status_of(order);
                    assert!(matches!(status, Some(OrderStatus::Released(_))), "run {run}: {order} is {status:?}");
                }
            }
        }
        let after = counts(&recovered, SKUS).await;
        assert!(after.iter().all(|counts| counts.total() == UNITS), "run {run}: {after:?}");
        assert!(after.iter().map(|counts| counts.sold).sum::<u64>() >= sold_at_least, "run {run}");
        recovered.shutdown().await;
    }
}

fn transaction_lines(skus: &[&str]) -> Vec<TransactionLine> {
    skus.iter().map(|sku| TransactionLine { sku: SkuId::new(*sku).expect("valid id"), units: None }).collect()
}

/// A multi-line commit cut off by a crash is finished by recovery: decided
/// means every line sold, undecided means every prepared line gets its TTL
/// back (and expires if its time passed while the node was down). Never
/// some lines sold and others not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_a_transaction_the_crash_cut_off() {
    let (storage, clock, engine) = engine_with_skus(2, 10).await;
    let decided = engine.reserve(request("decided", &[(0, 2), (1, 3)])).await.expect("held");
    let undecided = engine.reserve(request("undecided", &[(0, 1), (1, 1)])).await.expect("held");
    let early = engine.reserve(request("early", &[(0, 1), (1, 1)])).await.expect("held");
    for (order, decide) in [(&decided.order, true), (&undecided.order, false)] {
        engine.begin_transaction(order, transaction_lines(&["sku-0", "sku-1"])).await.expect("begun");
        engine.prepare(order).await.expect("prepared");
        if decide {
            engine.decide_transaction(order).await.expect("decided");
        }
    }
    // Begun, and the crash came before any line was prepared.
    engine.begin_transaction(&early.order, transaction_lines(&["sku-0", "sku-1"])).await.expect("begun");
    engine.shutdown().await;
    drop(engine);
    storage.crash(UnsyncedFate::Lost);

    // The node stays down past every hold's TTL.
    clock.advance_ms(120_000);
    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.transactions, 3);
    assert!(engine.take_recovered_transactions().is_empty(), "every line is on this engine");
    assert!(
        matches!(engine.order_status(&decided.order), Some(OrderStatus::Committed(settlement)) if settlement.lines.iter().map(|line| line.units).sum::<u32>() == 5),
        "{:?}",
        engine.order_status(&decided.order)
    );
    assert!(matches!(engine.order_status(&undecided.order), Some(OrderStatus::Expired { .. })));
    assert!(matches!(engine.order_status(&early.order), Some(OrderStatus::Expired { .. })));
    assert!(engine.commit(&decided.order).await.expect("the decision's answer").replayed);
    assert!(matches!(engine.commit(&undecided.order).await, Err(OrderError::Expired { .. })));
    let after = counts(&engine, 2).await;
    assert_eq!(
        after,
        vec![StockSnapshot { available: 8, held: 0, sold: 2 }, StockSnapshot { available: 7, held: 0, sold: 3 }]
    );
    engine.shutdown().await;
    drop(engine);

    // What recovery did is durable: the next start finds nothing open.
    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.transactions, 0);
    assert_eq!(counts(&engine, 2).await, after);
    engine.shutdown().await;
}

/// A coordinator's transaction with lines on other members: recovery does
/// this engine's lines and hands the rest to the caller, which ends the
/// transaction once it has carried them out; an undecided one before its
/// TTL gives the order back as held, and a new commit then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_elsewhere_are_handed_to_the_caller_and_held_orders_commit_again() {
    let (storage, clock, engine) = engine_with_skus(2, 10).await;
    let spanning = engine.reserve(request("spanning", &[(0, 2)])).await.expect("held");
    let retried = engine.reserve(request("retried", &[(0, 1), (1, 1)])).await.expect("held");
    engine.begin_transaction(&spanning.order, transaction_lines(&["sku-0", "remote-sku"])).await.expect("begun");
    engine.prepare(&spanning.order).await.expect("prepared");
    engine.decide_transaction(&spanning.order).await.expect("decided");
    engine.begin_transaction(&retried.order, transaction_lines(&["sku-0", "sku-1"])).await.expect("begun");
    engine.prepare(&retried.order).await.expect("prepared");
    engine.shutdown().await;
    drop(engine);
    storage.crash(UnsyncedFate::Lost);

    clock.advance_ms(1_000);
    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.transactions, 2);
    let open_elsewhere = engine.take_recovered_transactions();
    assert_eq!(open_elsewhere.len(), 1);
    assert_eq!(open_elsewhere[0].0, spanning.order);
    assert!(open_elsewhere[0].1.committed);
    assert!(matches!(engine.order_status(&spanning.order), Some(OrderStatus::Committed(_))));
    // The undecided one is held again, with its TTL, and commits anew.
    assert!(matches!(engine.order_status(&retried.order), Some(OrderStatus::Held(_))));
    engine.commit(&retried.order).await.expect("a new transaction commits it");
    engine.end_transaction(&spanning.order).await.expect("ended");
    engine.shutdown().await;
    drop(engine);

    let (engine, report) = open(&storage, &clock);
    assert_eq!(report.transactions, 0);
    assert!(engine.take_recovered_transactions().is_empty());
    assert_eq!(
        counts(&engine, 2).await,
        vec![StockSnapshot { available: 7, held: 0, sold: 3 }, StockSnapshot { available: 9, held: 0, sold: 1 }]
    );
    engine.shutdown().await;
}

/// The limits of the sale in `a_changed_limit_applies_to_new_commands_only`:
/// every logged command sits at the edge of one of them.
fn edge_limits() -> Limits {
    Limits {
        line_units_max: 4,
        hold_ttl_ms_min: 1_000,
        hold_ttl_ms_max: 600_000,
        holds_per_sku_max: 3,
        finished_per_sku_max: 4,
        idempotency_window_ms: 2_400_000,
        stock_units_max: 100,
        lines_per_order_max: 4,
    }
}

fn named(name: &str) -> SkuId {
    SkuId::new(name).expect("valid id")
}

fn order_of(order: &str, lines: &[(&str, u32)], ttl_ms: u64) -> OrderRequest {
    OrderRequest {
        order: OrderId::new(order).expect("valid id"),
        buyer: BuyerId::new("buyer").expect("valid id"),
        lines: lines.iter().map(|&(sku, units)| Line { sku: named(sku), quantity: Quantity::Exactly(units) }).collect(),
        ttl_ms,
    }
}

const EDGE_SKUS: [&str; 4] = ["tv", "phone", "cable", "lamp"];

/// A sale whose every command sits at the edge of a limit of
/// [`edge_limits`]: replayed under any other limit, some answer would
/// change (the scenarios: a reserve at the longest TTL, the
/// shortest TTL, the most units on a line, the most holds on a SKU, a SKU
/// created at the most stock, an order id reused once its first hold was
/// forgotten by the window, reservations forgotten by count).
async fn edge_sale(engine: &Engine, clock: &ManualClock) {
    for (sku, units) in [("tv", 100), ("phone", 10), ("cable", 20), ("lamp", 10)] {
        let settings = SkuSettings { initial_units: units, ..SkuSettings::default() };
        engine.create_sku(named(sku), settings, operation()).await.expect("created");
    }
    engine.remove_stock(&named("tv"), 10, operation()).await.expect("removed");
    engine.add_stock(&named("tv"), 10, operation()).await.expect("added back to the most stock");
    let long = engine.reserve(order_of("long", &[("tv", 4)], 600_000)).await.expect("longest TTL, most units");
    engine.commit(&long.order).await.expect("committed");
    let short = engine.reserve(order_of("short", &[("tv", 1)], 1_000)).await.expect("shortest TTL");
    engine.commit(&short.order).await.expect("committed");
    for hold in ["hold-1", "hold-2", "hold-3"] {
        engine.reserve(order_of(hold, &[("phone", 1)], 600_000)).await.expect("up to the most holds");
    }
    for number in 0..6 {
        let order = format!("cable-{number}");
        engine.reserve(order_of(&order, &[("cable", 1)], 60_000)).await.expect("held");
        engine.release(&OrderId::new(&order).expect("valid")).await.expect("released");
        clock.advance_ms(10);
    }
    let spanning = engine.reserve(order_of("pair", &[("tv", 2), ("cable", 2)], 60_000)).await.expect("held");
    engine.commit_fewer(&spanning.order, &[(named("cable"), 1)]).await.expect("committed");
    engine.reserve(order_of("reused", &[("lamp", 1)], 60_000)).await.expect("held");
    engine.release(&OrderId::new("reused").expect("valid")).await.expect("released");
    clock.advance_ms(2_400_001);
    let again = engine.reserve(order_of("reused", &[("lamp", 1)], 60_000)).await.expect("a new order, same id");
    assert!(again.expires_at_ms > clock.now_ms(), "a new hold, not the forgotten one");
    engine.commit(&again.order).await.expect("committed");
}

/// Every SKU and open transaction of the log, in canonical bytes, without
/// the limits or the position (which a restart with other limits changes).
fn replayed_state_without_limits(storage: &MemoryStorage) -> Vec<u8> {
    let rules = ReplayRules { partition_count: config().partition_count, limits_unrecorded: Limits::default() };
    let snapshot = replay_log(storage, &PathBuf::from("/data/log"), &rules).expect("replays").snapshot();
    Snapshot { last_sequence: 0, limits: None, ..snapshot }.encode()
}

/// Raises (`true`) or lowers one limit.
type LimitChange = Box<dyn Fn(&mut Limits, bool)>;

/// A limit changed across a restart applies to new commands only: for each
/// limit, raised and lowered, the recovered state equals the acknowledged
/// one byte for byte and every SKU serves the same counts (before the fix,
/// replay re-ran every command under today's limits: a lowered TTL limit
/// turned the sale of `long` into nothing, a lowered `stock_units_max`
/// stopped the engine from opening, a raised window turned `reused`'s new
/// hold into a retry of the released one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_limit_applies_to_new_commands_only() {
    let base = edge_limits();
    let changed: Vec<(&str, LimitChange)> = vec![
        (
            "line_units_max",
            Box::new(|l, up| l.line_units_max = if up { l.line_units_max * 2 } else { l.line_units_max / 2 }),
        ),
        (
            "hold_ttl_ms_min",
            Box::new(|l, up| l.hold_ttl_ms_min = if up { l.hold_ttl_ms_min * 2 } else { l.hold_ttl_ms_min / 2 }),
        ),
        (
            "hold_ttl_ms_max",
            Box::new(|l, up| l.hold_ttl_ms_max = if up { l.hold_ttl_ms_max * 2 } else { l.hold_ttl_ms_max / 2 }),
        ),
        ("holds_per_sku_max", Box::new(|l, up| l.holds_per_sku_max = if up { l.holds_per_sku_max * 2 } else { 1 })),
        ("finished_per_sku_max", Box::new(|l, up| l.finished_per_sku_max = if up { 64 } else { 1 })),
        (
            "idempotency_window_ms",
            Box::new(|l, up| l.idempotency_window_ms = if up { 100_000_000 } else { l.hold_ttl_ms_max }),
        ),
        (
            "stock_units_max",
            Box::new(|l, up| l.stock_units_max = if up { l.stock_units_max * 2 } else { l.stock_units_max / 2 }),
        ),
        ("lines_per_order_max", Box::new(|l, up| l.lines_per_order_max = if up { 8 } else { 1 })),
    ];
    for (field, change) in &changed {
        for raised in [true, false] {
            let case = format!("{field} {}", if raised { "raised" } else { "lowered" });
            let storage = MemoryStorage::new();
            let clock = Arc::new(ManualClock::new(1_000_000));
            let before_config = EngineConfig { limits: base.clone(), ..config() };
            let (engine, _) = Engine::open(before_config, clock.clone(), durability(&storage)).expect("opens");
            edge_sale(&engine, &clock).await;
            let mut served = Vec::new();
            for sku in EDGE_SKUS {
                served.push(engine.availability_now(&named(sku)).await.expect("exists"));
            }
            engine.shutdown().await;
            drop(engine);
            let acknowledged = replayed_state_without_limits(&storage);

            let mut limits = base.clone();
            change(&mut limits, raised);
            assert_ne!(limits, base, "{case}: the limit changed");
            assert_eq!(limits.validate(), Ok(()), "{case}");
            let after_config = EngineConfig { limits: limits.clone(), ..config() };
            let opened = Engine::open(after_config.clone(), clock.clone(), durability(&storage));
            let (engine, _) = opened.unwrap_or_else(|error| panic!("{case}: does not open: {error}"));
            engine.shutdown().await;
            drop(engine);
            assert_eq!(replayed_state_without_limits(&storage), acknowledged, "{case}: the recovered state differs");

            // Opened again under the changed limits (the change was recorded
            // once), every SKU serves the acknowledged counts. (Commands from
            // here on are checked against the new limits, and may forget
            // more or fewer ended reservations: that is the change.)
            let (engine, report) = Engine::open(after_config, clock.clone(), durability(&storage)).expect("opens");
            assert_eq!(report.skus, EDGE_SKUS.len(), "{case}");
            for (sku, expected) in EDGE_SKUS.iter().zip(&served) {
                let counts = engine.availability_now(&named(sku)).await.expect("exists");
                assert_eq!(&counts, expected, "{case}: {sku} serves other counts after the restart");
            }
            engine.shutdown().await;
        }
    }
}

/// The new limits do apply to new commands after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowered_limits_refuse_new_commands_after_a_restart() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (engine, _) =
        Engine::open(EngineConfig { limits: edge_limits(), ..config() }, clock.clone(), durability(&storage))
            .expect("opens");
    edge_sale(&engine, &clock).await;
    engine.shutdown().await;
    drop(engine);
    let strict = Limits { hold_ttl_ms_max: 300_000, stock_units_max: 50, ..edge_limits() };
    let (engine, _) =
        Engine::open(EngineConfig { limits: strict, ..config() }, clock.clone(), durability(&storage)).expect("opens");
    let refused = engine.reserve(order_of("late", &[("lamp", 1)], 600_000)).await;
    assert!(
        matches!(refused, Err(OrderError::Line { error: SkuError::InvalidTtl { ttl_ms_max: 300_000, .. }, .. })),
        "{refused:?}"
    );
    let refused = engine.add_stock(&named("lamp"), 41, operation()).await;
    assert!(
        matches!(
            refused,
            Err(EngineError::Refused { error: SkuError::StockLimitExceeded { stock_units_max: 50 }, .. })
        ),
        "{refused:?}"
    );
    engine.reserve(order_of("late", &[("lamp", 1)], 300_000)).await.expect("within the new limits");
    engine.shutdown().await;
}

/// A hold still live when its engine stops (orderly, or by power loss) is
/// not counted as held once its TTL has passed after the restart: before
/// the fix the recovered SKU's published counts showed it held (held 2,
/// available 3) while a reserve of all 5 units succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_never_counts_an_expired_hold_after_a_restart() {
    for power_loss in [false, true] {
        let (storage, clock, engine) = engine_with_skus(1, 5).await;
        engine.reserve(request("walks-away", &[(0, 2)])).await.expect("held");
        assert_eq!(engine.availability(&sku(0)).await, Ok(StockSnapshot { available: 3, held: 2, sold: 0 }));
        engine.shutdown().await;
        drop(engine);
        if power_loss {
            storage.crash(UnsyncedFate::Lost);
        }
        clock.advance_ms(60_001);
        let (engine, _) = open(&storage, &clock);
        let counts = engine.availability(&sku(0)).await.expect("exists");
        assert_eq!(counts, StockSnapshot { available: 5, held: 0, sold: 0 }, "power loss: {power_loss}");
        engine.reserve(request("takes-all", &[(0, 5)])).await.expect("all five are there");
        engine.shutdown().await;
    }
}

/// After a log failure nothing is answered from memory that may not
/// survive: not the sold-out hint, not the published counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_log_failure_neither_the_hint_nor_the_counts_answer() {
    let (storage, _clock, engine) = engine_with_skus(1, 1).await;
    let held = engine.reserve(request("last", &[(0, 1)])).await.expect("held");
    storage.fail_syncs_after(0);
    // The sale of the last unit is applied in memory and published, and
    // never becomes durable: after a restart the unit is held again.
    assert_eq!(engine.commit(&held.order).await, Err(OrderError::Unavailable), "the failing write");
    assert_eq!(
        engine.reserve(request("b", &[(0, 1)])).await,
        Err(OrderError::Unavailable),
        "not SoldOut from the hint"
    );
    assert_eq!(engine.availability(&sku(0)).await, Err(EngineError::Unavailable));
    engine.shutdown().await;
}

/// A multi-line settle that ended on some lines only (here: a log in which
/// one line of an order was committed and the other is still held, as a
/// crash between two line settles used to leave it) is recorded with the
/// lines that did settle. Before the fix the order was marked released
/// with no settlement, and the next `order_status` (which the node's sweep
/// calls every second) hit an `expect` and aborted the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_ended_on_some_lines_only_has_a_settlement() {
    use flashstock_engine::log::record::LogRecord;
    use flashstock_engine::log::segments::SegmentedLog;
    use flashstock_engine::sku::ReserveLine;
    use flashstock_engine::SkuCommand;
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    {
        let (mut log, _) =
            SegmentedLog::open(Arc::new(storage.clone()), &PathBuf::from("/data/log"), durability(&storage).log)
                .expect("opens");
        let order = OrderId::new("split").expect("valid");
        let mut records = Vec::new();
        for index in 0..2 {
            let settings = SkuSettings { initial_units: 5, ..SkuSettings::default() };
            records.push(LogRecord::CreateSku { sku: sku(index), settings, now_ms: 1_000_000, operation: None });
            let line = ReserveLine {
                order: order.clone(),
                buyer: BuyerId::new("buyer").expect("valid"),
                quantity: Quantity::Exactly(1),
                ttl_ms: 60_000,
            };
            records.push(LogRecord::Apply { sku: sku(index), now_ms: 1_000_000, command: SkuCommand::Reserve(line) });
        }
        let commit = SkuCommand::Commit { order: order.clone(), units: None };
        records.push(LogRecord::Apply { sku: sku(0), now_ms: 1_000_001, command: commit });
        for record in &records {
            log.append(record).expect("appends");
        }
        log.flush().expect("durable");
    }
    let (engine, _) = open(&storage, &clock);
    let order = OrderId::new("split").expect("valid");
    let refused = engine.release(&order).await;
    assert!(matches!(refused, Err(OrderError::Line { error: SkuError::AlreadyCommitted, .. })), "{refused:?}");
    match engine.order_status(&order) {
        Some(OrderStatus::Released(settlement)) => {
            assert_eq!(settlement.lines.iter().map(|line| line.sku.clone()).collect::<Vec<_>>(), vec![sku(1)]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        counts(&engine, 2).await,
        vec![StockSnapshot { available: 4, held: 0, sold: 1 }, StockSnapshot { available: 5, held: 0, sold: 0 }]
    );
    engine.shutdown().await;
}
