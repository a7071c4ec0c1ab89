//! Where a SKU lives.
//!
//! - SKU -> partition: 64-bit FNV-1a of the SKU id's bytes, modulo the
//!   cluster's partition count. The engine computes the same function (a
//!   cross-crate test in `tests/it` holds them together).
//! - Partition -> node: rendezvous (highest random weight) hashing over the
//!   member ids: every member scores every partition and the highest score
//!   owns it. Adding or removing a member moves only the partitions it gains
//!   or loses, and every node and client that knows the member list agrees
//!   without talking to anyone.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a: fixed forever, unlike `std`'s hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME))
}

/// The partition that owns `sku`, in `0..partition_count`.
///
/// # Panics
/// If `partition_count` is zero (a cluster always has partitions; its
/// configuration is validated before anything routes).
pub fn partition_of(sku: &str, partition_count: u32) -> u32 {
    assert!(partition_count > 0, "a cluster has at least one partition");
    u32::try_from(stable_hash(sku.as_bytes()) % u64::from(partition_count)).expect("remainder is below a u32")
}

/// The score of `member` for `partition`: a 64-bit mix of both, so that the
/// scores of different members are independent.
fn rendezvous_score(member: u32, partition: u32) -> u64 {
    // SplitMix64's finaliser over the pair: cheap and well distributed.
    let mut mixed = (u64::from(member) << 32 | u64::from(partition)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// The member that owns `partition`, or `None` if there are no members.
/// Ties (equal scores) go to the lower member id, so the answer never
/// depends on the order of `members`.
pub fn owner_of(partition: u32, members: &[u32]) -> Option<u32> {
    members
        .iter()
        .map(|&member| (rendezvous_score(member, partition), std::cmp::Reverse(member)))
        .max()
        .map(|(_, std::cmp::Reverse(member))| member)
}

/// The `count` members that replicate `group` (numbered from 1), highest
/// score first: rendezvous hashing over the member ids, so every member and
/// client that knows the member list agrees, and a member joining or
/// leaving moves only the groups it gains or loses. Fewer members than
/// `count` gives every member.
pub fn replicas_of(group: u32, members: &[u32], count: usize) -> Vec<u32> {
    let mut scored: Vec<(u64, std::cmp::Reverse<u32>)> = members
        .iter()
        .map(|&member| (rendezvous_score(member, group | 0x8000_0000), std::cmp::Reverse(member)))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.dedup();
    scored.into_iter().take(count).map(|(_, std::cmp::Reverse(member))| member).collect()
}

/// The preferred leader of each group (`1..=group_count`): among a group's
/// replicas, the one that prefers the fewest groups so far (ties to the
/// higher-scoring replica), so leaders, and with them the work of
/// proposing, spread evenly over the members.
pub fn preferred_leaders(group_count: u32, members: &[u32], replication_factor: usize) -> Vec<u32> {
    let mut led: std::collections::BTreeMap<u32, usize> = members.iter().map(|&member| (member, 0)).collect();
    (1..=group_count)
        .map(|group| {
            let replicas = replicas_of(group, members, replication_factor);
            let chosen = replicas
                .iter()
                .enumerate()
                .min_by_key(|(rank, member)| (led.get(member).copied().unwrap_or(0), *rank))
                .map(|(_, &member)| member)
                .expect("a group has replicas when there are members");
            *led.entry(chosen).or_default() += 1;
            chosen
        })
        .collect()
}

/// The replication group (`1..=group_count`) of `partition`: fixed for a
/// cluster's life, like the partition count.
pub fn group_of_partition(partition: u32, group_count: u32) -> u32 {
    assert!(group_count > 0, "a cluster has at least one group");
    partition % group_count + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_published_fnv1a() {
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn replicas_are_distinct_independent_of_member_order_and_leaders_spread() {
        let members = [1, 2, 3, 4, 5];
        let mut replica_counts = [0u32; 6];
        for group in 1..=100 {
            let replicas = replicas_of(group, &members, 3);
            assert_eq!(replicas.len(), 3);
            assert_eq!(replicas, replicas_of(group, &[5, 3, 1, 4, 2], 3));
            let mut unique = replicas.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), 3, "{replicas:?}");
            for member in replicas {
                replica_counts[member as usize] += 1;
            }
        }
        assert!(replica_counts[1..].iter().all(|&count| (40..=80).contains(&count)), "{replica_counts:?}");
        assert_eq!(replicas_of(7, &[1, 2], 3).len(), 2, "fewer members than the factor gives them all");
        let leaders = preferred_leaders(6, &[1, 2, 3], 3);
        for member in 1..=3 {
            assert_eq!(leaders.iter().filter(|&&leader| leader == member).count(), 2, "{leaders:?}");
        }
        assert_eq!(group_of_partition(0, 6), 1);
        assert_eq!(group_of_partition(13, 6), 2);
    }

    #[test]
    fn owners_do_not_depend_on_member_order_and_spread_evenly() {
        let members = [1, 2, 3];
        let mut counts = [0u32; 3];
        for partition in 0..300 {
            let owner = owner_of(partition, &members).expect("members");
            assert_eq!(Some(owner), owner_of(partition, &[3, 1, 2]));
            counts[(owner - 1) as usize] += 1;
        }
        assert!(counts.iter().all(|&count| (70..130).contains(&count)), "{counts:?}");
        assert_eq!(owner_of(0, &[]), None);
    }

    #[test]
    fn losing_a_member_moves_only_its_partitions() {
        for partition in 0..300 {
            let before = owner_of(partition, &[1, 2, 3]).expect("members");
            let after = owner_of(partition, &[1, 3]).expect("members");
            if before != 2 {
                assert_eq!(before, after, "partition {partition} moved without reason");
            }
        }
    }
}
