//! `Engine::submit_batch`: every request answered once, as the awaited
//! entry points would answer it; what needs waiting given back untouched;
//! admission per SKU in one step; durable answers only once durable, and
//! none when the log fails.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashstock_engine::log::segments::LogConfig;
use flashstock_engine::log::storage::{MemoryStorage, UnsyncedFate};
use flashstock_engine::log::writer::WriterConfig;
use flashstock_engine::{
    BatchAnswer, BatchRequest, BatchSink, BuyerId, Durability, Engine, EngineConfig, Line, ManualClock, OrderError,
    OrderId, OrderRequest, OrderStatus, Quantity, SkuError, SkuId, SkuSettings, StockSnapshot,
};

/// Collects a batch's answers, each with its tag, in arrival order.
#[derive(Debug, Default)]
struct Answers {
    received: Mutex<Vec<(u64, BatchAnswer)>>,
}

impl BatchSink for Answers {
    fn answer(&self, tag: u64, answer: BatchAnswer) {
        self.received.lock().expect("lock").push((tag, answer));
    }
}

impl Answers {
    /// Waits (at most 5 s) until `count` answers arrived, then takes them,
    /// sorted by tag; a second answer to one tag fails the test.
    async fn take(&self, count: usize) -> Vec<(u64, BatchAnswer)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let arrived = self.received.lock().expect("lock").len();
            assert!(arrived <= count, "{arrived} answers, expected {count}");
            if arrived == count {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "only {arrived} of {count} answers arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut answers = std::mem::take(&mut *self.received.lock().expect("lock"));
        answers.sort_by_key(|(tag, _)| *tag);
        let mut tags: Vec<u64> = answers.iter().map(|(tag, _)| *tag).collect();
        tags.dedup();
        assert_eq!(tags.len(), answers.len(), "a request was answered twice: {answers:?}");
        answers
    }
}

fn sink() -> (Arc<Answers>, Arc<dyn BatchSink>) {
    let answers = Arc::new(Answers::default());
    (answers.clone(), answers)
}

fn operation() -> flashstock_engine::OperationId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    flashstock_engine::OperationId::new(format!("operation-{number}")).expect("valid")
}

fn sku(name: &str) -> SkuId {
    SkuId::new(name).expect("valid id")
}

fn order(name: &str) -> OrderId {
    OrderId::new(name).expect("valid id")
}

fn reserve(order_id: &str, lines: &[(&str, u32)]) -> BatchRequest {
    BatchRequest::Reserve(OrderRequest {
        order: order(order_id),
        buyer: BuyerId::new(format!("buyer-{order_id}")).expect("valid id"),
        lines: lines.iter().map(|(name, units)| Line { sku: sku(name), quantity: Quantity::Exactly(*units) }).collect(),
        ttl_ms: 60_000,
    })
}

fn commit(order_id: &str) -> BatchRequest {
    BatchRequest::Commit { order: order(order_id), fewer: Vec::new() }
}

fn release(order_id: &str) -> BatchRequest {
    BatchRequest::Release { order: order(order_id) }
}

fn tagged(requests: Vec<BatchRequest>) -> Vec<(u64, BatchRequest)> {
    requests.into_iter().enumerate().map(|(tag, request)| (tag as u64, request)).collect()
}

async fn create(engine: &Engine, name: &str, units: u64) {
    let settings = SkuSettings { initial_units: units, ..SkuSettings::default() };
    engine.create_sku(sku(name), settings, operation()).await.expect("created");
}

fn stock(available: u64, held: u64, sold: u64) -> StockSnapshot {
    StockSnapshot { available, held, sold }
}

fn memory_engine(config: EngineConfig) -> Engine {
    Engine::new(config, Arc::new(ManualClock::new(1_000_000))).expect("valid config")
}

fn sold_out(answer: &BatchAnswer) -> bool {
    matches!(answer, BatchAnswer::Reserved(Err(OrderError::Line { error: SkuError::SoldOut { .. }, .. })))
}

