//! The mesh sync protocol as a sans-IO state machine (quinn-proto style).
//!
//! One [`Endpoint`] is one node's view of the mesh: its connections, the
//! heads its peers advertise, the fetches in progress, the peer table and
//! the gossiped fleet status. It owns no sockets, reads no clock and draws
//! no thread randomness:
//!
//! * **inputs** are method calls: [`Endpoint::connected`],
//!   [`Endpoint::handle_message`], [`Endpoint::handle_wire_error`],
//!   [`Endpoint::disconnected`], [`Endpoint::dial_failed`],
//!   [`Endpoint::handle_timeout`] (timer ticks), local changes
//!   ([`Endpoint::set_head`], [`Endpoint::set_local_status`]) and the
//!   shell's answers ([`Endpoint::serve`], [`Endpoint::release_verified`],
//!   [`Endpoint::release_rejected`], [`Endpoint::fetch_want`],
//!   [`Endpoint::fetch_complete`]). Every input takes `now`, a [`Millis`]
//!   reading of a monotonic clock (timers, timeouts, bans, backoff); the
//!   inputs that touch gossiped status records ([`Endpoint::handle_message`],
//!   [`Endpoint::handle_timeout`], [`Endpoint::set_local_status`],
//!   [`Endpoint::status`]) also take `wall`, [`UnixMillis`] from the wall
//!   clock, because a record's `time` is compared across machines.
//! * **outputs** are drained with [`Endpoint::poll_action`] (messages to
//!   send, connections to open or close, and [`Event`]s), and
//!   [`Endpoint::poll_timeout`] says when to call
//!   [`Endpoint::handle_timeout`] next.
//!
//! ## What the protocol does
//!
//! Both sides send [`Hello`] (protocol version), then
//! [`Heads`](super::wire::Message::Heads), peers and status. When a peer
//! advertises a newer head for a followed channel, the endpoint fetches the
//! missing roots and the release envelope from that peer and hands them to
//! the shell ([`Event::VerifyRelease`]); the shell verifies them with the
//! agent's one verification pipeline and answers
//! [`Endpoint::release_verified`] or [`Endpoint::release_rejected`]. The
//! shell then names the objects it lacks ([`Endpoint::fetch_want`]); the
//! endpoint requests them in batches of at most
//! [`MeshLimits::max_items_per_want`], with at most
//! [`MeshLimits::max_outstanding_wants`] requests in flight, checks each
//! received object against its address and hands it out
//! ([`Event::Object`]). When nothing is left in flight it says so
//! ([`Event::FetchIdle`]); the shell wants more (the bundle's entries after
//! the manifest) or completes the fetch and, once adopted, calls
//! [`Endpoint::set_head`], which pushes the new head to a few random peers.
//! Anti-entropy sends heads, status and peers to one random peer per
//! period.
//!
//! **Architecture invariant:** the endpoint never decides that a release is
//! valid; only the shell's verification does. Heads are advertised only
//! when the shell sets them, so nothing unverified is offered onward.
//!
//! A peer that breaks a rule (garbage, oversized frames, wrong-hash or
//! unsolicited objects, rejected releases, too many requests, timeouts,
//! forged status records) is disconnected, reported as [`Event::Rejected`]
//! and banned with an exponential backoff.
//!
//! ## Status gossip and peer exchange
//!
//! Every status record is signed by the agent it describes
//! ([`SignedStatus`]); the endpoint is given a [`RecordKeys`] (the agent:
//! X.509 against the fleet CA, `tls::X509RecordKeys` with feature `tls`) and keeps a
//! record only if the certificate it carries verifies, names the record's
//! agent id and signed it. One record per agent id (so a flood cannot
//! evict real records: only that agent's own newer record replaces its
//! record), dropped `status_ttl_ms` after it was signed by the receiver's
//! clock, refused when dated more than `max_clock_skew_ms` ahead.
//!
//! Addresses to dial come only from the configuration (seeds), from the
//! `Hello` of an authenticated agent (its own listen address) and from the
//! `listen` field of verified records: nobody can make us dial an address
//! on another agent's behalf, and one certificate names one address.
//! Addresses that are not unicast (unspecified, multicast, broadcast, port
//! 0) are never dialed.

use super::wire::{
    BadWant, BlobRange, EntryFound, EntryRanges, Found, Head, Hello, Item, Message, PeerInfo,
    SharedStatus, SignedStatus, StatusRecord, BLOB_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use super::MeshLimits;
use crate::identity::PeerIdentity;
use cairn_core::rollout::{status_sample_rank, FleetReports, FullSample, SampleCounts};
use cairn_core::AgentId;
use cairn_core::{Address, BundleId, ChannelName};
use cairn_keys::text::escape_untrusted;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

/// Why a signed status record was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordRejection {
    /// The certificate does not chain to the fleet CA, is not an agent
    /// certificate, or the signature is wrong: nobody honest relays such
    /// a record, so the peer that sent it is cut off.
    Forged(String),
    /// The certificate is not valid at our `now` (expired, not yet
    /// valid): clocks differ; the record is dropped without blame.
    Stale(String),
}

/// The keys behind status gossip: sign our own records, verify others'.
/// The agent uses X.509 against the fleet CA
/// (`tls::X509RecordKeys` with feature `tls`); the fleet simulator supplies its
/// own cheap scheme. There is no default: an [`Endpoint`] cannot be built
/// without one.
pub trait RecordKeys: std::fmt::Debug + Send {
    /// Signs `message` (an already domain-separated record) with our
    /// key: returns the certificate to carry and the signature.
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String>;

    /// Verifies that `signature` over `message` was made by the holder of
    /// `cert`, an agent certificate of this fleet valid at `now_ms` (Unix
    /// milliseconds for X.509 keys), and returns the agent id it names.
    fn verify(
        &self,
        cert: &[u8],
        message: &[u8],
        signature: &[u8],
        now_ms: u64,
    ) -> Result<AgentId, RecordRejection>;
}

/// A reading of a monotonic clock, in milliseconds since an epoch the
/// shell picks (its start, say): what every timer of the endpoint runs on.
/// Never compared with another machine's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// The milliseconds.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// `self + ms`, saturating.
    pub fn saturating_add(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn saturating_since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Wall-clock time, Unix milliseconds: the `time` of gossiped status
/// records and the validity of their certificates. Only gossip uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

/// Why a connection failed on the wire, as the shell reports it
/// ([`Endpoint::handle_wire_error`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WireFailure {
    /// The peer closed the connection.
    Closed,
    /// A socket error.
    Io,
    /// No frame within the read deadline.
    Idle,
    /// A read or write timed out.
    Timeout,
    /// A frame over the size limit.
    OversizedFrame,
    /// Bytes that are not a frame.
    Garbage,
    /// A frame that is not a valid message.
    InvalidMessage,
    /// Our send queue to the peer is full.
    SlowPeer,
}

impl WireFailure {
    /// The failure behind a [`super::wire::WireError`].
    pub fn of(e: &super::wire::WireError) -> Self {
        use super::wire::WireError;
        match e {
            WireError::Oversized { .. } => WireFailure::OversizedFrame,
            WireError::Garbage(_) => WireFailure::Garbage,
            WireError::Invalid(_) => WireFailure::InvalidMessage,
            WireError::Closed => WireFailure::Closed,
            WireError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                WireFailure::Timeout
            }
            WireError::Io(_) => WireFailure::Io,
        }
    }

    /// A short, stable label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            WireFailure::Closed => "closed",
            WireFailure::Io => "io",
            WireFailure::Idle => "idle",
            WireFailure::Timeout => "timeout",
            WireFailure::OversizedFrame => "oversized_frame",
            WireFailure::Garbage => "garbage",
            WireFailure::InvalidMessage => "invalid_message",
            WireFailure::SlowPeer => "slow_peer",
        }
    }

    /// Whether it is no fault of the peer (the connection just ended).
    fn benign(self) -> bool {
        matches!(
            self,
            WireFailure::Closed | WireFailure::Io | WireFailure::Idle
        )
    }
}

/// The verifier's answer on a release a peer served
/// ([`Endpoint::release_rejected`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerifyFailure {
    /// Not newer than what we hold (may be a race, not the peer's fault).
    Rollback,
    /// A root in the chain it served failed verification.
    RootRotation,
    /// Anything else; the verifier's stable reason
    /// (`signature_threshold`, `expired`, ...).
    Invalid(&'static str),
}

impl VerifyFailure {
    /// The mesh's view of a pipeline rejection: a rollback may be a race
    /// (the release was adopted elsewhere meanwhile), a bad root always
    /// blames the peer. The agent and the simulator both map through here.
    pub fn of(rej: &cairn_core::pipeline::Rejection) -> Self {
        match (&rej.stage, &rej.error) {
            (cairn_core::pipeline::Stage::Root, _) => VerifyFailure::RootRotation,
            (_, cairn_core::Error::Rollback { .. }) => VerifyFailure::Rollback,
            _ => VerifyFailure::Invalid(rej.reason()),
        }
    }

    /// A short, stable label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            VerifyFailure::Rollback => "rollback",
            VerifyFailure::RootRotation => "root_rotation",
            VerifyFailure::Invalid(r) => r,
        }
    }
}

/// Why a peer was cut off ([`Event::Rejected`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Offense {
    /// A message before its hello.
    NoHello,
    /// A protocol version we do not speak.
    ProtocolVersion,
    /// A protocol violation (a second hello, a reused request id).
    Protocol,
    /// An operator connection sent something operators may not.
    OperatorForbidden,
    /// Too many requests in flight.
    TooManyRequests,
    /// Data nobody asked for.
    Unsolicited,
    /// An object whose bytes do not hash to its address.
    ObjectHashMismatch,
    /// An image blob whose pieces do not make its digest and size, or a
    /// piece longer than asked for (protocol version 4).
    BlobMismatch,
    /// A status record not signed by the agent it describes.
    ForgedStatus,
    /// No hello in time.
    HelloTimeout,
    /// A request unanswered in time.
    Timeout,
    /// The wire failed.
    Wire(WireFailure),
    /// A release it served was rejected.
    Release(VerifyFailure),
    /// A want we refuse to serve (too large, malformed ranges, indices
    /// past the bundle's entries).
    BadWant(BadWant),
}

impl Offense {
    /// A short, stable label (the metric label, logs).
    pub fn label(self) -> &'static str {
        match self {
            Offense::NoHello => "no_hello",
            Offense::ProtocolVersion => "protocol_version",
            Offense::Protocol => "protocol",
            Offense::OperatorForbidden => "operator_forbidden",
            Offense::TooManyRequests => "too_many_requests",
            Offense::Unsolicited => "unsolicited",
            Offense::ObjectHashMismatch => "object_hash_mismatch",
            Offense::BlobMismatch => "blob_mismatch",
            Offense::ForgedStatus => "forged_status",
            Offense::HelloTimeout => "hello_timeout",
            Offense::Timeout => "timeout",
            Offense::Wire(w) => w.label(),
            Offense::Release(v) => v.label(),
            Offense::BadWant(b) => b.label(),
        }
    }
}

