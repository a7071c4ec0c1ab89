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

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, VecDeque};

use crate::ids::{BuyerId, FastMap, OperationId, OrderId};
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
            return Err(SkuError::InvalidQuantity { detail: "more units than line_units_max allows on one line" });
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

/// A change an operator makes to a SKU. Each is applied at most once per
/// [`OperationId`]: the SKU remembers the operations it applied (as it
/// remembers ended reservations), so a retried call answers its first
/// result instead of adding or removing the units again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminChange {
    AddStock {
        units: u64,
    },
    /// Takes unsold, unheld units out of the sale.
    RemoveStock {
        units: u64,
    },
    /// `None` lifts the limit. Counts units held plus sold per buyer.
    SetBuyerLimit {
        units_per_buyer_max: Option<u32>,
    },
    /// Reservations before `opens_at_ms` fail with `NotOpen`.
    OpenSale {
        opens_at_ms: u64,
    },
    /// The SKU's creation. Applied to a SKU only as a retry of the call
    /// that created it: it answers `Ok` for the creating operation with the
    /// same settings and [`SkuError::AlreadyCreated`] for anything else.
    Create {
        settings: SkuSettings,
    },
}

/// Everything that can be asked of one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkuCommand {
    /// `operation` is `None` only in records of logs written before admin
    /// changes carried operation ids; every new change has one.
    Admin {
        operation: Option<OperationId>,
        change: AdminChange,
    },
    Reserve(ReserveLine),
    /// Sells `units` of the hold (all of it when `None`); the rest go back.
    Commit {
        order: OrderId,
        units: Option<u32>,
    },
    Release {
        order: OrderId,
    },
    /// Undoes a hold of an order that failed as a whole and forgets the
    /// order id here, so the whole order can be retried with the same id.
    Abort {
        order: OrderId,
    },
    /// Makes a live hold *prepared*: it no longer expires by its TTL and
    /// ends only by `Commit`, `Release` or `Unprepare`. The first phase of a
    /// commit that spans several SKUs: once every line is prepared, the
    /// coordinator's decision can be carried out on each line however long
    /// it takes, even across a crash.
    Prepare {
        order: OrderId,
    },
    /// Gives a prepared hold its TTL back (a transaction that was not
    /// decided): it ends by expiry again, at once if its time has passed.
    Unprepare {
        order: OrderId,
    },
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
    /// An admin change was applied; `replayed` when this answers a retry of
    /// the same operation (nothing changed this time).
    StockChanged {
        replayed: bool,
    },
    /// `replayed` is true when this answers a retry of an earlier reserve.
    Reserved {
        units: u32,
        expires_at_ms: u64,
        replayed: bool,
    },
    Committed {
        units: u32,
        replayed: bool,
    },
    Released {
        units: u32,
        replayed: bool,
    },
    Aborted {
        units: u32,
    },
    Prepared {
        units: u32,
        replayed: bool,
    },
    /// `expired` when the hold's time had passed, so it ended at once.
    Unprepared {
        units: u32,
        expired: bool,
        replayed: bool,
    },
    Expired {
        holds: usize,
    },
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
    #[error("the SKU already exists (created by another operation)")]
    AlreadyCreated,
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
    /// A prepared hold is out of the expiry index: only a decision ends it.
    prepared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Committed { units: u32, requested: Option<u32> },
    Released,
    Expired,
}

/// A reservation, live (`ending == None`) or ended. One map holds both so
/// that the idempotency check and the insert of a new hold cost one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    hold: Hold,
    ending: Option<Ending>,
}

/// One SKU's stock and reservations.
///
/// Maps here are only ever looked up, never iterated to make a decision, so
/// their (randomised) iteration order cannot make replay diverge; the expiry
/// index, which is walked, is a `BTreeMap`.
///
/// A reservation is *live* while it holds units (it is then in the expiry
/// index) and *ended* once committed, released or expired; ended ones are
/// kept for idempotent retries until forgotten (oldest first).
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
    reservations: FastMap<OrderId, Record>,
    /// Live reservations by expiry: exactly the live, unprepared entries of
    /// `reservations`.
    expiry_index: BTreeMap<(u64, u64), OrderId>,
    /// Live prepared reservations (the live ones not in `expiry_index`).
    prepared_holds: usize,
    next_hold_number: u64,
    /// Ended reservations, oldest first, with when they ended: the order in
    /// which they are forgotten.
    finished_queue: VecDeque<(u64, OrderId)>,
    /// Units held plus sold, per buyer with any.
    buyer_units: FastMap<BuyerId, u32>,
    /// Admin operations applied, for idempotent retries: what each asked.
    operations: FastMap<OperationId, AdminChange>,
    /// The same operations, oldest first, with when they were applied: the
    /// order in which they are forgotten (by `idempotency_window_ms` and
    /// `finished_per_sku_max`, as ended reservations are).
    operations_queue: VecDeque<(u64, OperationId)>,
}

