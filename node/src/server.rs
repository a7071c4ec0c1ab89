//! A member's QUIC endpoint.
//!
//! A connection is mutually authenticated (see [`crate::tls`]); its first
//! stream carries the version handshake ([`Hello`] / [`Welcome`], which
//! also hands the client the partition map). After that a client's calls
//! come in a session: a long-lived stream of batch frames, whose requests
//! one task starts and whose answers go back as they complete (a slow one
//! delays nobody), in as few frames as they fit. Requests outside a
//! session (a map refresh, the members' calls to each other) come on a
//! bidirectional stream each. Each session bounds its requests in flight,
//! QUIC's stream limit the streams, and a semaphore the connections.
//!
//! Routing: a SKU's partition is the stable hash of its id; a partition's
//! owner is the rendezvous choice among the members. A node answers for the
//! partitions it owns and says `WrongNode { owner }` for the rest, which
//! the client follows (one hop, no forwarding on the node's path). An order
//! is coordinated by the owner of its first line's SKU (its home
//! partition); orders whose lines live on several nodes are refused for
//! now with a reason that says so.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flashstock_client::routing::{owner_of, partition_of};
use flashstock_client::wire::{
    self, Hello, Member, PartitionMap, Refusal, ReplicationMap, Request, RequestBody, Response, Welcome, WireLine,
    WireStock, PROTOCOL_VERSION,
};
use flashstock_engine::coordination::ClientRequest;
use flashstock_engine::replication::AdminRequest;
use flashstock_engine::{
    AdminChange, BatchRequest, BuyerId, Engine, EngineError, Line, OperationId, OrderId, OrderRequest, SkuId,
    SkuSettings, StockSnapshot,
};
use tokio::sync::Semaphore;

use crate::config::{ClusterFile, NetworkSection};
use crate::coordination::Coordination;
use crate::peers::Peers;
use crate::replication::Replication;
use crate::tls::{self, Role};
use crate::translate::{
    client_response, engine_refusal, invalid, part_request, sku_id, wire_line, wire_part_answer, wire_stock,
};

/// QUIC error codes a node closes connections with.
pub mod close_code {
    pub const SHUTTING_DOWN: u32 = 1;
    pub const UNKNOWN_IDENTITY: u32 = 2;
    pub const NO_COMMON_VERSION: u32 = 3;
    pub const BAD_HANDSHAKE: u32 = 4;
    pub const TOO_MANY_CONNECTIONS: u32 = 5;
}

/// One member serving its partitions.
#[derive(Debug)]
pub struct Node {
    pub id: u32,
    pub engine: Engine,
    members: Vec<u32>,
    map: PartitionMap,
    network: NetworkSection,
    peers: Arc<Peers>,
    /// The orders whose home is this member (single copy).
    pub coordination: Arc<Coordination>,
    /// In a replicated cluster: the groups this member holds, which
    /// answer every request on a partition (the engine then holds nothing).
    pub replication: Option<Arc<Replication>>,
    /// Set when the node begins to stop: new requests are refused.
    stopping: std::sync::atomic::AtomicBool,
    /// Requests being worked on, and a wake-up for when none are left.
    in_flight: std::sync::atomic::AtomicUsize,
    drained: tokio::sync::Notify,
}

/// One request in flight; counted until dropped.
struct InFlight<'a>(&'a Node);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// How a session starts a request (see [`Node::batchable`]).
pub(crate) enum Batchable {
    /// A reserve whose home is this member, for the coordinator's batch.
    Reserve(OrderRequest, u32),
    /// A commit or release whose home is this member, for the engine's batch.
    Settle(BatchRequest),
    /// Anything else, awaited on its own.
    Awaited(RequestBody),
}

