//! `cairn bundle`: build bundles from Git, inspect and compare them.

use crate::build::{build, default_source_name, BuildOptions};
use crate::bundle::{read_bundle_file, Entry, Manifest};
use crate::diff::diff;
use crate::export::{DEFAULT_MAX_EXPORT_BYTES, DEFAULT_MAX_EXPORT_FILES};
use crate::limits::Limits;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Build a bundle from a Git commit (read with gix: no checkout) and
    /// print its id.
    Build {
        /// The Git repository (work tree or bare).
        #[arg(long = "git", value_name = "REPO")]
        git: PathBuf,
        /// Branch, tag or commit id to build [default: HEAD].
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
        /// Directory inside the repository to bundle [default: the whole tree].
        #[arg(long, value_name = "DIR", default_value = "")]
        path: String,
        /// Write the bundle file here.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Build even if no Kubernetes objects are found.
        #[arg(long)]
        allow_empty: bool,
        /// Bundle format: 2 (chunked manifest: a one-object change moves
        /// one small chunk) or 1 (one manifest document), for agents that
        /// do not read format 2 yet.
        #[arg(long, value_name = "N", default_value_t = crate::bundle::BUNDLE_FORMAT,
              value_parser = clap::value_parser!(u32).range(1..=2))]
        format: u32,
        /// Name recorded as the bundle's source repository (part of the
        /// bundle id) [default: none, so the id does not depend on the
        /// folder the repository is checked out in].
        #[arg(long, value_name = "NAME")]
        source_name: Option<String>,
        /// kubectl program used to render Kustomize directories.
        #[arg(
            long,
            value_name = "PROGRAM",
            env = "CAIRN_KUBECTL",
            default_value = "kubectl"
        )]
        kubectl: String,
        /// Allow kustomizations to reference remote resources (URLs,
        /// `git@...`, `github.com/...`). Off by default: a bundle must be a
        /// function of its commit, and a remote resource can change under it.
        #[arg(long)]
        allow_remote: bool,
        /// Most bytes the Kustomize export may write to the temporary folder
        /// handed to `kubectl kustomize`.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_EXPORT_BYTES)]
        max_export_bytes: u64,
        /// Most files the Kustomize export may write.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_EXPORT_FILES)]
        max_export_files: usize,
        /// How Helm charts are rendered.
        #[command(flatten)]
        helm: Box<HelmArgs>,
        /// Container images of the workloads (docs/IMAGES.md).
        #[command(flatten)]
        images: Box<ImageArgs>,
    },
    /// Show a bundle file's source, id, objects and images (the file and
    /// the image list are verified).
    Inspect {
        /// The bundle file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The bundle's image store [default: FILE.images], or a
        /// repository directory holding its images.
        #[arg(long, value_name = "DIR")]
        image_store: Option<PathBuf>,
    },
    /// Compare two bundle files: objects added, removed and changed.
    Diff {
        /// The older bundle file.
        old: PathBuf,
        /// The newer bundle file.
        new: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `cairn bundle build`'s image options.
#[derive(Debug, clap::Args)]
pub(super) struct ImageArgs {
    /// Carry the images the workloads reference, read from FROM: an OCI
    /// image layout directory, or a registry `oci://HOST[:PORT]` (HTTPS)
    /// where each image is looked up by its repository path.
    #[arg(long = "images", value_name = "FROM")]
    pub from: Option<String>,
    /// Platforms to carry (`os/arch[/variant]`); repeatable [default: the
    /// build machine's].
    #[arg(long = "platform", value_name = "OS/ARCH", value_parser = crate::images::parse_platform)]
    pub platforms: Vec<String>,
    /// Rewrite image tags to `name@sha256:…` in the built objects.
    #[arg(long, requires = "from")]
    pub pin_digests: bool,
    /// Where image blobs are written (repository layout) [default: FILE.images].
    #[arg(long, value_name = "DIR", requires = "from")]
    pub image_store: Option<PathBuf>,
    /// Largest single image blob.
    #[arg(long, value_name = "BYTES", default_value_t = cairn_core::images::DEFAULT_MAX_BLOB_BYTES)]
    pub max_image_blob_bytes: u64,
    /// Largest sum of the bundle's distinct image blobs.
    #[arg(long, value_name = "BYTES", default_value_t = cairn_core::images::DEFAULT_MAX_TOTAL_BYTES)]
    pub max_images_bytes: u64,
    /// CA bundle (PEM) for the `--images` registry.
    #[arg(long = "images-ca-file", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Credentials file for the `--images` registry (docs/REGISTRY.md).
    #[arg(long = "images-credentials-file", value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
}

/// `cairn bundle build`'s Helm options (boxed: they would make every
/// other subcommand as large as `build`).
#[derive(Debug, clap::Args)]
pub(super) struct HelmArgs {
    /// Helm program used to render charts and Kustomize `helmCharts`.
    #[arg(
        long,
        value_name = "PROGRAM",
        env = "CAIRN_HELM",
        default_value = "helm"
    )]
    pub helm: String,
    /// A values file from this machine for the chart in CHART_DIR (a
    /// tree path), applied after the chart's cairn-helm.yaml values
    /// files; repeatable. Its digest is part of the bundle id.
    #[arg(long = "helm-values", value_name = "CHART_DIR=FILE", value_parser = crate::helm::parse_values_arg)]
    pub helm_values: Vec<(String, PathBuf)>,
    /// Kubernetes version Helm charts see as `.Capabilities.KubeVersion`
    /// (helm template --kube-version) unless a chart's cairn-helm.yaml
    /// sets `kubeVersion`.
    #[arg(long, value_name = "VERSION")]
    pub kube_version: Option<String>,
    /// API versions Helm charts see in `.Capabilities.APIVersions`
    /// besides the built-in ones (helm template --api-versions), for
    /// every chart; repeatable.
    #[arg(long = "api-versions", value_name = "GROUP/VERSION[/KIND]")]
    pub api_versions: Vec<String>,
    /// Longest one `helm template` may run (seconds) before it is stopped.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::helm::DEFAULT_HELM_TIMEOUT.as_secs())]
    pub helm_timeout: u64,
}

