//! One SKU's inventory as a pure state machine.
//!
//! [`SkuState::apply`] takes the time and a [`SkuCommand`] and returns a
//! [`SkuAnswer`]. It reads no clock, does no IO and uses no randomness, so
//! replaying the same commands gives the same state and the same answers; the
//! actors and (later) the log are shells around it.
//!
//! Time only moves forward inside a SKU: a `now_ms` older than one already
//! seen is treated as the newest seen. Holds whose expiry has come are ended
//! before any command is applied, so an answer never depends on when the
//! owner's expiry timer last ran.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::ids::{BuyerId, OrderId};
use crate::limits::Limits;
pub use flashstock_sync::StockSnapshot;

/// How many units a reservation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantity {
    /// Exactly this many, or nothing.
    Exactly(u32),
    /// As many as are available up to `max`, but at least `min`.
    UpTo { max: u32, min: u32 },
}

impl Quantity {
    /// The fewest units that satisfy this quantity.
    pub fn minimum(&self) -> u32 {
        match *self {
            Quantity::Exactly(units) => units,
            Quantity::UpTo { min, .. } => min,
        }
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Result<(), SkuError> {
        let (max, min) = match *self {
            Quantity::Exactly(units) => (units, units),
            Quantity::UpTo { max, min } => (max, min),
        };
        if min == 0 {
            return Err(SkuError::InvalidQuantity { detail: "a line must ask for at least 1 unit" });
        }
        if min > max {
            return Err(SkuError::InvalidQuantity { detail: "`min` is larger than `max`" });
        }
        if max > limits.line_units_max {
            return Err(SkuError::InvalidQuantity {
                detail: "more units than line_units_max allows on one line",
            });
        }
        Ok(())
    }
}

/// One line of a reservation, as the SKU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveLine {
    pub order: OrderId,
    pub buyer: BuyerId,
    pub quantity: Quantity,
    pub ttl_ms: u64,
}

/// Everything that can be asked of one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkuCommand {
    AddStock { units: u64 },
    /// Takes unsold, unheld units out of the sale.
    RemoveStock { units: u64 },
    /// `None` lifts the limit. Counts units held plus sold per buyer.
    SetBuyerLimit { units_per_buyer_max: Option<u32> },
    /// Reservations before `opens_at_ms` fail with `NotOpen`.
    OpenSale { opens_at_ms: u64 },
    Reserve(ReserveLine),
    /// Sells `units` of the hold (all of it when `None`); the rest go back.
    Commit { order: OrderId, units: Option<u32> },
    Release { order: OrderId },
    /// Undoes a hold of an order that failed as a whole and forgets the
    /// order id here, so the whole order can be retried with the same id.
    Abort { order: OrderId },
    /// Ends every hold whose expiry has come. Issued by the owner's timer.
    Expire,
    /// Changes nothing; answers with the counts.
    Query,
}

