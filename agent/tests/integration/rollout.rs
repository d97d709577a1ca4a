//! Staged rollout without a controller, with real agent processes meshed
//! over TLS on 127.0.0.0/8: waves adopt exactly on the agents
//! `bucket_ppm(agent id, bundle id)` puts in them, a later wave follows
//! when it opens (learning the release only over the mesh), `cairn
//! promote` moves the same bundle id between channels, a local hold keeps
//! an agent back until released, and a broken release trips the circuit
//! breaker so that the remaining agents hold it. Each fleet reserves its
//! own loopback block.

use crate::support::*;
use cairn_bundle::release::Release;
use cairn_bundle::rollout::bucket_ppm;
use cairn_test_support::ApiServer;
use std::path::Path;
use std::process::Command;

/// The release at the head of `channel` in `repo`.
fn head(repo: &Path, channel: &str) -> Release {
    let bytes = std::fs::read(repo.join("channels").join(channel)).expect("channel head");
    Release::decode_envelope(&bytes, 1 << 20).expect("decode").1
}

fn bundle_id(bundle: &Path) -> String {
    cairn_bundle::bundle::read_bundle_file(
        bundle,
        &cairn_bundle::limits::Limits::default(),
        |_, _| Ok(()),
    )
    .expect("read bundle")
    .id()
    .to_string()
}

