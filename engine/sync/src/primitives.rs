//! Atomics and the item queue, from std/crossbeam normally and from loom when
//! built with `--cfg flashstock_loom`.
//!
//! A project-specific cfg name (not `loom`) keeps tokio and everything above
//! it compiling normally: only this crate, which has no tokio, is ever built
//! under loom.

#[cfg(not(flashstock_loom))]
pub use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

#[cfg(flashstock_loom)]
pub use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

/// Tells the processor (or loom's scheduler) that we are spinning on a value
/// another thread is about to change.
pub fn spin_hint() {
    #[cfg(not(flashstock_loom))]
    std::hint::spin_loop();
    #[cfg(flashstock_loom)]
    loom::thread::yield_now();
}

/// An unbounded multi-producer queue. Its length is bounded by the callers
/// (every push holds an [`crate::AdmissionGate`] permit), so unbounded storage
/// is safe here and lets an idle SKU keep a queue of a few hundred bytes.
#[derive(Debug)]
pub struct ItemQueue<T> {
    #[cfg(not(flashstock_loom))]
    items: crossbeam_queue::SegQueue<T>,
    #[cfg(flashstock_loom)]
    items: loom::sync::Mutex<std::collections::VecDeque<T>>,
}

impl<T> ItemQueue<T> {
    pub fn new() -> Self {
        Self { items: Default::default() }
    }

    pub fn push(&self, item: T) {
        #[cfg(not(flashstock_loom))]
        self.items.push(item);
        #[cfg(flashstock_loom)]
        self.items.lock().expect("loom mutex poisoned").push_back(item);
    }

    pub fn pop(&self) -> Option<T> {
        #[cfg(not(flashstock_loom))]
        return self.items.pop();
        #[cfg(flashstock_loom)]
        return self.items.lock().expect("loom mutex poisoned").pop_front();
    }
}

impl<T> Default for ItemQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}
