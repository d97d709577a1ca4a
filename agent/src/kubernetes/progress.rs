//! What one pass's observed health means, as kube-runtime's reconciler
//! returns an `Action`: healthy (done), progressing (run again after a
//! delay), or failed. Pure: the time a release has been rolling out is
//! passed in.
//!
//! A pass never waits for health. A newly applied release opens a
//! *rollout window* of `healthTimeout` from its first pass; while it is
//! open a progressing pass asks to be run again after [`PROGRESS_POLL`] (or
//! when the window closes, if sooner), and a pass still progressing when it
//! has closed fails the release. Waves (`cairn.dev/wave`) continue on the
//! next pass from the first wave that is not healthy yet: the waves before
//! it are unchanged and healthy, so the pass moves straight through them.
//! Outside a rollout window (drift passes of an established release) a
//! progressing pass is reported and waits for the reconcile interval.

use super::plan::Health;
use std::time::Duration;

/// How soon a progressing rollout is looked at again.
pub const PROGRESS_POLL: Duration = Duration::from_secs(1);

/// What a pass decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, and every object is healthy.
    Healthy,
    /// Not healthy yet. `requeue_after` is set inside a rollout window
    /// (run again then); `None` in a drift pass (the interval applies).
    Progressing {
        /// Why (the first object or wave not healthy).
        reason: String,
        /// When to run again.
        requeue_after: Option<Duration>,
    },
    /// The release failed its health checks (the agent rolls back).
    Failed(String),
}

impl Outcome {
    /// The health this outcome reports (status ConfigMap, `LastPass`).
    pub fn health(&self) -> Health {
        match self {
            Outcome::Healthy => Health::Healthy,
            Outcome::Progressing { reason, .. } => Health::Progressing(reason.clone()),
            Outcome::Failed(m) => Health::Failed(m.clone()),
        }
    }

    /// Whether the rollout window ends with this pass.
    pub fn settles(&self) -> bool {
        !matches!(self, Outcome::Progressing { .. })
    }
}

/// Decides a pass from its health.
///
/// * `health`: the wave the pass stopped at and its health
///   (`stopped = Some(wave)`), or the health of every object after the
///   last wave (`stopped = None`).
/// * `rolling_out`: how long the release has been rolling out (since its
///   first pass), or `None` when it is established (a drift pass).
/// * `timeout`: the rollout window (`healthTimeout`).
pub fn decide(
    health: Health,
    stopped: Option<i32>,
    rolling_out: Option<Duration>,
    timeout: Duration,
) -> Outcome {
    let wave = |m: &str, what: &str| match stopped {
        Some(n) => format!("wave {n}{what}, later waves not applied: {m}"),
        None => m.to_owned(),
    };
    match health {
        Health::Healthy => Outcome::Healthy,
        Health::Failed(m) => Outcome::Failed(wave(&m, " failed")),
        Health::Progressing(m) => match rolling_out {
            Some(elapsed) if elapsed >= timeout => Outcome::Failed(match stopped {
                Some(n) => format!(
                    "wave {n} not healthy within {}s, later waves not applied: {m}",
                    timeout.as_secs()
                ),
                None => format!("not healthy within {}s: {m}", timeout.as_secs()),
            }),
            Some(elapsed) => Outcome::Progressing {
                reason: wave(&m, ""),
                requeue_after: Some(PROGRESS_POLL.min(timeout - elapsed)),
            },
            None => Outcome::Progressing {
                reason: wave(&m, ""),
                requeue_after: None,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn progressing(m: &str) -> Health {
        Health::Progressing(m.into())
    }

    #[test]
    fn a_new_release_progresses_within_its_window_then_fails() {
        let at = |secs: f64| {
            decide(
                progressing("Deployment a/b: 0/1"),
                None,
                Some(Duration::from_secs_f64(secs)),
                T,
            )
        };
        assert_eq!(
            at(0.0),
            Outcome::Progressing {
                reason: "Deployment a/b: 0/1".into(),
                requeue_after: Some(PROGRESS_POLL),
            }
        );
        // Close to the deadline: run again exactly when the window closes.
        assert_eq!(
            at(4.6),
            Outcome::Progressing {
                reason: "Deployment a/b: 0/1".into(),
                requeue_after: Some(T - Duration::from_secs_f64(4.6)),
            }
        );
        assert_eq!(
            at(5.0),
            Outcome::Failed("not healthy within 5s: Deployment a/b: 0/1".into())
        );
        assert!(at(5.0).settles() && !at(1.0).settles());
    }

    #[test]
    fn a_wave_not_yet_healthy_is_continued_then_failed_naming_the_wave() {
        let p = decide(
            progressing("Job a/m: running"),
            Some(1),
            Some(Duration::from_secs(2)),
            T,
        );
        assert_eq!(
            p,
            Outcome::Progressing {
                reason: "wave 1, later waves not applied: Job a/m: running".into(),
                requeue_after: Some(PROGRESS_POLL),
            }
        );
        assert_eq!(
            decide(progressing("Job a/m: running"), Some(1), Some(T), T),
            Outcome::Failed(
                "wave 1 not healthy within 5s, later waves not applied: Job a/m: running".into()
            )
        );
        assert_eq!(
            decide(
                Health::Failed("Job a/m: job failed".into()),
                Some(1),
                Some(Duration::ZERO),
                T
            ),
            Outcome::Failed("wave 1 failed, later waves not applied: Job a/m: job failed".into())
        );
    }

    #[test]
    fn healthy_and_failed_settle_at_once_and_drift_passes_never_fail_on_progress() {
        assert_eq!(
            decide(Health::Healthy, None, Some(Duration::ZERO), T),
            Outcome::Healthy
        );
        assert_eq!(
            decide(Health::Failed("Job a/m: job failed".into()), None, None, T),
            Outcome::Failed("Job a/m: job failed".into())
        );
        // An established release that is progressing (a drift pass, long
        // after its rollout): reported, no requeue, never failed.
        let d = decide(progressing("Deployment a/b: 0/1"), None, None, T);
        assert_eq!(
            d,
            Outcome::Progressing {
                reason: "Deployment a/b: 0/1".into(),
                requeue_after: None,
            }
        );
        assert_eq!(d.health(), progressing("Deployment a/b: 0/1"));
    }
}
