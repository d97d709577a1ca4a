//! The agent's side of the one ingest driver ([`cairn_core::ingest`]):
//! every [`Source`] (HTTP, directory, OCI, a mesh peer's fetched files, a
//! staged release) is the driver's [`Fetch`], the agent's store and state
//! its [`Local`] (in `agent/sync.rs`), and the driver's [`Event`]s become
//! the agent's log lines.
//!
//! The driver itself (roots, release, gate, manifest, objects) lives in the
//! pure core crate so the fleet simulator runs exactly the same code; this
//! module only adapts it: no logic of its own beyond logging.

pub use cairn_core::ingest::{
    BoxFuture, Counts, DriveError, Driven, Event, Fetch, Gate, Item, Local, Outcome, Snapshot,
};

use crate::pipeline::Rejection;
use crate::source::{Source, SourceError};
use cairn_core::limits::Limits;
use cairn_core::verify::VerifiedRelease;
use cairn_keys::VerifiedRoot;

/// A [`Source`] as the driver's [`Fetch`].
struct SourceFetch<'a, S: ?Sized>(&'a S);

impl<S: Source + ?Sized> Fetch for SourceFetch<'_, S> {
    type Error = SourceError;

    fn name(&self) -> &str {
        self.0.name()
    }

    fn fetch<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        self.0.get(item, limit)
    }
}

/// A [`Local`] whose driver [`Event`]s are logged (everything else is
/// passed through unchanged).
struct Logged<'a, L: ?Sized>(&'a L);

impl<L: Local + ?Sized> Local for Logged<'_, L> {
    type Error = L::Error;

    fn root(&self) -> VerifiedRoot {
        self.0.root()
    }

    fn root_accepted(
        &self,
        version: u64,
        bytes: Vec<u8>,
        root: VerifiedRoot,
    ) -> BoxFuture<'_, Result<(), Self::Error>> {
        self.0.root_accepted(version, bytes, root)
    }

    fn root_rejected(&self, rejection: &Rejection) {
        self.0.root_rejected(rejection)
    }

    fn snapshot(&self) -> Snapshot {
        self.0.snapshot()
    }

    fn gate<'a>(&'a self, release: &'a VerifiedRelease) -> BoxFuture<'a, Gate> {
        self.0.gate(release)
    }

    fn stored_manifest<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Self::Error>> {
        self.0.stored_manifest(address)
    }

    fn present(&self, addresses: Vec<String>) -> BoxFuture<'_, Result<Vec<bool>, Self::Error>> {
        self.0.present(addresses)
    }

    fn put_object(
        &self,
        address: String,
        bytes: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Self::Error>> {
        self.0.put_object(address, bytes)
    }

    fn event(&self, event: Event<'_>) {
        log(&event);
        self.0.event(event);
    }
}

/// The agent's log line for a driver event.
fn log(event: &Event<'_>) {
    match *event {
        Event::Fetching {
            source,
            channel,
            sequence,
        } => tracing::info!(source, channel, sequence, "new release found; fetching"),
        Event::ObjectsFetched {
            source,
            fetched,
            present,
        } => tracing::debug!(source, fetched, present, "objects fetched"),
    }
}

/// Runs one ingest of `channel` from `source` into `local` through
/// [`cairn_core::ingest::drive`], fetching up to `concurrency` objects at
/// once, and logs what it reports.
pub async fn drive<S, L>(
    source: &S,
    local: &L,
    channel: &str,
    limits: &Limits,
    concurrency: usize,
) -> Result<Outcome, DriveError<SourceError, L::Error>>
where
    S: Source + ?Sized,
    L: Local + ?Sized,
{
    let fetch = SourceFetch(source);
    let local = Logged(local);
    cairn_core::ingest::drive(&fetch, &local, channel, limits, concurrency).await
}
