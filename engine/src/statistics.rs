//! Counts for status pages and metrics: totals per partition and per
//! member, the hottest SKUs, running actors, what the log has done. Read
//! from the published snapshots; no actor is woken.

use crate::ids::SkuId;
use crate::runtime::Engine;
use crate::sku::StockSnapshot;
use crate::slot::lock;

/// Counts summed over many SKUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockTotals {
    pub skus: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// Counts of what a durable engine's log has done since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `fdatasync` calls on log segments.
    pub syncs: u64,
    pub records: u64,
    /// Record payload bytes appended.
    pub bytes: u64,
    pub snapshots: u64,
    /// Log segments removed because a snapshot covers them.
    pub segments_removed: u64,
    /// Snapshots that failed (the log kept every record).
    pub snapshot_failures: u64,
    /// When the last snapshot was written, in milliseconds since the Unix
    /// epoch, if one was since the engine opened.
    pub last_snapshot_unix_ms: Option<u64>,
}

impl Engine {
    /// The counts of every SKU in the partitions `owned` says, summed, as
    /// the actors last published them (a read of each SKU's snapshot; no
    /// actor is woken). For status pages: a SKU being written at this
    /// instant is counted as of its previous publish.
    pub fn totals(&self, owned: impl Fn(u32) -> bool) -> StockTotals {
        let mut totals = StockTotals::default();
        for (index, partition) in self.partition_totals().into_iter().enumerate() {
            if owned(index as u32) {
                totals.skus += partition.skus;
                totals.available += partition.available;
                totals.held += partition.held;
                totals.sold += partition.sold;
            }
        }
        totals
    }

    /// Every partition's counts (by partition number), summed as the actors
    /// last published them.
    pub fn partition_totals(&self) -> Vec<StockTotals> {
        self.inner
            .partitions
            .iter()
            .map(|partition| {
                let mut totals = StockTotals::default();
                let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                for slot in skus.values() {
                    totals.skus += 1;
                    if let Some(reading) = slot.snapshot.read() {
                        totals.available += reading.stock.available;
                        totals.held += reading.stock.held;
                        totals.sold += reading.stock.sold;
                    }
                }
                totals
            })
            .collect()
    }

    /// The `count` SKUs with the most units held plus sold in the partitions
    /// `owned` says, busiest first (ties by id), as last published.
    pub fn hottest_skus(&self, count: usize, owned: impl Fn(u32) -> bool) -> Vec<(SkuId, StockSnapshot)> {
        let mut all = Vec::new();
        for (index, partition) in self.inner.partitions.iter().enumerate() {
            if !owned(index as u32) {
                continue;
            }
            let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.extend(skus.values().filter_map(|slot| Some((slot.sku.clone(), slot.snapshot.read()?.stock))));
        }
        all.sort_by(|(a, a_stock), (b, b_stock)| {
            (b_stock.held + b_stock.sold).cmp(&(a_stock.held + a_stock.sold)).then_with(|| a.cmp(b))
        });
        all.truncate(count);
        all
    }

    /// How many SKU actors are running now (the rest are passivated).
    pub fn active_actor_count(&self) -> usize {
        self.inner
            .partitions
            .iter()
            .map(|partition| {
                let skus = partition.skus.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                skus.values().filter(|slot| !slot.queue.is_parked()).count()
            })
            .sum()
    }

    /// What the log has done so far; `None` for an in-memory engine.
    pub fn log_stats(&self) -> Option<LogStats> {
        use std::sync::atomic::Ordering::Relaxed;
        lock(&self.inner.writer).as_ref().map(|writer| {
            let compactor = writer.compactor_stats();
            let of =
                |counter: Option<&std::sync::atomic::AtomicU64>| counter.map_or(0, |counter| counter.load(Relaxed));
            LogStats {
                syncs: writer.stats().syncs.load(Relaxed),
                records: writer.stats().records.load(Relaxed),
                bytes: writer.stats().bytes.load(Relaxed),
                snapshots: of(compactor.map(|stats| &stats.snapshots)),
                segments_removed: of(compactor.map(|stats| &stats.segments_removed)),
                snapshot_failures: of(compactor.map(|stats| &stats.failures)),
                last_snapshot_unix_ms: Some(of(compactor.map(|stats| &stats.last_snapshot_unix_ms)))
                    .filter(|&at_ms| at_ms > 0),
            }
        })
    }
}
