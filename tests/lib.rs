//! Tests live in `it/`; this library is empty on purpose so that the package has a target.
