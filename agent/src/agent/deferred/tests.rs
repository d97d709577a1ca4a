//! The deferred-release machine under a virtual clock: no sleeps, no
//! runtime; time is a number the test moves.

use super::*;
use cairn_core::bundle::Source;
use cairn_core::release::{FailureLimit, Rollout, Wave, RELEASE_FORMAT};
use cairn_core::rollout::FleetReports;
use std::collections::BTreeMap;

/// 2026-12-01T00:00:00Z in Unix ms.
const T0: u64 = 1_796_083_200_000;

fn release(sequence: u64, waves: Vec<Wave>, max_failures: Option<FailureLimit>) -> Release {
    Release {
        format: RELEASE_FORMAT,
        channel: "stable".parse().unwrap(),
        sequence,
        bundle: format!("sha256:{:064x}", sequence).parse().unwrap(),
        created: T0 / 1000,
        expires: T0 / 1000 + 30 * 86_400,
        rollout: Rollout {
            waves,
            max_failures,
        },
        selector: BTreeMap::new(),
    }
}

fn manifest() -> Manifest {
    Manifest {
        format: 1,
        source: Source {
            repository: "r".into(),
            commit: "c".into(),
            path: String::new(),
            rendered: Vec::new(),
        },
        entries: Vec::new(),
        images: None,
    }
}

/// One wave for everybody, opening `delay_secs` after creation.
fn one_wave(delay_secs: u64) -> Vec<Wave> {
    vec![Wave {
        basis_points: 10_000,
        delay_secs,
    }]
}

struct Who {
    labels: BTreeMap<String, String>,
    reports: FleetReports,
}

impl Who {
    fn new() -> Self {
        Self {
            labels: BTreeMap::new(),
            reports: FleetReports::default(),
        }
    }

    fn audience(&self) -> Audience<'_> {
        static AGENT_1: std::sync::LazyLock<cairn_core::AgentId> =
            std::sync::LazyLock::new(|| cairn_core::AgentId::parse("agent-1").unwrap());
        Audience {
            agent_id: &AGENT_1,
            labels: &self.labels,
            reports: self.reports,
        }
    }
}

/// Polls until the machine is idle, answering hold reads with `hold`;
/// returns the steps other than hold reads.
fn settle(m: &mut Deferred, now: u64, who: &Who, hold: Option<Hold>) -> Vec<Step> {
    let mut steps = Vec::new();
    for _ in 0..10 {
        match m.poll(now, &who.audience()) {
            Step::Idle => return steps,
            Step::ReadHold => {
                m.hold_read(hold.clone(), now);
            }
            other => steps.push(other),
        }
    }
    panic!("the machine did not settle: {steps:?}");
}

fn defer_staged(m: &mut Deferred, r: &Release, deferral: Deferral) {
    let bytes = format!("envelope {}", r.sequence).into_bytes();
    m.defer(r, &bytes, Some(manifest()), deferral);
}

#[test]
fn sleeps_until_the_wave_opens_then_adopts_once() {
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, one_wave(600), None);
    let opens = T0 / 1000 + 600;
    defer_staged(
        &mut m,
        &r,
        Deferral::Rollout(Decision::WaitForWave {
            wave: 1,
            opens_at: opens,
        }),
    );
    assert_eq!(
        m.poll_timeout(),
        Some(0),
        "a new pending release is evaluated now"
    );
    let now = T0 + 1_000;
    assert!(settle(&mut m, now, &who, None).is_empty());
    // Next wake-up: the hold re-read, a second later (the wave is far off).
    assert_eq!(m.poll_timeout(), Some(now + HOLD_RECHECK_MS));

    // Jump to just before the wave opens (hold reads along the way
    // change nothing): still waiting, and the wave is the next deadline
    // once hold reads are further away.
    let before = opens * 1000 - 1;
    assert!(settle(&mut m, before, &who, None).is_empty());
    assert_eq!(m.poll_timeout(), Some(opens * 1000));

    // At the opening: one Adopt, then nothing while it runs.
    let at = opens * 1000;
    let steps = settle(&mut m, at, &who, None);
    assert!(
        matches!(steps.as_slice(), [Step::Adopt(p)] if p.release.sequence == 2),
        "{steps:?}"
    );
    assert!(settle(&mut m, at + 10, &who, None).is_empty());
    m.adoption_done(b"envelope 2", false);
    m.adopted(2);
    assert!(m.pending().is_none());
    assert!(m.relayed().is_none());
    // Only the hold re-read remains (due a second after the last one).
    assert!(settle(&mut m, at + 20, &who, None).is_empty());
    assert_eq!(m.poll_timeout(), Some(before + HOLD_RECHECK_MS));
}

#[test]
fn a_passed_deadline_does_not_spin() {
    // An unstaged release whose wave opened: the gate passes but the
    // machine cannot adopt it (a source poll fetches it); it must not
    // ask to run again and again.
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, one_wave(60), None);
    m.defer(
        &r,
        b"envelope 2",
        None,
        Deferral::Rollout(Decision::WaitForWave {
            wave: 1,
            opens_at: T0 / 1000 + 60,
        }),
    );
    let now = T0 + 120_000;
    assert!(settle(&mut m, now, &who, None).is_empty());
    assert_eq!(m.poll_timeout(), Some(now + HOLD_RECHECK_MS));
    assert!(m.relayed().is_none(), "an unstaged release is not relayed");
}

