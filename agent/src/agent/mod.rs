//! The agent runtime: the IO shell around the pipeline, the store, the
//! sources and the target.
//!
//! * [`Agent::open`] opens the store and re-verifies everything in it
//!   against the embedded root (root chain, adopted release, manifest,
//!   object hashes); missing or corrupt objects are re-fetched from the
//!   sources when possible, otherwise start-up fails with a clear error.
//! * [`Agent::sync_from`] runs one [`Source`] through the pipeline: follow
//!   new roots, read the channel's release, fetch only missing objects,
//!   verify each, adopt atomically. Any source — including a mesh peer —
//!   goes through this one function.
//! * [`Agent::reconcile`] applies the adopted release to the target.
//! * [`Agent::run`] is the long-running loop: one task per source (poll,
//!   backoff on failure), a reconcile loop (interval and on adoption), the
//!   HTTP listener.
//! * [`Agent::subscribe`] notifies on every adoption (for the mesh: announce
//!   new heads to peers).
//!
//! The agent never decides trust itself: every decision is
//! [`crate::pipeline`]'s.

use crate::config::Config;
use crate::hold::Hold;
use crate::metrics::{ChannelLabel, Metrics, ResultLabel, SourceErrorLabel, SourceLabel};
use crate::pipeline::{self, Deferral, Ingest, Rejection, Want};
use crate::retry::{jitter, Backoff};
use crate::source::{Source, SourceError, SourceOptions, SourceSet};
use crate::status::{
    format_time, FailedRelease, HoldStatus, ReconcileStatus, RejectionStatus, ReleaseStatus,
    RootStatus, SourceStatus, Status, StoreStatus, STATUS_FORMAT,
};
use crate::store::{Store, StoreError, StoreHandle};
use crate::targets::{self as target, ApplyReport, DesiredObject, DesiredState, Target};
use crate::{unix_now, Error, Result};
use cairn_core::bundle::Manifest;
use cairn_core::limits::Limits;
use cairn_core::release::Release;
use cairn_core::rollout::{Decision, FleetReports};
use cairn_keys::{RootChain, VerifiedRoot};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod deferred;
mod desired;
mod notifications;
mod pending;
mod reconcile;
pub use reconcile::Action;
mod report;
mod run;
mod startup;
mod status_writer;
mod sync;

use crate::ingest::Snapshot;
use deferred::Deferred;
use startup::{load_head, load_stored, LoadedState};

/// How many objects one sync fetches at once from one source.
pub const FETCH_CONCURRENCY: usize = 8;

/// How long shutdown waits for the last status write and store flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The head adopted on the agent's channel, as published to subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedHead {
    /// Channel.
    pub channel: String,
    /// Sequence.
    pub sequence: u64,
    /// Bundle id.
    pub bundle: String,
    /// Address of the release envelope bytes.
    pub release_address: String,
}

/// What one sync from one source did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The source offers the adopted release (or nothing newer).
    UpToDate,
    /// The source has no release for the channel.
    NoRelease,
    /// A newer release was verified and adopted.
    Adopted {
        /// Its sequence.
        sequence: u64,
    },
    /// A newer valid release exists but is not for this agent now
    /// (selector, rollout wave, circuit breaker).
    Deferred {
        /// Its sequence.
        sequence: u64,
        /// Why, for humans.
        why: String,
    },
    /// Something the source offered was rejected (logged, counted, in status).
    Rejected {
        /// [`Rejection::reason`].
        reason: &'static str,
    },
}

/// Why a sync could not complete (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The adopted release, verified, and what status needs of its manifest.
/// The manifest itself is not kept in memory while idle (9,000 entries
/// parse to a few MiB): a reconcile reads it from the store
/// ([`stored_manifest`]).
#[derive(Clone, Debug)]
struct HeadState {
    release: Release,
    bytes: Vec<u8>,
    address: String,
    summary: ManifestSummary,
}

/// The few facts of a manifest that status shows.
#[derive(Clone, Debug)]
struct ManifestSummary {
    source_repository: String,
    source_commit: String,
    objects: usize,
}

impl ManifestSummary {
    fn of(m: &Manifest) -> Self {
        Self {
            source_repository: m.source.repository.clone(),
            source_commit: m.source.commit.clone(),
            objects: m.entries.len(),
        }
    }
}

impl HeadState {
    fn status(&self, now: u64) -> ReleaseStatus {
        release_status(&self.release, &self.address, &self.summary, now)
    }

    fn published(&self) -> AdoptedHead {
        AdoptedHead {
            channel: self.release.channel.to_string(),
            sequence: self.release.sequence,
            bundle: self.release.bundle.to_string(),
            release_address: self.address.clone(),
        }
    }
}

