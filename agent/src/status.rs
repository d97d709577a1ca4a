//! The agent's status document: what `cairn-agent status` shows and what
//! the running agent publishes as `<dataDir>/status.json`.
//!
//! sled holds an exclusive lock while the agent runs, so the agent writes
//! this file atomically after every sync and reconcile, and `status`
//! **always** reads the file (never the database). The JSON shape is stable:
//! fields are only added (`format` changes if one is ever removed).

use crate::targets::ApplyReport;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Status document format.
pub const STATUS_FORMAT: u32 = 1;

/// `<dataDir>/status.json`.
pub fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join("status.json")
}

/// Size of the spare status files (JSON padded with spaces).
const STATUS_FILE_BYTES: usize = 128 << 10;

fn spare_paths(data_dir: &Path) -> [PathBuf; 2] {
    [
        data_dir.join(".status.json.spare"),
        data_dir.join(".status.json.spare2"),
    ]
}

fn is_spare_size(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.len() == STATUS_FILE_BYTES as u64)
}

/// Keeps two spare status files of [`STATUS_FILE_BYTES`] while there is
/// space, for [`write_without_space`].
fn keep_spares(data_dir: &Path) {
    for p in spare_paths(data_dir) {
        if !is_spare_size(&p) {
            let _ = std::fs::write(&p, vec![b' '; STATUS_FILE_BYTES]);
        }
    }
}

/// Writes status.json on a full disk, where a new file cannot be
/// allocated: the JSON goes into a spare's existing blocks (padded with
/// spaces, valid JSON whitespace), the spare is renamed over status.json,
/// and the previous status.json — if it is a padded one, kept alive by a
/// hard link — becomes the next spare. Two spares cover the first switch
/// from a normal status.json. A reader that opened status.json just before
/// a switch can see the next write torn; [`Status::read`] reads again.
fn write_without_space(data_dir: &Path, json: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    let main = status_path(data_dir);
    let [spare, spare2] = spare_paths(data_dir);
    let old = data_dir.join(".status.json.old");
    if !is_spare_size(&spare) && is_spare_size(&spare2) {
        std::fs::rename(&spare2, &spare)?;
    }
    if !is_spare_size(&spare) {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(&spare)?;
    let mut buf = json.to_vec();
    buf.resize(STATUS_FILE_BYTES - 1, b' ');
    buf.push(b'\n');
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    let _ = std::fs::remove_file(&old);
    let kept = is_spare_size(&main) && std::fs::hard_link(&main, &old).is_ok();
    std::fs::rename(&spare, &main)?;
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    if kept {
        std::fs::rename(&old, &spare)?;
    }
    Ok(())
}

/// A release as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseStatus {
    /// Channel.
    pub channel: String,
    /// Sequence.
    pub sequence: u64,
    /// Bundle id.
    pub bundle: String,
    /// Address of the release envelope.
    pub release: String,
    /// Repository the bundle was built from.
    pub source_repository: String,
    /// Commit the bundle was built from.
    pub source_commit: String,
    /// Number of objects.
    pub objects: usize,
    /// Created, Unix seconds.
    pub created: u64,
    /// Expires, Unix seconds.
    pub expires: u64,
    /// Whether it had expired when the status was written.
    pub expired: bool,
}

/// A rejection as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectionStatus {
    /// When, Unix seconds.
    pub at: u64,
    /// Which source offered it.
    pub source: String,
    /// Stable reason (the metric label).
    pub reason: String,
    /// The full message.
    pub message: String,
}

/// One source's last sync.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The source.
    pub source: String,
    /// Last attempt, Unix seconds.
    pub last_attempt: u64,
    /// Last attempt that reached the source, Unix seconds.
    pub last_success: Option<u64>,
    /// Whether the last attempt reached the source and found no problem.
    pub ok: bool,
    /// `up-to-date`, `adopted`, `deferred`, `no-release`, `rejected` or `error`.
    pub result: String,
    /// Why a newer release was deferred (selector, rollout wave, breaker).
    #[serde(default)]
    pub note: Option<String>,
    /// The error of the last attempt, if any.
    pub error: Option<String>,
    /// The last rejection of something this source offered.
    pub last_rejection: Option<RejectionStatus>,
}

