//! A damaged data directory: a clear error and no silent wipe; objects
//! re-fetched when a source has them.

use crate::support::*;
use cairn_agent::store::{dangerous, Store};
use cairn_test_support::StaticServer;

fn adopted_world() -> (World, std::path::PathBuf, Vec<String>) {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    w.once_ok(&cfg);
    let mut objects = Vec::new();
    cairn_bundle::bundle::read_bundle_file(&b1, &Default::default(), |e, _| {
        objects.push(e.object.to_string());
        Ok(())
    })
    .unwrap();
    (w, cfg, objects)
}

#[test]
fn tampered_stored_release_is_refused_without_wiping() {
    let (w, cfg, _) = adopted_world();
    {
        let store = Store::open(&w.data).unwrap();
        let mut head = store.head("stable").unwrap().unwrap();
        let n = head.len() - 10;
        head[n] ^= 0x01;
        dangerous::put_head_unchecked(&store, "stable", &head).unwrap();
    }
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap();
    assert!(line.starts_with("cairn-agent: data dir "), "{err}");
    assert!(line.contains("stored state fails verification"), "{err}");
    assert!(line.contains("never wipes"), "{err}");
    // Still there, still tampered: nothing was reset.
    let store = Store::open(&w.data).unwrap();
    assert!(store.head("stable").unwrap().is_some());
}

#[test]
fn corrupt_object_is_refetched_from_a_source() {
    let (w, cfg, objects) = adopted_world();
    {
        let store = Store::open(&w.data).unwrap();
        dangerous::put_object_unchecked(&store, &objects[0], b"bit rot").unwrap();
        dangerous::remove_object(&store, &objects[1]).unwrap();
    }
    let logs = w.once_ok(&cfg);
    assert!(logs.contains("re-fetched"), "{logs}");
    let store = Store::open(&w.data).unwrap();
    assert!(store.get_object(&objects[0]).unwrap().is_some());
    assert!(store.get_object(&objects[1]).unwrap().is_some());
}

#[test]
fn corrupt_object_with_no_source_is_a_clear_error() {
    let (w, _, objects) = adopted_world();
    {
        let store = Store::open(&w.data).unwrap();
        dangerous::put_object_unchecked(&store, &objects[0], b"bit rot").unwrap();
    }
    let server = StaticServer::start(w.path("empty")).unwrap();
    let cfg = w.config("offline.yaml", &[server.url()]);
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing or corrupt and no source could provide them"),
        "{err}"
    );
}

#[test]
fn garbage_database_is_a_clear_error() {
    let (w, cfg, _) = adopted_world();
    let db = Store::db_path(&w.data);
    for e in std::fs::read_dir(&db).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::write(e.path(), vec![0xA5u8; 8192]).unwrap();
        }
    }
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cairn-agent: data dir"), "{err}");
    assert!(err.contains("never wipes"), "{err}");
    assert!(db.exists());
}

#[test]
fn second_agent_on_the_same_data_dir_is_refused() {
    let (w, cfg, _) = adopted_world();
    let mut agent = w.spawn(&cfg, "agent.log");
    wait_for(60, "first agent running", || {
        w.status()
            .is_some_and(|s| s.pid == agent.id() && s.listen.is_some())
    });
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked by another process"), "{err}");
    terminate(&mut agent);
}

#[test]
fn a_format_2_store_is_enforced_offline_by_an_upgraded_agent() {
    let (w, _, objects) = adopted_world();
    {
        let store = Store::open(&w.data).unwrap();
        dangerous::rewrite_as_format2(&store).unwrap();
        let (pack, _) = dangerous::pack_files(&store);
        // The pack is empty: every object is where a format 2 build put it.
        assert_eq!(std::fs::metadata(pack).unwrap().len(), 24);
        assert!(store.object_count() >= objects.len());
        store.close().unwrap();
    }
    // No source has anything: every object must come from the old layout.
    let server = StaticServer::start(w.path("empty")).unwrap();
    let cfg = w.config("offline.yaml", &[server.url()]);
    let logs = w.once_ok(&cfg);
    assert!(!logs.contains("re-fetched"), "{logs}");
    let store = Store::open(&w.data).unwrap();
    for a in &objects {
        assert!(store.get_object(a).unwrap().is_some(), "{a}");
    }
}

#[test]
fn damaged_object_index_is_a_clear_error_and_is_left_alone() {
    let (w, cfg, _) = adopted_world();
    let idx = {
        let store = Store::open(&w.data).unwrap();
        let (_, idx) = dangerous::pack_files(&store);
        store.close().unwrap();
        idx
    };
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = bytes.len() - 20; // inside the last entry's digest
    bytes[n] ^= 0x10;
    std::fs::write(&idx, &bytes).unwrap();
    let out = w.once(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&idx.display().to_string()), "{err}");
    assert!(err.contains("never wipes"), "{err}");
    assert_eq!(std::fs::read(&idx).unwrap(), bytes, "index changed");
}
