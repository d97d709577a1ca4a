//! End-to-end: fixture Git repo → `cairn bundle build` + `cairn release` →
//! served over HTTP (or as a directory) → `cairn-agent run` with a
//! manifests-dir target. Real processes throughout.

use crate::support::*;
use cairn_test_support::StaticServer;
use std::process::Command;

#[test]
fn once_over_http_writes_every_object() {
    let w = World::new(3, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let server = StaticServer::start(&w.repo).unwrap();
    let cfg = w.config("agent.yaml", &[server.url()]);
    w.once_ok(&cfg);
    let want = expected_files(&b1);
    assert!(want.len() >= 11, "{} objects", want.len());
    assert_eq!(w.files(), want);
    let s = w.status().unwrap();
    assert_eq!(s.adopted.as_ref().unwrap().sequence, 1);
    assert_eq!(s.last_good.as_ref().unwrap().sequence, 1);
    assert!(!s.offline);
    assert!(s.ready, "{}", s.ready_reason);
    // A second run fetches nothing new and changes nothing.
    let before = server.requests();
    w.once_ok(&cfg);
    assert!(
        server.requests() - before <= 3,
        "only roots/2 and the channel"
    );
    // `status` reads the published file.
    let out = ok(Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(&cfg));
    assert!(out.contains("sequence 1"), "{out}");
    let json = ok(Command::new(agent_bin())
        .args(["status", "--json", "--config"])
        .arg(&cfg));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["adopted"]["sequence"], 1);
    assert_eq!(v["channel"], "stable");
}

/// The target reads object bodies from the store `READ_BATCH` at a time
/// (docs/PERFORMANCE.md, "Memory"): a release of several batches is
/// applied whole, and a release that drops objects across several
/// batches prunes every one of them.
#[test]
fn releases_larger_than_a_read_batch_apply_and_prune_whole() {
    let w = World::new(70, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    w.once_ok(&cfg);
    let batch = cairn_agent::targets::READ_BATCH;
    let want1 = expected_files(&b1);
    assert!(want1.len() > 3 * batch, "{} objects", want1.len());
    assert_eq!(w.files(), want1);
    for (i, apps) in ["app-004*", "app-005*", "app-006*"].iter().enumerate() {
        cairn_test_support::fixture::remove_and_commit(
            &w.git,
            &format!("clusters/edge/{apps}"),
            "drop ten apps",
            &format!("2026-03-0{}T00:00:00Z", i + 1),
        )
        .unwrap();
    }
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    w.once_ok(&cfg);
    let want2 = expected_files(&b2);
    let dropped = want1.len() - want2.len();
    assert!(dropped > batch, "{dropped} objects dropped");
    assert_eq!(w.files(), want2);
    let s = w.status().unwrap();
    assert_eq!(s.adopted.as_ref().unwrap().sequence, 2);
    let report = s.reconcile.and_then(|r| r.report).unwrap();
    assert_eq!(report.deleted, dropped, "{report:?}");
    assert_eq!(report.unchanged, want2.len(), "{report:?}");
}

#[test]
fn directory_source_works_and_missing_dir_is_offline() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let missing = w.path("not-mounted");
    let cfg = w.config(
        "agent.yaml",
        &[missing.display().to_string(), w.repo.display().to_string()],
    );
    w.once_ok(&cfg);
    assert_eq!(w.files(), expected_files(&b1));
    let s = w.status().unwrap();
    let bad = s
        .sources
        .iter()
        .find(|x| x.source.contains("not-mounted"))
        .unwrap();
    assert!(!bad.ok);
    assert!(
        bad.error.as_ref().unwrap().contains("not mounted"),
        "{bad:?}"
    );
    assert!(!s.offline, "one source answered");
}

