//! A session: one long-lived stream to a member on which the client's
//! calls travel in batch frames (see [`crate::wire`]).
//!
//! Calls queue for a writer task. It sends the first call at once when the
//! stream is idle; while a frame is being written the next calls queue, and
//! all of them go in the next frame (up to the frame's bounds), so the
//! batch grows with the load and a lone call waits for nobody. A reader
//! task hands each answer to its caller by id, in the order the member
//! finishes them: a slow request delays no other answer in its frame.
//!
//! Frames in flight are bounded by QUIC's flow control (the member grants
//! a stream two frames' worth of unread bytes, and reads no more while its
//! own in-flight bound is reached); calls waiting to be written, by the
//! client's in-flight bound and the queue's capacity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::exchange::write_batches;
use crate::wire::{self, Request, RequestBody, Response};

/// Calls a session queues for its writer at most; more wait for room
/// (the client's own in-flight bound normally comes first).
const QUEUED_CALLS_MAX: usize = 4_096;

/// Why a call on a session got no answer.
#[derive(Debug)]
pub enum SessionError {
    /// The stream or the connection under it is gone.
    Closed(String),
    /// No answer within the call's deadline.
    TimedOut,
    /// The request cannot be sent (it exceeds a frame).
    Request(Error),
}

/// One answer, or why there is none.
type Answer = Result<Response, SessionError>;

#[derive(Default)]
struct Waiting {
    /// Set once the stream is gone; no call is taken after it.
    closed: Option<String>,
    callers: HashMap<u64, oneshot::Sender<Answer>>,
}

impl Waiting {
    fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.closed = Some(reason.to_owned());
        }
        for (_, caller) in self.callers.drain() {
            let _ = caller.send(Err(SessionError::Closed(reason.to_owned())));
        }
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A session on one connection; dropping it finishes the stream. The
/// client holds one per member; members hold one per peer for the calls
/// they make to each other.
#[derive(Debug)]
pub struct Session {
    queue: mpsc::Sender<(u64, Request)>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Waiting").field("closed", &self.closed).field("callers", &self.callers.len()).finish()
    }
}

impl Session {
    /// Opens a session on `connection`: a stream, `OpenSession` and the
    /// member's answer, within `deadline`.
    pub async fn open(connection: &quinn::Connection, deadline: Duration) -> Result<Self, Error> {
        let opened = async {
            let (mut send, mut receive) =
                connection.open_bi().await.map_err(|error| Error::Connection(error.to_string()))?;
            let timeout_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
            let request = Request { timeout_ms, body: RequestBody::OpenSession };
            wire::write_message(&mut send, &request).await.map_err(stream_error)?;
            match wire::read_message::<Response, _>(&mut receive).await.map_err(stream_error)? {
                Response::SessionOpened { batch_requests_max, .. } => Ok((send, receive, batch_requests_max)),
                Response::Refused(refusal) => Err(Error::from(refusal)),
                other => Err(Error::Protocol(format!("expected a session, got {other:?}"))),
            }
        };
        let (send, receive, batch_requests_max) =
            tokio::time::timeout(deadline, opened).await.map_err(|_| Error::DeadlineExceeded)??;
        let (queue, queued) = mpsc::channel(QUEUED_CALLS_MAX);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(write_frames(send, queued, waiting.clone(), batch_requests_max as usize));
        tokio::spawn(read_answers(receive, waiting.clone()));
        Ok(Self { queue, waiting, next_id: AtomicU64::new(1) })
    }

    /// Whether the stream is gone (calls on it fail at once).
    pub fn is_closed(&self) -> bool {
        lock(&self.waiting).closed.is_some()
    }

    /// Sends `request` and waits at most `deadline` for its answer.
    pub async fn call(&self, request: Request, deadline: Duration) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if let Some(reason) = &waiting.closed {
                return Err(SessionError::Closed(reason.clone()));
            }
            waiting.callers.insert(id, answer);
        }
        // Whatever ends the wait (an answer, the deadline, the caller
        // giving up), the id is no longer waited for.
        let _forget = Forget { waiting: &self.waiting, id };
        let outcome = tokio::time::timeout(deadline, async {
            self.queue
                .send((id, request))
                .await
                .map_err(|_| SessionError::Closed("the session's writer stopped".to_owned()))?;
            answered.await.unwrap_or_else(|_| Err(SessionError::Closed("the session ended".to_owned())))
        })
        .await;
        outcome.unwrap_or(Err(SessionError::TimedOut))
    }
}

struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.waiting).callers.remove(&self.id);
    }
}

fn stream_error(error: wire::StreamError) -> Error {
    match error {
        wire::StreamError::Io(error) => Error::Connection(error.to_string()),
        wire::StreamError::Codec(error) => Error::Protocol(error.to_string()),
    }
}

/// Writes the queued calls in batch frames until the session is dropped
/// or the stream breaks.
async fn write_frames(
    mut send: quinn::SendStream,
    mut queued: mpsc::Receiver<(u64, Request)>,
    waiting: Arc<Mutex<Waiting>>,
    batch_requests_max: usize,
) {
    let unsendable = |id, error: wire::CodecError| {
        if let Some(caller) = lock(&waiting).callers.remove(&id) {
            let refusal = Error::Invalid { field: "request".to_owned(), reason: error.to_string() };
            let _ = caller.send(Err(SessionError::Request(refusal)));
        }
        None
    };
    if let Err(error) = write_batches(&mut send, &mut queued, batch_requests_max, unsendable, |_| {}).await {
        lock(&waiting).close(&format!("writing to the session: {error}"));
    }
}

/// Hands each answer to its caller until the stream ends; then every call
/// still waiting fails (and is retried by the client elsewhere or anew).
async fn read_answers(mut receive: quinn::RecvStream, waiting: Arc<Mutex<Waiting>>) {
    let reason = loop {
        let payload = match wire::read_payload(&mut receive).await {
            Ok(Some(payload)) => payload,
            Ok(None) => break "the member ended the session".to_owned(),
            Err(error) => break format!("reading from the session: {error}"),
        };
        let entries = match wire::decode_batch(&payload) {
            Ok(entries) => entries,
            Err(error) => break format!("the member sent a malformed frame: {error}"),
        };
        // Decoded before the lock is taken: callers queueing their next
        // calls take the same lock, and a frame holds up to 256 answers.
        let answers: Vec<(u64, Answer)> = entries
            .into_iter()
            .map(|(id, bytes)| {
                let answer = wire::decode_payload::<Response>(bytes)
                    .map_err(|error| SessionError::Request(Error::Protocol(format!("undecodable answer: {error}"))));
                (id, answer)
            })
            .collect();
        let mut waiting = lock(&waiting);
        for (id, answer) in answers {
            if let Some(caller) = waiting.callers.remove(&id) {
                let _ = caller.send(answer);
            }
        }
    };
    lock(&waiting).close(&reason);
}