impl SkuState {
    /// A new SKU with no history (its clock at 0). Fails if the initial
    /// stock exceeds the limits.
    pub fn new(settings: SkuSettings, limits: Limits) -> Result<Self, SkuError> {
        Self::created(0, settings, limits, None)
    }

    /// A SKU created at `now_ms` by `operation` (remembered, so that a
    /// retry of the creating call is answered as such). Fails if the
    /// initial stock exceeds the limits.
    pub fn created(
        now_ms: u64,
        settings: SkuSettings,
        limits: Limits,
        operation: Option<OperationId>,
    ) -> Result<Self, SkuError> {
        debug_assert_eq!(limits.validate(), Ok(()));
        if settings.initial_units > limits.stock_units_max {
            return Err(SkuError::StockLimitExceeded { stock_units_max: limits.stock_units_max });
        }
        let mut state = Self {
            limits,
            units_added: settings.initial_units,
            units_removed: 0,
            available: settings.initial_units,
            held: 0,
            sold: 0,
            units_per_buyer_max: settings.units_per_buyer_max,
            opens_at_ms: settings.opens_at_ms,
            clock_ms: now_ms,
            reservations: FastMap::default(),
            expiry_index: BTreeMap::new(),
            prepared_holds: 0,
            next_hold_number: 0,
            finished_queue: VecDeque::new(),
            buyer_units: FastMap::default(),
            operations: FastMap::default(),
            operations_queue: VecDeque::new(),
        };
        if let Some(operation) = operation {
            state.remember_operation(operation, AdminChange::Create { settings });
        }
        state.check_invariants();
        Ok(state)
    }

    /// The limits new commands are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Puts new limits in force. Nothing already held or sold changes;
    /// from the next command on, requests are checked against `limits` and
    /// ended reservations and operations are forgotten by its bounds. The
    /// log records such a change ([`crate::log::record::LogRecord::RulesInForce`])
    /// so that replay meets each command under the limits it was first
    /// applied with.
    pub fn set_limits(&mut self, limits: Limits) {
        debug_assert_eq!(limits.validate(), Ok(()));
        self.limits = limits;
    }

    pub fn stock(&self) -> StockSnapshot {
        StockSnapshot { available: self.available, held: self.held, sold: self.sold }
    }

    /// Live holds, prepared or not.
    pub fn hold_count(&self) -> usize {
        self.expiry_index.len() + self.prepared_holds
    }

