use super::owner::{OwnerRecord, Switch};
use super::*;
use crate::targets::DesiredObject;
use cairn_core::testing::object;

fn state(seq: u64, objs: &[(cairn_core::bundle::Entry, Vec<u8>)]) -> DesiredState {
    DesiredState::in_memory(
        "stable".into(),
        seq,
        String::new(),
        objs.iter()
            .map(|(e, b)| DesiredObject {
                entry: e.clone(),
                bytes: b.clone(),
            })
            .collect(),
    )
}

#[test]
fn writes_prunes_restores_and_spares_foreign_files() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("data")).unwrap();
    let dir = d.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("foreign.yaml"), b"mine").unwrap();
    let t = ManifestsDir::new(
        dir.clone(),
        store,
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let a = object("web", "a", "1");
    let b = object("web", "b", "1");
    let r = t
        .apply_blocking(&state(1, &[a.clone(), b.clone()]))
        .unwrap();
    assert_eq!(r.created, 2);
    let fa = dir.join("web__ConfigMap__a.yaml");
    assert_eq!(std::fs::read(&fa).unwrap(), a.1);
    // Second release: a changes, b goes.
    let a2 = object("web", "a", "2");
    let r = t
        .apply_blocking(&state(2, std::slice::from_ref(&a2)))
        .unwrap();
    assert_eq!((r.updated, r.deleted), (1, 1));
    assert!(!dir.join("web__ConfigMap__b.yaml").exists());
    // Hand edit and hand delete are restored.
    std::fs::write(&fa, b"edited").unwrap();
    let r = t
        .apply_blocking(&state(2, std::slice::from_ref(&a2)))
        .unwrap();
    assert_eq!(r.drift_corrected, 1);
    assert_eq!(std::fs::read(&fa).unwrap(), a2.1);
    std::fs::remove_file(&fa).unwrap();
    let r = t
        .apply_blocking(&state(2, std::slice::from_ref(&a2)))
        .unwrap();
    assert_eq!(r.drift_corrected, 1);
    let r = t
        .apply_blocking(&state(2, std::slice::from_ref(&a2)))
        .unwrap();
    assert_eq!((r.unchanged, r.created, r.drift_corrected), (1, 0, 0));
    // Pruning everything never touches the foreign file.
    t.apply_blocking(&state(3, &[])).unwrap();
    assert!(!fa.exists());
    assert_eq!(std::fs::read(dir.join("foreign.yaml")).unwrap(), b"mine");
}

#[test]
fn foreign_file_with_a_desired_name_is_a_conflict() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("data")).unwrap();
    let dir = d.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web__ConfigMap__a.yaml"), b"someone else's").unwrap();
    let t = ManifestsDir::new(
        dir.clone(),
        store,
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let r = t
        .apply_blocking(&state(1, &[object("web", "a", "1")]))
        .unwrap();
    assert!(!r.in_sync());
    assert_eq!(
        std::fs::read(dir.join("web__ConfigMap__a.yaml")).unwrap(),
        b"someone else's"
    );
}

fn listing(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .filter(|(n, _)| n != owner::RECORD_NAME)
        .collect()
}

