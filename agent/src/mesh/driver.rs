//! The driver: one task that owns the sync [`Endpoint`] and carries out
//! its actions. It never waits on a peer: sends go into bounded
//! per-connection queues (a full queue disconnects that peer), store reads
//! are local, and adoption runs in its own task.

use super::conn::{self, ConnHandle, Input};
use super::{Mesh, MeshMetrics};
use crate::pipeline::{self, AdoptedRef, Context, Ingest, Start, Want};
use crate::source::{Source, SourceError};
use crate::store::Store;
use crate::{Agent, BoxFuture};
use cairn_core::layout::{channel_path, object_path, root_path};
use cairn_core::limits::Limits;
use cairn_core::rollout::FleetReports;
use cairn_keys::codec;
use cairn_keys::text::escape_untrusted;
use cairn_mesh::sync::{Action, ConnId, Endpoint, Event, FetchId, SyncConfig};
use cairn_mesh::wire::{Found, Head, Item, PeerInfo, RolloutRecord, StatusRecord};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often our own status record is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the peer table is saved.
const PERSIST_EVERY: Duration = Duration::from_secs(15);
/// Largest stored peer record read back.
const MAX_PEER_RECORD: usize = 1024;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fetch in progress: the verified candidate and what has arrived.
struct FetchState {
    peer: String,
    roots: BTreeMap<u64, Vec<u8>>,
    release: Vec<u8>,
    ingest: Ingest,
    manifest: Option<Vec<u8>>,
    adopting: bool,
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
}

