//! The driver: one task that owns the sync [`Endpoint`] and carries out
//! its actions. It never waits on a peer: sends go into bounded
//! per-connection queues (a full queue disconnects that peer), store reads
//! are local, and adoption runs in its own task.

use super::conn::{self, ConnHandle, Input};
use super::{Mesh, MeshMetrics};
use crate::ingest;
use crate::pipeline::{self, Ingest, Start, Want};
use crate::source::{Source, SourceError};
use crate::store::StoreHandle;
use crate::{Agent, BoxFuture};
use cairn_core::limits::Limits;
use cairn_keys::codec;
use cairn_keys::text::escape_untrusted;
use cairn_mesh::sync::{
    Action, ConnId, Endpoint, Event, FetchId, Millis, SyncConfig, UnixMillis, VerifyFailure,
    WireFailure,
};
use cairn_mesh::wire::{EntryFound, Found, Head, Item, PeerInfo, RolloutRecord, StatusRecord};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

mod blobs;
mod fetch;
mod local;
mod staged;

pub(super) use blobs::BlobFailure;

use staged::{serve_items, EntriesCache, StagedSource};

/// How often our own status record is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the peer table is saved.
const PERSIST_EVERY: Duration = Duration::from_secs(15);
/// Largest stored peer record read back.
const MAX_PEER_RECORD: usize = 1024;

/// Wall-clock Unix milliseconds: only for gossiped status records.
fn wall() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// A fetch in progress: the verified candidate and what has arrived.
struct FetchState {
    peer: cairn_core::AgentId,
    roots: BTreeMap<u64, Vec<u8>>,
    release: Vec<u8>,
    ingest: Ingest,
    manifest: Option<Vec<u8>>,
    adopting: bool,
    /// Object writes to the store not finished yet.
    writes: usize,
    /// The endpoint reported the fetch idle while writes or a presence
    /// check were under way: look again when they finish.
    idle_waiting: bool,
    /// A presence check is under way.
    checking: bool,
}

struct Driver {
    agent: Agent,
    ep: Endpoint,
    conns: HashMap<ConnId, ConnHandle>,
    fetches: BTreeMap<FetchId, FetchState>,
    tx: mpsc::Sender<Input>,
    client: Arc<rustls::ClientConfig>,
    metrics: MeshMetrics,
    limits: Limits,
    read_timeout: Duration,
    /// The monotonic clock's epoch (the endpoint's timers run on it).
    started: Instant,
    /// The entries of the bundle last served by index.
    entries_cache: EntriesCache,
    /// The images (blobs served to peers), if the registry is on.
    images: Option<crate::images::Images>,
    /// Image blobs being fetched from peers.
    blob_jobs: BTreeMap<u64, blobs::BlobJob>,
    next_blob_job: u64,
}

