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
use crate::pipeline::{self, AdoptedRef, Context, Deferral, Ingest, Rejection, Stage, Start, Want};
use crate::retry::{jitter, Backoff};
use crate::source::{Source, SourceError, SourceOptions, SourceSet};
use crate::status::{
    format_time, FailedRelease, HoldStatus, ReconcileStatus, RejectionStatus, ReleaseStatus,
    RolloutStatus, RootStatus, SourceStatus, Status, StoreStatus, STATUS_FORMAT,
};
use crate::store::{Store, StoreError};
use crate::target::{self, ApplyReport, DesiredObject, DesiredState, Target};
use crate::{unix_now, Error, Result};
use cairn_core::bundle::Manifest;
use cairn_core::layout::{channel_path, object_path, root_path};
use cairn_core::limits::Limits;
use cairn_core::release::Release;
use cairn_core::rollout::{Decision, FleetReports};
use cairn_keys::{RootChain, VerifiedRoot};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

/// The adopted release, verified, with its manifest.
#[derive(Clone, Debug)]
struct HeadState {
    release: Release,
    bytes: Vec<u8>,
    address: String,
    /// Shared: a head is cloned for every reconcile and status, and a
    /// manifest of 9,000 entries is a few MiB.
    manifest: Arc<Manifest>,
}

impl HeadState {
    fn status(&self, now: u64) -> ReleaseStatus {
        release_status(&self.release, &self.address, &self.manifest, now)
    }

    fn published(&self) -> AdoptedHead {
        AdoptedHead {
            channel: self.release.channel.clone(),
            sequence: self.release.sequence,
            bundle: self.release.bundle.clone(),
            release_address: self.address.clone(),
        }
    }
}

fn release_status(r: &Release, address: &str, m: &Manifest, now: u64) -> ReleaseStatus {
    ReleaseStatus {
        channel: r.channel.clone(),
        sequence: r.sequence,
        bundle: r.bundle.clone(),
        release: address.to_owned(),
        source_repository: m.source.repository.clone(),
        source_commit: m.source.commit.clone(),
        objects: m.entries.len(),
        created: r.created,
        expires: r.expires,
        expired: now >= r.expires,
    }
}

/// A newer verified release not adopted now (see [`Deferral`]). When
/// `manifest` is set it is *staged*: its manifest and every object are in
/// the store, verified, so adoption needs no source and mesh peers can
/// fetch it from this agent.
#[derive(Clone, Debug)]
struct PendingState {
    release: Release,
    bytes: Vec<u8>,
    address: String,
    manifest: Option<Manifest>,
    deferral: Deferral,
}

impl PendingState {
    fn status(&self) -> RolloutStatus {
        let (wave, opens_at) = match &self.deferral {
            Deferral::Rollout(Decision::WaitForWave { wave, opens_at }) => {
                (Some(*wave), Some(*opens_at))
            }
            _ => (None, None),
        };
        RolloutStatus {
            sequence: self.release.sequence,
            bundle: self.release.bundle.clone(),
            state: self.deferral.state().to_owned(),
            wave,
            opens_at,
            message: self.deferral.describe(format_time),
            staged: self.manifest.is_some(),
        }
    }

    fn published(&self) -> AdoptedHead {
        AdoptedHead {
            channel: self.release.channel.clone(),
            sequence: self.release.sequence,
            bundle: self.release.bundle.clone(),
            release_address: self.address.clone(),
        }
    }
}

/// What a [`Context`] borrows, owned: the current root, the roots of its
/// release epoch, and the adopted release (sequence and envelope bytes).
type ContextParts = (
    cairn_keys::Root,
    Vec<cairn_keys::Root>,
    Option<(u64, Vec<u8>)>,
);

struct State {
    root: VerifiedRoot,
    /// Every root of the verified chain, oldest first (`root` last): the
    /// release epoch and start-up re-verification need them.
    chain: Vec<cairn_keys::Root>,
    head: Option<HeadState>,
    pending: Option<PendingState>,
    last_good: Option<ReleaseStatus>,
    failed: Option<FailedRelease>,
    sources: BTreeMap<String, SourceStatus>,
    last_rejection: Option<RejectionStatus>,
    reconcile: Option<ReconcileStatus>,
    listen: Option<SocketAddr>,
}

