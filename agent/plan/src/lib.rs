//! Kubernetes planning shared by `cairn-agent` and the `cairn` CLI.
//!
//! - [`plan`]: pure rules (apply order, waves, pruning, drift, health, field
//!   changes) over JSON objects; no kube client, no clock, no IO.
//! - [`cluster`]: the kube-rs shell (discovery, server-side apply and its dry
//!   run, get, delete, list by label).
//! - [`diff`]: what applying a bundle would change on a live cluster
//!   (`cairn diff`, `cairn-agent plan`): created, changed field by field
//!   from a server-side-apply dry run, pruned.
//!
//! The agent re-exports [`plan`] and [`cluster`] as
//! `cairn_agent::kubernetes::{plan, cluster}`; the CLI does not depend on
//! the agent (docs/ARCHITECTURE.md, crate map).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cluster;
pub mod diff;
pub mod plan;
