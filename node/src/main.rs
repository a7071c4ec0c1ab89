//! `flashstock-node`: runs the inventory engine from `cluster.toml`: a
//! member (`serve`), a local cluster (`cluster`), the simulated flash sale
//! of the README (`flash-sale`), development certificates (`dev-certs`),
//! operator commands (`admin ...`) and checks (`check-config`).
//!
//! Logs go to stderr through `tracing`: `RUST_LOG` filters them (default
//! `warn`, `info` for `serve`), `--log-format json` writes one JSON object
//! per line for log shippers.

/// mimalloc instead of glibc's malloc: allocation was a fifth of a loaded
/// member's CPU (README, "Replication: performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashstock_engine::{Engine, SystemClock};
use flashstock_node::local_cluster::LocalCluster;
use flashstock_node::{config, sale};

#[derive(Debug, Parser)]
#[command(name = "flashstock-node", version, about = "Flash-sale inventory engine node")]
struct Arguments {
    /// `text` for people (colours on a terminal), `json` for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the simulated flash sale of `[sale]` and checks the books. With
    /// `[[members]]` it starts the local cluster (from empty data
    /// directories), sells through the client crate over QUIC, and stops
    /// the cluster at the end.
    FlashSale {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Overrides `sale.buyers`.
        #[arg(long)]
        buyers: Option<u64>,
        /// Runs the sale on one engine in this process, even with members.
        #[arg(long)]
        in_process: bool,
        /// Leaves the cluster running after the sale, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Runs a reserve-and-commit load on a durable engine in `--data` until
    /// killed (at most 30 s), appending each acknowledged commit's order id
    /// to `--acknowledged`. For crash tests.
    CrashLoad {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        acknowledged: PathBuf,
    },
    /// Loads and validates a configuration file, then exits.
    CheckConfig {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Creates a development CA and certificates for every member and for
    /// the `checkout` and `admin` clients in `[tls] directory`, unless they
    /// are all there already.
    DevCerts {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Starts every member of `[[members]]` on this machine (creating
    /// development certificates if there are none) and keeps them running
    /// until SIGINT or SIGTERM, which it passes on. For development.
    Cluster {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Operator commands against a running cluster, as the `admin`
    /// identity of `[tls] directory`.
    Admin {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// The change's operation id: the cluster applies an operation once,
        /// so running the same command again with the same id (after a
        /// timeout, say) answers the first result instead of changing the
        /// stock twice. Default: a fresh id. `create-skus` adds `-<line>`.
        #[arg(long)]
        operation_id: Option<String>,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Runs member `--id` of the cluster until SIGINT or SIGTERM: recovers
    /// its log, then serves its partitions over QUIC.
    Serve {
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        #[arg(long)]
        id: u32,
    },
}

#[derive(Debug, Subcommand)]
enum AdminAction {
    /// Creates one SKU.
    CreateSku {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        units: u64,
        /// Units one buyer may hold or buy.
        #[arg(long)]
        buyer_limit: Option<u32>,
        /// When the sale opens (cluster milliseconds since the epoch; 0: now).
        #[arg(long, default_value_t = 0)]
        opens_at_ms: u64,
    },
    /// Creates the SKUs of a CSV file: `sku,units[,buyer_limit[,opens_at_ms]]`
    /// per line (a header line starting with `sku` is skipped).
    CreateSkus {
        #[arg(long)]
        file: PathBuf,
    },
    AddStock {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        units: u64,
    },
    RemoveStock {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        units: u64,
    },
    /// Sets the per-buyer limit (without `--units`, lifts it).
    SetBuyerLimit {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        units: Option<u32>,
    },
    OpenSale {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        at_ms: u64,
    },
    /// Available, held and sold units of a SKU.
    Availability {
        #[arg(long)]
        sku: String,
    },
    /// Members, whether each is up, and the partitions each owns.
    Status,
}

fn main() -> anyhow::Result<()> {
    // An assertion that fails is a bug that may have corrupted stock: stop the
    // whole process rather than let other actors keep answering.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let arguments = Arguments::parse();
    // A member reports what it recovers and its peers' comings and goings.
    let default_level = if matches!(arguments.command, Command::Serve { .. }) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match arguments.log_format {
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            logs.with_ansi(std::io::stderr().is_terminal()).init();
        }
    }

    match arguments.command {
        Command::CheckConfig { config } => {
            let file = config::ClusterFile::load(&config)?;
            println!(
                "{}: valid (cluster `{}`, {} partitions)",
                config.display(),
                file.cluster.name,
                file.cluster.partitions
            );
            Ok(())
        }
        Command::DevCerts { config } => {
            let file = config::ClusterFile::load(&config)?;
            let tls = file.tls.as_ref().with_context(|| format!("{} has no [tls] section", config.display()))?;
            let members: Vec<u32> = file.members.iter().map(|member| member.id).collect();
            if flashstock_node::tls::create_development_certificates(&tls.directory, &members)? {
                println!("development certificates written to {}", tls.directory.display());
            } else {
                println!("{} already holds every certificate", tls.directory.display());
            }
            Ok(())
        }
        Command::Cluster { config } => {
            let file = config::ClusterFile::load(&config)?;
            anyhow::ensure!(!file.members.is_empty(), "{} has no [[members]]", config.display());
            let tls = file.tls.as_ref().with_context(|| format!("{} has no [tls] section", config.display()))?;
            let members: Vec<u32> = file.members.iter().map(|member| member.id).collect();
            if flashstock_node::tls::create_development_certificates(&tls.directory, &members)? {
                println!("development certificates written to {}", tls.directory.display());
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut cluster = LocalCluster::start(&config, &members, false).await?;
                println!("cluster of {} members running; Ctrl-C stops it", members.len());
                let mut signal = ShutdownSignal::install()?;
                let died = tokio::select! {
                    () = signal.received() => None,
                    died = cluster.first_exit() => Some(died),
                };
                cluster.stop().await;
                match died {
                    None => Ok(()),
                    Some((id, status)) => {
                        anyhow::bail!("member {id} stopped on its own ({status}); the cluster was stopped")
                    }
                }
            })
        }
        Command::Admin { config, operation_id, action } => {
            let file = config::ClusterFile::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(admin(&file, operation_id, action))
        }
        Command::Serve { config, id } => {
            let file = config::ClusterFile::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(file, id))
        }
        Command::CrashLoad { config, data, acknowledged } => {
            let file = config::ClusterFile::load(&config)?;
            let engine_config = file.engine_config()?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                // The log's layout comes from `[storage]` when there is one;
                // the directory is always the one given.
                let durability =
                    file.storage.clone().unwrap_or_else(|| config::StorageSection::at(&data)).durability(data);
                let (engine, report) = Engine::open(engine_config, Arc::new(SystemClock), durability)?;
                let base = if report.from_snapshot { "a snapshot" } else { "nothing" };
                eprintln!(
                    "recovered {base} + {} records: {} SKUs, {} orders",
                    report.records, report.skus, report.orders
                );
                let outcome = flashstock_node::crash_load::run(engine.clone(), acknowledged).await;
                engine.shutdown().await;
                outcome
            })
        }
        Command::FlashSale { config, buyers, in_process, keep_running } => {
            let file = config::ClusterFile::load(&config)?;
            let mut sale = file.sale.clone().with_context(|| format!("{} has no [sale] section", config.display()))?;
            if let Some(buyers) = buyers {
                sale.buyers = buyers;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            if in_process || file.members.is_empty() {
                runtime.block_on(sale_in_process(&file, sale))
            } else {
                runtime.block_on(sale_on_cluster(&config, &file, sale, keep_running))
            }
        }
    }
}

async fn sale_in_process(file: &config::ClusterFile, sale: config::SaleSection) -> anyhow::Result<()> {
    let engine_config = file.engine_config()?;
    let engine = match &file.storage {
        None => Engine::new(engine_config, Arc::new(SystemClock))?,
        Some(storage) => {
            // The simulated sale owns this directory and starts it empty.
            let data_directory = storage.data_directory.join("simulated-sale");
            if data_directory.exists() {
                std::fs::remove_dir_all(&data_directory)
                    .with_context(|| format!("emptying {}", data_directory.display()))?;
            }
            println!("durable: logs in {}", data_directory.display());
            Engine::open(engine_config, Arc::new(SystemClock), storage.durability(data_directory))?.0
        }
    };
    println!("in process: one engine, no network");
    let outcome = sale::run(Arc::new(engine.clone()), &file.cluster.name, sale).await;
    engine.shutdown().await;
    outcome
}

/// The demo: a fresh local cluster, the sale through the client crate, the
/// books read back from the cluster, a clean stop.
async fn sale_on_cluster(
    config_path: &std::path::Path,
    file: &config::ClusterFile,
    sale: config::SaleSection,
    keep_running: bool,
) -> anyhow::Result<()> {
    let tls = file.tls.as_ref().context("a cluster needs [tls]")?;
    let members: Vec<u32> = file.members.iter().map(|member| member.id).collect();
    if flashstock_node::tls::create_development_certificates(&tls.directory, &members)? {
        println!("development certificates written to {}", tls.directory.display());
    }
    // The demo owns the members' data and starts it empty.
    for member in &file.members {
        if member.data_directory.exists() {
            std::fs::remove_dir_all(&member.data_directory)
                .with_context(|| format!("emptying {}", member.data_directory.display()))?;
        }
    }
    let mut cluster = LocalCluster::start(config_path, &members, true).await?;
    println!("cluster: {} members on {}", members.len(), addresses(file));
    let metrics: Vec<String> = file
        .members
        .iter()
        .filter_map(|member| Some(format!("http://{}/metrics", member.metrics_address.as_ref()?)))
        .collect();
    if !metrics.is_empty() {
        println!("metrics while it runs: curl {}", metrics.join(" "));
    }
    let outcome = async {
        let connect = |identity: &str| {
            let mut builder = flashstock_client::Client::builder()
                .tls_directory(&tls.directory, identity)
                .in_flight_max(sale.concurrency.max(1))
                .agent(format!("flash-sale-{identity}"));
            for member in &file.members {
                if let Ok(address) = member.address.parse() {
                    builder = builder.seed(address);
                }
            }
            builder.connect()
        };
        let shop =
            flashstock_node::shop::ClusterShop { admin: connect("admin").await?, checkout: connect("checkout").await? };
        // Orders spanning members need the members' links to each other:
        // the sale opens once every member sees every other up (or after 10 s).
        if !flashstock_node::local_cluster::wait_until_linked(&shop.admin, std::time::Duration::from_secs(10)).await {
            println!("some members do not see each other yet (or a group has no leader); the first orders may wait");
        }
        let spread_timeout = std::time::Duration::from_secs(10);
        if !flashstock_node::local_cluster::wait_until_leaders_spread(&shop.admin, &members, spread_timeout).await {
            println!("the groups' leaders are not yet on their preferred members; they move during the sale");
        }
        if let Ok(status) = shop.admin.cluster_status().await {
            if !status.groups.is_empty() {
                let leaders: Vec<String> = status
                    .groups
                    .iter()
                    .map(|group| match group.leader {
                        Some(leader) => format!("group {} on node {leader}", group.group),
                        None => format!("group {} electing", group.group),
                    })
                    .collect();
                println!(
                    "replicated: every partition on {} members, in {} raft groups; leaders: {}",
                    status.replication_factor,
                    status.groups.len(),
                    leaders.join(", ")
                );
            }
        }
        sale::run(Arc::new(shop), &file.cluster.name, sale).await
    }
    .await;
    if keep_running && outcome.is_ok() {
        println!(
            "the cluster keeps running; connect with the client crate (seeds {}, certificates in {}); Ctrl-C stops it",
            addresses(file),
            tls.directory.display()
        );
        ShutdownSignal::install()?.received().await;
    }
    cluster.stop().await;
    outcome
}

fn addresses(file: &config::ClusterFile) -> String {
    file.members.iter().map(|member| member.address.as_str()).collect::<Vec<_>>().join(", ")
}

/// One member: recover, serve until asked to stop, then stop in order (no
/// new connections, requests in flight answered or refused, the log made
/// durable and the directory released) and exit 0.
async fn serve(file: config::ClusterFile, id: u32) -> anyhow::Result<()> {
    let mut signal = ShutdownSignal::install()?;
    let member = file.member(id)?.clone();
    let storage = file.storage.clone().unwrap_or_else(|| config::StorageSection::at(&member.data_directory));
    let durability = storage.durability(member.data_directory.clone());
    // The operations endpoint answers from the start: `/health` says
    // `recovering` until the member serves.
    let operations = flashstock_node::operations::Operations::install()?;
    if let Some(address) = &member.metrics_address {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics address {address}"))?;
        tokio::spawn(operations.clone().serve(listener));
    }
    let started = std::time::Instant::now();
    let engine = if file.cluster.replicated() {
        // Replicated: the groups hold every SKU, in the raft log under the
        // data directory; the engine of the single-copy path stays empty.
        Engine::new(file.engine_config()?, Arc::new(SystemClock))?
    } else {
        let (engine, report) = Engine::open(file.engine_config()?, Arc::new(SystemClock), durability)
            .with_context(|| format!("recovering {}", member.data_directory.display()))?;
        tracing::info!(
            from_snapshot = report.from_snapshot,
            records = report.records,
            skus = report.skus,
            orders = report.orders,
            transactions = report.transactions,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        engine
    };
    let endpoint = flashstock_node::server::endpoint(&file, id)?;
    let mut addresses = Vec::with_capacity(file.members.len());
    for member in &file.members {
        addresses.push((member.id, member.address.parse().context("member address")?));
    }
    let peers = flashstock_node::peers::Peers::start(&endpoint, id, &addresses);
    let replication = if file.cluster.replicated() {
        let config = flashstock_node::replication::ReplicationConfig {
            own: id,
            members: file.members.iter().map(|member| member.id).collect(),
            partition_count: file.cluster.partitions,
            group_count: file.cluster.group_count(file.members.len()),
            factor: file.cluster.replication_factor,
            limits: file.engine_config()?.limits,
            orders_max: file.network.spanning_orders_max,
            data_directory: member.data_directory.clone(),
        };
        let replication =
            flashstock_node::replication::Replication::start(config, peers.clone(), Arc::new(SystemClock))
                .with_context(|| format!("recovering {}", member.data_directory.display()))?;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "replication groups started");
        Some(replication)
    } else {
        None
    };
    let node = Arc::new(flashstock_node::server::Node::new(&file, id, engine.clone(), peers, replication.clone())?);
    operations.ready(node.clone());
    // Ready: tests and scripts wait for this line.
    println!("node {id} serving on {}", endpoint.local_addr()?);
    let serving = tokio::spawn(flashstock_node::server::serve(endpoint.clone(), node.clone()));
    signal.received().await;
    tracing::info!("stopping");
    operations.stopping();
    // Requests in flight get their answers (their records are durable once
    // answered); new ones are refused as Unavailable, which clients retry.
    let left = node.drain(std::time::Duration::from_secs(5)).await;
    if left > 0 {
        tracing::warn!(left, "requests still in flight after 5 s; their callers see the connection close");
    }
    node.coordination.stop();
    if let Some(replication) = &replication {
        replication.stop();
    }
    endpoint.close(flashstock_node::server::close_code::SHUTTING_DOWN.into(), b"node shutting down");
    serving.abort();
    engine.shutdown().await;
    endpoint.wait_idle().await;
    println!("node {id} stopped");
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this is made: a signal
/// that arrives while the process is still starting waits here instead of
/// killing it by default (scripts send SIGTERM as soon as "serving on" shows).
struct ShutdownSignal {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self { terminate: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

async fn admin(file: &config::ClusterFile, operation_id: Option<String>, action: AdminAction) -> anyhow::Result<()> {
    let tls = file.tls.as_ref().context("the configuration has no [tls] section")?;
    anyhow::ensure!(!file.members.is_empty(), "the configuration has no [[members]]");
    let mut builder =
        flashstock_client::Client::builder().tls_directory(&tls.directory, "admin").agent("flashstock-admin");
    for member in &file.members {
        builder = builder.seed(member.address.parse().context("member address")?);
    }
    let client = builder.connect().await.context("connecting to the cluster")?;
    let operation = operation_id.unwrap_or_else(|| client.new_operation_id());
    let once = client.admin(operation.clone());
    let show = |sku: &str, stock: flashstock_client::Stock| {
        println!("{sku}: {} available, {} held, {} sold", stock.available, stock.held, stock.sold);
    };
    match action {
        AdminAction::CreateSku { sku, units, buyer_limit, opens_at_ms } => {
            show(&sku, once.create_sku(&sku, units, buyer_limit, opens_at_ms).await?);
        }
        AdminAction::CreateSkus { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut created = 0;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || (number == 0 && line.starts_with("sku")) {
                    continue;
                }
                let fields: Vec<&str> = line.split(',').map(str::trim).collect();
                let at = |what: &str| format!("{}:{}: {what}", file.display(), number + 1);
                anyhow::ensure!((2..=4).contains(&fields.len()), at("expected sku,units[,buyer_limit[,opens_at_ms]]"));
                let units = fields[1].parse().with_context(|| at("units is not a number"))?;
                let limit = match fields.get(2) {
                    Some(limit) if !limit.is_empty() => Some(limit.parse().with_context(|| at("bad buyer_limit"))?),
                    _ => None,
                };
                let opens_at_ms = match fields.get(3) {
                    Some(at_ms) if !at_ms.is_empty() => at_ms.parse().with_context(|| at("bad opens_at_ms"))?,
                    _ => 0,
                };
                client
                    .admin(format!("{operation}-{}", number + 1))
                    .create_sku(fields[0], units, limit, opens_at_ms)
                    .await
                    .with_context(|| at(&format!("creating {}", fields[0])))?;
                created += 1;
            }
            println!("created {created} SKUs");
        }
        AdminAction::AddStock { sku, units } => show(&sku, once.add_stock(&sku, units).await?),
        AdminAction::RemoveStock { sku, units } => show(&sku, once.remove_stock(&sku, units).await?),
        AdminAction::SetBuyerLimit { sku, units } => show(&sku, once.set_buyer_limit(&sku, units).await?),
        AdminAction::OpenSale { sku, at_ms } => show(&sku, once.open_sale(&sku, at_ms).await?),
        AdminAction::Availability { sku } => show(&sku, client.availability(&sku).await?),
        AdminAction::Status => {
            let status = client.cluster_status().await?;
            println!("{} partitions", status.partition_count);
            for member in status.members {
                let state = if member.up { "up" } else { "DOWN" };
                let totals = match member.totals {
                    Some((skus, stock)) => format!(
                        ", {skus} SKUs: {} available, {} held, {} sold",
                        stock.available, stock.held, stock.sold
                    ),
                    None => String::new(),
                };
                let links = match member.sees_down.as_deref() {
                    Some([]) | None => String::new(),
                    Some(down) => format!(", sees {down:?} down"),
                };
                println!(
                    "  node {} at {}: {state}, {} partitions{totals}{links}",
                    member.id, member.address, member.partitions
                );
                for (sku, stock) in member.hottest_skus.iter().take(5) {
                    println!("    {sku}: {} available, {} held, {} sold", stock.available, stock.held, stock.sold);
                }
            }
        }
    }
    Ok(())
}
