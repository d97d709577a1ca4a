//! Webhook notifications with a persistent outbox.
//!
//! Each event (adopted, health failed, rolled back, breaker tripped, hold
//! placed, hold ended) is written to the store's outbox
//! ([`crate::store::outbox`]) where it happens, durably, before anything
//! delivers it. One delivery task per configured webhook ([`Sink`]) sends
//! the events after its cursor in order, retrying each with backoff until
//! the webhook answers 2xx: an offline site's history arrives later
//! instead of being lost. Delivery is at least once: every event carries a
//! stable id (`<agentId>/<epoch>/<number>`) for receivers to de-duplicate.
//! Webhook URLs (Slack tokens) are never logged: only their host is.

use crate::retry::Backoff;
use crate::store::StoreHandle;
use cairn_core::AgentId;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Largest number of undelivered events kept; the oldest are dropped past
/// it (`cairn_notifications_dropped_total`).
pub const OUTBOX_CAP: u64 = 10_000;

/// Longest message kept in an event (characters).
const MAX_MESSAGE: usize = 1024;

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    /// A release was adopted.
    Adopted,
    /// The adopted release failed its health checks.
    HealthFailed,
    /// The last-good release was enforced again after a health failure.
    RolledBack,
    /// The rollout circuit breaker stopped a release for this agent.
    BreakerTripped,
    /// A local hold was placed (or found at start-up).
    HoldPlaced,
    /// The local hold was released or expired.
    HoldEnded,
}

impl EventKind {
    /// Every kind, as written in `events:`.
    pub const ALL: [EventKind; 6] = [
        EventKind::Adopted,
        EventKind::HealthFailed,
        EventKind::RolledBack,
        EventKind::BreakerTripped,
        EventKind::HoldPlaced,
        EventKind::HoldEnded,
    ];

    /// The name in config and payloads.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Adopted => "adopted",
            EventKind::HealthFailed => "healthFailed",
            EventKind::RolledBack => "rolledBack",
            EventKind::BreakerTripped => "breakerTripped",
            EventKind::HoldPlaced => "holdPlaced",
            EventKind::HoldEnded => "holdEnded",
        }
    }
}

/// An event as stored in the outbox (no id yet: that is the outbox
/// number's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// When, Unix seconds.
    pub time: u64,
    /// The agent's channel.
    pub channel: String,
    /// The release concerned, if any.
    pub sequence: Option<u64>,
    /// Its bundle id, if any.
    pub bundle: Option<String>,
    /// For humans.
    pub message: String,
}

impl Event {
    /// An event now.
    pub fn new(
        event: EventKind,
        channel: &str,
        release: Option<(u64, &str)>,
        message: String,
    ) -> Self {
        let message = if message.chars().count() > MAX_MESSAGE {
            message.chars().take(MAX_MESSAGE).collect::<String>() + "…"
        } else {
            message
        };
        Event {
            event,
            time: crate::unix_now(),
            channel: channel.chars().take(256).collect(),
            sequence: release.map(|r| r.0),
            bundle: release.map(|r| r.1.chars().take(256).collect()),
            message,
        }
    }
}

/// The generic JSON payload (field order fixed; see docs/OPERATIONS.md).
#[derive(Serialize)]
struct JsonPayload<'a> {
    id: String,
    agent: &'a AgentId,
    event: &'static str,
    time: u64,
    channel: &'a str,
    sequence: Option<u64>,
    bundle: Option<&'a str>,
    message: &'a str,
}

#[derive(Serialize)]
struct SlackPayload {
    text: String,
}

/// The payload format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `JsonPayload`.
    Json,
    /// `{"text": ...}` (Slack incoming webhooks, Mattermost, Rocket.Chat).
    Slack,
}

/// The body sent for event number `number` in `format`.
pub fn payload(format: Format, agent: &AgentId, epoch: &str, number: u64, e: &Event) -> Vec<u8> {
    let id = format!("{agent}/{epoch}/{number}");
    let body = match format {
        Format::Json => serde_json::to_vec(&JsonPayload {
            id,
            agent,
            event: e.event.name(),
            time: e.time,
            channel: &e.channel,
            sequence: e.sequence,
            bundle: e.bundle.as_deref(),
            message: &e.message,
        }),
        Format::Slack => serde_json::to_vec(&SlackPayload {
            text: format!(
                "[cairn {agent}] {}: {} (id {id})",
                e.event.name(),
                e.message
            ),
        }),
    };
    body.unwrap_or_default()
}