pub async fn run(mesh: Mesh) {
    let Mesh {
        agent,
        config,
        agent_id,
        listener,
        server,
        client,
        record_keys,
        metrics,
    } = mesh;
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
    let read_timeout = Duration::from_millis(sc.keepalive_ms * 3);
    let root_version = agent.root().root().version;
    let mut ep = Endpoint::new(sc, root_version, Box::new(record_keys));
    if let Ok(stored) = agent.store().peers() {
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
    };
    d.refresh_local();
    // Adoptions and newly staged (deferred) releases: both are advertised.
    let mut adopted = agent.subscribe_relay();
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut persist_tick = tokio::time::interval(PERSIST_EVERY);
    loop {
        d.drain();
        let now = now_ms();
        let wake = d.ep.poll_timeout().unwrap_or(now + 1000);
        let sleep = Duration::from_millis(wake.saturating_sub(now).min(1000));
        tokio::select! {
            input = rx.recv() => match input {
                Some(i) => d.input(i),
                None => return,
            },
            _ = tokio::time::sleep(sleep) => d.ep.handle_timeout(now_ms()),
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
    fn input(&mut self, input: Input) {
        let now = now_ms();
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
            Input::Message { conn, msg } => self.ep.handle_message(conn, msg, now),
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
            let now = now_ms();
            match action {
                Action::Send { conn, message } => {
                    let Some(h) = self.conns.get(&conn) else {
                        continue;
                    };
                    match h.tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.ep
                                .handle_wire_error(conn, "slow_peer", "send queue full", now);
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

    fn event(&mut self, e: Event, now: u64) {
        match e {
            Event::PeerUp { peer, .. } => {
                tracing::info!(%peer, "mesh peer connected");
                self.metrics
                    .peers_connected
                    .set(self.ep.connected_peers().len() as i64);
            }
            Event::PeerDown { peer, .. } => {
                tracing::info!(%peer, "mesh peer disconnected");
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
                    banned_for_s = banned_until.saturating_sub(now) / 1000,
                    "mesh peer cut off"
                );
                self.metrics.reject(peer.name(), &reason);
            }
            Event::Serve { conn, id, items } => {
                let found = items
                    .into_iter()
                    .map(|item| Found {
                        bytes: read_item(&self.agent, &item),
                        item,
                    })
                    .collect();
                self.ep.serve(conn, id, found, now);
            }
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

    /// Checks a fetched release with the pipeline (root chain, signatures,
    /// channel, sequence, expiry) before any object is requested.
    fn verify_release(
        &mut self,
        fetch: FetchId,
        peer: String,
        channel: &str,
        release: Vec<u8>,
        roots: Vec<(u64, Vec<u8>)>,
        now: u64,
    ) {
        let mut root = self.agent.root();
        let mut chain = self.agent.root_chain();
        let mut kept = BTreeMap::new();
        for (v, bytes) in roots {
            if v != root.root().version + 1 {
                continue;
            }
            match pipeline::check_root(&root, &bytes) {
                Ok(next) => {
                    chain.push(next.root().clone());
                    root = next;
                    kept.insert(v, bytes);
                }
                Err(rej) => {
                    return self
                        .ep
                        .release_rejected(fetch, rej.reason(), &rej.to_string(), now);
                }
            }
        }
        let adopted = self.adopted_ref();
        let ctx = Context {
            root: root.root(),
            epoch: cairn_keys::root::release_epoch(&chain),
            channel,
            adopted: adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: now / 1000,
            limits: &self.limits,
        };
        match Ingest::start(&ctx, &release) {
            Err(rej) => {
                tracing::warn!(%peer, reason = rej.reason(), error = %rej, "release from mesh peer rejected");
                self.agent.metrics().reject(rej.reason());
                self.ep
                    .release_rejected(fetch, rej.reason(), &rej.to_string(), now);
            }
            Ok(Start::UpToDate) => self.ep.fetch_abandon(fetch, now),
            Ok(Start::Candidate(ingest)) => {
                let mut state = FetchState {
                    peer,
                    roots: kept,
                    release,
                    ingest: *ingest,
                    manifest: None,
                    adopting: false,
                };
                self.ep.release_verified(fetch, now);
                let bundle = state.ingest.release().release().bundle.clone();
                let local = self
                    .agent
                    .store()
                    .bundle(&bundle)
                    .ok()
                    .flatten()
                    .or_else(|| self.agent.store().get_object(&bundle).ok().flatten());
                let want = match local {
                    Some(m) => match state.ingest.handle_manifest(&m) {
                        Ok(()) => {
                            state.manifest = Some(m);
                            Vec::new()
                        }
                        Err(_) => vec![bundle],
                    },
                    None => vec![bundle],
                };
                self.fetches.insert(fetch, state);
                self.ep.fetch_want(fetch, want, now);
            }
        }
    }

    fn adopted_ref(&self) -> Option<(u64, Vec<u8>)> {
        let head = self.agent.adopted()?;
        let bytes = self.agent.store().head(&head.channel).ok().flatten()?;
        Some((head.sequence, bytes))
    }

    /// An object whose hash matched: the manifest, or an entry checked by
    /// the pipeline against it, then stored.
    fn object(&mut self, fetch: FetchId, address: String, bytes: Vec<u8>, now: u64) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        let from = super::FromLabel {
            from: "peer".into(),
        };
        self.metrics.objects_fetched.get_or_create(&from).inc();
        self.metrics
            .object_bytes_fetched
            .get_or_create(&from)
            .inc_by(bytes.len() as u64);
        let result = if f.manifest.is_none() && address == f.ingest.release().release().bundle {
            f.ingest.handle_manifest(&bytes).map(|()| {
                f.manifest = Some(bytes);
            })
        } else {
            f.ingest.handle_object(&address, &bytes).map(|()| {
                if let Err(e) = self.agent.store().put_object(&address, &bytes) {
                    tracing::error!(error = %e, "store error while saving a mesh object");
                }
            })
        };
        if let Err(rej) = result {
            let peer = f.peer.clone();
            tracing::warn!(%peer, reason = rej.reason(), error = %rej, "object from mesh peer rejected");
            self.agent.metrics().reject(rej.reason());
            self.fetches.remove(&fetch);
            self.ep
                .release_rejected(fetch, rej.reason(), &rej.to_string(), now);
        }
    }

    /// Everything asked for arrived: ask for the missing entries, or adopt.
    fn idle(&mut self, fetch: FetchId, now: u64) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        if f.adopting {
            return;
        }
        match f.ingest.want() {
            Want::Manifest { .. } => {
                self.fetches.remove(&fetch);
                self.ep.fetch_abandon(fetch, now);
            }
            Want::Objects(list) => {
                let mut missing = Vec::new();
                for (address, _) in list {
                    if self.agent.store().has_object(&address).unwrap_or(false) {
                        f.ingest.mark_present(&address);
                    } else {
                        missing.push(address);
                    }
                }
                if missing.is_empty() {
                    self.adopt(fetch);
                } else {
                    self.ep.fetch_want(fetch, missing, now);
                }
            }
            Want::Complete => self.adopt(fetch),
        }
    }

    /// Runs [`Agent::sync_from`] over what was fetched: the one adoption
    /// path, re-verifying everything.
    fn adopt(&mut self, fetch: FetchId) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        f.adopting = true;
        let release = &f.ingest.release().release();
        let staged = StagedSource {
            name: format!("peer:{}", f.peer),
            roots: f.roots.clone(),
            channel_path: channel_path(&release.channel),
            release: f.release.clone(),
            manifest_path: object_path(&release.bundle).unwrap_or_default(),
            manifest: f.manifest.clone().unwrap_or_default(),
            store: self.agent.store().clone(),
        };
        let agent = self.agent.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let outcome = agent.sync_from(&staged).await;
            let _ = tx
                .send(Input::AdoptDone {
                    fetch,
                    outcome: format!("{outcome:?}"),
                })
                .await;
        });
    }

    /// Our head and status into the endpoint (after every adoption).
    fn refresh_local(&mut self) {
        let now = now_ms();
        let root_version = self.agent.root().root().version;
        self.refresh_trust();
        if let Some(h) = self.agent.relay_head() {
            self.ep.set_head(
                Head {
                    channel: h.channel,
                    sequence: h.sequence,
                    bundle: h.bundle,
                    root_version,
                },
                now,
            );
        }
        self.refresh_status();
    }

    /// Our root version and whether our head still sets a rollback floor
    /// (a root from a source may have replaced the release keys).
    fn refresh_trust(&mut self) {
        self.ep.set_root_version(self.agent.root().root().version);
        let channel = self.agent.config().channel.clone();
        self.ep
            .set_floor_unbound(&channel, self.agent.floor_unbound());
    }

    fn refresh_status(&mut self) {
        let st = self.agent.status();
        let rolled_back = st.failed_release.as_ref().is_some_and(|f| {
            st.adopted
                .as_ref()
                .is_some_and(|a| a.sequence == f.sequence)
        });
        let health = if rolled_back {
            // The adopted release failed its health checks and the target
            // went back to the last-good one: counts for the breaker.
            "failed"
        } else if st.ready {
            "healthy"
        } else if st.reconcile.as_ref().is_some_and(|r| !r.ok) {
            "degraded"
        } else if st.adopted.is_some() {
            "progressing"
        } else {
            "unknown"
        };
        let limits = &self.ep.config().limits;
        let labels = st
            .labels
            .iter()
            .take(limits.max_labels)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let rollout = (st.rollout.is_some() || st.hold.is_some()).then(|| {
            let mut r = RolloutRecord::default();
            if let Some(p) = &st.rollout {
                r.pending_sequence = p.sequence;
                r.pending_bundle = p.bundle.clone();
                r.state = p.state.clone();
                r.wave = p.wave.map_or(0, |w| w as u32);
                r.opens_at = p.opens_at.unwrap_or(0);
            }
            if let Some(h) = &st.hold {
                r.held = true;
                r.held_until = h.until.unwrap_or(0);
            }
            r
        });
        let record = StatusRecord {
            agent_id: st.agent_id.clone(),
            channel: st.channel.clone(),
            labels,
            sequence: st.adopted.as_ref().map_or(0, |a| a.sequence),
            bundle: st
                .adopted
                .as_ref()
                .map(|a| a.bundle.clone())
                .unwrap_or_default(),
            health: health.into(),
            time: 0,
            rollout,
            listen: None,
        };
        self.ep.set_local_status(record, now_ms());
        self.update_fleet_reports();
    }

    /// The rollout breaker's inputs from the gossiped status view: per
    /// bundle, agents on our channel that adopted it, and those of them
    /// reporting it failed (rolled back). The view holds only records
    /// signed by the agent they describe and younger than the TTL.
    fn update_fleet_reports(&self) {
        let channel = &self.agent.config().channel;
        let mut reports: BTreeMap<String, FleetReports> = BTreeMap::new();
        for r in self.ep.status(now_ms()) {
            if r.channel != *channel || r.bundle.is_empty() {
                continue;
            }
            let e = reports.entry(r.bundle.clone()).or_default();
            e.adopted += 1;
            if r.health == "failed" {
                e.failed += 1;
            }
        }
        self.agent.replace_fleet_reports(reports);
    }

    fn persist_peers(&self) {
        let store = self.agent.store();
        for e in self.ep.peer_table() {
            if e.last_connected > 0 && !e.is_self {
                let rec = PeerInfo {
                    agent_id: e.agent_id.clone(),
                    addr: e.addr.clone(),
                };
                let _ = store.put_peer(&e.addr, &codec::encode(&rec));
            }
        }
    }
}

/// Reads what a peer asked for from the store (roots, the channel's
/// release — the staged one if newer than the adopted one — objects and
/// manifests).
fn read_item(agent: &Agent, item: &Item) -> Option<Vec<u8>> {
    let store = agent.store();
    match item {
        Item::Root(v) => store
            .roots()
            .ok()?
            .into_iter()
            .find(|(rv, _)| rv == v)
            .map(|(_, b)| b),
        Item::Release(c) => agent.relay_release_bytes(c),
        Item::Object(a) => match store.get_object(a) {
            Ok(Some(b)) => Some(b),
            _ => store.bundle(a).ok().flatten(),
        },
    }
}

/// The files fetched from a peer, as a [`Source`] for
/// [`Agent::sync_from`]: roots and the release from memory, the manifest
/// from memory, objects from the store (where the mesh put them after the
/// pipeline checked them).
struct StagedSource {
    name: String,
    roots: BTreeMap<u64, Vec<u8>>,
    channel_path: String,
    release: Vec<u8>,
    manifest_path: String,
    manifest: Vec<u8>,
    store: Store,
}

impl Source for StagedSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(
        &'a self,
        rel_path: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            let found = if rel_path == self.channel_path {
                Some(self.release.clone())
            } else if rel_path == self.manifest_path && !self.manifest.is_empty() {
                Some(self.manifest.clone())
            } else if let Some(v) = rel_path
                .strip_prefix("roots/")
                .and_then(|v| v.parse::<u64>().ok())
            {
                debug_assert_eq!(root_path(v), rel_path);
                self.roots.get(&v).cloned()
            } else if let Some(hex) = rel_path.rsplit('/').next() {
                let address = format!("sha256:{hex}");
                if object_path(&address).as_deref() == Some(rel_path) {
                    self.store.get_object(&address).ok().flatten()
                } else {
                    None
                }
            } else {
                None
            };
            match found {
                Some(b) if b.len() as u64 > limit => Err(SourceError::TooLarge {
                    source_name: self.name.clone(),
                    path: rel_path.to_owned(),
                    limit,
                }),
                other => Ok(other),
            }
        })
    }
}
