//! The engine partitions SKUs and the client routes them; both must agree
//! for every SKU, or a client would send requests to a node that does not
//! own them.

use flashstock_client::routing;
use flashstock_engine::partition::partition_of;
use flashstock_engine::SkuId;

#[test]
fn engine_and_client_put_every_sku_in_the_same_partition() {
    for index in 0..10_000 {
        let name = format!("sku-{index}-\u{e9}");
        let sku = SkuId::new(&name).expect("valid id");
        for partition_count in [1, 7, 64, 1024] {
            assert_eq!(partition_of(&sku, partition_count), routing::partition_of(&name, partition_count), "{name}");
        }
    }
}
