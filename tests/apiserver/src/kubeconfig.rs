//! Kubeconfig files for clients of the test server.

use std::path::Path;

/// Renders a kubeconfig whose current context points at `url` (plain HTTP, no
/// credentials), with `default` as the namespace.
pub fn render(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cairn-test
  cluster:
    server: {url}
contexts:
- name: cairn-test
  context:
    cluster: cairn-test
    user: cairn-test
    namespace: default
current-context: cairn-test
users:
- name: cairn-test
  user: {{}}
preferences: {{}}
"
    )
}

/// Writes [`render`] to `path` (creating parent directories).
pub fn write(url: &str, path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, render(url))
}
