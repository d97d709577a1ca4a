//! The agent following an `oci://` source: a real registry (Debian's
//! docker-registry, the CNCF distribution registry 2.8) on loopback behind
//! a private CA with htpasswd credentials. Adopts; a one-object change
//! moves only the changed blobs (counted in the registry's access log);
//! wrong credentials, an unknown CA, a tag moved back to an older release
//! and a tampered blob in the registry's storage are each refused with a
//! clear message and nothing adopted.

use crate::support::*;
use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_test_support::registry::{quiet_count, settled_count, Registry};
use std::path::Path;
use std::process::Command;

fn objects(bundle: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let m = read_bundle_file(bundle, &Limits::default(), |e, _| {
        v.push(e.object.to_string());
        Ok(())
    })
    .unwrap();
    v.push(m.id().to_string());
    // Format 2: the manifest chunks are blobs too.
    v.extend(m.encode_all().chunks.iter().map(|(a, _)| a.to_string()));
    v
}

struct Setup {
    w: World,
    reg: Registry,
    url: String,
}

impl Setup {
    fn push(&self) {
        ok(Command::new(cairn_bin())
            .args(["push", "--channel", "stable", "--repo"])
            .arg(&self.w.repo)
            .arg("--to")
            .arg(&self.url)
            .arg("--ca-file")
            .arg(self.reg.ca_file())
            .arg("--credentials-file")
            .arg(self.w.path("creds.json")));
    }

    /// An agent config whose one source is the registry, with `extra`
    /// source settings (YAML flow-map entries).
    fn config(&self, name: &str, extra: &str) -> std::path::PathBuf {
        self.w
            .config(name, &[format!("{{url: \"{}\"{extra}}}", self.url)])
    }

    fn good(&self) -> String {
        format!(
            ", caFile: \"{}\", credentialsFile: \"{}\"",
            self.reg.ca_file().display(),
            self.w.path("creds.json").display()
        )
    }

    fn blob_gets(&self) -> usize {
        self.reg
            .access_lines("GET", "/blobs/sha256:")
            .iter()
            .filter(|l| l.contains("\" 200 "))
            .count()
    }