struct Inner {
    config: Config,
    agent_id: String,
    store: Store,
    metrics: Metrics,
    limits: Limits,
    sources: SourceSet,
    target: Arc<dyn Target>,
    state: Mutex<State>,
    adopt_lock: tokio::sync::Mutex<()>,
    reconcile_lock: tokio::sync::Mutex<()>,
    /// Held while writing status.json; `status_slot` holds the newest
    /// document not yet written.
    status_lock: Mutex<()>,
    /// The hold file as last read (by [`Agent::current_hold`], off the
    /// runtime), for the synchronous [`Agent::status`]; and the last read
    /// error, logged once per change rather than once per read.
    hold: Mutex<(Option<Hold>, Option<String>)>,
    status_slot: Mutex<Option<Status>>,
    /// Woken when the store recovers from an IO error (sources retry now).
    store_recovered: tokio::sync::Notify,
    fleet_reports: Mutex<BTreeMap<String, FleetReports>>,
    adopted_tx: watch::Sender<Option<AdoptedHead>>,
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
                    channel: h.release.channel.clone(),
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
                    pending: None,
                    last_good,
                    sources: BTreeMap::new(),
                    last_rejection: None,
                    reconcile: None,
                    listen: None,
                }),
                adopt_lock: tokio::sync::Mutex::new(()),
                reconcile_lock: tokio::sync::Mutex::new(()),
                status_lock: Mutex::new(()),
                hold: Mutex::new((None, None)),
                status_slot: Mutex::new(None),
                store_recovered: tokio::sync::Notify::new(),
                fleet_reports: Mutex::new(BTreeMap::new()),
                adopted_tx,
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
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Db {
                dir: self.inner.config.data_dir.clone(),
                reason: format!("store task failed: {e}"),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The agent id (configured, or generated once and persisted).
    pub fn agent_id(&self) -> &str {
        &self.inner.agent_id
    }

    /// The store (read API for the mesh: heads, objects, roots, peers).
    pub fn store(&self) -> &Store {
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

    /// The newest verified release this agent holds for its channel: a
    /// staged pending release (newer than the adopted one, waiting for its
    /// wave, held or not selected) or else the adopted head. The mesh
    /// advertises and serves this one, so a release an agent defers still
    /// travels on through it.
    pub fn relay_head(&self) -> Option<AdoptedHead> {
        let st = self.state();
        let adopted = st.head.as_ref().map(HeadState::published);
        match st.pending.as_ref().filter(|p| p.manifest.is_some()) {
            Some(p)
                if adopted
                    .as_ref()
                    .is_none_or(|h| p.release.sequence > h.sequence) =>
            {
                Some(p.published())
            }
            _ => adopted,
        }
    }

    /// The envelope bytes of [`Agent::relay_head`] for `channel` (what a
    /// mesh peer gets for `channels/<channel>`).
    pub fn relay_release_bytes(&self, channel: &str) -> Option<Vec<u8>> {
        if channel == self.inner.config.channel {
            let st = self.state();
            let adopted_seq = st.head.as_ref().map(|h| h.release.sequence);
            if let Some(p) = st
                .pending
                .as_ref()
                .filter(|p| p.manifest.is_some() && Some(p.release.sequence) > adopted_seq)
            {
                return Some(p.bytes.clone());
            }
        }
        self.inner.store.head(channel).ok().flatten()
    }

    /// A receiver that changes whenever [`Agent::relay_head`] does (every
    /// adoption and every newly staged release).
    pub fn subscribe_relay(&self) -> watch::Receiver<Option<AdoptedHead>> {
        self.inner.relay_tx.subscribe()
    }

    fn publish_relay(&self) {
        let h = self.relay_head();
        self.inner.relay_tx.send_if_modified(|cur| {
            if *cur == h {
                false
            } else {
                *cur = h;
                true
            }
        });
    }

    /// The local hold file, read now (in a blocking task: the file is
    /// local input and must never stall the runtime). An unreadable file
    /// counts as a hold until released (the safe side), with a warning
    /// each time the reason changes.
    pub async fn current_hold(&self, now: u64) -> Option<Hold> {
        let dir = self.inner.config.data_dir.clone();
        let read = tokio::task::spawn_blocking(move || Hold::read(&dir))
            .await
            .unwrap_or_else(|e| Err(Error::Hold(format!("reading the hold file failed: {e}"))));
        let mut cache = self.inner.hold.lock().unwrap_or_else(|p| p.into_inner());
        let hold = match read {
            Ok(h) => {
                cache.1 = None;
                h
            }
            Err(e) => {
                let msg = e.to_string();
                if cache.1.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "treating adoption as held");
                    cache.1 = Some(msg);
                }
                Some(
                    cache
                        .0
                        .clone()
                        .filter(|h| h.until.is_none())
                        .unwrap_or(Hold {
                            since: now,
                            until: None,
                        }),
                )
            }
        };
        cache.0 = hold.clone();
        hold.filter(|h| h.active(now))
    }

    /// The hold as last read by [`Agent::current_hold`] (no IO).
    fn last_hold(&self, now: u64) -> Option<Hold> {
        let cache = self.inner.hold.lock().unwrap_or_else(|p| p.into_inner());
        cache.0.clone().filter(|h| h.active(now))
    }

    /// Checks every object of the adopted release; re-fetches missing or
    /// corrupt ones from the sources; fails if any stays missing.
    async fn repair_objects(&self) -> Result<()> {
        let Some(head) = self.state().head.clone() else {
            return Ok(());
        };
        let entries = head.manifest.clone();
        let missing = self
            .blocking(move |store| {
                let mut missing = Vec::new();
                for e in &entries.entries {
                    match store.get_object(&e.object) {
                        Ok(Some(_)) => {}
                        Ok(None) => missing.push(e.clone()),
                        Err(StoreError::Corrupt { reason, .. }) => {
                            tracing::warn!(object = %e.object, %reason, "corrupt object in the store; re-fetching");
                            store.remove_object(&e.object)?;
                            missing.push(e.clone());
                        }
                        Err(other) => return Err(other),
                    }
                }
                Ok(missing)
            })
            .await?;
        if missing.is_empty() {
            return Ok(());
        }
        let mut still = Vec::new();
        for e in &missing {
            if !self.fetch_object_anywhere(&e.object, e.size).await {
                still.push(e.display_name());
            }
        }
        self.blocking(|s| s.flush()).await?;
        if still.is_empty() {
            tracing::info!(
                count = missing.len(),
                "re-fetched missing objects of the adopted release"
            );
            return Ok(());
        }
        Err(Error::CorruptState {
            dir: self.inner.config.data_dir.clone(),
            detail: format!(
                "{} object(s) of adopted release {} are missing or corrupt and no source could provide them (first: {})",
                still.len(),
                head.release.sequence,
                still[0]
            ),
        })
    }

    /// Tries each source for an object, verifying it; stores it on success.
    async fn fetch_object_anywhere(&self, address: &str, size: u64) -> bool {
        let Some(rel) = object_path(address) else {
            return false;
        };
        for s in self.inner.sources.iter() {
            match s.get(&rel, size).await {
                Ok(Some(bytes)) => {
                    if pipeline::check_object_bytes(address, size, &bytes).is_ok() {
                        let a = address.to_owned();
                        if self
                            .blocking(move |s| s.put_object(&a, &bytes))
                            .await
                            .is_ok()
                        {
                            return true;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(source = s.name(), error = %e, "object fetch failed"),
            }
        }
        false
    }

    fn record_rejection(&self, source: &str, rej: &Rejection) -> SyncOutcome {
        let reason = rej.reason();
        tracing::warn!(source, reason, stage = %rej.stage, error = %rej.error, "rejected");
        self.inner.metrics.reject(reason);
        let r = RejectionStatus {
            at: unix_now(),
            source: source.to_owned(),
            reason: reason.to_owned(),
            message: rej.to_string(),
        };
        let mut st = self.state();
        st.last_rejection = Some(r.clone());
        st.sources
            .entry(source.to_owned())
            .or_default()
            .last_rejection = Some(r);
        SyncOutcome::Rejected { reason }
    }

    /// Syncs from one source: follows new roots, reads the channel's
    /// release, fetches only objects the store lacks, verifies everything
    /// through [`crate::pipeline`] and adopts atomically. Rejections are
    /// logged, counted and recorded in status, and leave the adopted state
    /// untouched. The mesh calls this with a peer as the source.
    pub async fn sync_from(
        &self,
        source: &dyn Source,
    ) -> std::result::Result<SyncOutcome, SyncError> {
        let name = source.name().to_owned();
        let started = unix_now();
        let result = self.sync_inner(source).await;
        let m = &self.inner.metrics;
        let sync_json = {
            let mut st = self.state();
            let s = st.sources.entry(name.clone()).or_default();
            s.source = name.clone();
            s.last_attempt = started;
            match &result {
                Ok(o) => {
                    s.last_success = Some(unix_now());
                    s.error = None;
                    s.note = match o {
                        SyncOutcome::Deferred { sequence, why } => {
                            Some(format!("release {sequence}: {why}"))
                        }
                        _ => None,
                    };
                    s.ok = !matches!(o, SyncOutcome::Rejected { .. });
                    s.result = match o {
                        SyncOutcome::UpToDate => "up-to-date",
                        SyncOutcome::NoRelease => "no-release",
                        SyncOutcome::Adopted { .. } => "adopted",
                        SyncOutcome::Deferred { .. } => "deferred",
                        SyncOutcome::Rejected { .. } => "rejected",
                    }
                    .into();
                }
                // A store error is this agent's disk, not the source: every
                // store call in a sync comes after a successful read from the
                // source, so the source counts as reached (not offline). The
                // error itself is reported as the store's (status `store`,
                // `cairn_store_up`, `/readyz`).
                Err(SyncError::Store(e)) => {
                    s.ok = true;
                    s.note = Some(format!("not stored: {e}"));
                    s.result = "store-error".into();
                    s.error = None;
                    s.last_success = Some(unix_now());
                }
                Err(e) => {
                    s.ok = false;
                    s.note = None;
                    s.result = "error".into();
                    s.error = Some(e.to_string());
                    if let SyncError::Source(se) = e {
                        if !matches!(se, SourceError::Unavailable { .. }) {
                            s.last_success = Some(unix_now());
                        }
                    }
                }
            }
            let up = matches!(
                &result,
                Ok(_)
                    | Err(SyncError::Store(_))
                    | Err(SyncError::Source(
                        SourceError::TooLarge { .. } | SourceError::Invalid { .. }
                    ))
            );
            m.source_up
                .get_or_create(&SourceLabel {
                    source: name.clone(),
                })
                .set(i64::from(up));
            serde_json::to_vec(&*s).ok()
        };
        if let Some(json) = sync_json {
            let n = name.clone();
            let _ = self.blocking(move |s| s.set_sync_status(&n, &json)).await;
        }
        if let Err(SyncError::Source(e)) = &result {
            m.fetch_errors
                .get_or_create(&SourceErrorLabel {
                    source: name.clone(),
                    kind: e.kind().to_owned(),
                })
                .inc();
            tracing::warn!(source = %name, error = %e, "source fetch failed");
        }
        self.publish_status();
        result
    }

    /// This agent as the rollout decision sees it (id, labels, and the
    /// fleet reports the mesh recorded for `bundle` via
    /// [`Agent::set_fleet_reports`]).
    pub fn audience(&self, bundle: &str) -> pipeline::Audience<'_> {
        let reports = self
            .inner
            .fleet_reports
            .lock()
            .map(|m| m.get(bundle).copied().unwrap_or_default())
            .unwrap_or_default();
        pipeline::Audience {
            agent_id: &self.inner.agent_id,
            labels: &self.inner.config.labels,
            reports,
        }
    }

    /// Records what gossip says about a bundle (adopters, failures), for the
    /// rollout circuit breaker. Called by the mesh.
    pub fn set_fleet_reports(&self, bundle: &str, reports: FleetReports) {
        if let Ok(mut m) = self.inner.fleet_reports.lock() {
            m.insert(bundle.to_owned(), reports);
        }
    }

    /// Replaces every bundle's fleet reports at once (the mesh, from its
    /// gossiped status view).
    pub fn replace_fleet_reports(&self, reports: BTreeMap<String, FleetReports>) {
        if let Ok(mut m) = self.inner.fleet_reports.lock() {
            *m = reports;
        }
    }

    /// The current root, the roots of its release epoch and the adopted
    /// release: what a [`Context`] borrows.
    fn context_parts(&self) -> ContextParts {
        let st = self.state();
        (
            st.root.root().clone(),
            cairn_keys::root::release_epoch(&st.chain).to_vec(),
            st.head
                .as_ref()
                .map(|h| (h.release.sequence, h.bytes.clone())),
        )
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
        let (_, epoch, adopted) = self.context_parts();
        adopted.is_some_and(|(sequence, bytes)| {
            cairn_core::verify::binding_floor(&epoch, Some((sequence, &bytes)), &self.inner.limits)
                .is_none()
        })
    }

    async fn sync_inner(&self, source: &dyn Source) -> std::result::Result<SyncOutcome, SyncError> {
        let name = source.name();
        let limits = &self.inner.limits;
        let channel = self.inner.config.channel.clone();
        let mut root_rejected = None;

        // 1. Roots: follow roots/<v+1> until the source has no more.
        loop {
            let current = self.state().root.clone();
            let next = current.root().version + 1;
            let Some(bytes) = source
                .get(&root_path(next), cairn_keys::root::MAX_ROOT_BYTES as u64)
                .await?
            else {
                break;
            };
            match pipeline::check_root(&current, &bytes) {
                Ok(vr) => {
                    self.blocking(move |s| s.put_root(next, &bytes)).await?;
                    tracing::info!(source = name, version = next, "trust root rotated");
                    self.inner.metrics.root_version.set(gauge(next));
                    let mut st = self.state();
                    if vr.root().starts_release_epoch(&st.chain) {
                        tracing::warn!(
                            source = name,
                            version = next,
                            "trust root v{next} replaces the release keys: a new release epoch starts; the adopted release stays enforced until one signed by the new release keys arrives, whatever its sequence"
                        );
                    }
                    st.chain.push(vr.root().clone());
                    st.root = vr;
                }
                Err(rej) => {
                    root_rejected = Some(self.record_rejection(name, &rej));
                    break;
                }
            }
        }

        // 2. The channel's release.
        let Some(release_bytes) = source
            .get(&channel_path(&channel), limits.max_release_bytes)
            .await?
        else {
            return Ok(root_rejected.unwrap_or(SyncOutcome::NoRelease));
        };
        let (root, epoch, adopted) = self.context_parts();
        let ctx = Context {
            root: &root,
            epoch: &epoch,
            channel: &channel,
            adopted: adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: unix_now(),
            limits,
        };
        let mut ingest = match Ingest::start(&ctx, &release_bytes) {
            Ok(Start::UpToDate) => return Ok(root_rejected.unwrap_or(SyncOutcome::UpToDate)),
            Ok(Start::Candidate(i)) => *i,
            Err(rej) => return Ok(self.record_rejection(name, &rej)),
        };
        let sequence = ingest.release().release().sequence;
        let now = unix_now();
        let hold = self.current_hold(now).await;
        let deferral = pipeline::adoption_gate(
            ingest.release().release(),
            &self.audience(&ingest.release().release().bundle),
            hold.as_ref(),
            now,
        );
        if let Some(d) = &deferral {
            let why = d.describe(format_time);
            // Stage (download and verify ahead) unless the release is not
            // for this agent at all and no mesh peer could want it from us.
            let stage = !matches!(d, Deferral::Rollout(Decision::NotSelected { .. }))
                || self.inner.config.mesh.is_some();
            let known = self
                .state()
                .pending
                .as_ref()
                .is_some_and(|p| p.bytes == ingest.release().bytes() && p.manifest.is_some());
            if !known {
                tracing::info!(source = name, sequence, %why, stage, "newer release not adopted now");
            }
            if !stage {
                self.set_pending(ingest.release(), None, d.clone());
                return Ok(SyncOutcome::Deferred { sequence, why });
            }
        } else {
            tracing::info!(source = name, channel = %channel, sequence, "new release found; fetching");
        }

        // 3. The bundle manifest (from the store if present).
        if let Want::Manifest { address, limit } = ingest.want() {
            let stored = {
                let a = address.clone();
                self.blocking(move |s| match s.bundle(&a)? {
                    Some(b) => Ok(Some(b)),
                    None => Ok(s.get_object(&a).ok().flatten()),
                })
                .await?
            };
            let bytes = match stored {
                Some(b) => Some(b),
                None => match object_path(&address) {
                    Some(p) => source.get(&p, limit).await?,
                    None => None,
                },
            };
            let Some(bytes) = bytes else {
                let rej = Rejection::new(
                    Stage::Manifest,
                    cairn_core::Error::ObjectMissing {
                        address,
                        what: "bundle manifest".into(),
                    },
                );
                return Ok(self.record_rejection(name, &rej));
            };
            if let Err(rej) = ingest.handle_manifest(&bytes) {
                return Ok(self.record_rejection(name, &rej));
            }
        }

        // 4. Only the objects the store lacks, a few at a time.
        if let Want::Objects(list) = ingest.want() {
            let mut to_fetch = Vec::new();
            let present = {
                let addrs: Vec<String> = list.iter().map(|(a, _)| a.clone()).collect();
                self.blocking(move |s| {
                    addrs
                        .iter()
                        .map(|a| s.has_object(a))
                        .collect::<std::result::Result<Vec<bool>, StoreError>>()
                })
                .await?
            };
            for ((address, size), present) in list.into_iter().zip(present) {
                if present {
                    ingest.mark_present(&address);
                } else {
                    to_fetch.push((address, size));
                }
            }
            let fetched = to_fetch.len();
            let mut stream = futures::stream::iter(to_fetch)
                .map(|(address, size)| async move {
                    let r = match object_path(&address) {
                        Some(p) => source.get(&p, size).await,
                        None => Ok(None),
                    };
                    (address, r)
                })
                .buffer_unordered(FETCH_CONCURRENCY);
            while let Some((address, r)) = stream.next().await {
                let Some(bytes) = r? else {
                    let what = ingest
                        .manifest()
                        .and_then(|m| m.entries.iter().find(|e| e.object == address))
                        .map(|e| e.display_name())
                        .unwrap_or_default();
                    let rej = Rejection::new(
                        Stage::Object,
                        cairn_core::Error::ObjectMissing { address, what },
                    );
                    return Ok(self.record_rejection(name, &rej));
                };
                if let Err(rej) = ingest.handle_object(&address, &bytes) {
                    return Ok(self.record_rejection(name, &rej));
                }
                self.blocking(move |s| s.put_object(&address, &bytes))
                    .await?;
            }
            tracing::debug!(source = name, fetched, "objects fetched");
        }

        // A deferred release is staged: its manifest goes into the object
        // store too (mesh peers fetch it by address), then it waits.
        if let Some(d) = deferral {
            if let Some(m) = ingest.manifest_bytes() {
                let (a, m) = (ingest.release().release().bundle.clone(), m.to_vec());
                self.blocking(move |s| s.put_object(&a, &m)).await?;
            }
            let why = d.describe(format_time);
            self.set_pending(ingest.release(), ingest.manifest().cloned(), d);
            return Ok(SyncOutcome::Deferred { sequence, why });
        }

        // 5. Commit: re-check against the head at this moment, then switch.
        let _guard = self.inner.adopt_lock.lock().await;
        let candidate_bytes = ingest.release().bytes().to_vec();
        let (root, epoch, adopted) = self.context_parts();
        let ctx = Context {
            root: &root,
            epoch: &epoch,
            channel: &channel,
            adopted: adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: unix_now(),
            limits,
        };
        let adoption = match ingest.finish(&ctx) {
            Ok(a) => a,
            Err(_) if adopted.as_ref().is_some_and(|(_, b)| *b == candidate_bytes) => {
                // Another source adopted this very release meanwhile.
                return Ok(SyncOutcome::UpToDate);
            }
            Err(rej) => return Ok(self.record_rejection(name, &rej)),
        };
        let rel = adoption.release().release();
        {
            // Durable before anything is reported, logged or acted on.
            let a = adoption.clone();
            self.blocking(move |s| s.adopt(&a)).await?;
        }
        let head = HeadState {
            address: cairn_keys::sha256_address(adoption.release().bytes()),
            release: rel.clone(),
            bytes: adoption.release().bytes().to_vec(),
            manifest: Arc::new(adoption.manifest().clone()),
        };
        let published = head.published();
        {
            let mut st = self.state();
            st.head = Some(head);
            if st
                .pending
                .as_ref()
                .is_some_and(|p| p.release.sequence <= rel.sequence)
            {
                st.pending = None;
            }
        }
        let m = &self.inner.metrics;
        m.adoptions.inc();
        m.adopted_sequence
            .get_or_create(&ChannelLabel {
                channel: channel.clone(),
            })
            .set(gauge(rel.sequence));
        tracing::info!(
            source = name,
            channel = %channel,
            sequence = rel.sequence,
            bundle = %rel.bundle,
            objects = adoption.manifest().entries.len(),
            "release adopted"
        );
        self.inner.adopted_tx.send_replace(Some(published));
        self.publish_relay();
        Ok(SyncOutcome::Adopted {
            sequence: rel.sequence,
        })
    }

    /// Records a deferred release (replacing an older or unstaged one).
    fn set_pending(
        &self,
        release: &cairn_core::verify::VerifiedRelease,
        manifest: Option<Manifest>,
        deferral: Deferral,
    ) {
        {
            let mut st = self.state();
            let keep = st.pending.as_ref().is_some_and(|p| {
                p.release.sequence > release.release().sequence
                    || (p.bytes == release.bytes() && p.manifest.is_some() && manifest.is_none())
            });
            if keep {
                if let Some(p) = st.pending.as_mut() {
                    if p.bytes == release.bytes() {
                        p.deferral = deferral;
                    }
                }
            } else {
                st.pending = Some(PendingState {
                    address: cairn_keys::sha256_address(release.bytes()),
                    release: release.release().clone(),
                    bytes: release.bytes().to_vec(),
                    manifest,
                    deferral,
                });
            }
        }
        self.publish_relay();
    }

    /// Asks the adoption gate again about the pending release (its wave may
    /// have opened, a hold ended, the breaker's counts changed) and adopts
    /// a staged one through the one adoption path when it passes. Runs
    /// every second in [`Agent::run`], so an agent that learned of the
    /// release only from a mesh peer adopts when its wave opens.
    pub async fn reevaluate_pending(&self) {
        let Some(p) = self.state().pending.clone() else {
            return;
        };
        if self
            .state()
            .head
            .as_ref()
            .is_some_and(|h| h.release.sequence >= p.release.sequence)
        {
            self.state().pending = None;
            self.publish_relay();
            return;
        }
        let now = unix_now();
        let hold = self.current_hold(now).await;
        let gate = pipeline::adoption_gate(
            &p.release,
            &self.audience(&p.release.bundle),
            hold.as_ref(),
            now,
        );
        match gate {
            Some(d) => {
                if d != p.deferral {
                    if let Some(cur) = self.state().pending.as_mut() {
                        if cur.bytes == p.bytes {
                            cur.deferral = d;
                        }
                    }
                    self.publish_status();
                }
            }
            // Not staged: the next poll of a source fetches it.
            None if p.manifest.is_none() => {}
            None => {
                let src = StagedRelease {
                    channel_path: channel_path(&self.inner.config.channel),
                    release: p.bytes.clone(),
                    store: self.inner.store.clone(),
                };
                match self.sync_inner(&src).await {
                    Ok(SyncOutcome::Rejected { reason }) => {
                        tracing::warn!(reason, "staged release no longer valid; dropped");
                        let mut st = self.state();
                        if st.pending.as_ref().is_some_and(|c| c.bytes == p.bytes) {
                            st.pending = None;
                        }
                    }
                    Ok(o) => tracing::debug!(outcome = ?o, "staged release re-evaluated"),
                    Err(e) => tracing::warn!(error = %e, "adopting the staged release failed"),
                }
                self.publish_relay();
                self.publish_status();
            }
        }
    }

    async fn pending_loop(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Keeps the hold shown in status current even with nothing
            // staged.
            let _ = self.current_hold(unix_now()).await;
            self.reevaluate_pending().await;
        }
    }

    /// Syncs every configured source once, concurrently.
    pub async fn sync_all(&self) -> Vec<(String, std::result::Result<SyncOutcome, SyncError>)> {
        let futs = self.inner.sources.iter().map(|s| {
            let s = s.clone();
            let this = self.clone();
            async move { (s.name().to_owned(), this.sync_from(s.as_ref()).await) }
        });
        futures::future::join_all(futs).await
    }

    /// Applies the adopted release to the target. Returns the report, or
    /// an error when nothing is adopted or the target failed.
    pub async fn reconcile(&self) -> Result<ApplyReport> {
        let _guard = self.inner.reconcile_lock.lock().await;
        let started = Instant::now();
        let channel = self.inner.config.channel.clone();
        let adopted = self.state().head.clone();
        let failed = self.state().failed.clone();
        // The release to enforce: the adopted one, unless it failed its
        // health checks, then the last-good one (not retried until a newer
        // release is adopted).
        let (mut head, mut result) = match &adopted {
            None => (
                None,
                Err(Error::NoRelease {
                    channel: channel.clone(),
                    detail: self.why_no_release(),
                }),
            ),
            Some(h)
                if failed
                    .as_ref()
                    .is_some_and(|f| f.sequence == h.release.sequence) =>
            {
                match self.last_good_state().await {
                    Some(lg) => {
                        let r = self.apply_head(&lg, failed.as_ref()).await;
                        (Some(lg), r)
                    }
                    None => (None, Err(Error::Status(format!(
                        "release {} failed its health checks and there is no last-good release to roll back to",
                        h.release.sequence
                    )))),
                }
            }
            Some(h) => {
                let r = self.apply_head(h, None).await;
                (Some(h.clone()), r)
            }
        };
        if let (Ok(report), Some(h)) = (&result, &adopted) {
            let is_last_good = self
                .state()
                .last_good
                .as_ref()
                .is_some_and(|lg| lg.sequence == h.release.sequence);
            if let (Some(reason), false) = (&report.unhealthy, is_last_good) {
                let f = FailedRelease {
                    sequence: h.release.sequence,
                    bundle: h.release.bundle.clone(),
                    reason: reason.clone(),
                    at: unix_now(),
                };
                tracing::error!(
                    sequence = f.sequence,
                    reason = %f.reason,
                    "release failed its health checks; rolling back to the last-good release"
                );
                if let Ok(json) = serde_json::to_vec(&f) {
                    let c = channel.clone();
                    if let Err(e) = self
                        .blocking(move |s| s.set_failed_release(&c, Some(&json)))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot record the failed release");
                    }
                }
                self.inner.metrics.rollbacks.inc();
                self.state().failed = Some(f.clone());
                if let Some(lg) = self.last_good_state().await {
                    result = self.apply_head(&lg, Some(&f)).await;
                    head = Some(lg);
                } else {
                    tracing::error!("no last-good release to roll back to");
                }
            }
        }
        let elapsed = started.elapsed();
        let m = &self.inner.metrics;
        m.reconcile_duration.observe(elapsed.as_secs_f64());
        let ok = matches!(&result, Ok(r) if r.in_sync());
        m.reconciles
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        let now = unix_now();
        if let Some(h) = &head {
            let expired = now >= h.release.expires;
            m.adopted_release_expired.set(i64::from(expired));
            if expired {
                tracing::warn!(
                    sequence = h.release.sequence,
                    "the enforced release has expired; keeping it (last-good) until a newer valid release arrives"
                );
            }
        }
        match &result {
            Ok(r) => {
                m.drift_corrections.inc_by(r.drift_corrected as u64);
                if r.created + r.updated + r.deleted + r.drift_corrected > 0 || !r.in_sync() {
                    tracing::info!(
                        created = r.created,
                        updated = r.updated,
                        deleted = r.deleted,
                        drift_corrected = r.drift_corrected,
                        conflicts = r.conflicts.len(),
                        "reconciled"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconcile failed"),
        }
        if let (true, Some(h)) = (ok, &head) {
            let (c, b) = (channel.clone(), h.bytes.clone());
            if let Err(e) = self.blocking(move |s| s.set_last_good(&c, &b)).await {
                tracing::warn!(error = %e, "cannot record last-good release");
            }
            m.last_good_sequence
                .get_or_create(&ChannelLabel {
                    channel: channel.clone(),
                })
                .set(gauge(h.release.sequence));
            self.state().last_good = Some(h.status(now));
        }
        self.state().reconcile = Some(ReconcileStatus {
            at: now,
            ok,
            sequence: head.as_ref().map(|h| h.release.sequence),
            duration_ms: elapsed.as_millis() as u64,
            report: result.as_ref().ok().cloned(),
            error: match &result {
                Ok(r) if !r.in_sync() => Some(format!("conflicts: {}", r.conflicts.join(" "))),
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            },
        });
        self.publish_status();
        result
    }

    /// The last-good release as a head, if its manifest is still stored.
    async fn last_good_state(&self) -> Option<HeadState> {
        let channel = self.inner.config.channel.clone();
        let bytes = self.blocking(move |s| s.last_good(&channel)).await.ok()??;
        let (_, release) =
            Release::decode_envelope(&bytes, self.inner.limits.max_release_bytes).ok()?;
        let bundle = release.bundle.clone();
        let manifest_bytes = self.blocking(move |s| s.bundle(&bundle)).await.ok()??;
        let manifest =
            Manifest::decode(&manifest_bytes, Some(&release.bundle), &self.inner.limits).ok()?;
        Some(HeadState {
            address: cairn_keys::sha256_address(&bytes),
            release,
            bytes,
            manifest: Arc::new(manifest),
        })
    }

    async fn apply_head(
        &self,
        h: &HeadState,
        failed: Option<&FailedRelease>,
    ) -> Result<ApplyReport> {
        // One blocking pass reads every object; missing or corrupt ones
        // (dropped) are fetched again from the sources.
        let manifest = h.manifest.clone();
        let mut read = self
            .blocking(move |store| {
                let mut out = Vec::with_capacity(manifest.entries.len());
                for e in &manifest.entries {
                    out.push(match store.get_object(&e.object) {
                        Ok(b) => b,
                        Err(StoreError::Corrupt { .. }) => {
                            let _ = store.remove_object(&e.object);
                            None
                        }
                        Err(other) => return Err(other),
                    });
                }
                Ok(out)
            })
            .await?;
        let mut objects = Vec::with_capacity(h.manifest.entries.len());
        for (e, bytes) in h.manifest.entries.iter().zip(read.iter_mut()) {
            let bytes = match bytes.take() {
                Some(b) => b,
                None => {
                    if !self.fetch_object_anywhere(&e.object, e.size).await {
                        return Err(Error::CorruptState {
                            dir: self.inner.config.data_dir.clone(),
                            detail: format!(
                                "object {} ({}) of the adopted release is missing and no source has it",
                                e.object,
                                e.display_name()
                            ),
                        });
                    }
                    let a = e.object.clone();
                    match self.blocking(move |s| s.get_object(&a)).await? {
                        Some(b) => b,
                        None => {
                            return Err(Error::Status(format!(
                                "object {} vanished from the store",
                                e.object
                            )))
                        }
                    }
                }
            };
            objects.push(DesiredObject {
                entry: e.clone(),
                bytes,
            });
        }
        let desired = Arc::new(DesiredState {
            channel: h.release.channel.clone(),
            sequence: h.release.sequence,
            bundle: h.release.bundle.clone(),
            objects,
            failed_release: failed.map(|f| (f.sequence, f.reason.clone())),
        });
        Ok(self.inner.target.apply(desired).await?)
    }

    fn why_no_release(&self) -> String {
        let st = self.state();
        let mut parts = Vec::new();
        if self.inner.sources.is_empty() {
            parts.push("no sources configured".to_owned());
        }
        for s in st.sources.values() {
            if let Some(e) = &s.error {
                parts.push(e.clone());
            } else if s.result == "no-release" {
                parts.push(format!(
                    "{}: no release published on this channel",
                    s.source
                ));
            }
        }
        if let Some(r) = &st.last_rejection {
            parts.push(format!("last rejection: {}", r.message));
        }
        if parts.is_empty() {
            parts.push("no source has been synced yet".into());
        }
        parts.join("; ")
    }

    /// Whether no source was reachable in its last attempt.
    pub fn is_offline(&self) -> bool {
        let st = self.state();
        !st.sources
            .values()
            .any(|s| s.last_success.is_some_and(|t| t >= s.last_attempt))
    }

    /// `(ready, reason)` as `/readyz` reports it: ready when a release is
    /// adopted and the last reconcile made the target match it.
    pub fn readiness(&self) -> (bool, String) {
        if let Some(e) = self.inner.store.failure() {
            return (
                false,
                format!("store: {e}; the agent retries by itself once the data directory takes writes again"),
            );
        }
        let st = self.state();
        match (&st.head, &st.reconcile) {
            (None, _) => (
                false,
                format!(
                    "no release adopted on channel `{}` yet",
                    self.inner.config.channel
                ),
            ),
            (Some(_), None) => (false, "not reconciled yet".into()),
            (Some(h), Some(r)) if r.ok && r.sequence == Some(h.release.sequence) => (
                true,
                format!(
                    "enforcing release {} on channel `{}`",
                    h.release.sequence, h.release.channel
                ),
            ),
            (Some(h), Some(r)) if r.ok => (
                false,
                format!("release {} adopted, not yet applied", h.release.sequence),
            ),
            (Some(_), Some(r)) => (
                false,
                format!(
                    "last reconcile failed: {}",
                    r.error.clone().unwrap_or_default()
                ),
            ),
        }
    }

    /// The current status document.
    pub fn status(&self) -> Status {
        let now = unix_now();
        let offline = self.is_offline();
        self.inner.metrics.offline.set(i64::from(offline));
        let store = self.store_status();
        let (ready, ready_reason) = self.readiness();
        let hold = self.last_hold(now).map(|h| HoldStatus {
            since: h.since,
            until: h.until,
        });
        let st = self.state();
        Status {
            format: STATUS_FORMAT,
            agent_id: self.inner.agent_id.clone(),
            pid: std::process::id(),
            updated: now,
            channel: self.inner.config.channel.clone(),
            labels: self.inner.config.labels.clone(),
            target: self.inner.target.describe(),
            listen: st.listen.map(|a| a.to_string()),
            root: RootStatus::new(st.root.root(), now),
            adopted: st.head.as_ref().map(|h| h.status(now)),
            last_good: st.last_good.clone(),
            failed_release: st.failed.clone(),
            rollout: st.pending.as_ref().map(PendingState::status),
            hold,
            offline,
            sources: st.sources.values().cloned().collect(),
            last_rejection: st.last_rejection.clone(),
            reconcile: st.reconcile.clone(),
            ready,
            ready_reason,
            store,
        }
    }

    /// The store's health, also refreshing `cairn_store_up` and
    /// `cairn_store_errors_total`.
    fn store_status(&self) -> StoreStatus {
        let store = &self.inner.store;
        let error = store.failure();
        let errors = store.error_count();
        let m = &self.inner.metrics;
        m.store_up.set(i64::from(error.is_none()));
        let counted = m.store_errors.get();
        if errors > counted {
            m.store_errors.inc_by(errors - counted);
        }
        StoreStatus {
            ok: error.is_none(),
            error,
            errors,
        }
    }

    /// Writes the status document to `<dataDir>/status.json` (atomically)
    /// on a blocking thread; the newest document always wins.
    pub fn publish_status(&self) {
        self.stage_status();
        let agent = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || agent.write_staged_status());
            }
            Err(_) => agent.write_staged_status(),
        }
    }

    /// [`Agent::publish_status`], returning once the file is written.
    pub async fn publish_status_now(&self) {
        self.stage_status();
        let agent = self.clone();
        let _ = tokio::task::spawn_blocking(move || agent.write_staged_status()).await;
    }

    fn stage_status(&self) {
        let s = self.status();
        *self
            .inner
            .status_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    fn write_staged_status(&self) {
        let _g = self
            .inner
            .status_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let staged = self
            .inner
            .status_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = staged {
            // Status writes need no free space (see `Status::write`), so a
            // full data directory is reported, not left stale.
            if let Err(e) = s.write(&self.inner.config.data_dir) {
                tracing::warn!(error = %e, "cannot write the status file");
            }
        }
    }

    /// Records the bound HTTP address (shown in status).
    pub fn set_listen(&self, addr: SocketAddr) {
        self.state().listen = Some(addr);
        self.publish_status();
    }

    /// One sync of every source, one reconcile; `Ok` when the target
    /// matches the adopted release (`cairn-agent run --once`).
    pub async fn run_once(&self) -> Result<ApplyReport> {
        let result = self.sync_and_reconcile_once().await;
        // The process exits right after: write the final status.json here,
        // on every path (status writes elsewhere are fire-and-forget and
        // may not have run yet).
        self.publish_status_now().await;
        result
    }

    async fn sync_and_reconcile_once(&self) -> Result<ApplyReport> {
        self.sync_all().await;
        let report = self.reconcile().await?;
        let failed = self.state().failed.clone();
        let h = self.adopted();
        if let (Some(f), Some(h)) = (&failed, &h) {
            if f.sequence == h.sequence {
                return Err(Error::NotInSync {
                    channel: self.inner.config.channel.clone(),
                    sequence: h.sequence,
                    detail: format!(
                        "the release failed its health checks ({}); the last-good release is enforced instead",
                        f.reason
                    ),
                });
            }
        }
        if !report.in_sync() {
            return Err(Error::NotInSync {
                channel: self.inner.config.channel.clone(),
                sequence: h.map(|h| h.sequence).unwrap_or(0),
                detail: report
                    .unhealthy
                    .iter()
                    .cloned()
                    .chain(report.conflicts.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        self.blocking(|s| s.flush()).await?;
        Ok(report)
    }

    /// Runs until `shutdown` resolves: one polling task per source (with
    /// backoff on failure), the reconcile loop, and the HTTP listener if
    /// configured.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(addr) = self.inner.config.listen_http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Io {
                    what: format!("listen.http {addr}"),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| Error::Io {
                what: format!("listen.http {addr}"),
                source,
            })?;
            tracing::info!(address = %bound, "serving /healthz /readyz /metrics");
            self.set_listen(bound);
            let agent = self.clone();
            tasks.spawn(async move { crate::http::serve(listener, agent).await });
        }
        if let Some(mesh) = self.inner.config.mesh.clone() {
            let metrics = self.inner.metrics.mesh.clone();
            let mesh = crate::mesh::Mesh::bind(self.clone(), mesh, metrics)
                .await
                .map_err(|e| {
                    Error::Config(crate::config::ConfigError {
                        lines: vec![format!("mesh: {e}")],
                    })
                })?;
            tasks.spawn(mesh.run());
        }
        for source in self.inner.sources.iter().cloned() {
            let agent = self.clone();
            tasks.spawn(async move { agent.poll_source(source).await });
        }
        let agent = self.clone();
        tasks.spawn(async move { agent.reconcile_loop().await });
        let agent = self.clone();
        tasks.spawn(async move { agent.pending_loop().await });
        let agent = self.clone();
        tasks.spawn(async move { agent.store_recovery_loop().await });
        if self.inner.sources.is_empty() {
            tracing::warn!("no sources configured: enforcing the stored state only");
        }
        shutdown.await;
        tracing::info!("shutting down");
        tasks.abort_all();
        // The last status and flush get a few seconds: a store stuck on a
        // failing disk must not keep the agent from stopping (everything
        // adopted is durable already; this only saves sync results).
        let agent = self.clone();
        let last = tokio::task::spawn_blocking(move || {
            agent.stage_status();
            agent.write_staged_status();
            agent.inner.store.flush()
        });
        match tokio::time::timeout(SHUTDOWN_GRACE, last).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "final store flush failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "final store flush failed"),
            Err(_) => tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "final store flush did not finish; stopping anyway"
            ),
        }
        Ok(())
    }

    /// Reopens the store after an IO error (a full disk, say) once it takes
    /// writes again, then picks up what is durable in it and wakes the
    /// sources, so no restart is needed.
    async fn store_recovery_loop(&self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.inner.store.failure().is_none() {
                backoff.reset();
                continue;
            }
            match self.blocking(|s| s.recover()).await {
                Ok(()) => {
                    tracing::info!("store recovered: the data directory takes writes again");
                    backoff.reset();
                    self.reload_head().await;
                    self.inner.store_recovered.notify_waiters();
                    self.publish_status();
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "store still failing");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// After a store recovery: the durable head is the truth. An adoption
    /// whose flush failed was never reported; if it reached the disk anyway
    /// it is picked up here (verified again), otherwise the old head stays.
    async fn reload_head(&self) {
        let roots = self.state().chain.clone();
        let config = self.inner.config.clone();
        let store = self.inner.store.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            load_head(&store, &roots, &config, &Limits::default(), unix_now())
        })
        .await;
        let head = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "stored head unreadable after store recovery");
                return;
            }
            Err(_) => return,
        };
        let Some(head) = head else { return };
        let changed = self
            .state()
            .head
            .as_ref()
            .is_none_or(|h| h.bytes != head.bytes);
        if !changed {
            return;
        }
        let published = head.published();
        tracing::info!(
            channel = %head.release.channel,
            sequence = head.release.sequence,
            "release adopted (found durable in the store after recovery)"
        );
        self.inner
            .metrics
            .adopted_sequence
            .get_or_create(&ChannelLabel {
                channel: head.release.channel.clone(),
            })
            .set(head.release.sequence as i64);
        self.state().head = Some(head);
        self.inner.adopted_tx.send_replace(Some(published));
        self.publish_relay();
    }

    async fn poll_source(&self, source: Arc<dyn Source>) {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(
            Duration::from_secs(1).min(cfg.poll_interval),
            cfg.max_backoff,
        );
        loop {
            let synced = self.sync_from(source.as_ref()).await;
            release_freed_memory();
            let delay = match synced {
                Ok(_) => {
                    backoff.reset();
                    jitter(cfg.poll_interval, 0.1)
                }
                Err(SyncError::Source(_)) => {
                    let d = backoff.next_delay();
                    tracing::debug!(
                        source = source.name(),
                        delay_ms = d.as_millis() as u64,
                        "retrying after backoff"
                    );
                    d
                }
                Err(SyncError::Store(e)) => {
                    tracing::error!(error = %e, "store error during sync");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.inner.store_recovered.notified() => backoff.reset(),
            }
        }
    }

    async fn reconcile_loop(&self) {
        let mut rx = self.subscribe();
        loop {
            let _ = self.reconcile().await;
            release_freed_memory();
            tokio::select! {
                _ = tokio::time::sleep(jitter(self.inner.config.reconcile_interval, 0.05)) => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Hands memory freed by a sync or reconcile (fetched objects, the desired
/// state, plans) back to the OS. glibc keeps freed heap pages in its
/// arenas, so without this the idle agent stays at its peak RSS (measured
/// with 9,000 objects: about 55 MiB before, 29 MiB after; see
/// docs/PERFORMANCE.md).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own
    // arenas to the kernel; it frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A staged release as a [`Source`]: the envelope from memory, everything
/// else (manifest, objects) from the store, where staging put it verified.
struct StagedRelease {
    channel_path: String,
    release: Vec<u8>,
    store: Store,
}

impl Source for StagedRelease {
    fn name(&self) -> &str {
        "staged"
    }

    fn get<'a>(
        &'a self,
        rel_path: &'a str,
        limit: u64,
    ) -> crate::BoxFuture<'a, std::result::Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            if rel_path == self.channel_path {
                return Ok(Some(self.release.clone()).filter(|b| b.len() as u64 <= limit));
            }
            let Some(hex) = rel_path
                .strip_prefix("objects/sha256/")
                .and_then(|r| r.split('/').nth(1))
            else {
                return Ok(None);
            };
            Ok(self
                .store
                .get_object(&format!("sha256:{hex}"))
                .ok()
                .flatten()
                .filter(|b| b.len() as u64 <= limit))
        })
    }
}

