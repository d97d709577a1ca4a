//! The agent's configuration: a YAML file plus `CAIRN_<FIELD>` environment
//! overrides, validated field by field.
//!
//! Parsing happens in two steps: serde reads the YAML into optional raw
//! fields (unknown fields are refused, naming the field), then
//! `Config::from_raw` checks every value and collects one error line per
//! bad field (`pollInterval: unknown unit ...`). Environment variables
//! replace file values before validation. The reference is in
//! `docs/OPERATIONS.md`.

use cairn_core::duration::parse_duration;
use cairn_core::AgentId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cairn";
/// Default HTTP listen address.
pub const DEFAULT_LISTEN_HTTP: &str = "127.0.0.1:9440";

/// One or more configuration errors, each a line naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines.join("\n"))]
pub struct ConfigError {
    /// `config <file>: <field>: <message>` lines.
    pub lines: Vec<String>,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}`: expected `text` or `json`")),
        }
    }
}

/// Where desired state is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetConfig {
    /// Write objects as files into a directory (e.g. the k3s auto-deploy
    /// folder).
    ManifestsDir(PathBuf),
    /// Apply to a Kubernetes API server (server-side apply). Parsed now,
    /// implemented by issue 6.
    Kubernetes(KubernetesTarget),
}

/// The Kubernetes target's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesTarget {
    /// A kubeconfig file; `None` means in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// Namespace for the agent's own objects (the status ConfigMap).
    pub namespace: String,
    /// How long a newly adopted release may take to become healthy before
    /// it is marked failed and the last-good release is re-applied.
    pub health_timeout: Duration,
    /// Server-side apply with `force`: take over fields other managers own.
    pub force: bool,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, if any.
    pub path: Option<PathBuf>,
    /// The agent id; `None` means generate once and persist in the store.
    pub agent_id: Option<AgentId>,
    /// Where the store and status file live.
    pub data_dir: PathBuf,
    /// The channel followed.
    pub channel: String,
    /// The agent's labels (matched by release selectors).
    pub labels: BTreeMap<String, String>,
    /// Bundle repositories: URLs or directories.
    pub sources: Vec<String>,
    /// Per HTTP source (keyed by its entry in `sources`): the other hosts
    /// it may redirect to (`allowRedirectsTo`). Redirects to any other
    /// host are refused.
    pub redirect_hosts: BTreeMap<String, Vec<String>>,
    /// Per network source (keyed by its entry in `sources`): `caFile`,
    /// `clientCertFile`/`clientKeyFile`, `credentialsFile`.
    pub source_tls: BTreeMap<String, cairn_oci::NetSettings>,
    /// How often each source is polled.
    pub poll_interval: Duration,
    /// How often the target is reconciled (also after every adoption).
    pub reconcile_interval: Duration,
    /// Upper bound on one source request.
    pub request_timeout: Duration,
    /// Longest delay between retries of a failing source.
    pub max_backoff: Duration,
    /// Where desired state goes.
    pub target: TargetConfig,
    /// The HTTP listener (`/healthz`, `/readyz`, `/metrics`); `None` = off.
    pub listen_http: Option<SocketAddr>,
    /// The read-only image registry (`listen.registry`, docs/IMAGES.md):
    /// the images of adopted and staged releases; `None` = off (images
    /// are then not fetched either).
    pub listen_registry: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// The mesh (`mesh:` section); `None` = no mesh.
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// `insecureAllowDevelopmentRoot`: run even though the embedded trust
    /// root is the development root (demos and tests only; see
    /// [`Config::check_trust_root`]).
    pub insecure_allow_development_root: bool,
    /// Webhook notifications (`notifications:`; see [`crate::notify`]).
    pub notifications: Vec<crate::notify::Sink>,
    /// `valuesFile`: the operator's per-site values (`${name}` in bundles;
    /// docs/SITES.md). Read at every render.
    pub values_file: Option<PathBuf>,
    /// `ageIdentityFile`: this site's age identities, which decrypt the
    /// bundle's `AgeSecret`s (docs/SITES.md).
    pub age_identity_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    agent_id: Option<String>,
    data_dir: Option<String>,
    channel: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    sources: Option<Vec<serde_norway::Value>>,
    poll_interval: Option<String>,
    reconcile_interval: Option<String>,
    request_timeout: Option<String>,
    max_backoff: Option<String>,
    target: Option<RawTarget>,
    listen: Option<RawListen>,
    log_format: Option<String>,
    mesh: Option<crate::mesh::RawMeshConfig>,
    insecure_allow_development_root: Option<bool>,
    notifications: Option<Vec<crate::notify::RawSink>>,
    values_file: Option<String>,
    age_identity_file: Option<String>,
    /// A `CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT` value that is not a
    /// boolean (reported by validation).
    #[serde(skip)]
    bad_env_allow_development_root: Option<String>,
}

/// A `sources` entry written as a map (a plain string is just the URL).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    url: String,
    allow_redirects_to: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    credentials_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTarget {
    manifests_dir: Option<String>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKubernetes {
    kubeconfig: Option<String>,
    namespace: Option<String>,
    health_timeout: Option<String>,
    force: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListen {
    http: Option<String>,
    registry: Option<String>,
}

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl Config {
    /// Reads `path` (if given), applies `CAIRN_*` overrides from the process
    /// environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &|k| std::env::var(k).ok())
    }

    /// [`Config::load`] with an injected environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let origin = match path {
            Some(p) => format!("config {}", p.display()),
            None => "config (environment)".to_owned(),
        };
        let one = |msg: String| ConfigError {
            lines: vec![format!("{origin}: {msg}")],
        };
        let mut raw = match path {
            Some(p) => {
                // A regular file of bounded size; a link is followed
                // (Kubernetes mounts ConfigMaps as links).
                let bytes =
                    crate::fsread::read_capped(p, MAX_CONFIG_BYTES, crate::fsread::Links::Follow)
                        .map_err(|e| one(e.reason()))?;
                let text = String::from_utf8(bytes).map_err(|e| one(format!("not UTF-8: {e}")))?;
                parse_yaml(&text).map_err(one)?
            }
            None => RawConfig::default(),
        };
        apply_env(&mut raw, env);
        Self::from_raw(raw, path, &origin)
    }

    /// Parses YAML text (no environment) — used by tests and `--check`.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw = parse_yaml(text).map_err(|m| ConfigError {
            lines: vec![format!("{origin}: {m}")],
        })?;
        Self::from_raw(raw, None, origin)
    }

    fn from_raw(raw: RawConfig, path: Option<&Path>, origin: &str) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, msg: String| errors.push(format!("{origin}: {field}: {msg}"));

        let agent_id = match raw.agent_id.filter(|s| !s.is_empty()) {
            None => None,
            Some(id) => match AgentId::parse_owned(id) {
                Ok(id) => Some(id),
                Err(e) => {
                    err("agentId", e.to_string());
                    None
                }
            },
        };
        let data_dir = PathBuf::from(raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
        if data_dir.as_os_str().is_empty() {
            err("dataDir", "must not be empty".into());
        }
        let channel = raw.channel.unwrap_or_default();
        if channel.is_empty() {
            err(
                "channel",
                "required (the release channel to follow, e.g. `stable`)".into(),
            );
        } else if let Err(m) = cairn_core::release::validate_channel(&channel) {
            err("channel", m);
        }
        let labels = raw.labels.unwrap_or_default();
        for (k, v) in &labels {
            if let Err(m) = validate_label(k, v) {
                err(&format!("labels.{k}"), m);
            }
        }
        let mut sources: Vec<String> = Vec::new();
        let mut redirect_hosts = BTreeMap::new();
        let mut source_tls = BTreeMap::new();
        for (i, v) in raw.sources.unwrap_or_default().into_iter().enumerate() {
            let field = format!("sources[{i}]");
            let (url, hosts) = match v {
                serde_norway::Value::String(s) => (s, None),
                v @ serde_norway::Value::Mapping(_) => {
                    match serde_norway::from_value::<RawSource>(v) {
                        Ok(r) => {
                            let net = cairn_oci::NetSettings {
                                ca_file: r.ca_file,
                                client_cert_file: r.client_cert_file,
                                client_key_file: r.client_key_file,
                                credentials_file: r.credentials_file,
                                redirect_hosts: Vec::new(),
                            };
                            if let Err(m) = check_source_tls(&r.url, &net) {
                                err(&field, m);
                            }
                            if net != Default::default() {
                                source_tls.insert(r.url.clone(), net);
                            }
                            (r.url, r.allow_redirects_to)
                        }
                        Err(e) => {
                            err(&field, e.to_string());
                            continue;
                        }
                    }
                }
                _ => {
                    err(
                        &field,
                        "expected a URL or directory, or {url: ..., allowRedirectsTo: [...]}"
                            .into(),
                    );
                    continue;
                }
            };
            if let Err(m) = validate_source(&url) {
                err(&field, m);
            }
            if let Some(hosts) = hosts {
                if !is_network(&url) {
                    err(
                        &format!("{field}.allowRedirectsTo"),
                        "only for http://, https:// and oci:// sources".into(),
                    );
                }
                for (j, h) in hosts.iter().enumerate() {
                    if let Err(m) = validate_redirect_host(h) {
                        err(&format!("{field}.allowRedirectsTo[{j}]"), m);
                    }
                }
                redirect_hosts.insert(url.clone(), hosts);
            }
            sources.push(url);
        }
        let mut duration = |field: &str, v: Option<String>, default: Duration| -> Duration {
            match v {
                None => default,
                Some(s) => match parse_duration(&s) {
                    Ok(d) if d.is_zero() => {
                        err(field, "must be greater than zero".into());
                        default
                    }
                    Ok(d) => d,
                    Err(m) => {
                        err(field, m);
                        default
                    }
                },
            }
        };
        let poll_interval = duration("pollInterval", raw.poll_interval, Duration::from_secs(30));
        let reconcile_interval = duration(
            "reconcileInterval",
            raw.reconcile_interval,
            Duration::from_secs(60),
        );
        let request_timeout = duration(
            "requestTimeout",
            raw.request_timeout,
            Duration::from_secs(60),
        );
        let max_backoff = duration("maxBackoff", raw.max_backoff, Duration::from_secs(300));

        let target = match raw.target {
            None => {
                err(
                    "target",
                    "required (`manifestsDir: DIR` or `kubernetes: {...}`)".into(),
                );
                TargetConfig::ManifestsDir(PathBuf::new())
            }
            Some(t) => match (t.manifests_dir, t.kubernetes) {
                (Some(d), None) if !d.is_empty() => TargetConfig::ManifestsDir(PathBuf::from(d)),
                (Some(_), None) => {
                    err("target.manifestsDir", "must not be empty".into());
                    TargetConfig::ManifestsDir(PathBuf::new())
                }
                (None, Some(k)) => TargetConfig::Kubernetes(KubernetesTarget {
                    kubeconfig: k.kubeconfig.filter(|s| !s.is_empty()).map(PathBuf::from),
                    namespace: k.namespace.unwrap_or_else(|| "cairn-system".into()),
                    health_timeout: duration(
                        "target.kubernetes.healthTimeout",
                        k.health_timeout,
                        Duration::from_secs(300),
                    ),
                    force: k.force.unwrap_or(true),
                }),
                (Some(_), Some(_)) => {
                    err(
                        "target",
                        "set either `manifestsDir` or `kubernetes`, not both".into(),
                    );
                    TargetConfig::ManifestsDir(PathBuf::new())
                }
                (None, None) => {
                    err("target", "set `manifestsDir` or `kubernetes`".into());
                    TargetConfig::ManifestsDir(PathBuf::new())
                }
            },
        };
        let (listen_http_raw, listen_registry_raw) =
            raw.listen.map(|l| (l.http, l.registry)).unwrap_or_default();
        let listen_registry = match listen_registry_raw.as_deref() {
            None | Some("") | Some("off") => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    err(
                        "listen.registry",
                        format!("`{s}`: expected HOST:PORT with an IP address (e.g. 127.0.0.1:5000), or `off`"),
                    );
                    None
                }
            },
        };
        let listen_text = listen_http_raw.unwrap_or_else(|| DEFAULT_LISTEN_HTTP.into());
        let listen_http = match listen_text.as_str() {
            "" | "off" => None,
            s => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    err(
                        "listen.http",
                        format!("`{s}`: expected HOST:PORT with an IP address (e.g. 127.0.0.1:9440), or `off`"),
                    );
                    None
                }
            },
        };
        let log_format = match raw.log_format {
            None => LogFormat::Text,
            Some(s) => s.parse().unwrap_or_else(|m| {
                err("logFormat", m);
                LogFormat::Text
            }),
        };
        let mesh = raw.mesh.and_then(|m| {
            m.validate()
                .map_err(|es| es.into_iter().for_each(|(f, m)| err(&f, m)))
                .ok()
        });
        if let Some(v) = &raw.bad_env_allow_development_root {
            err(
                "insecureAllowDevelopmentRoot",
                format!("CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT=`{v}`: expected `true` or `false`"),
            );
        }
        let notifications =
            crate::notify::sinks_from_raw(raw.notifications.unwrap_or_default(), &mut err);
        // The site's files are checked now (a typo fails at start, naming
        // the field) and read again at every render (docs/SITES.md).
        let values_file = raw.values_file.filter(|s| !s.is_empty()).map(PathBuf::from);
        if let Some(p) = &values_file {
            if let Err(m) = crate::site::Site::load(&labels, Some(p), None) {
                err("valuesFile", m);
            }
        }
        let age_identity_file = raw
            .age_identity_file
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if let Some(p) = &age_identity_file {
            if let Err(m) = crate::site::Site::load(&labels, None, Some(p)) {
                err("ageIdentityFile", m);
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError { lines: errors });
        }
        Ok(Config {
            path: path.map(Path::to_path_buf),
            agent_id,
            data_dir,
            channel,
            labels,
            sources,
            redirect_hosts,
            source_tls,
            poll_interval,
            reconcile_interval,
            request_timeout,
            max_backoff,
            target,
            listen_http,
            listen_registry,
            log_format,
            mesh,
            insecure_allow_development_root: raw.insecure_allow_development_root.unwrap_or(false),
            notifications,
            values_file,
            age_identity_file,
        })
    }

    /// Refuses to run with the development trust root (`origin` is
    /// [`cairn_keys::embedded::ORIGIN`]) unless
    /// `insecureAllowDevelopmentRoot` is set: its private keys are checked
    /// in and compiled into the public `cairn` binary, so anyone could sign
    /// releases such an agent adopts. Called before anything is opened.
    pub fn check_trust_root(&self, origin: &str) -> Result<(), ConfigError> {
        if origin != cairn_keys::embedded::DEVELOPMENT || self.insecure_allow_development_root {
            return Ok(());
        }
        let at = match &self.path {
            Some(p) => format!("config {}", p.display()),
            None => "config (environment)".to_owned(),
        };
        Err(ConfigError {
            lines: vec![
                "refusing to run: this cairn-agent embeds the DEVELOPMENT trust root (keys/trust/root.v1)."
                    .into(),
                "Its private keys are public (keys/trust/dev/, and the release key is inside every development `cairn` binary),"
                    .into(),
                "so anyone could sign releases this agent would adopt.".into(),
                "Rebuild the agent with your organisation's root: `CAIRN_TRUST_ROOT=/path/to/root.v1 cargo build --release`"
                    .into(),
                "(container image: `--build-arg CAIRN_TRUST_ROOT=...`; see docs/SECURITY.md).".into(),
                format!(
                    "For a demo or a test only, set `insecureAllowDevelopmentRoot: true` in {at} \
                     or CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT=true."
                ),
            ],
        })
    }

    /// The status file the running agent publishes.
    pub fn status_path(&self) -> PathBuf {
        crate::status::status_path(&self.data_dir)
    }
}

fn parse_yaml(text: &str) -> Result<RawConfig, String> {
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    serde_norway::from_str::<Option<RawConfig>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

mod env;
mod validate;

use env::apply_env;
pub use env::ENV_VARS;
use validate::{
    check_source_tls, is_network, validate_label, validate_redirect_host, validate_source,
};

#[cfg(test)]
mod tests;
