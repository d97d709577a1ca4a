//! Prometheus metrics (prometheus-client), served at `/metrics`.
//!
//! `/metrics` speaks both exposition formats ([`negotiate`]): OpenMetrics
//! 1.0 when the client asks for it (a Prometheus server does), otherwise
//! the Prometheus text format 0.0.4, which `promtool check metrics` lints
//! clean (a test runs it against a real agent). Every metric has HELP
//! text; counters are registered by their base name and exposed with
//! `_total`, as both formats require.
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
//! | `cairn_notifications_sent_total` | counter | | notification deliveries a webhook accepted (2xx) |
//! | `cairn_notifications_failed_total` | counter | | notification delivery attempts that failed (retried) |
//! | `cairn_notifications_dropped_total` | counter | | undelivered events dropped from the full outbox (oldest first) |
//! | `cairn_notifications_queued` | gauge | | events in the persistent outbox not yet delivered to every webhook |
//! | `cairn_image_bytes_held` | gauge | | bytes of image blobs on disk served for adopted and staged releases |
//! | `cairn_image_bytes_served_total` | counter | | bytes the image registry sent |
//! | `cairn_image_bytes_fetched_total` | counter | | bytes of image blobs fetched from sources |
//! | `cairn_image_blobs_refused_total` | counter | | image blobs refused (wrong digest, over the limit) |

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
    /// `ok` or `error`; reconciles also `progressing` (a new release
    /// still rolling out, run again soon).
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
    /// Notification deliveries a webhook accepted.
    pub notifications_sent: Counter,
    /// Notification delivery attempts that failed (each is retried).
    pub notifications_failed: Counter,
    /// Undelivered events dropped because the outbox was full.
    pub notifications_dropped: Counter,
    /// Events in the outbox not yet delivered to every webhook.
    pub notifications_queued: Gauge,
    /// The mesh's metrics (`cairn_mesh_*`, see [`crate::mesh::MeshMetrics`]).
    pub mesh: crate::mesh::MeshMetrics,
    /// The image metrics (`cairn_image_*`, see [`crate::images::ImageMetrics`]).
    pub images: crate::images::ImageMetrics,
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
            notifications_sent: Counter::default(),
            notifications_failed: Counter::default(),
            notifications_dropped: Counter::default(),
            notifications_queued: Gauge::default(),
            mesh: crate::mesh::MeshMetrics::default(),
            images: crate::images::ImageMetrics::default(),
            registry: Registry::default(),
        };
        m.mesh.register(&mut registry);
        m.images.register(&mut registry);
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
        registry.register(
            "cairn_notifications_sent",
            "Notification deliveries a webhook accepted (2xx)",
            m.notifications_sent.clone(),
        );
        registry.register(
            "cairn_notifications_failed",
            "Notification delivery attempts that failed (each is retried with backoff)",
            m.notifications_failed.clone(),
        );
        registry.register(
            "cairn_notifications_dropped",
            "Undelivered notification events dropped, oldest first, because the outbox was full",
            m.notifications_dropped.clone(),
        );
        registry.register(
            "cairn_notifications_queued",
            "Notification events in the persistent outbox not yet delivered to every webhook",
            m.notifications_queued.clone(),
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

    /// The exposition in the Prometheus text format 0.0.4 (what
    /// `promtool check metrics`, `curl` users and older scrapers read).
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }

    /// The exposition a client asked for with its `Accept` header:
    /// `(content type, body)`. See [`negotiate`].
    pub fn exposition(&self, accept: Option<&str>) -> (&'static str, String) {
        match negotiate(accept) {
            Format::OpenMetrics => (OPENMETRICS_CONTENT_TYPE, self.encode()),
            Format::PrometheusText => (PROMETHEUS_TEXT_CONTENT_TYPE, self.encode_prometheus_text()),
        }
    }
}

/// Content type of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text exposition.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (`# EOF`, counters typed by their base name).
    OpenMetrics,
    /// Prometheus text 0.0.4.
    PrometheusText,
}

/// Picks the format for an `Accept` header, as the Prometheus client
/// libraries do: OpenMetrics when the client accepts
/// `application/openmetrics-text` at least as much as `text/plain` (a
/// Prometheus server's scrape sends exactly that preference), otherwise
/// (no header, `*/*`, `text/plain`: curl, promtool, a browser) the
/// Prometheus text format.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::PrometheusText;
    };
    let mut q_open = 0.0f32;
    let mut q_text = 0.0f32;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => q_open = q_open.max(q),
            "text/plain" | "text/*" | "*/*" => q_text = q_text.max(q),
            _ => {}
        }
    }
    if q_open > 0.0 && q_open >= q_text {
        Format::OpenMetrics
    } else {
        Format::PrometheusText
    }
}

