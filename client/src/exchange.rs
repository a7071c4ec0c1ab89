//! One request exchange on a QUIC connection: a stream opened, one frame
//! written and the stream finished, one frame read back, all within a
//! deadline. The client's calls, its handshake and a member's calls to its
//! peers all go through it.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{self, StreamError};

/// Why an exchange got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection is gone or refused a new stream.
    #[error("connection: {0}")]
    Connection(String),
    /// The stream broke, or carried something that is not an answer.
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Sends `message` on a stream of its own and reads the one answer.
pub async fn exchange<Q, A>(connection: &quinn::Connection, message: &Q, deadline: Duration) -> Result<A, ExchangeError>
where
    Q: Serialize,
    A: DeserializeOwned,
{
    let attempt = async {
        let (mut send, mut receive) =
            connection.open_bi().await.map_err(|error| ExchangeError::Connection(error.to_string()))?;
        wire::write_message(&mut send, message).await?;
        send.finish().map_err(|error| ExchangeError::Connection(error.to_string()))?;
        Ok(wire::read_message::<A, _>(&mut receive).await?)
    };
    tokio::time::timeout(deadline, attempt).await.unwrap_or(Err(ExchangeError::TimedOut(deadline)))
}
