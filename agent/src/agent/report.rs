use super::*;

impl Agent {
    pub(super) fn why_no_release(&self) -> String {
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
            rollout: st.deferred.pending().map(deferred::PendingState::status),
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
    pub(super) fn store_status(&self) -> StoreStatus {
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
    /// on the status writer's thread; the newest document always wins.
    pub fn publish_status(&self) {
        self.inner.status_writer.publish(self.status());
    }

    /// [`Agent::publish_status`], returning once the file is written.
    pub async fn publish_status_now(&self) {
        let generation = self.inner.status_writer.publish(self.status());
        self.inner.status_writer.written(generation).await;
    }

    /// Records the bound HTTP address (shown in status).
    pub fn set_listen(&self, addr: SocketAddr) {
        self.state().listen = Some(addr);
        self.publish_status();
    }
}
