//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry 2.8) on a loopback port, with TLS from a test CA
//! made here with rcgen, htpasswd (bcrypt) authentication and storage in a
//! temporary directory. Killed when dropped.
//!
//! Needs `docker-registry` and `htpasswd` (apache2-utils) on `PATH`
//! (`.ci/run` installs them).

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A test certificate authority and the PEM files it issued.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok(Self { cert_pem, issuer })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `127.0.0.1`, `::1` and `localhost`.
    pub fn server_cert(&self) -> Result<IssuedCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "registry.test");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, key)
    }

    /// Signs `params` for `key` with this CA.
    fn sign(&self, params: CertificateParams, key: KeyPair) -> Result<IssuedCert> {
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// A client certificate named `name`.
    pub fn client_cert(&self, name: &str) -> Result<IssuedCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, key)
    }
}

/// How to start a [`Registry`].
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// The htpasswd user.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Require a client certificate issued by the test CA.
    pub require_client_cert: bool,
    /// Use the registry token flow (`auth.token`) with a test token
    /// server instead of htpasswd: clients get `401 Bearer realm=...`.
    pub token_auth: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            user: "cairn".into(),
            password: "s3cret-registry-pw".into(),
            require_client_cert: false,
            token_auth: false,
        }
    }
}

/// A running `docker-registry` on loopback. Files in its directory:
/// `ca.pem` (the CA to trust), `certs/ca.crt` (the same, for
/// `skopeo --cert-dir`), `client.pem`/`client.key` (a client certificate
/// from the CA), `storage/` and `registry.log` (its log, including the
/// access log).
pub struct Registry {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    opts: RegistryOptions,
    ca: TestCa,
    token_server: Option<crate::token::TokenServer>,
}

impl Registry {
    /// Starts a registry with the default options.
    pub fn start() -> Result<Self> {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts a registry and waits until it accepts connections.
    pub fn start_with(opts: RegistryOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("Cairn test registry CA")?;
        let server = ca.server_cert()?;
        let client = ca.client_cert("cairn-test-client")?;
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca.cert_pem())?;
        std::fs::create_dir_all(p("certs"))?;
        std::fs::write(p("certs/ca.crt"), ca.cert_pem())?;
        std::fs::write(p("server.pem"), &server.cert_pem)?;
        std::fs::write(p("server.key"), &server.key_pem)?;
        std::fs::write(p("client.pem"), &client.cert_pem)?;
        std::fs::write(p("client.key"), &client.key_pem)?;
        std::fs::create_dir_all(p("storage"))?;
        let out = Command::new("htpasswd")
            .args(["-Bbn", &opts.user, &opts.password])
            .output()
            .context("running htpasswd (apt package apache2-utils)")?;
        if !out.status.success() {
            bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(p("htpasswd"), &out.stdout)?;

        let token_server = if opts.token_auth {
            let ts = crate::token::TokenServer::start(&server, &opts.user, &opts.password)?;
            std::fs::write(p("token-signer.pem"), ts.signer_pem())?;
            Some(ts)
        } else {
            None
        };
        let auth = match &token_server {
            Some(ts) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                ts.realm(),
                crate::token::SERVICE,
                crate::token::ISSUER,
                p("token-signer.pem").display()
            ),
            None => format!(
                "auth:\n  htpasswd:\n    realm: cairn-test\n    path: {}\n",
                p("htpasswd").display()
            ),
        };
        let mut token_server = token_server;
        let mut last_err = None;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let client_cas = if opts.require_client_cert {
                format!("    clientcas:\n      - {}\n", p("ca.pem").display())
            } else {
                String::new()
            };
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n{client_cas}\
                 {auth}",
                storage = p("storage").display(),
                cert = p("server.pem").display(),
                key = p("server.key").display(),
            );
            std::fs::write(p("config.yml"), config)?;
            let log = std::fs::File::create(p("registry.log"))?;
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(p("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting docker-registry (apt package docker-registry)")?;
            match wait_ready(
                &mut child,
                addr,
                &p("registry.log"),
                Duration::from_secs(30),
            ) {
                Ok(()) => {
                    return Ok(Registry {
                        dir,
                        addr,
                        child: Some(child),
                        opts,
                        ca,
                        token_server: token_server.take(),
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // A port taken between probing and binding: try
                    // another; other failures are reported at once.
                    if !format!("{e:#}").contains("address already in use") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `oci://127.0.0.1:PORT/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("oci://{}/{name}", self.addr)
    }

    /// The CA certificate file (PEM) that issued the server certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The test CA (to issue more certificates).
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// A directory for `skopeo --cert-dir` (holds `ca.crt`).
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// A client certificate and key (PEM files) issued by the CA.
    pub fn client_cert_files(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.pem"),
            self.dir.path().join("client.key"),
        )
    }

    /// The htpasswd user and password.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.opts.user, &self.opts.password)
    }

    /// Tokens issued by the test token server (0 without `token_auth`).
    pub fn tokens_issued(&self) -> u64 {
        self.token_server.as_ref().map_or(0, |t| t.issued())
    }

    /// The registry's storage root.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of blob `sha256:<hex>`.
    pub fn blob_data_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        Some(
            self.storage()
                .join("docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data"),
        )
    }

    /// The registry's log so far (application log and access log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Access-log lines (Apache combined format) whose request line
    /// starts with `method` and whose path contains `path_part`.
    pub fn access_lines(&self, method: &str, path_part: &str) -> Vec<String> {
        let want = format!("\"{method} ");
        self.log()
            .lines()
            .filter(|l| {
                l.find(&want)
                    .map(|i| &l[i + want.len()..])
                    .and_then(|rest| rest.split_whitespace().next())
                    .is_some_and(|p| p.contains(path_part))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The registry's directory (config, certificates, log, storage).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the registry (also on drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The registry writes a request's access-log line just after answering
/// it, so a client can finish before its last line is in the log. Polls
/// `count` until it equals `want` (giving up after 10 s) and returns the
/// last value, for the caller to assert on.
pub fn settled_count(want: usize, count: impl Fn() -> usize) -> usize {
    let start = Instant::now();
    loop {
        let n = count();
        if n == want || start.elapsed() > Duration::from_secs(10) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `count` once it stopped changing (the same value twice, 300 ms apart):
/// a baseline that late log lines of earlier requests cannot move.
pub fn quiet_count(count: impl Fn() -> usize) -> usize {
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let n = count();
        if n == last {
            return n;
        }
        last = n;
    }
}

fn wait_ready(child: &mut Child, addr: SocketAddr, log: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "docker-registry exited ({status}) before listening:\n{}",
                log_text()
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "docker-registry not listening on {addr} after {timeout:?}:\n{}",
                log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_starts_with_tls_and_auth() {
        let r = Registry::start().unwrap();
        let (u, p) = r.credentials();
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(r.ca_file())
            .arg("-u")
            .arg(format!("{u}:{p}"))
            .arg(format!("https://{}/v2/", r.host()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", r.log());
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(r.ca_file())
            .arg(format!("https://{}/v2/", r.host()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
        assert_eq!(r.access_lines("GET", "/v2/").len(), 2, "{}", r.log());
    }
}
