//! OCI registries as bundle repositories: the artifact layout
//! (`docs/FORMATS.md`, "OCI artifact"), a small client for the subset of
//! the OCI distribution protocol Cairn needs, and TLS/credential settings
//! shared by every network source.
//!
//! Why not the `oci-client` crate: its current release (0.18) is built on
//! reqwest 0.13, whose `rustls` feature selects aws-lc-rs (banned here;
//! the `rustls-no-provider` escape means a second reqwest/hyper-rustls
//! stack next to the workspace's reqwest 0.12), and its pull API writes
//! blobs without a byte limit chosen per call. Cairn needs eight requests
//! (`docs/REGISTRY.md`), each with a size limit before allocation, a
//! digest check, per-source CA/client certificate and the same redirect
//! policy as HTTP sources; that is this module, on the workspace's reqwest.
//!
//! **The registry is untrusted.** Every manifest fetched by digest and
//! every blob is checked against its digest here; what a tag points to is
//! decided by the signed release it leads to (the agent's pipeline and
//! `cairn pull` verify it like any repository).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod blobfile;

use cairn_core::bundle::is_address;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Media type of OCI image manifests.
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of OCI image indexes.
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type (and bytes, `{}`) of the empty config descriptor.
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The empty config's bytes.
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// Artifact type of a channel's index and its release manifest.
pub const AT_RELEASE: &str = "application/vnd.cairn.release.v1";
/// Artifact type of the roots manifest.
pub const AT_ROOTS: &str = "application/vnd.cairn.roots.v1";
/// Artifact type of an object chunk manifest.
pub const AT_OBJECTS: &str = "application/vnd.cairn.objects.v1";
/// Layer media type: a release envelope.
pub const MT_RELEASE: &str = "application/vnd.cairn.release.v1+cbor";
/// Layer media type: a root envelope.
pub const MT_ROOT: &str = "application/vnd.cairn.root.v1+cbor";
/// Layer media type: a bundle manifest.
pub const MT_BUNDLE: &str = "application/vnd.cairn.bundle.v1+cbor";
/// Layer media type: any object (bundle manifest or Kubernetes object).
pub const MT_OBJECT: &str = "application/vnd.cairn.object.v1";
/// The tag holding the roots manifest (never a channel name: channels
/// cannot contain `.`).
pub const ROOTS_TAG: &str = "cairn.roots";
/// Annotation: a root layer's version (decimal).
pub const ANN_ROOT_VERSION: &str = "org.cairnproject.root.version";
/// Annotation: the channel of a release index/manifest.
pub const ANN_CHANNEL: &str = "org.cairnproject.channel";
/// Annotation: the release sequence (decimal).
pub const ANN_SEQUENCE: &str = "org.cairnproject.sequence";
/// Annotation: the bundle id.
pub const ANN_BUNDLE: &str = "org.cairnproject.bundle";
/// Largest manifest or index read (distribution refuses larger ones too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest token response read.
const MAX_TOKEN_BYTES: u64 = 64 << 10;
/// Redirects followed in a row.
pub const MAX_REDIRECTS: usize = 5;

/// An OCI descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// For manifests in an index: their artifact type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor of `bytes`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: cairn_keys::sha256_address(bytes),
            size: bytes.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// An OCI image manifest used as an artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// 2.
    pub schema_version: u32,
    /// [`MT_MANIFEST`].
    pub media_type: String,
    /// One of the `AT_*` artifact types.
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// The empty config.
    pub config: Descriptor,
    /// The payload blobs.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index (a channel tag).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// 2.
    pub schema_version: u32,
    /// [`MT_INDEX`].
    pub media_type: String,
    /// [`AT_RELEASE`].
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// The release manifest first, then object chunk manifests.
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The artifact manifest: compact JSON, fields in declaration order.
pub fn artifact_manifest(
    artifact_type: &str,
    layers: Vec<Descriptor>,
    annotations: BTreeMap<String, String>,
) -> Vec<u8> {
    let m = ImageManifest {
        schema_version: 2,
        media_type: MT_MANIFEST.into(),
        artifact_type: Some(artifact_type.into()),
        config: Descriptor::of(MT_EMPTY, EMPTY_CONFIG),
        layers,
        annotations,
    };
    serde_json::to_vec(&m).unwrap_or_default()
}