impl std::fmt::Display for Offense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Why gossiped status records were dropped ([`Event::StatusDropped`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatusDrop {
    /// Not signed by the agent it describes.
    Forged,
    /// Older than the TTL.
    Expired,
    /// Dated ahead beyond the allowed clock skew.
    Future,
    /// Its certificate is not valid now.
    StaleCert,
    /// No free slot for a new agent.
    TableFull,
}

impl StatusDrop {
    /// A short, stable label (the metric label).
    pub fn label(self) -> &'static str {
        match self {
            StatusDrop::Forged => "forged",
            StatusDrop::Expired => "expired",
            StatusDrop::Future => "future",
            StatusDrop::StaleCert => "stale_cert",
            StatusDrop::TableFull => "table_full",
        }
    }
}

/// Whether a record reports its adopted release failed (and was rolled
/// back): a failure report, which the breaker counts and every endpoint
/// keeps whatever its rank.
fn is_failure(r: &StatusRecord) -> bool {
    r.health == "failed"
}

/// A connection, numbered by the endpoint.
pub type ConnId = u64;
/// A fetch (one release and its objects from one peer).
pub type FetchId = u64;

/// The default [`SyncConfig::status_sample`]: 48 sampled records, an
/// adopter estimate within about ±14 % (1/√48) once the fleet outgrows
/// it, and about 48 record versions per agent per release in gossip
/// (docs/MESH.md, "Status sample"; docs/PERFORMANCE.md).
pub const DEFAULT_STATUS_SAMPLE: usize = 48;

/// Timers and behaviour of an [`Endpoint`]. All durations in milliseconds.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// This node's agent id (as in its certificate).
    pub agent_id: AgentId,
    /// Channels this node fetches.
    pub channels: Vec<String>,
    /// The address advertised in `Hello` (`host:port`), if listening.
    pub listen: Option<String>,
    /// Seed peers (`host:port`), always kept in the peer table.
    pub seeds: Vec<String>,
    /// Seed of the endpoint's random choices (peer picks).
    pub rng_seed: u64,
    /// Limits.
    pub limits: MeshLimits,
    /// Peers a new head is pushed to (default 3).
    pub push_fanout: usize,
    /// Period of anti-entropy with one random peer (default 5 s).
    pub anti_entropy_ms: u64,
    /// A connection we sent nothing on for this long gets our heads
    /// (default 10 s); shells should time reads out after 3x this.
    pub keepalive_ms: u64,
    /// How often to consider dialing more peers (default 1 s).
    pub dial_interval_ms: u64,
    /// An unanswered `Want` older than this cuts the peer off (default 15 s).
    pub request_timeout_ms: u64,
    /// A connection without `Hello` after this is closed (default 10 s).
    pub hello_timeout_ms: u64,
    /// First ban after an offense (default 30 s), doubling per offense.
    pub ban_base_ms: u64,
    /// Longest ban (default 1 h).
    pub ban_max_ms: u64,
    /// First retry delay after a failed dial (default 500 ms), doubling.
    pub dial_backoff_base_ms: u64,
    /// Longest dial retry delay (default 10 s).
    pub dial_backoff_max_ms: u64,
    /// Status records dated further than this in the future are ignored
    /// (default 5 min).
    pub max_clock_skew_ms: u64,
    /// A status record older than this (by our clock, from the time its
    /// author signed it) is dropped (default 10 min).
    pub status_ttl_ms: u64,
    /// Our own record is signed again after this long even if nothing
    /// changed, so it never expires while we run (default 4 min, well
    /// inside the 10-minute TTL: a record is signed again when it changes
    /// and rarely otherwise, because every new version travels).
    pub status_refresh_ms: u64,
    /// How many healthy records of other agents the endpoint keeps: the
    /// fleet-wide bottom-k sample by [`status_sample_rank`] (default
    /// [`DEFAULT_STATUS_SAMPLE`], 48;
    /// docs/MESH.md, "Status sample"). Failure reports are kept whatever
    /// their rank (up to [`MeshLimits::max_status_records`]), so the
    /// breaker's failure count is exact; its adopter count is estimated
    /// from the sample once the fleet outgrows it ([`Endpoint::fleet_reports`]).
    pub status_sample: usize,
    /// The newest protocol version we speak (default
    /// [`PROTOCOL_VERSION`]; 2 makes the endpoint behave as a version 2
    /// agent: tests and simulations of mixed fleets).
    pub protocol_version: u32,
}

impl SyncConfig {
    /// A configuration with default timers and limits.
    pub fn new(agent_id: AgentId, channels: Vec<String>) -> Self {
        Self {
            agent_id,
            channels,
            listen: None,
            seeds: Vec::new(),
            rng_seed: 0,
            limits: MeshLimits::default(),
            push_fanout: 3,
            anti_entropy_ms: 5_000,
            keepalive_ms: 10_000,
            dial_interval_ms: 1_000,
            request_timeout_ms: 15_000,
            hello_timeout_ms: 10_000,
            ban_base_ms: 30_000,
            ban_max_ms: 3_600_000,
            dial_backoff_base_ms: 500,
            dial_backoff_max_ms: 10_000,
            max_clock_skew_ms: 300_000,
            status_ttl_ms: 600_000,
            status_refresh_ms: 240_000,
            status_sample: DEFAULT_STATUS_SAMPLE,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a message on a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// Close a connection (the endpoint has already forgotten it).
    Close {
        /// The connection.
        conn: ConnId,
        /// Why, for logs.
        reason: String,
    },
    /// Open a connection to `addr`; report [`Endpoint::connected`] or
    /// [`Endpoint::dial_failed`].
    Dial {
        /// `host:port`.
        addr: String,
    },
    /// Something happened.
    Event(Event),
}

/// Events for the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A connection finished its hello.
    PeerUp {
        /// The connection.
        conn: ConnId,
        /// Who.
        peer: PeerIdentity,
    },
    /// A connection is gone.
    PeerDown {
        /// The connection.
        conn: ConnId,
        /// Who.
        peer: PeerIdentity,
    },
    /// A peer broke a rule and was cut off (count it, log it).
    Rejected {
        /// Who.
        peer: PeerIdentity,
        /// Why.
        reason: Offense,
        /// Details for the log.
        detail: String,
        /// Until when it is banned.
        banned_until: u64,
    },
    /// A peer wants items: answer with [`Endpoint::serve`].
    Serve {
        /// The connection.
        conn: ConnId,
        /// Request id.
        id: u64,
        /// What it wants.
        items: Vec<Item>,
    },
    /// A release (and the roots it may need) fetched from a peer: verify
    /// it, then call [`Endpoint::release_verified`] or
    /// [`Endpoint::release_rejected`].
    VerifyRelease {
        /// The fetch.
        fetch: FetchId,
        /// The peer's agent id.
        peer: AgentId,
        /// The channel.
        channel: String,
        /// The head the peer advertised.
        head: Head,
        /// The release envelope bytes.
        release: Vec<u8>,
        /// Root envelopes above ours, by version.
        roots: Vec<(u64, Vec<u8>)>,
    },
    /// An object whose bytes hash to its address (store it).
    Object {
        /// The fetch.
        fetch: FetchId,
        /// The address.
        address: Address,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Everything wanted so far has arrived: want more
    /// ([`Endpoint::fetch_want`]) or finish ([`Endpoint::fetch_complete`]).
    FetchIdle {
        /// The fetch.
        fetch: FetchId,
    },
    /// A fetch ended without completing (peer gone, rejected, timed out).
    FetchFailed {
        /// The fetch.
        fetch: FetchId,
        /// Why.
        reason: String,
    },
    /// The answer to [`Endpoint::want_blob`]: at most the asked length of
    /// the blob from the asked offset (checked here), or `None` when the
    /// peer does not serve that blob. The shell writes and hashes it; a
    /// blob that turns out wrong is reported with
    /// [`Endpoint::blob_refused`].
    BlobPiece {
        /// The connection.
        conn: ConnId,
        /// The request id [`Endpoint::want_blob`] returned.
        id: u64,
        /// The range asked for.
        range: BlobRange,
        /// The bytes, if the peer serves the blob.
        bytes: Option<Vec<u8>>,
    },
    /// Status records changed (new or newer records arrived, or records
    /// expired).
    StatusChanged,
    /// Status records from a peer were dropped (for metrics; forged ones
    /// also cut the peer off with [`Event::Rejected`]).
    StatusDropped {
        /// Who sent them.
        peer: PeerIdentity,
        /// Why.
        reason: StatusDrop,
        /// How many.
        count: u64,
    },
}

/// One row of the peer table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// `host:port`.
    pub addr: String,
    /// Agent id last seen at that address.
    pub agent_id: Option<AgentId>,
    /// A configured seed (never evicted).
    pub seed: bool,
    /// Consecutive failed dials.
    pub failures: u32,
    /// Not dialed before this time.
    pub next_attempt: u64,
    /// Last successful connection (0: never).
    pub last_connected: u64,
    /// The address turned out to be this node itself.
    pub is_self: bool,
}

#[derive(Debug)]
struct Conn {
    peer: PeerIdentity,
    outbound: bool,
    dialed: Option<String>,
    remote_ip: Option<String>,
    opened: u64,
    hello: bool,
    /// The protocol version agreed in the hellos (0 before).
    version: u32,
    last_sent: u64,
    heads: Vec<Head>,
    /// Peer's requests we are serving: id -> object bytes sent so far.
    serving: BTreeMap<u64, usize>,
    /// Our requests by id.
    outstanding: BTreeMap<u64, Request>,
    /// No new fetch from this connection before this time.
    fetch_backoff_until: u64,
    /// The newest record time per agent id the peer is known to hold: we
    /// sent or announced it, or the peer sent or announced it. Gossip
    /// sends only what is newer, so an unchanged fleet costs nothing to
    /// exchange and a record crosses a connection at most once.
    status_known: KnownRecords,
}

/// What the peer on one connection is known to hold: the newest record
/// time per agent, keyed by the agent's [`status_sample_rank`] (8 bytes
/// instead of an id string: there is one map per connection; two ids with
/// one rank, which the fleet CA would have to issue about 2³² ids to
/// produce, only spare one record one crossing of one connection), as a
/// vector sorted by rank (16 bytes an entry, no tree nodes; a few hundred
/// entries). Cleared when it outgrows twice the record limit, which costs
/// one resend.
#[derive(Debug, Default)]
struct KnownRecords(Vec<(u64, u64)>);

impl KnownRecords {
    /// Whether the peer holds the record of `rank` dated `time` or newer.
    fn holds(&self, rank: u64, time: u64) -> bool {
        self.0
            .binary_search_by_key(&rank, |e| e.0)
            .is_ok_and(|i| self.0[i].1 >= time)
    }

