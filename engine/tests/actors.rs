//! The engine through its actors: orders, idempotency, admission, expiry by
//! timer, passivation, the sold-out hint, and a concurrent stampede.

use std::sync::Arc;
use std::time::Duration;

use flashstock_engine::{
    BuyerId, Clock, Engine, EngineConfig, Limits, Line, ManualClock, OrderError, OrderId, OrderRequest, Quantity,
    SkuError, SkuId, SkuSettings, StockSnapshot, SystemClock,
};

/// A fresh operation id for each admin call (unique within the process).
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

fn request(order_id: &str, buyer: &str, lines: &[(&str, u32)]) -> OrderRequest {
    OrderRequest {
        order: order(order_id),
        buyer: BuyerId::new(buyer).expect("valid id"),
        lines: lines.iter().map(|(name, units)| Line { sku: sku(name), quantity: Quantity::Exactly(*units) }).collect(),
        ttl_ms: 60_000,
    }
}

fn engine_with(config: EngineConfig, clock: Arc<dyn Clock>) -> Engine {
    Engine::new(config, clock).expect("valid config")
}

fn manual_engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    (engine_with(EngineConfig::default(), clock.clone()), clock)
}

fn stock(available: u64, held: u64, sold: u64) -> StockSnapshot {
    StockSnapshot { available, held, sold }
}

/// Creates `sku` with `units` in stock, which must succeed.
async fn create(engine: &Engine, sku: SkuId, units: u64) {
    engine
        .create_sku(sku, SkuSettings { initial_units: units, ..SkuSettings::default() }, operation())
        .await
        .expect("created");
}

/// Polls `condition` every 10 ms for at most `limit`.
async fn eventually(limit: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn reserve_commit_release_and_their_retries() {
    let (engine, _clock) = manual_engine();
    create(&engine, sku("tv"), 10).await;

    let reservation = engine.reserve(request("o1", "alice", &[("tv", 3)])).await.expect("held");
    assert_eq!(reservation.lines[0].units, 3);
    assert_eq!(reservation.lines[0].stock, stock(7, 3, 0), "the answer carries the counts");
    assert_eq!(reservation.expires_at_ms, 1_000_000 + 60_000);

    // A retry returns the same reservation and takes nothing more.
    let retried = engine.reserve(request("o1", "alice", &[("tv", 3)])).await.expect("replayed");
    assert_eq!(retried, reservation);
    assert_eq!(engine.availability(&sku("tv")).await, Ok(stock(7, 3, 0)));
    // The same id with other content is refused.
    assert_eq!(engine.reserve(request("o1", "alice", &[("tv", 4)])).await, Err(OrderError::IdempotencyConflict));

    let committed = engine.commit(&order("o1")).await.expect("committed");
    assert_eq!((committed.lines[0].units, committed.lines[0].stock), (3, stock(7, 0, 3)));
    let again = engine.commit(&order("o1")).await.expect("replayed commit");
    assert!(again.replayed);
    assert_eq!(engine.release(&order("o1")).await, Err(OrderError::AlreadyCommitted));

    engine.reserve(request("o2", "bob", &[("tv", 2)])).await.expect("held");
    let released = engine.release(&order("o2")).await.expect("released");
    assert_eq!(released.lines[0].stock, stock(7, 0, 3));
    assert!(engine.release(&order("o2")).await.expect("replayed release").replayed);
    assert_eq!(engine.commit(&order("o2")).await, Err(OrderError::AlreadyReleased));
    assert_eq!(engine.commit(&order("nope")).await, Err(OrderError::UnknownReservation));
}

#[tokio::test]
async fn commit_of_fewer_units_returns_the_rest() {
    let (engine, _clock) = manual_engine();
    create(&engine, sku("tv"), 10).await;
    engine.reserve(request("o1", "alice", &[("tv", 4)])).await.expect("held");
    let settled = engine.commit_fewer(&order("o1"), &[(sku("tv"), 1)]).await.expect("committed");
    assert_eq!((settled.lines[0].units, settled.lines[0].stock), (1, stock(9, 0, 1)));
}

#[tokio::test]
async fn multi_line_orders_are_all_or_nothing() {
    let (engine, _clock) = manual_engine();
    create(&engine, sku("a"), 5).await;
    create(&engine, sku("b"), 1).await;

    let refused = engine.reserve(request("o1", "alice", &[("a", 2), ("b", 3)])).await;
    assert_eq!(
        refused,
        Err(OrderError::Line {
            index: 1,
            sku: sku("b"),
            error: SkuError::SoldOut { available: 1 },
            stock: stock(1, 0, 0)
        })
    );
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(5, 0, 0)), "line a was given back");

    // A refused order leaves no trace: the same id may try again.
    engine.add_stock(&sku("b"), 2, operation()).await.expect("added");
    let held = engine.reserve(request("o1", "alice", &[("a", 2), ("b", 3)])).await.expect("held");
    assert_eq!(held.lines.len(), 2);

    // Lines naming one SKU twice are merged, not double-counted.
    let merged = engine.reserve(request("o2", "bob", &[("a", 1), ("a", 2)])).await.expect("held");
    assert_eq!(merged.lines.len(), 1);
    assert_eq!(merged.lines[0].stock, stock(0, 5, 0));

    engine.commit(&order("o1")).await.expect("committed");
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(0, 3, 2)));
    assert_eq!(engine.availability(&sku("b")).await, Ok(stock(0, 0, 3)));

    let unknown = engine.reserve(request("o3", "carol", &[("zz", 1), ("a", 1)])).await;
    assert_eq!(unknown, Err(OrderError::UnknownSku { index: 0, sku: sku("zz") }));
}

