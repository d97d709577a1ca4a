//! `cairn release / verify / export / import`, run as processes: sequence
//! numbers, every tampering `verify` must catch, unauthorised and
//! below-threshold keys, expiry, archives (round trip, idempotence,
//! rollback, and unsafe members rejected before anything is written), and
//! the full flow with freshly generated keys.

use crate::support::{fails_code, ok_in, run_in};
use cairn_bundle::release::Release;
use cairn_bundle::repo::{channel_path, object_path_str};
use cairn_test_support::{make_manifest_repo, FixtureOptions};
use std::path::{Path, PathBuf};

const DEV_RELEASE_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../keys/trust/dev/dev-release-1.key"
);
const DEV_RELEASE_KEY_2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../keys/trust/dev/dev-release-2.key"
);
const DEV_ROOT_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../keys/trust/dev/dev-root-1.key"
);

/// Must fail with exit 1 and a `cairn: ` error; returns stderr.
fn fails_in(args: &[&str], cwd: &Path) -> String {
    let stderr = fails_code(args, Some(cwd), 1);
    assert!(
        stderr.lines().last().unwrap_or("").starts_with("cairn: "),
        "{stderr}"
    );
    stderr
}

/// A work directory with a fixture Git repository `edge` and helpers
/// running cairn inside it.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new(apps: usize, commits: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_manifest_repo(
            &dir.path().join("edge"),
            &FixtureOptions {
                apps,
                configmap_kb: 1,
                commits,
            },
        )
        .unwrap();
        Self { dir }
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.p().join(rel)
    }
    fn ok(&self, args: &[&str]) -> String {
        ok_in(args, self.p())
    }
    fn fails(&self, args: &[&str]) -> String {
        fails_in(args, self.p())
    }
    fn build(&self, out: &str, git_ref: &str) -> String {
        self.ok(&[
            "bundle", "build", "--git", "edge", "--ref", git_ref, "--out", out,
        ])
        .trim()
        .to_owned()
    }
    fn release(&self, repo: &str, bundle: &str, channel: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "release",
            "--repo",
            repo,
            "--bundle",
            bundle,
            "--channel",
            channel,
            "--key",
            DEV_RELEASE_KEY,
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }
    fn verify_json(&self, repo: &str, channel: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["verify", "--repo", repo, "--channel", channel, "--json"]))
            .unwrap()
    }
    fn verify_err(&self, repo: &str, channel: &str) -> String {
        self.fails(&["verify", "--repo", repo, "--channel", channel])
    }
    /// A released repository `repo` with channel `stable` at sequence 1.
    fn released(apps: usize) -> (Self, String) {
        let w = Self::new(apps, 1);
        let id = w.build("b1.bundle", "HEAD");
        w.release("repo", "b1.bundle", "stable", &[]);
        (w, id)
    }
    fn files(&self, rel: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.path(rel)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

fn dev_key(path: &str) -> cairn_keys::KeyPair {
    cairn_keys::keyfile::read_private(Path::new(path)).unwrap()
}

#[test]
fn release_sequence_increments_and_writes_layout() {
    let w = Work::new(3, 3);
    let a = w.build("a.bundle", "main~2");
    let b = w.build("b.bundle", "main~1");
    assert_eq!(
        w.release("repo", "a.bundle", "stable", &[]).trim(),
        "stable 1"
    );
    assert_eq!(
        w.release("repo", "b.bundle", "stable", &[]).trim(),
        "stable 2"
    );
    assert_eq!(
        w.release(
            "repo",
            "a.bundle",
            "beta",
            &[
                "--rollout",
                "10%:0s,50%:1h,100%:6h,max-failures=10%",
                "--selector",
                "region=eu,tier=edge"
            ]
        )
        .trim(),
        "beta 1"
    );
    let v = w.verify_json("repo", "stable");
    assert_eq!(v["ok"], true);
    assert_eq!(v["sequence"], 2);
    assert_eq!(v["bundle"], b.as_str());
    assert_eq!(v["objects"], 3 * 3 + 3);
    let beta = w.verify_json("repo", "beta");
    assert_eq!(beta["bundle"], a.as_str());
    assert_eq!(beta["rollout"], "10%:0s,50%:1h,100%:6h,max-failures=10%");
    assert_eq!(beta["selector"]["region"], "eu");
    // Layout: roots/1 (the embedded root), channels, the manifest object.
    assert_eq!(
        std::fs::read(w.path("repo/roots/1")).unwrap(),
        cairn_keys::embedded::ROOT_BYTES
    );
    assert!(w
        .path(&format!("repo/{}", object_path_str(&a).unwrap()))
        .is_file());
    let text = w.ok(&["verify", "--repo", "repo", "--channel", "stable"]);
    assert!(
        text.contains("channel  stable sequence 2") && text.contains(&b),
        "{text}"
    );
    // Bad rollout and selector specs are usage errors.
    let out = run_in(
        &[
            "release",
            "--repo",
            "repo",
            "--bundle",
            "a.bundle",
            "--channel",
            "stable",
            "--key",
            DEV_RELEASE_KEY,
            "--rollout",
            "50%:1h,10%:2h",
        ],
        w.p(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger share"));
    // Nothing changed on stable.
    assert_eq!(w.verify_json("repo", "stable")["sequence"], 2);
}

#[test]
fn verify_detects_a_flipped_byte_in_any_object() {
    let (w, id) = Work::released(2);
    let objects = w.files("repo/objects");
    // Format 2 adds the manifest chunk (the fixture's bundle is one
    // chunk) to the files of format 1.
    assert_eq!(
        objects.len(),
        2 * 3 + 3 + 1 + 1,
        "entries plus the manifest and its chunk"
    );
    for obj in &objects {
        let orig = std::fs::read(obj).unwrap();
        let mut bad = orig.clone();
        let i = bad.len() / 2;
        bad[i] ^= 0x20;
        std::fs::write(obj, &bad).unwrap();
        let e = w.verify_err("repo", "stable");
        let rel = obj
            .strip_prefix(w.path("repo"))
            .unwrap()
            .display()
            .to_string();
        assert!(
            e.contains(&format!("{rel}: content hashes to sha256:")),
            "{e}"
        );
        if rel.ends_with(&id[7..]) {
            assert!(e.contains("(bundle manifest)"), "{e}");
        } else if e.contains("(bundle manifest chunk 1)") {
            // The format 2 manifest's chunk: named as such.
        } else {
            assert!(e.contains(" from clusters/edge/"), "names the entry: {e}");
        }
        std::fs::write(obj, &orig).unwrap();
    }
    // A missing object is named too, with its kind and name.
    let victim = objects.iter().find(|p| !p.ends_with(&id[7..])).unwrap();
    std::fs::remove_file(victim).unwrap();
    let e = w.verify_err("repo", "stable");
    assert!(e.contains(": missing (") && e.contains("edge-apps/"), "{e}");
    let j: serde_json::Value = serde_json::from_slice(
        &run_in(
            &["verify", "--repo", "repo", "--channel", "stable", "--json"],
            w.p(),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(j["ok"], false);
    assert_eq!(j["problems"].as_array().unwrap().len(), 1);
}

#[test]
fn verify_names_a_truncated_or_missing_channel() {
    let (w, _) = Work::released(1);
    let ch = w.path("repo/channels/stable");
    let bytes = std::fs::read(&ch).unwrap();
    std::fs::write(&ch, &bytes[..bytes.len() / 2]).unwrap();
    let e = w.verify_err("repo", "stable");
    assert!(e.contains("cairn: channels/stable: cannot decode"), "{e}");
    // Releasing on top of an unreadable head is refused too.
    let e = w.fails(&[
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b1.bundle",
        "--channel",
        "stable",
        "--key",
        DEV_RELEASE_KEY,
    ]);
    assert!(
        e.contains("channels/stable: the current channel head is unreadable"),
        "{e}"
    );
    let e = w.verify_err("repo", "nope");
    assert!(e.contains("channel `nope` not found"), "{e}");
}

/// Replaces the channel head with `release` signed by `keys`.
fn forge(w: &Work, channel: &str, f: impl FnOnce(&mut Release), keys: &[&cairn_keys::KeyPair]) {
    let p = w.path(&format!("repo/{}", channel_path(channel)));
    let (_, mut rel) = Release::decode_envelope(&std::fs::read(&p).unwrap(), 1 << 20).unwrap();
    f(&mut rel);
    std::fs::write(&p, rel.sign(keys).encode()).unwrap();
}

/// Rewrites the channel's release with a channel name no `Release` can
/// hold (the typed `ChannelName` refuses it), unsigned: the old,
/// string-typed shape of the release document, which encodes the same.
fn forge_channel_name(w: &Work, channel: &str, name: &str) {
    use cairn_bundle::release::Rollout;
    use std::collections::BTreeMap;
    #[derive(serde::Serialize)]
    struct UncheckedRelease {
        format: u32,
        channel: String,
        sequence: u64,
        bundle: String,
        created: u64,
        expires: u64,
        rollout: Rollout,
        selector: BTreeMap<String, String>,
    }
    let p = w.path(&format!("repo/{}", channel_path(channel)));
    let (_, r) = Release::decode_envelope(&std::fs::read(&p).unwrap(), 1 << 20).unwrap();
    let forged = UncheckedRelease {
        format: r.format,
        channel: name.to_owned(),
        sequence: r.sequence,
        bundle: r.bundle.to_string(),
        created: r.created,
        expires: r.expires,
        rollout: r.rollout,
        selector: r.selector,
    };
    let payload = cairn_keys::codec::encode(&forged);
    let env = cairn_keys::Envelope::new(cairn_keys::PayloadType::Release, payload);
    std::fs::write(&p, env.encode()).unwrap();
}

#[test]
fn verify_rejects_unauthorised_keys_and_expired_releases() {
    let (w, _) = Work::released(1);
    // Signed by a key the root does not list.
    let outsider = cairn_keys::KeyPair::generate().unwrap();
    forge(&w, "stable", |_| {}, &[&outsider]);
    let e = w.verify_err("repo", "stable");
    assert!(
        e.contains("signed by 0 valid release key(s), threshold is 1"),
        "{e}"
    );
    assert!(e.contains("unknown key"), "{e}");
    // Signed by a root key (authorised for roots, not releases).
    forge(&w, "stable", |_| {}, &[&dev_key(DEV_ROOT_KEY)]);
    assert!(w
        .verify_err("repo", "stable")
        .contains("0 valid release key(s)"));
    // Expired: a properly signed release whose expiry has passed.
    forge(
        &w,
        "stable",
        |r| {
            r.created = 1_000;
            r.expires = 2_000;
        },
        &[&dev_key(DEV_RELEASE_KEY)],
    );
    let e = w.verify_err("repo", "stable");
    assert!(
        e.contains("release 1 on channel `stable` expired at 2000"),
        "{e}"
    );
    // Pointing at another bundle id without re-signing breaks the signature.
    let p = w.path("repo/channels/stable");
    let (mut env, mut rel) =
        Release::decode_envelope(&std::fs::read(&p).unwrap(), 1 << 20).unwrap();
    rel.expires = u64::MAX;
    env.payload = cairn_keys::codec::encode(&rel);
    std::fs::write(&p, env.encode()).unwrap();
    assert!(w
        .verify_err("repo", "stable")
        .contains("0 valid release key(s)"));

    // `cairn release` refuses a key that is not a release key.
    let root_id = dev_key(DEV_ROOT_KEY).key_id().0;
    let e = w.fails(&[
        "release",
        "--repo",
        "repo2",
        "--bundle",
        "b1.bundle",
        "--channel",
        "stable",
        "--key",
        DEV_ROOT_KEY,
    ]);
    assert!(
        e.contains(&format!("key {root_id} is not a release key of root v1")),
        "{e}"
    );
    assert!(!w.path("repo2").exists(), "nothing written");
}

#[test]
fn release_threshold_two_needs_two_keys() {
    let w = Work::new(1, 1);
    for k in ["root", "rel1", "rel2"] {
        w.ok(&["keys", "generate", k, "--dir", "k"]);
    }
    w.ok(&[
        "root",
        "init",
        "--root-key",
        "k/root.pub",
        "--root-threshold",
        "1",
        "--release-key",
        "k/rel1.pub",
        "--release-key",
        "k/rel2.pub",
        "--release-threshold",
        "2",
        "--sign",
        "k/root.key",
        "--out",
        "root.v1",
    ]);
    w.build("b.bundle", "HEAD");
    let base = [
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b.bundle",
        "--channel",
        "stable",
        "--root",
        "root.v1",
    ];
    let mut one = base.to_vec();
    one.extend_from_slice(&["--key", "k/rel1.key", "--key", "k/rel1.key"]);
    let e = w.fails(&one);
    assert!(
        e.contains("signed by 1 valid release key(s), threshold is 2"),
        "{e}"
    );
    assert!(!w.path("repo").exists(), "nothing written below threshold");
    let mut two = base.to_vec();
    two.extend_from_slice(&["--key", "k/rel1.key", "--key", "k/rel2.key"]);
    assert_eq!(w.ok(&two).trim(), "stable 1");
    let v: serde_json::Value = serde_json::from_str(&w.ok(&[
        "verify",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--root",
        "root.v1",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["signers"].as_array().unwrap().len(), 2);

    // A release carrying only one of the two signatures fails verification.
    let p = w.path("repo/channels/stable");
    let (mut env, _) = Release::decode_envelope(&std::fs::read(&p).unwrap(), 1 << 20).unwrap();
    env.signatures.truncate(1);
    std::fs::write(&p, env.encode()).unwrap();
    let e = w.fails(&[
        "verify",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--root",
        "root.v1",
    ]);
    assert!(
        e.contains("signed by 1 valid release key(s), threshold is 2"),
        "{e}"
    );
    // Without --root the repository's roots/1 is not the embedded root.
    let e = w.fails(&["verify", "--repo", "repo", "--channel", "stable"]);
    assert!(
        e.contains("roots/1 differs from the trusted root v1"),
        "{e}"
    );
}

#[test]
fn export_import_round_trip_is_idempotent_and_refuses_rollback() {
    let w = Work::new(3, 2);
    w.build("b1.bundle", "main~1");
    w.build("b2.bundle", "main");
    w.release("repo", "b1.bundle", "stable", &[]);
    w.release("repo", "b1.bundle", "beta", &[]);
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--channel",
        "beta",
        "--out",
        "one.tar",
    ]);
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--channel",
        "beta",
        "--out",
        "again.tar",
    ]);
    assert_eq!(
        std::fs::read(w.path("one.tar")).unwrap(),
        std::fs::read(w.path("again.tar")).unwrap(),
        "deterministic"
    );
    // Exactly the files of the repository.
    let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(w.path("one.tar")).unwrap())
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            assert_eq!(e.header().mode().unwrap(), 0o644);
            assert_eq!(e.header().mtime().unwrap(), 0);
            e.path().unwrap().display().to_string()
        })
        .collect();
    names.sort();
    let mut want: Vec<String> = w
        .files("repo")
        .iter()
        .map(|p| {
            p.strip_prefix(w.path("repo"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    want.sort();
    assert_eq!(names, want);

    w.ok(&["import", "one.tar", "--repo", "air"]);
    assert_eq!(w.verify_json("air", "stable")["sequence"], 1);
    assert_eq!(w.verify_json("air", "beta")["sequence"], 1);
    let snapshot = |dir: &str| -> Vec<(PathBuf, Vec<u8>)> {
        w.files(dir)
            .into_iter()
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect()
    };
    let before = snapshot("air");
    w.ok(&["import", "one.tar", "--repo", "air"]);
    assert_eq!(snapshot("air"), before, "importing twice changes nothing");

    // A newer release moves across; the older archive cannot roll it back.
    w.release("repo", "b2.bundle", "stable", &[]);
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        "two.tar",
    ]);
    w.ok(&["import", "two.tar", "--repo", "air"]);
    assert_eq!(w.verify_json("air", "stable")["sequence"], 2);
    let e = w.fails(&["import", "one.tar", "--repo", "air"]);
    assert!(
        e.contains("release sequence 1 on channel `stable` is not above the last adopted 2"),
        "{e}"
    );
    assert_eq!(w.verify_json("air", "stable")["sequence"], 2);

    // Export refuses a channel that does not verify.
    let obj = w.files("repo/objects").into_iter().next().unwrap();
    std::fs::write(&obj, b"tampered").unwrap();
    let e = w.fails(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "beta",
        "--out",
        "bad.tar",
    ]);
    assert!(e.contains("channel `beta` does not verify"), "{e}");
    assert!(!w.path("bad.tar").exists());
}

/// A raw tar member: path bytes, type, data, declared size override.
type RawMember<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<u64>);

