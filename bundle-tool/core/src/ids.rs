//! Typed ids: content addresses, bundle ids, channel names and agent ids.
//!
//! Each is a validated string. They serialize exactly as the bare string
//! they wrap (`#[serde(transparent)]`), so signed CBOR bytes (releases,
//! manifests) are the same as when the fields were `String`; deserializing
//! validates, so a malformed id in a document is refused while decoding.
//!
//! * [`Address`]: `sha256:<64 lower-case hex>`, the address of some bytes
//!   (objects, manifests, releases).
//! * [`BundleId`]: the address of a bundle manifest. A distinct type: a
//!   bundle id names a bundle, not any object, so a function that wants one
//!   cannot be handed an object's address by mistake. Its manifest is stored
//!   as an object at [`BundleId::as_address`].
//! * [`ChannelName`]: 1 to 63 characters of `a-z`, `0-9` and `-`, not
//!   starting with `-` (a file name in a repository).
//! * [`AgentId`]: 1 to 128 characters of `A-Z`, `a-z`, `0-9`, `-`, `_` and
//!   `.`, not starting with `.` or `-` (the rule the agent's configuration
//!   has always applied; agent ids appear in certificates, status records,
//!   metrics labels, ownership records and file names).
//!
//! All deref to `str`, borrow as `str` (maps keyed by them are looked up
//! with `&str`) and compare equal to `str`, `&str` and `String`.

use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// A malformed id: which kind, the offending value (escaped and cut short,
/// it may come from untrusted input) and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad {kind} `{value}`: {expected}")]
pub struct IdError {
    /// What the id was meant to be (`address`, `bundle id`, `channel`).
    pub kind: &'static str,
    /// The offending value, escaped for terminals and logs, at most 80
    /// characters.
    pub value: String,
    /// What a valid one looks like.
    pub expected: &'static str,
}

impl IdError {
    fn new(kind: &'static str, value: &str, expected: &'static str) -> Self {
        const SHOWN: usize = 80;
        let mut shown: String = value.chars().take(SHOWN).collect();
        if value.chars().nth(SHOWN).is_some() {
            shown.push('…');
        }
        IdError {
            kind,
            value: cairn_keys::text::escape_untrusted(&shown),
            expected,
        }
    }
}

const ADDRESS_EXPECTED: &str = "expected sha256:<64 lower-case hex digits>";
const CHANNEL_EXPECTED: &str = "use 1-63 characters of a-z, 0-9 and '-', not starting with '-'";
const AGENT_ID_EXPECTED: &str =
    "use 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.', not starting with '.' or '-'";

/// Whether `s` is a well-formed `sha256:<64 lower-case hex>` address.
pub fn is_address(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether `s` is a valid channel name.
pub fn is_channel_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Whether `s` is a valid agent id: 1 to 128 characters of `A-Z`, `a-z`,
/// `0-9`, `-`, `_` and `.`, not starting with `.` or `-`.
pub fn is_agent_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with(['.', '-'])
}