pub(super) fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Build {
            git,
            reference,
            path,
            out,
            allow_empty,
            format,
            source_name,
            kubectl,
            allow_remote,
            max_export_bytes,
            max_export_files,
            helm,
            images,
        } => {
            let mut opts = BuildOptions::new(&git);
            opts.reference = reference;
            opts.path = path;
            opts.allow_empty = allow_empty;
            opts.format = format;
            opts.source_name = source_name.unwrap_or_default();
            opts.kubectl = kubectl.into();
            opts.progress = std::io::stderr().is_terminal();
            opts.export.allow_remote = allow_remote;
            opts.export.max_bytes = max_export_bytes;
            opts.export.max_files = max_export_files;
            let HelmArgs {
                helm,
                helm_values,
                kube_version,
                api_versions,
                helm_timeout,
            } = *helm;
            opts.helm.helm = helm.into();
            opts.helm.values = helm_values;
            opts.helm.kube_version = kube_version;
            opts.helm.api_versions = api_versions;
            opts.helm.timeout = std::time::Duration::from_secs(helm_timeout);
            let mut built = build(&opts)?;
            if let Some(from) = &images.from {
                let settings = cairn_oci::NetSettings {
                    ca_file: images.ca_file.clone(),
                    credentials_file: images.credentials_file.clone(),
                    ..Default::default()
                };
                let platforms = if images.platforms.is_empty() {
                    vec![crate::images::default_platform()]
                } else {
                    images.platforms.clone()
                };
                let iopts = crate::images::ImageOptions {
                    from: crate::images::ImagesFrom::parse(from, settings)?,
                    platforms,
                    pin_digests: images.pin_digests,
                    max_blob_bytes: images.max_image_blob_bytes,
                    max_total_bytes: images.max_images_bytes,
                    store: images
                        .image_store
                        .clone()
                        .unwrap_or_else(|| crate::images::default_store(&out)),
                };
                let s = crate::images::add_images(&mut built, &iopts, &opts.limits)?;
                eprintln!(
                    "images: {} image(s), {} blob(s), {} bytes ({} copied) in {}",
                    s.images,
                    s.blobs,
                    s.bytes,
                    s.copied,
                    iopts.store.display()
                );
            }
            for w in &built.warnings {
                eprintln!("warning: {w}");
            }
            let id = built.write_file(&out)?;
            let m = &built.manifest;
            eprintln!(
                "built {} object(s), {} bytes, from {} commit {}{} into {}",
                m.entries.len(),
                m.total_size(),
                if m.source.repository.is_empty() {
                    default_source_name(&git)
                } else {
                    m.source.repository.clone()
                },
                m.source.commit,
                if m.source.path.is_empty() {
                    String::new()
                } else {
                    format!(" path {}", m.source.path)
                },
                out.display()
            );
            println!("{id}");
        }
        BundleCommand::Inspect {
            file,
            json,
            image_store,
        } => {
            let m = read(&file)?;
            let store = image_store.unwrap_or_else(|| crate::images::default_store(&file));
            let images = crate::images::read_list(&m, &store)?;
            let image_rows: Vec<serde_json::Value> = images
                .iter()
                .flat_map(|l| l.images.iter())
                .map(|i| {
                    serde_json::json!({
                        "reference": i.reference,
                        "name": i.full_name(),
                        "tag": i.tag,
                        "platform": i.platform,
                        "digest": i.resolved_digest(),
                        "manifest": i.manifest.digest,
                        "bytes": i.all_blobs().map(|b| b.size).sum::<u64>(),
                        "blobs": i.all_blobs().count(),
                    })
                })
                .collect();
            if json {
                let v = serde_json::json!({
                    "id": m.id(),
                    "format": m.format,
                    "source": m.source,
                    "objects": m.entries.len(),
                    "bytes": m.total_size(),
                    "entries": m.entries,
                    "image_list": m.images,
                    "images": image_rows,
                    "image_bytes": images.as_ref().map(|l| l.total_bytes()),
                });
                println!("{v}");
            } else {
                println!("bundle  {}", m.id());
                println!("format  {}", m.format);
                println!("source  {} commit {}", m.source.repository, m.source.commit);
                println!(
                    "path    {}",
                    if m.source.path.is_empty() {
                        "(whole tree)"
                    } else {
                        &m.source.path
                    }
                );
                println!("objects {} ({} bytes)", m.entries.len(), m.total_size());
                let w = m
                    .entries
                    .iter()
                    .map(|e| e.kind.len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                let nw = m
                    .entries
                    .iter()
                    .map(|e| name(e).len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                println!("{:<w$}  {:<nw$}  {:>8}  SOURCE", "KIND", "NAME", "SIZE");
                for e in &m.entries {
                    println!(
                        "{:<w$}  {:<nw$}  {:>8}  {}#{}",
                        e.kind,
                        name(e),
                        e.size,
                        e.path,
                        e.document
                    );
                }
                if let Some(l) = &images {
                    println!(
                        "images  {} ({} distinct blobs, {} bytes)",
                        l.images.len(),
                        l.distinct_blobs().len(),
                        l.total_bytes()
                    );
                    println!(
                        "{:<60}  {:<14}  {:>12}  DIGEST",
                        "IMAGE", "PLATFORM", "SIZE"
                    );
                    for i in &l.images {
                        println!(
                            "{:<60}  {:<14}  {:>12}  {}",
                            cairn_keys::text::escape_untrusted(&i.reference),
                            i.platform,
                            i.all_blobs().map(|b| b.size).sum::<u64>(),
                            i.resolved_digest()
                        );
                    }
                }
            }
        }
        BundleCommand::Diff { old, new, json } => {
            let (a, b) = (read(&old)?, read(&new)?);
            let d = diff(&a, &b);
            if json {
                let changed: Vec<_> = d
                    .changed
                    .iter()
                    .map(|c| serde_json::json!({"old": c.old, "new": c.new}))
                    .collect();
                let v = serde_json::json!({
                    "old": a.id(),
                    "new": b.id(),
                    "added": d.added,
                    "removed": d.removed,
                    "changed": changed,
                    "unchanged": d.unchanged,
                });
                println!("{v}");
            } else {
                println!(
                    "old {} ({} commit {})",
                    a.id(),
                    a.source.repository,
                    a.source.commit
                );
                println!(
                    "new {} ({} commit {})",
                    b.id(),
                    b.source.repository,
                    b.source.commit
                );
                for e in &d.added {
                    println!(
                        "+ {}  {} ({}#{})",
                        e.display_name(),
                        short(&e.object),
                        e.path,
                        e.document
                    );
                }
                for e in &d.removed {
                    println!(
                        "- {}  {} ({}#{})",
                        e.display_name(),
                        short(&e.object),
                        e.path,
                        e.document
                    );
                }
                for c in &d.changed {
                    println!(
                        "~ {}  {} -> {}, {} -> {} bytes ({}#{})",
                        c.new.display_name(),
                        short(&c.old.object),
                        short(&c.new.object),
                        c.old.size,
                        c.new.size,
                        c.new.path,
                        c.new.document
                    );
                }
                println!(
                    "{} added, {} removed, {} changed, {} unchanged",
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    d.unchanged
                );
            }
        }
    }
    Ok(())
}

fn name(e: &Entry) -> String {
    if e.namespace.is_empty() {
        e.name.clone()
    } else {
        format!("{}/{}", e.namespace, e.name)
    }
}

/// `sha256:0123456789ab` — enough to tell objects apart on screen.
fn short(address: &str) -> &str {
    address.get(..19).unwrap_or(address)
}

fn read(file: &Path) -> Result<Manifest> {
    read_bundle_file(file, &Limits::default(), |_, _| Ok(()))
        .with_context(|| format!("reading bundle {}", file.display()))
}
