use super::*;
use crate::targets::{ManifestsDir, READ_BATCH};
use cairn_core::testing::object;

/// `n` ConfigMaps, the first of which has a site placeholder (so one
/// object is rendered, and read back through the renderer).
fn objects(n: usize, version: &str) -> Vec<(Entry, Vec<u8>)> {
    let mut out: Vec<_> = (0..n)
        .map(|i| object("web", &format!("cm-{i:04}"), version))
        .collect();
    out[0] = object("web", "cm-0000", "${label:region}");
    out
}

fn stored(store: &Store, objs: &[(Entry, Vec<u8>)]) -> Vec<Entry> {
    for (e, b) in objs {
        store.put_object(&e.object, b).unwrap();
    }
    objs.iter().map(|(e, _)| e.clone()).collect()
}

fn site() -> Site {
    Site {
        labels: [("region".to_owned(), "eu-1".to_owned())].into(),
        ..Site::default()
    }
}

fn values() -> (Entry, Vec<u8>) {
    let bytes = serde_json::to_vec(&serde_json::json!({
        "apiVersion": site::API_VERSION, "kind": site::VALUES_KIND,
        "metadata": {"name": "site"},
        "variables": [{"name": "label:region"}],
    }))
    .unwrap();
    let e = Entry {
        path: "values.yaml".into(),
        document: 0,
        api_version: site::API_VERSION.into(),
        kind: site::VALUES_KIND.into(),
        namespace: String::new(),
        name: "site".into(),
        object: cairn_core::Address::of(&bytes),
        size: bytes.len() as u64,
    };
    (e, bytes)
}

fn desired(store: &Store, seq: u64, mut objs: Vec<(Entry, Vec<u8>)>) -> DesiredState {
    objs.push(values());
    let entries = stored(store, &objs);
    let vals: Vec<Entry> = entries
        .iter()
        .filter(|e| site::is_values(e))
        .cloned()
        .collect();
    match prepare(store, &vals, entries.into_iter(), site(), true).unwrap() {
        Prepare::Ready(p) => {
            assert!(p.object_errors.is_empty());
            assert!(p.values_digest.is_some());
            DesiredState::new(
                "stable".into(),
                seq,
                String::new(),
                p.entries,
                Arc::new(p.reader),
            )
        }
        Prepare::Missing(m) => panic!("missing {m:?}"),
        Prepare::Invalid(m) => panic!("{m}"),
    }
}

/// A release of several batches is applied in full from the store, never
/// holding more than one batch of bodies; the next release prunes what it
/// dropped and rewrites what changed, again batch by batch.
#[test]
fn a_store_fed_reconcile_holds_one_batch_and_applies_and_prunes_everything() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("data")).unwrap();
    let dir = d.path().join("manifests");
    let n = READ_BATCH * 4 + 7;
    let target = ManifestsDir::new(
        dir.clone(),
        store.clone(),
        cairn_core::AgentId::parse("edge-1").unwrap(),
    );

    let one = desired(&store, 1, objects(n, "1"));
    assert_eq!(one.entries.len(), n, "CairnValues is not applied");
    let r = target.apply_blocking(&one).unwrap();
    assert_eq!(r.created, n);
    assert!(r.in_sync());
    assert_eq!(one.held().total(), n, "each body read once to write it");
    assert!(
        one.held().peak() <= READ_BATCH,
        "held {} bodies at once",
        one.held().peak()
    );
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
        .count();
    assert_eq!(files, n);
    // The rendered object is on disk as rendered; the rest byte for byte.
    let first = std::fs::read_to_string(dir.join("web__ConfigMap__cm-0000.yaml")).unwrap();
    assert!(first.contains("\"k\":\"eu-1\""), "{first}");
    let (_, last) = object("web", &format!("cm-{:04}", n - 1), "1");
    assert_eq!(
        std::fs::read(dir.join(format!("web__ConfigMap__cm-{:04}.yaml", n - 1))).unwrap(),
        last
    );

    // Release 2: the last batch and a half gone, every other object changed.
    let keep = n - READ_BATCH - READ_BATCH / 2;
    let two_objs = objects(keep, "2");
    let two = desired(&store, 2, two_objs);
    let r = target.apply_blocking(&two).unwrap();
    assert_eq!(r.deleted, n - keep);
    assert_eq!(r.updated, keep - 1, "all but the rendered one changed");
    assert_eq!(r.unchanged, 1);
    assert!(two.held().peak() <= READ_BATCH, "{}", two.held().peak());
    assert!(!dir
        .join(format!("web__ConfigMap__cm-{:04}.yaml", keep))
        .exists());
    assert!(dir
        .join(format!("web__ConfigMap__cm-{:04}.yaml", keep - 1))
        .exists());

    // Nothing to do: no body is read at all.
    let again = desired(&store, 2, objects(keep, "2"));
    let r = target.apply_blocking(&again).unwrap();
    assert_eq!(r.unchanged, keep);
    assert_eq!(again.held().total(), 0);
}

