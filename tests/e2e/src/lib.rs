//! End-to-end tests live in `tests/`.
#![cfg_attr(test, allow(clippy::unwrap_used))]
