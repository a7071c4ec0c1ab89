//! A multi-producer queue with exactly-once wake-ups and safe parking.
//!
//! Each SKU actor drains one of these. Producers (the network edge) push a
//! request and, only on the push that finds the queue idle, send the actor a
//! single wake-up message; the actor then takes requests in batches until the
//! queue is empty. So the ractor mailbox holds at most one wake-up per actor,
//! however many requests are waiting, and the actor applies many requests per
//! wake-up.
//!
//! An idle actor may *park* (passivate): it stops, and the next push is told
//! to start a new one. The whole protocol is one atomic word, so there is no
//! moment in which a request is queued and nobody is responsible for it.

use crate::primitives::{AtomicUsize, ItemQueue, Ordering};

/// Set in [`WakeQueue::word`] while no consumer exists.
const PARKED: usize = 1 << (usize::BITS - 1);

/// What a producer must do after its push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Pushed {
    /// A consumer exists and has work announced to it already: nothing to do.
    ConsumerBusy,
    /// A consumer exists but was idle: send it one wake-up.
    WakeConsumer,
    /// No consumer exists (it parked): start one. This caller is the only one
    /// told so until the new consumer parks again.
    StartConsumer,
}

/// Promise:
/// - every pushed item is taken by a consumer exactly once (no lost wake-up:
///   after a push, some consumer is running, woken or about to be started);
/// - at most one consumer is responsible at any time: `WakeConsumer` is never
///   returned while the consumer is parked, and `StartConsumer` only while it
///   is parked.
#[derive(Debug)]
pub struct WakeQueue<T> {
    items: ItemQueue<T>,
    /// Items pushed and not yet finished by the consumer, plus [`PARKED`].
    word: AtomicUsize,
}

impl<T> WakeQueue<T> {
    /// A queue with no consumer yet: the first push returns `StartConsumer`.
    pub fn new_parked() -> Self {
        Self { items: ItemQueue::new(), word: AtomicUsize::new(PARKED) }
    }

    /// Queues `item`. The caller bounds how many items may be queued (see
    /// [`crate::AdmissionGate`]); the count must stay below `PARKED`.
    pub fn push(&self, item: T) -> Pushed {
        self.push_many(std::iter::once(item))
    }

    /// Queues every item of `items` and announces them at once: a batch of
    /// requests for one SKU pays for one announcement and at most one
    /// wake-up. An empty batch changes nothing (`ConsumerBusy`).
    pub fn push_many(&self, items: impl IntoIterator<Item = T>) -> Pushed {
        // The items are in the queue before they are announced, so a
        // consumer that sees the announcement always finds them.
        let mut count = 0;
        for item in items {
            self.items.push(item);
            count += 1;
        }
        if count == 0 {
            return Pushed::ConsumerBusy;
        }
        let previous = self.word.fetch_add(count, Ordering::AcqRel);
        assert!((previous & !PARKED) < PARKED - count, "wake queue count overflow");
        if previous == PARKED {
            // We moved the word out of "parked and empty": we start the
            // consumer. Clearing the bit now means no later push sees a count
            // of zero until that consumer has finished work, so nobody else
            // starts or wakes a second one.
            self.word.fetch_and(!PARKED, Ordering::AcqRel);
            Pushed::StartConsumer
        } else if previous == 0 {
            Pushed::WakeConsumer
        } else {
            Pushed::ConsumerBusy
        }
    }

    /// Consumer only: moves up to `max` announced items into `batch` and
    /// returns how many. Pass that number to [`Self::finish_batch`] once they
    /// have been handled.
    pub fn take_batch(&self, max: usize, batch: &mut Vec<T>) -> usize {
        let announced = self.word.load(Ordering::Acquire) & !PARKED;
        let count = announced.min(max);
        for _ in 0..count {
            let item = self.items.pop().expect("an announced item is always in the queue");
            batch.push(item);
        }
        count
    }

    /// Consumer only: marks `taken` items as handled. Returns `true` if more
    /// items are announced, in which case the consumer must carry on (no new
    /// wake-up will come for them); `false` means the next push wakes it.
    #[must_use]
    pub fn finish_batch(&self, taken: usize) -> bool {
        if taken == 0 {
            return self.announced() > 0;
        }
        let previous = self.word.fetch_sub(taken, Ordering::AcqRel);
        assert!(previous & PARKED == 0 && previous >= taken, "finish_batch by a consumer that does not own the queue");
        previous - taken > 0
    }

    /// Consumer only: parks if nothing is announced. On `true` the consumer
    /// must stop; whatever it wants to survive must have been stored where the
    /// next consumer finds it *before* this call. On `false` work arrived and
    /// the consumer carries on (a wake-up is already on its way).
    #[must_use]
    pub fn try_park(&self) -> bool {
        self.word.compare_exchange(0, PARKED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Items pushed and not yet finished.
    pub fn announced(&self) -> usize {
        self.word.load(Ordering::Acquire) & !PARKED
    }

    pub fn is_parked(&self) -> bool {
        self.word.load(Ordering::Acquire) & PARKED != 0
    }
}

#[cfg(all(test, not(flashstock_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_announced_once() {
        let queue = WakeQueue::new_parked();
        assert_eq!(queue.push_many(Vec::<u32>::new()), Pushed::ConsumerBusy);
        assert!(queue.is_parked(), "an empty batch starts nobody");
        assert_eq!(queue.push_many([1, 2, 3]), Pushed::StartConsumer);
        assert_eq!(queue.push_many([4]), Pushed::ConsumerBusy);
        let mut batch = Vec::new();
        assert_eq!(queue.take_batch(10, &mut batch), 4);
        assert_eq!(batch, vec![1, 2, 3, 4]);
        assert!(!queue.finish_batch(4));
        assert_eq!(queue.push_many([5, 6]), Pushed::WakeConsumer);
        assert_eq!(queue.announced(), 2);
    }

    #[test]
    fn first_push_starts_then_wakes_then_stays_quiet() {
        let queue = WakeQueue::new_parked();
        assert_eq!(queue.push(1), Pushed::StartConsumer);
        assert_eq!(queue.push(2), Pushed::ConsumerBusy);
        let mut batch = Vec::new();
        assert_eq!(queue.take_batch(10, &mut batch), 2);
        assert_eq!(batch, vec![1, 2]);
        assert!(!queue.finish_batch(2));
        assert_eq!(queue.push(3), Pushed::WakeConsumer);
    }

    #[test]
    fn batches_are_bounded_and_the_consumer_is_told_to_continue() {
        let queue = WakeQueue::new_parked();
        for item in 0..5 {
            let _ = queue.push(item);
        }
        let mut batch = Vec::new();
        assert_eq!(queue.take_batch(3, &mut batch), 3);
        assert!(queue.finish_batch(3));
        batch.clear();
        assert_eq!(queue.take_batch(3, &mut batch), 2);
        assert_eq!(batch, vec![3, 4]);
        assert!(!queue.finish_batch(2));
    }

    #[test]
    fn parking_fails_while_work_is_announced_and_restarts_after() {
        let queue = WakeQueue::new_parked();
        assert_eq!(queue.push(1), Pushed::StartConsumer);
        assert!(!queue.try_park(), "must not park with an item waiting");
        let mut batch = Vec::new();
        let taken = queue.take_batch(8, &mut batch);
        assert!(!queue.finish_batch(taken));
        assert!(queue.try_park());
        assert!(queue.is_parked());
        assert_eq!(queue.push(2), Pushed::StartConsumer);
        assert!(!queue.is_parked());
    }
}
