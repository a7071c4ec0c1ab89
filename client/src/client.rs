//! [`Client`]: connections to the members, routing, retries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::error::Error;
use crate::exchange::{exchange, ExchangeError};
use crate::routing::{group_of_partition, owner_of, partition_of, replicas_of};
use crate::session::{Session, SessionError};
use crate::tls::{self, Identity};
use crate::wire::{
    self, GroupLeader, Hello, PartitionMap, Refusal, Request, RequestBody, Response, Welcome, WireLine, WireLineResult,
    WireQuantity, WireStock, PROTOCOL_VERSION,
};

/// How many units a line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Exactly(u32),
    /// As many as available up to `max`, but at least `min`.
    UpTo {
        max: u32,
        min: u32,
    },
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: Quantity,
}

/// An order to reserve stock for. Its `id` is the idempotency key: the
/// same order sent again (by you or by the client's retries) never holds
/// twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub buyer: String,
    pub lines: Vec<OrderLine>,
    /// How long the units stay held without a commit.
    pub hold_ttl: Duration,
}

/// A SKU's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stock {
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

impl From<WireStock> for Stock {
    fn from(stock: WireStock) -> Self {
        Self { available: stock.available, held: stock.held, sold: stock.sold }
    }
}

/// A line of a reservation or settlement and its SKU's counts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineResult {
    pub sku: String,
    pub units: u32,
    pub stock: Stock,
}

impl From<WireLineResult> for LineResult {
    fn from(line: WireLineResult) -> Self {
        Self { sku: line.sku, units: line.units, stock: line.stock.into() }
    }
}

/// Names a reservation: the order id and the partition whose owner
/// coordinates it. Its text form (`<partition>:<order id>`) can be stored
/// and parsed back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReservationId {
    pub order: String,
    pub home_partition: u32,
}

impl std::fmt::Display for ReservationId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{}", self.home_partition, self.order)
    }
}

impl std::str::FromStr for ReservationId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = || Error::Invalid {
            field: "reservation id".to_owned(),
            reason: format!("`{text}` is not <partition>:<order>"),
        };
        let (partition, order) = text.split_once(':').ok_or_else(invalid)?;
        let home_partition = partition.parse().map_err(|_| invalid())?;
        if order.is_empty() {
            return Err(invalid());
        }
        Ok(Self { order: order.to_owned(), home_partition })
    }
}

/// Units held for an order until `expires_at_ms` (cluster time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub expires_at_ms: u64,
    pub lines: Vec<LineResult>,
}

/// A committed or released reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub order: String,
    pub lines: Vec<LineResult>,
    /// True when this answers a retry of a settlement already done.
    pub replayed: bool,
}

/// A member as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u32,
    pub address: String,
    pub up: bool,
    /// Partitions this member owns.
    pub partitions: u32,
    /// SKUs and their summed counts on this member, if it answered.
    pub totals: Option<(u64, Stock)>,
    /// The other members this one sees down, if it answered (orders that
    /// span members need every link up).
    pub sees_down: Option<Vec<u32>>,
    /// Its busiest SKUs (most units held plus sold), busiest first.
    pub hottest_skus: Vec<(String, Stock)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub partition_count: u32,
    pub members: Vec<MemberStatus>,
    /// Members holding each partition (1: a single copy).
    pub replication_factor: u32,
    /// In a replicated cluster, each replication group's leader as the
    /// answering member knows it; empty for a single copy.
    pub groups: Vec<GroupStatus>,
}

/// A replication group as the answering member sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: u32,
    /// `None` during an election.
    pub leader: Option<u32>,
    pub term: u64,
}

/// Quick retries (a quarter of the first pause) a call makes after a
/// `NotLeader` that names another member; later ones wait the usual
/// doubling pause, so that a call outlasts a leader hand-over.
const NOT_LEADER_QUICK_HOPS_MAX: u32 = 2;

/// Which calls are retried, how often and how far apart. Only calls that
/// are safe to repeat are retried (every call carries its idempotency key
/// or is a read), and only on answers that may change: busy, unavailable,
/// lost connection, timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts_max: u32,
    /// Pause before the second try; doubled for each later one, with up to
    /// half of it added at random so that a crowd does not retry in step.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts_max: 8, backoff_initial: Duration::from_millis(20), backoff_max: Duration::from_secs(1) }
    }
}

/// Configures a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    seeds: Vec<SocketAddr>,
    roots: Option<Arc<rustls::RootCertStore>>,
    identity: Option<Identity>,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryPolicy,
    in_flight_max: usize,
    agent: String,
    tls_error: Option<Error>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            seeds: Vec::new(),
            roots: None,
            identity: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            in_flight_max: 1_024,
            agent: "flashstock-client".to_owned(),
            tls_error: None,
        }
    }
}

impl ClientBuilder {
    /// A member to learn the cluster from; give several, any one answering
    /// is enough.
    pub fn seed(mut self, address: SocketAddr) -> Self {
        self.seeds.push(address);
        self
    }

    /// The cluster CA (`ca.pem`) and this client's identity
    /// (`<identity>.pem`, `<identity>.key`) from a directory, such as the
    /// one `flashstock-node dev-certs` writes.
    pub fn tls_directory(self, directory: &Path, identity: &str) -> Self {
        self.tls_material(tls::load_roots(directory), Identity::load(directory, identity))
    }

    /// The cluster CA and this client's certificate and key, as PEM text.
    pub fn tls_pem(self, ca: &[u8], certificate: &[u8], key: &[u8]) -> Self {
        self.tls_material(tls::roots_from_pem(ca), Identity::from_pem(certificate, key))
    }

