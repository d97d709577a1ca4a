//! Each attack from the security model, served to a real agent that has
//! already adopted release 2: the attack is refused with its specific
//! reason (logs, status, metrics) and the manifests directory keeps the
//! last-good content.

mod support;

use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_bundle::release::{Release, Rollout, RELEASE_FORMAT};
use cairn_bundle::repo::{channel_path, object_path, root_path};
use cairn_keys::{KeyPair, Root};
use cairn_test_support::{Fault, StaticServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::*;

struct Setup {
    w: World,
    /// Files of release 2 (the last-good state).
    want: BTreeMap<String, Vec<u8>>,
    /// The release-1 envelope (for the rollback attack).
    old_release: Vec<u8>,
    /// Bundle 3 (not yet released).
    b3: PathBuf,
    b3_id: String,
    /// An object of bundle 3 that bundle 2 does not have.
    b3_new_object: String,
}

fn setup() -> Setup {
    let w = World::new(3, 3, 1);
    let b1 = w.build("HEAD~2", "b1.bundle");
    let b2 = w.build("HEAD~1", "b2.bundle");
    let b3 = w.build("HEAD", "b3.bundle");
    w.release(&b1);
    let old_release = std::fs::read(w.repo.join(channel_path("stable"))).unwrap();
    w.release(&b2);
    let cfg = w.config("good.yaml", &[w.repo.display().to_string()]);
    w.once_ok(&cfg);
    let want = expected_files(&b2);
    assert_eq!(w.files(), want);
    let objects = |b: &Path| {
        let mut v = Vec::new();
        let m = read_bundle_file(b, &Limits::default(), |e, _| {
            v.push(e.object.clone());
            Ok(())
        })
        .unwrap();
        (m.id(), v)
    };
    let (_, o2) = objects(&b2);
    let (b3_id, o3) = objects(&b3);
    let b3_new_object = o3
        .into_iter()
        .find(|o| !o2.contains(o))
        .expect("bundle 3 has a new object");
    Setup {
        w,
        want,
        old_release,
        b3,
        b3_id,
        b3_new_object,
    }
}

impl Setup {
    /// A copy of the repository with bundle 3 properly released (seq 3),
    /// ready to be tampered with.
    fn attack_repo(&self) -> PathBuf {
        let dir = self.w.path("attack-repo");
        copy_dir(&self.w.repo, &dir);
        self.w.release_into(&dir, &self.b3, "stable");
        dir
    }

    fn release_doc(&self, channel: &str, sequence: u64, expires: u64) -> Release {
        let now = cairn_bundle::unix_now();
        Release {
            format: RELEASE_FORMAT,
            channel: channel.into(),
            sequence,
            bundle: self.b3_id.clone(),
            created: now.saturating_sub(1000),
            expires,
            rollout: Rollout::default(),
            selector: BTreeMap::new(),
        }
    }

    /// Serves `dir` over HTTP, runs `--once`, and checks that the attack was
    /// refused with `reason` while the last-good files stay.
    fn expect_refused(&self, dir: &Path, reason: &str) -> String {
        let server = StaticServer::start(dir).unwrap();
        let cfg = self.w.config("attack.yaml", &[server.url()]);
        let logs = self.w.once_ok(&cfg);
        assert_eq!(self.w.files(), self.want, "last-good content kept");
        let s = self.w.status().unwrap();
        assert_eq!(
            s.adopted.as_ref().unwrap().sequence,
            2,
            "still on release 2"
        );
        let rej = s
            .last_rejection
            .clone()
            .unwrap_or_else(|| panic!("no rejection recorded:\n{logs}"));
        assert_eq!(rej.reason, reason, "{rej:?}");
        let src = s.sources.iter().find(|x| x.source == server.url()).unwrap();
        assert_eq!(src.last_rejection.as_ref().unwrap().reason, reason);
        assert!(logs.contains("rejected") && logs.contains(reason), "{logs}");
        logs
    }
}

fn write_channel(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join(channel_path("stable")), bytes).unwrap();
}

const FAR: u64 = 4_000_000_000;

#[test]
fn rollback_to_an_old_release_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    write_channel(&dir, &s.old_release);
    s.expect_refused(&dir, "rollback");
}

#[test]
fn expired_release_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let now = cairn_bundle::unix_now();
    let env = s
        .release_doc("stable", 3, now - 10)
        .sign(&[&dev_key("dev-release-1")]);
    write_channel(&dir, &env.encode());
    s.expect_refused(&dir, "expired");
}

#[test]
fn release_for_another_channel_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let env = s
        .release_doc("beta", 3, FAR)
        .sign(&[&dev_key("dev-release-1")]);
    write_channel(&dir, &env.encode());
    s.expect_refused(&dir, "wrong_channel");
}

