//! The mesh shell: TCP + TLS (tokio-rustls) around the sans-IO protocol
//! [`cairn_mesh::sync`].
//!
//! * [`MeshConfig`]: the `mesh:` section of the agent configuration.
//! * `conn`: accepting and dialing TLS connections, one reader and one
//!   writer task per connection, every read bounded in size and time.
//! * `driver`: one task owns the [`Endpoint`](cairn_mesh::sync::Endpoint),
//!   feeds it messages, timer ticks and adoptions, and carries out what it
//!   returns: sends, dials, closes, serving items from the store, and
//!   fetches.
//! * [`MeshMetrics`]: the `cairn_mesh_*` metrics.
//!
//! **Architecture invariant:** the mesh never adopts anything itself. A
//! release from a peer is checked with [`crate::pipeline`] before any of its
//! objects is requested, objects are checked by the pipeline as they
//! arrive, and adoption goes through [`crate::Agent::sync_from`] with the
//! fetched files as a [`crate::source::Source`] — the same path as every
//! other source.

mod conn;
mod driver;

use crate::Agent;
use cairn_mesh::tls::{self, CredentialPaths, Credentials, X509RecordKeys};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Default mesh port.
pub const DEFAULT_PORT: u16 = 7440;

/// The `mesh:` configuration section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Listen address (`host:port`).
    pub listen: String,
    /// Address advertised to peers; default: `listen` (an unspecified
    /// host is replaced by the address peers see us on).
    pub advertise: Option<String>,
    /// Our certificate, key and the fleet CA.
    pub credentials: CredentialPaths,
    /// Seed peers (`host:port`); more are learned by peer exchange.
    pub peers: Vec<String>,
    /// Anti-entropy period in milliseconds (default 5000).
    pub anti_entropy_ms: u64,
    /// Healthy records of other agents kept and relayed: the fleet-wide
    /// status sample (docs/MESH.md, "Status sample"; default 48).
    pub status_sample: usize,
}

/// The default `mesh.statusSample` (the mesh endpoint's default).
pub const DEFAULT_STATUS_SAMPLE: usize = cairn_mesh::sync::DEFAULT_STATUS_SAMPLE;

/// The raw `mesh:` section as written in YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMeshConfig {
    listen: Option<String>,
    advertise: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    peers: Option<Vec<String>>,
    anti_entropy_interval: Option<String>,
    status_sample: Option<u64>,
}

impl RawMeshConfig {
    /// Validates the section; errors are `(field, message)` pairs with
    /// fields relative to `mesh.`.
    pub fn validate(self) -> Result<MeshConfig, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let listen = self
            .listen
            .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_PORT}"));
        if !valid_host_port(&listen) {
            errors.push((
                "mesh.listen".into(),
                format!("`{listen}`: expected HOST:PORT"),
            ));
        }
        if let Some(a) = &self.advertise {
            if !valid_host_port(a) {
                errors.push((
                    "mesh.advertise".into(),
                    format!("`{a}`: expected HOST:PORT"),
                ));
            }
        }
        let mut path = |field: &str, v: Option<String>| match v.filter(|s| !s.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => {
                errors.push((
                    format!("mesh.{field}"),
                    "required (see `cairn mesh issue`)".into(),
                ));
                PathBuf::new()
            }
        };
        let credentials = CredentialPaths {
            cert: path("cert", self.cert),
            key: path("key", self.key),
            ca: path("ca", self.ca),
        };
        let peers = self.peers.unwrap_or_default();
        for (i, p) in peers.iter().enumerate() {
            if !valid_host_port(p) {
                errors.push((
                    format!("mesh.peers[{i}]"),
                    format!("`{p}`: expected HOST:PORT"),
                ));
            }
        }
        let anti_entropy_ms = match self.anti_entropy_interval {
            None => 5_000,
            Some(s) => match cairn_core::duration::parse_duration(&s) {
                Ok(d) if !d.is_zero() => d.as_millis() as u64,
                _ => {
                    errors.push((
                        "mesh.antiEntropyInterval".into(),
                        format!("`{s}`: expected a duration such as 5s"),
                    ));
                    5_000
                }
            },
        };
        // The table holds at most `max_status_records` records in all.
        let max_sample = cairn_mesh::MeshLimits::default().max_status_records;
        let status_sample = match self.status_sample {
            None => DEFAULT_STATUS_SAMPLE,
            Some(n) if n >= 1 && n <= max_sample as u64 => n as usize,
            Some(n) => {
                errors.push((
                    "mesh.statusSample".into(),
                    format!("{n}: expected 1 to {max_sample} agents"),
                ));
                DEFAULT_STATUS_SAMPLE
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(MeshConfig {
            listen,
            advertise: self.advertise,
            credentials,
            peers,
            anti_entropy_ms,
            status_sample,
        })
    }
}

fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// `direction` label (`in`, `out`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in` or `out`.
    pub direction: String,
}

/// `from` label (`peer`, `source`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromLabel {
    /// `peer` or `source`.
    pub from: String,
}

/// `peer` + `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReasonLabel {
    /// The peer's agent id (or remote address when unknown).
    pub peer: String,
    /// A stable reason.
    pub reason: String,
}