    /// Keeps the material, or the first reason it is unusable for
    /// [`Self::connect`] to report.
    fn tls_material(
        mut self,
        roots: Result<Arc<rustls::RootCertStore>, tls::TlsError>,
        identity: Result<Identity, tls::TlsError>,
    ) -> Self {
        match (roots, identity) {
            (Ok(roots), Ok(identity)) => {
                self.roots = Some(roots);
                self.identity = Some(identity);
            }
            (Err(error), _) | (_, Err(error)) => self.tls_error = Some(Error::Config(error.to_string())),
        }
        self
    }

    /// Longest wait for a connection to a member.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait for one answer; the member drops the work after it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Calls in flight at once across all members; more wait their turn.
    pub fn in_flight_max(mut self, calls: usize) -> Self {
        self.in_flight_max = calls;
        self
    }

    /// What the client calls itself in the members' logs.
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = agent.into();
        self
    }

    /// Connects to the first seed that answers and learns the partition map.
    pub async fn connect(self) -> Result<Client, Error> {
        if let Some(error) = self.tls_error {
            return Err(error);
        }
        let (Some(roots), Some(identity)) = (self.roots, self.identity) else {
            return Err(Error::Config("TLS material is required (tls_directory or tls_pem)".to_owned()));
        };
        if self.seeds.is_empty() {
            return Err(Error::Config("at least one seed address is required".to_owned()));
        }
        if self.retry.attempts_max == 0 || self.in_flight_max == 0 {
            return Err(Error::Config("attempts_max and in_flight_max must be at least 1".to_owned()));
        }
        let request_timeout_ms = u32::try_from(self.request_timeout.as_millis())
            .map_err(|_| Error::Config("request_timeout is too long".to_owned()))?;
        let crypto = tls::client_crypto(roots, identity).map_err(|error| Error::Config(error.to_string()))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|error| Error::Config(error.to_string()))?;
        let bind: SocketAddr =
            if self.seeds[0].is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("a valid wildcard address");
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|error| Error::Connection(format!("opening a socket: {error}")))?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let seed_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_nanos() as u64);
        let inner = Inner {
            endpoint,
            seeds: self.seeds,
            map: RwLock::new(None),
            connections: Mutex::new(HashMap::new()),
            suspected: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(self.in_flight_max),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            request_timeout_ms,
            retry: self.retry,
            agent: self.agent,
            jitter: AtomicU64::new(seed_nanos | 1),
            operation_tag: {
                use std::hash::BuildHasher;
                // std seeds each `RandomState` from the OS's randomness.
                std::collections::hash_map::RandomState::new().hash_one((seed_nanos, std::process::id()))
            },
            operations: AtomicU64::new(0),
        };
        let client = Client { inner: Arc::new(inner), deadline: self.request_timeout };
        client.refresh_map(None).await?;
        Ok(client)
    }
}

/// A connection pool to the cluster: one long-lived QUIC connection per
/// member, and on it one session whose frames carry the concurrent calls
/// to that member in batches. Cheap to clone and
/// safe to share between tasks; clones share the connections.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// How long each call of this handle waits for an answer.
    deadline: Duration,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    seeds: Vec<SocketAddr>,
    map: RwLock<Option<PartitionMap>>,
    connections: Mutex<HashMap<SocketAddr, Link>>,
    /// Members that did not answer lately, since when.
    suspected: Mutex<HashMap<u32, std::time::Instant>>,
    /// Held while a connection to the member is being opened.
    opening: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: tokio::sync::Semaphore,
    connect_timeout: Duration,
    request_timeout: Duration,
    request_timeout_ms: u32,
    retry: RetryPolicy,
    agent: String,
    /// State of a xorshift generator for backoff jitter.
    jitter: AtomicU64,
    /// What makes this client's operation ids its own.
    operation_tag: u64,
    /// Operation ids handed out so far.
    operations: AtomicU64,
}

/// A member's connection and the session the calls travel on.
#[derive(Debug, Clone)]
struct Link {
    connection: quinn::Connection,
    session: Arc<Session>,
}

impl Link {
    fn is_alive(&self) -> bool {
        self.connection.close_reason().is_none() && !self.session.is_closed()
    }
}

/// Admin calls that share one operation id (from [`Client::admin`]).
#[derive(Debug)]
pub struct Admin<'a> {
    client: &'a Client,
    operation: String,
}

impl Admin<'_> {
    /// See [`Client::create_sku`].
    pub async fn create_sku(
        &self,
        sku: &str,
        initial_units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
    ) -> Result<Stock, Error> {
        let operation = self.operation.clone();
        let body =
            RequestBody::CreateSku { sku: sku.to_owned(), initial_units, units_per_buyer_max, opens_at_ms, operation };
        self.client.stock_call(sku, body).await
    }

    /// See [`Client::add_stock`].
    pub async fn add_stock(&self, sku: &str, units: u64) -> Result<Stock, Error> {
        let body = RequestBody::AddStock { sku: sku.to_owned(), units, operation: self.operation.clone() };
        self.client.stock_call(sku, body).await
    }

    /// See [`Client::remove_stock`].
    pub async fn remove_stock(&self, sku: &str, units: u64) -> Result<Stock, Error> {
        let body = RequestBody::RemoveStock { sku: sku.to_owned(), units, operation: self.operation.clone() };
        self.client.stock_call(sku, body).await
    }

    /// See [`Client::set_buyer_limit`].
    pub async fn set_buyer_limit(&self, sku: &str, units_per_buyer_max: Option<u32>) -> Result<Stock, Error> {
        let operation = self.operation.clone();
        self.client
            .stock_call(sku, RequestBody::SetBuyerLimit { sku: sku.to_owned(), units_per_buyer_max, operation })
            .await
    }

    /// See [`Client::open_sale`].
    pub async fn open_sale(&self, sku: &str, opens_at_ms: u64) -> Result<Stock, Error> {
        let body = RequestBody::OpenSale { sku: sku.to_owned(), opens_at_ms, operation: self.operation.clone() };
        self.client.stock_call(sku, body).await
    }
}