#[test]
fn release_signed_by_an_unknown_key_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let stranger = KeyPair::generate().unwrap();
    let env = s.release_doc("stable", 3, FAR).sign(&[&stranger]);
    write_channel(&dir, &env.encode());
    let logs = s.expect_refused(&dir, "signature_threshold");
    assert!(logs.contains("unknown key"), "{logs}");
}

#[test]
fn unsigned_release_is_below_threshold() {
    let s = setup();
    let dir = s.attack_repo();
    let env = s.release_doc("stable", 3, FAR).sign(&[]);
    write_channel(&dir, &env.encode());
    s.expect_refused(&dir, "signature_threshold");
}

#[test]
fn release_signed_by_a_root_key_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let env = s
        .release_doc("stable", 3, FAR)
        .sign(&[&dev_key("dev-root-1")]);
    write_channel(&dir, &env.encode());
    s.expect_refused(&dir, "signature_threshold");
}

#[test]
fn garbage_channel_file_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    write_channel(&dir, b"<html><body>502 Bad Gateway</body></html>");
    s.expect_refused(&dir, "malformed");
}

#[test]
fn truncated_release_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let good = std::fs::read(dir.join(channel_path("stable"))).unwrap();
    write_channel(&dir, &good[..good.len() / 2]);
    s.expect_refused(&dir, "malformed");
}

#[test]
fn flipped_byte_in_an_object_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let p = dir.join(object_path(&s.b3_new_object).unwrap());
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    s.expect_refused(&dir, "object_hash_mismatch");
    // Nothing of it became adoptable: with the object fixed, release 3 is
    // adopted normally.
    let clean = s.w.path("clean-repo");
    copy_dir(&s.w.repo, &clean);
    s.w.release_into(&clean, &s.b3, "stable");
    let cfg = s.w.config("clean.yaml", &[clean.display().to_string()]);
    s.w.once_ok(&cfg);
    assert_eq!(s.w.files(), expected_files(&s.b3));
}

#[test]
fn root_rotation_not_signed_by_the_previous_root_is_refused() {
    let s = setup();
    let dir = s.attack_repo();
    let current = cairn_keys::embedded::root().unwrap();
    let newkey = KeyPair::generate().unwrap();
    let r2 = Root::new(2, FAR, &[newkey.public_key()], 1, &[newkey.public_key()], 1).unwrap();
    assert_eq!(current.root.version, 1);
    std::fs::write(dir.join(root_path(2)), r2.sign(&[&newkey]).encode()).unwrap();
    // Also offer a release signed only by the rogue root's release key.
    let env = s.release_doc("stable", 3, FAR).sign(&[&newkey]);
    write_channel(&dir, &env.encode());
    let server = StaticServer::start(&dir).unwrap();
    let cfg = s.w.config("attack.yaml", &[server.url()]);
    let logs = s.w.once_ok(&cfg);
    assert!(logs.contains("root_rotation"), "{logs}");
    assert!(logs.contains("signature_threshold"), "{logs}");
    assert_eq!(s.w.files(), s.want);
    let st = s.w.status().unwrap();
    assert_eq!(st.root.version, 1, "rogue root not adopted");
    assert_eq!(st.adopted.unwrap().sequence, 2);
}

#[test]
fn endless_data_is_cut_at_the_limit() {
    let s = setup();
    let dir = s.attack_repo();
    write_channel(&dir, &vec![b'x'; 8 << 20]);
    let server = StaticServer::start(&dir).unwrap();
    let cfg = s.w.config("attack.yaml", &[server.url()]);
    s.w.once_ok(&cfg);
    assert_eq!(s.w.files(), s.want);
    let st = s.w.status().unwrap();
    let src = &st.sources[0];
    assert!(
        src.error.as_ref().unwrap().contains("exceeds the limit"),
        "{src:?}"
    );
}

#[test]
fn truncating_mirror_is_a_fetch_error_and_last_good_stays() {
    let s = setup();
    let dir = s.attack_repo();
    let server = StaticServer::start(&dir).unwrap();
    server.set_fault(Fault::Truncate);
    let cfg = s.w.config("attack.yaml", &[server.url()]);
    s.w.once_ok(&cfg);
    assert_eq!(s.w.files(), s.want);
    let st = s.w.status().unwrap();
    assert_eq!(st.adopted.unwrap().sequence, 2);
    assert!(!st.sources[0].ok, "{:?}", st.sources[0]);
}