    /// When the earliest live hold that can expire does, if any (prepared
    /// holds wait for a decision instead).
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiry_index.keys().next().map(|&(expires_at_ms, _)| expires_at_ms)
    }

    /// Applies one command at `now_ms`.
    pub fn apply(&mut self, now_ms: u64, command: &SkuCommand) -> SkuAnswer {
        self.apply_recording(now_ms, command).0
    }

    /// Applies `command` at `now_ms` and also returns what a log must record
    /// so that replaying it reaches the same state: the command itself if
    /// it changed anything beyond the passage of time; [`SkuCommand::Expire`]
    /// if only time passed (the clock moved, holds expired, or old
    /// reservations were forgotten, which is all a refused or read-only
    /// command does); nothing if nothing changed.
    pub fn apply_recording(&mut self, now_ms: u64, command: &SkuCommand) -> (SkuAnswer, Option<SkuCommand>) {
        let clock_moved = now_ms > self.clock_ms;
        self.clock_ms = self.clock_ms.max(now_ms);
        let expired = self.expire_due();
        let forgotten = self.forget_old_finished();
        let result = self.dispatch(command, expired);
        self.check_invariants();
        let command_changed = match &result {
            Ok(
                SkuOutcome::StockChanged { replayed }
                | SkuOutcome::Reserved { replayed, .. }
                | SkuOutcome::Committed { replayed, .. }
                | SkuOutcome::Released { replayed, .. }
                | SkuOutcome::Prepared { replayed, .. }
                | SkuOutcome::Unprepared { replayed, .. },
            ) => !replayed,
            Ok(SkuOutcome::Aborted { units }) => *units > 0,
            Ok(SkuOutcome::Expired { .. } | SkuOutcome::Counted) | Err(_) => false,
        };
        let to_record = if command_changed {
            Some(command.clone())
        } else if clock_moved || expired > 0 || forgotten > 0 {
            Some(SkuCommand::Expire)
        } else {
            None
        };
        (SkuAnswer { result, stock: self.stock() }, to_record)
    }

    fn dispatch(&mut self, command: &SkuCommand, expired: usize) -> Result<SkuOutcome, SkuError> {
        match command {
            SkuCommand::Admin { operation, change } => self.admin(operation.as_ref(), change),
            SkuCommand::Reserve(line) => self.reserve(line),
            SkuCommand::Commit { order, units } => self.commit(order, *units),
            SkuCommand::Release { order } => self.release(order),
            SkuCommand::Abort { order } => self.abort(order),
            SkuCommand::Prepare { order } => self.prepare(order),
            SkuCommand::Unprepare { order } => self.unprepare(order),
            SkuCommand::Expire => Ok(SkuOutcome::Expired { holds: expired }),
            SkuCommand::Query => Ok(SkuOutcome::Counted),
        }
    }

    /// Applies an admin change once per operation: a retry of an operation
    /// already applied answers as a replay (and changes nothing), the same
    /// operation id with another change is a conflict. Refused changes
    /// leave no trace, so a retry of one is tried afresh.
    fn admin(&mut self, operation: Option<&OperationId>, change: &AdminChange) -> Result<SkuOutcome, SkuError> {
        if let Some(first) = operation.and_then(|operation| self.operations.get(operation)) {
            return if first == change {
                Ok(SkuOutcome::StockChanged { replayed: true })
            } else {
                Err(SkuError::IdempotencyConflict)
            };
        }
        match *change {
            AdminChange::AddStock { units } => self.add_stock(units)?,
            AdminChange::RemoveStock { units } => self.remove_stock(units)?,
            AdminChange::SetBuyerLimit { units_per_buyer_max } => self.units_per_buyer_max = units_per_buyer_max,
            AdminChange::OpenSale { opens_at_ms } => self.opens_at_ms = opens_at_ms,
            // The creating operation was answered above; anything else
            // names a SKU that already exists.
            AdminChange::Create { .. } => return Err(SkuError::AlreadyCreated),
        }
        if let Some(operation) = operation {
            self.remember_operation(operation.clone(), change.clone());
        }
        Ok(SkuOutcome::StockChanged { replayed: false })
    }

    fn remember_operation(&mut self, operation: OperationId, change: AdminChange) {
        self.operations_queue.push_back((self.clock_ms, operation.clone()));
        let earlier = self.operations.insert(operation, change);
        assert!(earlier.is_none(), "an operation remembered twice");
    }

    fn add_stock(&mut self, units: u64) -> Result<(), SkuError> {
        if units == 0 {
            return Err(SkuError::InvalidQuantity { detail: "adding 0 units" });
        }
        let stock_units_max = self.limits.stock_units_max;
        let current = self.units_added - self.units_removed;
        if current.checked_add(units).is_none_or(|stock| stock > stock_units_max) {
            return Err(SkuError::StockLimitExceeded { stock_units_max });
        }
        self.units_added += units;
        self.available += units;
        Ok(())
    }

    fn remove_stock(&mut self, units: u64) -> Result<(), SkuError> {
        if units == 0 {
            return Err(SkuError::InvalidQuantity { detail: "removing 0 units" });
        }
        if units > self.available {
            return Err(SkuError::NotEnoughUnsoldStock { available: self.available });
        }
        self.units_removed += units;
        self.available -= units;
        Ok(())
    }

    fn reserve(&mut self, line: &ReserveLine) -> Result<SkuOutcome, SkuError> {
        line.quantity.validate(&self.limits)?;
        let (ttl_ms_min, ttl_ms_max) = (self.limits.hold_ttl_ms_min, self.limits.hold_ttl_ms_max);
        if !(ttl_ms_min..=ttl_ms_max).contains(&line.ttl_ms) {
            return Err(SkuError::InvalidTtl { ttl_ms: line.ttl_ms, ttl_ms_min, ttl_ms_max });
        }
        let holds_per_sku_max = self.limits.holds_per_sku_max;
        let live_holds = self.hold_count();
        let vacant = match self.reservations.entry(line.order.clone()) {
            Entry::Occupied(earlier) => {
                let hold = &earlier.get().hold;
                if hold.line != *line {
                    return Err(SkuError::IdempotencyConflict);
                }
                return Ok(SkuOutcome::Reserved {
                    units: hold.units,
                    expires_at_ms: hold.expires_at_ms,
                    replayed: true,
                });
            }
            Entry::Vacant(vacant) => vacant,
        };
        if self.clock_ms < self.opens_at_ms {
            return Err(SkuError::NotOpen { opens_at_ms: self.opens_at_ms });
        }
        if live_holds >= holds_per_sku_max {
            return Err(SkuError::HoldLimitReached { holds_per_sku_max });
        }
        let units_taken = self.buyer_units.get(&line.buyer).copied().unwrap_or(0);
        // Without a limit a buyer's count is still a u32: the allowance is
        // what keeps it from overflowing.
        let allowance = self.units_per_buyer_max.unwrap_or(u32::MAX).saturating_sub(units_taken);
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
        // `units <= allowance <= u32::MAX - units_taken`, checked above.
        let taken = self.buyer_units.entry(line.buyer.clone()).or_insert(0);
        *taken = taken.checked_add(units).expect("a buyer's units stay within their allowance");
        self.expiry_index.insert((expires_at_ms, number), line.order.clone());
        let hold = Hold { line: line.clone(), units, expires_at_ms, number, prepared: false };
        vacant.insert(Record { hold, ending: None });
        Ok(SkuOutcome::Reserved { units, expires_at_ms, replayed: false })
    }

    fn commit(&mut self, order: &OrderId, requested: Option<u32>) -> Result<SkuOutcome, SkuError> {
        let record = self.reservations.get(order).ok_or(SkuError::UnknownReservation)?;
        match record.ending {
            None => {
                let held_units = record.hold.units;
                let units = requested.unwrap_or(held_units);
                if units == 0 || units > held_units {
                    return Err(SkuError::InvalidQuantity {
                        detail: "a commit must sell between 1 and the held units",
                    });
                }
                self.end_hold(order, Ending::Committed { units, requested }, units);
                Ok(SkuOutcome::Committed { units, replayed: false })
            }
            Some(Ending::Committed { units, requested: first }) => {
                if first == requested || requested == Some(units) {
                    Ok(SkuOutcome::Committed { units, replayed: true })
                } else {
                    Err(SkuError::IdempotencyConflict)
                }
            }
            Some(Ending::Released) => Err(SkuError::AlreadyReleased),
            Some(Ending::Expired) => Err(SkuError::Expired { expired_at_ms: record.hold.expires_at_ms }),
        }
    }

    fn release(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        let record = self.reservations.get(order).ok_or(SkuError::UnknownReservation)?;
        match record.ending {
            None => {
                let units = self.end_hold(order, Ending::Released, 0);
                Ok(SkuOutcome::Released { units, replayed: false })
            }
            Some(Ending::Released) => Ok(SkuOutcome::Released { units: record.hold.units, replayed: true }),
            Some(Ending::Committed { .. }) => Err(SkuError::AlreadyCommitted),
            Some(Ending::Expired) => Err(SkuError::Expired { expired_at_ms: record.hold.expires_at_ms }),
        }
    }

    fn abort(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        match self.reservations.get(order).map(|record| record.ending) {
            Some(None) => {
                let Record { hold, .. } = self.reservations.remove(order).expect("just found");
                if hold.prepared {
                    self.prepared_holds -= 1;
                } else {
                    self.expiry_index.remove(&(hold.expires_at_ms, hold.number));
                }
                self.held -= u64::from(hold.units);
                self.available += u64::from(hold.units);
                uncount_buyer(&mut self.buyer_units, &hold.line.buyer, hold.units);
                Ok(SkuOutcome::Aborted { units: hold.units })
            }
            Some(Some(Ending::Committed { .. })) => Err(SkuError::AlreadyCommitted),
            // Already back in stock (released or expired), or never held.
            Some(Some(_)) | None => Ok(SkuOutcome::Aborted { units: 0 }),
        }
    }

    fn prepare(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        let record = self.reservations.get_mut(order).ok_or(SkuError::UnknownReservation)?;
        match record.ending {
            None if record.hold.prepared => Ok(SkuOutcome::Prepared { units: record.hold.units, replayed: true }),
            None => {
                record.hold.prepared = true;
                let (units, key) = (record.hold.units, (record.hold.expires_at_ms, record.hold.number));
                self.expiry_index.remove(&key).expect("a live unprepared hold is indexed");
                self.prepared_holds += 1;
                Ok(SkuOutcome::Prepared { units, replayed: false })
            }
            Some(Ending::Committed { .. }) => Err(SkuError::AlreadyCommitted),
            Some(Ending::Released) => Err(SkuError::AlreadyReleased),
            Some(Ending::Expired) => Err(SkuError::Expired { expired_at_ms: record.hold.expires_at_ms }),
        }
    }

    /// Idempotent in every state: a hold that already ended (or was never
    /// prepared) has nothing to give back.
    fn unprepare(&mut self, order: &OrderId) -> Result<SkuOutcome, SkuError> {
        let record = self.reservations.get_mut(order).ok_or(SkuError::UnknownReservation)?;
        if record.ending.is_some() || !record.hold.prepared {
            let expired = matches!(record.ending, Some(Ending::Expired));
            return Ok(SkuOutcome::Unprepared { units: record.hold.units, expired, replayed: true });
        }
        record.hold.prepared = false;
        let (units, key) = (record.hold.units, (record.hold.expires_at_ms, record.hold.number));
        self.expiry_index.insert(key, order.clone());
        self.prepared_holds -= 1;
        // Its time may have passed while it was prepared: it ends now, as
        // any due hold does before a command is answered.
        self.expire_due();
        let expired = self.reservations.get(order).is_some_and(|record| record.ending == Some(Ending::Expired));
        Ok(SkuOutcome::Unprepared { units, expired, replayed: false })
    }

    /// Ends a live hold and records how: `units_sold` of its units become
    /// sold, the rest go back to stock and to the buyer's allowance. Returns
    /// the units the hold had.
    fn end_hold(&mut self, order: &OrderId, ending: Ending, units_sold: u32) -> u32 {
        let record = self.reservations.get_mut(order).expect("end_hold of an unknown reservation");
        assert!(record.ending.is_none(), "a reservation ended twice");
        record.ending = Some(ending);
        let hold = &record.hold;
        assert!(units_sold <= hold.units, "sold more than was held");
        if hold.prepared {
            record.hold.prepared = false;
            self.prepared_holds -= 1;
        } else {
            let indexed = self.expiry_index.remove(&(hold.expires_at_ms, hold.number));
            assert!(indexed.is_some(), "live hold missing from the expiry index");
        }
        let hold = &record.hold;
        let returned = hold.units - units_sold;
        self.held -= u64::from(hold.units);
        self.sold += u64::from(units_sold);
        self.available += u64::from(returned);
        uncount_buyer(&mut self.buyer_units, &hold.line.buyer, returned);
        self.finished_queue.push_back((self.clock_ms, order.clone()));
        hold.units
    }

    /// Ends every hold whose expiry has come; returns how many.
    fn expire_due(&mut self) -> usize {
        let mut count = 0;
        while let Some((&(expires_at_ms, _), order)) = self.expiry_index.first_key_value() {
            if expires_at_ms > self.clock_ms {
                break;
            }
            let order = order.clone();
            self.end_hold(&order, Ending::Expired, 0);
            count += 1;
        }
        count
    }

    /// Forgets ended reservations and applied operations past the window or
    /// the count; returns how many.
    fn forget_old_finished(&mut self) -> usize {
        let (window_ms, count_max) = (self.limits.idempotency_window_ms, self.limits.finished_per_sku_max);
        let expired = |at_ms: u64, clock_ms: u64| at_ms.saturating_add(window_ms) <= clock_ms;
        let mut count = 0;
        while let Some((finished_at_ms, order)) = self.finished_queue.front() {
            if !expired(*finished_at_ms, self.clock_ms) && self.finished_queue.len() <= count_max {
                break;
            }
            let forgotten = self.reservations.remove(order);
            assert!(forgotten.is_some_and(|record| record.ending.is_some()), "forgot a live hold");
            self.finished_queue.pop_front();
            count += 1;
        }
        while let Some((applied_at_ms, operation)) = self.operations_queue.front() {
            if !expired(*applied_at_ms, self.clock_ms) && self.operations_queue.len() <= count_max {
                break;
            }
            let forgotten = self.operations.remove(operation);
            assert!(forgotten.is_some(), "the operation queue and map disagree");
            self.operations_queue.pop_front();
            count += 1;
        }
        count
    }

    /// The conservation law and the index sizes, checked after every
    /// command in every build: they cost a few additions, and a broken
    /// count is better as a crash than as oversold stock. Test builds also
    /// recount the holds (a pair assertion: the running totals and the
    /// records must agree).
    fn check_invariants(&self) {
        assert!(self.units_removed <= self.units_added, "removed more than was ever added");
        assert_eq!(
            self.available.checked_add(self.held).and_then(|sum| sum.checked_add(self.sold)),
            Some(self.units_added - self.units_removed),
            "units were created or destroyed"
        );
        assert_eq!(
            self.reservations.len(),
            self.expiry_index.len() + self.prepared_holds + self.finished_queue.len(),
            "a reservation is in no index or in two"
        );
        assert_eq!(self.operations.len(), self.operations_queue.len(), "operations and their queue differ");
        #[cfg(test)]
        {
            let live = self.reservations.values().filter(|record| record.ending.is_none());
            let held: u64 = live.clone().map(|record| u64::from(record.hold.units)).sum();
            assert_eq!(held, self.held, "held total disagrees with the holds");
            assert_eq!(live.filter(|record| record.hold.prepared).count(), self.prepared_holds);
            let by_buyer: u64 = self.buyer_units.values().map(|&units| u64::from(units)).sum();
            assert!(by_buyer >= held, "buyer counts lost a hold");
        }
    }
}

