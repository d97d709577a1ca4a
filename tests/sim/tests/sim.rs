//! The fleet simulator at small size: determinism, convergence under loss,
//! partitions and churn, attacks, deltas and rollout waves. Each test runs
//! in a few seconds in a debug build.
#![allow(clippy::unwrap_used)]

use cairn_sim::{run, Churn, Partition, Report, SimConfig};

fn small(seed: u64) -> SimConfig {
    SimConfig::new(200, seed)
}

fn assert_clean(r: &Report) {
    assert!(r.violations.is_empty(), "violations: {:#?}", r.violations);
    assert!(r.converged, "did not converge: {r:#?}");
    for rel in &r.releases {
        assert!(
            rel.converged_after_ms.is_some(),
            "release {} did not converge: {rel:?}",
            rel.sequence
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let cfg = SimConfig {
        loss: 0.002,
        partition: Some(Partition {
            fraction: 0.3,
            at_release: 2,
            duration_ms: 20_000,
        }),
        churn: Some(Churn {
            interval_ms: 3_000,
            down_ms: 5_000,
        }),
        ..small(7)
    };
    let a = run(cfg.clone());
    let b = run(cfg.clone());
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a, b);
    assert!(a.events > 1000 && a.messages > 1000, "{a:?}");
    let c = run(SimConfig { seed: 8, ..cfg });
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another trace");
}

#[test]
fn a_fleet_converges_with_loss_and_a_partition_for_several_seeds() {
    for seed in [1, 2, 3] {
        let cfg = SimConfig {
            loss: 0.005,
            partition: Some(Partition {
                fraction: 0.4,
                at_release: 2,
                duration_ms: 30_000,
            }),
            ..small(seed)
        };
        let r = run(cfg);
        assert_clean(&r);
        assert!(r.lost > 0, "seed {seed}: loss was simulated: {r:?}");
        // Release 2 cannot reach the far side before the partition heals.
        let rel2 = &r.releases[1];
        assert!(
            rel2.converged_after_ms.unwrap_or(0) >= 30_000,
            "seed {seed}: {rel2:?}"
        );
        assert_eq!(rel2.holders, 200, "seed {seed}");
    }
}

#[test]
fn churn_loses_no_state_and_sequences_never_go_back() {
    let cfg = SimConfig {
        churn: Some(Churn {
            interval_ms: 500,
            down_ms: 4_000,
        }),
        releases: 3,
        ..small(11)
    };
    let r = run(cfg);
    assert_clean(&r);
    assert!(r.crashes > 20, "{r:?}");
    assert_eq!(r.releases.len(), 3);
}

#[test]
fn forged_releases_and_tampered_objects_are_refused() {
    let cfg = SimConfig {
        malicious: 20,
        ..small(5)
    };
    let r = run(cfg);
    // No violation: nothing forged adopted, nothing tampered stored.
    assert_clean(&r);
    assert!(
        r.rejections
            .get("signature_threshold")
            .copied()
            .unwrap_or(0)
            > 0,
        "{:?}",
        r.rejections
    );
    assert!(
        r.rejections
            .get("object_hash_mismatch")
            .copied()
            .unwrap_or(0)
            > 0,
        "{:?}",
        r.rejections
    );
}

#[test]
fn only_the_changed_object_moves() {
    let r = run(small(3));
    assert_clean(&r);
    let (full, delta) = (&r.releases[0], &r.releases[1]);
    assert_eq!(full.new_bytes, full.bundle_bytes);
    assert!(delta.new_bytes < full.bundle_bytes / 4, "{delta:?}");
    // Every agent but the origin fetches exactly the new bytes, once.
    let expected = delta.new_bytes as f64 * 199.0 / 200.0;
    assert!(
        (delta.object_bytes_mean - expected).abs() < 1.0,
        "{} vs {expected}",
        delta.object_bytes_mean
    );
    assert!(full.object_bytes_mean > 0.9 * full.bundle_bytes as f64);
}

#[test]
fn rollout_waves_hold_agents_back_until_their_wave_opens() {
    // Release `created` is simulated second 0; wave 2 opens at 40 s.
    let cfg = SimConfig {
        rollout: Some("30%:0s,100%:40s".into()),
        releases: 1,
        status_gossip: true,
        ..small(9)
    };
    let r = run(cfg);
    assert_clean(&r);
    let rel = &r.releases[0];
    let done = rel.published_ms + rel.converged_after_ms.unwrap_or(0);
    assert!(
        done >= 40_000,
        "converged at {done} ms, before wave 2: {rel:?}"
    );
}

#[test]
fn a_partition_that_outlasts_the_deadline_is_reported() {
    let cfg = SimConfig {
        partition: Some(Partition {
            fraction: 0.5,
            at_release: 1,
            duration_ms: 10_000_000,
        }),
        releases: 1,
        deadline_ms: 30_000,
        ..SimConfig::new(60, 4)
    };
    let r = run(cfg);
    assert!(!r.converged);
    assert!(r.releases[0].converged_after_ms.is_none());
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("not every live agent holds release 1")),
        "{:?}",
        r.violations
    );
}

