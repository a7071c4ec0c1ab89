//! Property test: random command sequences, including expiry at random times,
//! clocks that step backwards and prepared holds, applied to `SkuState` and to a small,
//! obviously-correct reference model. Every answer and every count must
//! agree, and the conservation law must hold after every step.

use flashstock_engine::sku::ReserveLine;
use flashstock_engine::{
    AdminChange, BuyerId, Limits, OperationId, OrderId, Quantity, SkuCommand, SkuError, SkuOutcome, SkuSettings,
    SkuState, StockSnapshot,
};
use proptest::prelude::*;

const LINE_UNITS_MAX: u32 = 5;
const TTL_MS_MIN: u64 = 1_000;
const TTL_MS_MAX: u64 = 1_000_000;

fn limits() -> Limits {
    Limits {
        line_units_max: LINE_UNITS_MAX,
        hold_ttl_ms_min: TTL_MS_MIN,
        hold_ttl_ms_max: TTL_MS_MAX,
        holds_per_sku_max: 6,
        stock_units_max: 40,
        ..Limits::default()
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// An admin change under a small operation number (so that retries,
    /// and the same number with another change, are frequent), or none.
    Admin {
        operation: Option<u8>,
        change: AdminChange,
    },
    Reserve {
        order: u8,
        buyer: u8,
        quantity: Quantity,
        ttl_ms: u64,
    },
    Commit {
        order: u8,
        units: Option<u32>,
    },
    Release {
        order: u8,
    },
    Abort {
        order: u8,
    },
    Prepare {
        order: u8,
    },
    Unprepare {
        order: u8,
    },
    Expire,
    Query,
}

fn quantity() -> impl Strategy<Value = Quantity> {
    prop_oneof![
        (0..=LINE_UNITS_MAX + 1).prop_map(Quantity::Exactly),
        (0..=LINE_UNITS_MAX + 1, 0..=3u32).prop_map(|(max, min)| Quantity::UpTo { max, min }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let order = 0..10u8;
    let admin = |change| {
        (proptest::option::of(0..4u8), change).prop_map(|(operation, change)| Step::Admin { operation, change })
    };
    prop_oneof![
        1 => admin((0..12u64).prop_map(|units| AdminChange::AddStock { units }).boxed()),
        1 => admin((0..6u64).prop_map(|units| AdminChange::RemoveStock { units }).boxed()),
        1 => admin(proptest::option::of(0..6u32).prop_map(|units_per_buyer_max| AdminChange::SetBuyerLimit { units_per_buyer_max }).boxed()),
        1 => admin((0..20_000u64).prop_map(|opens_at_ms| AdminChange::OpenSale { opens_at_ms }).boxed()),
        1 => admin(Just(AdminChange::Create { settings: SkuSettings::default() }).boxed()),
        6 => (order.clone(), 0..3u8, quantity(), prop::sample::select(vec![0, 999, 1_000, 3_000, 10_000, 1_000_000, 1_000_001]))
            .prop_map(|(order, buyer, quantity, ttl_ms)| Step::Reserve { order, buyer, quantity, ttl_ms }),
        3 => (order.clone(), proptest::option::of(0..7u32)).prop_map(|(order, units)| Step::Commit { order, units }),
        2 => order.clone().prop_map(|order| Step::Release { order }),
        1 => order.clone().prop_map(|order| Step::Abort { order }),
        2 => order.clone().prop_map(|order| Step::Prepare { order }),
        1 => order.prop_map(|order| Step::Unprepare { order }),
        1 => Just(Step::Expire),
        1 => Just(Step::Query),
    ]
}

/// Time moves by these steps; negative ones test the clamp.
fn time_step() -> impl Strategy<Value = i64> {
    prop_oneof![4 => 0..2_000i64, 1 => -3_000..0i64, 1 => 0..20_000i64]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Live,
    Committed { units: u32, requested: Option<u32> },
    Released,
    Expired,
}

#[derive(Debug, Clone)]
struct ModelHold {
    order: u8,
    buyer: u8,
    quantity: Quantity,
    ttl_ms: u64,
    units: u32,
    expires_at_ms: u64,
    fate: Fate,
    /// Waiting for a decision: does not expire while set.
    prepared: bool,
}

/// Counts units by scanning reservations instead of keeping running totals.
#[derive(Debug, Default)]
struct Model {
    added: u64,
    removed: u64,
    buyer_limit: Option<u32>,
    opens_at_ms: u64,
    clock_ms: u64,
    holds: Vec<ModelHold>,
    /// Admin operations applied, by number (never forgotten: the tests'
    /// clocks stay far inside the idempotency window).
    operations: Vec<(u8, AdminChange)>,
}

impl Model {
    fn held(&self) -> u64 {
        self.holds.iter().filter(|h| h.fate == Fate::Live).map(|h| u64::from(h.units)).sum()
    }
    fn sold(&self) -> u64 {
        self.holds
            .iter()
            .map(|h| match h.fate {
                Fate::Committed { units, .. } => u64::from(units),
                _ => 0,
            })
            .sum()
    }
    fn available(&self) -> u64 {
        self.added - self.removed - self.held() - self.sold()
    }
    fn stock(&self) -> StockSnapshot {
        StockSnapshot { available: self.available(), held: self.held(), sold: self.sold() }
    }
    fn buyer_taken(&self, buyer: u8) -> u32 {
        self.holds
            .iter()
            .filter(|h| h.buyer == buyer)
            .map(|h| match h.fate {
                Fate::Live => h.units,
                Fate::Committed { units, .. } => units,
                _ => 0,
            })
            .sum()
    }
    fn find(&mut self, order: u8) -> Option<&mut ModelHold> {
        self.holds.iter_mut().find(|h| h.order == order)
    }

    fn apply(&mut self, now_ms: u64, step: &Step) -> Result<SkuOutcome, SkuError> {
        self.clock_ms = self.clock_ms.max(now_ms);
        let clock = self.clock_ms;
        let mut expired = 0;
        for hold in &mut self.holds {
            if hold.fate == Fate::Live && !hold.prepared && hold.expires_at_ms <= clock {
                hold.fate = Fate::Expired;
                expired += 1;
            }
        }
        match *step {
            Step::Admin { operation, ref change } => {
                if let Some((_, first)) = self.operations.iter().find(|(number, _)| Some(*number) == operation) {
                    return if first == change {
                        Ok(SkuOutcome::StockChanged { replayed: true })
                    } else {
                        Err(SkuError::IdempotencyConflict)
                    };
                }
                match *change {
                    AdminChange::AddStock { units } => {
                        if units == 0 {
                            return Err(SkuError::InvalidQuantity { detail: "adding 0 units" });
                        }
                        if self.added - self.removed + units > 40 {
                            return Err(SkuError::StockLimitExceeded { stock_units_max: 40 });
                        }
                        self.added += units;
                    }
                    AdminChange::RemoveStock { units } => {
                        if units == 0 {
                            return Err(SkuError::InvalidQuantity { detail: "removing 0 units" });
                        }
                        if units > self.available() {
                            return Err(SkuError::NotEnoughUnsoldStock { available: self.available() });
                        }
                        self.removed += units;
                    }
                    AdminChange::SetBuyerLimit { units_per_buyer_max } => self.buyer_limit = units_per_buyer_max,
                    AdminChange::OpenSale { opens_at_ms } => self.opens_at_ms = opens_at_ms,
                    AdminChange::Create { .. } => return Err(SkuError::AlreadyCreated),
                }
                if let Some(number) = operation {
                    self.operations.push((number, change.clone()));
                }
                Ok(SkuOutcome::StockChanged { replayed: false })
            }
            Step::Reserve { order, buyer, quantity, ttl_ms } => {
                let (max, min) = match quantity {
                    Quantity::Exactly(units) => (units, units),
                    Quantity::UpTo { max, min } => (max, min),
                };
                if min == 0 {
                    return Err(SkuError::InvalidQuantity { detail: "a line must ask for at least 1 unit" });
                }
                if min > max {
                    return Err(SkuError::InvalidQuantity { detail: "`min` is larger than `max`" });
                }
                if max > LINE_UNITS_MAX {
                    return Err(SkuError::InvalidQuantity {
                        detail: "more units than line_units_max allows on one line",
                    });
                }
                if !(TTL_MS_MIN..=TTL_MS_MAX).contains(&ttl_ms) {
                    return Err(SkuError::InvalidTtl { ttl_ms, ttl_ms_min: TTL_MS_MIN, ttl_ms_max: TTL_MS_MAX });
                }
                if let Some(hold) = self.holds.iter().find(|h| h.order == order) {
                    if (hold.buyer, hold.quantity, hold.ttl_ms) != (buyer, quantity, ttl_ms) {
                        return Err(SkuError::IdempotencyConflict);
                    }
                    return Ok(SkuOutcome::Reserved {
                        units: hold.units,
                        expires_at_ms: hold.expires_at_ms,
                        replayed: true,
                    });
                }
                if clock < self.opens_at_ms {
                    return Err(SkuError::NotOpen { opens_at_ms: self.opens_at_ms });
                }
                if self.holds.iter().filter(|h| h.fate == Fate::Live).count() >= 6 {
                    return Err(SkuError::HoldLimitReached { holds_per_sku_max: 6 });
                }
                let taken = self.buyer_taken(buyer);
                let allowance = self.buyer_limit.map_or(u32::MAX, |limit| limit.saturating_sub(taken));
                if allowance < min {
                    return Err(SkuError::LimitExceeded {
                        units_per_buyer_max: self.buyer_limit.unwrap_or(u32::MAX),
                        units_taken: taken,
                    });
                }
                let available = u32::try_from(self.available()).unwrap_or(u32::MAX);
                let units = max.min(allowance).min(available);
                if units < min {
                    return Err(SkuError::SoldOut { available: self.available() });
                }
                let expires_at_ms = clock + ttl_ms;
                let fate = Fate::Live;
                self.holds.push(ModelHold {
                    order,
                    buyer,
                    quantity,
                    ttl_ms,
                    units,
                    expires_at_ms,
                    fate,
                    prepared: false,
                });
                Ok(SkuOutcome::Reserved { units, expires_at_ms, replayed: false })
            }
            Step::Commit { order, units: requested } => {
                let Some(hold) = self.find(order) else { return Err(SkuError::UnknownReservation) };
                match hold.fate {
                    Fate::Live => {
                        let units = requested.unwrap_or(hold.units);
                        if units == 0 || units > hold.units {
                            return Err(SkuError::InvalidQuantity {
                                detail: "a commit must sell between 1 and the held units",
                            });
                        }
                        hold.fate = Fate::Committed { units, requested };
                        Ok(SkuOutcome::Committed { units, replayed: false })
                    }
                    Fate::Committed { units, requested: first } if first == requested || requested == Some(units) => {
                        Ok(SkuOutcome::Committed { units, replayed: true })
                    }
                    Fate::Committed { .. } => Err(SkuError::IdempotencyConflict),
                    Fate::Released => Err(SkuError::AlreadyReleased),
                    Fate::Expired => Err(SkuError::Expired { expired_at_ms: hold.expires_at_ms }),
                }
            }
            Step::Release { order } => {
                let Some(hold) = self.find(order) else { return Err(SkuError::UnknownReservation) };
                match hold.fate {
                    Fate::Live => {
                        hold.fate = Fate::Released;
                        Ok(SkuOutcome::Released { units: hold.units, replayed: false })
                    }
                    Fate::Released => Ok(SkuOutcome::Released { units: hold.units, replayed: true }),
                    Fate::Committed { .. } => Err(SkuError::AlreadyCommitted),
                    Fate::Expired => Err(SkuError::Expired { expired_at_ms: hold.expires_at_ms }),
                }
            }
            Step::Abort { order } => match self.holds.iter().position(|h| h.order == order) {
                Some(index) if self.holds[index].fate == Fate::Live => {
                    let hold = self.holds.remove(index);
                    Ok(SkuOutcome::Aborted { units: hold.units })
                }
                Some(index) if matches!(self.holds[index].fate, Fate::Committed { .. }) => {
                    Err(SkuError::AlreadyCommitted)
                }
                _ => Ok(SkuOutcome::Aborted { units: 0 }),
            },
            Step::Prepare { order } => {
                let Some(hold) = self.find(order) else { return Err(SkuError::UnknownReservation) };
                match hold.fate {
                    Fate::Live => {
                        let replayed = hold.prepared;
                        hold.prepared = true;
                        Ok(SkuOutcome::Prepared { units: hold.units, replayed })
                    }
                    Fate::Committed { .. } => Err(SkuError::AlreadyCommitted),
                    Fate::Released => Err(SkuError::AlreadyReleased),
                    Fate::Expired => Err(SkuError::Expired { expired_at_ms: hold.expires_at_ms }),
                }
            }
            Step::Unprepare { order } => {
                let Some(hold) = self.find(order) else { return Err(SkuError::UnknownReservation) };
                if hold.fate != Fate::Live || !hold.prepared {
                    let expired = hold.fate == Fate::Expired;
                    return Ok(SkuOutcome::Unprepared { units: hold.units, expired, replayed: true });
                }
                hold.prepared = false;
                let expired = hold.expires_at_ms <= clock;
                if expired {
                    hold.fate = Fate::Expired;
                }
                Ok(SkuOutcome::Unprepared { units: hold.units, expired, replayed: false })
            }
            Step::Expire => Ok(SkuOutcome::Expired { holds: expired }),
            Step::Query => Ok(SkuOutcome::Counted),
        }
    }
}

fn command(step: &Step) -> SkuCommand {
    let order = |n: u8| OrderId::new(format!("order-{n}")).expect("valid id");
    match *step {
        Step::Admin { operation, ref change } => SkuCommand::Admin {
            operation: operation.map(|number| OperationId::new(format!("operation-{number}")).expect("valid id")),
            change: change.clone(),
        },
        Step::Reserve { order: o, buyer, quantity, ttl_ms } => SkuCommand::Reserve(ReserveLine {
            order: order(o),
            buyer: BuyerId::new(format!("buyer-{buyer}")).expect("valid id"),
            quantity,
            ttl_ms,
        }),
        Step::Commit { order: o, units } => SkuCommand::Commit { order: order(o), units },
        Step::Release { order: o } => SkuCommand::Release { order: order(o) },
        Step::Abort { order: o } => SkuCommand::Abort { order: order(o) },
        Step::Prepare { order: o } => SkuCommand::Prepare { order: order(o) },
        Step::Unprepare { order: o } => SkuCommand::Unprepare { order: order(o) },
        Step::Expire => SkuCommand::Expire,
        Step::Query => SkuCommand::Query,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_agrees_with_the_reference_model(
        initial_units in 0..20u64,
        steps in proptest::collection::vec((time_step(), step()), 1..80),
    ) {
        let settings = SkuSettings { initial_units, units_per_buyer_max: None, opens_at_ms: 0 };
        let mut state = SkuState::new(settings, limits()).expect("valid settings");
        let mut model = Model { added: initial_units, ..Model::default() };
        let mut now_ms: u64 = 10_000;
        for (delta_ms, step) in &steps {
            now_ms = now_ms.saturating_add_signed(*delta_ms);
            let expected = model.apply(now_ms, step);
            let answer = state.apply(now_ms, &command(step));
            prop_assert_eq!(&answer.result, &expected, "step {:?} at {}", step, now_ms);
            prop_assert_eq!(answer.stock, model.stock(), "counts after {:?}", step);
            prop_assert_eq!(answer.stock.total(), model.added - model.removed);
            prop_assert!(answer.stock.sold <= model.added);
        }
    }

    /// Replaying the same commands on a fresh state gives the same answers:
    /// the state machine is deterministic (no clock, no randomness).
    #[test]
    fn replay_is_deterministic(steps in proptest::collection::vec((time_step(), step()), 1..60)) {
        let run = || {
            let mut state = SkuState::new(SkuSettings { initial_units: 10, ..SkuSettings::default() }, limits())
                .expect("valid settings");
            let mut now_ms: u64 = 10_000;
            steps.iter().map(|(delta_ms, step)| {
                now_ms = now_ms.saturating_add_signed(*delta_ms);
                state.apply(now_ms, &command(step))
            }).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A state rebuilt from its image (what a snapshot stores) is the same
    /// state: equal image, and the same answers to any further commands.
    #[test]
    fn a_state_restored_from_its_image_behaves_identically(
        prefix in proptest::collection::vec((time_step(), step()), 0..60),
        suffix in proptest::collection::vec((time_step(), step()), 1..30),
    ) {
        let mut original = SkuState::new(SkuSettings { initial_units: 12, ..SkuSettings::default() }, limits())
            .expect("valid settings");
        let mut now_ms: u64 = 10_000;
        for (delta_ms, step) in &prefix {
            now_ms = now_ms.saturating_add_signed(*delta_ms);
            original.apply(now_ms, &command(step));
        }
        let image = original.image();
        let mut restored = SkuState::from_image(image.clone(), limits()).expect("a real image is consistent");
        prop_assert_eq!(restored.image(), image);
        for (delta_ms, step) in &suffix {
            now_ms = now_ms.saturating_add_signed(*delta_ms);
            let command = command(step);
            prop_assert_eq!(original.apply(now_ms, &command), restored.apply(now_ms, &command), "{:?}", step);
        }
        prop_assert_eq!(original.image(), restored.image());
    }
}

#[test]
fn an_inconsistent_image_is_refused() {
    let mut state = SkuState::new(SkuSettings { initial_units: 5, ..SkuSettings::default() }, limits()).expect("valid");
    state.apply(0, &command(&Step::Reserve { order: 1, buyer: 1, quantity: Quantity::Exactly(2), ttl_ms: 10_000 }));
    let mut image = state.image();
    image.held += 1;
    image.available -= 1;
    assert!(SkuState::from_image(image, limits()).is_err(), "held must match the live holds");
    let mut image = state.image();
    image.sold += 1;
    assert!(SkuState::from_image(image, limits()).is_err(), "counts must add up to the stock");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The logging rule: replaying only what `apply_recording` asked to
    /// record, at the same times, on a fresh state reaches exactly the same
    /// state, including its clock, expiries and remembered reservations.
    #[test]
    fn replaying_the_recorded_commands_reaches_the_same_state(
        steps in proptest::collection::vec((time_step(), step()), 1..80),
    ) {
        let small_memory = Limits { finished_per_sku_max: 3, idempotency_window_ms: TTL_MS_MAX, ..limits() };
        let settings = SkuSettings { initial_units: 9, ..SkuSettings::default() };
        let mut live = SkuState::new(settings, small_memory.clone()).expect("valid settings");
        let mut log = Vec::new();
        let mut now_ms: u64 = 10_000;
        for (delta_ms, step) in &steps {
            now_ms = now_ms.saturating_add_signed(*delta_ms);
            let (_, recorded) = live.apply_recording(now_ms, &command(step));
            if let Some(recorded) = recorded {
                log.push((now_ms, recorded));
            }
        }
        let mut replayed = SkuState::new(settings, small_memory).expect("valid settings");
        for (at_ms, recorded) in &log {
            replayed.apply(*at_ms, recorded);
        }
        prop_assert_eq!(replayed.image(), live.image());
        prop_assert!(log.len() <= steps.len());
    }
}