/// A bad-member case: name, path bytes, type, data, declared size, expected error.
type BadCase = (
    &'static str,
    Vec<u8>,
    tar::EntryType,
    Vec<u8>,
    Option<u64>,
    &'static str,
);

/// Writes a tar whose members are given raw: (path bytes, type, data,
/// declared size override).
fn raw_tar(path: &Path, members: &[RawMember]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, kind, data, size) in members {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(size.unwrap_or(data.len() as u64));
        if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn unsafe_archives_are_rejected_before_anything_is_written() {
    let (w, _) = Work::released(1);
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        "good.tar",
    ]);
    // Take real members from the good archive, then add one bad member.
    let mut good: Vec<(String, Vec<u8>)> = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(w.path("good.tar")).unwrap())
        .entries()
        .unwrap()
    {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        good.push((e.path().unwrap().display().to_string(), data));
    }
    let obj_hex = "ab".repeat(32);
    let obj_path = format!("objects/sha256/ab/{obj_hex}");
    let big = vec![0u8; 100 << 10];
    let cases: Vec<BadCase> = vec![
        (
            "traversal",
            b"../escape".to_vec(),
            tar::EntryType::Regular,
            b"x".to_vec(),
            None,
            "path traversal",
        ),
        (
            "nested traversal",
            b"objects/../../escape".to_vec(),
            tar::EntryType::Regular,
            b"x".to_vec(),
            None,
            "path traversal",
        ),
        (
            "absolute",
            b"/etc/cron.d/x".to_vec(),
            tar::EntryType::Regular,
            b"x".to_vec(),
            None,
            "absolute paths are not allowed",
        ),
        (
            "symlink",
            b"channels/evil".to_vec(),
            tar::EntryType::Symlink,
            Vec::new(),
            None,
            "symbolic links are not allowed",
        ),
        (
            "hardlink",
            b"roots/2".to_vec(),
            tar::EntryType::Link,
            Vec::new(),
            None,
            "hard links are not allowed",
        ),
        (
            "device",
            b"channels/dev".to_vec(),
            tar::EntryType::Char,
            Vec::new(),
            None,
            "Char entries are not allowed",
        ),
        (
            "unexpected",
            b"README.md".to_vec(),
            tar::EntryType::Regular,
            b"hi".to_vec(),
            None,
            "unexpected member `README.md`",
        ),
        (
            "oversized channel",
            b"channels/huge".to_vec(),
            tar::EntryType::Regular,
            big.clone(),
            None,
            "over the limit of 65536",
        ),
        (
            "oversized object",
            obj_path.as_bytes().to_vec(),
            tar::EntryType::Regular,
            b"x".to_vec(),
            Some(1 << 40),
            "over the limit",
        ),
        (
            "mismatched object",
            obj_path.as_bytes().to_vec(),
            tar::EntryType::Regular,
            b"x".to_vec(),
            None,
            "content hashes to",
        ),
    ];
    for (what, name, kind, data, size, want) in cases {
        let tar_path = w.path(&format!("{}.tar", what.replace(' ', "-")));
        let mut members: Vec<RawMember> = good
            .iter()
            .map(|(p, d)| (p.as_bytes(), tar::EntryType::Regular, d.as_slice(), None))
            .collect();
        // The bad member goes last, after everything valid.
        members.push((&name, kind, &data, size));
        raw_tar(&tar_path, &members);
        let e = w.fails(&["import", tar_path.to_str().unwrap(), "--repo", "target"]);
        assert!(e.contains(want), "{what}: {e}");
        assert!(
            !w.path("target").exists(),
            "{what}: the repository directory stays absent"
        );
        assert!(!w.path("escape").exists() && !w.p().parent().unwrap().join("escape").exists());
    }
    // An archive missing an object is incomplete.
    let members: Vec<RawMember> = good
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, (p, d))| (p.as_bytes(), tar::EntryType::Regular, d.as_slice(), None))
        .collect();
    raw_tar(&w.path("incomplete.tar"), &members);
    let e = w.fails(&["import", "incomplete.tar", "--repo", "target"]);
    assert!(e.contains(&format!("{}: missing (", good[2].0)), "{e}");
    assert!(!w.path("target").exists());
    // And the good archive imports.
    w.ok(&["import", "good.tar", "--repo", "target"]);
    assert_eq!(w.verify_json("target", "stable")["ok"], true);
}