/// Mesh bytes are deterministic in the simulator, so these bounds are real
/// assertions: a full release costs every agent at most 5 % over the
/// bundle (compact wants: a few bytes instead of every address), a
/// one-object delta a fixed overhead over its new bytes, and a mixed
/// fleet of version 2 and version 3 agents still converges.
#[test]
fn mesh_bytes_per_agent_stay_within_bounds() {
    let r = run(SimConfig::new(100, 11));
    assert_clean(&r);
    let (full, delta) = (&r.releases[0], &r.releases[1]);
    let ratio = full.bytes_in_mean / full.new_bytes as f64;
    assert!(
        ratio <= 1.05,
        "full release: {ratio:.3}× the bundle: {full:?}"
    );
    assert!(full.want_bytes_mean < 512.0, "{full:?}");
    assert!(delta.want_bytes_mean < 512.0, "{delta:?}");
    let ratio = delta.bytes_in_mean / delta.new_bytes as f64;
    assert!(ratio <= 1.25, "delta: {ratio:.3}× its new bytes: {delta:?}");

    let mixed = run(SimConfig {
        legacy_share: 0.5,
        ..SimConfig::new(100, 11)
    });
    assert_clean(&mixed);
    // Half the fleet asks by address: more want bytes, same objects.
    assert!(mixed.releases[0].want_bytes_mean > 4.0 * full.want_bytes_mean);
    assert!(
        (mixed.releases[1].object_bytes_mean - delta.object_bytes_mean).abs() < 1.0,
        "{mixed:?}"
    );
}

/// Status gossip by digest: over a release and the minute after it (one
/// change per agent when it adopts, one refresh), every agent receives
/// each new record about once; what it costs per agent grows with the
/// fleet (every agent's record reaches every agent), not with the number
/// of connections.
#[test]
fn status_gossip_per_agent_is_bounded_by_the_sample_not_the_fleet() {
    // 400 agents, six times the default status sample (64): each agent
    // keeps and relays the sample, not the fleet, so a release costs
    // about the sample's new versions per agent (plus its neighbours' own
    // records, which it pulls once and drops), not one per agent as above.
    let agents = 400;
    let r = run(SimConfig {
        status_gossip: true,
        pause_ms: 60_000,
        releases: 1,
        ..SimConfig::new(agents, 5)
    });
    assert_clean(&r);
    let rel = &r.releases[0];
    let sample_bound = (64.0 + 16.0) * 2.0 * 400.0;
    let whole_fleet = agents as f64 * 2.0 * 280.0;
    assert!(
        rel.gossip_period_mean <= sample_bound && sample_bound < whole_fleet / 3.0,
        "{:.0} bytes per agent (bound {sample_bound:.0}, whole fleet {whole_fleet:.0}): {rel:?}",
        rel.gossip_period_mean
    );
}

#[test]
fn status_gossip_per_agent_is_about_one_copy_of_each_new_record() {
    let agents = 60;
    let r = run(SimConfig {
        status_gossip: true,
        pause_ms: 60_000,
        releases: 1,
        ..SimConfig::new(agents, 5)
    });
    assert_clean(&r);
    let rel = &r.releases[0];
    // A signed simulator record is about 280 bytes; two versions per
    // agent in the period (adoption and refresh), plus digests and pulls.
    let bound = agents as f64 * 2.0 * 400.0;
    assert!(
        rel.gossip_period_mean <= bound,
        "{:.0} bytes per agent (bound {bound:.0}): {rel:?}",
        rel.gossip_period_mean
    );
    assert!(rel.gossip_period_mean > agents as f64 * 200.0, "{rel:?}");
}
