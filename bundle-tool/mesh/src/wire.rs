//! Mesh messages and their frames.
//!
//! A frame is a 4-byte big-endian body length followed by that many bytes
//! of CBOR ([`cairn_keys::codec`]) encoding one [`Message`]. The length is
//! checked against [`MeshLimits::max_frame_bytes`] before the body is
//! allocated. Ids are typed ([`ChannelName`], [`Address`], [`BundleId`],
//! [`AgentId`], each the bare CBOR text string): a malformed one is refused
//! while decoding, as an invalid message naming its field. Every decoded
//! message is then checked by [`Message::validate`] (counts, string
//! lengths, the heads' and records' ids) before the protocol sees it.
//!
//! Protocol versions are carried in [`Hello`]: a sender names the oldest
//! ([`Hello::version`]) and the newest ([`Hello::max_version`]) version it
//! speaks; a connection speaks the newest both sides know, and a peer with
//! no version in common is disconnected. This build speaks
//! [`MIN_PROTOCOL_VERSION`] (2) to [`PROTOCOL_VERSION`] (3); version 3 adds
//! compact wants ([`Item::Entries`]) answered over several `Data` frames
//! ([`Message::Data`]'s `more`) and digest-first status gossip
//! ([`Message::StatusDigest`]); version 4 adds image blobs in ranges
//! ([`Item::Blob`]).

use crate::MeshLimits;
use cairn_core::bundle::is_address;
use cairn_core::release::validate_channel;
use cairn_core::{Address, AgentId, BundleId, ChannelName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

/// The newest mesh protocol version spoken by this build. Version 2:
/// status records are signed by the agent they describe ([`SignedStatus`])
/// and carry its `listen` address; the unsigned `Peers` message of version
/// 1 is gone (addresses travel only inside signed records). Version 3:
/// compact wants ([`Item::Entries`], answered over several `Data` frames)
/// and digest-first status gossip ([`Message::StatusDigest`]). Version 4:
/// container image blobs by byte range ([`Item::Blob`]).
pub const PROTOCOL_VERSION: u32 = 4;
/// The first protocol version with [`Item::Blob`].
pub const BLOB_PROTOCOL_VERSION: u32 = 4;
/// The oldest mesh protocol version spoken by this build: what goes into
/// [`Hello::version`], so that version 2 agents (which disconnect any
/// other `version`) still talk to this one, with per-object wants.
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// Domain separator of status record signatures: the signed message is
/// these bytes followed by the record's CBOR bytes exactly as carried.
pub const STATUS_SIGNATURE_DOMAIN: &[u8] = b"cairn-mesh-status-record-v2\0";
/// Bytes of the frame length prefix.
pub const HEADER_BYTES: usize = 4;

/// Errors reading, writing or validating frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame announced or carried more than the limit.
    #[error("frame of {actual} bytes is over the limit of {limit}")]
    Oversized {
        /// The limit.
        limit: u32,
        /// The announced or actual size.
        actual: u64,
    },
    /// The body is not a CBOR message.
    #[error("undecodable frame: {0}")]
    Garbage(String),
    /// The message decoded but breaks a rule.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The stream ended.
    #[error("connection closed")]
    Closed,
    /// The stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// A short, stable reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Oversized { .. } => "oversized_frame",
            WireError::Garbage(_) => "garbage",
            WireError::Invalid(_) => "invalid_message",
            WireError::Closed => "closed",
            WireError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
            WireError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => "timeout",
            WireError::Io(_) => "io",
        }
    }
}

/// The first message on every connection, both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The oldest protocol version the sender speaks (a version 2 agent
    /// sends and requires exactly 2; this build sends
    /// [`MIN_PROTOCOL_VERSION`]).
    pub version: u32,
    /// The address the sender accepts mesh connections on (`host:port`),
    /// if it listens. An unspecified host (`0.0.0.0`) means "the address
    /// you see me on".
    pub listen: Option<String>,
    /// The newest protocol version the sender speaks (absent: `version`).
    /// Added in version 3; version 2 agents skip the unknown key.
    #[serde(default)]
    pub max_version: Option<u32>,
}

impl Hello {
    /// This build's hello: versions [`MIN_PROTOCOL_VERSION`] to
    /// [`PROTOCOL_VERSION`].
    pub fn new(listen: Option<String>) -> Self {
        Hello::speaking(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, listen)
    }

    /// A hello for versions `min` to `max` (tests and simulations of older
    /// agents use `max` 2, which omits `max_version` as a version 2 agent
    /// does).
    pub fn speaking(min: u32, max: u32, listen: Option<String>) -> Self {
        Hello {
            version: min,
            listen,
            max_version: (max > min).then_some(max),
        }
    }

    /// The newest version the sender speaks.
    pub fn newest(&self) -> u32 {
        self.max_version.unwrap_or(self.version).max(self.version)
    }

    /// The version a connection between a sender of this hello and a node
    /// speaking `min..=max` speaks: the newest both know, if any.
    pub fn common_version(&self, min: u32, max: u32) -> Option<u32> {
        let v = self.newest().min(max);
        (v >= self.version.max(min)).then_some(v)
    }
}

/// A channel head: the newest verified release a node holds for a channel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Head {
    /// The channel.
    pub channel: String,
    /// The release's sequence.
    pub sequence: u64,
    /// The release's bundle id.
    pub bundle: String,
    /// The version of the newest trust root the node holds.
    pub root_version: u64,
}

/// Something one node asks another for, named as in a bundle repository.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Item {
    /// `roots/<version>`: a signed root envelope.
    Root(u64),
    /// `channels/<channel>`: the head release envelope of a channel.
    Release(ChannelName),
    /// `objects/sha256/..`: an object by address.
    Object(Address),
    /// Protocol version 3: the objects of a bundle's entries, by their
    /// index in the bundle's entry order. Answered with one
    /// [`Item::Object`] item per entry (over as many `Data` frames as
    /// needed); a sender that does not hold the bundle answers this item
    /// itself with no bytes.
    Entries(EntryRanges),
    /// Protocol version 4: a byte range of a container image blob (an
    /// image list's index, manifest, config or layer, or the image list
    /// itself) the sender holds for a release it adopted or staged.
    /// Answered by one [`Found`] naming this item, with at most `length`
    /// bytes from `offset` (fewer only at the blob's end), or no bytes
    /// when the sender does not serve that blob.
    Blob(BlobRange),
}

/// A byte range of an image blob ([`Item::Blob`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobRange {
    /// The blob's digest (`sha256:<64 lower-case hex>`: image blob
    /// digests are content addresses, [`cairn_core::images`]).
    pub digest: Address,
    /// The first byte wanted.
    pub offset: u64,
    /// Bytes wanted, 1 to [`MeshLimits::max_blob_piece`].
    pub length: u32,
}

impl Item {
    /// The item's path in the repository layout (for entries: the
    /// bundle's manifest).
    pub fn path(&self) -> String {
        match self {
            Item::Root(v) => cairn_core::layout::root_path(*v),
            Item::Release(c) => cairn_core::layout::channel_path(c),
            Item::Object(a) => cairn_core::layout::object_path(a),
            Item::Entries(e) => cairn_core::layout::object_path(e.bundle.as_address()),
            Item::Blob(b) => cairn_core::layout::object_path(&b.digest),
        }
    }
}

/// Entries of a bundle by index ([`Item::Entries`]): `ranges` are
/// `[start, count]` pairs over the bundle's entry order (the order of its
/// manifest's entries), ascending and not overlapping, each `count` at
/// least 1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryRanges {
    /// The bundle id.
    pub bundle: BundleId,
    /// `[start, count]` pairs.
    pub ranges: Vec<(u32, u32)>,
}

