//! The highest log sequence number known durable, per partition.
//!
//! Written by the group-commit writer after each `fdatasync`, read by
//! anyone who must not act on state that could still be lost (answers,
//! snapshots, the sold-out hint once it waits for durability).

use crate::primitives::{AtomicU64, Ordering};

/// Promise: the value never decreases, and a reader that learned (through
/// any synchronising channel) that sequence `n` was made durable reads at
/// least `n`.
#[derive(Debug)]
pub struct DurableWatermark {
    sequence: AtomicU64,
}

impl DurableWatermark {
    pub fn new(sequence: u64) -> Self {
        Self { sequence: AtomicU64::new(sequence) }
    }

    /// Records that everything up to `sequence` is durable. An older value
    /// (a writer that lost a race) never moves the mark back.
    pub fn advance(&self, sequence: u64) {
        self.sequence.fetch_max(sequence, Ordering::Release);
    }

    pub fn durable(&self) -> u64 {
        self.sequence.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(flashstock_loom)))]
mod tests {
    use super::*;

    #[test]
    fn never_moves_back() {
        let mark = DurableWatermark::new(3);
        mark.advance(7);
        mark.advance(5);
        assert_eq!(mark.durable(), 7);
    }
}
