//! The ingest driver: the one path from "something that serves repository
//! items" (an HTTP or directory source, an OCI registry, a mesh peer's
//! fetched files, a staged release, the simulator's bundle repository) to
//! "a verified release ready to commit".
//!
//! It asks for typed [`Item`]s, never paths, and hands every byte to the
//! pure [`crate::pipeline`]: follow new roots, read the channel's release,
//! ask the adoption gate, get the manifest (from the local store if it is
//! there), fetch only the objects the store lacks, a few at a time, verify
//! each and store it. What it returns ([`Outcome`]) the caller commits.
//!
//! **Architecture invariant:** no runtime, no sockets, no files, no clock
//! and no logging here: the driver is generic over [`Fetch`] (where items
//! come from) and [`Local`] (the store and the caller's state), and it
//! reports what happened as [`Event`]s (through [`Local::event`]) and in
//! its [`Outcome`]; the caller logs. The agent runs it on tokio
//! (`cairn_agent::ingest`), the fleet simulator (`cairn-sim`) polls it to
//! completion with a minimal executor, since its fetches complete at once.
//! [`Snapshot`] is the one place a pipeline [`Context`] is built.

use crate::layout::{channel_path, object_path_str, root_path};
use crate::limits::Limits;
use crate::pipeline::{AdoptedRef, Context, Deferral, Ingest, Rejection, Stage, Start, Want};
use crate::verify::VerifiedRelease;
use cairn_keys::VerifiedRoot;
use futures::StreamExt;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (the traits here are object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One thing a repository serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// Trust root version `n` (`roots/<n>`).
    Root(u64),
    /// A channel's release envelope (`channels/<channel>`).
    Release(String),
    /// A bundle manifest by address.
    Manifest(String),
    /// An object by address.
    Object(String),
}

impl Item {
    /// The repository path ([`crate::layout`] layout); `None` for a
    /// malformed address, which must never become a path.
    pub fn path(&self) -> Option<String> {
        match self {
            Item::Root(v) => Some(root_path(*v)),
            Item::Release(c) => Some(channel_path(c)),
            Item::Manifest(a) | Item::Object(a) => object_path_str(a),
        }
    }

    /// The address of a manifest or object.
    pub fn address(&self) -> Option<&str> {
        match self {
            Item::Manifest(a) | Item::Object(a) => Some(a),
            _ => None,
        }
    }
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Root(v) => write!(f, "root {v}"),
            Item::Release(c) => write!(f, "release of channel {c}"),
            Item::Manifest(a) => write!(f, "manifest {a}"),
            Item::Object(a) => write!(f, "object {a}"),
        }
    }
}

/// Where items come from. Never trusted for content; never returns more
/// than `limit` bytes; `Ok(None)` when it does not have the item.
pub trait Fetch: Send + Sync {
    /// Why a fetch failed.
    type Error: Send;
    /// For logs, metrics and status.
    fn name(&self) -> &str;
    /// Reads one item, at most `limit` bytes.
    fn fetch<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Self::Error>>;
}

/// What a [`Context`] borrows, owned, taken at one moment: the current
/// root, the roots of its release epoch, the adopted release and `now`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The current root.
    pub root: cairn_keys::Root,
    /// The roots of its release epoch.
    pub epoch: Vec<cairn_keys::Root>,
    /// The adopted release: sequence and envelope bytes.
    pub adopted: Option<(u64, Vec<u8>)>,
    /// Unix seconds.
    pub now: u64,
}

impl Snapshot {
    /// The pipeline context for `channel`.
    pub fn context<'a>(&'a self, channel: &'a str, limits: &'a Limits) -> Context<'a> {
        Context {
            root: &self.root,
            epoch: &self.epoch,
            channel,
            adopted: self.adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: self.now,
            limits,
            memo: None,
        }
    }
}

/// The adoption gate's answer for a candidate.
#[derive(Clone, Debug)]
pub struct Gate {
    /// `None`: adopt now.
    pub deferral: Option<Deferral>,
    /// For a deferred release: download and verify it ahead (stage it).
    pub stage: bool,
}

