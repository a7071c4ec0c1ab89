//! What can go wrong, in terms a checkout engineer acts on.

use crate::wire::Refusal;

/// Why a call failed. Refusals from the cluster changed nothing; transport
/// failures may or may not have reached the cluster, which is why every
/// request carries an idempotency key and retrying it is safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("SKU {sku} is sold out ({available} left), order line {line}")]
    SoldOut { line: u32, sku: String, available: u64 },
    #[error("buyer limit of {units_per_buyer_max} units on SKU {sku} reached ({units_taken} already held or bought)")]
    LimitExceeded { line: u32, sku: String, units_per_buyer_max: u32, units_taken: u32 },
    #[error("the sale of SKU {sku} opens at {opens_at_ms} ms")]
    NotOpen { line: u32, sku: String, opens_at_ms: u64 },
    #[error("SKU {sku} has as many open holds as it allows; try again shortly")]
    HoldLimitReached { line: u32, sku: String },
    #[error("SKU {sku} has only {available} unsold units")]
    NotEnoughUnsoldStock { sku: String, available: u64 },
    #[error("no SKU {sku}")]
    UnknownSku { sku: String },
    #[error("SKU {sku} already exists")]
    SkuExists { sku: String },
    #[error("no reservation with this id")]
    UnknownReservation,
    #[error("the reservation expired at {expired_at_ms} ms; its units went back to stock")]
    Expired { expired_at_ms: u64 },
    #[error("the reservation was already committed")]
    AlreadyCommitted,
    #[error("the reservation was already released")]
    AlreadyReleased,
    #[error("this order id was already used for a different order")]
    IdempotencyConflict,
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("this identity may not do that (admin requests need the admin certificate)")]
    Forbidden,
    #[error("the cluster is busy; retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u64 },
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("the request's deadline passed before the cluster answered")]
    DeadlineExceeded,
    #[error("connection: {0}")]
    Connection(String),
    #[error("the cluster spoke an unexpected protocol: {0}")]
    Protocol(String),
    #[error("client configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether the same call (same order id) may be tried again: the
    /// cluster was busy or unreachable, the answer did not arrive in time,
    /// or the SKU had its most live holds (they end by settling or expiry).
    /// The client already retried these within its retry policy. The
    /// wire's `Refusal::is_retryable` is defined by this one.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Busy { .. }
                | Error::Unavailable { .. }
                | Error::DeadlineExceeded
                | Error::Connection(_)
                | Error::HoldLimitReached { .. }
        )
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::SoldOut { line, sku, available } => Error::SoldOut { line, sku, available },
            Refusal::LimitExceeded { line, sku, units_per_buyer_max, units_taken } => {
                Error::LimitExceeded { line, sku, units_per_buyer_max, units_taken }
            }
            Refusal::NotOpen { line, sku, opens_at_ms } => Error::NotOpen { line, sku, opens_at_ms },
            Refusal::HoldLimitReached { line, sku } => Error::HoldLimitReached { line, sku },
            Refusal::NotEnoughUnsoldStock { sku, available } => Error::NotEnoughUnsoldStock { sku, available },
            Refusal::UnknownSku { sku } => Error::UnknownSku { sku },
            Refusal::SkuExists { sku } => Error::SkuExists { sku },
            Refusal::UnknownReservation => Error::UnknownReservation,
            Refusal::Expired { expired_at_ms } => Error::Expired { expired_at_ms },
            Refusal::AlreadyCommitted => Error::AlreadyCommitted,
            Refusal::AlreadyReleased => Error::AlreadyReleased,
            Refusal::IdempotencyConflict => Error::IdempotencyConflict,
            Refusal::Invalid { field, reason } => Error::Invalid { field, reason },
            Refusal::Busy { retry_after_ms } => Error::Busy { retry_after_ms },
            Refusal::Unavailable { reason } => Error::Unavailable { reason },
            Refusal::WrongNode { owner } => {
                Error::Unavailable { reason: format!("the partition map kept changing (last owner: node {owner})") }
            }
            Refusal::NotLeader { group, leader, .. } => Error::Unavailable {
                reason: match leader {
                    Some(leader) => {
                        format!("replication group {group}'s leader kept changing (last named: node {leader})")
                    }
                    None => format!("replication group {group} is electing a leader"),
                },
            },
            Refusal::DeadlineExceeded => Error::DeadlineExceeded,
            Refusal::Forbidden => Error::Forbidden,
        }
    }
}