/// A sequence or version as a gauge value: saturating at `i64::MAX`, so a
/// forged release at 2^64 − 1 reads as a huge number, never as −1.
fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What [`Agent::open`] reads from the store, verified.
struct LoadedState {
    agent_id: String,
    chain: RootChain,
    head: Option<HeadState>,
    last_good: Option<ReleaseStatus>,
    failed: Option<FailedRelease>,
}

/// Reads and verifies the stored state (blocking: call from a blocking
/// thread): agent id, root chain, adopted head, last-good, failed release.
fn load_stored(
    store: &Store,
    config: &Config,
    embedded: VerifiedRoot,
    now: u64,
) -> Result<LoadedState> {
    let data_dir = &config.data_dir;
    let corrupt = |detail: String| Error::CorruptState {
        dir: data_dir.clone(),
        detail,
    };
    let agent_id = match (&config.agent_id, store.agent_id()?) {
        (Some(c), Some(s)) if *c == s => s,
        (Some(c), _) => {
            store.set_agent_id(c)?;
            c.clone()
        }
        (None, Some(s)) => s,
        (None, None) => {
            // A new data directory: if the target says which agent
            // manages it (its ownership record), this is that agent.
            let recorded = target::recorded_agent_id(&config.target);
            if let Some(id) = &recorded {
                tracing::info!(agent_id = %id, "agent id taken from the target's ownership record");
            }
            let id = recorded.unwrap_or_else(generate_agent_id);
            store.set_agent_id(&id)?;
            id
        }
    };
    let stored_roots = store.roots()?;
    let rest: Vec<&[u8]> = stored_roots
        .iter()
        .filter(|(v, _)| *v > embedded.root().version)
        .map(|(_, b)| b.as_slice())
        .collect();
    let chain = RootChain::follow(embedded, rest, now)
        .map_err(|e| corrupt(format!("stored root chain: {e}")))?;
    let limits = Limits::default();
    let head = load_head(store, &chain.roots, config, &limits, now)?;
    let last_good = match store.last_good(&config.channel)? {
        None => None,
        Some(bytes) => {
            let (_, rel) = Release::decode_envelope(&bytes, limits.max_release_bytes)
                .map_err(|e| corrupt(format!("last-good release: {e}")))?;
            let m = store
                .bundle(&rel.bundle)?
                .and_then(|b| Manifest::decode(&b, Some(&rel.bundle), &limits).ok());
            m.map(|m| release_status(&rel, &cairn_keys::sha256_address(&bytes), &m, now))
        }
    };
    // A failed release stays failed (not retried) while it is the head.
    let failed = store
        .failed_release(&config.channel)?
        .and_then(|b| serde_json::from_slice::<FailedRelease>(&b).ok())
        .filter(|f| {
            head.as_ref()
                .is_some_and(|h| h.release.sequence == f.sequence)
        });
    Ok(LoadedState {
        agent_id,
        chain,
        head,
        last_good,
        failed,
    })
}

