use super::*;
use crate::ingest::{self, BoxFuture, DriveError, Driven, Gate, Local, Snapshot};
use cairn_core::verify::VerifiedRelease;

impl Agent {
    pub(super) fn record_rejection(&self, source: &str, rej: &Rejection) -> SyncOutcome {
        let reason = rej.reason();
        tracing::warn!(source, reason, stage = %rej.stage, error = %rej.error, "rejected");
        drop(self.note_rejection(source, reason, rej.to_string()));
        SyncOutcome::Rejected { reason }
    }

    /// Counts a rejected release and records it as the last rejection,
    /// overall and for `source`; returns the state, still locked, for a
    /// caller that records more about it.
    pub(super) fn note_rejection(
        &self,
        source: &str,
        reason: &str,
        message: String,
    ) -> MutexGuard<'_, State> {
        self.inner.metrics.reject(reason);
        let r = RejectionStatus {
            at: unix_now(),
            source: source.to_owned(),
            reason: reason.to_owned(),
            message,
        };
        let mut st = self.state();
        st.last_rejection = Some(r.clone());
        st.sources
            .entry(source.to_owned())
            .or_default()
            .last_rejection = Some(r);
        st
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

    /// The current root, the roots of its release epoch, the adopted
    /// release and `now`: what every pipeline [`Context`](cairn_core::pipeline::Context) is built from.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.state();
        Snapshot {
            root: st.root.root().clone(),
            epoch: cairn_keys::root::release_epoch(&st.chain).to_vec(),
            adopted: st
                .head
                .as_ref()
                .map(|h| (h.release.sequence, h.bytes.clone())),
            now: unix_now(),
        }
    }

    /// One ingest from `source` through [`ingest::drive`], then the commit.
    pub(super) async fn sync_inner(
        &self,
        source: &dyn Source,
    ) -> std::result::Result<SyncOutcome, SyncError> {
        let name = source.name();
        let limits = &self.inner.limits;
        let channel = self.inner.config.channel.clone();
        let local = AgentLocal {
            agent: self,
            source: name,
        };
        let outcome = ingest::drive(source, &local, &channel, limits, FETCH_CONCURRENCY)
            .await
            .map_err(|e| match e {
                DriveError::Fetch(e) => SyncError::Source(e),
                DriveError::Local(e) => SyncError::Store(e),
            })?;
        let root_rejected = outcome
            .root_rejected
            .map(|reason| SyncOutcome::Rejected { reason });
        let ingest = match outcome.driven {
            Driven::NoRelease => return Ok(root_rejected.unwrap_or(SyncOutcome::NoRelease)),
            Driven::UpToDate => return Ok(root_rejected.unwrap_or(SyncOutcome::UpToDate)),
            Driven::Rejected(rej) => return Ok(self.record_rejection(name, &rej)),
            Driven::Deferred { ingest, deferral } => {
                let sequence = ingest.release().release().sequence;
                let why = deferral.describe(format_time);
                let staged = ingest.manifest().is_some() && matches!(ingest.want(), Want::Complete);
                let manifest = staged.then(|| ingest.manifest().cloned()).flatten();
                self.set_pending(ingest.release(), manifest, deferral);
                return Ok(SyncOutcome::Deferred { sequence, why });
            }
            Driven::Ready(ingest) => ingest,
        };
        self.commit(name, *ingest).await
    }

    /// Commits a complete candidate: re-checks it against the head at this
    /// moment, adopts it durably, then reports and publishes it.
    async fn commit(
        &self,
        name: &str,
        ingest: Ingest,
    ) -> std::result::Result<SyncOutcome, SyncError> {
        let channel = self.inner.config.channel.clone();
        let _guard = self.inner.adopt_lock.lock().await;
        let candidate_bytes = ingest.release().bytes().to_vec();
        let snapshot = self.snapshot();
        let adoption = match ingest.finish(&snapshot.context(&channel, &self.inner.limits)) {
            Ok(a) => a,
            Err(_)
                if snapshot
                    .adopted
                    .as_ref()
                    .is_some_and(|(_, b)| *b == candidate_bytes) =>
            {
                // Another source adopted this very release meanwhile.
                return Ok(SyncOutcome::UpToDate);
            }
            Err(rej) => return Ok(self.record_rejection(name, &rej)),
        };
        // Shared, not cloned: the manifest of a large bundle is MiBs.
        let adoption = Arc::new(adoption);
        if let Some(outcome) = self.site_gate(name, &adoption).await {
            return Ok(outcome);
        }
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
            summary: ManifestSummary::of(adoption.manifest()),
        };
        let published = head.published();
        {
            let mut st = self.state();
            st.head = Some(head);
            st.deferred.adopted(rel.sequence);
        }
        self.inner.deferred_wake.notify_one();
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
        self.notify(
            crate::notify::EventKind::Adopted,
            Some((rel.sequence, &rel.bundle)),
            format!(
                "release {} (bundle {}) adopted on channel {channel}",
                rel.sequence, rel.bundle
            ),
        )
        .await;
        Ok(SyncOutcome::Adopted {
            sequence: rel.sequence,
        })
    }
}