#[test]
fn full_flow_with_fresh_keys() {
    let w = Work::new(4, 2);
    let root_id = w.ok(&["keys", "generate", "root", "--dir", "keys"]);
    let rel_id = w.ok(&["keys", "generate", "release", "--dir", "keys"]);
    assert_ne!(root_id, rel_id);
    w.ok(&[
        "root",
        "init",
        "--root-key",
        "keys/root.pub",
        "--root-threshold",
        "1",
        "--release-key",
        "keys/release.pub",
        "--release-threshold",
        "1",
        "--sign",
        "keys/root.key",
        "--out",
        "root.v1",
    ]);
    let id = w.build("app.bundle", "HEAD");
    let inspect: serde_json::Value =
        serde_json::from_str(&w.ok(&["bundle", "inspect", "app.bundle", "--json"])).unwrap();
    assert_eq!(inspect["id"], id.as_str());
    w.ok(&[
        "release",
        "--repo",
        "origin",
        "--bundle",
        "app.bundle",
        "--channel",
        "stable",
        "--key",
        "keys/release.key",
        "--root",
        "root.v1",
        "--expires",
        "7d",
    ]);
    // The dev release key is not a release key of this root.
    let e = w.fails(&[
        "release",
        "--repo",
        "origin",
        "--bundle",
        "app.bundle",
        "--channel",
        "stable",
        "--key",
        DEV_RELEASE_KEY_2,
        "--root",
        "root.v1",
    ]);
    assert!(e.contains("is not a release key of root v1"), "{e}");
    let v: serde_json::Value = serde_json::from_str(&w.ok(&[
        "verify",
        "--repo",
        "origin",
        "--channel",
        "stable",
        "--root",
        "root.v1",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["bundle"], id.as_str());
    assert_eq!(v["signers"][0], rel_id.trim());
    assert!(v["expires"].as_u64().unwrap() - v["created"].as_u64().unwrap() == 7 * 86400);
    assert_eq!(
        std::fs::read(w.path("origin/roots/1")).unwrap(),
        std::fs::read(w.path("root.v1")).unwrap()
    );
    w.ok(&[
        "export",
        "--repo",
        "origin",
        "--channel",
        "stable",
        "--root",
        "root.v1",
        "--out",
        "stable.tar",
    ]);
    // Without the right root, the archive is refused (it belongs to another trust root).
    let e = w.fails(&["import", "stable.tar", "--repo", "site"]);
    assert!(
        e.contains("roots/1 differs from the trusted root v1"),
        "{e}"
    );
    assert!(!w.path("site").exists());
    w.ok(&[
        "import",
        "stable.tar",
        "--repo",
        "site",
        "--root",
        "root.v1",
    ]);
    let v2: serde_json::Value = serde_json::from_str(&w.ok(&[
        "verify",
        "--repo",
        "site",
        "--channel",
        "stable",
        "--root",
        "root.v1",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v2, v, "the site verifies exactly like the origin");
}

/// The members of `repo`'s export of `stable`, as (path, bytes).
fn exported_members(w: &Work, out: &str) -> Vec<(String, Vec<u8>)> {
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        out,
    ]);
    let mut members = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(w.path(out)).unwrap())
        .entries()
        .unwrap()
    {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        members.push((e.path().unwrap().display().to_string(), data));
    }
    members
}

/// Peak resident memory of this process's waited-for children, bytes.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    ru.ru_maxrss as u64 * 1024
}

