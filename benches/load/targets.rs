//! What the load runs against: this cluster through the client crate, or
//! Redis with Lua scripts that do the same job.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use flashstock_client::{Client, Error, Order, OrderLine, Quantity, ReservationId};

/// How a reserve ended.
#[derive(Debug)]
pub enum Reserved<Token> {
    Held(Token),
    SoldOut,
}

/// One system under test.
pub trait Target: Send + Sync + 'static {
    type Token: Send;
    fn name(&self) -> &str;
    fn create(&self, sku: &str, units: u64) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
    /// Holds `units` of each SKU in `skus` for `order` (one line per SKU).
    fn reserve(
        &self,
        order: &str,
        skus: &[&str],
        units: u32,
    ) -> impl std::future::Future<Output = anyhow::Result<Reserved<Self::Token>>> + Send;
    fn commit(&self, token: Self::Token) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// How long holds live in every target: longer than any run.
const HOLD_TTL_MS: u64 = 120_000;

/// The cluster, through the client crate (checkout identity for buying,
/// admin for creating SKUs).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `flashstock`, or `flashstock-replicated` for three copies.
    pub name: String,
    pub admin: Client,
    pub checkout: Client,
}

impl Target for Cluster {
    type Token = ReservationId;

    fn name(&self) -> &str {
        &self.name
    }

    async fn create(&self, sku: &str, units: u64) -> anyhow::Result<()> {
        self.admin.create_sku(sku, units, None, 0).await?;
        Ok(())
    }

    async fn reserve(&self, order: &str, skus: &[&str], units: u32) -> anyhow::Result<Reserved<ReservationId>> {
        let order = Order {
            id: order.to_owned(),
            buyer: format!("buyer-{order}"),
            lines: skus
                .iter()
                .map(|sku| OrderLine { sku: (*sku).to_owned(), quantity: Quantity::Exactly(units) })
                .collect(),
            hold_ttl: Duration::from_millis(HOLD_TTL_MS),
        };
        match self.checkout.reserve(&order).await {
            Ok(held) => Ok(Reserved::Held(held.id)),
            Err(Error::SoldOut { .. }) => Ok(Reserved::SoldOut),
            Err(other) => Err(other.into()),
        }
    }

    async fn commit(&self, token: ReservationId) -> anyhow::Result<()> {
        self.checkout.commit(&token).await?;
        Ok(())
    }
}

/// Reserve: the same job as the engine's, for one line. Idempotent on the
/// order id (a retry returns the first answer), checks and takes stock,
/// and writes a hold record with its expiry, indexed by expiry for the
/// sweeper that would give expired holds back.
/// KEYS: stock, hold, holds-by-expiry. ARGV: order, units, ttl_ms.
/// Returns {1, units} held, {0, available} sold out.
const RESERVE_SCRIPT: &str = r"
local existing = redis.call('HGET', KEYS[2], 'units')
if existing then return {1, tonumber(existing)} end
local units = tonumber(ARGV[2])
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
if available < units then return {0, available} end
redis.call('DECRBY', KEYS[1], units)
local now = redis.call('TIME')
local expires_at_ms = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], 'units', units, 'expires_at_ms', expires_at_ms, 'state', 'held')
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
redis.call('ZADD', KEYS[3], expires_at_ms, ARGV[1])
return {1, units}
";

/// Commit: idempotent; sells the held units unless the hold expired.
/// KEYS: hold, holds-by-expiry, sold. ARGV: order.
/// Returns 1 sold (or sold before), 0 unknown or expired.
const COMMIT_SCRIPT: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'sold' then return 1 end
if not state then return 0 end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
if tonumber(redis.call('HGET', KEYS[1], 'expires_at_ms')) <= now_ms then return 0 end
redis.call('HSET', KEYS[1], 'state', 'sold')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('INCRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[1], 'units')))
return 1
";

/// A Redis server started for the run, with its own data directory, and a
/// multiplexed connection: concurrent calls are pipelined on it, as many
/// as the load has in flight.
pub struct Redis {
    name: String,
    connection: redis::aio::MultiplexedConnection,
    reserve: redis::Script,
    commit: redis::Script,
    server: std::process::Child,
    directory: PathBuf,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Redis").field("name", &self.name).finish()
    }
}

impl Redis {
    /// Starts `redis-server` on `port` with AOF on and `appendfsync` set to
    /// `fsync` (`always` or `everysec`), in a fresh `directory`.
    pub async fn start(fsync: &str, port: u16, directory: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(directory);
        std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
        let server = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(directory)
            .args(["--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--daemonize", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (Debian: `apt-get install redis-server`)")?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut last_error = None;
        for _ in 0..100 {
            match client.get_multiplexed_async_connection().await {
                Ok(mut connection) => {
                    let pong: String = redis::cmd("PING").query_async(&mut connection).await?;
                    if pong != "PONG" {
                        bail!("redis answered {pong} to PING");
                    }
                    return Ok(Self {
                        name: format!("redis {fsync}"),
                        connection,
                        reserve: redis::Script::new(RESERVE_SCRIPT),
                        commit: redis::Script::new(COMMIT_SCRIPT),
                        server,
                        directory: directory.to_path_buf(),
                    });
                }
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer on port {port}: {last_error:?}")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

impl Target for Redis {
    type Token = (String, String);

    fn name(&self) -> &str {
        &self.name
    }

    async fn create(&self, sku: &str, units: u64) -> anyhow::Result<()> {
        let mut connection = self.connection.clone();
        let _: () = redis::cmd("SET").arg(format!("stock:{sku}")).arg(units).query_async(&mut connection).await?;
        Ok(())
    }

    async fn reserve(&self, order: &str, skus: &[&str], units: u32) -> anyhow::Result<Reserved<(String, String)>> {
        let [sku] = skus else { bail!("the Redis scripts hold one line per order") };
        let mut connection = self.connection.clone();
        let (held, _units): (i64, i64) = self
            .reserve
            .key(format!("stock:{sku}"))
            .key(format!("hold:{order}"))
            .key(format!("holds:{sku}"))
            .arg(order)
            .arg(units)
            .arg(HOLD_TTL_MS)
            .invoke_async(&mut connection)
            .await?;
        Ok(if held == 1 { Reserved::Held(((*sku).to_owned(), order.to_owned())) } else { Reserved::SoldOut })
    }

    async fn commit(&self, (sku, order): (String, String)) -> anyhow::Result<()> {
        let mut connection = self.connection.clone();
        let sold: i64 = self
            .commit
            .key(format!("hold:{order}"))
            .key(format!("holds:{sku}"))
            .key(format!("sold:{sku}"))
            .arg(&order)
            .invoke_async(&mut connection)
            .await?;
        if sold != 1 {
            bail!("redis refused the commit of {order}");
        }
        Ok(())
    }
}
