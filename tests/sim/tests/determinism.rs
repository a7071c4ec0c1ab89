//! Same seed, same run; and a few seeds pass in the test suite (CI runs
//! many more through the binary).

use flashstock_sim::{run, SimConfig};

#[test]
fn the_same_seed_gives_the_same_run_byte_for_byte() {
    let first = run(SimConfig::new(7));
    let second = run(SimConfig::new(7));
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!((first.events, first.requests, first.answers), (second.events, second.requests, second.answers));
    assert!(first.requests > 100, "the workload ran: {} requests", first.requests);
    let other = run(SimConfig::new(8));
    assert_ne!(first.trace_hash, other.trace_hash, "another seed is another run");
}

#[test]
fn a_few_seeds_pass() {
    for seed in 1..=3 {
        let report = run(SimConfig::new(seed));
        assert!(report.violations.is_empty(), "seed {seed}: {:#?}", report.violations);
    }
}