/// `cairn import` of an archive whose last member's header claims a
/// gigabyte (a sparse file: the bytes are really there, as zeros) is
/// refused at the header, without reading or allocating the member, for
/// every kind: channel, root, and the GNU long-name and PAX headers the tar
/// reader would otherwise buffer whole. Nothing reaches the repository.
#[test]
fn import_refuses_huge_members_without_allocating_them() {
    let (w, _) = Work::released(1);
    let good = exported_members(&w, "good.tar");
    let gib = 1u64 << 30;
    let cases: [(&str, &[u8], tar::EntryType, &str); 4] = [
        (
            "channel",
            b"channels/huge",
            tar::EntryType::Regular,
            "member `channels/huge` is 1073741824 bytes, over the limit of 65536",
        ),
        (
            "root",
            b"roots/2",
            tar::EntryType::Regular,
            "member `roots/2` is 1073741824 bytes, over the limit of 262144",
        ),
        (
            "gnu long name",
            b"channels/stable",
            tar::EntryType::GNULongName,
            "member `channels/stable`: GNULongName entries are not allowed",
        ),
        (
            "pax header",
            b"channels/stable",
            tar::EntryType::XHeader,
            "member `channels/stable`: XHeader entries are not allowed",
        ),
    ];
    for (what, name, kind, want) in cases {
        let tar_path = w.path(&format!("huge-{}.tar", what.replace(' ', "-")));
        let members: Vec<RawMember> = good
            .iter()
            .map(|(p, d)| (p.as_bytes(), tar::EntryType::Regular, d.as_slice(), None))
            .collect();
        raw_tar(&tar_path, &members);
        // Replace the end-of-archive blocks by the huge member's header,
        // then extend the file (sparsely) by its claimed size.
        let mut bytes = std::fs::read(&tar_path).unwrap();
        while bytes.len() >= 512 && bytes[bytes.len() - 512..].iter().all(|b| *b == 0) {
            bytes.truncate(bytes.len() - 512);
        }
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(gib);
        h.set_cksum();
        bytes.extend_from_slice(h.as_bytes());
        std::fs::write(&tar_path, &bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tar_path)
            .unwrap();
        f.set_len(bytes.len() as u64 + gib + 1024).unwrap();
        drop(f);
        let e = w.fails(&["import", tar_path.to_str().unwrap(), "--repo", "target"]);
        assert!(e.contains(want), "{what}: {e}");
        assert!(!w.path("target").exists(), "{what}: nothing written");
        std::fs::remove_file(&tar_path).unwrap();
    }
    // No child (cairn) ever held anything near the gigabyte.
    let rss = children_max_rss();
    assert!(rss < 256 << 20, "peak RSS of a cairn process: {rss} bytes");
}

