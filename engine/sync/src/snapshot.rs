//! A SKU's counts, published by its actor and read by anyone.
//!
//! The network edge reads this to answer `SoldOut` for a hot SKU without a
//! trip through the actor's mailbox: during a flash sale nearly every request
//! arrives after the stock is gone, and those answers must cost nanoseconds.

use crate::primitives::{fence, spin_hint, AtomicU64, Ordering};

/// Units of one SKU, split by what they are doing now.
///
/// `available + held + sold` equals the units ever added minus the units ever
/// removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StockSnapshot {
    /// Units a new reservation can take.
    pub available: u64,
    /// Units inside live reservations.
    pub held: u64,
    /// Units committed: gone for good.
    pub sold: u64,
}

impl StockSnapshot {
    pub fn total(&self) -> u64 {
        self.available + self.held + self.sold
    }
}

/// How often a reader retries while the writer is mid-publish before it gives
/// up and lets the caller ask the actor instead. A publish is four stores, so
/// a handful of attempts is plenty; the bound keeps a reader from spinning
/// behind a writer that was descheduled mid-publish.
#[cfg(not(flashstock_loom))]
pub const READ_ATTEMPTS_MAX: usize = 16;
/// Fewer attempts under loom keep the explored state space small; the logic
/// does not depend on the count.
#[cfg(flashstock_loom)]
pub const READ_ATTEMPTS_MAX: usize = 2;

/// What a reader gets: the counts and when the earliest live hold expires.
///
/// The edge may answer `SoldOut` only while `now < next_expiry_ms`: past it,
/// the actor would first expire that hold and might then have stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotReading {
    pub stock: StockSnapshot,
    /// `u64::MAX` when nothing is held.
    pub next_expiry_ms: u64,
}

/// A single-writer sequence lock holding a [`SnapshotReading`].
///
/// Promise (what a `SoldOut` answered from this cell may rely on):
/// 1. A successful [`read`](Self::read) returns a snapshot that was published
///    as a whole: never fields from two different publishes.
/// 2. If a publish happened-before the read began (for example, the actor
///    published after a release and then answered the release, and the
///    reader saw that answer), the read returns that publish or a later one.
///    So a request that arrives after stock came back is never told
///    `SoldOut` on the strength of the older, sold-out snapshot.
/// 3. A read may fail (`None`) if it keeps overlapping a publish; the caller
///    then asks the actor, which is always authoritative.
///
/// Exactly one thread publishes at a time (the SKU's actor; activation and
/// passivation hand over through [`crate::WakeQueue`], which orders them).
#[derive(Debug)]
pub struct StockSnapshotCell {
    /// Odd while a publish is in progress; bumped by two per publish.
    sequence: AtomicU64,
    available: AtomicU64,
    held: AtomicU64,
    sold: AtomicU64,
    next_expiry_ms: AtomicU64,
}

impl StockSnapshotCell {
    pub fn new(initial: SnapshotReading) -> Self {
        Self {
            sequence: AtomicU64::new(0),
            available: AtomicU64::new(initial.stock.available),
            held: AtomicU64::new(initial.stock.held),
            sold: AtomicU64::new(initial.stock.sold),
            next_expiry_ms: AtomicU64::new(initial.next_expiry_ms),
        }
    }

    /// Replaces the snapshot. Only the single writer may call this.
    pub fn publish(&self, reading: SnapshotReading) {
        let snapshot = reading.stock;
        let sequence = self.sequence.load(Ordering::Relaxed);
        assert!(sequence.is_multiple_of(2), "two writers published into one snapshot cell");
        self.sequence.store(sequence + 1, Ordering::Relaxed);
        // Orders the odd sequence before the field stores: a reader that sees
        // any new field value also sees the sequence change.
        fence(Ordering::Release);
        self.available.store(snapshot.available, Ordering::Relaxed);
        self.held.store(snapshot.held, Ordering::Relaxed);
        self.sold.store(snapshot.sold, Ordering::Relaxed);
        self.next_expiry_ms.store(reading.next_expiry_ms, Ordering::Relaxed);
        self.sequence.store(sequence + 2, Ordering::Release);
    }

    /// A consistent snapshot, or `None` if the writer kept overlapping us.
    pub fn read(&self) -> Option<SnapshotReading> {
        for _ in 0..READ_ATTEMPTS_MAX {
            let before = self.sequence.load(Ordering::Acquire);
            if !before.is_multiple_of(2) {
                spin_hint();
                continue;
            }
            let reading = SnapshotReading {
                stock: StockSnapshot {
                    available: self.available.load(Ordering::Relaxed),
                    held: self.held.load(Ordering::Relaxed),
                    sold: self.sold.load(Ordering::Relaxed),
                },
                next_expiry_ms: self.next_expiry_ms.load(Ordering::Relaxed),
            };
            // Pairs with the writer's release fence: if any field load above
            // saw a newer publish, the sequence load below sees it moved.
            fence(Ordering::Acquire);
            let after = self.sequence.load(Ordering::Relaxed);
            if before == after {
                return Some(reading);
            }
            spin_hint();
        }
        None
    }
}

#[cfg(all(test, not(flashstock_loom)))]
mod tests {
    use super::*;

    fn reading(available: u64, held: u64, sold: u64) -> SnapshotReading {
        SnapshotReading { stock: StockSnapshot { available, held, sold }, next_expiry_ms: u64::MAX }
    }

    #[test]
    fn read_returns_the_last_publish() {
        let cell = StockSnapshotCell::new(reading(5, 0, 0));
        assert_eq!(cell.read().map(|r| r.stock.available), Some(5));
        let published = SnapshotReading { next_expiry_ms: 77, ..reading(2, 3, 0) };
        cell.publish(published);
        assert_eq!(cell.read(), Some(published));
    }

    #[test]
    fn concurrent_reads_never_see_a_torn_snapshot() {
        let cell =
            std::sync::Arc::new(StockSnapshotCell::new(SnapshotReading { next_expiry_ms: 0, ..reading(1000, 0, 0) }));
        let writer = {
            let cell = cell.clone();
            std::thread::spawn(move || {
                for step in 0..20_000u64 {
                    let sold = step % 1000;
                    cell.publish(SnapshotReading { next_expiry_ms: sold, ..reading(1000 - sold, 0, sold) });
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() && reads < 1_000_000 {
            if let Some(read) = cell.read() {
                assert_eq!(read.stock.total(), 1000, "torn read: {read:?}");
                assert_eq!(read.next_expiry_ms, read.stock.sold, "torn read: {read:?}");
            }
            reads += 1;
        }
        writer.join().expect("writer panicked");
    }
}
