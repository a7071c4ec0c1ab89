//! A bounded count of requests in flight.
//!
//! ractor mailboxes are unbounded; this gate sits in front of them so that a
//! stampede turns into fast `Busy` answers instead of unbounded memory.

use crate::primitives::{AtomicUsize, Ordering};

/// Admits at most `limit` holders at once.
///
/// Promise: at no moment are more than `limit` acquisitions un-released
/// (never a false grant), and every release makes room again (a permit is
/// never lost).
#[derive(Debug)]
pub struct AdmissionGate {
    in_flight: AtomicUsize,
    limit: usize,
}

impl AdmissionGate {
    pub fn new(limit: usize) -> Self {
        assert!(limit > 0, "an admission gate that admits nobody is a configuration bug");
        Self { in_flight: AtomicUsize::new(0), limit }
    }

    /// Takes a place if one is free. The caller must call [`Self::release`]
    /// exactly once for every `true`.
    #[must_use]
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_up_to(1) == 1
    }

    /// Takes as many of `wanted` places as are free, in one step, and
    /// returns how many it took (a batch's requests for one SKU are
    /// admitted together; the ones beyond the count are refused). The
    /// caller must give back exactly that many.
    #[must_use]
    pub fn try_acquire_up_to(&self, wanted: usize) -> usize {
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            let granted = self.limit.saturating_sub(current).min(wanted);
            if granted == 0 {
                return 0;
            }
            match self.in_flight.compare_exchange(current, current + granted, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return granted,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back a place taken by a successful [`Self::try_acquire`].
    pub fn release(&self) {
        self.release_many(1);
    }

    /// Gives back `count` places at once: an actor that answered a batch
    /// pays for one atomic operation, not one per request.
    pub fn release_many(&self, count: usize) {
        let previous = self.in_flight.fetch_sub(count, Ordering::Release);
        assert!(previous >= count, "admission gate released more often than acquired");
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(all(test, not(flashstock_loom)))]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_reopens_on_release() {
        let gate = AdmissionGate::new(2);
        assert!(gate.try_acquire());
        assert!(gate.try_acquire());
        assert!(!gate.try_acquire());
        gate.release();
        assert!(gate.try_acquire());
        assert_eq!(gate.in_flight(), 2);
    }

    #[test]
    fn a_batch_takes_what_is_free_and_no_more() {
        let gate = AdmissionGate::new(5);
        assert!(gate.try_acquire());
        assert_eq!(gate.try_acquire_up_to(3), 3);
        assert_eq!(gate.try_acquire_up_to(3), 1);
        assert_eq!(gate.try_acquire_up_to(3), 0);
        gate.release_many(4);
        assert_eq!(gate.try_acquire_up_to(0), 0);
        assert_eq!(gate.in_flight(), 1);
    }

    #[test]
    #[should_panic(expected = "released more often")]
    fn release_without_acquire_is_a_bug() {
        AdmissionGate::new(1).release();
    }
}