#[tokio::test]
async fn multi_line_commit_after_expiry_releases_every_line() {
    let (engine, clock) = manual_engine();
    for name in ["a", "b"] {
        create(&engine, sku(name), 5).await;
    }
    engine.reserve(request("o1", "alice", &[("a", 1), ("b", 1)])).await.expect("held");
    clock.advance_ms(60_000);
    assert_eq!(engine.commit(&order("o1")).await, Err(OrderError::Expired { expired_at_ms: 1_060_000 }));
    for name in ["a", "b"] {
        assert_eq!(engine.availability(&sku(name)).await, Ok(stock(5, 0, 0)));
    }
    // One millisecond before expiry is still in time: the lines are
    // prepared first, and a prepared hold waits for the decision.
    let held = engine.reserve(request("o2", "bob", &[("a", 2), ("b", 1)])).await.expect("held");
    clock.advance_ms(held.expires_at_ms - 1 - 1_060_000);
    let settled = engine.commit(&order("o2")).await.expect("committed in time");
    assert_eq!(settled.lines.iter().map(|line| line.units).collect::<Vec<_>>(), vec![2, 1]);
    clock.advance_ms(10);
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(3, 0, 2)));
    assert_eq!(engine.availability(&sku("b")).await, Ok(stock(4, 0, 1)));
}

#[tokio::test]
async fn single_line_commit_after_expiry_is_expired() {
    let (engine, clock) = manual_engine();
    create(&engine, sku("a"), 5).await;
    engine.reserve(request("o1", "alice", &[("a", 2)])).await.expect("held");
    clock.advance_ms(60_000);
    assert_eq!(engine.commit(&order("o1")).await, Err(OrderError::Expired { expired_at_ms: 1_060_000 }));
    assert_eq!(engine.release(&order("o1")).await, Err(OrderError::Expired { expired_at_ms: 1_060_000 }));
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(5, 0, 0)));
}

#[tokio::test]
async fn admin_errors_are_typed_and_change_nothing() {
    let (engine, clock) = manual_engine();
    create(&engine, sku("a"), 5).await;
    assert!(matches!(
        engine.create_sku(sku("a"), SkuSettings::default(), operation()).await,
        Err(flashstock_engine::EngineError::SkuExists { .. })
    ));
    engine.reserve(request("o1", "alice", &[("a", 4)])).await.expect("held");
    let refused = engine.remove_stock(&sku("a"), 2, operation()).await;
    assert!(matches!(
        refused,
        Err(flashstock_engine::EngineError::Refused { error: SkuError::NotEnoughUnsoldStock { available: 1 }, .. })
    ));
    engine.set_buyer_limit(&sku("a"), Some(1), operation()).await.expect("limit set");
    engine.release(&order("o1")).await.expect("released");
    let over = engine.reserve(request("o2", "alice", &[("a", 2)])).await;
    assert!(matches!(
        over,
        Err(OrderError::Line { error: SkuError::LimitExceeded { units_per_buyer_max: 1, .. }, .. })
    ));
    engine.open_sale(&sku("a"), clock.now_ms() + 1_000, operation()).await.expect("scheduled");
    let early = engine.reserve(request("o3", "bob", &[("a", 1)])).await;
    assert!(matches!(early, Err(OrderError::Line { error: SkuError::NotOpen { .. }, .. })));
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(5, 0, 0)));
}