impl Node {
    pub fn new(
        file: &ClusterFile,
        id: u32,
        engine: Engine,
        peers: Arc<Peers>,
        replication: Option<Arc<Replication>>,
    ) -> anyhow::Result<Self> {
        file.member(id)?;
        let members: Vec<u32> = file.members.iter().map(|member| member.id).collect();
        let map = PartitionMap {
            replication: None,
            epoch: 1,
            partition_count: file.cluster.partitions,
            members: file
                .members
                .iter()
                .map(|member| Member { id: member.id, address: member.address.clone(), up: true })
                .collect(),
        };
        let coordination = Coordination::start(
            id,
            &members,
            file.cluster.partitions,
            engine.clone(),
            peers.clone(),
            file.network.spanning_orders_max,
        )?;
        Ok(Self {
            id,
            engine,
            members,
            map,
            network: file.network.clone(),
            peers,
            coordination,
            replication,
            stopping: std::sync::atomic::AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
        })
    }

    /// Begins to stop: from now on new connections and requests are
    /// refused (`Unavailable`, which clients retry), and this waits until
    /// the requests in flight are answered or `timeout` has passed. Returns
    /// how many were still in flight at the end.
    pub async fn drain(&self, timeout: Duration) -> usize {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let drained = self.drained.notified();
            let left = self.in_flight.load(Ordering::SeqCst);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.in_flight.load(Ordering::SeqCst);
            }
        }
    }

    /// Counts a request in, unless the node is stopping. (Sequentially
    /// consistent with `drain`: either the request sees `stopping`, or
    /// `drain` sees it counted.)
    fn admit(&self) -> Option<InFlight<'_>> {
        use std::sync::atomic::Ordering;
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        (!self.stopping.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Counts in the `count` requests of a session's frame; `false` if the
    /// node is stopping (they are counted all the same: each is answered,
    /// `Unavailable`, and counted out by [`Self::request_done`]).
    pub(crate) fn admit_many(&self, count: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.in_flight.fetch_add(count, Ordering::SeqCst);
        !self.stopping.load(Ordering::SeqCst)
    }

    /// A request counted in has been answered.
    pub(crate) fn request_done(&self) {
        use std::sync::atomic::Ordering;
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.stopping.load(Ordering::Acquire) {
            self.drained.notify_waiters();
        }
    }

    pub(crate) fn network(&self) -> &NetworkSection {
        &self.network
    }

    /// The partition of an order's id: where it is coordinated.
    pub(crate) fn home_partition(&self, order: &OrderId) -> u32 {
        self.partition_of(order.as_str())
    }

    /// Answers one request within the time its caller waits (the work is
    /// dropped past it; the engine puts back an order left half-way).
    pub(crate) async fn answer_in_time(&self, role: Role, request: Request) -> Response {
        if request.timeout_ms == 0 {
            // No time left: the caller has given up before the work could begin.
            return Response::Refused(Refusal::DeadlineExceeded);
        }
        // One span per request, named by the order it concerns, so that
        // an order can be followed from the client to its owner (and, for
        // spanning orders, to the members holding its parts). At `debug`:
        // a member logging at `info` pays nothing for it.
        let span = tracing::debug_span!("request", kind = request.body.kind(), order = tracing::field::Empty);
        if let Some(order) = request.body.order() {
            span.record("order", order);
        }
        let timeout_ms = request.timeout_ms.min(self.network.request_timeout_ms_max);
        let work = tracing::Instrument::instrument(self.handle(role, request.body), span);
        match tokio::time::timeout(Duration::from_millis(timeout_ms.into()), work).await {
            Ok(response) => response,
            Err(_) => Response::Refused(Refusal::DeadlineExceeded),
        }
    }

    /// How a session starts `body`: the reserves, commits and releases of
    /// a single-copy cluster in batches (checked here as `dispatch` checks
    /// them), everything else awaited through [`Self::answer_in_time`].
    pub(crate) fn batchable(&self, role: Role, body: RequestBody) -> Result<Batchable, Refusal> {
        if self.replication.is_some() {
            return Ok(Batchable::Awaited(body));
        }
        self.check_role(role, &body)?;
        match body {
            RequestBody::Reserve { order, buyer, lines, ttl_ms } => {
                let home_partition = self.partition_of(&order);
                let request = self.order_request(order, buyer, lines, ttl_ms)?;
                self.check_owned(home_partition)?;
                Ok(Batchable::Reserve(request, home_partition))
            }
            RequestBody::Commit { order, home_partition, fewer } => {
                let order = self.check_home(&order, home_partition)?;
                Ok(Batchable::Settle(BatchRequest::Commit { order, fewer: engine_fewer(fewer)? }))
            }
            RequestBody::Release { order, home_partition } => {
                let order = self.check_home(&order, home_partition)?;
                Ok(Batchable::Settle(BatchRequest::Release { order }))
            }
            other => Ok(Batchable::Awaited(other)),
        }
    }

    /// A commit or release the engine's batch gave back: the engine's
    /// awaited path if it knows the order, else the coordinator's.
    pub(crate) async fn settle(&self, request: BatchRequest) -> Result<Response, Refusal> {
        match request {
            BatchRequest::Commit { order, fewer } => {
                let home_partition = self.home_partition(&order);
                self.coordination.commit(order, fewer, home_partition).await
            }
            BatchRequest::Release { order } => {
                let home_partition = self.home_partition(&order);
                self.coordination.release(order, home_partition).await
            }
            BatchRequest::Reserve(request) => {
                let home_partition = self.home_partition(&request.order);
                self.coordination.reserve(request, home_partition).await
            }
        }
    }

    /// Requests being worked on now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn member_ids(&self) -> Vec<u32> {
        self.members.clone()
    }

    /// Whether this node's link to `member` is up (itself always is).
    pub fn peer_is_up(&self, member: u32) -> bool {
        self.peers.is_up(member)
    }

    pub fn owns(&self, partition: u32) -> bool {
        self.owner(partition) == self.id
    }

    pub fn partition_count(&self) -> u32 {
        self.map.partition_count
    }

    fn owner(&self, partition: u32) -> u32 {
        owner_of(partition, &self.members).expect("a node has at least itself as member")
    }

    fn partition_of(&self, sku: &str) -> u32 {
        partition_of(sku, self.map.partition_count)
    }

    /// `Ok` if this node owns `partition`; otherwise `WrongNode` naming
    /// the owner while it is up, and `Unavailable` while it is down (no
    /// point sending the client to wait on a dead address).
    fn check_owned(&self, partition: u32) -> Result<(), Refusal> {
        let owner = self.owner(partition);
        if owner == self.id {
            Ok(())
        } else if self.peers.is_up(owner) {
            Err(Refusal::WrongNode { owner })
        } else {
            Err(Refusal::Unavailable { reason: format!("node {owner}, owner of partition {partition}, is down") })
        }
    }

    /// The partition map with each member's state as this node sees it.
    fn current_map(&self) -> PartitionMap {
        let mut map = self.map.clone();
        for member in &mut map.members {
            member.up = self.peers.is_up(member.id);
        }
        map.replication = self.replication.as_ref().map(|replication| ReplicationMap {
            factor: replication.factor(),
            groups: replication.group_count(),
            leaders: replication.leaders(),
        });
        map
    }

    /// Answers one request from a peer with `role`.
    pub async fn handle(&self, role: Role, body: RequestBody) -> Response {
        match self.dispatch(role, body).await {
            Ok(response) => response,
            Err(refusal) => Response::Refused(refusal),
        }
    }

    /// What a peer's role may ask: admin changes are the admin's, part
    /// steps and probes the members', and a client's order ids may not
    /// use the cluster's own prefix.
    fn check_role(&self, role: Role, body: &RequestBody) -> Result<(), Refusal> {
        let is_admin_request = matches!(
            body,
            RequestBody::CreateSku { .. }
                | RequestBody::AddStock { .. }
                | RequestBody::RemoveStock { .. }
                | RequestBody::SetBuyerLimit { .. }
                | RequestBody::OpenSale { .. }
        );
        if is_admin_request && role != Role::Admin {
            return Err(Refusal::Forbidden);
        }
        let is_member_request = matches!(body, RequestBody::Part { .. } | RequestBody::ReplicaProbe { .. });
        if !matches!(role, Role::Node(_)) {
            if is_member_request {
                return Err(Refusal::Forbidden);
            }
            if let RequestBody::Reserve { order, .. }
            | RequestBody::Commit { order, .. }
            | RequestBody::Release { order, .. } = body
            {
                check_client_order_id(order)?;
            }
        }
        Ok(())
    }

    async fn dispatch(&self, role: Role, body: RequestBody) -> Result<Response, Refusal> {
        self.check_role(role, &body)?;
        if let Some(replication) = &self.replication {
            return self.dispatch_replicated(replication, role, body).await;
        }
        match body {
            RequestBody::PartitionMap => Ok(Response::PartitionMap(self.current_map())),
            RequestBody::NodeStatus => {
                let totals = self.engine.totals(|partition| self.owner(partition) == self.id);
                let stock = WireStock { available: totals.available, held: totals.held, sold: totals.sold };
                let hottest_skus = self
                    .engine
                    .hottest_skus(wire::HOTTEST_SKUS_MAX, |partition| self.owner(partition) == self.id)
                    .into_iter()
                    .map(|(sku, stock)| (sku.as_str().to_owned(), wire_stock(stock)))
                    .collect();
                Ok(Response::NodeStatus {
                    node: self.id,
                    skus: totals.skus,
                    stock,
                    sees_down: self.peers.down(),
                    hottest_skus,
                })
            }
            RequestBody::Reserve { order, buyer, lines, ttl_ms } => self.reserve(order, buyer, lines, ttl_ms).await,
            RequestBody::Commit { order, home_partition, fewer } => {
                let order = self.check_home(&order, home_partition)?;
                let fewer = engine_fewer(fewer)?;
                self.coordination.commit(order, fewer, home_partition).await
            }
            RequestBody::Release { order, home_partition } => {
                let order = self.check_home(&order, home_partition)?;
                self.coordination.release(order, home_partition).await
            }
            RequestBody::ReplicaProbe { .. } => Err(invalid("request", "this cluster is not replicated".to_owned())),
            RequestBody::OpenSession => Err(session_inside_session()),
            RequestBody::Part { order: _, attempt, step: _, request } => {
                let attempt = order_id(attempt)?;
                let request = part_request(request)?;
                let answer =
                    self.engine.apply_part(&attempt, &request).await.map_err(|not_now| engine_refusal(not_now.0))?;
                Ok(Response::Part(wire_part_answer(&request, answer)))
            }
            RequestBody::Availability { sku } => {
                let sku = self.owned_sku(sku)?;
                stock_response(&sku, self.engine.availability(&sku).await)
            }
            RequestBody::CreateSku { sku, initial_units, units_per_buyer_max, opens_at_ms, operation } => {
                let (sku, operation) = (self.owned_sku(sku)?, operation_id(operation)?);
                let settings = SkuSettings { initial_units, units_per_buyer_max, opens_at_ms };
                stock_response(&sku, self.engine.create_sku(sku.clone(), settings, operation).await)
            }
            RequestBody::AddStock { sku, units, operation } => {
                let (sku, operation) = (self.owned_sku(sku)?, operation_id(operation)?);
                stock_response(&sku, self.engine.add_stock(&sku, units, operation).await)
            }
            RequestBody::RemoveStock { sku, units, operation } => {
                let (sku, operation) = (self.owned_sku(sku)?, operation_id(operation)?);
                stock_response(&sku, self.engine.remove_stock(&sku, units, operation).await)
            }
            RequestBody::SetBuyerLimit { sku, units_per_buyer_max, operation } => {
                let (sku, operation) = (self.owned_sku(sku)?, operation_id(operation)?);
                stock_response(&sku, self.engine.set_buyer_limit(&sku, units_per_buyer_max, operation).await)
            }
            RequestBody::OpenSale { sku, opens_at_ms, operation } => {
                let (sku, operation) = (self.owned_sku(sku)?, operation_id(operation)?);
                stock_response(&sku, self.engine.open_sale(&sku, opens_at_ms, operation).await)
            }
        }
    }

    /// A request in a replicated cluster: every partition's requests go to
    /// its group's leader (the group refuses `NotLeader` elsewhere).
    async fn dispatch_replicated(
        &self,
        replication: &Replication,
        role: Role,
        body: RequestBody,
    ) -> Result<Response, Refusal> {
        match body {
            RequestBody::PartitionMap => Ok(Response::PartitionMap(self.current_map())),
            RequestBody::NodeStatus => Ok(self.replicated_status(replication)),
            RequestBody::Reserve { order, buyer, lines, ttl_ms } => {
                let home_partition = self.partition_of(&order);
                let request = self.order_request(order, buyer, lines, ttl_ms)?;
                let answer = replication.order(ClientRequest::Reserve(request), home_partition).await?;
                client_response(home_partition, answer)
            }
            RequestBody::Commit { order, home_partition, fewer } => {
                let order = self.check_order_home(&order, home_partition)?;
                let fewer = engine_fewer(fewer)?;
                let answer = replication.order(ClientRequest::Commit { order, fewer }, home_partition).await?;
                client_response(home_partition, answer)
            }
            RequestBody::Release { order, home_partition } => {
                let order = self.check_order_home(&order, home_partition)?;
                let answer = replication.order(ClientRequest::Release { order }, home_partition).await?;
                client_response(home_partition, answer)
            }
            RequestBody::Availability { sku } => {
                let sku = sku_id(sku)?;
                let partition = self.partition_of(sku.as_str());
                let stock = replication.read(partition, sku.clone()).await?;
                Ok(Response::Stock { sku: sku.as_str().to_owned(), stock: wire_stock(stock) })
            }
            RequestBody::Part { .. } => {
                Err(invalid("request", "a replicated cluster carries part steps on its raft links".to_owned()))
            }
            RequestBody::OpenSession => Err(session_inside_session()),
            RequestBody::ReplicaProbe { boot } => match role {
                Role::Node(asker) => Ok(replication.probe_answer(asker, boot)),
                _ => Err(Refusal::Forbidden),
            },
            admin => {
                let (sku, request) = admin_request(admin)?;
                let partition = self.partition_of(sku.as_str());
                let stock = replication.admin(partition, request).await?;
                Ok(Response::Stock { sku: sku.as_str().to_owned(), stock: wire_stock(stock) })
            }
        }
    }

    /// This member's totals over the groups it leads, and its view of
    /// the others' (their counts are given by their leaders).
    fn replicated_status(&self, replication: &Replication) -> Response {
        let view = replication.view();
        let led = view.groups.iter().filter(|group| group.leading);
        let (mut skus, mut stock) = (0, WireStock::default());
        for group in led {
            skus += group.skus;
            stock.available += group.available;
            stock.held += group.held;
            stock.sold += group.sold;
        }
        Response::NodeStatus { node: self.id, skus, stock, sees_down: self.peers.down(), hottest_skus: Vec::new() }
    }

    /// The order id of a commit or release: the partition named must be
    /// the order id's (its home, wherever that is served).
    fn check_order_home(&self, order: &str, home_partition: u32) -> Result<OrderId, Refusal> {
        if home_partition != self.partition_of(order) {
            return Err(invalid(
                "home_partition",
                format!("order {order}'s home is partition {}", self.partition_of(order)),
            ));
        }
        order_id(order.to_owned())
    }

    /// The order id of a commit or release, once its home is known to be
    /// this member: the partition named must be the order id's.
    fn check_home(&self, order: &str, home_partition: u32) -> Result<OrderId, Refusal> {
        if home_partition != self.partition_of(order) {
            return Err(invalid(
                "home_partition",
                format!("order {order}'s home is partition {}", self.partition_of(order)),
            ));
        }
        let order = order_id(order.to_owned())?;
        self.check_owned(home_partition)?;
        Ok(order)
    }

    fn owned_sku(&self, sku: String) -> Result<SkuId, Refusal> {
        let sku = sku_id(sku)?;
        self.check_owned(self.partition_of(sku.as_str()))?;
        Ok(sku)
    }

    async fn reserve(
        &self,
        order: String,
        buyer: String,
        lines: Vec<WireLine>,
        ttl_ms: u64,
    ) -> Result<Response, Refusal> {
        let home_partition = self.partition_of(&order);
        // Bad input is refused as such wherever it arrives.
        let request = self.order_request(order, buyer, lines, ttl_ms)?;
        self.check_owned(home_partition)?;
        self.coordination.reserve(request, home_partition).await
    }

    /// A reserve's order, checked.
    fn order_request(
        &self,
        order: String,
        buyer: String,
        lines: Vec<WireLine>,
        ttl_ms: u64,
    ) -> Result<OrderRequest, Refusal> {
        let order = order_id(order)?;
        let buyer = BuyerId::new(buyer).map_err(|error| invalid("buyer", error.to_string()))?;
        if lines.len() > self.engine.config().limits.lines_per_order_max {
            let limit = self.engine.config().limits.lines_per_order_max;
            return Err(invalid("lines", format!("an order may have at most {limit} lines")));
        }
        let mut engine_lines = Vec::with_capacity(lines.len());
        for line in lines {
            engine_lines
                .push(Line { sku: sku_id(line.sku)?, quantity: crate::translate::engine_quantity(line.quantity) });
        }
        Ok(OrderRequest { order, buyer, lines: engine_lines, ttl_ms })
    }
}

