//! `cairn demo`: the real binaries, the whole loop, to completion.
//!
//! Needs `cairn` and `cairn-agent` built (`cargo build --workspace --bins`)
//! and `git` on PATH. Every agent listens on 127.0.0.1 only.

use cairn_test_support::{cargo_bin, run};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `cairn demo ARGS --json` in `dir`: (exit success, summary, stderr).
fn demo(cairn: &Path, dir: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = run(Command::new(cairn)
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .args(args)
        .env_remove("CAIRN_TRUST_ROOT"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("no JSON summary on stdout ({e}):\nstdout: {stdout}\nstderr: {stderr}")
    });
    (out.status.success(), summary, stderr)
}

/// File name -> content of a manifests directory.
fn target_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn alive(pid: u64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn path(v: &Value) -> PathBuf {
    PathBuf::from(v.as_str().expect("a path"))
}

#[test]
fn three_agents_converge_on_two_releases_and_only_the_delta_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let (ok, s, stderr) = demo(&cargo_bin("cairn"), &dir, &["--agents", "3"]);
    assert!(ok, "demo failed:\n{stderr}\n{s:#}");
    assert_eq!(s["format"], 1);
    assert_eq!(s["converged"], true, "{s:#}");
    assert_eq!(s["error"], Value::Null);
    assert_eq!(s["not_converged"].as_array().unwrap().len(), 0);
    assert_eq!(s["channel"], "demo");

    let releases = s["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 2);
    assert_eq!(releases[0]["sequence"], 1);
    assert_eq!(releases[1]["sequence"], 2);
    assert_ne!(releases[0]["bundle"], releases[1]["bundle"]);
    assert_ne!(releases[0]["release"], releases[1]["release"]);
    let r2 = &releases[1];
    let objects = r2["objects"].as_u64().unwrap() as usize;
    assert!(objects >= 10, "{r2}");

    let agents = s["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 3);
    let mut contents = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        assert_eq!(a["id"], format!("demo-{}", i + 1));
        assert_eq!(a["converged"], true, "{a}");
        assert_eq!(a["adopted_sequence"], 2, "{a}");
        assert_eq!(a["bundle"], r2["bundle"], "{a}");
        assert_eq!(a["files_in_target"], objects as u64, "{a}");
        assert_eq!(a["source"], i == 0, "only agent 1 reads the repository");
        // Stopped at the end (no --keep-running), cleanly.
        assert_eq!(a["running"], false, "{a}");
        let pid = a["pid"].as_u64().unwrap();
        assert!(!alive(pid), "agent {i} (pid {pid}) still running");
        assert_eq!(a["exited"], "exit status: 0", "{a}");
        let files = target_files(&path(&a["target_dir"]));
        assert_eq!(files.len(), objects);
        contents.push(files);
        if i > 0 {
            // Everything it has came over the mesh.
            assert!(
                a["bytes_fetched_from_peers"].as_u64().unwrap()
                    >= r2["bytes"].as_u64().unwrap() / 2,
                "{a}"
            );
        }
    }
    // Every target holds the same files, byte for byte.
    assert!(contents.iter().all(|c| c == &contents[0]));
    let web = contents[0]
        .iter()
        .find(|(name, _)| name.contains("web-config"))
        .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
        .expect("the web-config ConfigMap file");
    assert!(web.contains("Hello from release 2"), "{web}");

    // The delta: one ConfigMap changed; far fewer bytes moved than the bundle.
    let d = &s["delta"];
    assert_eq!(d["changed_objects"], 1, "{d}");
    assert_eq!(d["added_objects"], 0);
    assert_eq!(d["removed_objects"], 0);
    let moved = d["bytes"].as_u64().unwrap();
    let full = d["full_bytes"].as_u64().unwrap();
    assert_eq!(full, r2["bytes"].as_u64().unwrap());
    assert!(moved > 0, "{d}");
    assert!(moved * 4 < full, "delta {moved} bytes vs full {full} bytes");
    for a in &agents[1..] {
        // The changed object and the new manifest (a few more if a peer
        // offered one twice), never the whole bundle.
        let n = a["delta_objects_fetched_from_peers"].as_u64().unwrap();
        assert!((2..objects as u64 / 2).contains(&n), "{a}");
    }

    // What it printed to look around with works after the demo.
    assert!(stderr.contains("fleet status --peer"), "{stderr}");
    let cfg = path(&agents[2]["config"]);
    let status = run(Command::new(cargo_bin("cairn-agent"))
        .args(["status", "--json", "--config"])
        .arg(&cfg));
    assert!(status.status.success());
    let st: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["agentId"], "demo-3");
    assert_eq!(st["adopted"]["sequence"], 2);
    let verify = run(Command::new(cargo_bin("cairn"))
        .args(["verify", "--channel", "demo", "--repo"])
        .arg(path(&s["repository"])));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The demo repository is a real Git repository with the two commits.
    let log = run(Command::new("git").arg("-C").arg(dir.join("git")).args([
        "log",
        "--format=%H %an %ad",
        "--date=iso-strict",
    ]));
    let log = String::from_utf8_lossy(&log.stdout);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log
        .lines()
        .any(|l| l.starts_with(r2["commit"].as_str().unwrap())));
}

