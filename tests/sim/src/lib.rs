//! A deterministic fleet simulator for Cairn's mesh.
//!
//! Thousands of agents, each running the **real** code of an agent's mesh
//! and adoption path; only the IO is simulated. Precisely:
//!
//! * the mesh: [`cairn_mesh::sync::Endpoint`] (the sans-IO sync state
//!   machine the agent runs), fed and drained as the agent's mesh driver
//!   does; its frames are counted with [`frame_len`] (the exact length
//!   of the frame `encode_frame` makes, without encoding it); status records are signed with
//!   [`cairn_mesh::testing::SharedSecretKeys`] instead of X.509 keys;
//! * a release offered by a peer: [`Ingest::start`] and
//!   [`adoption_gate`] before any object is asked for, then
//!   [`Ingest::handle_manifest`] / [`Ingest::handle_object`] for each
//!   fetched file, as in the agent's mesh driver;
//! * every adoption, from a peer or (on the origins) from the bundle
//!   repository: [`cairn_core::ingest::drive`], the agent's one ingest
//!   driver (roots, release, gate, manifest, only the missing objects,
//!   each verified and stored), over a simulated source and the node's
//!   store, polled to completion with `futures::executor::block_on`;
//!   then [`Ingest::finish`] against the node's state at that moment, as
//!   the agent's commit does. Origins are not gated: the simulator does
//!   not model deferred releases staged and relayed ahead of their wave,
//!   so the origins act as the rollout's source.
//!
//! Simulated: a priority queue of events on simulated time (milliseconds),
//! links with per-pair latency, message loss, node churn (crash and
//! restart with the store kept) and partitions, all drawn from one seeded
//! [`StdRng`]. No sockets, no threads, no clock: the same [`SimConfig`]
//! gives the same trace, byte for byte ([`Report::trace_hash`]).
//!
//! A run: agents start at random instants within the first second and
//! dial the peers they were configured with; after
//! [`SimConfig::settle_ms`] the origin agents (the ones with a bundle
//! repository as source) adopt release 1 (a bundle of
//! [`SimConfig::objects`] objects); once the fleet holds it (or the
//! deadline passes) release 2, which changes one object, follows; and so
//! on. A partition, if configured, cuts a share of the fleet off from the
//! origins when a chosen release is published and heals after a while;
//! churn crashes and restarts random agents until the last release is out.
//!
//! **Invariants checked on every run** (violations are reported, not
//! panicked on): nothing is stored that does not hash to its address and
//! belong to a verified release; an agent's adopted sequence never
//! decreases, across restarts too; no honest agent adopts the forged
//! release of a malicious peer; every live agent holds the last release
//! once partitions have healed and churn has stopped.
//!
//! **Simplifications** (see `docs/PERFORMANCE.md`): a connection comes up
//! three one-way latencies after its dial (TCP + TLS); messages are not
//! re-decoded on receipt (sizes are the real encoded frame sizes); a lost
//! message breaks its connection, since TCP delivers in order or not at
//! all; a partition resets the connections that cross it.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use cairn_core::bundle::{verify_object, Entry, Manifest, Source, BUNDLE_FORMAT};
use cairn_core::ingest::{self as driver, BoxFuture, DriveError, Driven, Gate, Snapshot};
use cairn_core::limits::Limits;
use cairn_core::pipeline::{
    adoption_gate, AdoptedRef, Adoption, Audience, Context, Ingest, LocalHold, Rejection, Start,
    Want,
};
use cairn_core::release::{Release, Rollout, RELEASE_FORMAT};
use cairn_core::rollout::FleetReports;
use cairn_core::verify::{SignatureMemo, VerifiedRelease};
use cairn_core::{Address, AgentId};
use cairn_keys::{sha256_address, KeyPair, Root, VerifiedRoot};
use cairn_mesh::identity::PeerIdentity;
use cairn_mesh::sync::{
    Action, ConnId, Endpoint, Event, FetchId, Millis, SyncConfig, UnixMillis, VerifyFailure,
};
use cairn_mesh::testing::SharedSecretKeys;
use cairn_mesh::wire::{
    frame_len, EntryFound, Found, Head, Item, Message, PeerInfo, StatusRecord, HEADER_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::{Arc, Mutex};

/// The channel every simulated agent follows.
pub const CHANNEL: &str = "stable";
/// Unix seconds at simulated time 0 (release and root expiry checks use
/// `EPOCH + now / 1000`).
pub const EPOCH: u64 = 1_800_000_000;

/// Crash and restart of random agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Churn {
    /// One random agent goes down every this many milliseconds.
    pub interval_ms: u64,
    /// How long it stays down (its store is kept, its mesh state is not).
    pub down_ms: u64,
}

/// A partition that cuts a share of the fleet off from the origins.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    /// Share of the agents (never origins) on the far side, 0 to 1.
    pub fraction: f64,
    /// It starts when this release (1-based) is published.
    pub at_release: u64,
    /// It heals this long after.
    pub duration_ms: u64,
}

/// What to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Seed of every random choice (latencies, losses, seeds, churn).
    pub seed: u64,
    /// Number of agents.
    pub agents: usize,
    /// Agents that read releases from a bundle repository (the rest only
    /// from the mesh). At least 1.
    pub origins: usize,
    /// Peers each agent is configured with (random others).
    pub seeds_per_agent: usize,
    /// Objects in a bundle.
    pub objects: usize,
    /// Size of each object in bytes.
    pub object_bytes: usize,
    /// One-way latency of a link, chosen per pair in this range (ms).
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost (its connection then breaks).
    pub loss: f64,
    /// Crash and restart agents until the last release is published.
    pub churn: Option<Churn>,
    /// A partition.
    pub partition: Option<Partition>,
    /// Malicious agents: half advertise a forged release, half serve
    /// tampered objects (never origins).
    pub malicious: usize,
    /// Gossip status records (as real agents do).
    pub status_gossip: bool,
    /// Rollout of every release (`cairn release --rollout` syntax).
    pub rollout: Option<String>,
    /// Releases published one after the other (release k > 1 changes one
    /// object of release k - 1).
    pub releases: u64,
    /// Simulated time before the first release (mesh forming).
    pub settle_ms: u64,
    /// Longest simulated time a release may take to converge.
    pub deadline_ms: u64,
    /// Anti-entropy period of every agent.
    pub anti_entropy_ms: u64,
    /// Connections each agent keeps (the mesh's `target_connections`).
    pub target_connections: usize,
    /// Share of the agents (0 to 1, spread evenly) that speak mesh
    /// protocol version 2 only: a fleet in the middle of an upgrade.
    pub legacy_share: f64,
    /// Simulated time between one release's convergence and the next
    /// release (default 2 s; longer lets status gossip settle, and then
    /// the last release is followed by a pause too).
    pub pause_ms: u64,
}

impl SimConfig {
    /// Defaults for `agents` agents: 1 origin, 3 seeds each, 64 objects of
    /// 1 KiB, 5–40 ms latency, no loss, churn, partition or attackers,
    /// 2 releases, 5 s anti-entropy.
    pub fn new(agents: usize, seed: u64) -> Self {
        Self {
            seed,
            agents,
            origins: 1,
            seeds_per_agent: 3,
            objects: 64,
            object_bytes: 1024,
            latency_ms: (5, 40),
            loss: 0.0,
            churn: None,
            partition: None,
            malicious: 0,
            status_gossip: false,
            rollout: None,
            releases: 2,
            settle_ms: 10_000,
            deadline_ms: 600_000,
            anti_entropy_ms: 5_000,
            target_connections: 8,
            legacy_share: 0.0,
            pause_ms: 2_000,
        }
    }
}

