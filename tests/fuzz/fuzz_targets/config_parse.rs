//! The `cluster.toml` parser on arbitrary text. Beyond "no panic": a file
//! that parses is one the node can run with (its engine configuration
//! validates, its members are distinct and findable, a cluster with members
//! has certificates), and parsing is deterministic.
#![no_main]

use flashstock_node::config::ClusterFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = ClusterFile::parse(text);
    // Errors as their message chain: their Debug form has a backtrace.
    let shown = |parsed: &anyhow::Result<ClusterFile>| match parsed {
        Ok(file) => format!("{file:?}"),
        Err(error) => format!("{error:#}"),
    };
    assert_eq!(shown(&parsed), shown(&ClusterFile::parse(text)), "parsing is not deterministic");
    let Ok(file) = parsed else { return };
    let engine = file.engine_config().expect("a parsed file's engine configuration validates");
    assert_eq!(engine.partition_count, file.cluster.partitions);
    assert!(file.members.is_empty() || file.tls.is_some(), "members without certificates");
    for (index, member) in file.members.iter().enumerate() {
        assert!(member.address.parse::<std::net::SocketAddr>().is_ok(), "member {index}: {}", member.address);
        let found = file.member(member.id).expect("every member is found by its id");
        assert!(std::ptr::eq(found, member), "two members share id {}", member.id);
    }
});
