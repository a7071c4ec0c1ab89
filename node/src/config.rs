//! `cluster.toml`: parsing, validation, and translation into engine types.
//!
//! Unknown keys are rejected (a misspelt limit silently falling back to its
//! default is how a sale goes wrong), and validation names the key and the
//! reason when values contradict each other.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use flashstock_engine::log::segments::LogConfig;
use flashstock_engine::log::storage::FileStorage;
use flashstock_engine::log::writer::WriterConfig;
use flashstock_engine::{Durability, EngineConfig, Limits};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub limits: LimitsSection,
    pub sale: Option<SaleSection>,
    /// Where the member's log is kept; without it the engine keeps
    /// everything in memory.
    pub storage: Option<StorageSection>,
    /// The nodes of the cluster; without them only the in-process commands
    /// (`flash-sale`, `crash-load`) run.
    #[serde(default)]
    pub members: Vec<MemberSection>,
    /// Certificates of the cluster, needed once there are members.
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub network: NetworkSection,
}

/// One node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSection {
    /// Stable across restarts and address changes; names the node's
    /// certificate (`node-<id>`) and its place in partition ownership.
    pub id: u32,
    /// QUIC address (`host:port`) clients and other nodes connect to.
    pub address: String,
    /// The node's log and snapshots (locked while the node runs).
    pub data_directory: std::path::PathBuf,
    /// Plain-HTTP address (`host:port`) of the node's `/metrics`,
    /// `/health` and `/status`; none when absent.
    #[serde(default)]
    pub metrics_address: Option<String>,
}

/// Where the certificates live. `flashstock-node dev-certs` creates a
/// development set: a cluster CA, `node-<id>` for every member, `checkout`
/// and `admin` client identities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub directory: std::path::PathBuf,
}

/// Bounds of the QUIC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Connections a node keeps open at once; beyond this new ones are
    /// refused, so a crowd of clients cannot exhaust its memory.
    pub connections_max: usize,
    /// Requests (streams) in flight on one connection: QUIC's stream limit,
    /// so a client that sends more waits for credit instead of queueing on
    /// the node.
    pub requests_per_connection_max: u32,
    /// A connection with no traffic (heartbeats included) for this long is
    /// closed.
    pub idle_timeout_ms: u64,
    /// Longest wait a request may ask for; longer timeouts are cut to it.
    pub request_timeout_ms_max: u32,
    /// Orders one member coordinates at once: those homed on it (by the
    /// partition of their id) whose lines are not all its own, held, in
    /// progress, or settled and remembered for retries. When full, the
    /// oldest settled one is forgotten; when none is settled, a new order
    /// is refused `Busy`. Each is a few hundred bytes here and in the log.
    pub spanning_orders_max: usize,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            connections_max: 4_096,
            requests_per_connection_max: 1_024,
            idle_timeout_ms: 10_000,
            request_timeout_ms_max: 30_000,
            spanning_orders_max: 100_000,
        }
    }
}

/// Most members a cluster may have: rendezvous hashing costs one hash per
/// member per lookup.
const MEMBERS_MAX: usize = 256;
const CONNECTIONS_MAX: usize = 1_000_000;
const REQUESTS_PER_CONNECTION_MAX: u32 = 65_536;
/// Each spanning order costs memory here and a record in every snapshot
/// until it ends; ten million is beyond any sale's concurrent orders.
const SPANNING_ORDERS_MAX: usize = 10_000_000;

/// The durable log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Logs live below this directory (relative paths are relative to the
    /// working directory).
    pub data_directory: std::path::PathBuf,
    /// A log segment that reaches this size is closed and a new one begun.
    #[serde(default = "default_segment_bytes_max")]
    pub segment_bytes_max: u64,
    /// A partition's closed segments are folded into a snapshot (and
    /// removed) once they hold this many bytes: bounds disk use and the log
    /// a restart replays.
    #[serde(default = "default_snapshot_log_bytes")]
    pub snapshot_log_bytes: u64,
}

impl StorageSection {
    /// The default layout, with logs below `data_directory`.
    pub fn at(data_directory: &std::path::Path) -> Self {
        Self {
            data_directory: data_directory.to_path_buf(),
            segment_bytes_max: default_segment_bytes_max(),
            snapshot_log_bytes: default_snapshot_log_bytes(),
        }
    }