/// A newtype over a `String` checked by `$valid`: `parse`, `parse_owned`
/// (refusing with an [`IdError`] of kind `$kind`), `into_string` and
/// `AsRef<str>`.
macro_rules! validated_string {
    ($ty:ident, $kind:literal, $valid:ident, $expected:ident) => {
        impl $ty {
            #[doc = concat!("Validates `s` as a ", $kind, ".")]
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if $valid(s) {
                    Ok($ty(s.to_owned()))
                } else {
                    Err(IdError::new($kind, s, $expected))
                }
            }

            #[doc = concat!("Validates `s` as a ", $kind, ", keeping its allocation.")]
            pub fn parse_owned(s: String) -> Result<Self, IdError> {
                if $valid(&s) {
                    Ok($ty(s))
                } else {
                    Err(IdError::new($kind, &s, $expected))
                }
            }

            /// The inner string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// The string-like traits every id shares.
macro_rules! string_id {
    ($ty:ident) => {
        impl $ty {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                AsRef::<str>::as_ref(self)
            }
        }

        impl Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                self.as_str()
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse_owned(s)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.into_string()
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<String> for $ty {
            fn eq(&self, other: &String) -> bool {
                self.as_str() == other.as_str()
            }
        }

        impl PartialEq<$ty> for str {
            fn eq(&self, other: &$ty) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$ty> for &str {
            fn eq(&self, other: &$ty) -> bool {
                *self == other.as_str()
            }
        }

        impl PartialEq<$ty> for String {
            fn eq(&self, other: &$ty) -> bool {
                self.as_str() == other.as_str()
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse_owned(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A content address: `sha256:<64 lower-case hex>`. Only a well-formed
/// address can be made, so one can always become a path
/// ([`crate::layout::object_path`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Address(String);

validated_string!(Address, "address", is_address, ADDRESS_EXPECTED);

impl Address {
    /// The address of `bytes` (SHA-256).
    pub fn of(bytes: &[u8]) -> Self {
        Address(cairn_keys::sha256_address(bytes))
    }

    /// The 64 hex digits after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

string_id!(Address);

/// A bundle id: the address of a bundle manifest's canonical bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BundleId(Address);

impl BundleId {
    /// Validates `s` as a bundle id (an address).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Address::parse(s).map(BundleId).map_err(|e| IdError {
            kind: "bundle id",
            ..e
        })
    }

    /// Validates `s` as a bundle id, keeping its allocation.
    pub fn parse_owned(s: String) -> Result<Self, IdError> {
        Address::parse_owned(s).map(BundleId).map_err(|e| IdError {
            kind: "bundle id",
            ..e
        })
    }

    /// The bundle id of manifest bytes.
    pub fn of_manifest(bytes: &[u8]) -> Self {
        BundleId(Address::of(bytes))
    }

    /// The address the manifest is stored at as an object.
    pub fn as_address(&self) -> &Address {
        &self.0
    }

    /// The inner string.
    pub fn into_string(self) -> String {
        self.0.into_string()
    }
}

impl AsRef<str> for BundleId {
    fn as_ref(&self) -> &str {
        self.0.as_str()
    }
}

impl AsRef<Address> for BundleId {
    fn as_ref(&self) -> &Address {
        &self.0
    }
}

impl From<BundleId> for Address {
    fn from(id: BundleId) -> Address {
        id.0
    }
}

string_id!(BundleId);

/// A channel name: 1 to 63 characters of `a-z`, `0-9` and `-`, not
/// starting with `-`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ChannelName(String);

validated_string!(ChannelName, "channel", is_channel_name, CHANNEL_EXPECTED);

string_id!(ChannelName);

/// An agent id: 1 to 128 characters of `A-Z`, `a-z`, `0-9`, `-`, `_` and
/// `.`, not starting with `.` or `-`. Who an agent is in the mesh (its
/// certificate names it), in status records and digests, in rollout
/// decisions (its bucket) and in ownership records.
///
/// Compared as its string is (bytes, then length), but without a call to
/// `memcmp` for the short ids every mesh table is keyed by (the fleet
/// simulator's B-tree lookups spent a seventh of their time in it).
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct AgentId(String);

impl std::hash::Hash for AgentId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal ids are equal strings: hashed as the string (as derived).
        self.0.hash(state);
    }
}

impl PartialEq for AgentId {
    fn eq(&self, other: &Self) -> bool {
        short_cmp(self.0.as_bytes(), other.0.as_bytes()) == std::cmp::Ordering::Equal
    }
}

impl Eq for AgentId {}

impl PartialOrd for AgentId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AgentId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        short_cmp(self.0.as_bytes(), other.0.as_bytes())
    }
}

/// `a.cmp(b)` (lexicographic, a prefix first), by a byte loop when both
/// are short.
fn short_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if a.len() > 32 || b.len() > 32 {
        return a.cmp(b);
    }
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

validated_string!(AgentId, "agent id", is_agent_id, AGENT_ID_EXPECTED);

impl AgentId {
    /// The id an agent gives itself when nothing names it:
    /// `agent-<12 hex digits>` of the low 48 bits of `n` (random).
    pub fn generated(n: u64) -> Self {
        AgentId(format!("agent-{:012x}", n & 0xffff_ffff_ffff))
    }
}

string_id!(AgentId);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn good() -> String {
        format!("sha256:{}", "0123456789abcdef".repeat(4))
    }

    #[test]
    fn agent_ids_compare_exactly_as_their_strings() {
        let long = "x".repeat(40);
        let ids = [
            "a",
            "a0",
            "a1",
            "a10",
            "a9",
            "b",
            "A",
            "a1.b",
            "a1-b",
            "a_1",
            "agent-00000000000a",
            "agent-00000000000b",
            &long,
            "x",
            "xx",
        ];
        for a in ids {
            for b in ids {
                let (x, y) = (AgentId::parse(a).unwrap(), AgentId::parse(b).unwrap());
                assert_eq!(x.cmp(&y), a.cmp(b), "{a} vs {b}");
                assert_eq!(x == y, a == b, "{a} vs {b}");
                assert_eq!(x.partial_cmp(&y), Some(a.cmp(b)));
            }
        }
    }

    #[test]
    fn address_parse_accepts_only_sha256_lower_hex_of_64() {
        let a = Address::parse(&good()).unwrap();
        assert_eq!(a, good().as_str());
        assert_eq!(a.hex(), "0123456789abcdef".repeat(4));
        let bad = [
            String::new(),
            "sha256:".into(),
            "0123456789abcdef".repeat(4),
            good().to_uppercase(),
            format!("sha256:{}", "0123456789ABCDEF".repeat(4)),
            format!("sha512:{}", "0123456789abcdef".repeat(4)),
            format!("{}0", good()),
            good()[..good().len() - 1].to_owned(),
            format!("sha256:{}g", "0".repeat(63)),
            "sha256:../../etc/passwd".into(),
            format!(" {}", good()),
        ];
        for b in &bad {
            let e = Address::parse(b).unwrap_err();
            assert_eq!(e.kind, "address", "{b:?}");
            assert!(Address::parse_owned(b.clone()).is_err(), "{b:?}");
            assert!(b.parse::<Address>().is_err(), "{b:?}");
            assert!(BundleId::parse(b).is_err(), "{b:?}");
        }
        assert_eq!(BundleId::parse("x").unwrap_err().kind, "bundle id");
    }

    #[test]
    fn errors_escape_and_shorten_untrusted_values() {
        let e = Address::parse("sha256:\u{1b}[2Jevil").unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
        assert!(e.to_string().contains("bad address"), "{e}");
        let long = "x".repeat(10_000);
        let e = ChannelName::parse(&long).unwrap_err();
        assert!(e.to_string().len() < 300, "{}", e.to_string().len());
    }

    #[test]
    fn channel_names() {
        for ok in ["a", "stable", "prod-eu-1", "0", &"a".repeat(63)] {
            assert_eq!(ChannelName::parse(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "-a",
            "Stable",
            "a/b",
            "a.b",
            "a b",
            "../x",
            &"a".repeat(64),
        ] {
            let e = ChannelName::parse(bad).unwrap_err();
            assert_eq!(e.kind, "channel");
        }
    }

    #[test]
    fn agent_ids() {
        for ok in [
            "a",
            "edge-berlin-1",
            "edge-7.site_a",
            "A_1",
            &"a".repeat(128),
        ] {
            assert_eq!(AgentId::parse(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a/b",
            "a:b",
            "ä",
            "a\u{1b}",
            &"a".repeat(129),
        ] {
            let e = AgentId::parse(bad).unwrap_err();
            assert_eq!(e.kind, "agent id", "{bad:?}");
            assert!(e.to_string().starts_with("bad agent id"), "{e}");
        }
        let g = AgentId::generated(u64::MAX);
        assert_eq!(g, "agent-ffffffffffff");
        assert!(is_agent_id(&g));
        let cbor = cairn_keys::codec::encode(&"-x");
        let e = cairn_keys::codec::decode::<AgentId>("t", &cbor, 1000).unwrap_err();
        assert!(e.to_string().contains("bad agent id"), "{e}");
    }

    #[test]
    fn deserialize_validates_and_serialize_is_the_bare_string() {
        let a = Address::parse(&good()).unwrap();
        let cbor = cairn_keys::codec::encode(&a);
        assert_eq!(cbor, cairn_keys::codec::encode(&good()));
        let back: Address = cairn_keys::codec::decode("t", &cbor, 1000).unwrap();
        assert_eq!(back, a);
        let b: BundleId = cairn_keys::codec::decode("t", &cbor, 1000).unwrap();
        assert_eq!(b.as_address(), &a);

        let bad = cairn_keys::codec::encode(&"sha256:nope");
        let e = cairn_keys::codec::decode::<Address>("t", &bad, 1000).unwrap_err();
        assert!(e.to_string().contains("bad address"), "{e}");
        let e = cairn_keys::codec::decode::<BundleId>("t", &bad, 1000).unwrap_err();
        assert!(e.to_string().contains("bad bundle id"), "{e}");
        let e = cairn_keys::codec::decode::<ChannelName>("t", &bad, 1000).unwrap_err();
        assert!(e.to_string().contains("bad channel"), "{e}");
        // Not a string at all.
        let n = cairn_keys::codec::encode(&7u32);
        assert!(cairn_keys::codec::decode::<Address>("t", &n, 1000).is_err());
    }

    #[test]
    fn string_like_use() {
        let a = Address::parse(&good()).unwrap();
        let mut m: BTreeMap<Address, u64> = BTreeMap::new();
        m.insert(a.clone(), 3);
        // Lookups by &str through Borrow<str>.
        assert_eq!(m.get(good().as_str()), Some(&3));
        assert!(a.starts_with("sha256:"));
        assert_eq!(a.to_string(), good());
        assert_eq!(good(), a);
        assert_eq!(good().as_str(), a);
        let s: String = a.clone().into();
        assert_eq!(s, good());
        let id = BundleId::of_manifest(b"m");
        assert_eq!(id, cairn_keys::sha256_address(b"m"));
        assert_eq!(Address::from(id.clone()), *id.as_address());
    }
}

/// The signed bytes do not change: releases and manifests encode exactly as
/// they did with `String` fields (the structs below are the old shapes),
/// and a malformed id in a signed document is refused while decoding.
#[cfg(test)]
mod wire_compat_tests {
    use crate::bundle::{
        Entry, Manifest, Rendered, RenderedValues, Source, FORMAT_1 as BUNDLE_FORMAT,
    };
    use crate::release::{FailureLimit, Release, Rollout, Wave, RELEASE_FORMAT};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize)]
    struct OldRelease {
        format: u32,
        channel: String,
        sequence: u64,
        bundle: String,
        created: u64,
        expires: u64,
        rollout: Rollout,
        selector: BTreeMap<String, String>,
    }

    #[derive(Serialize, Deserialize)]
    struct OldEntry {
        path: String,
        document: u32,
        api_version: String,
        kind: String,
        namespace: String,
        name: String,
        object: String,
        size: u64,
    }

    #[derive(Serialize, Deserialize)]
    struct OldRenderedValues {
        file: String,
        digest: String,
    }

    #[derive(Serialize, Deserialize)]
    struct OldRendered {
        path: String,
        tool: String,
        values: Vec<OldRenderedValues>,
        settings: Vec<String>,
    }

    #[derive(Serialize, Deserialize)]
    struct OldSource {
        repository: String,
        commit: String,
        path: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rendered: Vec<OldRendered>,
    }

    #[derive(Serialize, Deserialize)]
    struct OldManifest {
        format: u32,
        source: OldSource,
        entries: Vec<OldEntry>,
    }

    fn addr(byte: &str) -> String {
        format!("sha256:{}", byte.repeat(32))
    }

    fn old_release(bundle: &str, channel: &str) -> OldRelease {
        OldRelease {
            format: RELEASE_FORMAT,
            channel: channel.into(),
            sequence: 7,
            bundle: bundle.into(),
            created: 1_800_000_000,
            expires: 1_900_000_000,
            rollout: Rollout {
                waves: vec![Wave {
                    basis_points: 1000,
                    delay_secs: 60,
                }],
                max_failures: Some(FailureLimit::Count(2)),
            },
            selector: [("region".to_owned(), "eu".to_owned())].into(),
        }
    }

    fn old_manifest(object: &str, digest: &str) -> OldManifest {
        OldManifest {
            format: BUNDLE_FORMAT,
            source: OldSource {
                repository: "repo".into(),
                commit: "c".repeat(40),
                path: String::new(),
                rendered: vec![OldRendered {
                    path: "chart".into(),
                    tool: "helm v3".into(),
                    values: vec![OldRenderedValues {
                        file: "values.yaml".into(),
                        digest: digest.into(),
                    }],
                    settings: vec!["release=x".into()],
                }],
            },
            entries: vec![OldEntry {
                path: "a.yaml".into(),
                document: 0,
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "ns".into(),
                name: "a".into(),
                object: object.into(),
                size: 12,
            }],
        }
    }

    #[test]
    fn release_bytes_are_unchanged() {
        let old = cairn_keys::codec::encode(&old_release(&addr("ab"), "stable"));
        let new = Release {
            format: RELEASE_FORMAT,
            channel: super::ChannelName::parse("stable").unwrap(),
            sequence: 7,
            bundle: super::BundleId::parse(&addr("ab")).unwrap(),
            created: 1_800_000_000,
            expires: 1_900_000_000,
            rollout: Rollout {
                waves: vec![Wave {
                    basis_points: 1000,
                    delay_secs: 60,
                }],
                max_failures: Some(FailureLimit::Count(2)),
            },
            selector: [("region".to_owned(), "eu".to_owned())].into(),
        };
        assert_eq!(cairn_keys::codec::encode(&new), old);
        let back: Release = cairn_keys::codec::decode("release", &old, old.len()).unwrap();
        assert_eq!(back, new);
        // The bytes themselves, so a change to the old shape cannot hide
        // a change here: the bundle id is a CBOR text string of 71 bytes
        // (0x78 0x47) right after the key `bundle`.
        let mut key_and_value = vec![0x66];
        key_and_value.extend_from_slice(b"bundle");
        key_and_value.extend_from_slice(&[0x78, 0x47]);
        key_and_value.extend_from_slice(addr("ab").as_bytes());
        assert!(old.windows(key_and_value.len()).any(|w| w == key_and_value));
    }

    #[test]
    fn manifest_bytes_and_id_are_unchanged() {
        let old = cairn_keys::codec::encode(&old_manifest(&addr("cd"), &addr("ef")));
        let new = Manifest {
            format: BUNDLE_FORMAT,
            source: Source {
                repository: "repo".into(),
                commit: "c".repeat(40),
                path: String::new(),
                rendered: vec![Rendered {
                    path: "chart".into(),
                    tool: "helm v3".into(),
                    values: vec![RenderedValues {
                        file: "values.yaml".into(),
                        digest: super::Address::parse(&addr("ef")).unwrap(),
                    }],
                    settings: vec!["release=x".into()],
                }],
            },
            entries: vec![Entry {
                path: "a.yaml".into(),
                document: 0,
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "ns".into(),
                name: "a".into(),
                object: super::Address::parse(&addr("cd")).unwrap(),
                size: 12,
            }],
            images: None,
        };
        assert_eq!(new.encode(), old);
        assert_eq!(new.id(), cairn_keys::sha256_address(&old));
        let limits = crate::limits::Limits::default();
        let back = Manifest::decode(&old, Some(&new.id()), &limits).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn malformed_ids_in_signed_documents_are_refused_while_decoding() {
        let limits = crate::limits::Limits::default();
        for (bundle, channel) in [
            ("sha256:short", "stable"),
            ("../../etc/passwd", "stable"),
            (addr("AB").as_str(), "stable"),
            (addr("ab").as_str(), "../x"),
            (addr("ab").as_str(), ""),
        ] {
            let bytes = cairn_keys::codec::encode(&old_release(bundle, channel));
            let env = cairn_keys::Envelope::new(cairn_keys::PayloadType::Release, bytes);
            let e = Release::decode_envelope(&env.encode(), limits.max_release_bytes)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("bad bundle id") || e.contains("bad channel"),
                "{e}"
            );
        }
        for (object, digest) in [
            ("sha256:../x", addr("ef")),
            ("", addr("ef")),
            (addr("cd").as_str(), "sha256:1".to_owned()),
        ] {
            let bytes = cairn_keys::codec::encode(&old_manifest(object, &digest));
            let e = Manifest::decode(&bytes, None, &limits)
                .unwrap_err()
                .to_string();
            assert!(e.contains("bad address"), "{e}");
        }
    }
}
