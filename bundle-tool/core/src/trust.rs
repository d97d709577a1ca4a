//! Which trust root to use: a verified chain of roots, started from a root
//! the operator trusts (the embedded root, or root files named with
//! `--root`) and continued with the newer roots a repository or archive
//! carries.
//!
//! **Architecture invariant:** pure — bytes in, verified roots out.

use crate::{Error, Result};
use cairn_keys::VerifiedRoot;

/// A verified chain of consecutive root versions, oldest first.
#[derive(Clone, Debug)]
pub struct TrustChain {
    roots: Vec<VerifiedRoot>,
}

impl TrustChain {
    /// Starts from the root embedded in this binary.
    pub fn embedded() -> Result<Self> {
        Ok(Self {
            roots: vec![cairn_keys::embedded::root()?],
        })
    }

    /// Starts from root files given in order (`names` are used in
    /// messages): the first is trusted because the operator chose it and
    /// must carry a threshold of its own root keys' signatures; each next
    /// one must be its successor.
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Result<Self> {
        let Some(((name, first), rest)) = files.split_first() else {
            return Err(Error::Repository("no root files given".into()));
        };
        let wrap = |name: &str, e: cairn_keys::Error| Error::Repository(format!("{name}: {e}"));
        let mut roots = vec![VerifiedRoot::verify_initial(first).map_err(|e| wrap(name, e))?];
        for (name, bytes) in rest {
            let next = roots[roots.len() - 1]
                .verify_next(bytes)
                .map_err(|e| wrap(name, e))?;
            roots.push(next);
        }
        Ok(Self { roots })
    }

    /// Continues the chain with `(version, bytes)` roots from a repository
    /// or archive (`origin` names it in messages). Versions the chain
    /// already holds must be byte-identical; versions older than the
    /// chain's start are ignored; newer ones must follow without gaps.
    pub fn extend(&mut self, origin: &str, roots: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut sorted: Vec<&(u64, Vec<u8>)> = roots.iter().collect();
        sorted.sort_by_key(|(v, _)| *v);
        let first = self.roots[0].root().version;
        for (v, bytes) in sorted {
            let last = self.current().root().version;
            if *v < first {
                continue;
            }
            if *v <= last {
                let have = &self.roots[(*v - first) as usize];
                if have.bytes() != *bytes {
                    return Err(Error::Repository(format!(
                        "{origin}: roots/{v} differs from the trusted root v{v}; this repository belongs to another trust root (pass the right --root files)"
                    )));
                }
                continue;
            }
            let next = self.current().verify_next(bytes).map_err(|e| {
                Error::Repository(format!(
                    "{origin}: roots/{v} does not continue the trusted chain: {e}"
                ))
            })?;
            self.roots.push(next);
        }
        Ok(())
    }

    /// The newest root.
    pub fn current(&self) -> &VerifiedRoot {
        &self.roots[self.roots.len() - 1]
    }

    /// Every root of the chain, oldest first.
    pub fn roots(&self) -> &[VerifiedRoot] {
        &self.roots
    }
}
