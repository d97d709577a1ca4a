//! The fleet's mesh PKI: a fleet CA, agent certificates and operator
//! certificates (rcgen with ring, ECDSA P-256).
//!
//! **Identity rule.** A peer's identity is taken from its certificate, never
//! from what it says on the wire: the first subject-alternative-name URI of
//! the form `cairn-agent://<id>` (an agent) or `cairn-operator://<name>` (an
//! operator CLI). Every agent certificate also carries the DNS name
//! [`MESH_SERVER_NAME`], the one server name every mesh client checks, so
//! that a client dialing an address it learned from gossip can verify "a
//! fleet agent" with stock WebPKI verification; which agent it reached is
//! then read from the URI.
//!
//! Files (PEM): `ca.crt` + `ca.key` for the CA, `<stem>.crt` + `<stem>.key`
//! + a copy of `ca.crt` for an issued certificate. Keys are written mode 0600.

use cairn_keys::fs::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// The DNS name every agent certificate carries and every mesh client
/// verifies (`.invalid` never resolves, so it cannot be confused with a
/// real host).
pub const MESH_SERVER_NAME: &str = "agent.cairn-mesh.invalid";
/// URI scheme prefix of agent identities in certificates.
pub const AGENT_URI_PREFIX: &str = "cairn-agent://";
/// URI scheme prefix of operator identities in certificates.
pub const OPERATOR_URI_PREFIX: &str = "cairn-operator://";
/// Largest PEM file read (certificates and keys are a few KiB).
pub const MAX_PEM_BYTES: u64 = 64 << 10;

/// Errors from the mesh PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not what was expected.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An operator name is not acceptable.
    #[error("identity `{0}`: use 1-128 characters of a-z, A-Z, 0-9, '.', '_' and '-'")]
    BadIdentity(String),
    /// A certificate names a malformed agent id.
    #[error("certificate: {0}")]
    BadAgentId(#[from] cairn_core::IdError),
    /// rcgen refused to build a certificate.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// A certificate carries no Cairn identity.
    #[error("certificate has no `cairn-agent://` or `cairn-operator://` URI name")]
    NoIdentity,
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Parse(String),
    /// Refusing to overwrite existing files.
    #[error("{} exists; refusing to overwrite (use another --out)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
}

/// Result with [`PkiError`].
pub type PkiResult<T> = std::result::Result<T, PkiError>;

pub use crate::identity::PeerIdentity;

/// Operator names: 1-128 of `[A-Za-z0-9._-]`
/// ([`crate::identity::validate_identity`]; agent ids are
/// [`cairn_core::AgentId`]s, valid by construction).
pub fn validate_identity(id: &str) -> PkiResult<()> {
    crate::identity::validate_identity(id).map_err(|e| PkiError::BadIdentity(e.0))
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams, now: u64, days: u32) {
    let now = now as i64;
    let from = time::OffsetDateTime::from_unix_timestamp(now - 3600)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let to = time::OffsetDateTime::from_unix_timestamp(now + i64::from(days) * 86_400)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    params.not_before = from;
    params.not_after = to;
}

fn gen_err(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// Creates a new fleet CA named `name`, valid `days` from `now` (Unix
/// seconds).
pub fn new_ca(name: &str, now: u64, days: u32) -> PkiResult<IssuedCert> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Cairn mesh CA {name}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Cairn");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, now, days);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate from the CA (`ca_cert_pem`, `ca_key_pem`) for
/// `identity`, valid `days` from `now`. Agents get server and client
/// authentication and the DNS name [`MESH_SERVER_NAME`]; operators get
/// client authentication only.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    identity: &PeerIdentity,
    now: u64,
    days: u32,
) -> PkiResult<IssuedCert> {
    if let PeerIdentity::Operator(n) = identity {
        validate_identity(n)?;
    }
    let uri = match identity {
        PeerIdentity::Agent(id) => format!("{AGENT_URI_PREFIX}{id}"),
        PeerIdentity::Operator(n) => format!("{OPERATOR_URI_PREFIX}{n}"),
    };
    let agent = matches!(identity, PeerIdentity::Agent(_));
    issue_uri(ca_cert_pem, ca_key_pem, uri, agent, now, days)
}

