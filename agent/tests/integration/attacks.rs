//! Each attack from the security model, served to a real agent that has
//! already adopted release 2: the attack is refused with its specific
//! reason (logs, status, metrics) and the manifests directory keeps the
//! last-good content.

use crate::support::*;
use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_bundle::release::{Release, Rollout, RELEASE_FORMAT};
use cairn_bundle::repo::{channel_path, object_path_str, root_path};
use cairn_keys::{KeyPair, Root};
use cairn_test_support::{Fault, StaticServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        b3_id: b3_id.to_string(),
        b3_new_object: b3_new_object.to_string(),
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
            channel: channel.parse().unwrap(),
            sequence,
            bundle: self.b3_id.parse().unwrap(),
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
    let p = dir.join(object_path_str(&s.b3_new_object).unwrap());
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
    assert_eq!(current.root().version, 1);
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
        channel: "stable".parse().unwrap(),
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

// ----- the agent's own boundary: peers, local files, redirects ---------
//
// Issue 13 §2: no peer and no local file can stop an agent. Each test
// plays the attacker against a real agent process and checks that it is
// still alive (every wait helper fails at once if it died), still answers
// /healthz and still adopts.

/// A `cairn mesh` certificate directory for an agent id.
fn issue_agent_cert(w: &World, ca: &Path, id: &str) -> PathBuf {
    mesh_issue(ca, id, &w.path(&format!("cert-{id}")))
}

/// A fleet CA made with the CLI.
fn mesh_ca(w: &World) -> PathBuf {
    mesh_ca_init(&w.path("mesh-ca"))
}

/// An agent configuration with a mesh section, in `<dir>/config.yaml`.
fn mesh_agent_config(
    dir: &Path,
    id: &str,
    sources: &[PathBuf],
    listen: &str,
    seeds: &[String],
    cert: &Path,
) -> PathBuf {
    let mut c = cairn_test_support::AgentConfig::new(&dir.join("data"), &dir.join("manifests"));
    c.id = Some(id.to_owned());
    c.sources = sources.iter().map(|s| s.display().to_string()).collect();
    c.mesh = Some(MeshConfig {
        listen: listen.to_owned(),
        cert: cert.to_path_buf(),
        seeds: seeds.to_vec(),
    });
    c.write(&dir.join("config.yaml"))
}

/// Starts `cairn-agent run` with logs in `<dir>/agent.log`, watched.
fn spawn_agent(name: &str, dir: &Path, cfg: &Path) -> AgentProcess {
    cairn_test_support::spawn_agent(&agent_bin(), cfg, "info", name, &dir.join("agent.log"))
}

fn read_status(dir: &Path) -> Option<cairn_agent::status::Status> {
    status_in(&dir.join("data"))
}

fn adopted_sequence(dir: &Path) -> u64 {
    sequence_in(&dir.join("data"))
}

/// Waits until the agent in `dir` (pid `pid`) publishes its HTTP address.
fn http_addr(dir: &Path, pid: u32) -> String {
    let mut addr = String::new();
    wait_for(60, "the agent's HTTP listener", || {
        match read_status(dir)
            .filter(|s| s.pid == pid)
            .and_then(|s| s.listen)
        {
            Some(a) => {
                addr = a;
                true
            }
            None => false,
        }
    });
    addr
}

/// `/healthz` answers 200 promptly.
fn assert_healthy(addr: &str) {
    let started = std::time::Instant::now();
    assert_eq!(http_get(addr, "/healthz").0, 200, "/healthz of {addr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "/healthz took {:?}",
        started.elapsed()
    );
}

/// Sets SO_LINGER to 0 so that closing sends a TCP reset.
fn linger_zero(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
}

/// The mesh's TLS client with `cert`'s credentials.
fn mesh_connector(cert: &Path) -> tokio_rustls::TlsConnector {
    use cairn_bundle::mesh::tls::{self, CredentialPaths, Credentials};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let creds = Credentials::load(&CredentialPaths {
        cert: cert.join("agent.crt"),
        key: cert.join("agent.key"),
        ca: cert.join("ca.crt"),
    })
    .unwrap();
    tokio_rustls::TlsConnector::from(tls::client_config(&creds).unwrap())
}

#[test]
fn an_authenticated_peer_that_says_hello_and_resets_cannot_kill_the_agent() {
    use cairn_bundle::mesh::wire::{self, Hello, Message};
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new(2, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let ca = mesh_ca(&w);
    let victim_cert = issue_agent_cert(&w, &ca, "victim");
    let evil_cert = issue_agent_cert(&w, &ca, "evil");
    let dir = w.path("victim");
    let block = LoopbackBlock::reserve();
    let listen = &block.mesh_addr(0);
    let cfg = mesh_agent_config(
        &dir,
        "victim",
        std::slice::from_ref(&w.repo),
        listen,
        &[],
        &victim_cert,
    );
    let mut agent = spawn_agent("victim", &dir, &cfg);
    let addr = http_addr(&dir, agent.id());
    wait_for(60, "release 1 adopted", || adopted_sequence(&dir) == 1);

    // Say Hello (a valid certificate of the fleet), then reset the TCP
    // connection, again and again, at different points: right after the
    // Hello while the agent is still answering, and after its first frame.
    let connector = mesh_connector(&evil_cert);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hello = wire::encode_frame(
        &Message::Hello(Hello::speaking(2, 2, None)),
        cairn_bundle::mesh::MeshLimits::default().max_frame_bytes,
    )
    .unwrap();
    let mut handshakes = 0;
    for round in 0..60 {
        rt.block_on(async {
            let sock = tokio::net::TcpStream::connect(listen).await.unwrap();
            let fd = sock.as_raw_fd();
            let connect = connector.connect(cairn_bundle::mesh::tls::server_name(), sock);
            let Ok(Ok(mut tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), connect).await
            else {
                return;
            };
            handshakes += 1;
            let _ = tls.write_all(&hello).await;
            let _ = tls.flush().await;
            if round % 2 == 1 {
                let mut b = [0u8; 64];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut b)).await;
            }
            linger_zero(fd);
            drop(tls);
        });
        assert_agents_alive(&format!("reset round {round}"));
    }
    assert!(handshakes >= 50, "only {handshakes} handshakes completed");
    // Give the agent time to write into the dead connections (its
    // answers to the Hellos, keepalives), then check it is all there.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_agents_alive("the agent to survive the resets");
    assert_healthy(&addr);
    // And it still adopts.
    w.release(&b2);
    wait_for(60, "release 2 adopted after the resets", || {
        adopted_sequence(&dir) == 2
    });
    assert_healthy(&addr);
    let st = terminate(&mut agent);
    assert!(st.success(), "{st:?}");
}

