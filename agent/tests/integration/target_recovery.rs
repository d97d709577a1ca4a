//! The manifests-dir target comes back from what a site does to it: a lost
//! data directory, a crash mid-reconcile, a nearly full file system, and a
//! tampered ownership record. Real agent processes; the disk-pressure test
//! mounts a tmpfs (run as root, as CI does).

use crate::support::*;
use cairn_test_support::fixture::{commit_files, configmap, git_run};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const RECORD: &str = ".cairn-owner.json";

/// Hidden files in the manifests directory other than the ownership record
/// (temporary files of interrupted writes, mostly).
fn hidden_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != RECORD)
        .collect();
    out.sort();
    out
}

/// Asserts the manifests directory holds exactly `want` (names first, so a
/// failure message stays readable).
fn assert_exact(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: file names");
    let differ: Vec<&String> = want
        .iter()
        .filter(|(n, b)| got.get(*n) != Some(b))
        .map(|(n, _)| n)
        .collect();
    assert!(differ.is_empty(), "{what}: content differs: {differ:?}");
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn data_dir_moved_aside_recovers_to_an_exact_ready_target() {
    let w = World::new(3, 2, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    w.once_ok(&cfg);
    let want1 = expected_files(&b1);
    assert_exact(&w.files(), &want1, "target");
    let id = w.status().unwrap().agent_id;
    std::fs::write(w.manifests.join("zz-foreign.yaml"), b"mine: true\n").unwrap();

    // Release 2 drops an app; meanwhile the data directory is moved aside,
    // as docs/OPERATIONS.md advises for a damaged store.
    cairn_test_support::fixture::remove_and_commit(
        &w.git,
        "clusters/edge/app-0002",
        "drop app-0002",
        "2026-03-01T00:00:00Z",
    )
    .unwrap();
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    std::fs::rename(&w.data, w.path("data.broken")).unwrap();

    let mut agent = w.spawn(&cfg, "agent.log");
    let mut want2 = expected_files(&b2);
    assert!(want2.len() < want1.len());
    want2.insert("zz-foreign.yaml".into(), b"mine: true\n".to_vec());
    wait_for(120, "ready at release 2", || {
        w.status()
            .is_some_and(|s| s.ready && s.adopted.as_ref().is_some_and(|a| a.sequence == 2))
    });
    assert_exact(
        &w.files(),
        &want2,
        "stale files pruned, foreign file spared",
    );
    let s = w.status().unwrap();
    assert_eq!(s.agent_id, id, "identity taken back from the target");
    let rep = s.reconcile.as_ref().unwrap().report.as_ref().unwrap();
    assert!(rep.conflicts.is_empty(), "{rep:?}");
    assert_eq!(rep.drift_corrected, 0, "{rep:?}");
    let addr = s.listen.unwrap();
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    let log = w.log("agent.log");
    assert!(
        log.contains("agent id taken from the target's ownership record"),
        "{log}"
    );
    assert!(!log.contains("not written by cairn-agent"), "{log}");
    assert!(terminate(&mut agent).success());
}

#[test]
fn kill_during_a_first_large_reconcile_is_not_drift() {
    // 3,000 apps: 9,003 objects (the scale of the reliability run).
    let t0 = std::time::Instant::now();
    let w = World::new(3000, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    eprintln!("fixture built and released in {:?}", t0.elapsed());
    let want = expected_files(&b1);
    assert_eq!(want.len(), 9003);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    let count = || {
        std::fs::read_dir(&w.manifests)
            .map(|rd| rd.count())
            .unwrap_or(0)
    };
    let mut agent = w.spawn(&cfg, "agent-1.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while count() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "reconcile never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    eprintln!("killed after {:?}", t0.elapsed());
    let written = w.files().len();
    assert!(
        written < want.len(),
        "the kill must interrupt the reconcile ({written} files written)"
    );
    // A temporary file an interrupted write leaves, and a hidden file that
    // is not the agent's.
    let first = want.keys().next().unwrap();
    let tmp = format!(".{first}.tmp-4194304-7");
    std::fs::write(w.manifests.join(&tmp), b"partial").unwrap();
    std::fs::write(w.manifests.join(".keep.tmp-1-1"), b"not cairn's").unwrap();

    let mut agent = w.spawn(&cfg, "agent-2.log");
    wait_for(300, "ready after the restart", || {
        w.status().is_some_and(|s| s.ready)
    });
    eprintln!("ready again after {:?}", t0.elapsed());
    assert_exact(&w.files(), &want, "target");
    assert_eq!(hidden_files(&w.manifests), [".keep.tmp-1-1"]);
    let addr = w.status().unwrap().listen.unwrap();
    let m = http_get(&addr, "/metrics").1;
    assert_eq!(metric(&m, "cairn_drift_corrections_total"), Some(0), "{m}");
    let log = w.log("agent-2.log");
    assert!(!log.contains("edited or deleted by hand"), "{log}");
    assert!(
        log.contains("removed temporary files left by an interrupted write"),
        "{log}"
    );
    eprintln!("checked after {:?}", t0.elapsed());
    assert!(terminate(&mut agent).success());
    eprintln!("stopped after {:?}", t0.elapsed());
}

/// A tmpfs mounted for the test; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_kb: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kb}k"), "tmpfs"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn big_configmaps(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("clusters/big/{prefix}-{i}.yaml"),
                configmap(&format!("{prefix}-{i}"), 300, i),
            )
        })
        .collect()
}