/// On one thread nothing runs until a task awaits, so every request below is
/// admitted or refused before the actor applies any: exactly the bound is
/// admitted and the rest are told `Busy`, without any change to stock.
#[tokio::test(flavor = "current_thread")]
async fn admission_answers_busy_beyond_the_bound() {
    let config = EngineConfig {
        in_flight_per_sku_max: 4,
        in_flight_per_partition_max: 4,
        batch_max: 4,
        ..EngineConfig::default()
    };
    let engine = engine_with(config, Arc::new(ManualClock::new(1_000_000)));
    create(&engine, sku("hot"), 100).await;
    // Start the actor first so that admission is the only thing that waits.
    engine.reserve(request("warm", "w", &[("hot", 1)])).await.expect("held");

    let tasks: Vec<_> = (0..12)
        .map(|index| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.reserve(request(&format!("o{index}"), "b", &[("hot", 1)])).await })
        })
        .collect();
    let mut held = 0;
    let mut busy = 0;
    for task in tasks {
        match task.await.expect("task ran") {
            Ok(_) => held += 1,
            Err(OrderError::Busy { .. }) => busy += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((held, busy), (4, 8));
    assert_eq!(engine.availability(&sku("hot")).await, Ok(stock(95, 5, 0)));
}

fn short_ttl_config() -> EngineConfig {
    EngineConfig {
        limits: Limits { hold_ttl_ms_min: 20, ..Limits::default() },
        actor_idle_ms: 50,
        ..EngineConfig::default()
    }
}

#[tokio::test]
async fn holds_expire_without_anyone_asking() {
    let engine = engine_with(short_ttl_config(), Arc::new(SystemClock));
    create(&engine, sku("a"), 3).await;
    let mut order_request = request("o1", "alice", &[("a", 3)]);
    order_request.ttl_ms = 40;
    engine.reserve(order_request).await.expect("held");
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(0, 3, 0)));
    // Only the actor's own timer can bring the units back.
    let back =
        eventually(Duration::from_secs(5), async || engine.availability(&sku("a")).await == Ok(stock(3, 0, 0))).await;
    assert!(back, "hold did not expire: {:?}", engine.availability(&sku("a")).await);
}

#[tokio::test]
async fn idle_actors_passivate_and_keep_their_state() {
    let engine = engine_with(short_ttl_config(), Arc::new(SystemClock));
    create(&engine, sku("a"), 3).await;
    assert_eq!(engine.active_actor_count(), 0, "no actor before the first request");
    engine.reserve(request("o1", "alice", &[("a", 2)])).await.expect("held");
    engine.commit(&order("o1")).await.expect("committed");
    assert_eq!(engine.active_actor_count(), 1);
    assert!(eventually(Duration::from_secs(5), async || engine.active_actor_count() == 0).await, "never passivated");
    // A new actor starts with the parked state: the sale is remembered.
    assert!(engine.commit(&order("o1")).await.expect("replayed").replayed);
    let next = engine.reserve(request("o2", "bob", &[("a", 2)])).await;
    assert!(matches!(next, Err(OrderError::Line { error: SkuError::SoldOut { available: 1 }, .. })));
    let last = engine.reserve(request("o3", "bob", &[("a", 1)])).await.expect("held");
    assert_eq!(last.lines[0].stock, stock(0, 1, 2));
}

/// The hint's promise: once a release is answered, no later reserve is told
/// `SoldOut` on the strength of the older snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_hint_never_hides_released_stock() {
    let (engine, _clock) = manual_engine();
    create(&engine, sku("one"), 1).await;
    for round in 0..200 {
        let holder = format!("hold-{round}");
        engine.reserve(request(&holder, "a", &[("one", 1)])).await.expect("held");
        let sold_out = engine.reserve(request(&format!("miss-{round}"), "b", &[("one", 1)])).await;
        assert!(matches!(sold_out, Err(OrderError::Line { error: SkuError::SoldOut { available: 0 }, .. })));
        engine.release(&order(&holder)).await.expect("released");
        engine.reserve(request(&format!("next-{round}"), "c", &[("one", 1)])).await.expect("stock is back");
        engine.release(&order(&format!("next-{round}"))).await.expect("released");
    }
}

