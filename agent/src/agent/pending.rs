use super::deferred::{PendingState, Step};
use super::run::StagedRelease;
use super::*;

impl Agent {
    /// The newest verified release this agent holds for its channel: a
    /// staged pending release (newer than the adopted one, waiting for its
    /// wave, held or not selected) or else the adopted head. The mesh
    /// advertises and serves this one, so a release an agent defers still
    /// travels on through it.
    pub fn relay_head(&self) -> Option<AdoptedHead> {
        let st = self.state();
        match st.deferred.relayed() {
            Some(p) => Some(p.published()),
            None => st.head.as_ref().map(HeadState::published),
        }
    }

    /// The envelope bytes of [`Agent::relay_head`] for `channel` (what a
    /// mesh peer gets for `channels/<channel>`).
    pub fn relay_release_bytes(&self, channel: &str) -> Option<Vec<u8>> {
        if channel == self.inner.config.channel {
            let st = self.state();
            if let Some(p) = st.deferred.relayed() {
                return Some(p.bytes.clone());
            }
            if let Some(h) = &st.head {
                return Some(h.bytes.clone());
            }
        }
        // Blocking: the mesh calls this from a blocking thread.
        self.inner.store.blocking().head(channel).ok().flatten()
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
        let hold = {
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
            hold
        };
        let changed = self
            .state()
            .deferred
            .hold_read(hold.clone(), now.saturating_mul(1000).max(unix_now_ms()));
        if changed {
            self.publish_status();
        }
        self.note_hold(hold.as_ref(), now).await;
        hold.filter(|h| h.active(now))
    }

    /// The hold as last read by [`Agent::current_hold`] (no IO).
    pub(super) fn last_hold(&self, now: u64) -> Option<Hold> {
        self.state()
            .deferred
            .hold(now.saturating_mul(1000))
            .cloned()
    }

    /// Records a deferred release (replacing an older or unstaged one) in
    /// the [`Deferred`] machine and wakes its loop.
    pub(super) fn set_pending(
        &self,
        release: &cairn_core::verify::VerifiedRelease,
        manifest: Option<Manifest>,
        deferral: Deferral,
    ) {
        self.state()
            .deferred
            .defer(release.release(), release.bytes(), manifest, deferral);
        self.inner.deferred_wake.notify_one();
        self.publish_relay();
    }

    /// Drives the [`Deferred`] machine: reads the hold file when it asks,
    /// publishes a changed deferral, adopts a staged release through the
    /// one adoption path when the gate opens (its wave opened, a hold
    /// ended, the breaker's counts changed), so an agent that learned of
    /// the release only from a mesh peer adopts when its wave opens. Sleeps
    /// until the machine's [`Deferred::poll_timeout`] or an input.
    pub(super) async fn deferred_loop(&self) {
        loop {
            let now_ms = unix_now_ms();
            let bundle = self
                .state()
                .deferred
                .pending()
                .map(|p| p.release.bundle.to_string())
                .unwrap_or_default();
            let who = self.audience(&bundle);
            let step = self.state().deferred.poll(now_ms, &who);
            match step {
                Step::ReadHold => {
                    // Feeds the machine (see `current_hold`).
                    let _ = self.current_hold(now_ms / 1000).await;
                    continue;
                }
                Step::Changed => {
                    self.note_pending().await;
                    self.publish_relay();
                    self.publish_status();
                    continue;
                }
                Step::Adopt(p) => {
                    self.adopt_staged(&p).await;
                    continue;
                }
                Step::Idle => {}
            }
            let wake = self.state().deferred.poll_timeout();
            let delay = wake.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis(t.saturating_sub(unix_now_ms()))
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.inner.deferred_wake.notified() => {}
            }
        }
    }

    /// Adopts a staged release whose gate opened: the envelope from memory,
    /// manifest and objects from the store, through [`Agent::sync_from`]'s
    /// pipeline (everything verified again).
    async fn adopt_staged(&self, p: &PendingState) {
        let src = StagedRelease {
            channel: self.inner.config.channel.clone(),
            release: p.bytes.clone(),
            store: self.inner.store.clone(),
        };
        let rejected = match self.sync_inner(&src).await {
            Ok(SyncOutcome::Rejected { reason }) => {
                tracing::warn!(reason, "staged release no longer valid; dropped");
                true
            }
            Ok(o) => {
                tracing::debug!(outcome = ?o, "staged release re-evaluated");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "adopting the staged release failed");
                false
            }
        };
        self.state().deferred.adoption_done(&p.bytes, rejected);
        self.publish_relay();
        self.publish_status();
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
            if m.insert(bundle.to_owned(), reports) == Some(reports) {
                return;
            }
        }
        self.state().deferred.fleet_changed();
        self.inner.deferred_wake.notify_one();
    }

    /// Replaces every bundle's fleet reports at once (the mesh, from its
    /// gossiped status view).
    pub fn replace_fleet_reports(&self, reports: BTreeMap<String, FleetReports>) {
        if let Ok(mut m) = self.inner.fleet_reports.lock() {
            if *m == reports {
                return;
            }
            *m = reports;
        }
        self.state().deferred.fleet_changed();
        self.inner.deferred_wake.notify_one();
    }
}