#[test]
fn running_agent_updates_prunes_and_corrects_drift() {
    let w = World::new(3, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    w.release(&b1);
    let server = StaticServer::start(&w.repo).unwrap();
    let cfg = w.config("agent.yaml", &[server.url()]);
    let mut agent = w.spawn(&cfg, "agent.log");
    let want1 = expected_files(&b1);
    wait_for(60, "release 1 applied", || w.files() == want1);
    wait_for(30, "ready", || {
        w.status().is_some_and(|s| s.ready && s.listen.is_some())
    });
    let addr = w.status().unwrap().listen.unwrap();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz").0, 200);

    // Hand edit, hand delete: both restored; a foreign file is left alone.
    let (name, bytes) = want1
        .iter()
        .next()
        .map(|(n, b)| (n.clone(), b.clone()))
        .unwrap();
    let (name2, bytes2) = want1
        .iter()
        .nth(1)
        .map(|(n, b)| (n.clone(), b.clone()))
        .unwrap();
    std::fs::write(w.manifests.join(&name), b"kind: Edited\n").unwrap();
    std::fs::remove_file(w.manifests.join(&name2)).unwrap();
    std::fs::write(w.manifests.join("zz-foreign.yaml"), b"mine: true\n").unwrap();
    wait_for(60, "drift corrected", || {
        std::fs::read(w.manifests.join(&name)).ok().as_ref() == Some(&bytes)
            && std::fs::read(w.manifests.join(&name2)).ok().as_ref() == Some(&bytes2)
    });

    // Release 2: one ConfigMap changes and an app is removed (pruned).
    cairn_test_support::fixture::remove_and_commit(
        &w.git,
        "clusters/edge/app-0002",
        "drop app-0002",
        "2026-03-01T00:00:00Z",
    )
    .unwrap();
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    let mut want2 = expected_files(&b2);
    assert!(want2.len() < want1.len());
    wait_for(60, "release 2 applied and pruned", || {
        let mut f = w.files();
        f.remove("zz-foreign.yaml");
        f == want2
    });
    want2.insert("zz-foreign.yaml".into(), b"mine: true\n".to_vec());
    assert_eq!(w.files(), want2, "foreign file untouched");

    wait_for(30, "metrics show sequence 2", || {
        http_get(&addr, "/metrics")
            .1
            .contains("cairn_adopted_sequence{channel=\"stable\"} 2")
    });
    let metrics = http_get(&addr, "/metrics").1;
    let drift: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cairn_drift_corrections_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(drift >= 2, "{metrics}");
    assert!(metrics.contains("cairn_offline 0"), "{metrics}");
    assert!(
        metrics.contains("cairn_reconcile_duration_seconds_count"),
        "{metrics}"
    );

    let st = terminate(&mut agent);
    assert!(st.success(), "clean exit on SIGTERM: {st:?}");
    let s = w.status().unwrap();
    assert_eq!(s.adopted.unwrap().sequence, 2);
    assert!(w.log("agent.log").contains("release adopted"));
}

#[test]
fn offline_restart_enforces_last_good() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let mut server = StaticServer::start(&w.repo).unwrap();
    let cfg = w.config("agent.yaml", &[server.url()]);
    w.once_ok(&cfg);
    let want = expected_files(&b1);
    assert_eq!(w.files(), want);
    server.stop();
    drop(server);
    // Source gone, a managed file deleted and another edited by hand.
    let mut names = want.keys();
    let n1 = names.next().unwrap().clone();
    let n2 = names.next().unwrap().clone();
    std::fs::remove_file(w.manifests.join(&n1)).unwrap();
    std::fs::write(w.manifests.join(&n2), b"edited").unwrap();
    let logs = w.once_ok(&cfg);
    assert_eq!(w.files(), want, "restored from the store with no source");
    let s = w.status().unwrap();
    assert!(s.offline, "status reports offline");
    assert!(s.ready);
    assert!(logs.contains("source fetch failed"), "{logs}");
    let text = ok(Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(&cfg));
    assert!(text.contains("offline         yes"), "{text}");
}

