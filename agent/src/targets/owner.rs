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
use super::plan::{is_entry_name, Inventory, Pending};
use cairn_core::AgentId;
use serde::Deserialize;
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
    /// Files the agent wrote, as the last completed reconcile left them.
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
    /// Name → address being written, or `null` for a delete.
    pub changes: Pending,
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

/// Writes the record into `dir` atomically and durably.
pub fn write(dir: &Path, rec: &OwnerRecord) -> std::io::Result<()> {
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
    let check = |field: &str, name: &str, address: Option<&str>| -> Result<(), String> {
        if !is_entry_name(name) {
            return Err(format!(
                "`{field}`: {} is not a file name the agent writes",
                shown(name)
            ));
        }
        if let Some(a) = address.filter(|a| !is_address(a)) {
            return Err(format!(
                "`{field}`: {}: {} is not an object address",
                shown(name),
                shown(a)
            ));
        }
        Ok(())
    };
    for (name, address) in &rec.files {
        check("files", name, Some(address))?;
    }
    if let Some(s) = &rec.switch {
        for (name, address) in &s.changes {
            check("switch.changes", name, address.as_deref())?;
        }
    }
    Ok(())
}

fn is_address(a: &str) -> bool {
    a.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// An untrusted string for a message: escaped, at most 80 characters.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .collect::<String>()
        .escape_debug()
        .collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    format!("\"{out}\"")
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

    fn addr(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
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
        bad(
            &|r| {
                r.files.insert("x.yaml".into(), "sha256:zz".into());
            },
            "not an object address",
        );
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