/// The manifest of a stored release, read from the store and checked
/// against its bundle id (blocking). `None`: not stored, or unreadable.
fn stored_manifest(
    store: &Store,
    release: &Release,
    limits: &Limits,
) -> std::result::Result<Option<Manifest>, StoreError> {
    let Some(bytes) = store.bundle(&release.bundle)? else {
        return Ok(None);
    };
    Ok(Manifest::load(&bytes, Some(&release.bundle), limits, store.chunk_reader()).ok())
}

fn release_status(r: &Release, address: &str, m: &ManifestSummary, now: u64) -> ReleaseStatus {
    ReleaseStatus {
        channel: r.channel.to_string(),
        sequence: r.sequence,
        bundle: r.bundle.to_string(),
        release: address.to_owned(),
        source_repository: m.source_repository.clone(),
        source_commit: m.source_commit.clone(),
        objects: m.objects,
        created: r.created,
        expires: r.expires,
        expired: now >= r.expires,
    }
}

struct State {
    root: VerifiedRoot,
    /// Every root of the verified chain, oldest first (`root` last): the
    /// release epoch and start-up re-verification need them.
    chain: Vec<cairn_keys::Root>,
    head: Option<HeadState>,
    /// The deferred (pending / staged) release machine.
    deferred: Deferred,
    last_good: Option<ReleaseStatus>,
    failed: Option<FailedRelease>,
    sources: BTreeMap<String, SourceStatus>,
    last_rejection: Option<RejectionStatus>,
    reconcile: Option<ReconcileStatus>,
    /// The last render for this site (docs/SITES.md).
    site: Option<crate::site::SiteStatus>,
    listen: Option<SocketAddr>,
}

struct Inner {
    config: Config,
    agent_id: cairn_core::AgentId,
    store: StoreHandle,
    metrics: Metrics,
    limits: Limits,
    sources: SourceSet,
    target: Arc<dyn Target>,
    state: Mutex<State>,
    adopt_lock: tokio::sync::Mutex<()>,
    reconcile_lock: tokio::sync::Mutex<()>,
    /// Writes status.json on its own thread.
    status_writer: status_writer::StatusWriter,
    /// The hold file as last read (by [`Agent::current_hold`], off the
    /// runtime), for the synchronous [`Agent::status`]; and the last read
    /// error, logged once per change rather than once per read.
    hold: Mutex<(Option<Hold>, Option<String>)>,
    /// Woken when the store recovers from an IO error (sources retry now).
    store_recovered: tokio::sync::Notify,
    fleet_reports: Mutex<BTreeMap<String, FleetReports>>,
    /// Wakes the deferred-release loop (a new pending release, new fleet
    /// reports, an adoption).
    deferred_wake: tokio::sync::Notify,
    adopted_tx: watch::Sender<Option<AdoptedHead>>,
    /// Webhook notifications (outbox and delivery).
    notifier: crate::notify::Notifier,
    /// The hold state last notified (`None`: not known yet).
    hold_notified: Mutex<Option<bool>>,
    relay_tx: watch::Sender<Option<AdoptedHead>>,
}