/// Many buyers on two threads against one hot SKU and a few cold ones:
/// exactly the stock is sold, never more, and the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_never_oversells() {
    const BUYERS: usize = 2_000;
    let (engine, _clock) = manual_engine();
    create(&engine, sku("hot"), 100).await;
    for cold in 0..4 {
        create(&engine, sku(&format!("cold-{cold}")), 1_000).await;
    }
    let tasks: Vec<_> = (0..BUYERS)
        .map(|buyer| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let cold = format!("cold-{}", buyer % 4);
                let order_id = format!("order-{buyer}");
                let lines: &[(&str, u32)] = &[("hot", 1), (&cold, 1)];
                for _ in 0..50 {
                    match engine.reserve(request(&order_id, &format!("buyer-{buyer}"), lines)).await {
                        Ok(_) => {
                            engine.commit(&order(&order_id)).await.expect("commit of a held order");
                            return true;
                        }
                        Err(OrderError::Busy { .. }) => tokio::task::yield_now().await,
                        Err(OrderError::Line { error: SkuError::SoldOut { .. }, .. }) => return false,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
                false
            })
        })
        .collect();
    let mut sold = 0;
    for task in tasks {
        sold += usize::from(task.await.expect("task ran"));
    }
    assert_eq!(sold, 100, "exactly the stock is sold");
    assert_eq!(engine.availability(&sku("hot")).await, Ok(stock(0, 0, 100)));
    let mut cold_sold = 0;
    for cold in 0..4 {
        let counts = engine.availability(&sku(&format!("cold-{cold}"))).await.expect("exists");
        assert_eq!((counts.held, counts.total()), (0, 1_000), "no cold line left held");
        cold_sold += counts.sold;
    }
    assert_eq!(cold_sold, 100, "cold lines sold exactly with their hot line");
}

#[tokio::test]
async fn commit_fewer_refuses_skus_outside_the_order_without_change() {
    let (engine, _clock) = manual_engine();
    for name in ["a", "b"] {
        create(&engine, sku(name), 5).await;
    }
    engine.reserve(request("o1", "alice", &[("a", 2)])).await.expect("held");
    assert_eq!(
        engine.commit_fewer(&order("o1"), &[(sku("b"), 1)]).await,
        Err(OrderError::NotInOrder { sku: sku("b") })
    );
    assert_eq!(
        engine.commit_fewer(&order("o1"), &[(sku("a"), 1), (sku("a"), 1)]).await,
        Err(OrderError::NotInOrder { sku: sku("a") })
    );
    let over = engine.commit_fewer(&order("o1"), &[(sku("a"), 3)]).await;
    assert_eq!(over, Err(OrderError::InvalidUnits { sku: sku("a"), units: 3, held: 2 }));
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(3, 2, 0)), "nothing changed");
    // The refusals left the order held: a correct commit still works.
    let settled = engine.commit_fewer(&order("o1"), &[(sku("a"), 1)]).await.expect("committed");
    assert_eq!(settled.lines[0].stock, stock(4, 0, 1));
}

#[tokio::test]
async fn a_refused_then_retried_order_is_remembered_for_the_full_window() {
    let config = EngineConfig { orders_per_partition_max: 1, partition_count: 1, ..EngineConfig::default() };
    let engine = engine_with(config, Arc::new(ManualClock::new(1_000_000)));
    let settings = SkuSettings { initial_units: 5, units_per_buyer_max: Some(0), ..SkuSettings::default() };
    engine.create_sku(sku("a"), settings, operation()).await.expect("created");
    // Refused by the actor (past the hint), then the same id succeeds.
    let refused = engine.reserve(request("o1", "alice", &[("a", 1)])).await;
    assert!(matches!(refused, Err(OrderError::Line { error: SkuError::LimitExceeded { .. }, .. })));
    engine.set_buyer_limit(&sku("a"), None, operation()).await.expect("limit lifted");
    let held = engine.reserve(request("o1", "alice", &[("a", 1)])).await.expect("held");
    // The refusal left no entry, so the bound of one order is taken by o1
    // alone: another order is refused rather than o1 forgotten.
    assert_eq!(engine.reserve(request("o2", "bob", &[("a", 1)])).await, Err(OrderError::Busy { retry_after_ms: 5 }));
    assert_eq!(engine.reserve(request("o1", "alice", &[("a", 1)])).await, Ok(held));
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(4, 1, 0)), "the refusal changed nothing");
}

