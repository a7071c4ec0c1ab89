//! The participant side of orders coordinated by [`crate::coordination`]:
//! a part's step carried out through the SKUs' actors, line by line, with
//! the same [`PartStep`] definition the simulator applies to SKU states.

use crate::coordination::participant::{LineVerdict, PartAnswer, PartRequest, PartStep};
use crate::coordination::CoordinatorRecord;
use crate::ids::OrderId;
use crate::log::record::LogRecord;
use crate::runtime::{Engine, EngineError};
use crate::slot::lock;

/// Why a part's step could not be carried out now: the coordinator sends
/// it again (each line is idempotent, so the lines already done replay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the part's step could not be carried out now: {0}")]
pub struct PartNotNow(pub EngineError);

impl Engine {
    /// The engine's clock, for the node's coordinator.
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// The order coordinator's facts recovery found (empty for an engine
    /// without a log). Returned once.
    pub fn take_coordinator_records(&self) -> Vec<CoordinatorRecord> {
        std::mem::take(&mut *lock(&self.inner.recovered_coordinator))
    }

    /// Logs a fact of the order coordinator. The receiver (none for an
    /// engine without a log: nothing is durable, and nothing waits) says
    /// whether it became durable; a failed log is `Unavailable`.
    pub fn log_coordinator_record(
        &self,
        record: CoordinatorRecord,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<bool>>, EngineError> {
        self.submit_record(&LogRecord::Coordinator(record))
    }

    /// Carries out one step of the part `attempt` on this member's SKUs;
    /// answers once every line's command is durable. A step cut off
    /// part-way (busy, the log failing, the caller gone) leaves each line
    /// either done or not, and the same step sent again finishes it.
    pub async fn apply_part(&self, attempt: &OrderId, request: &PartRequest) -> Result<PartAnswer, PartNotNow> {
        let mut step = PartStep::new(attempt, request);
        for (index, (sku, command)) in step.commands().into_iter().enumerate() {
            let verdict = match self.execute(&sku, command).await {
                Ok(answer) => step.judge(index, answer.result, answer.stock),
                Err(EngineError::UnknownSku { .. }) => step.unknown_sku(index),
                Err(error) => return Err(PartNotNow(error)),
            };
            if let LineVerdict::Refused { answer, undo } = verdict {
                for (sku, command) in undo {
                    // An undo cut off leaves a hold that expires by its TTL
                    // (it was never prepared); the coordinator releases the
                    // whole attempt anyway.
                    if let Err(error) = self.execute(&sku, command).await {
                        tracing::debug!(%attempt, %sku, %error, "a refused part's earlier line was not undone now");
                    }
                }
                return Ok(answer);
            }
        }
        Ok(step.done())
    }
}