#[test]
fn waves_follow_the_bucket_promote_keeps_the_bundle_and_a_hold_waits() {
    let w = World::new(2, 2, 1);
    let b = w.build("HEAD", "b.bundle");
    let bundle = bundle_id(&b);
    let ids: Vec<String> = (0..8).map(|i| format!("edge-{i}")).collect();
    let held = 7;
    // Who is in the 50% wave, by the library's own function.
    let first: Vec<usize> = (0..8)
        .filter(|&i| {
            i != held
                && bucket_ppm(&cairn_core::AgentId::parse(&ids[i]).unwrap(), &bundle) < 500_000
        })
        .collect();
    let second: Vec<usize> = (0..8)
        .filter(|&i| i != held && !first.contains(&i))
        .collect();
    assert!(
        !first.is_empty() && !second.is_empty(),
        "fixture: both waves need agents ({first:?} / {second:?})"
    );

    let mut f = fleet(w, ids);
    let repo = f.w.repo.display().to_string();
    let key = dev_key_path("dev-release-1").display().to_string();
    // beta first, then promoted to stable with waves: same bundle id.
    f.w.release_into(&f.w.repo, &b, "beta");
    let out = f.cairn(&[
        "promote",
        "--repo",
        &repo,
        "--from",
        "beta",
        "--to",
        "stable",
        "--key",
        &key,
        "--rollout",
        "50%:0s,100%:15s",
    ]);
    assert_eq!(out.trim(), "stable 1");
    let stable = head(&f.w.repo, "stable");
    assert_eq!(stable.bundle, bundle);
    assert_eq!(head(&f.w.repo, "beta").bundle, bundle);
    assert_eq!(stable.rollout.waves.len(), 2);
    // Promoting a channel that does not exist is refused, nothing written.
    let bad = Command::new(cairn_bin())
        .args([
            "promote", "--repo", &repo, "--from", "nope", "--to", "stable", "--key", &key,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("channel `nope` not found"));
    assert_eq!(head(&f.w.repo, "stable").sequence, 1);

    // Agent 7 is held before it starts (a maintenance window).
    let data7 = f.dir(held, "data");
    for i in 0..8 {
        let cfg = f.configure(
            i,
            &format!(
                "target:\n  manifestsDir: {}\n",
                f.dir(i, "manifests").display()
            ),
        );
        f.spawn(i, &cfg);
    }
    ok(Command::new(agent_bin())
        .args(["hold", "--data-dir"])
        .arg(&data7)
        .args(["--until", "2h"]));

    // Wave 1 adopts; wave 2 learns the release (over the mesh for all but
    // agent 0) and waits for its wave, without adopting.
    f.wait(30, "wave 1 adopted, wave 2 waiting", |f| {
        first.iter().all(|&i| f.sequence(i) == 1)
            && second
                .iter()
                .all(|&i| f.pending_state(i) == Some((1, "waiting".into())) && f.sequence(i) == 0)
    });
    for &i in &second {
        let st = f.status(i).unwrap();
        assert_eq!(st.adopted, None, "{} adopted before its wave", f.ids[i]);
        let r = st.rollout.unwrap();
        assert_eq!(r.wave, Some(2));
        assert!(
            r.message.starts_with("waiting for wave 2 (opens at "),
            "{}",
            r.message
        );
    }
    let text = ok(Command::new(agent_bin())
        .args(["status", "--data-dir"])
        .arg(f.dir(second[0], "data")));
    assert!(text.contains("waiting for wave 2 (opens at "), "{text}");

    // Wave 2 opens: everyone but the held agent follows.
    f.wait(40, "wave 2 adopted", |f| {
        second.iter().all(|&i| f.sequence(i) == 1)
    });
    let st7 = f.status(held).unwrap();
    assert_eq!(st7.adopted, None, "the held agent adopted");
    assert!(st7.hold.is_some());
    f.wait(10, "the held agent reports the release as held", |f| {
        f.pending_state(held) == Some((1, "held".into()))
    });

    // The fleet view: one release, seven adopted, one held.
    let op = f.w.path("operator");
    mesh_issue_operator(&f.ca, "ops", &op);
    let mut last = serde_json::Value::Null;
    f.wait(30, "fleet status counts the release", |f| {
        last = fleet_status_json(f, 0, &op);
        let rel = &last["releases"][0];
        rel["bundle"] == bundle.as_str()
            && rel["adopted"] == 7
            && rel["held"] == 1
            && rel["breaker_tripped"] == false
    });

    // Released: it adopts.
    ok(Command::new(agent_bin())
        .args(["release-hold", "--data-dir"])
        .arg(&data7));
    f.wait(20, "the released agent adopted", |f| f.sequence(held) == 1);
    assert!(f.status(held).unwrap().hold.is_none());
    // Adoption is published before the reconcile that writes the files
    // finishes: wait for the target, then compare every file.
    let expected = expected_files(&b);
    let dir = f.dir(held, "manifests");
    f.wait(20, "the released agent wrote its target", |_| {
        expected.keys().all(|name| dir.join(name).is_file())
    });
    for (name, bytes) in &expected {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
}

/// A test API server on 127.0.0.1:0 with the `cairn-system` namespace.
fn api_server(dir: &Path) -> ApiServer {
    let api = ApiServer::start(
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--deployment-ready-delay-ms",
            "100",
        ],
    );
    api.create_namespace(dir, "cairn-system");
    api
}

#[test]
fn a_broken_release_trips_the_breaker_and_the_rest_hold() {
    let w = World::new(2, 2, 1);
    let good = w.build("HEAD", "good.bundle");
    // The same tree with a broken image: never becomes ready.
    let dep =
        std::fs::read_to_string(w.git.join("clusters/edge/app-0001/deployment.yaml")).unwrap();
    let broken_dep = dep.replace(
        "registry.local/edge/app-0001:1.0.0",
        "registry.local/edge/app-0001:broken",
    );
    assert_ne!(dep, broken_dep);
    cairn_test_support::fixture::commit_files(
        &w.git,
        &[("clusters/edge/app-0001/deployment.yaml", &broken_dep)],
        "break app-0001",
        "2026-02-01T00:00:00Z",
    )
    .expect("commit");
    let broken = w.build("HEAD", "broken.bundle");
    let broken_id = bundle_id(&broken);
    // Three agents in the first half for this bundle, three in the second.
    let mut early = Vec::new();
    let mut late = Vec::new();
    for n in 0..200 {
        let id = format!("k8s-{n}");
        let b = bucket_ppm(&cairn_core::AgentId::parse(&id).unwrap(), &broken_id);
        if b < 500_000 && early.len() < 3 {
            early.push(id);
        } else if b >= 500_000 && late.len() < 3 {
            late.push(id);
        }
    }
    let ids: Vec<String> = early.iter().chain(late.iter()).cloned().collect();
    assert_eq!(ids.len(), 6);
    let mut f = fleet(w, ids);
    let mut apis = Vec::new();
    for i in 0..6 {
        let api = api_server(&f.dir(i, "api"));
        let target = format!(
            "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    healthTimeout: 3s\n",
            api.kubeconfig.display()
        );
        apis.push(api);
        let cfg = f.configure(i, &target);
        f.spawn(i, &cfg);
    }

    // A good release everywhere first: the last-good to roll back to.
    f.w.release(&good);
    f.wait(40, "the good release healthy everywhere", |f| {
        (0..6).all(|i| {
            f.status(i)
                .is_some_and(|s| s.ready && s.last_good.is_some())
        })
    });

    // The broken one: half at once, the rest after 20 s, breaker at 2.
    let repo = f.w.repo.display().to_string();
    let key = dev_key_path("dev-release-1").display().to_string();
    let broken_path = broken.display().to_string();
    f.cairn(&[
        "release",
        "--repo",
        &repo,
        "--bundle",
        &broken_path,
        "--channel",
        "stable",
        "--key",
        &key,
        "--rollout",
        "50%:0s,100%:20s,max-failures=2",
    ]);
    let created = head(&f.w.repo, "stable").created;
    f.wait(
        40,
        "wave 1 rolled back, the others hold on the breaker",
        |f| {
            (0..3).all(|i| {
                f.status(i)
                    .is_some_and(|s| s.failed_release.as_ref().is_some_and(|r| r.sequence == 2))
            }) && (3..6).all(|i| f.pending_state(i) == Some((2, "breaker".into())))
        },
    );
    // Past the second wave's opening, they still hold the broken release.
    f.wait(40, "the second wave's opening time passed", |_| {
        cairn_bundle::unix_now() >= created + 23
    });
    for i in 3..6 {
        let st = f.status(i).unwrap();
        assert_eq!(
            st.adopted.as_ref().map(|a| a.sequence),
            Some(1),
            "{}",
            f.ids[i]
        );
        let r = st.rollout.unwrap();
        assert_eq!((r.sequence, r.state.as_str()), (2, "breaker"));
        assert!(
            r.message.contains("adopters report this release failed"),
            "{}",
            r.message
        );
        assert!(st.ready, "{} keeps enforcing the good release", f.ids[i]);
    }
    drop(apis);
}