#[test]
fn unreachable_source_backs_off_without_crashing() {
    let w = World::new(1, 1, 1);
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = w.config("agent.yaml", &[format!("http://127.0.0.1:{port}/fleet")]);
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cairn-agent: no release adopted on channel `stable`"),
        "{err}"
    );

    let mut agent = w.spawn(&cfg, "agent.log");
    wait_for(60, "several failed attempts", || {
        w.log("agent.log").matches("source fetch failed").count() >= 3
    });
    assert!(agent.try_wait().unwrap().is_none(), "still running");
    let s = w.status().unwrap();
    assert!(s.offline);
    assert!(!s.ready);
    let addr = s.listen.unwrap();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("no release adopted"), "{body}");
    let m = http_get(&addr, "/metrics").1;
    assert!(m.contains("cairn_source_fetch_errors_total{"), "{m}");
    assert!(m.contains("cairn_offline 1"), "{m}");
    terminate(&mut agent);
}

#[test]
fn sigkill_during_sync_restarts_cleanly() {
    let w = World::new(40, 1, 16);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let server = StaticServer::start(&w.repo).unwrap();
    server.set_fault(cairn_test_support::Fault::Delay(
        std::time::Duration::from_millis(30),
    ));
    let cfg = w.config("agent.yaml", &[server.url()]);
    for round in 0..2 {
        let mut agent = w.spawn(&cfg, &format!("agent-{round}.log"));
        let start = server.requests();
        wait_for(60, "sync under way", || {
            server.requests() >= start + 10 + round * 5
        });
        agent.kill().unwrap(); // SIGKILL
        agent.wait().unwrap();
    }
    server.set_fault(cairn_test_support::Fault::None);
    w.once_ok(&cfg);
    assert_eq!(w.files(), expected_files(&b1));
    // And once more from the store alone.
    w.once_ok(&cfg);
}

