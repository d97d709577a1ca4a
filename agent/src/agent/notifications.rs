//! Where the agent's events meet [`crate::notify`]: small helpers the
//! runtime calls where each event happens.

use super::*;
use crate::notify::EventKind;

impl Agent {
    /// Records `kind` durably in the notification outbox (no-op without
    /// `notifications:`).
    pub(super) async fn notify(
        &self,
        kind: EventKind,
        release: Option<(u64, &str)>,
        message: String,
    ) {
        self.inner.notifier.emit(kind, release, message, None).await;
    }

    /// The hold read at `now` is `active` or not: notifies a change (also
    /// one that happened while the agent was down: the last notified state
    /// is kept in the store).
    pub(super) async fn note_hold(&self, hold: Option<&Hold>, now: u64) {
        if !self.inner.notifier.enabled() {
            return;
        }
        let active = hold.is_some_and(|h| h.active(now));
        {
            let mut last = self
                .inner
                .hold_notified
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *last == Some(active) {
                return;
            }
            *last = Some(active);
        }
        let (kind, message) = match (active, hold.and_then(|h| h.until)) {
            (true, Some(u)) => (
                EventKind::HoldPlaced,
                format!(
                    "hold placed: new releases are not adopted until {}",
                    format_time(u)
                ),
            ),
            (true, None) => (
                EventKind::HoldPlaced,
                "hold placed: new releases are not adopted until `cairn-agent release-hold`".into(),
            ),
            (false, _) => (
                EventKind::HoldEnded,
                "hold ended: new releases are adopted again".into(),
            ),
        };
        self.inner
            .notifier
            .emit(
                kind,
                None,
                message,
                Some(("hold", if active { b"1" } else { b"0" }.to_vec())),
            )
            .await;
    }

    /// The rollout circuit breaker stopped release `sequence` here:
    /// notifies once per release.
    pub(super) async fn note_deferral(&self, release: &Release, deferral: &Deferral) {
        if !matches!(deferral, Deferral::Rollout(Decision::BreakerTripped { .. }))
            || !self.inner.notifier.enabled()
        {
            return;
        }
        let message = format!(
            "release {} not adopted: {}",
            release.sequence,
            deferral.describe(format_time)
        );
        self.inner
            .notifier
            .emit(
                EventKind::BreakerTripped,
                Some((release.sequence, &release.bundle)),
                message,
                Some(("breaker", release.sequence.to_be_bytes().to_vec())),
            )
            .await;
    }

    /// The pending release's deferral changed: see [`Agent::note_deferral`].
    pub(super) async fn note_pending(&self) {
        let p = self
            .state()
            .deferred
            .pending()
            .map(|p| (p.release.clone(), p.deferral.clone()));
        if let Some((r, d)) = p {
            self.note_deferral(&r, &d).await;
        }
    }
}