/// How one release spread.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseReport {
    /// Its sequence.
    pub sequence: u64,
    /// When it was published (simulated ms).
    pub published_ms: u64,
    /// Simulated time from publishing until every live honest agent held
    /// it, if that happened before the deadline.
    pub converged_after_ms: Option<u64>,
    /// Simulated time from publishing until half of the honest agents
    /// held it.
    pub p50_ms: Option<u64>,
    /// ... until 90 % of them held it.
    pub p90_ms: Option<u64>,
    /// Rounds: the longest chain of peer-to-peer hops from an origin.
    pub rounds: u32,
    /// Honest agents holding it at the end of its window.
    pub holders: usize,
    /// Mesh frame bytes received per agent in its window: mean.
    pub bytes_in_mean: f64,
    /// Mesh frame bytes received per agent in its window: most.
    pub bytes_in_max: u64,
    /// Object bytes received per agent in its window: mean.
    pub object_bytes_mean: f64,
    /// Status gossip bytes (`Status`, `StatusDigest`, `StatusPull`
    /// frames) received per agent in its window: mean.
    pub gossip_bytes_mean: f64,
    /// `Want` frame bytes received per agent in its window: mean.
    pub want_bytes_mean: f64,
    /// Status gossip bytes received per agent from publishing until the
    /// next release (the window and the pause after it): mean.
    pub gossip_period_mean: f64,
    /// The same period's gossip by frame kind: `Status` (records),
    /// `StatusDigest` and `StatusPull` bytes received per agent: mean.
    pub gossip_period_split: [f64; 3],
    /// That period's length (simulated ms).
    pub period_ms: u64,
    /// Size of the bundle (manifest + objects).
    pub bundle_bytes: u64,
    /// Bytes of the objects new in this release (manifest included).
    pub new_bytes: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Per release.
    pub releases: Vec<ReleaseReport>,
    /// Whether every live honest agent held the last release at the end.
    pub converged: bool,
    /// Simulated time at the end (ms).
    pub end_ms: u64,
    /// Events processed.
    pub events: u64,
    /// Messages sent.
    pub messages: u64,
    /// Messages lost.
    pub lost: u64,
    /// Frame bytes sent in the whole run.
    pub bytes: u64,
    /// Peers cut off, by reason (`signature_threshold`,
    /// `object_hash_mismatch`, `timeout`, ...).
    pub rejections: BTreeMap<String, u64>,
    /// Crashes simulated.
    pub crashes: u64,
    /// Invariant violations (empty on a correct run).
    pub violations: Vec<String>,
    /// FNV-1a hash of every event and message: equal configs give equal
    /// hashes.
    pub trace_hash: u64,
}

// ----- the world: releases, keys, content ------------------------------

struct Published {
    bundle: String,
    envelope: Arc<Vec<u8>>,
    manifest: Arc<Manifest>,
    /// The format 2 manifest chunks' addresses.
    chunks: Vec<String>,
    bundle_bytes: u64,
    new_bytes: u64,
}

struct World {
    root: Root,
    /// The same root, verified (the embedded development root).
    verified: VerifiedRoot,
    limits: Limits,
    /// Interned verified content: address -> id, and id -> (address, bytes).
    index: BTreeMap<String, u32>,
    content: Vec<(String, Arc<Vec<u8>>)>,
    releases: Vec<Published>,
    /// Bundle id -> index in `releases`.
    by_bundle: BTreeMap<String, usize>,
    forged: Arc<Vec<u8>>,
    forged_head: Head,
    /// Release signature checks passed, shared by every agent: each
    /// distinct envelope's signatures are checked once, not at every
    /// offer, ingest and commit (every other release check runs each
    /// time; see [`SignatureMemo`]).
    memo: SignatureMemo,
}

impl World {
    fn intern(&mut self, address: &str, bytes: &[u8]) -> Option<u32> {
        if let Some(&id) = self.index.get(address) {
            return Some(id);
        }
        verify_object(address, bytes).ok()?;
        let id = self.content.len() as u32;
        self.content
            .push((address.to_owned(), Arc::new(bytes.to_vec())));
        self.index.insert(address.to_owned(), id);
        Some(id)
    }
}

fn release_key() -> KeyPair {
    // The development release key (a release key of the embedded root).
    KeyPair::from_pkcs8(include_bytes!("../../../keys/trust/dev/dev-release-1.key"))
        .unwrap_or_else(|e| panic!("dev release key: {e}"))
}

fn forger_key() -> KeyPair {
    // A root key: not allowed to sign releases.
    KeyPair::from_pkcs8(include_bytes!("../../../keys/trust/dev/dev-root-1.key"))
        .unwrap_or_else(|e| panic!("dev root key: {e}"))
}

fn object_bytes(release: u64, i: usize, size: usize) -> Vec<u8> {
    let head = format!("{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"o{i}\"}},\"data\":{{\"v\":\"{release}\",\"p\":\"");
    let mut b = head.into_bytes();
    while b.len() + 3 < size {
        b.push(b'x');
    }
    b.extend_from_slice(b"\"}}");
    b
}

fn build_world(cfg: &SimConfig) -> World {
    let verified = cairn_keys::embedded::root().unwrap_or_else(|e| panic!("embedded root: {e}"));
    let root = verified.root().clone();
    let limits = Limits::default();
    let key = release_key();
    let rollout = match &cfg.rollout {
        Some(s) => {
            cairn_core::rollout::parse_rollout(s).unwrap_or_else(|e| panic!("rollout `{s}`: {e}"))
        }
        None => Rollout::default(),
    };
    let mut w = World {
        root,
        verified,
        limits,
        index: BTreeMap::new(),
        content: Vec::new(),
        releases: Vec::new(),
        by_bundle: BTreeMap::new(),
        forged: Arc::new(Vec::new()),
        forged_head: Head {
            channel: CHANNEL.into(),
            sequence: 0,
            bundle: String::new(),
            root_version: 1,
        },
        memo: SignatureMemo::new(),
    };
    let mut versions = vec![1u64; cfg.objects.max(1)];
    let mut prev: BTreeSet<String> = BTreeSet::new();
    let mut prev_chunks: BTreeSet<String> = BTreeSet::new();
    for seq in 1..=cfg.releases.max(1) {
        if seq > 1 {
            let k = ((seq - 2) as usize) % versions.len();
            versions[k] = seq;
        }
        let mut entries = Vec::new();
        let mut bundle_bytes = 0u64;
        let mut new_bytes = 0u64;
        for (i, v) in versions.iter().enumerate() {
            let bytes = object_bytes(*v, i, cfg.object_bytes.max(64));
            let address = sha256_address(&bytes);
            bundle_bytes += bytes.len() as u64;
            if !prev.contains(&address) {
                new_bytes += bytes.len() as u64;
            }
            w.intern(&address, &bytes);
            entries.push(Entry {
                path: format!("objects/o{i:05}.yaml"),
                document: 0,
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "sim".into(),
                name: format!("o{i}"),
                object: cairn_core::Address::of(&bytes),
                size: bytes.len() as u64,
            });
        }
        let manifest = Manifest {
            format: BUNDLE_FORMAT,
            source: Source {
                repository: "sim".into(),
                commit: format!("{seq:040x}"),
                path: String::new(),
                rendered: Vec::new(),
            },
            entries,
            images: None,
        };
        let encoded = manifest.encode_all();
        for (address, bytes) in &encoded.chunks {
            bundle_bytes += bytes.len() as u64;
            if !prev_chunks.contains(address.as_str()) {
                new_bytes += bytes.len() as u64;
            }
            w.intern(address, bytes);
        }
        prev_chunks = encoded.chunks.iter().map(|(a, _)| a.to_string()).collect();
        let mbytes = encoded.top;
        let bundle = sha256_address(&mbytes);
        bundle_bytes += mbytes.len() as u64;
        new_bytes += mbytes.len() as u64;
        w.intern(&bundle, &mbytes);
        prev = manifest
            .entries
            .iter()
            .map(|e| e.object.to_string())
            .collect();
        let release = Release {
            format: RELEASE_FORMAT,
            channel: CHANNEL.parse().expect("CHANNEL is a valid channel name"),
            sequence: seq,
            bundle: cairn_core::BundleId::of_manifest(&mbytes),
            created: EPOCH,
            expires: EPOCH + 365 * 86_400,
            rollout: rollout.clone(),
            selector: BTreeMap::new(),
        };
        let envelope = Arc::new(release.sign(&[&key]).encode());
        w.by_bundle.insert(bundle.clone(), w.releases.len());
        w.releases.push(Published {
            bundle,
            envelope,
            manifest: Arc::new(manifest),
            chunks: prev_chunks.iter().cloned().collect(),
            bundle_bytes,
            new_bytes,
        });
    }
    // The forged release: a huge sequence, signed by a key that may not
    // sign releases.
    let fake = sha256_address(b"forged bundle");
    let forged = Release {
        format: RELEASE_FORMAT,
        channel: CHANNEL.parse().expect("CHANNEL is a valid channel name"),
        sequence: 1_000_000,
        bundle: cairn_core::BundleId::of_manifest(b"forged bundle"),
        created: EPOCH,
        expires: EPOCH + 365 * 86_400,
        rollout: Rollout::default(),
        selector: BTreeMap::new(),
    };
    w.forged = Arc::new(forged.sign(&[&forger_key()]).encode());
    w.forged_head = Head {
        channel: CHANNEL.into(),
        sequence: 1_000_000,
        bundle: fake,
        root_version: 1,
    };
    w
}

// ----- agents ----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Honest,
    /// Advertises the forged release.
    Forger,
    /// Adopts honestly, serves objects with a flipped byte.
    Tamperer,
}

struct Link {
    peer: usize,
    peer_inc: u32,
    peer_conn: ConnId,
    latency: u64,
    last_delivery: u64,
}