/// Runs `cmd` with a deadline (a hang is a failure, not a stuck test);
/// returns (success, stdout, stderr, elapsed).
fn run_with_deadline(
    w: &World,
    cmd: &mut std::process::Command,
    secs: u64,
) -> (bool, String, String, std::time::Duration) {
    let out = w.path("cmd.out");
    let err = w.path("cmd.err");
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = cairn_test_support::exit_within(&mut child, secs, &format!("{cmd:?}"));
    (
        status.success(),
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&err).unwrap(),
        started.elapsed(),
    )
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {p:?}"
    );
}

#[test]
fn a_fifo_or_a_link_to_dev_zero_as_hold_file_is_refused_and_the_agent_stays_responsive() {
    let w = World::new(2, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    let mut agent = w.spawn(&cfg, "agent.log");
    let addr = http_addr(w.tmp.path(), agent.id());
    wait_for(60, "release 1 adopted", || {
        w.status()
            .is_some_and(|s| s.adopted.is_some_and(|a| a.sequence == 1))
    });
    let hold = w.data.join("hold.json");

    // A FIFO: opening it for reading would block until a writer comes.
    mkfifo(&hold);
    wait_for(30, "the FIFO hold file reported", || {
        w.log("agent.log")
            .contains("hold.json: is a FIFO, not a regular file")
    });
    assert_healthy(&addr);
    // The safe side: adoption counts as held, and status says so.
    w.release(&b2);
    wait_for(30, "release 2 held", || {
        w.status().is_some_and(|s| {
            s.hold.is_some()
                && s.rollout
                    .is_some_and(|r| r.sequence == 2 && r.state == "held")
        })
    });
    assert_eq!(w.status().unwrap().adopted.unwrap().sequence, 1);
    let (ok_, out, err, took) = run_with_deadline(
        &w,
        std::process::Command::new(agent_bin())
            .args(["status", "--data-dir"])
            .arg(&w.data),
        20,
    );
    assert!(ok_ && out.contains("hold"), "{out}{err} after {took:?}");

    // A link to /dev/zero: following it would read for ever.
    std::fs::remove_file(&hold).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &hold).unwrap();
    wait_for(30, "the linked hold file reported", || {
        w.log("agent.log")
            .contains("hold.json: is a symbolic link; refusing to follow it")
    });
    assert_healthy(&addr);
    assert_eq!(w.status().unwrap().adopted.unwrap().sequence, 1);

    // `release-hold` removes whatever is there; the agent adopts.
    let (ok_, out, err, _) = run_with_deadline(
        &w,
        std::process::Command::new(agent_bin())
            .args(["release-hold", "--data-dir"])
            .arg(&w.data),
        20,
    );
    assert!(ok_ && out.contains("hold released"), "{out}{err}");
    assert!(std::fs::symlink_metadata(&hold).is_err());
    wait_for(30, "release 2 adopted once the hold is gone", || {
        w.status()
            .is_some_and(|s| s.adopted.is_some_and(|a| a.sequence == 2))
    });

    // With a FIFO in place again, SIGTERM still stops it within seconds.
    mkfifo(&hold);
    wait_for(30, "the FIFO read again", || {
        w.log("agent.log").matches("is a FIFO").count() >= 2
    });
    let started = std::time::Instant::now();
    let st = terminate(&mut agent);
    assert!(st.success(), "{st:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "SIGTERM took {:?}",
        started.elapsed()
    );

    // `cairn-agent status` refuses a FIFO or a link as status.json, fast.
    let status_json = w.data.join("status.json");
    std::fs::remove_file(&status_json).unwrap();
    mkfifo(&status_json);
    let mut status_cmd = std::process::Command::new(agent_bin());
    status_cmd.args(["status", "--data-dir"]).arg(&w.data);
    let (ok_, _, err, took) = run_with_deadline(&w, &mut status_cmd, 20);
    assert!(!ok_, "{err}");
    assert!(
        err.starts_with("cairn-agent: ") && err.contains("status.json: is a FIFO"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    std::fs::remove_file(&status_json).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &status_json).unwrap();
    let (ok_, _, err, _) = run_with_deadline(&w, &mut status_cmd, 20);
    assert!(
        !ok_ && err.contains("status.json: is a symbolic link"),
        "{err}"
    );

    // And a FIFO as the configuration file.
    let fifo_cfg = w.path("fifo.yaml");
    mkfifo(&fifo_cfg);
    let (ok_, _, err, _) = run_with_deadline(
        &w,
        std::process::Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&fifo_cfg),
        20,
    );
    assert!(!ok_ && err.contains("fifo.yaml: is a FIFO"), "{err}");
}