/// Where a request must go.
#[derive(Debug, Clone, Copy)]
enum Route {
    Partition(u32),
    Anyone,
}

/// The member a request for `partition` goes to on try `attempt`: its
/// owner in a single-copy cluster; in a replicated one the group's leader
/// if known, otherwise its replicas in turn.
/// Members that did not answer lately are `suspected`: tried last.
fn route_member(map: &PartitionMap, partition: u32, attempt: u32, suspected: &[u32]) -> Option<u32> {
    let ids: Vec<u32> = map.members.iter().map(|member| member.id).collect();
    let Some(replication) = &map.replication else { return owner_of(partition, &ids) };
    let group = group_of_partition(partition, replication.groups.max(1));
    let known = replication.leaders.iter().find(|known| known.group == group).and_then(|known| known.leader);
    if let Some(leader) = known.filter(|leader| !suspected.contains(leader)) {
        return Some(leader);
    }
    let replicas = replicas_of(group, &ids, replication.factor as usize);
    let trusted: Vec<u32> = replicas.iter().copied().filter(|member| !suspected.contains(member)).collect();
    let candidates = if trusted.is_empty() { &replicas } else { &trusted };
    candidates.get(attempt as usize % candidates.len().max(1)).copied()
}

/// What a `NotLeader` naming `named` in `term` teaches about a group the
/// client knew as `known`; returns the leader to follow (see
/// [`Client::learn_leader`]). `named_suspected`: the member named did not
/// answer lately.
fn follow_refusal(known: &mut GroupLeader, named: Option<u32>, term: u64, named_suspected: bool) -> Option<u32> {
    if term < known.term {
        // Older news than the client's: the refusing member is behind.
        return known.leader;
    }
    let news = term > known.term;
    let followed = named.filter(|_| news || !named_suspected);
    known.leader = followed;
    known.term = term;
    followed
}

/// Whether `since` is less than `window_ms` ago.
fn within(since: std::time::Instant, window_ms: u64) -> bool {
    since.elapsed() < Duration::from_millis(window_ms)
}

/// The id of the member at `address` in `map`.
fn member_id_at(map: &PartitionMap, address: SocketAddr) -> Option<u32> {
    map.members.iter().find(|member| member.address.parse() == Ok(address)).map(|member| member.id)
}