/// A fetch in progress: the agent's own pure ingest state machine
/// ([`cairn_core::pipeline::Ingest`]) and the peer it came from.
struct Pending {
    ingest: Ingest,
    peer: Option<usize>,
}

/// Simulated agents place no local holds.
struct NoHold;

impl LocalHold for NoHold {
    fn active(&self, _now: u64) -> bool {
        false
    }
    fn until(&self) -> Option<u64> {
        None
    }
}

/// Where an ingest reads from: the bundle repository (an origin's source)
/// or the files a mesh fetch put into the node's store.
struct SourceSpec {
    name: String,
    /// The channel's release envelope it serves.
    release: Arc<Vec<u8>>,
    /// The bundle that release names (for the fleet reports the gate reads).
    bundle: String,
    content: Content,
    /// Whether the adoption gate applies (see [`SimLocal`]).
    gated: bool,
}

/// Where a [`SourceSpec`]'s manifests and objects come from.
enum Content {
    /// Every bundle published so far (the world's content).
    Repository,
    /// What the ingesting node has stored (the agent's mesh `StagedSource`).
    Store,
}

/// What one ingest gave.
enum Ingested {
    Adopted(Box<Adoption>),
    /// Rejected on the way: the fetch is reported to the mesh.
    Rejected(Rejection),
    /// Nothing to adopt (up to date, deferred, or the commit-time re-check
    /// failed: its reason).
    Nothing(Option<&'static str>),
}

/// A [`SourceSpec`] as the ingest driver's [`driver::Fetch`]. Roots are not
/// rotated in the simulation: no source serves one.
struct SimFetch<'a> {
    world: &'a World,
    /// The node's store, for [`Content::Store`].
    objects: &'a BTreeSet<u32>,
    source: &'a SourceSpec,
}

impl driver::Fetch for SimFetch<'_> {
    type Error = String;

    fn name(&self) -> &str {
        &self.source.name
    }

    fn fetch<'a>(
        &'a self,
        item: &'a driver::Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        let found = match item {
            driver::Item::Root(_) => None,
            driver::Item::Release(c) if c == CHANNEL => Some(self.source.release.as_ref().clone()),
            driver::Item::Release(_) => None,
            driver::Item::Manifest(a) | driver::Item::Object(a) => {
                let world = self.world;
                world
                    .index
                    .get(a)
                    .filter(|id| match self.source.content {
                        Content::Repository => true,
                        Content::Store => self.objects.contains(id),
                    })
                    .map(|&id| world.content[id as usize].1.as_ref().clone())
            }
        };
        Box::pin(async move {
            match found {
                Some(b) if b.len() as u64 > limit => {
                    Err(format!("{item}: more than {limit} bytes"))
                }
                other => Ok(other),
            }
        })
    }
}

/// Node `i`'s store and state as the ingest driver's [`driver::Local`].
/// Stored objects are collected and put into the node's store (through
/// [`Sim::store`], which checks them again) when the drive returns.
///
/// The gate is the agent's ([`adoption_gate`] with the node's labels and
/// the fleet reports its endpoint holds, no local hold) for mesh fetches;
/// origins are not gated: the simulator does not model staged releases
/// relayed ahead of their wave, so origins act as the rollout's source.
struct SimLocal<'a> {
    world: &'a World,
    id: &'a AgentId,
    labels: &'a BTreeMap<String, String>,
    objects: &'a BTreeSet<u32>,
    adopted: Option<&'a Adopted>,
    /// The fleet reports the node's endpoint holds for this bundle (the
    /// endpoint itself stays with the simulator's event loop).
    reports: (String, FleetReports),
    /// Simulated ms.
    now: u64,
    gated: bool,
    puts: Mutex<Vec<(String, Vec<u8>)>>,
}

impl SimLocal<'_> {
    fn stored(&self, address: &str) -> Option<Vec<u8>> {
        let world = self.world;
        world
            .index
            .get(address)
            .filter(|id| self.objects.contains(id))
            .map(|&id| world.content[id as usize].1.as_ref().clone())
    }
}

impl driver::Local for SimLocal<'_> {
    type Error = String;

    fn root(&self) -> VerifiedRoot {
        self.world.verified.clone()
    }

    fn root_accepted(
        &self,
        version: u64,
        _bytes: Vec<u8>,
        _root: VerifiedRoot,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { Err(format!("root v{version}: rotation is not simulated")) })
    }

    fn root_rejected(&self, _rejection: &Rejection) {}

    fn signature_memo(&self) -> Option<&SignatureMemo> {
        Some(&self.world.memo)
    }

    fn snapshot(&self) -> Snapshot {
        let world = self.world;
        Snapshot {
            root: world.root.clone(),
            epoch: vec![world.root.clone()],
            adopted: self
                .adopted
                .map(|a| (a.sequence, a.envelope.as_ref().clone())),
            now: secs(self.now),
        }
    }

    fn gate<'a>(&'a self, release: &'a VerifiedRelease) -> BoxFuture<'a, Gate> {
        let deferral = self.gated.then(|| {
            let release = release.release();
            let reports = match &self.reports {
                (bundle, r) if *bundle == release.bundle => *r,
                _ => FleetReports::default(),
            };
            let who = Audience {
                agent_id: self.id,
                labels: self.labels,
                reports,
            };
            adoption_gate(release, &who, None::<&NoHold>, secs(self.now))
        });
        Box::pin(async move {
            Gate {
                deferral: deferral.flatten(),
                stage: false,
            }
        })
    }

    fn stored_manifest<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        let found = self.stored(address);
        Box::pin(async move { Ok(found) })
    }

    fn present(&self, addresses: Vec<String>) -> BoxFuture<'_, Result<Vec<bool>, String>> {
        let (world, objects) = (self.world, self.objects);
        let present = addresses
            .iter()
            .map(|a| world.index.get(a).is_some_and(|id| objects.contains(id)))
            .collect();
        Box::pin(async move { Ok(present) })
    }

    fn put_object(&self, address: String, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), String>> {
        let mut puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
        puts.push((address, bytes));
        Box::pin(async { Ok(()) })
    }
}

/// What a fetch still needs.
enum Wanted {
    Nothing,
    Manifest(Address),
    /// Bundle format 2 chunks the node lacks, by address.
    Chunks(Vec<Address>),
    /// Missing entries: (index in the manifest's entry order, address).
    Entries(Vec<(u32, Address)>),
}

struct Adopted {
    sequence: u64,
    bundle: String,
    envelope: Arc<Vec<u8>>,
}

struct Node {
    id: AgentId,
    addr: String,
    role: Role,
    labels: BTreeMap<String, String>,
    seeds: Vec<String>,
    up: bool,
    inc: u32,
    ep: Option<Endpoint>,
    timer: Option<u64>,
    links: BTreeMap<ConnId, Link>,
    pending: BTreeMap<FetchId, Pending>,
    // Persistent (the store).
    objects: BTreeSet<u32>,
    adopted: Option<Adopted>,
    known_peers: Vec<PeerInfo>,
    hops: u32,
    bytes_in: u64,
    object_bytes_in: u64,
    gossip_bytes_in: u64,
    want_bytes_in: u64,
    /// Gossip bytes in by kind: `Status`, `StatusDigest`, `StatusPull`.
    gossip_split_in: [u64; 3],
}

// ----- the event queue -------------------------------------------------