/// One answered entry of an [`Item::Entries`] want: its index and its
/// object's bytes, or no bytes when the sender lacks that object. Encoded
/// as a two-element array: about 7 bytes of framing per object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryFound(
    /// The entry's index in the bundle's entry order.
    pub u32,
    /// The object's bytes, if held.
    #[serde(with = "serde_bytes")]
    pub Option<Vec<u8>>,
);

/// Why a want is refused (the peer that sent it is cut off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadWant {
    /// More ranges than [`MeshLimits::max_ranges_per_want`].
    TooManyRanges,
    /// More objects than [`MeshLimits::max_objects_per_want`].
    TooManyObjects,
    /// A range of count 0, ranges out of order or overlapping, or one
    /// that runs past `u32::MAX`.
    MalformedRange,
    /// An index at or past the bundle's number of entries.
    IndexOutOfRange,
    /// A compact want on a connection that did not agree on version 3,
    /// or a blob want on one that did not agree on version 4.
    NotNegotiated,
    /// A blob range of length 0 or over [`MeshLimits::max_blob_piece`],
    /// one that runs past `u64::MAX`, or more than one blob item in a
    /// want.
    BadBlobRange,
}

impl BadWant {
    /// A short, stable label (the metric label).
    pub fn label(self) -> &'static str {
        match self {
            BadWant::TooManyRanges => "want_too_many_ranges",
            BadWant::TooManyObjects => "want_too_many_objects",
            BadWant::MalformedRange => "want_malformed_range",
            BadWant::IndexOutOfRange => "want_index_out_of_range",
            BadWant::NotNegotiated => "want_not_negotiated",
            BadWant::BadBlobRange => "want_bad_blob_range",
        }
    }
}

impl EntryRanges {
    /// Run-length ranges over sorted, distinct `indices`, at most
    /// `max_ranges` of them: returns the ranges and how many indices they
    /// cover (a prefix of `indices`).
    pub fn compress(indices: &[u32], max_ranges: usize) -> (Vec<(u32, u32)>, usize) {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0;
        for &i in indices {
            let full = ranges.len() >= max_ranges;
            match ranges.last_mut() {
                Some((start, count)) if start.checked_add(*count) == Some(i) => *count += 1,
                _ if full => break,
                _ => ranges.push((i, 1)),
            }
            covered += 1;
        }
        (ranges, covered)
    }

    /// The number of entries named, checked against `limits`: ranges
    /// ascending, non-overlapping, non-empty, within `u32`, at most
    /// `max_ranges_per_want` ranges and `max_objects_per_want` entries.
    /// Constant memory, work linear in the number of ranges.
    pub fn check(&self, limits: &MeshLimits) -> Result<usize, BadWant> {
        if self.ranges.len() > limits.max_ranges_per_want {
            return Err(BadWant::TooManyRanges);
        }
        let mut next: u64 = 0;
        let mut total: u64 = 0;
        for &(start, count) in &self.ranges {
            let end = u64::from(start) + u64::from(count);
            if count == 0 || u64::from(start) < next || end > u64::from(u32::MAX) + 1 {
                return Err(BadWant::MalformedRange);
            }
            next = end;
            total += u64::from(count);
            if total > limits.max_objects_per_want as u64 {
                return Err(BadWant::TooManyObjects);
            }
        }
        Ok(total as usize)
    }

    /// The indices named, in order, refusing any at or past `entries`
    /// (check the ranges with [`EntryRanges::check`] first: this allocates
    /// as many indices as they name).
    pub fn indices(&self, entries: usize) -> Result<Vec<usize>, BadWant> {
        let mut out = Vec::new();
        for &(start, count) in &self.ranges {
            let (start, count) = (start as usize, count as usize);
            if start.saturating_add(count) > entries {
                return Err(BadWant::IndexOutOfRange);
            }
            out.extend(start..start + count);
        }
        Ok(out)
    }
}

/// One answered item. `bytes` is `None` when the sender does not hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    /// What was asked for.
    pub item: Item,
    /// Its bytes, if held.
    #[serde(with = "serde_bytes")]
    pub bytes: Option<Vec<u8>>,
}

/// A compact status record about one agent, gossiped fleet-wide inside a
/// [`SignedStatus`] signed by that agent. The newest (`time`) verified
/// record per agent wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The agent it describes.
    pub agent_id: AgentId,
    /// Its channel.
    pub channel: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Adopted release sequence (0: none).
    pub sequence: u64,
    /// Adopted bundle id (empty: none).
    pub bundle: String,
    /// Health: `healthy`, `progressing`, `degraded`, `failed`, `unknown`.
    /// `failed` means the adopted release failed its health checks and was
    /// rolled back; it counts towards the release's rollout circuit breaker.
    pub health: String,
    /// When the agent produced the record, Unix milliseconds.
    pub time: u64,
    /// Rollout state (waiting for a wave, breaker, local hold). Added
    /// within protocol version 1 as an optional field: records from older
    /// agents decode with `None`, and older agents ignore it.
    #[serde(default)]
    pub rollout: Option<RolloutRecord>,
    /// The address (`host:port`) the agent accepts mesh connections on,
    /// if it listens on a specified host: how peers learn where to dial
    /// it (signed by the agent, so nobody else can point it elsewhere).
    #[serde(default)]
    pub listen: Option<String>,
    /// The digest (`sha256:<hex>`) of the per-site values the agent filled
    /// into the adopted release (docs/SITES.md); `None` when the release
    /// declares no values. Optional like `rollout`: older agents' records
    /// decode with `None` (their signatures cover their own bytes, so they
    /// still verify), and older agents ignore it.
    #[serde(default)]
    pub values_digest: Option<String>,
}

/// A status record as gossiped: its CBOR bytes, the certificate (DER) of
/// the agent it describes and that agent's signature over
/// [`STATUS_SIGNATURE_DOMAIN`] ‖ `record`. Receivers verify the
/// certificate against the fleet CA, that it names the record's agent id,
/// and the signature, before the record counts for anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatus {
    /// The CBOR encoding of a [`StatusRecord`], signed as is.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
    /// The author's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub cert: Vec<u8>,
    /// The author's signature (ECDSA P-256 SHA-256, ASN.1 DER, for the
    /// X.509 keys `cairn mesh issue` makes).
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

impl SignedStatus {
    /// The bytes a signature covers: the domain separator, then the
    /// record's bytes.
    pub fn signed_message(record: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(STATUS_SIGNATURE_DOMAIN.len() + record.len());
        m.extend_from_slice(STATUS_SIGNATURE_DOMAIN);
        m.extend_from_slice(record);
        m
    }

    /// Decodes and validates the record (sizes were checked with the
    /// message). Says nothing about who wrote it: verify the signature.
    pub fn decode_record(&self, limits: &MeshLimits) -> Result<StatusRecord, WireError> {
        let r: StatusRecord =
            cairn_keys::codec::decode("status record", &self.record, limits.max_record_bytes)
                .map_err(|e| WireError::Invalid(e.to_string()))?;
        validate_record(&r, limits)?;
        Ok(r)
    }
}

/// A [`SignedStatus`] as messages carry it and endpoints hold it: shared
/// (cloning is a reference count, so a record relayed to many peers or held
/// in a table is one allocation) and immutable, with its record decoded at
/// most once. The decoded record is a pure function of the bytes, so it is
/// cached beside them; the size limit and [`validate_record`] are applied
/// again on every [`SharedStatus::decoded`], against the caller's limits.
/// On the wire it is exactly a [`SignedStatus`].
#[derive(Clone)]
pub struct SharedStatus(Arc<SharedInner>);

