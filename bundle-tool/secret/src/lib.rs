//! `cairn-secret`: Encrypted Secrets: a Kubernetes Secret encrypted to one or more sites'
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

use age::secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::str::FromStr;

/// Parses YAML text into its non-empty documents' values (the agent's
/// reader for decrypted Secrets; the builder uses its own stricter YAML
/// reader and calls the `*_value` functions).
pub type YamlReader<'a> = &'a dyn Fn(&str) -> Result<Vec<serde_json::Value>, String>;

/// [`YamlReader`] with `serde_norway` (YAML 1.2, aliases bounded by it).
pub fn yaml_values(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// `apiVersion` of an [`AgeSecret`].
pub const API_VERSION: &str = "cairn.dev/v1alpha1";
/// `kind` of an [`AgeSecret`].
pub const KIND: &str = "AgeSecret";
/// Largest Secret manifest (plaintext) accepted: Kubernetes' 1 MiB limit.
pub const MAX_SECRET_BYTES: usize = 1 << 20;
/// Largest `AgeSecret` document accepted (armor adds about a third).
pub const MAX_DOCUMENT_BYTES: usize = 2 << 20;
/// Most recipients of one Secret.
pub const MAX_RECIPIENTS: usize = 1024;
/// Largest identity file read.
pub const MAX_IDENTITY_FILE_BYTES: usize = 1 << 20;

const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// What went wrong, naming the file (and the field or line) concerned.
/// Every string from the input is escaped in the message.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The input is not what it should be.
    #[error("{file}: {reason}")]
    Invalid {
        /// The file (or `-`).
        file: String,
        /// What is wrong, and where.
        reason: String,
    },
    /// A recipient is not an `age1...` X25519 recipient.
    #[error("recipient `{recipient}`: {reason}")]
    Recipient {
        /// The recipient as given (escaped, shortened).
        recipient: String,
        /// Why it is refused.
        reason: String,
    },
    /// None of the identities can decrypt the Secret.
    #[error("{file}: Secret {name}: no identity in {identities} can decrypt it (encrypted to other sites' keys)")]
    NotForUs {
        /// The `AgeSecret` file.
        file: String,
        /// `namespace/name` of the Secret.
        name: String,
        /// The identity file.
        identities: String,
    },
    /// age failed (a damaged ciphertext, an IO error while writing).
    #[error("{file}: {reason}")]
    Age {
        /// The file concerned.
        file: String,
        /// age's message.
        reason: String,
    },
}

/// Escapes and shortens an untrusted string for a message.
pub fn esc(s: &str) -> String {
    let e = cairn_keys::text::escape_untrusted(s);
    if e.chars().count() > 120 {
        let mut t: String = e.chars().take(120).collect();
        t.push_str("...");
        t
    } else {
        e
    }
}

/// A [`SecretError::Invalid`] for `file`.
pub fn invalid(file: &str, reason: impl Into<String>) -> SecretError {
    SecretError::Invalid {
        file: esc(file),
        reason: reason.into(),
    }
}

/// The name and namespace of a Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (none: the target's default namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Metadata {
    /// `namespace/name`, or `name`.
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{}", esc(ns), esc(&self.name)),
            None => esc(&self.name),
        }
    }
}

/// An encrypted Secret as stored in Git and in bundles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgeSecret {
    /// [`API_VERSION`].
    pub api_version: String,
    /// [`KIND`].
    pub kind: String,
    /// The Secret's name and namespace.
    pub metadata: Metadata,
    /// The ASCII-armored age file of the Secret manifest.
    pub ciphertext: String,
}

/// Parses `age1...` recipients (X25519).
pub fn parse_recipients(list: &[String]) -> Result<Vec<age::x25519::Recipient>, SecretError> {
    if list.is_empty() {
        return Err(SecretError::Recipient {
            recipient: String::new(),
            reason: "no recipient given: pass --recipient age1... (a site's public key, from `age-keygen -y`)".into(),
        });
    }
    if list.len() > MAX_RECIPIENTS {
        return Err(SecretError::Recipient {
            recipient: format!("{} recipients", list.len()),
            reason: format!("at most {MAX_RECIPIENTS}"),
        });
    }
    list.iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r.trim()).map_err(|e| SecretError::Recipient {
                recipient: esc(r),
                reason: if r.trim().starts_with("age1") {
                    format!("not a valid age X25519 recipient ({})", esc(e))
                } else {
                    "not an age X25519 recipient (age1...); passphrases, SSH keys and plugins are not supported".into()
                },
            })
        })
        .collect()
}

