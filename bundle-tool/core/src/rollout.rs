//! Staged rollout without a controller: every agent decides alone, and
//! deterministically, whether a release is for it now.
//!
//! **Architecture invariant:** pure. Inputs are the release, the agent's id
//! and labels, gossiped failure counts and `now`; the output is a
//! [`Decision`]. Two agents given the same inputs always agree, which is
//! what lets a fleet roll out in waves with no hub.

use crate::ids::AgentId;
use crate::release::{FailureLimit, Release, Rollout, Wave};
use std::collections::BTreeMap;

/// What an agent should do with a verified release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Adopt it now.
    Adopt {
        /// The wave (1-based) the agent falls in; 0 when the release has no
        /// waves.
        wave: usize,
    },
    /// The agent's labels do not match the release's selector: keep the
    /// current release.
    NotSelected {
        /// The first selector label that did not match.
        missing: String,
    },
    /// The agent's wave has not opened yet.
    WaitForWave {
        /// The wave (1-based) the agent will fall in.
        wave: usize,
        /// When it opens, Unix seconds.
        opens_at: u64,
    },
    /// Enough agents reported this release failed: hold it.
    BreakerTripped {
        /// Failed reports seen.
        failed: u32,
        /// Adopters seen.
        adopted: u32,
    },
}

/// What gossip says about one release across the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetReports {
    /// Agents that report having adopted the release (healthy or not).
    pub adopted: u32,
    /// Of those, agents that report it failed.
    pub failed: u32,
}

/// The agent's position in [0, 1) for a bundle, in millionths: the first
/// eight bytes of SHA-256(agent id ‖ 0 ‖ bundle id), reduced uniformly.
/// A new bundle reshuffles who goes first, so no agent is always the canary.
pub fn bucket_ppm(agent_id: &AgentId, bundle_id: &str) -> u32 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"cairn-rollout-bucket\0");
    ctx.update(agent_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(bundle_id.as_bytes());
    let d = ctx.finish();
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&d.as_ref()[..8]);
    // Multiply-shift maps a uniform u64 onto [0, 1_000_000) uniformly.
    ((u128::from(u64::from_be_bytes(eight)) * 1_000_000) >> 64) as u32
}

/// An agent's rank in the fleet-wide status sample: the first eight bytes
/// of SHA-256(`cairn-status-sample` ‖ 0 ‖ agent id). Every agent computes
/// the same rank for an id, so every agent keeps the same sample (the
/// agents with the smallest ranks: a bottom-k sample, docs/MESH.md);
/// agent ids come from the fleet CA's certificates, so nobody picks a rank.
pub fn status_sample_rank(agent_id: &AgentId) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"cairn-status-sample\0");
    ctx.update(agent_id.as_bytes());
    let d = ctx.finish();
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(eight)
}

/// The breaker's inputs for one bundle from a bottom-k status sample
/// (`docs/MESH.md`, "Status sample").
///
/// * `failed`: every failure report held (failures are kept whatever their
///   rank, so this count is exact).
/// * `adopted`: exact when the sample is not full (`sample_full` is
///   `None`: the table holds every live record); otherwise estimated from
///   the sample, which is uniform because ranks are hashes: adopters among
///   the `k` sampled records, scaled by the fleet size the sample implies
///   (the k-th smallest rank `r_k` of a uniform hash over `n` ids is about
///   `k / n` of the range, so `n ≈ (k − 1) · 2⁶⁴ / r_k`), and never below
///   the adopters actually held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCounts {
    /// Adopters held (sampled or failed).
    pub adopted_held: u32,
    /// Failure reports held.
    pub failed_held: u32,
    /// Adopters among the sampled records (rank within the sample).
    pub adopted_in_sample: u32,
}

/// A full sample: its size `k` and the largest rank in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullSample {
    /// Records in the sample.
    pub k: u32,
    /// The largest rank among them.
    pub max_rank: u64,
}

