//! A test token server for the distribution registry's `auth.token` mode
//! (the registry token flow): HTTPS on loopback, checks basic credentials,
//! issues ES256 JWTs with an `x5c` certificate the registry trusts
//! (`rootcertbundle`), granting the requested repository actions.

use anyhow::{Context, Result};
use base64::Engine;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The `service` (token audience).
pub(crate) const SERVICE: &str = "cairn-test-registry";
/// The token issuer.
pub(crate) const ISSUER: &str = "cairn-test-issuer";

pub(crate) struct TokenServer {
    addr: SocketAddr,
    signer_pem: String,
    issued: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

struct Signer {
    key: ring::signature::EcdsaKeyPair,
    cert_der: Vec<u8>,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Signer {
    fn token(&self, user: &str, scopes: &[String]) -> String {
        let header = format!(
            r#"{{"typ":"JWT","alg":"ES256","x5c":["{}"]}}"#,
            base64::engine::general_purpose::STANDARD.encode(&self.cert_der)
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let access: Vec<String> = scopes
            .iter()
            .filter_map(|s| {
                // repository:NAME:ACTIONS
                let mut parts = s.splitn(3, ':');
                let (t, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                let actions: Vec<String> = actions.split(',').map(|a| format!("\"{a}\"")).collect();
                Some(format!(
                    r#"{{"type":"{t}","name":"{name}","actions":[{}]}}"#,
                    actions.join(",")
                ))
            })
            .collect();
        let claims = format!(
            r#"{{"iss":"{ISSUER}","sub":"{user}","aud":"{SERVICE}","exp":{},"nbf":{},"iat":{},"jti":"{}","access":[{}]}}"#,
            now + 300,
            now.saturating_sub(60),
            now,
            now,
            access.join(",")
        );
        let input = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(claims.as_bytes())
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = self
            .key
            .sign(&rng, input.as_bytes())
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default();
        format!("{input}.{}", b64url(&sig))
    }
}

impl TokenServer {
    /// Starts the server with TLS certificate `tls` (from the test CA),
    /// accepting `user`/`password`.
    pub(crate) fn start(
        tls: &crate::registry::IssuedCert,
        user: &str,
        password: &str,
    ) -> Result<Self> {
        let signing_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cairn test token signer");
        let cert = params.self_signed(&signing_key)?;
        let signer = Signer {
            key: ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signing_key.serialize_der(),
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|e| anyhow::anyhow!("signing key: {e}"))?,
            cert_der: cert.der().to_vec(),
        };
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(
                tls.cert_der.clone(),
            )],
            rustls::pki_types::PrivateKeyDer::Pkcs8(tls.key_der.clone().into()),
        )
        .context("token server TLS")?;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let issued = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (issued2, stop2) = (issued.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let sock = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        continue;
                    }
                };
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("")
                    .to_owned();
                let authorized = text.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("authorization") && v.trim() == expected
                    })
                });
                let scopes: Vec<String> = path
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .map(pct_decode)
                    .collect();
                let (status, body) = if authorized {
                    issued2.fetch_add(1, Ordering::Relaxed);
                    (
                        "200 OK",
                        format!(r#"{{"token":"{}"}}"#, signer.token("cairn", &scopes)),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"details":"bad credentials"}"#.into(),
                    )
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        Ok(Self {
            addr,
            signer_pem: cert.pem(),
            issued,
            stop,
        })
    }

    /// `https://127.0.0.1:PORT/token`.
    pub(crate) fn realm(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    /// The certificate whose key signs tokens (the registry's `rootcertbundle`).
    pub(crate) fn signer_pem(&self) -> &str {
        &self.signer_pem
    }

    /// Tokens issued so far.
    pub(crate) fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