/// Reads recipients from a recipients file's text (one per line; `#`
/// comments and blank lines skipped), as `age -R` does.
pub fn recipients_from_text(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Checks that `bytes` is exactly one Kubernetes `v1` `Secret` and returns
/// its name and namespace.
pub fn check_plain_secret(
    bytes: &[u8],
    file: &str,
    yaml: YamlReader<'_>,
) -> Result<Metadata, SecretError> {
    Ok(plain_secret(bytes, file, yaml)?.0)
}

/// [`check_plain_secret`], also returning the Secret as a JSON value.
pub fn plain_secret(
    bytes: &[u8],
    file: &str,
    yaml: YamlReader<'_>,
) -> Result<(Metadata, serde_json::Value), SecretError> {
    if bytes.len() > MAX_SECRET_BYTES {
        return Err(invalid(
            file,
            format!(
                "{} bytes; a Secret is at most {MAX_SECRET_BYTES} bytes",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(file, format!("not UTF-8: {e}")))?;
    let docs = yaml(text).map_err(|e| invalid(file, format!("invalid YAML: {}", esc(&e))))?;
    let mut values = docs.into_iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(invalid(
            file,
            "expected exactly one YAML document (one Secret per file)",
        ));
    };
    let field = |path: &str| -> Option<&serde_json::Value> {
        path.split('.').try_fold(&v, |v, k| v.get(k))
    };
    let string = |path: &str| -> Result<Option<String>, SecretError> {
        match field(path) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(file, format!("field {path}: not a string"))),
        }
    };
    let kind = string("kind")?.unwrap_or_default();
    let api = string("apiVersion")?.unwrap_or_default();
    if kind != "Secret" || api != "v1" {
        return Err(invalid(
            file,
            format!(
                "fields apiVersion/kind: `{}`/`{}`; only a v1 Secret can be encrypted",
                esc(&api),
                esc(&kind)
            ),
        ));
    }
    let name = string("metadata.name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(file, "field metadata.name: missing"))?;
    let namespace = string("metadata.namespace")?.filter(|n| !n.is_empty());
    for (k, section) in [("data", field("data")), ("stringData", field("stringData"))] {
        if let Some(section) = section {
            if !(section.is_object() || section.is_null()) {
                return Err(invalid(file, format!("field {k}: not a map")));
            }
        }
    }
    Ok((Metadata { name, namespace }, v))
}

/// Encrypts the Secret manifest `secret` (read from `file`) to
/// `recipients`; returns the `AgeSecret` document (YAML). The manifest's
/// bytes are encrypted as they are (comments and formatting kept).
pub fn encrypt(
    secret: &[u8],
    file: &str,
    recipients: &[age::x25519::Recipient],
    yaml: YamlReader<'_>,
) -> Result<String, SecretError> {
    let metadata = check_plain_secret(secret, file, yaml)?;
    let age_err = |e: &dyn std::fmt::Display| SecretError::Age {
        file: esc(file),
        reason: e.to_string(),
    };
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| age_err(&e))?;
    let mut armored = Vec::with_capacity(secret.len() * 4 / 3 + 512);
    let armor =
        age::armor::ArmoredWriter::wrap_output(&mut armored, age::armor::Format::AsciiArmor)
            .map_err(|e| age_err(&e))?;
    let mut w = encryptor.wrap_output(armor).map_err(|e| age_err(&e))?;
    w.write_all(secret).map_err(|e| age_err(&e))?;
    w.finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| age_err(&e))?;
    let ciphertext = String::from_utf8(armored).map_err(|e| age_err(&e))?;
    let doc = AgeSecret {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata,
        ciphertext,
    };
    let yaml = serde_norway::to_string(&doc).map_err(|e| age_err(&e))?;
    Ok(format!(
        "# A Secret encrypted with age (`cairn secret encrypt`, docs/OPERATIONS.md);\n\
         # only the sites holding one of its recipients' identities can read it.\n{yaml}"
    ))
}

/// Parses an `AgeSecret` document (untrusted: bounded and checked).
pub fn parse(doc: &[u8], file: &str, yaml: YamlReader<'_>) -> Result<AgeSecret, SecretError> {
    if doc.len() > MAX_DOCUMENT_BYTES {
        return Err(invalid(
            file,
            format!(
                "{} bytes; an AgeSecret is at most {MAX_DOCUMENT_BYTES} bytes",
                doc.len()
            ),
        ));
    }
    let text = std::str::from_utf8(doc).map_err(|e| invalid(file, format!("not UTF-8: {e}")))?;
    let docs = yaml(text).map_err(|e| invalid(file, format!("invalid YAML: {}", esc(&e))))?;
    let mut values = docs.into_iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(invalid(file, "expected exactly one YAML document"));
    };
    from_value(v, file)
}