struct SharedInner {
    signed: SignedStatus,
    /// The record decoded from `signed.record` (or why it does not decode).
    decoded: OnceLock<Result<Arc<StatusRecord>, String>>,
    /// [`cairn_core::rollout::status_sample_rank`] of the decoded record's
    /// agent id, computed once.
    rank: OnceLock<u64>,
}

impl SharedStatus {
    /// A record we signed ourselves: its decoded form is the record we
    /// encoded (no decoding needed).
    pub fn with_record(signed: SignedStatus, record: Arc<StatusRecord>) -> Self {
        Self(Arc::new(SharedInner {
            signed,
            decoded: OnceLock::from(Ok(record)),
            rank: OnceLock::new(),
        }))
    }

    /// The signed form (what the signature covers and what is sent).
    pub fn signed(&self) -> &SignedStatus {
        &self.0.signed
    }

    /// The record, decoded once and validated against `limits` (as
    /// [`SignedStatus::decode_record`]). Says nothing about who wrote it.
    pub fn decoded(&self, limits: &MeshLimits) -> Result<&Arc<StatusRecord>, WireError> {
        let bytes = &self.0.signed.record;
        if bytes.len() > limits.max_record_bytes {
            return Err(WireError::Invalid(format!(
                "status record of {} bytes (limit {})",
                bytes.len(),
                limits.max_record_bytes
            )));
        }
        let decoded = self.0.decoded.get_or_init(|| {
            cairn_keys::codec::decode::<StatusRecord>("status record", bytes, bytes.len())
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        let r = decoded
            .as_ref()
            .map_err(|e| WireError::Invalid(e.clone()))?;
        validate_record(r, limits)?;
        Ok(r)
    }

    /// The status sample rank
    /// ([`cairn_core::rollout::status_sample_rank`]) of the record's agent
    /// id, computed once per record; `None` until
    /// [`SharedStatus::decoded`] has decoded it (or if it does not decode).
    pub fn sample_rank(&self) -> Option<u64> {
        let r = self.0.decoded.get()?.as_ref().ok()?;
        Some(
            *self
                .0
                .rank
                .get_or_init(|| cairn_core::rollout::status_sample_rank(&r.agent_id)),
        )
    }
}

impl From<SignedStatus> for SharedStatus {
    fn from(signed: SignedStatus) -> Self {
        Self(Arc::new(SharedInner {
            signed,
            decoded: OnceLock::new(),
            rank: OnceLock::new(),
        }))
    }
}

impl std::ops::Deref for SharedStatus {
    type Target = SignedStatus;
    fn deref(&self) -> &SignedStatus {
        &self.0.signed
    }
}

impl std::fmt::Debug for SharedStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.signed.fmt(f)
    }
}

impl PartialEq for SharedStatus {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.signed == other.0.signed
    }
}

impl Eq for SharedStatus {}

impl PartialEq<SignedStatus> for SharedStatus {
    fn eq(&self, other: &SignedStatus) -> bool {
        self.0.signed == *other
    }
}

impl Serialize for SharedStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.signed.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SignedStatus::deserialize(d).map(Self::from)
    }
}

/// Checks a status record's fields against `limits`.
pub fn validate_record(r: &StatusRecord, limits: &MeshLimits) -> Result<(), WireError> {
    let bad = |s: String| Err(WireError::Invalid(s));
    let string = |what: &str, s: &str| {
        if s.len() > limits.max_string {
            bad(format!("{what} longer than {} bytes", limits.max_string))
        } else {
            Ok(())
        }
    };
    // `agent_id` is an `AgentId`: a malformed one was refused while
    // decoding ("bad agent id …").
    if !r.channel.is_empty() {
        validate_channel(&r.channel).map_err(WireError::Invalid)?;
    }
    if !r.bundle.is_empty() && !is_address(&r.bundle) {
        return bad("malformed bundle address in a status record".into());
    }
    string("health", &r.health)?;
    if let Some(ro) = &r.rollout {
        if !ro.pending_bundle.is_empty() && !is_address(&ro.pending_bundle) {
            return bad("malformed pending bundle address in a status record".into());
        }
        string("rollout state", &ro.state)?;
    }
    if r.labels.len() > limits.max_labels {
        return bad(format!("{} labels", r.labels.len()));
    }
    for (k, v) in &r.labels {
        string("label", k)?;
        string("label", v)?;
    }
    if let Some(l) = &r.listen {
        string("listen address", l)?;
    }
    if let Some(d) = &r.values_digest {
        if !is_address(d) {
            return bad("malformed values digest in a status record".into());
        }
    }
    Ok(())
}

/// An agent's rollout state in its [`StatusRecord`]: a newer verified
/// release it holds but has not adopted, and why; and its local hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The newer release not adopted: its sequence (0: none).
    pub pending_sequence: u64,
    /// Its bundle id (empty: none).
    pub pending_bundle: String,
    /// Why it is not adopted: `waiting` (wave not open), `breaker` (too
    /// many failures reported), `held` (local hold), `not-selected`;
    /// empty when nothing is pending.
    pub state: String,
    /// The wave (1-based) the agent falls in for it (0: none).
    pub wave: u32,
    /// When that wave opens, Unix seconds (0: not waiting).
    pub opens_at: u64,
    /// Whether a local hold (`cairn-agent hold`) is in place.
    pub held: bool,
    /// When the hold ends, Unix seconds (0: until released).
    pub held_until: u64,
}

/// A peer address and the agent id last seen there (the agent's persisted
/// peer table; no longer a wire message since protocol version 2).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its agent id, if the sender has connected to it.
    pub agent_id: Option<AgentId>,
    /// `host:port` to dial.
    pub addr: String,
}

/// A mesh message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Version and listening address; first on every connection.
    Hello(Hello),
    /// The sender's channel heads (only verified releases).
    Heads(Vec<Head>),
    /// A request for items, answered by one `Data` with the same id.
    Want {
        /// Request id, unique among the sender's open requests.
        id: u64,
        /// What is wanted.
        items: Vec<Item>,
    },
    /// The answer to a `Want`. Items left out (over the reply budget) may
    /// be asked for again.
    Data {
        /// The `Want` id.
        id: u64,
        /// The answers.
        items: Vec<Found>,
        /// Protocol version 3: more `Data` frames for the same want follow
        /// (the answer did not fit one frame). Absent (version 2): false.
        #[serde(default)]
        more: bool,
        /// Protocol version 3: answers to an [`Item::Entries`] want, by
        /// entry index (the receiver knows each index's address and checks
        /// the bytes against it). Absent (version 2): empty.
        #[serde(default)]
        entries: Vec<EntryFound>,
    },
    /// Protocol version 3: the status records the sender holds that it has
    /// not yet told the receiver about, as `(agent id, record time)` pairs.
    /// The receiver asks for those newer than its own with
    /// [`Message::StatusPull`].
    StatusDigest(Vec<(AgentId, u64)>),
    /// Protocol version 3: the agent ids whose records the sender wants
    /// (answered with a `Status` message).
    StatusPull(Vec<AgentId>),
    /// Signed status records (gossip, or the answer to `StatusRequest`).
    /// Peer exchange rides on them: each carries its author's address.
    Status(Vec<SharedStatus>),
    /// Asks for every status record the receiver holds (operator CLI).
    StatusRequest,
    /// The sender is closing, and why.
    Bye(String),
}