#[test]
fn a_flood_of_connections_that_never_handshake_does_not_starve_peers() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let ca = mesh_ca(&w);
    let (c0, c1) = (
        issue_agent_cert(&w, &ca, "a0"),
        issue_agent_cert(&w, &ca, "a1"),
    );
    let (d0, d1) = (w.path("a0"), w.path("a1"));
    let block = LoopbackBlock::reserve();
    let (l0, l1) = (block.mesh_addr(0), block.mesh_addr(1));
    let cfg0 = mesh_agent_config(&d0, "a0", std::slice::from_ref(&w.repo), &l0, &[], &c0);
    let cfg1 = mesh_agent_config(&d1, "a1", &[], &l1, std::slice::from_ref(&l0), &c1);
    let mut a0 = spawn_agent("a0", &d0, &cfg0);
    let addr0 = http_addr(&d0, a0.id());
    wait_for(60, "a0 adopted release 1", || adopted_sequence(&d0) == 1);

    // The attacker, from its own address: connections that never start a
    // handshake, opened continuously and held, plus plain-text requests
    // that fail the handshake at once.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (stop, opened) = (stop.clone(), opened.clone());
        let (target, from): (std::net::SocketAddr, std::net::SocketAddr) =
            (l0.parse().unwrap(), (block.ip(98), 0).into());
        std::thread::spawn(move || {
            use tokio::io::AsyncWriteExt;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut held = std::collections::VecDeque::new();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind(from).unwrap();
                    if let Ok(mut c) = s.connect(target).await {
                        opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        n += 1;
                        if n % 10 == 0 {
                            let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                        }
                        held.push_back(c);
                        if held.len() > 300 {
                            held.pop_front();
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            });
        })
    };
    wait_for(60, "the flood under way", || {
        opened.load(std::sync::atomic::Ordering::SeqCst) >= 300
    });
    let flood_started = std::time::Instant::now();

    // A legitimate peer joins during the flood and gets the release.
    let mut a1 = spawn_agent("a1", &d1, &cfg1);
    assert_healthy(&addr0);
    wait_for(
        90,
        "a1 adopted release 1 over the mesh during the flood",
        || adopted_sequence(&d1) == 1,
    );
    assert_healthy(&addr0);
    // Keep flooding past a log interval, to see the suppression at work.
    wait_for(60, "15 s of flood", || {
        flood_started.elapsed() > std::time::Duration::from_secs(15)
    });
    assert_healthy(&addr0);
    let metrics = http_get(&addr0, "/metrics").1;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    flood.join().unwrap();
    let elapsed = flood_started.elapsed().as_secs() + 20;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let refused = value("cairn_mesh_connections_refused_total");
    let failed = value("cairn_mesh_handshake_failures_total");
    assert!(refused >= 100.0, "refused {refused}:\n{metrics}");
    assert!(failed >= 10.0, "handshake failures {failed}:\n{metrics}");
    // Log lines about them: at most one per kind per 10 s.
    let log = std::fs::read_to_string(d0.join("agent.log")).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("mesh handshake") || l.contains("mesh connection refused"))
        .count() as u64;
    // Five kinds: accept errors, limits, refused, timed out, no identity.
    let bound = 5 * (elapsed / 10 + 1);
    assert!(
        lines <= bound && (lines as f64) < (refused + failed) / 10.0,
        "{lines} log lines (bound {bound}) for {refused} refused and {failed} failed"
    );
    let suppressed_some = log.lines().any(|l| {
        l.split("\"suppressed\":")
            .nth(1)
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit() && c != '0'))
    });
    assert!(
        suppressed_some,
        "no line reports suppressed failures:\n{}",
        tail(&log, 20)
    );
    terminate(&mut a1);
    terminate(&mut a0);
}