/// Roots are the only members held in memory until the chain is checked;
/// their total is bounded whatever their count.
#[test]
fn import_bounds_the_root_bytes_it_holds() {
    let (w, _) = Work::released(1);
    let good = exported_members(&w, "good.tar");
    let root = vec![0u8; 256 << 10];
    let names: Vec<String> = (2..=17).map(|v| format!("roots/{v}")).collect();
    let mut members: Vec<RawMember> = Vec::new();
    members.push((
        good[0].0.as_bytes(),
        tar::EntryType::Regular,
        good[0].1.as_slice(),
        None,
    ));
    assert_eq!(good[0].0, "roots/1");
    for n in &names {
        members.push((n.as_bytes(), tar::EntryType::Regular, &root, None));
    }
    for (p, d) in &good[1..] {
        members.push((p.as_bytes(), tar::EntryType::Regular, d, None));
    }
    raw_tar(&w.path("many-roots.tar"), &members);
    let e = w.fails(&["import", "many-roots.tar", "--repo", "target"]);
    assert!(
        e.contains("root members exceed 4194304 bytes in total"),
        "{e}"
    );
    assert!(!w.path("target").exists());
}

/// Asserts `stderr` has no raw control character (ESC, BEL, CR ...)
/// except line ends, and contains `want`.
fn assert_escaped(stderr: &str, want: &str) {
    assert!(
        !stderr.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters reached the terminal: {stderr:?}"
    );
    assert!(stderr.contains(want), "missing {want:?} in {stderr:?}");
}

