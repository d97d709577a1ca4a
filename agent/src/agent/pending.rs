use super::*;
use super::run::StagedRelease;

impl Agent {
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

    pub(super) fn publish_relay(&self) {
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
    pub(super) fn last_hold(&self, now: u64) -> Option<Hold> {
        let cache = self.inner.hold.lock().unwrap_or_else(|p| p.into_inner());
        cache.0.clone().filter(|h| h.active(now))
    }

    /// Records a deferred release (replacing an older or unstaged one).
    pub(super) fn set_pending(
        &self,
        release: &cairn_bundle::verify::VerifiedRelease,
        manifest: Option<Manifest>,
        deferral: Deferral,
    ) {
        {
            let mut st = self.state();
            let keep = st.pending.as_ref().is_some_and(|p| {
                p.release.sequence > release.release.sequence
                    || (p.bytes == release.bytes && p.manifest.is_some() && manifest.is_none())
            });
            if keep {
                if let Some(p) = st.pending.as_mut() {
                    if p.bytes == release.bytes {
                        p.deferral = deferral;
                    }
                }
            } else {
                st.pending = Some(PendingState {
                    address: cairn_keys::sha256_address(&release.bytes),
                    release: release.release.clone(),
                    bytes: release.bytes.clone(),
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

    pub(super) async fn pending_loop(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Keeps the hold shown in status current even with nothing
            // staged.
            let _ = self.current_hold(unix_now()).await;
            self.reevaluate_pending().await;
        }
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
}
