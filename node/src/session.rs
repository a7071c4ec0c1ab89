//! A member's side of a session (see [`flashstock_client::wire`]): a
//! long-lived stream of batch frames from one peer.
//!
//! Three tasks serve it: a reader of the peer's frames, a dispatcher that
//! starts each frame's requests, and a writer that sends the answers in as
//! few frames as they fit, in the order they complete (a slow request
//! delays nobody). The dispatcher starts a frame in one go: its reserves go
//! to the coordinator's task in one message (which hands the engine's own
//! in one batch), its commits and releases to the engine in one batch
//! ([`flashstock_engine::Engine::submit_batch`]), and whatever must be
//! awaited (admin changes, queries, spanning orders, what the engine gave
//! back) becomes a future the dispatcher polls: no task per request, and
//! for the engine's requests no future either. Every answer, whoever gives
//! it, goes through the session's [`SessionAnswers`]; a request counts as
//! in flight until the writer has sent its answer, and no new frame is
//! taken while `requests_per_connection_max` are (a peer that does not
//! read its answers is held back by QUIC's flow control, and loses none).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flashstock_client::wire::{self, Refusal, Request, Response};
use flashstock_engine::{BatchAnswer, BatchRequest, BatchSink};
use tokio::sync::{mpsc, Notify};

use crate::coordination::{Answer, Replies};
use crate::server::{settled_response, Batchable, Node};
use crate::tls::Role;
use crate::translate::{invalid, order_refusal, wire_line};

/// An awaited request of a session: its id, kind, when its frame came, and
/// its answer.
type Awaited = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, &'static str, Instant, Response)> + Send>>;

/// Frames a session's reader holds for its dispatcher: one being worked
/// on, one read ahead; beyond that QUIC's flow control holds the peer.
const SESSION_FRAMES_READ_AHEAD_MAX: usize = 1;

/// A session's requests in flight: started and not yet written back.
struct Outstanding {
    count: AtomicUsize,
    /// Woken when `count` falls below `max`.
    room: Notify,
    max: usize,
}

impl Outstanding {
    fn has_room(&self) -> bool {
        self.count.load(Ordering::Acquire) < self.max
    }

    /// `written` answers left with a frame the writer sent.
    fn written(&self, written: usize) {
        let previous = self.count.fetch_sub(written, Ordering::AcqRel);
        if previous >= self.max && previous - written < self.max {
            // Stored if the dispatcher is not waiting yet: never lost.
            self.room.notify_one();
        }
    }
}

/// What every answer of a session goes through.
pub(crate) struct SessionAnswers {
    node: Arc<Node>,
    /// To the writer task. Never full: a request counts in `outstanding`
    /// until the writer has sent its answer, no frame is taken while
    /// `outstanding.max` are, and the queue holds that many and a frame.
    queue: mpsc::Sender<(u64, Response)>,
    outstanding: Arc<Outstanding>,
}

impl SessionAnswers {
    /// Counts in the `count` requests of a frame (with the node, for its
    /// drain); `false` if the node is stopping, when each must be answered
    /// `Unavailable`.
    fn started(&self, count: usize) -> bool {
        self.outstanding.count.fetch_add(count, Ordering::AcqRel);
        self.node.admit_many(count)
    }

    /// Answers request `id` of a frame that came at `started`.
    fn answer(&self, id: u64, kind: &'static str, started: Instant, response: Response) {
        crate::operations::record_answer(kind, &response, started.elapsed());
        match self.queue.try_send((id, response)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Bounded by construction (see `queue`); an answer dropped
                // here would leave its caller to its own timeout.
                tracing::error!(id, "a session's answer queue was full; the answer is dropped");
                self.outstanding.written(1);
            }
            // The session ended: nobody reads the answer.
            Err(mpsc::error::TrySendError::Closed(_)) => self.outstanding.written(1),
        }
        self.node.request_done();
    }
}

/// The answers of one frame: the session's, with the frame's arrival (the
/// start of each of its requests, for their latency).
pub(crate) struct FrameAnswers {
    session: Arc<SessionAnswers>,
    started: Instant,
}