/// Everything a SKU knows, in one canonical order: what a snapshot stores.
/// Two states with the same history have equal images, whatever the
/// (randomised) layout of their maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuImage {
    pub units_added: u64,
    pub units_removed: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub units_per_buyer_max: Option<u32>,
    pub opens_at_ms: u64,
    pub clock_ms: u64,
    pub next_hold_number: u64,
    /// Live and remembered reservations, sorted by order id.
    pub reservations: Vec<ReservationImage>,
    /// Ended reservations with when they ended, oldest first.
    pub finished_queue: Vec<(u64, OrderId)>,
    /// Units held plus sold per buyer, sorted by buyer.
    pub buyer_units: Vec<(BuyerId, u32)>,
    /// Admin operations remembered, oldest first: when each was applied,
    /// its id and what it asked.
    pub operations: Vec<(u64, OperationId, AdminChange)>,
}

/// One reservation in a [`SkuImage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationImage {
    pub line: ReserveLine,
    pub units: u32,
    pub expires_at_ms: u64,
    pub number: u64,
    /// A live hold waiting for a decision (never true of an ended one).
    pub prepared: bool,
    pub ending: Option<EndingImage>,
}

/// How a reservation in a [`SkuImage`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndingImage {
    Committed { units: u32, requested: Option<u32> },
    Released,
    Expired,
}