/// The stored head of the configured channel, re-verified against `root`
/// (blocking).
fn load_head(
    store: &Store,
    roots: &[cairn_keys::Root],
    config: &Config,
    limits: &Limits,
    now: u64,
) -> Result<Option<HeadState>> {
    let corrupt = |detail: String| Error::CorruptState {
        dir: config.data_dir.clone(),
        detail,
    };
    let Some(bytes) = store.head(&config.channel)? else {
        return Ok(None);
    };
    let (_, rel) = Release::decode_envelope(&bytes, limits.max_release_bytes).map_err(|e| {
        corrupt(format!(
            "adopted release of channel `{}`: {e}",
            config.channel
        ))
    })?;
    let manifest_bytes = store.bundle(&rel.bundle)?.ok_or_else(|| {
        corrupt(format!(
            "bundle manifest {} of the adopted release is missing",
            rel.bundle
        ))
    })?;
    let (verified, manifest) =
        pipeline::reverify_adopted(roots, &config.channel, limits, now, &bytes, &manifest_bytes)
            .map_err(|r| {
                corrupt(format!(
                    "adopted release of channel `{}`: {r}",
                    config.channel
                ))
            })?;
    Ok(Some(HeadState {
        address: cairn_keys::sha256_address(&bytes),
        release: verified.release().clone(),
        bytes,
        manifest: Arc::new(manifest),
    }))
}

fn generate_agent_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("agent-{:012x}", n & 0xffff_ffff_ffff)
}