/// The channel index: compact JSON, fields in declaration order.
pub fn release_index(manifests: Vec<Descriptor>, annotations: BTreeMap<String, String>) -> Vec<u8> {
    let m = ImageIndex {
        schema_version: 2,
        media_type: MT_INDEX.into(),
        artifact_type: Some(AT_RELEASE.into()),
        manifests,
        annotations,
    };
    serde_json::to_vec(&m).unwrap_or_default()
}

/// `oci://HOST[:PORT]/NAME`: a registry and a repository name in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    /// `host` or `host:port` (IPv6 in brackets).
    pub host: String,
    /// The repository name (`fleet`, `team/fleet`).
    pub name: String,
}

impl OciRef {
    /// Parses `oci://HOST[:PORT]/NAME`. Names follow the distribution
    /// grammar: lower-case components of `a-z0-9` separated by `.`, `_`,
    /// `__` or `-`, joined by `/`; no tag or digest (the channel is the tag).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("oci://")
            .ok_or_else(|| format!("`{s}`: expected oci://HOST[:PORT]/NAME"))?;
        let (host, name) = rest.split_once('/').ok_or_else(|| {
            format!("`{s}`: expected oci://HOST[:PORT]/NAME (no repository name)")
        })?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(format!("`{s}`: bad registry host `{host}`"));
        }
        let name = name.trim_end_matches('/');
        if name.is_empty() || name.len() > 255 {
            return Err(format!("`{s}`: repository name must be 1-255 characters"));
        }
        for comp in name.split('/') {
            let ok = !comp.is_empty()
                && comp
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && comp.as_bytes()[0].is_ascii_alphanumeric()
                && comp.as_bytes()[comp.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(format!(
                    "`{s}`: bad repository name component `{comp}` (lower-case letters, digits, \
                     and `.`, `_`, `-` between them; a tag or digest is not part of the source, \
                     the channel is the tag)"
                ));
            }
        }
        Ok(Self {
            host: host.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `https://HOST/v2/NAME/<rest>`.
    fn url(&self, rest: &str) -> String {
        format!("https://{}/v2/{}/{rest}", self.host, self.name)
    }
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.host, self.name)
    }
}

/// A user name and password (basic auth, and the registry token flow).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token; never logged.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Largest credentials, CA or certificate file read.
pub const MAX_SECRET_FILE_BYTES: u64 = 1 << 20;

fn read_small(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "{what} {}: larger than {MAX_SECRET_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(buf)
}

impl Credentials {
    /// Reads a credentials file for `host`: either
    /// `{"username": "...", "password": "..."}`, or a Docker/Kubernetes
    /// `config.json` (`{"auths": {"HOST": {"auth": base64("user:pass")}}}`
    /// or with `username`/`password` in the entry), whose entry for `host`
    /// (also tried as `https://host`) is used. Errors never quote the file.
    pub fn from_file(path: &Path, host: &str) -> Result<Self, String> {
        let bytes = read_small(path, "credentials file")?;
        let shown = path.display();
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "credentials file {shown}: not JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let entry = match v.get("auths") {
            Some(auths) => [host.to_owned(), format!("https://{host}")]
                .iter()
                .find_map(|k| auths.get(k))
                .ok_or_else(|| {
                    format!("credentials file {shown}: no entry in `auths` for `{host}`")
                })?,
            None => &v,
        };
        let s = |k: &str| entry.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        if let (Some(username), Some(password)) = (s("username"), s("password")) {
            return Ok(Self { username, password });
        }
        if let Some(auth) = s("auth") {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| format!("credentials file {shown}: `auth` is not base64"))?;
            let text = String::from_utf8(raw)
                .map_err(|_| format!("credentials file {shown}: `auth` is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| format!("credentials file {shown}: `auth` is not user:password"))?;
            return Ok(Self {
                username: u.to_owned(),
                password: p.to_owned(),
            });
        }
        Err(format!(
            "credentials file {shown}: expected `username` and `password` (or `auth`)"
        ))
    }
}