/// The last reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileStatus {
    /// When it finished, Unix seconds.
    pub at: u64,
    /// Whether the target matches the release.
    pub ok: bool,
    /// The release sequence reconciled.
    pub sequence: Option<u64>,
    /// How long it took, milliseconds.
    pub duration_ms: u64,
    /// What it did.
    pub report: Option<ApplyReport>,
    /// The error, if it failed.
    pub error: Option<String>,
    /// What rendering for this site did: the digest of the values in use,
    /// objects not applied here (docs/SITES.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<crate::site::SiteStatus>,
}

/// A release that failed its health checks and was rolled back from. It is
/// not retried; a newer release replaces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedRelease {
    /// Its sequence.
    pub sequence: u64,
    /// Its bundle id.
    pub bundle: String,
    /// Why it failed.
    pub reason: String,
    /// When, Unix seconds.
    pub at: u64,
}

/// A newer verified release the agent holds but has not adopted, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Its sequence.
    pub sequence: u64,
    /// Its bundle id.
    pub bundle: String,
    /// `waiting`, `breaker`, `held` or `not-selected`.
    pub state: String,
    /// The rollout wave (1-based) the agent falls in, if the release has
    /// waves and the agent is selected.
    pub wave: Option<usize>,
    /// When that wave opens, Unix seconds (state `waiting`).
    pub opens_at: Option<u64>,
    /// One line for humans, e.g. `waiting for wave 2 (opens at
    /// 2026-12-01T06:00:00Z)`.
    pub message: String,
    /// Whether its objects are already downloaded and verified (adoption
    /// is then immediate, and mesh peers can fetch it from this agent).
    pub staged: bool,
}

/// A local hold (`cairn-agent hold`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldStatus {
    /// Placed at, Unix seconds.
    pub since: u64,
    /// Ends at, Unix seconds; `None`: until `cairn-agent release-hold`.
    pub until: Option<u64>,
}

/// The local store's health. A store error (a full, read-only or failing
/// data directory) is the agent's own problem, never a source's: sources
/// stay up and the agent is not offline because of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// Whether the store takes writes (no IO error outstanding).
    pub ok: bool,
    /// The IO error that put the store out of service, until it recovers.
    pub error: Option<String>,
    /// IO errors since start (`cairn_store_errors_total`).
    pub errors: u64,
}

/// The trust root in use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootStatus {
    /// Version.
    pub version: u64,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Whether it has expired.
    pub expired: bool,
    /// Where the root compiled into the agent came from:
    /// `development` (the checked-in development root, whose private keys
    /// are public; the agent runs with it only when
    /// `insecureAllowDevelopmentRoot` is set) or the `CAIRN_TRUST_ROOT`
    /// path it was built with.
    #[serde(default)]
    pub origin: String,
    /// Version of the root compiled into the agent (the chain starts there).
    #[serde(default)]
    pub embedded_version: u64,
}

impl RootStatus {
    /// The status of `current` (the newest root of the chain) at `now`,
    /// with the embedded root's origin and version.
    pub fn new(current: &cairn_keys::Root, now: u64) -> RootStatus {
        RootStatus {
            version: current.version,
            expires: current.expires,
            expired: current.is_expired(now),
            origin: cairn_keys::embedded::ORIGIN.to_owned(),
            embedded_version: embedded_root_version(),
        }
    }

    /// `development v1` or `/etc/cairn/root.v1 v3`, with a warning for the
    /// development root.
    pub fn describe_origin(&self) -> String {
        describe_root(&self.origin, self.embedded_version)
    }
}

/// [`RootStatus::describe_origin`] for this binary's embedded root (the
/// second line of `/readyz`).
pub fn describe_embedded_root() -> String {
    describe_root(cairn_keys::embedded::ORIGIN, embedded_root_version())
}

fn describe_root(origin: &str, version: u64) -> String {
    format!(
        "{origin} v{version}{}",
        if origin == cairn_keys::embedded::DEVELOPMENT {
            " (INSECURE: its private keys are public; never deploy this agent)"
        } else {
            ""
        }
    )
}

/// Version of the embedded root (0 if it does not verify, which
/// `Agent::open` refuses anyway).
pub fn embedded_root_version() -> u64 {
    static VERSION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        cairn_keys::embedded::root()
            .map(|r| r.root().version)
            .unwrap_or(0)
    })
}