/// Why an image cannot be a SKU's state (a damaged or forged snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent SKU image: {0}")]
pub struct InvalidImage(pub &'static str);

impl SkuState {
    /// The state in canonical form.
    pub fn image(&self) -> SkuImage {
        let mut reservations: Vec<ReservationImage> = self
            .reservations
            .values()
            .map(|record| ReservationImage {
                line: record.hold.line.clone(),
                units: record.hold.units,
                expires_at_ms: record.hold.expires_at_ms,
                number: record.hold.number,
                prepared: record.hold.prepared,
                ending: record.ending.map(|ending| match ending {
                    Ending::Committed { units, requested } => EndingImage::Committed { units, requested },
                    Ending::Released => EndingImage::Released,
                    Ending::Expired => EndingImage::Expired,
                }),
            })
            .collect();
        reservations.sort_by(|a, b| a.line.order.cmp(&b.line.order));
        let mut buyer_units: Vec<(BuyerId, u32)> =
            self.buyer_units.iter().map(|(buyer, units)| (buyer.clone(), *units)).collect();
        buyer_units.sort();
        SkuImage {
            units_added: self.units_added,
            units_removed: self.units_removed,
            available: self.available,
            held: self.held,
            sold: self.sold,
            units_per_buyer_max: self.units_per_buyer_max,
            opens_at_ms: self.opens_at_ms,
            clock_ms: self.clock_ms,
            next_hold_number: self.next_hold_number,
            reservations,
            finished_queue: self.finished_queue.iter().cloned().collect(),
            buyer_units,
            operations: self
                .operations_queue
                .iter()
                .map(|(at_ms, operation)| {
                    let change = self.operations.get(operation).expect("every queued operation is remembered");
                    (*at_ms, operation.clone(), change.clone())
                })
                .collect(),
        }
    }

    /// Rebuilds a state from its image, checking everything that can be
    /// cross-checked: counts against reservations, indexes against records.
    pub fn from_image(image: SkuImage, limits: Limits) -> Result<Self, InvalidImage> {
        let stock =
            image.units_added.checked_sub(image.units_removed).ok_or(InvalidImage("removed more than added"))?;
        let total = image.available.checked_add(image.held).and_then(|sum| sum.checked_add(image.sold));
        if total != Some(stock) {
            return Err(InvalidImage("available + held + sold differs from the stock"));
        }
        let mut reservations = FastMap::default();
        let mut expiry_index = BTreeMap::new();
        let mut prepared_holds = 0;
        let mut held = 0u64;
        for reservation in image.reservations {
            let ending = reservation.ending.map(|ending| match ending {
                EndingImage::Committed { units, requested } => Ending::Committed { units, requested },
                EndingImage::Released => Ending::Released,
                EndingImage::Expired => Ending::Expired,
            });
            if reservation.number >= image.next_hold_number {
                return Err(InvalidImage("hold number from the future"));
            }
            if reservation.prepared && ending.is_some() {
                return Err(InvalidImage("an ended reservation marked prepared"));
            }
            if ending.is_none() {
                held += u64::from(reservation.units);
                if reservation.prepared {
                    prepared_holds += 1;
                } else {
                    let key = (reservation.expires_at_ms, reservation.number);
                    expiry_index.insert(key, reservation.line.order.clone());
                }
            }
            let order = reservation.line.order.clone();
            let hold = Hold {
                line: reservation.line,
                units: reservation.units,
                expires_at_ms: reservation.expires_at_ms,
                number: reservation.number,
                prepared: reservation.prepared,
            };
            if reservations.insert(order, Record { hold, ending }).is_some() {
                return Err(InvalidImage("two reservations for one order"));
            }
        }
        if held != image.held {
            return Err(InvalidImage("held differs from the live reservations"));
        }
        let mut live_by_buyer: FastMap<&BuyerId, u64> = FastMap::default();
        for record in reservations.values().filter(|record| record.ending.is_none()) {
            *live_by_buyer.entry(&record.hold.line.buyer).or_insert(0) += u64::from(record.hold.units);
        }
        let buyer_units: FastMap<BuyerId, u32> = image.buyer_units.into_iter().collect();
        let counted = |buyer: &BuyerId| buyer_units.get(buyer).map_or(0, |&units| u64::from(units));
        if live_by_buyer.iter().any(|(buyer, &live)| counted(buyer) < live) {
            return Err(InvalidImage("a buyer's count is below their held units"));
        }
        drop(live_by_buyer);
        let mut operations = FastMap::default();
        let mut operations_queue = VecDeque::with_capacity(image.operations.len());
        for (at_ms, operation, change) in image.operations {
            if operations.insert(operation.clone(), change).is_some() {
                return Err(InvalidImage("an operation remembered twice"));
            }
            operations_queue.push_back((at_ms, operation));
        }
        let ended = reservations.values().filter(|record| record.ending.is_some()).count();
        let queued_ended = image
            .finished_queue
            .iter()
            .all(|(_, order)| reservations.get(order).is_some_and(|record| record.ending.is_some()));
        let mut queued = FastMap::default();
        let queued_once = image.finished_queue.iter().all(|(_, order)| queued.insert(order, ()).is_none());
        if ended != image.finished_queue.len() || !queued_ended || !queued_once {
            return Err(InvalidImage("ended reservations and their queue differ"));
        }
        let state = Self {
            limits,
            units_added: image.units_added,
            units_removed: image.units_removed,
            available: image.available,
            held: image.held,
            sold: image.sold,
            units_per_buyer_max: image.units_per_buyer_max,
            opens_at_ms: image.opens_at_ms,
            clock_ms: image.clock_ms,
            reservations,
            expiry_index,
            prepared_holds,
            next_hold_number: image.next_hold_number,
            finished_queue: image.finished_queue.into_iter().collect(),
            buyer_units,
            operations,
            operations_queue,
        };
        Ok(state)
    }
}

/// Takes `units` off a buyer's count (held plus sold), dropping the entry at
/// zero so that the map only holds buyers with units.
fn uncount_buyer(buyer_units: &mut FastMap<BuyerId, u32>, buyer: &BuyerId, units: u32) {
    let taken = buyer_units.get_mut(buyer).expect("a holding buyer is counted");
    assert!(*taken >= units, "buyer count below their held units");
    *taken -= units;
    if *taken == 0 {
        buyer_units.remove(buyer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(order: &str, buyer: &str, quantity: Quantity) -> SkuCommand {
        SkuCommand::Reserve(ReserveLine {
            order: OrderId::new(order).expect("id"),
            buyer: BuyerId::new(buyer).expect("id"),
            quantity,
            ttl_ms: 10_000,
        })
    }

    fn state(units: u64, limits: Limits) -> SkuState {
        SkuState::new(SkuSettings { initial_units: units, ..SkuSettings::default() }, limits).expect("valid")
    }

    #[test]
    fn up_to_takes_what_is_there_but_at_least_the_minimum() {
        let mut sku = state(3, Limits::default());
        let answer = sku.apply(0, &line("a", "x", Quantity::UpTo { max: 5, min: 2 }));
        assert_eq!(answer.result, Ok(SkuOutcome::Reserved { units: 3, expires_at_ms: 10_000, replayed: false }));
        let answer = sku.apply(0, &line("b", "y", Quantity::UpTo { max: 5, min: 1 }));
        assert_eq!(answer.result, Err(SkuError::SoldOut { available: 0 }));
    }

    #[test]
    fn time_never_runs_backwards_inside_a_sku() {
        let mut sku = state(3, Limits::default());
        sku.apply(50_000, &SkuCommand::Query);
        // A clock that stepped back does not extend the hold.
        let answer = sku.apply(1_000, &line("a", "x", Quantity::Exactly(1)));
        assert_eq!(answer.result, Ok(SkuOutcome::Reserved { units: 1, expires_at_ms: 60_000, replayed: false }));
    }

    #[test]
    fn ended_reservations_are_forgotten_oldest_first_beyond_the_bound() {
        let limits = Limits { finished_per_sku_max: 2, ..Limits::default() };
        let mut sku = state(10, limits);
        for order in ["a", "b", "c"] {
            sku.apply(0, &line(order, "x", Quantity::Exactly(1)));
            sku.apply(0, &SkuCommand::Release { order: OrderId::new(order).expect("id") });
        }
        // The next command forgets the oldest ("a"): its id is fresh again.
        let answer = sku.apply(0, &line("a", "x", Quantity::Exactly(1)));
        assert_eq!(answer.result, Ok(SkuOutcome::Reserved { units: 1, expires_at_ms: 10_000, replayed: false }));
        let answer = sku.apply(0, &SkuCommand::Release { order: OrderId::new("c").expect("id") });
        assert_eq!(answer.result, Ok(SkuOutcome::Released { units: 1, replayed: true }), "recent ones are kept");
    }

    #[test]
    fn ended_reservations_are_forgotten_after_the_window() {
        let limits = Limits { idempotency_window_ms: 3_600_000, ..Limits::default() };
        let mut sku = state(10, limits);
        sku.apply(0, &line("a", "x", Quantity::Exactly(1)));
        sku.apply(0, &SkuCommand::Commit { order: OrderId::new("a").expect("id"), units: None });
        let commit_again = SkuCommand::Commit { order: OrderId::new("a").expect("id"), units: None };
        assert!(matches!(sku.apply(3_599_999, &commit_again).result, Ok(SkuOutcome::Committed { replayed: true, .. })));
        assert_eq!(sku.apply(3_600_000, &commit_again).result, Err(SkuError::UnknownReservation));
    }

    #[test]
    fn stock_bounds_are_enforced_without_change() {
        let limits = Limits { stock_units_max: 10, ..Limits::default() };
        assert!(matches!(
            SkuState::new(SkuSettings { initial_units: 11, ..SkuSettings::default() }, limits.clone()),
            Err(SkuError::StockLimitExceeded { stock_units_max: 10 })
        ));
        let mut sku = state(8, limits);
        let answer = sku.apply(0, &SkuCommand::Admin { operation: None, change: AdminChange::AddStock { units: 3 } });
        assert_eq!(answer.result, Err(SkuError::StockLimitExceeded { stock_units_max: 10 }));
        assert_eq!(answer.stock, StockSnapshot { available: 8, held: 0, sold: 0 });
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Counts near their types' limits: one buyer without a limit
        /// taking lines of up to `u32::MAX` units from stock near
        /// `stock_units_max`, then settling them. Every command answers (an
        /// overflowing buyer count used to wrap, and the release after it
        /// aborted the process on an assertion) and the books balance.
        #[test]
        fn counts_near_the_type_limits_never_overflow(
            steps in proptest::collection::vec((0..5u8, 0..4u8, proptest::prelude::any::<u32>()), 1..60),
        ) {
            let limits = Limits {
                line_units_max: u32::MAX,
                stock_units_max: u64::MAX / 4,
                ..Limits::default()
            };
            let mut sku = state(u64::MAX / 4 - 1, limits);
            let buyer = BuyerId::new("whale").expect("id");
            for (number, (kind, order, units)) in steps.into_iter().enumerate() {
                let order = OrderId::new(format!("o{order}")).expect("id");
                let units = units.max(1);
                let command = match kind {
                    0 => SkuCommand::Reserve(ReserveLine {
                        order: OrderId::new(format!("o{number}")).expect("id"),
                        buyer: buyer.clone(),
                        quantity: if units % 2 == 0 { Quantity::Exactly(units) } else { Quantity::UpTo { max: u32::MAX, min: 1 } },
                        ttl_ms: 10_000,
                    }),
                    1 => SkuCommand::Commit { order, units: None },
                    2 => SkuCommand::Release { order },
                    3 => SkuCommand::Admin { operation: None, change: AdminChange::AddStock { units: u64::MAX - u64::from(units) } },
                    _ => SkuCommand::Admin { operation: None, change: AdminChange::RemoveStock { units: u64::from(units) } },
                };
                let answer = sku.apply(number as u64, &command);
                let stock = answer.stock;
                proptest::prop_assert_eq!(
                    stock.available.checked_add(stock.held).and_then(|sum| sum.checked_add(stock.sold)),
                    Some(sku.units_added - sku.units_removed)
                );
                let taken = sku.buyer_units.get(&buyer).copied().unwrap_or(0);
                proptest::prop_assert!(u64::from(taken) <= stock.held + stock.sold, "{taken} taken, {stock:?}");
            }
        }
    }
}
