//! `cairn secret`, run as a process, against Debian's `age` command line
//! (`age`, `age-keygen`; .ci/run installs the `age` package): each side
//! decrypts what the other encrypted.

use std::path::Path;
use std::process::{Command, Output};

fn cairn(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run cairn")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `age-keygen -o NAME`; returns the recipient.
fn age_keygen(dir: &Path, name: &str) -> String {
    ok(
        Command::new("age-keygen")
            .args(["-o", name])
            .current_dir(dir)
            .output()
            .expect("age-keygen (Debian package age)"),
        "age-keygen",
    );
    ok(
        Command::new("age-keygen")
            .args(["-y", name])
            .current_dir(dir)
            .output()
            .expect("age-keygen -y"),
        "age-keygen -y",
    )
    .trim()
    .to_owned()
}

const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: prod\ntype: Opaque\nstringData:\n  password: \"hunter2\"\n";

/// The armored age file inside an AgeSecret document.
fn ciphertext(doc: &str) -> String {
    let v: serde_json::Value = serde_norway::from_str(doc).expect("AgeSecret YAML");
    v["ciphertext"].as_str().expect("ciphertext").to_owned()
}

#[test]
fn cairn_encrypts_for_the_age_cli_and_decrypts_what_it_encrypted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let eu = age_keygen(d, "eu.key");
    let us = age_keygen(d, "us.key");
    let (_, asia) = {
        let out = cairn(&["secret", "keygen", "-o", "asia.key"], d);
        (out.status.success(), ok(out, "keygen").trim().to_owned())
    };
    assert!(asia.starts_with("age1"), "{asia}");
    std::fs::write(d.join("secret.yaml"), SECRET).expect("write");

    // cairn → age: two sites' recipients, each age identity decrypts.
    let doc = ok(
        cairn(
            &[
                "secret",
                "encrypt",
                "-r",
                &eu,
                "--recipient",
                &us,
                "-f",
                "secret.yaml",
            ],
            d,
        ),
        "encrypt",
    );
    assert!(!doc.contains("hunter2"), "{doc}");
    assert!(doc.contains("kind: AgeSecret"), "{doc}");
    std::fs::write(d.join("db.age"), ciphertext(&doc)).expect("write");
    for key in ["eu.key", "us.key"] {
        let plain = ok(
            Command::new("age")
                .args(["-d", "-i", key, "db.age"])
                .current_dir(d)
                .output()
                .expect("age -d"),
            "age -d",
        );
        assert_eq!(plain, SECRET);
    }
    // A site whose key is not among the recipients: a clear refusal.
    std::fs::write(d.join("db.age.yaml"), &doc).expect("write");
    let out = cairn(
        &["secret", "decrypt", "-i", "asia.key", "-f", "db.age.yaml"],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("db.age.yaml: Secret prod/db: no identity in asia.key can decrypt it"),
        "{err}"
    );
    let out = cairn(
        &["secret", "decrypt", "-i", "us.key", "-f", "db.age.yaml"],
        d,
    );
    assert_eq!(ok(out, "decrypt"), SECRET);

    // age → cairn: `age -a -R` output wrapped in an AgeSecret by hand, as
    // docs/OPERATIONS.md describes, decrypts with cairn's decrypt (the
    // function the agent uses).
    std::fs::write(d.join("recipients.txt"), format!("# sites\n{asia}\n")).expect("write");
    ok(
        Command::new("age")
            .args(["-a", "-R", "recipients.txt", "-o", "cli.age", "secret.yaml"])
            .current_dir(d)
            .output()
            .expect("age -a"),
        "age -a",
    );
    let armored = std::fs::read_to_string(d.join("cli.age")).expect("read");
    let indented: String = armored.lines().map(|l| format!("  {l}\n")).collect();
    let wrapped = format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata:\n  name: db\n  namespace: prod\nciphertext: |\n{indented}"
    );
    std::fs::write(d.join("cli.age.yaml"), &wrapped).expect("write");
    let out = cairn(
        &["secret", "decrypt", "-i", "asia.key", "-f", "cli.age.yaml"],
        d,
    );
    assert_eq!(ok(out, "decrypt age-CLI file"), SECRET);
    // The same with the wrong name in clear: refused.
    std::fs::write(
        d.join("moved.yaml"),
        wrapped.replace("name: db", "name: web"),
    )
    .expect("write");
    let out = cairn(
        &["secret", "decrypt", "-i", "asia.key", "-f", "moved.yaml"],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("moved under another name"), "{err}");

    // Recipients from a file (as `age -R`), cairn → age.
    let out = cairn(
        &[
            "secret",
            "encrypt",
            "-R",
            "recipients.txt",
            "-f",
            "secret.yaml",
            "-o",
            "r.yaml",
        ],
        d,
    );
    ok(out, "encrypt -R");
    let doc = std::fs::read_to_string(d.join("r.yaml")).expect("read");
    std::fs::write(d.join("r.age"), ciphertext(&doc)).expect("write");
    let plain = ok(
        Command::new("age")
            .args(["-d", "-i", "asia.key", "r.age"])
            .current_dir(d)
            .output()
            .expect("age -d"),
        "age -d with a cairn keygen identity",
    );
    assert_eq!(plain, SECRET);
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let eu = age_keygen(d, "eu.key");
    std::fs::write(
        d.join("cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
    )
    .expect("write");
    let out = cairn(&["secret", "encrypt", "-r", &eu, "-f", "cm.yaml"], d);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cm.yaml: fields apiVersion/kind"), "{err}");
    assert!(out.stdout.is_empty());

    std::fs::write(d.join("secret.yaml"), SECRET).expect("write");
    let out = cairn(
        &[
            "secret",
            "encrypt",
            "-r",
            "ssh-ed25519 AAAA\x1b[2J",
            "-f",
            "secret.yaml",
        ],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an age X25519 recipient"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");

    let out = cairn(&["secret", "encrypt", "-f", "secret.yaml"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recipient given"));

    let out = cairn(&["secret", "keygen", "-o", "eu.key"], d);
    assert_eq!(out.status.code(), Some(1), "refuses to overwrite a key");
    assert!(std::fs::read_to_string(d.join("eu.key"))
        .expect("read")
        .contains("AGE-SECRET-KEY-1"));
}

/// An AgeSecret committed to Git goes into a bundle as ciphertext only,
/// and the bundle's object decrypts with the site's identity through
/// `cairn_bundle::secret` (what the agent calls after verification).
#[test]
fn a_bundle_carries_the_ciphertext_only() {
    use cairn_test_support::{commit_files, make_manifest_repo, FixtureOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let site = age_keygen(d, "site.key");
    std::fs::write(d.join("secret.yaml"), SECRET).expect("write");
    let doc = ok(
        cairn(&["secret", "encrypt", "-r", &site, "-f", "secret.yaml"], d),
        "encrypt",
    );
    let git = d.join("git");
    make_manifest_repo(
        &git,
        &FixtureOptions {
            apps: 1,
            configmap_kb: 1,
            commits: 1,
        },
    )
    .expect("fixture");
    commit_files(
        &git,
        &[("clusters/edge/db.age.yaml", &doc)],
        "add an encrypted Secret",
        "2026-03-01T00:00:00Z",
    )
    .expect("commit");
    let bundle = d.join("b.bundle");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("bundle")
        .arg("build")
        .arg("--git")
        .arg(&git)
        .args(["--ref", "HEAD", "--out"])
        .arg(&bundle)
        .env("CAIRN_KUBECTL", "/nonexistent-kubectl")
        .output()
        .expect("cairn bundle build");
    ok(out, "bundle build");
    let raw = std::fs::read(&bundle).expect("read bundle");
    assert!(
        !raw.windows(7).any(|w| w == b"hunter2"),
        "plaintext in the bundle"
    );
    let mut found = Vec::new();
    cairn_bundle::bundle::read_bundle_file(
        &bundle,
        &cairn_bundle::limits::Limits::default(),
        |e, bytes| {
            if e.kind == "AgeSecret" {
                found.push((e.clone(), bytes));
            }
            Ok(())
        },
    )
    .expect("read bundle");
    assert_eq!(found.len(), 1, "one AgeSecret object");
    let (entry, bytes) = &found[0];
    assert_eq!(
        (entry.namespace.as_str(), entry.name.as_str()),
        ("prod", "db")
    );
    let s = cairn_bundle::secret::parse(bytes, "bundle object").expect("AgeSecret object");
    let ids = cairn_bundle::secret::Identities::read(&d.join("site.key")).expect("identity");
    let plain = cairn_bundle::secret::decrypt(&s, "bundle object", &ids).expect("decrypt");
    assert_eq!(plain, SECRET.as_bytes());
}
