//! Prometheus metrics (prometheus-client), served at `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cairn_adopted_sequence` | gauge | `channel` |
//! | `cairn_last_good_sequence` | gauge | `channel` |
//! | `cairn_adoptions_total` | counter | |
//! | `cairn_release_rejections_total` | counter | `reason` |
//! | `cairn_source_fetch_errors_total` | counter | `source`, `kind` |
//! | `cairn_source_up` | gauge | `source` |
//! | `cairn_reconcile_duration_seconds` | histogram | |
//! | `cairn_reconciles_total` | counter | `result` (`ok`, `error`) |
//! | `cairn_drift_corrections_total` | counter | |
//! | `cairn_rollbacks_total` | counter | | releases that failed their health checks and were rolled back |
//! | `cairn_offline` | gauge | |
//! | `cairn_root_version` | gauge | |
//! | `cairn_trust_root_info` | gauge (always 1) | `origin`, `version` of the embedded root |
//! | `cairn_development_root` | gauge | 1 when the embedded root is the development root |
//! | `cairn_adopted_release_expired` | gauge | |
//! | `cairn_store_up` | gauge | | 0 while the local store is out of service (IO error) |
//! | `cairn_store_errors_total` | counter | | IO errors of the local store |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `channel` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// The channel.
    pub channel: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable rejection reason ([`crate::pipeline::Rejection::reason`]).
    pub reason: String,
}

/// `source` + `kind` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceErrorLabel {
    /// The source name.
    pub source: String,
    /// [`crate::source::SourceError::kind`].
    pub kind: String,
}

/// `source` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The source name.
    pub source: String,
}

/// `origin` + `version` labels of the embedded trust root.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustRootLabel {
    /// [`cairn_keys::embedded::ORIGIN`].
    pub origin: String,
    /// The embedded root's version.
    pub version: String,
}

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: String,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Sequence of the adopted release per channel.
    pub adopted_sequence: Family<ChannelLabel, Gauge>,
    /// Sequence of the last release reconciled successfully per channel.
    pub last_good_sequence: Family<ChannelLabel, Gauge>,
    /// Releases adopted since start.
    pub adoptions: Counter,
    /// Rejected candidates by reason.
    pub rejections: Family<ReasonLabel, Counter>,
    /// Failed source requests by source and kind.
    pub fetch_errors: Family<SourceErrorLabel, Counter>,
    /// 1 if the source's last sync reached it, else 0.
    pub source_up: Family<SourceLabel, Gauge>,
    /// Time taken by each reconcile.
    pub reconcile_duration: Histogram,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Files restored after hand edits or deletions.
    pub drift_corrections: Counter,
    /// Releases that failed their health checks and were rolled back.
    pub rollbacks: Counter,
    /// 1 when no source was reachable in the last attempt.
    pub offline: Gauge,
    /// Version of the current trust root.
    pub root_version: Gauge,
    /// 1 when the enforced release has expired (kept, with a warning).
    pub adopted_release_expired: Gauge,
    /// Always 1, labelled with the embedded root's origin and version.
    pub trust_root_info: Family<TrustRootLabel, Gauge>,
    /// 1 when the embedded root is the development root.
    pub development_root: Gauge,
    /// 1 while the local store takes writes, 0 after an IO error until it
    /// recovers.
    pub store_up: Gauge,
    /// IO errors of the local store.
    pub store_errors: Counter,
    /// The mesh's metrics (`cairn_mesh_*`, see [`crate::mesh::MeshMetrics`]).
    pub mesh: crate::mesh::MeshMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            adopted_sequence: Family::default(),
            last_good_sequence: Family::default(),
            adoptions: Counter::default(),
            rejections: Family::default(),
            fetch_errors: Family::default(),
            source_up: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            reconciles: Family::default(),
            drift_corrections: Counter::default(),
            rollbacks: Counter::default(),
            offline: Gauge::default(),
            root_version: Gauge::default(),
            adopted_release_expired: Gauge::default(),
            trust_root_info: Family::default(),
            development_root: Gauge::default(),
            store_up: Gauge::default(),
            store_errors: Counter::default(),
            mesh: crate::mesh::MeshMetrics::default(),
            registry: Registry::default(),
        };
        m.mesh.register(&mut registry);
        registry.register(
            "cairn_adopted_sequence",
            "Sequence of the adopted release per channel",
            m.adopted_sequence.clone(),
        );
        registry.register(
            "cairn_last_good_sequence",
            "Sequence of the release last reconciled successfully",
            m.last_good_sequence.clone(),
        );
        registry.register("cairn_adoptions", "Releases adopted", m.adoptions.clone());
        registry.register(
            "cairn_release_rejections",
            "Candidates (roots, releases, manifests, objects) rejected, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "cairn_source_fetch_errors",
            "Failed source requests",
            m.fetch_errors.clone(),
        );
        registry.register(
            "cairn_source_up",
            "1 if the last sync reached the source",
            m.source_up.clone(),
        );
        registry.register(
            "cairn_reconcile_duration_seconds",
            "Time taken by each reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "cairn_reconciles",
            "Reconciles by result",
            m.reconciles.clone(),
        );
        registry.register(
            "cairn_drift_corrections",
            "Target objects restored after hand edits or deletions",
            m.drift_corrections.clone(),
        );
        registry.register(
            "cairn_rollbacks",
            "Releases that failed their health checks and were rolled back to last-good",
            m.rollbacks.clone(),
        );
        registry.register(
            "cairn_offline",
            "1 when no source was reachable in the last attempt",
            m.offline.clone(),
        );
        registry.register(
            "cairn_root_version",
            "Version of the current trust root",
            m.root_version.clone(),
        );
        registry.register(
            "cairn_adopted_release_expired",
            "1 when the enforced release has expired (still enforced)",
            m.adopted_release_expired.clone(),
        );
        m.trust_root_info
            .get_or_create(&TrustRootLabel {
                origin: cairn_keys::embedded::ORIGIN.to_owned(),
                version: crate::status::embedded_root_version().to_string(),
            })
            .set(1);
        m.development_root
            .set(i64::from(cairn_keys::embedded::is_development()));
        registry.register(
            "cairn_trust_root_info",
            "The trust root compiled into the agent (always 1)",
            m.trust_root_info.clone(),
        );
        registry.register(
            "cairn_development_root",
            "1 when the agent embeds the development trust root, whose private keys are public",
            m.development_root.clone(),
        );
        registry.register(
            "cairn_store_up",
            "1 while the local store takes writes; 0 after an IO error (full or failing disk) until it recovers",
            m.store_up.clone(),
        );
        registry.register(
            "cairn_store_errors",
            "IO errors of the local store",
            m.store_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a rejection.
    pub fn reject(&self, reason: &str) {
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The text exposition (OpenMetrics text format).
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_exposed() {
        let m = super::Metrics::new();
        m.reject("rollback");
        m.drift_corrections.inc();
        let t = m.encode();
        assert!(
            t.contains("cairn_release_rejections_total{reason=\"rollback\"} 1"),
            "{t}"
        );
        assert!(t.contains("cairn_drift_corrections_total 1"), "{t}");
        assert!(t.contains("cairn_reconcile_duration_seconds_bucket"), "{t}");
        let dev = i64::from(cairn_keys::embedded::is_development());
        assert!(
            t.contains(&format!("cairn_development_root {dev}\n")),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "cairn_trust_root_info{{origin=\"{}\",version=\"1\"}} 1",
                cairn_keys::embedded::ORIGIN
            )),
            "{t}"
        );
    }
}
