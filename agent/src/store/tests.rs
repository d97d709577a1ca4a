use super::*;

#[test]
fn adopt_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let obj = b"{\"kind\":\"x\"}";
    let a = cairn_keys::sha256_address(obj);
    s.put_object(&a, obj).unwrap();
    assert!(s.put_object(&a, b"other").is_err());
    assert_eq!(s.get_object(&a).unwrap().unwrap(), obj);
    dangerous::put_object_unchecked(&s, &a, b"tampered").unwrap();
    assert!(matches!(s.get_object(&a), Err(StoreError::Corrupt { .. })));
    assert!(s.agent_id().unwrap().is_none());
    s.set_agent_id("x").unwrap();
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    assert_eq!(s.agent_id().unwrap().as_deref(), Some("x"));
}

#[test]
fn large_values_are_files_and_sled_writes_no_blobs() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    // Many values just under and over the inline limit: sled must never
    // write a page as an (unsynced) blob file.
    let mut addrs = Vec::new();
    for i in 0..300u32 {
        let size = if i % 2 == 0 { INLINE_MAX } else { 200 << 10 };
        let mut v = vec![b'a' + (i % 26) as u8; size];
        v[..4].copy_from_slice(&i.to_be_bytes());
        let a = cairn_keys::sha256_address(&v);
        s.put_object(&a, &v).unwrap();
        addrs.push((a, v));
    }
    let inv = vec![b'i'; 1 << 20];
    s.set_inventory("t", &inv).unwrap();
    s.set_inventory("t", b"small").unwrap();
    s.flush().unwrap();
    let blobs = Store::db_path(d.path()).join("blobs");
    let n = std::fs::read_dir(&blobs).map(|r| r.count()).unwrap_or(0);
    assert_eq!(n, 0, "sled wrote blob files");
    // The replaced inventory's file is gone; objects are files.
    let values = d.path().join("values/sha256");
    let left: usize = std::fs::read_dir(&values)
        .map(|r| {
            r.flatten()
                .map(|d| std::fs::read_dir(d.path()).unwrap().count())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "unreferenced value file kept");
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    for (a, v) in &addrs {
        assert!(s.has_object(a).unwrap());
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    assert_eq!(s.inventory("t").unwrap().unwrap(), b"small");
    // Objects are in the pack, not files.
    assert!(!d.path().join("objects/sha256").exists());
    // A format 2 store's object file lost to a power cut before the flush
    // reads as absent.
    let v = vec![b'z'; 200 << 10];
    let a = cairn_keys::sha256_address(&v);
    dangerous::put_object_format2(&s, &a, &v).unwrap();
    assert_eq!(s.get_object(&a).unwrap().unwrap(), v);
    std::fs::remove_file(s.file_path(T::Objects, &a).unwrap()).unwrap();
    assert!(!s.has_object(&a).unwrap());
}

#[test]
fn pointer_lookalike_values_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let mut v = POINTER_MAGIC.to_vec();
    v.extend_from_slice(b"12345678sha256:00");
    s.put_peer("p", &v).unwrap();
    assert_eq!(s.peers().unwrap(), vec![("p".to_owned(), v)]);
}

#[test]
fn read_only_data_dir_is_not_called_damaged() {
    if unsafe { libc::geteuid() } == 0 {
        // root ignores permissions; the read-only file system case is
        // covered by tests/reliability.rs.
        return;
    }
    let d = tempfile::tempdir().unwrap();
    Store::open(d.path()).unwrap().close().unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [d.path().to_path_buf(), Store::db_path(d.path())] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o500)).unwrap();
    }
    let e = Store::open(d.path()).unwrap_err();
    assert!(matches!(e, StoreError::NotWritable { .. }), "{e}");
    assert!(!e.to_string().contains("backup"), "{e}");
}

#[test]
fn second_open_is_locked() {
    let d = tempfile::tempdir().unwrap();
    let _s = Store::open(d.path()).unwrap();
    // sled's lock is per process file lock; a second open in the same
    // process may succeed on some platforms, so only check it does not
    // corrupt anything.
    let _ = Store::open(d.path());
}