/// `OpenSession` in a session's batch (or after a stream's first frame).
fn session_inside_session() -> Refusal {
    invalid("request", "a session opens on a stream of its own, not inside one".to_owned())
}

/// A commit's lines to sell fewer units of, checked.
fn engine_fewer(fewer: Vec<(String, u32)>) -> Result<Vec<(SkuId, u32)>, Refusal> {
    fewer.into_iter().map(|(sku, units)| Ok((sku_id(sku)?, units))).collect()
}

/// An admin request as a group's change, with the SKU it concerns.
fn admin_request(body: RequestBody) -> Result<(SkuId, AdminRequest), Refusal> {
    let change = |sku: String, operation: String, change: AdminChange| {
        let sku = sku_id(sku)?;
        Ok((sku.clone(), AdminRequest::Change { sku, operation: operation_id(operation)?, change }))
    };
    match body {
        RequestBody::CreateSku { sku, initial_units, units_per_buyer_max, opens_at_ms, operation } => {
            let sku = sku_id(sku)?;
            let settings = SkuSettings { initial_units, units_per_buyer_max, opens_at_ms };
            Ok((sku.clone(), AdminRequest::Create { sku, settings, operation: operation_id(operation)? }))
        }
        RequestBody::AddStock { sku, units, operation } => change(sku, operation, AdminChange::AddStock { units }),
        RequestBody::RemoveStock { sku, units, operation } => {
            change(sku, operation, AdminChange::RemoveStock { units })
        }
        RequestBody::SetBuyerLimit { sku, units_per_buyer_max, operation } => {
            change(sku, operation, AdminChange::SetBuyerLimit { units_per_buyer_max })
        }
        RequestBody::OpenSale { sku, opens_at_ms, operation } => {
            change(sku, operation, AdminChange::OpenSale { opens_at_ms })
        }
        other => Err(invalid("request", format!("{} is not an admin request", other.kind()))),
    }
}