/// A batch is answered request by request as the awaited path would:
/// three units for five buyers hold three and sell out two; bad input is
/// refused at once; an order of several lines and a release the engine
/// does not know come back untouched, in their order.
#[tokio::test]
async fn a_batch_answers_each_request_once_and_gives_back_what_must_wait() {
    let engine = memory_engine(EngineConfig::default());
    create(&engine, "tv", 3).await;
    create(&engine, "radio", 10).await;
    let (answers, sink) = sink();

    let mut requests: Vec<BatchRequest> = (0..5).map(|index| reserve(&format!("o{index}"), &[("tv", 1)])).collect();
    requests.push(reserve("several", &[("tv", 1), ("radio", 1)]));
    requests.push(release("nobody-knows"));
    requests.push(reserve("empty", &[]));
    requests.push(reserve("ghost", &[("no-such-sku", 1)]));
    let given_back = engine.submit_batch(tagged(requests), &sink);
    assert_eq!(given_back, vec![(5, reserve("several", &[("tv", 1), ("radio", 1)])), (6, release("nobody-knows"))]);
    assert_eq!(engine.order_status(&order("several")), None, "given back untouched");

    let answered = answers.take(7).await;
    let held = answered.iter().filter(|(_, answer)| matches!(answer, BatchAnswer::Reserved(Ok(_)))).count();
    let refused = answered.iter().filter(|(_, answer)| sold_out(answer)).count();
    assert_eq!((held, refused), (3, 2), "{answered:?}");
    assert_eq!(answered[5], (7, BatchAnswer::Reserved(Err(OrderError::NoLines))));
    assert!(matches!(answered[6], (8, BatchAnswer::Reserved(Err(OrderError::UnknownSku { .. })))));
    assert_eq!(engine.availability_now(&sku("tv")).await, Ok(stock(0, 3, 0)));

    // Settles and a replay in the next batch.
    let held_orders: Vec<String> = answered
        .iter()
        .filter_map(|(_, answer)| match answer {
            BatchAnswer::Reserved(Ok(reservation)) => Some(reservation.order.as_str().to_owned()),
            _ => None,
        })
        .collect();
    let replay = engine.order_status(&order(&held_orders[0]));
    let requests = vec![
        commit(&held_orders[0]),
        release(&held_orders[1]),
        BatchRequest::Commit { order: order(&held_orders[2]), fewer: vec![(sku("radio"), 1)] },
        reserve(&held_orders[0], &[("tv", 1)]),
        commit(&held_orders[0]),
    ];
    assert_eq!(engine.submit_batch(tagged(requests), &sink), Vec::new());
    let answered = answers.take(5).await;
    assert!(matches!(&answered[0].1, BatchAnswer::Committed(Ok(settlement)) if !settlement.replayed));
    assert!(matches!(&answered[1].1, BatchAnswer::Released(Ok(settlement)) if settlement.lines[0].units == 1));
    assert_eq!(answered[2].1, BatchAnswer::Committed(Err(OrderError::NotInOrder { sku: sku("radio") })));
    let Some(OrderStatus::Held(first)) = replay else { panic!("held: {replay:?}") };
    assert_eq!(answered[3].1, BatchAnswer::Reserved(Ok(first)), "a retry is the same reservation");
    // The second commit of the same order in one batch found it settling.
    assert_eq!(answered[4].1, BatchAnswer::Committed(Err(OrderError::Busy { retry_after_ms: 1 })));
    assert_eq!(engine.availability_now(&sku("tv")).await, Ok(stock(1, 1, 1)));
    assert!(matches!(engine.commit(&order(&held_orders[2])).await, Ok(settlement) if settlement.lines[0].units == 1));
}