/// The scenario: a partition's worth of refused reserves (ids
/// chosen to land in one partition) used to push an acknowledged hold out
/// of the order directory, and its commit then answered
/// `UnknownReservation`. A refused reserve now leaves no entry, a full
/// directory refuses new orders (`Busy`) instead of forgetting live ones,
/// and settled orders are forgotten only once their window has passed.
#[tokio::test]
async fn the_order_directory_never_forgets_an_order_that_holds_stock() {
    let window_ms = 3_600_000;
    let limits = Limits { idempotency_window_ms: window_ms, ..Limits::default() };
    let config = EngineConfig { orders_per_partition_max: 3, partition_count: 1, limits, ..EngineConfig::default() };
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = engine_with(config, clock.clone());
    create(&engine, sku("a"), 10).await;
    let settings = SkuSettings { initial_units: 5, units_per_buyer_max: Some(0), ..SkuSettings::default() };
    engine.create_sku(sku("limited"), settings, operation()).await.expect("created");
    let held = engine.reserve(request("acknowledged", "alice", &[("a", 1)])).await.expect("held");
    // Refused by the actor (the hint cannot see a buyer limit), many times
    // the directory's bound.
    for number in 0..20 {
        let refused = engine.reserve(request(&format!("greedy-{number}"), "mallory", &[("limited", 1)])).await;
        assert!(matches!(refused, Err(OrderError::Line { error: SkuError::LimitExceeded { .. }, .. })), "{refused:?}");
    }
    assert!(engine.commit(&held.order).await.expect("still known").lines[0].units == 1);
    // Two live orders and one settled (inside its window): the bound is
    // reached; a new order is refused, nothing is forgotten.
    engine.reserve(request("second", "bob", &[("a", 1)])).await.expect("held");
    engine.release(&order("second")).await.expect("released");
    engine.reserve(request("third", "carol", &[("a", 1)])).await.expect("held");
    assert_eq!(
        engine.reserve(request("fourth", "dave", &[("a", 1)])).await,
        Err(OrderError::Busy { retry_after_ms: 5 })
    );
    assert!(engine.commit(&order("acknowledged")).await.expect("answered from the directory").replayed);
    assert!(engine.release(&order("second")).await.expect("answered from the directory").replayed);
    // Past the window the settled orders are forgotten, never the one the
    // directory still has as held (`third`: its hold expired meanwhile, and
    // it answers so instead of "unknown").
    clock.advance_ms(window_ms);
    engine.reserve(request("fourth", "dave", &[("a", 1)])).await.expect("room made by forgetting settled orders");
    assert_eq!(engine.commit(&order("acknowledged")).await, Err(OrderError::UnknownReservation), "forgotten");
    let third = engine.release(&order("third")).await;
    assert!(matches!(third, Err(OrderError::Expired { .. })), "{third:?}");
}

