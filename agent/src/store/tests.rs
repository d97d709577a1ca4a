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
    // A lost object file (a power cut before the flush) reads as absent.
    let (a, _) = &addrs[1];
    std::fs::remove_file(s.file_path(T::Objects, a).unwrap()).unwrap();
    assert!(!s.has_object(a).unwrap());
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
