//! rustls configurations for the mesh: TLS 1.3 only, the ring provider,
//! mutual authentication against the fleet CA.
//!
//! Both sides verify the other's chain to the fleet CA with stock WebPKI
//! verification; a peer without a certificate from that CA fails the
//! handshake. Clients check the server name [`pki::MESH_SERVER_NAME`], which
//! every agent certificate carries, and both sides then read the peer's
//! identity from its certificate with [`peer_identity`].

use super::pki::{self, PeerIdentity, PkiError};
use super::sync::{RecordKeys, RecordRejection};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol id of the mesh.
pub const ALPN: &[u8] = b"cairn-mesh/1";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading certificates or keys failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths of an agent's or operator's mesh credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialPaths {
    /// Certificate (chain), PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// The fleet CA certificate, PEM.
    pub ca: PathBuf,
}

/// Loaded credentials.
#[derive(Debug)]
pub struct Credentials {
    /// Our certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// The fleet CA as a root store.
    pub roots: Arc<RootCertStore>,
    /// Our own identity, read from our certificate.
    pub identity: PeerIdentity,
}

impl Credentials {
    /// Reads and checks the three files.
    pub fn load(paths: &CredentialPaths) -> Result<Self, TlsError> {
        let chain = pki::read_certs(&paths.cert)?;
        let key = pki::read_key(&paths.key)?;
        let roots = load_roots(&paths.ca)?;
        let identity = pki::identity_of(&chain[0])?;
        Ok(Self {
            chain,
            key,
            roots,
            identity,
        })
    }
}

fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in pki::read_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cfg(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The server side: TLS 1.3, ring, client certificates required and
/// verified against the fleet CA.
pub fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(creds.roots.clone(), provider())
        .build()
        .map_err(cfg)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(cfg)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The client side: TLS 1.3, ring, the server verified against the fleet
/// CA for [`pki::MESH_SERVER_NAME`], our certificate presented.
pub fn client_config(creds: &Credentials) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(creds.roots.clone(), provider())
        .build()
        .map_err(cfg)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(cfg)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The server name every mesh client asks for.
pub fn server_name() -> ServerName<'static> {
    // A constant, valid DNS name: conversion cannot fail.
    ServerName::try_from(pki::MESH_SERVER_NAME)
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// The identity of the peer of a finished handshake, from its end-entity
/// certificate (already verified against the fleet CA by rustls).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, PkiError> {
    let first = certs.and_then(|c| c.first()).ok_or(PkiError::NoIdentity)?;
    pki::identity_of(first)
}

/// Most verified certificates remembered by [`X509RecordKeys`] (the cache
/// is emptied when full).
const MAX_CACHED_CERTS: usize = 8192;

/// A certificate that passed chain verification, remembered so that a new
/// record from the same agent costs one signature check.
#[derive(Debug, Clone)]
struct VerifiedCert {
    agent_id: cairn_core::AgentId,
    public_key: Vec<u8>,
    not_before_ms: u64,
    not_after_ms: u64,
}

/// Status record keys from mesh credentials: our records are signed with
/// our mesh (TLS) private key and carry our certificate; others' are
/// verified with the same WebPKI verification as a TLS server
/// certificate — chain to the fleet CA, validity at the receiver's `now`,
/// server authentication and the name [`pki::MESH_SERVER_NAME`], which
/// only agent certificates have — then their URI must name an agent and
/// the ECDSA P-256 signature must verify with the certificate's key.
pub struct X509RecordKeys {
    cert: Vec<u8>,
    signer: Box<dyn rustls::sign::Signer>,
    verifier: Arc<WebPkiServerVerifier>,
    cache: std::sync::Mutex<std::collections::HashMap<Vec<u8>, VerifiedCert>>,
}

impl std::fmt::Debug for X509RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509RecordKeys")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