/// [`issue`] for an identity URI as given (tests forge malformed ones).
fn issue_uri(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    uri: String,
    agent: bool,
    now: u64,
    days: u32,
) -> PkiResult<IssuedCert> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(gen_err)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params
        .subject_alt_names
        .push(SanType::URI(uri.clone().try_into().map_err(gen_err)?));
    params.distinguished_name.push(DnType::CommonName, uri);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if agent {
        params.subject_alt_names.push(SanType::DnsName(
            MESH_SERVER_NAME.try_into().map_err(gen_err)?,
        ));
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    validity(&mut params, now, days);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The Cairn identity in a DER certificate: its first `cairn-agent://` or
/// `cairn-operator://` URI name. The certificate's chain must have been
/// verified already (by the TLS handshake); this only reads the name.
pub fn identity_of(cert_der: &[u8]) -> PkiResult<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(AGENT_URI_PREFIX) {
                return Ok(PeerIdentity::Agent(cairn_core::AgentId::parse(id)?));
            }
            if let Some(n) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                validate_identity(n)?;
                return Ok(PeerIdentity::Operator(n.to_owned()));
            }
        }
    }
    Err(PkiError::NoIdentity)
}

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key file.
pub const CA_KEY_FILE: &str = "ca.key";

fn read_small(path: &Path) -> PkiResult<String> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(PkiError::BadFile {
            path: path.to_path_buf(),
            reason: format!("{} bytes, over the limit of {MAX_PEM_BYTES}", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Reads a PEM file as text (bounded by [`MAX_PEM_BYTES`]).
pub fn read_pem_text(path: &Path) -> PkiResult<String> {
    read_small(path)
}

/// Reads all certificates from a PEM file.
pub fn read_certs(path: &Path) -> PkiResult<Vec<CertificateDer<'static>>> {
    let text = read_small(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut text.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::BadFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(PkiError::BadFile {
            path: path.to_path_buf(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn read_key(path: &Path) -> PkiResult<PrivateKeyDer<'static>> {
    let text = read_small(path)?;
    rustls_pemfile::private_key(&mut text.as_bytes())
        .map_err(|e| PkiError::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| PkiError::BadFile {
            path: path.to_path_buf(),
            reason: "no PEM private key found".into(),
        })
}

fn write_new(path: &Path, text: &str, mode: Option<u32>) -> PkiResult<()> {
    if path.exists() {
        return Err(PkiError::Exists {
            path: path.to_path_buf(),
        });
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| PkiError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_atomic(path, text.as_bytes(), mode).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `cairn mesh ca init`: writes `ca.crt` and `ca.key` (0600) into `dir`.
/// Returns the certificate path.
pub fn init_ca_dir(dir: &Path, name: &str, now: u64, days: u32) -> PkiResult<PathBuf> {
    let ca = new_ca(name, now, days)?;
    let cert = dir.join(CA_CERT_FILE);
    write_new(&dir.join(CA_KEY_FILE), &ca.key_pem, Some(0o600))?;
    write_new(&cert, &ca.cert_pem, None)?;
    Ok(cert)
}

/// `cairn mesh issue`: issues a certificate for `identity` from the CA in
/// `ca_dir` and writes `<stem>.crt`, `<stem>.key` (0600) and `ca.crt` into
/// `out`, where the stem is `agent` or `operator`. Returns the paths written.
pub fn issue_to_dir(
    ca_dir: &Path,
    identity: &PeerIdentity,
    out: &Path,
    now: u64,
    days: u32,
) -> PkiResult<Vec<PathBuf>> {
    let ca_cert = read_small(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key = read_small(&ca_dir.join(CA_KEY_FILE))?;
    let issued = issue(&ca_cert, &ca_key, identity, now, days)?;
    let stem = match identity {
        PeerIdentity::Agent(_) => "agent",
        PeerIdentity::Operator(_) => "operator",
    };
    let crt = out.join(format!("{stem}.crt"));
    let key = out.join(format!("{stem}.key"));
    let ca = out.join(CA_CERT_FILE);
    write_new(&key, &issued.key_pem, Some(0o600))?;
    write_new(&crt, &issued.cert_pem, None)?;
    if !ca.exists() {
        write_new(&ca, &ca_cert, None)?;
    }
    Ok(vec![crt, key, ca])
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::AgentId;

    const NOW: u64 = 1_800_000_000;

    fn der(pem: &str) -> Vec<u8> {
        let mut bytes = pem.as_bytes();
        let mut certs = rustls_pemfile::certs(&mut bytes);
        certs.next().unwrap().unwrap().to_vec()
    }

    #[test]
    fn agent_and_operator_identities_come_from_the_certificate() {
        let ca = new_ca("test", NOW, 10).unwrap();
        let a = issue(
            &ca.cert_pem,
            &ca.key_pem,
            &PeerIdentity::Agent(AgentId::parse("edge-7").unwrap()),
            NOW,
            1,
        )
        .unwrap();
        assert_eq!(
            identity_of(&der(&a.cert_pem)).unwrap(),
            PeerIdentity::Agent(AgentId::parse("edge-7").unwrap())
        );
        let o = issue(
            &ca.cert_pem,
            &ca.key_pem,
            &PeerIdentity::Operator("ops".into()),
            NOW,
            1,
        )
        .unwrap();
        assert_eq!(
            identity_of(&der(&o.cert_pem)).unwrap(),
            PeerIdentity::Operator("ops".into())
        );
        // The CA itself carries no identity.
        assert!(matches!(
            identity_of(&der(&ca.cert_pem)),
            Err(PkiError::NoIdentity)
        ));
    }

    #[test]
    fn identities_are_validated() {
        let ca = new_ca("test", NOW, 10).unwrap();
        for bad in ["", "a/b", "a b", "x?y", &"z".repeat(129)] {
            let r = issue(
                &ca.cert_pem,
                &ca.key_pem,
                &PeerIdentity::Operator(bad.into()),
                NOW,
                1,
            );
            assert!(matches!(r, Err(PkiError::BadIdentity(_))), "{bad}");
            // An agent identity cannot even be made of it.
            assert!(AgentId::parse(bad).is_err(), "{bad}");
        }
        // A certificate (signed by the fleet CA) naming a malformed agent
        // id is refused when its identity is read, naming the id.
        for bad in ["-x", ".x", "a%2Fb"] {
            let c = issue_uri(
                &ca.cert_pem,
                &ca.key_pem,
                format!("{AGENT_URI_PREFIX}{bad}"),
                true,
                NOW,
                1,
            )
            .unwrap();
            let e = identity_of(&der(&c.cert_pem)).unwrap_err();
            assert!(matches!(e, PkiError::BadAgentId(_)), "{bad}: {e}");
            assert!(e.to_string().contains("bad agent id"), "{e}");
        }
    }

    #[test]
    fn dirs_are_written_once() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca_dir(&ca, "fleet", NOW, 10).unwrap();
        assert!(matches!(
            init_ca_dir(&ca, "fleet", NOW, 10),
            Err(PkiError::Exists { .. })
        ));
        let out = d.path().join("a1");
        let paths = issue_to_dir(
            &ca,
            &PeerIdentity::Agent(AgentId::parse("a1").unwrap()),
            &out,
            NOW,
            1,
        )
        .unwrap();
        assert_eq!(paths.len(), 3);
        let certs = read_certs(&out.join("agent.crt")).unwrap();
        assert_eq!(
            identity_of(&certs[0]).unwrap(),
            PeerIdentity::Agent(AgentId::parse("a1").unwrap())
        );
        read_key(&out.join("agent.key")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("agent.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
    }
}