#[test]
fn an_http_source_redirecting_to_another_host_is_refused_unless_allowed() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let want = expected_files(&b1);
    // The repository on "another host", and a mirror on 127.0.0.1 that
    // redirects every request there.
    let other = StaticServer::start_on("127.0.0.2", &w.repo).unwrap();
    let empty = w.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let redirector = StaticServer::start_on("127.0.0.1", &empty).unwrap();
    redirector.set_fault(Fault::Redirect(other.url()));

    let cfg = w.config("redirect.yaml", &[redirector.url()]);
    let out = w.once(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("redirect to another host `127.0.0.2` refused")
            && err.contains("allowRedirectsTo"),
        "{err}"
    );
    assert_eq!(other.requests(), 0, "the other host was never asked");
    assert!(w.files().is_empty(), "nothing applied");
    assert!(w.status().is_none_or(|s| s.adopted.is_none()));

    // Redirects on the same host are followed without configuration.
    let same = StaticServer::start_on("127.0.0.1", &w.repo).unwrap();
    let same_redirector = StaticServer::start_on("127.0.0.1", &empty).unwrap();
    same_redirector.set_fault(Fault::Redirect(same.url()));
    let cfg = w.config("same-host.yaml", &[same_redirector.url()]);
    w.once_ok(&cfg);
    assert_eq!(w.files(), want);
    assert!(same.requests() > 0);

    // Allowed by name: followed.
    std::fs::remove_dir_all(&w.manifests).unwrap();
    std::fs::remove_dir_all(&w.data).unwrap();
    let cfg = w.config(
        "allowed.yaml",
        &[format!(
            "{{url: \"{}\", allowRedirectsTo: [127.0.0.2]}}",
            redirector.url()
        )],
    );
    w.once_ok(&cfg);
    assert_eq!(w.files(), want);
    assert!(other.requests() > 0);
}

