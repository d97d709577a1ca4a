//! The pure core of Cairn: bundle manifests and object checks, releases and
//! their verification, trust chains, rollout decisions, limits, durations,
//! the repository layout and the ingest pipeline that turns untrusted bytes
//! into an [`pipeline::Adoption`].
//!
//! **Architecture invariant:** core does no IO. No file system, no sockets,
//! no threads, no async runtime and no clock: time (`now`), bytes and the
//! trusted root arrive as arguments. The `cairn` CLI, the agent, the mesh
//! and the simulator all call these same functions. (`Error` carries an
//! `std::io::Error` for the IO crates that share it; nothing here makes
//! one.)
//!
//! **Architecture invariant:** only verification makes a `Verified*`:
//! [`verify::VerifiedRelease`], [`cairn_keys::VerifiedRoot`] and
//! [`pipeline::Adoption`] have private fields and no public constructor.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod bundle;
pub mod bundle_file;
pub mod diff;
pub mod duration;
mod error;
pub mod ids;
pub mod images;
pub mod ingest;
pub mod layout;
pub mod limits;
pub mod pipeline;
pub mod release;
pub mod rollout;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;
pub mod verify;

pub use error::{Error, Result};
pub use ids::{Address, AgentId, BundleId, ChannelName, IdError};