/// A SKU's gate admits a batch's requests in one step: beyond its limit a
/// reserve is refused `Busy` and leaves no trace, and a settle is given
/// back with its order where it was, for the awaited path to finish.
#[tokio::test]
async fn a_full_gate_refuses_reserves_and_gives_back_settles() {
    let config = EngineConfig { in_flight_per_sku_max: 2, batch_max: 2, ..EngineConfig::default() };
    let engine = memory_engine(config);
    create(&engine, "tv", 10).await;
    let (answers, sink) = sink();

    let requests = (0..4).map(|index| reserve(&format!("o{index}"), &[("tv", 1)])).collect();
    assert_eq!(engine.submit_batch(tagged(requests), &sink), Vec::new());
    let answered = answers.take(4).await;
    let busy =
        answered.iter().filter(|(_, answer)| matches!(answer, BatchAnswer::Reserved(Err(OrderError::Busy { .. }))));
    let busy_tags: Vec<u64> = busy.map(|(tag, _)| *tag).collect();
    assert_eq!(busy_tags, vec![2, 3], "the first two fit the gate: {answered:?}");
    for tag in busy_tags {
        assert_eq!(engine.order_status(&order(&format!("o{tag}"))), None, "a refused order leaves no trace");
    }

    let more = (2..4).map(|index| reserve(&format!("o{index}"), &[("tv", 1)])).collect();
    assert_eq!(engine.submit_batch(tagged(more), &sink), Vec::new());
    assert_eq!(answers.take(2).await.len(), 2);
    let settles = vec![commit("o0"), commit("o1"), release("o2"), commit("o3")];
    let given_back = engine.submit_batch(tagged(settles), &sink);
    assert_eq!(given_back, vec![(2, release("o2")), (3, commit("o3"))]);
    assert_eq!(engine.order_status(&order("o2")).map(|status| matches!(status, OrderStatus::Held(_))), Some(true));
    assert!(engine.release(&order("o2")).await.is_ok(), "a given-back settle finishes on the awaited path");
    assert!(engine.commit(&order("o3")).await.is_ok());
    let answered = answers.take(2).await;
    assert!(answered.iter().all(|(_, answer)| matches!(answer, BatchAnswer::Committed(Ok(_)))), "{answered:?}");
    assert_eq!(engine.availability_now(&sku("tv")).await, Ok(stock(7, 0, 3)));
}

fn durability(storage: &MemoryStorage) -> Durability {
    Durability {
        storage: Arc::new(storage.clone()),
        data_directory: PathBuf::from("/data"),
        log: LogConfig { segment_bytes_max: 4096, snapshot_log_bytes: 8192 },
        writer: WriterConfig { round_appends_max: 256 },
    }
}

fn open(storage: &MemoryStorage, clock: &Arc<ManualClock>) -> Engine {
    let config = EngineConfig { partition_count: 4, ..EngineConfig::default() };
    Engine::open(config, clock.clone(), durability(storage)).expect("opens").0
}

/// What a durable engine answered through the sink survives a crash that
/// loses every unsynced write; once an fsync fails, the batch's requests
/// are answered `Unavailable`, their orders forgotten, and nothing of them
/// is found after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_batch_answers_survive_and_a_failed_log_answers_none() {
    let storage = MemoryStorage::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = open(&storage, &clock);
    create(&engine, "tv", 5).await;
    let (answers, sink) = sink();

    let requests = (0..3).map(|index| reserve(&format!("o{index}"), &[("tv", 1)])).collect();
    assert_eq!(engine.submit_batch(tagged(requests), &sink), Vec::new());
    assert!(answers.take(3).await.iter().all(|(_, answer)| matches!(answer, BatchAnswer::Reserved(Ok(_)))));
    assert_eq!(engine.submit_batch(tagged(vec![commit("o0")]), &sink), Vec::new());
    assert!(matches!(answers.take(1).await[0].1, BatchAnswer::Committed(Ok(_))));

    storage.fail_syncs_after(0);
    let requests = vec![reserve("late", &[("tv", 1)]), commit("o1")];
    assert_eq!(engine.submit_batch(tagged(requests), &sink), Vec::new());
    let answered = answers.take(2).await;
    assert_eq!(answered[0].1, BatchAnswer::Reserved(Err(OrderError::Unavailable)));
    assert_eq!(answered[1].1, BatchAnswer::Committed(Err(OrderError::Unavailable)));
    assert_eq!(engine.order_status(&order("late")), None);
    engine.shutdown().await;
    drop(engine);

    storage.crash(UnsyncedFate::Lost);
    let recovered = open(&storage, &clock);
    assert_eq!(recovered.availability_now(&sku("tv")).await, Ok(stock(2, 2, 1)));
    assert!(matches!(recovered.order_status(&order("o1")), Some(OrderStatus::Held(_))));
    assert_eq!(recovered.order_status(&order("late")), None);
    recovered.shutdown().await;
}