pub(super) async fn run(mesh: Mesh) {
    let Mesh {
        agent,
        config,
        agent_id,
        listener,
        server,
        client,
        record_keys,
        metrics,
        images,
    } = mesh;
    let (images, mut blob_requests) = match images {
        Some(link) => (Some(link.images), Some(link.requests)),
        None => (None, None),
    };
    let bound = listener.local_addr().ok();
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    let accept = tokio::spawn(conn::accept_loop(
        listener,
        server,
        tx.clone(),
        metrics.clone(),
    ));
    let _accept_guard = AbortOnDrop(accept.abort_handle());
    let mut sc = SyncConfig::new(agent_id.clone(), vec![agent.config().channel.clone()]);
    sc.listen = config.advertise.clone().or_else(|| match bound {
        Some(a) if !a.ip().is_unspecified() => Some(a.to_string()),
        Some(a) => Some(format!("0.0.0.0:{}", a.port())),
        None => Some(config.listen.clone()),
    });
    sc.seeds = config.peers.clone();
    sc.rng_seed = rand::random();
    sc.anti_entropy_ms = config.anti_entropy_ms;
    sc.status_sample = config.status_sample;
    let read_timeout = Duration::from_millis(sc.keepalive_ms * 3);
    let root_version = agent.root().root().version;
    let mut ep = Endpoint::new(sc, root_version, Box::new(record_keys));
    if let Ok(stored) = agent.store().call(|s| s.peers()).await {
        let learned = stored.into_iter().filter_map(|(_, bytes)| {
            codec::decode::<PeerInfo>("peer record", &bytes, MAX_PEER_RECORD).ok()
        });
        ep.learn_peers(learned);
    }
    tracing::info!(
        agent = %agent_id,
        listen = ?bound,
        seeds = ?config.peers,
        "mesh listening"
    );
    let mut d = Driver {
        limits: Limits::default(),
        agent: agent.clone(),
        ep,
        conns: HashMap::new(),
        fetches: BTreeMap::new(),
        tx,
        client,
        metrics,
        read_timeout,
        started: Instant::now(),
        entries_cache: EntriesCache::default(),
        images,
        blob_jobs: BTreeMap::new(),
        next_blob_job: 1,
    };
    d.refresh_local();
    // Adoptions and newly staged (deferred) releases: both are advertised.
    let mut adopted = agent.subscribe_relay();
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut persist_tick = tokio::time::interval(PERSIST_EVERY);
    loop {
        d.drain();
        let now = d.now();
        let wake = d.ep.poll_timeout().unwrap_or(now.saturating_add(1000));
        let sleep = Duration::from_millis(wake.saturating_since(now).min(1000));
        tokio::select! {
            input = rx.recv() => match input {
                Some(i) => d.input(i),
                None => return,
            },
            _ = tokio::time::sleep(sleep) => {
                let now = d.now();
                d.ep.handle_timeout(now, wall());
            }
            changed = adopted.changed() => {
                if changed.is_ok() {
                    d.refresh_local();
                }
            }
            _ = status_tick.tick() => {
                d.refresh_trust();
                d.refresh_status();
            }
            _ = persist_tick.tick() => d.persist_peers(),
            req = async {
                match blob_requests.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => match req {
                Some(req) => {
                    let now = d.now();
                    d.start_blob(req, now);
                }
                None => blob_requests = None,
            },
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Driver {
    /// Monotonic milliseconds since the driver started.
    fn now(&self) -> Millis {
        Millis(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Connected {
                stream,
                identity,
                dialed,
                remote_ip,
            } => {
                tracing::debug!(peer = %identity, ?dialed, "mesh connection up");
                let conn = self.ep.connected(identity, dialed, remote_ip, now);
                let handle = conn::spawn_io(
                    conn,
                    *stream,
                    self.config_limits(),
                    self.read_timeout,
                    self.tx.clone(),
                    self.metrics.clone(),
                );
                self.conns.insert(conn, handle);
            }
            Input::DialFailed { addr, error } => {
                tracing::debug!(%addr, %error, "mesh dial failed");
                self.ep.dial_failed(&addr, now);
            }
            Input::Message { conn, msg } => self.ep.handle_message(conn, msg, now, wall()),
            Input::WireError {
                conn,
                reason,
                detail,
            } => {
                if self.conns.contains_key(&conn) {
                    self.ep.handle_wire_error(conn, reason, &detail, now);
                    self.drop_conn(conn);
                }
            }
            Input::Served {
                conn,
                id,
                found,
                entries,
                last,
            } => self.ep.serve_part(conn, id, found, entries, last, now),
            Input::ServeRefused {
                conn,
                id,
                bad,
                detail,
            } => self.ep.serve_refused(conn, id, bad, &detail, now),
            Input::BlobWritten { job, attempt } => self.blob_written(job, attempt, now),
            Input::BlobDone {
                job,
                attempt,
                result,
            } => self.blob_done(job, attempt, result, now),
            Input::LocalManifest { fetch, manifest } => self.local_manifest(fetch, manifest, now),
            Input::Present { fetch, present } => self.present(fetch, present, now),
            Input::LocalChunks { fetch, chunks } => self.local_chunks(fetch, chunks, now),
            Input::Stored { fetch, error } => {
                if let Some(e) = error {
                    tracing::error!(error = %e, "store error while saving a mesh object");
                }
                if let Some(f) = self.fetches.get_mut(&fetch) {
                    f.writes = f.writes.saturating_sub(1);
                    if f.writes == 0 && f.idle_waiting {
                        f.idle_waiting = false;
                        self.idle(fetch, now);
                    }
                }
            }
            Input::AdoptDone { fetch, outcome } => {
                tracing::debug!(fetch, %outcome, "mesh adoption finished");
                self.fetches.remove(&fetch);
                // Our head first (adopted, or staged when the release was
                // deferred), so the endpoint does not fetch it again.
                self.refresh_local();
                self.ep.fetch_complete(fetch, now);
            }
        }
    }

    fn config_limits(&self) -> cairn_mesh::MeshLimits {
        self.ep.config().limits.clone()
    }

    fn drop_conn(&mut self, conn: ConnId) {
        if let Some(h) = self.conns.remove(&conn) {
            h.reader.abort();
        }
    }

    fn drain(&mut self) {
        while let Some(action) = self.ep.poll_action() {
            let now = self.now();
            match action {
                Action::Send { conn, message } => {
                    let Some(h) = self.conns.get(&conn) else {
                        continue;
                    };
                    match h.tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.ep.handle_wire_error(
                                conn,
                                WireFailure::SlowPeer,
                                "send queue full",
                                now,
                            );
                            self.drop_conn(conn);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            self.ep.disconnected(conn, now);
                            self.drop_conn(conn);
                        }
                    }
                }
                Action::Close { conn, reason } => {
                    tracing::debug!(conn, reason = %escape_untrusted(&reason), "mesh connection closed");
                    self.drop_conn(conn);
                }
                Action::Dial { addr } => conn::dial(
                    addr,
                    self.client.clone(),
                    self.tx.clone(),
                    self.metrics.clone(),
                ),
                Action::Event(e) => self.event(e, now),
            }
        }
    }

    fn event(&mut self, e: Event, now: Millis) {
        match e {
            Event::PeerUp { peer, .. } => {
                tracing::info!(%peer, "mesh peer connected");
                self.metrics
                    .peers_connected
                    .set(self.ep.connected_peers().len() as i64);
            }
            Event::PeerDown { peer, conn } => {
                tracing::info!(%peer, "mesh peer disconnected");
                self.blob_peer_down(conn, now);
                self.metrics
                    .peers_connected
                    .set(self.ep.connected_peers().len() as i64);
            }
            Event::Rejected {
                peer,
                reason,
                detail,
                banned_until,
            } => {
                tracing::warn!(
                    %peer,
                    %reason,
                    detail = %escape_untrusted(&detail),
                    banned_for_s = banned_until.saturating_sub(now.as_u64()) / 1000,
                    "mesh peer cut off"
                );
                self.metrics.reject(peer.name(), reason.label());
            }
            Event::Serve { conn, id, items } => {
                // Disk reads on a blocking thread; the answer comes back
                // as inputs (a compact want in parts of about one frame).
                let (agent, tx) = (self.agent.clone(), self.tx.clone());
                let part_bytes = self.ep.config().limits.max_reply_bytes;
                let limits = self.limits.clone();
                let cache = self.entries_cache.clone();
                let images = self.images.clone();
                tokio::task::spawn_blocking(move || {
                    let ctx = staged::ServeContext {
                        agent: &agent,
                        tx: &tx,
                        part_bytes,
                        limits: &limits,
                        cache: &cache,
                        images: images.as_ref(),
                    };
                    serve_items(&ctx, conn, id, items);
                });
            }
            Event::BlobPiece {
                conn,
                id,
                range,
                bytes,
            } => self.blob_piece(conn, id, range, bytes, now),
            Event::VerifyRelease {
                fetch,
                peer,
                channel,
                release,
                roots,
                ..
            } => self.verify_release(fetch, peer, &channel, release, roots, now),
            Event::Object {
                fetch,
                address,
                bytes,
            } => self.object(fetch, address, bytes, now),
            Event::FetchIdle { fetch } => self.idle(fetch, now),
            Event::FetchFailed { fetch, reason } => {
                if let Some(f) = self.fetches.remove(&fetch) {
                    tracing::info!(peer = %f.peer, %reason, "mesh fetch failed");
                }
            }
            Event::StatusChanged => self.update_fleet_reports(),
            Event::StatusDropped {
                peer,
                reason,
                count,
            } => {
                let reason = reason.label();
                tracing::debug!(%peer, reason, count, "mesh status records dropped");
                self.metrics
                    .status_dropped
                    .get_or_create(&super::ReasonLabel {
                        reason: reason.to_owned(),
                    })
                    .inc_by(count);
            }
        }
    }
}
