//! The ownership record kept inside the manifests directory,
//! `<manifestsDir>/.cairn-owner.json`: which agent manages the directory,
//! the files it wrote (name → address) as its last completed reconcile left
//! them, and the switch in progress, announced before the first change.
//!
//! Why in the target: the data directory can be lost or moved aside (see
//! `docs/OPERATIONS.md`); the target and its record stay together, so a
//! restarted agent still knows which files are its own (to prune them) and
//! which differences are its own unfinished work (not drift). k3s skips
//! files whose names start with `.`.
//!
//! The record is local input that anyone with write access to the
//! directory can change: it is read without following links, size-capped,
//! regular files only, and every name in it must be a file name the agent
//! itself produces ([`super::plan::is_entry_name`]), so a tampered record
//! can never name anything outside the directory. Written atomically
//! (temporary file, fsync, rename, directory fsync).

use super::local_file::{read_regular, LocalFile};
use super::plan::{is_entry_name, shown, Digest, Inventory, Pending};
use cairn_core::AgentId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The record's file name inside the manifests directory.
pub const RECORD_NAME: &str = ".cairn-owner.json";

/// Record format written by this build.
pub const RECORD_FORMAT: u32 = 1;

/// The largest record read (100,000 entries with long names fit easily).
pub const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The ownership record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerRecord {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    /// The agent id that manages the directory (a malformed one is
    /// refused while reading: "`agent`: bad agent id …").
    #[serde(deserialize_with = "agent_field")]
    pub agent: AgentId,
    /// The target as the agent describes it (informational).
    pub target: String,
    /// The release the files belong to, when the last reconcile completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Files the agent wrote, as the last completed reconcile left them
    /// (every name and address checked while reading).
    #[serde(deserialize_with = "files_field")]
    pub files: Inventory,
    /// A switch announced and not known to be finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<Switch>,
}

/// A switch in progress.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Switch {
    /// The release being applied.
    pub sequence: u64,
    /// Name → address being written, or `null` for a delete (every name
    /// and address checked while reading).
    #[serde(deserialize_with = "changes_field")]
    pub changes: Pending,
}

/// The record as written: [`OwnerRecord`]'s fields in its order, with the
/// maps as anything that serializes as one (views of a plan, streamed
/// without building a map of every object). The same values give the
/// same bytes as [`OwnerRecord`].
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordOut<'a, F: serde::Serialize, C: serde::Serialize> {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    /// The agent id.
    pub agent: &'a AgentId,
    /// The target as the agent describes it.
    pub target: &'a str,
    /// The release the files belong to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Name → address, in name order.
    pub files: F,
    /// A switch announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch: Option<SwitchOut<C>>,
}

/// [`Switch`] as written (see [`RecordOut`]).
#[derive(serde::Serialize)]
pub struct SwitchOut<C: serde::Serialize> {
    /// The release being applied.
    pub sequence: u64,
    /// Name → address or `null`, in name order.
    pub changes: C,
}

/// The record's path in `dir`.
pub fn record_path(dir: &Path) -> PathBuf {
    dir.join(RECORD_NAME)
}

