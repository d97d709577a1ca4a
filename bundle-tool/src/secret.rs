//! Encrypted Secrets: a Kubernetes Secret encrypted to one or more sites'
//! age keys (<https://age-encryption.org/v1>, the `age` crate), stored in
//! Git as an `AgeSecret` document that carries ciphertext only:
//!
//! ```yaml
//! apiVersion: cairn.dev/v1alpha1
//! kind: AgeSecret
//! metadata:
//!   name: db-credentials        # the Secret's name and namespace, in clear
//!   namespace: prod
//! ciphertext: |
//!   -----BEGIN AGE ENCRYPTED FILE-----
//!   ...                         # the whole Secret manifest, age-encrypted
//!   -----END AGE ENCRYPTED FILE-----
//! ```
//!
//! The ciphertext is a standard ASCII-armored age file: `cairn secret
//! encrypt` writes it, and one written by the `age` command line
//! (`age -a -r age1... secret.yaml`) pasted under `ciphertext:` works the
//! same; `age -d -i key.txt` decrypts either. [`decrypt`] (what an agent
//! calls with its identity file, after the bundle is verified) checks that
//! the plaintext is exactly one `v1` `Secret` whose name and namespace are
//! the document's, so a ciphertext cannot be moved under another name.
//!
//! Untrusted input is bounded before it is decoded: the document
//! ([`MAX_DOCUMENT_BYTES`]), the plaintext ([`MAX_SECRET_BYTES`], the
//! Kubernetes limit for a Secret) and the recipients ([`MAX_RECIPIENTS`]).
//! Only X25519 recipients and identities (`age1...`,
//! `AGE-SECRET-KEY-1...`): no passphrases (an agent has none to type, and a
//! passphrase file's work factor is the sender's choice), no plugins.
//!
//! The code lives in the `cairn-secret` crate (shared with the agent, which
//! must not link the builder); this module re-exports it and reads YAML
//! with the builder's stricter reader ([`crate::yaml`]).

pub use cairn_secret::{
    esc, from_value, invalid, parse_recipients, recipients_from_text, AgeSecret, Identities,
    Metadata, SecretError, API_VERSION, KIND, MAX_DOCUMENT_BYTES, MAX_IDENTITY_FILE_BYTES,
    MAX_RECIPIENTS, MAX_SECRET_BYTES,
};

/// The builder's YAML reader as a [`cairn_secret::YamlReader`].
fn yaml(text: &str) -> Result<Vec<serde_json::Value>, String> {
    crate::yaml::parse_documents(text)
        .map(|docs| docs.into_iter().filter_map(|d| d.value).collect())
        .map_err(|e| e.to_string())
}

/// Checks that `bytes` is exactly one Kubernetes `v1` `Secret` and returns
/// its name and namespace.
pub fn check_plain_secret(bytes: &[u8], file: &str) -> Result<Metadata, SecretError> {
    cairn_secret::check_plain_secret(bytes, file, &yaml)
}

/// Encrypts the Secret manifest `secret` (read from `file`) to
/// `recipients`; returns the `AgeSecret` document (YAML).
pub fn encrypt(
    secret: &[u8],
    file: &str,
    recipients: &[age::x25519::Recipient],
) -> Result<String, SecretError> {
    cairn_secret::encrypt(secret, file, recipients, &yaml)
}

/// Parses an `AgeSecret` document (untrusted: bounded and checked).
pub fn parse(doc: &[u8], file: &str) -> Result<AgeSecret, SecretError> {
    cairn_secret::parse(doc, file, &yaml)
}

/// Decrypts an `AgeSecret` with `identities` and checks the plaintext is
/// the Secret the document names.
pub fn decrypt(
    secret: &AgeSecret,
    file: &str,
    identities: &Identities,
) -> Result<Vec<u8>, SecretError> {
    cairn_secret::decrypt(secret, file, identities, &yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: prod\n# a comment\nstringData:\n  password: hunter2\n";

    fn site() -> (Identities, String) {
        let (text, public) = Identities::generate();
        (Identities::parse(&text, "site.key").unwrap(), public)
    }

    #[test]
    fn round_trip_to_two_sites_and_refusal_at_a_third() {
        let (a, pa) = site();
        let (b, pb) = site();
        let (c, _) = site();
        let r = parse_recipients(&[pa, pb]).unwrap();
        let doc = encrypt(SECRET.as_bytes(), "secret.yaml", &r).unwrap();
        assert!(!doc.contains("hunter2"), "{doc}");
        let s = parse(doc.as_bytes(), "db.age.yaml").unwrap();
        assert_eq!(s.metadata.name, "db");
        assert_eq!(s.metadata.namespace.as_deref(), Some("prod"));
        for site in [&a, &b] {
            assert_eq!(decrypt(&s, "db.age.yaml", site).unwrap(), SECRET.as_bytes());
        }
        let e = decrypt(&s, "db.age.yaml", &c).unwrap_err();
        assert!(matches!(e, SecretError::NotForUs { .. }), "{e}");
        assert!(e.to_string().contains("Secret prod/db"), "{e}");
    }

    #[test]
    fn a_ciphertext_moved_under_another_name_is_refused() {
        let (a, pa) = site();
        let doc = encrypt(SECRET.as_bytes(), "s", &parse_recipients(&[pa]).unwrap()).unwrap();
        let moved = doc.replace("name: db", "name: other");
        let s = parse(moved.as_bytes(), "moved.yaml").unwrap();
        let e = decrypt(&s, "moved.yaml", &a).unwrap_err().to_string();
        assert!(e.contains("moved under another name"), "{e}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = check_plain_secret(
            b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "cm.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("cm.yaml: fields apiVersion/kind"), "{e}");
        let e = check_plain_secret(b"apiVersion: v1\nkind: Secret\nmetadata: {}\n", "s.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata.name"), "{e}");
        let two = format!("{SECRET}---\n{SECRET}");
        assert!(check_plain_secret(two.as_bytes(), "two.yaml").is_err());
        let big = vec![b'a'; MAX_SECRET_BYTES + 1];
        assert!(check_plain_secret(&big, "big")
            .unwrap_err()
            .to_string()
            .contains("at most"));
        let e = parse_recipients(&["age1nope\x1b[31m".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\\x1b[31m") && !e.contains('\x1b'), "{e}");
        assert!(parse_recipients(&[]).is_err());
        let e = Identities::parse("AGE-SECRET-KEY-1SECRETBUTWRONG\n", "id.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && !e.contains("SECRETBUTWRONG"), "{e}");
        let e = parse(b"apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata: {name: x}\nciphertext: hello\n", "d.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("field ciphertext"), "{e}");
        let e = parse(b"apiVersion: cairn.dev/v1alpha1\nkind: AgeSecret\nmetadata: {name: x}\nciphertext: x\nextra: 1\n", "d.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }
}
