//! The bundle repository layout: where roots, channel heads and objects
//! live, relative to a repository's root (a directory, an HTTP base URL or
//! a mesh item). Pure: paths are computed, never opened.

use crate::ids::Address;

/// `roots/<version>`.
pub fn root_path(version: u64) -> String {
    format!("roots/{version}")
}

/// `channels/<channel>`.
pub fn channel_path(channel: &str) -> String {
    format!("channels/{channel}")
}

/// `objects/sha256/<2 hex>/<hex>` for an address (only a well-formed
/// address can be an [`Address`], so every one has a path).
pub fn object_path(address: &Address) -> String {
    let hex = address.hex();
    format!("objects/sha256/{}/{}", &hex[..2], hex)
}

/// [`object_path`] for an address still held as a string (untrusted input,
/// file names): `None` for a malformed address, which must never become a
/// path.
pub fn object_path_str(address: &str) -> Option<String> {
    Address::parse(address).ok().map(|a| object_path(&a))
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
            object_path_str(&a).as_deref(),
            Some(format!("objects/sha256/ab/{}", "ab".repeat(32)).as_str())
        );
        let typed = Address::parse(&a).unwrap();
        assert_eq!(
            object_path(&typed),
            format!("objects/sha256/ab/{}", "ab".repeat(32))
        );
        assert_eq!(object_path_str("sha256:../../etc/passwd"), None);
        assert_eq!(object_path_str(&a.to_uppercase()), None);
    }
}
