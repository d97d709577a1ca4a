//! `cairn keys` and `cairn root`, run as processes: the happy path and each
//! bad input from the foundation issue.

use crate::support::{fails_code, ok_in as ok, run_in as cairn};
use std::path::{Path, PathBuf};

/// Runs a command that must fail with exit code `code`; returns stderr.
fn fails(args: &[&str], cwd: &Path, code: i32) -> String {
    fails_code(args, Some(cwd), code)
}

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            let id = ok(&["keys", "generate", n], dir.path());
            assert_eq!(id.trim().len(), 64, "key id is 64 hex digits: {id}");
        }
        Self { dir }
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn exists(&self, f: &str) -> bool {
        self.p().join(f).exists()
    }
}

const R3: &[&str] = &[
    "--root-key",
    "r1.pub",
    "--root-key",
    "r2.pub",
    "--root-key",
    "r3.pub",
    "--root-threshold",
    "2",
    "--release-key",
    "rel.pub",
    "--release-threshold",
    "1",
];

fn init_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["root", "init"];
    v.extend_from_slice(R3);
    v.extend_from_slice(extra);
    v
}

#[test]
fn keys_are_written_with_private_mode_and_matching_ids() {
    let k = Keys::new(&["a"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(k.p().join("a.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let from_pub = ok(&["keys", "id", "a.pub"], k.p());
    let from_key = ok(&["keys", "id", "a.key"], k.p());
    assert_eq!(from_pub, from_key);
    let err = fails(&["keys", "generate", "a"], k.p(), 1);
    assert!(
        err.starts_with("cairn: ") && err.contains("already exists"),
        "{err}"
    );
}

#[test]
fn root_init_rotate_verify_chain() {
    let k = Keys::new(&["r1", "r2", "r3", "n1", "n2", "m1", "rel"]);
    ok(
        &init_args(&["--sign", "r1.key", "--sign", "r3.key", "--out", "v1"]),
        k.p(),
    );
    // v2: new root keys n1, n2 (threshold 2), signed by 2 old + 2 new.
    let rotate = |prev: &str, new: &[&str], t: &str, sign: &[&str], out: &str| {
        let mut v = vec!["root", "rotate", "--previous", prev];
        for n in new {
            v.extend_from_slice(&["--root-key", n]);
        }
        v.extend_from_slice(&[
            "--root-threshold",
            t,
            "--release-key",
            "rel.pub",
            "--release-threshold",
            "1",
        ]);
        for s in sign {
            v.extend_from_slice(&["--sign", s]);
        }
        v.extend_from_slice(&["--out", out]);
        cairn(&v, k.p())
    };
    let out = rotate(
        "v1",
        &["n1.pub", "n2.pub"],
        "2",
        &["r1.key", "r2.key", "n1.key", "n2.key"],
        "v2",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rotate(
        "v2",
        &["m1.pub"],
        "1",
        &["n1.key", "n2.key", "m1.key"],
        "v3",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = ok(&["root", "verify", "v1", "v2", "v3"], k.p());
    assert!(text.starts_with("root v3 ok"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["root", "verify", "v1", "v2", "v3", "--json"], k.p())).unwrap();
    assert_eq!(json["version"], 3);
    assert_eq!(json["root"]["threshold"], 1);

    // v1 -> v3: a version gap.
    let err = fails(&["root", "verify", "v1", "v3"], k.p(), 1);
    assert!(
        err.contains("v3") && err.contains("expected version 2, found version 3"),
        "{err}"
    );

    // v2 signed only by the new keys, or only by the old keys: refused, nothing written.
    let out = rotate(
        "v1",
        &["n1.pub", "n2.pub"],
        "2",
        &["n1.key", "n2.key"],
        "v2-new-only",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("by root v1"));
    assert!(!k.exists("v2-new-only"));
    let out = rotate(
        "v1",
        &["n1.pub", "n2.pub"],
        "2",
        &["r1.key", "r2.key"],
        "v2-old-only",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("by its own keys"));
    assert!(!k.exists("v2-old-only"));
}

#[test]
fn embedded_root_verifies() {
    let d = tempfile::tempdir().unwrap();
    let text = ok(&["root", "verify", "--embedded"], d.path());
    assert!(text.starts_with("root v1 ok"), "{text}");
}

#[test]
fn bad_inputs_name_the_file_and_write_nothing() {
    let k = Keys::new(&["r1", "r2", "r3", "rel"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            init_args(&["--sign", "missing.key", "--out", "out"]),
            "missing.key",
        ),
        (
            init_args(&["--sign", "r1.pub", "--out", "out"]),
            "r1.pub: this is a public key file",
        ),
        (
            vec![
                "root",
                "init",
                "--root-key",
                "r1.key",
                "--root-threshold",
                "1",
                "--release-key",
                "rel.pub",
                "--release-threshold",
                "1",
                "--sign",
                "r1.key",
                "--out",
                "out",
            ],
            "r1.key: not a public key file",
        ),
        (
            vec![
                "root",
                "init",
                "--root-key",
                "r1.pub",
                "--root-threshold",
                "0",
                "--release-key",
                "rel.pub",
                "--release-threshold",
                "1",
                "--sign",
                "r1.key",
                "--out",
                "out",
            ],
            "root threshold is 0",
        ),
        (
            vec![
                "root",
                "init",
                "--root-key",
                "r1.pub",
                "--root-threshold",
                "2",
                "--release-key",
                "rel.pub",
                "--release-threshold",
                "1",
                "--sign",
                "r1.key",
                "--out",
                "out",
            ],
            "root threshold 2 is above its 1 key(s)",
        ),
        (
            init_args(&["--sign", "r1.key", "--out", "out"]),
            "signed by 1 valid root key(s), threshold is 2",
        ),
        (
            init_args(&["--sign", "r1.key", "--sign", "r1.key", "--out", "out"]),
            "threshold is 2",
        ),
        (
            init_args(&[
                "--sign",
                "r1.key",
                "--sign",
                "r2.key",
                "--expires",
                "10y",
                "--out",
                "out",
            ]),
            "unknown unit",
        ),
    ];
    for (args, needle) in cases {
        let usage = needle == "unknown unit";
        let err = fails(&args, k.p(), if usage { 2 } else { 1 });
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in: {err}"
        );
        if !usage {
            assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
        }
        assert!(!k.exists("out"), "{args:?} wrote an output file");
    }
    let err = fails(&["root", "init", "--bogus"], k.p(), 2);
    assert!(err.contains("--bogus"), "{err}");
}

#[test]
fn truncated_or_tampered_root_files_are_refused() {
    let k = Keys::new(&["r1", "r2", "r3", "rel"]);
    ok(
        &init_args(&["--sign", "r1.key", "--sign", "r2.key", "--out", "v1"]),
        k.p(),
    );
    let good = std::fs::read(k.p().join("v1")).unwrap();
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = k.p().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    write("truncated", &good[..good.len() / 2]);
    let err = fails(&["root", "verify", "truncated"], k.p(), 1);
    assert!(err.contains("truncated: cannot decode"), "{err}");
    // Flip a byte inside the signed payload (the middle of the file).
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    write("tampered", &bad);
    let err = fails(&["root", "verify", "tampered"], k.p(), 1);
    assert!(err.contains("tampered:"), "{err}");
    write("garbage", b"\xff\x00not cbor at all");
    let err = fails(&["root", "verify", "garbage"], k.p(), 1);
    assert!(err.contains("garbage: cannot decode"), "{err}");
}