/// A `notifications:` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSink {
    url: String,
    format: Option<String>,
    events: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
}

/// One configured webhook.
#[derive(Clone, PartialEq, Eq)]
pub struct Sink {
    /// The URL (may hold a secret token: never log it, see [`Sink::display`]).
    pub url: String,
    /// Payload format.
    pub format: Format,
    /// The events sent (all when the config lists none).
    pub events: Vec<EventKind>,
    /// Extra CA certificate (PEM) for an `https://` webhook.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("url", &self.display())
            .field("format", &self.format)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// The URL without path, query or user info (what logs show).
    pub fn display(&self) -> String {
        redact(&self.url)
    }

    /// The outbox cursor name: a hash of URL and format, so a changed
    /// webhook starts afresh and the URL itself is not stored.
    pub fn key(&self) -> String {
        let d = cairn_keys::sha256_address(format!("{:?}\0{}", self.format, self.url).as_bytes());
        d.trim_start_matches("sha256:").chars().take(16).collect()
    }
}

/// `scheme://host[:port]/…` of a URL: no user info, path or query.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("?", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let tail = if rest.len() > authority.len() {
        "/…"
    } else {
        ""
    };
    cairn_keys::text::escape_untrusted(&format!("{scheme}://{host}{tail}"))
}

/// Validates `notifications:`; errors go to `err(field, message)`.
pub fn sinks_from_raw(raw: Vec<RawSink>, err: &mut dyn FnMut(&str, String)) -> Vec<Sink> {
    let mut out = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let field = format!("notifications[{i}]");
        let shown = redact(&r.url);
        match reqwest::Url::parse(&r.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                err(
                    &format!("{field}.url"),
                    format!("`{shown}`: expected an http:// or https:// URL"),
                );
                continue;
            }
        }
        let format = match r.format.as_deref() {
            None | Some("json") => Format::Json,
            Some("slack") => Format::Slack,
            Some(f) => {
                err(
                    &format!("{field}.format"),
                    format!(
                        "`{}`: expected `json` or `slack`",
                        cairn_keys::text::escape_untrusted(f)
                    ),
                );
                continue;
            }
        };
        let mut events = Vec::new();
        for name in r.events.unwrap_or_default() {
            match EventKind::ALL.iter().find(|k| k.name() == name) {
                Some(k) => events.push(*k),
                None => err(
                    &format!("{field}.events"),
                    format!(
                        "`{}`: expected one of {}",
                        cairn_keys::text::escape_untrusted(&name),
                        EventKind::ALL.map(EventKind::name).join(", ")
                    ),
                ),
            }
        }
        if events.is_empty() {
            events = EventKind::ALL.to_vec();
        }
        if r.ca_file.is_some() && !r.url.starts_with("https://") {
            err(
                &format!("{field}.caFile"),
                "only for https:// webhooks".into(),
            );
        }
        out.push(Sink {
            url: r.url,
            format,
            events,
            ca_file: r.ca_file,
        });
    }
    out
}

/// The notification metrics (handles shared with [`crate::metrics::Metrics`]).
#[derive(Clone, Debug)]
pub struct NotifyMetrics {
    notifications_sent: prometheus_client::metrics::counter::Counter,
    notifications_failed: prometheus_client::metrics::counter::Counter,
    notifications_dropped: prometheus_client::metrics::counter::Counter,
    notifications_queued: prometheus_client::metrics::gauge::Gauge,
}

impl NotifyMetrics {
    /// The agent's notification metrics.
    pub fn of(m: &crate::metrics::Metrics) -> Self {
        NotifyMetrics {
            notifications_sent: m.notifications_sent.clone(),
            notifications_failed: m.notifications_failed.clone(),
            notifications_dropped: m.notifications_dropped.clone(),
            notifications_queued: m.notifications_queued.clone(),
        }
    }
}

/// Writes events to the outbox and runs the delivery tasks.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<NotifierInner>,
}