#[test]
fn a_hold_defers_until_it_ends_and_shows_in_status() {
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, Vec::new(), None);
    let until = T0 / 1000 + 300;
    let hold = Hold {
        since: T0 / 1000,
        until: Some(until),
    };
    defer_staged(&mut m, &r, Deferral::Held { until: Some(until) });
    let now = T0 + 1_000;
    assert!(settle(&mut m, now, &who, Some(hold.clone())).is_empty());
    assert_eq!(m.hold(now), Some(&hold));
    assert_eq!(m.pending().map(|p| p.status().state), Some("held".into()));

    // The hold's end is a deadline of its own.
    m.hold_read(Some(hold.clone()), until * 1000 - 5_000);
    assert_eq!(
        m.poll_timeout(),
        Some(until * 1000 - 5_000 + HOLD_RECHECK_MS)
    );
    m.hold_read(Some(hold.clone()), until * 1000 - 500);
    assert_eq!(m.poll_timeout(), Some(until * 1000));

    let steps = settle(&mut m, until * 1000, &who, Some(hold));
    assert!(matches!(steps.as_slice(), [Step::Adopt(_)]), "{steps:?}");
    assert_eq!(m.hold(until * 1000), None, "an ended hold is not shown");
}

#[test]
fn released_hold_is_noticed_on_the_next_read() {
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, Vec::new(), None);
    let hold = Hold {
        since: T0 / 1000,
        until: None,
    };
    defer_staged(&mut m, &r, Deferral::Held { until: None });
    assert!(settle(&mut m, T0, &who, Some(hold)).is_empty());
    // Held indefinitely: only the hold file can end it.
    assert_eq!(m.poll_timeout(), Some(T0 + HOLD_RECHECK_MS));
    assert_eq!(
        settle(&mut m, T0 + 500, &who, None).len(),
        0,
        "no read before it is due"
    );
    let steps = settle(&mut m, T0 + HOLD_RECHECK_MS, &who, None);
    assert!(matches!(steps.as_slice(), [Step::Adopt(_)]), "{steps:?}");
}

#[test]
fn breaker_follows_fleet_reports() {
    let mut who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, Vec::new(), Some(FailureLimit::Count(2)));
    who.reports = FleetReports {
        adopted: 5,
        failed: 2,
    };
    defer_staged(
        &mut m,
        &r,
        Deferral::Rollout(Decision::BreakerTripped {
            failed: 2,
            adopted: 5,
        }),
    );
    assert!(settle(&mut m, T0, &who, None).is_empty());
    // New reports with the same count change nothing visible.
    who.reports = FleetReports {
        adopted: 6,
        failed: 2,
    };
    m.fleet_changed();
    assert_eq!(m.poll_timeout(), Some(0));
    let steps = settle(&mut m, T0 + 10, &who, None);
    assert!(matches!(steps.as_slice(), [Step::Changed]), "{steps:?}");
    assert_eq!(
        m.pending().map(|p| p.deferral.clone()),
        Some(Deferral::Rollout(Decision::BreakerTripped {
            failed: 2,
            adopted: 6
        }))
    );
    // Failures retracted: the breaker closes, the staged release goes.
    who.reports = FleetReports {
        adopted: 6,
        failed: 0,
    };
    m.fleet_changed();
    let steps = settle(&mut m, T0 + 20, &who, None);
    assert!(matches!(steps.as_slice(), [Step::Adopt(_)]), "{steps:?}");
}

#[test]
fn rejected_staged_release_is_dropped_and_newer_pending_kept() {
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r3 = release(3, one_wave(600), None);
    let wait = |s: u64| {
        Deferral::Rollout(Decision::WaitForWave {
            wave: 1,
            opens_at: s,
        })
    };
    defer_staged(&mut m, &r3, wait(T0 / 1000 + 600));
    // An older release deferred later does not replace the newer one.
    let r2 = release(2, one_wave(600), None);
    assert!(!m.defer(&r2, b"envelope 2", None, wait(T0 / 1000 + 600)));
    assert_eq!(m.relayed().map(|p| p.release.sequence), Some(3));
    // The same release unstaged does not unstage it.
    assert!(!m.defer(&r3, b"envelope 3", None, wait(T0 / 1000 + 600)));
    assert!(m.relayed().is_some());

    let at = (T0 / 1000 + 600) * 1000;
    let steps = settle(&mut m, at, &who, None);
    assert!(matches!(steps.as_slice(), [Step::Adopt(_)]), "{steps:?}");
    m.adoption_done(b"envelope 3", true);
    assert!(
        m.pending().is_none(),
        "a rejected staged release is dropped"
    );
}

#[test]
fn adoption_from_elsewhere_clears_an_older_pending_release() {
    let who = Who::new();
    let mut m = Deferred::new(Some(1));
    let r = release(2, one_wave(600), None);
    defer_staged(
        &mut m,
        &r,
        Deferral::Rollout(Decision::WaitForWave {
            wave: 1,
            opens_at: T0 / 1000 + 600,
        }),
    );
    assert!(m.relayed().is_some());
    m.adopted(4);
    assert!(m.pending().is_none());
    assert!(settle(&mut m, T0, &who, None).is_empty());
}
