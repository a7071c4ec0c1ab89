//! What the simulated sale needs from a shop, and two shops: the engine in
//! this process, and a cluster reached through the client crate.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use flashstock_client::{Client, Error, Order, OrderLine, Quantity as ClientQuantity, ReservationId};
use flashstock_engine::{
    BuyerId, Engine, Line, OperationId, OrderError, OrderId, OrderRequest, Quantity, SkuError, SkuId, SkuSettings,
};

/// A line of a simulated order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleLine {
    pub sku: String,
    pub units: u32,
}

/// A simulated order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleOrder {
    pub order: String,
    pub buyer: String,
    pub lines: Vec<SaleLine>,
    pub ttl_ms: u64,
}

/// What a reserve came to, in the terms the sale counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Held; the token settles it.
    Held(String),
    SoldOut,
    LimitExceeded,
    Busy {
        retry_after_ms: u64,
    },
    /// Too early: the sale opens at `opens_at_ms` (wall clock).
    NotOpen {
        opens_at_ms: u64,
    },
    /// No answer in time, after the client's own retries (a member down,
    /// a group electing): the buyer is told to try again later. If a hold
    /// was placed after all, nobody pays for it and it expires.
    Unanswered {
        reason: String,
    },
}

/// What a commit came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Sold: the units of every line.
    Sold(u64),
    /// The hold ran out before the payment came: nothing was sold.
    Expired,
    /// No answer in time: the commit may or may not have happened; the
    /// buyer asks again with the same reservation (a retry sells once).
    Unanswered { reason: String },
}

/// A SKU's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.available + self.held + self.sold
    }
}

/// The operations of a sale. Anything not listed in [`ReserveOutcome`] is
/// an error: the sale stops and says what happened.
pub trait Shop: Send + Sync + 'static {
    fn create(
        &self,
        sku: &str,
        units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn reserve(&self, order: &SaleOrder) -> impl Future<Output = anyhow::Result<ReserveOutcome>> + Send;
    fn commit(&self, token: &str) -> impl Future<Output = anyhow::Result<CommitOutcome>> + Send;
    /// Releases; `false` if no answer came in time (the hold then expires).
    fn release(&self, token: &str) -> impl Future<Output = anyhow::Result<bool>> + Send;
    fn availability(&self, sku: &str) -> impl Future<Output = anyhow::Result<Counts>> + Send;
}

impl Shop for Engine {
    async fn create(
        &self,
        sku: &str,
        units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
    ) -> anyhow::Result<()> {
        let settings = SkuSettings { initial_units: units, units_per_buyer_max, opens_at_ms };
        // The demo creates each SKU once; its name is the operation.
        self.create_sku(SkuId::new(sku)?, settings, OperationId::new(format!("create-{sku}"))?).await?;
        Ok(())
    }

    async fn reserve(&self, order: &SaleOrder) -> anyhow::Result<ReserveOutcome> {
        let mut lines = Vec::with_capacity(order.lines.len());
        for line in &order.lines {
            lines.push(Line { sku: SkuId::new(line.sku.as_str())?, quantity: Quantity::Exactly(line.units) });
        }
        let request = OrderRequest {
            order: OrderId::new(order.order.as_str())?,
            buyer: BuyerId::new(order.buyer.as_str())?,
            lines,
            ttl_ms: order.ttl_ms,
        };
        Ok(match Engine::reserve(self, request).await {
            Ok(held) => ReserveOutcome::Held(held.order.as_str().to_owned()),
            Err(OrderError::Busy { retry_after_ms }) => ReserveOutcome::Busy { retry_after_ms },
            Err(OrderError::Line { error: SkuError::SoldOut { .. }, .. }) => ReserveOutcome::SoldOut,
            Err(OrderError::Line { error: SkuError::LimitExceeded { .. }, .. }) => ReserveOutcome::LimitExceeded,
            Err(OrderError::Line { error: SkuError::NotOpen { opens_at_ms }, .. }) => {
                ReserveOutcome::NotOpen { opens_at_ms }
            }
            Err(OrderError::Unavailable) => ReserveOutcome::Unanswered { reason: OrderError::Unavailable.to_string() },
            Err(other) => bail!("unexpected answer to reserve: {other}"),
        })
    }