/// Channel names from unverified data (an archive member's name, the
/// channel inside a forged release in a repository or an archive) are
/// shown escaped: an ANSI sequence cannot recolour or rewrite the
/// operator's terminal.
#[test]
fn untrusted_channel_names_are_escaped_in_errors() {
    let (w, _) = Work::released(1);
    let good = exported_members(&w, "good.tar");

    // An archive member named with an ANSI sequence.
    let evil_name = b"channels/\x1b[31mred\x1b[0m";
    let mut members: Vec<RawMember> = good
        .iter()
        .map(|(p, d)| (p.as_bytes(), tar::EntryType::Regular, d.as_slice(), None))
        .collect();
    members.push((evil_name, tar::EntryType::Regular, b"x", None));
    raw_tar(&w.path("evil-name.tar"), &members);
    let e = w.fails(&["import", "evil-name.tar", "--repo", "target"]);
    assert_escaped(&e, "unexpected member `channels/\\x1b[31mred\\x1b[0m`");
    assert!(!w.path("target").exists());

    // A release in the repository whose channel field holds a terminal
    // title escape and a screen clear (unsigned: found before any
    // signature check).
    forge_channel_name(&w, "stable", "\x1b]0;pwned\x07\x1b[2Jstable");
    let e = w.verify_err("repo", "stable");
    assert_escaped(&e, "channel `\\x1b]0;pwned\\x07\\x1b[2Jstable`");

    // The same channel file carried in an archive.
    let forged = std::fs::read(w.path("repo/channels/stable")).unwrap();
    let members: Vec<RawMember> = good
        .iter()
        .map(|(p, d)| {
            let d = if p == "channels/stable" {
                forged.as_slice()
            } else {
                d.as_slice()
            };
            (p.as_bytes(), tar::EntryType::Regular, d, None)
        })
        .collect();
    raw_tar(&w.path("evil-release.tar"), &members);
    let e = w.fails(&["import", "evil-release.tar", "--repo", "target"]);
    assert_escaped(&e, "channel `\\x1b]0;pwned\\x07\\x1b[2Jstable`");
    assert!(!w.path("target").exists());
}