impl FrameAnswers {
    fn respond(&self, id: u64, kind: &'static str, answer: Answer) {
        let response = answer.unwrap_or_else(Response::Refused);
        self.session.answer(id, kind, self.started, response);
    }
}

impl BatchSink for FrameAnswers {
    fn answer(&self, tag: u64, answer: BatchAnswer) {
        let (kind, answer) = match answer {
            BatchAnswer::Reserved(outcome) => (
                "reserve",
                outcome.map(|reservation| Response::Reserved {
                    home_partition: self.session.node.home_partition(&reservation.order),
                    order: reservation.order.as_str().to_owned(),
                    expires_at_ms: reservation.expires_at_ms,
                    lines: reservation.lines.iter().map(wire_line).collect(),
                }),
            ),
            BatchAnswer::Committed(outcome) => ("commit", outcome.map(settled_response)),
            BatchAnswer::Released(outcome) => ("release", outcome.map(settled_response)),
        };
        self.respond(tag, kind, answer.map_err(order_refusal));
    }
}

impl Replies for FrameAnswers {
    fn reply(&self, tag: u64, kind: &'static str, answer: Answer) {
        self.respond(tag, kind, answer);
    }
}

/// Serves a session until the peer finishes it, then sends the answers
/// still to come before the stream ends.
pub(crate) async fn serve(
    node: Arc<Node>,
    role: Role,
    mut send: quinn::SendStream,
    receive: quinn::RecvStream,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let in_flight_max = usize::try_from(node.network().requests_per_connection_max).unwrap_or(usize::MAX);
    let opened = Response::SessionOpened {
        requests_in_flight_max: node.network().requests_per_connection_max,
        batch_requests_max: u32::try_from(wire::BATCH_REQUESTS_MAX).expect("small"),
    };
    wire::write_message(&mut send, &opened).await?;
    let (frames_sender, mut frames) = mpsc::channel(SESSION_FRAMES_READ_AHEAD_MAX);
    let reader = tokio::spawn(read_frames(receive, frames_sender));
    // A frame is taken while fewer than `in_flight_max` are outstanding
    // (started and not yet written back), so at most that many and one
    // frame's are ever queued.
    let (queue, mut queued) = mpsc::channel(in_flight_max + wire::BATCH_REQUESTS_MAX);
    let outstanding = Arc::new(Outstanding { count: AtomicUsize::new(0), room: Notify::new(), max: in_flight_max });
    // Ends once every holder of the queue is gone: the dispatcher, and
    // every frame whose answers are still to come.
    let writer = tokio::spawn({
        let outstanding = outstanding.clone();
        async move {
            let unsendable = |_, error: wire::CodecError| {
                Some(Response::Refused(invalid("request", format!("its answer cannot be sent: {error}"))))
            };
            let written = |count| outstanding.written(count);
            let batch_max = wire::BATCH_REQUESTS_MAX;
            flashstock_client::exchange::write_batches(&mut send, &mut queued, batch_max, unsendable, written).await
        }
    });
    let answers = Arc::new(SessionAnswers { node: node.clone(), queue, outstanding: outstanding.clone() });
    let mut awaited = futures_util::stream::FuturesUnordered::<Awaited>::new();
    let mut reading = true;
    let ended = loop {
        let has_room = outstanding.has_room();
        tokio::select! {
            Some((id, kind, started, response)) = awaited.next() => answers.answer(id, kind, started, response),
            () = outstanding.room.notified(), if reading && !has_room => {}
            // The writer stopped (the stream broke): nothing can be answered.
            () = answers.queue.closed(), if reading => break Ok(()),
            frame = frames.recv(), if reading && has_room => match frame {
                Some(Ok(payload)) => {
                    if let Err(error) = start_frame(&node, role, &answers, &payload, &mut awaited) {
                        break Err(error);
                    }
                }
                Some(Err(error)) => break Err(error),
                None => reading = false,
            },
            else => break Ok(()),
        }
    };
    reader.abort();
    drop(answers);
    let written = writer.await;
    ended?;
    written?.map_err(anyhow::Error::from)
}