/// Order ids beginning with this are the cluster's own (attempt ids of
/// coordinated orders, and parts of earlier versions); clients may not use
/// them.
pub const PART_ORDER_PREFIX: char = '~';

/// Ids that clients may use: the engine's rules, minus the prefix of the
/// cluster's own part ids and one byte of length that the prefix takes.
fn check_client_order_id(order: &str) -> Result<(), Refusal> {
    if order.starts_with(PART_ORDER_PREFIX) {
        return Err(invalid("order", format!("ids beginning with `{PART_ORDER_PREFIX}` are reserved for the cluster")));
    }
    let limit = flashstock_engine::ids::ID_BYTES_MAX - PART_ORDER_PREFIX.len_utf8();
    if order.len() > limit {
        return Err(invalid("order", format!("order id is {} bytes long; the limit is {limit}", order.len())));
    }
    Ok(())
}

fn order_id(order: String) -> Result<OrderId, Refusal> {
    OrderId::new(order).map_err(|error| invalid("order", error.to_string()))
}

fn operation_id(operation: String) -> Result<OperationId, Refusal> {
    OperationId::new(operation).map_err(|error| invalid("operation", error.to_string()))
}

/// The answer to a SKU-level request: the SKU's counts, or the refusal.
fn stock_response(sku: &SkuId, outcome: Result<StockSnapshot, EngineError>) -> Result<Response, Refusal> {
    let stock = outcome.map_err(engine_refusal)?;
    Ok(Response::Stock { sku: sku.as_str().to_owned(), stock: wire_stock(stock) })
}