/// The driver's side of the agent: its store and state.
pub trait Local: Send + Sync {
    /// Why a store operation failed.
    type Error: Send;
    /// The current trust root.
    fn root(&self) -> VerifiedRoot;
    /// A newer root passed [`crate::pipeline::check_root`]: store it and
    /// make it current.
    fn root_accepted(
        &self,
        version: u64,
        bytes: Vec<u8>,
        root: VerifiedRoot,
    ) -> BoxFuture<'_, Result<(), Self::Error>>;
    /// A new root was rejected (log, count, status); ingest goes on.
    fn root_rejected(&self, rejection: &Rejection);
    /// Root, epoch, adopted release and `now`, at this moment.
    fn snapshot(&self) -> Snapshot;
    /// The adoption gate (hold, selector, waves, breaker) for `release`.
    fn gate<'a>(&'a self, release: &'a VerifiedRelease) -> BoxFuture<'a, Gate>;
    /// A manifest, or a format 2 manifest chunk, the store holds already
    /// (checked by the pipeline like fetched bytes).
    fn stored_manifest<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Self::Error>>;
    /// Which of `addresses` the store holds.
    fn present(&self, addresses: Vec<String>) -> BoxFuture<'_, Result<Vec<bool>, Self::Error>>;
    /// Stores a verified object (or a staged manifest).
    fn put_object(&self, address: String, bytes: Vec<u8>)
        -> BoxFuture<'_, Result<(), Self::Error>>;
    /// Release signature checks already passed, if the caller keeps them
    /// ([`crate::verify::SignatureMemo`]; the fleet simulator does). `None`
    /// by default: every check runs in full.
    fn signature_memo(&self) -> Option<&crate::verify::SignatureMemo> {
        None
    }
    /// Something happened that the caller may want to log or count (the
    /// driver itself logs nothing). Ignored by default.
    fn event(&self, event: Event<'_>) {
        let _ = event;
    }
}

/// What the driver reports while it runs (see [`Local::event`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A newer release passed verification and the gate lets it in now:
    /// its manifest and objects are about to be fetched.
    Fetching {
        /// The source ([`Fetch::name`]).
        source: &'a str,
        /// The channel.
        channel: &'a str,
        /// The release's sequence.
        sequence: u64,
    },
    /// The objects the store lacked were fetched, verified and stored.
    ObjectsFetched {
        /// The source ([`Fetch::name`]).
        source: &'a str,
        /// How many objects came from the source.
        fetched: usize,
        /// How many the store already held.
        present: usize,
    },
}

/// Why the driver stopped without an answer (retried by the caller).
#[derive(Debug)]
pub enum DriveError<F, L> {
    /// The [`Fetch`] failed.
    Fetch(F),
    /// The [`Local`] store failed.
    Local(L),
}

/// What one drive found.
#[derive(Debug)]
pub enum Driven {
    /// The source has no release for the channel.
    NoRelease,
    /// The source offers the adopted release itself.
    UpToDate,
    /// Something was rejected; the adopted state is untouched.
    Rejected(Rejection),
    /// A newer valid release the gate defers. Staged (every object
    /// stored, the manifest too) when `ingest.manifest()` is set and
    /// nothing is missing.
    Deferred {
        /// The candidate.
        ingest: Box<Ingest>,
        /// Why it waits.
        deferral: Deferral,
    },
    /// Every object is stored and verified: commit it
    /// ([`Ingest::finish`] against a fresh [`Snapshot`]).
    Ready(Box<Ingest>),
}

/// A [`Driven`], whether a new root was rejected on the way (its
/// [`Rejection::reason`]) and what was transferred.
#[derive(Debug)]
pub struct Outcome {
    /// A rejected root, already reported through [`Local::root_rejected`].
    pub root_rejected: Option<&'static str>,
    /// The result.
    pub driven: Driven,
    /// Counts of what this drive did.
    pub counts: Counts,
}

