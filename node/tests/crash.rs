//! kill -9 at random moments, several times in a row, then recovery: every
//! commit the load saw acknowledged is in the log, and nothing is oversold.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flashstock_engine::log::segments::LogConfig;
use flashstock_engine::log::storage::FileStorage;
use flashstock_engine::log::writer::WriterConfig;
use flashstock_engine::{Durability, Engine, EngineConfig, OrderId, SystemClock};
use flashstock_node::crash_load::{load_sku, LOAD_SKUS, LOAD_UNITS_PER_SKU};

/// Small segments and snapshots, so that the kills also land in the middle
/// of rotations and snapshots.
const CONFIG: &str = "[cluster]\nname = \"crash\"\npartitions = 8\n\n\
    [storage]\ndata_directory = \"unused\"\nsegment_bytes_max = 65536\nsnapshot_log_bytes = 131072\n";

fn scratch(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("flashstock-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("scratch directory");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_repeated_kill_9() {
    let root = scratch("root");
    let config = root.join("cluster.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let (data, acknowledged) = (root.join("data"), root.join("acknowledged.txt"));
    let mut seed: u64 = 0x6b69_6c6c;
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashstock-node"))
            .args(["crash-load", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&data)
            .arg("--acknowledged")
            .arg(&acknowledged)
            .spawn()
            .expect("node starts");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(250 + seed % 500));
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("reaped");
        assert!(!status.success(), "round {round}: the load ended before it was killed");
    }

    let text = std::fs::read_to_string(&acknowledged).expect("acknowledged commits");
    // The last line may be cut by the kill; only whole lines were acknowledged.
    let mut orders: Vec<&str> = text.lines().collect();
    if !text.ends_with('\n') {
        orders.pop();
    }
    assert!(orders.len() > 100, "the load barely ran: {} commits", orders.len());

    let durability = Durability {
        storage: Arc::new(FileStorage),
        data_directory: data,
        log: LogConfig { segment_bytes_max: 65_536, snapshot_log_bytes: 131_072 },
        writer: WriterConfig { round_appends_max: 1024 },
    };
    let config = EngineConfig { partition_count: 8, ..EngineConfig::default() };
    let (engine, report) = Engine::open(config, Arc::new(SystemClock), durability).expect("recovers");
    let mut sold = 0;
    for index in 0..LOAD_SKUS {
        let counts = engine.availability_now(&load_sku(index)).await.expect("SKU recovered");
        assert_eq!(counts.total(), LOAD_UNITS_PER_SKU, "load-{index}: {counts:?}");
        sold += counts.sold;
    }
    assert!(sold >= orders.len() as u64, "{sold} units sold but {} commits were acknowledged", orders.len());
    for order in &orders {
        let settled = engine.commit(&OrderId::new(*order).expect("id")).await;
        assert!(
            settled.as_ref().is_ok_and(|settled| settled.replayed),
            "acknowledged commit {order} lost: {settled:?} (recovered {report:?})"
        );
    }
    engine.shutdown().await;
    std::fs::remove_dir_all(&root).expect("cleanup");
}