/// Reads and validates the record in `dir`: `Ok(None)` when there is
/// none, `Err(reason)` when it is unreadable, not a regular file, too
/// large, or invalid.
pub fn read(dir: &Path) -> Result<Option<OwnerRecord>, String> {
    let path = record_path(dir);
    let bytes = match read_regular(&path, MAX_RECORD_BYTES) {
        Ok(LocalFile::Missing) => return Ok(None),
        Ok(LocalFile::Bytes(b)) => b,
        Ok(LocalFile::NotRegular) => return Err("not a regular file".into()),
        Ok(LocalFile::TooLarge(n)) => {
            return Err(format!(
                "{n} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes"
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let rec: OwnerRecord = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    validate(&rec)?;
    Ok(Some(rec))
}

/// Writes the record (an [`OwnerRecord`] or a [`RecordOut`]) into `dir`
/// atomically and durably.
pub fn write<R: serde::Serialize>(dir: &Path, rec: &R) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    cairn_keys::fs::write_atomic(&record_path(dir), &bytes, Some(0o644))
}

/// Reads the `agent` field as an [`AgentId`], naming the field when it is
/// malformed (the value is escaped and cut short by [`AgentId::parse`]).
fn agent_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<AgentId, D::Error> {
    let s = String::deserialize(d)?;
    AgentId::parse_owned(s).map_err(|e| serde::de::Error::custom(format!("`agent`: {e}")))
}

fn validate(rec: &OwnerRecord) -> Result<(), String> {
    if rec.format != RECORD_FORMAT {
        return Err(format!(
            "format {} is not supported (this agent writes {RECORD_FORMAT})",
            rec.format
        ));
    }
    Ok(())
}

/// Reads `files` (name → address) checking each entry as it is read: no
/// map of unchecked strings is built.
pub(crate) fn files_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Inventory, D::Error> {
    d.deserialize_map(Entries::<String>("files", std::marker::PhantomData))
}

/// Reads `switch.changes` (name → address or `null`), checked likewise.
fn changes_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Pending, D::Error> {
    d.deserialize_map(Entries::<Option<String>>(
        "switch.changes",
        std::marker::PhantomData,
    ))
}

/// A map of file names to addresses (`A` = `String`) or to addresses or
/// `null` (`A` = `Option<String>`), named `.0` in messages.
struct Entries<A>(&'static str, std::marker::PhantomData<A>);

/// An address as read, turned into its digest.
trait ReadAddress: for<'de> Deserialize<'de> {
    type Out;
    fn check(self, field: &str, name: &str) -> Result<Self::Out, String>;
}

fn address_of(field: &str, name: &str, a: &str) -> Result<Digest, String> {
    Digest::parse(a).ok_or_else(|| {
        format!(
            "`{field}`: {}: {} is not an object address",
            shown(name),
            shown(a)
        )
    })
}

impl ReadAddress for String {
    type Out = Digest;
    fn check(self, field: &str, name: &str) -> Result<Digest, String> {
        address_of(field, name, &self)
    }
}

impl ReadAddress for Option<String> {
    type Out = Option<Digest>;
    fn check(self, field: &str, name: &str) -> Result<Option<Digest>, String> {
        self.map(|a| address_of(field, name, &a)).transpose()
    }
}

impl<'de, A: ReadAddress> serde::de::Visitor<'de> for Entries<A> {
    type Value = BTreeMap<String, A::Out>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a map of file names to object addresses")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
        let field = self.0;
        let mut out = BTreeMap::new();
        while let Some(name) = m.next_key::<String>()? {
            let address: A = m.next_value()?;
            if !is_entry_name(&name) {
                return Err(serde::de::Error::custom(format!(
                    "`{field}`: {} is not a file name the agent writes",
                    shown(&name)
                )));
            }
            let digest = address
                .check(field, &name)
                .map_err(serde::de::Error::custom)?;
            out.insert(name, digest);
        }
        Ok(out)
    }
}

/// Whether `file_name` is a temporary file `cairn_keys::fs::write_atomic`
/// leaves behind when the process dies mid-write, for a file the agent
/// writes here: `.<entry or record name>.tmp-<pid>-<n>`.
pub fn is_own_temp_file(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix('.') else {
        return false;
    };
    let Some(at) = rest.rfind(".tmp-") else {
        return false;
    };
    let (inner, tail) = (&rest[..at], &rest[at + ".tmp-".len()..]);
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let Some((pid, n)) = tail.split_once('-') else {
        return false;
    };
    digits(pid) && digits(n) && (inner == RECORD_NAME || is_entry_name(inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn record() -> OwnerRecord {
        OwnerRecord {
            format: RECORD_FORMAT,
            agent: AgentId::parse("edge-1").unwrap(),
            target: "manifests-dir /x".into(),
            sequence: Some(3),
            files: [("web__ConfigMap__a.yaml".to_string(), addr('a'))].into(),
            switch: Some(Switch {
                sequence: 4,
                changes: [
                    ("web__ConfigMap__b.yaml".to_string(), Some(addr('b'))),
                    ("web__ConfigMap__a.yaml".to_string(), None),
                ]
                .into(),
            }),
        }
    }

    #[test]
    fn round_trips_and_refuses_tampered_records() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        write(d.path(), &record()).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(record()));
        // The typed agent id is written as the bare string it always was.
        let written = std::fs::read_to_string(record_path(d.path())).unwrap();
        assert!(
            written.starts_with(r#"{"format":1,"agent":"edge-1","target":"#),
            "{written}"
        );
        let bad = |edit: &dyn Fn(&mut OwnerRecord), want: &str| {
            let mut r = record();
            edit(&mut r);
            write(d.path(), &r).unwrap();
            let e = read(d.path()).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(
            &|r| {
                r.files.insert("../x".into(), addr('c'));
            },
            "\"../x\" is not a file name the agent writes",
        );
        bad(
            &|r| {
                r.files.insert("/etc/passwd".into(), addr('c'));
            },
            "not a file name",
        );
        bad(
            &|r| {
                r.switch.as_mut().unwrap().changes.insert("..".into(), None);
            },
            "`switch.changes`",
        );
        for (at, field) in [("files", "`files`"), ("switch.changes", "`switch.changes`")] {
            let mut json = serde_json::to_value(record()).unwrap();
            let map = match at {
                "files" => &mut json["files"],
                _ => &mut json["switch"]["changes"],
            };
            map["x.yaml"] = "sha256:zz\u{1b}".into();
            std::fs::write(record_path(d.path()), json.to_string()).unwrap();
            let e = read(d.path()).unwrap_err();
            assert!(e.contains(field), "{e}");
            assert!(
                e.contains("\"x.yaml\": \"sha256:zz\\u{1b}\" is not an object address"),
                "{e}"
            );
        }
        // A malformed agent id (anyone who can write the directory can
        // write one) is refused naming the field, escaped and cut short.
        for agent in ["\u{1b}[31mred", "", "-x", "a/b", &"a".repeat(10_000)] {
            let mut json = serde_json::to_value(record()).unwrap();
            json["agent"] = agent.into();
            std::fs::write(record_path(d.path()), json.to_string()).unwrap();
            let e = read(d.path()).unwrap_err();
            assert!(e.contains("`agent`: bad agent id"), "{e}");
            assert!(!e.contains('\u{1b}'), "{e:?}");
            assert!(e.len() < 400, "{}", e.len());
        }
        let mut json = serde_json::to_value(record()).unwrap();
        json["agent"] = "\u{1b}[31mred".into();
        std::fs::write(record_path(d.path()), json.to_string()).unwrap();
        assert!(read(d.path()).unwrap_err().contains("\\x1b[31mred"));
        bad(&|r| r.format = 9, "format 9");
        std::fs::write(record_path(d.path()), b"{not json").unwrap();
        assert!(read(d.path()).is_err());
        // A link to a file elsewhere is not followed.
        std::fs::remove_file(record_path(d.path())).unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::write(&elsewhere, serde_json::to_vec(&record()).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, record_path(d.path())).unwrap();
        assert_eq!(read(d.path()).unwrap_err(), "not a regular file");
    }

    /// The record's bytes are exactly what the `String` maps of format 1
    /// produced: written from a plan's views ([`RecordOut`]) or from an
    /// [`OwnerRecord`] with digests.
    #[test]
    fn record_bytes_are_unchanged_by_digests_and_views() {
        let expected = format!(
            concat!(
                r#"{{"format":1,"agent":"edge-1","target":"manifests-dir /x","sequence":3,"#,
                r#""files":{{"web__ConfigMap__a.yaml":"sha256:{a}"}},"#,
                r#""switch":{{"sequence":4,"changes":{{"web__ConfigMap__a.yaml":null,"web__ConfigMap__b.yaml":"sha256:{b}"}}}}}}"#
            ),
            a = "a".repeat(64),
            b = "b".repeat(64)
        );
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &record()).unwrap();
        assert_eq!(
            std::fs::read_to_string(record_path(d.path())).unwrap(),
            expected
        );
        // The same through the writer's view of borrowed maps.
        let rec = record();
        let switch = rec.switch.as_ref().unwrap();
        let out = RecordOut {
            format: rec.format,
            agent: &rec.agent,
            target: &rec.target,
            sequence: rec.sequence,
            files: &rec.files,
            switch: Some(SwitchOut {
                sequence: switch.sequence,
                changes: &switch.changes,
            }),
        };
        write(d.path(), &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(record_path(d.path())).unwrap(),
            expected
        );
        // Without sequence and switch, both are left out, as before.
        let plain = RecordOut::<_, &Pending> {
            format: 1,
            agent: &rec.agent,
            target: "t",
            sequence: None,
            files: &Inventory::new(),
            switch: None,
        };
        write(d.path(), &plain).unwrap();
        assert_eq!(
            std::fs::read_to_string(record_path(d.path())).unwrap(),
            r#"{"format":1,"agent":"edge-1","target":"t","files":{}}"#
        );
    }

    #[test]
    fn recognises_only_its_own_temporary_files() {
        assert!(is_own_temp_file(".web__ConfigMap__a.yaml.tmp-123-0"));
        assert!(is_own_temp_file("..cairn-owner.json.tmp-1-99"));
        for other in [
            "web__ConfigMap__a.yaml",
            ".web__ConfigMap__a.yaml.tmp-123",
            ".web__ConfigMap__a.yaml.tmp--1",
            ".web__ConfigMap__a.yaml.tmp-1-x",
            ".notes.txt.tmp-1-2",
            "..tmp-1-2",
            ".x/../y.yaml.tmp-1-2",
            ".editor.swp",
        ] {
            assert!(!is_own_temp_file(other), "{other}");
        }
    }
}