/// How long a member that did not answer is tried last.
const SUSPECTED_MS: u64 = 2_000;
/// How long a member that did not answer is given only the first try's
/// wait when it is tried again: a dead leader's followers still name it
/// until their election ends, and each try at it otherwise waited longer
/// (0.4, 0.8, 1.6, 3.2 s): the kill test saw groups served again 2.4 to
/// 10.9 s after their leader died, though the election took half a second.
const RECENTLY_SUSPECTED_MS: u64 = 10_000;
/// A replicated cluster's first try waits this long before it tries
/// another replica (doubling each try, up to the request timeout): a dead
/// leader's connection looks alive until it idles out, and the other
/// replicas know the new leader within an election. Safe because every
/// request is idempotent by its key.
const REPLICATED_ATTEMPT_MS_MIN: u64 = 400;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// A handle on the same connections whose calls each wait at most
    /// `timeout` (the member drops the work after it too): for a checkout
    /// step with a deadline of its own.
    pub fn with_request_timeout(&self, timeout: Duration) -> Client {
        Client { inner: self.inner.clone(), deadline: timeout }
    }

    /// Holds stock for every line of `order`, or for none.
    pub async fn reserve(&self, order: &Order) -> Result<Reservation, Error> {
        if order.lines.is_empty() {
            return Err(Error::Invalid {
                field: "lines".to_owned(),
                reason: "an order needs at least one line".to_owned(),
            });
        };
        let ttl_ms = u64::try_from(order.hold_ttl.as_millis()).unwrap_or(u64::MAX);
        let body = RequestBody::Reserve {
            order: order.id.clone(),
            buyer: order.buyer.clone(),
            lines: order
                .lines
                .iter()
                .map(|line| WireLine {
                    sku: line.sku.clone(),
                    quantity: match line.quantity {
                        Quantity::Exactly(units) => WireQuantity::Exactly(units),
                        Quantity::UpTo { max, min } => WireQuantity::UpTo { max, min },
                    },
                })
                .collect(),
            ttl_ms,
        };
        // The order's home is the partition of its id, whatever its lines:
        // every reserve, commit and release of one id meets one record.
        let partition = self.partition_of(&order.id)?;
        match self.call(Route::Partition(partition), body).await? {
            Response::Reserved { order: id, home_partition, expires_at_ms, mut lines } => {
                in_request_order(&mut lines, order);
                Ok(Reservation {
                    id: ReservationId { order: id, home_partition },
                    expires_at_ms,
                    lines: lines.into_iter().map(LineResult::from).collect(),
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Sells every held unit of the reservation.
    pub async fn commit(&self, reservation: &ReservationId) -> Result<Settlement, Error> {
        self.commit_fewer(reservation, &[]).await
    }

    /// Sells `units` of the named SKUs (lines not named sell all their
    /// units); the rest of each hold goes back to stock.
    pub async fn commit_fewer(&self, reservation: &ReservationId, fewer: &[(&str, u32)]) -> Result<Settlement, Error> {
        let body = RequestBody::Commit {
            order: reservation.order.clone(),
            home_partition: reservation.home_partition,
            fewer: fewer.iter().map(|(sku, units)| ((*sku).to_owned(), *units)).collect(),
        };
        self.settle(reservation, body).await
    }

    /// Gives every held unit back to stock.
    pub async fn release(&self, reservation: &ReservationId) -> Result<Settlement, Error> {
        let body =
            RequestBody::Release { order: reservation.order.clone(), home_partition: reservation.home_partition };
        self.settle(reservation, body).await
    }

    async fn settle(&self, reservation: &ReservationId, body: RequestBody) -> Result<Settlement, Error> {
        match self.call(Route::Partition(reservation.home_partition), body).await? {
            Response::Settled { order, lines, replayed } => {
                Ok(Settlement { order, lines: lines.into_iter().map(LineResult::from).collect(), replayed })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The SKU's counts as its owner last published them.
    pub async fn availability(&self, sku: &str) -> Result<Stock, Error> {
        self.stock_call(sku, RequestBody::Availability { sku: sku.to_owned() }).await
    }

    /// Admin: creates a SKU with `initial_units`, an optional per-buyer
    /// limit and the time its sale opens (0: open now). Like every admin
    /// call on `Client`, it runs under a fresh operation id kept across its
    /// retries (see [`Client::admin`]).
    pub async fn create_sku(
        &self,
        sku: &str,
        initial_units: u64,
        units_per_buyer_max: Option<u32>,
        opens_at_ms: u64,
    ) -> Result<Stock, Error> {
        self.admin(self.new_operation_id()).create_sku(sku, initial_units, units_per_buyer_max, opens_at_ms).await
    }

    /// Admin: adds units to a SKU.
    pub async fn add_stock(&self, sku: &str, units: u64) -> Result<Stock, Error> {
        self.admin(self.new_operation_id()).add_stock(sku, units).await
    }

    /// Admin: removes unsold, unheld units from a SKU.
    pub async fn remove_stock(&self, sku: &str, units: u64) -> Result<Stock, Error> {
        self.admin(self.new_operation_id()).remove_stock(sku, units).await
    }

    /// Admin: sets (or with `None` lifts) the units one buyer may hold or buy.
    pub async fn set_buyer_limit(&self, sku: &str, units_per_buyer_max: Option<u32>) -> Result<Stock, Error> {
        self.admin(self.new_operation_id()).set_buyer_limit(sku, units_per_buyer_max).await
    }

    /// Admin: the time (cluster milliseconds) a SKU's sale opens.
    pub async fn open_sale(&self, sku: &str, opens_at_ms: u64) -> Result<Stock, Error> {
        self.admin(self.new_operation_id()).open_sale(sku, opens_at_ms).await
    }

    /// Admin calls under an operation id of the caller's choosing: the
    /// member applies the change once and answers any later call with the
    /// same id (and the same change) with the SKU's counts instead of
    /// applying it again. For an operator's tool that may be run twice for
    /// one change (after a timeout, say): give the same id both times.
    /// Operation ids are remembered per SKU for the idempotency window.
    pub fn admin(&self, operation: impl Into<String>) -> Admin<'_> {
        Admin { client: self, operation: operation.into() }
    }

    /// An operation id no other call makes: 64 random bits (from the
    /// process's OS-seeded hasher keys), the time and a counter.
    pub fn new_operation_id(&self) -> String {
        let number = self.inner.operations.fetch_add(1, Ordering::Relaxed);
        format!("op-{:016x}-{number}", self.inner.operation_tag)
    }

    /// Members, whether each is up, and how many partitions each owns.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        let map = match self.call(Route::Anyone, RequestBody::PartitionMap).await? {
            Response::PartitionMap(map) => map,
            other => return Err(unexpected(&other)),
        };
        let owned = |id: u32| {
            let count =
                (0..map.partition_count).filter(|&partition| route_member(&map, partition, 0, &[]) == Some(id)).count();
            u32::try_from(count).unwrap_or(u32::MAX)
        };
        *self.inner.map.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(map.clone());
        let mut members = Vec::with_capacity(map.members.len());
        for member in &map.members {
            let report = match member.address.parse::<SocketAddr>() {
                // Asked directly even if the answering member sees it down:
                // this client's own connection is what counts for it.
                Ok(address) => match self.send(address, &RequestBody::NodeStatus).await {
                    Ok(Response::NodeStatus { skus, stock, sees_down, hottest_skus, .. }) => {
                        let hottest = hottest_skus.into_iter().map(|(sku, stock)| (sku, stock.into())).collect();
                        Some(((skus, stock.into()), sees_down, hottest))
                    }
                    _ => None,
                },
                Err(_) => None,
            };
            let (totals, sees_down, hottest_skus) = match report {
                Some((totals, down, hottest)) => (Some(totals), Some(down), hottest),
                None => (None, None, Vec::new()),
            };
            members.push(MemberStatus {
                id: member.id,
                address: member.address.clone(),
                up: member.up,
                partitions: owned(member.id),
                totals,
                sees_down,
                hottest_skus,
            });
        }
        let (replication_factor, groups) = match &map.replication {
            Some(replication) => (
                replication.factor,
                replication
                    .leaders
                    .iter()
                    .map(|known| GroupStatus { group: known.group, leader: known.leader, term: known.term })
                    .collect(),
            ),
            None => (1, Vec::new()),
        };
        Ok(ClusterStatus { partition_count: map.partition_count, members, replication_factor, groups })
    }

    async fn stock_call(&self, sku: &str, body: RequestBody) -> Result<Stock, Error> {
        match self.call(Route::Partition(self.partition_of(sku)?), body).await? {
            Response::Stock { stock, .. } => Ok(stock.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// The member that answers for `sku`'s partition, by the current map
    /// (in a replicated cluster: its group's leader, as last known).
    pub fn owner_of(&self, sku: &str) -> Option<u32> {
        let partition = self.partition_of(sku).ok()?;
        let map = self.inner.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        route_member(map.as_ref()?, partition, 0, &self.suspected())
    }

    /// The partition of a SKU or of an order id (the same stable hash).
    fn partition_of(&self, sku: &str) -> Result<u32, Error> {
        let map = self.inner.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = map.as_ref().map_or(0, |map| map.partition_count);
        if count == 0 {
            return Err(Error::Protocol("the cluster reported no partitions".to_owned()));
        }
        Ok(partition_of(sku, count))
    }

    /// The address to send a request to; `None` if no member is known.
    fn address_for(&self, route: Route, attempt: u32) -> Option<SocketAddr> {
        let map = self.inner.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let map = map.as_ref()?;
        let member = match route {
            Route::Partition(partition) => {
                let id = route_member(map, partition, attempt, &self.suspected())?;
                map.members.iter().find(|member| member.id == id)?
            }
            Route::Anyone => {
                let up: Vec<_> = map.members.iter().filter(|member| member.up).collect();
                let candidates = if up.is_empty() { map.members.iter().collect() } else { up };
                candidates.get(attempt as usize % candidates.len().max(1)).copied()?
            }
        };
        member.address.parse().ok()
    }

    /// Learns who leads `group` from a refusal naming `leader` in `term`,
    /// and returns the leader to follow (`None`: nobody known, so the next
    /// try goes round the replicas after the pause).
    ///
    /// A follower naming a member that just did not answer, in a term no
    /// newer than the one this client knew, is behind an election: it is
    /// not followed. Named in a newer term, that member was elected since
    /// it last failed to answer (a slow answer, not a death): it is
    /// followed and tried first again — ignoring it until its suspicion
    /// ran out kept a group's clients on a follower for two seconds after
    /// the election (the kill test's 3.2 s failovers).
    fn learn_leader(&self, group: u32, leader: Option<u32>, term: u64) -> Option<u32> {
        let mut map = self.inner.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(replication) = map.as_mut().and_then(|map| map.replication.as_mut()) else { return leader };
        let position = match replication.leaders.iter().position(|known| known.group == group) {
            Some(position) => position,
            None => {
                replication.leaders.push(GroupLeader { group, leader: None, term: 0 });
                replication.leaders.len() - 1
            }
        };
        let mut suspected = lock(&self.inner.suspected);
        let named_suspected =
            leader.is_some_and(|named| suspected.get(&named).is_some_and(|since| within(*since, SUSPECTED_MS)));
        let followed = follow_refusal(&mut replication.leaders[position], leader, term, named_suspected);
        if let Some(named) = followed.filter(|&followed| named_suspected && Some(followed) == leader) {
            // Tried first again, but still with the short wait of a member
            // that lately did not answer.
            if let Some(since) = std::time::Instant::now().checked_sub(Duration::from_millis(SUSPECTED_MS)) {
                suspected.insert(named, since);
            }
        }
        followed
    }

    /// Members that did not answer in the last [`SUSPECTED_MS`].
    fn suspected(&self) -> Vec<u32> {
        let mut suspected = lock(&self.inner.suspected);
        suspected.retain(|_, since| within(*since, RECENTLY_SUSPECTED_MS));
        suspected.iter().filter(|(_, since)| within(**since, SUSPECTED_MS)).map(|(&id, _)| id).collect()
    }

    /// Whether the member at `address` did not answer in the last
    /// [`RECENTLY_SUSPECTED_MS`].
    fn recently_suspected(&self, address: SocketAddr) -> bool {
        let Some(id) = self.member_at(address) else { return false };
        lock(&self.inner.suspected).get(&id).is_some_and(|since| within(*since, RECENTLY_SUSPECTED_MS))
    }

    /// A member did not answer: it no longer counts as the leader of the
    /// groups it was thought to lead (the next try goes round the replicas).
    fn suspect(&self, address: SocketAddr) {
        let mut map = self.inner.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(map) = map.as_mut() else { return };
        let Some(id) = member_id_at(map, address) else { return };
        lock(&self.inner.suspected).insert(id, std::time::Instant::now());
        if let Some(replication) = map.replication.as_mut() {
            for known in replication.leaders.iter_mut().filter(|known| known.leader == Some(id)) {
                known.leader = None;
            }
        }
    }

    /// The member at `address`, by the current map.
    fn member_at(&self, address: SocketAddr) -> Option<u32> {
        let map = self.inner.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        member_id_at(map.as_ref()?, address)
    }

    /// Sends `body` where `route` says, retrying by the policy.
    async fn call(&self, route: Route, body: RequestBody) -> Result<Response, Error> {
        // The same fields as the member's span for the request, so that one
        // order can be followed from here to its owner in the logs.
        let span = tracing::debug_span!("flashstock_call", kind = body.kind(), order = body.order());
        tracing::Instrument::instrument(self.call_with_retries(route, body), span).await
    }

    async fn call_with_retries(&self, route: Route, body: RequestBody) -> Result<Response, Error> {
        let _permit =
            self.inner.in_flight.acquire().await.map_err(|_| Error::Connection("client closed".to_owned()))?;
        let policy = self.inner.retry;
        let mut backoff = policy.backoff_initial;
        let mut last_error = Error::Unavailable { reason: "no member is known".to_owned() };
        let mut quick_hops = 0;
        // The next pause is a quick hop's, leaving the doubling pause as
        // it was for the tries after it.
        let mut quick = false;
        for attempt in 0..policy.attempts_max {
            if attempt > 0 && std::mem::take(&mut quick) {
                tokio::time::sleep(self.jittered(policy.backoff_initial / 4)).await;
            } else if attempt > 0 {
                tokio::time::sleep(self.jittered(backoff)).await;
                backoff = (backoff * 2).min(policy.backoff_max);
            }
            let Some(address) = self.address_for(route, attempt) else {
                let _ = self.refresh_map(None).await;
                continue;
            };
            match self.send_within(address, &body, self.attempt_deadline(attempt, address)).await {
                // The wire decides what may be retried; here only how.
                Ok(Response::Refused(refusal)) if !refusal.is_retryable() => return Err(refusal.into()),
                Ok(Response::Refused(refusal)) => {
                    tracing::debug!(attempt, %address, refusal = refusal.name(), "retrying");
                    match refusal {
                        // Our map is stale: learn the current one and go again soon.
                        Refusal::WrongNode { .. } => {
                            let _ = self.refresh_map(Some(address)).await;
                            backoff = policy.backoff_initial / 4;
                        }
                        // Replicated: straight to the leader named, or
                        // round the replicas after the usual pause while
                        // an election runs. Straight only to another
                        // member than the one that refused, and twice per
                        // call at most: a member naming itself, or two
                        // naming each other, are in the middle of a
                        // hand-over, and a few quick tries would all land
                        // in it and give up.
                        Refusal::NotLeader { group, leader, term } => {
                            let leader = self.learn_leader(group, leader, term);
                            let elsewhere = leader.is_some() && leader != self.member_at(address);
                            if elsewhere && quick_hops < NOT_LEADER_QUICK_HOPS_MAX {
                                quick_hops += 1;
                                quick = true;
                            }
                        }
                        Refusal::Busy { retry_after_ms } => {
                            backoff = backoff.max(Duration::from_millis(retry_after_ms));
                        }
                        _ => {
                            let _ = self.refresh_map(None).await;
                        }
                    }
                    last_error = refusal.into();
                }
                Ok(response) => return Ok(response),
                // Alive but slow: suspecting it sent the calls of every
                // group it leads round the replicas, and once all three
                // members of a group were suspected so (their orders
                // waiting on a group in failover), onto the dead one.
                Err(TryError::Slow) => {
                    tracing::debug!(attempt, %address, "retrying a member that is slow to answer");
                    last_error = Error::DeadlineExceeded;
                }
                Err(TryError::Failed(error @ (Error::Connection(_) | Error::DeadlineExceeded))) => {
                    tracing::debug!(attempt, %address, %error, "retrying");
                    self.forget(address);
                    self.suspect(address);
                    last_error = error;
                }
                Err(TryError::Failed(error)) => return Err(error),
            }
        }
        Err(last_error)
    }

    /// One try: the request on the member's session, and its answer.
    async fn send(&self, address: SocketAddr, body: &RequestBody) -> Result<Response, Error> {
        self.send_within(address, body, self.deadline).await.map_err(TryError::into_error)
    }

    async fn send_within(
        &self,
        address: SocketAddr,
        body: &RequestBody,
        deadline: Duration,
    ) -> Result<Response, TryError> {
        // Dialling counts against the try's deadline too: a dead member's
        // handshake otherwise waited the whole connect timeout (2 s), and
        // every call to it queued behind that one handshake.
        let link = match tokio::time::timeout(deadline, self.connection(address)).await {
            Ok(link) => link.map_err(TryError::Failed)?,
            // The try's time ran out before the member could be asked:
            // the caller's deadline, as if it had been asked.
            Err(_) => return Err(TryError::Failed(Error::DeadlineExceeded)),
        };
        let timeout_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
        let request = Request { timeout_ms, body: body.clone() };
        let heard_before = link.connection.stats().udp_rx.datagrams;
        match link.session.call(request, deadline).await {
            Ok(response) => Ok(response),
            // The member's QUIC stack acknowledges a request within a few
            // milliseconds while the process runs: something heard from it
            // during the try means it is alive and the answer is slow —
            // typically a leader waiting on another group's failover.
            Err(SessionError::TimedOut) if link.connection.stats().udp_rx.datagrams > heard_before => {
                Err(TryError::Slow)
            }
            Err(SessionError::TimedOut) => Err(TryError::Failed(Error::DeadlineExceeded)),
            Err(SessionError::Closed(reason)) => {
                Err(TryError::Failed(Error::Connection(format!("{address}: {reason}"))))
            }
            Err(SessionError::Request(error)) => Err(TryError::Failed(error)),
        }
    }

    /// How long try `attempt`, at `address`, waits (see
    /// [`REPLICATED_ATTEMPT_MS_MIN`] and [`RECENTLY_SUSPECTED_MS`]).
    fn attempt_deadline(&self, attempt: u32, address: SocketAddr) -> Duration {
        let replicated = self
            .inner
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|map| map.replication.is_some());
        if !replicated {
            return self.deadline;
        }
        let doublings = if self.recently_suspected(address) { 0 } else { attempt.min(16) };
        let growing = Duration::from_millis(REPLICATED_ATTEMPT_MS_MIN.saturating_mul(1 << doublings));
        self.deadline.min(growing)
    }

    /// The live link to `address`, opened (handshake and session) if there
    /// is none.
    async fn connection(&self, address: SocketAddr) -> Result<Link, Error> {
        if let Some(link) = lock(&self.inner.connections).get(&address) {
            if link.is_alive() {
                return Ok(link.clone());
            }
        }
        // One handshake per member at a time: the calls that find no
        // connection wait for the first one's instead of each opening one.
        let opening = lock(&self.inner.opening).entry(address).or_default().clone();
        let _opening = opening.lock().await;
        if let Some(link) = lock(&self.inner.connections).get(&address) {
            if link.is_alive() {
                return Ok(link.clone());
            }
        }
        let (connection, welcome) =
            tokio::time::timeout(self.inner.connect_timeout, self.handshake(address))
                .await
                .map_err(|_| Error::Connection(format!("{address} did not answer within the connect timeout")))??;
        if let Welcome::Accepted { map, .. } = welcome {
            self.adopt_map(map);
        }
        let session = Session::open(&connection, self.inner.connect_timeout).await?;
        let link = Link { connection, session: Arc::new(session) };
        lock(&self.inner.connections).insert(address, link.clone());
        Ok(link)
    }

    async fn handshake(&self, address: SocketAddr) -> Result<(quinn::Connection, Welcome), Error> {
        let connection_error = |error: &dyn std::fmt::Display| Error::Connection(format!("{address}: {error}"));
        // Every member's certificate names the cluster (`MEMBER_NAME`), so a
        // seed can be verified before its id is known; the id comes with
        // the welcome.
        let connection = self
            .inner
            .endpoint
            .connect(address, tls::MEMBER_NAME)
            .map_err(|error| connection_error(&error))?
            .await
            .map_err(|error| connection_error(&error))?;
        let welcome = hello(&connection, &self.inner.agent, self.inner.request_timeout).await?;
        Ok((connection, welcome))
    }

    /// Takes a member's map; of two views of a group's leader the one of
    /// the higher term wins (a member behind on news must not undo what a
    /// refusal taught).
    fn adopt_map(&self, mut map: PartitionMap) {
        let mut current = self.inner.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(known), Some(fresh)) =
            (current.as_ref().and_then(|map| map.replication.as_ref()), map.replication.as_mut())
        {
            for leader in &mut fresh.leaders {
                if let Some(newer) =
                    known.leaders.iter().find(|known| known.group == leader.group && known.term > leader.term)
                {
                    *leader = *newer;
                }
            }
        }
        *current = Some(map);
    }

    /// Learns the partition map from `preferred` or any member or seed.
    async fn refresh_map(&self, preferred: Option<SocketAddr>) -> Result<(), Error> {
        let mut candidates: Vec<SocketAddr> = preferred.into_iter().collect();
        if let Some(map) = self.inner.map.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            candidates.extend(
                map.members
                    .iter()
                    .filter(|member| member.up)
                    .filter_map(|member| member.address.parse::<SocketAddr>().ok()),
            );
        }
        candidates.extend(self.inner.seeds.iter().copied());
        let mut last = Error::Unavailable { reason: "no seed answered".to_owned() };
        for address in candidates {
            let outcome = async {
                let link = self.connection(address).await?;
                let request = Request { timeout_ms: self.inner.request_timeout_ms, body: RequestBody::PartitionMap };
                exchange::<_, Response>(&link.connection, &request, self.inner.request_timeout)
                    .await
                    .map_err(exchange_error)
            };
            match tokio::time::timeout(self.inner.request_timeout, outcome).await {
                Ok(Ok(Response::PartitionMap(map))) => {
                    self.adopt_map(map);
                    return Ok(());
                }
                Ok(Ok(other)) => last = unexpected(&other),
                Ok(Err(error)) => {
                    self.forget(address);
                    last = error;
                }
                Err(_) => last = Error::DeadlineExceeded,
            }
        }
        Err(last)
    }

    fn forget(&self, address: SocketAddr) {
        lock(&self.inner.connections).remove(&address);
    }

    fn jittered(&self, pause: Duration) -> Duration {
        let mut state = self.inner.jitter.load(Ordering::Relaxed);
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        self.inner.jitter.store(state, Ordering::Relaxed);
        let extra_ms = (pause.as_millis() as u64 / 2).max(1);
        pause + Duration::from_millis(state % extra_ms)
    }
}

/// Puts a reservation's lines in the order the request named their SKUs.
/// A member answers a first reserve in that order, but a retry answered
/// from what a restarted member rebuilt from its log comes in SKU order
/// (the log keeps each SKU's hold, not the request's line order): the
/// caller sees the same answer either way.
fn in_request_order(lines: &mut [WireLineResult], order: &Order) {
    let position = |sku: &str| order.lines.iter().position(|line| line.sku == sku).unwrap_or(usize::MAX);
    lines.sort_by_key(|line| position(&line.sku));
}

async fn hello(connection: &quinn::Connection, agent: &str, deadline: Duration) -> Result<Welcome, Error> {
    let hello = Hello { versions: vec![PROTOCOL_VERSION], agent: agent.to_owned(), boot: None };
    match exchange(connection, &hello, deadline).await.map_err(exchange_error)? {
        welcome @ Welcome::Accepted { .. } => Ok(welcome),
        Welcome::Refused { supported } => Err(Error::Protocol(format!(
            "the member speaks protocol versions {supported:?}, this client {PROTOCOL_VERSION}"
        ))),
    }
}

/// How a try that got no answer ended.
#[derive(Debug)]
enum TryError {
    /// The member was heard from during the try but did not answer in
    /// time: alive, its connection kept, not suspected.
    Slow,
    Failed(Error),
}

impl TryError {
    fn into_error(self) -> Error {
        match self {
            TryError::Slow => Error::DeadlineExceeded,
            TryError::Failed(error) => error,
        }
    }
}

fn exchange_error(error: ExchangeError) -> Error {
    match error {
        ExchangeError::Connection(reason) => Error::Connection(reason),
        ExchangeError::Stream(wire::StreamError::Io(error)) => Error::Connection(error.to_string()),
        ExchangeError::Stream(wire::StreamError::Codec(error)) => Error::Protocol(error.to_string()),
        ExchangeError::TimedOut(_) => Error::DeadlineExceeded,
    }
}

fn unexpected(response: &Response) -> Error {
    Error::Protocol(format!("unexpected answer {response:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_ids_round_trip_through_text() {
        let id = ReservationId { order: "order:with:colons".to_owned(), home_partition: 17 };
        assert_eq!(id.to_string(), "17:order:with:colons");
        assert_eq!(id.to_string().parse::<ReservationId>().expect("parses"), id);
        for bad in ["", "17", "x:order", "17:", ":order"] {
            assert!(bad.parse::<ReservationId>().is_err(), "{bad} accepted");
        }
    }

    /// A retry answered in SKU order (by a restarted member) reads as the
    /// first answer did: in the request's line order.
    #[test]
    fn reserved_lines_come_back_in_the_request_order() {
        let line = |sku: &str, units| WireLineResult {
            sku: sku.to_owned(),
            units,
            stock: WireStock { available: 0, held: units.into(), sold: 0 },
        };
        let order = Order {
            id: "o".to_owned(),
            buyer: "b".to_owned(),
            lines: ["tv", "cable", "lamp"]
                .iter()
                .map(|sku| OrderLine { sku: (*sku).to_owned(), quantity: Quantity::Exactly(1) })
                .collect(),
            hold_ttl: std::time::Duration::from_secs(60),
        };
        let mut lines = vec![line("cable", 2), line("lamp", 3), line("tv", 1)];
        in_request_order(&mut lines, &order);
        assert_eq!(lines.iter().map(|line| line.sku.as_str()).collect::<Vec<_>>(), ["tv", "cable", "lamp"]);
    }

    #[test]
    fn only_transient_errors_are_retryable() {
        assert!(Error::Busy { retry_after_ms: 1 }.is_retryable());
        assert!(Error::Connection("reset".to_owned()).is_retryable());
        assert!(!Error::SoldOut { line: 0, sku: "tv".to_owned(), available: 0 }.is_retryable());
        assert!(!Error::IdempotencyConflict.is_retryable());
    }

    #[tokio::test]
    async fn a_builder_without_tls_or_seeds_is_a_configuration_error() {
        let missing_tls = Client::builder().seed("127.0.0.1:1".parse().expect("address")).connect().await;
        assert!(matches!(missing_tls, Err(Error::Config(_))));
        let missing_files = Client::builder().tls_directory(Path::new("/nonexistent"), "checkout").connect().await;
        assert!(matches!(missing_files, Err(Error::Config(_))));
    }

    /// A dead leader's followers name it until their election ends: not
    /// followed. Named in a newer term, a member that was only slow to
    /// answer has been elected since: followed (seen in the kill test —
    /// the clients stayed on a follower two seconds after the election).
    #[test]
    fn a_refusal_naming_a_suspected_member_is_followed_only_as_news_of_a_newer_term() {
        let mut known = GroupLeader { group: 1, leader: None, term: 14 };
        assert_eq!(follow_refusal(&mut known, Some(2), 14, true), None, "a dead leader named in its own term");
        assert_eq!(follow_refusal(&mut known, Some(3), 15, true), Some(3), "elected after it failed to answer");
        assert_eq!((known.leader, known.term), (Some(3), 15));
        assert_eq!(follow_refusal(&mut known, Some(2), 14, false), Some(3), "a member behind does not undo news");
        assert_eq!(known.term, 15);
        assert_eq!(follow_refusal(&mut known, None, 16, false), None, "an election in a newer term");
        assert_eq!(follow_refusal(&mut known, Some(1), 16, false), Some(1));
    }

    #[test]
    fn replicated_routes_go_to_the_known_leader_then_round_the_trusted_replicas() {
        use crate::wire::{Member, ReplicationMap};
        let members = (1..=3).map(|id| Member { id, address: format!("127.0.0.1:{}", 7000 + id), up: true }).collect();
        let partition = 5;
        let group = group_of_partition(partition, 6);
        let leaders = vec![GroupLeader { group, leader: Some(2), term: 4 }];
        let mut map = PartitionMap {
            epoch: 1,
            partition_count: 16,
            members,
            replication: Some(ReplicationMap { factor: 3, groups: 6, leaders }),
        };
        assert_eq!(route_member(&map, partition, 0, &[]), Some(2), "the known leader");
        for attempt in 0..6 {
            assert_ne!(route_member(&map, partition, attempt, &[2]), Some(2), "a silent leader is tried last");
        }
        assert_eq!(route_member(&map, partition, 0, &[1, 2, 3]), Some(2), "all silent: the leader still");
        map.replication.as_mut().expect("replicated").leaders.clear();
        let tried: std::collections::BTreeSet<u32> =
            (0..3).filter_map(|attempt| route_member(&map, partition, attempt, &[])).collect();
        assert_eq!(tried.len(), 3, "no leader known: every replica in turn");
        map.replication = None;
        assert_eq!(route_member(&map, partition, 0, &[]), owner_of(partition, &[1, 2, 3]), "single copy: the owner");
    }
}