pub(crate) fn settled_response(settlement: flashstock_engine::Settlement) -> Response {
    Response::Settled {
        order: settlement.order.as_str().to_owned(),
        lines: settlement.lines.iter().map(wire_line).collect(),
        replayed: settlement.replayed,
    }
}

/// QUIC transport settings, each raised or lowered from quinn's defaults
/// on purpose.
pub fn transport_config(network: &NetworkSection) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // One stream per request: the stream limit is the in-flight limit.
    transport.max_concurrent_bidi_streams(network.requests_per_connection_max.into());
    // Members send each other raft batches on unidirectional streams (one
    // per batch; only a member's connection has them read).
    transport.max_concurrent_uni_streams(64u8.into());
    // A stream carries one request frame: twice the largest frame is
    // enough window and bounds what one stream can make the node buffer.
    let frame_window = u32::try_from(2 * wire::FRAME_BYTES_MAX).expect("small");
    transport.stream_receive_window(frame_window.into());
    // The connection's window is what all its streams may have unread: a
    // typical request is under 256 bytes, so 8 MiB covers every stream in
    // flight at once without letting one client hold the node's memory.
    transport.receive_window((8u32 * 1024 * 1024).into());
    transport.send_window(8 * 1024 * 1024);
    let idle = Duration::from_millis(network.idle_timeout_ms);
    transport.max_idle_timeout(Some(idle.try_into().context("`network.idle_timeout_ms` too large")?));
    // Heartbeats: a connection to a live peer never idles out, and a dead
    // peer is noticed within the idle timeout.
    transport.keep_alive_interval(Some(idle / 3));
    Ok(transport)
}