/// TLS and credentials of one network source (all optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetSettings {
    /// PEM bundle added to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key_file: Option<PathBuf>,
    /// Credentials file (see [`Credentials::from_file`]).
    pub credentials_file: Option<PathBuf>,
    /// Hosts (other than the source's own) redirects may go to.
    pub redirect_hosts: Vec<String>,
}

impl NetSettings {
    /// Adds the CA bundle and client certificate to `builder`.
    pub fn apply_tls(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, String> {
        if let Some(ca) = &self.ca_file {
            let pem = read_small(ca, "caFile")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("caFile {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("caFile {}: no PEM certificate", ca.display()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read_small(cert, "clientCertFile")?;
                pem.push(b'\n');
                pem.extend(read_small(key, "clientKeyFile")?);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    format!(
                        "clientCertFile {} / clientKeyFile {}: {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
                builder = builder.identity(id);
            }
            (None, None) => {}
            _ => return Err("clientCertFile and clientKeyFile go together".into()),
        }
        Ok(builder)
    }

    /// The credentials for `host`, if a file is configured.
    pub fn credentials(&self, host: &str) -> Result<Option<Credentials>, String> {
        self.credentials_file
            .as_deref()
            .map(|p| Credentials::from_file(p, host))
            .transpose()
    }
}

/// A host as written in a URL or in `allowRedirectsTo`, for comparison.
fn host_key(h: &str) -> String {
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Whether a redirect from `from` to `to` may be followed: same host or
/// a listed one, never https to http, at most [`MAX_REDIRECTS`].
pub fn redirect_allowed(
    from: &reqwest::Url,
    to: &reqwest::Url,
    allowed: &[String],
    hops: usize,
) -> Result<(), String> {
    if hops > MAX_REDIRECTS {
        return Err(format!("more than {MAX_REDIRECTS} redirects in a row"));
    }
    if from.scheme() == "https" && to.scheme() != "https" {
        return Err(format!("redirect from https to {}: refused", to.scheme()));
    }
    let from_host = from.host_str().map(host_key).unwrap_or_default();
    let to_host = to.host_str().map(host_key).unwrap_or_default();
    if to_host == from_host || allowed.iter().any(|h| host_key(h) == to_host) {
        return Ok(());
    }
    Err(format!(
        "redirect to another host `{to_host}` refused; list it in this source's \
         allowRedirectsTo to follow it"
    ))
}

/// Why a registry request failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OciError {
    /// Connection, TLS, timeout, HTTP 5xx: retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The registry refused the credentials (or none were configured).
    #[error("{0}")]
    Auth(String),
    /// More than the limit.
    #[error("{what}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// What was fetched.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// An answer that is not what was asked for (bad digest, bad JSON,
    /// unexpected status).
    #[error("{0}")]
    Invalid(String),
}

/// A registry client for one `oci://HOST/NAME`.
pub struct Client {
    reference: OciRef,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// The bearer token from the registry's token service, if it uses one.
    token: Mutex<Option<String>>,
    /// Requests sent (for summaries and tests).
    requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("reference", &self.reference)
            .field("credentials", &self.credentials)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A bearer challenge (`WWW-Authenticate: Bearer realm=...`).
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    realm: String,
    params: Vec<(String, String)>,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn parse_bearer(h: &str) -> Option<Challenge> {
    let rest = h.trim().strip_prefix("Bearer ")?;
    let mut params = Vec::new();
    let mut realm = None;
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, v) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, next) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = v.find(',').unwrap_or(v.len());
            (&v[..end], &v[end..])
        };
        if k == "realm" {
            realm = Some(val.to_owned());
        } else if k == "service" || k == "scope" {
            params.push((k, val.to_owned()));
        }
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: realm?,
        params,
    })
}

