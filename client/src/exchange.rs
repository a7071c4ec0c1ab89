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

/// Writes what `queue` yields to `send` as batch frames until the queue
/// closes (then finishes the stream) or the stream breaks: the first entry
/// at once, then everything that queued meanwhile in the next frame, up to
/// `entries_max` entries and the frame's byte bound. A client's session
/// writes its calls so and a member its answers. An entry that can never
/// fit a frame goes to `unsendable`, which may give a replacement to send
/// under the same id (a member's refusal) or drop it (`None`). `written`
/// hears how many entries left the queue with each frame once the frame
/// is written (a member counts its answers out then, so that what waits
/// here stays within its bound of requests in flight).
pub async fn write_batches<T, F, W>(
    send: &mut quinn::SendStream,
    queue: &mut tokio::sync::mpsc::Receiver<(u64, T)>,
    entries_max: usize,
    mut unsendable: F,
    mut written: W,
) -> Result<(), ExchangeError>
where
    T: Serialize,
    F: FnMut(u64, wire::CodecError) -> Option<T>,
    W: FnMut(usize),
{
    use crate::wire::{BatchEncoder, BatchPushError};
    // An entry that did not fit the last frame opens the next one.
    let mut carried: Option<(u64, T)> = None;
    loop {
        // Entries taken from the queue for this frame (a carried one was
        // counted with the frame that could not take it).
        let mut taken = 0;
        let first = match carried.take() {
            Some(entry) => entry,
            None => match queue.recv().await {
                Some(entry) => {
                    taken += 1;
                    entry
                }
                None => break,
            },
        };
        // Tasks woken together (callers by one frame of answers, requests
        // by one batch of the engine) queue theirs now: one yield lets
        // them, so they share this frame.
        tokio::task::yield_now().await;
        let mut frame = BatchEncoder::new(entries_max);
        let mut next = Some(first);
        loop {
            let entry = match next.take() {
                Some(entry) => entry,
                None => match queue.try_recv() {
                    Ok(entry) => {
                        taken += 1;
                        entry
                    }
                    Err(_) => break,
                },
            };
            let (id, message) = entry;
            match frame.push(id, &message) {
                Ok(()) => {}
                Err(BatchPushError::Full) => {
                    carried = Some((id, message));
                    break;
                }
                Err(BatchPushError::Codec(error)) => next = unsendable(id, error).map(|message| (id, message)),
            }
        }
        if !frame.is_empty() {
            send.write_all(&frame.finish()).await.map_err(|error| ExchangeError::Connection(error.to_string()))?;
        }
        written(taken);
    }
    send.finish().map_err(|error| ExchangeError::Connection(error.to_string()))?;
    Ok(())
}
