//! Model checks of every structure in this crate, over all interleavings loom
//! can find. Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg flashstock_loom" cargo test -p flashstock-sync --release --test loom
//! ```
#![cfg(flashstock_loom)]

use flashstock_sync::{
    AdmissionGate, DurableWatermark, Pushed, SnapshotReading, StockSnapshot, StockSnapshotCell, WakeQueue,
};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{mpsc, Arc, Mutex};
use loom::thread;

/// Explores every interleaving with up to this many preemptions. Bugs in
/// protocols this small need two or three; the bound keeps CI in seconds.
const PREEMPTIONS_MAX: usize = 3;

fn model(test: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(PREEMPTIONS_MAX);
    builder.check(test);
}

/// Never a false grant: three threads race for two places, one of them for
/// both at once; at no moment are more than two inside, and every place
/// comes back.
#[test]
fn admission_gate_never_over_admits() {
    model(|| {
        let gate = Arc::new(AdmissionGate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|thread_index| {
                let (gate, inside) = (gate.clone(), inside.clone());
                thread::spawn(move || {
                    // One of the three asks for a batch of two places.
                    let admitted =
                        if thread_index == 0 { gate.try_acquire_up_to(2) } else { usize::from(gate.try_acquire()) };
                    if admitted > 0 {
                        let now_inside = inside.fetch_add(admitted, Ordering::SeqCst) + admitted;
                        assert!(now_inside <= 2, "gate admitted {now_inside} > 2");
                        inside.fetch_sub(admitted, Ordering::SeqCst);
                        gate.release_many(admitted);
                    }
                    admitted
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|handle| handle.join().expect("thread panicked")).sum();
        assert!(granted >= 2, "a place was lost");
        assert_eq!(gate.in_flight(), 0);
    });
}

/// A snapshot read is never torn, and a read that starts after a publish was
/// acknowledged never returns the older, sold-out snapshot.
#[test]
fn snapshot_is_whole_and_never_older_than_an_acknowledged_publish() {
    model(|| {
        let sold_out = SnapshotReading { stock: StockSnapshot { available: 0, held: 2, sold: 0 }, next_expiry_ms: 50 };
        let released =
            SnapshotReading { stock: StockSnapshot { available: 2, held: 0, sold: 0 }, next_expiry_ms: u64::MAX };
        let cell = Arc::new(StockSnapshotCell::new(sold_out));
        let release_acknowledged = Arc::new(AtomicBool::new(false));

        let actor = {
            let (cell, acknowledged) = (cell.clone(), release_acknowledged.clone());
            thread::spawn(move || {
                // The actor applies a release, publishes, then answers.
                cell.publish(released);
                acknowledged.store(true, Ordering::Release);
            })
        };
        let acknowledged_first = release_acknowledged.load(Ordering::Acquire);
        let read = cell.read();
        if let Some(snapshot) = read {
            assert_eq!(snapshot.stock.total(), 2, "torn snapshot {snapshot:?}");
            assert!(snapshot == sold_out || snapshot == released);
            if acknowledged_first {
                assert_eq!(snapshot, released, "SoldOut after the release was acknowledged");
            }
        }
        actor.join().expect("actor panicked");
        assert_eq!(cell.read(), Some(released));
    });
}

enum Signal {
    Wake,
    Start,
}

/// No lost wake-up and never two consumers: two producers push (one an item,
/// the other a batch announced at once) while the
/// consumer drains in batches and tries to park whenever it goes idle. Every
/// item is consumed exactly once; a `Wake` only ever reaches a live consumer
/// and a `Start` only a parked one; the state handed over at parking is never
/// lost. A lost wake-up shows up as a deadlock, which loom reports.
#[test]
fn wake_queue_never_loses_a_wake_up_or_runs_two_consumers() {
    model(|| {
        /// Producer 0 pushes one item; producer 1 a batch of two.
        const BATCH_ITEMS: usize = 2;
        let queue = Arc::new(WakeQueue::<usize>::new_parked());
        let parked_state = Arc::new(Mutex::new(Some(0usize)));
        let (signals, mailbox) = mpsc::channel();

        let producers: Vec<_> = (0..2)
            .map(|producer| {
                let (queue, signals) = (queue.clone(), signals.clone());
                thread::spawn(move || {
                    let pushed = if producer == 0 {
                        queue.push(0)
                    } else {
                        queue.push_many((0..BATCH_ITEMS).map(|index| 10 + index))
                    };
                    match pushed {
                        Pushed::ConsumerBusy => {}
                        Pushed::WakeConsumer => signals.send(Signal::Wake).expect("send"),
                        Pushed::StartConsumer => signals.send(Signal::Start).expect("send"),
                    }
                })
            })
            .collect();
        drop(signals);

        // The consumer: like an actor, it handles one signal at a time.
        let mut consumed = Vec::new();
        let mut live_state: Option<usize> = None;
        while consumed.len() < 1 + BATCH_ITEMS {
            match mailbox.recv().expect("a wake-up was lost") {
                Signal::Start => {
                    assert!(live_state.is_none(), "started a second consumer");
                    live_state = parked_state.lock().expect("lock").take();
                    assert!(live_state.is_some(), "parked state lost");
                }
                Signal::Wake => assert!(live_state.is_some(), "woke a parked consumer"),
            }
            let mut batch = Vec::new();
            loop {
                let taken = queue.take_batch(1, &mut batch);
                if let Some(state) = live_state.as_mut() {
                    *state += taken;
                }
                if !queue.finish_batch(taken) {
                    break;
                }
            }
            consumed.append(&mut batch);
            // Passivate: hand the state over, then try to park.
            let state = live_state.take().expect("consumer without state");
            *parked_state.lock().expect("lock") = Some(state);
            if !queue.try_park() {
                live_state = parked_state.lock().expect("lock").take();
            }
        }
        for handle in producers {
            handle.join().expect("producer panicked");
        }
        consumed.sort_unstable();
        assert_eq!(consumed, vec![0, 10, 11]);
        let final_state = live_state.or_else(|| *parked_state.lock().expect("lock"));
        assert_eq!(final_state, Some(3), "state counts every item once");
    });
}

/// Two flushes race to advance the mark (the later one may publish first);
/// a reader told that sequence 9 is durable never reads less, and the mark
/// ends at the highest value whatever the order.
#[test]
fn watermark_never_moves_back_and_covers_what_was_acknowledged() {
    model(|| {
        let mark = Arc::new(DurableWatermark::new(0));
        let acknowledged = Arc::new(AtomicBool::new(false));
        let late = {
            let mark = mark.clone();
            thread::spawn(move || mark.advance(5))
        };
        let writer = {
            let (mark, acknowledged) = (mark.clone(), acknowledged.clone());
            thread::spawn(move || {
                mark.advance(9);
                acknowledged.store(true, Ordering::Release);
            })
        };
        let first = mark.durable();
        if acknowledged.load(Ordering::Acquire) {
            assert!(mark.durable() >= 9, "an acknowledged sequence is not covered");
        }
        assert!(mark.durable() >= first, "the mark moved back");
        late.join().expect("late writer panicked");
        writer.join().expect("writer panicked");
        assert_eq!(mark.durable(), 9);
    });
}
