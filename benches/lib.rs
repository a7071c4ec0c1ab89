//! Benchmarks live in `engine.rs`; this library is empty on purpose so that the package has a target.