#[test]
fn rejections_are_counted_in_metrics() {
    let s = setup();
    let dir = s.attack_repo();
    write_channel(&dir, &s.old_release);
    let server = StaticServer::start(&dir).unwrap();
    let cfg = s.w.config("attack.yaml", &[server.url()]);
    let mut agent = s.w.spawn(&cfg, "agent.log");
    wait_for(60, "listening", || {
        s.w.status()
            .is_some_and(|x| x.listen.is_some() && x.pid == agent.id())
    });
    let addr = s.w.status().unwrap().listen.unwrap();
    wait_for(60, "rollback counted", || {
        http_get(&addr, "/metrics")
            .1
            .contains("cairn_release_rejections_total{reason=\"rollback\"}")
    });
    assert_eq!(
        http_get(&addr, "/readyz").0,
        200,
        "last-good still enforced"
    );
    assert_eq!(s.w.files(), s.want);
    terminate(&mut agent);
    let log = s.w.log("agent.log");
    assert!(log.contains("\"reason\":\"rollback\""), "{log}");
}

#[test]
fn slow_retrieval_times_out_without_stalling_other_sources() {
    let s = setup();
    let dir = s.attack_repo();
    // A mirror that sends headers and then nothing, next to a good source.
    let stalled = StaticServer::start(&dir).unwrap();
    stalled.set_fault(Fault::Stall);
    let cfg =
        s.w.config("slow.yaml", &[stalled.url(), dir.display().to_string()]);
    let logs = s.w.once_ok(&cfg);
    let st = s.w.status().unwrap();
    assert_eq!(
        st.adopted.as_ref().unwrap().sequence,
        3,
        "the good source was not held up by the stalled one:\n{logs}"
    );
    let slow = st
        .sources
        .iter()
        .find(|x| x.source == stalled.url())
        .unwrap();
    assert!(!slow.ok, "{slow:?}");
    let err = slow.error.clone().unwrap_or_default();
    assert!(
        err.contains("timed out") || err.contains("timeout"),
        "{err}"
    );
}

/// A forged release on `stable` of an already released bundle, signed by
/// `key`.
fn forged_release(bundle: &Path, sequence: u64, key: &KeyPair) -> Vec<u8> {
    let m = read_bundle_file(bundle, &Limits::default(), |_, _| Ok(())).unwrap();
    let now = cairn_bundle::unix_now();
    Release {
        format: RELEASE_FORMAT,
        channel: "stable".into(),
        sequence,
        bundle: m.id(),
        created: now.saturating_sub(1000),
        expires: FAR,
        rollout: Rollout::default(),
        selector: BTreeMap::new(),
    }
    .sign(&[key])
    .encode()
}

#[test]
fn a_forged_sequence_jump_is_refused() {
    let s = setup();
    let dev = dev_key("dev-release-1");
    let dir = s.attack_repo();
    // Floor 2: more than 2^32 above it is a forged fast-forward.
    write_channel(&dir, &forged_release(&s.b3, 3 + (1 << 32), &dev));
    let logs = s.expect_refused(&dir, "sequence_jump");
    assert!(logs.contains("a release key was stolen"), "{logs}");
    write_channel(&dir, &forged_release(&s.b3, u64::MAX, &dev));
    s.expect_refused(&dir, "sequence_jump");
    // Exactly 2^32 above is still a release.
    write_channel(&dir, &forged_release(&s.b3, 2 + (1 << 32), &dev));
    s.w.once_ok(&s.w.config("jump.yaml", &[dir.display().to_string()]));
    assert_eq!(
        s.w.status().unwrap().adopted.unwrap().sequence,
        2 + (1 << 32)
    );
    assert_eq!(s.w.files(), expected_files(&s.b3));
}