impl SkuCommand {
    /// Whether applying the command can change state (and so must be logged).
    pub fn is_read_only(&self) -> bool {
        matches!(self, SkuCommand::Query)
    }
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkuOutcome {
    StockChanged,
    /// `replayed` is true when this answers a retry of an earlier reserve.
    Reserved { units: u32, expires_at_ms: u64, replayed: bool },
    Committed { units: u32, replayed: bool },
    Released { units: u32, replayed: bool },
    Aborted { units: u32 },
    Expired { holds: usize },
    Counted,
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkuError {
    #[error("the sale opens at {opens_at_ms} ms")]
    NotOpen { opens_at_ms: u64 },
    #[error("sold out: {available} units available")]
    SoldOut { available: u64 },
    #[error("buyer limit of {units_per_buyer_max} units reached ({units_taken} already held or bought)")]
    LimitExceeded { units_per_buyer_max: u32, units_taken: u32 },
    #[error("invalid quantity: {detail}")]
    InvalidQuantity { detail: &'static str },
    #[error("hold TTL {ttl_ms} ms is outside [{ttl_ms_min}, {ttl_ms_max}] ms")]
    InvalidTtl { ttl_ms: u64, ttl_ms_min: u64, ttl_ms_max: u64 },
    #[error("the reservation expired at {expired_at_ms} ms")]
    Expired { expired_at_ms: u64 },
    #[error("the reservation is already committed")]
    AlreadyCommitted,
    #[error("the reservation is already released")]
    AlreadyReleased,
    #[error("no reservation of this order on this SKU")]
    UnknownReservation,
    #[error("the order id was already used for a different request")]
    IdempotencyConflict,
    #[error("cannot remove more units than are available ({available})")]
    NotEnoughUnsoldStock { available: u64 },
    #[error("stock would exceed stock_units_max ({stock_units_max})")]
    StockLimitExceeded { stock_units_max: u64 },
    #[error("this SKU already has holds_per_sku_max ({holds_per_sku_max}) live holds")]
    HoldLimitReached { holds_per_sku_max: usize },
}

/// Every answer carries the counts after the command, so a caller never needs
/// a second read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuAnswer {
    pub result: Result<SkuOutcome, SkuError>,
    pub stock: StockSnapshot,
}

/// The settings a SKU is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkuSettings {
    pub initial_units: u64,
    pub units_per_buyer_max: Option<u32>,
    pub opens_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hold {
    line: ReserveLine,
    units: u32,
    expires_at_ms: u64,
    /// Makes expiry-index keys unique when two holds expire together.
    number: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Committed { units: u32, requested: Option<u32> },
    Released,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Finished {
    hold: Hold,
    ending: Ending,
}

/// One SKU's stock and reservations.
///
/// Maps here are only ever looked up, never iterated to make a decision, so
/// their (randomised) iteration order cannot make replay diverge; the expiry
/// index, which is walked, is a `BTreeMap`.
#[derive(Debug, Clone)]
pub struct SkuState {
    limits: Limits,
    units_added: u64,
    units_removed: u64,
    available: u64,
    held: u64,
    sold: u64,
    units_per_buyer_max: Option<u32>,
    opens_at_ms: u64,
    /// The newest time seen; time never runs backwards inside a SKU.
    clock_ms: u64,
    holds: HashMap<OrderId, Hold>,
    expiry_index: BTreeMap<(u64, u64), OrderId>,
    next_hold_number: u64,
    finished: HashMap<OrderId, Finished>,
    /// Ended reservations, oldest first, with when they ended: the order in
    /// which they are forgotten.
    finished_queue: VecDeque<(u64, OrderId)>,
    /// Units held plus sold, per buyer with any.
    buyer_units: HashMap<BuyerId, u32>,
}

impl SkuState {
    /// A new SKU. Fails if the initial stock exceeds the limits.
    pub fn new(settings: SkuSettings, limits: Limits) -> Result<Self, SkuError> {
        debug_assert_eq!(limits.validate(), Ok(()));
        if settings.initial_units > limits.stock_units_max {
            return Err(SkuError::StockLimitExceeded { stock_units_max: limits.stock_units_max });
        }
        let state = Self {
            limits,
            units_added: settings.initial_units,
            units_removed: 0,
            available: settings.initial_units,
            held: 0,
            sold: 0,
            units_per_buyer_max: settings.units_per_buyer_max,
            opens_at_ms: settings.opens_at_ms,
            clock_ms: 0,
            holds: HashMap::new(),
            expiry_index: BTreeMap::new(),
            next_hold_number: 0,
            finished: HashMap::new(),
            finished_queue: VecDeque::new(),
            buyer_units: HashMap::new(),
        };
        state.check_invariants();
        Ok(state)
    }

    pub fn stock(&self) -> StockSnapshot {
        StockSnapshot { available: self.available, held: self.held, sold: self.sold }
    }

    /// Live holds.
    pub fn hold_count(&self) -> usize {
        self.holds.len()
    }

    /// When the earliest live hold expires, if any.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry_index.keys().next().map(|&(expires_at_ms, _)| expires_at_ms)
    }

    /// Applies one command at `now_ms`.
    pub fn apply(&mut self, now_ms: u64, command: &SkuCommand) -> SkuAnswer {
        self.clock_ms = self.clock_ms.max(now_ms);
        let expired = self.expire_due();
        self.forget_old_finished();
        let result = match command {
            SkuCommand::AddStock { units } => self.add_stock(*units),
            SkuCommand::RemoveStock { units } => self.remove_stock(*units),
            SkuCommand::SetBuyerLimit { units_per_buyer_max } => {
                self.units_per_buyer_max = *units_per_buyer_max;
                Ok(SkuOutcome::StockChanged)
            }
            SkuCommand::OpenSale { opens_at_ms } => {
                self.opens_at_ms = *opens_at_ms;
                Ok(SkuOutcome::StockChanged)
            }
            SkuCommand::Reserve(line) => self.reserve(line),
            SkuCommand::Commit { order, units } => self.commit(order, *units),
            SkuCommand::Release { order } => self.release(order),
            SkuCommand::Abort { order } => self.abort(order),
            SkuCommand::Expire => Ok(SkuOutcome::Expired { holds: expired }),
            SkuCommand::Query => Ok(SkuOutcome::Counted),
        };
        self.check_invariants();
        SkuAnswer { result, stock: self.stock() }
    }

    fn add_stock(&mut self, units: u64) -> Result<SkuOutcome, SkuError> {
        if units == 0 {
            return Err(SkuError::InvalidQuantity { detail: "adding 0 units" });
        }
        let stock_units_max = self.limits.stock_units_max;
        let current = self.units_added - self.units_removed;
        if units > stock_units_max || current + units > stock_units_max {
            return Err(SkuError::StockLimitExceeded { stock_units_max });
        }
        self.units_added += units;
        self.available += units;
        Ok(SkuOutcome::StockChanged)
    }

    fn remove_stock(&mut self, units: u64) -> Result<SkuOutcome, SkuError> {
        if units == 0 {
            return Err(SkuError::InvalidQuantity { detail: "removing 0 units" });
        }
        if units > self.available {
            return Err(SkuError::NotEnoughUnsoldStock { available: self.available });
        }
        self.units_removed += units;
        self.available -= units;
        Ok(SkuOutcome::StockChanged)
    }

    fn reserve(&mut self, line: &ReserveLine) -> Result<SkuOutcome, SkuError> {
        line.quantity.validate(&self.limits)?;
        let (ttl_ms_min, ttl_ms_max) = (self.limits.hold_ttl_ms_min, self.limits.hold_ttl_ms_max);
        if !(ttl_ms_min..=ttl_ms_max).contains(&line.ttl_ms) {
            return Err(SkuError::InvalidTtl { ttl_ms: line.ttl_ms, ttl_ms_min, ttl_ms_max });
        }
        let earlier = self
            .holds
            .get(&line.order)
            .or_else(|| self.finished.get(&line.order).map(|finished| &finished.hold));
        if let Some(hold) = earlier {
            if hold.line != *line {
                return Err(SkuError::IdempotencyConflict);
            }
            return Ok(SkuOutcome::Reserved {
                units: hold.units,
                expires_at_ms: hold.expires_at_ms,
                replayed: true,
            });
        }
        if self.clock_ms < self.opens_at_ms {
            return Err(SkuError::NotOpen { opens_at_ms: self.opens_at_ms });
        }
        if self.holds.len() >= self.limits.holds_per_sku_max {
            return Err(SkuError::HoldLimitReached {
                holds_per_sku_max: self.limits.holds_per_sku_max,
            });
        }
        let units_taken = self.buyer_units.get(&line.buyer).copied().unwrap_or(0);
        let allowance = match self.units_per_buyer_max {
            Some(limit) => limit.saturating_sub(units_taken),
            None => u32::MAX,
        };
        let available = u32::try_from(self.available).unwrap_or(u32::MAX);
        let units = match line.quantity {
            Quantity::Exactly(units) => units,
            Quantity::UpTo { max, .. } => max.min(available).min(allowance),
        };
        let minimum = line.quantity.minimum();
        if units < minimum || units > allowance {
            if allowance < minimum {
                let units_per_buyer_max = self.units_per_buyer_max.unwrap_or(u32::MAX);
                return Err(SkuError::LimitExceeded { units_per_buyer_max, units_taken });
            }
            return Err(SkuError::SoldOut { available: self.available });
        }
        if u64::from(units) > self.available {
            return Err(SkuError::SoldOut { available: self.available });
        }
        debug_assert!(units >= 1);

        let expires_at_ms = self.clock_ms.saturating_add(line.ttl_ms);
        let number = self.next_hold_number;
        self.next_hold_number += 1;
        self.available -= u64::from(units);
        self.held += u64::from(units);
        *self.buyer_units.entry(line.buyer.clone()).or_insert(0) += units;
        self.expiry_index.insert((expires_at_ms, number), line.order.clone());
        self.holds.insert(line.order.clone(), Hold { line: line.clone(), units, expires_at_ms, number });
        Ok(SkuOutcome::Reserved { units, expires_at_ms, replayed: false })
    }

    fn commit(&mut self, order: &OrderId, requested: Option<u32>) -> Result<SkuOutcome, SkuError> {
        if let Some(hold) = self.holds.get(order) {
            let units = requested.unwrap_or(hold.units);
            if units == 0 || units > hold.units {
                return Err(SkuError::InvalidQuantity {
                    detail: "a commit must sell between 1 and the held units",
                });
            }
            let hold = self.end_hold(order, Ending::Committed { units, requested });
            self.sold += u64::from(units);
            self.give_back(&hold.line.buyer, hold.units - units);
            return Ok(SkuOutcome::Committed { units, replayed: false });
        }
        match self.finished.get(order).map(|finished| (finished.ending, finished.hold.expires_at_ms)) {
            Some((Ending::Committed { units, requested: first }, _)) => {
                if first == requested || requested == Some(units) {
                    Ok(SkuOutcome::Committed { units, replayed: true })
                } else {
                    Err(SkuError::IdempotencyConflict)
                }
            }
            Some((Ending::Released, _)) => Err(SkuError::AlreadyReleased),
            Some((Ending::Expired, expired_at_ms)) => Err(SkuError::Expired { expired_at_ms }),
            None => Err(SkuError::UnknownReservation),
        }
    }

    fn release(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        if self.holds.contains_key(order) {
            let hold = self.end_hold(order, Ending::Released);
            self.give_back(&hold.line.buyer, hold.units);
            return Ok(SkuOutcome::Released { units: hold.units, replayed: false });
        }
        match self.finished.get(order) {
            Some(Finished { ending: Ending::Released, hold }) => {
                Ok(SkuOutcome::Released { units: hold.units, replayed: true })
            }
            Some(Finished { ending: Ending::Committed { .. }, .. }) => Err(SkuError::AlreadyCommitted),
            Some(Finished { ending: Ending::Expired, hold }) => {
                Err(SkuError::Expired { expired_at_ms: hold.expires_at_ms })
            }
            None => Err(SkuError::UnknownReservation),
        }
    }

    fn abort(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        if let Some(hold) = self.holds.remove(order) {
            self.expiry_index.remove(&(hold.expires_at_ms, hold.number));
            self.held -= u64::from(hold.units);
            self.give_back(&hold.line.buyer, hold.units);
            return Ok(SkuOutcome::Aborted { units: hold.units });
        }
        match self.finished.get(order) {
            Some(Finished { ending: Ending::Committed { .. }, .. }) => Err(SkuError::AlreadyCommitted),
            // Already back in stock (released or expired), or never held.
            _ => Ok(SkuOutcome::Aborted { units: 0 }),
        }
    }

    /// Removes a live hold, records how it ended, and takes its units out of
    /// `held`. The caller decides where the units go.
    fn end_hold(&mut self, order: &OrderId, ending: Ending) -> Hold {
        let hold = self.holds.remove(order).expect("end_hold of a hold that is not live");
        let removed = self.expiry_index.remove(&(hold.expires_at_ms, hold.number));
        assert!(removed.is_some(), "live hold missing from the expiry index");
        self.held -= u64::from(hold.units);
        self.finished.insert(order.clone(), Finished { hold: hold.clone(), ending });
        self.finished_queue.push_back((self.clock_ms, order.clone()));
        hold
    }

    /// Returns `units` of a buyer's ended hold to stock and to the buyer's
    /// allowance.
    fn give_back(&mut self, buyer: &BuyerId, units: u32) {
        self.available += u64::from(units);
        let remaining = {
            let taken = self.buyer_units.get_mut(buyer).expect("a holding buyer is counted");
            assert!(*taken >= units, "buyer count below their held units");
            *taken -= units;
            *taken
        };
        if remaining == 0 {
            self.buyer_units.remove(buyer);
        }
    }

    /// Ends every hold whose expiry has come; returns how many.
    fn expire_due(&mut self) -> usize {
        let mut count = 0;
        while let Some((&(expires_at_ms, _), order)) = self.expiry_index.first_key_value() {
            if expires_at_ms > self.clock_ms {
                break;
            }
            let order = order.clone();
            let hold = self.end_hold(&order, Ending::Expired);
            self.give_back(&hold.line.buyer, hold.units);
            count += 1;
        }
        count
    }

    fn forget_old_finished(&mut self) {
        while let Some((finished_at_ms, order)) = self.finished_queue.front() {
            let too_old = finished_at_ms.saturating_add(self.limits.idempotency_window_ms) <= self.clock_ms;
            if !too_old && self.finished_queue.len() <= self.limits.finished_per_sku_max {
                break;
            }
            self.finished.remove(order);
            self.finished_queue.pop_front();
        }
    }

    /// The conservation law, checked after every command in debug and test
    /// builds. Test builds also recount the holds (a pair assertion: the
    /// running totals and the records must agree).
    fn check_invariants(&self) {
        debug_assert_eq!(
            self.available + self.held + self.sold,
            self.units_added - self.units_removed,
            "units were created or destroyed"
        );
        debug_assert!(self.sold <= self.units_added, "sold more than was ever added");
        debug_assert_eq!(self.holds.len(), self.expiry_index.len());
        #[cfg(test)]
        {
            let held: u64 = self.holds.values().map(|hold| u64::from(hold.units)).sum();
            assert_eq!(held, self.held, "held total disagrees with the holds");
            let by_buyer: u64 = self.buyer_units.values().map(|&units| u64::from(units)).sum();
            assert!(by_buyer >= held, "buyer counts lost a hold");
            assert_eq!(self.finished.len(), self.finished_queue.len());
        }
    }
}