    async fn commit(&self, token: &str) -> anyhow::Result<CommitOutcome> {
        Ok(match Engine::commit(self, &OrderId::new(token)?).await {
            Ok(settled) => CommitOutcome::Sold(settled.lines.iter().map(|line| u64::from(line.units)).sum()),
            Err(OrderError::Expired { .. }) => CommitOutcome::Expired,
            Err(OrderError::Unavailable) => CommitOutcome::Unanswered { reason: OrderError::Unavailable.to_string() },
            Err(other) => bail!("unexpected answer to commit: {other}"),
        })
    }

    async fn release(&self, token: &str) -> anyhow::Result<bool> {
        match Engine::release(self, &OrderId::new(token)?).await {
            Ok(_) => Ok(true),
            Err(OrderError::Unavailable) => Ok(false),
            Err(other) => bail!("unexpected answer to release: {other}"),
        }
    }

    async fn availability(&self, sku: &str) -> anyhow::Result<Counts> {
        let stock = Engine::availability(self, &SkuId::new(sku)?).await?;
        Ok(Counts { available: stock.available, held: stock.held, sold: stock.sold })
    }
}

/// A cluster through the client crate (admin identity for creating SKUs,
/// checkout identity for buying).
#[derive(Debug, Clone)]
pub struct ClusterShop {
    pub admin: Client,
    pub checkout: Client,
}

impl Shop for ClusterShop {
    async fn create(
        &self,
        sku: &str,
        units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
    ) -> anyhow::Result<()> {
        self.admin.create_sku(sku, units, units_per_buyer_max, opens_at_ms).await?;
        Ok(())
    }

    async fn reserve(&self, order: &SaleOrder) -> anyhow::Result<ReserveOutcome> {
        let request = Order {
            id: order.order.clone(),
            buyer: order.buyer.clone(),
            lines: order
                .lines
                .iter()
                .map(|line| OrderLine { sku: line.sku.clone(), quantity: ClientQuantity::Exactly(line.units) })
                .collect(),
            hold_ttl: Duration::from_millis(order.ttl_ms),
        };
        Ok(match self.checkout.reserve(&request).await {
            Ok(held) => ReserveOutcome::Held(held.id.to_string()),
            // The client already retried; what is left is reported.
            Err(Error::Busy { retry_after_ms }) => ReserveOutcome::Busy { retry_after_ms },
            Err(Error::SoldOut { .. }) => ReserveOutcome::SoldOut,
            Err(Error::LimitExceeded { .. }) => ReserveOutcome::LimitExceeded,
            Err(Error::NotOpen { opens_at_ms, .. }) => ReserveOutcome::NotOpen { opens_at_ms },
            Err(error) if unanswered(&error) => ReserveOutcome::Unanswered { reason: error.to_string() },
            Err(other) => bail!("unexpected answer to reserve: {other}"),
        })
    }

    async fn commit(&self, token: &str) -> anyhow::Result<CommitOutcome> {
        Ok(match self.checkout.commit(&token.parse::<ReservationId>()?).await {
            Ok(settled) => CommitOutcome::Sold(settled.lines.iter().map(|line| u64::from(line.units)).sum()),
            Err(Error::Expired { .. }) => CommitOutcome::Expired,
            Err(error) if unanswered(&error) => CommitOutcome::Unanswered { reason: error.to_string() },
            Err(other) => bail!("unexpected answer to commit: {other}"),
        })
    }

    async fn release(&self, token: &str) -> anyhow::Result<bool> {
        match self.checkout.release(&token.parse::<ReservationId>()?).await {
            Ok(_) => Ok(true),
            Err(error) if unanswered(&error) => Ok(false),
            Err(other) => bail!("unexpected answer to release: {other}"),
        }
    }

    async fn availability(&self, sku: &str) -> anyhow::Result<Counts> {
        let stock = self.checkout.availability(sku).await?;
        Ok(Counts { available: stock.available, held: stock.held, sold: stock.sold })
    }
}

/// Whether `error` means no answer came in time (after the client's own
/// retries), rather than an answer.
fn unanswered(error: &Error) -> bool {
    matches!(error, Error::Unavailable { .. } | Error::DeadlineExceeded | Error::Connection(_))
}
