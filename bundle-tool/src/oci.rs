//! `cairn push` and `cairn pull`: a channel of a bundle repository to and
//! from an OCI registry. The artifact layout and the distribution client
//! live in the `cairn-oci` crate (shared with the agent's `oci://`
//! source) and are re-exported here.

pub use cairn_oci::*;
use std::collections::BTreeMap;
use std::path::Path;

/// What `cairn push` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushSummary {
    /// The channel's release sequence now tagged.
    pub sequence: u64,
    /// Blobs uploaded (absent before).
    pub blobs_uploaded: usize,
    /// Bytes of those blobs.
    pub bytes_uploaded: u64,
    /// Blobs the registry already had.
    pub blobs_present: usize,
    /// Manifests written (roots, chunks, release, index).
    pub manifests_written: usize,
}

/// Pushes `channel` of `repo` to the registry: verified first (against
/// `chain`, already extended with the repository's roots), then blobs
/// (HEAD first; only missing ones uploaded), then the roots manifest,
/// object chunks, the release manifest and last the channel's index tag.
/// Refuses to move a tag to an older release and to replace a longer
/// root chain.
pub async fn push(
    client: &Client,
    repo: &crate::repo::RepoDir,
    chain: &crate::trust::TrustChain,
    channel: &str,
    now: u64,
    limits: &crate::limits::Limits,
) -> anyhow::Result<PushSummary> {
    use anyhow::Context;
    use futures::StreamExt;
    crate::release::validate_channel(channel).map_err(anyhow::Error::msg)?;
    let check = crate::check::ChannelCheck {
        repo,
        fallback: None,
        root: chain.current().root(),
        now,
        limits,
        threads: 2,
    };
    let v = check.verify(channel).with_context(|| {
        format!(
            "channel `{channel}` of {} does not verify",
            repo.path().display()
        )
    })?;
    // The image blobs too, as `cairn verify` checks them.
    if let Some(images) = &v.images {
        let problems = check.check_image_blobs(images);
        if !problems.is_empty() {
            return Err(anyhow::Error::from(crate::Error::Objects { problems })).with_context(
                || {
                    format!(
                        "channel `{channel}` of {} does not verify",
                        repo.path().display()
                    )
                },
            );
        }
    }
    let sequence = v.release.release().sequence;
    let target = client.reference().to_string();

    // Never move a tag backwards, never shorten the root chain.
    if let Some(remote) = client
        .channel_release(channel, limits.max_release_bytes)
        .await
        .with_context(|| format!("reading {target}:{channel}"))?
    {
        if let Ok((_, r)) =
            crate::release::Release::decode_envelope(&remote.envelope, limits.max_release_bytes)
        {
            if r.channel == channel && r.sequence > sequence {
                anyhow::bail!(
                    "{target}:{channel} holds release {}, newer than {}'s {sequence}; refusing \
                     to move the tag back (pull first)",
                    r.sequence,
                    repo.path().display()
                );
            }
        }
    }
    let remote_roots = client
        .roots()
        .await
        .with_context(|| format!("reading {target}:{ROOTS_TAG}"))?;
    let newest = chain.current().root().version;
    if let Some((&rv, _)) = remote_roots.iter().next_back() {
        if rv > newest {
            anyhow::bail!(
                "{target} lists root v{rv}, newer than this repository's v{newest}; refusing to \
                 replace its root chain (pull first)"
            );
        }
    }

    // Blobs: the empty config, roots, the release, every object.
    let mut blobs: Vec<(String, BlobSource)> = vec![
        (
            cairn_keys::sha256_address(EMPTY_CONFIG),
            BlobSource::Bytes(EMPTY_CONFIG.to_vec()),
        ),
        (
            cairn_keys::sha256_address(v.release.bytes()),
            BlobSource::Bytes(v.release.bytes().to_vec()),
        ),
    ];
    let mut root_layers = Vec::new();
    for r in chain.roots() {
        let mut d = Descriptor::of(MT_ROOT, r.bytes());
        d.annotations
            .insert(ANN_ROOT_VERSION.into(), r.root().version.to_string());
        blobs.push((d.digest.clone(), BlobSource::Bytes(r.bytes().to_vec())));
        root_layers.push(d);
    }
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    sizes.insert(v.release.release().bundle.to_string(), v.manifest_size);
    sizes.extend(v.chunks.iter().cloned());
    for e in &v.manifest.entries {
        sizes.insert(e.object.to_string(), e.size);
    }
    for a in &v.objects {
        blobs.push((a.clone(), BlobSource::Object(a.clone())));
    }
    // Image blobs: streamed from the repository file (never in memory),
    // referenced by the object chunk manifests like objects.
    let mut image_blobs = Vec::new();
    if let Some(images) = &v.images {
        sizes.insert(images.address.to_string(), images.size);
        for (b, _) in images.blobs() {
            let d = b.digest.to_string();
            if sizes.insert(d.clone(), b.size).is_none() {
                image_blobs.push(d.clone());
                let path = repo
                    .path()
                    .join(crate::repo::object_path_str(&d).unwrap_or_default());
                blobs.push((d, BlobSource::File(path, b.size)));
            }
        }
    }
    let mut unique = std::collections::BTreeSet::new();
    blobs.retain(|(d, _)| unique.insert(d.clone()));

    let object_limit = limits.max_object_bytes.max(limits.max_manifest_bytes);
    let results: Vec<anyhow::Result<Option<u64>>> = futures::stream::iter(blobs)
        .map(|(digest, src)| async move {
            if client.has_blob(&digest).await? {
                return Ok(None);
            }
            let bytes = match src {
                BlobSource::Bytes(b) => b,
                BlobSource::File(path, size) => {
                    client.put_blob_file(&path, &digest, size).await?;
                    return Ok(Some(size));
                }
                BlobSource::Object(a) => {
                    let repo = repo.clone();
                    tokio::task::spawn_blocking(move || repo.get_object(&a, object_limit))
                        .await??
                        .ok_or_else(|| {
                            anyhow::anyhow!("object {digest} vanished from the repository")
                        })?
                }
            };
            let n = bytes.len() as u64;
            client.put_blob(bytes).await?;
            Ok(Some(n))
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut summary = PushSummary {
        sequence,
        ..Default::default()
    };
    for r in results {
        match r.with_context(|| format!("uploading to {target}"))? {
            Some(n) => {
                summary.blobs_uploaded += 1;
                summary.bytes_uploaded += n;
            }
            None => summary.blobs_present += 1,
        }
    }

    // Manifests, the channel tag last.
    let roots_manifest = artifact_manifest(AT_ROOTS, root_layers, BTreeMap::new());
    let current_roots = client.get_manifest(ROOTS_TAG, MAX_MANIFEST_BYTES).await?;
    if current_roots.as_deref() != Some(roots_manifest.as_slice()) {
        client
            .put_manifest(ROOTS_TAG, MT_MANIFEST, roots_manifest)
            .await?;
        summary.manifests_written += 1;
    }
    let objects: Vec<(String, u64)> = v
        .objects
        .iter()
        .chain(image_blobs.iter())
        .map(|a| (a.clone(), sizes.get(a).copied().unwrap_or(0)))
        .collect();
    let mut index_entries = Vec::new();
    let mut ann = BTreeMap::new();
    ann.insert(ANN_CHANNEL.to_owned(), channel.to_owned());
    ann.insert(ANN_SEQUENCE.to_owned(), sequence.to_string());
    ann.insert(
        ANN_BUNDLE.to_owned(),
        v.release.release().bundle.to_string(),
    );
    let release_manifest = artifact_manifest(
        AT_RELEASE,
        vec![
            Descriptor::of(MT_RELEASE, v.release.bytes()),
            Descriptor {
                media_type: MT_BUNDLE.into(),
                digest: v.release.release().bundle.to_string(),
                size: sizes
                    .get(v.release.release().bundle.as_str())
                    .copied()
                    .unwrap_or(0),
                artifact_type: None,
                annotations: BTreeMap::new(),
            },
        ],
        ann.clone(),
    );
    let mut manifests = vec![(AT_RELEASE, release_manifest)];
    manifests.extend(object_chunks(&objects).into_iter().map(|m| (AT_OBJECTS, m)));
    for (at, m) in manifests {
        let mut d = Descriptor::of(MT_MANIFEST, &m);
        d.artifact_type = Some(at.to_owned());
        if !client.has_manifest(&d.digest).await? {
            client.put_manifest(&d.digest, MT_MANIFEST, m).await?;
            summary.manifests_written += 1;
        }
        index_entries.push(d);
    }
    client
        .put_manifest(channel, MT_INDEX, release_index(index_entries, ann))
        .await?;
    summary.manifests_written += 1;
    Ok(summary)
}

enum BlobSource {
    Bytes(Vec<u8>),
    Object(String),
    /// An image blob: its repository file and size.
    File(std::path::PathBuf, u64),
}

/// Pulls `channel` from the registry into `repo`: roots, the release and
/// the objects `repo` lacks are fetched (each checked against its digest)
/// into a staging area and imported exactly like `cairn import` (the whole
/// chain, release and every object verified before anything is written;
/// an older release than the repository's is refused as a rollback).
pub async fn pull(
    client: &Client,
    repo: &crate::repo::RepoDir,
    start: crate::trust::TrustChain,
    channel: &str,
    now: u64,
    limits: &crate::limits::Limits,
) -> anyhow::Result<crate::archive::ImportSummary> {
    use anyhow::Context;
    crate::release::validate_channel(channel).map_err(anyhow::Error::msg)?;
    let target = client.reference().to_string();
    let mut roots = Vec::new();
    for (v, d) in client.roots().await? {
        let max = cairn_keys::root::MAX_ROOT_BYTES as u64;
        if d.size > max {
            anyhow::bail!("{target}: root v{v} is larger than {max} bytes");
        }
        let b = client
            .get_blob(&d.digest, max)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{target}: root v{v} ({}) missing", d.digest))?;
        roots.push((v, b));
    }
    let release = client
        .channel_release(channel, limits.max_release_bytes)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{target}: no tag `{channel}`"))?;
    // Verify the release before fetching what it names.
    let mut chain = start.clone();
    chain.extend(&target, &roots)?;
    chain.extend(&repo.path().display().to_string(), &repo.roots()?)?;
    let verified = crate::verify::ReleaseCheck {
        root: chain.current().root(),
        channel,
        last_sequence: None,
        now,
        limits,
    }
    .verify(&release.envelope)
    .with_context(|| format!("{target}:{channel}: the release does not verify"))?;
    let bundle = verified.release().bundle.clone();

    let staging = tempfile::Builder::new().prefix("cairn-pull-").tempdir()?;
    let stage = crate::repo::RepoDir::new(staging.path());
    let manifest_bytes = match repo.get_object(&bundle, limits.max_manifest_bytes)? {
        Some(b) => b,
        None => {
            let b = client
                .get_blob(&bundle, limits.max_manifest_bytes)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{target}: bundle manifest {bundle} missing"))?;
            stage.put_object(&bundle, &b)?;
            b
        }
    };
    // Format 2: the manifest chunks, from the repository or the registry
    // (staged like objects), each checked as it is added.
    let manifest = match crate::bundle::Head::decode(&manifest_bytes, Some(&bundle), limits)? {
        crate::bundle::Head::Whole(m) => m,
        crate::bundle::Head::Chunked(top) => {
            let mut a = crate::bundle::Assembly::new(top);
            for (address, size) in a.missing() {
                let b = match repo.get_object(&address, size)? {
                    Some(b) => b,
                    None => {
                        let b = client.get_blob(&address, size).await?.ok_or_else(|| {
                            anyhow::anyhow!("{target}: bundle manifest chunk {address} missing")
                        })?;
                        stage.put_object(&address, &b)?;
                        b
                    }
                };
                a.add(&address, &b, limits)?;
            }
            a.finish(limits)?
        }
    };
    let mut wanted = std::collections::BTreeSet::new();
    for e in &manifest.entries {
        if !repo.has_object(&e.object)
            && wanted.insert(e.object.clone())
            && e.size > limits.max_object_bytes
        {
            anyhow::bail!("{target}: object {} is larger than the limit", e.object);
        }
    }
    for a in &wanted {
        let b = client
            .get_blob(a, limits.max_object_bytes)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{target}: object {a} missing"))?;
        stage.put_object(a, &b)?;
    }
    // Images: the list (an object), then every blob the repository lacks,
    // streamed into a temporary directory inside the repository and
    // hashed while written; `import` checks them against the verified
    // list and moves them into place.
    let repo_existed = repo.path().exists();
    let result = pull_images(client, repo, &stage, &manifest, &target).await;
    let (blob_dir, prestaged) = match result {
        Ok(x) => x,
        Err(e) => {
            if !repo_existed {
                let _ = std::fs::remove_dir(repo.path());
            }
            return Err(e);
        }
    };
    for (v, b) in &roots {
        stage.write(&crate::repo::root_path(*v), b)?;
    }
    stage.write(&crate::repo::channel_path(channel), &release.envelope)?;
    // The staged repository as an export archive, then `import`.
    let tar_path = staging.path().join("pull.tar");
    write_layout_tar(staging.path(), &tar_path)?;
    let r = crate::archive::import_with_blobs(&tar_path, repo, start, now, limits, &prestaged);
    drop(blob_dir);
    if r.is_err() && !repo_existed {
        let _ = std::fs::remove_dir(repo.path());
    }
    Ok(r?)
}

/// The bundle's image list (staged as an object) and the image blobs
/// `repo` lacks, downloaded into a temporary directory inside `repo`
/// (hashed while written): the directory and digest → file.
async fn pull_images(
    client: &Client,
    repo: &crate::repo::RepoDir,
    stage: &crate::repo::RepoDir,
    manifest: &crate::bundle::Manifest,
    target: &str,
) -> anyhow::Result<(
    Option<tempfile::TempDir>,
    BTreeMap<String, std::path::PathBuf>,
)> {
    use cairn_core::images::{
        ImageList, DEFAULT_MAX_BLOB_BYTES, DEFAULT_MAX_TOTAL_BYTES, MAX_LIST_BYTES,
    };
    let mut prestaged = BTreeMap::new();
    let Some(addr) = cairn_core::images::list_address(manifest) else {
        return Ok((None, prestaged));
    };
    let bytes = match repo.get_object(addr.as_str(), MAX_LIST_BYTES)? {
        Some(b) => b,
        None => {
            let b = client
                .get_blob(addr.as_str(), MAX_LIST_BYTES)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{target}: image list {addr} missing"))?;
            stage.put_object(addr.as_str(), &b)?;
            b
        }
    };
    let list = ImageList::decode(
        &bytes,
        addr,
        DEFAULT_MAX_BLOB_BYTES,
        DEFAULT_MAX_TOTAL_BYTES,
    )
    .map_err(|e| anyhow::anyhow!("{target}: image list {addr}: {e}"))?;
    let mut dir: Option<tempfile::TempDir> = None;
    for b in list.distinct_blobs() {
        let d = b.digest.as_str();
        if repo.has_object(d) {
            continue;
        }
        let path = match &dir {
            Some(t) => t.path().to_path_buf(),
            None => {
                std::fs::create_dir_all(repo.path())?;
                let t = tempfile::Builder::new()
                    .prefix(".cairn-pull-")
                    .tempdir_in(repo.path())?;
                dir.insert(t).path().to_path_buf()
            }
        };
        let dest = path.join(d.trim_start_matches("sha256:"));
        let what = format!("{target}: image blob {d}");
        let resp = client
            .blob_response(d)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{what}: not in the registry"))?;
        let n = cairn_oci::blobfile::download_verified(resp, d, b.size, &dest, &what).await?;
        if n != b.size {
            anyhow::bail!("{what}: {n} bytes, the image list says {}", b.size);
        }
        prestaged.insert(d.to_owned(), dest);
    }
    Ok((dir, prestaged))
}

/// Writes the repository files under `dir` (roots, objects, channels, in
/// that order) as an archive in the export format.
fn write_layout_tar(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut paths = Vec::new();
    for top in ["roots", "objects", "channels"] {
        let mut found = Vec::new();
        collect_files(&dir.join(top), top, &mut found)?;
        found.sort();
        paths.extend(found);
    }
    for rel in paths {
        let data = std::fs::read(dir.join(&rel))?;
        let mut h = tar::Header::new_ustar();
        h.set_path(&rel)?;
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, data.as_slice())?;
    }
    use std::io::Write;
    tar.into_inner()?.flush()?;
    Ok(())
}

fn collect_files(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let r = format!("{rel}/{name}");
        if e.file_type()?.is_dir() {
            collect_files(&e.path(), &r, out)?;
        } else {
            out.push(r);
        }
    }
    Ok(())
}