/// The mesh's metrics (registered into the agent's registry).
///
/// | metric | type | labels |
/// |---|---|---|
/// | `cairn_mesh_peers_connected` | gauge | |
/// | `cairn_mesh_frames_total` | counter | `direction` |
/// | `cairn_mesh_bytes_total` | counter | `direction` |
/// | `cairn_mesh_objects_fetched_total` | counter | `from` (`peer`) |
/// | `cairn_mesh_object_bytes_fetched_total` | counter | `from` (`peer`) |
/// | `cairn_mesh_rejections_total` | counter | `peer`, `reason` |
/// | `cairn_mesh_handshake_failures_total` | counter | |
/// | `cairn_mesh_connections_refused_total` | counter | |
/// | `cairn_mesh_status_dropped_total` | counter | `reason` |
#[derive(Debug, Default, Clone)]
pub struct MeshMetrics {
    /// Peers with a finished hello.
    pub peers_connected: Gauge,
    /// Frames by direction.
    pub frames: Family<DirectionLabel, Counter>,
    /// Frame bytes (with the length prefix) by direction.
    pub bytes: Family<DirectionLabel, Counter>,
    /// Objects (manifests included) fetched, by where from.
    pub objects_fetched: Family<FromLabel, Counter>,
    /// Bytes of those objects.
    pub object_bytes_fetched: Family<FromLabel, Counter>,
    /// Peers cut off, by peer and reason.
    pub rejections: Family<PeerReasonLabel, Counter>,
    /// TLS handshakes that failed (e.g. a certificate from another CA).
    pub handshake_failures: Counter,
    /// Inbound connections closed before the handshake because a
    /// connection limit was reached.
    pub connections_refused: Counter,
    /// Gossiped status records dropped, by reason (`forged`, `expired`,
    /// `future`, `stale_cert`, `table_full`).
    pub status_dropped: Family<ReasonLabel, Counter>,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable reason.
    pub reason: String,
}

impl MeshMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cairn_mesh_peers_connected",
            "Mesh peers connected",
            self.peers_connected.clone(),
        );
        registry.register("cairn_mesh_frames", "Mesh frames", self.frames.clone());
        registry.register("cairn_mesh_bytes", "Mesh frame bytes", self.bytes.clone());
        registry.register(
            "cairn_mesh_objects_fetched",
            "Objects fetched, by where from",
            self.objects_fetched.clone(),
        );
        registry.register(
            "cairn_mesh_object_bytes_fetched",
            "Bytes of objects fetched, by where from",
            self.object_bytes_fetched.clone(),
        );
        registry.register(
            "cairn_mesh_rejections",
            "Mesh peers cut off, by peer and reason",
            self.rejections.clone(),
        );
        registry.register(
            "cairn_mesh_handshake_failures",
            "Mesh TLS handshakes that failed",
            self.handshake_failures.clone(),
        );
        registry.register(
            "cairn_mesh_connections_refused",
            "Inbound mesh connections closed before the TLS handshake: a connection limit was reached",
            self.connections_refused.clone(),
        );
        registry.register(
            "cairn_mesh_status_dropped",
            "Gossiped status records dropped (forged, expired, dated ahead, ...)",
            self.status_dropped.clone(),
        );
    }

    pub(crate) fn frame(&self, direction: &str, bytes: usize) {
        let l = DirectionLabel {
            direction: direction.to_owned(),
        };
        self.frames.get_or_create(&l).inc();
        self.bytes.get_or_create(&l).inc_by(bytes as u64);
    }

    pub(crate) fn reject(&self, peer: &str, reason: &str) {
        self.rejections
            .get_or_create(&PeerReasonLabel {
                peer: peer.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Errors starting the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Credentials could not be loaded or used.
    #[error("mesh credentials: {0}")]
    Tls(#[from] tls::TlsError),
    /// The certificate is not an agent certificate, or names another agent.
    #[error("mesh certificate: {0}")]
    Identity(String),
    /// The listener could not be bound.
    #[error("mesh listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound mesh, ready to run.
pub struct Mesh {
    agent: Agent,
    config: MeshConfig,
    agent_id: cairn_core::AgentId,
    listener: tokio::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    record_keys: X509RecordKeys,
    metrics: MeshMetrics,
    images: Option<crate::images::MeshLink>,
}

impl Mesh {
    /// Loads the credentials, checks that the certificate names this
    /// agent, and binds the listener.
    pub async fn bind(
        agent: Agent,
        config: MeshConfig,
        metrics: MeshMetrics,
    ) -> Result<Mesh, MeshError> {
        // File reads: off the runtime.
        let paths = config.credentials.clone();
        let creds = tokio::task::spawn_blocking(move || Credentials::load(&paths))
            .await
            .map_err(|e| MeshError::Identity(format!("loading the credentials failed: {e}")))??;
        let agent_id = match &creds.identity {
            cairn_mesh::identity::PeerIdentity::Agent(id) => id.clone(),
            other => {
                return Err(MeshError::Identity(format!(
                    "{} is for {other}, not an agent",
                    config.credentials.cert.display()
                )))
            }
        };
        if agent_id != *agent.agent_id() {
            return Err(MeshError::Identity(format!(
                "{} is for agent `{agent_id}` but this agent's id is `{}`; set agentId: {agent_id} or issue a certificate for `{}`",
                config.credentials.cert.display(),
                agent.agent_id(),
                agent.agent_id()
            )));
        }
        let server = tls::server_config(&creds)?;
        let client = tls::client_config(&creds)?;
        // Our status records are signed with the mesh key.
        let record_keys = X509RecordKeys::new(&creds)?;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| MeshError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        Ok(Mesh {
            agent,
            config,
            agent_id,
            listener,
            server,
            client,
            record_keys,
            metrics,
            images: None,
        })
    }

    /// Moves image blobs over the mesh: blobs the images module asks for
    /// are fetched from peers, and peers are served the blobs of our
    /// adopted and staged releases (protocol version 4).
    pub fn with_images(mut self, link: crate::images::MeshLink) -> Self {
        self.images = Some(link);
        self
    }

    /// The bound listen address.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Runs until the task is aborted.
    pub async fn run(self) {
        driver::run(self).await
    }
}