    /// Raw manifest bytes under `reference` (tag or digest), with curl.
    fn curl(&self, method: &str, reference: &str, body: Option<&[u8]>) -> Vec<u8> {
        let (u, p) = self.reg.credentials();
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-f", "-X", method, "--cacert"])
            .arg(self.reg.ca_file())
            .arg("-u")
            .arg(format!("{u}:{p}"))
            .args([
                "-H",
                &format!("Accept: {}", cairn_bundle::oci::MT_INDEX),
                "-H",
                &format!("Content-Type: {}", cairn_bundle::oci::MT_INDEX),
            ])
            .arg(format!(
                "https://{}/v2/fleet/manifests/{reference}",
                self.reg.host()
            ));
        if let Some(b) = body {
            let f = self.w.path("body.json");
            std::fs::write(&f, b).unwrap();
            cmd.arg("--data-binary").arg(format!("@{}", f.display()));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "curl {method} {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs the agent once with `cfg` and checks nothing new was adopted:
    /// still release 2, the same files. Returns logs and the source's
    /// status error.
    fn expect_refused(
        &self,
        cfg: &Path,
        want: &std::collections::BTreeMap<String, Vec<u8>>,
    ) -> String {
        let logs = self.w.once_ok(cfg);
        let s = self.w.status().unwrap();
        assert_eq!(
            s.adopted.as_ref().unwrap().sequence,
            2,
            "still on release 2:\n{logs}"
        );
        assert_eq!(&self.w.files(), want, "last-good content kept");
        let src = s.sources.iter().find(|x| x.source == self.url).unwrap();
        let detail = format!(
            "{} {} {}",
            src.error.clone().unwrap_or_default(),
            src.last_rejection
                .as_ref()
                .map(|r| format!("{} {}", r.reason, r.message))
                .unwrap_or_default(),
            logs
        );
        assert!(!src.ok, "{detail}");
        detail
    }
}

#[test]
fn agent_follows_a_registry_behind_a_private_ca_and_refuses_attacks() {
    let w = World::new(3, 3, 1);
    let reg = Registry::start().unwrap();
    let (u, p) = reg.credentials();
    std::fs::write(
        w.path("creds.json"),
        serde_json::json!({"username": u, "password": p}).to_string(),
    )
    .unwrap();
    std::fs::write(
        w.path("wrong.json"),
        serde_json::json!({"username": u, "password": "wrong-password"}).to_string(),
    )
    .unwrap();
    let url = reg.url("fleet");
    let s = Setup { w, reg, url };
    let b1 = s.w.build("HEAD~2", "b1.bundle");
    let b2 = s.w.build("HEAD~1", "b2.bundle");
    let b3 = s.w.build("HEAD", "b3.bundle");

    // Release 1 through the registry: adopted.
    s.w.release(&b1);
    s.push();
    let index1 = s.curl("GET", "stable", None);
    let good = s.config("good.yaml", &s.good());
    let logs = s.w.once_ok(&good);
    assert_eq!(s.w.files(), expected_files(&b1), "{logs}");
    assert_eq!(s.w.status().unwrap().adopted.unwrap().sequence, 1);

    // A one-object change: only the release and the new blobs move.
    s.w.release(&b2);
    s.push();
    let new: Vec<_> = objects(&b2)
        .into_iter()
        .filter(|o| !objects(&b1).contains(o))
        .collect();
    assert_eq!(
        new.len(),
        3,
        "one changed object and the new bundle manifest (top document and one chunk)"
    );
    let before = quiet_count(|| s.blob_gets());
    s.w.once_ok(&good);
    let want = expected_files(&b2);
    assert_eq!(s.w.files(), want);
    assert_eq!(s.w.status().unwrap().adopted.unwrap().sequence, 2);
    let fetched = settled_count(before + 1 + new.len(), || s.blob_gets()) - before;
    assert_eq!(
        fetched,
        1 + new.len(),
        "the release and {new:?}:\n{}",
        s.reg.log()
    );
    for o in &new {
        assert_eq!(
            settled_count(1, || s
                .reg
                .access_lines("GET", &format!("/blobs/{o}"))
                .len()),
            1,
            "{o} fetched once"
        );
    }

    // Wrong credentials.
    let cfg = s.config(
        "wrong.yaml",
        &format!(
            ", caFile: \"{}\", credentialsFile: \"{}\"",
            s.reg.ca_file().display(),
            s.w.path("wrong.json").display()
        ),
    );
    let d = s.expect_refused(&cfg, &want);
    assert!(d.contains("refused the credentials of user `cairn`"), "{d}");
    assert!(!d.contains("wrong-password"), "{d}");

    // An unknown CA (no caFile: the system roots do not know it).
    let cfg = s.config(
        "noca.yaml",
        &format!(
            ", credentialsFile: \"{}\"",
            s.w.path("creds.json").display()
        ),
    );
    let d = s.expect_refused(&cfg, &want);
    assert!(d.contains("UnknownIssuer"), "{d}");

    // The tag moved back to release 1.
    let index2 = s.curl("GET", "stable", None);
    s.curl("PUT", "stable", Some(&index1));
    let d = s.expect_refused(&good, &want);
    assert!(d.contains("rollback"), "{d}");
    s.curl("PUT", "stable", Some(&index2));

    // Release 3 with its new object tampered in the registry's storage.
    s.w.release(&b3);
    s.push();
    let victim = objects(&b3)
        .into_iter()
        .find(|o| !objects(&b2).contains(o) && *o != objects(&b3).last().cloned().unwrap())
        .unwrap();
    let data = s.reg.blob_data_path(&victim).unwrap();
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1] ^= 0x20;
    std::fs::write(&data, &bytes).unwrap();
    let d = s.expect_refused(&good, &want);
    assert!(
        d.contains("does not match its digest") && d.contains(&victim[7..]),
        "{d}"
    );

    // Repaired, release 3 is adopted.
    bytes[1] ^= 0x20;
    std::fs::write(&data, &bytes).unwrap();
    s.w.once_ok(&good);
    assert_eq!(s.w.status().unwrap().adopted.unwrap().sequence, 3);
    assert_eq!(s.w.files(), expected_files(&b3));
}

/// `caFile` and `credentialsFile` apply to https:// sources too: the
/// registry's `/v2/` endpoint (200 `{}` only with credentials) stands in
/// for a static server behind a private CA and basic auth.
#[test]
fn https_sources_use_the_ca_file_and_basic_credentials() {
    use cairn_agent::source::{HttpSource, SourceOptions};
    use cairn_bundle::oci::NetSettings;
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (u, p) = reg.credentials();
    let creds = dir.path().join("creds.json");
    std::fs::write(
        &creds,
        serde_json::json!({"username": u, "password": p}).to_string(),
    )
    .unwrap();
    let base = format!("https://{}/v2", reg.host());
    let source = |net: Option<NetSettings>| {
        let mut opts = SourceOptions::default();
        if let Some(n) = net {
            opts.tls.insert(base.clone(), n);
        }
        HttpSource::new(&base, &opts).unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let with_ca = NetSettings {
        ca_file: Some(reg.ca_file()),
        ..Default::default()
    };
    let with_creds = NetSettings {
        credentials_file: Some(creds.clone()),
        ..with_ca.clone()
    };
    let e = rt.block_on(source(None).fetch("", 1024)).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let e = rt
        .block_on(source(Some(with_ca)).fetch("", 1024))
        .unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let body = rt
        .block_on(source(Some(with_creds)).fetch("", 1024))
        .unwrap()
        .unwrap();
    assert_eq!(body, b"{}");
    // The password never shows in Debug output.
    let dbg = format!(
        "{:?}",
        source(Some(NetSettings {
            credentials_file: Some(creds),
            ca_file: Some(reg.ca_file()),
            ..Default::default()
        }))
    );
    assert!(!dbg.contains(p) && dbg.contains("redacted"), "{dbg}");
}
