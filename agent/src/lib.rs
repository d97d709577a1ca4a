//! The Cairn agent: pull signed releases from sources, verify them against
//! the trust root compiled into the binary, keep the last-good state on local
//! disk and reconcile a target with it, online or offline.
//!
//! The loop is **discover → fetch → verify → store → decide → apply →
//! observe → report**. Pure cores and thin IO shells:
//!
//! * [`ingest`] (no tokio, no IO of its own): the one ingest driver over
//!   typed [`ingest::Item`]s, used by sources, the mesh and staged releases.
//! * [`pipeline`] (pure): root rotation, release and object verification,
//!   the adopt-or-reject decision. No IO, no clock, no tokio.
//! * [`targets::plan`] (pure): desired objects + observed files → actions.
//! * [`source`] (IO): the [`source::Source`] trait, HTTP(S) and directory
//!   sources, [`source::SourceSet`]. A mesh peer is another `Source`.
//! * [`store`] (IO): sled trees and content-addressed objects; the only module
//!   that names sled.
//! * [`targets`] (IO): the [`targets::Target`] trait and the manifests-directory
//!   target.
//! * [`agent`] (IO): the [`Agent`] runtime that ties them together
//!   ([`Agent::sync_from`], [`Agent::reconcile`], [`Agent::subscribe`]).
//! * [`fsread`]: the one way files outside the store are read (regular
//!   files only, size-capped, links refused).
//! * [`hold`]: local holds (`<dataDir>/hold.json`) that pause adoption.
//! * [`config`], [`retry`], [`metrics`], [`status`], [`http`], [`cli`]: the
//!   process around it.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cli;
pub mod config;
mod error;
pub mod fsread;
pub mod hold;
pub mod http;
pub mod images;
pub mod ingest;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod notify;
/// The pure ingest pipeline, shared with the fleet simulator.
pub use cairn_core::pipeline;
pub mod retry;
pub mod site;
pub mod source;
pub mod status;
pub mod store;
pub mod targets;
/// The old name of [`targets`] (kept for callers outside the crate).
pub use targets as target;

pub use agent::Agent;
pub use error::{Error, Result};

/// Seconds since the Unix epoch from the system clock: the one place the
/// agent's `now` comes from (pure code receives it as an argument).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A boxed, sendable future, used by the object-safe async traits
/// ([`source::Source`], [`targets::Target`]).
pub use ingest::BoxFuture;
