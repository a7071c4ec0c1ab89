//! The engine's log record: its only serialized form.
//!
//! These types mirror the commands that change stock, field by field, so the
//! on-disk format is written down in one place and does not change when the
//! in-memory types are refactored. Encoded with MessagePack (rmp-serde,
//! compact form). The frame carries the format version; within a version,
//! new variants are only ever added at the end.
//!
//! Decoding validates everything the engine's own types validate (ids), so
//! a record that decodes is one the engine could have written.

use serde::{Deserialize, Serialize};

use crate::coordination::{CoordinatorRecord, HeldLine, Outcome};
use crate::ids::{BuyerId, InvalidId, OperationId, OrderId, SkuId};
use crate::limits::{InvalidLimits, Limits};
use crate::sku::{AdminChange, Quantity, ReserveLine, SkuCommand, SkuSettings};

/// One line of a transaction: which SKU, and how many of its held units to
/// sell (all of them when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionLine {
    pub sku: SkuId,
    pub units: Option<u32>,
}

/// A transaction the log has begun and not ended: what recovery must
/// finish (commit every line if `committed`, else give the prepared lines
/// their TTL back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTransaction {
    pub lines: Vec<TransactionLine>,
    pub committed: bool,
}

/// One durable fact about a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// `sku` was created at `now_ms` by `operation` (`None` and 0 in logs
    /// written before creations carried them).
    CreateSku { sku: SkuId, settings: SkuSettings, now_ms: u64, operation: Option<OperationId> },
    /// `command` was applied to `sku` at `now_ms` (the owner's time, so that
    /// replay needs no clock).
    Apply { sku: SkuId, now_ms: u64, command: SkuCommand },
    /// A commit of `order` over several lines began: its lines are about to
    /// be prepared. Written before any prepare, so a prepared hold of a
    /// transaction coordinated here always has this record before it (a
    /// restart that finds no decision gives the holds their TTL back). A
    /// new `TransactionBegun` for an order replaces an undecided one (a
    /// retried commit). Belongs to the partition of the order id.
    TransactionBegun { order: OrderId, lines: Vec<TransactionLine> },
    /// The commit is decided: every line is to be committed, however long
    /// it takes. Written after every line is prepared and before any is
    /// committed.
    TransactionCommitted { order: OrderId },
    /// Every line of the transaction has its outcome; it is forgotten.
    TransactionEnded { order: OrderId },
    /// From here on, commands are checked against `limits`. Written when
    /// an engine opens with limits other than those in force (a changed
    /// `cluster.toml`, or a log that never named any), before it serves
    /// anything: every record after it was first applied under these
    /// limits, every record before it under the earlier ones, so replay
    /// reaches the acknowledged state whatever the configuration says
    /// today.
    RulesInForce { limits: Limits },
    /// A fact of the member's order coordinator
    /// ([`crate::coordination::Coordinator`]): what it must know again
    /// after a restart.
    Coordinator(CoordinatorRecord),
}