#[test]
fn release_and_import_recover_from_a_maximum_sequence_by_rotating_the_release_keys() {
    let w = Work::new(3, 2);
    w.build("b1.bundle", "main~1");
    w.build("b2.bundle", "main");
    w.release("repo", "b1.bundle", "stable", &[]);
    // A stolen release key pushed the channel to the top.
    forge(
        &w,
        "stable",
        |r| r.sequence = u64::MAX,
        &[&dev_key(DEV_RELEASE_KEY)],
    );
    let head = std::fs::read(w.path("repo/channels/stable")).unwrap();
    let e = w.fails(&[
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b2.bundle",
        "--channel",
        "stable",
        "--key",
        DEV_RELEASE_KEY,
    ]);
    assert!(
        e.contains("channel `stable` is exhausted") && e.contains("rotate the release keys"),
        "{e}"
    );
    assert_eq!(std::fs::read(w.path("repo/channels/stable")).unwrap(), head);
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        "old.tar",
    ]);
    w.ok(&["import", "old.tar", "--repo", "air"]);
    assert_eq!(w.verify_json("air", "stable")["sequence"], u64::MAX);

    // Rotate to a new release key; the next release restarts at 1.
    let root_v1 = concat!(env!("CARGO_MANIFEST_DIR"), "/../keys/trust/root.v1");
    let dev_root_pub = DEV_ROOT_KEY.replace(".key", ".pub");
    w.ok(&["keys", "generate", "release-3", "--dir", "."]);
    w.ok(&[
        "root",
        "rotate",
        "--previous",
        root_v1,
        "--root-key",
        &dev_root_pub,
        "--root-threshold",
        "1",
        "--release-key",
        "release-3.pub",
        "--release-threshold",
        "1",
        "--sign",
        DEV_ROOT_KEY,
        "--out",
        "root.v2",
    ]);
    let out = w.ok(&[
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b2.bundle",
        "--channel",
        "stable",
        "--key",
        "release-3.key",
        "--root",
        root_v1,
        "--root",
        "root.v2",
    ]);
    assert_eq!(out.trim(), "stable 1");
    let v = w.verify_json("repo", "stable");
    assert_eq!(
        (v["sequence"].as_u64(), v["root_version"].as_u64()),
        (Some(1), Some(2))
    );
    // The next one steps by one inside the new epoch.
    let out = w.ok(&[
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b2.bundle",
        "--channel",
        "stable",
        "--key",
        "release-3.key",
        "--root",
        root_v1,
        "--root",
        "root.v2",
    ]);
    assert_eq!(out.trim(), "stable 2");

    // Import moves the new-epoch head over the old maximum ...
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        "new.tar",
    ]);
    w.ok(&["import", "new.tar", "--repo", "air"]);
    assert_eq!(w.verify_json("air", "stable")["sequence"], 2);
    // ... and the old maximum cannot come back: its key no longer counts.
    let e = w.fails(&["import", "old.tar", "--repo", "air"]);
    assert!(e.contains("signed by 0 valid release key(s)"), "{e}");
    assert_eq!(w.verify_json("air", "stable")["sequence"], 2);
    // The old key cannot release any more either.
    let e = w.fails(&[
        "release",
        "--repo",
        "repo",
        "--bundle",
        "b1.bundle",
        "--channel",
        "stable",
        "--key",
        DEV_RELEASE_KEY,
    ]);
    assert!(e.contains("is not a release key of root v2"), "{e}");
    assert_eq!(w.verify_json("repo", "stable")["sequence"], 2);
}