/// Buyers with multi-line orders that pay, cancel or walk away, on real time
/// with short holds, racing each other and the expiry timers: afterwards
/// every SKU's counts add up, nothing is held, and units sold equal the
/// units the paying buyers were told they bought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_orders_with_expiry_keep_the_books() {
    const BUYERS: u64 = 600;
    const SKUS: u64 = 6;
    let engine = engine_with(short_ttl_config(), Arc::new(SystemClock));
    for index in 0..SKUS {
        create(&engine, sku(&format!("s{index}")), 40).await;
    }
    let tasks: Vec<_> = (0..BUYERS)
        .map(|buyer| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let first = format!("s{}", buyer % SKUS);
                let second = format!("s{}", (buyer * 7 + 3) % SKUS);
                let mut order_request =
                    request(&format!("o{buyer}"), &format!("b{buyer}"), &[(&first, 1), (&second, 2)]);
                order_request.ttl_ms = 30 + buyer % 40;
                let held = match engine.reserve(order_request).await {
                    Ok(reservation) => reservation,
                    Err(OrderError::Line { error: SkuError::SoldOut { .. }, .. } | OrderError::Busy { .. }) => {
                        return 0
                    }
                    Err(other) => panic!("unexpected {other:?}"),
                };
                match buyer % 3 {
                    0 => match engine.commit(&held.order).await {
                        Ok(settled) => settled.lines.iter().map(|line| u64::from(line.units)).sum(),
                        Err(OrderError::Expired { .. }) => 0,
                        Err(other) => panic!("unexpected {other:?}"),
                    },
                    1 => {
                        match engine.release(&held.order).await {
                            Ok(_) | Err(OrderError::Expired { .. }) => {}
                            Err(other) => panic!("unexpected {other:?}"),
                        }
                        0
                    }
                    _ => 0,
                }
            })
        })
        .collect();
    let mut units_bought = 0;
    for task in tasks {
        units_bought += task.await.expect("task ran");
    }
    let settled = eventually(Duration::from_secs(5), async || {
        let mut held = 0;
        for index in 0..SKUS {
            held += engine.availability(&sku(&format!("s{index}"))).await.expect("exists").held;
        }
        held == 0
    })
    .await;
    assert!(settled, "holds outlived their TTL");
    let mut units_sold = 0;
    for index in 0..SKUS {
        let counts = engine.availability(&sku(&format!("s{index}"))).await.expect("exists");
        assert_eq!(counts.total(), 40, "s{index}: {counts:?}");
        units_sold += counts.sold;
    }
    assert_eq!(units_sold, units_bought);
    assert!(units_bought > 0, "the test must actually sell something");
    engine.stop_actors();
}

/// Polls `future` once and drops it; true if it had not finished.
async fn poll_once_then_drop<F: std::future::Future>(future: F) -> bool {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|context| std::task::Poll::Ready(future.as_mut().poll(context).is_pending())).await
}

/// A caller that stops waiting (its future dropped after the first poll, as
/// a timeout or a closed connection does) must not lose the SKU's state or
/// wedge the order: the same request again finishes the job.
#[tokio::test(flavor = "current_thread")]
async fn dropped_callers_never_wedge_an_order_or_lose_a_sku() {
    let (engine, _clock) = manual_engine();
    // Parked SKU: the dropped reserve is the one that starts its actor.
    create(&engine, sku("a"), 5).await;
    assert!(poll_once_then_drop(engine.reserve(request("o1", "alice", &[("a", 2)]))).await, "cut off mid-way");

    let held = engine.reserve(request("o1", "alice", &[("a", 2)])).await.expect("the retry finishes the reserve");
    assert_eq!(held.lines[0].stock, stock(3, 2, 0), "held once, not twice");

    assert!(poll_once_then_drop(engine.commit(&order("o1"))).await, "cut off mid-way");
    let settled = engine.commit(&order("o1")).await.expect("the retry finishes the commit");
    assert_eq!(settled.lines[0].stock, stock(3, 0, 2));
    assert_eq!(engine.availability(&sku("a")).await, Ok(stock(3, 0, 2)));
}

/// The participant side of a transaction coordinated elsewhere: prepared
/// lines stop expiring until unprepared; an order that expired cannot be
/// prepared and holds nothing afterwards.
#[tokio::test]
async fn prepared_lines_wait_for_a_decision_and_expired_ones_cannot_be_prepared() {
    let (engine, clock) = manual_engine();
    for name in ["a", "b"] {
        create(&engine, sku(name), 5).await;
    }
    engine.reserve(request("o1", "alice", &[("a", 1), ("b", 2)])).await.expect("held");
    engine.prepare(&order("o1")).await.expect("prepared");
    assert_eq!(engine.prepare(&order("o1")).await.map(|held| held.lines.len()), Ok(2), "idempotent");
    clock.advance_ms(120_000);
    assert_eq!(engine.availability_now(&sku("b")).await, Ok(stock(3, 2, 0)), "prepared holds do not expire");
    assert_eq!(engine.release(&order("o1")).await.map(|released| released.lines.len()), Ok(2));
    assert_eq!(engine.availability_now(&sku("b")).await, Ok(stock(5, 0, 0)));

    engine.reserve(request("o2", "bob", &[("a", 1), ("b", 1)])).await.expect("held");
    engine.prepare(&order("o2")).await.expect("prepared");
    engine.unprepare(&order("o2")).await.expect("unprepared");
    clock.advance_ms(120_000);
    assert_eq!(engine.availability_now(&sku("a")).await, Ok(stock(5, 0, 0)), "its TTL ran again");

    engine.reserve(request("o3", "carol", &[("a", 1), ("b", 1)])).await.expect("held");
    clock.advance_ms(120_000);
    assert!(matches!(engine.prepare(&order("o3")).await, Err(OrderError::Expired { .. })));
    for name in ["a", "b"] {
        assert_eq!(engine.availability_now(&sku(name)).await, Ok(stock(5, 0, 0)));
    }
    assert_eq!(engine.abandon(&order("o3")).await, Ok(()));
}