impl X509RecordKeys {
    /// Keys from loaded credentials. The private key must be ECDSA P-256
    /// (what `cairn mesh issue` makes).
    pub fn new(creds: &Credentials) -> Result<Self, TlsError> {
        let provider = provider();
        let key = provider
            .key_provider
            .load_private_key(creds.key.clone_key())
            .map_err(cfg)?;
        let signer = key
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| {
                TlsError::Config("the mesh key must be ECDSA P-256 to sign status records".into())
            })?;
        let verifier = WebPkiServerVerifier::builder_with_provider(creds.roots.clone(), provider)
            .build()
            .map_err(cfg)?;
        Ok(Self {
            cert: creds.chain[0].to_vec(),
            signer,
            verifier,
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn check_cert(&self, cert: &[u8], now_ms: u64) -> Result<VerifiedCert, RecordRejection> {
        let key = ring::digest::digest(&ring::digest::SHA256, cert)
            .as_ref()
            .to_vec();
        if let Ok(cache) = self.cache.lock() {
            if let Some(v) = cache.get(&key) {
                if v.not_before_ms <= now_ms && now_ms <= v.not_after_ms {
                    return Ok(v.clone());
                }
            }
        }
        let der = CertificateDer::from(cert);
        let now =
            rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
        if let Err(e) = self
            .verifier
            .verify_server_cert(&der, &[], &server_name(), &[], now)
        {
            use rustls::{CertificateError, Error};
            return Err(match e {
                Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => RecordRejection::Stale(e.to_string()),
                other => RecordRejection::Forged(format!("certificate: {other}")),
            });
        }
        let agent_id = match pki::identity_of(cert) {
            Ok(PeerIdentity::Agent(id)) => id,
            Ok(other) => {
                return Err(RecordRejection::Forged(format!(
                    "certificate of {other} cannot author agent records"
                )))
            }
            Err(e) => return Err(RecordRejection::Forged(e.to_string())),
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| RecordRejection::Forged(format!("certificate: {e}")))?;
        let ms =
            |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64).saturating_mul(1000);
        let v = VerifiedCert {
            agent_id,
            public_key: parsed.public_key().subject_public_key.data.to_vec(),
            not_before_ms: ms(parsed.validity().not_before),
            not_after_ms: ms(parsed.validity().not_after),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHED_CERTS {
                cache.clear();
            }
            cache.insert(key, v.clone());
        }
        Ok(v)
    }
}

impl RecordKeys for X509RecordKeys {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let sig = self.signer.sign(message).map_err(|e| e.to_string())?;
        Ok((self.cert.clone(), sig))
    }

    fn verify(
        &self,
        cert: &[u8],
        message: &[u8],
        signature: &[u8],
        now_ms: u64,
    ) -> Result<cairn_core::AgentId, RecordRejection> {
        let v = self.check_cert(cert, now_ms)?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &v.public_key,
        )
        .verify(message, signature)
        .map_err(|_| RecordRejection::Forged("bad signature".into()))?;
        Ok(v.agent_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{init_ca_dir, issue_to_dir};
    use crate::MeshLimits;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn creds(dir: &Path, ca: &Path, id: PeerIdentity) -> Credentials {
        issue_to_dir(ca, &id, dir, now(), 1).unwrap();
        let stem = match id {
            PeerIdentity::Agent(_) => "agent",
            PeerIdentity::Operator(_) => "operator",
        };
        Credentials::load(&CredentialPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join("ca.crt"),
        })
        .unwrap()
    }

    /// Runs one handshake over 127.0.0.1; returns what each side saw as
    /// the other's identity, or the errors.
    fn handshake(
        server: &Credentials,
        client: &Credentials,
    ) -> (Result<PeerIdentity, String>, Result<PeerIdentity, String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let scfg = server_config(server).unwrap();
        let t = std::thread::spawn(move || -> Result<PeerIdentity, String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(scfg).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            tls.write_all(b"world").map_err(|e| e.to_string())?;
            tls.flush().map_err(|e| e.to_string())?;
            assert_eq!(
                tls.conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            peer_identity(tls.conn.peer_certificates()).map_err(|e| e.to_string())
        });
        let ccfg = client_config(client).unwrap();
        let client_side = (|| -> Result<PeerIdentity, String> {
            let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn =
                rustls::ClientConnection::new(ccfg, server_name()).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            tls.write_all(b"hello").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            peer_identity(tls.conn.peer_certificates()).map_err(|e| e.to_string())
        })();
        let server_side = t.join().unwrap();
        (server_side, client_side)
    }

