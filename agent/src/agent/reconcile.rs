use super::*;

/// When the reconcile loop runs next, as the reconciler decides it
/// (kube-runtime's `Action`): after a delay, or only when woken (an
/// adoption always wakes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Run again after `after` (or sooner when woken).
    pub fn requeue(after: Duration) -> Self {
        Self {
            requeue_after: Some(after),
        }
    }

    /// Run again only when woken.
    pub fn await_change() -> Self {
        Self {
            requeue_after: None,
        }
    }

    /// The delay, if any.
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// The reconcile loop's policy: progressing (the target asked to be run
/// again, a new release rolling out) — after the delay it asked for; in
/// sync (or not, with conflicts or an unhealthy release, which only time
/// or a new release changes) — the configured interval, for drift
/// correction; an error (the target or the store failed) — backoff from
/// one second up to the interval, so a transient failure is retried soon
/// without hammering a broken target.
pub(super) fn next_action(
    result: &Result<ApplyReport>,
    interval: Duration,
    failures: &mut Backoff,
) -> Action {
    match result {
        Ok(ApplyReport {
            requeue_after: Some(after),
            ..
        }) => {
            failures.reset();
            Action::requeue(*after)
        }
        Ok(_) => {
            failures.reset();
            Action::requeue(jitter(interval, 0.05))
        }
        Err(Error::NoRelease { .. }) => Action::requeue(jitter(interval, 0.05)),
        Err(_) => Action::requeue(failures.next_delay().min(interval)),
    }
}

impl Agent {
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
                    bundle: h.release.bundle.to_string(),
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
                self.notify(
                    crate::notify::EventKind::HealthFailed,
                    Some((f.sequence, &f.bundle)),
                    format!(
                        "release {} failed its health checks: {}",
                        f.sequence, f.reason
                    ),
                )
                .await;
                if let Some(lg) = self.last_good_state().await {
                    result = self.apply_head(&lg, Some(&f)).await;
                    let message = match &result {
                        Ok(_) => format!(
                            "rolled back from release {} to the last-good release {}",
                            f.sequence, lg.release.sequence
                        ),
                        Err(e) => format!(
                            "rolling back from release {} to the last-good release {} failed: {e}",
                            f.sequence, lg.release.sequence
                        ),
                    };
                    self.notify(
                        crate::notify::EventKind::RolledBack,
                        Some((lg.release.sequence, &lg.release.bundle)),
                        message,
                    )
                    .await;
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
        let progressing = matches!(&result, Ok(r) if r.requeue_after.is_some());
        m.reconciles
            .get_or_create(&ResultLabel {
                result: match (ok, progressing) {
                    (true, _) => "ok",
                    (false, true) => "progressing",
                    (false, false) => "error",
                }
                .into(),
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
        // One lock at a time: a guard taken inside the struct literal would
        // live to the end of the statement and deadlock the assignment's.
        let site = self.state().site.clone();
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
            site,
        });
        self.publish_status();
        result
    }

    /// The last-good release as a head, if its manifest is still stored.
    pub(super) async fn last_good_state(&self) -> Option<HeadState> {
        let channel = self.inner.config.channel.clone();
        let bytes = self.blocking(move |s| s.last_good(&channel)).await.ok()??;
        let (_, release) =
            Release::decode_envelope(&bytes, self.inner.limits.max_release_bytes).ok()?;
        let (r, limits) = (release.clone(), self.inner.limits.clone());
        let summary = self
            .blocking(
                move |s| Ok(stored_manifest(s, &r, &limits)?.map(|m| ManifestSummary::of(&m))),
            )
            .await
            .ok()??;
        Some(HeadState {
            address: cairn_keys::sha256_address(&bytes),
            release,
            bytes,
            summary,
        })
    }

    pub(super) async fn apply_head(
        &self,
        h: &HeadState,
        failed: Option<&FailedRelease>,
    ) -> Result<ApplyReport> {
        // Entries only; the target reads bodies from the store in bounded
        // batches (missing or corrupt objects were fetched again).
        let desired = Arc::new(self.desired_state(h, failed).await?);
        let mut report = self.inner.target.apply(desired).await?;
        // Objects this site could not render (an AgeSecret without its
        // key) are not applied: reported like conflicts, per object.
        if let Some(s) = &self.state().site {
            report.conflicts.extend(s.object_errors.iter().cloned());
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_back_off_up_to_the_interval_and_success_resets() {
        let interval = Duration::from_secs(30);
        let mut failures = Backoff::new(Duration::from_secs(1), interval);
        let err = || Err(Error::Status("target failed".into()));
        let first = next_action(&err(), interval, &mut failures)
            .requeue_after()
            .unwrap_or(Duration::MAX);
        assert!(first <= Duration::from_millis(1500), "{first:?}");
        let mut last = first;
        for _ in 0..10 {
            last = next_action(&err(), interval, &mut failures)
                .requeue_after()
                .unwrap_or(Duration::MAX);
            assert!(last <= interval, "{last:?}");
        }
        assert!(last > first, "backoff grows: {first:?} then {last:?}");
        let ok = next_action(&Ok(ApplyReport::default()), interval, &mut failures);
        let d = ok.requeue_after().unwrap_or(Duration::MAX);
        assert!(
            d >= interval.mul_f64(0.95) && d <= interval.mul_f64(1.05),
            "{d:?}"
        );
        let again = next_action(&err(), interval, &mut failures)
            .requeue_after()
            .unwrap_or(Duration::MAX);
        assert!(again <= Duration::from_millis(1500), "reset: {again:?}");
    }

    #[test]
    fn a_progressing_target_is_run_again_after_the_delay_it_asked_for() {
        let interval = Duration::from_secs(30);
        let mut failures = Backoff::new(Duration::from_secs(1), interval);
        let _ = next_action(&Err(Error::Status("x".into())), interval, &mut failures);
        let progressing = Ok(ApplyReport {
            conflicts: vec!["not yet healthy: Deployment a/b".into()],
            requeue_after: Some(Duration::from_millis(400)),
            ..ApplyReport::default()
        });
        let a = next_action(&progressing, interval, &mut failures);
        assert_eq!(a.requeue_after(), Some(Duration::from_millis(400)));
        // Progress resets the error backoff.
        let again = next_action(&Err(Error::Status("x".into())), interval, &mut failures)
            .requeue_after()
            .unwrap_or(Duration::MAX);
        assert!(again <= Duration::from_millis(1500), "{again:?}");
    }

    #[test]
    fn nothing_adopted_waits_the_interval_not_a_backoff() {
        let interval = Duration::from_secs(30);
        let mut failures = Backoff::new(Duration::from_secs(1), interval);
        let none = Err(Error::NoRelease {
            channel: "stable".into(),
            detail: "no sources".into(),
        });
        let d = next_action(&none, interval, &mut failures)
            .requeue_after()
            .unwrap_or(Duration::MAX);
        assert!(d >= interval.mul_f64(0.95), "{d:?}");
        assert_eq!(Action::await_change().requeue_after(), None);
    }
}