#[test]
fn broken_config_names_the_field() {
    let w = World::new(1, 1, 1);
    let cfg = w.path("bad.yaml");
    std::fs::write(
        &cfg,
        "channel: stable\npollInterval: 30y\ntarget: {manifestsDir: /tmp/x}\n",
    )
    .unwrap();
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "cairn-agent: config {}: pollInterval: `30y`: unknown unit",
            cfg.display()
        )),
        "{err}"
    );
    std::fs::write(
        &cfg,
        "channel: stable\nsourcez: []\ntarget: {manifestsDir: /tmp/x}\n",
    )
    .unwrap();
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `sourcez`"), "{err}");
    // Usage error.
    let out = Command::new(agent_bin())
        .args(["run", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Environment override with a bad value names the field too.
    let good = w.config("good.yaml", &[]);
    let out = Command::new(agent_bin())
        .args(["run", "--once", "--config"])
        .arg(&good)
        .env("CAIRN_POLL_INTERVAL", "soon")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pollInterval: `soon`"), "{err}");
}

#[test]
fn release_for_other_labels_is_deferred_not_rejected() {
    let w = World::new(1, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    w.release(&b1);
    let b2 = w.build("HEAD", "b2.bundle");
    ok(Command::new(cairn_bin())
        .arg("release")
        .arg("--repo")
        .arg(&w.repo)
        .arg("--bundle")
        .arg(&b2)
        .args(["--channel", "stable", "--selector", "region=us", "--key"])
        .arg(dev_key_path("dev-release-1")));
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    // The agent (region=eu) never saw release 1, and release 2 is not for it.
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let s = w.status().unwrap();
    assert!(s.adopted.is_none());
    assert!(s.last_rejection.is_none(), "deferral is not a rejection");
    let src = &s.sources[0];
    assert_eq!(src.result, "deferred");
    assert!(src.note.as_ref().unwrap().contains("region=us"), "{src:?}");
}

/// The config `w.config` writes, without `insecureAllowDevelopmentRoot`:
/// what an operator deploying a default (development-root) build has.
fn config_without_the_insecure_key(
    w: &World,
    name: &str,
    sources: &[String],
) -> std::path::PathBuf {
    let cfg = w.config(name, sources);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let stripped = text.replace("insecureAllowDevelopmentRoot: true\n", "");
    assert_ne!(stripped, text, "the helper sets the key");
    std::fs::write(&cfg, stripped).unwrap();
    cfg
}

/// Waits up to `secs` for `child` to exit; kills it and fails otherwise.
fn exit_within(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    cairn_test_support::exit_within(child, secs, "the agent")
}

/// An agent built as the Containerfile would build it without a trust root
/// (the default build: the development root) refuses to start unless the
/// config or the environment explicitly allows the development root, and
/// opens nothing before refusing.
#[test]
fn a_development_root_agent_refuses_to_start_without_the_insecure_key() {
    assert!(
        cairn_keys::embedded::is_development(),
        "these tests run against the default build (development root)"
    );
    let w = World::new(1, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = config_without_the_insecure_key(&w, "agent.yaml", &[w.repo.display().to_string()]);
    for args in [&["run"][..], &["run", "--once"][..]] {
        let mut child = Command::new(agent_bin())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(w.path("refused.log")).unwrap())
            .spawn()
            .unwrap();
        let status = exit_within(&mut child, 60);
        let err = w.log("refused.log");
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        for want in [
            "cairn-agent: refusing to run: this cairn-agent embeds the DEVELOPMENT trust root",
            "private keys are public",
            "CAIRN_TRUST_ROOT=/path/to/root.v1 cargo build --release",
            "--build-arg CAIRN_TRUST_ROOT=",
            &format!(
                "`insecureAllowDevelopmentRoot: true` in config {}",
                cfg.display()
            ),
            "CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT=true",
        ] {
            assert!(err.contains(want), "{args:?}: missing {want:?} in\n{err}");
        }
        assert!(!w.data.exists(), "no data directory was created");
        assert!(!w.manifests.exists(), "nothing was applied");
    }
    // A value that is not a boolean is a config error, not a yes.
    let out = Command::new(agent_bin())
        .args(["run", "--once", "--config"])
        .arg(&cfg)
        .env("CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("insecureAllowDevelopmentRoot: CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT=`1`: expected `true` or `false`"),
        "{err}"
    );
    assert!(!w.data.exists());
    // The environment variable allows it too.
    let out = Command::new(agent_bin())
        .args(["run", "--once", "--config"])
        .arg(&cfg)
        .env("CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.files(), expected_files(&b1));
}

/// With the key set, the agent runs, warns loudly, and names its root in
/// `status` (text and JSON), `/readyz` and `/metrics`.
#[test]
fn an_allowed_development_root_shows_in_status_readyz_metrics_and_the_log() {
    let w = World::new(1, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    let mut agent = w.spawn(&cfg, "agent.log");
    wait_for(60, "ready", || {
        w.status().is_some_and(|s| s.ready && s.listen.is_some())
    });
    let addr = w.status().unwrap().listen.unwrap();
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\ntrust root: development v1 (INSECURE: its private keys are public"),
        "{body}"
    );
    let (code, metrics) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("cairn_trust_root_info{origin=\"development\",version=\"1\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("cairn_development_root 1\n"), "{metrics}");
    let json = ok(Command::new(agent_bin())
        .args(["status", "--json", "--config"])
        .arg(&cfg));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["root"]["origin"], "development", "{json}");
    assert_eq!(v["root"]["embeddedVersion"], 1, "{json}");
    let text = ok(Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(&cfg));
    assert!(
        text.contains("trust root      development v1 (INSECURE"),
        "{text}"
    );
    let log = w.log("agent.log");
    let warn = log
        .lines()
        .find(|l| l.contains("INSECURE: running with the DEVELOPMENT trust root"))
        .unwrap_or_else(|| panic!("no warning in\n{log}"));
    assert!(warn.contains("\"level\":\"WARN\""), "{warn}");
    assert!(terminate(&mut agent).success());
}

/// Builds `git_ref` into `name` in bundle format `format`.
fn build_format(w: &World, git_ref: &str, name: &str, format: &str) -> std::path::PathBuf {
    let out = w.path(name);
    ok(Command::new(cairn_bin())
        .args(["bundle", "build", "--format", format, "--git"])
        .arg(&w.git)
        .args(["--ref", git_ref, "--out"])
        .arg(&out)
        .env("CAIRN_KUBECTL", "/nonexistent-kubectl"));
    out
}

fn documents(
    bundle: &std::path::Path,
) -> (cairn_core::bundle::Manifest, cairn_core::bundle::Encoded) {
    let m = cairn_bundle::bundle::read_bundle_file(
        bundle,
        &cairn_core::limits::Limits::default(),
        |_, _| Ok(()),
    )
    .unwrap();
    let e = m.encode_all();
    (m, e)
}

#[test]
fn format_1_last_good_adopts_format_2_and_then_moves_one_chunk() {
    let w = World::new(300, 3, 1);
    let b1 = build_format(&w, "main~2", "b1.bundle", "1");
    let b2 = build_format(&w, "main~1", "b2.bundle", "2");
    let b3 = build_format(&w, "main", "b3.bundle", "2");
    let server = StaticServer::start(&w.repo).unwrap();
    let cfg = w.config("agent.yaml", &[server.url()]);
    let channel_bytes = || std::fs::read(w.repo.join("channels/stable")).unwrap().len() as u64;

    // Release 1 in format 1: the agent's last-good is format 1.
    w.release(&b1);
    w.once_ok(&cfg);
    assert_eq!(w.files(), expected_files(&b1));
    let (m1, _) = documents(&b1);

    // Release 2 in format 2 (one object changed): the top document, every
    // chunk (nothing of format 2 is stored yet) and the changed object.
    w.release(&b2);
    server.reset_counters();
    w.once_ok(&cfg);
    let s = w.status().unwrap();
    assert_eq!(s.last_good.as_ref().unwrap().sequence, 2);
    assert_eq!(w.files(), expected_files(&b2));
    let (m2, e2) = documents(&b2);
    assert_eq!(m1.entries.len(), m2.entries.len());
    let old: std::collections::BTreeSet<_> = m1.entries.iter().map(|e| e.object.clone()).collect();
    let changed2: Vec<_> = m2
        .entries
        .iter()
        .filter(|e| !old.contains(&e.object))
        .collect();
    assert_eq!(changed2.len(), 1);
    assert!(e2.chunks.len() >= 5, "{} chunks", e2.chunks.len());
    // roots/2 (not found), the channel, the top, the chunks, the object.
    assert_eq!(server.requests(), 3 + e2.chunks.len() as u64 + 1);

    // Release 3, format 2 again, one object changed: only the top, the one
    // chunk holding it and the object move.
    w.release(&b3);
    server.reset_counters();
    w.once_ok(&cfg);
    assert_eq!(w.status().unwrap().last_good.unwrap().sequence, 3);
    assert_eq!(w.files(), expected_files(&b3));
    let (m3, e3) = documents(&b3);
    let old: std::collections::BTreeSet<_> = m2.entries.iter().map(|e| e.object.clone()).collect();
    let changed: Vec<_> = m3
        .entries
        .iter()
        .filter(|e| !old.contains(&e.object))
        .collect();
    let old_chunks: std::collections::BTreeSet<_> =
        e2.chunks.iter().map(|(a, _)| a.clone()).collect();
    let new_chunks: Vec<_> = e3
        .chunks
        .iter()
        .filter(|(a, _)| !old_chunks.contains(a))
        .collect();
    assert_eq!((changed.len(), new_chunks.len()), (1, 1));
    assert_eq!(
        server.requests(),
        3 + 1 + 1,
        "roots/2, channel, top, chunk, object"
    );
    // The body of roots/2's 404 is `not found\n`.
    let not_found = b"not found\n".len() as u64;
    let want = not_found
        + channel_bytes()
        + e3.top.len() as u64
        + new_chunks[0].1.len() as u64
        + changed[0].size;
    assert_eq!(server.body_bytes_sent(), want);
}