    /// The peer holds the records of these `(rank, time)` pairs (one
    /// message's worth, at most the record limit). Merged in one sort,
    /// O((n + m) log(n + m)), not an insertion each: a peer's digest of
    /// thousands of ids costs no more than before.
    fn note_all(&mut self, batch: Vec<(u64, u64)>, max_records: usize) {
        if batch.is_empty() {
            return;
        }
        if self.0.len() + batch.len() > 2 * max_records {
            self.0 = Vec::new();
        }
        self.0.extend(batch);
        // Newest first within a rank, so deduplicating keeps the newest.
        self.0
            .sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        self.0.dedup_by_key(|e| e.0);
    }
}

/// One of our wants in flight.
#[derive(Debug)]
struct Request {
    /// The fetch it belongs to (fetch ids start at 1; 0: a blob range).
    fetch: FetchId,
    /// A blob range ([`Endpoint::want_blob`]), answered as
    /// [`Event::BlobPiece`].
    blob: Option<BlobRange>,
    /// Items asked for by name, not yet answered.
    items: BTreeSet<Item>,
    /// Entries asked for by index (protocol version 3), not yet answered:
    /// index -> address.
    entries: BTreeMap<u32, Address>,
    /// The compact item sent, if any: answered itself, without bytes, by
    /// a peer that does not hold the bundle.
    compact: Option<Item>,
    /// Sent, or last answered in part, at.
    sent: u64,
    /// Some answer arrived.
    got_any: bool,
}

impl Request {
    fn names(&self) -> impl Iterator<Item = Item> + '_ {
        self.items
            .iter()
            .cloned()
            .chain(self.entries.values().map(|a| Item::Object(a.clone())))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// Fetching roots and the release.
    Release,
    /// Waiting for the shell's verdict.
    Verdict,
    /// Fetching objects the shell wants.
    Objects,
}

#[derive(Debug)]
struct Fetch {
    conn: ConnId,
    peer: AgentId,
    head: Head,
    stage: Stage,
    queue: VecDeque<Item>,
    /// Objects wanted by their index in the bundle's entries, in index
    /// order: sent as [`Item::Entries`] to version 3 peers, as
    /// [`Item::Object`] items to version 2 peers.
    entries: VecDeque<(u32, Address)>,
    /// The advertised head's bundle id (checked when its `Heads` arrived).
    bundle: BundleId,
    roots: BTreeMap<u64, Vec<u8>>,
    release: Option<Vec<u8>>,
    idle_reported: bool,
    /// A refused release is not the peer's fault: the fetch started
    /// although the peer's sequence is not above ours (our floor no longer
    /// binds, or the peer holds a newer root), or the peer holds an older
    /// root than ours (its head may be signed by release keys our newer
    /// root replaced). A bad root still is its fault.
    excused: bool,
}

#[derive(Debug, Clone)]
struct Ban {
    until: u64,
    strikes: u32,
}

/// SplitMix64: small, seeded, deterministic.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A 32-bit FNV-1a hash of an agent id, for [`Endpoint`]'s `peer_ids`
/// filter (a collision only costs a scan of the peer table).
fn peer_id_hash(id: &AgentId) -> u32 {
    id.as_str().bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Whether a peer table entry counts in `Endpoint::failed_unconnected`:
/// not a seed, never connected, and a dial to it failed.
fn failed_unconnected(e: &PeerEntry) -> bool {
    !e.seed && e.last_connected == 0 && e.failures > 0
}

/// Replaces `old`'s hash by `new`'s in the sorted multiset `ids`.
fn index_peer_id(ids: &mut Vec<u32>, old: Option<&AgentId>, new: Option<&AgentId>) {
    if let Some(old) = old {
        if let Ok(k) = ids.binary_search(&peer_id_hash(old)) {
            ids.remove(k);
        }
    }
    if let Some(new) = new {
        let h = peer_id_hash(new);
        let k = ids.partition_point(|x| *x < h);
        ids.insert(k, h);
    }
}

/// Most root versions fetched ahead in one fetch.
const MAX_ROOT_STEPS: u64 = 16;

/// A verified status record (or our own) and its signed form as gossiped.
#[derive(Debug, Clone)]
struct HeldStatus {
    /// The record, shared with the [`SharedStatus`] it came in (every
    /// endpoint and message holding it points at one copy).
    record: Arc<StatusRecord>,
    /// [`status_sample_rank`] of the record's agent id.
    rank: u64,
    /// `None` only for our own record when signing failed: it is then
    /// shown locally but not gossiped.
    signed: Option<SharedStatus>,
}

/// One node's mesh state machine. See the module documentation.
#[derive(Debug)]
pub struct Endpoint {
    config: SyncConfig,
    rng: Rng,
    actions: VecDeque<Action>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_request: u64,
    fetches: BTreeMap<FetchId, Fetch>,
    next_fetch: FetchId,
    heads: BTreeMap<String, Head>,
    root_version: u64,
    /// Channels whose adopted head no longer sets a rollback floor (a root
    /// rotation replaced the release keys that signed it).
    unbound_floors: BTreeSet<String>,
    keys: Box<dyn RecordKeys>,
    /// Records are shared ([`SharedStatus`]): a slot is three words.
    status: BTreeMap<AgentId, HeldStatus>,
    /// The sampled records of `status` (rank, agent id): not ours and not
    /// failure reports; at most `config.status_sample` after every merge.
    sample: BTreeSet<(u64, AgentId)>,
    peers: BTreeMap<String, PeerEntry>,
    /// [`peer_id_hash`] of the agent id of every entry of `peers` that has
    /// one, sorted (a multiset): learning an agent's signed address looks
    /// here before it scans the table for that agent's older addresses,
    /// which a new agent (most of them) has none of. 4 bytes an entry.
    peer_ids: Vec<u32>,
    /// Entries of `peers` that are not seeds, never connected and failed
    /// a dial ([`failed_unconnected`]): while there are none, the entry a
    /// full table evicts is the last never-connected one, found from the
    /// end instead of by a scan.
    failed_unconnected: usize,
    /// Records pulled from a peer and not yet received: agent id ->
    /// (record time, pulled at), so one record is pulled once.
    pulling: BTreeMap<AgentId, (u64, u64)>,
    pending_dials: BTreeSet<String>,
    bans: BTreeMap<String, Ban>,
    next_anti_entropy: u64,
    next_dial: u64,
    started: bool,
}

impl Endpoint {
    /// A new endpoint. `root_version` is the newest trust root held;
    /// `keys` sign our status records and verify everyone else's.
    pub fn new(config: SyncConfig, root_version: u64, keys: Box<dyn RecordKeys>) -> Self {
        let mut ep = Self {
            rng: Rng(config.rng_seed ^ 0x6361_6972_6e21),
            actions: VecDeque::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            next_request: 1,
            fetches: BTreeMap::new(),
            next_fetch: 1,
            heads: BTreeMap::new(),
            root_version: root_version.max(1),
            unbound_floors: BTreeSet::new(),
            keys,
            status: BTreeMap::new(),
            sample: BTreeSet::new(),
            peers: BTreeMap::new(),
            peer_ids: Vec::new(),
            failed_unconnected: 0,
            pulling: BTreeMap::new(),
            pending_dials: BTreeSet::new(),
            bans: BTreeMap::new(),
            next_anti_entropy: 0,
            next_dial: 0,
            started: false,
            config,
        };
        for s in ep.config.seeds.clone() {
            ep.add_peer(&s, None, true);
        }
        ep
    }

    /// The configuration.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    // ----- outputs -------------------------------------------------------

    /// The next thing the shell must do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front();
        if action.is_none() && self.actions.capacity() > 64 {
            // A burst (a frame of many objects) grew the queue: do not
            // keep its room for the endpoint's lifetime.
            self.actions.shrink_to(16);
        }
        action
    }

    /// When [`Endpoint::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.next_timeout().map(Millis)
    }

    fn next_timeout(&self) -> Option<u64> {
        if !self.started {
            return Some(0);
        }
        let mut t = self.next_anti_entropy.min(self.next_dial);
        for c in self.conns.values() {
            if !c.hello {
                t = t.min(c.opened + self.config.hello_timeout_ms);
            }
            t = t.min(c.last_sent + self.config.keepalive_ms);
            for r in c.outstanding.values() {
                t = t.min(r.sent + self.config.request_timeout_ms);
            }
        }
        Some(t)
    }

    // ----- read-only views -----------------------------------------------

    /// Our heads, by channel.
    pub fn heads(&self) -> &BTreeMap<String, Head> {
        &self.heads
    }