/// What one drive transferred.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Newer roots accepted.
    pub roots: u64,
    /// Objects (and a manifest) read from the source, verified and stored.
    pub fetched: u64,
    /// Bytes of them.
    pub fetched_bytes: u64,
    /// Objects the store held already.
    pub present: u64,
}

/// Runs one ingest of `channel` from `fetch` into `local` (see the module
/// docs), fetching up to `concurrency` objects at once.
pub async fn drive<F, L>(
    fetch: &F,
    local: &L,
    channel: &str,
    limits: &Limits,
    concurrency: usize,
) -> Result<Outcome, DriveError<F::Error, L::Error>>
where
    F: Fetch + ?Sized,
    L: Local + ?Sized,
{
    let name = fetch.name();
    let get = |item: Item, limit: u64| async move {
        fetch.fetch(&item, limit).await.map_err(DriveError::Fetch)
    };
    let mut root_rejected = None;
    let mut counts = Counts::default();
    let outcome = |root_rejected, driven, counts| {
        Ok(Outcome {
            root_rejected,
            driven,
            counts,
        })
    };

    // 1. Roots: follow roots/<v+1> until the source has no more.
    loop {
        let current = local.root();
        let next = current.root().version + 1;
        let limit = cairn_keys::root::MAX_ROOT_BYTES as u64;
        let Some(bytes) = get(Item::Root(next), limit).await? else {
            break;
        };
        match crate::pipeline::check_root(&current, &bytes) {
            Ok(vr) => {
                local
                    .root_accepted(next, bytes, vr)
                    .await
                    .map_err(DriveError::Local)?;
                counts.roots += 1;
            }
            Err(rej) => {
                local.root_rejected(&rej);
                root_rejected = Some(rej.reason());
                break;
            }
        }
    }

    // 2. The channel's release.
    let item = Item::Release(channel.to_owned());
    let Some(release_bytes) = get(item, limits.max_release_bytes).await? else {
        return outcome(root_rejected, Driven::NoRelease, counts);
    };
    let snapshot = local.snapshot();
    let ctx = Context {
        memo: local.signature_memo(),
        ..snapshot.context(channel, limits)
    };
    let mut ingest = match Ingest::start(&ctx, &release_bytes) {
        Ok(Start::UpToDate) => return outcome(root_rejected, Driven::UpToDate, counts),
        Ok(Start::Candidate(i)) => i,
        Err(rej) => return outcome(root_rejected, Driven::Rejected(rej), counts),
    };
    let sequence = ingest.release().release().sequence;
    let gate = local.gate(ingest.release()).await;
    match &gate.deferral {
        Some(deferral) if !gate.stage => {
            let deferral = deferral.clone();
            return outcome(root_rejected, Driven::Deferred { ingest, deferral }, counts);
        }
        Some(_) => {}
        None => local.event(Event::Fetching {
            source: name,
            channel,
            sequence,
        }),
    }

    // 3. The bundle manifest (from the store if present).
    if let Want::Manifest { address, limit } = ingest.want() {
        let stored = local
            .stored_manifest(&address)
            .await
            .map_err(DriveError::Local)?;
        let bytes = match stored {
            Some(b) => Some(b),
            None => {
                let b = get(Item::Manifest(address.to_string()), limit).await?;
                if let Some(b) = &b {
                    counts.fetched += 1;
                    counts.fetched_bytes += b.len() as u64;
                }
                b
            }
        };
        let Some(bytes) = bytes else {
            let rej = Rejection::new(
                Stage::Manifest,
                crate::Error::ObjectMissing {
                    address: address.to_string(),
                    what: "bundle manifest".into(),
                },
            );
            return outcome(root_rejected, Driven::Rejected(rej), counts);
        };
        if let Err(rej) = ingest.handle_manifest(&bytes) {
            return outcome(root_rejected, Driven::Rejected(rej), counts);
        }
    }

    // 3b. Format 2: the manifest chunks, each from the store if there (an
    // unchanged chunk of the previous release), else fetched, verified and
    // stored like an object (mesh peers serve them by address).
    if let Want::Chunks(list) = ingest.want() {
        for (address, size) in list {
            let stored = local
                .stored_manifest(&address)
                .await
                .map_err(DriveError::Local)?;
            if let Some(b) = stored {
                match ingest.handle_object(&address, &b) {
                    Ok(()) => {
                        counts.present += 1;
                        continue;
                    }
                    // The chunk was fine but the whole manifest is not.
                    Err(rej) if !matches!(ingest.want(), Want::Chunks(_)) => {
                        return outcome(root_rejected, Driven::Rejected(rej), counts);
                    }
                    Err(_) => {} // a bad stored copy: fetch it
                }
            }
            let Some(b) = get(Item::Object(address.to_string()), size).await? else {
                let rej = Rejection::new(
                    Stage::Manifest,
                    crate::Error::ObjectMissing {
                        address: address.to_string(),
                        what: "bundle manifest chunk".into(),
                    },
                );
                return outcome(root_rejected, Driven::Rejected(rej), counts);
            };
            if let Err(rej) = ingest.handle_object(&address, &b) {
                return outcome(root_rejected, Driven::Rejected(rej), counts);
            }
            counts.fetched += 1;
            counts.fetched_bytes += b.len() as u64;
            local
                .put_object(address.to_string(), b)
                .await
                .map_err(DriveError::Local)?;
        }
    }

    // 4. Only the objects the store lacks, a few at a time.
    if let Want::Objects(list) = ingest.want() {
        let addresses = list.iter().map(|(a, _)| a.to_string()).collect();
        let list_len = list.len();
        let present = local.present(addresses).await.map_err(DriveError::Local)?;
        let mut to_fetch = Vec::new();
        for ((address, size), present) in list.into_iter().zip(present) {
            if present {
                counts.present += 1;
                ingest.mark_present(&address);
            } else {
                to_fetch.push((address, size));
            }
        }
        let (fetched_objects, present_count) = (to_fetch.len(), list_len - to_fetch.len());
        let mut stream = futures::stream::iter(to_fetch)
            .map(|(address, size)| async move {
                let item = Item::Object(address.into());
                let r = fetch.fetch(&item, size).await;
                (item, r)
            })
            .buffer_unordered(concurrency.max(1));
        while let Some((item, r)) = stream.next().await {
            let Item::Object(address) = item else {
                continue;
            };
            let Some(bytes) = r.map_err(DriveError::Fetch)? else {
                let what = ingest
                    .manifest()
                    .and_then(|m| m.entries.iter().find(|e| e.object == address))
                    .map(|e| e.display_name())
                    .unwrap_or_default();
                let rej =
                    Rejection::new(Stage::Object, crate::Error::ObjectMissing { address, what });
                return outcome(root_rejected, Driven::Rejected(rej), counts);
            };
            if let Err(rej) = ingest.handle_object(&address, &bytes) {
                return outcome(root_rejected, Driven::Rejected(rej), counts);
            }
            counts.fetched += 1;
            counts.fetched_bytes += bytes.len() as u64;
            local
                .put_object(address, bytes)
                .await
                .map_err(DriveError::Local)?;
        }
        local.event(Event::ObjectsFetched {
            source: name,
            fetched: fetched_objects,
            present: present_count,
        });
    }

    // A deferred release is staged: its manifest goes into the object
    // store too (mesh peers fetch it by address), then it waits.
    if let Some(deferral) = gate.deferral {
        if let Some(m) = ingest.manifest_bytes() {
            let (a, m) = (ingest.release().release().bundle.to_string(), m.to_vec());
            local.put_object(a, m).await.map_err(DriveError::Local)?;
        }
        return outcome(root_rejected, Driven::Deferred { ingest, deferral }, counts);
    }
    outcome(root_rejected, Driven::Ready(ingest), counts)
}