/// Rewrites prometheus-client's OpenMetrics text into the Prometheus text
/// format 0.0.4. The two differ, for the metric types the agent uses
/// (counter, gauge, histogram; no exemplars), only in:
/// * a counter's `# HELP`/`# TYPE` name: OpenMetrics names the family
///   (`cairn_adoptions`), 0.0.4 the sample (`cairn_adoptions_total`);
/// * `unknown` is `untyped` in 0.0.4;
/// * `# UNIT` and `# EOF` lines and counters' `_created` samples do not
///   exist in 0.0.4.
pub fn openmetrics_to_prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let total = |name: &str| {
        if counters.contains(name) && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_owned()
        }
    };
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", total(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", total(name)));
        } else if counters.iter().any(|c| {
            line.strip_prefix(c)
                .is_some_and(|r| r.starts_with("_created{") || r.starts_with("_created "))
        }) {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
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
        m.notifications_sent.inc();
        m.notifications_queued.set(4);
        let t = m.encode();
        assert!(t.contains("cairn_notifications_sent_total 1"), "{t}");
        assert!(t.contains("cairn_notifications_failed_total 0"), "{t}");
        assert!(t.contains("cairn_notifications_dropped_total 0"), "{t}");
        assert!(t.contains("cairn_notifications_queued 4"), "{t}");
        assert!(
            t.contains("# HELP cairn_notifications_queued Notification events"),
            "{t}"
        );
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

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_has_no_eof() {
        let m = super::Metrics::new();
        m.adoptions.inc();
        let open = m.encode();
        assert!(open.contains("# TYPE cairn_adoptions counter\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        let t = m.encode_prometheus_text();
        assert!(
            t.contains("# HELP cairn_adoptions_total Releases adopted.\n# TYPE cairn_adoptions_total counter\ncairn_adoptions_total 1\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE cairn_offline gauge\ncairn_offline 0\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE cairn_reconcile_duration_seconds histogram\n"),
            "{t}"
        );
        assert!(!t.contains("# EOF"), "{t}");
        assert!(!t.contains("# UNIT"), "{t}");
        // Every sample line of the OpenMetrics text survives unchanged.
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&open), samples(&t));
    }

    #[test]
    fn conversion_handles_unknown_units_and_created() {
        let open = "# HELP a_seconds A.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\n\
                    a_seconds_total 2\na_seconds_created 17.5\n# HELP b B.\n# TYPE b unknown\nb 1\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_prometheus_text(open),
            "# HELP a_seconds_total A.\n# TYPE a_seconds_total counter\na_seconds_total 2\n\
             # HELP b B.\n# TYPE b untyped\nb 1\n"
        );
    }

    /// Every metric the agent registers, each family with a member, passes
    /// `promtool check metrics` (Debian's `prometheus` package; .ci/run
    /// installs it) with no lint message: names, units, `_total`, HELP.
    #[test]
    fn every_metric_passes_promtool_lint() {
        use crate::mesh::{DirectionLabel, FromLabel, PeerReasonLabel};
        let m = super::Metrics::new();
        let ch = super::ChannelLabel {
            channel: "stable".into(),
        };
        m.adopted_sequence.get_or_create(&ch).set(3);
        m.last_good_sequence.get_or_create(&ch).set(2);
        m.adoptions.inc();
        m.notifications_sent.inc();
        m.notifications_failed.inc();
        m.notifications_dropped.inc();
        m.notifications_queued.set(2);
        m.reject("signature");
        m.fetch_errors
            .get_or_create(&super::SourceErrorLabel {
                source: "https://example.invalid/repo".into(),
                kind: "http".into(),
            })
            .inc();
        m.source_up
            .get_or_create(&super::SourceLabel {
                source: "/mnt/usb".into(),
            })
            .set(1);
        m.reconcile_duration.observe(0.02);
        m.reconciles
            .get_or_create(&super::ResultLabel {
                result: "ok".into(),
            })
            .inc();
        m.drift_corrections.inc();
        m.rollbacks.inc();
        m.store_errors.inc();
        m.mesh.peers_connected.set(1);
        let dir = DirectionLabel {
            direction: "in".into(),
        };
        m.mesh.frames.get_or_create(&dir).inc();
        m.mesh.bytes.get_or_create(&dir).inc_by(40);
        let from = FromLabel {
            from: "peer".into(),
        };
        m.mesh.objects_fetched.get_or_create(&from).inc();
        m.mesh.object_bytes_fetched.get_or_create(&from).inc_by(100);
        m.mesh
            .rejections
            .get_or_create(&PeerReasonLabel {
                peer: "agent-1".into(),
                reason: "forged".into(),
            })
            .inc();
        m.mesh.handshake_failures.inc();
        m.mesh.connections_refused.inc();
        m.mesh
            .status_dropped
            .get_or_create(&crate::mesh::ReasonLabel {
                reason: "expired".into(),
            })
            .inc();
        m.images.bytes_held.set(10);
        m.images.bytes_served.inc_by(10);
        m.images.bytes_fetched.inc_by(10);
        m.images.blobs_refused.inc();
        m.images.peer_bytes.inc_by(10);
        let text = m.encode_prometheus_text();
        // Each registered family shows up (a new metric must be populated
        // above to be linted).
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, 35, "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# HELP ")).count(),
            families,
            "{text}"
        );
        let (code, said) = cairn_test_support::promtool_check(&text);
        assert!(
            code == Some(0) && said.is_empty(),
            "promtool: {said}\n{text}"
        );
    }

    #[test]
    fn negotiation_follows_the_accept_header() {
        use super::{negotiate, Format};
        // What Prometheus 2.x/3.x sends on a scrape.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(negotiate(None), Format::PrometheusText);
        assert_eq!(negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(negotiate(Some("text/plain")), Format::PrometheusText);
        assert_eq!(
            negotiate(Some("text/plain;q=1, application/openmetrics-text;q=0.5")),
            Format::PrometheusText
        );
        assert_eq!(
            negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::PrometheusText
        );
    }
}