impl Message {
    /// A `Status` message of `records`.
    pub fn status<R: Into<SharedStatus>>(records: impl IntoIterator<Item = R>) -> Self {
        Message::Status(records.into_iter().map(Into::into).collect())
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Heads(_) => "heads",
            Message::Want { .. } => "want",
            Message::Data { .. } => "data",
            Message::Status(_) => "status",
            Message::StatusDigest(_) => "status_digest",
            Message::StatusPull(_) => "status_pull",
            Message::StatusRequest => "status_request",
            Message::Bye(_) => "bye",
        }
    }

    /// Checks counts, lengths and syntax against `limits`.
    pub fn validate(&self, limits: &MeshLimits) -> Result<(), WireError> {
        let bad = |s: String| Err(WireError::Invalid(s));
        let string = |what: &str, s: &str| {
            if s.len() > limits.max_string {
                Err(WireError::Invalid(format!(
                    "{what} longer than {} bytes",
                    limits.max_string
                )))
            } else {
                Ok(())
            }
        };
        let channel = |c: &str| validate_channel(c).map_err(WireError::Invalid);
        let address = |a: &str| {
            if is_address(a) {
                Ok(())
            } else {
                Err(WireError::Invalid(format!(
                    "malformed address `{}`",
                    a.escape_debug()
                )))
            }
        };
        // Channels, addresses, bundle ids and digests in items are typed,
        // checked while decoding ("want item Object: bad address …"); the
        // ranges of `Entries` and `Blob` are the endpoint's to check (a
        // clear ban reason).
        let item = |i: &Item| match i {
            Item::Root(0) => bad("root version 0".into()),
            _ => Ok(()),
        };
        match self {
            Message::Hello(h) => {
                if let Some(l) = &h.listen {
                    string("listen address", l)?;
                }
            }
            Message::Heads(hs) => {
                if hs.len() > limits.max_heads {
                    return bad(format!(
                        "{} heads, over the limit of {}",
                        hs.len(),
                        limits.max_heads
                    ));
                }
                for h in hs {
                    channel(&h.channel)?;
                    address(&h.bundle)?;
                    if h.sequence == 0 || h.root_version == 0 {
                        return bad("head with sequence or root version 0".into());
                    }
                }
            }
            Message::Want { items, .. } => {
                if items.is_empty() || items.len() > limits.max_items_per_want {
                    return bad(format!(
                        "want of {} items (1 to {} allowed)",
                        items.len(),
                        limits.max_items_per_want
                    ));
                }
                items.iter().try_for_each(item)?;
            }
            Message::Data { items, entries, .. } => {
                if items.len() > limits.max_items_per_want
                    || entries.len() > limits.max_objects_per_want
                {
                    return bad(format!(
                        "data with {} items and {} entries",
                        items.len(),
                        entries.len()
                    ));
                }
                items.iter().try_for_each(|f| item(&f.item))?;
            }
            Message::Status(rs) => {
                if rs.len() > limits.max_status_records {
                    return bad(format!("{} status records", rs.len()));
                }
                for r in rs {
                    if r.record.len() > limits.max_record_bytes
                        || r.cert.len() > limits.max_cert_bytes
                        || r.sig.len() > limits.max_signature_bytes
                    {
                        return bad(format!(
                            "signed status record of {}+{}+{} bytes (limits: record {}, certificate {}, signature {})",
                            r.record.len(),
                            r.cert.len(),
                            r.sig.len(),
                            limits.max_record_bytes,
                            limits.max_cert_bytes,
                            limits.max_signature_bytes
                        ));
                    }
                    r.decoded(limits)?;
                }
            }
            Message::StatusDigest(ds) => {
                // Agent ids are `AgentId`s, checked while decoding.
                if ds.len() > limits.max_status_records {
                    return bad(format!("status digest of {} records", ds.len()));
                }
            }
            Message::StatusPull(ids) => {
                // Agent ids are `AgentId`s, checked while decoding.
                if ids.len() > limits.max_status_records {
                    return bad(format!("status pull of {} records", ids.len()));
                }
            }
            Message::StatusRequest => {}
            Message::Bye(reason) => string("bye reason", reason)?,
        }
        Ok(())
    }
}