    /// How the engine keeps its log in `data_directory` on the real disk.
    pub fn durability(&self, data_directory: std::path::PathBuf) -> Durability {
        Durability {
            storage: Arc::new(FileStorage),
            data_directory,
            log: LogConfig { segment_bytes_max: self.segment_bytes_max, snapshot_log_bytes: self.snapshot_log_bytes },
            writer: WriterConfig::default(),
        }
    }
}

fn default_segment_bytes_max() -> u64 {
    64 * 1024 * 1024
}

fn default_snapshot_log_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Smallest segment `[storage]` accepts: smaller segments only multiply
/// files and directory syncs.
const SEGMENT_BYTES_MIN: u64 = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    pub partitions: u32,
    /// Members that hold each partition (raft, one leader at a time): 3
    /// survives the loss of any one member; 1 is a single copy, answered
    /// by the partition's rendezvous owner.
    #[serde(default = "single_copy")]
    pub replication_factor: u32,
    /// Replication groups the partitions are dealt into (partition `p` to
    /// group `p % groups + 1`); fixed for the life of a cluster, like the
    /// partition count. Default: two per member, so that leaders spread.
    #[serde(default)]
    pub replication_groups: Option<u32>,
}

fn single_copy() -> u32 {
    1
}

/// Most groups a cluster may have: each costs a raft replica (its
/// heartbeats, its share of the log) on every member that holds it.
const REPLICATION_GROUPS_MAX: u32 = 256;

impl ClusterSection {
    /// Whether partitions are replicated (a raft group per share of them).
    pub fn replicated(&self) -> bool {
        self.replication_factor > 1
    }

    /// The number of replication groups of a cluster of `members`.
    pub fn group_count(&self, members: usize) -> u32 {
        let default = u32::try_from(members.max(1) * 2).unwrap_or(REPLICATION_GROUPS_MAX);
        self.replication_groups.unwrap_or(default).min(self.partitions)
    }
}

/// Mirrors `EngineConfig` minus the limits; missing keys keep the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    pub in_flight_per_sku_max: usize,
    pub in_flight_per_partition_max: usize,
    pub batch_max: usize,
    pub actor_idle_ms: u64,
    pub orders_per_partition_max: usize,
    pub busy_retry_after_ms: u64,
}

impl Default for EngineSection {
    fn default() -> Self {
        let defaults = EngineConfig::default();
        Self {
            in_flight_per_sku_max: defaults.in_flight_per_sku_max,
            in_flight_per_partition_max: defaults.in_flight_per_partition_max,
            batch_max: defaults.batch_max,
            actor_idle_ms: defaults.actor_idle_ms,
            orders_per_partition_max: defaults.orders_per_partition_max,
            busy_retry_after_ms: defaults.busy_retry_after_ms,
        }
    }
}

/// Mirrors `Limits`; missing keys keep the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub line_units_max: u32,
    pub hold_ttl_ms_min: u64,
    pub hold_ttl_ms_max: u64,
    pub holds_per_sku_max: usize,
    pub finished_per_sku_max: usize,
    pub idempotency_window_ms: u64,
    pub stock_units_max: u64,
    pub lines_per_order_max: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let defaults = Limits::default();
        Self {
            line_units_max: defaults.line_units_max,
            hold_ttl_ms_min: defaults.hold_ttl_ms_min,
            hold_ttl_ms_max: defaults.hold_ttl_ms_max,
            holds_per_sku_max: defaults.holds_per_sku_max,
            finished_per_sku_max: defaults.finished_per_sku_max,
            idempotency_window_ms: defaults.idempotency_window_ms,
            stock_units_max: defaults.stock_units_max,
            lines_per_order_max: defaults.lines_per_order_max,
        }
    }
}

/// The simulated sale.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleSection {
    pub hot_skus: u32,
    pub hot_units: u64,
    pub cold_skus: u32,
    pub cold_units: u64,
    pub hot_demand_percent: u32,
    pub zipf_exponent: f64,
    pub buyers: u64,
    pub concurrency: usize,
    pub units_per_buyer_max: u32,
    pub pay_percent: u32,
    pub cancel_percent: u32,
    pub hold_ttl_ms: u64,
    pub seed: u64,
    /// The sale opens this long after its SKUs are created. Buyers are
    /// already there: the first of them are refused `NotOpen`, wait for
    /// the opening and all come at once, as at a real flash sale's start.
    #[serde(default = "default_opens_after_ms")]
    pub opens_after_ms: u64,
}

