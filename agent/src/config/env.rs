//! `CAIRN_<FIELD>` environment variables: which fields they replace, and
//! replacing them in the raw configuration before validation.

use super::{RawConfig, RawTarget};
use std::collections::BTreeMap;

/// Environment variables and the fields they replace.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("CAIRN_AGENT_ID", "agentId"),
    ("CAIRN_DATA_DIR", "dataDir"),
    ("CAIRN_CHANNEL", "channel"),
    ("CAIRN_LABELS", "labels (k=v,k=v)"),
    ("CAIRN_SOURCES", "sources (comma-separated)"),
    ("CAIRN_POLL_INTERVAL", "pollInterval"),
    ("CAIRN_RECONCILE_INTERVAL", "reconcileInterval"),
    ("CAIRN_REQUEST_TIMEOUT", "requestTimeout"),
    ("CAIRN_MAX_BACKOFF", "maxBackoff"),
    ("CAIRN_MANIFESTS_DIR", "target.manifestsDir"),
    ("CAIRN_LISTEN_HTTP", "listen.http"),
    ("CAIRN_LOG_FORMAT", "logFormat"),
    (
        "CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT",
        "insecureAllowDevelopmentRoot",
    ),
];

pub(super) fn apply_env(raw: &mut RawConfig, env: &dyn Fn(&str) -> Option<String>) {
    let get = |k: &str| env(k);
    if let Some(v) = get("CAIRN_AGENT_ID") {
        raw.agent_id = Some(v);
    }
    if let Some(v) = get("CAIRN_DATA_DIR") {
        raw.data_dir = Some(v);
    }
    if let Some(v) = get("CAIRN_CHANNEL") {
        raw.channel = Some(v);
    }
    if let Some(v) = get("CAIRN_LABELS") {
        let mut m = BTreeMap::new();
        for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(k.trim().to_owned(), val.trim().to_owned());
        }
        raw.labels = Some(m);
    }
    if let Some(v) = get("CAIRN_SOURCES") {
        raw.sources = Some(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| serde_norway::Value::String(s.to_owned()))
                .collect(),
        );
    }
    if let Some(v) = get("CAIRN_VALUES_FILE") {
        raw.values_file = Some(v);
    }
    if let Some(v) = get("CAIRN_AGE_IDENTITY_FILE") {
        raw.age_identity_file = Some(v);
    }
    if let Some(v) = get("CAIRN_POLL_INTERVAL") {
        raw.poll_interval = Some(v);
    }
    if let Some(v) = get("CAIRN_RECONCILE_INTERVAL") {
        raw.reconcile_interval = Some(v);
    }
    if let Some(v) = get("CAIRN_REQUEST_TIMEOUT") {
        raw.request_timeout = Some(v);
    }
    if let Some(v) = get("CAIRN_MAX_BACKOFF") {
        raw.max_backoff = Some(v);
    }
    if let Some(v) = get("CAIRN_MANIFESTS_DIR") {
        raw.target = Some(RawTarget {
            manifests_dir: Some(v),
            kubernetes: None,
        });
    }
    if let Some(v) = get("CAIRN_LISTEN_HTTP") {
        raw.listen.get_or_insert_with(Default::default).http = Some(v);
    }
    if let Some(v) = get("CAIRN_LISTEN_REGISTRY") {
        raw.listen.get_or_insert_with(Default::default).registry = Some(v);
    }
    if let Some(v) = get("CAIRN_LOG_FORMAT") {
        raw.log_format = Some(v);
    }
    if let Some(v) = get("CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT") {
        match v.trim() {
            "true" => raw.insecure_allow_development_root = Some(true),
            "false" => raw.insecure_allow_development_root = Some(false),
            _ => raw.bad_env_allow_development_root = Some(v),
        }
    }
}
