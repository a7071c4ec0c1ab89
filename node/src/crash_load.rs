//! A load that runs until it is killed, for the crash tests: buyers reserve
//! and commit on a durable engine, and every commit the engine acknowledged
//! is appended (after the acknowledgement) to a file. A test kills the
//! process with SIGKILL at random moments, restarts it on the same data, and
//! finally checks that every acknowledged commit is in the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flashstock_engine::{
    BuyerId, Engine, EngineError, Line, OperationId, OrderError, OrderId, OrderRequest, Quantity, SkuId, SkuSettings,
};

/// SKUs the load sells, and the stock each starts with.
pub const LOAD_SKUS: u64 = 8;
pub const LOAD_UNITS_PER_SKU: u64 = 100_000;
/// Buyers at once.
const IN_FLIGHT: usize = 64;
/// Orders per run at most, and how long a run lasts at most: the load
/// stops by itself if nobody kills it.
const ORDERS_PER_RUN_MAX: u64 = 200_000;
const RUN_DURATION_MAX: Duration = Duration::from_secs(30);

pub fn load_sku(index: u64) -> SkuId {
    SkuId::new(format!("load-{index}")).expect("generated ids are valid")
}

/// Cuts a line the previous run was killed in the middle of writing (its
/// commit was acknowledged, but a prefix of its id names another order).
fn drop_partial_last_line(path: &std::path::Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read(path) else { return Ok(()) };
    if text.is_empty() || text.ends_with(b"\n") {
        return Ok(());
    }
    let keep = text.iter().rposition(|byte| *byte == b'\n').map_or(0, |position| position + 1);
    let file =
        std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    file.set_len(keep as u64).with_context(|| format!("cutting the partial line of {}", path.display()))?;
    Ok(())
}

/// Runs the load on `engine` until killed or bounded out; appends each
/// acknowledged commit's order id to `acknowledged`.
pub async fn run(engine: Engine, acknowledged: PathBuf) -> anyhow::Result<()> {
    for index in 0..LOAD_SKUS {
        let settings = SkuSettings { initial_units: LOAD_UNITS_PER_SKU, ..SkuSettings::default() };
        // A restarted load creates its SKUs again under the same
        // operations: the retry is answered as done.
        let operation = OperationId::new(format!("create-{}", load_sku(index))).context("operation id")?;
        match engine.create_sku(load_sku(index), settings, operation).await {
            Ok(_) | Err(EngineError::SkuExists { .. }) => {}
            Err(error) => return Err(error).context("creating the load's SKUs"),
        }
    }
    drop_partial_last_line(&acknowledged)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&acknowledged)
        .with_context(|| format!("opening {}", acknowledged.display()))?;
    let file = Arc::new(Mutex::new(file));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run = std::process::id();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (engine, file, next) = (engine.clone(), file.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let number = next.fetch_add(1, Ordering::Relaxed);
                    if number >= ORDERS_PER_RUN_MAX || started.elapsed() > RUN_DURATION_MAX {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let order = OrderId::new(format!("run{run}-{number}")).expect("generated ids are valid");
                    let request = OrderRequest {
                        order: order.clone(),
                        buyer: BuyerId::new(format!("buyer-{number}")).expect("generated ids are valid"),
                        lines: vec![Line { sku: load_sku(number % LOAD_SKUS), quantity: Quantity::Exactly(1) }],
                        ttl_ms: 60_000,
                    };
                    match engine.reserve(request).await {
                        Ok(_) => {}
                        Err(OrderError::Busy { retry_after_ms }) => {
                            tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
                            continue;
                        }
                        Err(error) => anyhow::bail!("reserve {order}: {error}"),
                    }
                    engine.commit(&order).await.with_context(|| format!("commit {order}"))?;
                    // One write per line: `writeln!` may write the id and the
                    // newline separately, and a kill between them would glue
                    // this id to the next run's first one.
                    let line = format!("{order}\n");
                    let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    file.write_all(line.as_bytes()).context("recording an acknowledged commit")?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.context("a buyer task panicked")??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_by_a_kill_is_dropped_and_whole_lines_kept() {
        let path = std::env::temp_dir().join(format!("flashstock-acknowledged-{}", std::process::id()));
        std::fs::write(&path, "run1-1\nrun1-2\nrun1-3").expect("written");
        drop_partial_last_line(&path).expect("repaired");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "run1-1\nrun1-2\n");
        drop_partial_last_line(&path).expect("nothing to do");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "run1-1\nrun1-2\n");
        std::fs::write(&path, "run1-").expect("written");
        drop_partial_last_line(&path).expect("repaired");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
        std::fs::remove_file(&path).expect("cleanup");
    }
}