fn default_opens_after_ms() -> u64 {
    1_000
}

/// Longest wait for the opening: the demo should start buying soon.
const SALE_OPENS_AFTER_MS_MAX: u64 = 60_000;

/// Longest cluster name: it appears in every log line and metric label.
const CLUSTER_NAME_BYTES_MAX: usize = 64;
/// Most buyer tasks the demo runs at once: each is a tokio task with a small
/// latency buffer; more than this only measures the scheduler.
const SALE_CONCURRENCY_MAX: usize = 65_536;
/// Most SKUs the demo creates: creation is up front and kept in memory.
const SALE_SKUS_MAX: u32 = 1_000_000;

impl ClusterFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("loading {}", path.display()))
    }

    /// Parses and validates the text of a `cluster.toml`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: ClusterFile = toml::from_str(text)?;
        let engine = file.engine_config()?;
        if let Some(sale) = &file.sale {
            sale.validate(&engine)?;
        }
        file.validate_members()?;
        file.validate_replication()?;
        if let Some(storage) = &file.storage {
            if storage.segment_bytes_max < SEGMENT_BYTES_MIN {
                bail!("`storage.segment_bytes_max`: at least {SEGMENT_BYTES_MIN} bytes");
            }
            if storage.snapshot_log_bytes < storage.segment_bytes_max {
                bail!("`storage.snapshot_log_bytes`: at least `segment_bytes_max` (snapshots cover whole segments)");
            }
        }
        Ok(file)
    }

    fn validate_replication(&self) -> anyhow::Result<()> {
        let cluster = &self.cluster;
        let factor = cluster.replication_factor;
        if factor == 0 {
            bail!("`cluster.replication_factor`: at least 1 (1 is a single copy)");
        }
        if factor > 1 {
            if factor.is_multiple_of(2) {
                bail!("`cluster.replication_factor`: {factor} is even; an even count tolerates no more failures than the odd one below it");
            }
            if factor as usize > self.members.len() {
                bail!(
                    "`cluster.replication_factor`: {factor} copies need at least {factor} `members` ({} given)",
                    self.members.len()
                );
            }
        }
        if let Some(groups) = cluster.replication_groups {
            if groups == 0 || groups > REPLICATION_GROUPS_MAX || groups > cluster.partitions {
                bail!("`cluster.replication_groups`: between 1 and {REPLICATION_GROUPS_MAX}, and at most `cluster.partitions`");
            }
        }
        Ok(())
    }

    fn validate_members(&self) -> anyhow::Result<()> {
        if self.members.len() > MEMBERS_MAX {
            bail!("`members`: at most {MEMBERS_MAX}");
        }
        for (index, member) in self.members.iter().enumerate() {
            let earlier = &self.members[..index];
            if earlier.iter().any(|other| other.id == member.id) {
                bail!("`members[{index}].id`: {} is used twice", member.id);
            }
            if earlier.iter().any(|other| other.address == member.address) {
                bail!("`members[{index}].address`: {} is used twice", member.address);
            }
            if earlier.iter().any(|other| other.data_directory == member.data_directory) {
                bail!("`members[{index}].data_directory`: shared with another member (each node locks its own)");
            }
            if member.address.parse::<std::net::SocketAddr>().is_err() {
                bail!("`members[{index}].address`: `{}` is not an IP address with a port", member.address);
            }
            if let Some(metrics_address) = &member.metrics_address {
                if metrics_address.parse::<std::net::SocketAddr>().is_err() {
                    bail!("`members[{index}].metrics_address`: `{metrics_address}` is not an IP address with a port");
                }
                if earlier.iter().any(|other| other.metrics_address.as_ref() == Some(metrics_address)) {
                    bail!("`members[{index}].metrics_address`: {metrics_address} is used twice");
                }
            }
        }
        if !self.members.is_empty() && self.tls.is_none() {
            bail!("`tls`: a cluster with members needs its certificates (`[tls] directory = ...`)");
        }
        let network = &self.network;
        if network.connections_max == 0 || network.connections_max > CONNECTIONS_MAX {
            bail!("`network.connections_max`: between 1 and {CONNECTIONS_MAX}");
        }
        if network.requests_per_connection_max == 0 || network.requests_per_connection_max > REQUESTS_PER_CONNECTION_MAX
        {
            bail!("`network.requests_per_connection_max`: between 1 and {REQUESTS_PER_CONNECTION_MAX}");
        }
        if network.idle_timeout_ms < 100 {
            bail!("`network.idle_timeout_ms`: at least 100 (heartbeats go every third of it)");
        }
        if network.request_timeout_ms_max == 0 {
            bail!("`network.request_timeout_ms_max`: at least 1");
        }
        if network.spanning_orders_max == 0 || network.spanning_orders_max > SPANNING_ORDERS_MAX {
            bail!("`network.spanning_orders_max`: between 1 and {SPANNING_ORDERS_MAX}");
        }
        Ok(())
    }

    /// The member with `id`, or an error naming the ids there are.
    pub fn member(&self, id: u32) -> anyhow::Result<&MemberSection> {
        self.members.iter().find(|member| member.id == id).with_context(|| {
            let ids: Vec<u32> = self.members.iter().map(|member| member.id).collect();
            format!("no member with id {id} in `members` (ids: {ids:?})")
        })
    }

    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let (engine, limits) = (&self.engine, &self.limits);
        let config = EngineConfig {
            limits: Limits {
                line_units_max: limits.line_units_max,
                hold_ttl_ms_min: limits.hold_ttl_ms_min,
                hold_ttl_ms_max: limits.hold_ttl_ms_max,
                holds_per_sku_max: limits.holds_per_sku_max,
                finished_per_sku_max: limits.finished_per_sku_max,
                idempotency_window_ms: limits.idempotency_window_ms,
                stock_units_max: limits.stock_units_max,
                lines_per_order_max: limits.lines_per_order_max,
            },
            partition_count: self.cluster.partitions,
            in_flight_per_sku_max: engine.in_flight_per_sku_max,
            in_flight_per_partition_max: engine.in_flight_per_partition_max,
            batch_max: engine.batch_max,
            actor_idle_ms: engine.actor_idle_ms,
            orders_per_partition_max: engine.orders_per_partition_max,
            busy_retry_after_ms: engine.busy_retry_after_ms,
        };
        if self.cluster.name.is_empty() || self.cluster.name.len() > CLUSTER_NAME_BYTES_MAX {
            bail!("`cluster.name`: must be 1 to {CLUSTER_NAME_BYTES_MAX} bytes");
        }
        let section = if Limits::validate(&config.limits).is_err() { "limits" } else { "engine" };
        config.validate().map_err(|error| {
            let key = if error.field == "partition_count" {
                "cluster.partitions".to_owned()
            } else {
                format!("{section}.{}", error.field)
            };
            anyhow::anyhow!("`{key}`: {}", error.reason)
        })?;
        Ok(config)
    }
}