impl SampleCounts {
    /// The breaker's inputs; see [`SampleCounts`].
    pub fn reports(&self, sample_full: Option<FullSample>) -> FleetReports {
        let adopted = match sample_full {
            Some(FullSample { k, max_rank }) if k >= 2 && max_rank > 0 => {
                // n ≈ (k − 1) · 2⁶⁴ / r_k; adopted ≈ adopted_in_sample · n / k.
                let n = (u128::from(k - 1) << 64) / u128::from(max_rank);
                let est = n * u128::from(self.adopted_in_sample) / u128::from(k);
                u32::try_from(est)
                    .unwrap_or(u32::MAX)
                    .max(self.adopted_held)
            }
            _ => self.adopted_held,
        };
        FleetReports {
            adopted,
            failed: self.failed_held,
        }
    }
}

/// Whether `labels` carry every `key=value` of `selector`; the first missing
/// one otherwise.
pub fn selector_mismatch(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Option<String> {
    selector
        .iter()
        .find(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
}

/// Whether the circuit breaker trips for `limit` given `reports`.
pub fn breaker_tripped(limit: Option<&FailureLimit>, reports: FleetReports) -> bool {
    match limit {
        None => false,
        Some(FailureLimit::Count(n)) => reports.failed >= *n,
        Some(FailureLimit::BasisPoints(bp)) => {
            reports.adopted > 0
                && u64::from(reports.failed) * 10_000 >= u64::from(*bp) * u64::from(reports.adopted)
        }
    }
}

/// The wave (1-based) an agent at `bucket_ppm` falls in: the first wave whose
/// share covers it. `None` if no wave does (a rollout that stops below 100%).
pub fn wave_for(waves: &[Wave], bucket_ppm: u32) -> Option<(usize, &Wave)> {
    waves
        .iter()
        .enumerate()
        .find(|(_, w)| u64::from(bucket_ppm) < u64::from(w.basis_points) * 100)
        .map(|(i, w)| (i + 1, w))
}

/// Decides what an agent does with `release` at `now`.
pub fn decide(
    release: &Release,
    agent_id: &AgentId,
    labels: &BTreeMap<String, String>,
    reports: FleetReports,
    now: u64,
) -> Decision {
    if let Some(missing) = selector_mismatch(&release.selector, labels) {
        return Decision::NotSelected { missing };
    }
    let Rollout {
        waves,
        max_failures,
    } = &release.rollout;
    if breaker_tripped(max_failures.as_ref(), reports) {
        return Decision::BreakerTripped {
            failed: reports.failed,
            adopted: reports.adopted,
        };
    }
    if waves.is_empty() {
        return Decision::Adopt { wave: 0 };
    }
    let bucket = bucket_ppm(agent_id, &release.bundle);
    match wave_for(waves, bucket) {
        Some((wave, w)) => {
            let opens_at = release.created.saturating_add(w.delay_secs);
            if now >= opens_at {
                Decision::Adopt { wave }
            } else {
                Decision::WaitForWave { wave, opens_at }
            }
        }
        // Beyond the last wave's share: this release never reaches the agent.
        None => Decision::NotSelected {
            missing: format!(
                "rollout stops at {}%",
                waves.last().map_or(0, |w| w.basis_points) / 100
            ),
        },
    }
}

/// Parses a rollout spec: comma-separated waves `PERCENT%:DELAY` (e.g.
/// `10%:0s,50%:1h,100%:6h`) and an optional `max-failures=N` or
/// `max-failures=P%`. Shares and delays must not decrease.
pub fn parse_rollout(spec: &str) -> Result<Rollout, String> {
    let mut rollout = Rollout::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(v) = part.strip_prefix("max-failures=") {
            let limit = if let Some(p) = v.strip_suffix('%') {
                FailureLimit::BasisPoints(parse_percent_bp(p, part)?)
            } else {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("`{part}`: max-failures takes a count or a percentage"))?;
                if n == 0 {
                    return Err(format!("`{part}`: max-failures must be at least 1"));
                }
                FailureLimit::Count(n)
            };
            rollout.max_failures = Some(limit);
            continue;
        }
        let (pct, delay) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}`: a wave is PERCENT%:DELAY, e.g. 50%:1h"))?;
        let p = pct
            .strip_suffix('%')
            .ok_or_else(|| format!("`{part}`: the share needs a % sign"))?;
        let basis_points = parse_percent_bp(p, part)?;
        if basis_points == 0 {
            return Err(format!("`{part}`: a wave's share must be above 0%"));
        }
        let delay_secs = crate::duration::parse_duration(delay)
            .map_err(|e| format!("`{part}`: {e}"))?
            .as_secs();
        if let Some(prev) = rollout.waves.last() {
            if basis_points <= prev.basis_points || delay_secs < prev.delay_secs {
                return Err(format!(
                    "`{part}`: each wave needs a larger share and no shorter delay than the one before"
                ));
            }
        }
        rollout.waves.push(Wave {
            basis_points,
            delay_secs,
        });
    }
    Ok(rollout)
}

fn parse_percent_bp(p: &str, part: &str) -> Result<u32, String> {
    let bad = || format!("`{part}`: `{p}%` is not a percentage between 0 and 100");
    let (whole, frac) = p.split_once('.').unwrap_or((p, ""));
    if frac.len() > 2 || whole.is_empty() {
        return Err(bad());
    }
    let w: u32 = whole.parse().map_err(|_| bad())?;
    let f: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().map_err(|_| bad())?
    };
    let bp = w
        .checked_mul(100)
        .and_then(|v| v.checked_add(f))
        .ok_or_else(bad)?;
    if bp > 10_000 {
        return Err(bad());
    }
    Ok(bp)
}

/// Renders a rollout back into spec syntax.
pub fn format_rollout(r: &Rollout) -> String {
    let mut parts: Vec<String> = r
        .waves
        .iter()
        .map(|w| {
            let pct = if w.basis_points % 100 == 0 {
                format!("{}", w.basis_points / 100)
            } else {
                format!("{}.{:02}", w.basis_points / 100, w.basis_points % 100)
            };
            format!(
                "{pct}%:{}",
                crate::duration::format_duration(std::time::Duration::from_secs(w.delay_secs))
            )
        })
        .collect();
    match &r.max_failures {
        Some(FailureLimit::Count(n)) => parts.push(format!("max-failures={n}")),
        Some(FailureLimit::BasisPoints(bp)) => {
            parts.push(format!("max-failures={}%", *bp as f64 / 100.0))
        }
        None => {}
    }
    if parts.is_empty() {
        "all at once".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::RELEASE_FORMAT;

    fn release(spec: &str, selector: &[(&str, &str)]) -> Release {
        Release {
            format: RELEASE_FORMAT,
            channel: "stable".parse().unwrap(),
            sequence: 1,
            bundle: crate::BundleId::of_manifest(b"bundle"),
            created: 1_000,
            expires: 10_000_000,
            rollout: parse_rollout(spec).unwrap(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn aid(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_must_match_every_label() {
        let r = release("", &[("region", "eu"), ("tier", "edge")]);
        let none = FleetReports::default();
        assert_eq!(
            decide(
                &r,
                &aid("a"),
                &labels(&[("region", "eu"), ("tier", "edge"), ("x", "y")]),
                none,
                2_000
            ),
            Decision::Adopt { wave: 0 }
        );
        assert_eq!(
            decide(&r, &aid("a"), &labels(&[("region", "eu")]), none, 2_000),
            Decision::NotSelected {
                missing: "tier=edge".into()
            }
        );
        assert_eq!(
            decide(
                &r,
                &aid("a"),
                &labels(&[("region", "us"), ("tier", "edge")]),
                none,
                2_000
            ),
            Decision::NotSelected {
                missing: "region=eu".into()
            }
        );
    }

    #[test]
    fn wave_boundaries() {
        let r = release("10%:0s,50%:1h,100%:6h", &[]);
        let none = FleetReports::default();
        // Find agents in each wave by their bucket and check the boundaries.
        let mut seen = [false; 3];
        for i in 0..2_000 {
            let id = aid(&format!("agent-{i}"));
            let b = bucket_ppm(&id, &r.bundle);
            let (wave, delay) = if b < 100_000 {
                (1, 0)
            } else if b < 500_000 {
                (2, 3_600)
            } else {
                (3, 6 * 3_600)
            };
            seen[wave - 1] = true;
            let opens = r.created + delay;
            if delay > 0 {
                assert_eq!(
                    decide(&r, &id, &BTreeMap::new(), none, opens - 1),
                    Decision::WaitForWave {
                        wave,
                        opens_at: opens
                    }
                );
            }
            assert_eq!(
                decide(&r, &id, &BTreeMap::new(), none, opens),
                Decision::Adopt { wave }
            );
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn rollout_stopping_below_100_percent_leaves_the_rest() {
        let r = release("50%:0s", &[]);
        let outside = (0..100)
            .map(|i| aid(&format!("a{i}")))
            .find(|id| bucket_ppm(id, &r.bundle) >= 500_000)
            .unwrap();
        assert!(matches!(
            decide(
                &r,
                &outside,
                &BTreeMap::new(),
                FleetReports::default(),
                5_000
            ),
            Decision::NotSelected { .. }
        ));
    }

    #[test]
    fn breaker_thresholds() {
        let count = Some(FailureLimit::Count(2));
        assert!(!breaker_tripped(
            count.as_ref(),
            FleetReports {
                adopted: 5,
                failed: 1
            }
        ));
        assert!(breaker_tripped(
            count.as_ref(),
            FleetReports {
                adopted: 5,
                failed: 2
            }
        ));
        let pct = Some(FailureLimit::BasisPoints(2_500));
        assert!(!breaker_tripped(
            pct.as_ref(),
            FleetReports {
                adopted: 8,
                failed: 1
            }
        ));
        assert!(breaker_tripped(
            pct.as_ref(),
            FleetReports {
                adopted: 8,
                failed: 2
            }
        ));
        assert!(!breaker_tripped(
            pct.as_ref(),
            FleetReports {
                adopted: 0,
                failed: 0
            }
        ));
        assert!(!breaker_tripped(
            None,
            FleetReports {
                adopted: 8,
                failed: 8
            }
        ));
        let r = release("100%:0s,max-failures=2", &[]);
        assert_eq!(
            decide(
                &r,
                &aid("x"),
                &BTreeMap::new(),
                FleetReports {
                    adopted: 3,
                    failed: 2
                },
                2_000
            ),
            Decision::BreakerTripped {
                failed: 2,
                adopted: 3
            }
        );
    }

    #[test]
    fn bucket_is_uniform_over_10000_agents() {
        // 10 equal bins; each expects 1,000. A tolerance of ±15% (150) is
        // far outside the binomial spread (σ ≈ 30) yet catches any bias.
        let bundle = cairn_keys::sha256_address(b"some bundle");
        let mut bins = [0u32; 10];
        for i in 0..10_000 {
            bins[(bucket_ppm(&aid(&format!("edge-{i}")), &bundle) / 100_000) as usize] += 1;
        }
        for (i, n) in bins.iter().enumerate() {
            assert!((850..=1150).contains(n), "bin {i} has {n} agents: {bins:?}");
        }
        // And a different bundle reshuffles the order.
        let other = cairn_keys::sha256_address(b"another bundle");
        let moved = (0..1000)
            .filter(|i| {
                let id = aid(&format!("edge-{i}"));
                bucket_ppm(&id, &bundle) / 100_000 != bucket_ppm(&id, &other) / 100_000
            })
            .count();
        assert!(moved > 700, "only {moved} of 1000 agents changed bins");
    }

    #[test]
    fn spec_parsing_and_errors() {
        let r = parse_rollout("10%:0s,50%:1h,100%:6h,max-failures=3").unwrap();
        assert_eq!(r.waves.len(), 3);
        assert_eq!(
            r.waves[1],
            Wave {
                basis_points: 5_000,
                delay_secs: 3_600
            }
        );
        assert_eq!(r.max_failures, Some(FailureLimit::Count(3)));
        assert_eq!(format_rollout(&r), "10%:0s,50%:1h,100%:6h,max-failures=3");
        assert_eq!(
            parse_rollout("max-failures=12.5%").unwrap().max_failures,
            Some(FailureLimit::BasisPoints(1_250))
        );
        for (bad, needle) in [
            ("50%", "PERCENT%:DELAY"),
            ("50:1h", "% sign"),
            ("150%:1h", "between 0 and 100"),
            ("0%:1h", "above 0%"),
            ("50%:1h,10%:2h", "larger share"),
            ("10%:2h,50%:1h", "no shorter delay"),
            ("50%:1y", "unknown unit"),
            ("max-failures=0", "at least 1"),
            ("max-failures=x", "count or a percentage"),
        ] {
            let err = parse_rollout(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