/// The agent. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.inner.agent_id)
            .field("channel", &self.inner.config.channel)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the store in the configured data directory and verifies it:
    /// the stored root chain from the embedded root, the adopted release
    /// (signatures, channel), its manifest and every object's hash. Missing
    /// or corrupt objects are re-fetched from the sources; if that fails the
    /// agent refuses to start rather than enforce a partial state. Nothing
    /// is ever deleted except a corrupt object copy that is replaced.
    pub async fn open(config: Config) -> Result<Agent> {
        let embedded = cairn_keys::embedded::root().map_err(Error::EmbeddedRoot)?;
        let data_dir = config.data_dir.clone();
        let store = {
            let d = data_dir.clone();
            tokio::task::spawn_blocking(move || Store::open(&d))
                .await
                .map_err(|e| Error::Status(format!("store open task failed: {e}")))??
        };
        let loaded = {
            let (store, config) = (store.clone(), config.clone());
            tokio::task::spawn_blocking(move || load_stored(&store, &config, embedded, unix_now()))
                .await
                .map_err(|e| Error::Status(format!("store load task failed: {e}")))??
        };
        let LoadedState {
            agent_id,
            chain,
            head,
            last_good,
            failed: failed_release,
        } = loaded;
        if chain.expired {
            tracing::warn!(
                version = chain.current.root().version,
                "the trust root has expired: no new release can be adopted until a newer root is published"
            );
        }
        let limits = Limits::default();
        let opts = SourceOptions {
            request_timeout: config.request_timeout,
            redirect_hosts: config.redirect_hosts.clone(),
            tls: config.source_tls.clone(),
            ..SourceOptions::default()
        };
        let sources = SourceSet::from_specs(&config.sources, &opts).map_err(|m| {
            Error::Config(crate::config::ConfigError {
                lines: vec![format!("sources: {m}")],
            })
        })?;
        let target = target::from_config(&config.target, store.clone(), &agent_id)?;
        let metrics = Metrics::new();
        metrics
            .root_version
            .set(gauge(chain.current.root().version));
        let (adopted_tx, _) = watch::channel(head.as_ref().map(HeadState::published));
        let (relay_tx, _) = watch::channel(head.as_ref().map(HeadState::published));
        if let Some(h) = &head {
            metrics
                .adopted_sequence
                .get_or_create(&ChannelLabel {
                    channel: h.release.channel.to_string(),
                })
                .set(gauge(h.release.sequence));
        }
        if let Some(lg) = &last_good {
            metrics
                .last_good_sequence
                .get_or_create(&ChannelLabel {
                    channel: lg.channel.clone(),
                })
                .set(gauge(lg.sequence));
        }
        let head_sequence = head.as_ref().map(|h| h.release.sequence);
        let status_writer =
            status_writer::StatusWriter::start(config.data_dir.clone()).map_err(|source| {
                Error::Io {
                    what: "starting the status writer thread".into(),
                    source,
                }
            })?;
        let store = StoreHandle::new(store);
        let notifier = crate::notify::Notifier::new(
            config.notifications.clone(),
            &agent_id,
            &config.channel,
            store.clone(),
            crate::notify::NotifyMetrics::of(&metrics),
            config.request_timeout,
            config.max_backoff,
        );
        let agent = Agent {
            inner: Arc::new(Inner {
                agent_id,
                store,
                metrics,
                limits,
                sources,
                target,
                state: Mutex::new(State {
                    root: chain.current,
                    chain: chain.roots,
                    failed: failed_release,
                    head,
                    deferred: Deferred::new(head_sequence),
                    last_good,
                    sources: BTreeMap::new(),
                    last_rejection: None,
                    reconcile: None,
                    site: None,
                    listen: None,
                }),
                adopt_lock: tokio::sync::Mutex::new(()),
                reconcile_lock: tokio::sync::Mutex::new(()),
                status_writer,
                hold: Mutex::new((None, None)),
                store_recovered: tokio::sync::Notify::new(),
                fleet_reports: Mutex::new(BTreeMap::new()),
                deferred_wake: tokio::sync::Notify::new(),
                adopted_tx,
                notifier,
                hold_notified: Mutex::new(None),
                relay_tx,
                config,
            }),
        };
        agent.repair_objects().await?;
        agent.publish_status_now().await;
        Ok(agent)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs store work on a blocking thread: every store call may wait on
    /// the disk (fsync, a full or failing device), and must never stall the
    /// runtime that serves `/readyz` and SIGTERM.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> std::result::Result<R, StoreError> + Send + 'static,
    ) -> std::result::Result<R, StoreError> {
        self.inner.store.call(f).await
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The agent id (configured, or generated once and persisted).
    pub fn agent_id(&self) -> &cairn_core::AgentId {
        &self.inner.agent_id
    }

    /// The store (for the mesh: heads, objects, roots, peers), every call
    /// on a blocking thread.
    pub fn store(&self) -> &StoreHandle {
        &self.inner.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The configured sources.
    pub fn sources(&self) -> &SourceSet {
        &self.inner.sources
    }

    /// The current trust root (end of the verified chain).
    pub fn root(&self) -> VerifiedRoot {
        self.state().root.clone()
    }

    /// The adopted head of the agent's channel, if any.
    pub fn adopted(&self) -> Option<AdoptedHead> {
        self.state().head.as_ref().map(HeadState::published)
    }

    /// A receiver that changes on every adoption (the mesh announces new
    /// heads to peers from here).
    pub fn subscribe(&self) -> watch::Receiver<Option<AdoptedHead>> {
        self.inner.adopted_tx.subscribe()
    }

    /// Every root of the verified chain, oldest first.
    pub fn root_chain(&self) -> Vec<cairn_keys::Root> {
        self.state().chain.clone()
    }

    /// Whether the adopted release no longer sets a rollback floor: a root
    /// rotation replaced the release keys that signed it, so the next
    /// release under the new keys is adopted whatever its sequence
    /// ([`cairn_core::verify::binding_floor`]).
    pub fn floor_unbound(&self) -> bool {
        let Snapshot { epoch, adopted, .. } = self.snapshot();
        adopted.is_some_and(|(sequence, bytes)| {
            cairn_core::verify::binding_floor(&epoch, Some((sequence, &bytes)), &self.inner.limits)
                .is_none()
        })
    }
}

/// Milliseconds since the Unix epoch (the deferred-release machine's
/// clock: wave openings and hold ends are wall-clock times).
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A sequence or version as a gauge value: saturating at `i64::MAX`, so a
/// forged release at 2^64 − 1 reads as a huge number, never as −1.
fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
