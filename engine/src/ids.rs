//! Validated identifiers: a SKU, an order (the idempotency key), a buyer,
//! an admin operation (the idempotency key of admin changes).
//!
//! All four arrive from outside as strings. They are checked once, at
//! construction, so the rest of the engine never sees an empty or oversized
//! id, and cloned cheaply (`Arc<str>`) because the state machine keeps them in
//! several indexes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The map the engine keys by ids. Keyed per process (so callers cannot aim
/// collisions at it) and several times faster than SipHash on short ids.
/// Never iterated for a decision: its order differs per process.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Longest id accepted, in bytes. Ids are kept per reservation and per buyer;
/// the bound keeps a hostile caller from storing megabytes under one key, and
/// 128 bytes fits any UUID, ULID or SKU code we have seen.
pub const ID_BYTES_MAX: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is {length} bytes long; the limit is {ID_BYTES_MAX}")]
    TooLong { kind: &'static str, length: usize },
    #[error("{kind} id contains a control character")]
    ControlCharacter { kind: &'static str },
}

fn validate(kind: &'static str, text: &str) -> Result<(), InvalidId> {
    if text.is_empty() {
        return Err(InvalidId::Empty { kind });
    }
    if text.len() > ID_BYTES_MAX {
        return Err(InvalidId::TooLong { kind, length: text.len() });
    }
    if text.chars().any(char::is_control) {
        return Err(InvalidId::ControlCharacter { kind });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(text: impl AsRef<str>) -> Result<Self, InvalidId> {
                let text = text.as_ref();
                validate($kind, text)?;
                Ok(Self(Arc::from(text)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{}({:?})", stringify!($name), &*self.0)
            }
        }
    };
}

string_id!(
    /// A stock-keeping unit: one thing for sale.
    SkuId,
    "SKU"
);
string_id!(
    /// The caller's order id. It is the idempotency key of a reservation and
    /// also names the reservation: one order holds at most one reservation
    /// per SKU, so `(order, SKU)` identifies a hold.
    OrderId,
    "order"
);
string_id!(
    /// The buyer an order belongs to; per-buyer limits count against it.
    BuyerId,
    "buyer"
);
string_id!(
    /// The caller's id of one admin change (create a SKU, add or remove
    /// stock, set a limit or an opening time): the idempotency key of admin
    /// calls, as the order id is of orders. A caller keeps it across the
    /// retries of one call, so a retry answers the first result instead of
    /// changing the stock again.
    OperationId,
    "operation"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_long_and_control_ids() {
        assert_eq!(SkuId::new(""), Err(InvalidId::Empty { kind: "SKU" }));
        assert!(matches!(OrderId::new("x".repeat(129)), Err(InvalidId::TooLong { length: 129, .. })));
        assert!(matches!(BuyerId::new("a\nb"), Err(InvalidId::ControlCharacter { .. })));
        assert_eq!(SkuId::new("sku-1").map(|id| id.to_string()), Ok("sku-1".to_owned()));
    }
}