/// The one pass that makes the entries reads objects one at a time and
/// reports the missing ones (all of them) instead of failing on the first.
#[test]
fn prepare_reports_every_missing_object() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let objs = objects(5, "1");
    let entries = stored(&store, &objs[..3]);
    let all: Vec<Entry> = entries
        .into_iter()
        .chain(objs[3..].iter().map(|(e, _)| e.clone()))
        .collect();
    match prepare(&store, &[], all.into_iter(), site(), true).unwrap() {
        Prepare::Missing(m) => {
            assert_eq!(
                m.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                ["cm-0003", "cm-0004"]
            )
        }
        _ => panic!("expected missing objects"),
    }
}

/// An undeclared placeholder blocks the release with the object named.
#[test]
fn prepare_refuses_a_release_that_does_not_render_here() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let objs = objects(3, "1");
    let entries = stored(&store, &objs);
    match prepare(&store, &[], entries.into_iter(), site(), true).unwrap() {
        Prepare::Invalid(m) => assert!(m.contains("undeclared variable"), "{m}"),
        _ => panic!("expected a render error"),
    }
}

/// The Kubernetes target's first pass (references, waves, prune flags)
/// reads a release of several batches one batch at a time and keeps no
/// body.
#[test]
fn the_kubernetes_pass_reads_bodies_one_batch_at_a_time() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let n = READ_BATCH * 3 + 1;
    let state = desired(&store, 1, objects(n, "1"));
    let objs = crate::kubernetes::reconcile::desired_objects(&state).unwrap();
    assert_eq!(objs.len(), n);
    assert_eq!(objs[n - 1].object.name, format!("cm-{:04}", n - 1));
    assert_eq!(
        objs[0].address,
        state.entries.get(0).unwrap().address.to_string()
    );
    assert!(objs.iter().all(|o| o.prunable));
    assert_eq!(state.held().total(), n);
    assert!(state.held().peak() <= READ_BATCH, "{}", state.held().peak());
}

/// The stored manifest streamed one chunk at a time gives every entry in
/// order, as the whole decode does (formats 1 and 2), and a missing,
/// damaged or reordered chunk ends it with the manifest unreadable.
#[test]
fn stored_entries_stream_the_manifest_chunk_by_chunk() {
    use cairn_core::bundle::{Chunker, Manifest};
    let objs: Vec<(Entry, Vec<u8>)> = (0..130)
        .map(|i| cairn_core::testing::object("web", &format!("cm-{i:04}"), "1"))
        .collect();
    let limits = Limits::default();
    let chunker = Chunker::Fixed { entries: 20 };
    let read_all = |m: &Manifest, chunks: &BTreeMap<String, Vec<u8>>| {
        let enc = m.encode_with(&chunker);
        let id = enc.id();
        let mut reads = 0;
        let mut it =
            StoredEntries::of_document(&enc.top, &id, &limits, |a: &cairn_core::Address| {
                reads += 1;
                Ok(chunks.get(a.as_str()).cloned())
            })
            .expect("the top document decodes");
        let got: Vec<Entry> = it.by_ref().collect();
        (got, it.failed().map(str::to_owned), reads)
    };
    for m in [
        cairn_core::testing::manifest(&objs),
        cairn_core::testing::manifest_v2(&objs),
    ] {
        let enc = m.encode_with(&chunker);
        let chunks: BTreeMap<String, Vec<u8>> = enc
            .chunks
            .iter()
            .map(|(a, b)| (a.to_string(), b.clone()))
            .collect();
        let (got, failed, reads) = read_all(&m, &chunks);
        assert_eq!(failed, None);
        assert_eq!(got, m.entries, "format {}", m.format);
        assert_eq!(reads, enc.chunks.len(), "each chunk read once");
        if m.format == 1 {
            continue;
        }
        assert_eq!(enc.chunks.len(), 7);
        // A chunk missing, or its bytes swapped for another chunk's.
        let (third, _) = &enc.chunks[2];
        let mut missing = chunks.clone();
        missing.remove(third.as_str());
        let (got, failed, _) = read_all(&m, &missing);
        assert_eq!(got.len(), 40, "the entries before the missing chunk");
        assert!(failed.unwrap().contains("chunk 3"));
        let mut swapped = chunks.clone();
        swapped.insert(third.to_string(), enc.chunks[3].1.clone());
        let (_, failed, _) = read_all(&m, &swapped);
        assert!(failed.unwrap().contains("chunk 3"));
        // Chunks that each check but are out of order across chunks (the
        // top document lists them so: its own hash binds that order).
        let mut unsorted = m.clone();
        unsorted.entries[0..40].rotate_left(20);
        let mut sorted_chunks = BTreeMap::new();
        let enc2 = unsorted.encode_with(&chunker);
        for (a, b) in &enc2.chunks {
            sorted_chunks.insert(a.to_string(), b.clone());
        }
        let (_, failed, _) = read_all(&unsorted, &sorted_chunks);
        assert_eq!(failed.as_deref(), Some("entries are not sorted"));
    }
}