fn commit(repo: &Path, files: &[(String, String)], msg: &str, date: &str) {
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    commit_files(repo, &refs, msg, date).unwrap();
}

#[test]
fn nearly_full_target_switches_releases_or_stays_exactly() {
    let w = World::new(1, 1, 1);
    // Release 1: four 300 KiB ConfigMaps. Release 2 replaces them by four
    // others (both together do not fit). Release 3 adds eight more (does
    // not fit at all).
    commit(
        &w.git,
        &big_configmaps("big-a", 4),
        "big a",
        "2026-02-01T00:00:00Z",
    );
    let b1 = w.build("HEAD", "b1.bundle");
    git_run(
        &w.git,
        "2026-02-02T00:00:00Z",
        &["rm", "-rq", "clusters/big"],
    )
    .unwrap();
    commit(
        &w.git,
        &big_configmaps("big-b", 4),
        "big b",
        "2026-02-02T00:00:00Z",
    );
    let b2 = w.build("HEAD", "b2.bundle");
    commit(
        &w.git,
        &big_configmaps("big-c", 8),
        "big c",
        "2026-02-03T00:00:00Z",
    );
    let b3 = w.build("HEAD", "b3.bundle");
    let size = |b: &Path| -> u64 { expected_files(b).values().map(|v| v.len() as u64).sum() };
    let (s1, s2) = (size(&b1), size(&b2));
    // 1800 KiB: room for either release, not for both at once.
    let tmpfs_bytes = 1800 * 1024;
    assert!(s1 < tmpfs_bytes - 200 * 1024 && s1 + s2 > tmpfs_bytes + 200 * 1024);
    assert!(size(&b3) > tmpfs_bytes);
    let _mount = Tmpfs::mount(&w.manifests, 1800);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);

    w.release(&b1);
    w.once_ok(&cfg);
    assert_exact(&w.files(), &expected_files(&b1), "target");

    w.release(&b2);
    w.once_ok(&cfg);
    assert_exact(&w.files(), &expected_files(&b2), "exactly release 2");
    assert!(hidden_files(&w.manifests).is_empty());

    w.release(&b3);
    let out = w.once(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("every change was undone"), "{err}");
    assert_exact(&w.files(), &expected_files(&b2), "still exactly release 2");
    assert!(hidden_files(&w.manifests).is_empty());
    let s = w.status().unwrap();
    assert!(!s.ready);
    let e = s.reconcile.unwrap().error.unwrap();
    assert!(e.contains("switching to release 3 failed"), "{e}");

    // Space comes back: release 3 is applied.
    ok(Command::new("mount")
        .args(["-o", "remount,size=8192k"])
        .arg(&w.manifests));
    w.once_ok(&cfg);
    assert_exact(&w.files(), &expected_files(&b3), "target");
}

#[test]
fn tampered_ownership_record_deletes_nothing_outside() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    w.once_ok(&cfg);
    let want = expected_files(&b1);
    let outside = w.path("x");
    std::fs::write(&outside, b"outside").unwrap();
    let record_path = w.manifests.join(RECORD);
    let tamper = || {
        let mut rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
        let files = rec["files"].as_object_mut().unwrap();
        let addr = files.values().next().unwrap().clone();
        files.insert("../x".into(), addr.clone());
        files.insert("/etc/hostname".into(), addr);
        std::fs::write(&record_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    };

    // A release that wants nothing is the most a record could make the
    // agent delete. With the data directory lost the record is all the
    // agent has: it refuses it, names the entry, and changes nothing.
    git_run(&w.git, "2026-03-01T00:00:00Z", &["rm", "-rq", "clusters"]).unwrap();
    let _ = commit_files(
        &w.git,
        &[(
            "clusters/edge/namespace.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n",
        )],
        "only a namespace",
        "2026-03-01T00:00:00Z",
    )
    .unwrap();
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b2);
    tamper();
    std::fs::rename(&w.data, w.path("data.broken")).unwrap();
    let out = w.once(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".cairn-owner.json") && err.contains("\"../x\" is not a file name"),
        "{err}"
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
    assert!(Path::new("/etc/hostname").exists());
    assert_exact(&w.files(), &want, "nothing changed");

    // With its data directory back the agent rebuilds the record from its
    // own inventory and converges; still nothing outside is touched.
    std::fs::remove_dir_all(&w.data).unwrap();
    std::fs::rename(w.path("data.broken"), &w.data).unwrap();
    w.once_ok(&cfg);
    assert_exact(&w.files(), &expected_files(&b2), "target");
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let names: BTreeMap<String, serde_json::Value> =
        serde_json::from_value(rec["files"].clone()).unwrap();
    assert_eq!(
        names.keys().cloned().collect::<Vec<_>>(),
        expected_files(&b2).into_keys().collect::<Vec<_>>()
    );
}
