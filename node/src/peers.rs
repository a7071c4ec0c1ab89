//! Links to the other members: one long-lived QUIC connection to each,
//! dialled by this node with its own certificate, kept alive by QUIC's
//! keep-alive (every third of the idle timeout) and redialled with backoff
//! when it drops. A link is up from its handshake until the connection
//! closes, so a member that dies is seen as down within the idle timeout,
//! and one that comes back is seen as up as soon as it answers.
//!
//! What a node does with it: it sends clients to the owner of a partition
//! only while the owner is up, and answers `Unavailable` at once otherwise,
//! instead of sending them to wait on a dead address; and a coordinator of
//! an order spanning members sends the other parts' requests over it
//! ([`Peers::call`]), in a session opened with the link: concurrent calls
//! to one member travel together in batch frames, as a client's do (a
//! stream per call only while the session is gone and the connection not).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashstock_client::exchange::{exchange, ExchangeError};
use flashstock_client::session::{Session, SessionError};
use flashstock_client::wire::{Hello, Request, RequestBody, Response, Welcome, PROTOCOL_VERSION};

use crate::tls;

/// Longest pause between two attempts to reach a member that is down;
/// keeps a restarted member from waiting long to be seen.
const REDIAL_PAUSE_MS_MAX: u64 = 1_000;
/// First pause after a failed attempt; doubled up to the maximum.
const REDIAL_PAUSE_MS_MIN: u64 = 50;
/// An attempt (QUIC handshake and hello) that takes longer has failed.
const DIAL_TIMEOUT_MS: u64 = 2_000;

#[derive(Debug)]
struct Link {
    id: u32,
    up: AtomicBool,
    /// The connection while the link is up, and the session on it.
    connection: std::sync::Mutex<Option<(quinn::Connection, Arc<Session>)>>,
    /// The life of the member its last link to us came from.
    boot_seen: std::sync::Mutex<Option<u64>>,
}

/// Why a request to another member got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("member {0} is down")]
    Down(u32),
    #[error("member {0} did not answer in time")]
    TimedOut(u32),
    #[error("member {member}: {reason}")]
    Broken { member: u32, reason: String },
}

/// The state of this node's links to the other members.
#[derive(Debug)]
pub struct Peers {
    own_id: u32,
    links: Vec<Link>,
    /// This life of the member (see [`Hello::boot`]).
    boot: u64,
}

impl Peers {
    /// Starts a task per other member that keeps a link to it, dialling
    /// out through `endpoint` (which must have a client configuration with
    /// this node's identity).
    pub fn start(endpoint: &quinn::Endpoint, own_id: u32, members: &[(u32, std::net::SocketAddr)]) -> Arc<Self> {
        let links = members
            .iter()
            .filter(|(id, _)| *id != own_id)
            .map(|(id, _)| Link {
                id: *id,
                up: AtomicBool::new(false),
                connection: std::sync::Mutex::new(None),
                boot_seen: std::sync::Mutex::new(None),
            })
            .collect();
        // Different for every start of the process (not a protocol input:
        // it only tells lives of a member apart).
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 40;
        let peers = Arc::new(Self { own_id, links, boot });
        for (id, address) in members.iter().filter(|(id, _)| *id != own_id) {
            let (peers, endpoint, id, address) = (peers.clone(), endpoint.clone(), *id, *address);
            tokio::spawn(async move { peers.keep_link(&endpoint, id, address).await });
        }
        peers
    }