#[test]
fn a_stolen_release_key_at_the_maximum_sequence_is_recovered_by_rotating_the_release_keys() {
    let w = World::new(3, 3, 1);
    let b1 = w.build("HEAD~2", "b1.bundle");
    let b2 = w.build("HEAD~1", "b2.bundle");
    let stolen = dev_key("dev-release-1");
    let stable = w.repo.join(channel_path("stable"));
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);

    // The thief publishes sequence 2^64 − 1; a fresh agent (no floor)
    // adopts it.
    w.release(&b1);
    let max = forged_release(&b1, u64::MAX, &stolen);
    std::fs::write(&stable, &max).unwrap();
    w.once_ok(&cfg);
    let st = w.status().unwrap();
    assert_eq!(st.adopted.as_ref().unwrap().sequence, u64::MAX);
    assert_eq!(w.files(), expected_files(&b1));

    // `cairn release` cannot go above it and says so, instead of wrapping
    // to 0; the channel is left alone.
    let out = std::process::Command::new(cairn_bin())
        .args(["release", "--repo"])
        .arg(&w.repo)
        .arg("--bundle")
        .arg(&b2)
        .args(["--channel", "stable", "--key"])
        .arg(dev_key_path("dev-release-1"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("exhausted") && err.contains("rotate the release keys"),
        "{err}"
    );
    assert_eq!(std::fs::read(&stable).unwrap(), max, "channel unchanged");

    // Any later release under the old keys is a rollback.
    let later = w.path("later-repo");
    copy_dir(&w.repo, &later);
    std::fs::write(
        later.join(channel_path("stable")),
        forged_release(&b2, 2, &dev_key("dev-release-2")),
    )
    .unwrap();
    let logs = w.once_ok(&w.config("later.yaml", &[later.display().to_string()]));
    let st = w.status().unwrap();
    assert_eq!(
        st.last_rejection.as_ref().unwrap().reason,
        "rollback",
        "{logs}"
    );
    assert_eq!(st.adopted.as_ref().unwrap().sequence, u64::MAX);

    // The runbook: new release keys in root v2 (signed by the root keys).
    let keys = w.path("keys");
    let cairn = |args: &[&str]| {
        ok(std::process::Command::new(cairn_bin())
            .args(args)
            .current_dir(&keys))
    };
    std::fs::create_dir_all(&keys).unwrap();
    cairn(&["keys", "generate", "release-3", "--dir", "."]);
    let dev = |n: &str| dev_key_path(n).display().to_string();
    let root_v1 = workspace().join("keys/trust/root.v1").display().to_string();
    cairn(&[
        "root",
        "rotate",
        "--previous",
        &root_v1,
        "--root-key",
        &dev("dev-root-1").replace(".key", ".pub"),
        "--root-threshold",
        "1",
        "--release-key",
        "release-3.pub",
        "--release-threshold",
        "1",
        "--expires",
        "365d",
        "--sign",
        &dev("dev-root-1"),
        "--out",
        "root.v2",
    ]);

    // Root v2 alone (no release yet): the agent follows it, keeps
    // enforcing the old maximum (also across a restart), and a replay of
    // the old key's releases is refused.
    std::fs::create_dir_all(w.repo.join("roots")).unwrap();
    std::fs::copy(keys.join("root.v2"), w.repo.join(root_path(2))).unwrap();
    w.once_ok(&cfg);
    let logs = w.once_ok(&cfg);
    let st = w.status().unwrap();
    assert_eq!(st.root.version, 2, "{logs}");
    assert_eq!(st.adopted.as_ref().unwrap().sequence, u64::MAX);
    assert_eq!(w.files(), expected_files(&b1), "last-good kept");

    // The release engineer releases with the new key: the sequence
    // restarts at 1 and the agent adopts it.
    let out = ok(std::process::Command::new(cairn_bin())
        .args(["release", "--repo"])
        .arg(&w.repo)
        .arg("--bundle")
        .arg(&b2)
        .args(["--channel", "stable", "--key"])
        .arg(keys.join("release-3.key"))
        .args(["--root", &root_v1, "--root"])
        .arg(keys.join("root.v2")));
    assert_eq!(out.trim(), "stable 1");
    let fresh = std::fs::read(&stable).unwrap();
    let mut agent = w.spawn(&cfg, "agent.log");
    wait_for(60, "the new-epoch release adopted", || {
        w.status().is_some_and(|x| {
            x.pid == agent.id()
                && x.listen.is_some()
                && x.adopted.as_ref().is_some_and(|a| a.sequence == 1)
        })
    });
    wait_for(60, "files of release 1 under the new key", || {
        w.files() == expected_files(&b2)
    });
    let addr = w.status().unwrap().listen.unwrap();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    wait_for(60, "metrics show the new epoch", || {
        let m = http_get(&addr, "/metrics").1;
        m.contains("cairn_adopted_sequence{channel=\"stable\"} 1\n")
            && m.contains("cairn_root_version 2\n")
    });

    // The old maximum replayed after the rotation: signatures no longer
    // count, nothing changes.
    std::fs::write(&stable, &max).unwrap();
    wait_for(60, "the replay refused", || {
        w.status().is_some_and(|x| {
            x.last_rejection
                .as_ref()
                .is_some_and(|r| r.reason == "signature_threshold")
        })
    });
    let st = w.status().unwrap();
    assert_eq!(st.adopted.as_ref().unwrap().sequence, 1);
    assert_eq!(w.files(), expected_files(&b2));
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    terminate(&mut agent);

    // Inside the new epoch rollback protection holds again, and the
    // stolen key cannot sign anything at all.
    let new_key = cairn_keys::keyfile::read_private(&keys.join("release-3.key")).unwrap();
    for (replay, reason) in [
        (forged_release(&b1, 1, &new_key), "rollback"),
        (forged_release(&b1, 5, &stolen), "signature_threshold"),
    ] {
        std::fs::write(&stable, replay).unwrap();
        w.once_ok(&cfg);
        let st = w.status().unwrap();
        assert_eq!(st.last_rejection.unwrap().reason, reason);
        assert_eq!(st.adopted.unwrap().sequence, 1);
        assert_eq!(w.files(), expected_files(&b2));
    }
    assert_ne!(fresh, max);
}
