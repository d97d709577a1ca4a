//! `.cairnignore` files (gitignore syntax) and the builder's built-in
//! skips.
//!
//! A `.cairnignore` in any directory of the commit applies to the files
//! below that directory, as `.gitignore` does: its patterns are relative
//! to its directory, a deeper file's patterns win over a shallower one's
//! (so `!keep.yaml` in a subdirectory re-includes), and a file inside an
//! ignored directory is ignored. The files are read from the commit's
//! tree, never from the work tree, so the bundle stays a function of the
//! commit. Matching uses the `ignore` crate's gitignore matcher (the one
//! ripgrep uses), so the syntax is Git's.
//!
//! **Architecture invariant:** pure — file contents in, decisions out.

use crate::{Error, Result};
use cairn_keys::text::escape_untrusted;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

/// The ignore file's name.
pub const FILE_NAME: &str = ".cairnignore";

/// Largest ignore file read (1 MiB).
pub const MAX_IGNORE_FILE_BYTES: u64 = 1 << 20;

/// The `.cairnignore` files of a commit, compiled.
#[derive(Debug, Default)]
pub struct CairnIgnore {
    /// (directory, matcher), shallowest first.
    matchers: Vec<(String, Gitignore)>,
}

impl CairnIgnore {
    /// Compiles ignore files given as (path in the tree, bytes). A bad
    /// pattern is an error naming the file and line.
    pub fn new(files: &[(String, Vec<u8>)]) -> Result<Self> {
        let mut matchers = Vec::new();
        for (path, bytes) in files {
            let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let text = std::str::from_utf8(bytes).map_err(|_| Error::Manifest {
                file: path.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            // Paths are matched relative to the file's directory.
            let mut b = GitignoreBuilder::new("");
            for (n, line) in text.lines().enumerate() {
                let line = line.strip_prefix('\u{feff}').unwrap_or(line);
                b.add_line(None, line).map_err(|e| Error::Manifest {
                    file: path.clone(),
                    reason: format!(
                        "line {}: bad pattern `{}`: {}",
                        n + 1,
                        escape_untrusted(line),
                        escape_untrusted(&e.to_string())
                    ),
                })?;
            }
            let g = b.build().map_err(|e| Error::Manifest {
                file: path.clone(),
                reason: escape_untrusted(&e.to_string()),
            })?;
            matchers.push((dir.to_owned(), g));
        }
        matchers.sort_by_key(|(d, _)| {
            if d.is_empty() {
                0
            } else {
                d.matches('/').count() + 1
            }
        });
        Ok(Self { matchers })
    }

    /// Whether no ignore file was found.
    pub fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }

    /// Whether the file at `path` (relative to the repository root) is
    /// ignored.
    pub fn is_ignored(&self, path: &str) -> bool {
        let mut ignored = false;
        for (dir, g) in &self.matchers {
            let rel = if dir.is_empty() {
                path
            } else {
                match path
                    .strip_prefix(dir.as_str())
                    .and_then(|r| r.strip_prefix('/'))
                {
                    Some(r) => r,
                    None => continue,
                }
            };
            match g.matched_path_or_any_parents(rel, false) {
                Match::Ignore(_) => ignored = true,
                Match::Whitelist(_) => ignored = false,
                Match::None => {}
            }
        }
        ignored
    }
}

/// The `.cairnignore` line (for the repository root's file) that excludes
/// exactly the file at `path`: anchored with `/`, gitignore's special
/// characters escaped.
pub fn pattern_for(path: &str) -> String {
    let mut out = String::from("/");
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '!' | '#' | ' ') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether a path has a hidden component (`.github/...`, `.codecov.yml`):
/// the builder skips those without being told.
pub fn is_hidden(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(files: &[(&str, &str)]) -> CairnIgnore {
        CairnIgnore::new(
            &files
                .iter()
                .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn gitignore_syntax_relative_to_the_file() {
        let i = ig(&[
            (
                ".cairnignore",
                "# comment\nfleet.yaml\n/docs/\n*.tmpl.yaml\n",
            ),
            ("apps/.cairnignore", "values/\n!keep.tmpl.yaml\n"),
        ]);
        assert!(i.is_ignored("fleet.yaml"));
        assert!(i.is_ignored("apps/x/fleet.yaml"));
        assert!(i.is_ignored("docs/a.yaml"));
        assert!(!i.is_ignored("apps/docs/a.yaml"));
        assert!(i.is_ignored("a/b.tmpl.yaml"));
        assert!(!i.is_ignored("apps/keep.tmpl.yaml"));
        assert!(i.is_ignored("apps/values/x.yaml"));
        assert!(!i.is_ignored("values/x.yaml"));
        assert!(!i.is_ignored("apps/deploy.yaml"));
    }

    #[test]
    fn bad_pattern_names_file_and_line() {
        let e = CairnIgnore::new(&[("sub/.cairnignore".into(), b"ok\n{unclosed\n".to_vec())])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("sub/.cairnignore: line 2: bad pattern"),
            "{e}"
        );
    }

    #[test]
    fn patterns_for_paths_match_exactly_that_file() {
        for p in ["fleet.yaml", "a b/[x]*.yaml", "!odd#name.yaml"] {
            let line = pattern_for(p);
            let i = ig(&[(".cairnignore", &line)]);
            assert!(i.is_ignored(p), "{p} via {line}");
            assert!(!i.is_ignored(&format!("sub/{p}")), "{p} anchored");
        }
        assert!(!ig(&[(".cairnignore", &pattern_for("a*.yaml"))]).is_ignored("ab.yaml"));
    }

    #[test]
    fn hidden_paths() {
        assert!(is_hidden(".github/workflows/ci.yaml"));
        assert!(is_hidden("a/.codecov.yml"));
        assert!(!is_hidden("a/b.yaml"));
    }
}