/// The agent as the ingest driver's [`Local`]: store calls on blocking
/// threads, roots and the gate through the agent's state.
struct AgentLocal<'a> {
    agent: &'a Agent,
    source: &'a str,
}

impl Local for AgentLocal<'_> {
    type Error = StoreError;

    fn root(&self) -> VerifiedRoot {
        self.agent.state().root.clone()
    }

    fn root_accepted(
        &self,
        version: u64,
        bytes: Vec<u8>,
        vr: VerifiedRoot,
    ) -> BoxFuture<'_, std::result::Result<(), StoreError>> {
        Box::pin(async move {
            let name = self.source;
            self.agent
                .blocking(move |s| s.put_root(version, &bytes))
                .await?;
            tracing::info!(source = name, version, "trust root rotated");
            self.agent.inner.metrics.root_version.set(gauge(version));
            let mut st = self.agent.state();
            if vr.root().starts_release_epoch(&st.chain) {
                tracing::warn!(
                    source = name,
                    version,
                    "trust root v{version} replaces the release keys: a new release epoch starts; the adopted release stays enforced until one signed by the new release keys arrives, whatever its sequence"
                );
            }
            st.chain.push(vr.root().clone());
            st.root = vr;
            Ok(())
        })
    }

    fn root_rejected(&self, rejection: &Rejection) {
        self.agent.record_rejection(self.source, rejection);
    }

    fn snapshot(&self) -> Snapshot {
        self.agent.snapshot()
    }

    fn gate<'a>(&'a self, release: &'a VerifiedRelease) -> BoxFuture<'a, Gate> {
        Box::pin(async move {
            let agent = self.agent;
            let now = unix_now();
            let hold = agent.current_hold(now).await;
            let deferral = pipeline::adoption_gate(
                release.release(),
                &agent.audience(&release.release().bundle),
                hold.as_ref(),
                now,
            );
            // Stage (download and verify ahead) unless the release is not
            // for this agent at all and no mesh peer could want it from us.
            let stage = !matches!(
                deferral,
                Some(Deferral::Rollout(Decision::NotSelected { .. }))
            ) || agent.inner.config.mesh.is_some();
            if let Some(d) = &deferral {
                agent.note_deferral(release.release(), d).await;
                let known = agent
                    .state()
                    .deferred
                    .pending()
                    .is_some_and(|p| p.bytes == release.bytes() && p.manifest.is_some());
                if !known {
                    let why = d.describe(format_time);
                    tracing::info!(source = self.source, sequence = release.release().sequence, %why, stage, "newer release not adopted now");
                }
            }
            Gate { deferral, stage }
        })
    }

    fn stored_manifest<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, std::result::Result<Option<Vec<u8>>, StoreError>> {
        let a = address.to_owned();
        Box::pin(self.agent.blocking(move |s| match s.bundle(&a)? {
            Some(b) => Ok(Some(b)),
            None => Ok(s.get_object(&a).ok().flatten()),
        }))
    }

    fn present(
        &self,
        addresses: Vec<String>,
    ) -> BoxFuture<'_, std::result::Result<Vec<bool>, StoreError>> {
        Box::pin(
            self.agent
                .blocking(move |s| addresses.iter().map(|a| s.has_object(a)).collect()),
        )
    }

    fn put_object(
        &self,
        address: String,
        bytes: Vec<u8>,
    ) -> BoxFuture<'_, std::result::Result<(), StoreError>> {
        Box::pin(self.agent.blocking(move |s| s.put_object(&address, &bytes)))
    }
}