/// The chunk addresses of a format 2 bundle stored in `repo`.
fn chunks_of(w: &Work, repo: &str, id: &str) -> Vec<String> {
    let top = std::fs::read(w.path(&format!("{repo}/{}", object_path_str(id).unwrap()))).unwrap();
    let limits = cairn_core::limits::Limits::default();
    match cairn_core::bundle::Head::decode(&top, Some(id), &limits).unwrap() {
        cairn_core::bundle::Head::Chunked(t) => {
            t.chunks.iter().map(|c| c.address.to_string()).collect()
        }
        cairn_core::bundle::Head::Whole(_) => panic!("{id} is format 1"),
    }
}

#[test]
fn format_1_then_format_2_on_one_channel_verify_export_import() {
    let w = Work::new(300, 2);
    // `--format 1` still writes format 1; the default is format 2.
    let v1 = w
        .ok(&[
            "bundle",
            "build",
            "--git",
            "edge",
            "--ref",
            "main~1",
            "--format",
            "1",
            "--out",
            "b1.bundle",
        ])
        .trim()
        .to_owned();
    let v2 = w.build("b2.bundle", "main");
    let inspect = |f: &str| -> serde_json::Value {
        serde_json::from_str(&w.ok(&["bundle", "inspect", f, "--json"])).unwrap()
    };
    let (i1, i2) = (inspect("b1.bundle"), inspect("b2.bundle"));
    assert_eq!(i1["format"], 1);
    assert_eq!(i2["format"], 2);
    assert_eq!(i1["id"], v1.as_str());
    assert_eq!(i2["id"], v2.as_str());
    assert_eq!(i1["objects"], i2["objects"]);
    // The same tree in both formats: same entries, same order.
    let same = w.build("b1-v2.bundle", "main~1");
    assert_ne!(same, v1);
    assert_eq!(inspect("b1-v2.bundle")["entries"], i1["entries"]);
    let e = fails_code(
        &[
            "bundle", "build", "--git", "edge", "--format", "3", "--out", "x.bundle",
        ],
        Some(w.p()),
        2,
    );
    assert!(e.contains("--format"), "{e}");

    // One channel: a format 1 release, then a format 2 one.
    w.release("repo", "b1.bundle", "stable", &[]);
    assert_eq!(w.verify_json("repo", "stable")["bundle"], v1.as_str());
    w.release("repo", "b2.bundle", "stable", &[]);
    let j = w.verify_json("repo", "stable");
    assert_eq!(j["sequence"], 2);
    assert_eq!(j["bundle"], v2.as_str());
    let chunks = chunks_of(&w, "repo", &v2);
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    // The repository holds both: format 1's manifest is still there.
    assert!(w
        .path(&format!("repo/{}", object_path_str(&v1).unwrap()))
        .is_file());

    // Export and import the format 2 release: the chunks travel.
    w.ok(&[
        "export",
        "--repo",
        "repo",
        "--channel",
        "stable",
        "--out",
        "two.tar",
    ]);
    w.ok(&["import", "two.tar", "--repo", "air"]);
    let j = w.verify_json("air", "stable");
    assert_eq!(
        (j["sequence"].as_u64(), j["bundle"].as_str()),
        (Some(2), Some(v2.as_str()))
    );
    for c in &chunks {
        assert!(w
            .path(&format!("air/{}", object_path_str(c).unwrap()))
            .is_file());
    }

    // A missing chunk is named by `verify`.
    std::fs::remove_file(w.path(&format!("repo/{}", object_path_str(&chunks[1]).unwrap())))
        .unwrap();
    let e = w.verify_err("repo", "stable");
    assert!(e.contains("missing (bundle manifest chunk 2)"), "{e}");
}