struct NotifierInner {
    sinks: Vec<Sink>,
    agent_id: AgentId,
    channel: String,
    store: StoreHandle,
    metrics: NotifyMetrics,
    wake: tokio::sync::Notify,
    request_timeout: Duration,
    max_backoff: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("sinks", &self.inner.sinks)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier for the configured sinks.
    pub fn new(
        sinks: Vec<Sink>,
        agent_id: &AgentId,
        channel: &str,
        store: StoreHandle,
        metrics: NotifyMetrics,
        request_timeout: Duration,
        max_backoff: Duration,
    ) -> Self {
        Notifier {
            inner: Arc::new(NotifierInner {
                sinks,
                agent_id: agent_id.clone(),
                channel: channel.to_owned(),
                store,
                metrics,
                wake: tokio::sync::Notify::new(),
                request_timeout,
                max_backoff,
            }),
        }
    }

    /// Whether any webhook is configured (no events are recorded otherwise).
    pub fn enabled(&self) -> bool {
        !self.inner.sinks.is_empty()
    }

    /// Records an event durably in the outbox (on a blocking thread) and
    /// wakes delivery. With a `marker`, only when the marker's state
    /// changes (see [`crate::store::Store::outbox_push`]). Failures are
    /// logged, never fatal: a notification never blocks the agent's work.
    pub async fn emit(
        &self,
        kind: EventKind,
        release: Option<(u64, &str)>,
        message: String,
        marker: Option<(&'static str, Vec<u8>)>,
    ) {
        if !self.enabled() {
            return;
        }
        let event = Event::new(kind, &self.inner.channel, release, message);
        let Ok(bytes) = serde_json::to_vec(&event) else {
            return;
        };
        let pushed = self
            .inner
            .store
            .call(move |s| {
                s.outbox_push(
                    &bytes,
                    OUTBOX_CAP,
                    marker.as_ref().map(|(n, v)| (*n, v.as_slice())),
                )
            })
            .await;
        match pushed {
            Ok(Some(p)) => {
                let m = &self.inner.metrics;
                m.notifications_dropped.inc_by(p.dropped);
                m.notifications_queued.set(gauge(p.queued));
                if p.dropped > 0 {
                    tracing::warn!(
                        dropped = p.dropped,
                        cap = OUTBOX_CAP,
                        "notification outbox full: oldest undelivered events dropped"
                    );
                }
                tracing::debug!(
                    event = kind.name(),
                    number = p.number,
                    "notification queued"
                );
                self.inner.wake.notify_waiters();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(event = kind.name(), error = %e, "cannot queue notification"),
        }
    }

    /// Runs one delivery task per webhook until aborted.
    pub async fn run(self) {
        if !self.enabled() {
            return std::future::pending().await;
        }
        let epoch = loop {
            match self.inner.store.call(|s| s.outbox_epoch()).await {
                Ok(e) => break e,
                Err(e) => {
                    tracing::warn!(error = %e, "notification outbox unreadable; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        if let Ok(n) = self.inner.store.call(|s| s.outbox_len()).await {
            self.inner.metrics.notifications_queued.set(gauge(n));
        }
        tracing::debug!(epoch = %epoch, webhooks = self.inner.sinks.len(), "notification delivery started");
        let tasks = (0..self.inner.sinks.len()).map(|i| self.clone().deliver(i, epoch.clone()));
        futures::future::join_all(tasks).await;
    }

    fn client(&self, sink: &Sink) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .timeout(self.inner.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cairn-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &sink.ca_file {
            let pem = crate::fsread::read_regular_file_capped(ca, 1 << 20)
                .map_err(|e| format!("caFile {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("caFile {}: {}", ca.display(), e.without_url()))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        b.build().map_err(|e| e.without_url().to_string())
    }

    async fn deliver(self, index: usize, epoch: String) {
        let inner = &self.inner;
        let sink = &inner.sinks[index];
        let key = sink.key();
        let all_keys: Vec<String> = inner.sinks.iter().map(Sink::key).collect();
        let shown = sink.display();
        let mut backoff = Backoff::new(Duration::from_millis(500), inner.max_backoff);
        let client = loop {
            match self.client(sink) {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(webhook = %shown, error = %e, "notification webhook unusable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        loop {
            // Registered before reading, so a push in between wakes us.
            let woken = inner.wake.notified();
            let k = key.clone();
            let batch = inner.store.call(move |s| s.outbox_pending(&k, 64)).await;
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "notification outbox unreadable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            tracing::debug!(webhook = %shown, events = batch.len(), "notification batch");
            if batch.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(30), woken).await;
                continue;
            }
            for (number, bytes) in batch {
                let event: Option<Event> = serde_json::from_slice(&bytes).ok();
                if let Some(e) = event.filter(|e| sink.events.contains(&e.event)) {
                    let body = payload(sink.format, &inner.agent_id, &epoch, number, &e);
                    loop {
                        let sent = client
                            .post(&sink.url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await;
                        let failure = match sent {
                            Ok(r) if r.status().is_success() => None,
                            Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
                            Err(e) => Some(e.without_url().to_string()),
                        };
                        let Some(why) = failure else {
                            inner.metrics.notifications_sent.inc();
                            backoff.reset();
                            break;
                        };
                        inner.metrics.notifications_failed.inc();
                        let d = backoff.next_delay();
                        tracing::warn!(
                            webhook = %shown,
                            event = e.event.name(),
                            error = %cairn_keys::text::escape_untrusted(&why),
                            retry_ms = d.as_millis() as u64,
                            "notification not delivered; retrying"
                        );
                        tokio::time::sleep(d).await;
                    }
                }
                let (k, keys) = (key.clone(), all_keys.clone());
                match inner
                    .store
                    .call(move |s| s.outbox_ack(&k, number, &keys))
                    .await
                {
                    Ok(left) => {
                        inner.metrics.notifications_queued.set(gauge(left));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot record a notification as delivered");
                        tokio::time::sleep(backoff.next_delay()).await;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_stable_and_urls_redacted() {
        let e = Event {
            event: EventKind::Adopted,
            time: 1_700_000_000,
            channel: "stable".into(),
            sequence: Some(3),
            bundle: Some("b1".into()),
            message: "release 3 adopted".into(),
        };
        let a1 = AgentId::parse("a1").unwrap();
        assert_eq!(
            String::from_utf8(payload(Format::Json, &a1, "0badcafe", 7, &e)).unwrap(),
            r#"{"id":"a1/0badcafe/7","agent":"a1","event":"adopted","time":1700000000,"channel":"stable","sequence":3,"bundle":"b1","message":"release 3 adopted"}"#
        );
        assert_eq!(
            String::from_utf8(payload(Format::Slack, &a1, "0badcafe", 7, &e)).unwrap(),
            r#"{"text":"[cairn a1] adopted: release 3 adopted (id a1/0badcafe/7)"}"#
        );
        assert_eq!(
            redact("https://hooks.slack.com/services/T0/B0/SECRET"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(redact("http://u:pw@h:8080?x=1"), "http://h:8080/…");
        let mut errs = Vec::new();
        let raw: Vec<RawSink> = serde_norway::from_str(
            "[{url: 'https://h/x', format: slack, events: [adopted, holdPlaced]}, {url: 'ftp://h/SECRET'}, {url: 'http://h', format: xml}, {url: 'http://h', events: [nope]}]",
        )
        .unwrap();
        let sinks = sinks_from_raw(raw, &mut |f, m| errs.push(format!("{f}: {m}")));
        assert_eq!(sinks.len(), 2, "{errs:?}");
        assert_eq!(sinks[0].format, Format::Slack);
        assert_eq!(
            sinks[0].events,
            vec![EventKind::Adopted, EventKind::HoldPlaced]
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().all(|e| !e.contains("SECRET")), "{errs:?}");
        assert!(errs[0].starts_with("notifications[1].url"), "{errs:?}");
        assert!(!format!("{:?}", sinks[0]).contains("/x"));
    }

    #[test]
    fn config_field_is_parsed_and_errors_name_the_entry() {
        let base = "channel: stable\ndataDir: /tmp/x\ntarget:\n  manifestsDir: /tmp/m\n";
        let c = crate::config::Config::parse(
            &format!("{base}notifications:\n  - url: https://h/T/SECRET\n    format: slack\n    events: [rolledBack]\n"),
            "agent.yaml",
        )
        .unwrap();
        assert_eq!(c.notifications.len(), 1);
        assert_eq!(c.notifications[0].events, vec![EventKind::RolledBack]);
        let e = crate::config::Config::parse(
            &format!("{base}notifications:\n  - url: https://h/T/SECRET\n    events: [exploded]\n"),
            "agent.yaml",
        )
        .unwrap_err();
        let text = e.lines.join("\n");
        assert!(
            text.contains("agent.yaml: notifications[0].events: `exploded`"),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
    }
}