    #[test]
    fn fleet_members_authenticate_each_other() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca_dir(&ca, "fleet", now(), 10).unwrap();
        let a = creds(
            &d.path().join("a"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap()),
        );
        let b = creds(
            &d.path().join("b"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("b").unwrap()),
        );
        let (s, c) = handshake(&a, &b);
        assert_eq!(
            s.unwrap(),
            PeerIdentity::Agent(cairn_core::AgentId::parse("b").unwrap())
        );
        assert_eq!(
            c.unwrap(),
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap())
        );
        // An operator can connect as a client.
        let o = creds(
            &d.path().join("o"),
            &ca,
            PeerIdentity::Operator("ops".into()),
        );
        let (s, c) = handshake(&a, &o);
        assert_eq!(s.unwrap(), PeerIdentity::Operator("ops".into()));
        assert_eq!(
            c.unwrap(),
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap())
        );
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
        let d = tempfile::tempdir().unwrap();
        let (ca, other) = (d.path().join("ca"), d.path().join("other"));
        init_ca_dir(&ca, "fleet", now(), 10).unwrap();
        init_ca_dir(&other, "intruder", now(), 10).unwrap();
        let a = creds(
            &d.path().join("a"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap()),
        );
        let mut x = creds(
            &d.path().join("x"),
            &other,
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap()),
        );
        // The intruder even trusts the fleet CA, so only its own
        // certificate is wrong.
        x.roots = a.roots.clone();
        // The intruder as client: the fleet server refuses its certificate.
        let (s, c) = handshake(&a, &x);
        let err = s.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(c.is_err());
        // The intruder as server: the fleet client refuses it.
        let (s, c) = handshake(&x, &a);
        let err = c.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(s.is_err());
    }

    #[test]
    fn status_records_are_signed_and_verified_with_mesh_certificates() {
        use crate::pki::{issue, new_ca};
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca_dir(&ca, "fleet", now(), 10).unwrap();
        let a = creds(
            &d.path().join("a"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap()),
        );
        let b = creds(
            &d.path().join("b"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("b").unwrap()),
        );
        let (ka, kb) = (
            X509RecordKeys::new(&a).unwrap(),
            X509RecordKeys::new(&b).unwrap(),
        );
        let now_ms = now() * 1000;
        let msg = b"cairn-mesh-status-record-v2\0record";
        let (cert, sig) = ka.sign(msg).unwrap();
        assert!(
            cert.len() < MeshLimits::default().max_cert_bytes,
            "{}",
            cert.len()
        );
        assert!(sig.len() <= MeshLimits::default().max_signature_bytes);
        // b verifies a's record as a's, twice (the second from the cache).
        for _ in 0..2 {
            assert_eq!(kb.verify(&cert, msg, &sig, now_ms).unwrap(), "a");
        }
        // Another message, or b's signature with a's certificate: forged.
        assert!(matches!(
            kb.verify(&cert, b"other", &sig, now_ms),
            Err(RecordRejection::Forged(_))
        ));
        let (_, sig_b) = kb.sign(msg).unwrap();
        assert!(matches!(
            kb.verify(&cert, msg, &sig_b, now_ms),
            Err(RecordRejection::Forged(_))
        ));
        // Outside the certificate's validity (by the receiver's clock):
        // stale, not forged — also once it is cached.
        let later = now_ms + 3 * 86_400_000;
        assert!(matches!(
            kb.verify(&cert, msg, &sig, later),
            Err(RecordRejection::Stale(_))
        ));
        // An operator certificate of the same fleet cannot author records.
        let o = creds(
            &d.path().join("o"),
            &ca,
            PeerIdentity::Operator("ops".into()),
        );
        let (ocert, osig) = X509RecordKeys::new(&o).unwrap().sign(msg).unwrap();
        let err = kb.verify(&ocert, msg, &osig, now_ms).unwrap_err();
        assert!(matches!(err, RecordRejection::Forged(_)), "{err:?}");
        // A certificate from another CA naming agent "b": forged.
        let other = new_ca("intruder", now(), 10).unwrap();
        let x = issue(
            &other.cert_pem,
            &other.key_pem,
            &PeerIdentity::Agent(cairn_core::AgentId::parse("b").unwrap()),
            now(),
            1,
        )
        .unwrap();
        let xdir = d.path().join("x");
        std::fs::create_dir_all(&xdir).unwrap();
        std::fs::write(xdir.join("agent.crt"), &x.cert_pem).unwrap();
        std::fs::write(xdir.join("agent.key"), &x.key_pem).unwrap();
        let xc = Credentials::load(&CredentialPaths {
            cert: xdir.join("agent.crt"),
            key: xdir.join("agent.key"),
            ca: d.path().join("a").join("ca.crt"),
        })
        .unwrap();
        let (xcert, xsig) = X509RecordKeys::new(&xc).unwrap().sign(msg).unwrap();
        let err = ka.verify(&xcert, msg, &xsig, now_ms).unwrap_err();
        assert!(
            matches!(&err, RecordRejection::Forged(e) if e.contains("UnknownIssuer")),
            "{err:?}"
        );
    }

    #[test]
    fn an_operator_certificate_cannot_serve() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca_dir(&ca, "fleet", now(), 10).unwrap();
        let o = creds(
            &d.path().join("o"),
            &ca,
            PeerIdentity::Operator("ops".into()),
        );
        let a = creds(
            &d.path().join("a"),
            &ca,
            PeerIdentity::Agent(cairn_core::AgentId::parse("a").unwrap()),
        );
        let (_s, c) = handshake(&o, &a);
        assert!(c.is_err());
    }
}