enum Ev {
    Up(usize),
    Down(usize),
    Timer {
        node: usize,
        inc: u32,
        at: u64,
    },
    Deliver {
        to: usize,
        inc: u32,
        conn: ConnId,
        msg: Message,
        bytes: u64,
    },
    Closed {
        to: usize,
        inc: u32,
        conn: ConnId,
    },
    Connect {
        from: usize,
        inc: u32,
        to: usize,
        addr: String,
    },
    DialFailed {
        node: usize,
        inc: u32,
        addr: String,
    },
    ChurnTick,
    Heal,
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// FNV-1a, 64 bits.
#[derive(Clone, Copy)]
struct Trace(u64);

impl Trace {
    fn add(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A simulation in progress. Most callers want [`run`].
pub struct Sim {
    cfg: SimConfig,
    world: World,
    nodes: Vec<Node>,
    by_addr: BTreeMap<String, usize>,
    queue: BinaryHeap<Queued>,
    next_seq: u64,
    now: u64,
    rng: StdRng,
    trace: Trace,
    partitioned: Option<Vec<bool>>,
    churn_active: bool,
    events: u64,
    messages: u64,
    lost: u64,
    bytes: u64,
    crashes: u64,
    rejections: BTreeMap<String, u64>,
    violations: Vec<String>,
    /// Adoption instants per sequence.
    adoptions: BTreeMap<u64, Vec<u64>>,
    /// Bumped whenever what [`Sim::run_until`]'s conditions read may have
    /// changed (an adoption, an agent up or down, a partition healed):
    /// they scan the fleet, so they are evaluated only then, not after
    /// every event.
    epoch: u64,
}

/// Status record keys of the simulated fleet: thousands of X.509
/// certificates and ECDSA signatures would dominate the run, so the
/// records are signed with [`SharedSecretKeys`] (the mesh's test keys: the
/// endpoint's checks are the real ones; only the cryptography is cheaper).
const SIM_FLEET_SECRET: &[u8] = b"cairn-sim fleet secret";

fn secs(ms: u64) -> u64 {
    EPOCH + ms / 1000
}

fn node_index(agent_id: &str) -> Option<usize> {
    agent_id.strip_prefix('a')?.parse().ok()
}

impl Sim {
    /// Sets up agents and releases (nothing runs yet).
    pub fn new(cfg: SimConfig) -> Self {
        let world = build_world(&cfg);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let n = cfg.agents.max(1);
        let origins = cfg.origins.clamp(1, n);
        let malicious = cfg.malicious.min(n - origins);
        let mut nodes = Vec::with_capacity(n);
        let mut by_addr = BTreeMap::new();
        for i in 0..n {
            let addr = format!("n{i}:7440");
            by_addr.insert(addr.clone(), i);
            // Malicious agents are the last ones.
            let role = if i >= n - malicious {
                if (n - 1 - i) % 2 == 0 {
                    Role::Forger
                } else {
                    Role::Tamperer
                }
            } else {
                Role::Honest
            };
            let mut seeds = BTreeSet::new();
            let want = cfg.seeds_per_agent.min(n - 1);
            while seeds.len() < want {
                let j = rng.random_range(0..n);
                if j != i {
                    seeds.insert(j);
                }
            }
            nodes.push(Node {
                id: AgentId::parse(&format!("a{i}")).expect("a<number> is an agent id"),
                addr,
                role,
                labels: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 4))]),
                seeds: seeds.into_iter().map(|j| format!("n{j}:7440")).collect(),
                up: false,
                inc: 0,
                ep: None,
                timer: None,
                links: BTreeMap::new(),
                pending: BTreeMap::new(),
                objects: BTreeSet::new(),
                adopted: None,
                known_peers: Vec::new(),
                hops: 0,
                bytes_in: 0,
                object_bytes_in: 0,
                gossip_bytes_in: 0,
                want_bytes_in: 0,
                gossip_split_in: [0; 3],
            });
        }
        let mut sim = Sim {
            cfg,
            world,
            nodes,
            by_addr,
            queue: BinaryHeap::new(),
            next_seq: 0,
            now: 0,
            rng,
            trace: Trace(0xcbf2_9ce4_8422_2325),
            partitioned: None,
            churn_active: false,
            events: 0,
            messages: 0,
            lost: 0,
            bytes: 0,
            crashes: 0,
            rejections: BTreeMap::new(),
            violations: Vec::new(),
            adoptions: BTreeMap::new(),
            epoch: 0,
        };
        for i in 0..n {
            let at = sim.rng.random_range(0..1000);
            sim.push(at, Ev::Up(i));
        }
        if let Some(c) = sim.cfg.churn.clone() {
            sim.churn_active = true;
            sim.push(c.interval_ms.max(1), Ev::ChurnTick);
        }
        sim
    }

    /// Whether agent `i` speaks protocol version 2 only.
    fn legacy(&self, i: usize) -> bool {
        let share = self.cfg.legacy_share.clamp(0.0, 1.0);
        (i as f64 * share).floor() != ((i + 1) as f64 * share).floor()
    }

    fn origins(&self) -> usize {
        self.cfg.origins.clamp(1, self.nodes.len())
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.next_seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.next_seq,
            ev,
        });
    }

    fn latency(&self, a: usize, b: usize) -> u64 {
        let (lo, hi) = self.cfg.latency_ms;
        let hi = hi.max(lo);
        let (x, y) = (a.min(b) as u64, a.max(b) as u64);
        let mut h = Trace(self.cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
        h.add(x);
        h.add(y);
        lo + h.0 % (hi - lo + 1)
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.partitioned
            .as_ref()
            .is_some_and(|side| side[a] != side[b])
    }

    fn honest_live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.up && n.role != Role::Forger)
    }

    fn holds(n: &Node, seq: u64) -> bool {
        n.adopted.as_ref().is_some_and(|a| a.sequence >= seq)
    }

    fn converged(&self, seq: u64) -> bool {
        self.honest_live().all(|n| Self::holds(n, seq))
    }

    /// Runs events until `done` holds or simulated time passes `until`.
    fn run_until(&mut self, until: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let mut checked = None;
        loop {
            if checked != Some(self.epoch) {
                checked = Some(self.epoch);
                if done(self) {
                    return true;
                }
            }
            let Some(top) = self.queue.peek() else {
                return false;
            };
            if top.at > until {
                self.now = until;
                return done(self);
            }
            let Some(q) = self.queue.pop() else {
                return false;
            };
            self.now = self.now.max(q.at);
            self.events += 1;
            self.trace.add(q.at);
            self.handle(q.ev);
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Up(i) => {
                self.epoch += 1;
                self.trace.add(1 << 32 | i as u64);
                self.start(i);
            }
            Ev::Down(i) => {
                self.epoch += 1;
                self.trace.add(2 << 32 | i as u64);
                self.crash(i);
            }
            Ev::Timer { node, inc, at } => {
                let n = &mut self.nodes[node];
                if !n.up || n.inc != inc || n.timer != Some(at) {
                    return;
                }
                self.trace.add(3 << 32 | node as u64);
                n.timer = None;
                let now = self.now;
                if let Some(ep) = n.ep.as_mut() {
                    ep.handle_timeout(Millis(now), UnixMillis(now));
                }
                self.drain(node);
                // A timer still due right after running: try again 1 ms
                // later rather than spinning at this instant.
                let n = &mut self.nodes[node];
                if n.timer == Some(now) {
                    n.timer = Some(now + 1);
                    let inc = n.inc;
                    self.push(
                        now + 1,
                        Ev::Timer {
                            node,
                            inc,
                            at: now + 1,
                        },
                    );
                }
            }
            Ev::Deliver {
                to,
                inc,
                conn,
                msg,
                bytes,
            } => {
                let now = self.now;
                let n = &mut self.nodes[to];
                if !n.up || n.inc != inc || !n.links.contains_key(&conn) {
                    return;
                }
                self.trace.add(4 << 32 | to as u64);
                self.trace.add(conn);
                n.bytes_in += bytes;
                match &msg {
                    Message::Status(_) | Message::StatusDigest(_) | Message::StatusPull(_) => {
                        n.gossip_bytes_in += bytes;
                        let k = match &msg {
                            Message::Status(_) => 0,
                            Message::StatusDigest(_) => 1,
                            _ => 2,
                        };
                        n.gossip_split_in[k] += bytes;
                    }
                    Message::Want { .. } => n.want_bytes_in += bytes,
                    _ => {}
                }
                if let Some(ep) = n.ep.as_mut() {
                    ep.handle_message(conn, msg, Millis(now), UnixMillis(now));
                }
                self.drain(to);
            }
            Ev::Closed { to, inc, conn } => {
                let now = self.now;
                let n = &mut self.nodes[to];
                if !n.up || n.inc != inc {
                    return;
                }
                self.trace.add(5 << 32 | to as u64);
                n.links.remove(&conn);
                if let Some(ep) = n.ep.as_mut() {
                    ep.disconnected(conn, Millis(now));
                }
                self.drain(to);
            }
            Ev::Connect {
                from,
                inc,
                to,
                addr,
            } => self.connect(from, inc, to, addr),
            Ev::DialFailed { node, inc, addr } => {
                let now = self.now;
                let n = &mut self.nodes[node];
                if !n.up || n.inc != inc {
                    return;
                }
                self.trace.add(6 << 32 | node as u64);
                if let Some(ep) = n.ep.as_mut() {
                    ep.dial_failed(&addr, Millis(now));
                }
                self.drain(node);
            }
            Ev::ChurnTick => {
                let Some(c) = self.cfg.churn.clone() else {
                    return;
                };
                if !self.churn_active {
                    return;
                }
                let n = self.nodes.len();
                let first = self.origins();
                if first < n {
                    let i = self.rng.random_range(first..n);
                    if self.nodes[i].up {
                        self.crashes += 1;
                        self.push(self.now, Ev::Down(i));
                        self.push(self.now + c.down_ms, Ev::Up(i));
                    }
                }
                self.push(self.now + c.interval_ms.max(1), Ev::ChurnTick);
            }
            Ev::Heal => {
                self.epoch += 1;
                self.trace.add(7 << 32);
                self.partitioned = None;
            }
        }
    }

    fn new_endpoint(&self, i: usize) -> Endpoint {
        let n = &self.nodes[i];
        let mut c = SyncConfig::new(n.id.clone(), vec![CHANNEL.to_owned()]);
        c.listen = Some(n.addr.clone());
        c.seeds = n.seeds.clone();
        c.rng_seed = self.cfg.seed ^ ((i as u64) << 20) ^ u64::from(n.inc);
        c.anti_entropy_ms = self.cfg.anti_entropy_ms;
        c.limits.target_connections = self.cfg.target_connections;
        if self.legacy(i) {
            c.protocol_version = 2;
        }
        let keys = SharedSecretKeys {
            id: n.id.to_string(),
            secret: SIM_FLEET_SECRET,
        };
        Endpoint::new(c, 1, Box::new(keys))
    }

    fn start(&mut self, i: usize) {
        if self.nodes[i].up {
            return;
        }
        let mut ep = self.new_endpoint(i);
        let now = self.now;
        let n = &mut self.nodes[i];
        n.up = true;
        ep.learn_peers(n.known_peers.iter().cloned());
        match n.role {
            Role::Forger => ep.set_head(self.world.forged_head.clone(), Millis(now)),
            _ => {
                if let Some(a) = &n.adopted {
                    ep.set_head(
                        Head {
                            channel: CHANNEL.into(),
                            sequence: a.sequence,
                            bundle: a.bundle.clone(),
                            root_version: 1,
                        },
                        Millis(now),
                    );
                }
            }
        }
        n.ep = Some(ep);
        n.timer = None;
        self.status(i);
        self.drain(i);
    }

    fn crash(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        let links: Vec<(usize, u32, ConnId, u64)> = {
            let n = &mut self.nodes[i];
            n.up = false;
            if let Some(ep) = &n.ep {
                n.known_peers = ep
                    .peer_table()
                    .filter(|e| e.last_connected > 0 && !e.is_self)
                    .map(|e| PeerInfo {
                        agent_id: e.agent_id.clone(),
                        addr: e.addr.clone(),
                    })
                    .collect();
            }
            n.ep = None;
            n.inc += 1;
            n.timer = None;
            n.pending.clear();
            let v = n
                .links
                .values()
                .map(|l| (l.peer, l.peer_inc, l.peer_conn, l.latency))
                .collect();
            n.links.clear();
            v
        };
        for (peer, inc, conn, lat) in links {
            self.push(
                self.now + lat,
                Ev::Closed {
                    to: peer,
                    inc,
                    conn,
                },
            );
        }
    }

    fn connect(&mut self, i: usize, inc: u32, j: usize, addr: String) {
        let now = self.now;
        if !self.nodes[i].up || self.nodes[i].inc != inc {
            return;
        }
        if !self.nodes[j].up || self.cut(i, j) {
            if let Some(ep) = self.nodes[i].ep.as_mut() {
                ep.dial_failed(&addr, Millis(now));
            }
            return self.drain(i);
        }
        self.trace.add(8 << 32 | (i as u64) << 16 | j as u64);
        let (id_i, id_j) = (self.nodes[i].id.clone(), self.nodes[j].id.clone());
        let host_i = self.nodes[i].addr.split(':').next().map(str::to_owned);
        let host_j = self.nodes[j].addr.split(':').next().map(str::to_owned);
        let Some(ci) = self.nodes[i]
            .ep
            .as_mut()
            .map(|ep| ep.connected(PeerIdentity::Agent(id_j), Some(addr), host_j, Millis(now)))
        else {
            return;
        };
        let Some(cj) = self.nodes[j]
            .ep
            .as_mut()
            .map(|ep| ep.connected(PeerIdentity::Agent(id_i), None, host_i, Millis(now)))
        else {
            return;
        };
        let lat = self.latency(i, j);
        let (inc_i, inc_j) = (self.nodes[i].inc, self.nodes[j].inc);
        self.nodes[i].links.insert(
            ci,
            Link {
                peer: j,
                peer_inc: inc_j,
                peer_conn: cj,
                latency: lat,
                last_delivery: 0,
            },
        );
        self.nodes[j].links.insert(
            cj,
            Link {
                peer: i,
                peer_inc: inc_i,
                peer_conn: ci,
                latency: lat,
                last_delivery: 0,
            },
        );
        self.drain(i);
        self.drain(j);
    }

    /// Carries out node `i`'s actions, then reschedules its timer.
    fn drain(&mut self, i: usize) {
        while let Some(a) = self.nodes[i].ep.as_mut().and_then(Endpoint::poll_action) {
            self.act(i, a);
        }
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(t) =
            n.ep.as_ref()
                .and_then(Endpoint::poll_timeout)
                .map(Millis::as_u64)
        else {
            return;
        };
        let t = t.max(now);
        if n.timer != Some(t) {
            n.timer = Some(t);
            let inc = n.inc;
            self.push(
                t,
                Ev::Timer {
                    node: i,
                    inc,
                    at: t,
                },
            );
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        let now = self.now;
        match a {
            Action::Send { conn, message } => {
                let limit = self.nodes[i]
                    .ep
                    .as_ref()
                    .map_or(4 << 20, |e| e.config().limits.max_frame_bytes);
                // The exact size of the frame the agent would send
                // (`encode_frame`), counted without encoding it.
                let size = frame_len(&message);
                if size - HEADER_BYTES as u64 > u64::from(limit) {
                    self.violations.push(format!(
                        "{}: cannot encode a {} frame: {} bytes, more than {limit}",
                        self.nodes[i].id,
                        message.kind(),
                        size - HEADER_BYTES as u64,
                    ));
                    return;
                }
                let Some(link) = self.nodes[i].links.get(&conn) else {
                    return;
                };
                let (peer, peer_inc, peer_conn, lat) =
                    (link.peer, link.peer_inc, link.peer_conn, link.latency);
                self.messages += 1;
                self.bytes += size;
                self.trace.add(9 << 32 | i as u64);
                self.trace.add(size);
                let lost = self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss.min(1.0));
                if lost || self.cut(i, peer) {
                    // TCP delivers in order or not at all: the connection breaks.
                    self.lost += u64::from(lost);
                    self.nodes[i].links.remove(&conn);
                    let my_inc = self.nodes[i].inc;
                    self.push(
                        now + 1,
                        Ev::Closed {
                            to: i,
                            inc: my_inc,
                            conn,
                        },
                    );
                    self.push(
                        now + lat,
                        Ev::Closed {
                            to: peer,
                            inc: peer_inc,
                            conn: peer_conn,
                        },
                    );
                    return;
                }
                let Some(link) = self.nodes[i].links.get_mut(&conn) else {
                    return;
                };
                let at = (now + lat).max(link.last_delivery);
                link.last_delivery = at;
                self.push(
                    at,
                    Ev::Deliver {
                        to: peer,
                        inc: peer_inc,
                        conn: peer_conn,
                        msg: message,
                        bytes: size,
                    },
                );
            }
            Action::Close { conn, .. } => {
                if let Some(l) = self.nodes[i].links.remove(&conn) {
                    self.push(
                        now + l.latency,
                        Ev::Closed {
                            to: l.peer,
                            inc: l.peer_inc,
                            conn: l.peer_conn,
                        },
                    );
                }
            }
            Action::Dial { addr } => {
                let inc = self.nodes[i].inc;
                match self.by_addr.get(&addr).copied() {
                    Some(j) if self.nodes[j].up && !self.cut(i, j) => {
                        let lat = self.latency(i, j);
                        self.push(
                            now + 3 * lat,
                            Ev::Connect {
                                from: i,
                                inc,
                                to: j,
                                addr,
                            },
                        );
                    }
                    Some(j) if self.nodes[j].up => {
                        // Across a partition: the connect times out.
                        self.push(now + 3_000, Ev::DialFailed { node: i, inc, addr });
                    }
                    Some(j) => {
                        let lat = self.latency(i, j);
                        self.push(now + 2 * lat, Ev::DialFailed { node: i, inc, addr });
                    }
                    None => self.push(now + 1, Ev::DialFailed { node: i, inc, addr }),
                }
            }
            Action::Event(e) => self.event(i, e),
        }
    }

    fn event(&mut self, i: usize, e: Event) {
        let now = self.now;
        match e {
            Event::Serve { conn, id, items } => {
                let mut found = Vec::new();
                let mut answered = Vec::new();
                for item in items {
                    let Item::Entries(e) = &item else {
                        let bytes = self.serve_item(i, &item);
                        found.push(Found { item, bytes });
                        continue;
                    };
                    // Entries by index, through the manifest the node
                    // holds (as the agent's mesh driver resolves them).
                    let Some(manifest) = self.held_entries(i, &e.bundle) else {
                        found.push(Found { item, bytes: None });
                        continue;
                    };
                    let entries = &manifest.entries;
                    match e.indices(entries.len()) {
                        Ok(ix) => {
                            for k in ix {
                                let a = entries[k].object.clone();
                                let bytes = self.serve_item(i, &Item::Object(a));
                                answered.push(EntryFound(k as u32, bytes));
                            }
                        }
                        Err(bad) => {
                            if let Some(ep) = self.nodes[i].ep.as_mut() {
                                ep.serve_refused(
                                    conn,
                                    id,
                                    bad,
                                    "index past the bundle",
                                    Millis(now),
                                );
                            }
                            return;
                        }
                    }
                }
                if let Some(ep) = self.nodes[i].ep.as_mut() {
                    ep.serve_part(conn, id, found, answered, true, Millis(now));
                }
            }
            Event::VerifyRelease {
                fetch,
                peer,
                release,
                ..
            } => self.verify_release(i, fetch, &peer, release),
            Event::Object {
                fetch,
                address,
                bytes,
            } => self.object(i, fetch, &address, &bytes),
            Event::FetchIdle { fetch } => self.fetch_idle(i, fetch),
            Event::FetchFailed { fetch, .. } => {
                self.nodes[i].pending.remove(&fetch);
            }
            Event::Rejected { reason, .. } => {
                *self.rejections.entry(reason.to_string()).or_default() += 1;
            }
            Event::PeerUp { .. }
            | Event::PeerDown { .. }
            | Event::StatusChanged
            | Event::StatusDropped { .. }
            | Event::BlobPiece { .. } => {}
        }
    }

    /// The entries of `bundle` if node `i` holds its manifest.
    fn held_entries(&self, i: usize, bundle: &str) -> Option<Arc<Manifest>> {
        let id = self.world.index.get(bundle)?;
        if !self.nodes[i].objects.contains(id) {
            return None;
        }
        let k = *self.world.by_bundle.get(bundle)?;
        Some(self.world.releases[k].manifest.clone())
    }

    fn serve_item(&self, i: usize, item: &Item) -> Option<Vec<u8>> {
        let n = &self.nodes[i];
        match item {
            Item::Root(_) => None,
            Item::Release(c) if c == CHANNEL => match n.role {
                Role::Forger => Some(self.world.forged.as_ref().clone()),
                _ => n.adopted.as_ref().map(|a| a.envelope.as_ref().clone()),
            },
            Item::Release(_) | Item::Entries(_) | Item::Blob(_) => None,
            Item::Object(a) => {
                let id = *self.world.index.get(a.as_str())?;
                if !n.objects.contains(&id) {
                    return None;
                }
                let mut b = self.world.content[id as usize].1.as_ref().clone();
                if n.role == Role::Tamperer {
                    if let Some(x) = b.first_mut() {
                        *x ^= 1;
                    }
                }
                Some(b)
            }
        }
    }

    fn reports(&self, i: usize, bundle: &str) -> FleetReports {
        self.nodes[i]
            .ep
            .as_ref()
            .and_then(|ep| {
                ep.fleet_reports(CHANNEL, UnixMillis(self.now))
                    .get(bundle)
                    .copied()
            })
            .unwrap_or_default()
    }

    /// The pipeline context of node `i` now: the world's root (one epoch),
    /// the channel and the node's adopted release.
    fn context(&self, i: usize) -> Context<'_> {
        Context {
            root: &self.world.root,
            epoch: std::slice::from_ref(&self.world.root),
            channel: CHANNEL,
            adopted: self.nodes[i].adopted.as_ref().map(|a| AdoptedRef {
                sequence: a.sequence,
                bytes: a.envelope.as_slice(),
            }),
            now: secs(self.now),
            limits: &self.world.limits,
            memo: Some(&self.world.memo),
        }
    }

    fn rejected(&mut self, i: usize, fetch: FetchId, rej: &Rejection) {
        let now = self.now;
        self.nodes[i].pending.remove(&fetch);
        if let Some(ep) = self.nodes[i].ep.as_mut() {
            ep.release_rejected(fetch, VerifyFailure::of(rej), &rej.to_string(), Millis(now));
        }
    }

    /// A release offered by a peer: [`Ingest::start`], then the adoption
    /// gate ([`adoption_gate`]), as in the agent's mesh driver.
    fn verify_release(&mut self, i: usize, fetch: FetchId, peer: &str, envelope: Vec<u8>) {
        let now = self.now;
        let start = Ingest::start(&self.context(i), &envelope);
        let ingest = match start {
            Err(rej) => return self.rejected(i, fetch, &rej),
            Ok(Start::UpToDate) => {
                if let Some(ep) = self.nodes[i].ep.as_mut() {
                    ep.fetch_abandon(fetch, Millis(now));
                }
                return;
            }
            Ok(Start::Candidate(ingest)) => *ingest,
        };
        let release = ingest.release().release();
        let reports = self.reports(i, &release.bundle);
        let n = &self.nodes[i];
        let who = Audience {
            agent_id: &n.id,
            labels: &n.labels,
            reports,
        };
        let deferral = adoption_gate(release, &who, None::<&NoHold>, secs(now));
        let n = &mut self.nodes[i];
        let Some(ep) = n.ep.as_mut() else {
            return;
        };
        if deferral.is_some() {
            ep.fetch_abandon(fetch, Millis(now));
            return;
        }
        n.pending.insert(
            fetch,
            Pending {
                ingest,
                peer: node_index(peer),
            },
        );
        ep.release_verified(fetch, Millis(now));
        if !self.want(i, fetch) {
            if let Some(ep) = self.nodes[i].ep.as_mut() {
                ep.fetch_want(fetch, Vec::new(), Millis(now));
            }
        }
    }

    /// What a pending fetch still needs (the manifest first, by address;
    /// then the missing entries with their index in the manifest, as the
    /// agent's mesh driver asks); objects the node's store holds are
    /// marked present in the ingest.
    fn missing(&mut self, i: usize, fetch: FetchId) -> Wanted {
        let world = &self.world;
        let n = &mut self.nodes[i];
        let Some(p) = n.pending.get_mut(&fetch) else {
            return Wanted::Nothing;
        };
        if let Want::Manifest { address, .. } = p.ingest.want() {
            // Already stored (e.g. an interrupted fetch)? Then use it.
            let stored = world
                .index
                .get(address.as_str())
                .filter(|id| n.objects.contains(id))
                .map(|id| world.content[*id as usize].1.clone());
            match stored.map(|b| p.ingest.handle_manifest(&b)) {
                Some(Ok(())) => {}
                _ => return Wanted::Manifest(address.as_address().clone()),
            }
        }
        if let Want::Chunks(list) = p.ingest.want() {
            // Chunks the node holds (the previous release's unchanged
            // ones) are fed from its store; the rest are wanted.
            let mut out = Vec::new();
            for (address, _) in list {
                let stored = world
                    .index
                    .get(address.as_str())
                    .filter(|id| n.objects.contains(id))
                    .map(|id| world.content[*id as usize].1.clone());
                match stored.map(|b| p.ingest.handle_object(&address, &b)) {
                    Some(Ok(())) => {}
                    _ => out.push(address),
                }
            }
            if !out.is_empty() || matches!(p.ingest.want(), Want::Chunks(_)) {
                return Wanted::Chunks(out);
            }
        }
        match p.ingest.want() {
            Want::Manifest { address, .. } => Wanted::Manifest(address.into()),
            Want::Chunks(list) => Wanted::Chunks(list.into_iter().map(|(a, _)| a).collect()),
            Want::Complete => Wanted::Nothing,
            Want::Objects(list) => {
                let mut lacking = BTreeSet::new();
                for (address, _) in list {
                    if world
                        .index
                        .get(address.as_str())
                        .is_some_and(|id| n.objects.contains(id))
                    {
                        p.ingest.mark_present(&address);
                    } else {
                        lacking.insert(address.to_string());
                    }
                }
                // Each missing object by its (first) index in the
                // manifest's entry order.
                let mut out = Vec::new();
                if let Some(m) = p.ingest.manifest() {
                    for (k, e) in m.entries.iter().enumerate() {
                        if lacking.remove(e.object.as_str()) {
                            out.push((k as u32, e.object.clone()));
                        }
                    }
                }
                if out.is_empty() {
                    Wanted::Nothing
                } else {
                    Wanted::Entries(out)
                }
            }
        }
    }

    /// Hands what a fetch still needs to node `i`'s endpoint; false when
    /// nothing is.
    fn want(&mut self, i: usize, fetch: FetchId) -> bool {
        let now = self.now;
        let wanted = self.missing(i, fetch);
        let Some(ep) = self.nodes[i].ep.as_mut() else {
            return false;
        };
        match wanted {
            Wanted::Nothing => false,
            Wanted::Manifest(a) => {
                ep.fetch_want(fetch, vec![a], Millis(now));
                true
            }
            Wanted::Chunks(list) if list.is_empty() => false,
            Wanted::Chunks(list) => {
                ep.fetch_want(fetch, list, Millis(now));
                true
            }
            Wanted::Entries(entries) => {
                ep.fetch_want_entries(fetch, entries, Millis(now));
                true
            }
        }
    }

    /// Stores verified bytes; the one way into a node's store.
    fn store(&mut self, i: usize, address: &str, bytes: &[u8]) -> bool {
        // Bytes equal to the content interned at this address hash to it
        // (it was verified when interned): no need to hash them again.
        // Anything else is hashed.
        if let Some(&id) = self.world.index.get(address) {
            if self.world.content[id as usize].1.as_slice() == bytes {
                self.nodes[i].objects.insert(id);
                return true;
            }
        }
        if let Err(e) = verify_object(address, bytes) {
            self.violations.push(format!(
                "{}: an unverified object reached the store: {e}",
                self.nodes[i].id
            ));
            return false;
        }
        match self.world.intern(address, bytes) {
            Some(id) => {
                self.nodes[i].objects.insert(id);
                true
            }
            None => false,
        }
    }

    /// An object from a peer: the manifest or an entry, checked by the
    /// ingest, then stored (as the agent's mesh driver does).
    fn object(&mut self, i: usize, fetch: FetchId, address: &str, bytes: &[u8]) {
        self.nodes[i].object_bytes_in += bytes.len() as u64;
        let Some(p) = self.nodes[i].pending.get_mut(&fetch) else {
            return;
        };
        let result = match p.ingest.want() {
            Want::Manifest { address: m, .. } if m == address => p.ingest.handle_manifest(bytes),
            _ => p.ingest.handle_object(address, bytes),
        };
        match result {
            Ok(()) => {
                self.store(i, address, bytes);
            }
            Err(rej) => self.rejected(i, fetch, &rej),
        }
    }

    fn fetch_idle(&mut self, i: usize, fetch: FetchId) {
        let now = self.now;
        if !self.nodes[i].pending.contains_key(&fetch) {
            return;
        }
        if self.want(i, fetch) {
            return;
        }
        let Some(p) = self.nodes[i].pending.remove(&fetch) else {
            return;
        };
        let hops = p
            .peer
            .map_or(0, |j| self.nodes.get(j).map_or(0, |n| n.hops) + 1);
        // As the agent's mesh driver: the fetched files become a source
        // for the one ingest driver, which re-verifies everything.
        let source = SourceSpec {
            name: format!("peer:{}", p.peer.map_or(String::new(), |j| format!("a{j}"))),
            release: Arc::new(p.ingest.release().bytes().to_vec()),
            bundle: p.ingest.release().release().bundle.to_string(),
            content: Content::Store,
            gated: true,
        };
        match self.ingest(i, &source) {
            Ingested::Adopted(adoption) => {
                self.adopt(i, &adoption, hops);
                if let Some(ep) = self.nodes[i].ep.as_mut() {
                    ep.fetch_complete(fetch, Millis(now));
                }
            }
            Ingested::Rejected(rej) => self.rejected(i, fetch, &rej),
            Ingested::Nothing(why) => {
                if let Some(why) = why {
                    *self.rejections.entry(why.to_owned()).or_default() += 1;
                }
                if let Some(ep) = self.nodes[i].ep.as_mut() {
                    ep.fetch_abandon(fetch, Millis(now));
                }
            }
        }
    }

    /// One run of the ingest driver ([`cairn_core::ingest::drive`], the
    /// agent's own) for node `i` from `source`, polled to completion (the
    /// simulated fetches complete at once); then what it stored goes into
    /// the node's store and a complete candidate is committed as the
    /// agent commits: [`Ingest::finish`] against the node's state now, and
    /// the manifest stored with the adoption.
    fn ingest(&mut self, i: usize, source: &SourceSpec) -> Ingested {
        let (outcome, puts) = {
            let bundle = source.bundle.clone();
            let reports = self.reports(i, &bundle);
            let n = &self.nodes[i];
            let fetch = SimFetch {
                world: &self.world,
                objects: &n.objects,
                source,
            };
            let local = SimLocal {
                world: &self.world,
                id: &n.id,
                labels: &n.labels,
                objects: &n.objects,
                adopted: n.adopted.as_ref(),
                reports: (bundle, reports),
                now: self.now,
                gated: source.gated,
                puts: Mutex::new(Vec::new()),
            };
            let limits = &self.world.limits;
            let outcome =
                futures::executor::block_on(driver::drive(&fetch, &local, CHANNEL, limits, 8));
            let puts = local.puts.into_inner().unwrap_or_else(|e| e.into_inner());
            (outcome, puts)
        };
        for (address, bytes) in puts {
            self.store(i, &address, &bytes);
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(DriveError::Fetch(e) | DriveError::Local(e)) => {
                self.violations.push(format!(
                    "{}: ingest from {} failed: {e}",
                    self.nodes[i].id, source.name
                ));
                return Ingested::Nothing(None);
            }
        };
        let ingest = match outcome.driven {
            Driven::Ready(ingest) => ingest,
            Driven::Rejected(rej) => return Ingested::Rejected(rej),
            Driven::NoRelease | Driven::UpToDate | Driven::Deferred { .. } => {
                return Ingested::Nothing(None)
            }
        };
        let candidate = ingest.release().bytes().to_vec();
        match ingest.finish(&self.context(i)) {
            Ok(adoption) => {
                // The manifest is stored with the adoption (the agent's
                // `Store::adopt` keeps it as the bundle): peers fetch it.
                let (bundle, manifest) = (
                    adoption.bundle_id().to_owned(),
                    adoption.manifest_bytes().to_vec(),
                );
                self.store(i, &bundle, &manifest);
                Ingested::Adopted(Box::new(adoption))
            }
            Err(_)
                if self.nodes[i]
                    .adopted
                    .as_ref()
                    .is_some_and(|a| *a.envelope == candidate) =>
            {
                Ingested::Nothing(None)
            }
            Err(rej) => Ingested::Nothing(Some(rej.reason())),
        }
    }

    /// Adopts what the pipeline verified: the only way a node's head moves.
    fn adopt(&mut self, i: usize, adoption: &Adoption, hops: u32) {
        let now = self.now;
        let release = adoption.release().release();
        let n = &mut self.nodes[i];
        let old = n.adopted.as_ref().map_or(0, |a| a.sequence);
        if release.sequence <= old {
            self.violations.push(format!(
                "{}: sequence would go from {old} to {}",
                n.id, release.sequence
            ));
            return;
        }
        if release.sequence == self.world.forged_head.sequence {
            self.violations
                .push(format!("{}: adopted the forged release", n.id));
        }
        self.epoch += 1;
        self.trace.add(10 << 32 | i as u64);
        self.trace.add(release.sequence);
        if n.role != Role::Forger {
            self.adoptions
                .entry(release.sequence)
                .or_default()
                .push(now);
        }
        n.hops = hops;
        n.adopted = Some(Adopted {
            sequence: release.sequence,
            bundle: release.bundle.to_string(),
            envelope: Arc::new(adoption.release().bytes().to_vec()),
        });
        if let Some(ep) = n.ep.as_mut() {
            ep.set_head(
                Head {
                    channel: CHANNEL.into(),
                    sequence: release.sequence,
                    bundle: release.bundle.to_string(),
                    root_version: 1,
                },
                Millis(now),
            );
        }
        self.status(i);
    }

    fn status(&mut self, i: usize) {
        if !self.cfg.status_gossip {
            return;
        }
        let now = self.now;
        let n = &mut self.nodes[i];
        let (sequence, bundle) = n
            .adopted
            .as_ref()
            .map_or((0, String::new()), |a| (a.sequence, a.bundle.clone()));
        let rec = StatusRecord {
            agent_id: n.id.clone(),
            channel: CHANNEL.into(),
            labels: n.labels.clone(),
            sequence,
            bundle,
            health: "healthy".into(),
            time: now,
            rollout: None,
            listen: None,
            values_digest: None,
        };
        if let Some(ep) = n.ep.as_mut() {
            ep.set_local_status(rec, UnixMillis(now));
        }
    }

    /// The origins adopt release `seq` from their bundle repository
    /// (through the same checks as any agent).
    fn publish(&mut self, seq: u64) {
        let Some(p) = self.world.releases.get(seq as usize - 1) else {
            return;
        };
        let (envelope, bundle) = (p.envelope.clone(), p.bundle.clone());
        for i in 0..self.origins() {
            if !self.nodes[i].up {
                continue;
            }
            // The agent's source path: the one ingest driver, reading the
            // bundle repository.
            let source = SourceSpec {
                name: "repository".into(),
                release: envelope.clone(),
                bundle: bundle.clone(),
                content: Content::Repository,
                gated: false,
            };
            let adoption = match self.ingest(i, &source) {
                Ingested::Adopted(a) => a,
                Ingested::Nothing(None) => continue,
                Ingested::Nothing(Some(why)) => {
                    self.violations
                        .push(format!("origin a{i} rejects release {seq}: {why}"));
                    continue;
                }
                Ingested::Rejected(rej) => {
                    self.violations
                        .push(format!("origin a{i} rejects release {seq}: {rej}"));
                    continue;
                }
            };
            self.adopt(i, &adoption, 0);
            self.drain(i);
        }
        if let Some(part) = self.cfg.partition.clone() {
            if part.at_release == seq {
                self.start_partition(&part);
            }
        }
    }

    fn start_partition(&mut self, part: &Partition) {
        let n = self.nodes.len();
        let origins = self.origins();
        let far = ((n as f64) * part.fraction.clamp(0.0, 1.0)) as usize;
        let far = far.min(n - origins);
        // The far side: the last `far` agents.
        let side: Vec<bool> = (0..n).map(|i| i >= n - far).collect();
        self.partitioned = Some(side);
        // Connections across the cut break.
        let mut cut = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for (c, l) in &node.links {
                if self.cut(i, l.peer) {
                    cut.push((i, node.inc, *c));
                }
            }
        }
        for (i, inc, conn) in cut {
            self.push(self.now + 1, Ev::Closed { to: i, inc, conn });
        }
        self.push(self.now + part.duration_ms, Ev::Heal);
    }

    fn window(&self) -> Vec<[u64; 7]> {
        self.nodes
            .iter()
            .map(|n| {
                [
                    n.bytes_in,
                    n.object_bytes_in,
                    n.gossip_bytes_in,
                    n.want_bytes_in,
                    n.gossip_split_in[0],
                    n.gossip_split_in[1],
                    n.gossip_split_in[2],
                ]
            })
            .collect()
    }

    /// Runs the whole scenario and checks the invariants.
    pub fn run(mut self) -> Report {
        self.run_scenario()
    }

    /// [`Sim::run`], then leaves the simulation's memory to the process's
    /// exit: freeing 100,000 endpoints one allocation at a time takes
    /// longer than the run's last phase. For a binary that exits soon.
    pub fn run_without_teardown(mut self) -> Report {
        let report = self.run_scenario();
        std::mem::forget(self);
        report
    }

    fn run_scenario(&mut self) -> Report {
        let mut releases = Vec::new();
        self.run_until(self.cfg.settle_ms, |_| false);
        let total = self.world.releases.len() as u64;
        for seq in 1..=total {
            let before = self.window();
            let t0 = self.now;
            self.publish(seq);
            let deadline = t0 + self.cfg.deadline_ms;
            let ok = self.run_until(deadline, |s| s.converged(seq) && s.partitioned.is_none());
            let after = self.window();
            let honest: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].role != Role::Forger)
                .collect();
            let count = honest.len().max(1) as f64;
            let bytes: Vec<u64> = honest.iter().map(|&i| after[i][0] - before[i][0]).collect();
            let sum = |k: usize| -> f64 {
                honest
                    .iter()
                    .map(|&i| after[i][k] - before[i][k])
                    .sum::<u64>() as f64
                    / count
            };
            let obj = sum(1);
            let p = &self.world.releases[seq as usize - 1];
            let times = self.adoptions.get(&seq).cloned().unwrap_or_default();
            let pct = |q: usize| {
                let k = (honest.len() * q).div_ceil(100).max(1);
                times.get(k - 1).map(|t| t - t0)
            };
            releases.push(ReleaseReport {
                p50_ms: pct(50),
                p90_ms: pct(90),
                sequence: seq,
                published_ms: t0,
                converged_after_ms: ok.then(|| self.now - t0),
                rounds: self
                    .nodes
                    .iter()
                    .filter(|n| n.adopted.as_ref().is_some_and(|a| a.sequence == seq))
                    .map(|n| n.hops)
                    .max()
                    .unwrap_or(0),
                holders: self
                    .nodes
                    .iter()
                    .filter(|n| n.role != Role::Forger && Self::holds(n, seq))
                    .count(),
                bytes_in_mean: bytes.iter().sum::<u64>() as f64 / count,
                bytes_in_max: bytes.iter().copied().max().unwrap_or(0),
                object_bytes_mean: obj,
                gossip_bytes_mean: sum(2),
                want_bytes_mean: sum(3),
                gossip_period_mean: 0.0,
                gossip_period_split: [0.0; 3],
                period_ms: 0,
                bundle_bytes: p.bundle_bytes,
                new_bytes: p.new_bytes,
            });
            if seq < total || self.cfg.pause_ms > 2_000 {
                // A pause between releases (and after the last one when
                // gossip is measured over a longer period).
                let t = self.now + self.cfg.pause_ms;
                self.run_until(t, |_| false);
            }
            // Gossip over the release's whole period: its window and the
            // pause after it (records change when agents adopt, and travel
            // at anti-entropy pace).
            let end = self.window();
            if let Some(r) = releases.last_mut() {
                r.gossip_period_mean = honest
                    .iter()
                    .map(|&i| end[i][2] - before[i][2])
                    .sum::<u64>() as f64
                    / count;
                for (k, v) in r.gossip_period_split.iter_mut().enumerate() {
                    *v = honest
                        .iter()
                        .map(|&i| end[i][4 + k] - before[i][4 + k])
                        .sum::<u64>() as f64
                        / count;
                }
                r.period_ms = self.now - t0;
            }
        }
        // Final phase: churn stops, partitions heal, everyone comes back.
        self.churn_active = false;
        let end = self.now + self.cfg.deadline_ms;
        let all_up = |s: &Sim| s.nodes.iter().all(|n| n.up);
        let converged = self.run_until(end, |s| {
            s.partitioned.is_none() && all_up(s) && s.converged(total)
        });
        if !converged {
            let behind: Vec<String> = self
                .honest_live()
                .filter(|n| !Self::holds(n, total))
                .take(10)
                .map(|n| {
                    format!(
                        "{} at {}",
                        n.id,
                        n.adopted.as_ref().map_or(0, |a| a.sequence)
                    )
                })
                .collect();
            self.violations.push(format!(
                "not every live agent holds release {total} by {} ms: {}",
                self.now,
                behind.join(", ")
            ));
        }
        self.audit();
        Report {
            releases,
            converged,
            end_ms: self.now,
            events: self.events,
            messages: self.messages,
            lost: self.lost,
            bytes: self.bytes,
            rejections: std::mem::take(&mut self.rejections),
            crashes: self.crashes,
            violations: std::mem::take(&mut self.violations),
            trace_hash: self.trace.0,
        }
    }

    /// Store audit: every stored object hashes to its address and belongs
    /// to a real release; honest agents hold all objects of what they
    /// adopted.
    fn audit(&mut self) {
        let mut legit: BTreeSet<u32> = BTreeSet::new();
        for p in &self.world.releases {
            for a in std::iter::once(p.bundle.as_str())
                .chain(p.chunks.iter().map(String::as_str))
                .chain(p.manifest.entries.iter().map(|e| e.object.as_str()))
            {
                if let Some(&id) = self.world.index.get(a) {
                    legit.insert(id);
                }
            }
        }
        for (id, (address, bytes)) in self.world.content.iter().enumerate() {
            if verify_object(address, bytes).is_err() {
                self.violations
                    .push(format!("content {id} does not hash to {address}"));
            }
        }
        for n in &self.nodes {
            if let Some(bad) = n.objects.iter().find(|id| !legit.contains(id)) {
                self.violations
                    .push(format!("{} stores object {bad} of no release", n.id));
            }
            if let Some(a) = &n.adopted {
                if n.role == Role::Forger {
                    continue;
                }
                let Some(p) = self.world.releases.get(a.sequence as usize - 1) else {
                    self.violations
                        .push(format!("{} adopted unknown sequence {}", n.id, a.sequence));
                    continue;
                };
                let missing = p
                    .manifest
                    .entries
                    .iter()
                    .filter(|e| {
                        self.world
                            .index
                            .get(e.object.as_str())
                            .is_none_or(|id| !n.objects.contains(id))
                    })
                    .count();
                if missing > 0 {
                    self.violations.push(format!(
                        "{} adopted release {} but lacks {missing} of its objects",
                        n.id, a.sequence
                    ));
                }
            }
        }
    }
}

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Report {
    Sim::new(cfg).run()
}