#[test]
fn a_failed_switch_is_undone_to_the_previous_files() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("data")).unwrap();
    let dir = d.path().join("m");
    let t = ManifestsDir::new(
        dir.clone(),
        store.clone(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let (a, b, z) = (
        object("web", "a", "1"),
        object("web", "b", "1"),
        object("web", "z", "1"),
    );
    for (e, bytes) in [&a, &b, &z] {
        store.put_object(&e.object, bytes).unwrap();
    }
    t.apply_blocking(&state(1, &[a.clone(), b.clone(), z.clone()]))
        .unwrap();
    let release1 = listing(&dir);
    // z is replaced by a non-empty directory: restoring it fails, after
    // b was deleted, a updated and c created.
    let fz = dir.join("web__ConfigMap__z.yaml");
    std::fs::remove_file(&fz).unwrap();
    std::fs::create_dir_all(fz.join("x")).unwrap();
    let (a2, c) = (object("web", "a", "2"), object("web", "c", "1"));
    let e = t
        .apply_blocking(&state(2, &[a2, c, z.clone()]))
        .unwrap_err();
    assert!(
        matches!(e, TargetError::SwitchUndone { sequence: 2, .. }),
        "{e}"
    );
    let mut want = release1.clone();
    want.remove("web__ConfigMap__z.yaml");
    assert_eq!(listing(&dir), want, "exactly release 1 again");
    let rec = owner::read(&dir).unwrap().unwrap();
    assert!(rec.switch.is_none());
    assert_eq!(rec.sequence, Some(1));
    // Once the obstacle is gone release 1 is restored completely.
    std::fs::remove_dir_all(&fz).unwrap();
    t.apply_blocking(&state(1, &[a, b, z])).unwrap();
    assert_eq!(listing(&dir), release1);
}

#[test]
fn a_lost_data_dir_is_recognised_by_the_record() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    let (a, b) = (object("web", "a", "1"), object("web", "b", "1"));
    let t = ManifestsDir::new(
        dir.clone(),
        Store::open(&d.path().join("data")).unwrap(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    t.apply_blocking(&state(1, &[a.clone(), b])).unwrap();
    std::fs::write(dir.join("foreign.yaml"), b"theirs").unwrap();
    drop(t);
    // A new data directory, the same agent: b is pruned, a kept, the
    // foreign file spared.
    let t = ManifestsDir::new(
        dir.clone(),
        Store::open(&d.path().join("data2")).unwrap(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let r = t
        .apply_blocking(&state(2, std::slice::from_ref(&a)))
        .unwrap();
    assert!(r.in_sync(), "{r:?}");
    assert_eq!((r.deleted, r.unchanged, r.drift_corrected), (1, 1, 0));
    let files = listing(&dir);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["foreign.yaml", "web__ConfigMap__a.yaml"]
    );
    // Another agent's directory: an error, nothing changed.
    let other = ManifestsDir::new(
        dir.clone(),
        Store::open(&d.path().join("data3")).unwrap(),
        cairn_core::AgentId::parse("edge-2").unwrap(),
    );
    let e = other.apply_blocking(&state(3, &[])).unwrap_err();
    assert!(e.to_string().contains("managed by agent `edge-1`"), "{e}");
    assert_eq!(listing(&dir), files);
}

#[test]
fn a_tampered_record_never_reaches_outside_the_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    let a = object("web", "a", "1");
    let t = ManifestsDir::new(
        dir.clone(),
        Store::open(&d.path().join("data")).unwrap(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    t.apply_blocking(&state(1, std::slice::from_ref(&a)))
        .unwrap();
    std::fs::write(d.path().join("x"), b"outside").unwrap();
    let mut rec = owner::read(&dir).unwrap().unwrap();
    rec.files
        .insert("../x".into(), Digest::of_address(&a.0.object));
    owner::write(&dir, &rec).unwrap();
    // With the store's copy: the record is rebuilt from it.
    t.apply_blocking(&state(2, &[])).unwrap();
    assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"outside");
    assert!(listing(&dir).is_empty());
    assert!(!owner::read(&dir)
        .unwrap()
        .unwrap()
        .files
        .contains_key("../x"));
    // Without it (a new data dir): an error naming the entry.
    t.apply_blocking(&state(3, std::slice::from_ref(&a)))
        .unwrap();
    let mut rec = owner::read(&dir).unwrap().unwrap();
    rec.files
        .insert("../x".into(), Digest::of_address(&a.0.object));
    owner::write(&dir, &rec).unwrap();
    let fresh = ManifestsDir::new(
        dir.clone(),
        Store::open(&d.path().join("data2")).unwrap(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let e = fresh.apply_blocking(&state(4, &[])).unwrap_err();
    assert!(e.to_string().contains("\"../x\" is not a file name"), "{e}");
    assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"outside");
    assert_eq!(listing(&dir).len(), 1, "nothing changed");
}

#[test]
fn an_interrupted_switch_is_finished_without_drift() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    let store = Store::open(&d.path().join("data")).unwrap();
    let t = ManifestsDir::new(
        dir.clone(),
        store,
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );
    let objs: Vec<_> = (0..6)
        .map(|i| object("web", &format!("o{i}"), "1"))
        .collect();
    let names = plan::file_names(&objs.iter().map(|o| o.0.clone()).collect::<Vec<_>>());
    // What a crash leaves: the switch announced, half of the files
    // written, temporary files of interrupted writes.
    let rec = OwnerRecord {
        format: owner::RECORD_FORMAT,
        agent: cairn_core::AgentId::parse("edge-1").unwrap(),
        target: t.describe(),
        sequence: None,
        files: Inventory::new(),
        switch: Some(Switch {
            sequence: 1,
            changes: names
                .iter()
                .zip(&objs)
                .map(|(n, o)| (n.clone(), Some(Digest::of_address(&o.0.object))))
                .collect(),
        }),
    };
    std::fs::create_dir_all(&dir).unwrap();
    owner::write(&dir, &rec).unwrap();
    for (n, o) in names.iter().zip(&objs).take(3) {
        std::fs::write(dir.join(n), &o.1).unwrap();
    }
    std::fs::write(dir.join(format!(".{}.tmp-77-3", names[3])), b"part").unwrap();
    std::fs::write(dir.join("..cairn-owner.json.tmp-77-4"), b"part").unwrap();
    std::fs::write(dir.join(".notes.tmp-1-1"), b"not ours").unwrap();
    let r = t.apply_blocking(&state(1, &objs)).unwrap();
    assert_eq!((r.created, r.unchanged, r.drift_corrected), (3, 3, 0));
    let left: Vec<_> = listing(&dir)
        .into_keys()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert_eq!(left, [".notes.tmp-1-1"]);
    assert!(owner::read(&dir).unwrap().unwrap().switch.is_none());
}
