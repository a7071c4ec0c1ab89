//! What operators see of a member, on its `metrics_address` over plain
//! HTTP/1.1 (meant for loopback or an operations network: nothing on it
//! can change stock, and it carries no secrets):
//!
//! - `GET /metrics`: Prometheus text. Requests by kind and outcome, their
//!   latency, requests in flight; log records, bytes, fsyncs, snapshots and
//!   the last snapshot's time; active SKU actors; each owned partition's
//!   available / held / sold; peer links; spanning orders open.
//! - `GET /health`: `200 ready` once recovery has finished and the member
//!   serves; `503` while it recovers or stops (so a load balancer or a
//!   rolling restart waits for it).
//! - `GET /status`: JSON for people and scripts: the member, the others as
//!   its links see them, its partitions, totals and hottest SKUs; in a
//!   replicated cluster every group's leader, term, commit and applied
//!   index and, on its leader, each replica's lag.
//!
//! Request counters and histograms are recorded where requests are served
//! ([`record_request`]); gauges are read from the engine when scraped.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::server::Node;

/// Bytes of a request head read at most; the endpoints take no body.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// A scrape connection that sends nothing for this long is closed.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Scrapes answered at once; more wait for a place (Prometheus scrapes one
/// at a time, so this only bounds a misbehaving client).
const CONNECTIONS_MAX: usize = 32;
/// SKUs listed by `/status`.
const HOTTEST_SKUS: usize = 10;
/// How often the histograms' old samples are dropped.
const UPKEEP_INTERVAL_MS: u64 = 5_000;

/// Request latency buckets, in seconds: 100 µs to 5 s.
const LATENCY_BUCKETS_SECONDS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Where the member stands, for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Recovering = 0,
    Ready = 1,
    Stopping = 2,
}

/// The operations endpoint of one member.
#[derive(Debug)]
pub struct Operations {
    handle: PrometheusHandle,
    phase: AtomicU8,
    node: OnceLock<Arc<Node>>,
}

impl Operations {
    /// Installs the process's metrics recorder (once per process) and
    /// returns the endpoint's state, `Recovering` until [`Self::ready`].
    pub fn install() -> anyhow::Result<Arc<Self>> {
        let handle = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS_SECONDS)?
            .install_recorder()
            .map_err(|error| anyhow::anyhow!("installing the metrics recorder: {error}"))?;
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(UPKEEP_INTERVAL_MS));
            loop {
                interval.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Arc::new(Self { handle, phase: AtomicU8::new(Phase::Recovering as u8), node: OnceLock::new() }))
    }

    /// Recovery is over and `node` serves.
    pub fn ready(&self, node: Arc<Node>) {
        let _ = self.node.set(node);
        self.phase.store(Phase::Ready as u8, Ordering::Release);
    }

    pub fn stopping(&self) {
        self.phase.store(Phase::Stopping as u8, Ordering::Release);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Recovering,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    /// Serves the endpoints on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let places = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let Ok(place) = places.clone().acquire_owned().await else { return };
            let operations = self.clone();
            tokio::spawn(async move {
                let deadline = Duration::from_millis(REQUEST_TIMEOUT_MS);
                if let Err(error) = tokio::time::timeout(deadline, operations.answer(stream)).await {
                    tracing::debug!(%error, "an operations request timed out");
                }
                drop(place);
            });
        }
    }

    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
            if head.len() > REQUEST_HEAD_BYTES_MAX {
                return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
            }
        }
        let line = String::from_utf8_lossy(&head);
        let mut words = line.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if method != "GET" {
            return respond(&mut stream, 405, "text/plain", "only GET\n").await;
        }
        match path {
            "/metrics" => {
                if let Some(node) = self.node.get() {
                    refresh_gauges(node);
                }
                let text = self.handle.render();
                respond(&mut stream, 200, "text/plain; version=0.0.4", &text).await
            }
            "/health" => match self.phase() {
                Phase::Ready => respond(&mut stream, 200, "text/plain", "ready\n").await,
                Phase::Recovering => respond(&mut stream, 503, "text/plain", "recovering\n").await,
                Phase::Stopping => respond(&mut stream, 503, "text/plain", "stopping\n").await,
            },
            "/status" => match self.node.get() {
                Some(node) => respond(&mut stream, 200, "application/json", &status_json(node)).await,
                None => respond(&mut stream, 503, "text/plain", "recovering\n").await,
            },
            _ => respond(&mut stream, 404, "text/plain", "try /metrics, /health or /status\n").await,
        }
    }
}

async fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The counter and latency histogram of one (kind, outcome) of request,
/// registered once: the `counter!` macro with labels builds its key (a
/// list of labels on the heap) and looks it up in the registry on every
/// call, which a member answering a hundred thousand requests a second
/// pays for twice per request.
struct RequestMetrics {
    answered: metrics::Counter,
    seconds: metrics::Histogram,
}

/// Every (kind, outcome) seen so far: a few dozen at most, both being
/// names from fixed lists.
type RequestMetricsByName = std::sync::RwLock<std::collections::HashMap<(&'static str, &'static str), RequestMetrics>>;

