use super::gc::Garbage;
use super::serve::split_route;
use super::*;

#[test]
#[allow(clippy::unwrap_used)]
fn garbage_collection_removes_only_unused_blobs_and_temporaries() {
    let t = tempfile::tempdir().unwrap();
    let sha = t.path().join("images/sha256");
    let keep_hex = "ab".repeat(32);
    let drop_hex = format!("ab{}", "c".repeat(62));
    let other = t.path().join("outside");
    std::fs::write(&other, b"not an image").unwrap();
    let ab = sha.join("ab");
    std::fs::create_dir_all(&ab).unwrap();
    std::fs::write(ab.join(&keep_hex), b"kept").unwrap();
    std::fs::write(ab.join(&drop_hex), b"unused").unwrap();
    std::fs::write(ab.join(format!(".{keep_hex}.peer.1.2.3")), b"part").unwrap();
    std::fs::write(ab.join("README"), b"not a digest").unwrap();
    // A link named like an unused digest, to a file outside.
    let link_hex = format!("ab{}", "d".repeat(62));
    std::os::unix::fs::symlink(&other, ab.join(&link_hex)).unwrap();
    // A linked directory is not entered.
    std::os::unix::fs::symlink(t.path(), sha.join("cd")).unwrap();
    let keep = BTreeSet::from([format!("sha256:{keep_hex}")]);

    // Start-up pass: temporaries only.
    let g = collect_garbage(&sha, &Pass::Temporaries);
    assert_eq!((g.blobs, g.temporaries), (0, 1));
    assert!(ab.join(&drop_hex).exists());
    let g = collect_garbage(&sha, &Pass::Unused(keep));
    assert_eq!(
        g,
        Garbage {
            blobs: 1,
            bytes: 6,
            temporaries: 0
        }
    );
    assert!(ab.join(&keep_hex).exists() && !ab.join(&drop_hex).exists());
    assert!(ab.join("README").exists());
    assert!(std::fs::symlink_metadata(ab.join(&link_hex)).is_ok());
    assert!(other.exists() && t.path().join("images").exists());
}

#[test]
fn routes_split_names_with_slashes() {
    let d = format!("sha256:{}", "a".repeat(64));
    assert_eq!(
        split_route(&format!("team/app/blobs/{d}")),
        Some(("team/app", "blobs", d.as_str()))
    );
    assert_eq!(
        split_route("library/nginx/manifests/1.25"),
        Some(("library/nginx", "manifests", "1.25"))
    );
    assert_eq!(split_route("x/blobs/notadigest"), None);
    assert_eq!(split_route("x/tags/list"), None);
    assert_eq!(split_route("x/blobs/uploads/"), None);
}