/// Why a payload is not a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("undecodable record: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("record holds an invalid id: {0}")]
    InvalidId(#[from] InvalidId),
    #[error("record holds a read-only command")]
    ReadOnlyCommand,
    #[error("record holds invalid limits: {0}")]
    InvalidLimits(#[from] InvalidLimits),
    #[error("undecodable record: {0}")]
    Bounds(#[from] flashstock_msgpack::BoundsError),
    #[error("record holds an impossible coordinator fact: {0}")]
    Coordinator(&'static str),
}

/// Deepest nesting a record's MessagePack may have: the deepest record
/// (a reserve with an up-to quantity) nests 6 containers.
const RECORD_DEPTH_MAX: usize = 16;

// Fields added after a variant was first written go last and carry
// `#[serde(default)]`, so that records written before them still decode
// (a missing trailing field of the compact form reads as its default).
#[derive(Debug, Serialize, Deserialize)]
enum WireRecord {
    CreateSku {
        sku: String,
        initial_units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
        #[serde(default)]
        now_ms: u64,
        #[serde(default)]
        operation: Option<String>,
    },
    Apply {
        sku: String,
        now_ms: u64,
        command: WireCommand,
    },
    TransactionBegun {
        order: String,
        lines: Vec<(String, Option<u32>)>,
    },
    TransactionCommitted {
        order: String,
    },
    TransactionEnded {
        order: String,
    },
    RulesInForce {
        limits: WireLimits,
    },
    Coordinator(WireCoordinatorRecord),
}

/// [`CoordinatorRecord`], field by field (shared with snapshots).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireCoordinatorRecord {
    Epoch {
        epoch: u64,
    },
    Held {
        order: String,
        buyer: String,
        ttl_ms: u64,
        attempt: String,
        /// `(sku, quantity, units held, member, index in the request)`.
        lines: Vec<(String, WireQuantity, u32, u32, u64)>,
        expires_at_ms: u64,
    },
    Decided {
        order: String,
        units: Vec<u32>,
    },
    ReleaseDecided {
        order: String,
    },
    ExpiryDecided {
        order: String,
        expired_at_ms: u64,
    },
    Ended {
        order: String,
        /// Units sold per line (committed), or none and `expired_at_ms`.
        committed: Option<Vec<u32>>,
        expired_at_ms: Option<u64>,
        now_ms: u64,
    },
    Forgotten {
        order: String,
    },
}

/// Lines a held order may have in a record: far above any configured
/// `lines_per_order_max`, and a bound on what a damaged record can make
/// recovery allocate.
const COORDINATOR_LINES_MAX: usize = 4_096;

impl WireCoordinatorRecord {
    pub(crate) fn of(record: &CoordinatorRecord) -> Self {
        match record {
            CoordinatorRecord::Epoch { epoch } => Self::Epoch { epoch: *epoch },
            CoordinatorRecord::Held { order, buyer, ttl_ms, attempt, lines, expires_at_ms } => Self::Held {
                order: order.as_str().to_owned(),
                buyer: buyer.as_str().to_owned(),
                ttl_ms: *ttl_ms,
                attempt: attempt.as_str().to_owned(),
                lines: lines
                    .iter()
                    .map(|line| {
                        (
                            line.sku.as_str().to_owned(),
                            wire_quantity(line.quantity),
                            line.units,
                            line.member,
                            line.index as u64,
                        )
                    })
                    .collect(),
                expires_at_ms: *expires_at_ms,
            },
            CoordinatorRecord::Decided { order, units } => {
                Self::Decided { order: order.as_str().to_owned(), units: units.clone() }
            }
            CoordinatorRecord::ReleaseDecided { order } => Self::ReleaseDecided { order: order.as_str().to_owned() },
            CoordinatorRecord::ExpiryDecided { order, expired_at_ms } => {
                Self::ExpiryDecided { order: order.as_str().to_owned(), expired_at_ms: *expired_at_ms }
            }
            CoordinatorRecord::Ended { order, outcome, now_ms } => {
                let (committed, expired_at_ms) = match outcome {
                    Outcome::Committed { units } => (Some(units.clone()), None),
                    Outcome::Released => (None, None),
                    Outcome::Expired { expired_at_ms } => (None, Some(*expired_at_ms)),
                };
                Self::Ended { order: order.as_str().to_owned(), committed, expired_at_ms, now_ms: *now_ms }
            }
            CoordinatorRecord::Forgotten { order } => Self::Forgotten { order: order.as_str().to_owned() },
        }
    }

    pub(crate) fn record(self) -> Result<CoordinatorRecord, RecordError> {
        Ok(match self {
            Self::Epoch { epoch } => CoordinatorRecord::Epoch { epoch },
            Self::Held { order, buyer, ttl_ms, attempt, lines, expires_at_ms } => {
                if lines.is_empty() || lines.len() > COORDINATOR_LINES_MAX {
                    return Err(RecordError::Coordinator("a held order with no lines or too many"));
                }
                let lines = lines
                    .into_iter()
                    .map(|(sku, quantity, units, member, index)| {
                        let index = usize::try_from(index)
                            .map_err(|_| RecordError::Coordinator("a line index beyond this platform"))?;
                        Ok(HeldLine {
                            sku: SkuId::new(sku)?,
                            quantity: engine_quantity(quantity),
                            units,
                            member,
                            index,
                        })
                    })
                    .collect::<Result<Vec<_>, RecordError>>()?;
                CoordinatorRecord::Held {
                    order: OrderId::new(order)?,
                    buyer: BuyerId::new(buyer)?,
                    ttl_ms,
                    attempt: OrderId::new(attempt)?,
                    lines,
                    expires_at_ms,
                }
            }
            Self::Decided { order, units } => {
                if units.len() > COORDINATOR_LINES_MAX {
                    return Err(RecordError::Coordinator("a decision over too many lines"));
                }
                CoordinatorRecord::Decided { order: OrderId::new(order)?, units }
            }
            Self::ReleaseDecided { order } => CoordinatorRecord::ReleaseDecided { order: OrderId::new(order)? },
            Self::ExpiryDecided { order, expired_at_ms } => {
                CoordinatorRecord::ExpiryDecided { order: OrderId::new(order)?, expired_at_ms }
            }
            Self::Ended { order, committed, expired_at_ms, now_ms } => {
                let outcome = match (committed, expired_at_ms) {
                    (Some(units), None) if units.len() <= COORDINATOR_LINES_MAX => Outcome::Committed { units },
                    (None, Some(expired_at_ms)) => Outcome::Expired { expired_at_ms },
                    (None, None) => Outcome::Released,
                    _ => return Err(RecordError::Coordinator("an order ended two ways")),
                };
                CoordinatorRecord::Ended { order: OrderId::new(order)?, outcome, now_ms }
            }
            Self::Forgotten { order } => CoordinatorRecord::Forgotten { order: OrderId::new(order)? },
        })
    }
}

fn wire_quantity(quantity: Quantity) -> WireQuantity {
    match quantity {
        Quantity::Exactly(units) => WireQuantity::Exactly(units),
        Quantity::UpTo { max, min } => WireQuantity::UpTo { max, min },
    }
}

fn engine_quantity(quantity: WireQuantity) -> Quantity {
    match quantity {
        WireQuantity::Exactly(units) => Quantity::Exactly(units),
        WireQuantity::UpTo { max, min } => Quantity::UpTo { max, min },
    }
}

/// [`Limits`], field by field (the `usize` ones as `u64`, so the format
/// does not depend on the platform).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireLimits {
    line_units_max: u32,
    hold_ttl_ms_min: u64,
    hold_ttl_ms_max: u64,
    holds_per_sku_max: u64,
    finished_per_sku_max: u64,
    idempotency_window_ms: u64,
    stock_units_max: u64,
    lines_per_order_max: u64,
}

impl WireLimits {
    pub(crate) fn of(limits: &Limits) -> Self {
        Self {
            line_units_max: limits.line_units_max,
            hold_ttl_ms_min: limits.hold_ttl_ms_min,
            hold_ttl_ms_max: limits.hold_ttl_ms_max,
            holds_per_sku_max: limits.holds_per_sku_max as u64,
            finished_per_sku_max: limits.finished_per_sku_max as u64,
            idempotency_window_ms: limits.idempotency_window_ms,
            stock_units_max: limits.stock_units_max,
            lines_per_order_max: limits.lines_per_order_max as u64,
        }
    }

    /// The limits, if they are ones an engine could have run with.
    pub(crate) fn limits(self) -> Result<Limits, InvalidLimits> {
        let size = |value: u64, field: &'static str| {
            usize::try_from(value).map_err(|_| InvalidLimits { field, reason: "does not fit this platform" })
        };
        let limits = Limits {
            line_units_max: self.line_units_max,
            hold_ttl_ms_min: self.hold_ttl_ms_min,
            hold_ttl_ms_max: self.hold_ttl_ms_max,
            holds_per_sku_max: size(self.holds_per_sku_max, "holds_per_sku_max")?,
            finished_per_sku_max: size(self.finished_per_sku_max, "finished_per_sku_max")?,
            idempotency_window_ms: self.idempotency_window_ms,
            stock_units_max: self.stock_units_max,
            lines_per_order_max: size(self.lines_per_order_max, "lines_per_order_max")?,
        };
        limits.validate()?;
        Ok(limits)
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum WireCommand {
    AddStock {
        units: u64,
        #[serde(default)]
        operation: Option<String>,
    },
    RemoveStock {
        units: u64,
        #[serde(default)]
        operation: Option<String>,
    },
    SetBuyerLimit {
        units_per_buyer_max: Option<u32>,
        #[serde(default)]
        operation: Option<String>,
    },
    OpenSale {
        opens_at_ms: u64,
        #[serde(default)]
        operation: Option<String>,
    },
    Reserve {
        order: String,
        buyer: String,
        quantity: WireQuantity,
        ttl_ms: u64,
    },
    Commit {
        order: String,
        units: Option<u32>,
    },
    Release {
        order: String,
    },
    Abort {
        order: String,
    },
    Expire,
    Prepare {
        order: String,
    },
    Unprepare {
        order: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireQuantity {
    Exactly(u32),
    UpTo { max: u32, min: u32 },
}

/// A record's payload, encoded by whoever produced the record, so that the
/// log writer's thread (the critical path of every group commit) only
/// frames and writes bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord(Vec<u8>);

impl EncodedRecord {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&LogRecord> for EncodedRecord {
    fn from(record: &LogRecord) -> Self {
        Self(record.encode())
    }
}

impl LogRecord {
    /// The record's payload bytes.
    ///
    /// # Panics
    /// On a read-only command: only commands that change state are logged.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.encode_into(&mut bytes);
        bytes
    }

    /// [`Self::encode`], appended to `out` (the replicated log writes a
    /// round's records into one entry).
    ///
    /// # Panics
    /// As [`Self::encode`].
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let wire = match self {
            LogRecord::CreateSku { sku, settings, now_ms, operation } => WireRecord::CreateSku {
                sku: sku.as_str().to_owned(),
                initial_units: settings.initial_units,
                units_per_buyer_max: settings.units_per_buyer_max,
                opens_at_ms: settings.opens_at_ms,
                now_ms: *now_ms,
                operation: operation.as_ref().map(|operation| operation.as_str().to_owned()),
            },
            LogRecord::Apply { sku, now_ms, command } => {
                WireRecord::Apply { sku: sku.as_str().to_owned(), now_ms: *now_ms, command: wire_command(command) }
            }
            LogRecord::TransactionBegun { order, lines } => WireRecord::TransactionBegun {
                order: order.as_str().to_owned(),
                lines: lines.iter().map(|line| (line.sku.as_str().to_owned(), line.units)).collect(),
            },
            LogRecord::TransactionCommitted { order } => {
                WireRecord::TransactionCommitted { order: order.as_str().to_owned() }
            }
            LogRecord::TransactionEnded { order } => WireRecord::TransactionEnded { order: order.as_str().to_owned() },
            LogRecord::RulesInForce { limits } => WireRecord::RulesInForce { limits: WireLimits::of(limits) },
            LogRecord::Coordinator(record) => WireRecord::Coordinator(WireCoordinatorRecord::of(record)),
        };
        rmp_serde::encode::write(out, &wire).expect("records always encode");
    }

    pub fn decode(payload: &[u8]) -> Result<Self, RecordError> {
        // Every declared length is checked against the bytes first, so
        // serde never reserves more than the payload could hold.
        flashstock_msgpack::check_bounds(payload, RECORD_DEPTH_MAX)?;
        Ok(match rmp_serde::from_slice(payload)? {
            WireRecord::CreateSku { sku, initial_units, units_per_buyer_max, opens_at_ms, now_ms, operation } => {
                LogRecord::CreateSku {
                    sku: SkuId::new(sku)?,
                    settings: SkuSettings { initial_units, units_per_buyer_max, opens_at_ms },
                    now_ms,
                    operation: operation.map(OperationId::new).transpose()?,
                }
            }
            WireRecord::Apply { sku, now_ms, command } => {
                LogRecord::Apply { sku: SkuId::new(sku)?, now_ms, command: engine_command(command)? }
            }
            WireRecord::TransactionBegun { order, lines } => LogRecord::TransactionBegun {
                order: OrderId::new(order)?,
                lines: lines
                    .into_iter()
                    .map(|(sku, units)| Ok(TransactionLine { sku: SkuId::new(sku)?, units }))
                    .collect::<Result<_, InvalidId>>()?,
            },
            WireRecord::TransactionCommitted { order } => {
                LogRecord::TransactionCommitted { order: OrderId::new(order)? }
            }
            WireRecord::TransactionEnded { order } => LogRecord::TransactionEnded { order: OrderId::new(order)? },
            WireRecord::RulesInForce { limits } => LogRecord::RulesInForce { limits: limits.limits()? },
            WireRecord::Coordinator(record) => LogRecord::Coordinator(record.record()?),
        })
    }
}

fn wire_command(command: &SkuCommand) -> WireCommand {
    let text = |operation: &Option<OperationId>| operation.as_ref().map(|operation| operation.as_str().to_owned());
    match command {
        SkuCommand::Admin { operation, change } => match *change {
            AdminChange::AddStock { units } => WireCommand::AddStock { units, operation: text(operation) },
            AdminChange::RemoveStock { units } => WireCommand::RemoveStock { units, operation: text(operation) },
            AdminChange::SetBuyerLimit { units_per_buyer_max } => {
                WireCommand::SetBuyerLimit { units_per_buyer_max, operation: text(operation) }
            }
            AdminChange::OpenSale { opens_at_ms } => WireCommand::OpenSale { opens_at_ms, operation: text(operation) },
            AdminChange::Create { .. } => panic!("a creation's retry changes nothing and is never logged"),
        },
        SkuCommand::Reserve(line) => WireCommand::Reserve {
            order: line.order.as_str().to_owned(),
            buyer: line.buyer.as_str().to_owned(),
            quantity: match line.quantity {
                Quantity::Exactly(units) => WireQuantity::Exactly(units),
                Quantity::UpTo { max, min } => WireQuantity::UpTo { max, min },
            },
            ttl_ms: line.ttl_ms,
        },
        SkuCommand::Commit { order, units } => WireCommand::Commit { order: order.as_str().to_owned(), units: *units },
        SkuCommand::Release { order } => WireCommand::Release { order: order.as_str().to_owned() },
        SkuCommand::Abort { order } => WireCommand::Abort { order: order.as_str().to_owned() },
        SkuCommand::Expire => WireCommand::Expire,
        SkuCommand::Prepare { order } => WireCommand::Prepare { order: order.as_str().to_owned() },
        SkuCommand::Unprepare { order } => WireCommand::Unprepare { order: order.as_str().to_owned() },
        SkuCommand::Query => panic!("read-only commands are never logged"),
    }
}

fn engine_command(command: WireCommand) -> Result<SkuCommand, RecordError> {
    let admin = |operation: Option<String>, change: AdminChange| -> Result<SkuCommand, RecordError> {
        Ok(SkuCommand::Admin { operation: operation.map(OperationId::new).transpose()?, change })
    };
    Ok(match command {
        WireCommand::AddStock { units, operation } => admin(operation, AdminChange::AddStock { units })?,
        WireCommand::RemoveStock { units, operation } => admin(operation, AdminChange::RemoveStock { units })?,
        WireCommand::SetBuyerLimit { units_per_buyer_max, operation } => {
            admin(operation, AdminChange::SetBuyerLimit { units_per_buyer_max })?
        }
        WireCommand::OpenSale { opens_at_ms, operation } => admin(operation, AdminChange::OpenSale { opens_at_ms })?,
        WireCommand::Reserve { order, buyer, quantity, ttl_ms } => SkuCommand::Reserve(ReserveLine {
            order: OrderId::new(order)?,
            buyer: BuyerId::new(buyer)?,
            quantity: match quantity {
                WireQuantity::Exactly(units) => Quantity::Exactly(units),
                WireQuantity::UpTo { max, min } => Quantity::UpTo { max, min },
            },
            ttl_ms,
        }),
        WireCommand::Commit { order, units } => SkuCommand::Commit { order: OrderId::new(order)?, units },
        WireCommand::Release { order } => SkuCommand::Release { order: OrderId::new(order)? },
        WireCommand::Abort { order } => SkuCommand::Abort { order: OrderId::new(order)? },
        WireCommand::Expire => SkuCommand::Expire,
        WireCommand::Prepare { order } => SkuCommand::Prepare { order: OrderId::new(order)? },
        WireCommand::Unprepare { order } => SkuCommand::Unprepare { order: OrderId::new(order)? },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id_text() -> impl Strategy<Value = String> + Clone {
        "[a-z0-9-]{1,20}"
    }

    fn order_id() -> impl Strategy<Value = OrderId> {
        id_text().prop_map(|text| OrderId::new(text).expect("valid"))
    }

    fn operation_id() -> impl Strategy<Value = Option<OperationId>> {
        proptest::option::of(id_text().prop_map(|text| OperationId::new(text).expect("valid")))
    }

    fn command() -> impl Strategy<Value = SkuCommand> {
        prop_oneof![
            (operation_id(), any::<u64>()).prop_map(|(operation, units)| SkuCommand::Admin {
                operation,
                change: AdminChange::AddStock { units }
            }),
            (operation_id(), any::<u64>()).prop_map(|(operation, units)| SkuCommand::Admin {
                operation,
                change: AdminChange::RemoveStock { units }
            }),
            (operation_id(), any::<Option<u32>>()).prop_map(|(operation, units_per_buyer_max)| SkuCommand::Admin {
                operation,
                change: AdminChange::SetBuyerLimit { units_per_buyer_max }
            }),
            (operation_id(), any::<u64>()).prop_map(|(operation, opens_at_ms)| SkuCommand::Admin {
                operation,
                change: AdminChange::OpenSale { opens_at_ms }
            }),
            (order_id(), id_text(), any::<u32>(), any::<Option<u32>>(), any::<u64>()).prop_map(
                |(order, buyer, max, min, ttl_ms)| {
                    SkuCommand::Reserve(ReserveLine {
                        order,
                        buyer: BuyerId::new(buyer).expect("valid"),
                        quantity: min.map_or(Quantity::Exactly(max), |min| Quantity::UpTo { max, min }),
                        ttl_ms,
                    })
                }
            ),
            (order_id(), any::<Option<u32>>()).prop_map(|(order, units)| SkuCommand::Commit { order, units }),
            order_id().prop_map(|order| SkuCommand::Release { order }),
            order_id().prop_map(|order| SkuCommand::Abort { order }),
            Just(SkuCommand::Expire),
            order_id().prop_map(|order| SkuCommand::Prepare { order }),
            order_id().prop_map(|order| SkuCommand::Unprepare { order }),
        ]
    }

    fn transaction_record() -> impl Strategy<Value = LogRecord> {
        let lines = proptest::collection::vec((id_text(), any::<Option<u32>>()), 0..5).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(sku, units)| TransactionLine { sku: SkuId::new(sku).expect("valid"), units })
                .collect::<Vec<_>>()
        });
        prop_oneof![
            (order_id(), lines).prop_map(|(order, lines)| LogRecord::TransactionBegun { order, lines }),
            order_id().prop_map(|order| LogRecord::TransactionCommitted { order }),
            order_id().prop_map(|order| LogRecord::TransactionEnded { order }),
        ]
    }

    proptest! {
        #[test]
        fn every_record_round_trips(sku in id_text(), now_ms in any::<u64>(), command in command()) {
            let record = LogRecord::Apply { sku: SkuId::new(sku).expect("valid"), now_ms, command };
            prop_assert_eq!(LogRecord::decode(&record.encode()).expect("decodes"), record);
        }

        #[test]
        fn every_transaction_record_round_trips(record in transaction_record()) {
            prop_assert_eq!(LogRecord::decode(&record.encode()).expect("decodes"), record);
        }

        /// Arbitrary bytes decode to an error or to a valid record, never a panic.
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = LogRecord::decode(&bytes);
        }
    }

    #[test]
    fn creation_round_trips_and_bad_ids_are_refused() {
        let record = LogRecord::CreateSku {
            sku: SkuId::new("tv").expect("valid"),
            settings: SkuSettings { initial_units: 5, units_per_buyer_max: Some(2), opens_at_ms: 9 },
            now_ms: 17,
            operation: Some(OperationId::new("create-tv").expect("valid")),
        };
        assert_eq!(LogRecord::decode(&record.encode()).expect("decodes"), record);
        let rules = LogRecord::RulesInForce { limits: Limits { hold_ttl_ms_max: 300_000, ..Limits::default() } };
        assert_eq!(LogRecord::decode(&rules.encode()).expect("decodes"), rules);
        let contradictory = WireLimits::of(&Limits { hold_ttl_ms_min: 10, hold_ttl_ms_max: 5, ..Limits::default() });
        let contradictory = rmp_serde::to_vec(&WireRecord::RulesInForce { limits: contradictory }).expect("encodes");
        assert!(matches!(LogRecord::decode(&contradictory), Err(RecordError::InvalidLimits(_))));
        let empty_id =
            rmp_serde::to_vec(&WireRecord::Apply { sku: String::new(), now_ms: 0, command: WireCommand::Expire })
                .expect("encodes");
        assert!(matches!(LogRecord::decode(&empty_id), Err(RecordError::InvalidId(_))));
    }

    /// A payload declaring a million-element sequence in a few bytes is
    /// refused before serde reserves room for it.
    #[test]
    fn a_declared_length_beyond_the_payload_is_refused_before_decoding() {
        let payload = [0xdd, 0x00, 0x0f, 0x42, 0x40, 0x01];
        assert!(matches!(LogRecord::decode(&payload), Err(RecordError::Bounds(_))));
    }

    /// Records written before creations and admin changes carried their
    /// time and operation id still decode, with neither.
    #[test]
    fn records_written_before_operation_ids_still_decode() {
        #[derive(Serialize)]
        enum OldRecord {
            CreateSku { sku: String, initial_units: u64, units_per_buyer_max: Option<u32>, opens_at_ms: u64 },
            Apply { sku: String, now_ms: u64, command: OldCommand },
        }
        #[derive(Serialize)]
        enum OldCommand {
            AddStock { units: u64 },
        }
        let create =
            OldRecord::CreateSku { sku: "tv".into(), initial_units: 5, units_per_buyer_max: None, opens_at_ms: 0 };
        let create = LogRecord::decode(&rmp_serde::to_vec(&create).expect("encodes")).expect("decodes");
        assert_eq!(
            create,
            LogRecord::CreateSku {
                sku: SkuId::new("tv").expect("valid"),
                settings: SkuSettings { initial_units: 5, ..SkuSettings::default() },
                now_ms: 0,
                operation: None,
            }
        );
        let add = OldRecord::Apply { sku: "tv".into(), now_ms: 3, command: OldCommand::AddStock { units: 2 } };
        let add = LogRecord::decode(&rmp_serde::to_vec(&add).expect("encodes")).expect("decodes");
        let expected = SkuCommand::Admin { operation: None, change: AdminChange::AddStock { units: 2 } };
        assert_eq!(add, LogRecord::Apply { sku: SkuId::new("tv").expect("valid"), now_ms: 3, command: expected });
    }
}