/// Encodes `msg` as one frame (length prefix and body), refusing bodies
/// over `limit`.
pub fn encode_frame(msg: &Message, limit: u32) -> Result<Vec<u8>, WireError> {
    let body = cairn_keys::codec::encode(msg);
    if body.len() as u64 > u64::from(limit) {
        return Err(WireError::Oversized {
            limit,
            actual: body.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The length of the frame [`encode_frame`] makes of `msg` (header and
/// body), counted without encoding it, with no limit applied; for callers
/// that only count bytes (the fleet simulator).
pub fn frame_len(msg: &Message) -> u64 {
    (HEADER_BYTES + cairn_keys::codec::encoded_len(msg)) as u64
}

/// The body length announced by a frame header, checked against `limit`
/// before anything is allocated.
pub fn body_len(header: [u8; HEADER_BYTES], limit: u32) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header);
    if len > limit {
        return Err(WireError::Oversized {
            limit,
            actual: u64::from(len),
        });
    }
    Ok(len as usize)
}

/// Decodes and validates a frame body.
pub fn decode_body(body: &[u8], limits: &MeshLimits) -> Result<Message, WireError> {
    let msg: Message =
        cairn_keys::codec::decode("mesh frame", body, limits.max_frame_bytes as usize).map_err(
            |e| match e {
                cairn_keys::Error::TooLarge { limit, actual, .. } => WireError::Oversized {
                    limit: limit as u32,
                    actual: actual as u64,
                },
                other => malformed_id(body, limits)
                    .unwrap_or_else(|| WireError::Garbage(other.to_string())),
            },
        )?;
    msg.validate(limits)?;
    Ok(msg)
}

/// The messages that carry typed ids, with every id as a bare string:
/// decoded only when a frame failed to decode, to tell a well-formed
/// message naming a malformed id (an invalid message naming the field, as
/// when ids were checked after decoding) from garbage. Fields not listed
/// are skipped.
#[derive(Deserialize)]
enum UntypedIds {
    Want { items: Vec<UntypedItem> },
    Data { items: Vec<UntypedFound> },
    StatusDigest(Vec<(String, u64)>),
    StatusPull(Vec<String>),
}

/// A [`Found`] with its item untyped (its bytes skipped).
#[derive(Deserialize)]
struct UntypedFound {
    item: UntypedItem,
}

/// An [`Item`] with its ids as bare strings.
#[derive(Deserialize)]
enum UntypedItem {
    Root(serde::de::IgnoredAny),
    Release(String),
    Object(String),
    Entries(UntypedBundle),
    Blob(UntypedDigest),
}

/// The id of an [`EntryRanges`] (its ranges skipped).
#[derive(Deserialize)]
struct UntypedBundle {
    bundle: String,
}

/// The id of a [`BlobRange`] (its range skipped).
#[derive(Deserialize)]
struct UntypedDigest {
    digest: String,
}

impl UntypedItem {
    /// The item's field name and the error of its malformed id, if any.
    fn malformed(&self) -> Option<(&'static str, cairn_core::ids::IdError)> {
        match self {
            UntypedItem::Root(_) => None,
            UntypedItem::Release(c) => ChannelName::parse(c).err().map(|e| ("Release", e)),
            UntypedItem::Object(a) => Address::parse(a).err().map(|e| ("Object", e)),
            UntypedItem::Entries(e) => BundleId::parse(&e.bundle)
                .err()
                .map(|e| ("Entries.bundle", e)),
            UntypedItem::Blob(b) => Address::parse(&b.digest).err().map(|e| ("Blob.digest", e)),
        }
    }
}

/// The invalid-message error for a message naming a malformed id (an
/// item of a want or an answer, an agent id of a digest or pull), if
/// `body` is one: `want item Object: bad address …`.
fn malformed_id(body: &[u8], limits: &MeshLimits) -> Option<WireError> {
    let limit = limits.max_frame_bytes as usize;
    let (what, e) = match cairn_keys::codec::decode::<UntypedIds>("mesh frame", body, limit).ok()? {
        UntypedIds::Want { items } => malformed_item("want", items.iter())?,
        UntypedIds::Data { items } => malformed_item("data", items.iter().map(|f| &f.item))?,
        UntypedIds::StatusDigest(d) => {
            malformed_agent_id("status digest", d.iter().map(|(id, _)| id))?
        }
        UntypedIds::StatusPull(p) => malformed_agent_id("status pull", p.iter())?,
    };
    Some(WireError::Invalid(format!("{what}: {e}")))
}

/// The first malformed id among `items`, named `<what> item <field>`.
fn malformed_item<'a>(
    what: &str,
    mut items: impl Iterator<Item = &'a UntypedItem>,
) -> Option<(String, cairn_core::ids::IdError)> {
    items.find_map(|i| {
        i.malformed()
            .map(|(field, e)| (format!("{what} item {field}"), e))
    })
}

/// The first malformed agent id among `ids`, named `what`.
fn malformed_agent_id<'a>(
    what: &str,
    mut ids: impl Iterator<Item = &'a String>,
) -> Option<(String, cairn_core::ids::IdError)> {
    ids.find_map(|id| AgentId::parse(id).err())
        .map(|e| (what.to_owned(), e))
}

/// Reads one frame from a blocking reader (the CLI; the agent reads
/// headers and bodies itself with tokio and calls [`body_len`] and
/// [`decode_body`]). End of stream before a header is [`WireError::Closed`].
pub fn read_frame(r: &mut impl Read, limits: &MeshLimits) -> Result<Message, WireError> {
    let mut header = [0u8; HEADER_BYTES];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(header, limits.max_frame_bytes)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(&body, limits)
}

/// Writes one frame to a blocking writer and flushes it.
pub fn write_frame(
    w: &mut impl Write,
    msg: &Message,
    limits: &MeshLimits,
) -> Result<(), WireError> {
    let frame = encode_frame(msg, limits.max_frame_bytes)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> MeshLimits {
        MeshLimits::default()
    }

    fn signed(r: &StatusRecord) -> SignedStatus {
        SignedStatus {
            record: cairn_keys::codec::encode(r),
            cert: vec![1; 16],
            sig: vec![2; 8],
        }
    }

    fn aid(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    /// A status record's shape before agent ids were typed (`agent_id` a
    /// bare string): what older agents sign, and what an attacker can
    /// put in the bytes.
    #[derive(Serialize)]
    struct UntypedRecord {
        agent_id: String,
        channel: String,
        labels: BTreeMap<String, String>,
        sequence: u64,
        bundle: String,
        health: String,
        time: u64,
        rollout: Option<RolloutRecord>,
        listen: Option<String>,
        values_digest: Option<String>,
    }

    fn untyped(agent_id: &str) -> UntypedRecord {
        UntypedRecord {
            agent_id: agent_id.into(),
            channel: "stable".into(),
            labels: [("site".to_string(), "north".to_string())].into(),
            sequence: 3,
            bundle: cairn_keys::sha256_address(b"x"),
            health: "healthy".into(),
            time: 5,
            rollout: Some(RolloutRecord {
                pending_sequence: 4,
                pending_bundle: cairn_keys::sha256_address(b"y"),
                state: "waiting".into(),
                wave: 2,
                opens_at: 9,
                held: false,
                held_until: 0,
            }),
            listen: Some("10.0.0.1:7440".into()),
            values_digest: Some(cairn_keys::sha256_address(b"v")),
        }
    }

    #[test]
    fn status_record_bytes_are_unchanged_by_the_typed_agent_id() {
        let old = untyped("edge-berlin-1");
        let new = StatusRecord {
            agent_id: aid("edge-berlin-1"),
            channel: old.channel.clone(),
            labels: old.labels.clone(),
            sequence: old.sequence,
            bundle: old.bundle.clone(),
            health: old.health.clone(),
            time: old.time,
            rollout: old.rollout.clone(),
            listen: old.listen.clone(),
            values_digest: old.values_digest.clone(),
        };
        let bytes = cairn_keys::codec::encode(&old);
        // What is signed is the same, byte for byte.
        assert_eq!(cairn_keys::codec::encode(&new), bytes);
        // The id itself: the key `agent_id`, then a text string of 13.
        let mut key_and_value = vec![0x68];
        key_and_value.extend_from_slice(b"agent_id");
        key_and_value.push(0x6d);
        key_and_value.extend_from_slice(b"edge-berlin-1");
        assert!(bytes
            .windows(key_and_value.len())
            .any(|w| w == key_and_value));
        let s = SignedStatus {
            record: bytes,
            cert: vec![1],
            sig: vec![2],
        };
        assert_eq!(s.decode_record(&lim()).unwrap(), new);
        // Digests and pulls encode an id as the bare string too.
        let typed = Message::StatusDigest(vec![(aid("a1"), 5)]);
        #[derive(Serialize)]
        enum Untyped {
            StatusDigest(Vec<(String, u64)>),
        }
        assert_eq!(
            cairn_keys::codec::encode(&typed),
            cairn_keys::codec::encode(&Untyped::StatusDigest(vec![("a1".into(), 5)]))
        );
    }

    /// A malformed agent id in a frame (a digest, a pull, a gossiped
    /// record) is refused with an error naming the agent id, never a
    /// panic, whatever its bytes.
    #[test]
    fn malformed_agent_ids_in_frames_are_refused_naming_the_field() {
        #[derive(Serialize)]
        enum Untyped {
            StatusDigest(Vec<(String, u64)>),
            StatusPull(Vec<String>),
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/../b",
            "\u{1b}[2J",
            &"a".repeat(129),
        ] {
            for body in [
                cairn_keys::codec::encode(&Untyped::StatusDigest(vec![(bad.into(), 5)])),
                cairn_keys::codec::encode(&Untyped::StatusPull(vec!["ok".into(), bad.into()])),
            ] {
                let err = decode_body(&body, &lim()).unwrap_err();
                assert!(matches!(err, WireError::Invalid(_)), "{err}");
                let text = err.to_string();
                assert!(text.contains("bad agent id"), "{bad:?}: {text}");
                assert!(
                    text.contains("status digest") || text.contains("status pull"),
                    "{text}"
                );
                assert!(!text.contains('\u{1b}'), "escaped: {text:?}");
                assert!(text.len() < 400, "{}", text.len());
            }
            let record = cairn_keys::codec::encode(&untyped(bad));
            let s = SignedStatus {
                record,
                cert: vec![1],
                sig: vec![2],
            };
            let err = s.decode_record(&lim()).unwrap_err();
            assert!(matches!(err, WireError::Invalid(_)), "{err}");
            assert!(err.to_string().contains("bad agent id"), "{bad:?}: {err}");
            let f = encode_frame(&Message::status(vec![s]), lim().max_frame_bytes).unwrap();
            let err = read_frame(&mut &f[..], &lim()).unwrap_err();
            assert!(matches!(err, WireError::Invalid(_)), "{err}");
        }
    }

    /// Wants and answers as they were before items were typed (channel,
    /// addresses, bundle id and blob digest bare strings): what older
    /// agents send, and what an attacker can put in the bytes.
    mod untyped {
        use serde::Serialize;

        #[derive(Serialize)]
        pub(super) enum Item {
            Root(u64),
            Release(String),
            Object(String),
            Entries(EntryRanges),
            Blob(BlobRange),
        }

        #[derive(Serialize)]
        pub(super) struct EntryRanges {
            pub(super) bundle: String,
            pub(super) ranges: Vec<(u32, u32)>,
        }

        #[derive(Serialize)]
        pub(super) struct BlobRange {
            pub(super) digest: String,
            pub(super) offset: u64,
            pub(super) length: u32,
        }

        #[derive(Serialize)]
        pub(super) struct Found {
            pub(super) item: Item,
            #[serde(with = "serde_bytes")]
            pub(super) bytes: Option<Vec<u8>>,
        }

        #[derive(Serialize)]
        pub(super) enum Message {
            Want {
                id: u64,
                items: Vec<Item>,
            },
            Data {
                id: u64,
                items: Vec<Found>,
                more: bool,
                entries: Vec<super::EntryFound>,
            },
        }
    }

    #[test]
    fn item_bytes_are_unchanged_by_the_typed_ids() {
        let a = cairn_keys::sha256_address(b"x");
        let d = cairn_keys::sha256_address(b"layer");
        let old_items = || {
            vec![
                untyped::Item::Root(2),
                untyped::Item::Release("stable".into()),
                untyped::Item::Object(a.clone()),
                untyped::Item::Entries(untyped::EntryRanges {
                    bundle: a.clone(),
                    ranges: vec![(0, 5), (9, 1)],
                }),
                untyped::Item::Blob(untyped::BlobRange {
                    digest: d.clone(),
                    offset: 1 << 20,
                    length: 1 << 20,
                }),
            ]
        };
        let new_items = || {
            vec![
                Item::Root(2),
                Item::Release(ChannelName::parse("stable").unwrap()),
                Item::Object(Address::parse(&a).unwrap()),
                Item::Entries(EntryRanges {
                    bundle: BundleId::parse(&a).unwrap(),
                    ranges: vec![(0, 5), (9, 1)],
                }),
                Item::Blob(BlobRange {
                    digest: Address::parse(&d).unwrap(),
                    offset: 1 << 20,
                    length: 1 << 20,
                }),
            ]
        };
        let old_want = untyped::Message::Want {
            id: 7,
            items: old_items(),
        };
        let new_want = Message::Want {
            id: 7,
            items: new_items(),
        };
        let old_data = untyped::Message::Data {
            id: 7,
            items: old_items()
                .into_iter()
                .map(|item| untyped::Found {
                    item,
                    bytes: Some(b"x".to_vec()),
                })
                .collect(),
            more: true,
            entries: vec![EntryFound(3, None)],
        };
        let new_data = Message::Data {
            id: 7,
            items: new_items()
                .into_iter()
                .map(|item| Found {
                    item,
                    bytes: Some(b"x".to_vec()),
                })
                .collect(),
            more: true,
            entries: vec![EntryFound(3, None)],
        };
        let limit = lim().max_frame_bytes;
        for (old, new) in [(&old_want, &new_want), (&old_data, &new_data)] {
            let old_frame = {
                let body = cairn_keys::codec::encode(old);
                let mut f = (body.len() as u32).to_be_bytes().to_vec();
                f.extend_from_slice(&body);
                f
            };
            // What goes on the wire is the same, byte for byte, ...
            assert_eq!(encode_frame(new, limit).unwrap(), old_frame);
            // ... and what an older agent sends decodes to the typed items.
            assert_eq!(&read_frame(&mut &old_frame[..], &lim()).unwrap(), new);
        }
        // An id itself: a text string (`Object`, then 71 characters).
        let bytes = cairn_keys::codec::encode(&new_items()[2]);
        let mut key_and_value = vec![0x66];
        key_and_value.extend_from_slice(b"Object");
        key_and_value.extend_from_slice(&[0x78, 71]);
        key_and_value.extend_from_slice(a.as_bytes());
        assert_eq!(bytes[1..], key_and_value[..]);
    }

    /// A malformed channel, address, bundle id or blob digest in an item
    /// of a want or an answer is refused while decoding, as an invalid
    /// message naming the item's field, never a panic, whatever its bytes.
    #[test]
    fn malformed_ids_in_items_are_refused_naming_the_field() {
        let good = cairn_keys::sha256_address(b"x");
        let long = "a".repeat(10_000);
        let bad_addresses = [
            "",
            "sha256:../../etc/passwd",
            "sha256:\u{1b}[2J",
            &good.to_uppercase(),
            &good[..good.len() - 1],
            &long,
        ];
        let mut cases: Vec<(untyped::Item, &str, &str)> = Vec::new();
        for bad in ["", "-x", "../x", "Stable", "\u{1b}[2J", &long] {
            cases.push((untyped::Item::Release(bad.into()), "Release", "bad channel"));
        }
        for bad in bad_addresses {
            cases.push((untyped::Item::Object(bad.into()), "Object", "bad address"));
            cases.push((
                untyped::Item::Entries(untyped::EntryRanges {
                    bundle: bad.into(),
                    ranges: vec![(0, 1)],
                }),
                "Entries.bundle",
                "bad bundle id",
            ));
            cases.push((
                untyped::Item::Blob(untyped::BlobRange {
                    digest: bad.into(),
                    offset: 0,
                    length: 1,
                }),
                "Blob.digest",
                "bad address",
            ));
        }
        for (bad, field, kind) in cases {
            let want = untyped::Message::Want {
                id: 1,
                // A good item first: the malformed one is found wherever it is.
                items: vec![untyped::Item::Object(good.clone()), bad],
            };
            let body = cairn_keys::codec::encode(&want);
            let untyped::Message::Want { items, .. } = want else {
                unreachable!()
            };
            let data = untyped::Message::Data {
                id: 1,
                items: items
                    .into_iter()
                    .map(|item| untyped::Found {
                        item,
                        bytes: Some(vec![0; 32]),
                    })
                    .collect(),
                more: false,
                entries: vec![],
            };
            for (what, body) in [("want", body), ("data", cairn_keys::codec::encode(&data))] {
                let err = decode_body(&body, &lim()).unwrap_err();
                assert!(matches!(err, WireError::Invalid(_)), "{err}");
                assert_eq!(err.reason(), "invalid_message");
                let text = err.to_string();
                assert!(
                    text.contains(&format!("{what} item {field}: {kind}")),
                    "{text}"
                );
                assert!(!text.contains('\u{1b}'), "escaped: {text:?}");
                assert!(text.len() < 400, "{}", text.len());
                let mut f = (body.len() as u32).to_be_bytes().to_vec();
                f.extend_from_slice(&body);
                let err = read_frame(&mut &f[..], &lim()).unwrap_err();
                assert!(matches!(err, WireError::Invalid(_)), "{err}");
            }
        }
        // A want that is not one at all stays garbage.
        #[derive(Serialize)]
        enum NotAWant {
            Want { id: String },
        }
        let body = cairn_keys::codec::encode(&NotAWant::Want { id: "x".into() });
        assert_eq!(decode_body(&body, &lim()).unwrap_err().reason(), "garbage");
    }

    fn sample() -> Vec<Message> {
        let a = cairn_keys::sha256_address(b"x");
        vec![
            Message::Hello(Hello::new(Some("127.0.0.1:7440".into()))),
            Message::Heads(vec![Head {
                channel: "stable".into(),
                sequence: 3,
                bundle: a.clone(),
                root_version: 1,
            }]),
            Message::Want {
                id: 7,
                items: vec![
                    Item::Root(2),
                    Item::Release(ChannelName::parse("stable").unwrap()),
                    Item::Object(Address::of(b"x")),
                ],
            },
            Message::Data {
                id: 7,
                items: vec![
                    Found {
                        item: Item::Object(Address::of(b"x")),
                        bytes: Some(b"x".to_vec()),
                    },
                    Found {
                        item: Item::Root(2),
                        bytes: None,
                    },
                ],
                more: true,
                entries: vec![EntryFound(3, Some(b"y".to_vec())), EntryFound(4, None)],
            },
            Message::Want {
                id: 8,
                items: vec![Item::Entries(EntryRanges {
                    bundle: BundleId::parse(&a).unwrap(),
                    ranges: vec![(0, 5), (9, 1)],
                })],
            },
            Message::Want {
                id: 9,
                items: vec![Item::Blob(BlobRange {
                    digest: Address::of(b"layer"),
                    offset: 1 << 20,
                    length: 1 << 20,
                })],
            },
            Message::StatusDigest(vec![(aid("a1"), 5)]),
            Message::StatusPull(vec![aid("a1")]),
            Message::status(vec![signed(&StatusRecord {
                agent_id: aid("a1"),
                channel: "stable".into(),
                labels: [("site".to_string(), "north".to_string())].into(),
                sequence: 3,
                bundle: a,
                health: "healthy".into(),
                time: 5,
                rollout: None,
                listen: Some("10.0.0.1:7440".into()),
                values_digest: None,
            })]),
            Message::StatusRequest,
            Message::Bye("done".into()),
        ]
    }

    #[test]
    fn frame_len_is_the_encoded_frames_length_for_every_frame_kind() {
        let mut kinds = std::collections::BTreeSet::new();
        let mut messages = sample();
        // Sizes across CBOR's length widths (1, 2, 4 bytes of length).
        for n in [0usize, 23, 24, 255, 256, 65_535, 65_536, 300_000] {
            messages.push(Message::Data {
                id: n as u64,
                items: vec![Found {
                    item: Item::Object(Address::of(b"x")),
                    bytes: Some(vec![7; n]),
                }],
                more: n % 2 == 0,
                entries: vec![EntryFound(n as u32, Some(vec![1; n / 3]))],
            });
            messages.push(Message::Bye("b".repeat(n.min(4096))));
        }
        for m in &messages {
            kinds.insert(m.kind());
            let f = encode_frame(m, u32::MAX).unwrap();
            assert_eq!(frame_len(m), f.len() as u64, "{}", m.kind());
        }
        let all = [
            "hello",
            "heads",
            "want",
            "data",
            "status",
            "status_digest",
            "status_pull",
            "status_request",
            "bye",
        ];
        assert_eq!(kinds, all.into_iter().collect());
    }

    #[test]
    fn frames_round_trip() {
        for m in sample() {
            let f = encode_frame(&m, lim().max_frame_bytes).unwrap();
            let back = read_frame(&mut &f[..], &lim()).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let header = (lim().max_frame_bytes + 1).to_be_bytes();
        // Only the header exists: the reader must fail on the length alone.
        let err = read_frame(&mut &header[..], &lim()).unwrap_err();
        assert!(
            matches!(err, WireError::Oversized { actual, .. } if actual == u64::from(lim().max_frame_bytes) + 1)
        );
        let err = read_frame(&mut &u32::MAX.to_be_bytes()[..], &lim()).unwrap_err();
        assert_eq!(err.reason(), "oversized_frame");
        // And the sender refuses to build one.
        let big = Message::Bye("x".repeat(100));
        assert!(matches!(
            encode_frame(&big, 10),
            Err(WireError::Oversized { limit: 10, .. })
        ));
    }

    #[test]
    fn garbage_is_refused() {
        let mut f = 5u32.to_be_bytes().to_vec();
        f.extend_from_slice(&[0xff, 0x00, 0x13, 0x37, 0x99]);
        let err = read_frame(&mut &f[..], &lim()).unwrap_err();
        assert!(matches!(err, WireError::Garbage(_)), "{err}");
        // A valid CBOR value that is not a message.
        let body = cairn_keys::codec::encode(&42u32);
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        assert!(matches!(
            read_frame(&mut &f[..], &lim()),
            Err(WireError::Garbage(_))
        ));
        // Truncated body.
        let f = encode_frame(&sample()[1], lim().max_frame_bytes).unwrap();
        assert!(matches!(
            read_frame(&mut &f[..f.len() - 1], &lim()),
            Err(WireError::Io(_))
        ));
        // Nothing at all: closed.
        assert!(matches!(
            read_frame(&mut &[][..], &lim()),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn invalid_messages_are_refused() {
        let cases = vec![
            Message::Want {
                id: 1,
                items: vec![Item::Root(0)],
            },
            Message::Want {
                id: 1,
                items: vec![],
            },
            Message::Want {
                id: 1,
                items: vec![Item::Root(1); lim().max_items_per_want + 1],
            },
            Message::Heads(vec![Head {
                channel: "../x".into(),
                sequence: 1,
                bundle: cairn_keys::sha256_address(b""),
                root_version: 1,
            }]),
            Message::status(vec![SignedStatus {
                record: cairn_keys::codec::encode(&UntypedRecord {
                    agent_id: "bad id".into(),
                    channel: String::new(),
                    labels: BTreeMap::new(),
                    sequence: 0,
                    bundle: String::new(),
                    health: String::new(),
                    time: 0,
                    rollout: None,
                    listen: None,
                    values_digest: None,
                }),
                cert: vec![1; 16],
                sig: vec![2; 8],
            }]),
            // A certificate over the cap.
            Message::status(vec![SignedStatus {
                cert: vec![0; lim().max_cert_bytes + 1],
                ..signed(&StatusRecord {
                    agent_id: aid("a1"),
                    channel: String::new(),
                    labels: BTreeMap::new(),
                    sequence: 0,
                    bundle: String::new(),
                    health: String::new(),
                    time: 0,
                    rollout: None,
                    listen: None,
                    values_digest: None,
                })
            }]),
            // Record bytes that are not a record.
            Message::status(vec![SignedStatus {
                record: vec![0xff; 8],
                cert: vec![],
                sig: vec![],
            }]),
        ];
        for m in cases {
            let f = encode_frame(&m, lim().max_frame_bytes).unwrap();
            let err = read_frame(&mut &f[..], &lim()).unwrap_err();
            assert!(matches!(err, WireError::Invalid(_)), "{m:?}: {err}");
        }
    }

    #[test]
    fn a_shared_record_decodes_once_and_is_checked_against_every_callers_limits() {
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_string(), "z1".to_string());
        labels.insert("rack".to_string(), "r7".to_string());
        let r = StatusRecord {
            agent_id: "a1".parse().unwrap(),
            channel: "stable".into(),
            labels,
            sequence: 3,
            bundle: cairn_keys::sha256_address(b"m"),
            health: "healthy".into(),
            time: 5,
            rollout: None,
            listen: Some("n1:7440".into()),
            values_digest: None,
        };
        let shared = SharedStatus::from(signed(&r));
        let relayed = shared.clone();
        // No rank before the record is decoded; after, its agent id's.
        assert_eq!(shared.sample_rank(), None);
        let once = shared.decoded(&lim()).unwrap();
        assert_eq!(**once, r);
        let rank = cairn_core::rollout::status_sample_rank(&r.agent_id);
        assert_eq!(relayed.sample_rank(), Some(rank));
        let garbage = SharedStatus::from(SignedStatus {
            record: b"not cbor".to_vec(),
            ..signed(&r)
        });
        assert!(garbage.decoded(&lim()).is_err());
        assert_eq!(garbage.sample_rank(), None);
        // A clone (a relay, a table slot) is the same decoded record.
        assert!(Arc::ptr_eq(once, relayed.decoded(&lim()).unwrap()));
        // Cached or not, a caller with tighter limits is refused.
        let small = MeshLimits {
            max_labels: 1,
            ..lim()
        };
        assert!(relayed.decoded(&small).is_err());
        let tiny = MeshLimits {
            max_record_bytes: 16,
            ..lim()
        };
        assert!(relayed.decoded(&tiny).is_err());
        // On the wire it is exactly a `SignedStatus`, and decoding a frame
        // validates the record once (the decode is kept).
        let frame = encode_frame(&Message::status([shared]), lim().max_frame_bytes).unwrap();
        let plain = encode_frame(
            &Message::status([SharedStatus::from(signed(&r))]),
            lim().max_frame_bytes,
        )
        .unwrap();
        assert_eq!(frame, plain);
        match decode_body(&frame[HEADER_BYTES..], &lim()).unwrap() {
            Message::Status(rs) => {
                assert_eq!(rs.len(), 1);
                assert_eq!(**rs[0].decoded(&lim()).unwrap(), r);
                assert_eq!(rs[0], signed(&r));
            }
            other => panic!("{other:?}"),
        }
        // Garbage bytes are an error every time, not a panic.
        let bad = SharedStatus::from(SignedStatus {
            record: vec![0xff; 8],
            cert: vec![1],
            sig: vec![2],
        });
        assert!(bad.decoded(&lim()).is_err());
        assert!(bad.decoded(&lim()).is_err());
    }

    #[test]
    fn a_record_without_values_digest_decodes_with_none_and_a_bad_digest_is_refused() {
        // A record as an agent from before `values_digest` encodes it: the
        // same fields, without that key. Its signed bytes decode as is.
        #[derive(Serialize)]
        struct OldRecord {
            agent_id: String,
            channel: String,
            labels: BTreeMap<String, String>,
            sequence: u64,
            bundle: String,
            health: String,
            time: u64,
            rollout: Option<RolloutRecord>,
            listen: Option<String>,
        }
        let old = OldRecord {
            agent_id: "a1".into(),
            channel: "stable".into(),
            labels: BTreeMap::new(),
            sequence: 3,
            bundle: cairn_keys::sha256_address(b"m"),
            health: "healthy".into(),
            time: 5,
            rollout: None,
            listen: None,
        };
        let s = SignedStatus {
            record: cairn_keys::codec::encode(&old),
            cert: vec![1],
            sig: vec![2],
        };
        let r = s.decode_record(&lim()).unwrap();
        assert_eq!((r.sequence, &r.values_digest), (3, &None));
        // A new record carries it through an encode/decode round trip.
        let digest = cairn_keys::sha256_address(b"{\"region\":\"eu\"}");
        let with = StatusRecord {
            values_digest: Some(digest.clone()),
            ..r.clone()
        };
        let back = signed(&with).decode_record(&lim()).unwrap();
        assert_eq!(back.values_digest.as_deref(), Some(digest.as_str()));
        // Anything but a `sha256:` address is refused.
        for bad in ["", "sha256:xyz", "\u{1b}[31m"] {
            let r = StatusRecord {
                values_digest: Some(bad.into()),
                ..r.clone()
            };
            let err = signed(&r).decode_record(&lim()).unwrap_err();
            assert!(err.to_string().contains("values digest"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_version_1_peers_message_is_refused_as_garbage() {
        // Protocol version 1's unsigned peer exchange, as a v1 peer (or an
        // attacker) would encode it: no longer a message.
        #[derive(Serialize)]
        enum V1 {
            Peers(Vec<PeerInfo>),
        }
        let body = cairn_keys::codec::encode(&V1::Peers(vec![PeerInfo {
            agent_id: Some(aid("a2")),
            addr: "10.0.0.2:7440".into(),
        }]));
        let err = decode_body(&body, &lim()).unwrap_err();
        assert_eq!(err.reason(), "garbage", "{err}");
    }

    /// Version 2's messages, as a version 2 agent encodes and decodes them.
    mod v2 {
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Serialize, Deserialize)]
        pub(super) struct Hello {
            pub(super) version: u32,
            pub(super) listen: Option<String>,
        }

        #[derive(Debug, Serialize, Deserialize)]
        pub(super) struct Found {
            pub(super) item: super::Item,
            #[serde(with = "serde_bytes")]
            pub(super) bytes: Option<Vec<u8>>,
        }

        #[derive(Debug, Serialize, Deserialize)]
        pub(super) enum Message {
            Hello(Hello),
            Data { id: u64, items: Vec<Found> },
        }
    }

    #[test]
    fn a_version_3_hello_and_data_decode_in_version_2_and_back() {
        // What this build sends a version 2 agent: it reads version 2 and
        // skips the new keys.
        let ours = cairn_keys::codec::encode(&Message::Hello(Hello::new(None)));
        let theirs: v2::Message = cairn_keys::codec::decode("v2", &ours, 1 << 20).unwrap();
        let v2::Message::Hello(h) = theirs else {
            panic!("{theirs:?}")
        };
        assert_eq!(h.version, 2, "a version 2 agent requires exactly 2");
        let data = Message::Data {
            id: 1,
            items: vec![],
            more: false,
            entries: vec![EntryFound(0, None)],
        };
        let theirs: v2::Message =
            cairn_keys::codec::decode("v2", &cairn_keys::codec::encode(&data), 1 << 20).unwrap();
        assert!(matches!(theirs, v2::Message::Data { id: 1, .. }));
        // What a version 2 agent sends us.
        let hello = cairn_keys::codec::encode(&v2::Message::Hello(v2::Hello {
            version: 2,
            listen: None,
        }));
        let Message::Hello(h) = decode_body(&hello, &lim()).unwrap() else {
            panic!()
        };
        assert_eq!(h.max_version, None);
        assert_eq!(
            h.common_version(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            Some(2)
        );
        assert_eq!(Hello::new(None).common_version(2, 3), Some(3));
        assert_eq!(Hello::new(None).common_version(2, 2), Some(2));
        assert_eq!(Hello::speaking(4, 5, None).common_version(2, 3), None);
        assert_eq!(Hello::speaking(3, 3, None).common_version(2, 2), None);
        let data = cairn_keys::codec::encode(&v2::Message::Data {
            id: 4,
            items: vec![],
        });
        assert!(matches!(
            decode_body(&data, &lim()).unwrap(),
            Message::Data {
                id: 4,
                more: false,
                ref entries,
                ..
            } if entries.is_empty()
        ));
    }

    #[test]
    fn entry_ranges_compress_and_check() {
        let (r, n) = EntryRanges::compress(&[0, 1, 2, 5, 6, 9], 8);
        assert_eq!((r.clone(), n), (vec![(0, 3), (5, 2), (9, 1)], 6));
        let (r2, n2) = EntryRanges::compress(&[0, 1, 2, 5, 6, 9], 2);
        assert_eq!((r2, n2), (vec![(0, 3), (5, 2)], 5));
        let e = |ranges: Vec<(u32, u32)>| EntryRanges {
            bundle: BundleId::of_manifest(b"b"),
            ranges,
        };
        let l = lim();
        assert_eq!(e(r).check(&l), Ok(6));
        assert_eq!(
            e(vec![(3, 1), (3, 1)]).check(&l),
            Err(BadWant::MalformedRange)
        );
        assert_eq!(
            e(vec![(5, 1), (2, 1)]).check(&l),
            Err(BadWant::MalformedRange)
        );
        assert_eq!(e(vec![(0, 0)]).check(&l), Err(BadWant::MalformedRange));
        assert_eq!(
            e(vec![(u32::MAX, 2)]).check(&l),
            Err(BadWant::MalformedRange)
        );
        assert_eq!(
            e(vec![(0, l.max_objects_per_want as u32 + 1)]).check(&l),
            Err(BadWant::TooManyObjects)
        );
        let many: Vec<(u32, u32)> = (0..=l.max_ranges_per_want as u32)
            .map(|i| (2 * i, 1))
            .collect();
        assert_eq!(e(many).check(&l), Err(BadWant::TooManyRanges));
        assert_eq!(e(vec![(0, 2), (4, 1)]).indices(5), Ok(vec![0, 1, 4]));
        assert_eq!(
            e(vec![(0, 2), (4, 1)]).indices(4),
            Err(BadWant::IndexOutOfRange)
        );
    }
}