#[test]
fn output_to_a_closed_pipe_ends_the_command_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SIGPIPE is ignored (so that sockets fail with errors instead); a
    // closed stdout (`cairn-agent status | head`) must still end quietly.
    let d = tempfile::tempdir().unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are open and owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let out = std::process::Command::new(agent_bin())
        .args(["hold", "--data-dir"])
        .arg(d.path())
        .stdout(std::process::Stdio::from(write_end))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
    assert!(
        d.path().join("hold.json").is_file(),
        "the hold was still placed"
    );
}

#[test]
fn a_peer_that_stalls_past_the_read_deadline_and_comes_back_kills_nobody() {
    // The agents' side of the reset: a peer that stops (paused, swapped
    // out, behind a stalled link) long enough for the others to give up
    // on it, then resumes and writes into connections they have closed,
    // while they write into its.
    let w = World::new(2, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let ca = mesh_ca(&w);
    let block = LoopbackBlock::reserve();
    let addrs: Vec<String> = (0..3).map(|i| block.mesh_addr(i)).collect();
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for (i, listen) in addrs.iter().enumerate() {
        let id = format!("a{i}");
        let cert = issue_agent_cert(&w, &ca, &id);
        let dir = w.path(&id);
        let sources = if i == 0 { vec![w.repo.clone()] } else { vec![] };
        let seeds: Vec<String> = addrs
            .iter()
            .filter(|a| *a != listen)
            .map(|a| a.to_string())
            .collect();
        let cfg = mesh_agent_config(&dir, &id, &sources, listen, &seeds, &cert);
        agents.push(spawn_agent(&id, &dir, &cfg));
        dirs.push(dir);
    }
    let http: Vec<String> = (0..3)
        .map(|i| http_addr(&dirs[i], agents[i].id()))
        .collect();
    wait_for(90, "every agent at release 1", || {
        dirs.iter().all(|d| adopted_sequence(d) == 1)
    });
    // Stop a1 for longer than the mesh read deadline (3 keepalives, 30 s).
    let paused = agents[1].id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    let stopped_at = std::time::Instant::now();
    wait_for(60, "a1 stopped for 35 s", || {
        stopped_at.elapsed() > std::time::Duration::from_secs(35)
    });
    // SAFETY: as above.
    unsafe { libc::kill(paused, libc::SIGCONT) };
    let resumed_at = std::time::Instant::now();
    wait_for(60, "10 s after a1 resumed", || {
        resumed_at.elapsed() > std::time::Duration::from_secs(10)
    });
    for a in &http {
        assert_healthy(a);
    }
    w.release(&b2);
    wait_for(90, "a0 and a2 at release 2", || {
        adopted_sequence(&dirs[0]) == 2 && adopted_sequence(&dirs[2]) == 2
    });
    for a in &mut agents {
        let st = terminate(a);
        assert!(st.success(), "{st:?}");
    }
}