    /// The gossiped fleet status at `wall`, by agent id (ours included):
    /// only verified records younger than the TTL.
    pub fn status(&self, wall: UnixMillis) -> impl Iterator<Item = &StatusRecord> + '_ {
        self.status
            .values()
            .map(|h| &*h.record)
            .filter(move |r| !self.expired(r, wall.0))
    }

    /// The rollout breaker's inputs from the gossiped view, per bundle
    /// adopted on `channel`: failure reports counted exactly, adopters
    /// exactly while the sample holds every healthy record we know of and
    /// estimated from the sample once it is full
    /// ([`SampleCounts::reports`]). The agent and the simulator both
    /// decide on these.
    pub fn fleet_reports(&self, channel: &str, wall: UnixMillis) -> BTreeMap<String, FleetReports> {
        let full = self.sample_bound().map(|max_rank| FullSample {
            k: u32::try_from(self.sample.len()).unwrap_or(u32::MAX),
            max_rank,
        });
        let mut counts: BTreeMap<String, SampleCounts> = BTreeMap::new();
        for h in self.status.values() {
            let r = &h.record;
            if r.channel != channel || r.bundle.is_empty() || self.expired(r, wall.0) {
                continue;
            }
            let c = counts.entry(r.bundle.clone()).or_default();
            c.adopted_held += 1;
            if is_failure(r) {
                c.failed_held += 1;
            }
            // Our own record and failure reports count in the sample when
            // their rank is within it, as they would if they were healthy
            // records of others: the sample stays uniform.
            if full.is_none_or(|f| h.rank <= f.max_rank) {
                c.adopted_in_sample += 1;
            }
        }
        counts
            .into_iter()
            .map(|(bundle, c)| (bundle, c.reports(full)))
            .collect()
    }

    /// The largest rank in the sample when it is full (`None` while it
    /// has room).
    fn sample_bound(&self) -> Option<u64> {
        if self.sample.len() < self.config.status_sample {
            return None;
        }
        self.sample.last().map(|(rank, _)| *rank)
    }

    /// Whether a record with `rank` (not ours, not a failure report) has
    /// a place in the sample.
    fn sample_admits(&self, rank: u64) -> bool {
        self.sample_bound().is_none_or(|b| rank < b)
    }

    /// Whether a held record is offered to peers in gossip. Every record
    /// we hold is a failure report or in the sample, except our own: that
    /// one is offered only while a peer could keep it (a failure report,
    /// or a rank within our sample: not full yet, or below its largest
    /// rank). Outside a full sample, every peer whose sample has
    /// converged (the same bottom-k fleet-wide) would pull it only to
    /// drop it unread. It is still served when asked for (a pull, an
    /// operator's `StatusRequest`).
    fn offered(&self, h: &HeldStatus) -> bool {
        h.record.agent_id != self.config.agent_id
            || is_failure(&h.record)
            || self.sample_admits(h.rank)
    }

    /// Holds `held` (replacing that agent's record), keeping `sample` in
    /// step, then trims the sample to its size: the largest ranks leave.
    fn hold(&mut self, held: HeldStatus) {
        let id = held.record.agent_id.clone();
        let sampled = id != self.config.agent_id && !is_failure(&held.record);
        let rank = held.rank;
        self.unhold(&id);
        if sampled {
            self.sample.insert((rank, id.clone()));
        }
        self.status.insert(id, held);
        while self.sample.len() > self.config.status_sample {
            let Some((_, out)) = self.sample.pop_last() else {
                break;
            };
            self.status.remove(&out);
        }
    }

    /// Forgets an agent's record.
    fn unhold(&mut self, id: &AgentId) {
        if let Some(old) = self.status.remove(id) {
            self.sample.remove(&(old.rank, id.clone()));
        }
    }

    fn expired(&self, r: &StatusRecord, wall: u64) -> bool {
        r.agent_id != self.config.agent_id
            && r.time.saturating_add(self.config.status_ttl_ms) <= wall
    }

    /// The peer table, by address.
    pub fn peer_table(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    /// Connected peers whose hello is done.
    pub fn connected_peers(&self) -> Vec<(ConnId, PeerIdentity)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.hello)
            .map(|(id, c)| (*id, c.peer.clone()))
            .collect()
    }

    /// Number of fetches in progress.
    pub fn active_fetches(&self) -> usize {
        self.fetches.len()
    }

    /// Whether an agent id is banned at `now`.
    pub fn is_banned(&self, agent_id: &str, now: Millis) -> bool {
        self.banned_at(agent_id, now.0)
    }

    fn banned_at(&self, agent_id: &str, now: u64) -> bool {
        self.bans.get(agent_id).is_some_and(|b| b.until > now)
    }

    // ----- local inputs --------------------------------------------------

    /// Sets (after verification) our head for a channel and pushes it to
    /// up to `push_fanout` random peers if it is new.
    pub fn set_head(&mut self, head: Head, now: Millis) {
        let now = now.0;
        self.root_version = self.root_version.max(head.root_version);
        if self.heads.get(&head.channel) == Some(&head) {
            return;
        }
        self.heads.insert(head.channel.clone(), head);
        let mut targets = self.agent_conns();
        self.rng.shuffle(&mut targets);
        targets.truncate(self.config.push_fanout);
        let msg = self.heads_message();
        for conn in targets {
            self.send(conn, msg.clone(), now);
        }
    }

    /// Removes our head for a channel (e.g. it expired); it is no longer
    /// advertised.
    pub fn clear_head(&mut self, channel: &str) {
        self.heads.remove(channel);
    }

    /// Sets the newest trust root version we hold.
    pub fn set_root_version(&mut self, version: u64) {
        self.root_version = self.root_version.max(version);
    }

    /// Says whether our head on `channel` still sets a rollback floor. A
    /// root rotation that replaced the release keys unbinds it
    /// (`cairn_bundle::verify::binding_floor`): then a peer's head with a
    /// *lower* sequence may be the recovery release of the new epoch, and
    /// is fetched (the verifier decides).
    pub fn set_floor_unbound(&mut self, channel: &str, unbound: bool) {
        if unbound {
            self.unbound_floors.insert(channel.to_owned());
        } else {
            self.unbound_floors.remove(channel);
        }
    }

    /// Sets our own status record: its agent id and listen address are
    /// ours, its `time` is `wall`. It is signed again only when it changed
    /// or is older than `status_refresh_ms`, so peers do not verify an
    /// unchanged record over and over.
    pub fn set_local_status(&mut self, record: StatusRecord, wall: UnixMillis) {
        self.set_own_status(record, wall.0);
    }

    fn set_own_status(&mut self, mut record: StatusRecord, now: u64) {
        record.agent_id = self.config.agent_id.clone();
        record.listen = self
            .config
            .listen
            .clone()
            .filter(|l| !is_unspecified_host(l));
        if let Some(held) = self.status.get(&record.agent_id) {
            let mut same = (*held.record).clone();
            same.time = record.time;
            if same == record
                && held.signed.is_some()
                && now
                    < held
                        .record
                        .time
                        .saturating_add(self.config.status_refresh_ms)
            {
                return;
            }
        }
        record.time = now;
        let bytes = cairn_keys::codec::encode(&record);
        let signed = self
            .keys
            .sign(&SignedStatus::signed_message(&bytes))
            .ok()
            .map(|(cert, sig)| SignedStatus {
                record: bytes,
                cert,
                sig,
            });
        let rank = status_sample_rank(&record.agent_id);
        let record = Arc::new(record);
        let signed = signed.map(|s| SharedStatus::with_record(s, record.clone()));
        self.hold(HeldStatus {
            record,
            rank,
            signed,
        });
    }

    /// Adds peers (e.g. the persisted peer table at start-up).
    pub fn learn_peers(&mut self, peers: impl IntoIterator<Item = PeerInfo>) {
        for p in peers {
            if is_dialable(&p.addr) {
                self.add_peer(&p.addr, p.agent_id, false);
            }
        }
    }

    // ----- connection inputs ---------------------------------------------

    /// A TLS connection is up; `identity` comes from the peer's verified
    /// certificate. `dialed` is the address we dialed (outbound) and
    /// `remote_ip` the peer's IP as seen by us. Returns the connection id
    /// (the endpoint may close it at once, e.g. a banned or duplicate peer).
    pub fn connected(
        &mut self,
        identity: PeerIdentity,
        dialed: Option<String>,
        remote_ip: Option<String>,
        now: Millis,
    ) -> ConnId {
        let now = now.0;
        let conn = self.next_conn;
        self.next_conn += 1;
        if let Some(addr) = &dialed {
            self.pending_dials.remove(addr);
        }
        let outbound = dialed.is_some();
        self.conns.insert(
            conn,
            Conn {
                peer: identity.clone(),
                outbound,
                dialed: dialed.clone(),
                remote_ip,
                opened: now,
                hello: false,
                version: 0,
                last_sent: now,
                heads: Vec::new(),
                serving: BTreeMap::new(),
                outstanding: BTreeMap::new(),
                fetch_backoff_until: 0,
                status_known: KnownRecords::default(),
            },
        );
        if let PeerIdentity::Agent(id) = &identity {
            if let Some(addr) = &dialed {
                if let Some(e) = self.peers.get_mut(addr) {
                    let old = e.agent_id.replace(id.clone());
                    index_peer_id(&mut self.peer_ids, old.as_ref(), Some(id));
                    self.failed_unconnected -= usize::from(failed_unconnected(e));
                    e.failures = 0;
                    e.last_connected = now;
                    self.failed_unconnected += usize::from(failed_unconnected(e));
                    e.is_self = *id == self.config.agent_id;
                }
            }
            if *id == self.config.agent_id {
                self.close(conn, "connected to self".into(), now);
                return conn;
            }
            if self.banned_at(id, now) {
                self.close(conn, format!("agent {id} is banned"), now);
                return conn;
            }
            if self.conns.len() > self.config.limits.max_connections {
                self.close(conn, "too many connections".into(), now);
                return conn;
            }
        }
        let hello = Message::Hello(Hello::speaking(
            MIN_PROTOCOL_VERSION,
            self.config.protocol_version,
            self.config.listen.clone(),
        ));
        self.send(conn, hello, now);
        conn
    }

    /// A dial failed.
    pub fn dial_failed(&mut self, addr: &str, now: Millis) {
        let now = now.0;
        self.pending_dials.remove(addr);
        let (base, max) = (
            self.config.dial_backoff_base_ms,
            self.config.dial_backoff_max_ms,
        );
        if let Some(e) = self.peers.get_mut(addr) {
            self.failed_unconnected -= usize::from(failed_unconnected(e));
            e.failures = e.failures.saturating_add(1);
            self.failed_unconnected += usize::from(failed_unconnected(e));
            let shift = e.failures.saturating_sub(1).min(20);
            e.next_attempt = now + base.saturating_mul(1 << shift).min(max);
        }
    }

    /// The connection closed (by the peer or by IO). Unknown ids are
    /// ignored.
    pub fn disconnected(&mut self, conn: ConnId, now: Millis) {
        let now = now.0;
        self.forget(conn, "connection closed", now);
    }

    /// The shell could not read a valid frame from `conn` (garbage,
    /// oversized frame, a frame body that stalls): the peer is cut off.
    /// `reason` is a stable label ([`super::wire::WireError::reason`]);
    /// `closed`, `io` and `idle` (no frame at all within the idle
    /// deadline) only disconnect, without a ban.
    pub fn handle_wire_error(
        &mut self,
        conn: ConnId,
        reason: WireFailure,
        detail: &str,
        now: Millis,
    ) {
        let now = now.0;
        if reason.benign() {
            self.disconnected(conn, Millis(now));
        } else {
            self.offense(conn, Offense::Wire(reason), detail.to_owned(), now);
        }
    }

    /// A message arrived on `conn`.
    pub fn handle_message(&mut self, conn: ConnId, msg: Message, now: Millis, wall: UnixMillis) {
        let (now, wall) = (now.0, wall.0);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.hello {
            let Message::Hello(h) = msg else {
                return self.offense(
                    conn,
                    Offense::NoHello,
                    format!("{} before hello", msg.kind()),
                    now,
                );
            };
            let ours = self.config.protocol_version;
            let Some(version) = h.common_version(MIN_PROTOCOL_VERSION, ours) else {
                self.send(
                    conn,
                    Message::Bye(format!(
                        "protocol version {MIN_PROTOCOL_VERSION} to {ours} required"
                    )),
                    now,
                );
                return self.offense(
                    conn,
                    Offense::ProtocolVersion,
                    format!(
                        "versions {} to {} (we speak {MIN_PROTOCOL_VERSION} to {ours})",
                        h.version,
                        h.newest()
                    ),
                    now,
                );
            };
            c.hello = true;
            c.version = version;
            let peer = c.peer.clone();
            if let PeerIdentity::Agent(id) = &peer {
                // Resolve duplicates: keep the connection dialed by the
                // lower agent id.
                let id = id.clone();
                let dup = self
                    .conns
                    .iter()
                    .find(|(other, oc)| **other != conn && oc.hello && oc.peer == peer)
                    .map(|(other, oc)| (*other, oc.outbound));
                if let Some((other, other_outbound)) = dup {
                    let keep_outbound = self.config.agent_id < id;
                    let this_outbound = self.conns.get(&conn).is_some_and(|c| c.outbound);
                    let drop = if this_outbound != other_outbound && this_outbound == keep_outbound
                    {
                        other
                    } else {
                        conn
                    };
                    self.close(drop, format!("duplicate connection with {id}"), now);
                    if drop == conn {
                        return;
                    }
                }
                if let Some(listen) = h.listen {
                    let remote_ip = self.conns.get(&conn).and_then(|c| c.remote_ip.clone());
                    if let Some(addr) =
                        advertised_addr(&listen, remote_ip.as_deref()).filter(|a| is_dialable(a))
                    {
                        self.add_peer(&addr, Some(id.clone()), false);
                        if let Some(e) = self.peers.get_mut(&addr) {
                            self.failed_unconnected -= usize::from(failed_unconnected(e));
                            e.last_connected = now;
                            e.failures = 0;
                            self.failed_unconnected += usize::from(failed_unconnected(e));
                        }
                    }
                }
                self.actions
                    .push_back(Action::Event(Event::PeerUp { conn, peer }));
                let heads = self.heads_message();
                self.send(conn, heads, now);
                self.send_status(conn, false, now, wall);
            } else {
                self.actions
                    .push_back(Action::Event(Event::PeerUp { conn, peer }));
            }
            return;
        }
        if let PeerIdentity::Operator(_) = c.peer {
            return match msg {
                Message::StatusRequest => self.send_status(conn, true, now, wall),
                Message::Bye(_) => self.close(conn, "operator said bye".into(), now),
                // Operators may not author or relay records.
                other => self.offense(
                    conn,
                    Offense::OperatorForbidden,
                    format!("operator sent {}", other.kind()),
                    now,
                ),
            };
        }
        match msg {
            Message::Hello(_) => self.offense(conn, Offense::Protocol, "second hello".into(), now),
            Message::Heads(heads) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.heads = heads;
                }
                self.maybe_start_fetches(now);
            }
            Message::Want { id, items } => {
                let max = self.config.limits.max_inbound_wants;
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                if let Err((bad, detail)) = check_want(&items, c.version, &self.config.limits) {
                    return self.offense(conn, Offense::BadWant(bad), detail, now);
                }
                if c.serving.len() >= max {
                    return self.offense(
                        conn,
                        Offense::TooManyRequests,
                        format!("more than {max} wants in flight"),
                        now,
                    );
                }
                if c.serving.insert(id, 0).is_some() {
                    return self.offense(
                        conn,
                        Offense::Protocol,
                        format!("want id {id} reused"),
                        now,
                    );
                }
                self.actions
                    .push_back(Action::Event(Event::Serve { conn, id, items }));
            }
            Message::Data {
                id,
                items,
                more,
                entries,
            } => self.handle_data(conn, id, items, entries, more, now),
            Message::Status(records) => self.merge_status(conn, records, now, wall),
            Message::StatusDigest(digest) => self.handle_digest(conn, digest, now, wall),
            Message::StatusPull(ids) => self.handle_pull(conn, ids, now, wall),
            Message::StatusRequest => self.send_status(conn, true, now, wall),
            Message::Bye(reason) => self.close(
                conn,
                format!("peer said bye: {}", escape_untrusted(&reason)),
                now,
            ),
        }
    }

    /// Answers a [`Event::Serve`] of plain items: `found` holds what we
    /// have (in request order). Version 2 peers get one reply cut to
    /// [`MeshLimits::max_reply_bytes`]; version 3 peers get everything,
    /// split over as many `Data` frames as needed, up to
    /// [`MeshLimits::max_want_reply_bytes`] per want. What is left out the
    /// peer asks for again. Wants with an [`Item::Entries`] item are
    /// answered with [`Endpoint::serve_part`].
    pub fn serve(&mut self, conn: ConnId, id: u64, found: Vec<Found>, now: Millis) {
        self.serve_part(conn, id, found, Vec::new(), true, now);
    }

    /// Answers (part of) a [`Event::Serve`] to a version 3 peer: `found`
    /// for plain items (an [`Item::Entries`] item itself without bytes when
    /// we do not hold that bundle), `entries` for the entries of an
    /// [`Item::Entries`] item by index, each with its object's bytes (none
    /// if we lack it); `last`: nothing follows. A shell never needs to
    /// hold a whole large answer in memory: read up to
    /// [`MeshLimits::max_reply_bytes`], hand it over, read on. Once
    /// [`MeshLimits::max_want_reply_bytes`] went out, the rest is dropped
    /// (the peer asks again). To a version 2 peer the first part is the
    /// whole answer.
    pub fn serve_part(
        &mut self,
        conn: ConnId,
        id: u64,
        found: Vec<Found>,
        entries: Vec<EntryFound>,
        last: bool,
        now: Millis,
    ) {
        let now = now.0;
        let limits = &self.config.limits;
        let (budget, cap) = (limits.max_reply_bytes, limits.max_want_reply_bytes);
        let frame_room = (limits.max_frame_bytes as usize).saturating_sub(64 * 1024);
        let max_entries = limits.max_objects_per_want;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(served) = c.serving.get_mut(&id) else {
            return;
        };
        if c.version < 3 {
            c.serving.remove(&id);
            let mut used = 0usize;
            let mut items = Vec::new();
            for f in found {
                let n = f.bytes.as_ref().map_or(0, Vec::len) + 128;
                if used + n > budget && !(items.is_empty() && n <= frame_room) {
                    break;
                }
                used += n;
                items.push(f);
            }
            let (more, entries) = (false, Vec::new());
            return self.send(
                conn,
                Message::Data {
                    id,
                    items,
                    more,
                    entries,
                },
                now,
            );
        }
        let mut frames: Vec<(Vec<Found>, Vec<EntryFound>)> = Vec::new();
        let mut frame: (Vec<Found>, Vec<EntryFound>) = (Vec::new(), Vec::new());
        let mut used = 0usize;
        let answers = found
            .into_iter()
            .map(either_found)
            .chain(entries.into_iter().map(either_entry));
        for (n, answer) in answers {
            if n > frame_room || (*served > 0 && *served + n > cap) {
                // Too large for any frame, or over the want's budget:
                // left out.
                continue;
            }
            let full = used + n > budget || frame.1.len() >= max_entries;
            if full && !(frame.0.is_empty() && frame.1.is_empty()) {
                frames.push(std::mem::take(&mut frame));
                used = 0;
            }
            used += n;
            *served += n;
            match answer {
                Ok(f) => frame.0.push(f),
                Err(e) => frame.1.push(e),
            }
        }
        if !(frame.0.is_empty() && frame.1.is_empty()) || last {
            frames.push(frame);
        }
        if last {
            c.serving.remove(&id);
        }
        let count = frames.len();
        for (k, (items, entries)) in frames.into_iter().enumerate() {
            let more = !(last && k + 1 == count);
            self.send(
                conn,
                Message::Data {
                    id,
                    items,
                    more,
                    entries,
                },
                now,
            );
        }
    }

    /// The shell refuses a want it was asked to serve (an index past the
    /// bundle's entries): the peer is cut off.
    pub fn serve_refused(
        &mut self,
        conn: ConnId,
        id: u64,
        bad: BadWant,
        detail: &str,
        now: Millis,
    ) {
        let now = now.0;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.serving.remove(&id);
        }
        self.offense(
            conn,
            Offense::BadWant(bad),
            format!("want {id}: {detail}"),
            now,
        );
    }

    // ----- image blobs (protocol version 4) -----------------------------

    /// Agent connections that speak protocol version 4 (image blobs by
    /// range), with the peer's agent id.
    pub fn blob_peers(&self) -> Vec<(ConnId, AgentId)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.hello && c.version >= BLOB_PROTOCOL_VERSION)
            .filter_map(|(id, c)| match &c.peer {
                PeerIdentity::Agent(a) => Some((*id, a.clone())),
                PeerIdentity::Operator(_) => None,
            })
            .collect()
    }

    /// Asks the peer on `conn` for a range of an image blob (the shell
    /// names only blobs of an image list it verified, one range in flight
    /// per blob). Returns the request id, answered by
    /// [`Event::BlobPiece`]; `None` when the connection is gone, does not
    /// speak version 4, already has [`MeshLimits::max_outstanding_wants`]
    /// requests in flight, or the range is malformed or longer than
    /// [`MeshLimits::max_blob_piece`]. An unanswered range times out like
    /// any want (the peer is cut off: [`Event::PeerDown`]).
    pub fn want_blob(&mut self, conn: ConnId, range: BlobRange, now: Millis) -> Option<u64> {
        let now = now.0;
        let limits = &self.config.limits;
        let c = self.conns.get_mut(&conn)?;
        if !c.hello
            || c.version < BLOB_PROTOCOL_VERSION
            || c.outstanding.len() >= limits.max_outstanding_wants
            || check_blob_range(&range, limits).is_err()
        {
            return None;
        }
        let id = self.next_request;
        self.next_request += 1;
        let item = Item::Blob(range.clone());
        c.outstanding.insert(
            id,
            Request {
                fetch: 0,
                blob: Some(range),
                items: BTreeSet::from([item.clone()]),
                entries: BTreeMap::new(),
                compact: None,
                sent: now,
                got_any: false,
            },
        );
        self.send(
            conn,
            Message::Want {
                id,
                items: vec![item],
            },
            now,
        );
        Some(id)
    }

    /// The blob a peer served on `conn` does not match the image list
    /// (wrong digest, wrong size): the peer is cut off and banned
    /// ([`Offense::BlobMismatch`]).
    pub fn blob_refused(&mut self, conn: ConnId, detail: &str, now: Millis) {
        self.offense(conn, Offense::BlobMismatch, detail.to_owned(), now.0);
    }

    // ----- fetch inputs --------------------------------------------------

    /// The release of a fetch passed the agent's verification: the fetch
    /// moves on to objects (name them with [`Endpoint::fetch_want`]).
    pub fn release_verified(&mut self, fetch: FetchId, _now: Millis) {
        if let Some(f) = self.fetches.get_mut(&fetch) {
            if f.stage == Stage::Verdict {
                f.stage = Stage::Objects;
                f.idle_reported = false;
            }
        }
    }

    /// The release of a fetch failed verification: the peer that served
    /// it is cut off. `reason` is the verifier's stable reason
    /// (`rollback`, `expired`, `signature_threshold`, ...).
    ///
    /// A `rollback` verdict while we already hold the sequence the peer
    /// advertised is a race (we adopted it from elsewhere meanwhile), not
    /// the peer's fault: the fetch is dropped without blame.
    pub fn release_rejected(
        &mut self,
        fetch: FetchId,
        reason: VerifyFailure,
        detail: &str,
        now: Millis,
    ) {
        let now = now.0;
        let Some(f) = self.fetches.get(&fetch) else {
            return;
        };
        let conn = f.conn;
        let ours = self.heads.get(&f.head.channel).map_or(0, |h| h.sequence);
        if reason == VerifyFailure::Rollback && ours >= f.head.sequence {
            self.fail_fetch(fetch, "already hold the advertised head".into());
            return;
        }
        if f.excused && reason != VerifyFailure::RootRotation {
            // Not newer under our rules (e.g. an old-epoch head): not
            // asked again for a while, not blamed. A bad root still is.
            if let Some(c) = self.conns.get_mut(&conn) {
                c.fetch_backoff_until = now + self.config.anti_entropy_ms;
            }
            self.fail_fetch(fetch, format!("release not newer: {}", reason.label()));
            return;
        }
        self.fail_fetch(fetch, format!("release rejected: {}", reason.label()));
        self.offense(conn, Offense::Release(reason), detail.to_owned(), now);
    }

    /// Objects the shell lacks for a verified fetch (call it once after
    /// [`Endpoint::release_verified`], with an empty list if nothing is
    /// missing, and after each [`Event::FetchIdle`] as needed). Addresses
    /// already queued or in flight are skipped.
    pub fn fetch_want(&mut self, fetch: FetchId, addresses: Vec<Address>, now: Millis) {
        let now = now.0;
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        if f.stage != Stage::Objects {
            return;
        }
        let mut queued = Self::queued_objects(f, self.conns.get(&f.conn), fetch);
        for a in addresses {
            if queued.insert(a.clone()) {
                f.queue.push_back(Item::Object(a));
            }
        }
        f.idle_reported = false;
        self.pump(fetch, now);
    }

    /// Objects the shell lacks for a verified fetch, each with its index in
    /// the bundle's entry order (the order of the verified manifest's
    /// entries): asked for as run-length ranges ([`Item::Entries`]) from a
    /// version 3 peer, by address from a version 2 peer. Received objects
    /// are checked against the address given here, so a peer cannot
    /// substitute another entry. Otherwise as [`Endpoint::fetch_want`].
    pub fn fetch_want_entries(
        &mut self,
        fetch: FetchId,
        entries: Vec<(u32, Address)>,
        now: Millis,
    ) {
        let now = now.0;
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        if f.stage != Stage::Objects {
            return;
        }
        let mut queued = Self::queued_objects(f, self.conns.get(&f.conn), fetch);
        let mut new: Vec<(u32, Address)> = entries
            .into_iter()
            .filter(|(_, a)| queued.insert(a.clone()))
            .collect();
        new.sort();
        let mut all: Vec<(u32, Address)> = f.entries.drain(..).chain(new).collect();
        all.sort();
        f.entries = all.into();
        f.idle_reported = false;
        self.pump(fetch, now);
    }

    /// Addresses of the objects a fetch has queued or in flight.
    fn queued_objects(f: &Fetch, conn: Option<&Conn>, fetch: FetchId) -> BTreeSet<Address> {
        let in_flight = conn
            .into_iter()
            .flat_map(|c| c.outstanding.values())
            .filter(|r| r.fetch == fetch)
            .flat_map(Request::names);
        f.queue
            .iter()
            .cloned()
            .chain(f.entries.iter().map(|(_, a)| Item::Object(a.clone())))
            .chain(in_flight)
            .filter_map(|i| match i {
                Item::Object(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// The shell is done with a fetch (adopted, or nothing more to do).
    pub fn fetch_complete(&mut self, fetch: FetchId, now: Millis) {
        let now = now.0;
        if self.fetches.remove(&fetch).is_some() {
            for c in self.conns.values_mut() {
                c.outstanding.retain(|_, r| r.fetch != fetch);
            }
            self.maybe_start_fetches(now);
        }
    }

    /// Abandons a fetch without blaming the peer (e.g. we already hold a
    /// newer release from elsewhere). The peer is not asked again for a
    /// while.
    pub fn fetch_abandon(&mut self, fetch: FetchId, now: Millis) {
        let now = now.0;
        if let Some(f) = self.fetches.get(&fetch) {
            let conn = f.conn;
            if let Some(c) = self.conns.get_mut(&conn) {
                c.fetch_backoff_until = now + self.config.anti_entropy_ms;
            }
            self.fetches.remove(&fetch);
            for c in self.conns.values_mut() {
                c.outstanding.retain(|_, r| r.fetch != fetch);
            }
        }
    }

    // ----- timers --------------------------------------------------------

    /// Runs timers: hello and request timeouts, keepalives, anti-entropy
    /// and dialing.
    pub fn handle_timeout(&mut self, now: Millis, wall: UnixMillis) {
        let (now, wall) = (now.0, wall.0);
        if !self.started {
            self.started = true;
            self.next_anti_entropy = now + self.config.anti_entropy_ms;
            self.next_dial = now;
        }
        // Timeouts.
        let mut expired = Vec::new();
        for (id, c) in &self.conns {
            if !c.hello && now >= c.opened + self.config.hello_timeout_ms {
                expired.push((*id, Offense::HelloTimeout, "no hello".to_owned()));
            } else if let Some((rid, _)) = c
                .outstanding
                .iter()
                .find(|(_, r)| now >= r.sent + self.config.request_timeout_ms)
            {
                expired.push((*id, Offense::Timeout, format!("want {rid} unanswered")));
            }
        }
        for (conn, reason, detail) in expired {
            self.offense(conn, reason, detail, now);
        }
        // Keepalives.
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.hello && now >= c.last_sent + self.config.keepalive_ms)
            .map(|(id, _)| *id)
            .collect();
        for conn in idle {
            let m = if matches!(
                self.conns.get(&conn).map(|c| &c.peer),
                Some(PeerIdentity::Agent(_))
            ) {
                self.heads_message()
            } else {
                Message::Status(Vec::new())
            };
            self.send(conn, m, now);
        }
        // Anti-entropy with one random peer.
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + self.config.anti_entropy_ms;
            let targets = self.agent_conns();
            if !targets.is_empty() {
                let conn = targets[self.rng.below(targets.len())];
                let m = self.heads_message();
                self.send(conn, m, now);
                self.send_status(conn, false, now, wall);
            }
            self.maybe_start_fetches(now);
            self.expire_status(wall);
        }
        // Our own record: always present (a minimal one if the shell set
        // none, so our address travels) and signed again before it ages.
        let stale = self
            .status
            .get(&self.config.agent_id)
            .is_none_or(|h| wall >= h.record.time.saturating_add(self.config.status_refresh_ms));
        if stale {
            let record = self
                .status
                .get(&self.config.agent_id)
                .map(|h| (*h.record).clone())
                .unwrap_or_else(|| StatusRecord {
                    agent_id: self.config.agent_id.clone(),
                    channel: String::new(),
                    labels: BTreeMap::new(),
                    sequence: 0,
                    bundle: String::new(),
                    health: "unknown".into(),
                    time: wall,
                    rollout: None,
                    listen: None,
                    values_digest: None,
                });
            self.set_own_status(record, wall);
        }
        // Dialing.
        if now >= self.next_dial {
            self.next_dial = now + self.config.dial_interval_ms;
            self.dial_more(now);
        }
    }

    // ----- internals -----------------------------------------------------

    fn send(&mut self, conn: ConnId, message: Message, now: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_sent = now;
            self.actions.push_back(Action::Send { conn, message });
        }
    }

    fn agent_conns(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.hello && matches!(c.peer, PeerIdentity::Agent(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    fn heads_message(&self) -> Message {
        let mut heads: Vec<Head> = self.heads.values().cloned().collect();
        for h in &mut heads {
            h.root_version = h.root_version.max(self.root_version);
        }
        heads.truncate(self.config.limits.max_heads);
        Message::Heads(heads)
    }

    /// Gossips status on `conn`: to a version 3 peer a digest of the live
    /// records it is not known to hold (it pulls those it lacks); to a
    /// version 2 peer the records themselves. `full` (the answer to
    /// `StatusRequest`) sends every live record.
    fn send_status(&mut self, conn: ConnId, full: bool, now: u64, wall: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if full || c.version < 3 {
            let ids: Option<Vec<AgentId>> = None;
            return self.send_records(conn, ids, full, now, wall);
        }
        let known = &c.status_known;
        let mut digest: Vec<(u64, AgentId, u64)> = self
            .status
            .values()
            .filter(|h| h.signed.is_some() && !self.expired(&h.record, wall))
            .filter(|h| self.offered(h) && !known.holds(h.rank, h.record.time))
            .map(|h| (h.record.time, h.record.agent_id.clone(), h.rank))
            .collect();
        if digest.is_empty() {
            return;
        }
        // Newest first, within the record count.
        digest.sort_by(|a, b| b.cmp(a));
        digest.truncate(self.config.limits.max_status_records);
        let max = self.config.limits.max_status_records;
        if let Some(c) = self.conns.get_mut(&conn) {
            let batch = digest.iter().map(|(t, _, rank)| (*rank, *t)).collect();
            c.status_known.note_all(batch, max);
        }
        let digest = digest.into_iter().map(|(t, id, _)| (id, t)).collect();
        self.send(conn, Message::StatusDigest(digest), now);
    }

    /// Sends live signed records on `conn`: those named (`ids`, a pull),
    /// all of them (`full`), or those newer than the peer is known to
    /// hold (version 2 gossip; nothing is sent when nothing is new).
    fn send_records(
        &mut self,
        conn: ConnId,
        ids: Option<Vec<AgentId>>,
        full: bool,
        now: u64,
        wall: u64,
    ) {
        // Newest first, within the record count and a byte budget; only
        // live records with a signature (expired ones are not relayed).
        let Some(already) = self.conns.get(&conn).map(|c| &c.status_known) else {
            return;
        };
        let mut records: Vec<&HeldStatus> = match &ids {
            Some(ids) => ids.iter().filter_map(|id| self.status.get(id)).collect(),
            None => self.status.values().collect(),
        };
        records.retain(|h| {
            h.signed.is_some()
                && !self.expired(&h.record, wall)
                && (full
                    || ids.is_some()
                    || (self.offered(h) && !already.holds(h.rank, h.record.time)))
        });
        if records.is_empty() && !full {
            return;
        }
        records.sort_by_key(|h| std::cmp::Reverse(h.record.time));
        let budget = (self.config.limits.max_frame_bytes as usize) / 2;
        let mut used = 0;
        let mut out = Vec::new();
        let mut sent = Vec::new();
        for h in records
            .into_iter()
            .take(self.config.limits.max_status_records)
        {
            let Some(signed) = &h.signed else { continue };
            let n = 16 + signed.record.len() + signed.cert.len() + signed.sig.len();
            if used + n > budget {
                break;
            }
            used += n;
            out.push(signed.clone());
            sent.push((h.rank, h.record.time));
        }
        let max = self.config.limits.max_status_records;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.status_known.note_all(sent, max);
        }
        self.send(conn, Message::Status(out), now);
    }

    /// A version 3 peer's digest: note what it holds, pull the records
    /// newer than ours (not about us, not expired or dated ahead, not
    /// already being pulled).
    fn handle_digest(&mut self, conn: ConnId, digest: Vec<(AgentId, u64)>, now: u64, wall: u64) {
        let (skew, ttl, timeout) = (
            self.config.max_clock_skew_ms,
            self.config.status_ttl_ms,
            self.config.request_timeout_ms,
        );
        let max = self.config.limits.max_status_records;
        let mut pull = Vec::new();
        let mut held = Vec::new();
        let mut swept = false;
        for (id, t) in digest {
            if id == self.config.agent_id
                || t > wall.saturating_add(skew)
                || t.saturating_add(ttl) <= wall
            {
                continue;
            }
            let ours = self.status.get(&id);
            held.push((ours.map_or_else(|| status_sample_rank(&id), |h| h.rank), t));
            let newer = ours.is_none_or(|h| h.record.time < t || self.expired(&h.record, wall));
            let pulling = self
                .pulling
                .get(&id)
                .is_some_and(|(pt, at)| *pt >= t && now < at.saturating_add(timeout));
            if newer && !pulling {
                if self.pulling.len() >= 2 * max {
                    // Bounded whatever a peer announces: forget pulls
                    // that timed out (once per digest: nothing times
                    // out meanwhile); if still full, pull later (the
                    // record is announced again with its next version).
                    if !swept {
                        swept = true;
                        self.pulling
                            .retain(|_, (_, at)| now < at.saturating_add(timeout));
                    }
                    if self.pulling.len() >= 2 * max {
                        continue;
                    }
                }
                self.pulling.insert(id.clone(), (t, now));
                pull.push(id);
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.status_known.note_all(held, max);
        }
        if !pull.is_empty() {
            self.send(conn, Message::StatusPull(pull), now);
        }
    }

    /// A version 3 peer pulls records it lacks.
    fn handle_pull(&mut self, conn: ConnId, ids: Vec<AgentId>, now: u64, wall: u64) {
        self.send_records(conn, Some(ids), false, now, wall);
    }

    /// Drops records older than the TTL.
    fn expire_status(&mut self, wall: u64) {
        let before = self.status.len();
        let ttl = self.config.status_ttl_ms;
        let me = self.config.agent_id.clone();
        self.status
            .retain(|id, h| *id == me || h.record.time.saturating_add(ttl) > wall);
        // The sample is a subset of the table: only what left the table
        // leaves the sample.
        if self.status.len() != before {
            let status = &self.status;
            self.sample.retain(|(_, id)| status.contains_key(id));
            self.actions.push_back(Action::Event(Event::StatusChanged));
        }
    }

    /// Merges signed records from a peer. Cheap checks first (syntax,
    /// about us, dated ahead, expired, not newer than what we hold), then
    /// the signature: only records whose certificate names their agent id
    /// and whose author signed them are kept. A forged record cuts the
    /// peer off. One record per agent id; a new agent id takes a free or
    /// expired slot, never a live record's.
    fn merge_status(&mut self, conn: ConnId, records: Vec<SharedStatus>, now: u64, wall: u64) {
        let Some(peer) = self.conns.get(&conn).map(|c| c.peer.clone()) else {
            return;
        };
        let limits = self.config.limits.clone();
        let mut changed = false;
        let mut dropped: BTreeMap<StatusDrop, u64> = BTreeMap::new();
        let mut forged: Option<String> = None;
        let mut learned = Vec::new();
        let mut held = Vec::new();
        for signed in records {
            let Ok(r) = signed.decoded(&limits).map(Arc::clone) else {
                forged.get_or_insert_with(|| "undecodable status record".into());
                continue;
            };
            // The peer holds it: never sent back on this connection.
            let rank = signed
                .sample_rank()
                .unwrap_or_else(|| status_sample_rank(&r.agent_id));
            held.push((rank, r.time));
            if self
                .pulling
                .get(&r.agent_id)
                .is_some_and(|(t, _)| *t <= r.time)
            {
                self.pulling.remove(&r.agent_id);
            }
            if r.agent_id == self.config.agent_id {
                continue;
            }
            if r.time > wall.saturating_add(self.config.max_clock_skew_ms) {
                *dropped.entry(StatusDrop::Future).or_default() += 1;
                continue;
            }
            if r.time.saturating_add(self.config.status_ttl_ms) <= wall {
                *dropped.entry(StatusDrop::Expired).or_default() += 1;
                continue;
            }
            if self
                .status
                .get(&r.agent_id)
                .is_some_and(|old| old.record.time >= r.time && !self.expired(&old.record, wall))
            {
                continue;
            }
            // Outside the sample, not a failure report and not held: not
            // ours to keep, so not worth a signature check.
            if !is_failure(&r)
                && !self.sample_admits(rank)
                && !self.status.contains_key(&r.agent_id)
            {
                continue;
            }
            let message = SignedStatus::signed_message(&signed.record);
            match self.keys.verify(&signed.cert, &message, &signed.sig, wall) {
                Ok(author) if author == r.agent_id => {}
                Ok(author) => {
                    *dropped.entry(StatusDrop::Forged).or_default() += 1;
                    forged.get_or_insert_with(|| {
                        format!(
                            "status record for agent {} signed by agent {author}",
                            r.agent_id
                        )
                    });
                    continue;
                }
                Err(RecordRejection::Forged(why)) => {
                    *dropped.entry(StatusDrop::Forged).or_default() += 1;
                    forged.get_or_insert_with(|| {
                        format!("status record for agent {}: {why}", r.agent_id)
                    });
                    continue;
                }
                Err(RecordRejection::Stale(_)) => {
                    *dropped.entry(StatusDrop::StaleCert).or_default() += 1;
                    continue;
                }
            }
            if !self.status.contains_key(&r.agent_id)
                && self.status.len() >= limits.max_status_records
            {
                // Full: only an expired record makes room.
                let ttl = self.config.status_ttl_ms;
                let me = &self.config.agent_id;
                let victim = self
                    .status
                    .iter()
                    .filter(|(id, h)| *id != me && h.record.time.saturating_add(ttl) <= wall)
                    .min_by_key(|(_, h)| h.record.time)
                    .map(|(id, _)| id.clone());
                match victim {
                    Some(v) => self.unhold(&v),
                    None => {
                        *dropped.entry(StatusDrop::TableFull).or_default() += 1;
                        continue;
                    }
                }
            }
            if let Some(l) = &r.listen {
                learned.push((l.clone(), r.agent_id.clone()));
            }
            let id = r.agent_id.clone();
            self.hold(HeldStatus {
                record: r,
                rank,
                signed: Some(signed),
            });
            // The sample may have trimmed the record straight away (a
            // full sample and a larger rank than all of it).
            changed |= self.status.contains_key(&id);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.status_known.note_all(held, limits.max_status_records);
        }
        for (addr, id) in learned {
            self.learn_signed_address(&addr, &id);
        }
        for (reason, count) in dropped {
            self.actions.push_back(Action::Event(Event::StatusDropped {
                peer: peer.clone(),
                reason,
                count,
            }));
        }
        if changed {
            self.actions.push_back(Action::Event(Event::StatusChanged));
        }
        if let Some(detail) = forged {
            self.offense(conn, Offense::ForgedStatus, detail, now);
        }
    }

    /// An agent's address from its own signed record: it replaces the
    /// addresses we learned for that agent but never connected to (one
    /// address per agent id; seeds stay).
    fn learn_signed_address(&mut self, addr: &str, agent_id: &AgentId) {
        if !is_dialable(addr) || self.peers.contains_key(addr) {
            return;
        }
        if self.peer_ids.binary_search(&peer_id_hash(agent_id)).is_ok() {
            let (ids, failed) = (&mut self.peer_ids, &mut self.failed_unconnected);
            self.peers.retain(|_, e| {
                let keep = e.seed || e.last_connected > 0 || e.agent_id.as_ref() != Some(agent_id);
                if !keep {
                    index_peer_id(ids, e.agent_id.as_ref(), None);
                    *failed -= usize::from(failed_unconnected(e));
                }
                keep
            });
        }
        self.add_peer(addr, Some(agent_id.clone()), false);
    }

    /// `failed_unconnected` recounted from the table (checked in debug
    /// builds).
    fn failed_unconnected_recounted(&self) -> usize {
        self.peers
            .values()
            .filter(|e| failed_unconnected(e))
            .count()
    }

    /// `peer_ids` recounted from the table (checked in debug builds).
    fn peer_ids_recounted(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .peers
            .values()
            .filter_map(|e| e.agent_id.as_ref().map(peer_id_hash))
            .collect();
        ids.sort_unstable();
        ids
    }

    fn add_peer(&mut self, addr: &str, agent_id: Option<AgentId>, seed: bool) {
        if addr.is_empty()
            || addr.len() > self.config.limits.max_string
            || is_unspecified_host(addr)
        {
            return;
        }
        if let Some(e) = self.peers.get_mut(addr) {
            self.failed_unconnected -= usize::from(failed_unconnected(e));
            e.seed |= seed;
            self.failed_unconnected += usize::from(failed_unconnected(e));
            if agent_id.is_some() && e.last_connected == 0 {
                index_peer_id(&mut self.peer_ids, e.agent_id.as_ref(), agent_id.as_ref());
                e.agent_id = agent_id;
            }
            debug_assert_eq!(self.peer_ids, self.peer_ids_recounted());
            debug_assert_eq!(self.failed_unconnected, self.failed_unconnected_recounted());
            return;
        }
        if self.config.listen.as_deref() == Some(addr)
            || agent_id.as_ref() == Some(&self.config.agent_id)
        {
            return;
        }
        if !seed && self.peers.len() >= self.config.limits.max_peer_table {
            // Evict a non-seed entry that never connected, or the one with
            // most failures.
            // The last (by address) of the non-seeds with the greatest
            // (never connected, failures). With no never-connected entry
            // that failed, that is the last never-connected non-seed, if
            // there is one.
            let fast = (self.failed_unconnected == 0)
                .then(|| {
                    self.peers
                        .values()
                        .rev()
                        .find(|e| !e.seed && e.last_connected == 0)
                })
                .flatten();
            let victim = fast
                .or_else(|| {
                    self.peers
                        .values()
                        .filter(|e| !e.seed)
                        .max_by_key(|e| (e.last_connected == 0, e.failures))
                })
                .map(|e| e.addr.clone());
            match victim {
                Some(v) => {
                    if let Some(e) = self.peers.remove(&v) {
                        index_peer_id(&mut self.peer_ids, e.agent_id.as_ref(), None);
                        self.failed_unconnected -= usize::from(failed_unconnected(&e));
                    }
                }
                None => return,
            }
        }
        index_peer_id(&mut self.peer_ids, None, agent_id.as_ref());
        self.peers.insert(
            addr.to_owned(),
            PeerEntry {
                addr: addr.to_owned(),
                agent_id,
                seed,
                failures: 0,
                next_attempt: 0,
                last_connected: 0,
                is_self: false,
            },
        );
        debug_assert_eq!(self.peer_ids, self.peer_ids_recounted());
        debug_assert_eq!(self.failed_unconnected, self.failed_unconnected_recounted());
    }

    fn dial_more(&mut self, now: u64) {
        let open = self.agent_conns().len() + self.pending_dials.len();
        let want = self.config.limits.target_connections.saturating_sub(open);
        if want == 0 {
            return;
        }
        let connected_ids: BTreeSet<AgentId> = self
            .conns
            .values()
            .filter_map(|c| match &c.peer {
                PeerIdentity::Agent(id) => Some(id.clone()),
                PeerIdentity::Operator(_) => None,
            })
            .collect();
        let connected_addrs: BTreeSet<String> = self
            .conns
            .values()
            .filter_map(|c| c.dialed.clone())
            .collect();
        let mut seeds = Vec::new();
        let mut others = Vec::new();
        for e in self.peers.values() {
            let skip = e.is_self
                || e.next_attempt > now
                || self.pending_dials.contains(&e.addr)
                || connected_addrs.contains(&e.addr)
                || e.agent_id
                    .as_ref()
                    .is_some_and(|id| connected_ids.contains(id) || self.banned_at(id, now));
            if !skip {
                if e.seed {
                    seeds.push(e.addr.clone());
                } else {
                    others.push(e.addr.clone());
                }
            }
        }
        self.rng.shuffle(&mut seeds);
        self.rng.shuffle(&mut others);
        for addr in seeds.into_iter().chain(others).take(want) {
            self.pending_dials.insert(addr.clone());
            // Until the dial reports back, do not pick it again.
            if let Some(e) = self.peers.get_mut(&addr) {
                e.next_attempt = now + self.config.dial_backoff_base_ms;
            }
            self.actions.push_back(Action::Dial { addr });
        }
    }

    /// Starts fetches for followed channels where a connected peer holds
    /// a newer head than ours.
    fn maybe_start_fetches(&mut self, now: u64) {
        for channel in self.config.channels.clone() {
            if self.fetches.values().any(|f| f.head.channel == channel) {
                continue;
            }
            let mine = self.heads.get(&channel);
            let ours = mine.map_or(0, |h| h.sequence);
            let unbound = self.unbound_floors.contains(&channel);
            // Ranked: a higher sequence first, then (speculative) a head
            // under a newer root, or any other head under at least our
            // root while our floor is unbound.
            let mut best: Option<(bool, ConnId, Head)> = None;
            for (id, c) in &self.conns {
                if !c.hello || c.fetch_backoff_until > now {
                    continue;
                }
                let Some(h) = c.heads.iter().find(|h| h.channel == channel) else {
                    continue;
                };
                let newer = h.sequence > ours;
                let same = mine.is_some_and(|m| m.sequence == h.sequence && m.bundle == h.bundle);
                let speculative = !newer
                    && !same
                    && (h.root_version > self.root_version
                        || (unbound && h.root_version >= self.root_version));
                if !newer && !speculative {
                    continue;
                }
                let rank = |spec: bool, h: &Head| {
                    if spec {
                        (0, h.root_version, h.sequence)
                    } else {
                        (1, 0, h.sequence)
                    }
                };
                let better = best
                    .as_ref()
                    .is_none_or(|(spec, _, b)| rank(speculative, h) > rank(*spec, b));
                if better {
                    best = Some((speculative, *id, h.clone()));
                }
            }
            if let Some((speculative, conn, head)) = best {
                let excused = speculative || head.root_version < self.root_version;
                self.start_fetch(conn, head, excused, now);
            }
        }
    }

    fn start_fetch(&mut self, conn: ConnId, head: Head, excused: bool, now: u64) {
        let Some(PeerIdentity::Agent(peer)) = self.conns.get(&conn).map(|c| c.peer.clone()) else {
            return;
        };
        // A peer's heads were checked when they arrived (`Message::validate`).
        let (Ok(channel), Ok(bundle)) = (
            ChannelName::parse(&head.channel),
            BundleId::parse(&head.bundle),
        ) else {
            return;
        };
        let fetch = self.next_fetch;
        self.next_fetch += 1;
        let mut queue = VecDeque::new();
        let top = head.root_version.min(self.root_version + MAX_ROOT_STEPS);
        for v in (self.root_version + 1)..=top {
            queue.push_back(Item::Root(v));
        }
        queue.push_back(Item::Release(channel));
        self.fetches.insert(
            fetch,
            Fetch {
                conn,
                peer,
                head,
                stage: Stage::Release,
                queue,
                entries: VecDeque::new(),
                bundle,
                roots: BTreeMap::new(),
                release: None,
                idle_reported: false,
                excused,
            },
        );
        self.pump(fetch, now);
    }

    /// Sends wants for a fetch up to the window, and reports progress.
    fn pump(&mut self, fetch: FetchId, now: u64) {
        let limits = &self.config.limits;
        let (max_out, batch) = (limits.max_outstanding_wants, limits.max_items_per_want);
        let (max_objects, max_ranges) = (limits.max_objects_per_want, limits.max_ranges_per_want);
        loop {
            let Some(f) = self.fetches.get_mut(&fetch) else {
                return;
            };
            let Some(c) = self.conns.get(&f.conn) else {
                return;
            };
            let in_flight = c.outstanding.values().filter(|r| r.fetch == fetch).count();
            let idle = f.queue.is_empty() && f.entries.is_empty();
            if f.stage == Stage::Verdict || idle || in_flight >= max_out {
                break;
            }
            let mut req = Request {
                fetch,
                blob: None,
                items: BTreeSet::new(),
                entries: BTreeMap::new(),
                compact: None,
                sent: now,
                got_any: false,
            };
            let n = f.queue.len().min(batch);
            let mut items: Vec<Item> = f.queue.drain(..n).collect();
            req.items.extend(items.iter().cloned());
            if c.version >= 3 {
                if !f.entries.is_empty() && items.len() < batch {
                    let take = f.entries.len().min(max_objects);
                    let chunk: Vec<(u32, Address)> = f.entries.drain(..take).collect();
                    let indices: Vec<u32> = chunk.iter().map(|(i, _)| *i).collect();
                    let (ranges, covered) = EntryRanges::compress(&indices, max_ranges);
                    for e in chunk[covered..].iter().rev() {
                        f.entries.push_front(e.clone());
                    }
                    req.entries.extend(chunk.into_iter().take(covered));
                    let item = Item::Entries(EntryRanges {
                        bundle: f.bundle.clone(),
                        ranges,
                    });
                    req.compact = Some(item.clone());
                    items.push(item);
                }
            } else {
                // A version 2 peer: entries by address.
                while items.len() < batch {
                    let Some((_, a)) = f.entries.pop_front() else {
                        break;
                    };
                    let item = Item::Object(a);
                    req.items.insert(item.clone());
                    items.push(item);
                }
            }
            let conn = f.conn;
            let id = self.next_request;
            self.next_request += 1;
            if let Some(c) = self.conns.get_mut(&conn) {
                c.outstanding.insert(id, req);
            }
            self.send(conn, Message::Want { id, items }, now);
        }
        // Progress.
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        let in_flight = self.conns.get(&f.conn).map_or(0, |c| {
            c.outstanding.values().filter(|r| r.fetch == fetch).count()
        });
        if in_flight > 0 || !f.queue.is_empty() || !f.entries.is_empty() {
            return;
        }
        match f.stage {
            Stage::Release => {
                let Some(release) = f.release.take() else {
                    return self.fail_fetch(fetch, "peer lacks the release".into());
                };
                f.stage = Stage::Verdict;
                let ev = Event::VerifyRelease {
                    fetch,
                    peer: f.peer.clone(),
                    channel: f.head.channel.clone(),
                    head: f.head.clone(),
                    release,
                    roots: std::mem::take(&mut f.roots).into_iter().collect(),
                };
                self.actions.push_back(Action::Event(ev));
            }
            Stage::Objects if !f.idle_reported => {
                f.idle_reported = true;
                self.actions
                    .push_back(Action::Event(Event::FetchIdle { fetch }));
            }
            _ => {}
        }
    }

    fn handle_data(
        &mut self,
        conn: ConnId,
        id: u64,
        items: Vec<Found>,
        entries: Vec<EntryFound>,
        more: bool,
        now: u64,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(mut req) = c.outstanding.remove(&id) else {
            return self.offense(
                conn,
                Offense::Unsolicited,
                format!("data for unknown request {id}"),
                now,
            );
        };
        if let Some(range) = req.blob.take() {
            return self.handle_blob_data(conn, id, range, items, entries, more, now);
        }
        let fetch = req.fetch;
        let mut missing = Vec::new();
        let mut objects = Vec::new();
        for EntryFound(k, bytes) in entries {
            let Some(address) = req.entries.remove(&k) else {
                return self.offense(
                    conn,
                    Offense::Unsolicited,
                    format!("entry {k} was not asked for"),
                    now,
                );
            };
            req.got_any = true;
            let Some(bytes) = bytes else {
                missing.push(Item::Object(address));
                continue;
            };
            if let Err(e) = cairn_core::bundle::verify_object(&address, &bytes) {
                self.fail_fetch(fetch, format!("entry {k} ({address}) hash mismatch"));
                return self.offense(conn, Offense::ObjectHashMismatch, e.to_string(), now);
            }
            objects.push((address, bytes));
        }
        for f in items {
            let asked = match &f.item {
                // "I do not hold that bundle": every entry it names.
                item @ Item::Entries(_)
                    if f.bytes.is_none() && req.compact.as_ref() == Some(item) =>
                {
                    req.compact = None;
                    true
                }
                Item::Entries(_) | Item::Blob(_) => false,
                item => req.items.remove(item),
            };
            if !asked {
                return self.offense(
                    conn,
                    Offense::Unsolicited,
                    format!("{:?} was not asked for", f.item),
                    now,
                );
            }
            req.got_any = true;
            let Some(bytes) = f.bytes else {
                missing.push(f.item);
                continue;
            };
            match f.item {
                Item::Object(address) => {
                    if let Err(e) = cairn_core::bundle::verify_object(&address, &bytes) {
                        self.fail_fetch(fetch, format!("object {address} hash mismatch"));
                        return self.offense(conn, Offense::ObjectHashMismatch, e.to_string(), now);
                    }
                    objects.push((address, bytes));
                }
                Item::Root(v) => {
                    if let Some(fs) = self.fetches.get_mut(&fetch) {
                        fs.roots.insert(v, bytes);
                    }
                }
                Item::Release(_) => {
                    if let Some(fs) = self.fetches.get_mut(&fetch) {
                        fs.release = Some(bytes);
                    }
                }
                Item::Entries(_) | Item::Blob(_) => {}
            }
        }
        for (address, bytes) in objects {
            self.actions.push_back(Action::Event(Event::Object {
                fetch,
                address,
                bytes,
            }));
        }
        if !self.fetches.contains_key(&fetch) {
            // The fetch ended (completed or abandoned) meanwhile.
            return;
        }
        if !missing.is_empty() {
            // A peer advertising a head must hold all of it; a peer that
            // lacks part of it is not asked again for a while.
            if let Some(c) = self.conns.get_mut(&conn) {
                c.fetch_backoff_until = now + self.config.anti_entropy_ms;
            }
            return self.fail_fetch(fetch, format!("peer lacks {:?}", missing[0]));
        }
        if more {
            // More frames follow: the request stays open, its timer
            // restarts.
            req.sent = now;
            if let Some(c) = self.conns.get_mut(&conn) {
                c.outstanding.insert(id, req);
            }
            return;
        }
        let pending = !req.items.is_empty() || !req.entries.is_empty();
        if !req.got_any && pending {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.fetch_backoff_until = now + self.config.anti_entropy_ms;
            }
            return self.fail_fetch(fetch, "peer made no progress".into());
        }
        if let Some(f) = self.fetches.get_mut(&fetch) {
            // Items left out of the reply go to the front again.
            for item in std::mem::take(&mut req.items).into_iter().rev() {
                f.queue.push_front(item);
            }
            for e in req.entries.into_iter().rev() {
                f.entries.push_front(e);
            }
        }
        self.pump(fetch, now);
    }

    /// The answer to a blob range: exactly one item, the range asked for,
    /// in one frame, with at most the length asked for.
    #[allow(clippy::too_many_arguments)]
    fn handle_blob_data(
        &mut self,
        conn: ConnId,
        id: u64,
        range: BlobRange,
        items: Vec<Found>,
        entries: Vec<EntryFound>,
        more: bool,
        now: u64,
    ) {
        let mut items = items.into_iter();
        let (Some(found), None, true, false) =
            (items.next(), items.next(), entries.is_empty(), more)
        else {
            return self.offense(
                conn,
                Offense::Unsolicited,
                format!("answer to blob want {id} is not one piece"),
                now,
            );
        };
        if found.item != Item::Blob(range.clone()) {
            return self.offense(
                conn,
                Offense::Unsolicited,
                format!("{:?} was not asked for", found.item),
                now,
            );
        }
        if let Some(b) = &found.bytes {
            if b.len() as u64 > u64::from(range.length) {
                return self.offense(
                    conn,
                    Offense::BlobMismatch,
                    format!(
                        "{} bytes of blob {} at {} (asked for {})",
                        b.len(),
                        range.digest,
                        range.offset,
                        range.length
                    ),
                    now,
                );
            }
        }
        self.actions.push_back(Action::Event(Event::BlobPiece {
            conn,
            id,
            range,
            bytes: found.bytes,
        }));
    }

    fn fail_fetch(&mut self, fetch: FetchId, reason: String) {
        if self.fetches.remove(&fetch).is_some() {
            for c in self.conns.values_mut() {
                c.outstanding.retain(|_, r| r.fetch != fetch);
            }
            self.actions
                .push_back(Action::Event(Event::FetchFailed { fetch, reason }));
        }
    }

    /// Cuts a peer off for breaking a rule, and bans it.
    fn offense(&mut self, conn: ConnId, reason: Offense, detail: String, now: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let peer = c.peer.clone();
        let ban = self.bans.entry(peer.name().to_owned()).or_insert(Ban {
            until: 0,
            strikes: 0,
        });
        let shift = ban.strikes.min(20);
        ban.strikes = ban.strikes.saturating_add(1);
        ban.until = now
            + self
                .config
                .ban_base_ms
                .saturating_mul(1 << shift)
                .min(self.config.ban_max_ms);
        let banned_until = ban.until;
        self.actions.push_back(Action::Event(Event::Rejected {
            peer,
            reason,
            detail: detail.clone(),
            banned_until,
        }));
        self.close(conn, format!("{reason}: {detail}"), now);
    }

    fn close(&mut self, conn: ConnId, reason: String, now: u64) {
        if self.conns.contains_key(&conn) {
            self.actions.push_back(Action::Close {
                conn,
                reason: reason.clone(),
            });
            self.forget(conn, &reason, now);
        }
    }

    fn forget(&mut self, conn: ConnId, reason: &str, now: u64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(addr) = &c.dialed {
            self.pending_dials.remove(addr);
        }
        let failed: Vec<FetchId> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for f in failed {
            self.fail_fetch(f, format!("connection closed: {reason}"));
        }
        if c.hello {
            self.actions
                .push_back(Action::Event(Event::PeerDown { conn, peer: c.peer }));
        }
        self.maybe_start_fetches(now);
    }
}

/// A plain answer and its size for reply budgets.
fn either_found(f: Found) -> (usize, Result<Found, EntryFound>) {
    (f.bytes.as_ref().map_or(0, Vec::len) + 128, Ok(f))
}

/// An entry answer and its size for reply budgets.
fn either_entry(e: EntryFound) -> (usize, Result<Found, EntryFound>) {
    (e.1.as_ref().map_or(0, Vec::len) + 16, Err(e))
}

/// Checks a peer's want before it is served: compact items only on a
/// version 3 connection, ranges well-formed and within the limits, and
/// the objects named by all of them within `max_objects_per_want`.
fn check_want(items: &[Item], version: u32, limits: &MeshLimits) -> Result<(), (BadWant, String)> {
    let mut total = 0usize;
    let mut blobs = 0usize;
    for item in items {
        if let Item::Blob(b) = item {
            if version < BLOB_PROTOCOL_VERSION {
                return Err((
                    BadWant::NotNegotiated,
                    format!("blob want on a version {version} connection"),
                ));
            }
            blobs += 1;
            if blobs > 1 {
                return Err((BadWant::BadBlobRange, "more than one blob in a want".into()));
            }
            check_blob_range(b, limits).map_err(|bad| {
                (
                    bad,
                    format!(
                        "blob {} range {}+{} (at most {} bytes)",
                        b.digest, b.offset, b.length, limits.max_blob_piece
                    ),
                )
            })?;
            continue;
        }
        let Item::Entries(e) = item else { continue };
        if version < 3 {
            return Err((
                BadWant::NotNegotiated,
                format!("compact want on a version {version} connection"),
            ));
        }
        let n = e.check(limits).map_err(|b| {
            (
                b,
                format!(
                    "{} ranges for bundle {} (limits: {} ranges, {} objects)",
                    e.ranges.len(),
                    e.bundle,
                    limits.max_ranges_per_want,
                    limits.max_objects_per_want
                ),
            )
        })?;
        total += n;
        if total > limits.max_objects_per_want {
            return Err((
                BadWant::TooManyObjects,
                format!(
                    "want names {total} objects (limit {})",
                    limits.max_objects_per_want
                ),
            ));
        }
    }
    Ok(())
}

/// A blob range is 1 to `max_blob_piece` bytes and ends within `u64`.
fn check_blob_range(b: &BlobRange, limits: &MeshLimits) -> Result<(), BadWant> {
    if b.length == 0
        || b.length > limits.max_blob_piece
        || b.offset.checked_add(u64::from(b.length)).is_none()
    {
        return Err(BadWant::BadBlobRange);
    }
    Ok(())
}

/// Whether `addr` may be dialed when learned from a peer (`Hello`, a
/// signed record, the persisted table): `host:port` with a port above 0
/// and either a DNS name or a unicast IP (not unspecified, multicast or
/// broadcast). Seeds from the configuration are the operator's choice.
pub fn is_dialable(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return false;
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            !(bracketed
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.octets()[0] == 0)
        }
        Ok(IpAddr::V6(ip)) => bracketed && !(ip.is_unspecified() || ip.is_multicast()),
        Err(_) => {
            !bracketed
                && !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !host.starts_with(['-', '.'])
        }
    }
}

fn is_unspecified_host(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.is_empty() || host == "0.0.0.0" || host == "::"
}

/// The address to dial a peer on: its `listen` address, with an
/// unspecified host replaced by the IP we see it on.
fn advertised_addr(listen: &str, remote_ip: Option<&str>) -> Option<String> {
    let (_, port) = listen.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    if !is_unspecified_host(listen) {
        return Some(listen.to_owned());
    }
    let ip = remote_ip?;
    if ip.contains(':') {
        Some(format!("[{ip}]:{port}"))
    } else {
        Some(format!("{ip}:{port}"))
    }
}

#[cfg(test)]
mod tests;
