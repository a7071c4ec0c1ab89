//! The binary as an operator runs it: a small sale from a generated
//! `cluster.toml` exits 0 (its own book checks passed) and prints the balance
//! line; a broken configuration exits non-zero naming the key.

use std::path::PathBuf;
use std::process::Command;

fn node_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flashstock-node"))
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!("flashstock-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let path = directory.join("cluster.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

const SMALL_SALE: &str = r#"
[cluster]
name = "it-sale"
partitions = 8

[limits]
hold_ttl_ms_min = 100

[engine]

[sale]
hot_skus = 1
hot_units = 300
cold_skus = 50
cold_units = 5
hot_demand_percent = 70
zipf_exponent = 1.1
buyers = 3000
concurrency = 64
units_per_buyer_max = 2
pay_percent = 60
cancel_percent = 20
hold_ttl_ms = 200
seed = 7
"#;

#[test]
fn a_small_flash_sale_balances_its_books() {
    let config = write_config("sale", SMALL_SALE);
    let output = Command::new(node_binary()).args(["flash-sale", "--config"]).arg(&config).output().expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("books balance"), "{stdout}");
    assert!(stdout.contains("hot-0: "), "{stdout}");
}

#[test]
fn a_misspelt_limit_is_refused_by_name() {
    let config = write_config("typo", &SMALL_SALE.replace("hold_ttl_ms_min", "hold_ttl_min_ms"));
    let output =
        Command::new(node_binary()).args(["check-config", "--config"]).arg(&config).output().expect("node runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("hold_ttl_min_ms"), "{stderr}");
}

#[test]
fn a_durable_sale_balances_its_books_and_leaves_its_log() {
    let data = std::env::temp_dir().join(format!("flashstock-it-{}-durable-data", std::process::id()));
    let storage = format!("\n[storage]\ndata_directory = {:?}\n", data.display().to_string());
    let config = write_config("durable", &format!("{SMALL_SALE}{storage}"));
    for run in 0..2 {
        let output =
            Command::new(node_binary()).args(["flash-sale", "--config"]).arg(&config).output().expect("node runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "run {run}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("books balance"), "{stdout}");
    }
    let segments = std::fs::read_dir(data.join("simulated-sale").join("log"))
        .expect("log directory")
        .filter(|entry| entry.as_ref().is_ok_and(|entry| entry.file_name().to_string_lossy().starts_with("segment-")))
        .count();
    assert!(segments >= 1, "the sale left its log");
    std::fs::remove_dir_all(&data).expect("cleanup");
}
