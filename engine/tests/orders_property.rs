//! Property test of the order coordinator: random multi-line orders,
//! commits, partial commits, releases, restocks and clock jumps, applied one
//! at a time through the engine and its actors. After every step:
//! - a refused reserve changed no SKU's counts (all or nothing);
//! - an accepted reserve holds exactly the merged units of every line;
//! - a commit sells exactly what it reports, a release returns what it reports;
//! - every SKU's available + held + sold equals the units it was given.

use std::collections::BTreeMap;
use std::sync::Arc;

use flashstock_engine::{
    BuyerId, Engine, EngineConfig, Line, ManualClock, OrderError, OrderId, OrderRequest, Quantity, SkuId, SkuSettings,
    StockSnapshot,
};
use proptest::prelude::*;

const SKUS: usize = 3;

#[derive(Debug, Clone)]
enum Step {
    Reserve { order: u8, buyer: u8, lines: Vec<(usize, u32)> },
    Commit { order: u8 },
    CommitFewer { order: u8, sku: usize, units: u32 },
    Release { order: u8 },
    Restock { sku: usize, units: u64 },
    AdvanceMs(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..12u8, 0..3u8, proptest::collection::vec((0..SKUS, 0..4u32), 0..4))
            .prop_map(|(order, buyer, lines)| Step::Reserve { order, buyer, lines }),
        2 => (0..12u8).prop_map(|order| Step::Commit { order }),
        1 => (0..12u8, 0..SKUS, 0..4u32).prop_map(|(order, sku, units)| Step::CommitFewer { order, sku, units }),
        2 => (0..12u8).prop_map(|order| Step::Release { order }),
        1 => (0..SKUS, 1..5u64).prop_map(|(sku, units)| Step::Restock { sku, units }),
        1 => prop_oneof![Just(1_000u64), Just(20_000), Just(59_999), Just(61_000)].prop_map(Step::AdvanceMs),
    ]
}

/// A fresh operation id for each admin call (unique within the process).
fn operation() -> flashstock_engine::OperationId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    flashstock_engine::OperationId::new(format!("operation-{number}")).expect("valid")
}

fn sku(index: usize) -> SkuId {
    SkuId::new(format!("sku-{index}")).expect("valid id")
}

fn order(index: u8) -> OrderId {
    OrderId::new(format!("order-{index}")).expect("valid id")
}

async fn counts(engine: &Engine) -> Vec<StockSnapshot> {
    let mut all = Vec::with_capacity(SKUS);
    for index in 0..SKUS {
        all.push(engine.availability_now(&sku(index)).await.expect("exists"));
    }
    all
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = Engine::new(EngineConfig::default(), clock.clone()).expect("valid config");
    let mut given = [0u64; SKUS];
    for (index, units) in given.iter_mut().enumerate() {
        *units = 4;
        engine
            .create_sku(sku(index), SkuSettings { initial_units: 4, ..SkuSettings::default() }, operation())
            .await
            .expect("created");
    }
    for step in steps {
        let before = counts(&engine).await;
        match &step {
            Step::Reserve { order: id, buyer, lines } => {
                let request = OrderRequest {
                    order: order(*id),
                    buyer: BuyerId::new(format!("buyer-{buyer}")).expect("valid id"),
                    lines: lines
                        .iter()
                        .map(|&(index, units)| Line { sku: sku(index), quantity: Quantity::Exactly(units) })
                        .collect(),
                    ttl_ms: 60_000,
                };
                let mut merged: BTreeMap<usize, u64> = BTreeMap::new();
                for &(index, units) in lines {
                    *merged.entry(index).or_default() += u64::from(units);
                }
                let after_reserve = engine.reserve(request).await;
                let after = counts(&engine).await;
                match after_reserve {
                    Ok(reservation) => {
                        // A fresh hold adds exactly the merged units; a replay adds nothing.
                        let added: u64 = (0..SKUS).map(|i| after[i].held - before[i].held).sum();
                        prop_assert!(
                            added == 0 || added == merged.values().sum::<u64>(),
                            "{:?}: held grew by {}",
                            step,
                            added
                        );
                        prop_assert_eq!(reservation.lines.len(), merged.len());
                        if added > 0 {
                            for line in &reservation.lines {
                                prop_assert_eq!(
                                    line.stock,
                                    after[sku_index(&line.sku)],
                                    "the answer carries the counts"
                                );
                                prop_assert_eq!(u64::from(line.units), merged[&sku_index(&line.sku)]);
                            }
                        }
                    }
                    Err(error) => {
                        prop_assert_eq!(&after, &before, "{:?} was refused ({}) yet changed stock", step, error);
                    }
                }
            }
            Step::Commit { order: id } | Step::CommitFewer { order: id, .. } => {
                let answer = match step {
                    Step::CommitFewer { sku: index, units, .. } => {
                        engine.commit_fewer(&order(*id), &[(sku(index), units)]).await
                    }
                    _ => engine.commit(&order(*id)).await,
                };
                let after = counts(&engine).await;
                let sold_now: u64 = (0..SKUS).map(|i| after[i].sold - before[i].sold).sum();
                match answer {
                    Ok(settlement) if !settlement.replayed => {
                        let reported: u64 = settlement.lines.iter().map(|line| u64::from(line.units)).sum();
                        prop_assert_eq!(sold_now, reported, "{:?}", step);
                    }
                    Ok(_) | Err(_) => prop_assert_eq!(sold_now, 0, "{:?} sold without a fresh commit", step),
                }
            }
            Step::Release { order: id } => {
                let answer = engine.release(&order(*id)).await;
                let after = counts(&engine).await;
                for index in 0..SKUS {
                    prop_assert_eq!(after[index].sold, before[index].sold, "a release sold something");
                }
                if let Err(error) = answer {
                    prop_assert!(!matches!(error, OrderError::Busy { .. } | OrderError::Unavailable), "{error}");
                }
            }
            Step::Restock { sku: index, units } => {
                engine.add_stock(&sku(*index), *units, operation()).await.expect("restock");
                given[*index] += units;
            }
            Step::AdvanceMs(ms) => clock.advance_ms(*ms),
        }
        for (index, snapshot) in counts(&engine).await.iter().enumerate() {
            prop_assert_eq!(snapshot.total(), given[index], "sku-{} after {:?}", index, step);
        }
    }
    engine.stop_actors();
    Ok(())
}

fn sku_index(sku: &SkuId) -> usize {
    sku.as_str().trim_start_matches("sku-").parse().expect("generated id")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn orders_are_all_or_nothing_and_the_books_balance(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run(steps))?;
    }
}