/// The member's endpoint, bound to its address, with its certificate.
pub fn endpoint(file: &ClusterFile, id: u32) -> anyhow::Result<quinn::Endpoint> {
    let member = file.member(id)?;
    let tls_directory = &file.tls.as_ref().context("`tls` is missing")?.directory;
    let roots = tls::load_roots(tls_directory)
        .context("loading the CA (create development certificates with `flashstock-node dev-certs`)")?;
    let identity = tls::Identity::load(tls_directory, &format!("node-{id}"))?;
    let crypto = tls::server_crypto(roots.clone(), identity)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).context("TLS for QUIC")?;
    let transport = Arc::new(transport_config(&file.network)?);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport.clone());
    let address = member.address.parse().context("member address")?;
    let mut endpoint = quinn::Endpoint::server(server, address).with_context(|| format!("binding {address}"))?;
    // The same socket dials the other members, as this node.
    let identity = tls::Identity::load(tls_directory, &format!("node-{id}"))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_crypto(roots, identity)?)
        .context("TLS for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>) {
    let connections = Arc::new(Semaphore::new(node.network.connections_max));
    while let Some(incoming) = endpoint.accept().await {
        if node.stopping.load(std::sync::atomic::Ordering::Acquire) {
            incoming.refuse();
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            incoming.refuse();
            tracing::warn!("refused a connection: connections_max reached");
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(node, incoming).await {
                tracing::debug!(%error, "connection ended");
            }
            drop(permit);
        });
    }
}