impl SaleSection {
    fn validate(&self, engine: &EngineConfig) -> anyhow::Result<()> {
        let limits = &engine.limits;
        if self.hot_skus == 0 && self.cold_skus == 0 {
            bail!("`sale.hot_skus` and `sale.cold_skus`: the sale needs at least one SKU");
        }
        if self.hot_skus.saturating_add(self.cold_skus) > SALE_SKUS_MAX {
            bail!("`sale.cold_skus`: at most {SALE_SKUS_MAX} SKUs in a simulated sale");
        }
        if self.hot_units > limits.stock_units_max || self.cold_units > limits.stock_units_max {
            bail!("`sale.hot_units` / `sale.cold_units`: above `limits.stock_units_max`");
        }
        if self.hot_demand_percent > 100 {
            bail!("`sale.hot_demand_percent`: a percentage is at most 100");
        }
        if self.hot_skus == 0 && self.hot_demand_percent > 0 || self.cold_skus == 0 && self.hot_demand_percent < 100 {
            bail!("`sale.hot_demand_percent`: demand goes to a kind of SKU the sale does not have");
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent > 0.0 && self.zipf_exponent <= 10.0) {
            bail!("`sale.zipf_exponent`: must be in (0, 10]");
        }
        if self.concurrency == 0 || self.concurrency > SALE_CONCURRENCY_MAX {
            bail!("`sale.concurrency`: must be between 1 and {SALE_CONCURRENCY_MAX}");
        }
        if self.units_per_buyer_max == 0 || self.units_per_buyer_max > limits.line_units_max {
            bail!("`sale.units_per_buyer_max`: must be between 1 and `limits.line_units_max`");
        }
        // Saturating: two percentages near u32::MAX would otherwise wrap to
        // a small sum (or panic in a debug build).
        if self.pay_percent.saturating_add(self.cancel_percent) > 100 {
            bail!("`sale.pay_percent` + `sale.cancel_percent`: more than 100");
        }
        if self.opens_after_ms > SALE_OPENS_AFTER_MS_MAX {
            bail!("`sale.opens_after_ms`: at most {SALE_OPENS_AFTER_MS_MAX}");
        }
        if !(limits.hold_ttl_ms_min..=limits.hold_ttl_ms_max).contains(&self.hold_ttl_ms) {
            bail!("`sale.hold_ttl_ms`: outside [`limits.hold_ttl_ms_min`, `limits.hold_ttl_ms_max`]");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ClusterFile> {
        ClusterFile::parse(text)
    }

    #[test]
    fn the_shipped_cluster_toml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
        let file = ClusterFile::load(&path).expect("cluster.toml loads");
        assert!(file.sale.is_some());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let error = parse("[cluster]\nname = \"x\"\npartitions = 4\n[limits]\nhold_ttl_max_ms = 5\n")
            .expect_err("misspelt key");
        assert!(format!("{error:#}").contains("hold_ttl_max_ms"), "{error:#}");
    }

    #[test]
    fn members_are_checked() {
        let member = |id: u32, port: u16| {
            format!("[[members]]\nid = {id}\naddress = \"127.0.0.1:{port}\"\ndata_directory = \"data/{id}\"\n")
        };
        let base = "[cluster]\nname = \"x\"\npartitions = 4\n[tls]\ndirectory = \"certs\"\n";
        let file = parse(&format!("{base}{}{}", member(1, 7001), member(2, 7002))).expect("valid");
        assert_eq!(file.member(2).expect("present").address, "127.0.0.1:7002");
        assert!(format!("{:#}", file.member(9).expect_err("absent")).contains("ids: [1, 2]"));
        let error = parse(&format!("{base}{}{}", member(1, 7001), member(1, 7002))).expect_err("same id");
        assert!(format!("{error:#}").contains("members[1].id"), "{error:#}");
        let error = parse(&format!("{base}{}{}", member(1, 7001), member(2, 7001))).expect_err("same address");
        assert!(format!("{error:#}").contains("members[1].address"), "{error:#}");
        let no_tls = format!("[cluster]\nname = \"x\"\npartitions = 4\n{}", member(1, 7001));
        assert!(format!("{:#}", parse(&no_tls).expect_err("no tls")).contains("`tls`"));
        let bad = format!("{base}{}", member(1, 7001).replace("127.0.0.1:7001", "localhost"));
        assert!(format!("{:#}", parse(&bad).expect_err("no port")).contains("members[0].address"));
    }

    #[test]
    fn percentages_whose_sum_overflows_are_refused() {
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml"))
            .expect("cluster.toml reads");
        let text = shipped
            .replace("pay_percent = 80", "pay_percent = 4294967295")
            .replace("cancel_percent = 10", "cancel_percent = 2");
        assert_ne!(text, shipped, "the shipped file sets both percentages");
        let error = parse(&text).expect_err("a sum beyond 100");
        assert!(format!("{error:#}").contains("sale.pay_percent"), "{error:#}");
    }

    #[test]
    fn contradictions_name_the_key() {
        let error = parse("[cluster]\nname = \"x\"\npartitions = 0\n").expect_err("no partitions");
        assert!(format!("{error:#}").contains("cluster.partitions"), "{error:#}");
        let error =
            parse("[cluster]\nname = \"x\"\npartitions = 4\n[limits]\nhold_ttl_ms_min = 10\nhold_ttl_ms_max = 5\n")
                .expect_err("inverted ttl bounds");
        assert!(format!("{error:#}").contains("limits.hold_ttl_ms_max"), "{error:#}");
    }
}