    /// The other members whose links are down now.
    /// This life of the member: different for every start of the process.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    pub fn down(&self) -> Vec<u32> {
        self.links.iter().filter(|link| !link.up.load(Ordering::Acquire)).map(|link| link.id).collect()
    }

    /// Whether member `id` is reachable now (this node always is).
    pub fn is_up(&self, id: u32) -> bool {
        id == self.own_id || self.links.iter().any(|link| link.id == id && link.up.load(Ordering::Acquire))
    }

    /// Member `id` dialled us from its life `boot`: if that is a new life
    /// (it restarted), our link to it still points at the old one, which
    /// only idles out later; it is closed now, and redialled.
    pub fn dialled_by(&self, id: u32, boot: Option<u64>) {
        let (Some(link), Some(boot)) = (self.links.iter().find(|link| link.id == id), boot) else { return };
        let previous = link.boot_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replace(boot);
        if previous.is_some_and(|previous| previous != boot) {
            let connection = link.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            if let Some((connection, _)) = connection {
                tracing::info!(member = id, "the member restarted; redialling it");
                connection.close(0u8.into(), b"you restarted");
            }
        }
    }

    /// The live connection to member `id`, if its link is up.
    pub fn connection(&self, id: u32) -> Option<quinn::Connection> {
        self.link(id).map(|(connection, _)| connection)
    }

    fn link(&self, id: u32) -> Option<(quinn::Connection, Arc<Session>)> {
        self.links
            .iter()
            .find(|link| link.id == id)
            .and_then(|link| link.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }

    /// Sends `body` to member `id` and waits at most `timeout` for its
    /// answer (the member drops the work at the same deadline).
    pub async fn call(&self, id: u32, body: RequestBody, timeout: Duration) -> Result<Response, CallError> {
        let (connection, session) = self.link(id).ok_or(CallError::Down(id))?;
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let request = Request { timeout_ms, body };
        if !session.is_closed() {
            return match session.call(request, timeout).await {
                Ok(response) => Ok(response),
                Err(SessionError::TimedOut) => Err(CallError::TimedOut(id)),
                Err(SessionError::Closed(reason)) => Err(CallError::Broken { member: id, reason }),
                Err(SessionError::Request(error)) => Err(CallError::Broken { member: id, reason: error.to_string() }),
            };
        }
        match exchange(&connection, &request, timeout).await {
            Ok(response) => Ok(response),
            Err(ExchangeError::TimedOut(_)) => Err(CallError::TimedOut(id)),
            Err(error) => Err(CallError::Broken { member: id, reason: error.to_string() }),
        }
    }

    fn set_connection(&self, id: u32, connection: Option<(quinn::Connection, Arc<Session>)>) {
        if let Some(link) = self.links.iter().find(|link| link.id == id) {
            *link.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
        }
    }

    fn set(&self, id: u32, up: bool) {
        if let Some(link) = self.links.iter().find(|link| link.id == id) {
            if link.up.swap(up, Ordering::AcqRel) != up {
                tracing::info!(member = id, up, "peer link changed");
            }
        }
    }

    /// Dials `id` until the endpoint closes; between a drop and the next
    /// success the member counts as down.
    async fn keep_link(&self, endpoint: &quinn::Endpoint, id: u32, address: std::net::SocketAddr) {
        let mut pause_ms = REDIAL_PAUSE_MS_MIN;
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_millis(DIAL_TIMEOUT_MS), dial(endpoint, id, address, self.boot));
            match attempt.await {
                Ok(Ok((connection, session))) => {
                    self.set_connection(id, Some((connection.clone(), Arc::new(session))));
                    self.set(id, true);
                    pause_ms = REDIAL_PAUSE_MS_MIN;
                    let reason = connection.closed().await;
                    self.set(id, false);
                    self.set_connection(id, None);
                    tracing::debug!(member = id, %reason, "peer link closed");
                }
                Ok(Err(error)) => {
                    if matches!(error.downcast_ref(), Some(quinn::ConnectError::EndpointStopping)) {
                        return;
                    }
                    tracing::trace!(member = id, %error, "peer unreachable");
                }
                Err(_) => tracing::trace!(member = id, "peer did not answer in time"),
            }
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            pause_ms = (pause_ms * 2).min(REDIAL_PAUSE_MS_MAX);
        }
    }
}

async fn dial(
    endpoint: &quinn::Endpoint,
    id: u32,
    address: std::net::SocketAddr,
    boot: u64,
) -> anyhow::Result<(quinn::Connection, Session)> {
    let connection = endpoint.connect(address, &tls::node_name(id))?.await?;
    let hello = Hello { versions: vec![PROTOCOL_VERSION], agent: "peer-link".to_owned(), boot: Some(boot) };
    match exchange::<_, Welcome>(&connection, &hello, Duration::from_millis(DIAL_TIMEOUT_MS)).await? {
        Welcome::Accepted { node, .. } if node == id => {
            let session = Session::open(&connection, Duration::from_millis(DIAL_TIMEOUT_MS)).await?;
            Ok((connection, session))
        }
        Welcome::Accepted { node, .. } => anyhow::bail!("expected member {id} at {address}, found {node}"),
        Welcome::Refused { supported } => anyhow::bail!("member {id} speaks only {supported:?}"),
    }
}