async fn connection(node: Arc<Node>, incoming: quinn::Incoming) -> anyhow::Result<()> {
    let connection = incoming.await.context("handshake")?;
    let role = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|certificate| tls::role_of(certificate, &node.members)));
    let Some(role) = role else {
        connection.close(close_code::UNKNOWN_IDENTITY.into(), b"certificate names no known identity");
        anyhow::bail!("refused a peer whose certificate names no known identity");
    };
    let span = tracing::debug_span!("connection", peer = %connection.remote_address(), ?role);
    let _entered = span.enter();
    let (mut send, mut receive) = connection.accept_bi().await?;
    let hello: Hello = match wire::read_message(&mut receive).await {
        Ok(hello) => hello,
        Err(error) => {
            connection.close(close_code::BAD_HANDSHAKE.into(), b"expected a hello");
            anyhow::bail!("bad hello: {error}");
        }
    };
    if !hello.versions.contains(&PROTOCOL_VERSION) {
        let refused = Welcome::Refused { supported: vec![PROTOCOL_VERSION] };
        wire::write_message(&mut send, &refused).await?;
        send.finish()?;
        // Let the refusal arrive before the close that would discard it
        // (bounded: a peer that never acknowledges is closed anyway).
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        connection.close(close_code::NO_COMMON_VERSION.into(), b"no common protocol version");
        anyhow::bail!("no common version with {:?} ({})", hello.versions, hello.agent);
    }
    if let Role::Node(member) = role {
        node.peers.dialled_by(member, hello.boot);
    }
    let welcome = Welcome::Accepted { version: PROTOCOL_VERSION, node: node.id, map: node.current_map() };
    wire::write_message(&mut send, &welcome).await?;
    send.finish()?;
    drop(_entered);
    if let (Role::Node(member), Some(replication)) = (role, node.replication.clone()) {
        tokio::spawn(peer_batches(connection.clone(), member, replication));
    }
    loop {
        let (send, receive) = connection.accept_bi().await?;
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(error) = request(node, role, send, receive).await {
                tracing::debug!(%error, "request stream failed");
            }
        });
    }
}

