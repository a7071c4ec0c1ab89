//! The simulated sale in process, across the node and engine crates: the
//! sale's own book checks must pass, and the engine's counts afterwards must
//! agree with them.

use std::sync::Arc;

use flashstock_engine::{Engine, SkuId, SystemClock};
use flashstock_node::config::ClusterFile;

const SALE: &str = r#"
[cluster]
name = "in-process"
partitions = 4

[limits]
hold_ttl_ms_min = 100

[engine]
in_flight_per_sku_max = 64
batch_max = 64
in_flight_per_partition_max = 256

[sale]
hot_skus = 2
hot_units = 150
# No cold catalogue, so no accessories: a hot hold is never undone because
# its order's second line failed, which could leave a hot unit unsold
# after every later buyer was told "sold out" (a race the sale allows).
cold_skus = 0
cold_units = 3
hot_demand_percent = 100
zipf_exponent = 1.0
buyers = 2000
concurrency = 128
units_per_buyer_max = 1
pay_percent = 100
cancel_percent = 0
hold_ttl_ms = 200
seed = 11
opens_after_ms = 200
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_paying_buyer_gets_stock_until_it_is_gone() {
    let file = ClusterFile::parse(SALE).expect("valid config");
    let engine = Engine::new(file.engine_config().expect("valid"), Arc::new(SystemClock)).expect("engine");
    let sale = file.sale.clone().expect("has a sale");
    flashstock_node::sale::run(std::sync::Arc::new(engine.clone()), "in-process", sale).await.expect("books balance");
    // 2000 buyers want 300 hot units, one line each, and everyone pays:
    // both hot SKUs sell out.
    for hot in ["hot-0", "hot-1"] {
        let stock = engine.availability(&SkuId::new(hot).expect("id")).await.expect("exists");
        assert_eq!((stock.available, stock.held, stock.sold), (0, 0, 150), "{hot}");
    }
    engine.stop_actors();
}