#[test]
fn the_demo_is_deterministic_in_its_bundle_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok1, a, e1) = demo(
        &cargo_bin("cairn"),
        &tmp.path().join("a"),
        &["--agents", "1"],
    );
    let (ok2, b, e2) = demo(
        &cargo_bin("cairn"),
        &tmp.path().join("b"),
        &["--agents", "1"],
    );
    assert!(ok1 && ok2, "{e1}\n{e2}");
    for i in 0..2 {
        assert_eq!(a["releases"][i]["bundle"], b["releases"][i]["bundle"]);
        assert_eq!(a["releases"][i]["commit"], b["releases"][i]["commit"]);
    }
    // One agent: no peers, so nothing moves over the mesh.
    assert_eq!(a["agents"][0]["source"], true);
    assert_eq!(a["agents"][0]["adopted_sequence"], 2);
    assert_eq!(a["delta"]["bytes"], 0);
}

#[test]
fn a_timeout_fails_with_the_agents_that_did_not_converge_and_stops_them() {
    let tmp = tempfile::tempdir().unwrap();
    // 1 ms: no agent can have adopted and reconciled by the first look.
    let (ok, s, stderr) = demo(
        &cargo_bin("cairn"),
        &tmp.path().join("d"),
        &["--agents", "2", "--timeout", "1ms"],
    );
    assert!(!ok, "{stderr}");
    assert_eq!(s["converged"], false);
    let pending: Vec<&str> = s["not_converged"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!pending.is_empty(), "{s:#}");
    let last = stderr.lines().last().unwrap_or_default();
    // Which release misses the deadline depends on how fast the agents are
    // at the first look; either way the demo must fail and say so.
    assert!(
        (last.starts_with("cairn: release 1 did not reach ")
            || last.starts_with("cairn: release 2 did not reach "))
            && last.contains("--timeout"),
        "{stderr}"
    );
    for id in &pending {
        assert!(last.contains(id), "{last}");
    }
    for a in s["agents"].as_array().unwrap() {
        assert_eq!(a["running"], false);
        assert!(!alive(a["pid"].as_u64().unwrap()), "{a}");
    }
}

#[test]
fn bad_setups_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory that is not empty.
    let used = tmp.path().join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("keep.txt"), "mine").unwrap();
    let out = run(Command::new(cargo_bin("cairn"))
        .args(["demo", "--dir"])
        .arg(&used));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("cairn: ") && err.contains("is not empty") && err.contains("--dir"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(used.join("keep.txt")).unwrap(),
        "mine"
    );

    // A cairn without cairn-agent next to it.
    let lonely = tmp.path().join("bin");
    std::fs::create_dir_all(&lonely).unwrap();
    let cairn = lonely.join("cairn");
    std::fs::copy(cargo_bin("cairn"), &cairn).unwrap();
    let out = run(Command::new(&cairn)
        .args(["demo", "--dir"])
        .arg(tmp.path().join("x")));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("cairn: cairn-agent not found")
            && err.contains("cargo build --release --bins"),
        "{err}"
    );

    // Usage errors.
    let out = run(Command::new(cargo_bin("cairn")).args(["demo", "--agents", "0"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(Command::new(cargo_bin("cairn")).args(["demo", "--timeout", "60"]));
    assert_eq!(out.status.code(), Some(2));
}
