//! The bundle repository layout: where roots, channel heads and objects
//! live, relative to a repository's root (a directory, an HTTP base URL or
//! a mesh item). Pure: paths are computed, never opened.

use crate::bundle::is_address;

/// `roots/<version>`.
pub fn root_path(version: u64) -> String {
    format!("roots/{version}")
}

/// `channels/<channel>`.
pub fn channel_path(channel: &str) -> String {
    format!("channels/{channel}")
}

/// `objects/sha256/<2 hex>/<hex>` for a `sha256:<hex>` address, or `None`
/// for a malformed address (which must never become a path).
pub fn object_path(address: &str) -> Option<String> {
    if !is_address(address) {
        return None;
    }
    let hex = &address[7..];
    Some(format!("objects/sha256/{}/{}", &hex[..2], hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(root_path(3), "roots/3");
        assert_eq!(channel_path("prod"), "channels/prod");
        let a = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            object_path(&a).as_deref(),
            Some(format!("objects/sha256/ab/{}", "ab".repeat(32)).as_str())
        );
        assert_eq!(object_path("sha256:../../etc/passwd"), None);
    }
}