#[test]
fn garbage_database_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let db = Store::db_path(d.path());
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("conf"), b"garbage garbage garbage").unwrap();
    std::fs::write(db.join("db"), vec![0xffu8; 4096]).unwrap();
    let e = Store::open(d.path()).unwrap_err();
    assert!(
        matches!(e, StoreError::Open { .. } | StoreError::Corrupt { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("never wipes"), "{e}");
    assert!(db.join("db").exists(), "nothing deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_calls_run_on_at_most_store_threads_threads_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = tempfile::tempdir().unwrap();
    let handle = StoreHandle::new(Store::open(d.path()).unwrap());
    // A second handle on the same store shares the bound.
    let other = StoreHandle::new(handle.blocking().clone());
    let active = std::sync::Arc::new(AtomicUsize::new(0));
    let most = std::sync::Arc::new(AtomicUsize::new(0));
    let calls = (0..32u32).map(|i| {
        let h = if i % 2 == 0 {
            handle.clone()
        } else {
            other.clone()
        };
        let (active, most) = (active.clone(), most.clone());
        async move {
            h.call(move |s| {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Work that takes a moment, so unbounded calls would overlap.
                let obj = format!("{{\"n\":{i}}}").into_bytes();
                s.put_object(&cairn_keys::sha256_address(&obj), &obj)?;
                std::thread::sleep(std::time::Duration::from_millis(5));
                active.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            })
            .await
        }
    });
    let done = futures::future::join_all(calls).await;
    assert_eq!(
        done.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        (0..32).collect::<Vec<_>>()
    );
    let most = most.load(Ordering::SeqCst);
    assert!(
        (1..=STORE_THREADS).contains(&most),
        "{most} calls ran at once"
    );
    // The store counts from just before to just after each closure.
    let peak = handle.peak_calls();
    assert!(
        (most..=STORE_THREADS).contains(&peak),
        "peak {peak}, most {most}"
    );
    assert_eq!(other.peak_calls(), peak);
}

/// Objects of many sizes, a few just over the pending table's limit so an
/// index is written mid-way.
fn objects(n: u32, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let mut v = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
            v.resize(size + (i as usize % 97), b'p');
            (cairn_keys::sha256_address(&v), v)
        })
        .collect()
}

#[test]
fn packed_objects_round_trip_across_reopen() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let objs = objects(pack::PENDING_MAX as u32 + 500, 300);
    for (a, v) in &objs {
        s.put_object(a, v).unwrap();
        // Writing it again appends nothing.
        s.put_object(a, v).unwrap();
    }
    assert_eq!(s.object_count(), objs.len());
    s.flush().unwrap();
    let pack_len = std::fs::metadata(dangerous::pack_files(&s).0)
        .unwrap()
        .len();
    let body: u64 = objs.iter().map(|(_, v)| v.len() as u64).sum();
    assert_eq!(pack_len, pack::PACK_HEADER + body, "duplicates appended");
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    assert_eq!(s.object_count(), objs.len());
    for (a, v) in &objs {
        assert!(s.has_object(a).unwrap());
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    let missing = cairn_keys::sha256_address(b"never stored");
    assert!(!s.has_object(&missing).unwrap());
    assert!(s.get_object(&missing).unwrap().is_none());
    assert!(s.get_object("sha256:nothex").unwrap().is_none());
    // sled holds no object.
    assert_eq!(s.tree(T::Objects).unwrap().len(), 0);
    // Removed objects stay removed across a reopen; putting one back works.
    let (a0, v0) = &objs[0];
    let (a1, _) = &objs[1];
    s.remove_object(a0).unwrap();
    s.remove_object(a1).unwrap();
    assert!(!s.has_object(a0).unwrap());
    s.flush().unwrap();
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    assert!(!s.has_object(a0).unwrap() && !s.has_object(a1).unwrap());
    assert_eq!(s.object_count(), objs.len() - 2);
    s.put_object(a0, v0).unwrap();
    assert_eq!(&s.get_object(a0).unwrap().unwrap(), v0);
}

#[test]
fn a_crash_before_the_index_write_loses_only_unindexed_objects() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let objs = objects(20, 1000);
    for (a, v) in &objs[..10] {
        s.put_object(a, v).unwrap();
    }
    dangerous::put_head_unchecked(&s, "stable", b"head bytes").unwrap();
    // Appended to the pack, never indexed: the process dies here.
    for (a, v) in &objs[10..] {
        s.put_object(a, v).unwrap();
    }
    let (pack_path, _) = dangerous::pack_files(&s);
    let indexed_len =
        pack::PACK_HEADER + objs[..10].iter().map(|(_, v)| v.len() as u64).sum::<u64>();
    assert!(std::fs::metadata(&pack_path).unwrap().len() > indexed_len);
    drop(s); // no flush
    let s = loop {
        match Store::open(d.path()) {
            Err(StoreError::Locked { .. }) => std::thread::yield_now(),
            r => break r.unwrap(),
        }
    };
    assert_eq!(s.head("stable").unwrap().unwrap(), b"head bytes");
    for (a, v) in &objs[..10] {
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    for (a, _) in &objs[10..] {
        assert!(!s.has_object(a).unwrap(), "unindexed object read back");
    }
    // The unindexed tail was cut off; new objects go after the indexed end.
    assert_eq!(std::fs::metadata(&pack_path).unwrap().len(), indexed_len);
    let (a, v) = &objs[15];
    s.put_object(a, v).unwrap();
    s.flush().unwrap();
    assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
}