/// A SKU nobody asks after its holds' time came: `availability` does not
/// count them as held, though no request or timer has republished its
/// counts.
#[tokio::test]
async fn availability_of_a_quiet_sku_never_counts_expired_holds() {
    let (engine, clock) = manual_engine();
    create(&engine, sku("quiet"), 5).await;
    engine.reserve(request("o1", "alice", &[("quiet", 2)])).await.expect("held");
    assert_eq!(engine.availability(&sku("quiet")).await, Ok(stock(3, 2, 0)));
    clock.advance_ms(3_600_000);
    assert_eq!(engine.availability(&sku("quiet")).await, Ok(stock(5, 0, 0)));
}

/// Cuts `step` off after its first poll, as a member does when a request's
/// deadline passes while its lines wait in a busy SKU's queue.
async fn cut_off<T: std::fmt::Debug>(step: impl std::future::Future<Output = T>) {
    let mut step = std::pin::pin!(step);
    let polled = std::future::poll_fn(|context| std::task::Poll::Ready(step.as_mut().poll(context))).await;
    assert!(polled.is_pending(), "the step finished at its first poll: {polled:?}");
}

/// A participant's prepare, unprepare or abandon cut off part-way leaves
/// the order with a way forward. Before the fix it stayed `Settling`
/// forever: every retry and the coordinator's unprepare answered `Busy`,
/// and the lines the cut-off prepare had reached stayed prepared (never
/// expiring) for good.
#[tokio::test]
async fn a_participant_step_cut_off_part_way_can_be_finished() {
    let (engine, clock) = manual_engine();
    for name in ["a", "b"] {
        create(&engine, sku(name), 5).await;
    }
    // Prepare cut off, then the coordinator gives up (unprepare): every
    // line ends by its TTL again.
    engine.reserve(request("undone", "alice", &[("a", 1), ("b", 1)])).await.expect("held");
    cut_off(engine.prepare(&order("undone"))).await;
    engine.unprepare(&order("undone")).await.expect("not Busy: the order was put back");
    // Prepare cut off, then retried: every line prepared, so the decision
    // sells both even past the TTL.
    engine.reserve(request("decided", "bob", &[("a", 1), ("b", 1)])).await.expect("held");
    cut_off(engine.prepare(&order("decided"))).await;
    engine.prepare(&order("decided")).await.expect("prepared on every line");
    // Unprepare cut off and retried; then prepared again for the decision.
    cut_off(engine.unprepare(&order("decided"))).await;
    engine.unprepare(&order("decided")).await.expect("unprepared");
    engine.prepare(&order("decided")).await.expect("prepared again");
    // Abandon cut off and retried.
    engine.reserve(request("abandoned", "carol", &[("a", 1), ("b", 1)])).await.expect("held");
    cut_off(engine.abandon(&order("abandoned"))).await;
    engine.abandon(&order("abandoned")).await.expect("abandoned");

    clock.advance_ms(3_600_000);
    let settled = engine.commit(&order("decided")).await.expect("prepared lines wait for the decision");
    assert_eq!(settled.lines.iter().map(|line| line.units).sum::<u32>(), 2);
    for name in ["a", "b"] {
        assert_eq!(engine.availability(&sku(name)).await, Ok(stock(4, 0, 1)), "{name}: nothing left held");
    }
}