/// Reads the raft frames member `from` sends on its connection: one
/// stream at a time in the normal case (a new one after a frame timed
/// out), each read in order by a task of its own.
async fn peer_batches(connection: quinn::Connection, from: u32, replication: Arc<Replication>) {
    while let Ok(stream) = connection.accept_uni().await {
        let replication = replication.clone();
        tokio::spawn(async move {
            crate::replication::read_peer_frames(stream, |frame| replication.deliver(from, frame)).await;
        });
    }
}

/// A stream of the peer's: one request and its answer, or a session.
async fn request(
    node: Arc<Node>,
    role: Role,
    mut send: quinn::SendStream,
    mut receive: quinn::RecvStream,
) -> anyhow::Result<()> {
    let response = match wire::read_message::<Request, _>(&mut receive).await {
        Ok(Request { body: RequestBody::OpenSession, .. }) => {
            return crate::session::serve(node, role, send, receive).await;
        }
        Ok(request) => answer(&node, role, request).await,
        Err(wire::StreamError::Codec(error)) => {
            crate::operations::record_request("undecodable", "invalid", Duration::ZERO);
            Response::Refused(invalid("request", error.to_string()))
        }
        Err(error) => return Err(error.into()),
    };
    wire::write_message(&mut send, &response).await?;
    send.finish()?;
    Ok(())
}

/// Answers one request on a stream of its own, within the time its caller
/// waits.
async fn answer(node: &Node, role: Role, request: Request) -> Response {
    let Some(_in_flight) = node.admit() else {
        return Response::Refused(Refusal::Unavailable { reason: format!("node {} is shutting down", node.id) });
    };
    let started = std::time::Instant::now();
    let kind = request.body.kind();
    let response = node.answer_in_time(role, request).await;
    crate::operations::record_answer(kind, &response, started.elapsed());
    response
}