/// The whole status document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// [`STATUS_FORMAT`].
    pub format: u32,
    /// Agent id.
    pub agent_id: cairn_core::AgentId,
    /// Process id of the agent that wrote it.
    pub pid: u32,
    /// When written, Unix seconds.
    pub updated: u64,
    /// Channel followed.
    pub channel: String,
    /// Agent labels.
    pub labels: BTreeMap<String, String>,
    /// The target.
    pub target: String,
    /// Bound HTTP address (`/healthz`, `/readyz`, `/metrics`), if any.
    pub listen: Option<String>,
    /// Trust root.
    pub root: RootStatus,
    /// The adopted release (what is enforced).
    pub adopted: Option<ReleaseStatus>,
    /// The release last reconciled successfully.
    pub last_good: Option<ReleaseStatus>,
    /// The adopted release, if it failed its health checks and the last-good
    /// release is enforced instead.
    #[serde(default)]
    pub failed_release: Option<FailedRelease>,
    /// A newer release not adopted yet (rollout wave, breaker, hold,
    /// selector).
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// The local hold in force, if any.
    #[serde(default)]
    pub hold: Option<HoldStatus>,
    /// Whether no source was reachable in the last attempt.
    pub offline: bool,
    /// Per source.
    pub sources: Vec<SourceStatus>,
    /// The most recent rejection from any source.
    pub last_rejection: Option<RejectionStatus>,
    /// The last reconcile.
    pub reconcile: Option<ReconcileStatus>,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Why (not) ready.
    pub ready_reason: String,
    /// The local store's health.
    #[serde(default)]
    pub store: StoreStatus,
}

/// Largest status file read back.
pub const MAX_STATUS_BYTES: u64 = 16 << 20;

impl Status {
    /// An empty document about `agent_id` (format [`STATUS_FORMAT`]).
    pub fn new(agent_id: cairn_core::AgentId) -> Self {
        Status {
            format: STATUS_FORMAT,
            agent_id,
            pid: 0,
            updated: 0,
            channel: String::new(),
            labels: BTreeMap::new(),
            target: String::new(),
            listen: None,
            root: RootStatus::default(),
            adopted: None,
            last_good: None,
            failed_release: None,
            rollout: None,
            hold: None,
            offline: false,
            sources: Vec::new(),
            last_rejection: None,
            reconcile: None,
            ready: false,
            ready_reason: String::new(),
            store: StoreStatus::default(),
        }
    }

    /// Writes the document atomically to `<data_dir>/status.json`, also on
    /// a full disk (see `write_without_space`).
    pub fn write(&self, data_dir: &Path) -> Result<(), Error> {
        let p = status_path(data_dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Status(e.to_string()))?;
        let io = |source| Error::Io {
            what: format!("writing {}", p.display()),
            source,
        };
        match cairn_keys::fs::write_atomic(&p, &json, Some(0o644)) {
            Ok(()) => {
                keep_spares(data_dir);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && json.len() < STATUS_FILE_BYTES => {
                write_without_space(data_dir, &json).map_err(io)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Reads `<data_dir>/status.json` (a regular file of at most
    /// [`MAX_STATUS_BYTES`]).
    pub fn read(data_dir: &Path) -> Result<Status, Error> {
        let p = status_path(data_dir);
        // Only a regular file of bounded size: a FIFO or a link to
        // /dev/zero in the data dir must not hang or flood `status`.
        let bytes = match crate::fsread::read_regular_file_capped(&p, MAX_STATUS_BYTES) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::Status(format!(
                    "{}: no status yet; has cairn-agent run with data dir {}?",
                    p.display(),
                    data_dir.display()
                )))
            }
            Err(e) => return Err(Error::Status(e.to_string())),
        };
        match serde_json::from_slice(&bytes) {
            Ok(s) => Ok(s),
            // Possibly torn by a full-disk write (see `write_without_space`):
            // the file is whole again at the next read.
            Err(_) => {
                let bytes = std::fs::read(&p).map_err(|source| Error::Io {
                    what: format!("reading {}", p.display()),
                    source,
                })?;
                serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Status(format!("{}: unreadable status file: {e}", p.display()))
                })
            }
        }
    }
}

mod render;
pub use render::format_time;

#[cfg(test)]
mod tests;