#[test]
fn damaged_index_or_pack_is_a_clear_error_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let objs = objects(50, 500);
    for (a, v) in &objs {
        s.put_object(a, v).unwrap();
    }
    s.flush().unwrap();
    let (pack_path, idx_path) = dangerous::pack_files(&s);
    s.close().unwrap();
    let good_idx = std::fs::read(&idx_path).unwrap();
    let good_pack = std::fs::read(&pack_path).unwrap();
    let open_err = |what: &str| {
        let e = Store::open(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{what}: {e}");
        e.to_string()
    };
    let unchanged = |what: &str, idx: &[u8], pack: &[u8]| {
        assert_eq!(
            std::fs::read(&idx_path).unwrap(),
            idx,
            "{what}: index changed"
        );
        assert_eq!(
            std::fs::read(&pack_path).unwrap(),
            pack,
            "{what}: pack changed"
        );
    };
    // A flipped bit in an entry: the checksum.
    let mut idx = good_idx.clone();
    idx[pack::IDX_HEADER as usize + 31] ^= 1; // the first digest's last byte
    std::fs::write(&idx_path, &idx).unwrap();
    let e = open_err("flipped bit");
    assert!(
        e.contains(&idx_path.display().to_string()) && e.contains("checksum"),
        "{e}"
    );
    unchanged("flipped bit", &idx, &good_pack);
    // A truncated index.
    let idx = &good_idx[..good_idx.len() - 10];
    std::fs::write(&idx_path, idx).unwrap();
    let e = open_err("truncated index");
    assert!(e.contains(&idx_path.display().to_string()), "{e}");
    // A huge count (would be a huge allocation if trusted).
    let mut idx = good_idx.clone();
    idx[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(&idx_path, &idx).unwrap();
    open_err("huge count");
    // Garbage.
    std::fs::write(&idx_path, vec![0xffu8; 5000]).unwrap();
    let e = open_err("garbage index");
    assert!(e.contains("magic"), "{e}");
    std::fs::write(&idx_path, &good_idx).unwrap();
    // A truncated pack: shorter than its index says.
    std::fs::write(&pack_path, &good_pack[..good_pack.len() - 1]).unwrap();
    let e = open_err("truncated pack");
    assert!(e.contains(&pack_path.display().to_string()), "{e}");
    unchanged(
        "truncated pack",
        &good_idx,
        &good_pack[..good_pack.len() - 1],
    );
    // A pack with a foreign header.
    let mut pack = good_pack.clone();
    pack[0] = b'X';
    std::fs::write(&pack_path, &pack).unwrap();
    let e = open_err("bad pack header");
    assert!(e.contains(&pack_path.display().to_string()), "{e}");
    // A damaged body: the store opens; that object reads as corrupt,
    // naming the pack; the others read fine.
    let mut pack = good_pack.clone();
    let last = pack.len() - 3;
    pack[last] ^= 0x20;
    std::fs::write(&pack_path, &pack).unwrap();
    let s = Store::open(d.path()).unwrap();
    let mut bad = 0;
    for (a, v) in &objs {
        match s.get_object(a) {
            Ok(Some(b)) => assert_eq!(&b, v),
            Err(StoreError::Corrupt { reason, .. }) => {
                assert!(
                    reason.contains(&pack_path.display().to_string()),
                    "{reason}"
                );
                bad += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(bad, 1);
    // The pack shrinks under the open store: a clear error, no panic.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pack_path)
        .unwrap();
    f.set_len(pack::PACK_HEADER + 10).unwrap();
    let e = s.get_object(&objs[40].0).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // So does the index.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&idx_path)
        .unwrap();
    f.set_len(pack::IDX_HEADER + 3).unwrap();
    let e = s.has_object(&objs[41].0).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains(&idx_path.display().to_string()),
        "{e}"
    );
}

#[test]
fn compaction_drops_garbage_and_keeps_live_objects() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    // 3 MiB of objects; remove two thirds: garbage passes the live bytes
    // and the 1 MiB floor, so the flush compacts.
    let objs = objects(300, 10 << 10);
    for (a, v) in &objs {
        s.put_object(a, v).unwrap();
    }
    s.flush().unwrap();
    let (old_pack, old_idx) = dangerous::pack_files(&s);
    for (i, (a, _)) in objs.iter().enumerate() {
        if i % 3 != 0 {
            s.remove_object(a).unwrap();
        }
    }
    // A damaged live copy is dropped by the compaction (fetched again).
    let (a3, _) = &objs[3];
    dangerous::put_object_unchecked(&s, a3, b"bit rot").unwrap_or(());
    let (new_pack, new_idx) = dangerous::pack_files(&s);
    assert_ne!(new_pack, old_pack, "no compaction");
    assert!(
        !old_pack.exists() && !old_idx.exists(),
        "old generation kept"
    );
    assert!(new_idx.exists());
    let live: u64 = objs
        .iter()
        .step_by(3)
        .map(|(_, v)| v.len() as u64)
        .sum::<u64>()
        - objs[3].1.len() as u64;
    assert_eq!(
        std::fs::metadata(&new_pack).unwrap().len(),
        pack::PACK_HEADER + live
    );
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    for (i, (a, v)) in objs.iter().enumerate() {
        if i % 3 == 0 && i != 3 {
            assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
        } else {
            assert!(!s.has_object(a).unwrap(), "object {i} kept");
        }
    }
    assert_eq!(s.object_count(), 99);
    // A compaction that died before its index was written leaves a pack
    // without an index: removed at open, the current generation kept.
    let (cur_pack, _) = dangerous::pack_files(&s);
    s.close().unwrap();
    let orphan = cur_pack.with_file_name("pack-99.pack");
    std::fs::write(&orphan, b"CAIRNPAK partial").unwrap();
    let s = Store::open(d.path()).unwrap();
    assert!(!orphan.exists());
    assert_eq!(dangerous::pack_files(&s).0, cur_pack);
    assert_eq!(s.object_count(), 99);
}

#[test]
fn a_format_2_store_is_read_then_migrated_into_the_pack() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    // The layout main wrote before format 3: small objects inline in sled's
    // `objects` tree, large ones as files under objects/sha256/.
    let small = objects(20, 100);
    let large = objects(3, 8 << 10);
    for (a, v) in small.iter().chain(&large) {
        dangerous::put_object_format2(&s, a, v).unwrap();
    }
    // Read in place (as until the next open migrates them); a damaged
    // format 2 copy is caught, and removable.
    assert_eq!(s.object_count(), 23);
    for (a, v) in small.iter().chain(&large) {
        assert!(s.has_object(a).unwrap());
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    let bad = objects(1, 50).remove(0);
    dangerous::put_object_format2(&s, &bad.0, b"bit rot").unwrap();
    assert!(matches!(
        s.get_object(&bad.0),
        Err(StoreError::Corrupt { .. })
    ));
    s.remove_object(&bad.0).unwrap();
    assert!(!s.has_object(&bad.0).unwrap());
    // A damaged copy and a lost file, for the migration below.
    let rot = objects(2, 60);
    dangerous::put_object_format2(&s, &rot[0].0, b"bit rot").unwrap();
    let lost = vec![b'l'; 8 << 10];
    let lost_a = cairn_keys::sha256_address(&lost);
    dangerous::put_object_format2(&s, &lost_a, &lost).unwrap();
    std::fs::remove_file(s.file_path(T::Objects, &lost_a).unwrap()).unwrap();
    s.meta_put("format", b"2").unwrap();
    s.flush().unwrap();
    assert!(d.path().join("objects/sha256").exists());
    s.close().unwrap();
    // The upgraded open moves every object into the pack.
    let s = Store::open(d.path()).unwrap();
    assert_eq!(
        s.meta_get("format").unwrap().unwrap(),
        STORE_FORMAT.to_string().as_bytes()
    );
    assert_eq!(
        s.tree(T::Objects).unwrap().len(),
        0,
        "sled still holds objects"
    );
    assert!(!s.file_path(T::Objects, &large[0].0).unwrap().exists());
    assert_eq!(s.object_count(), 24);
    for (a, v) in small.iter().chain(&large) {
        assert!(s.has_object(a).unwrap());
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    assert!(matches!(
        s.get_object(&rot[0].0),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(!s.has_object(&lost_a).unwrap());
    // New objects go to the pack only.
    let fresh = objects(5, 9000);
    for (a, v) in &fresh {
        s.put_object(a, v).unwrap();
    }
    s.flush().unwrap();
    assert_eq!(s.tree(T::Objects).unwrap().len(), 0);
    assert!(!s.file_path(T::Objects, &fresh[0].0).unwrap().exists());
    s.close().unwrap();
    let s = Store::open(d.path()).unwrap();
    for (a, v) in small.iter().chain(&large).chain(&fresh) {
        assert_eq!(&s.get_object(a).unwrap().unwrap(), v);
    }
    // A store of a newer format is refused.
    s.meta_put("format", b"4").unwrap();
    s.flush().unwrap();
    s.close().unwrap();
    let e = Store::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("store format `4`"), "{e}");
}