/// The error and its causes on one line.
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Reads at most `limit` bytes of a response body.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, OciError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(OciError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    let initial = resp.content_length().unwrap_or(0).min(limit).min(1 << 20);
    let mut body = Vec::with_capacity(initial as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| OciError::Unavailable(format!("{what}: reading body: {}", error_text(&e))))?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(OciError::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl Client {
    /// A client for `reference` with the given TLS/credential settings
    /// and timeouts. Reads the CA, certificate and credentials files.
    pub fn new(
        reference: OciRef,
        settings: &NetSettings,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, String> {
        let allowed = settings.redirect_hosts.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let hops = attempt.previous().len();
            let verdict = match attempt.previous().last() {
                Some(from) => redirect_allowed(from, attempt.url(), &allowed, hops),
                None => Ok(()),
            };
            match verdict {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(reason),
            }
        });
        let builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .redirect(policy)
            .https_only(true)
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")));
        let http = settings
            .apply_tls(builder)?
            .build()
            .map_err(|e| format!("{reference}: cannot build an HTTP client: {e}"))?;
        let credentials = settings.credentials(&reference.host)?;
        Ok(Self {
            reference,
            http,
            credentials,
            token: Mutex::new(None),
            requests: Default::default(),
        })
    }

    /// The registry and repository.
    pub fn reference(&self) -> &OciRef {
        &self.reference
    }

    /// Requests sent so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn build(
        &self,
        method: &reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&bytes::Bytes>,
    ) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method.clone(), url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let token = self.token.lock().ok().and_then(|t| t.clone());
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        } else if let Some(c) = &self.credentials {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        if let Some(b) = body {
            rb = rb.body(b.clone());
        }
        rb
    }

    /// Sends a request, doing the registry token flow once on a bearer
    /// challenge. 401 after that is [`OciError::Auth`].
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, OciError> {
        let what = format!("{method} {url}");
        let unavailable =
            |e: reqwest::Error| OciError::Unavailable(format!("{what}: {}", error_text(&e)));
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resp = self
            .build(&method, url, headers, body.as_ref())
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_bearer);
        let Some(ch) = challenge else {
            return Err(OciError::Auth(self.auth_refused(&what)));
        };
        self.fetch_token(&ch).await?;
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resp = self
            .build(&method, url, headers, body.as_ref())
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(OciError::Auth(self.auth_refused(&what)));
        }
        Ok(resp)
    }

    fn auth_refused(&self, what: &str) -> String {
        match &self.credentials {
            Some(c) => format!(
                "{what}: HTTP 401: the registry refused the credentials of user `{}`",
                cairn_keys::text::escape_untrusted(&c.username)
            ),
            None => {
                format!("{what}: HTTP 401: the registry requires credentials (credentialsFile)")
            }
        }
    }

    /// The distribution token flow: GET realm?service=..&scope=.. with
    /// basic credentials (if any); the answer's `token` or
    /// `access_token` is used as the bearer token.
    async fn fetch_token(&self, ch: &Challenge) -> Result<(), OciError> {
        let mut url = reqwest::Url::parse(&ch.realm)
            .map_err(|e| OciError::Auth(format!("token realm `{}`: {e}", ch.realm)))?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &ch.params {
                q.append_pair(k, v);
            }
            // Pushes need push access too; the scope from the challenge
            // names what the refused request needed.
        }
        let what = format!("GET {}", url.as_str().split('?').next().unwrap_or_default());
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rb = self.http.get(url.clone());
        if let Some(c) = &self.credentials {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| OciError::Unavailable(format!("{what}: {}", error_text(&e))))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(OciError::Auth(format!(
                "{what}: HTTP {status}: the token service refused the credentials"
            )));
        }
        if !status.is_success() {
            return Err(OciError::Unavailable(format!("{what}: HTTP {status}")));
        }
        let body = read_limited(resp, MAX_TOKEN_BYTES, &what).await?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| OciError::Invalid(format!("{what}: not a token answer: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| OciError::Invalid(format!("{what}: no token in the answer")))?;
        if let Ok(mut slot) = self.token.lock() {
            *slot = Some(token);
        }
        Ok(())
    }

    fn status_error(what: &str, status: reqwest::StatusCode) -> OciError {
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            OciError::Unavailable(format!("{what}: HTTP {status}"))
        } else if status == reqwest::StatusCode::FORBIDDEN {
            OciError::Auth(format!("{what}: HTTP {status}: access denied"))
        } else {
            OciError::Invalid(format!("{what}: HTTP {status}"))
        }
    }

    /// GET a manifest or index by tag or digest, at most `limit` bytes.
    /// By digest, the bytes are checked against it. `None`: not found.
    pub async fn get_manifest(
        &self,
        reference: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, OciError> {
        let url = self.reference.url(&format!("manifests/{reference}"));
        let what = format!("GET {url}");
        let accept = format!("{MT_INDEX}, {MT_MANIFEST}");
        let resp = self
            .send(reqwest::Method::GET, &url, &[("Accept", &accept)], None)
            .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::status_error(&what, status));
        }
        let body = read_limited(resp, limit.min(MAX_MANIFEST_BYTES), &what).await?;
        if is_address(reference) {
            check_digest(&what, reference, &body)?;
        }
        Ok(Some(body))
    }

    /// GET an image manifest or index by tag or digest (OCI and Docker
    /// media types), at most `limit` bytes; by digest, checked against it.
    /// Returns the bytes and the media type the registry sent. `None`: not
    /// found.
    pub async fn get_image_manifest(
        &self,
        reference: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, String)>, OciError> {
        let url = self.reference.url(&format!("manifests/{reference}"));
        let what = format!("GET {url}");
        let accept = format!(
            "{MT_INDEX}, {MT_MANIFEST}, {}, {}",
            cairn_core::images::MT_DOCKER_LIST,
            cairn_core::images::MT_DOCKER_MANIFEST
        );
        let resp = self
            .send(reqwest::Method::GET, &url, &[("Accept", &accept)], None)
            .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::status_error(&what, status));
        }
        let mt = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let body = read_limited(resp, limit.min(MAX_MANIFEST_BYTES), &what).await?;
        if is_address(reference) {
            check_digest(&what, reference, &body)?;
        }
        Ok(Some((body, mt)))
    }

    /// GET a blob as a response to stream (`blobfile::download_verified`
    /// checks its digest while writing). `None`: not found.
    pub async fn blob_response(&self, digest: &str) -> Result<Option<reqwest::Response>, OciError> {
        if !is_address(digest) {
            return Err(OciError::Invalid(format!("malformed digest `{digest}`")));
        }
        let url = self.reference.url(&format!("blobs/{digest}"));
        let what = format!("GET {url}");
        let resp = self.send(reqwest::Method::GET, &url, &[], None).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::status_error(&what, status));
        }
        Ok(Some(resp))
    }

    /// GET a blob, at most `limit` bytes, checked against its digest.
    /// `None`: not found.
    pub async fn get_blob(&self, digest: &str, limit: u64) -> Result<Option<Vec<u8>>, OciError> {
        let Some(resp) = self.blob_response(digest).await? else {
            return Ok(None);
        };
        let what = format!("GET {}", self.reference.url(&format!("blobs/{digest}")));
        let body = read_limited(resp, limit, &what).await?;
        check_digest(&what, digest, &body)?;
        Ok(Some(body))
    }

    async fn exists(&self, kind: &str, reference: &str) -> Result<bool, OciError> {
        let url = self.reference.url(&format!("{kind}/{reference}"));
        let what = format!("HEAD {url}");
        let accept = format!("{MT_INDEX}, {MT_MANIFEST}");
        let resp = self
            .send(reqwest::Method::HEAD, &url, &[("Accept", &accept)], None)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => Err(Self::status_error(&what, s)),
        }
    }

    /// HEAD a blob.
    pub async fn has_blob(&self, digest: &str) -> Result<bool, OciError> {
        self.exists("blobs", digest).await
    }

    /// HEAD a manifest by digest.
    pub async fn has_manifest(&self, digest: &str) -> Result<bool, OciError> {
        self.exists("manifests", digest).await
    }

    /// Uploads a blob (monolithic: POST, then PUT with the digest).
    pub async fn put_blob(&self, bytes: Vec<u8>) -> Result<String, OciError> {
        let digest = cairn_keys::sha256_address(&bytes);
        let put = self.upload_url(&digest).await?;
        let what = format!("PUT {}", put.split('?').next().unwrap_or_default());
        let resp = self
            .send(
                reqwest::Method::PUT,
                &put,
                &[("Content-Type", "application/octet-stream")],
                Some(bytes::Bytes::from(bytes)),
            )
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            return Err(Self::status_error(&what, resp.status()));
        }
        Ok(digest)
    }

    /// Uploads the file at `path` as the blob `digest` of `size` bytes,
    /// streamed from disk (never held in memory; monolithic: POST, then
    /// one PUT with the digest, which the registry checks). The token
    /// flow, if any, happens on the POST.
    pub async fn put_blob_file(
        &self,
        path: &Path,
        digest: &str,
        size: u64,
    ) -> Result<(), OciError> {
        if !is_address(digest) {
            return Err(OciError::Invalid(format!("malformed digest `{digest}`")));
        }
        let put = self.upload_url(digest).await?;
        let what = format!("PUT {}", put.split('?').next().unwrap_or_default());
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| OciError::Unavailable(format!("{what}: {}: {e}", path.display())))?;
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let len = size.to_string();
        let resp = self
            .build(
                &reqwest::Method::PUT,
                &put,
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", &len),
                ],
                None,
            )
            .body(reqwest::Body::from(file))
            .send()
            .await
            .map_err(|e| OciError::Unavailable(format!("{what}: {}", error_text(&e))))?;
        match resp.status() {
            reqwest::StatusCode::CREATED => Ok(()),
            reqwest::StatusCode::UNAUTHORIZED => Err(OciError::Auth(self.auth_refused(&what))),
            s => Err(Self::status_error(&what, s)),
        }
    }

    /// Starts an upload (`POST blobs/uploads/`); returns the URL to `PUT`
    /// the blob `digest` to.
    async fn upload_url(&self, digest: &str) -> Result<String, OciError> {
        let url = self.reference.url("blobs/uploads/");
        let what = format!("POST {url}");
        let resp = self.send(reqwest::Method::POST, &url, &[], None).await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            return Err(Self::status_error(&what, resp.status()));
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| OciError::Invalid(format!("{what}: no Location in the answer")))?;
        let base =
            reqwest::Url::parse(&url).map_err(|e| OciError::Invalid(format!("{what}: {e}")))?;
        let mut put = base
            .join(location)
            .map_err(|e| OciError::Invalid(format!("{what}: bad Location: {e}")))?;
        put.query_pairs_mut().append_pair("digest", digest);
        Ok(put.to_string())
    }

    /// PUT a manifest or index under `reference` (tag or its digest).
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<(), OciError> {
        let url = self.reference.url(&format!("manifests/{reference}"));
        let what = format!("PUT {url}");
        let resp = self
            .send(
                reqwest::Method::PUT,
                &url,
                &[("Content-Type", media_type)],
                Some(bytes::Bytes::from(bytes)),
            )
            .await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            let status = resp.status();
            let body = read_limited(resp, 4096, &what).await.unwrap_or_default();
            return Err(OciError::Invalid(format!(
                "{what}: HTTP {status}: {}",
                cairn_keys::text::escape_untrusted(&String::from_utf8_lossy(&body))
            )));
        }
        Ok(())
    }

    /// The channel's release envelope: tag → index → release manifest →
    /// release layer. `None` when the tag does not exist.
    pub async fn channel_release(
        &self,
        channel: &str,
        limit: u64,
    ) -> Result<Option<ReleaseRef>, OciError> {
        let Some(index) = self.get_manifest(channel, MAX_MANIFEST_BYTES).await? else {
            return Ok(None);
        };
        let what = format!("{}:{channel}", self.reference);
        let index: ImageIndex = serde_json::from_slice(&index)
            .map_err(|e| OciError::Invalid(format!("{what}: not an OCI image index: {e}")))?;
        if index.media_type != MT_INDEX || index.artifact_type.as_deref() != Some(AT_RELEASE) {
            return Err(OciError::Invalid(format!(
                "{what}: not a Cairn release (index media type `{}`, artifact type `{}`)",
                cairn_keys::text::escape_untrusted(&index.media_type),
                cairn_keys::text::escape_untrusted(index.artifact_type.as_deref().unwrap_or(""))
            )));
        }
        let desc = index
            .manifests
            .iter()
            .find(|d| d.artifact_type.as_deref() == Some(AT_RELEASE) && d.media_type == MT_MANIFEST)
            .ok_or_else(|| {
                OciError::Invalid(format!("{what}: the index has no release manifest"))
            })?;
        let manifest = self
            .get_manifest(&desc.digest, desc.size.min(MAX_MANIFEST_BYTES))
            .await?
            .ok_or_else(|| {
                OciError::Invalid(format!("{what}: release manifest {} missing", desc.digest))
            })?;
        let manifest: ImageManifest = serde_json::from_slice(&manifest)
            .map_err(|e| OciError::Invalid(format!("{what}: bad release manifest: {e}")))?;
        let layer = manifest
            .layers
            .iter()
            .find(|l| l.media_type == MT_RELEASE)
            .ok_or_else(|| OciError::Invalid(format!("{what}: no release layer")))?;
        if layer.size > limit {
            return Err(OciError::TooLarge {
                what: format!("{what}: release"),
                limit,
            });
        }
        let bytes = self.get_blob(&layer.digest, limit).await?.ok_or_else(|| {
            OciError::Invalid(format!("{what}: release blob {} missing", layer.digest))
        })?;
        Ok(Some(ReleaseRef {
            envelope: bytes,
            index_manifests: index.manifests,
        }))
    }

    /// The roots listed under [`ROOTS_TAG`]: version → descriptor.
    pub async fn roots(&self) -> Result<BTreeMap<u64, Descriptor>, OciError> {
        let Some(m) = self.get_manifest(ROOTS_TAG, MAX_MANIFEST_BYTES).await? else {
            return Ok(BTreeMap::new());
        };
        let what = format!("{}:{ROOTS_TAG}", self.reference);
        let m: ImageManifest = serde_json::from_slice(&m)
            .map_err(|e| OciError::Invalid(format!("{what}: not an OCI manifest: {e}")))?;
        if m.artifact_type.as_deref() != Some(AT_ROOTS) {
            return Err(OciError::Invalid(format!(
                "{what}: not a Cairn roots manifest"
            )));
        }
        let mut out = BTreeMap::new();
        for l in m.layers {
            if l.media_type != MT_ROOT {
                continue;
            }
            let Some(v) = l
                .annotations
                .get(ANN_ROOT_VERSION)
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            out.insert(v, l);
        }
        Ok(out)
    }

    /// Root envelope version `v`, if the roots manifest lists it.
    pub async fn root(&self, v: u64, limit: u64) -> Result<Option<Vec<u8>>, OciError> {
        let roots = self.roots().await?;
        let Some(d) = roots.get(&v) else {
            return Ok(None);
        };
        if d.size > limit {
            return Err(OciError::TooLarge {
                what: format!("{}: root {v}", self.reference),
                limit,
            });
        }
        self.get_blob(&d.digest, limit).await
    }
}

