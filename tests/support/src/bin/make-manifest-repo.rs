//! `make-manifest-repo DEST [--apps N] [--configmap-kb K] [--commits C] [--kustomize]`
//!
//! Creates a deterministic Git repository of Kubernetes manifests (see
//! `cairn_test_support::fixture`) and prints the head commit id.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use cairn_test_support::{add_kustomize_overlay, make_manifest_repo, FixtureOptions};
use std::path::PathBuf;

const USAGE: &str =
    "usage: make-manifest-repo DEST [--apps N] [--configmap-kb K] [--commits C] [--kustomize]";

fn main() {
    match run() {
        Ok(head) => println!("{head}"),
        Err(e) => {
            eprintln!("make-manifest-repo: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    let mut dest: Option<PathBuf> = None;
    let mut opts = FixtureOptions::default();
    let mut kustomize = false;
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> anyhow::Result<usize> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value\n{USAGE}"))?;
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name}: `{v}` is not a number"))
        };
        match a.as_str() {
            "--apps" => opts.apps = num("--apps")?,
            "--configmap-kb" => opts.configmap_kb = num("--configmap-kb")?,
            "--commits" => opts.commits = num("--commits")?,
            "--kustomize" => kustomize = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => anyhow::bail!("unknown option {s}\n{USAGE}"),
            _ if dest.is_none() => dest = Some(PathBuf::from(a)),
            _ => anyhow::bail!("unexpected argument {a}\n{USAGE}"),
        }
    }
    let dest = dest.ok_or_else(|| anyhow::anyhow!("missing DEST\n{USAGE}"))?;
    let mut head = make_manifest_repo(&dest, &opts)?;
    if kustomize {
        head = add_kustomize_overlay(&dest)?;
    }
    Ok(head)
}