/// Checks an `AgeSecret` already read as a value (e.g. a bundle object's
/// canonical JSON, which an agent has).
pub fn from_value(v: serde_json::Value, file: &str) -> Result<AgeSecret, SecretError> {
    let s: AgeSecret = serde_json::from_value(v)
        .map_err(|e| invalid(file, format!("not an AgeSecret: {}", esc(&e.to_string()))))?;
    if s.api_version != API_VERSION || s.kind != KIND {
        return Err(invalid(
            file,
            format!(
                "fields apiVersion/kind: `{}`/`{}`, expected `{API_VERSION}`/`{KIND}`",
                esc(&s.api_version),
                esc(&s.kind)
            ),
        ));
    }
    if s.metadata.name.is_empty() {
        return Err(invalid(file, "field metadata.name: empty"));
    }
    if !s.ciphertext.trim_start().starts_with(ARMOR_BEGIN) {
        return Err(invalid(
            file,
            format!("field ciphertext: not an ASCII-armored age file (`{ARMOR_BEGIN}`); encrypt with `cairn secret encrypt` or `age -a`"),
        ));
    }
    Ok(s)
}

/// age identities (`AGE-SECRET-KEY-1...` lines of an identity file, as
/// `age-keygen` writes them).
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    /// Where they were read from (for messages).
    pub source: String,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({} from {})", self.keys.len(), self.source)
    }
}

impl Identities {
    /// Parses an identity file's text: `AGE-SECRET-KEY-1...` lines, `#`
    /// comments and blank lines. Any other line is an error naming its
    /// number (never its content: it may be a key).
    pub fn parse(text: &str, source: &str) -> Result<Self, SecretError> {
        if text.len() > MAX_IDENTITY_FILE_BYTES {
            return Err(invalid(source, "identity file too large"));
        }
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| {
                invalid(
                    source,
                    format!(
                        "line {}: not an age X25519 identity (AGE-SECRET-KEY-1...; from `age-keygen`)",
                        i + 1
                    ),
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(invalid(
                source,
                "no identity (AGE-SECRET-KEY-1...) in the file",
            ));
        }
        Ok(Self {
            keys,
            source: esc(source),
        })
    }

    /// Reads an identity file (bounded).
    pub fn read(path: &std::path::Path) -> Result<Self, SecretError> {
        let shown = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|e| invalid(&shown, e.to_string()))?;
        let mut text = String::new();
        f.take(MAX_IDENTITY_FILE_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| invalid(&shown, e.to_string()))?;
        Self::parse(&text, &shown)
    }

    /// The recipients (public keys) of these identities.
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    /// A new identity file's text (`age-keygen` format) and its recipient.
    pub fn generate() -> (String, String) {
        let key = age::x25519::Identity::generate();
        let public = key.to_public().to_string();
        let text = format!(
            "# created by `cairn secret keygen`\n# public key: {public}\n{}\n",
            key.to_string().expose_secret()
        );
        (text, public)
    }
}

/// Decrypts an `AgeSecret` with `identities` and checks the plaintext is
/// the Secret the document names. Returns the Secret manifest's bytes
/// (kept in memory only by the caller).
pub fn decrypt(
    secret: &AgeSecret,
    file: &str,
    identities: &Identities,
    yaml: YamlReader<'_>,
) -> Result<Vec<u8>, SecretError> {
    Ok(decrypt_value(secret, file, identities, yaml)?.0)
}

/// [`decrypt`], also returning the Secret as a JSON value (what an agent
/// applies).
pub fn decrypt_value(
    secret: &AgeSecret,
    file: &str,
    identities: &Identities,
    yaml: YamlReader<'_>,
) -> Result<(Vec<u8>, serde_json::Value), SecretError> {
    let age_err = |reason: String| SecretError::Age {
        file: esc(file),
        reason: format!("Secret {}: {reason}", secret.metadata.display()),
    };
    let armor = age::armor::ArmoredReader::new(secret.ciphertext.as_bytes());
    let decryptor = age::Decryptor::new_buffered(armor)
        .map_err(|e| age_err(format!("field ciphertext: {e}")))?;
    if decryptor.is_scrypt() {
        return Err(age_err(
            "encrypted with a passphrase; encrypt to the sites' age recipients instead".into(),
        ));
    }
    let mut reader =
        match decryptor.decrypt(identities.keys.iter().map(|k| k as &dyn age::Identity)) {
            Ok(r) => r,
            Err(age::DecryptError::NoMatchingKeys) => {
                return Err(SecretError::NotForUs {
                    file: esc(file),
                    name: secret.metadata.display(),
                    identities: identities.source.clone(),
                })
            }
            Err(e) => return Err(age_err(e.to_string())),
        };
    let mut plain = Vec::new();
    (&mut reader)
        .take(MAX_SECRET_BYTES as u64 + 1)
        .read_to_end(&mut plain)
        .map_err(|e| age_err(format!("damaged ciphertext: {e}")))?;
    let inner = format!("{file} (decrypted)");
    let (meta, value) = plain_secret(&plain, &inner, yaml)?;
    if meta != secret.metadata {
        return Err(invalid(
            file,
            format!(
                "the ciphertext holds Secret {}, but the document names {}: refusing a Secret moved under another name",
                meta.display(),
                secret.metadata.display()
            ),
        ));
    }
    Ok((plain, value))
}
