//! The stable map from a SKU to its partition.
//!
//! Every node and every client must compute the same partition for a SKU,
//! across processes, versions and platforms, so this is a fixed hash (64-bit
//! FNV-1a) written here rather than `std`'s hasher, whose output may change
//! between Rust releases and is randomly keyed per process.

use crate::ids::SkuId;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME))
}

/// The partition that owns `sku`, in `0..partition_count`.
pub fn partition_of(sku: &SkuId, partition_count: u32) -> u32 {
    assert!(partition_count > 0, "a cluster has at least one partition");
    let hash = stable_hash(sku.as_str().as_bytes());
    u32::try_from(hash % u64::from(partition_count)).expect("remainder is below a u32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_published_fnv1a() {
        // Reference values of 64-bit FNV-1a; a change here breaks routing
        // between nodes of different versions.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partitions_are_in_range_and_spread() {
        let mut counts = [0u32; 8];
        for index in 0..8_000 {
            let sku = SkuId::new(format!("sku-{index}")).expect("valid id");
            counts[partition_of(&sku, 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&count| (700..1300).contains(&count)), "{counts:?}");
    }
}