static REQUEST_METRICS: OnceLock<RequestMetricsByName> = OnceLock::new();

/// Counts one answered request by its answer (`ok`, or the refusal's
/// name), with its latency.
pub fn record_answer(kind: &'static str, response: &flashstock_client::wire::Response, elapsed: Duration) {
    let outcome = match response {
        flashstock_client::wire::Response::Refused(refusal) => refusal.name(),
        _ => "ok",
    };
    record_request(kind, outcome, elapsed);
}

/// Counts one answered request: by kind and outcome, and its latency.
pub fn record_request(kind: &'static str, outcome: &'static str, elapsed: Duration) {
    let cache = REQUEST_METRICS.get_or_init(Default::default);
    let seconds = elapsed.as_secs_f64();
    {
        let known = cache.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(metrics) = known.get(&(kind, outcome)) {
            metrics.answered.increment(1);
            metrics.seconds.record(seconds);
            return;
        }
    }
    let metrics = RequestMetrics {
        answered: metrics::counter!("flashstock_requests_total", "kind" => kind, "outcome" => outcome),
        seconds: metrics::histogram!("flashstock_request_seconds", "kind" => kind),
    };
    metrics.answered.increment(1);
    metrics.seconds.record(seconds);
    cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert((kind, outcome), metrics);
}

/// Sets the gauges that are read from the engine rather than counted.
fn refresh_gauges(node: &Node) {
    let engine = &node.engine;
    metrics::gauge!("flashstock_requests_in_flight").set(node.in_flight() as f64);
    metrics::gauge!("flashstock_sku_actors_active").set(engine.active_actor_count() as f64);
    metrics::gauge!("flashstock_spanning_orders_open").set(node.coordination.open_orders() as f64);
    for member in node.member_ids() {
        if member != node.id {
            let up = if node.peer_is_up(member) { 1.0 } else { 0.0 };
            metrics::gauge!("flashstock_peer_up", "member" => member.to_string()).set(up);
        }
    }
    for (partition, totals) in engine.partition_totals().into_iter().enumerate() {
        if !node.owns(partition as u32) {
            continue;
        }
        let partition = partition.to_string();
        for (state, units) in [("available", totals.available), ("held", totals.held), ("sold", totals.sold)] {
            metrics::gauge!("flashstock_partition_units", "partition" => partition.clone(), "state" => state)
                .set(units as f64);
        }
        metrics::gauge!("flashstock_partition_skus", "partition" => partition).set(totals.skus as f64);
    }
    if let Some(log) = engine.log_stats() {
        // Counters kept by the engine: exported as their absolute values.
        metrics::counter!("flashstock_log_records_total").absolute(log.records);
        metrics::counter!("flashstock_log_record_bytes_total").absolute(log.bytes);
        metrics::counter!("flashstock_log_fsyncs_total").absolute(log.syncs);
        metrics::counter!("flashstock_snapshots_total").absolute(log.snapshots);
        metrics::counter!("flashstock_snapshot_failures_total").absolute(log.snapshot_failures);
        if let Some(at_ms) = log.last_snapshot_unix_ms {
            metrics::gauge!("flashstock_last_snapshot_unix_seconds").set(at_ms as f64 / 1000.0);
        }
    }
}

fn status_json(node: &Node) -> String {
    let engine = &node.engine;
    let totals = engine.totals(|partition| node.owns(partition));
    let hottest: Vec<serde_json::Value> = engine
        .hottest_skus(HOTTEST_SKUS, |partition| node.owns(partition))
        .into_iter()
        .map(|(sku, stock)| {
            serde_json::json!({
                "sku": sku.as_str(), "available": stock.available, "held": stock.held, "sold": stock.sold
            })
        })
        .collect();
    let members: Vec<serde_json::Value> = node
        .member_ids()
        .into_iter()
        .map(|member| serde_json::json!({ "id": member, "up": node.peer_is_up(member) }))
        .collect();
    let partitions: Vec<u32> = (0..node.partition_count()).filter(|&partition| node.owns(partition)).collect();
    let log = engine.log_stats().map(|log| {
        serde_json::json!({
            "records": log.records, "bytes": log.bytes, "fsyncs": log.syncs, "snapshots": log.snapshots,
            "last_snapshot_unix_ms": log.last_snapshot_unix_ms,
        })
    });
    let status = serde_json::json!({
        "node": node.id,
        "members": members,
        "partitions": partitions,
        "skus": totals.skus,
        "available": totals.available,
        "held": totals.held,
        "sold": totals.sold,
        "hottest_skus": hottest,
        "requests_in_flight": node.in_flight(),
        "spanning_orders_open": node.coordination.open_orders(),
        "log": log,
        // Replicated clusters: each group's leader, term, commit and
        // applied index, and on its leader each replica's lag in entries.
        "replication": node.replication.as_ref().map(|replication| replication.view()),
    });
    let mut text = status.to_string();
    text.push('\n');
    text
}