/// What a channel tag leads to.
#[derive(Clone, Debug)]
pub struct ReleaseRef {
    /// The release envelope bytes (unverified).
    pub envelope: Vec<u8>,
    /// The index's manifests (release manifest, object chunks).
    pub index_manifests: Vec<Descriptor>,
}

fn check_digest(what: &str, digest: &str, body: &[u8]) -> Result<(), OciError> {
    let actual = cairn_keys::sha256_address(body);
    if actual != digest {
        return Err(OciError::Invalid(format!(
            "{what}: content does not match its digest (got {actual}): the registry's copy is \
             corrupt or was tampered with"
        )));
    }
    Ok(())
}

/// Object chunk manifests: objects grouped by the first hex digit of
/// their address (at most 16 manifests; each stays far below the
/// registry's 4 MiB manifest limit at 100,000 objects).
pub fn object_chunks(objects: &[(String, u64)]) -> Vec<Vec<u8>> {
    let mut buckets: BTreeMap<char, Vec<Descriptor>> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (a, size) in objects {
        if !seen.insert(a.clone()) {
            continue;
        }
        let Some(c) = a.chars().nth(7) else { continue };
        buckets.entry(c).or_default().push(Descriptor {
            media_type: MT_OBJECT.into(),
            digest: a.clone(),
            size: *size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        });
    }
    buckets
        .into_values()
        .map(|mut layers| {
            layers.sort_by(|a, b| a.digest.cmp(&b.digest));
            artifact_manifest(AT_OBJECTS, layers, BTreeMap::new())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_strictly() {
        let r = OciRef::parse("oci://127.0.0.1:5000/team/fleet").unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.name, "team/fleet");
        assert_eq!(
            r.url("blobs/x"),
            "https://127.0.0.1:5000/v2/team/fleet/blobs/x"
        );
        for bad in [
            "https://h/x",
            "oci://h",
            "oci:///x",
            "oci://h/Fleet",
            "oci://h/fleet:stable",
            "oci://h/../x",
            "oci://h/-x",
            "oci://h@evil/x",
        ] {
            assert!(OciRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        let c = parse_bearer(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:fleet:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(
            c.params,
            vec![
                ("service".to_owned(), "registry.example".to_owned()),
                ("scope".to_owned(), "repository:fleet:pull".to_owned())
            ]
        );
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
        assert!(parse_bearer(r#"Bearer service="x""#).is_none());
    }

    #[test]
    fn credentials_files_and_redaction() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.json");
        std::fs::write(&p, r#"{"username":"u","password":"hunter2"}"#).unwrap();
        let c = Credentials::from_file(&p, "h:1").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        // dockerconfigjson: base64("v:pw2")
        std::fs::write(&p, r#"{"auths":{"h:1":{"auth":"djpwdzI="}}}"#).unwrap();
        let c = Credentials::from_file(&p, "h:1").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("v", "pw2"));
        let e = Credentials::from_file(&p, "other").unwrap_err();
        assert!(e.contains("no entry in `auths` for `other`"), "{e}");
        std::fs::write(&p, "password: hunter2").unwrap();
        let e = Credentials::from_file(&p, "h").unwrap_err();
        assert!(e.contains("not JSON") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn artifact_json_is_stable() {
        let m = artifact_manifest(
            AT_ROOTS,
            vec![Descriptor::of(MT_ROOT, b"r")],
            BTreeMap::new(),
        );
        let s = String::from_utf8(m).unwrap();
        assert!(s.starts_with(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.cairn.roots.v1","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"#
        ), "{s}");
    }
}