/// Reads a session's frames for its dispatcher until the peer finishes.
async fn read_frames(mut receive: quinn::RecvStream, frames: mpsc::Sender<anyhow::Result<Vec<u8>>>) {
    loop {
        let frame = match wire::read_payload(&mut receive).await {
            Ok(Some(payload)) => Ok(payload),
            Ok(None) => return,
            Err(error) => Err(anyhow::Error::from(error).context("reading a session frame")),
        };
        let failed = frame.is_err();
        if frames.send(frame).await.is_err() || failed {
            return;
        }
    }
}

/// Starts the requests of one batch frame. A request that does not decode
/// is refused under its id; a frame whose envelope does not decode ends
/// the session (its requests cannot be told apart to be answered).
fn start_frame(
    node: &Arc<Node>,
    role: Role,
    answers: &Arc<SessionAnswers>,
    payload: &[u8],
    awaited: &mut futures_util::stream::FuturesUnordered<Awaited>,
) -> anyhow::Result<()> {
    let entries = wire::decode_batch(payload).context("a session frame")?;
    let span = tracing::info_span!("batch", requests = entries.len());
    let _entered = span.enter();
    let frame = Arc::new(FrameAnswers { session: answers.clone(), started: Instant::now() });
    let accepting = answers.started(entries.len());
    let mut reserves = Vec::new();
    let mut settles = Vec::new();
    // Each settle's time, for those the engine gives back to be awaited.
    let mut settle_timeouts_ms = Vec::new();
    for (id, bytes) in entries {
        let request = match wire::decode_payload::<Request>(bytes) {
            Ok(request) => request,
            Err(error) => {
                frame.respond(id, "undecodable", Err(invalid("request", error.to_string())));
                continue;
            }
        };
        let kind = request.body.kind();
        if !accepting {
            let reason = format!("node {} is shutting down", node.id);
            frame.respond(id, kind, Err(Refusal::Unavailable { reason }));
            continue;
        }
        if request.timeout_ms == 0 {
            // No time left: the caller has given up before the work could begin.
            frame.respond(id, kind, Err(Refusal::DeadlineExceeded));
            continue;
        }
        // Named by the order it concerns, so that an order can be followed
        // from the client to its owner. At `debug`: a member logging at
        // `info` pays nothing for it.
        let request_span = tracing::debug_span!("request", kind, order = request.body.order().unwrap_or_default());
        let _request_entered = request_span.enter();
        match node.batchable(role, request.body) {
            Ok(Batchable::Reserve(order, home_partition)) => reserves.push((id, order, home_partition)),
            Ok(Batchable::Settle(settle)) => {
                settles.push((id, settle));
                settle_timeouts_ms.push((id, request.timeout_ms));
            }
            Ok(Batchable::Awaited(body)) => {
                // `answer_in_time` opens the request's span of its own.
                let (node, started) = (node.clone(), frame.started);
                let request = Request { timeout_ms: request.timeout_ms, body };
                awaited.push(Box::pin(async move { (id, kind, started, node.answer_in_time(role, request).await) }));
            }
            Err(refusal) => frame.respond(id, kind, Err(refusal)),
        }
    }
    if !reserves.is_empty() {
        node.coordination.reserve_batch(reserves, frame.clone());
    }
    if !settles.is_empty() {
        let sink: Arc<dyn BatchSink> = frame.clone();
        for (id, given_back) in node.engine.submit_batch(settles, &sink) {
            // Busy, a spanning order's, or several lines: the awaited path.
            let (node, started) = (node.clone(), frame.started);
            let kind = match given_back {
                BatchRequest::Commit { .. } => "commit",
                BatchRequest::Release { .. } => "release",
                BatchRequest::Reserve(_) => "reserve",
            };
            let timeout_ms = settle_timeouts_ms.iter().find(|(settle, _)| *settle == id).map_or(0, |(_, ms)| *ms);
            let timeout_ms = timeout_ms.min(node.network().request_timeout_ms_max);
            let timeout = Duration::from_millis(timeout_ms.into());
            let work = async move {
                let settled = tokio::time::timeout(timeout, node.settle(given_back)).await;
                let response = settled.unwrap_or(Err(Refusal::DeadlineExceeded)).unwrap_or_else(Response::Refused);
                (id, kind, started, response)
            };
            awaited.push(Box::pin(work));
        }
    }
    Ok(())
}
