//! Cross-crate integration tests, one binary (it links once). The cluster
//! tests that start real node processes join this binary as modules.

mod flash_sale;
mod routing;
